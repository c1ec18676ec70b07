"""The subprocess gateway with real processes: a cancelled job stops what it started."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.errors import CommandFailed
from pipeline.paths import ROOT

# A driver as ./inv runs one: tasks.py loaded, then a task waiting on a long child of the gateway.
DRIVERS = {
    "run": """
from pipeline import run
run.run(["sh", "-c", 'echo $$ > "$0"; exec sleep 600', PIDFILE])
""",
    "start": """
from pipeline import run
proc = run.start(["sleep", "600"], log=PIDFILE.with_suffix(".log"))
try:
    PIDFILE.write_text(str(proc.pid))
    proc.wait()
finally:
    run.stop(proc)
""",
}


def _wait_for(condition, what: str, deadline: float = 120) -> None:  # generous: CI machines are busy
    end = time.monotonic() + deadline
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def _gone(pid: int) -> bool:
    """Ended: no such process, or a zombie (an orphan waits for init to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):  # the latter: it ended while being read
        return True


@pytest.mark.parametrize("how", DRIVERS)
def test_sigterm_to_the_driver_stops_its_children(tmp_path, how):
    pidfile = tmp_path / "child.pid"
    script = f"import tasks\nfrom pathlib import Path\nPIDFILE = Path({str(pidfile)!r})\n{DRIVERS[how]}"
    driver = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stderr=subprocess.DEVNULL)
    child = None
    try:
        _wait_for(lambda: pidfile.is_file() and pidfile.read_text().strip(), "the child to start")
        child = int(pidfile.read_text())
        driver.send_signal(signal.SIGTERM)
        driver.wait(timeout=60)
        _wait_for(lambda: _gone(child), f"child {child} to end", deadline=15)
    finally:
        driver.kill()
        driver.wait()
        if child and not _gone(child):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)  # the orphan of a failed run


INNER_TEST = """
from pathlib import Path
from pipeline import run

def test_waits():
    proc = run.start(["sleep", "600"], log=Path(PIDFILE).with_suffix(".log"))
    try:
        Path(PIDFILE).write_text(str(proc.pid))
        proc.wait()
    finally:
        run.stop(proc)
"""


@pytest.mark.parametrize("whom", ["driver", "group"])
def test_sigterm_during_inv_test_reaches_pytest(tmp_path, whom):
    """./inv test runs pytest through invoke, which must pass the interrupt on, and pytest
    signalled itself (CI may signal the whole group) must stop too: a test's `finally` stops
    what the test started."""
    pidfile = tmp_path / "child.pid"
    (tmp_path / "test_inner.py").write_text(f"PIDFILE = {str(pidfile)!r}\n{INNER_TEST}")
    script = (f"import tasks\nfrom invoke import Config, Context\nconfig = Config()\n"
              f"config.load_collection(tasks.namespace.configuration())\n"
              f"tasks._pytest(Context(config), ['-q', '-p', 'no:cacheprovider', '-p', 'tests.conftest', {str(tmp_path / 'test_inner.py')!r}])")
    driver = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    child = None
    try:
        _wait_for(lambda: pidfile.is_file() and pidfile.read_text().strip(), "the test's child to start")
        child = int(pidfile.read_text())
        if whom == "driver":
            driver.send_signal(signal.SIGTERM)
        else:
            os.killpg(driver.pid, signal.SIGTERM)
        # What counts is the child; the driver is killed below if it lingers.
        _wait_for(lambda: _gone(child), f"child {child} to end", deadline=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)  # the driver and its pytest, if they outlived the test
        driver.wait()
        if child and not _gone(child):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)


@pytest.mark.parametrize("script, ending", [("exit 3", "(exit 3)"), ("kill -TERM $$", "(killed by SIGTERM)")])
def test_a_failed_command_says_how_it_ended(script, ending):
    from pipeline import run as gateway

    with pytest.raises(CommandFailed) as failed:
        gateway.run(["sh", "-c", script])
    assert str(failed.value).startswith(f"command failed {ending}: sh -c ")
