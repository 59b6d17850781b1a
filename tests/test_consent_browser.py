"""The customer decides where they already are, in a real headless Chromium: a party asks the real hub for a
customer's consumption; the customer, signed in to their retailer's personal area (a real bridge on the hub's real
broker), reads the request in plain words and allows it; the party's next read succeeds. The customer withdraws
it; the party's next read is refused, and the refusal is in the hub's access log and in the customer's own view."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from cloud_hub.tokens import TokenBook
from retailer_bridge.accounts import Accounts, ScryptCost
from retailer_bridge.service import Bridge
from retailer_bridge.settings import BridgeSettings
from tests.broker_fixtures import MosquittoFactory
from tests.browser import Browser, needs_chromium
from tests.hub_fixtures import HubHandle
from tests.retailer_bridge.personal_area_rig import ALICE, CHEAP_SCRYPT_N
from tests.retailer_bridge.test_personal_area_browser import Tab, open_tab

pytestmark = needs_chromium

H = 3600.0


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


@contextlib.asynccontextmanager
async def bridge_on(hub: HubHandle, tmp_path: Path, mosquitto_factory: MosquittoFactory) -> AsyncIterator[Bridge]:
    """Retailer r1's bridge with its personal area, on the hub's broker, once it has heard the hub is online."""
    local = mosquitto_factory("retailer", ["gw-1"], "bridge")
    settings = BridgeSettings(
        retailer_id="r1", hub_mqtt_host=hub.broker.host, hub_mqtt_port=hub.broker.port,
        hub_mqtt_password=hub.broker.identities["r1"].password, local_mqtt_host=local.host,
        local_mqtt_port=local.port, local_mqtt_password=local.identities["bridge"].password,
        db_path=tmp_path / "bridge.db", customers={"c1": "gw-1"}, personal_area_port=0,
        personal_area_scrypt_n=CHEAP_SCRYPT_N)
    accounts = Accounts(settings.db_path, cost=ScryptCost(n=CHEAP_SCRYPT_N))
    await accounts.open()
    try:
        await accounts.add(*ALICE)
    finally:
        await accounts.close()
    bridge = Bridge(settings)
    task = asyncio.create_task(bridge.run(), name="test-bridge")
    try:
        for _ in range(500):
            area = bridge.personal_area
            if bridge.relay.hub_presence == "online" and area is not None and area.address is not None:
                break
            await asyncio.sleep(0.02)
        assert bridge.relay.hub_presence == "online"
        yield bridge
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(tab: Tab, expression: str, expected: Any, tries: int = 100) -> None:
    """Reload the page until ``expression`` gives ``expected``."""
    for _ in range(tries):
        await tab.loads("location.reload()")
        if await tab.evaluate(expression) == expected:
            return
        await asyncio.sleep(0.05)
    assert await tab.evaluate(expression) == expected


async def state_becomes(http: httpx.AsyncClient, pid: str, party: dict[str, str], state: str) -> None:
    """Wait until the hub holds the permission in ``state`` (the decision travels through the bridge's outbox)."""
    for _ in range(200):
        if (await http.get(f"/v1/permissions/{pid}", headers=party)).json()["state"] == state:
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"permission {pid} never became {state}")


async def test_a_customer_allows_then_withdraws_a_party_s_access(
        hub: HubHandle, chromium: Browser, tmp_path: Path, mosquitto_factory: MosquittoFactory) -> None:
    await hub.setup_registry({"c1": "r1"})
    party = {"Authorization": f"Bearer {TokenBook(tmp_path / 'tokens.json').issue('party:p1')}"}
    assert (await hub.http.put("/v1/parties/p1", json={"name": "Energy Co"},
                               headers=hub.auth("admin"))).status_code == 201
    now = time.time()
    start = math.floor(now / 3600) * 3600 - 24 * H
    r = await hub.http.post("/v1/meter-readings", headers=hub.auth("dso"), json={"readings": [
        {"client_id": "c1", "start": iso(start), "resolution_s": 900, "values_kwh": [0.5] * 96}]})
    assert r.status_code == 200, r.text
    profile = {"from": iso(start), "to": iso(start + 24 * H), "resolution_s": 3600}

    async with bridge_on(hub, tmp_path, mosquitto_factory) as bridge:
        r = await hub.http.post("/v1/permissions", headers=party, json={
            "client_id": "c1", "purpose": "a heat-pump offer", "scopes": ["consumption_profile"],
            "resolution_s": 3600, "data_from": iso(start), "data_to": iso(start + 24 * H),
            "valid_until": iso(now + 30 * 24 * H)})
        assert r.status_code == 201, r.text
        pid = r.json()["permission_id"]
        item = f'document.getElementById("permission-{pid}")'
        assert bridge.personal_area is not None
        async with open_tab(chromium, bridge.personal_area.url + "/") as tab:
            await tab.type_into('input[name="email"]', ALICE[1])
            await tab.type_into('input[name="password"]', ALICE[2])
            await tab.loads('document.querySelector("form[action=\\"/login\\"] button").click()')
            assert await tab.evaluate("location.pathname") == "/"
            await until(tab, f"{item} && {item}.dataset.state", "sent_to_pa")
            words = await tab.evaluate(f"{item}.textContent")
            assert "Energy Co asks to see your electricity consumption over time, per hour" in words
            assert "a heat-pump offer" in words and "waiting for your answer" in words

            assert (await hub.http.get("/v1/clients/c1/consumption-profile", params=profile,
                                       headers=party)).status_code == 404, "not before the customer allows it"
            await tab.loads(f'document.getElementById("accept-{pid}").click()')
            assert await tab.evaluate("location.search") == "?decided=accept"
            await state_becomes(hub.http, pid, party, "accepted")
            r = await hub.http.get("/v1/clients/c1/consumption-profile", params=profile, headers=party)
            assert r.status_code == 200, r.text
            assert [p["kwh"] for p in r.json()["series"]] == [2.0] * 24

            await until(tab, f"{item}.dataset.state", "accepted")
            log = await tab.evaluate('document.getElementById("access-log").textContent')
            assert f"party:p1 read your consumption under the right “party:permission:{pid}”" in log
            await tab.loads(f'document.getElementById("revoke-{pid}").click()')
            await state_becomes(hub.http, pid, party, "revoked")
            r = await hub.http.get("/v1/clients/c1/consumption-profile", params=profile, headers=party)
            assert r.status_code == 404, "withdrawn: refused, as if there were no such client"

            await until(tab, f"{item}.dataset.state", "revoked")
            log = await tab.evaluate('document.getElementById("access-log").textContent')
            assert "party:p1: refused (read your consumption)" in log
            assert tab.problems() == []

    entries = (await hub.http.get("/v1/audit", headers=hub.auth("dso"), params={
        "client_id": "c1", "from": iso(now - H), "to": iso(time.time() + H)})).json()["entries"]
    reads = [(e["right"], e["allowed"]) for e in entries if e["principal"] == "party:p1"]
    assert reads == [("none", False), (f"party:permission:{pid}", True), ("none", False)]
    assert json.dumps(entries).count("permission_revoke") == 1
