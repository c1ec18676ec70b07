"""The one gateway to subprocesses. Nothing else in the package imports subprocess.

argv lists only, never shell strings; a clean environment; stdin from
/dev/null; the command echoed when PIPELINE_DEBUG is set; on failure a
CommandFailed that carries the shlex-joined command and the tail of its output.
Children run in their own process group so an interrupt stops all of them.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

from .errors import CommandFailed, CommandTimedOut

_BASE_ENV_KEYS = ("HOME", "LANG", "TERM", "USER")


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


def _stop_group(proc: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM the child's process group, give it time to clean up, then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run(argv: list[str], *, env: dict[str, str] | None = None, cwd: Path | str | None = None,
        log: Path | None = None, capture: bool = False, input: bytes | None = None,
        timeout: float | None = None, check: bool = True,
        on_line: Callable[[str], None] | None = None) -> subprocess.CompletedProcess:
    """Run argv to completion.

    log: append stdout and stderr to this file (for long, chatty tools like DIB).
    on_line: with log, also called with each line of output as it comes (progress).
    capture: return stdout and stderr as text. Otherwise stderr is kept for errors.
    timeout: seconds; past it the command's process group is stopped and CommandTimedOut raised.
    """
    argv = [str(arg) for arg in argv]
    _debug(argv)
    log_file = open(log, "ab") if log else None
    if on_line and log_file:
        stdout, stderr = subprocess.PIPE, subprocess.STDOUT
    else:
        stdout = log_file or (subprocess.PIPE if capture else subprocess.DEVNULL)
        stderr = log_file or subprocess.PIPE
    try:
        proc = subprocess.Popen(argv, env=clean_env(env), cwd=cwd, stdout=stdout, stderr=stderr,
                                stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                                start_new_session=True)
        try:
            if on_line and log_file:
                for raw in proc.stdout:
                    log_file.write(raw)
                    on_line(raw.decode(errors="replace").rstrip())
                proc.wait(timeout=timeout)
                out = err = None
            else:
                out, err = proc.communicate(input=input, timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop_group(proc)
            raise CommandTimedOut(argv, timeout) from None
        except BaseException:  # KeyboardInterrupt included
            _stop_group(proc)
            raise
    finally:
        if log_file:
            log_file.close()
    out_text = out.decode(errors="replace") if out is not None else ""
    err_text = err.decode(errors="replace") if err is not None else ""
    if check and proc.returncode != 0:
        detail = err_text.strip().splitlines()[-1] if err_text.strip() else ""
        if log:
            detail = f"see {log}" + (f": {detail}" if detail else "")
        raise CommandFailed(argv, proc.returncode, detail)
    return subprocess.CompletedProcess(argv, proc.returncode, out_text, err_text)


def start(argv: list[str], *, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a long-running process (a VM) in its own process group, output to log."""
    argv = [str(arg) for arg in argv]
    _debug(argv)
    with open(log, "ab") as log_file:
        return subprocess.Popen(argv, env=clean_env(env), stdin=subprocess.DEVNULL,
                                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)


def hold(argv: list[str], *, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a process that lives while its stdin stays open (a lock held over ssh).

    stdin, stdout and stderr are pipes. Only this process holds stdin's write end, so if it
    dies, the child reads end-of-file and lets go."""
    argv = [str(arg) for arg in argv]
    _debug(argv)
    return subprocess.Popen(argv, env=clean_env(env), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)


def release(proc: subprocess.Popen, grace: float = 10) -> None:
    """End a process started by hold: close its stdin, then stop it if it lingers."""
    try:
        proc.stdin.close()
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        _stop_group(proc, grace)
    finally:
        for stream in (proc.stdout, proc.stderr):
            stream.close()


def stop(proc: subprocess.Popen, grace: float = 10) -> None:
    _stop_group(proc, grace)


def interrupt_on_termination() -> None:
    """Handle SIGTERM and SIGHUP as Ctrl-C: KeyboardInterrupt in the main thread.

    Children run in sessions of their own, so a signal to the driver alone (a cancelled CI
    job) reaches none of them; raising here runs every `finally`, which stops them (QEMU,
    nginx, dnsmasq, DIB) and unmounts what they mounted."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupt)
