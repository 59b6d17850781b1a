"""Network tariffs: publishing a version, delivering the current one to a late retailer, reading them."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from cloud_hub.authz import Action, Principal
from cloud_hub.book import OutboxItem
from cloud_hub.errors import NotFound
from cloud_hub.store import HubStore
from cloud_hub.usecases.access import Access
from cloud_hub.usecases.creating import NewRequest, RequestCreator
from cloud_hub.usecases.idempotency import Idempotency
from cloud_hub.usecases.results import TariffAccepted
from cloud_hub.usecases.shared import ts
from mhp_wire.messages import (
    SEND_PAYLOAD_BYTES,
    ClientState,
    Tariff,
    encode,
    new_id,
    recipient_msg_id,
    tariff_msg_id,
)

log = logging.getLogger(__name__)

TARIFF_DELIVERY_S = 3600

TARIFF_PROBE_MSG_ID = "x" * 64
"""The longest ``msg_id`` a copy of a tariff message carries (the hub's copies and a bridge's public one differ in
it): a tariff is sized with it (:func:`fitted_tariff`)."""

CURRENT_TARIFF = "current"
"""Not a tariff id: ``GET /v1/tariffs/current`` names the tariff published last."""


def tariff_message(stored: dict[str, Any]) -> Tariff:
    """The ``tariff`` message of a stored tariff version; its ``msg_id`` names the tariff and version, so that a
    republication of the same version is recognisably the same."""
    return Tariff(msg_id=tariff_msg_id(stored["tariff_id"], stored["version"]), tariff_id=stored["tariff_id"],
                  version=stored["version"], valid_from=stored["valid_from"], valid_to=stored["valid_to"],
                  periods=stored["periods"], published=stored.get("published"))



def fitted_tariff(body: dict[str, Any]) -> None:
    """Raise ``ValueError`` (422, nothing stored or sent) when a tariff's message would not fit the brokers' packet
    (:data:`~mhp_wire.messages.SEND_PAYLOAD_BYTES`) with any of its copies' ids and the largest version and
    publication numbers: every broker between the hub and the gateways would cut its sender's link for it, again
    at every reconnection (the hub's retained tariff first). A year of hourly prices is ~800 KB; one message passes
    ~2,900 hourly periods."""
    probe = Tariff(tariff_id=body["tariff_id"], version=2**53, valid_from=body["valid_from"],
                   valid_to=body["valid_to"], periods=body["periods"], published=2**53, msg_id=TARIFF_PROBE_MSG_ID)
    size = len(encode(probe))
    if size <= SEND_PAYLOAD_BYTES:
        return
    periods = len(probe.periods)
    per_period = max(1, (size - len(encode(probe.model_copy(update={"periods": probe.periods[:1]})))) //
                     max(1, periods - 1))
    fit = periods - -(-(size - SEND_PAYLOAD_BYTES) // per_period)
    raise ValueError(f"the tariff's message would be {size} bytes, over the {SEND_PAYLOAD_BYTES} bytes the brokers "
                     f"pass to every retailer and gateway: publish its calendar as consecutive tariffs of shorter "
                     f"validity (at most about {max(1, fit)} of these {periods} periods each)")


class Tariffs:
    """Network tariffs, stored (the source) and delivered through the outbox and a retained publication."""

    def __init__(self, store: HubStore, access: Access, idempotency: Idempotency, creator: RequestCreator,
                 publish_retained: Callable[[bytes], Awaitable[None]] | None = None) -> None:
        self.store = store
        self.access = access
        self.idempotency = idempotency
        self.creator = creator
        self.publish_retained = publish_retained
        """``async (payload) -> None``: publishes the retained public tariff (the relay's); None: not published."""

    # -- tariffs ------------------------------------------------------------------------------------------

    async def publish_tariff(self, who: Principal, body: dict[str, Any], key: str | None
                             ) -> TariffAccepted:
        """Store a new tariff version, publish it retained for late joiners, and deliver it to every retailer."""
        self.access.authorize(who, Action.PUBLISH_TARIFF)
        async with self.idempotency.keyed(who, key, body) as slot:
            if slot.answer is not None:  # (stored without the version)
                return TariffAccepted.model_validate(slot.answer)
            return await self._tariff(who, body, key, slot.request_id)

    async def _tariff(self, who: Principal, body: dict[str, Any], key: str | None, request_id: str
                      ) -> TariffAccepted:
        t0 = time.perf_counter()
        if ts(body["valid_to"]) <= ts(body["valid_from"]):
            raise ValueError("valid_to must be after valid_from")
        if body["tariff_id"] == CURRENT_TARIFF:
            raise ValueError(f"tariff_id {CURRENT_TARIFF!r} is reserved: GET /v1/tariffs/current names the latest")
        fitted_tariff(body)
        tariff = json.loads(json.dumps(body, default=str))
        version = await self.store.put_tariff(tariff)
        stored = await self.store.get_tariff(body["tariff_id"], version)
        msg = Tariff(tariff_id=body["tariff_id"], version=version, valid_from=body["valid_from"],
                     valid_to=body["valid_to"], periods=body["periods"],
                     published=None if stored is None else stored.get("published"))
        if self.publish_retained is not None:
            await self.publish_retained(encode(msg))
        retailers = await self.store.retailer_ids()
        parties = {rid: {"retailers": {rid: ClientState.PENDING.value}, "state": ClientState.PENDING.value,
                         "detail": {}, "trace": {}, "updated_at": time.time()} for rid in retailers}
        copies = {rid: msg.model_copy(update={"msg_id": recipient_msg_id(msg.msg_id, rid)}) for rid in retailers}
        outbox = [OutboxItem(copy.msg_id, request_id, rid, "tariff", encode(copy)) for rid, copy in copies.items()]
        answer = await self.creator.create(who, key, NewRequest(
            request_id, "tariff", body, time.time() + TARIFF_DELIVERY_S, t0, outbox=outbox, parties=parties,
            extra={"version": version}))
        return TariffAccepted(**answer.model_dump(), version=version)

    async def deliver_current_tariff(self, who: Principal, retailer_id: str) -> str | None:
        """A retailer registered after a tariff was published is sent the current one through its outbox (acked,
        like the first delivery; ``who`` registered it and may follow the delivery); returns that request's id,
        or None when no tariff has been published."""
        self.access.authorize(who, Action.MANAGE_RETAILER)
        stored = await self.store.current_tariff()
        if stored is None:
            return None
        t0 = time.perf_counter()
        request_id = new_id()
        msg = tariff_message(stored)
        msg = msg.model_copy(update={"msg_id": new_id()})
        parties = {retailer_id: {"retailers": {retailer_id: ClientState.PENDING.value},
                                 "state": ClientState.PENDING.value, "detail": {}, "trace": {},
                                 "updated_at": time.time()}}
        payload = encode(msg)
        if len(payload) > SEND_PAYLOAD_BYTES:  # stored before tariffs were sized (fitted_tariff): never sent
            log.error("retailer %s registered: the current tariff %s v%d is %d bytes, over the %d the brokers pass, "
                      "and is not sent; publish a newer version that fits", retailer_id, stored["tariff_id"],
                      stored["version"], len(payload), SEND_PAYLOAD_BYTES)
            return None
        outbox = [OutboxItem(msg.msg_id, request_id, retailer_id, "tariff", payload)]
        body = {"tariff_id": stored["tariff_id"], "version": stored["version"], "retailer_id": retailer_id,
                "reason": "retailer registered after the tariff was published"}
        await self.creator.create(who, None, NewRequest(
            request_id, "tariff", body, time.time() + TARIFF_DELIVERY_S, t0, outbox=outbox, parties=parties,
            extra={"version": stored["version"]}))
        log.info("retailer %s registered: tariff %s v%d queued for it (request %s)", retailer_id,
                 stored["tariff_id"], stored["version"], request_id)
        return request_id

    async def current_tariff(self, who: Principal) -> dict[str, Any]:
        """The tariff published last, from storage (anyone with a token)."""
        self.access.authorize(who, Action.READ_TARIFF)
        stored = await self.store.current_tariff()
        if stored is None:
            raise NotFound("no tariff has been published yet")
        found = await self.store.get_tariff(stored["tariff_id"], stored["version"])
        return found if found is not None else stored

    async def get_tariff(self, who: Principal, tariff_id: str, version: int | None) -> dict[str, Any]:
        """One stored version of a tariff, its latest when ``version`` is None (anyone with a token)."""
        self.access.authorize(who, Action.READ_TARIFF)
        found = await self.store.get_tariff(tariff_id, version)
        if found is None:
            what = f"tariff {tariff_id!r}" + ("" if version is None else f" version {version}")
            raise NotFound(f"{what} does not exist")
        return found

