"""The ``Idempotency-Key`` protocol around creating a request (docs/api.md)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from cloud_hub.authz import Principal
from cloud_hub.book import RequestBook
from cloud_hub.errors import IdempotencyConflict, KeyInProgress
from cloud_hub.lifecycle import RequestState
from cloud_hub.replicas import Replicas
from cloud_hub.store import HubStore, RequestCodec, StoreUnavailable
from mhp_wire.messages import (
    new_id,
)

log = logging.getLogger(__name__)

KEY_WAIT_S = 5.0
"""How long a repeated attempt waits for the first attempt with its ``Idempotency-Key`` to answer."""
KEY_CLAIM_STALE_S = 30.0
"""A claim on an ``Idempotency-Key`` this old whose request does not exist belongs to an attempt that died (a
crash, or storage lost while it released the claim); a retry takes it over."""


@dataclass(slots=True)
class LocalClaim:
    """A single hub's claim on an ``Idempotency-Key``: the body it was claimed with, set ``done`` when released."""

    digest: str
    done: asyncio.Event


@dataclass(slots=True)
class KeySlot:
    """What :meth:`HubService._keyed` decided: the stored ``answer`` to return, or the ``request_id`` to create
    (under ``claim``, the stored claim value, when a key was given)."""

    request_id: str = ""
    answer: dict[str, Any] | None = None
    """The body stored as the answer to an earlier attempt with the key (its status was 202)."""
    claim: bytes | None = None



