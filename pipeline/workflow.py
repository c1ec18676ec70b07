"""The pipeline's sequences over its steps (kiwi's tasks over a core): build then check, the boot
test and the verdict it writes, and what CI runs. tasks.py parses arguments and calls these.

The boot test's verdict, build/NAME/boot-test.json, is what `./inv publish` requires. It is
written here, from the boot tests' JUnit XML and pytest's exit status: passed only if every
test passed and the final SELinux-denial check (FINAL_CHECK, in tests/integration/test_zz_final.py)
ran and passed on every firmware asked for.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import atomic
from .artifacts import BOOT_TEST, artifacts_for
from .errors import PipelineError
from .paths import BOOT_TESTS, ROOT
from .progress import echo, say, step
from .qemu import Firmware, console_tail
from .run import run
from .spec import ImageSpec

FINAL_CHECK = "test_no_avc_denials_since_boot"
_FINAL_CHECK_CASE = re.compile(rf"{FINAL_CHECK}\[(?P<firmware>[a-z]+)\]")
FIRMWARE_CHOICES = ("both", *Firmware)
FAILED_CONSOLE_TAIL = 25  # console lines printed after a failed boot test


def firmwares(choice: str) -> list[Firmware]:
    """The firmwares that --firmware names: bios, uefi, or both."""
    if choice not in FIRMWARE_CHOICES:
        raise PipelineError(f"--firmware is bios, uefi or both, not {choice!r}")
    return list(Firmware) if choice == "both" else [Firmware(choice)]


def check(spec: ImageSpec, output_dir: Path) -> None:
    """The offline check of a built image; a PipelineError naming its report if it fails."""
    from .check import check_image  # libguestfs: loaded only by what checks

    report = check_image(spec, output_dir)
    if not report.passed:
        raise PipelineError(f"offline check of {spec.name} failed: see {report.json_path}")


def build(spec: ImageSpec, output_dir: Path, cache_dir: Path, *, force: bool = False, check_after: bool = True) -> bool:
    """Build the image unless it is up to date, then check it offline if it was built (a netboot
    image has no disk to check). True if it was built."""
    from . import build as builder

    built = builder.build(spec, output_dir, cache_dir, force=force).built
    if built and check_after and not spec.is_netboot:
        check(spec, output_dir)
    return built


@dataclass(frozen=True)
class TestOutcome:
    """What one pytest session's JUnit XML says."""

    tests: int
    failed: int  # failed or errored (setup or teardown included)
    final_check_passed: frozenset[str]  # the firmwares FINAL_CHECK passed on


def read_junit(path: Path) -> TestOutcome | None:
    """The outcome in pytest's JUnit XML; None when there is none to read (pytest crashed or was
    stopped before it wrote the file, or left it half-written)."""
    try:
        root = ElementTree.parse(path).getroot()
    except (FileNotFoundError, ElementTree.ParseError):
        return None
    cases = list(root.iter("testcase"))

    def passed(case: ElementTree.Element) -> bool:
        return not any(case.find(outcome) is not None for outcome in ("failure", "error", "skipped"))

    failed = sum(1 for case in cases if case.find("failure") is not None or case.find("error") is not None)
    final = frozenset(match["firmware"] for case in cases
                      if (match := _FINAL_CHECK_CASE.fullmatch(case.get("name", ""))) and passed(case))
    return TestOutcome(tests=len(cases), failed=failed, final_check_passed=final)


