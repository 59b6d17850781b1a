"""A watchdog of an asyncio loop's stalls: how long the loop did not run its callbacks, where it was, and why.

A service starts a :class:`LoopWatch` on its running loop. The loop refreshes a heartbeat every ``interval_s``
(a ``call_later`` callback: its wall clock, its own thread's CPU time, and the garbage collector's time so far); a
daemon thread checks the heartbeat's age every ``interval_s``. When a tick is more than ``threshold_s`` late (no
tick for ``interval_s + threshold_s``), the thread takes the loop thread's Python stack (``sys._current_frames()``),
and once the loop ticks again ONE warning is logged for the whole stall with

* how long the loop went without a tick (the wall time between the last tick before and the first after it),
* the loop thread's CPU time over the same span (``time.thread_time`` read by the loop thread itself), so that
  "our code ran for 2 s" (CPU close to wall) is told apart from "the process got no CPU, or the loop waited on a
  lock, a disk sync or another blocking call" (CPU far below wall),
* the cyclic garbage collector's time over the span (all threads, from ``gc.callbacks``),
* the stack at the stall's first sighting and, when it differs, at its last before the end (a stall the thread did
  not see while it lasted, because something held the interpreter lock throughout, is found by the loop's next
  tick and reported without a stack).

``stalls`` and ``stalled_s`` count them; ``on_stall`` (called in the watchdog thread) lets a service count them in
its metrics. The thread only reads a tuple the loop writes, so a loop that never stalls pays one timer callback per
``interval_s`` and nothing else.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD_S = 0.25
"""A loop that has not ticked for longer than this is stalled (the rate target's p99 bound, DESIGN.md)."""
STACK_FRAMES = 40
"""The innermost frames of a stack kept for the warning."""


@dataclass(frozen=True)
class Tick:
    """What the loop wrote at one heartbeat: wall clock (the watch's ``clock``), its thread's CPU seconds, and the
    garbage collector's seconds and collections so far (process-wide)."""

    wall: float
    cpu: float
    gc_s: float
    gc_runs: int


@dataclass(frozen=True)
class Stall:
    """One stall, as reported when it ended: ``wall_s`` between the last tick before it and the first after it,
    the loop thread's ``cpu_s`` and the collector's ``gc_s`` (``gc_runs`` collections) over that span, and the
    loop thread's stack at the first sighting (``stack``) and the last (``last_stack``, empty when the same)."""

    wall_s: float
    cpu_s: float
    gc_s: float
    gc_runs: int
    stack: str
    last_stack: str

    def describe(self) -> str:
        """The warning's text: the figures, what they suggest, and the stacks."""
        share = self.cpu_s / self.wall_s if self.wall_s > 0 else 0.0
        if share >= 0.7:
            cause = "the loop thread ran (CPU close to wall): code on the loop"
        elif share <= 0.3:
            cause = "the loop thread mostly did not run (CPU far below wall): no CPU for the process, or a wait " \
                    "on a lock, a disk sync or another blocking call"
        else:
            cause = "partly running, partly waiting"
        text = (f"event loop stalled for {self.wall_s * 1000:.0f} ms: loop thread CPU {self.cpu_s * 1000:.0f} ms "
                f"({share:.0%}), garbage collector {self.gc_s * 1000:.0f} ms in {self.gc_runs} collection(s); {cause}."
                f"\nloop thread's stack when the stall was seen:\n{self.stack or '  (not seen while it lasted)'}")
        if self.last_stack:
            text += f"\nand at its last sighting:\n{self.last_stack}"
        return text


class _GcClock:
    """The collector's time and collections so far, from ``gc.callbacks`` (process-wide: any thread's collection)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.total_s = 0.0
        self.runs = 0
        self._started = 0.0

    def callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = self.clock()
        else:
            self.total_s += self.clock() - self._started
            self.runs += 1


MIN_THRESHOLD_S = 0.05
"""The smallest stall threshold a service's settings take (besides 0, off): below it the heartbeat (a fifth of the
threshold) would run every few milliseconds and every scheduler hiccup would be a warning."""


def valid_threshold(value: float) -> float:
    """A service setting's stall threshold: 0 (off) or at least :data:`MIN_THRESHOLD_S`; else ValueError."""
    if value != 0 and value < MIN_THRESHOLD_S:
        raise ValueError(f"the loop stall threshold is 0 (off) or at least {MIN_THRESHOLD_S} s, not {value}")
    return value


