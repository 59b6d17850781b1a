"""Billing data at the retailer (issue 13, item 9): delivered through the real chain (the hub over HTTP, its
Mosquitto, a real bridge and its own broker), then exported by ``retailer-bridge billing export`` (a subprocess
reading the bridge's store) as CSV and JSON, and by the telemetry export (measurement ``billing``) to the embedded
SQLite store and to a real VictoriaMetrics speaking InfluxDB's v2 write API."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from retailer_bridge.billing import BillingReading, readings_of, select, to_csv
from retailer_bridge.service import Bridge
from retailer_bridge.settings import BridgeSettings
from retailer_bridge.telemetry import to_ms
from tests.broker_fixtures import MosquittoFactory
from tests.hub_fixtures import HubHandle
from tests.retailer_bridge.telemetry_rig import VM_BINARY, VictoriaMetrics

DAY = (datetime.now(UTC) - timedelta(days=3)).replace(hour=0, minute=0, second=0, microsecond=0)
"""The billed day: three days ago, midnight UTC."""
C1 = [round(0.1 * h + 0.05, 3) for h in range(24)]
C2 = [round(1.0 + 0.01 * h, 3) for h in range(24)]
C1_FIX = [9.5, 8.25]
"""A correction of c1's hours 1 and 2, uploaded after the first readings."""


def expected() -> list[dict[str, Any]]:
    """Every interval r1 should hold for the billed day, as the export writes it (without request_id and
    received_at, checked apart)."""
    rows = []
    for cid, values, quality in (("c1", [C1[0], *C1_FIX, *C1[3:]], "measured"), ("c2", C2, "estimated")):
        for h, kwh in enumerate(values):
            start = DAY + timedelta(hours=h)
            fixed = cid == "c1" and h in (1, 2)
            rows.append({"client_id": cid, "start": start.isoformat(), "end": (start + timedelta(hours=1)).isoformat(),
                         "energy_kwh": kwh, "quality": quality, "resolution_s": 3600, "version": 2 if fixed else 1,
                         "corrected": fixed})
    return rows


async def deliver(hub: HubHandle, settings: BridgeSettings) -> tuple[Bridge, asyncio.Task[None], str]:
    """Register r1's clients, upload a day of readings (and a correction), start r1's bridge and deliver the
    day's billing data to it through the hub; returns the bridge, its task and the billing request's id."""
    await hub.setup_registry({"c1": "r1", "c2": "r1"})
    dso = hub.auth("dso")
    r = await hub.http.post("/v1/meter-readings", headers=dso, json={"readings": [
        {"client_id": "c1", "start": DAY.isoformat(), "resolution_s": 3600, "values_kwh": C1},
        {"client_id": "c2", "start": DAY.isoformat(), "resolution_s": 3600, "values_kwh": C2,
         "quality": "estimated"}]})
    assert r.status_code == 200, r.text
    r = await hub.http.post("/v1/meter-readings", headers=dso, json={"readings": [
        {"client_id": "c1", "start": (DAY + timedelta(hours=1)).isoformat(), "resolution_s": 3600,
         "values_kwh": C1_FIX}]})
    assert r.json()["corrections"] == 1, r.text
    bridge = Bridge(settings)
    task = asyncio.create_task(bridge.run(), name="test-bridge")
    r = await hub.http.post("/v1/billing-data", headers=dso, json={
        "client_ids": ["c1", "c2"], "period_start": DAY.isoformat(),
        "period_end": (DAY + timedelta(days=1)).isoformat()})
    assert r.status_code == 202, r.text
    request_id: str = r.json()["request_id"]
    for _ in range(300):
        req = (await hub.http.get(f"/v1/requests/{request_id}", headers=dso)).json()
        if req["state"] == "completed":
            break
        await asyncio.sleep(0.05)
    assert req["state"] == "completed", req
    return bridge, task, request_id


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def bridge_settings(tmp_path: Path, hub: HubHandle, mosquitto_factory: MosquittoFactory,
                    **extra: Any) -> BridgeSettings:
    local = mosquitto_factory("retailer", ["gw-1", "gw-2"], "bridge")
    return BridgeSettings(
        retailer_id="r1", hub_mqtt_host=hub.broker.host, hub_mqtt_port=hub.broker.port,
        hub_mqtt_password=hub.broker.identities["r1"].password, local_mqtt_host=local.host,
        local_mqtt_port=local.port, local_mqtt_password=local.identities["bridge"].password,
        db_path=tmp_path / "bridge.db", customers={"c1": "gw-1", "c2": "gw-2"},
        telemetry_db_path=tmp_path / "telemetry.db", telemetry_flush_interval_s=0.05, **extra)


