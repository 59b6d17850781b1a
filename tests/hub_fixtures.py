"""A real hub for tests: FastAPI served by uvicorn on a free port, SQLite in ``tmp_path``, a real hub broker."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from cloud_hub.app import create_app
from cloud_hub.settings import HubSettings
from cloud_hub.tokens import TokenBook
from tests.broker_fixtures import BrokerHandle, MosquittoFactory, free_port
from tests.waiting import eventually

__all__ = ["IN_FORCE_SINCE", "HubHandle", "hub", "hub_any", "running_hub"]


IN_FORCE_SINCE = (datetime.now(UTC) - timedelta(days=2_000)).replace(hour=0, minute=0, second=0,
                                                                     microsecond=0).isoformat()
"""A client's supply contract's ``valid_from`` for tests: midnight UTC about five and a half years before the run,
with no end, so the contract is in force whatever today's date is (relative to now: no fixed date to pass)."""


@dataclass
class HubHandle:
    """A running hub: its URL, a bearer token per principal, its broker, and an HTTP client."""

    url: str
    tokens: dict[str, str]
    broker: BrokerHandle
    http: httpx.AsyncClient
    app: Any

    def auth(self, principal: str) -> dict[str, str]:
        """Headers that authenticate as ``principal`` (dso, admin, r1, r2)."""
        return {"Authorization": f"Bearer {self.tokens[principal]}"}

    async def setup_registry(self, clients: dict[str, str]) -> None:
        """Register retailers r1, r2 and ``clients`` (client id -> retailer id) as the DSO would."""
        for rid in ("r1", "r2"):
            r = await self.http.put(f"/v1/retailers/{rid}", json={"name": rid.upper()}, headers=self.auth("admin"))
            assert r.status_code in (200, 201), r.text
        for cid, rid in clients.items():
            body = {"retailer_id": rid, "contracted_power_kw": 6.9, "feeder_id": "f1", "valid_from": IN_FORCE_SINCE}
            r = await self.http.put(f"/v1/clients/{cid}", headers=self.auth("dso"), json=body)
            while r.status_code == 429:  # as a DSO's client does: a hub quicker than its rate limit says when to retry
                await asyncio.sleep(float(r.json()["retry_after_s"]))
                r = await self.http.put(f"/v1/clients/{cid}", headers=self.auth("dso"), json=body)
            assert r.status_code in (200, 201), r.text


async def start_hub(
    tmp_path: Path, broker: BrokerHandle, *, lean: bool = True, **overrides: Any
) -> tuple[uvicorn.Server, asyncio.Task[None], dict[str, str], str]:
    """Start a hub in this event loop; returns the server, its task, the tokens and the URL (``lean=False``: a hub
    without the lean path of the hot routes, ``cloud_hub.lean``)."""
    book = TokenBook(tmp_path / "tokens.json")
    tokens = {"dso": book.issue("dso"), "admin": book.issue("admin"), "r1": book.issue("retailer:r1"),
              "r2": book.issue("retailer:r2")}
    port = free_port()
    settings = HubSettings(**{"http_port": port, "db_path": tmp_path / "hub.db", "tokens_file": book.path,
                              "mqtt_host": broker.host, "mqtt_port": broker.port, "mqtt_username": "hub",
                              "mqtt_password": broker.identities["hub"].password, **overrides})
    app = create_app(settings, lean=lean)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve(), name="test-hub")
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    return server, task, tokens, f"http://127.0.0.1:{port}"


@contextlib.asynccontextmanager
async def served_hub(tmp_path: Path, broker: BrokerHandle, **overrides: Any) -> AsyncIterator[HubHandle]:
    """A hub on ``tmp_path``'s store and ``broker`` (:func:`start_hub`), once ``/readyz`` answers 200 (it waits on a
    condition, at most 10 s), stopped at the end: the same store can be served again, as a restarted hub."""
    server, serving, tokens, url = await start_hub(tmp_path, broker, **overrides)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            await eventually(lambda: _ready(http), "the hub is ready")
            yield HubHandle(url, tokens, broker, http, server.config.app)
    finally:
        server.should_exit = True
        await serving


async def _ready(http: httpx.AsyncClient) -> bool:
    return (await http.get("/readyz")).status_code == 200


async def running_hub(request: pytest.FixtureRequest, tmp_path: Path, mosquitto_factory: MosquittoFactory,
                      backend: str, *, lean: bool = True, **settings: Any) -> AsyncIterator[HubHandle]:
    """A running hub on ``backend`` (``sqlite``, or ``hbase`` through the Thrift test double), ready; ``settings``
    override its ``HubSettings`` (e.g. ``replica_id``)."""
    broker = mosquitto_factory("hub", ["r1", "r2"], "hub")
    overrides: dict[str, Any] = {}
    if backend == "hbase":
        double = request.getfixturevalue("hbase_double")
        overrides = {"storage": "hbase", "hbase_hosts": [f"127.0.0.1:{double.port}"]}
    server, task, tokens, url = await start_hub(tmp_path, broker, lean=lean, **overrides, **settings)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            for _ in range(300):
                if (await http.get("/readyz")).status_code == 200:
                    break
                await asyncio.sleep(0.02)
            yield HubHandle(url, tokens, broker, http, server.config.app)
    finally:
        server.should_exit = True
        await task


@pytest.fixture
async def hub(request: pytest.FixtureRequest, tmp_path: Path, mosquitto_factory: MosquittoFactory
              ) -> AsyncIterator[HubHandle]:
    """A running hub on the embedded store with its hub broker (retailers r1, r2), ready."""
    async for h in running_hub(request, tmp_path, mosquitto_factory, "sqlite"):
        yield h


@pytest.fixture(params=["sqlite", "hbase"])
async def hub_any(request: pytest.FixtureRequest, tmp_path: Path, mosquitto_factory: MosquittoFactory
                  ) -> AsyncIterator[HubHandle]:
    """The same hub on each storage backend: tests using it run twice."""
    async for h in running_hub(request, tmp_path, mosquitto_factory, request.param):
        yield h
