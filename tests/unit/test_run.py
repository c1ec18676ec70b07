"""The subprocess gateway with real processes: a cancelled job stops what it started."""

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.errors import CommandFailed, PipelineError
from pipeline.paths import ROOT

# A driver as ./inv runs one: tasks.py loaded, then a task waiting on a long child of the gateway.
DRIVERS = {
    "run": """
from pipeline import run
run.run(["sh", "-c", 'echo $$ > "$0"; exec sleep 600', PIDFILE])
""",
    "spawn": """
from pipeline import run
with run.spawn(["sleep", "600"], log=PIDFILE.with_suffix(".log")) as proc:
    PIDFILE.write_text(str(proc.pid))
    proc.wait()
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
    with run.spawn(["sleep", "600"], log=Path(PIDFILE).with_suffix(".log")) as proc:
        Path(PIDFILE).write_text(str(proc.pid))
        proc.wait()
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
              f"tasks._pytest(Context(config), ['-q', '-p', 'no:cacheprovider', '-p', 'tests.conftest', "
              f"{str(tmp_path / 'test_inner.py')!r}])")
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


def test_a_driver_started_with_sigint_ignored_takes_it_back():
    """As `./inv test &` from a script starts it: SIGINT ignored, and so for every child."""
    script = ("import os, signal, time\nfrom pipeline.run import interrupt_on_termination\n"
              "interrupt_on_termination()\nos.kill(os.getpid(), signal.SIGINT)\ntime.sleep(30)\n")
    ignoring = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert ignoring.returncode == -signal.SIGINT and "KeyboardInterrupt" in ignoring.stderr


@pytest.mark.parametrize("script, ending", [("exit 3", "(exit 3)"), ("kill -TERM $$", "(killed by SIGTERM)")])
def test_a_failed_command_says_how_it_ended(script, ending):
    from pipeline import run as gateway

    with pytest.raises(CommandFailed) as failed:
        gateway.run(["sh", "-c", script])
    assert str(failed.value).startswith(f"command failed {ending}: sh -c ")


# --- run.spawn: a long-running child lives exactly as long as its block

# A child that notes SIGTERM in NOTES and goes on, with a grandchild in its group that ignores it:
# only SIGKILL ends them. Writes "PID GRANDCHILD_PID" to PIDS once both run.
STUBBORN = """
import os, signal, subprocess, sys, time
pids, notes = sys.argv[1:]
signal.signal(signal.SIGTERM, lambda signum, frame: open(notes, "a").write("TERM\\n"))
grandchild = subprocess.Popen(["sleep", "600"], preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_IGN))
open(pids + ".new", "w").write(f"{os.getpid()} {grandchild.pid}")
os.rename(pids + ".new", pids)
while True:
    time.sleep(1)
