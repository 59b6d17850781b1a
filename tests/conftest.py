"""Fixtures shared by every test: real brokers from broker_config, a real hub, and a leak check."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from broker_config import live_processes

pytest_plugins = ["tests.broker_fixtures", "tests.hub_fixtures", "tests.storage_fixtures", "tests.browser"]

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


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail a test that leaves a Mosquitto, any other child process, or a thread running after its teardown."""
    before = set(threading.enumerate())
    children_before = child_processes()
    yield
    deadline = time.monotonic() + 3.0
    while True:
        threads = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        brokers = live_processes()
        children = child_processes() - children_before
        if not (threads or brokers or children) or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert not brokers, f"leaked brokers: {brokers}"
    assert not children, f"leaked child processes: {sorted(children)}"
    assert not threads, f"leaked threads: {threads}"
