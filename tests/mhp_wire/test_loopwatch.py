"""The event loop's stall watchdog (``mhp_wire.loopwatch``): a real loop really blocked is reported once with the
blocking frame in its stack, one that is not blocked never; its decisions on an injected clock."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import types

import pytest

from mhp_wire.loopwatch import LoopWatch, Stall
from tests.waiting import eventually, throughout


def block_the_loop_for(watch: LoopWatch, at_most_s: float = 10.0) -> None:
    """Block the loop (a blocking call on it: what the watchdog is for) until the watchdog has taken this frame's
    stack, at most ``at_most_s``: however late a loaded machine runs the watchdog's thread."""
    deadline = time.monotonic() + at_most_s
    while "block_the_loop_for" not in watch._stack + watch._last_stack and time.monotonic() < deadline:
        time.sleep(0.02)


def busy(stall: Stall) -> bool:
    """A stall of code on the loop, not one of a loop thread starved of CPU by a loaded machine."""
    return stall.cpu_s >= 0.7 * stall.wall_s


async def test_a_blocked_loop_is_reported_once_with_the_blocking_frame(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[Stall] = []
    watch = LoopWatch(0.2, name="test loop", on_stall=seen.append)
    with caplog.at_level(logging.WARNING, logger="mhp_wire.loopwatch"), watch:
        await asyncio.sleep(0.1)
        block_the_loop_for(watch)
        [stall] = await eventually(lambda: [s for s in seen if "block_the_loop_for" in s.stack + s.last_stack],
                                   "the stall reported")
    assert "time.sleep(" in stall.stack + stall.last_stack and stall.wall_s > 0.2
    assert watch.stalls >= 1 and watch.stalled_s >= stall.wall_s  # starvation stalls may add to both
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and "block_the_loop_for" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("test loop: event loop stalled")


async def test_a_loop_that_keeps_turning_is_never_reported_busy() -> None:
    seen: list[Stall] = []
    watch = LoopWatch(0.5, on_stall=seen.append)
    with watch:  # a loaded machine may starve the loop thread (cpu far below wall): only those are let through
        await throughout(lambda: not [s for s in seen if busy(s)], "no stall of code on the loop", within_s=1.0)
    assert not [s for s in seen if busy(s)]


class Clocks:
    """Wall and loop-thread CPU seconds that the test moves."""

    def __init__(self) -> None:
        self.wall = 100.0
        self.cpu = 5.0

    def advance(self, wall: float, cpu: float) -> None:
        self.wall += wall
        self.cpu += cpu


def frame_of(name: str) -> types.FrameType:
    """A real frame of a function called ``name`` (the stack the watchdog would take of the loop thread)."""
    code = f"import sys\ndef {name}():\n    return sys._getframe()\n"
    space: dict[str, object] = {}
    exec(compile(code, f"<{name}>", "exec"), space)
    frame = space[name]()  # type: ignore[operator]
    assert isinstance(frame, types.FrameType)
    return frame


def watch_on(clocks: Clocks, stacks: list[types.FrameType]) -> LoopWatch:
    watch = LoopWatch(0.25, interval_s=0.05, clock=lambda: clocks.wall, cpu_clock=lambda: clocks.cpu,
                      frames=lambda: {watch._loop_thread_id: stacks[0]})
    return watch


def test_a_busy_stall_and_a_starved_one_are_told_apart_by_the_loop_threads_cpu() -> None:
    clocks = Clocks()
    stacks = [frame_of("merge_the_audit")]
    watch = watch_on(clocks, stacks)
    watch.heartbeat()
    clocks.advance(0.05, 0.01)  # an ordinary turn: a tick on time
    watch.heartbeat()
    assert watch.check() == []
    clocks.advance(0.31, 0.3)  # no tick for 0.31 s > 0.25 + 0.05: seen while it lasts, its stack taken
    assert watch.check() == []
    stacks[0] = frame_of("still_merging")
    clocks.advance(0.5, 0.5)
    assert watch.check() == []  # still under way: nothing reported yet, the latest stack kept
    clocks.advance(0.19, 0.19)
    watch.heartbeat()  # the loop runs again
    [busy] = watch.check()
    assert busy.wall_s == pytest.approx(1.0) and busy.cpu_s == pytest.approx(0.99)
    assert "merge_the_audit" in busy.stack and "still_merging" in busy.last_stack
    assert "code on the loop" in busy.describe()
    assert watch.check() == [] and watch.stalls == 1  # one report per stall

    clocks.advance(2.0, 0.02)  # the loop thread got no CPU for 2 s, and the watchdog did not look meanwhile
    watch.heartbeat()
    [starved] = watch.check()
    assert starved.wall_s == pytest.approx(2.0) and starved.cpu_s == pytest.approx(0.02)
    assert starved.stack == "" and "CPU far below wall" in starved.describe()
    assert watch.stalls == 2 and watch.stalled_s == pytest.approx(3.0)


def test_a_late_tick_within_the_threshold_is_no_stall() -> None:
    clocks = Clocks()
    watch = watch_on(clocks, [frame_of("anything")])
    watch.heartbeat()
    clocks.advance(0.29, 0.29)  # 0.24 s late: under the threshold
    assert watch.check() == []
    watch.heartbeat()
    assert watch.check() == [] and watch.stalls == 0


async def test_a_threshold_of_zero_turns_the_watch_off() -> None:
    watch = LoopWatch(0)
    watch.start()
    assert not watch.enabled and watch._thread is None and watch._handle is None
    watch.stop()
    with pytest.raises(ValueError):
        LoopWatch(-1)


async def test_a_stall_under_way_when_the_watch_stops_is_reported() -> None:
    seen: list[Stall] = []
    watch = LoopWatch(0.2, name="test loop", on_stall=seen.append)
    watch.start()
    block_the_loop_for(watch)
    watch.stop()
    assert [s for s in seen if "block_the_loop_for" in s.stack + s.last_stack] and watch._since is None


async def test_a_start_that_fails_leaves_no_gc_callback_and_no_thread() -> None:
    def failing_clock() -> float:
        raise OSError("no clock")

    watch = LoopWatch(0.2, clock=failing_clock)
    with pytest.raises(OSError):
        watch.start()
    assert watch._gc.callback not in gc.callbacks and watch._thread is None and watch._handle is None
    watch.stop()  # nothing to stop: no error


async def test_the_gc_callback_is_removed_when_the_watch_stops() -> None:
    watch = LoopWatch(0.2)
    with watch:
        assert watch._gc.callback in gc.callbacks
    assert watch._gc.callback not in gc.callbacks and watch._thread is None


def test_a_tick_landing_while_the_watchdog_reads_the_clock_is_no_stall_and_leaves_stacks_working() -> None:
    clocks = Clocks()
    watch = watch_on(clocks, [frame_of("the_next_stall")])
    watch.heartbeat()
    armed = [True]
    real = watch.clock

    def clock() -> float:
        if armed[0]:  # the loop ticks (0.29 s late: within the threshold) just as the watchdog looks
            armed[0] = False
            clocks.advance(0.29, 0.29)
            watch.heartbeat()
            clocks.advance(0.02, 0.02)
        return real()

    watch.clock = clock
    assert watch.check() == [] and watch._since is None
    clocks.advance(0.5, 0.5)  # a real stall later: seen, with its stack
    assert watch.check() == []
    watch.heartbeat()
    [stall] = watch.check()
    assert "the_next_stall" in stall.stack


def test_a_stack_taken_after_the_loop_resumed_is_dropped() -> None:
    clocks = Clocks()
    watch = watch_on(clocks, [])
    after = frame_of("after_the_stall")

    def frames() -> dict[int, types.FrameType]:
        watch.heartbeat()  # the loop resumes between the watchdog's read of the tick and its look at the stack
        return {watch._loop_thread_id: after}

    watch.frames = frames
    watch.heartbeat()
    clocks.advance(0.5, 0.5)
    assert watch.check() == []
    [stall] = watch.check()
    assert stall.stack == "" and "after_the_stall" not in stall.last_stack


async def test_an_on_stall_that_raises_in_stop_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    def fail(stall: Stall) -> None:
        raise RuntimeError("the metric is gone")

    watch = LoopWatch(0.2, name="test loop", on_stall=fail)
    with caplog.at_level(logging.ERROR, logger="mhp_wire.loopwatch"):
        watch.start()
        block_the_loop_for(watch)
        watch.stop()  # the stall under way is reported here: its on_stall's error is logged
    assert watch.stalls >= 1
    assert [r for r in caplog.records if "on_stall failed" in r.getMessage() and r.exc_info]


async def test_collections_during_a_stall_are_counted_and_a_restart_starts_clean() -> None:
    seen: list[Stall] = []
    watch = LoopWatch(0.2, name="test loop", on_stall=seen.append)
    watch.start()
    gc.collect()  # on the loop, inside the stall: no tick between it and the block
    block_the_loop_for(watch)
    watch.stop()
    [stall] = [s for s in seen if "block_the_loop_for" in s.stack + s.last_stack]
    assert stall.gc_runs >= 1 and stall.gc_s > 0
    watch.start()  # again, after a stall reported at stop: nothing of the last run is carried over
    try:
        assert watch._since is None and watch._stack == "" and watch._last_stack == "" and not watch._ended
        assert watch._tick is not None and watch._thread is not None and watch._gc.callback in gc.callbacks
    finally:
        watch.stop()