"""


def _spawned_pids(pids: Path) -> list[int]:
    _wait_for(pids.is_file, "the child to start")
    return [int(pid) for pid in pids.read_text().split()]


@pytest.fixture
def pids(tmp_path):
    """Where STUBBORN writes its pids; whichever outlived a failed test is killed."""
    pids = tmp_path / "pids"
    yield pids
    for pid in _spawned_pids(pids) if pids.is_file() else ():
        if not _gone(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_spawn_stops_its_child_when_the_block_ends(tmp_path):
    from pipeline import run as gateway

    with gateway.spawn(["sleep", "600"], log=tmp_path / "sleep.log") as proc:
        assert gateway.ended(proc) is None
    assert proc.returncode is not None and _gone(proc.pid)  # stopped and reaped


@pytest.mark.parametrize("block_raises", [False, True])
def test_spawn_kills_a_child_and_its_group_that_ignore_sigterm(tmp_path, pids, block_raises):
    from pipeline import run as gateway

    notes = tmp_path / "notes"
    argv = [sys.executable, "-c", STUBBORN, pids, notes]
    with contextlib.ExitStack() as expected:
        if block_raises:
            expected.enter_context(pytest.raises(KeyboardInterrupt))
        with gateway.spawn(argv, log=tmp_path / "child.log", grace=1) as proc:
            child, grandchild = _spawned_pids(pids)
            if block_raises:
                raise KeyboardInterrupt
    assert notes.read_text() == "TERM\n"  # asked first, then killed
    assert gateway.ended(proc) == "killed by SIGKILL"
    _wait_for(lambda: _gone(child) and _gone(grandchild), "the child and its grandchild to end", deadline=10)


@pytest.mark.parametrize("to", ["process", "main thread"])
def test_a_second_interrupt_waits_until_the_child_is_stopped(tmp_path, pids, to):
    """Ctrl-C pressed again while a child is being stopped: the stop goes on to SIGKILL and reaps
    it, and the interrupt comes after. A signal to the process may reach another thread (here the
    one that sends it); one to the main thread waits there, blocked."""
    from pipeline import run as gateway

    notes = tmp_path / "notes"

    def interrupt_once_stopping() -> None:
        _wait_for(notes.is_file, "the child's SIGTERM")
        if to == "process":
            os.kill(os.getpid(), signal.SIGINT)
        else:
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    interrupter = threading.Thread(target=interrupt_once_stopping)
    with pytest.raises(KeyboardInterrupt), \
            gateway.spawn([sys.executable, "-c", STUBBORN, pids, notes], log=tmp_path / "child.log", grace=2) as proc:
        _, grandchild = _spawned_pids(pids)
        interrupter.start()
    interrupter.join()
    assert gateway.ended(proc) == "killed by SIGKILL"  # the interrupt did not cut the stop short
    _wait_for(lambda: _gone(grandchild), "the grandchild to end", deadline=10)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is back


def test_concurrent_calls_carry_the_callers_tag_and_depth(capsys):
    """A build's worker threads (disk assembly, liveimg) print beside another image's session:
    their lines must say which image they belong to, nested under the step that started them."""
    from pipeline import run
    from pipeline.progress import say, step, tagged

    with tagged("host-image"), step("assemble"):
        run.concurrently(lambda: say("disk"), lambda: say("liveimg"))
    say("after")  # the worker threads' context did not leak into this one
    lines = capsys.readouterr().err.splitlines()
    assert sorted(lines[1:3]) == ["[host-image]   disk", "[host-image]   liveimg"]
    assert lines[0] == "[host-image] assemble ..." and lines[-1] == "after"


def test_background_calls_are_stopped_when_the_others_are_done(tmp_path):
    """The build's prefetch runs beside diskimage-builder only while it does: a download still going
    when DIB is done is stopped, not waited for."""
    from pipeline import run

    ended: list[BaseException] = []

    def slow_download() -> None:
        try:
            run.run(["sleep", "600"])
        except CommandFailed as error:
            ended.append(error)

    started = time.monotonic()
    run.concurrently(lambda: time.sleep(0.2), background=[slow_download])
    assert time.monotonic() - started < 30
    assert len(ended) == 1 and "SIGTERM" in str(ended[0])


def test_a_background_call_that_finishes_first_does_not_end_the_others():
    from pipeline import run

    done: list[str] = []
    run.concurrently(lambda: (time.sleep(0.3), done.append("dib")), background=[lambda: done.append("prefetch")])
    assert done == ["prefetch", "dib"]


def test_a_background_call_that_fails_ends_it_all():
    from pipeline import run

    def broken() -> None:
        raise ValueError("a bug in the prefetch")

    with pytest.raises(ValueError, match="a bug"):
        run.concurrently(lambda: run.run(["sleep", "600"]), background=[broken])


def test_a_call_waits_for_the_milestone_another_reaches():
    from pipeline import run

    built = run.Milestone("the builds")
    order: list[str] = []

    def builds() -> None:
        time.sleep(0.3)
        order.append("built")
        built.reached()

    def session() -> None:
        built.wait(poll=0.05)
        order.append("session")

    run.concurrently(session, builds)
    assert order == ["built", "session"]


def test_a_wait_for_a_milestone_ends_when_the_call_that_would_reach_it_fails():
    """Not a hang: the waiting call gives up, and the error raised is the failed call's."""
    from pipeline import run

    built = run.Milestone("the builds")

    def failing_builds() -> None:
        raise PipelineError("build failed")

    started = time.monotonic()
    with pytest.raises(PipelineError, match=r"^build failed$"):
        run.concurrently(lambda: built.wait(poll=0.05), failing_builds)
    assert time.monotonic() - started < 10
