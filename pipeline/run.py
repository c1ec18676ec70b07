"""The one gateway to subprocesses. Nothing else in the package imports subprocess.

argv lists only, never shell strings; a clean environment; stdin from
/dev/null; the command echoed when PIPELINE_DEBUG is set; on failure a
CommandFailed that carries the shlex-joined command and the tail of its output.
Children run in their own process group so an interrupt stops all of them; a long-running
child (QEMU, nginx, dnsmasq) lives inside a `with spawn(...)` block and is stopped when it ends.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from . import progress
from .errors import CommandFailed, CommandTimedOut, PipelineError, exit_status

_BASE_ENV_KEYS = ("HOME", "LANG", "TERM", "USER")
Argv = Sequence[str | os.PathLike[str]]  # each item is passed as str(item)


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {key: os.environ[key] for key in _BASE_ENV_KEYS if key in os.environ}
    # The venv's bin first: disk-image-create and its helpers live there.
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", os.defpath)])
    env.setdefault("LANG", "C.UTF-8")
    env.update(extra or {})
    return env


def _debug(argv: list[str]) -> None:
    if os.environ.get("PIPELINE_DEBUG"):
        print(f"+ {shlex.join(argv)}", file=sys.stderr, flush=True)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP until the block is done, then deliver the first that came.

    A second Ctrl-C while a child is being stopped must not cut the stop short and leave the child
    running. Blocking them in this thread is not enough where other threads run (the PXE server's):
    the kernel hands a signal to any thread not blocking it, and Python then raises in the main
    thread all the same; so the main thread's handlers only note the signal meanwhile."""
    noted: list[int] = []
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            if signal.getsignal(signum) is not None:  # None: a handler not set from Python, left alone
                previous[signum] = signal.signal(signum, lambda signum, frame: noted.append(signum))
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # one held here is delivered now
        if noted:
            signal.raise_signal(noted[0])