def exports(tmp_path: Path, settings: BridgeSettings, *runs: tuple[str, ...]
            ) -> list[subprocess.CompletedProcess[str]]:
    """Several ``retailer-bridge billing export`` runs (each its arguments) at once, as separate processes reading
    the one store; their results in the order given. At once because each pays a Python start-up, not for speed
    of the export itself."""
    config = tmp_path / "bridge-export.toml"
    config.write_text(tomli_w.dumps({"bridge": {"retailer_id": settings.retailer_id,
                                                "db_path": str(settings.db_path),
                                                "customers": settings.customers}}))
    procs = [subprocess.Popen([sys.executable, "-m", "retailer_bridge.cli", "--log-level", "WARNING", "billing",
                               "export", "--config", str(config), *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for args in runs]
    done = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


def typed(row: dict[str, str]) -> dict[str, Any]:
    """A CSV row with the types of the JSON export."""
    return {**row, "energy_kwh": float(row["energy_kwh"]), "resolution_s": int(row["resolution_s"]),
            "version": int(row["version"]), "corrected": row["corrected"] == "True"}


async def test_billing_export_cli_and_embedded_store(tmp_path: Path, hub: HubHandle,
                                                     mosquitto_factory: MosquittoFactory) -> None:
    settings = bridge_settings(tmp_path, hub, mosquitto_factory)
    bridge, task, request_id = await deliver(hub, settings)
    try:
        want = expected()
        day_args = ("--from", DAY.isoformat(), "--to", (DAY + timedelta(days=1)).isoformat())
        india = timezone(timedelta(hours=5, minutes=30))
        start, end = (DAY + timedelta(hours=1)).astimezone(india), (DAY + timedelta(hours=5)).astimezone(india)
        out = tmp_path / "billing.csv"
        no_offset = DAY.replace(tzinfo=None).isoformat()  # a time without its offset is refused, whatever the day
        as_json, as_csv, without_offset, backwards = await asyncio.to_thread(
            exports, tmp_path, settings, (*day_args, "--format", "json"),
            ("--from", start.isoformat(), "--to", end.isoformat(), "--format", "csv", "--client-id", "c1",
             "--output", str(out)),
            ("--from", no_offset, "--to", end.isoformat()), ("--from", end.isoformat(), "--to", start.isoformat()))

        # JSON, the whole day: every interval, value by value, with the request that delivered it.
        done = as_json
        assert done.returncode == 0, done.stderr
        got = json.loads(done.stdout)
        assert [{k: v for k, v in g.items() if k not in ("request_id", "received_at")} for g in got] == want
        assert {g["request_id"] for g in got} == {request_id}
        assert all(datetime.fromisoformat(g["received_at"]).tzinfo is not None for g in got)
        assert "48 billing interval(s) exported" in done.stderr

        # CSV, part of the day in another offset, one client, into a file: the same values.
        done = as_csv
        assert done.returncode == 0, done.stderr
        text = out.read_text()
        assert text.splitlines()[0] == ("client_id,start,end,energy_kwh,quality,request_id,resolution_s,version,"
                                        "corrected,received_at")
        rows = [typed(r) for r in csv.DictReader(io.StringIO(text))]
        assert [{k: v for k, v in r.items() if k not in ("request_id", "received_at")} for r in rows] == [
            w for w in want if w["client_id"] == "c1" and start <= datetime.fromisoformat(w["start"]) < end]
        assert [r["energy_kwh"] for r in rows] == [*C1_FIX, C1[3], C1[4]]

        # Bad input: a clear error, nothing written.
        done = without_offset
        assert done.returncode == 2 and "has no offset" in done.stderr and not done.stdout
        done = backwards
        assert done.returncode == 2 and "--to must be after --from" in done.stderr

        # The embedded telemetry store holds the same intervals as measurement "billing".
        def billing_points() -> list[Any]:
            return [p for p in points if p.measurement == "billing"]

        points: list[Any] = []
        for _ in range(100):
            points = [*await bridge.telemetry.query("c1", DAY, DAY + timedelta(days=1)),
                      *await bridge.telemetry.query("c2", DAY, DAY + timedelta(days=1))]
            if len(billing_points()) == 2 * len(want):
                break
            await asyncio.sleep(0.05)
        energy = {(p.client_id, p.time_ms): p.value for p in billing_points() if p.field == "energy_kwh"}
        assert energy == {(w["client_id"], to_ms(datetime.fromisoformat(w["start"]))): w["energy_kwh"] for w in want}
        estimated = {(p.client_id, p.value) for p in billing_points() if p.field == "estimated"}
        assert estimated == {("c1", 0.0), ("c2", 1.0)}
    finally:
        await stop(task)


@pytest.fixture
def vm(tmp_path: Path) -> Iterator[VictoriaMetrics]:
    if not os.access(VM_BINARY, os.X_OK):
        pytest.skip("victoria-metrics is not installed (scripts/setup.sh installs it)")
    server = VictoriaMetrics(tmp_path / "vm-data")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def influx_bridge_settings(tmp_path: Path, hub: HubHandle, mosquitto_factory: MosquittoFactory,
                                 vm: VictoriaMetrics) -> AsyncIterator[BridgeSettings]:
    yield bridge_settings(tmp_path, hub, mosquitto_factory, telemetry_store="influxdb", influx_url=vm.url,
                          influx_token="unused", influx_org="mhp", influx_bucket="telemetry")


async def test_billing_goes_to_influxdb(hub: HubHandle, influx_bridge_settings: BridgeSettings,
                                        vm: VictoriaMetrics) -> None:
    _, task, _ = await deliver(hub, influx_bridge_settings)
    try:
        want = expected()
        got: list[Any] = []
        for _ in range(150):
            got = await asyncio.to_thread(vm.samples, '{__name__=~"billing_.*"}')
            if len(got) >= 2 * len(want):
                break
            await asyncio.sleep(0.1)
        energy = {(dict(labels)["client_id"], ts): value for name, labels, ts, value in got
                  if name == "billing_energy_kwh"}
        assert energy == {(w["client_id"], to_ms(datetime.fromisoformat(w["start"]))): w["energy_kwh"] for w in want}
        assert {labels for name, labels, _, _ in got} == {(("client_id", "c1"),), (("client_id", "c2"),)}
        estimated = {(dict(labels)["client_id"], value) for name, labels, _, value in got
                     if name == "billing_estimated"}
        assert estimated == {("c1", 0.0), ("c2", 1.0)}
    finally:
        await stop(task)


def reading(client: str, hour: int, kwh: float, received_s: float, version: int = 1,
            request_id: str = "b1") -> BillingReading:
    start = DAY + timedelta(hours=hour)
    return BillingReading(client, start, start + timedelta(hours=1), kwh, "measured", request_id, 3600, version,
                          version > 1, DAY + timedelta(days=2, seconds=received_s))


@pytest.mark.parametrize(("delivered", "want"), [
    # one delivery: every interval in the range, in client and time order
    ([reading("c2", 0, 1.0, 0), reading("c1", 1, 2.0, 0), reading("c1", 0, 3.0, 0)],
     [("c1", 0, 3.0), ("c1", 1, 2.0), ("c2", 0, 1.0)]),
    # the same interval delivered again later (the DSO asked again): exported once, as received last
    ([reading("c1", 0, 1.0, 0, request_id="b1"), reading("c1", 0, 1.5, 60, version=2, request_id="b2")],
     [("c1", 0, 1.5)]),
    ([reading("c1", 0, 1.5, 60, version=2, request_id="b2"), reading("c1", 0, 1.0, 0, request_id="b1")],
     [("c1", 0, 1.5)]),
    # the range is [from, to): an interval starting at "to" is not in it
    ([reading("c1", 23, 1.0, 0), reading("c1", 24, 2.0, 0), reading("c1", -1, 3.0, 0)], [("c1", 23, 1.0)]),
])
def test_select_keeps_each_interval_once_as_last_received(delivered: list[BillingReading],
                                                          want: list[tuple[str, int, float]]) -> None:
    got = select(delivered, DAY, DAY + timedelta(days=1))
    assert [(r.client_id, int((r.start - DAY).total_seconds() // 3600), r.energy_kwh) for r in got] == want


def test_readings_of_keeps_to_the_delivered_period() -> None:
    blocks = [{"start": (DAY - timedelta(hours=1)).isoformat(), "resolution_s": 1800, "values_kwh": [1, 2, 3, 4, 5],
               "quality": "estimated", "version": 1, "corrected": False}]
    got = readings_of("b1", "c1", DAY, DAY + timedelta(hours=1), blocks, (DAY + timedelta(days=1)).timestamp())
    assert [(r.start, r.energy_kwh, r.quality) for r in got] == [
        (DAY, 3.0, "estimated"), (DAY + timedelta(minutes=30), 4.0, "estimated")]
    assert to_csv(got).splitlines()[1] == (f"c1,{DAY.isoformat()},{(DAY + timedelta(minutes=30)).isoformat()},3.0,"
                                           f"estimated,b1,1800,1,False,{(DAY + timedelta(days=1)).isoformat()}")
