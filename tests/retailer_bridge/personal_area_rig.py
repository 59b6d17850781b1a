"""A real bridge with its personal area on a free port, between two real Mosquittos (the ``rig`` of
test_bridge.py), with two customers' accounts and their gateways' telemetry; and an HTTP customer for it."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from mhp_wire import topics
from mhp_wire.messages import Telemetry
from retailer_bridge.accounts import Accounts, ScryptCost
from retailer_bridge.personal_area import PersonalArea
from retailer_bridge.service import Bridge
from retailer_bridge.settings import BridgeSettings
from tests.broker_fixtures import BrokerHandle, MosquittoFactory
from tests.mqtt_party import Party, parties

CHEAP_SCRYPT_N = 2**10
"""scrypt's N for the rig's passwords: the production default (2**17) would cost every test seconds."""
ALICE = ("c1", "alice@example.com", "correct horse battery")
BOB = ("c2", "bob@example.com", "tr0ub4dor&3-tr0ub4dor")
HOMES: dict[str, tuple[str, dict[str, dict[str, float | bool | None]]]] = {
    "gw-1": ("c1", {"meter": {"kw": 1.5}, "heater": {"on": True, "kw": 1.2}, "ev": {"on": False}}),
    "gw-2": ("c2", {"meter": {"kw": 0.4}, "washer": {"on": True}}),
}


@dataclass
class AreaRig:
    """A running bridge whose personal area listens at ``url``."""

    hub_broker: BrokerHandle
    local: BrokerHandle
    bridge: Bridge

    @property
    def area(self) -> PersonalArea:
        """The bridge's personal area."""
        assert self.bridge.personal_area is not None
        return self.bridge.personal_area

    @property
    def accounts(self) -> Accounts:
        """The accounts the personal area uses (open while the bridge runs)."""
        return self.area.accounts

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (the real port; the bridge was configured with 0)."""
        return self.area.url

    async def outbox(self) -> list[str]:
        """Message ids waiting in the bridge's outbox towards the gateways."""
        return await self.bridge.store.sql.read(lambda db: [r[0] for r in db.execute(
            "SELECT msg_id FROM gateway_outbox ORDER BY msg_id")])


@contextlib.asynccontextmanager
async def running_area(tmp_path: Path, mosquitto_factory: MosquittoFactory,
                       prepare: Callable[[Accounts], Awaitable[None]] | None = None,
                       **settings_overrides: Any) -> AsyncIterator[AreaRig]:
    """Two brokers, the accounts of ALICE (c1, gw-1) and BOB (c2, gw-2), then the bridge with its personal area
    on port 0; both gateways have sent one telemetry message when the block starts.

    Passwords are hashed with a cheap scrypt cost (N=2**10) unless ``settings_overrides`` say otherwise."""
    hub_broker = mosquitto_factory("hub", ["r1", "r2"], "hub")
    local = mosquitto_factory("retailer", ["gw-1", "gw-2"], "bridge")
    settings = BridgeSettings(
        retailer_id="r1", hub_mqtt_host=hub_broker.host, hub_mqtt_port=hub_broker.port,
        hub_mqtt_password=hub_broker.identities["r1"].password, local_mqtt_host=local.host,
        local_mqtt_port=local.port, local_mqtt_password=local.identities["bridge"].password,
        db_path=tmp_path / "bridge.db", customers={"c1": "gw-1", "c2": "gw-2"}, gateway_ack_timeout_s=1.5,
        personal_area_port=0, **{"personal_area_scrypt_n": CHEAP_SCRYPT_N, **settings_overrides})
    accounts = Accounts(settings.db_path, cost=ScryptCost(n=settings.personal_area_scrypt_n))
    await accounts.open()
    try:
        for cid, email, password in (ALICE, BOB):
            await accounts.add(cid, email, password)
        if prepare is not None:
            await prepare(accounts)
    finally:
        await accounts.close()
    bridge = Bridge(settings)
    task = asyncio.create_task(bridge.run(), name="test-bridge")
    try:
        with parties(Party(hub_broker, "hub", topics.status("retailers", "r1"))) as (probe,):
            await probe.next("presence")
        rig = AreaRig(hub_broker, local, bridge)
        assert bridge.personal_area is not None and bridge.personal_area.address is not None
        now = datetime.now(UTC)
        with parties(Party(local, "gw-1"), Party(local, "gw-2")) as gateways:
            for gw, (gid, (cid, devices)) in zip(gateways, HOMES.items(), strict=True):
                await gw.publish(topics.telemetry(gid), Telemetry(gateway_id=gid, client_id=cid, seq=1, at=now,
                                                                   devices=devices, active_power_kw=1.0))
            for _ in range(250):
                if set(bridge.relay.latest_telemetry) == set(HOMES):
                    break
                await asyncio.sleep(0.02)
        yield rig
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def csrf_of(page: str) -> str:
    """The CSRF token in a page's forms."""
    m = CSRF.search(page)
    assert m, "no CSRF token in the page"
    return m[1]


async def sign_in(client: httpx.AsyncClient, email: str, password: str) -> httpx.Response:
    """Open the sign-in form and submit it (the answer, not followed)."""
    form = await client.get("/login")
    assert form.status_code == 200
    return await client.post("/login", data={"csrf": csrf_of(form.text), "email": email, "password": password})


@contextlib.asynccontextmanager
async def customer(rig: AreaRig, who: tuple[str, str, str] | None = None) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of the personal area, signed in as ``who`` when given."""
    async with httpx.AsyncClient(base_url=rig.url, follow_redirects=False, timeout=5) as client:
        if who is not None:
            answer = await sign_in(client, who[1], who[2])
            assert answer.status_code == 303 and answer.headers["location"] == "/", answer.text
        yield client


async def home(client: httpx.AsyncClient) -> tuple[str, str]:
    """``GET /`` of a signed-in customer: the page and its CSRF token."""
    page = await client.get("/")
    assert page.status_code == 200, page.status_code
    return page.text, csrf_of(page.text)
