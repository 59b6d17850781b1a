"""The network tariff's source is the hub's store, not a broker (issue 13, item 3).

Every part is its own process, as under ``mhp-stack up`` (``sim.stack``): the hub, its broker, one bridge and one
broker per retailer, the gateways. Brokers are killed with ``kill -9`` and started again *empty* (their persistence
snapshot deleted): what was retained on them is gone, and only the stored copies (the hub's store, each bridge's
store) can bring the tariff back. The stack's observer on each broker subscribes to ``public/tariff`` exactly as
a late-joining bridge or gateway does (``Stack.tariffs``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker_config.render import DB_NAME
from sim.stack.stack import Stack
from tests.waiting import eventually


class LateRetailerStack(Stack):
    """A stack whose hub knows only the retailers in ``registered`` when it starts (the others' bridges run,
    their retailers are registered later by the test)."""

    def __init__(self, state_dir: Path, registered: list[str], **kwargs: Any) -> None:
        super().__init__(state_dir, **kwargs)
        self.registered = registered

    async def _register(self) -> None:
        admin = {"Authorization": f"Bearer {self.tokens['admin']}"}
        dso = {"Authorization": f"Bearer {self.tokens['dso']}"}
        async with self.http_client() as http:
            for rid in self.registered:
                (await http.put(f"/v1/retailers/{rid}", json={"name": rid}, headers=admin)).raise_for_status()
            for h in self.homes:
                if h.retailer_id in self.registered:
                    (await http.put(f"/v1/clients/{h.client_id}", headers=dso, json={
                        "retailer_id": h.retailer_id, "contracted_power_kw": 6.9,
                        "valid_from": (datetime.now(UTC) - timedelta(days=30)).isoformat()})).raise_for_status()


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    s = Stack(tmp_path / "stack", retailers=1, homes=1, log_level="INFO")
    try:
        await s.start(timeout_s=60)
        yield s
    finally:
        await s.stop()


@pytest.fixture
async def late_stack(tmp_path: Path) -> AsyncIterator[Stack]:
    s = LateRetailerStack(tmp_path / "stack", ["r1"], retailers=2, homes=2, log_level="INFO")
    try:
        await s.start(timeout_s=60)
        yield s
    finally:
        await s.stop()


def auth(stack: Stack, principal: str) -> dict[str, str]:
    token = stack.tokens["retailers"][principal] if principal.startswith("r") else stack.tokens[principal]
    return {"Authorization": f"Bearer {token}"}


def tariff_body(tariff_id: str, price: float) -> dict[str, Any]:
    now = datetime.now(UTC).replace(microsecond=0)
    return {"tariff_id": tariff_id, "valid_from": now.isoformat(), "valid_to": (now + timedelta(days=1)).isoformat(),
            "periods": [{"start": now.isoformat(), "end": (now + timedelta(hours=8)).isoformat(),
                         "price_eur_per_kwh": price},
                        {"start": (now + timedelta(hours=8)).isoformat(), "end": (now + timedelta(days=1)).isoformat(),
                         "price_eur_per_kwh": price * 2}]}



async def follow(http: httpx.AsyncClient, headers: dict[str, str], request_id: str) -> dict[str, Any]:
    req: dict[str, Any] = {}
    for _ in range(200):
        req = (await http.get(f"/v1/requests/{request_id}", headers=headers)).json()
        if req["state"] not in ("accepted", "dispatching"):
            return req
        await asyncio.sleep(0.1)
    return req


async def publish(stack: Stack, http: httpx.AsyncClient, tariff_id: str, price: float) -> int:
    """POST a tariff and wait until every registered retailer acknowledged it; returns its version."""
    r = await http.post("/v1/tariffs", headers=auth(stack, "dso"), json=tariff_body(tariff_id, price))
    assert r.status_code == 202, r.text
    req = await follow(http, auth(stack, "dso"), r.json()["request_id"])
    assert req["state"] == "completed", req
    version: int = r.json()["version"]
    return version


def bridge_tariff(stack: Stack, retailer_id: str) -> tuple[str, int] | None:
    """What the bridge's store holds (its SQLite file, read beside the running bridge)."""
    path = stack.dir / f"bridge-{retailer_id}.db"
    if not path.exists():
        return None
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        row = db.execute("SELECT tariff_id, version FROM tariff WHERE id=1").fetchone()
    except sqlite3.OperationalError:  # the new bridge has not created its tables yet
        return None
    finally:
        db.close()
    return None if row is None else (row[0], row[1])


