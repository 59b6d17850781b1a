"""The telemetry export with the embedded SQLite store: points, spool, batches, cap, restart."""

from __future__ import annotations

import logging
import sqlite3
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from mhp_wire.messages import Telemetry
from retailer_bridge.settings import BridgeSettings
from retailer_bridge.telemetry import (
    HOME_DEVICE,
    InfluxPointStore,
    Point,
    TelemetryExporter,
    points_of,
    retry_delay_s,
    to_ms,
)
from tests.broker_fixtures import free_port
from tests.waiting import eventually

T0 = datetime(2026, 3, 1, 12, 0, 0, 123000, tzinfo=UTC)


def telemetry(seq: int, *, client: str = "c1", gateway: str = "gw-1", at: datetime | None = None,
              power: float | None = None) -> Telemetry:
    return Telemetry(gateway_id=gateway, client_id=client, seq=seq, at=at or T0 + timedelta(seconds=seq),
                     devices={"heater": {"power_kw": 1.5 + seq, "on": True, "fault": None},
                              "meter": {"energy_kwh": 100.0 + seq}},
                     active_power_kw=power if power is not None else 2.0 + seq, sheddable_kw=1.5)


def exporter(path: Path, **tuning: object) -> TelemetryExporter:
    opts: dict[str, object] = {"batch_size": 50, "flush_interval_s": 0.05, "spool_max": 1000}
    opts.update(tuning)
    return TelemetryExporter("sqlite", path, **opts)  # type: ignore[arg-type]


@pytest.mark.parametrize(("devices", "power", "sheddable", "expected"), [
    ({}, None, None, []),
    ({"heater": {"on": False}}, None, None, [("heater", "on", 0.0)]),
    ({"heater": {"on": True, "kw": None}}, 3.0, None, [("heater", "on", 1.0), (HOME_DEVICE, "active_power_kw", 3.0)]),
    ({"pv": {"kw": float("nan"), "v": 230}}, 1.0, 0.5,
     [("pv", "v", 230.0), (HOME_DEVICE, "active_power_kw", 1.0), (HOME_DEVICE, "sheddable_kw", 0.5)]),
])
def test_points_of_a_telemetry_message(devices: dict[str, dict[str, float | bool | None]], power: float | None,
                                       sheddable: float | None, expected: list[tuple[str, str, float]]) -> None:
    msg = Telemetry(gateway_id="gw-1", client_id="c1", seq=1, at=T0, devices=devices, active_power_kw=power,
                    sheddable_kw=sheddable)
    points = points_of(msg)
    assert [(p.device, p.field, p.value) for p in points] == expected
    assert all(type(p.value) is float for p in points)
    assert all((p.time_ms, p.gateway_id, p.client_id) == (to_ms(T0), "gw-1", "c1") for p in points)
    assert all(p.time == T0 for p in points)


def test_ms_precision_and_back_off() -> None:
    assert to_ms(datetime(1970, 1, 1, 0, 0, 1, 999999, tzinfo=UTC)) == 1999
    assert to_ms(datetime(2026, 3, 1, 13, 0, 0, 123000, tzinfo=timezone(timedelta(hours=1)))) == to_ms(T0)
    assert [retry_delay_s(n, 0.5, 5.0) for n in (1, 2, 3, 4, 5, 9)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]


def test_line_protocol_groups_fields_per_series_and_escapes() -> None:
    pts = [Point(1000, "gw-1", "c1", "my heater,1", "power_kw", 1.5),
           Point(1000, "gw-1", "c1", "my heater,1", "on", 1.0),
           Point(1000, "gw-1", "c1", HOME_DEVICE, "active_power_kw", 2.0)]
    assert InfluxPointStore.line_protocol(pts) == [
        r"home,client_id=c1,device=my\ heater\,1,gateway_id=gw-1 on=1,power_kw=1.5 1000",
        "home,client_id=c1,gateway_id=gw-1 active_power_kw=2 1000",
    ]


async def test_submit_drain_query_end_to_end(tmp_path: Path) -> None:
    async with exporter(tmp_path / "t.db") as exp:
        for seq in range(1, 21):
            exp.submit(telemetry(seq))
        exp.submit(telemetry(5, client="c2", gateway="gw-2"))
        await eventually(lambda: exp.written == 21 * 5 and exp.spool_size == 0)
        rows = await exp.query("c1", T0, T0 + timedelta(seconds=10))
        other = await exp.query("c2", T0, T0 + timedelta(days=1))
    assert exp.failed_batches == exp.dropped == 0 and exp.spooled == 21 * 5 and exp.pending == 0
    # seq 1..9 fall in [T0, T0+10 s); 5 points each ("fault" is None and not exported)
    assert len(rows) == 9 * 5
    assert {(p.device, p.field) for p in rows} == {("heater", "power_kw"), ("heater", "on"), ("meter", "energy_kwh"),
                                                  (HOME_DEVICE, "active_power_kw"), (HOME_DEVICE, "sheddable_kw")}
    first = [p for p in rows if p.time == T0 + timedelta(seconds=1)]
    assert {(p.device, p.field): p.value for p in first} == {
        ("heater", "power_kw"): 2.5, ("heater", "on"): 1.0, ("meter", "energy_kwh"): 101.0,
        (HOME_DEVICE, "active_power_kw"): 3.0, (HOME_DEVICE, "sheddable_kw"): 1.5}
    assert [p.time for p in rows] == sorted(p.time for p in rows)
    assert {(p.client_id, p.gateway_id, p.time) for p in other} == {("c2", "gw-2", T0 + timedelta(seconds=5))}


