"""A billing correction reaches the embedded telemetry store as InfluxDB would take it: a later point with the same
key (client, time, measurement's device and field) replaces the earlier one. The embedded store used to keep the
first value (``INSERT OR IGNORE``) while InfluxDB showed the corrected one. Real SQLite, in a file."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path

from mhp_wire.sqlite import SqliteThread
from retailer_bridge.telemetry import POINTS_SCHEMA, Point, SqlitePointStore, to_ms


async def test_a_corrected_billing_point_replaces_the_first_one(tmp_path: Path) -> None:
    db = SqliteThread(tmp_path / "telemetry.db", POINTS_SCHEMA)
    await db.open()
    try:
        store = SqlitePointStore(db)
        at = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(days=1)
        first = Point(to_ms(at), "", "c1", "", "energy_kwh", 0.25, "billing")
        await store.write([first])
        await store.write([dataclasses.replace(first, value=0.31)])  # the DSO's correction of that interval
        await store.write([Point(to_ms(at), "gw-1", "c1", "home", "active_power_kw", 1.5)])
        points = await store.query("c1", at, at + timedelta(hours=1))
        assert sorted((p.measurement, p.field, p.value) for p in points) == [
            ("billing", "energy_kwh", 0.31), ("home", "active_power_kw", 1.5)]
    finally:
        await db.close()
