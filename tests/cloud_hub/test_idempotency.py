"""``Idempotency-Key`` on both storage backends: attempts at once create one request, a failed attempt frees the key,
an attempt still creating makes a repeat wait (then 409 ``in_progress``), and a claim left by an attempt that
died is taken over, or answered with the request it did create."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import cloud_hub.service
from cloud_hub.storage import Mutation
from cloud_hub.store import HubStore
from tests.hub_fixtures import HubHandle


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


async def test_attempts_at_once_create_one_request(hub_any: HubHandle) -> None:
    hub = hub_any
    await hub.setup_registry({"c1": "r1", "c2": "r2"})
    body = emergency(["c1", "c2"])
    headers = {**hub.auth("dso"), "Idempotency-Key": "storm"}
    answers = await asyncio.gather(*(hub.http.post("/v1/emergencies", json=body, headers=headers)
                                     for _ in range(12)))
    assert {a.status_code for a in answers} == {202}, [a.text for a in answers]
    assert len({a.json()["request_id"] for a in answers}) == 1
    assert len(await hub.app.state.store.kv.scan("requests")) == 1


async def test_a_failed_attempt_frees_its_key(hub_any: HubHandle) -> None:
    hub = hub_any
    await hub.setup_registry({"c1": "r1"})
    body = emergency(["c1", "late"])
    headers = {**hub.auth("dso"), "Idempotency-Key": "retry-me"}
    first = await hub.http.post("/v1/emergencies", json=body, headers=headers)
    assert first.status_code == 404, first.text
    await hub.setup_registry({"late": "r2"})
    second = await hub.http.post("/v1/emergencies", json=body, headers=headers)
    assert second.status_code == 202, second.text
    assert (await hub.http.post("/v1/emergencies", json=body, headers=headers)).json() == second.json()


async def test_a_repeat_waits_for_the_attempt_in_progress(hub_any: HubHandle, monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    hub = hub_any
    monkeypatch.setattr(cloud_hub.service, "KEY_WAIT_S", 0.5)
    await hub.setup_registry({"c1": "r1"})
    body = emergency(["c1"])
    digest = await digest_of(hub, body)
    await claim(hub.app.state.store, "busy", digest, "not-yet-created", age_s=0)
    headers = {**hub.auth("dso"), "Idempotency-Key": "busy"}
    r = await hub.http.post("/v1/emergencies", json=body, headers=headers)
    assert r.status_code == 409 and r.json()["error"] == "in_progress", r.text
    assert r.headers["Retry-After"] == "1"
    other = await hub.http.post("/v1/emergencies", json={**body, "power_limit_kw": 1}, headers=headers)
    assert other.status_code == 409 and other.json()["error"] == "conflict"
    assert "different body" in other.json()["message"]
    # Once that claim is stale (its attempt died, nothing created), a corrected body may take the key.
    await hub.app.state.store.kv.batch([Mutation("idempotency", "dso|busy", delete=["d:claim"])])
    await claim(hub.app.state.store, "busy", digest, "not-created", age_s=cloud_hub.service.KEY_CLAIM_STALE_S + 1)
    corrected = await hub.http.post("/v1/emergencies", json={**body, "power_limit_kw": 1}, headers=headers)
    assert corrected.status_code == 202, corrected.text


async def test_a_dead_attempts_claim_is_taken_over_or_answered(hub_any: HubHandle, caplog: pytest.LogCaptureFixture,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    hub = hub_any
    monkeypatch.setattr(cloud_hub.service, "KEY_WAIT_S", 0.3)
    await hub.setup_registry({"c1": "r1"})
    body = emergency(["c1"])
    digest = await digest_of(hub, body)
    store = hub.app.state.store
    # It died before creating anything: a retry after the claim went stale creates the request.
    await claim(store, "dead", digest, "never-created", age_s=cloud_hub.service.KEY_CLAIM_STALE_S + 1)
    with caplog.at_level(logging.WARNING, logger="cloud_hub.service"):
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
    with caplog.at_level(logging.WARNING, logger="cloud_hub.service"):
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