async def test_a_redelivered_message_is_exported_once_even_after_a_restart(tmp_path: Path) -> None:
    msg = telemetry(1)
    async with exporter(tmp_path / "t.db") as exp:
        exp.submit(msg)
        exp.submit(msg)
        await eventually(lambda: exp.written == 5)
    async with exporter(tmp_path / "t.db") as exp2:
        exp2.submit(msg)
        await eventually(lambda: exp2.duplicates == 1)
        assert len(await exp2.query("c1", T0, T0 + timedelta(days=1))) == 5
    assert exp.duplicates == 1 and exp2.spooled == 0


async def test_batches_wait_for_the_flush_interval_unless_full(tmp_path: Path) -> None:
    async with exporter(tmp_path / "t.db", batch_size=10, flush_interval_s=0.8) as exp:
        exp.submit(telemetry(1))  # 5 points: less than a batch, written only after the interval
        await eventually(lambda: exp.spool_size == 5)
        exp.submit(telemetry(2))  # now a full batch: written at once
        await eventually(lambda: exp.written == 10, timeout_s=0.5)
        exp.submit(telemetry(3))
        await eventually(lambda: exp.spool_size == 5)
        assert exp.written == 10
        await eventually(lambda: exp.written == 15, timeout_s=2.0)


async def test_the_spool_is_capped_and_drops_the_oldest(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # An InfluxDB store at a port where nothing listens: every batch fails, so the points stay in the spool.
    caplog.set_level(logging.DEBUG, logger="retailer_bridge.telemetry")
    dead = f"http://127.0.0.1:{free_port()}"
    path = tmp_path / "t.db"
    async with TelemetryExporter("influxdb", path, influx_url=dead, batch_size=100, flush_interval_s=0.05,
                                 spool_max=1000, retry_base_s=0.05, retry_max_s=0.1) as exp:
        for seq in range(1, 241):  # 1200 points
            exp.submit(telemetry(seq))
        await eventually(lambda: exp.spooled == 1200)
        await eventually(lambda: exp.failed_batches >= 3)
        assert (exp.spool_size, exp.dropped, exp.written) == (1000, 200, 0)
    errors = [r for r in caplog.records if r.name == "retailer_bridge.telemetry" and "store failed" in r.message]
    assert len(errors) >= 3 and errors[0].levelname == "ERROR" and {r.levelname for r in errors[1:]} == {"DEBUG"}
    assert any("dropping the oldest" in r.message for r in caplog.records)
    with sqlite3.connect(path) as db:
        times = [t for (t,) in db.execute("SELECT DISTINCT time FROM spool ORDER BY time")]
    assert times == [to_ms(T0 + timedelta(seconds=s)) for s in range(41, 241)]  # messages 1..40 went


async def test_a_restart_keeps_the_points_not_yet_stored(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    async with exporter(path, batch_size=10_000, flush_interval_s=60) as exp:
        for seq in range(1, 11):
            exp.submit(telemetry(seq))
        await eventually(lambda: exp.spool_size == 50)
        exp.submit(telemetry(11))  # still in memory when the exporter closes: put on disk by close()
    assert exp.written == 0
    async with exporter(path) as again:
        assert again.spool_size == 55
        await eventually(lambda: again.written == 55 and again.spool_size == 0)
        got = await again.query("c1", T0, T0 + timedelta(days=1))
    assert sorted({p.time for p in got}) == [T0 + timedelta(seconds=s) for s in range(1, 12)]


async def test_none_does_nothing_and_settings_pick_the_file(tmp_path: Path) -> None:
    async with TelemetryExporter("none", tmp_path / "never.db") as exp:
        exp.submit(telemetry(1))
        assert not exp.enabled and exp.spooled == 0
    assert not (tmp_path / "never.db").exists()
    s = BridgeSettings(retailer_id="r1", db_path=tmp_path / "bridge-r1.db")
    assert TelemetryExporter.from_settings(s).db_path == tmp_path / "bridge-r1-telemetry.db"
    s = BridgeSettings(retailer_id="r1", db_path=tmp_path / "b.db", telemetry_db_path=tmp_path / "x.db",
                       telemetry_batch_size=7)
    exp = TelemetryExporter.from_settings(s)
    assert (exp.db_path, exp.batch_size) == (tmp_path / "x.db", 7)
    assert TelemetryExporter.from_settings(BridgeSettings(retailer_id="r1")).db_path == Path("state/telemetry.db")
