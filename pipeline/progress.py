"""Timed, nested steps: `build tree ... 142 s`, so a user sees where time goes.

Each finished step is recorded in Timings, which the benchmark reads.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Timings:
    seconds: dict[str, float] = field(default_factory=dict)


# Each thread nests its own steps, and may tag its lines (work done beside another's output).
_thread = threading.local()


def say(message: str) -> None:
    print(f"{getattr(_thread, 'tag', '')}{'  ' * getattr(_thread, 'depth', 0)}{message}", file=sys.stderr, flush=True)


def echo(line: str) -> None:
    """A child's output line (pytest's) on stdout, tagged as this thread's lines are."""
    print(f"{getattr(_thread, 'tag', '')}{line}", flush=True)


@contextlib.contextmanager
def tagged(tag: str):
    """Within the block, this thread's lines start with `[TAG] `."""
    _thread.tag = f"[{tag}] "
    try:
        yield
    finally:
        _thread.tag = ""


def context() -> tuple[str, int]:
    """This thread's tag and nesting depth, for a worker thread to go on from (inherited)."""
    return getattr(_thread, "tag", ""), getattr(_thread, "depth", 0)


@contextlib.contextmanager
def inherited(parent: tuple[str, int]):
    """Within the block, this thread's lines carry the tag and depth of the thread that started it."""
    _thread.tag, _thread.depth = parent
    try:
        yield
    finally:
        _thread.tag, _thread.depth = "", 0


@contextlib.contextmanager
def step(name: str, timings: Timings | None = None):
    say(f"{name} ...")
    started = time.monotonic()
    _thread.depth = getattr(_thread, "depth", 0) + 1
    try:
        yield
    except BaseException:
        _thread.depth -= 1
        say(f"{name} failed after {time.monotonic() - started:.1f} s")
        raise
    _thread.depth -= 1
    elapsed = time.monotonic() - started
    if timings is not None:
        timings.seconds[name] = round(elapsed, 2)
    say(f"{name} done in {elapsed:.1f} s")