class LoopWatch:
    """Watches one asyncio loop (see the module's description). ``threshold_s`` 0 turns it off (``start`` does
    nothing). ``clock`` (monotonic seconds) decides the stalls, ``cpu_clock`` reads the calling thread's CPU seconds;
    both injected for tests, as is ``frames`` (``sys._current_frames``)."""

    def __init__(self, threshold_s: float = DEFAULT_THRESHOLD_S, *, interval_s: float | None = None,
                 name: str = "event loop", on_stall: Callable[[Stall], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, cpu_clock: Callable[[], float] = time.thread_time,
                 frames: Callable[[], dict[int, Any]] = sys._current_frames) -> None:
        if threshold_s < 0:
            raise ValueError("the stall threshold cannot be negative (0 turns the watch off)")
        self.threshold_s = threshold_s
        self.interval_s = interval_s if interval_s is not None else max(threshold_s / 5, 0.005)
        self.name = name
        self.on_stall = on_stall
        self.clock, self.cpu_clock, self.frames = clock, cpu_clock, frames
        self.stalls = 0
        """Stalls reported so far."""
        self.stalled_s = 0.0
        """Their wall time, summed."""
        self._gc = _GcClock(time.perf_counter)
        self._tick: Tick | None = None
        self._ended: collections.deque[tuple[Tick, Tick]] = collections.deque()
        """Stalls the loop's heartbeat found ended (the ticks before and after), for the watchdog to report."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._loop_thread_id = 0
        self._since: Tick | None = None
        """The last tick before the stall under way (None: no stall)."""
        self._stack = ""
        self._last_stack = ""

    @property
    def enabled(self) -> bool:
        return self.threshold_s > 0

    def start(self) -> None:
        """Start watching the running loop; call it from the loop's thread. If it fails, nothing is left behind."""
        if not self.enabled or self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._loop_thread_id = threading.get_ident()
        self._tick, self._since, self._stack, self._last_stack = None, None, "", ""
        self._ended.clear()
        self._stop.clear()
        gc.callbacks.append(self._gc.callback)
        try:
            self._beat()
            thread = threading.Thread(target=self._watch, name=f"loopwatch-{self.name}", daemon=True)
            thread.start()
        except BaseException:
            if self._handle is not None:
                self._handle.cancel()
                self._handle = None
            gc.callbacks.remove(self._gc.callback)
            raise
        self._thread = thread  # only a started thread: stop() joins it

    def stop(self) -> None:
        """Stop the thread and the heartbeat (a stall under way is reported first); idempotent."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        thread.join()
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        with_gc = self._gc.callback
        if with_gc in gc.callbacks:
            gc.callbacks.remove(with_gc)
        self.heartbeat()  # a stall under way ends now (the loop thread runs this): the tick puts it in _ended
        self.check()

    def __enter__(self) -> LoopWatch:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _beat(self) -> None:
        self.heartbeat()
        assert self._loop is not None
        self._handle = self._loop.call_later(self.interval_s, self._beat)

    def heartbeat(self) -> None:
        """Record a tick now, and a stall if the last one is older than the threshold (beyond the interval): the
        loop's own timer calls it; tests with an injected clock call it themselves."""
        tick = Tick(self.clock(), self.cpu_clock(), self._gc.total_s, self._gc.runs)
        last = self._tick
        if last is not None and tick.wall - last.wall > self.threshold_s + self.interval_s:
            self._ended.append((last, tick))
        self._tick = tick

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except Exception:  # the watchdog never takes the service down
                log.exception("%s watchdog: a check failed", self.name)

    def _loop_stack(self) -> str:
        frame = self.frames().get(self._loop_thread_id)
        if frame is None:
            return ""
        return "".join(traceback.format_stack(frame)[-STACK_FRAMES:]).rstrip("\n")

    def check(self) -> list[Stall]:
        """One look from the watchdog's side: the stalls that have ended since the last look are reported (logged,
        counted, handed to ``on_stall``) and returned; a stall under way seen for the first time has the loop
        thread's stack taken, one seen before its latest stack."""
        ended = []
        while self._ended:
            before, after = self._ended.popleft()
            ended.append(self._report(before, after, seen=self._since is before))
        now = self.clock()  # before reading the tick: a tick landing in between is then never taken for a stall
        tick = self._tick
        if tick is None:
            return ended
        if self._since is not None and self._since is not tick and not self._ended:
            self._since, self._stack, self._last_stack = None, "", ""  # a sighting no ended pair names: cleared
        # a stack taken after the loop ticked again shows the frame after the stall, not the one that held it: dropped
        if self._since is None:
            if now - tick.wall > self.threshold_s + self.interval_s:
                self._since = tick
                stack = self._loop_stack()
                self._stack = stack if self._tick is tick else ""
        elif self._since is tick:
            stack = self._loop_stack()
            if self._tick is tick:
                self._last_stack = "" if stack == self._stack else stack
        return ended

    def _report(self, before: Tick, after: Tick, *, seen: bool) -> Stall:
        stall = Stall(after.wall - before.wall, after.cpu - before.cpu, after.gc_s - before.gc_s,
                      after.gc_runs - before.gc_runs, self._stack if seen else "", self._last_stack if seen else "")
        if seen:
            self._since, self._stack, self._last_stack = None, "", ""
        log.warning("%s: %s", self.name, stall.describe())
        if self.on_stall is not None:  # first: a test that sees ``stalls`` grow finds the service's metric grown too
            try:
                self.on_stall(stall)
            except Exception:  # stop() runs this in a service's shutdown: never let it raise there
                log.exception("%s watchdog: on_stall failed", self.name)
        self.stalls += 1
        self.stalled_s += stall.wall_s
        return stall