def gateway_got(stack: Stack, gateway_id: str, tariff_id: str, version: int) -> int:
    """How often the gateway took this tariff (its log line, once per process start at most)."""
    text = (stack.dir / "logs" / "gateways-1.log").read_text(errors="replace")
    return text.count(f"gateway {gateway_id} has tariff {tariff_id} v{version}")


def kill_9(stack: Stack, *names: str) -> None:
    for name in names:
        proc = stack.sup.children[name].proc
        assert proc is not None and proc.poll() is None, name
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)


async def restart(stack: Stack, *names: str) -> None:
    """Let the supervisor start the killed children again (as ``mhp-stack up`` does)."""
    await eventually(lambda: (stack.sup.check(), all(stack.sup.children[n].pid for n in names))[1],
                     f"{names} restarted", timeout_s=20.0)


def wipe_broker(stack: Stack, name: str) -> None:
    """Delete a (killed) broker's persistence snapshot: it starts again empty, nothing retained."""
    (stack.dir / "brokers" / name / DB_NAME).unlink(missing_ok=True)


async def ready(http: httpx.AsyncClient) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            if (await http.get("/readyz")).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "hub not ready after restart"
        await asyncio.sleep(0.1)


async def test_tariff_survives_the_hub_broker_and_the_hub_restarting(stack: Stack) -> None:
    async with stack.http_client() as http:
        version = await publish(stack, http, "tou", 0.1)
        await eventually(lambda: stack.tariffs.get("hub", ("",))[:2] == ("tou", version), "hub broker retains it",
                   timeout_s=20.0)
        await eventually(lambda: bridge_tariff(stack, "r1") == ("tou", version), "bridge stored it", timeout_s=20.0)
        await eventually(lambda: gateway_got(stack, "gw-1", "tou", version) == 1, "gateway took it", timeout_s=20.0)

        # The hub broker and the hub die with kill -9; the broker comes back empty.
        kill_9(stack, "broker-hub", "hub")
        wipe_broker(stack, "hub")
        stack.tariffs.pop("hub", None)
        await restart(stack, "broker-hub", "hub")
        await ready(http)

        # The hub republished its stored tariff on start: a subscriber to public/tariff gets it again.
        await eventually(lambda: stack.tariffs.get("hub", ("",))[:2] == ("tou", version),
                         "the restarted hub broker holds the tariff again", timeout_s=20.0)
        # The bridge and its broker still hold it.
        assert bridge_tariff(stack, "r1") == ("tou", version)
        assert stack.tariffs["r1"][:2] == ("tou", version)

        # A NEW bridge (r1's, reinstalled with an empty store) started after all that gets it: its delivery had
        # been acknowledged long ago, so only the republished retained copy can bring it.
        kill_9(stack, "bridge-r1")
        for f in stack.dir.glob("bridge-r1.db*"):
            f.unlink()
        await restart(stack, "bridge-r1")
        await eventually(lambda: bridge_tariff(stack, "r1") == ("tou", version), "the new bridge stored it",
                   timeout_s=20.0)


async def test_retailer_registered_after_publication_gets_it(late_stack: Stack) -> None:
    stack = late_stack
    async with stack.http_client() as http:
        version = await publish(stack, http, "tou", 0.1)
        # r2 registers after the publication: the hub sends it the stored tariff through its outbox.
        r = await http.put("/v1/retailers/r2", headers=auth(stack, "admin"), json={"name": "Retailer Two"})
        assert r.status_code == 201, r.text
        assert "tariff_request_id" in r.json(), f"no tariff delivery for the new retailer: {r.json()}"
        req = await follow(http, auth(stack, "admin"), r.json()["tariff_request_id"])
        assert req["state"] == "completed", req
        assert req["type"] == "tariff" and req["version"] == version
        assert req["retailers"] == {"r2": {"state": "acknowledged", "updated_at": req["retailers"]["r2"]["updated_at"]}}
        await eventually(lambda: bridge_tariff(stack, "r2") == ("tou", version), "r2's bridge stored it",
                   timeout_s=20.0)
        await eventually(lambda: stack.tariffs.get("r2", ("",))[:2] == ("tou", version), "r2's broker retains it",
                   timeout_s=20.0)
        await eventually(lambda: gateway_got(stack, "gw-2", "tou", version) >= 1, "r2's gateway took it",
                   timeout_s=20.0)
        # Renaming a retailer is not a registration: nothing is sent again.
        r = await http.put("/v1/retailers/r2", headers=auth(stack, "admin"), json={"name": "Retailer 2"})
        assert r.status_code == 200 and "tariff_request_id" not in r.json()


