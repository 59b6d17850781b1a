"""Fixtures shared by every test: real brokers from broker_config, a real hub, and the suite's one leak check."""

from __future__ import annotations

import asyncio
import inspect
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from broker_config import live_processes

pytest_plugins = ["tests.ssl_contexts", "tests.broker_fixtures", "tests.hub_fixtures", "tests.storage_fixtures",
                  "tests.browser", "pytester"]

# Property tests: the same examples on every run of the suite (CI does not fail by chance on an example no one
# ran before); MHP_HYPOTHESIS=explore draws new ones, many more, to look for failures on purpose.
settings.register_profile("suite", derandomize=True, database=None)
settings.register_profile("explore", max_examples=3000, derandomize=False, database=None)
settings.load_profile(os.environ.get("MHP_HYPOTHESIS", "suite"))


def child_processes() -> set[int]:
    """Living (not zombie) child processes of this test process, from /proc."""
    me, found = os.getpid(), set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == me and fields[0] != "Z":
            found.add(int(stat.parent.name))
    return found


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "known_leak(reason): the leak check does not fail this test (or module, "
                            "as pytestmark) for what it leaves behind; the reason says what leaks and why")


def _known_leak(request: pytest.FixtureRequest) -> str | None:
    marker = request.node.get_closest_marker("known_leak")
    if marker is None:
        return None
    reason = marker.args[0] if marker.args else marker.kwargs.get("reason", "")
    assert reason, f"{request.node.nodeid}: known_leak needs a written reason"
    return str(reason)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every coroutine test also gets :func:`no_task_leaks`, right after :func:`no_leaks`: it is torn down after
    every fixture that starts tasks has stopped them, and before the event loop closes (whose executor threads
    :func:`no_leaks` then sees gone)."""
    for item in items:
        if isinstance(item, pytest.Function) and inspect.iscoroutinefunction(item.obj):
            names = item.fixturenames
            if "no_task_leaks" not in names:
                names.insert(names.index("no_leaks") + 1 if "no_leaks" in names else 0, "no_task_leaks")


@pytest.fixture
async def no_task_leaks(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """Fail a coroutine test that leaves asyncio tasks pending in its event loop after its teardown (they would
    be cancelled silently when the loop closes). The leaked tasks are cancelled here, named in the failure."""
    yield
    for _ in range(3):  # closing transports finish on the next loop turns
        await asyncio.sleep(0)
    current = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
    for task in tasks:
        task.cancel()
    if tasks and _known_leak(request) is None:
        pytest.fail(f"leaked asyncio tasks (still pending after the test's teardown): "
                    f"{sorted(t.get_name() + ' ' + repr(t.get_coro()) for t in tasks)}", pytrace=False)


LEAK_GRACE_S = float(os.environ.get("MHP_LEAK_GRACE_S", "3.0"))
"""How long :func:`no_leaks` lets threads and processes end after a test's teardown before calling them leaked
(``tests/test_leak_check.py`` shortens it for the leaks it makes on purpose)."""


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves a Mosquitto, any other child process, or a thread running after its teardown."""
    before = set(threading.enumerate())
    children_before = child_processes()
    yield
    deadline = time.monotonic() + LEAK_GRACE_S
    while True:
        threads = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        brokers = live_processes()
        children = child_processes() - children_before
        if not (threads or brokers or children) or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    if _known_leak(request) is not None:
        return
    assert not brokers, f"leaked brokers: {brokers}"
    assert not children, f"leaked child processes: {sorted(children)}"
    assert not threads, f"leaked threads: {threads}"
