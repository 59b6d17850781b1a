"""The DSO simulator follows the hub's change feed (``follow: "feed"``): it reads each request once, when the feed
says it ended, instead of polling it; against a real hub, a real Mosquitto and the RP simulator answering in
batches. The paper's polling stays the default."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from mhp_wire.mqtt import MqttEndpoint
from sim.experiment.dso_sim import DsoSimulator
from sim.experiment.rp_sim import RpSimulator, run
from tests.hub_fixtures import HubHandle

CLIENTS = [f"c{i:02d}" for i in range(20)]


async def scenario(hub: HubHandle, follow: str) -> DsoSimulator:
    await hub.setup_registry(dict.fromkeys(CLIENTS, "r1"))
    ident = hub.broker.identities["r1"]
    rp = RpSimulator("r1", MqttEndpoint(hub.broker.host, hub.broker.port, "r1", ident.password),
                     delay_min_ms=100, delay_max_ms=110, seed=3)
    stop = asyncio.Event()
    task = asyncio.create_task(run([rp], None, stop))
    try:
        await rp.link.wait_connected(10)
        cfg: dict[str, Any] = {"clients": CLIENTS, "rates_per_min": {"emergency": 240, "load_shift": 240},
                               "fractions": {"emergency": 0.5, "load_shift": 0.5}, "warmup_s": 0,
                               "duration_s": 1.0, "drain_s": 10, "token": hub.tokens["dso"], "hub_url": hub.url,
                               "poll_interval_s": 0.02, "poll_max_s": 0.1, "follow": follow}
        sim = DsoSimulator(cfg)
        await sim.run()
    finally:
        stop.set()
        await task
    return sim


@pytest.mark.known_leak("pycares (aiohttp's default resolver through aiodns) starts one channel-shutdown thread per "
                        "process on first use and keeps it for the life of the process")
async def test_following_the_feed_reads_each_request_once_when_it_ended(hub: HubHandle) -> None:
    sim = await scenario(hub, "feed")
    assert len(sim.records) == 8
    assert [r["outcome"] for r in sim.records] == ["completed"] * 8
    assert all(r["polls"] == 1 for r in sim.records), [r["polls"] for r in sim.records]
    assert all(r["done_ms"] >= 100 for r in sim.records), "ended after the RP simulator's delay, read from the hub"
    check = sim.self_check()
    assert check["follow"] == "feed" and check["polls"] == 8 and check["feed_events"] >= 8 * 2


@pytest.mark.known_leak("pycares (aiohttp's default resolver through aiodns) starts one channel-shutdown thread per "
                        "process on first use and keeps it for the life of the process")
async def test_polling_stays_the_default_and_reads_a_request_until_it_ended(hub: HubHandle) -> None:
    sim = await scenario(hub, "poll")
    assert [r["outcome"] for r in sim.records] == ["completed"] * 8
    assert sum(r["polls"] for r in sim.records) > 8, "a 20 ms grid polls an open request more than once"
    assert sim.self_check()["feed_events"] == 0
    assert DsoSimulator({"clients": CLIENTS}).follow == "poll"


def test_a_reset_of_the_feed_makes_every_waiting_request_read_itself_again() -> None:
    sim = DsoSimulator({"clients": CLIENTS, "follow": "feed"})
    waiting = [sim._ended("a"), sim._ended("b")]
    sim._on_feed_event("request", '{"request_id": "a", "state": "dispatching"}')
    assert not any(e.is_set() for e in waiting)
    sim._on_feed_event("request", '{"request_id": "a", "state": "completed"}')
    assert waiting[0].is_set() and not waiting[1].is_set()
    sim._on_feed_event("reset", '{"reason": "older than the replay window", "event_id": 1}')
    assert all(e.is_set() for e in waiting)
    with pytest.raises(ValueError, match="follow must be one of"):
        DsoSimulator({"clients": CLIENTS, "follow": "sometimes"})
