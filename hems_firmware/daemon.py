"""The gateway daemon's control loop: polls its devices, executes commands from its retailer's bridge, reports
outcomes.

A command is stored, then acknowledged to the bridge (application-level ``ack``; held for ``ack_hold_s``, and not
sent when the command's outcome is stored within it: the outcome stands for it), executed at its ``start``,
and its outcome kept in a stored outbox until the bridge acknowledges it; a redelivered command is recognised by
its request id and not executed twice. While an emergency is active every poll re-checks the meter and sheds
more if the home is over the limit; at its end the loads it shed are switched back on.

The :class:`Gateway` owns the devices, what is active and what is shed, and the order of steps; what to decide is
asked of :mod:`hems_firmware.controller` (pure), what to store is said to :mod:`hems_firmware.store`, and what
goes to or comes from the bridge passes through :mod:`hems_firmware.uplink`.
May import: the drivers' interfaces (:mod:`device_drivers.registry`), the gateway's own modules, :mod:`mhp_wire`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from device_drivers.errors import DeviceError
from device_drivers.modbus import BusPool
from device_drivers.registry import Meter, Switch, build_device
from hems_firmware import controller as rules
from hems_firmware.config import GatewayConfig
from hems_firmware.controller import (
    Failsafe,
    Load,
    Verdict,
    cheapest_slots,
    failsafe_step,
    plan_restore,
    plan_shedding,
    reduction_limit,
)
from hems_firmware.events import EventFeed
from hems_firmware.store import GatewayStore
from hems_firmware.systemd import Notifier
from hems_firmware.uplink import Uplink
from hems_firmware.web import failsafe_view, serve_web
from mhp_wire.logsafe import outside
from mhp_wire.messages import (
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
    utcnow,
)
from mhp_wire.mqtt import MqttLink

log = logging.getLogger(__name__)

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


@dataclass(slots=True)
class _Run:
    """One execution of a command, from its first control step to its outcome."""

    action: ActiveAction
    target_kw: float | None
    before_kw: float | None
    expected_kw: float | None
    verdict: Verdict = field(default_factory=lambda: Verdict(False))
    after_kw: float | None = None
    shed_kw: float = 0.0
    shed: list[str] = field(default_factory=list)
    """What this action switched off, a load already back (its interruption bound) included."""


class Gateway:
    """One home's gateway. ``await Gateway(cfg).run()`` runs it until cancelled."""

    def __init__(self, cfg: GatewayConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.clock = clock
        """Monotonic seconds: how long loads stay shed, the restore interval, the failsafe's delays."""
        self.id = cfg.gateway.id
        self.client_id = cfg.gateway.client_id
        self.store = GatewayStore(Path(cfg.gateway.state_dir) / f"gateway-{self.id}.db", name=f"gw-{self.id}")
        self.uplink = Uplink(cfg.gateway.uplink, self.id, self.store,
                             {Command: self._on_command, Cancel: self._on_cancel, Schedule: self._on_schedule},
                             on_tariff=self._on_tariff, newest_seq=lambda: self._seq,
                             ack_hold_s=cfg.gateway.ack_hold_s, clock=clock)
        self.meters: dict[str, Meter] = {}
        self.switches: dict[str, Switch] = {}
        self.state: dict[str, dict[str, float | bool | None]] = {}
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
        self._seq = 0
        self._tasks: dict[str, asyncio.Task[None]] = {}

    @property
    def link(self) -> MqttLink | None:
        """The uplink's MQTT link (None before :meth:`run` opens it)."""
        return self.uplink.link

    @property
    def rejected(self) -> int:
        """Messages from the bridge this gateway refused (see :attr:`Uplink.rejected`)."""
        return self.uplink.rejected

    # -- running ------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Open the devices, the store and the uplink; poll, execute and report until cancelled."""
        await self.store.open()
        try:
            async with BusPool() as pool:
                for dev in self.cfg.devices:
                    built = build_device(dev, pool)
                    if built.kind == "meter":  # the driver says what it is
                        self.meters[dev.name] = built
                    else:
                        self.switches[dev.name] = built
                async with self.uplink.connect():
                    async with asyncio.TaskGroup() as tg:
                        # The held acks go at their hold's end from the start: a command that arrives while the
                        # stored ones are re-armed is held no longer than any other.
                        tg.create_task(self.uplink.ack_loop(), name=f"gw-{self.id}-acks")
                        await self._resume()
                        self.notifier.ready()
                        tg.create_task(self._poll_loop(), name=f"gw-{self.id}-poll")
                        tg.create_task(self.uplink.outbox_loop(), name=f"gw-{self.id}-outbox")
                        if self.cfg.gateway.web_port is not None:
                            tg.create_task(serve_web(self), name=f"gw-{self.id}-web")
        finally:
            for task in list(self._tasks.values()):
                task.cancel()
            await self.store.close()

    async def _resume(self) -> None:
        """After a restart, re-arm every stored command that has not finished, and what waits to be restored."""
        self._seq = await self.store.last_telemetry_seq()
        self.to_restore = await self.store.loads_to_restore()
        self.schedule = await self.store.schedule()
        for row in await self.store.unfinished_commands():
            cmd = Command.model_validate_json(row["payload"])
            unreported = row["reported"] < cmd.revision
            if unreported and isinstance(cmd.params, LoadShiftParams):
                await self._acknowledge_shift(cmd, cmd.params)  # killed between storing it and acknowledging it
            self._spawn(cmd.request_id, self._execute(cmd, row["received_at"], resumed_shed=row["shed"],
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
        return rules.measured_kw(self.state, self.meters)

    def appliance(self, name: str) -> ApplianceSchedule | None:
        """The customer's settings for one appliance, if any."""
        return rules.appliance(self.schedule, name)

    def loads(self) -> list[Load]:
        """The switchable appliances as the controller sees them (see :func:`controller.loads`)."""
        return rules.loads({n: sw.config for n, sw in self.switches.items()}, self.state, self.schedule,
                           self.shed_since, self.exempt, self.clock())

    def cap_kw(self) -> float:
        """The power the home must stay under when nothing is active: its contracted power, if known."""
        return rules.cap_kw(self.state, self.meters, self.cfg.gateway.contracted_power_kw)

    def sheddable_kw(self) -> float:
        """Rated power of the sheddable loads that are on now (never above :meth:`rated_sheddable_kw`)."""
        return rules.sheddable_kw(self.loads())

    def rated_sheddable_kw(self) -> float:
        """Rated power of every load the installer configured as sheddable, on or off."""
        return rules.rated_sheddable_kw(sw.config for sw in self.switches.values())

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
        connected = self.uplink.connected
        now = self.clock()
        lost_at = self.failsafe.lost_at
        self.failsafe, what = failsafe_step(self.failsafe, connected, now, fs.after_s, fs.duration_s)
        if what == "apply":
            limit = rules.failsafe_limit_kw(fs.limit_kw, fs.floor_kw)
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
        await self.uplink.put_telemetry(msg, self.cfg.gateway.telemetry_buffer_max)

    async def _restore_step(self) -> None:
        """Bring one shed load back, if the hysteresis band allows it and no action holds the home."""
        if not self.to_restore or self.active:
            return
        if not rules.restore_due(self._last_restore, self.clock(), self.cfg.gateway.restore_interval_s):
            return
        shed = [ld for ld in self.loads() if ld.name in self.to_restore]
        for name in [n for n in self.to_restore if n not in self.switches]:
            self.to_restore.pop(name)
        for name in plan_restore(self.cap_kw(), self.measured_kw(), shed, self.cfg.gateway.restore_band_kw):
            request_id = self.to_restore.get(name)
            if await self._switch(name, True, request_id, "restore after the request ended"):
                self._last_restore = self.clock()
                self.to_restore.pop(name, None)
                await self.store.forget_restore(name)

    async def _schedule_step(self) -> None:
        """Run flexible appliances in the cheapest slots of the current tariff that their schedule allows."""
        flexible = rules.flexible(self.cfg.gateway.flexible, self.schedule, self.switches)
        if not flexible or self.tariff is None or self.active:
            return
        now = datetime.now(ZoneInfo(self.cfg.gateway.timezone))
        key = (self.tariff.tariff_id, self.tariff.version,
               f"{now.date().isoformat()}/s{self.schedule.version if self.schedule else 0}")
        if self._plan is None or self._plan[0] != key:
            midnight = now.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()
            prices = [(p.start.timestamp(), p.end.timestamp(), p.price_eur_per_kwh) for p in self.tariff.periods]
            self._plan = (key, {f.device: cheapest_slots(prices, rules.day_windows(midnight, f.allowed), f.run_s)
                                for f in flexible})
            log.info("gateway %s planned its flexible loads on tariff %s v%d", self.id, key[0], key[1])
        t = now.timestamp()
        for device, slots in self._plan[1].items():
            want = rules.in_slot(slots, t)
            on = self.state.get(device, {}).get("on")
            if isinstance(on, bool) and on != want and device not in self.to_restore:
                why = "cheapest tariff slot" if want else "outside its cheapest tariff slots"
                await self._switch(device, want, None, f"tariff {key[0]} v{key[1]}: {why}")

    # -- the bridge's messages ------------------------------------------------------------------------------

    def _on_tariff(self, msg: Tariff) -> None:
        if self.tariff is None or (msg.tariff_id, msg.version) != (self.tariff.tariff_id, self.tariff.version):
            self.tariff = msg
            log.info("gateway %s has tariff %s v%d", self.id, msg.tariff_id, msg.version)

    async def _on_command(self, cmd: Command) -> None:
        if cmd.client_id != self.client_id:
            await self.uplink.refuse(cmd.msg_id, "forbidden",
                                     f"gateway {self.id} serves {self.client_id}, not {cmd.client_id}")
            return
        now = time.time()
        if rules.command_expired(cmd.expires_at.timestamp(), now):
            # Its refusal, stored at once, stands for its ack (docs/decisions.md, "An outcome stands for its ack").
            # Stored first: a refusal the store could not keep (StorageError) leaves no ack behind to say otherwise,
            # and the bridge sends the command again.
            await self.uplink.put_outcome(Outcome(
                request_id=cmd.request_id, client_id=self.client_id, state=ClientState.REFUSED,
                detail={"reason": "expired: the command arrived after its expiry"}, revision=cmd.revision))
            await self.uplink.answered_ack(cmd.msg_id)
            return
        held = await self.store.store_command(cmd, now)
        step = rules.revision_step(held, cmd.revision)
        if step in ("new", "newer"):  # stored: acknowledged at the hold's end, unless its outcome comes first
            await self.uplink.hold_ack(cmd.msg_id, cmd.request_id, cmd.revision)
        else:  # a redelivery (its outcome, if any, went before) or a stale revision: acknowledged at once
            await self.uplink.acknowledge(cmd.msg_id)
        if step == "stale" and held is not None:
            await self._stale(cmd.msg_id, cmd.request_id, cmd.revision, held)
            return
        if step in ("new", "newer"):
            if isinstance(cmd.params, LoadShiftParams):
                await self._acknowledge_shift(cmd, cmd.params)
            shed: list[str] | None = None
            if step == "newer":  # it replaces the revision in force, keeping what that one shed
                shed = await self._replace(cmd)
                log.info("gateway %s applies revision %d of request %s", self.id, cmd.revision,
                         outside(cmd.request_id))
            self._spawn(cmd.request_id, self._execute(cmd, now, resumed_shed=shed, report=True))

    async def _acknowledge_shift(self, cmd: Command, params: LoadShiftParams) -> None:
        """A load shift is reported ``acknowledged`` when it arrives (its loads are kept off in its window)."""
        will = [ld.name for ld in self.loads() if ld.sheddable]
        await self.uplink.report(Outcome(
            request_id=cmd.request_id, client_id=self.client_id, state=ClientState.ACKNOWLEDGED,
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
        text = (f"request {request_id}: revision {revision} arrived after revision {held}, which this gateway "
                f"applies; ignored")
        log.warning("gateway %s: %s", self.id, outside(text, 300))
        self.events.publish({"type": "stale_revision", "at": time.time(), "gateway_id": self.id,
                             "request_id": request_id, "revision": revision, "held": held})
        await self.uplink.refuse(msg_id, "stale_revision", text)

    async def _on_schedule(self, msg: Schedule) -> None:
        if msg.client_id != self.client_id:
            await self.uplink.refuse(msg.msg_id, "forbidden", f"gateway {self.id} serves {self.client_id} only")
            return
        if self.schedule is None or msg.version > self.schedule.version:
            await self.store.save_schedule(msg)
            self.schedule = msg
            self._plan = None
            log.info("gateway %s applies schedule v%d of its customer", self.id, msg.version)
        await self.uplink.acknowledge(msg.msg_id)

    async def _on_cancel(self, msg: Cancel) -> None:
        if msg.client_ids and self.client_id not in msg.client_ids:
            await self.uplink.send(ErrorReply(ref_msg_id=msg.msg_id, code="forbidden",
                                              message=f"gateway {self.id} serves {self.client_id} only"))
            return
        if msg.revision is not None:  # a revision removed this client: unless a newer one has re-added it
            held = await self.store.held_revision(msg.request_id)
            if held is not None and rules.revision_step(held, msg.revision) == "stale":
                await self.uplink.acknowledge(msg.msg_id)
                await self._stale(msg.msg_id, msg.request_id, msg.revision, held)
                return
        task = self._tasks.pop(msg.request_id, None)
        if task is not None:
            task.cancel()
        action = self.active.get(msg.request_id) if msg.request_id != FAILSAFE_ID else None
        await self._finish(msg.request_id, action.shed if action else [], state="cancelled")
        log.info("gateway %s cancelled request %s", self.id, outside(msg.request_id))
        await self.uplink.acknowledge(msg.msg_id)

    # -- executing a command ----------------------------------------------------------------------------------

    async def _execute(self, cmd: Command, received_at: float, resumed_shed: list[str] | None = None,
                       report: bool = True) -> None:
        """Act on ``cmd`` from its start to its end; ``resumed_shed``: what an earlier run of it (before a restart,
        or of the revision it replaces) holds shed; ``report``: its revision's outcome is not stored yet (a resumed
        run of a reported revision passes False; :meth:`GatewayStore.report` refuses a second outcome either
        way)."""
        params = cmd.params
        start, end = params.start.timestamp(), params.end.timestamp()
        await asyncio.sleep(max(0.0, start - time.time()))
        if time.time() >= end:
            await self._finish(cmd.request_id, resumed_shed or [])
            return
        t0 = time.perf_counter()
        run = await self._begin(cmd, end, resumed_shed)
        await self.store.mark_active(cmd.request_id)
        await self._settle(cmd, run)
        if report and not isinstance(params, LoadShiftParams):  # a load shift was acknowledged when it arrived
            await self._report_run(cmd, run, trace={
                "gateway_ms": round((time.perf_counter() - t0) * 1000, 3),
                "waited_ms": round(max(0.0, start - received_at) * 1000, 3)})
        await asyncio.sleep(max(0.0, end - time.time()))
        await self._finish(cmd.request_id, run.action.shed)

    async def _begin(self, cmd: Command, end: float, resumed_shed: list[str] | None) -> _Run:
        """The action's first control step: read the home, set its limit, shed, and judge what that achieved."""
        params = cmd.params
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
            expected = await self._hold_limit()
            if action.shed:
                await self.poll_once()  # what the shedding achieved, not what it was expected to
            run = _Run(action, target, before, expected)
            self._judge(cmd, run)
            run.shed = list(action.shed)
        return run

    async def _settle(self, cmd: Command, run: _Run) -> None:
        """A real meter shows a switch a reading or two later: read again until it shows the limit met, or the
        settle time has passed (only then is the home reported over its limit)."""
        settle_until = self.clock() + self.cfg.gateway.outcome_settle_s
        action = run.action
        while not run.verdict.met and action.shed and run.after_kw is not None and self.clock() < settle_until:
            await asyncio.sleep(self.cfg.gateway.outcome_poll_s)
            async with self._control:
                await self.poll_once()
                self._judge(cmd, run)
                run.shed += [name for name in action.shed if name not in run.shed]

    def _judge(self, cmd: Command, run: _Run) -> None:
        """Judge the action from the latest reading into ``run`` (verdict, measured kW, rated kW shed); the rules
        are the controller's."""
        current = self.loads()
        run.after_kw = self.measured_kw()
        run.shed_kw = rules.shed_kw(current, run.action.shed)
        run.verdict = rules.judge(isinstance(cmd.params, LoadReductionParams), run.action.limit_kw, run.target_kw,
                                  run.shed_kw, run.before_kw, run.after_kw, current)

    async def _report_run(self, cmd: Command, run: _Run, trace: dict[str, float]) -> None:
        """Store the outcome of ``cmd``'s revision from its run (once: see :meth:`GatewayStore.report`)."""
        detail: dict[str, Any] = {
            "limit_kw": run.action.limit_kw,
            "measured_kw_before": run.before_kw,
            "measured_kw": run.after_kw,
            "shed": run.shed,
            "expected_kw": None if run.expected_kw is None or math.isnan(run.expected_kw)
            else round(run.expected_kw, 3),
            "meter_available": run.after_kw is not None,
        }
        if isinstance(cmd.params, LoadReductionParams):
            detail.update(target_kw=run.target_kw, shed_kw=run.shed_kw)
        if run.verdict.reason is not None:
            detail["reason"] = run.verdict.reason
        state = ClientState.EXECUTED if run.verdict.met else ClientState.LIMIT_NOT_MET
        if await self.uplink.report(Outcome(request_id=cmd.request_id, client_id=self.client_id, state=state,
                                            detail=detail, trace=trace, revision=cmd.revision)) \
                and not run.verdict.met:
            log.warning("gateway %s: request %s %s: %s", self.id, outside(cmd.request_id), state.value,
                        run.verdict.reason)

    # -- holding, ending, switching ---------------------------------------------------------------------------

    def _strictest(self) -> ActiveAction | None:
        key = rules.strictest({k: a.limit_kw for k, a in self.active.items()})
        return None if key is None else self.active[key]

    async def _hold_limit(self) -> float | None:
        """Shed more while the strictest active limit is exceeded; returns the expected draw afterwards."""
        owner = self._strictest()
        if owner is None:
            return None
        for action in list(self.active.values()):
            for name in list(action.shed):
                if rules.due_back(self.appliance(name), self.shed_since.get(name), self.clock()) and \
                        await self._switch(name, True, action.request_id, "the customer's longest interruption"):
                    action.shed.remove(name)
                    self.exempt.add(name)
        plan = plan_shedding(owner.limit_kw, self.measured_kw(), self.loads())
        if not plan.shed:
            return plan.expected_kw
        # Stored before any load is switched off (write-ahead): a gateway that dies right after a switch (a power
        # cut, a kill) finds the load on restart and brings it back. A load stored but never switched off is on,
        # and bringing it back changes nothing.
        await self._store_shed(owner, [*owner.shed, *(n for n in plan.shed if n not in owner.shed)])
        for name in plan.shed:
            if await self._switch(name, False, owner.request_id, f"{owner.kind}: limit {owner.limit_kw} kW"):
                if name not in owner.shed:
                    owner.shed.append(name)
        not_shed = [n for n in plan.shed if n not in owner.shed]
        if not_shed:  # a switch failed: store what the action really holds off
            await self._store_shed(owner, owner.shed, forget=not_shed)
        return plan.expected_kw

    async def _store_shed(self, owner: ActiveAction, names: list[str], forget: Sequence[str] = ()) -> None:
        """Store what an action holds off: a request's with its command (re-armed on restart); the failsafe's as
        loads to restore (a restart does not resume the failsafe, so they come back); ``forget``: the failsafe's
        loads stored ahead that stayed on."""
        if owner.request_id == FAILSAFE_ID:
            await self.store.queue_restore(list(names), FAILSAFE_ID, time.time())
            for name in forget:
                await self.store.forget_restore(name)
        else:
            await self.store.hold_shed(owner.request_id, list(names))

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
        heir = self._strictest()
        if heir is not None:
            heir.shed.extend(n for n in shed if n not in heir.shed)
            if shed:  # stored with the heir, so that a restart still brings them back when it ends
                await self._store_shed(heir, heir.shed)
        else:
            for name in shed:
                self.to_restore[name] = request_id
        await self.store.end_command(request_id, state, [] if self.active else shed, time.time())
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
