"""A check's report: the results, the table printed to the terminal, check.json."""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import atomic


@dataclass(frozen=True)
class CheckResult:
    name: str
    passed: bool
    detail: str
    seconds: float = 0.0  # how long it took, the appliance already up: where a check's time goes


@dataclass
class Report:
    image: str
    qcow2: Path
    json_path: Path
    results: list[CheckResult] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    qcow2_sha256: str = ""  # build-info's: which artifact this verdict is about

    @property
    def passed(self) -> bool:
        return bool(self.results) and all(r.passed for r in self.results)

    @property
    def failed(self) -> list[CheckResult]:
        return [r for r in self.results if not r.passed]

    def to_json(self) -> dict[str, Any]:
        return {"image": self.image, "qcow2": str(self.qcow2), "qcow2_sha256": self.qcow2_sha256, "passed": self.passed,
                "checks": [asdict(r) for r in self.results], "timings": self.timings}


def format_table(results: list[CheckResult]) -> str:
    width = max([len("check"), *(len(r.name) for r in results)])
    lines = [f"{'check':<{width}}  {'':4}  {'s':>4}  detail"]
    lines += [f"{r.name:<{width}}  {'PASS' if r.passed else 'FAIL'}  {r.seconds:4.1f}  {r.detail}" for r in results]
    return "\n".join(lines)


def print_table(report: Report) -> None:
    verdict = "passed" if report.passed else f"FAILED ({len(report.failed)} of {len(report.results)})"
    timings = ", ".join(f"{name.removeprefix('check: ')} {seconds:.1f} s" for name, seconds in report.timings.items())
    print(f"{format_table(report.results)}\noffline check of {report.image}: {verdict} ({timings})",
          file=sys.stderr, flush=True)


def write_json(report: Report) -> None:
    """Write check.json whole or not at all: a reader never sees half a report."""
    atomic.write_json(report.json_path, report.to_json())
