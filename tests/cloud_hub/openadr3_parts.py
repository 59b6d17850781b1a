"""Parts of the OpenADR 3 facade's tests: a real hub (uvicorn, SQLite, Mosquitto from broker_config), a real
webhook receiver on 127.0.0.1, and a third-party OpenADR 3 client (``toadr3``, from PyPI) as the VEN."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import toadr3

from cloud_hub.openadr3 import BASE_PATH, BASE_PATH_30
from tests.broker_fixtures import MosquittoFactory
from tests.cloud_hub.test_webhooks import Receiver, receiver  # the fixture: a VEN's callback endpoint
from tests.hub_fixtures import HubHandle, running_hub

__all__ = ["Receiver", "emergency", "join", "oadr_hub", "receiver", "token", "ven"]


@pytest.fixture
async def oadr_hub(request: pytest.FixtureRequest, tmp_path: Path, mosquitto_factory: MosquittoFactory
                   ) -> AsyncIterator[HubHandle]:
    """A hub that may call webhook receivers on 127.0.0.1 (the test's), retrying quickly; clients c1 (of r1) and
    c2 (of r2) registered."""
    async for h in running_hub(request, tmp_path, mosquitto_factory, "sqlite", webhook_allow_private=True,
                               webhook_retry_initial_s=0.05, webhook_retry_max_s=0.2):
        await h.setup_registry({"c1": "r1", "c2": "r2"})
        yield h


def ven(hub: HubHandle, retailer: str) -> toadr3.ToadrClient:
    """A toadr3 client logging in as ``retailer``'s VEN with OAuth2 client credentials (its hub token as the
    secret)."""
    oauth = toadr3.OAuthScopeConfig(token_url=f"{hub.url}{BASE_PATH_30}/auth/token", grant_type="client_credentials",
                                    scope="read_targets write_reports write_subscriptions", client_id=retailer,
                                    client_secret=hub.tokens[retailer])
    # The system resolver on a thread: aiohttp would otherwise pick aiodns (a toadr3 dependency), whose c-ares
    # shutdown thread outlives the test (the leak check fails it); the client closes the session it is given.
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=aiohttp.ThreadedResolver()))
    return toadr3.ToadrClient(f"{hub.url}{BASE_PATH_30}", oauth, session=session)  # a 3.0 client: 3.0.1


async def token(hub: HubHandle, retailer: str) -> dict[str, str]:
    """Authorization headers from the facade's own token endpoint (as a VEN without toadr3 would get them)."""
    r = await hub.http.post(f"{BASE_PATH}/auth/token", data={
        "grant_type": "client_credentials", "client_id": retailer, "client_secret": hub.tokens[retailer]})
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['access_token']}"}


async def join(hub: HubHandle, *retailers: str) -> None:
    """Each retailer joins as a VEN: a token from the facade's token endpoint, then ``POST /vens``."""
    for retailer in retailers:
        r = await hub.http.post(f"{BASE_PATH}/vens", headers=await token(hub, retailer), json={"venName": retailer})
        assert r.status_code == 201, r.text


async def emergency(http: httpx.AsyncClient, headers: dict[str, str], clients: list[str], lead_s: float = 60
                    ) -> tuple[str, datetime]:
    """POST /v1/emergencies for ``clients`` (starting ``lead_s`` from now); returns its id and start."""
    start = datetime.now(UTC) + timedelta(seconds=lead_s)
    r = await http.post("/v1/emergencies", headers=headers, json={
        "client_ids": clients, "start": start.isoformat(), "duration_s": 900, "power_limit_kw": 2.5})
    assert r.status_code == 202, r.text
    return str(r.json()["request_id"]), start


async def wait_for(check: Any, timeout: float = 10.0) -> Any:
    """Poll an async ``check()`` until it returns something truthy (a condition, not a fixed sleep)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        got = await check()
        if got:
            return got
        if loop.time() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.05)
