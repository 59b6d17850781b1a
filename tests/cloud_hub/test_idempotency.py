"""``Idempotency-Key`` on a single hub (claims in memory) and on a replica (claims in the shared store), each on
both storage backends: attempts at once create one request, a failed attempt frees the key, a repeat waits for the
attempt in progress (then 409 ``in_progress``); and, for replicas, a claim left by an attempt that died is taken
over, or answered with the request it did create."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from cloud_hub.storage import Mutation
from cloud_hub.store import HubStore
from cloud_hub.usecases import idempotency as keys
from tests.broker_fixtures import MosquittoFactory
from tests.hub_fixtures import HubHandle, running_hub

VARIANTS = [("sqlite", "single"), ("hbase", "single"), ("sqlite", "replica"), ("hbase", "replica")]


async def keyed(request: pytest.FixtureRequest, tmp_path: Path, mosquitto_factory: MosquittoFactory,
                backend: str, mode: str) -> AsyncIterator[HubHandle]:
    # A replica of one runs the same code as several: its claims are in the store.
    settings: dict[str, Any] = {"replica_id": "a", "replica_settle_s": 0.1} if mode == "replica" else {}
    async for hub in running_hub(request, tmp_path, mosquitto_factory, backend, **settings):
        yield hub


@pytest.fixture(params=VARIANTS, ids=["-".join(v) for v in VARIANTS])
async def keyed_hub(request: pytest.FixtureRequest, tmp_path: Path, mosquitto_factory: MosquittoFactory
                    ) -> AsyncIterator[HubHandle]:
    async for h in keyed(request, tmp_path, mosquitto_factory, *request.param):
        yield h


@pytest.fixture(params=["sqlite", "hbase"])
async def replica_hub(request: pytest.FixtureRequest, tmp_path: Path, mosquitto_factory: MosquittoFactory
                      ) -> AsyncIterator[HubHandle]:
    async for h in keyed(request, tmp_path, mosquitto_factory, request.param, "replica"):
        yield h


def emergency(clients: list[str]) -> dict[str, Any]:
    start = datetime.now(UTC) + timedelta(seconds=60)
    return {"client_ids": clients, "start": start.isoformat(), "duration_s": 600, "power_limit_kw": 2.5}


async def digest_of(hub: HubHandle, body: dict[str, Any]) -> str:
    """The hash the hub stores for ``body`` (read back from a probe request's stored answer)."""
    r = await hub.http.post("/v1/emergencies", json=body, headers={**hub.auth("dso"), "Idempotency-Key": "probe"})
    assert r.status_code == 202, r.text
    row = await hub.app.state.store.kv.get("idempotency", "dso|probe")
    return str(row["d:hash"].decode())


async def claim(store: HubStore, key: str, digest: str, request_id: str, age_s: float) -> None:
    value = json.dumps({"hash": digest, "request_id": request_id, "at": time.time() - age_s, "by": "test"})
    assert await store.claim_idempotency("dso", key, None, value.encode())


async def test_attempts_at_once_create_one_request(keyed_hub: HubHandle) -> None:
    hub = keyed_hub
    await hub.setup_registry({"c1": "r1", "c2": "r2"})
    body = emergency(["c1", "c2"])
    headers = {**hub.auth("dso"), "Idempotency-Key": "storm"}
    answers = await asyncio.gather(*(hub.http.post("/v1/emergencies", json=body, headers=headers)
                                     for _ in range(12)))
    assert {a.status_code for a in answers} == {202}, [a.text for a in answers]
    assert len({a.json()["request_id"] for a in answers}) == 1
    rows = await hub.app.state.store.kv.scan("requests")  # besides the registration's customers announcements
    assert len([r for r, cells in rows if cells.get("r:type") != b'"customers"']) == 1


async def test_a_failed_attempt_frees_its_key(keyed_hub: HubHandle) -> None:
    hub = keyed_hub
    await hub.setup_registry({"c1": "r1"})
    body = emergency(["c1", "late"])
    headers = {**hub.auth("dso"), "Idempotency-Key": "retry-me"}
    first = await hub.http.post("/v1/emergencies", json=body, headers=headers)
    assert first.status_code == 404, first.text
    await hub.setup_registry({"late": "r2"})
    second = await hub.http.post("/v1/emergencies", json=body, headers=headers)
    assert second.status_code == 202, second.text
    assert (await hub.http.post("/v1/emergencies", json=body, headers=headers)).json() == second.json()


async def test_a_repeat_waits_for_the_attempt_in_progress(keyed_hub: HubHandle, monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    hub = keyed_hub
    await hub.setup_registry({"c1": "r1"})
    service = hub.app.state.service
    looked_up = service.access.known_suppliers

    async def slow_lookup(client_ids: list[str], at: float, **kw: Any) -> dict[str, Any]:
        await asyncio.sleep(0.8)  # the first attempt is slow (a large request, a busy store)
        return dict(await looked_up(client_ids, at, **kw))

    monkeypatch.setattr(service.access, "known_suppliers", slow_lookup)
    body = emergency(["c1"])
    headers = {**hub.auth("dso"), "Idempotency-Key": "slow"}
    first = asyncio.create_task(hub.http.post("/v1/emergencies", json=body, headers=headers))
    await asyncio.sleep(0.2)
    repeat = await hub.http.post("/v1/emergencies", json=body, headers=headers)  # waits for the first's answer
    assert repeat.status_code == 202 and repeat.json() == (await first).json(), repeat.text
    # A repeat that would wait longer than KEY_WAIT_S is told to retry; another body is a conflict.
    monkeypatch.setattr(keys, "KEY_WAIT_S", 0.2)
    headers = {**hub.auth("dso"), "Idempotency-Key": "slower"}
    first = asyncio.create_task(hub.http.post("/v1/emergencies", json=body, headers=headers))
    await asyncio.sleep(0.2)
    r = await hub.http.post("/v1/emergencies", json=body, headers=headers)
    assert r.status_code == 409 and r.json()["error"] == "in_progress", r.text
    assert r.headers["Retry-After"] == "1"
    other = await hub.http.post("/v1/emergencies", json={**body, "power_limit_kw": 1}, headers=headers)
    assert other.status_code == 409 and other.json()["error"] == "conflict"
    assert "different body" in other.json()["message"]
    assert (await first).status_code == 202


async def test_a_stored_claim_in_progress_makes_a_repeat_wait(replica_hub: HubHandle,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    hub = replica_hub
    monkeypatch.setattr(keys, "KEY_WAIT_S", 0.5)
    await hub.setup_registry({"c1": "r1"})
    body = emergency(["c1"])
    digest = await digest_of(hub, body)
    await claim(hub.app.state.store, "busy", digest, "not-yet-created", age_s=0)  # another replica's attempt
    headers = {**hub.auth("dso"), "Idempotency-Key": "busy"}
    r = await hub.http.post("/v1/emergencies", json=body, headers=headers)
    assert r.status_code == 409 and r.json()["error"] == "in_progress", r.text
    other = await hub.http.post("/v1/emergencies", json={**body, "power_limit_kw": 1}, headers=headers)
    assert other.status_code == 409 and other.json()["error"] == "conflict"
    # Once that claim is stale (its attempt died, nothing created), a corrected body may take the key.
    await hub.app.state.store.kv.batch([Mutation("idempotency", "dso|busy", delete=["d:claim"])])
    await claim(hub.app.state.store, "busy", digest, "not-created", age_s=keys.KEY_CLAIM_STALE_S + 1)
    corrected = await hub.http.post("/v1/emergencies", json={**body, "power_limit_kw": 1}, headers=headers)
    assert corrected.status_code == 202, corrected.text


async def test_a_dead_attempts_claim_is_taken_over_or_answered(replica_hub: HubHandle,
                                                               caplog: pytest.LogCaptureFixture,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    hub = replica_hub
    monkeypatch.setattr(keys, "KEY_WAIT_S", 0.3)
    await hub.setup_registry({"c1": "r1"})
    body = emergency(["c1"])
    digest = await digest_of(hub, body)
    store = hub.app.state.store
    # It died before creating anything: a retry after the claim went stale creates the request.
    await claim(store, "dead", digest, "never-created", age_s=keys.KEY_CLAIM_STALE_S + 1)
    with caplog.at_level(logging.WARNING, logger="cloud_hub.usecases.idempotency"):
        r = await hub.http.post("/v1/emergencies", json=body, headers={**hub.auth("dso"), "Idempotency-Key": "dead"})
    assert r.status_code == 202, r.text
    assert r.json()["request_id"] != "never-created"
    assert "took over a claim" in caplog.text
    # It failed after storing its request, before storing the answer (HBase writes row by row), and the hub never
    # queued the request: a retry, once it has waited for the answer, queues the request and stores the answer.
    made = (await hub.http.post("/v1/emergencies", json=body, headers=hub.auth("dso"))).json()["request_id"]
    book = hub.app.state.service.book
    book.forget()
    assert made not in book.deadlines
    await claim(store, "half", digest, made, age_s=0)
    with caplog.at_level(logging.WARNING, logger="cloud_hub.usecases.idempotency"):
        r = await hub.http.post("/v1/emergencies", json=body, headers={**hub.auth("dso"), "Idempotency-Key": "half"})
    assert r.status_code == 202 and r.json() == {"request_id": made, "state": "accepted"}, r.text
    assert made in book.deadlines, "queued again"
    assert "stored without its answer; queued it now" in caplog.text
    answer, _ = await store.idempotency("dso", "half")
    assert answer is not None and answer[2] == {"request_id": made, "state": "accepted"}


async def test_a_release_never_removes_a_claim_taken_over(hub_any: HubHandle) -> None:
    store = hub_any.app.state.store
    assert await store.claim_idempotency("dso", "k", None, b"first")
    assert await store.claim_idempotency("dso", "k", b"first", b"second")  # taken over (the first went stale)
    assert await store.release_idempotency("dso", "k", b"first") is False
    assert (await store.idempotency("dso", "k"))[1] == b"second"
    assert await store.release_idempotency("dso", "k", b"second") is True
    assert (await store.idempotency("dso", "k"))[1] == b"", "released: empty, unclaimed"
    assert await store.claim_idempotency("dso", "k", b"", b"third")
