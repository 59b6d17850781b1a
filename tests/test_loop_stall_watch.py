"""The hub and the bridge run the event loop's stall watchdog (``mhp_wire.loopwatch``) while they serve: a real
block of their loop is logged once with the blocking frame, and counted (the hub's ``/metrics``, the bridge's
``loop_watch``); the watch stops with the service."""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from cloud_hub.settings import HubSettings
from mhp_wire.loopwatch import LoopWatch
from retailer_bridge.service import Bridge
from retailer_bridge.settings import BridgeSettings
from tests.broker_fixtures import MosquittoFactory
from tests.cloud_hub.test_relay import metric
from tests.hub_fixtures import served_hub
from tests.retailer_bridge.test_bridge import running_bridge
from tests.waiting import eventually


def hold_the_services_loop(watch: LoopWatch, at_most_s: float = 10.0) -> None:
    """Block the service's loop (it runs on this test's loop) until its watchdog has taken this frame's stack, at
    most ``at_most_s``: however late a loaded machine runs the watchdog's thread."""
    deadline = time.monotonic() + at_most_s
    while "hold_the_services_loop" not in watch._stack + watch._last_stack and time.monotonic() < deadline:
        time.sleep(0.02)


def blocked_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The stall warnings naming the test's blocking frame (a loaded machine may add starvation stalls)."""
    return [w for w in stall_warnings(caplog) if "hold_the_services_loop" in w]


def stall_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mhp_wire.loopwatch" and r.levelno == logging.WARNING]


async def test_the_hub_reports_a_stall_of_its_loop_and_counts_it_in_its_metrics(
        tmp_path: Path, mosquitto_factory: MosquittoFactory, caplog: pytest.LogCaptureFixture) -> None:
    broker = mosquitto_factory("hub", ["r1"], "hub")
    with caplog.at_level(logging.WARNING, logger="mhp_wire.loopwatch"):
        async with served_hub(tmp_path, broker, loop_stall_s=0.2) as hub:
            watch = hub.app.state.loop_watch
            assert watch.enabled and watch._thread is not None
            before = metric((await hub.http.get("/metrics")).text, "mhp_loop_stall_seconds_count")
            hold_the_services_loop(watch)
            # the warning is logged before the metric grows, the count after it: wait for both
            await eventually(lambda: blocked_warnings(caplog) and watch.stalls >= before + 1, "the stall reported")
            text = (await hub.http.get("/metrics")).text
            assert metric(text, "mhp_loop_stall_seconds_count") >= before + 1
            assert metric(text, "mhp_loop_stall_seconds_sum") > 0.2
        assert watch._thread is None  # stopped with the hub
    [warning] = blocked_warnings(caplog)
    assert warning.startswith("hub: event loop stalled")


async def test_the_bridge_reports_a_stall_of_its_loop(tmp_path: Path, mosquitto_factory: MosquittoFactory,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    hub_broker = mosquitto_factory("hub", ["r1"], "hub")
    local = mosquitto_factory("retailer", ["gw-1"], "bridge")
    with caplog.at_level(logging.WARNING, logger="mhp_wire.loopwatch"):
        async with running_bridge(tmp_path, hub_broker, local, {"c1": "gw-1"}, loop_stall_s=0.2) as bridge:
            before = bridge.loop_watch.stalls
            hold_the_services_loop(bridge.loop_watch)
            await eventually(lambda: blocked_warnings(caplog) and bridge.loop_watch.stalls >= before + 1,
                             "the stall reported")
    assert bridge.loop_watch._thread is None  # stopped with the bridge
    [warning] = blocked_warnings(caplog)
    assert warning.startswith("bridge r1: event loop stalled")


async def test_a_stall_threshold_of_zero_runs_no_watch(tmp_path: Path, mosquitto_factory: MosquittoFactory) -> None:
    broker = mosquitto_factory("hub", ["r1"], "hub")
    async with served_hub(tmp_path, broker, loop_stall_s=0) as hub:
        assert not hub.app.state.loop_watch.enabled and hub.app.state.loop_watch._thread is None


async def test_the_hubs_watch_stops_when_its_shutdown_fails(tmp_path: Path,
                                                            mosquitto_factory: MosquittoFactory) -> None:
    broker = mosquitto_factory("hub", ["r1"], "hub")
    with contextlib.suppress(Exception):  # the server may log the failed shutdown or raise it
        async with served_hub(tmp_path, broker, loop_stall_s=0.2) as hub:
            watch, store = hub.app.state.loop_watch, hub.app.state.store
            close = store.close

            async def close_then_fail() -> None:
                await close()
                raise OSError("the disk went away")

            store.close = close_then_fail
            assert watch._thread is not None
    assert watch._thread is None and watch._gc.callback not in gc.callbacks


def test_a_stall_threshold_is_zero_or_at_least_fifty_milliseconds() -> None:
    for settings in (lambda s: HubSettings(loop_stall_s=s), lambda s: BridgeSettings(retailer_id="r1", loop_stall_s=s)):
        assert settings(0).loop_stall_s == 0 and settings(0.05).loop_stall_s == 0.05
        for bad in (0.001, 0.049, -1):
            with pytest.raises(ValidationError, match=r"0 \(off\) or at least 0\.05 s"):
                settings(bad)


def test_each_partition_of_a_bridge_names_its_own_watch(tmp_path: Path) -> None:
    names = [Bridge(BridgeSettings(retailer_id="r1", partitions=2, partition=k, hub_mqtt_username=f"r1-p{k}",
                                   local_mqtt_username=f"bridge-p{k}",
                                   db_path=tmp_path / f"p{k}.db")).loop_watch.name for k in range(2)]
    assert names == ["bridge r1 p0", "bridge r1 p1"]
    assert Bridge(BridgeSettings(retailer_id="r1", db_path=tmp_path / "one.db")).loop_watch.name == "bridge r1"
