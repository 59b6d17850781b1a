"""The gateway daemon: polls its devices, executes commands from its retailer's bridge, reports outcomes.

A command is stored, then acknowledged to the bridge (application-level ``ack``), executed at its ``start``,
and its outcome kept in a stored outbox until the bridge acknowledges it; a redelivered command is recognised by
its request id and not executed twice. While an emergency is active every poll re-checks the meter and sheds
more if the home is over the limit; at its end the loads it shed are switched back on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from device_drivers.errors import DeviceError
from device_drivers.modbus import BusPool
from device_drivers.registry import Meter, Switch, build_device
from hems_firmware.config import FlexibleSchedule, GatewayConfig
from hems_firmware.controller import (
    Failsafe,
    Load,
    Verdict,
    cheapest_slots,
    failsafe_step,
    judge_limit,
    judge_reduction,
    plan_restore,
    plan_shedding,
    reduction_limit,
)
from hems_firmware.events import EventFeed
from hems_firmware.systemd import Notifier
from hems_firmware.web import failsafe_view, serve_web
from mhp_wire import topics
from mhp_wire.backoff import delay_s
from mhp_wire.logsafe import outside
from mhp_wire.messages import (
    Ack,
    ApplianceSchedule,
    Cancel,
    ClientState,
    Command,
    EmergencyParams,
    ErrorReply,
    FailsafeReport,
    LoadReductionParams,
    LoadShiftParams,
    Outcome,
    Schedule,
    Tariff,
    Telemetry,
    WireError,
    decode,
    encode,
    utcnow,
)
from mhp_wire.mqtt import MqttEndpoint, MqttError, MqttLink
from mhp_wire.outbox import Outbox, Pending
from mhp_wire.process import wait_or_timeout
from mhp_wire.router import TypeTable
from mhp_wire.sqlite import SqliteThread, StorageError

log = logging.getLogger(__name__)
OUTBOX_ROUND = 10_000
"""Outcomes read and sent per outbox round (a gateway holds a handful; the bound only keeps one read small)."""

# commands.reported: the newest revision of the request whose outcome is in the outbox (0: none yet), set in the
# transaction that stores the outcome, so that a restart reports a revision that was not, and none twice.
SCHEMA = """
CREATE TABLE IF NOT EXISTS commands (
    request_id TEXT PRIMARY KEY, payload BLOB NOT NULL, state TEXT NOT NULL, received_at REAL NOT NULL,
    shed TEXT NOT NULL DEFAULT '[]', reported INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS outbox (
    msg_id TEXT PRIMARY KEY, payload BLOB NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS telemetry (
    seq INTEGER PRIMARY KEY, msg_id TEXT NOT NULL, payload BLOB NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS telemetry_msg ON telemetry(msg_id);
CREATE TABLE IF NOT EXISTS to_restore (name TEXT PRIMARY KEY, request_id TEXT, since REAL NOT NULL);
CREATE TABLE IF NOT EXISTS schedule (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL,
    payload BLOB NOT NULL);
"""

METER_DRIVERS = frozenset({"eastron_sdm630", "eastron_sdm120", "eredes_han", "dsmr_p1"})
FAILSAFE_ID = "failsafe"
"""The key of the failsafe among the active actions (a request id is never this: the bridge cannot cancel it)."""


@dataclass(slots=True)
class ActiveAction:
    """A request being acted on right now: hold the home under ``limit_kw`` until ``end``."""

    request_id: str
    kind: str
    limit_kw: float
    end: float
    shed: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Actuation:
    """One switching of a plug, and the request that caused it (for field testers)."""

    at: float
    device: str
    on: bool
    request_id: str | None
    reason: str


class Gateway:
    """One home's gateway. ``await Gateway(cfg).run()`` runs it until cancelled."""

    def __init__(self, cfg: GatewayConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.clock = clock
        """Monotonic seconds: how long loads stay shed, the restore interval, the failsafe's delays."""
        self.id = cfg.gateway.id
        self.client_id = cfg.gateway.client_id
        self.sql = SqliteThread(Path(cfg.gateway.state_dir) / f"gateway-{self.id}.db", SCHEMA,
                                name=f"gw-{self.id}")
        self.meters: dict[str, Meter] = {}
        self.switches: dict[str, Switch] = {}
        self.state: dict[str, dict[str, float | bool | None]] = {}
        self.link: MqttLink | None = None
        self.active: dict[str, ActiveAction] = {}
        self.tariff: Tariff | None = None
        self.actuations: list[Actuation] = []
        self.events = EventFeed()
        self.notifier = Notifier()
        self.schedule: Schedule | None = None
        """The customer's flexibility schedule from the personal area (overrides the installer's settings)."""
        self.shed_since: dict[str, float] = {}
        self.exempt: set[str] = set()
        """Loads that reached the customer's longest interruption: not shed again while actions hold the home."""
        self.to_restore: dict[str, str | None] = {}
        """Loads an ended action shed, waiting to come back (one per ``restore_interval_s``, with hysteresis)."""
        self._last_restore = -math.inf
        self._control = asyncio.Lock()
        """One control step at a time (read the devices, then switch): a command starting while the poll loop
        plans would otherwise plan from the same reading and switch the same loads twice."""
        self._plan: tuple[tuple[str, int, str], dict[str, list[float]]] | None = None
        self.failsafe = Failsafe()
        self.failsafe_report: FailsafeReport | None = None
        """The failsafe in force, or the one that ended and is not yet in telemetry (reported when reconnected)."""
        self.rejected = 0
        self._seq = 0
        self._wake = asyncio.Event()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.from_bridge = TypeTable({Command: self._on_command, Cancel: self._on_cancel, Schedule: self._on_schedule,
                                      Ack: self._on_ack, ErrorReply: self._on_error})
        """The bridge's messages on our ``down`` topic, by type."""
        self.outbox = Outbox(_OutcomeTable(self), self._publish_up, limit=OUTBOX_ROUND,
                             retry_s=lambda n: delay_s(n, 0.5))
        """Outcomes (and other answers) to the bridge, stored, re-sent until the bridge acknowledges them."""
        self.telemetry_outbox = Outbox(_TelemetryTable(self), self._publish_up, limit=500,
                                       retry_s=lambda n: delay_s(n, 2.0))
        """Buffered telemetry, in order, re-sent until acknowledged (the newest retained)."""

    # -- running ------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Open the devices, the store and the uplink; poll, execute and report until cancelled."""
        up = self.cfg.gateway.uplink
        await self.sql.open()
        try:
            await self.sql.tx(_add_reported_column)
            async with BusPool() as pool:
                for dev in self.cfg.devices:
                    built = build_device(dev, pool)
                    if dev.driver in METER_DRIVERS:
                        self.meters[dev.name] = built  # type: ignore[assignment]
                    else:
                        self.switches[dev.name] = built  # type: ignore[assignment]
                link = MqttLink(
                    MqttEndpoint(up.host, up.port, up.username or self.id, up.password, up.tls_ca_file),
                    client_id=self.id,
                    subscriptions=[topics.down("gateways", self.id), topics.PUBLIC_ALL],
                    handler=self.on_message, status_topic=topics.status("gateways", self.id),
                    connect_timeout_s=None,
                )
                async with link:
                    self.link = link
                    await self._resume()
                    self.notifier.ready()
                    async with asyncio.TaskGroup() as tg:
                        tg.create_task(self._poll_loop(), name=f"gw-{self.id}-poll")
                        tg.create_task(self._outbox_loop(), name=f"gw-{self.id}-outbox")
                        if self.cfg.gateway.web_port is not None:
                            tg.create_task(serve_web(self), name=f"gw-{self.id}-web")
        finally:
            for task in list(self._tasks.values()):
                task.cancel()
            await self.sql.close()

    async def _resume(self) -> None:
        """After a restart, re-arm every stored command that has not finished, and what waits to be restored."""
        self._seq = await self.sql.read(lambda db: int(db.execute("SELECT COALESCE(MAX(seq), 0) FROM telemetry")
                                                       .fetchone()[0]))
        self.to_restore = await self.sql.read(lambda db: {r[0]: r[1] for r in db.execute(
            "SELECT name, request_id FROM to_restore")})
        stored = await self.sql.read(lambda db: db.execute("SELECT payload FROM schedule WHERE id=1").fetchone())
        if stored is not None:
            self.schedule = Schedule.model_validate_json(stored[0])
        rows = await self.sql.read(lambda db: [dict(r) for r in db.execute(
            "SELECT * FROM commands WHERE state IN ('scheduled', 'active')")])
        for row in rows:
            cmd = Command.model_validate_json(row["payload"])
            unreported = row["reported"] < cmd.revision
            if unreported and isinstance(cmd.params, LoadShiftParams):
                await self._acknowledge_shift(cmd, cmd.params)  # killed between storing it and acknowledging it
            self._spawn(cmd.request_id, self._execute(cmd, row["received_at"], resumed_shed=json.loads(row["shed"]),
                                                      report=unreported))

    def _spawn(self, request_id: str, coro: Any) -> None:
        task = asyncio.create_task(coro, name=f"gw-{self.id}-{request_id}")
        self._tasks[request_id] = task

        def forget(done: asyncio.Task[None]) -> None:
            if self._tasks.get(request_id) is done:  # not the task of a newer revision
                del self._tasks[request_id]

        task.add_done_callback(forget)

    # -- polling ------------------------------------------------------------------------------------------

    async def poll_once(self) -> dict[str, dict[str, float | bool | None]]:
        """Read every device once; a device that fails is reported unavailable (``None`` values)."""
        out: dict[str, dict[str, float | bool | None]] = {}
        devices: list[tuple[str, Meter | Switch]] = [*self.meters.items(), *self.switches.items()]
        for name, dev in devices:
            try:
                out[name] = dict(await dev.read())
            except DeviceError:
                out[name] = {"available": False}
        self.state = out
        self.events.publish({"type": "state", "at": time.time(), "gateway_id": self.id, "client_id": self.client_id,
                             "devices": out, "active_power_kw": self.measured_kw(),
                             "active": [{"request_id": a.request_id, "kind": a.kind, "limit_kw": a.limit_kw,
                                         "end": a.end, "shed": list(a.shed)} for a in self.active.values()],
                             "failsafe": failsafe_view(self)})
        return out

    def measured_kw(self) -> float | None:
        """Import power of the home from the first meter that answered, in kW."""
        for name in self.meters:
            value = self.state.get(name, {}).get("active_power_kw")
            if isinstance(value, float | int) and not isinstance(value, bool) and math.isfinite(value):
                return float(value)
        return None

    def appliance(self, name: str) -> ApplianceSchedule | None:
        """The customer's settings for one appliance, if any."""
        if self.schedule is None:
            return None
        return next((a for a in self.schedule.appliances if a.device == name), None)

    def loads(self) -> list[Load]:
        """The switchable appliances as the controller sees them (the customer's schedule overriding the
        installer's priority, and able to forbid shedding an appliance, or to bound how long it stays off)."""
        out = []
        now = self.clock()
        for name, sw in self.switches.items():
            on = self.state.get(name, {}).get("on")
            c = sw.config
            a = self.appliance(name)
            priority = a.priority if a is not None and a.priority is not None else c.priority
            sheddable = c.sheddable and not (a is not None and a.never_shed)
            if a is not None and a.max_interruption_s is not None and name in self.shed_since:
                sheddable = sheddable and now - self.shed_since[name] < a.max_interruption_s
            sheddable = sheddable and name not in self.exempt
            out.append(Load(name, c.rated_power_kw, priority, sheddable, on if isinstance(on, bool) else None))
        return out

    async def _poll_loop(self) -> None:
        interval = self.cfg.gateway.poll_interval_s
        last_telemetry = 0.0
        while True:
            started = time.monotonic()
            async with self._control:
                await self.poll_once()
                await self._failsafe_step()
                await self._hold_limit()
                await self._restore_step()
                await self._schedule_step()
            if started - last_telemetry >= self.cfg.gateway.telemetry_interval_s:
                last_telemetry = started
                await self._queue_telemetry()
            self.notifier.alive()
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    async def _failsafe_step(self) -> None:
        """Apply the configured failsafe limit once the uplink has been down for ``after_s``; release it after
        ``duration_s`` or when the uplink is back (inside a control step)."""
        fs = self.cfg.gateway.failsafe
        if fs is None:
            return
        connected = self.link is not None and self.link.connected
        now = self.clock()
        lost_at = self.failsafe.lost_at
        self.failsafe, what = failsafe_step(self.failsafe, connected, now, fs.after_s, fs.duration_s)
        if what == "apply":
            limit = max(fs.limit_kw, fs.floor_kw)
            self.active[FAILSAFE_ID] = ActiveAction(FAILSAFE_ID, "failsafe", limit, time.time() + fs.duration_s)
            self.failsafe_report = FailsafeReport(state="active", started_at=utcnow(), limit_kw=limit,
                                                  offline_s=round(now - (lost_at if lost_at is not None else now), 3))
            log.warning("gateway %s lost its bridge %.0f s ago: failsafe limit %s kW for at most %.0f s", self.id,
                        self.failsafe_report.offline_s, limit, fs.duration_s)
            self.events.publish({"type": "failsafe", "at": time.time(), "gateway_id": self.id, "state": "active",
                                 "limit_kw": limit, "duration_s": fs.duration_s})
        elif what == "release":
            action = self.active.get(FAILSAFE_ID)
            shed = list(action.shed) if action is not None else []
            by = "reconnected" if connected else "duration"
            if self.failsafe_report is not None:
                self.failsafe_report = self.failsafe_report.model_copy(update={
                    "state": "ended", "ended_at": utcnow(), "ended_by": by, "shed": shed})
            await self._end_action(FAILSAFE_ID, shed)
            log.warning("gateway %s failsafe ended (%s)", self.id, by)
            self.events.publish({"type": "failsafe", "at": time.time(), "gateway_id": self.id, "state": "ended",
                                 "ended_by": by})

    def sheddable_kw(self) -> float:
        """Rated power of the sheddable loads that are on now (never above :meth:`rated_sheddable_kw`)."""
        return round(sum(ld.rated_kw for ld in self.loads() if ld.sheddable and ld.on), 3)

    def rated_sheddable_kw(self) -> float:
        """Rated power of every load the installer configured as sheddable, on or off: what the home could shed at
        most, and so the bound of its claim (``sheddable_kw``); finite, as the configuration bounds each rating."""
        return round(sum(sw.config.rated_power_kw for sw in self.switches.values() if sw.config.sheddable), 3)

    async def _queue_telemetry(self) -> None:
        """Store this poll's telemetry; the outbox loop sends it, in order, until the bridge acknowledges it."""
        self._seq += 1
        report = self.failsafe_report
        if report is not None and report.state == "active" and FAILSAFE_ID in self.active:
            report = report.model_copy(update={"shed": list(self.active[FAILSAFE_ID].shed)})
        msg = Telemetry(gateway_id=self.id, client_id=self.client_id, seq=self._seq, at=utcnow(), devices=self.state,
                        active_power_kw=self.measured_kw(), sheddable_kw=self.sheddable_kw(),
                        rated_sheddable_kw=self.rated_sheddable_kw(), failsafe=report)
        if report is not None and report.state == "ended":
            self.failsafe_report = None  # an ended failsafe is reported once (the telemetry is kept until acked)
        keep = self.cfg.gateway.telemetry_buffer_max

        def store(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO telemetry (seq, msg_id, payload) VALUES (?,?,?)", (msg.seq, msg.msg_id,
                                                                                    encode(msg)))
            db.execute("DELETE FROM telemetry WHERE seq <= ?", (msg.seq - keep,))

        await self.sql.tx(store)
        self._wake.set()

    def cap_kw(self) -> float:
        """The power the home must stay under when nothing is active: its contracted power, if known."""
        for name in self.meters:
            kva = self.state.get(name, {}).get("contracted_power_kva")
            if isinstance(kva, float | int) and not isinstance(kva, bool) and kva > 0:
                return float(kva)
        return self.cfg.gateway.contracted_power_kw or float("inf")

    async def _restore_step(self) -> None:
        """Bring one shed load back, if the hysteresis band allows it and no action holds the home."""
        if not self.to_restore or self.active:
            return
        if self.clock() - self._last_restore < self.cfg.gateway.restore_interval_s:
            return
        shed = [ld for ld in self.loads() if ld.name in self.to_restore]
        for name in [n for n in self.to_restore if n not in self.switches]:
            self.to_restore.pop(name)
        for name in plan_restore(self.cap_kw(), self.measured_kw(), shed, self.cfg.gateway.restore_band_kw):
            request_id = self.to_restore.get(name)
            if await self._switch(name, True, request_id, "restore after the request ended"):
                self._last_restore = self.clock()
                self.to_restore.pop(name, None)
                await self.sql.tx(partial(_forget_restore, name=name))

    def flexible(self) -> list[FlexibleSchedule]:
        """Appliances to run in the cheapest slots: the customer's schedule where it says so, else the config."""
        out = {f.device: f for f in self.cfg.gateway.flexible}
        if self.schedule is not None:
            for a in self.schedule.appliances:
                if a.run_s and a.device in self.switches:
                    out[a.device] = FlexibleSchedule(device=a.device, run_s=a.run_s,
                                                     allowed=a.allowed or [("00:00", "24:00")])
                elif a.device in out and not a.run_s:
                    del out[a.device]
        return list(out.values())

    async def _schedule_step(self) -> None:
        """Run flexible appliances in the cheapest slots of the current tariff that their schedule allows."""
        flexible = self.flexible()
        if not flexible or self.tariff is None or self.active:
            return
        tz = ZoneInfo(self.cfg.gateway.timezone)
        now = datetime.now(tz)
        key = (self.tariff.tariff_id, self.tariff.version,
               f"{now.date().isoformat()}/s{self.schedule.version if self.schedule else 0}")
        if self._plan is None or self._plan[0] != key:
            midnight = now.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()
            prices = [(p.start.timestamp(), p.end.timestamp(), p.price_eur_per_kwh) for p in self.tariff.periods]
            plans = {}
            for f in flexible:
                windows = []
                for a, b in f.allowed:
                    s = midnight + _seconds(a)
                    e = midnight + _seconds(b)
                    windows += [(s, e)] if e > s else [(midnight, e), (s, midnight + 86_400)]
                plans[f.device] = cheapest_slots(prices, windows, f.run_s)
            self._plan = (key, plans)
            log.info("gateway %s planned its flexible loads on tariff %s v%d", self.id, key[0], key[1])
        t = now.timestamp()
        for device, slots in self._plan[1].items():
            want = any(s <= t < s + 900 for s in slots)
            on = self.state.get(device, {}).get("on")
            if isinstance(on, bool) and on != want and device not in self.to_restore:
                why = "cheapest tariff slot" if want else "outside its cheapest tariff slots"
                await self._switch(device, want, None, f"tariff {key[0]} v{key[1]}: {why}")

    # -- commands -----------------------------------------------------------------------------------------

    async def on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        """Apply one message from the bridge."""
        try:
            msg = decode(payload)
        except WireError as exc:
            self.rejected += 1
            log.warning("gateway %s refused a message: %s", self.id, outside(exc, 300))
            if not topic.startswith(topics.PREFIX + "/public/"):
                await self._send(ErrorReply(code="invalid", message=str(exc)))
            return
        if topic.startswith(topics.PREFIX + "/public/"):
            if isinstance(msg, Tariff) and (self.tariff is None or (msg.tariff_id, msg.version) != (
                    self.tariff.tariff_id, self.tariff.version)):
                self.tariff = msg
                log.info("gateway %s has tariff %s v%d", self.id, msg.tariff_id, msg.version)
            return
        if not await self.from_bridge.dispatch(msg):
            self.rejected += 1
            await self._send(ErrorReply(ref_msg_id=msg.msg_id, code="invalid",
                                        message=f"a gateway does not handle {msg.type!r} messages"))

    async def _on_ack(self, msg: Ack) -> None:
        """The bridge has our messages: drop them from the outbox and the telemetry buffer."""

        def drop(db: sqlite3.Connection) -> None:
            db.executemany("DELETE FROM outbox WHERE msg_id=?", [(m,) for m in msg.ack_ids])
            db.executemany("DELETE FROM telemetry WHERE msg_id=?", [(m,) for m in msg.ack_ids])

        await self.sql.tx(drop)

    async def _on_error(self, msg: ErrorReply) -> None:
        log.warning("the bridge refused %s: %s", outside(msg.ref_msg_id), outside(msg.message, 300))
        if msg.ref_msg_id:
            await self.sql.tx(lambda db: db.execute("DELETE FROM outbox WHERE msg_id=?", (msg.ref_msg_id,)))

    async def _on_command(self, cmd: Command) -> None:
        if cmd.client_id != self.client_id:
            self.rejected += 1
            await self._send(ErrorReply(ref_msg_id=cmd.msg_id, code="forbidden",
                                        message=f"gateway {self.id} serves {self.client_id}, not {cmd.client_id}"))
            return
        now = time.time()
        if cmd.expires_at.timestamp() <= now:
            await self._outcome(Outcome(request_id=cmd.request_id, client_id=self.client_id,
                                        state=ClientState.REFUSED,
                                        detail={"reason": "expired: the command arrived after its expiry"},
                                        revision=cmd.revision))
            await self._send(Ack(ack_ids=[cmd.msg_id]))
            return

        def store(db: sqlite3.Connection) -> int | None:
            """None: a new request; else the revision held before (replaced when ``cmd`` is newer)."""
            row = db.execute("SELECT payload, state FROM commands WHERE request_id=?", (cmd.request_id,)).fetchone()
            if row is None:
                db.execute("INSERT INTO commands (request_id, payload, state, received_at) VALUES (?,?,?,?)",
                           (cmd.request_id, encode(cmd), "scheduled", now))
                return None
            held = Command.model_validate_json(row[0]).revision
            if cmd.revision > held:
                db.execute("UPDATE commands SET payload=?, state=? WHERE request_id=?",
                           (encode(cmd), "active" if row[1] == "active" else "scheduled", cmd.request_id))
            return held

        held = await self.sql.tx(store)
        await self._send(Ack(ack_ids=[cmd.msg_id]))
        if held is not None and cmd.revision < held:
            await self._stale(cmd.msg_id, cmd.request_id, cmd.revision, held)
            return
        if held is None or cmd.revision > held:
            if isinstance(cmd.params, LoadShiftParams):
                await self._acknowledge_shift(cmd, cmd.params)
            shed: list[str] | None = None
            if held is not None:  # a newer revision: it replaces the one in force, keeping what that one shed
                shed = await self._replace(cmd)
                log.info("gateway %s applies revision %d of request %s", self.id, cmd.revision,
                         outside(cmd.request_id))
            self._spawn(cmd.request_id, self._execute(cmd, now, resumed_shed=shed, report=True))

    async def _acknowledge_shift(self, cmd: Command, params: LoadShiftParams) -> None:
        """A load shift is reported ``acknowledged`` when it arrives (its loads are kept off in its window)."""
        will = [ld.name for ld in self.loads() if ld.sheddable]
        await self._report(Outcome(request_id=cmd.request_id, client_id=self.client_id, state=ClientState.ACKNOWLEDGED,
                                   detail={"will_shift": will, "window_start": params.start.isoformat(),
                                           "window_end": params.end.isoformat()},
                                   revision=cmd.revision))

    async def _replace(self, cmd: Command) -> list[str] | None:
        """Stop acting on the revision ``cmd`` replaces; returns what its action holds shed (None: it has not
        started, or ``cmd`` starts later, in which case the loads it shed are restored as at an action's end)."""
        task = self._tasks.pop(cmd.request_id, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        action = self.active.get(cmd.request_id)
        if action is None:
            return None
        if cmd.params.start.timestamp() > time.time():
            await self._finish(cmd.request_id, action.shed, state="scheduled")
            return None
        return list(action.shed)

    async def _stale(self, msg_id: str, request_id: str, revision: int, held: int) -> None:
        """A message of an older revision than the one held arrived late: acknowledged, ignored, and said so."""
        self.rejected += 1
        text = (f"request {request_id}: revision {revision} arrived after revision {held}, which this gateway "
                f"applies; ignored")
        log.warning("gateway %s: %s", self.id, outside(text, 300))
        self.events.publish({"type": "stale_revision", "at": time.time(), "gateway_id": self.id,
                             "request_id": request_id, "revision": revision, "held": held})
        await self._send(ErrorReply(ref_msg_id=msg_id, code="stale_revision", message=text))

    async def _on_schedule(self, msg: Schedule) -> None:
        if msg.client_id != self.client_id:
            self.rejected += 1
            await self._send(ErrorReply(ref_msg_id=msg.msg_id, code="forbidden",
                                        message=f"gateway {self.id} serves {self.client_id} only"))
            return
        if self.schedule is None or msg.version > self.schedule.version:
            payload = encode(msg)
            await self.sql.tx(lambda db: db.execute("INSERT OR REPLACE INTO schedule VALUES (1,?,?)",
                                                    (msg.version, payload)))
            self.schedule = msg
            self._plan = None
            log.info("gateway %s applies schedule v%d of its customer", self.id, msg.version)
        await self._send(Ack(ack_ids=[msg.msg_id]))

    async def _on_cancel(self, msg: Cancel) -> None:
        if msg.client_ids and self.client_id not in msg.client_ids:
            await self._send(ErrorReply(ref_msg_id=msg.msg_id, code="forbidden",
                                        message=f"gateway {self.id} serves {self.client_id} only"))
            return
        if msg.revision is not None:  # a revision removed this client: unless a newer one has re-added it
            row = await self.sql.read(lambda db: db.execute("SELECT payload FROM commands WHERE request_id=?",
                                                            (msg.request_id,)).fetchone())
            held = Command.model_validate_json(row[0]).revision if row is not None else None
            if held is not None and held > msg.revision:
                await self._send(Ack(ack_ids=[msg.msg_id]))
                await self._stale(msg.msg_id, msg.request_id, msg.revision, held)
                return
        task = self._tasks.pop(msg.request_id, None)
        if task is not None:
            task.cancel()
        action = self.active.get(msg.request_id) if msg.request_id != FAILSAFE_ID else None
        await self._finish(msg.request_id, action.shed if action else [], state="cancelled")
        log.info("gateway %s cancelled request %s", self.id, outside(msg.request_id))
        await self._send(Ack(ack_ids=[msg.msg_id]))

    def _judge(self, params: Any, target: float | None, before: float | None,
               action: ActiveAction) -> tuple[Verdict, float | None, float]:
        """Whether the action achieved what it was asked, from the latest reading: ``(verdict, measured kW, rated kW
        shed)``; the rules are the controller's."""
        after, loads = self.measured_kw(), self.loads()
        shed_kw = round(sum(ld.rated_kw for ld in loads if ld.name in action.shed), 3)
        if isinstance(params, LoadReductionParams):
            return judge_reduction(target, shed_kw, before, after, loads), after, shed_kw
        return judge_limit(action.limit_kw, after, loads), after, shed_kw

    async def _execute(self, cmd: Command, received_at: float, resumed_shed: list[str] | None = None,
                       report: bool = True) -> None:
        """Act on ``cmd`` from its start to its end; ``resumed_shed``: what an earlier run of it (before a restart,
        or of the revision it replaces) holds shed; ``report``: its revision's outcome is not stored yet (a resumed
        run of a reported revision passes False; :meth:`_report` refuses a second outcome either way)."""
        params = cmd.params
        start, end = params.start.timestamp(), params.end.timestamp()
        await asyncio.sleep(max(0.0, start - time.time()))
        if time.time() >= end:
            await self._finish(cmd.request_id, resumed_shed or [])
            return
        t0 = time.perf_counter()
        target = params.target_kw if isinstance(params, LoadReductionParams) else None
        action = ActiveAction(cmd.request_id, cmd.kind.value, 0.0, end, list(resumed_shed or []))
        async with self._control:
            await self.poll_once()
            before = self.measured_kw()
            if isinstance(params, EmergencyParams):
                action.limit_kw = params.power_limit_kw
            elif isinstance(params, LoadReductionParams):
                # resumed after a restart: what it shed before is off already, and not in ``before`` any more
                done_kw = sum(ld.rated_kw for ld in self.loads() if ld.name in action.shed)
                action.limit_kw = reduction_limit(None if target is None else max(0.0, target - done_kw), before)
            self.active[cmd.request_id] = action
            plan = await self._hold_limit()
            if action.shed:
                await self.poll_once()  # what the shedding achieved, not what it was expected to
            verdict, after, shed_kw = self._judge(params, target, before, action)
            shed = list(action.shed)
        await self.sql.tx(lambda db: db.execute(
            "UPDATE commands SET state='active' WHERE request_id=? AND state='scheduled'", (cmd.request_id,)))
        # A real meter shows a switch a reading or two later: read again until it shows the limit met, or the
        # settle time has passed (only then is the home reported over its limit).
        settle_until = self.clock() + self.cfg.gateway.outcome_settle_s
        while not verdict.met and action.shed and after is not None and self.clock() < settle_until:
            await asyncio.sleep(self.cfg.gateway.outcome_poll_s)
            async with self._control:
                await self.poll_once()
                verdict, after, shed_kw = self._judge(params, target, before, action)
                # what this action switched off, a load already back (its interruption bound) included
                shed += [name for name in action.shed if name not in shed]
        detail: dict[str, Any] = {
            "limit_kw": action.limit_kw,
            "measured_kw_before": before,
            "measured_kw": after,
            "shed": shed,
            "expected_kw": None if plan is None or math.isnan(plan) else round(plan, 3),
            "meter_available": after is not None,
        }
        if isinstance(params, LoadReductionParams):
            detail.update(target_kw=target, shed_kw=shed_kw)
        if verdict.reason is not None:
            detail["reason"] = verdict.reason
        if report and not isinstance(params, LoadShiftParams):  # a load shift was acknowledged when it arrived
            state = ClientState.EXECUTED if verdict.met else ClientState.LIMIT_NOT_MET
            if await self._report(Outcome(
                    request_id=cmd.request_id, client_id=self.client_id, state=state, detail=detail,
                    trace={"gateway_ms": round((time.perf_counter() - t0) * 1000, 3),
                           "waited_ms": round(max(0.0, start - received_at) * 1000, 3)},
                    revision=cmd.revision,
            )) and not verdict.met:
                log.warning("gateway %s: request %s %s: %s", self.id, outside(cmd.request_id), state.value,
                            verdict.reason)
        await asyncio.sleep(max(0.0, end - time.time()))
        await self._finish(cmd.request_id, action.shed)

    async def _hold_limit(self) -> float | None:
        """Shed more while the strictest active limit is exceeded; returns the expected draw afterwards."""
        if not self.active:
            return None
        owner = min(self.active.values(), key=lambda a: a.limit_kw)
        for action in list(self.active.values()):
            for name in list(action.shed):
                a = self.appliance(name)
                since = self.shed_since.get(name)
                if a is not None and since is not None and (
                        a.never_shed or (a.max_interruption_s is not None
                                         and self.clock() - since >= a.max_interruption_s)):
                    if await self._switch(name, True, action.request_id, "the customer's longest interruption"):
                        action.shed.remove(name)
                        self.exempt.add(name)
        plan = plan_shedding(owner.limit_kw, self.measured_kw(), self.loads())
        for name in plan.shed:
            if await self._switch(name, False, owner.request_id, f"{owner.kind}: limit {owner.limit_kw} kW"):
                if name not in owner.shed:
                    owner.shed.append(name)
        if plan.shed:
            await self.sql.tx(partial(_record_shed, owner=owner.request_id, names=list(owner.shed), at=time.time()))
        return plan.expected_kw

    async def _finish(self, request_id: str, shed: list[str], state: str = "done") -> None:
        """End one action: what it shed is handed to another action still holding the home, or queued to come
        back with hysteresis (one load per ``restore_interval_s`` while the home stays under its cap)."""
        async with self._control:  # not while a control step is switching what this action shed
            await self._end_action(request_id, shed, state)

    async def _end_action(self, request_id: str, shed: list[str], state: str = "done") -> None:
        """:meth:`_finish` inside a control step (the caller holds ``_control``)."""
        self.active.pop(request_id, None)
        if not self.active:
            self.exempt.clear()
        heir = min(self.active.values(), key=lambda a: a.limit_kw) if self.active else None
        if heir is not None:
            heir.shed.extend(n for n in shed if n not in heir.shed)
            if shed:  # stored with the heir, so that a restart still brings them back when it ends
                await self.sql.tx(partial(_record_shed, owner=heir.request_id, names=list(heir.shed),
                                          at=time.time()))
        else:
            for name in shed:
                self.to_restore[name] = request_id
        now = time.time()

        def record(db: sqlite3.Connection) -> None:
            db.execute("UPDATE commands SET state=? WHERE request_id=?", (state, request_id))
            if not self.active:
                db.executemany("INSERT OR REPLACE INTO to_restore VALUES (?,?,?)",
                               [(n, request_id, now) for n in shed])

        await self.sql.tx(record)
        self._last_restore = -math.inf

    async def _switch(self, name: str, on: bool, request_id: str | None, reason: str) -> bool:
        sw = self.switches.get(name)
        if sw is None:
            return False
        try:
            state = await sw.set(on)
        except DeviceError as exc:
            log.error("gateway %s could not switch %s %s: %s", self.id, name, "on" if on else "off", exc)
            return False
        self.state.setdefault(name, {})["on"] = state
        if on:
            self.shed_since.pop(name, None)
        elif request_id is not None:
            self.shed_since.setdefault(name, self.clock())
        act = Actuation(time.time(), name, on, request_id, reason)
        self.actuations.append(act)
        del self.actuations[:-1000]
        self.events.publish({"type": "actuation", "at": act.at, "gateway_id": self.id, "device": name, "on": on,
                             "request_id": request_id, "reason": reason})
        log.info("gateway %s switched %s %s (%s, request %s)", self.id, name, "on" if on else "off", reason,
                 outside(request_id))
        return state == on

    # -- outbox -------------------------------------------------------------------------------------------

    async def _publish_up(self, topic: str, payload: bytes, retain: bool) -> None:
        if self.link is None:
            raise MqttError("the uplink is not open")
        await self.link.publish(topic, payload, retain=retain)

    async def _report(self, out: Outcome) -> bool:
        """Store the outcome of a stored command's revision in the outbox, unless one of that revision (or a newer
        one) is stored already; the mark and the outcome commit together, so that a restart neither loses nor
        repeats it. Returns whether it was stored."""

        def store(db: sqlite3.Connection) -> bool:
            marked = db.execute("UPDATE commands SET reported=? WHERE request_id=? AND reported<?",
                                (out.revision, out.request_id, out.revision)).rowcount
            if marked:
                db.execute("INSERT OR IGNORE INTO outbox (msg_id, payload, next_attempt_at) VALUES (?,?,0)",
                           (out.msg_id, encode(out)))
            return bool(marked)

        stored = await self.sql.tx(store)
        if stored:
            self._wake.set()
        return stored

    async def _outcome(self, out: Outcome) -> None:
        """Store an outcome that answers no stored command (one refused on arrival) in the outbox."""
        await self.sql.tx(lambda db: db.execute(
            "INSERT OR IGNORE INTO outbox (msg_id, payload, next_attempt_at) VALUES (?,?,0)",
            (out.msg_id, encode(out))))
        self._wake.set()

    async def _send(self, msg: Ack | ErrorReply) -> None:
        if self.link is not None:
            with contextlib.suppress(MqttError):
                await self.link.publish(topics.up("gateways", self.id), encode(msg))

    async def _outbox_loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self.outbox.send_due()
                await self.telemetry_outbox.send_due()
            except StorageError as exc:
                log.error("gateway %s outbox paused: %s", self.id, exc)
            await wait_or_timeout(self._wake, 0.5)


def _record_shed(db: sqlite3.Connection, owner: str, names: list[str], at: float) -> None:
    """Store what an action holds off: a request's with its command (re-armed on restart); the failsafe's as
    loads to restore (a restart does not resume the failsafe, so they come back)."""
    if owner == FAILSAFE_ID:
        db.executemany("INSERT OR REPLACE INTO to_restore VALUES (?,?,?)", [(n, owner, at) for n in names])
    else:
        db.execute("UPDATE commands SET shed=? WHERE request_id=?", (json.dumps(names), owner))


def _add_reported_column(db: sqlite3.Connection) -> None:
    """Add ``commands.reported`` to a database from before it. There the outcome was stored when a command became
    ``active`` (a load shift's when it arrived), so those rows count as reported for the revision they hold: a
    migrated gateway repeats no outcome."""
    if "reported" in {r[1] for r in db.execute("PRAGMA table_info(commands)")}:
        return
    db.execute("ALTER TABLE commands ADD COLUMN reported INTEGER NOT NULL DEFAULT 0")
    done = []
    for request_id, payload, state in db.execute("SELECT request_id, payload, state FROM commands").fetchall():
        cmd = Command.model_validate_json(payload)
        if state != "scheduled" or isinstance(cmd.params, LoadShiftParams):
            done.append((cmd.revision, request_id))
    db.executemany("UPDATE commands SET reported=? WHERE request_id=?", done)


def _forget_restore(db: sqlite3.Connection, name: str) -> None:
    db.execute("DELETE FROM to_restore WHERE name=?", (name,))


def _seconds(hhmm: str) -> float:
    hh, _, mm = hhmm.partition(":")
    return int(hh) * 3600.0 + int(mm) * 60.0


class _OutcomeTable:
    """The gateway's ``outbox`` table (outcomes to the bridge) as an :class:`OutboxStorage`."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    async def due(self, now: float, limit: int) -> list[Pending]:
        topic = topics.up("gateways", self.gw.id)
        rows = await self.gw.sql.read(lambda db: db.execute(
            "SELECT msg_id, payload, attempts FROM outbox WHERE next_attempt_at<=? ORDER BY rowid LIMIT ?",
            (now, limit)).fetchall())
        return [Pending(r[0], topic, r[1], r[2]) for r in rows]

    async def sent(self, sent: Sequence[tuple[Pending, float]], dropped: Sequence[Pending], now: float) -> None:
        if sent:
            await self.gw.sql.tx(lambda db: db.executemany(
                "UPDATE outbox SET attempts=attempts+1, next_attempt_at=? WHERE msg_id=?",
                [(at, p.key) for p, at in sent]))


class _TelemetryTable:
    """The gateway's ``telemetry`` buffer as an :class:`OutboxStorage`: in order, the newest sent retained (for a
    bridge that starts later)."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    async def due(self, now: float, limit: int) -> list[Pending]:
        topic = topics.telemetry(self.gw.id)
        rows = await self.gw.sql.read(lambda db: db.execute(
            "SELECT seq, payload, attempts FROM telemetry WHERE next_attempt_at<=? ORDER BY seq LIMIT ?",
            (now, limit)).fetchall())
        newest = bool(rows) and rows[-1][0] == self.gw._seq
        return [Pending(r[0], topic, r[1], r[2], retain=newest and i == len(rows) - 1) for i, r in enumerate(rows)]

    async def sent(self, sent: Sequence[tuple[Pending, float]], dropped: Sequence[Pending], now: float) -> None:
        if sent:
            await self.gw.sql.tx(lambda db: db.executemany(
                "UPDATE telemetry SET attempts=attempts+1, next_attempt_at=? WHERE seq=?",
                [(at, p.key) for p, at in sent]))


async def selftest(cfg: GatewayConfig) -> dict[str, Any]:
    """Read every configured device once: ``{"devices": {name: {"ok", "readings", "error"?}}}``."""
    result: dict[str, Any] = {"devices": {}}
    async with BusPool() as pool:
        for dev in cfg.devices:
            entry: dict[str, Any] = {"ok": False, "readings": {}}
            device: Meter | Switch = build_device(dev, pool)
            try:
                entry["readings"] = dict(await device.read())
                entry["ok"] = True
            except DeviceError as exc:
                entry["error"] = f"{dev.driver} at {_where(dev)}: {exc}"
            result["devices"][dev.name] = entry
    return result


def _where(dev: Any) -> str:
    if dev.transport == "modbus-rtu" or dev.transport == "serial":
        return f"{dev.serial_port} unit {dev.unit_id}"
    return f"{dev.host}:{dev.port} unit {dev.unit_id}"
