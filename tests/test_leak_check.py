"""The suite's one leak check (``tests/conftest.py``) run on small test files of its own: a task, a thread or a
child process left behind fails the test that left it, naming it; ``known_leak`` with a reason lets it pass."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFTEST = """
from tests.conftest import no_leaks, no_task_leaks, pytest_collection_modifyitems, pytest_configure
"""

LEAKY = '''
import asyncio
import subprocess
import threading
import time

import pytest


async def test_leaves_a_task():
    asyncio.create_task(asyncio.sleep(3600), name="forgotten-sleeper")


async def test_stops_its_task():
    task = asyncio.create_task(asyncio.sleep(3600))
    task.cancel()


def test_leaves_a_thread():
    stop = threading.Event()
    threading.Thread(target=stop.wait, args=(5,), name="forgotten-thread", daemon=True).start()


def test_leaves_a_child_process():
    subprocess.Popen(["sleep", "5"])


@pytest.mark.known_leak("a test of the marker: the task is cancelled when the loop closes")
async def test_a_known_leak_with_its_reason():
    asyncio.create_task(asyncio.sleep(3600))
'''


@pytest.fixture
def leaky(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.RunResult:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    # The leakers below live 5 s; the check waits 0.5 s for them to end, not 3 s each (a thread and a process).
    monkeypatch.setenv("MHP_LEAK_GRACE_S", "0.5")
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_leaky=LEAKY)
    pytester.makeini("[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n")
    return pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider", "-q",
                                         f"--rootdir={pytester.path}")


def test_each_kind_of_leak_fails_the_test_that_left_it(leaky: pytest.RunResult) -> None:
    text = leaky.stdout.str()
    outcomes = leaky.parseoutcomes()
    assert outcomes.get("passed") == 5 and outcomes.get("errors") == 3, text  # the leakers fail at teardown
    assert "ERROR at teardown of test_leaves_a_task" in text and "forgotten-sleeper" in text, text
    assert "ERROR at teardown of test_leaves_a_thread" in text and "forgotten-thread" in text, text
    assert "ERROR at teardown of test_leaves_a_child_process" in text and "leaked child processes" in text, text
