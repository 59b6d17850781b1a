"""The DSO simulator follows the hub's change feed (``follow: "feed"``): it reads each request once, when the feed
says it ended, instead of polling it; against a real hub, a real Mosquitto and the RP simulator answering in
batches. The paper's polling stays the default."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from mhp_wire.mqtt import MqttEndpoint
from mhp_wire.ports import free_port
from sim.experiment import cli as experiment_cli
from sim.experiment.dso_sim import DsoSimulator
from sim.experiment.rp_sim import RpSimulator, run
from tests.hub_fixtures import HubHandle
from tests.waiting import eventually

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



@pytest.mark.known_leak("pycares (aiohttp's default resolver through aiodns) starts one channel-shutdown thread per "
                        "process on first use and keeps it for the life of the process")
async def test_an_event_longer_than_aiohttps_default_line_is_followed_and_resumed_after_it() -> None:
    """A request's change-feed event names every client its write touched (~63 bytes each), so the event of a
    10,000-client request is over aiohttp's default 512 KiB line. Before, reading it raised ``LineTooLong``, which
    ended the feed's task (not a ``ClientError``): every request waited for the 10 s safety net, and the simulator
    ended in a traceback. A real HTTP server plays the hub's feed: a long terminal event, then a stream cut in the
    middle of the next event (after its ``id:`` line); the resume must ask from the last event handled."""
    long_event = json.dumps({"request_id": "big", "state": "completed",
                             "clients": {f"client-{i:05d}": {"state": "executed"} for i in range(20000)}})
    assert len(long_event) > 512 * 1024
    asked: list[str | None] = []
    done = asyncio.Event()

    async def feed(request: web.Request) -> web.StreamResponse:
        asked.append(request.headers.get("Last-Event-ID"))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if len(asked) == 1:
            await resp.write(f"retry: 1000\n\nid: 7\nevent: request\ndata: {long_event}\n\n".encode())
            await resp.write(b"id: 8\nevent: request\n")  # cut before its data: event 8 was never handled
            return resp
        await resp.write(b'retry: 1000\n\nid: 8\nevent: request\ndata: {"request_id": "small", "state": "failed"}\n\n')
        await done.wait()  # the stream stays open until the test ends
        return resp

    app = web.Application()
    app.router.add_get("/v1/events", feed)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    sim = DsoSimulator({"clients": CLIENTS, "follow": "feed", "hub_url": f"http://127.0.0.1:{port}", "token": "t"})
    big, small = sim._ended("big"), sim._ended("small")
    try:
        async with sim.session() as http:
            following = asyncio.Event()
            task = asyncio.create_task(sim._follow_feed(http, following))
            await eventually(lambda: big.is_set() and small.is_set(), "both requests seen to end")
            assert not task.done()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    finally:
        done.set()
        await runner.cleanup()
    assert asked == [None, "7"]  # resumed after the last event handled, not after the cut one's id line


def test_scaleout_offers_no_feed_following(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Behind HAProxy a replica's live feed carries only its own writes (docs/architecture.md, the change feed and
    replicas): following it, most requests would be read only by the 10 s safety net. So scale-out keeps polling
    and refuses the option; the rate experiment offers it."""
    with pytest.raises(SystemExit) as refused:
        experiment_cli.main(["scaleout", "--out", str(tmp_path), "--dso-follow", "feed"])
    assert refused.value.code == 2 and "unrecognized arguments: --dso-follow" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        experiment_cli.main(["rate", "--help"])
    assert "--dso-follow" in capsys.readouterr().out
