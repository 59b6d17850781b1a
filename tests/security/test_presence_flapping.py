"""Hostile test: a retailer flapping its presence online/offline while another retailer's requests are sent.

Real parts: Mosquitto from ``broker_config``, the hub's own service, request book, SQLite store and relay, whose
MQTT link receives the flapping retailer's presence over the broker; an observer with its own identity records,
in the order the broker forwards them, every message the hub publishes to any retailer. Time is driven: the relay
and the presence rate limiter read a frozen clock, so nothing here depends on how fast the machine is (a re-send
happens only because of a presence change, never because a back-off expired during the test).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cloud_hub.authz import Principal
from cloud_hub.book import RequestBook
from cloud_hub.metrics import HubMetrics
from cloud_hub.relay import HubRelay
from cloud_hub.service import HubService
from cloud_hub.store import HubStore
from mhp_wire import topics
from mhp_wire.messages import Request, decode, presence_payload
from mhp_wire.mqtt import MqttEndpoint, MqttLink
from mhp_wire.ratelimit import RateLimiter
from tests.broker_fixtures import BrokerHandle, MosquittoFactory
from tests.waiting import eventually

DSO = Principal("dso")
A_REQUESTS = 20
"""Requests to the flapping retailer r1 that it never acknowledges (re-sent at each accepted ``online``)."""
FLAPS = 40
"""offline/online pairs r1 sends: 80 presence changes."""
BURST = 6
"""Presence changes r1 may make at once: 3 offline/online pairs; the clock never refills the bucket."""
WAIT_S = 15.0



def link(broker: BrokerHandle, username: str, subscriptions: list[str],
         handler: Callable[[str, bytes, bool], object]) -> MqttLink:
    async def on_message(topic: str, payload: bytes, retained: bool) -> None:
        result = handler(topic, payload, retained)
        if asyncio.iscoroutine(result):
            await result

    return MqttLink(MqttEndpoint(broker.host, broker.port, username, broker.identities[username].password),
                    client_id=username, subscriptions=subscriptions, handler=on_message, clean_start=True,
                    session_expiry_s=0)


def sample(metrics: HubMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def test_a_flapping_retailer_never_delays_another_retailers_first_sends(
    tmp_path: Path, mosquitto_factory: MosquittoFactory
) -> None:
    broker = mosquitto_factory("hub", ["r1", "r2"], "hub", extra_privileged=["observer"])
    frozen = time.time()
    store = HubStore.embedded(tmp_path / "hub.db")
    await store.open()
    try:
        await flap(broker, store, lambda: frozen)
    finally:
        await store.close()


async def flap(broker: BrokerHandle, store: HubStore, clock: Callable[[], float]) -> None:
    """r1 flaps FLAPS times; after each flap r2 gets a new request and the dispatcher runs one round."""
    metrics = HubMetrics()
    book = RequestBook(store, metrics)
    relay = HubRelay(book, metrics, clock=clock)
    relay.presence_limiter = RateLimiter(0.1, BURST, clock=clock)
    service = HubService.build(store, book, metrics)
    seen: list[tuple[str, str]] = []
    """(retailer, request id) of every message the hub published, in the broker's order."""

    def observe(topic: str, payload: bytes, retained: bool) -> None:
        msg = decode(payload)
        assert isinstance(msg, Request)
        seen.append((topic.split("/")[3], msg.request_id))

    async def emergency(client_id: str) -> str:
        start = datetime.now(UTC) + timedelta(hours=1)
        accepted = await service.flexibility.create_emergency(DSO, {"client_ids": [client_id], "start": start,
                                                                    "duration_s": 600, "power_limit_kw": 1.0}, None)
        assert accepted.state == "accepted", accepted
        return accepted.request_id

    async def dispatch_round() -> list[tuple[str, str]]:
        """One round of the dispatcher, as the broker forwarded it."""
        before, sent_before = len(seen), sample(metrics, "mhp_outbox_sent_total")
        await relay.dispatch_once()
        sent = int(sample(metrics, "mhp_outbox_sent_total") - sent_before)
        await eventually(lambda: len(seen) == before + sent, f"the observer gets the {sent} message(s) of the round",
                   timeout_s=WAIT_S)
        return seen[before:]

    for rid in ("r1", "r2"):
        await service.registry.put_retailer(DSO, rid, rid)
    for cid, rid in [("a1", "r1"), ("b1", "r2")]:  # straight into storage: no customers announcement (issue 13)
        await store.put_client(cid, rid, 5.0, None, time.time())  # joins the requests this test counts
    b_first: list[int] = []
    """Per round: the position of r2's new request in it (0: sent first)."""
    a_resent = 0
    async with link(broker, "observer", [f"{topics.PREFIX}/retailers/+/down/#"], observe), \
            link(broker, "hub", [topics.all_up("retailers")], relay.handle) as hub_link, \
            link(broker, "r1", [], lambda *_: None) as r1:
        relay.link = hub_link
        a_ids = [await emergency("a1") for _ in range(A_REQUESTS)]
        assert sorted(r for _, r in await dispatch_round()) == sorted(a_ids)  # first sends; r1 never acks
        for flap in range(FLAPS):
            for state in ("offline", "online"):
                await r1.publish(topics.status("retailers", "r1"), presence_payload(state), retain=True)
            done = 2 * (flap + 1)
            await eventually(lambda n=done: sample(metrics, "mhp_mqtt_received_total", type="presence") == n,
                        f"the hub read r1's {done} presence messages", timeout_s=WAIT_S)
            b_id = await emergency("b1")
            round_ = await dispatch_round()
            b_first.append(round_.index(("r2", b_id)))
            a_resent += sum(1 for r, _ in round_ if r == "r1")

    assert b_first == [0] * FLAPS, "r2's new request waited behind r1's re-sends"
    accepted_onlines = BURST // 2
    assert a_resent == A_REQUESTS * accepted_onlines, "r1's re-sends are bounded by its presence rate"
    # After the burst r1 stays "online" for the hub: each later "offline" is a change refused and counted, each
    # later "online" is then no change at all.
    assert relay.presence["r1"] == "online"
    assert sample(metrics, "mhp_mqtt_rejected_total", reason="presence_rate_limited") == FLAPS - accepted_onlines
