"""Exclusive advisory locks on files (flock): the one way the pipeline takes a lock.

A lock is the kernel's and ends with its holder, even one killed by SIGKILL, so a lock file
left behind means nothing. Three ways to take one:

    try_lock(path)                 yields whether this process got it (prune skips a layer in use)
    lock_or_refuse(path, busy)     raises at once if another process holds it (a second publish)
    lock_or_wait(path, what, s)    says once that it waits, for whom, and raises after s seconds
                                   (a second build with the same package layer)

The holder's pid comes from the kernel's table of locks, /proc/locks.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import PipelineError
from .progress import say

LOCK_TABLE = Path("/proc/locks")
# An flock held: "1: FLOCK  ADVISORY  WRITE 912 fe:00:2146690 0 EOF" (pid, device major:minor in
# hex, inode). A waiter's line ("1: -> FLOCK ...") and POSIX, OFD and lease locks do not match.
HELD_FLOCK = re.compile(r"\d+: FLOCK +ADVISORY +WRITE +(\d+) +([0-9a-f]+):([0-9a-f]+):(\d+) +0 +EOF")
POLL_SECONDS = 0.5


def holder(path: Path, table: Path = LOCK_TABLE) -> int | None:
    """The pid that holds an exclusive flock on `path`; None if no one does, or it is not known."""
    try:
        file = os.stat(path)
    except FileNotFoundError:
        return None
    for line in table.read_text().splitlines():
        match = HELD_FLOCK.fullmatch(line.strip())
        if match and (int(match[2], 16), int(match[3], 16), int(match[4])) == \
                (os.major(file.st_dev), os.minor(file.st_dev), file.st_ino):
            return int(match[1]) or None  # 0: a process outside our pid namespace
    return None


def _held_by(path: Path) -> str:
    pid = holder(path)
    return f"pid {pid}" if pid else "another process"


@contextlib.contextmanager
def try_lock(path: Path) -> Iterator[bool]:
    """flock `path` (created if need be) unless another process holds it; yields whether this
    process holds it. A holder may remove the lock file (prune does): a lock taken on a file
    no longer at `path` is taken again on the new one."""
    while True:
        with open(path, "a") as lock_file:
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                current = os.stat(path)
            except FileNotFoundError:
                continue
            if os.path.samestat(current, os.fstat(lock_file.fileno())):
                yield True
                return


@contextlib.contextmanager
def lock_or_refuse(path: Path, busy: str) -> Iterator[None]:
    """Hold the lock on `path` for the block; if another process holds it, raise at once:
    "BUSY (pid N holds PATH)"."""
    with try_lock(path) as locked:
        if not locked:
            raise PipelineError(f"{busy} ({_held_by(path)} holds {path})")
        yield


@contextlib.contextmanager
def lock_or_wait(path: Path, what: str, timeout: float) -> Iterator[None]:
    """Hold the lock on `path` for the block, waiting for another holder to let go: say
    "waiting for WHAT (held by pid N)" once, and raise if it still holds it after `timeout` s."""
    deadline = time.monotonic() + timeout
    said = False
    while True:
        with try_lock(path) as locked:
            if locked:
                yield
                return
        if time.monotonic() >= deadline:
            raise PipelineError(f"gave up waiting for {what} after {timeout:g} s: "
                                f"{path} is still held by {_held_by(path)}")
        if not said:
            say(f"waiting for {what} (held by {_held_by(path)})")
            said = True
        time.sleep(min(POLL_SECONDS, max(deadline - time.monotonic(), 0)))
