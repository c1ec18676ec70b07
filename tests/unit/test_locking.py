"""The one flock helper, against real processes holding the lock."""

import os
import subprocess
import sys
import threading
import time

import pytest

from pipeline import locking
from pipeline.errors import PipelineError

HOLDER = """
import fcntl, sys
with open(sys.argv[1], "a") as lock_file:
    fcntl.flock(lock_file, fcntl.LOCK_EX)
    print("held", flush=True)
    sys.stdin.read()  # until the test closes our stdin
"""


@pytest.fixture
def held(tmp_path):
    """A lock file that another process holds until `release`d (or killed)."""
    path = tmp_path / "thing.lock"
    process = subprocess.Popen([sys.executable, "-c", HOLDER, path], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "held\n"
    process.path = path
    process.release = process.stdin.close
    yield process
    process.kill()
    process.wait(timeout=10)
    process.stdout.close()


def test_holder_is_the_pid_holding_the_lock(held, tmp_path):
    assert locking.holder(held.path) == held.pid
    assert locking.holder(tmp_path / "another.lock") is None
    held.release()
    held.wait(timeout=10)
    assert locking.holder(held.path) is None


def test_try_lock_says_whether_it_got_the_lock(held):
    with locking.try_lock(held.path) as locked:
        assert not locked
    held.release()
    held.wait(timeout=10)
    with locking.try_lock(held.path) as locked:
        assert locked and locking.holder(held.path) == os.getpid()
    assert locking.holder(held.path) is None


def test_a_refusing_lock_raises_at_once_naming_the_holder(held):
    started = time.monotonic()
    with pytest.raises(PipelineError) as caught, locking.lock_or_refuse(held.path, "another thing is running"):
        pytest.fail("the lock is held by another process")
    assert str(caught.value) == f"another thing is running (pid {held.pid} holds {held.path})"
    assert time.monotonic() - started < 1


def test_a_lock_ends_with_its_holder_even_killed(held):
    held.kill()
    held.wait(timeout=10)
    with locking.lock_or_refuse(held.path, "another thing is running"):
        assert locking.holder(held.path) == os.getpid()


def test_a_waiting_lock_says_once_for_whom_it_waits_then_takes_it(held, capsys):
    threading.Timer(1.5, held.release).start()
    with locking.lock_or_wait(held.path, "the thing", timeout=30):
        assert locking.holder(held.path) == os.getpid()
    assert capsys.readouterr().err == f"waiting for the thing (held by pid {held.pid})\n"


def test_a_waiting_lock_gives_up_at_its_deadline(held, capsys):
    started = time.monotonic()
    with pytest.raises(PipelineError) as caught, locking.lock_or_wait(held.path, "the thing", timeout=1):
        pytest.fail("the lock is held by another process")
    assert 1 <= time.monotonic() - started < 3
    assert str(caught.value) == f"gave up waiting for the thing after 1 s: {held.path} is still held by pid {held.pid}"
    assert capsys.readouterr().err == f"waiting for the thing (held by pid {held.pid})\n"

