"""The telemetry export to a real server speaking InfluxDB's v2 write API: VictoriaMetrics (Debian's package).

Read back through VictoriaMetrics' own ``/api/v1/export``; see ``telemetry_rig`` for how line protocol maps.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mhp_wire.messages import Telemetry
from retailer_bridge.telemetry import TelemetryExporter, to_ms
from tests.retailer_bridge.telemetry_rig import VM_BINARY, VictoriaMetrics
from tests.waiting import eventually

pytestmark = pytest.mark.skipif(not os.access(VM_BINARY, os.X_OK),
                                reason="victoria-metrics is not installed (scripts/setup.sh installs it)")

Sample = tuple[str, tuple[tuple[str, str], ...], int, float]


@pytest.fixture
def vm(tmp_path: Path) -> Iterator[VictoriaMetrics]:
    server = VictoriaMetrics(tmp_path / "vm-data")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def exporter(tmp_path: Path, vm: VictoriaMetrics) -> AsyncIterator[TelemetryExporter]:
    async with TelemetryExporter("influxdb", tmp_path / "spool.db", influx_url=vm.url, influx_token="unused",
                                 influx_org="mhp", influx_bucket="telemetry", influx_timeout_s=2.0, batch_size=50,
                                 flush_interval_s=0.05, retry_base_s=0.05, retry_max_s=0.3) as exp:
        yield exp


BASE = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)


def telemetry(seq: int, gateway: str = "gw-1", client: str = "c1") -> Telemetry:
    return Telemetry(gateway_id=gateway, client_id=client, seq=seq, at=BASE + timedelta(seconds=seq, milliseconds=seq),
                     devices={"heater": {"power_kw": 1.25 * seq, "on": seq % 2 == 0}, "pv power": {"kw": -0.5}},
                     active_power_kw=0.1 * seq, sheddable_kw=None)


def expected(msg: Telemetry) -> list[Sample]:
    """What VictoriaMetrics should hold for one message: ``home_<field>``, tags as labels, booleans as 1/0."""
    ts = to_ms(msg.at)
    ids = (("client_id", msg.client_id), ("gateway_id", msg.gateway_id))
    out: list[Sample] = [(f"home_{field}", tuple(sorted((*ids, ("device", device)))), ts, float(value))
                         for device, values in msg.devices.items() for field, value in values.items()
                         if value is not None]
    if msg.active_power_kw is not None:
        out.append(("home_active_power_kw", ids, ts, msg.active_power_kw))
    return out


def check_exactly_once(got: list[Sample], msgs: list[Telemetry]) -> None:
    want = [s for m in msgs for s in expected(m)]
    counts = Counter((name, labels, ts) for name, labels, ts, _ in got)
    dupes = {k: n for k, n in counts.items() if n > 1}
    assert not dupes, f"duplicates: {list(dupes)[:5]}"
    values = {(name, labels, ts): v for name, labels, ts, v in got}
    missing = [s for s in want if s[:3] not in values]
    assert not missing, f"{len(missing)} missing, e.g. {missing[:3]}"
    assert {s[:3]: s[3] for s in want} == pytest.approx(values)
    assert len(got) == len(want)


async def test_points_arrive_with_their_values_and_timestamps(vm: VictoriaMetrics, exporter: TelemetryExporter) -> None:
    msgs = [telemetry(seq) for seq in range(1, 31)] + [telemetry(7, "gw-2", "c2")]
    for msg in msgs:
        exporter.submit(msg)
    total = sum(len(expected(m)) for m in msgs)
    assert total == 31 * 4
    await eventually(lambda: exporter.written == total and exporter.spool_size == 0)
    assert exporter.failed_batches == exporter.dropped == 0
    got = await vm.wait_for_samples(total)
    check_exactly_once(got, msgs)
    names = {name for name, *_ in got}
    assert names == {"home_power_kw", "home_on", "home_kw", "home_active_power_kw"}
    one = {(name, dict(labels).get("device")): v for name, labels, ts, v in got
           if ts == to_ms(BASE + timedelta(seconds=2, milliseconds=2)) and dict(labels)["client_id"] == "c1"}
    assert one == {("home_power_kw", "heater"): 2.5, ("home_on", "heater"): 1.0, ("home_kw", "pv power"): -0.5,
                   ("home_active_power_kw", None): pytest.approx(0.2)}


async def test_influxdb_down_and_back_nothing_lost(vm: VictoriaMetrics, exporter: TelemetryExporter) -> None:
    msgs = [telemetry(seq) for seq in range(1, 101)]
    for msg in msgs[:10]:
        exporter.submit(msg)
    await eventually(lambda: exporter.written == 40 and exporter.spool_size == 0, timeout_s=20)
    await asyncio.to_thread(vm.stop)
    sizes = []
    for msg in msgs[10:]:
        exporter.submit(msg)
        # Memory holds a message only until the spool task has put it on disk, the store being down or not (a
        # bound of 40 points after a 10 ms sleep failed at 44 on a loaded machine: that was the spool's speed).
        await eventually(lambda: exporter.pending == 0, "the message is on disk, not in memory", timeout_s=20)
        sizes.append(exporter.spool_size)
    await eventually(lambda: exporter.spool_size == 360, timeout_s=20)
    assert sizes == sorted(sizes) and sizes[-1] > sizes[0]
    assert exporter.failed_batches >= 2 and exporter.written == 40 and exporter.dropped == 0
    await asyncio.to_thread(vm.start)
    await eventually(lambda: exporter.written == 400 and exporter.spool_size == 0, timeout_s=30)
    assert exporter.spooled == 400 and exporter.dropped == 0
    got = await vm.wait_for_samples(400)
    check_exactly_once(got, msgs)
