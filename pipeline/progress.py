"""Timed, nested steps: `build tree ... 142 s`, so a user sees where time goes.

Each finished step is recorded in Timings, which the benchmark reads.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field


@dataclass
class Timings:
    seconds: dict[str, float] = field(default_factory=dict)


_depth = 0


def say(message: str) -> None:
    print(f"{'  ' * _depth}{message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def step(name: str, timings: Timings | None = None):
    global _depth
    say(f"{name} ...")
    started = time.monotonic()
    _depth += 1
    try:
        yield
    except BaseException:
        _depth -= 1
        say(f"{name} failed after {time.monotonic() - started:.1f} s")
        raise
    _depth -= 1
    elapsed = time.monotonic() - started
    if timings is not None:
        timings.seconds[name] = round(elapsed, 2)
    say(f"{name} done in {elapsed:.1f} s")