def _stop_group(proc: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM the child's process group, give it time to clean up, then SIGKILL; reap it. Not to
    be interrupted (_signals_deferred)."""
    with _signals_deferred():
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace)
        except ProcessLookupError:
            proc.wait()
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run(argv: Argv, *, env: dict[str, str] | None = None, cwd: Path | str | None = None,
        log: Path | None = None, capture: bool = False, input: bytes | None = None,
        timeout: float | None = None, check: bool = True,
        on_line: Callable[[str], None] | None = None) -> subprocess.CompletedProcess:
    """Run argv to completion.

    log: append stdout and stderr to this file (for long, chatty tools like DIB).
    on_line: with log, also called with each line of output as it comes (progress).
    capture: return stdout and stderr as text. Otherwise stderr is kept for errors.
    timeout: seconds; past it the command's process group is stopped and CommandTimedOut raised.
    """
    command = [str(arg) for arg in argv]
    _debug(command)
    group = getattr(_worker, "group", None)  # set in a thread of concurrently()
    if getattr(_worker, "cleaning_up", False):
        group = None  # undoing what was done: runs, and is not stopped, whatever the others did
    if group and group.stopping:
        raise CommandFailed(command, -signal.SIGTERM, "not started: a concurrent step failed")
    log_file = open(log, "ab") if log else None  # noqa: SIM115 (closed in the finally below)
    stdout: int | IO[bytes]
    stderr: int | IO[bytes]
    if on_line and log_file:
        stdout, stderr = subprocess.PIPE, subprocess.STDOUT
    else:
        stdout = log_file or (subprocess.PIPE if capture else subprocess.DEVNULL)
        stderr = log_file or subprocess.PIPE
    try:
        proc = subprocess.Popen(command, env=clean_env(env), cwd=cwd, stdout=stdout, stderr=stderr,
                                stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                                start_new_session=True)
        if group:
            group.add(proc)
        try:
            if on_line and log_file:
                for raw in proc.stdout or ():  # a pipe here
                    log_file.write(raw)
                    on_line(raw.decode(errors="replace").rstrip())
                proc.wait(timeout=timeout)
                out = err = None
            else:
                out, err = proc.communicate(input=input, timeout=timeout)
        except subprocess.TimeoutExpired as expired:
            _stop_group(proc)
            raise CommandTimedOut(command, expired.timeout) from None
        except BaseException:  # KeyboardInterrupt included
            _stop_group(proc)
            raise
        finally:
            if group:
                group.discard(proc)
    finally:
        if log_file:
            log_file.close()
    out_text = out.decode(errors="replace") if out is not None else ""
    err_text = err.decode(errors="replace") if err is not None else ""
    if check and proc.returncode != 0:
        detail = err_text.strip().splitlines()[-1] if err_text.strip() else ""
        if log:
            detail = f"see {log}" + (f": {detail}" if detail else "")
        raise CommandFailed(command, proc.returncode, detail)
    return subprocess.CompletedProcess(command, proc.returncode, out_text, err_text)


class _Group:
    """The children of concurrently()'s calls, so that when one call fails the others' are stopped
    and none start."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.children: set[subprocess.Popen] = set()
        self.stopping = False

    def add(self, proc: subprocess.Popen) -> None:
        with self.lock:
            self.children.add(proc)
            stopping = self.stopping
        if stopping:  # stop() came between the check in run() and the start: stop it here
            _stop_group(proc)

    def discard(self, proc: subprocess.Popen) -> None:
        with self.lock:
            self.children.discard(proc)

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            children = list(self.children)
        for proc in children:
            _stop_group(proc)


_worker = threading.local()


@contextmanager
def cleaning_up() -> Iterator[None]:
    """Commands that undo what a step did (unmount, detach) start and run to their end even after a
    concurrent step failed: refused or stopped, they left a build's tmpfs mounted (a local CI run
    whose unit tests failed while the first image's build was cleaning up)."""
    before = getattr(_worker, "cleaning_up", False)
    _worker.cleaning_up = True
    try:
        yield
    finally:
        _worker.cleaning_up = before


class Milestone:
    """A point one of concurrently()'s calls reaches (its builds done, a session passed) that another
    call waits for. If a call fails first, the wait ends with an error instead of waiting forever."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._event = threading.Event()

    def reached(self) -> None:
        self._event.set()

    def wait(self, poll: float = 0.5) -> None:
        group = getattr(_worker, "group", None)
        while not self._event.wait(poll):
            if group is not None and group.stopping:
                raise PipelineError(f"not waiting for {self.name}: a concurrent step failed")


def concurrently(*calls: Callable[[], None], background: Sequence[Callable[[], None]] = ()) -> None:
    """Run the calls in threads at once and wait for all of them. The first to raise ends it all:
    the other calls' children are stopped (SIGTERM, then SIGKILL) and they start no more, then its
    exception is raised; an interrupt stops them the same way. A call's Python code is not
    interrupted: it finishes, or fails at its next command.

    background: calls that run beside the others only while those run; when the last of them
    ends, the background calls still running are stopped the same way, and waited for."""
    group = _Group()
    errors: list[BaseException] = []
    finished = threading.Semaphore(0)  # released by every call that ends
    lock = threading.Lock()
    foreground_left = [len(calls)]
    caller = progress.context()  # the calls' lines nest under, and are tagged as, the caller's

    def work(call: Callable[[], None], foreground: bool) -> None:
        _worker.group = group
        try:
            with progress.inherited(caller):
                call()
        except BaseException as error:  # handed to the main thread
            errors.append(error)
        finally:
            if foreground:
                with lock:
                    foreground_left[0] -= 1
            finished.release()

    threads = [threading.Thread(target=work, args=(call, foreground), name=getattr(call, "__name__", "call"))
               for calls_of_kind, foreground in ((calls, True), (background, False)) for call in calls_of_kind]
    try:
        for thread in threads:
            thread.start()
        while foreground_left[0]:
            finished.acquire()
            if errors:
                break
    finally:  # on the first error, an interrupt, or when all are done
        if errors or any(thread.is_alive() for thread in threads):
            group.stop()
        for thread in threads:
            if thread.ident is not None:
                thread.join()
    if errors:
        raise errors[0]  # the first; the others' came from being stopped


@contextmanager
def spawn(argv: Argv, *, log: Path, env: dict[str, str] | None = None,
          grace: float = 10) -> Iterator[subprocess.Popen]:
    """Run a long-running child (a VM, a server) for the length of the block, output to log.

    It runs in a process group of its own; when the block ends, however it ends, the group gets
    SIGTERM, then SIGKILL after grace seconds, and the child is reaped, with SIGINT, SIGTERM and
    SIGHUP held meanwhile. Whether it ended early is the block's to ask (proc.poll(), ended)."""
    command = [str(arg) for arg in argv]
    _debug(command)
    with open(log, "ab") as log_file:
        proc = subprocess.Popen(command, env=clean_env(env), stdin=subprocess.DEVNULL,
                                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        _stop_group(proc, grace)


def attach(argv: Argv, *, env: dict[str, str] | None = None) -> int:
    """Run an interactive command on this terminal (a VM's serial console, ssh, guestfish) until it
    ends, and return its exit status.

    It inherits stdin, stdout and stderr and stays in the terminal's process group, so the terminal's
    Ctrl-C reaches it and it decides what that means (ssh passes it on, QEMU powers off). Meanwhile
    this process only passes SIGINT, SIGTERM and SIGHUP on to it, waits for it, and then raises a
    SIGTERM or SIGHUP that came (a cancelled job); a Ctrl-C was the child's to answer."""
    command = [str(arg) for arg in argv]
    _debug(command)
    noted: list[int] = []
    proc: subprocess.Popen | None = None

    def pass_on(signum, frame):
        noted.append(signum)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {signum: signal.signal(signum, pass_on) for signum in STOP_SIGNALS}
    try:
        # A caught signal's handler is reset by exec: the child gets the default ones.
        proc = subprocess.Popen(command, env=clean_env(env))
        returncode = proc.wait()
    finally:
        if proc is not None and proc.poll() is None:  # not started whole, or an error here
            _stop_group_member(proc)
        for stop_signal, handler in previous.items():
            signal.signal(stop_signal, handler)
    for came in noted:
        if came != signal.SIGINT:
            signal.raise_signal(came)
    return returncode


def _stop_group_member(proc: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM a child that shares our process group, then SIGKILL; reap it."""
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def ended(proc: subprocess.Popen) -> str | None:
    """None while proc runs; once it has ended, how: "exit 1", "killed by SIGKILL"."""
    returncode = proc.poll()
    return None if returncode is None else exit_status(returncode)


def hold(argv: Argv, *, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a process that lives while its stdin stays open (a lock held over ssh).

    stdin, stdout and stderr are pipes. Only this process holds stdin's write end, so if it
    dies, the child reads end-of-file and lets go."""
    command = [str(arg) for arg in argv]
    _debug(command)
    return subprocess.Popen(command, env=clean_env(env), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)


def release(proc: subprocess.Popen, grace: float = 10) -> None:
    """End a process started by hold: close its stdin, then stop it if it lingers."""
    try:
        if proc.stdin:
            proc.stdin.close()
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        _stop_group(proc, grace)
    finally:
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()


def interrupt_on_termination() -> None:
    """Handle SIGTERM and SIGHUP as Ctrl-C: KeyboardInterrupt in the main thread.

    Children run in sessions of their own, so a signal to the driver alone (a cancelled CI
    job) reaches none of them; raising here runs every `finally`, which stops them (QEMU,
    nginx, dnsmasq, DIB) and unmounts what they mounted."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupt)
    # A shell without job control starts a background job (`cmd &` in a script) with SIGINT
    # ignored, which every child inherits: the SIGINT invoke passes on to pytest would stop nothing.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