def body_hash(body: dict[str, Any]) -> str:
    """A stable hash of a request body, to tell an idempotent retry from a reused key."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


class Idempotency:
    """Claims on ``Idempotency-Key``s (a single hub in memory, replicas in storage) and their stored answers."""

    def __init__(self, store: HubStore, book: RequestBook, replicas: Replicas | None = None) -> None:
        self.store = store
        self.book = book
        self.replicas = replicas
        self._claims_here: dict[tuple[str, str], LocalClaim] = {}
        """A single hub's ``Idempotency-Key`` claims (replicas claim in storage)."""

    @contextlib.asynccontextmanager
    async def keyed(self, who: Principal, key: str | None, body: dict[str, Any]) -> AsyncIterator[KeySlot]:
        """The ``Idempotency-Key`` protocol around creating a request: the first attempt claims the key (a single
        hub in memory, replicas in storage with a compare-and-set), so that two attempts at once, on one hub or on
        two replicas, cannot both create, and gets the request id to create; a later attempt gets the stored
        answer, or waits for the first attempt's answer, or (replicas) takes over a claim whose attempt died before
        creating anything. An attempt that fails before creating its request releases its claim, so that the DSO's
        retry is tried afresh."""
        if not key:
            yield KeySlot(new_id())
            return
        principal, digest = str(who), body_hash(body)
        if self.replicas is None:  # one hub process: every attempt is here, the claim is kept in memory
            slot, here = await self._claim_here(principal, key, digest)
            if here is None:
                yield slot
                return
            try:
                yield slot
            finally:
                del self._claims_here[(principal, key)]
                here.done.set()
            return
        slot = await self._claim(principal, key, digest)
        if slot.answer is not None or slot.claim is None:
            yield slot
            return
        try:
            yield slot
        except asyncio.CancelledError:
            raise  # its storage write may still land (a thread cannot be stopped): the claim goes stale instead
        except BaseException:
            with contextlib.suppress(StoreUnavailable):  # else it goes stale and is taken over by a retry
                if not await self.store.request_exists(slot.request_id):
                    await self.store.release_idempotency(principal, key, slot.claim)
            raise

    async def _claim_here(self, principal: str, key: str, digest: str) -> tuple[KeySlot, LocalClaim | None]:
        """The claim of a single hub: an attempt with a key another attempt holds waits for it (then reads its
        stored answer); costs no storage call beyond reading the answer, as the key had before claims."""
        waited_until = time.monotonic() + KEY_WAIT_S
        while True:
            held = self._claims_here.get((principal, key))
            if held is None:
                break
            if held.digest != digest:
                raise IdempotencyConflict(f"Idempotency-Key {key!r} is in use with a different body")
            left = waited_until - time.monotonic()
            if left <= 0:
                raise KeyInProgress(f"a request with Idempotency-Key {key!r} is still being created; retry shortly")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(held.done.wait(), left)
        here = self._claims_here[(principal, key)] = LocalClaim(digest, asyncio.Event())  # no await since the check
        try:
            answer, _ = await self.store.idempotency(principal, key)
        except BaseException:
            del self._claims_here[(principal, key)]
            here.done.set()
            raise
        if answer is None:
            return KeySlot(new_id()), here
        del self._claims_here[(principal, key)]
        here.done.set()
        if answer[0] != digest:
            raise IdempotencyConflict(f"Idempotency-Key {key!r} was already used with a different body")
        return KeySlot(answer=answer[2]), None

    def _new_claim(self, digest: str) -> bytes:
        return json.dumps({"hash": digest, "request_id": new_id(), "at": time.time(),
                           "by": self.replicas.me if self.replicas is not None else "hub"}).encode()

    async def _claim(self, principal: str, key: str, digest: str) -> KeySlot:
        mine = self._new_claim(digest)
        if await self.store.claim_idempotency(principal, key, None, mine):  # a new key: one storage call
            return KeySlot(json.loads(mine)["request_id"], claim=mine)
        waited_until = time.monotonic() + KEY_WAIT_S
        while True:
            answer, claim = await self.store.idempotency(principal, key)
            if answer is not None:
                if answer[0] != digest:
                    raise IdempotencyConflict(f"Idempotency-Key {key!r} was already used with a different body")
                return KeySlot(answer=answer[2])
            held = json.loads(claim) if claim else None  # b"": released
            if held is not None:
                made = await self.store.request_exists(held["request_id"])
                if held["hash"] != digest and (made or time.time() - held["at"] <= KEY_CLAIM_STALE_S):
                    raise IdempotencyConflict(f"Idempotency-Key {key!r} is in use with a different body")
                if made and time.monotonic() > waited_until:
                    return KeySlot(answer=await self._repair(principal, key, held))
                if made or time.time() - held["at"] <= KEY_CLAIM_STALE_S:
                    if time.monotonic() > waited_until:
                        raise KeyInProgress(f"a request with Idempotency-Key {key!r} is still being created; "
                                            "retry shortly")
                    await asyncio.sleep(0.05)
                    continue
            mine = self._new_claim(digest)
            if await self.store.claim_idempotency(principal, key, claim, mine):
                if held is not None:
                    log.warning("Idempotency-Key %r of %s: took over a claim of %.0f s ago that created nothing",
                                key, principal, time.time() - held["at"])
                return KeySlot(json.loads(mine)["request_id"], claim=mine)
            # another attempt claimed it in the meantime: look again

    async def _repair(self, principal: str, key: str, held: dict[str, Any]) -> dict[str, Any]:
        """The claim's request was stored but its answer was not, for longer than a repeat waits: the attempt
        failed part-way (HBase writes row by row). The request is valid (its row is atomic): the owner queues it
        if it has not (this hub, or this replica when it owns it; another replica's is queued when it reloads)
        and the answer is written, so that every retry gets it."""
        request_id = held["request_id"]
        known = self.book.knows(request_id)
        owner = RequestCodec.owner(await self.store.get_request_cells(request_id, [RequestCodec.meta("owner")]))
        if not known and (self.replicas is None or owner == self.replicas.me):
            await self.book.resume(request_id)
            log.warning("request %s of Idempotency-Key %r was stored without its answer; queued it now", request_id,
                        key)
        answer = {"request_id": request_id, "state": RequestState.ACCEPTED.value}
        await self.store.put_idempotent_answer(principal, key, held["hash"], 202, answer)
        return answer