async def test_bridge_republishes_when_its_broker_restarts_empty(stack: Stack) -> None:
    async with stack.http_client() as http:
        version = await publish(stack, http, "tou", 0.1)
    await eventually(lambda: stack.tariffs.get("r1", ("",))[:2] == ("tou", version), "r1's broker retains it",
               timeout_s=20.0)
    await eventually(lambda: gateway_got(stack, "gw-1", "tou", version) == 1, "gateway took it", timeout_s=20.0)

    kill_9(stack, "broker-r1")
    wipe_broker(stack, "r1")
    stack.tariffs.pop("r1", None)
    await restart(stack, "broker-r1")
    # The bridge reconnects and republishes its stored copy: a gateway subscribing now gets it.
    await eventually(lambda: stack.tariffs.get("r1", ("",))[:2] == ("tou", version),
                     "the restarted retailer broker holds the tariff again", timeout_s=20.0)
    # The gateway itself, started again after the broker restart, gets it again.
    kill_9(stack, "gateways-1")
    await restart(stack, "gateways-1")
    await eventually(lambda: gateway_got(stack, "gw-1", "tou", version) == 2, "the restarted gateway took it",
               timeout_s=20.0)

    # A tariff id of the longest allowed length reaches the gateway too (its retained copy's msg_id fits the wire).
    long_id = "t" * 64
    async with stack.http_client() as http:
        long_version = await publish(stack, http, long_id, 0.2)
    await eventually(lambda: gateway_got(stack, "gw-1", long_id, long_version) == 1, "the gateway took a long id",
               timeout_s=20.0)


async def test_stored_tariffs_are_readable_by_anyone_with_a_token(stack: Stack) -> None:
    async with stack.http_client() as http:
        assert (await http.get("/v1/tariffs/current", headers=auth(stack, "dso"))).status_code == 404
        v1 = await publish(stack, http, "tou", 0.1)
        v2 = await publish(stack, http, "tou", 0.3)
        flat = await publish(stack, http, "flat", 0.2)
        assert (v1, v2, flat) == (1, 2, 1)
        # The hub dies and comes back: the reads come from its store.
        kill_9(stack, "hub")
        await restart(stack, "hub")
        await ready(http)
        for who in ("dso", "admin", "r1"):
            cur = await http.get("/v1/tariffs/current", headers=auth(stack, who))
            assert cur.status_code == 200, (who, cur.text)
            assert cur.json()["tariff_id"] == "flat" and cur.json()["version"] == 1
            assert [p["price_eur_per_kwh"] for p in cur.json()["periods"]] == [0.2, 0.4]
        latest = (await http.get("/v1/tariffs/tou", headers=auth(stack, "r1"))).json()
        assert (latest["version"], latest["latest_version"]) == (2, 2)
        assert [p["price_eur_per_kwh"] for p in latest["periods"]] == [0.3, 0.6]
        first = (await http.get("/v1/tariffs/tou", params={"version": 1}, headers=auth(stack, "dso"))).json()
        assert (first["version"], first["latest_version"]) == (1, 2)
        assert [p["price_eur_per_kwh"] for p in first["periods"]] == [0.1, 0.2]
        assert datetime.fromisoformat(first["valid_from"]) < datetime.fromisoformat(first["valid_to"])
        missing = await http.get("/v1/tariffs/tou", params={"version": 3}, headers=auth(stack, "dso"))
        assert missing.status_code == 404 and missing.json()["error"] == "not_found"
        assert (await http.get("/v1/tariffs/nope", headers=auth(stack, "dso"))).status_code == 404
        assert (await http.get("/v1/tariffs/tou", params={"version": 0}, headers=auth(stack, "dso"))).status_code == 422
        for path in ("/v1/tariffs/current", "/v1/tariffs/tou"):
            assert (await http.get(path)).status_code == 401
            assert (await http.get(path, headers={"Authorization": "Bearer wrong"})).status_code == 401
        # "current" names the latest: it cannot be a tariff's id.
        r = await http.post("/v1/tariffs", headers=auth(stack, "dso"), json=tariff_body("current", 0.1))
        assert r.status_code == 422 and "reserved" in r.json()["message"]