def verdict(image: str, qcow2_sha256: str | None, asked: Sequence[Firmware], outcome: TestOutcome | None,
            returncode: int) -> dict[str, Any]:
    """The boot test's verdict (boot-test.json): passed only if pytest exited 0, no test failed,
    and FINAL_CHECK passed on every firmware asked for."""
    report = outcome or TestOutcome(tests=0, failed=0, final_check_passed=frozenset())
    passed = (outcome is not None and returncode == 0 and report.failed == 0
              and {str(f) for f in asked} <= report.final_check_passed)
    return {"image": image, "passed": passed, "qcow2_sha256": qcow2_sha256,
            "firmwares": sorted(str(f) for f in asked), "tests": report.tests, "failed": report.failed,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


@dataclass(frozen=True)
class BootTestRun:
    verdict: dict[str, Any]  # as written to boot-test.json
    log: Path  # pytest's output

    @property
    def passed(self) -> bool:
        return self.verdict["passed"] is True


def boot_test(spec: ImageSpec, output_dir: Path, firmware: str = "both", *,
              tests: Sequence[str] = BOOT_TESTS, reboot: bool = True) -> BootTestRun:
    """Run the boot tests (pytest, tests/integration) on the image, by each firmware asked for,
    then write their verdict to build/NAME/boot-test.json and return it with the log. The tests ending with
    test_zz_final.py (FINAL_CHECK) is what makes a session a boot test: `./inv test` runs its
    boot sessions, which also run more tests, through here, on the image it has just built.
    pytest's output goes to the terminal and to build/NAME/logs/boot-test-TIME.log. Without
    REBOOT, the reboot test is skipped."""
    asked = firmwares(firmware)
    art = artifacts_for(spec, output_dir)
    art.read_info()  # a clear error, before any boot, if it was never built
    with tempfile.TemporaryDirectory(prefix="boot-test-") as scratch:
        junit = Path(scratch) / "junit.xml"
        with step(f"boot test of {spec.name} ({', '.join(asked)})"):
            result, log = _pytest_session(spec, output_dir, "boot-test", tests,
                                          options=[f"--firmware={firmware}", f"--junitxml={junit}",
                                                   *([] if reboot else ["--no-reboot"])])
        outcome = read_junit(junit)
    judged = verdict(spec.name, art.read_info().get("qcow2_sha256"), asked, outcome, result.returncode)
    atomic.write_json(art.boot_report, judged)
    say(f"boot test of {spec.name}: {'passed' if judged['passed'] else 'failed'} "
        f"({judged['failed']} of {judged['tests']} tests failed); verdict in {art.boot_report}")
    if not judged["passed"]:
        _say_console_tails(art.boot_workdir(firmware) / "console.log" for firmware in asked)
    return BootTestRun(judged, log)


def _say_console_tails(consoles: Iterable[Path], lines: int = FAILED_CONSOLE_TAIL) -> None:
    """The last lines of each kept console log: a guest that stopped answering (a kernel
    message, a hang) shows there, and CI keeps only the end of the output."""
    for console in consoles:
        if console.exists():
            tail = console_tail(console.read_bytes()[-16384:].decode(errors="replace"), lines)
            say(f"{console}'s last lines: {tail}")


def image_tests(spec: ImageSpec, output_dir: Path, tests: Sequence[str]) -> None:
    """Run image tests that boot nothing of the image's own (rebuild, deploy, publish) on its
    build; pytest's output goes to the terminal and to build/NAME/logs/tests-TIME.log."""
    artifacts_for(spec, output_dir).read_info()  # a clear error if it was never built
    result, log = _pytest_session(spec, output_dir, "tests", tests)
    if result.returncode != 0:
        raise PipelineError(f"image tests of {spec.name} failed: see {log}")


def _pytest_session(spec: ImageSpec, output_dir: Path, kind: str, tests: Sequence[str], options: Sequence[str] = ()):
    """pytest over TESTS on the image: (the finished process, its log build/NAME/logs/KIND-TIME.log)."""
    logs = artifacts_for(spec, output_dir).logs
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    arguments = ["-m", "image", *tests, "--use-built", f"--image={spec.name}", f"--output-dir={output_dir}",
                 f"--spec-file={spec.source}", *options]
    say(f"pytest's output is also in {log}")
    return _pytest(arguments, log, check=False), log


def unit_tests(output_dir: Path) -> None:
    """tests/unit, their output also in OUTPUT_DIR/logs/unit-tests-TIME.log; run through the
    gateway, so a concurrent step that fails stops them."""
    log = Path(output_dir) / "logs" / f"unit-tests-{time.strftime('%Y%m%d-%H%M%S')}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    _pytest(["tests/unit"], log)


def _pytest(arguments: Sequence[str], log: Path, check: bool = True):
    # pytest is our own test session: it sees the environment ./inv was given (the cache
    # and libguestfs settings), and its commands go through this gateway's clean one.
    environment = {key: value for key, value in os.environ.items() if key != "PATH"}
    return run([sys.executable, "-m", "pytest", *arguments], cwd=ROOT, env=environment, log=log, on_line=echo,
               check=check)


def ci(spec_file: Path, output_dir: Path, cache_dir: Path, *, target: str, key: str | None,
       gnupg_home: Path | None, retention: int, ssh_options: Sequence[str], force: bool = False,
       images: Sequence[str] = ()) -> None:
    """What CI runs: for every image of the spec file (or those named in `images`), in the spec
    file's order, build it (skipped when up to date), check it offline, boot-test it (skipped when it
    passed on this very artifact) and publish it, printing where each went. Stops at the first
    failure; an image is published only after all of its steps passed. A netboot image (the
    installer) is built only: the deploy test proves it."""
    from . import publish as publisher
    from . import spec as specs

    spec_set = specs.load(spec_file)
    named = {spec_set.get(name).name for name in images}  # an unknown name: one line, before any work
    publisher.require_key(key, gnupg_home)  # fail before hours of work
    for spec in (spec for spec in spec_set.images.values() if not named or spec.name in named):
        with step(f"ci: {spec.name}"):
            build(spec, output_dir, cache_dir, force=force)
            if spec.is_netboot:
                say(f"{spec.name} is a netboot image (the installer): proven by the deploy test, not published")
                continue
            art = artifacts_for(spec, output_dir)
            if art.passed(BOOT_TEST):
                say(f"boot test already passed on this {art.qcow2.name}")
            elif not boot_test(spec, output_dir, "uefi" if spec.is_kvm_host else "both").passed:
                raise PipelineError(f"boot test of {spec.name} failed: not published")
            result = publisher.publish(art.directory, spec.name, target, key=key, gnupg_home=gnupg_home,
                                       retention=retention, ssh_options=list(ssh_options))
            print(result.location)
