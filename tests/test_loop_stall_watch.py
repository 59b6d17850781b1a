"""The hub and the bridge run the event loop's stall watchdog (``mhp_wire.loopwatch``) while they serve: a real
block of their loop is logged once with the blocking frame, and counted (the hub's ``/metrics``, the bridge's
``loop_watch``); the watch stops with the service."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from tests.broker_fixtures import MosquittoFactory
from tests.cloud_hub.test_relay import metric
from tests.hub_fixtures import served_hub
from tests.retailer_bridge.test_bridge import running_bridge
from tests.waiting import eventually


def hold_the_services_loop(seconds: float) -> None:
    time.sleep(seconds)  # the service runs on this test's loop: this blocks it


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
            hold_the_services_loop(1.0)
            await eventually(lambda: watch.stalls == before + 1, "the stall is reported")
            text = (await hub.http.get("/metrics")).text
            assert metric(text, "mhp_loop_stall_seconds_count") == before + 1
            assert metric(text, "mhp_loop_stall_seconds_sum") >= 1.0
        assert watch._thread is None  # stopped with the hub
    [warning] = [w for w in stall_warnings(caplog) if "hold_the_services_loop" in w]
    assert warning.startswith("hub: event loop stalled")


async def test_the_bridge_reports_a_stall_of_its_loop(tmp_path: Path, mosquitto_factory: MosquittoFactory,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    hub_broker = mosquitto_factory("hub", ["r1"], "hub")
    local = mosquitto_factory("retailer", ["gw-1"], "bridge")
    with caplog.at_level(logging.WARNING, logger="mhp_wire.loopwatch"):
        async with running_bridge(tmp_path, hub_broker, local, {"c1": "gw-1"}, loop_stall_s=0.2) as bridge:
            before = bridge.loop_watch.stalls
            hold_the_services_loop(1.0)
            await eventually(lambda: bridge.loop_watch.stalls == before + 1, "the stall is reported")
    assert bridge.loop_watch._thread is None  # stopped with the bridge
    [warning] = [w for w in stall_warnings(caplog) if "hold_the_services_loop" in w]
    assert warning.startswith("bridge r1: event loop stalled")


async def test_a_stall_threshold_of_zero_runs_no_watch(tmp_path: Path, mosquitto_factory: MosquittoFactory) -> None:
    broker = mosquitto_factory("hub", ["r1"], "hub")
    async with served_hub(tmp_path, broker, loop_stall_s=0) as hub:
        assert not hub.app.state.loop_watch.enabled and hub.app.state.loop_watch._thread is None
