"""pipeline.workflow: the boot test's verdict, judged from pytest's JUnit XML and exit status
(the gateway faked: it writes the XML a real session would), and `inv ci`'s order, skipping and
stopping at the first failure (each step faked where it begins)."""

from __future__ import annotations

import json
import re
import subprocess
import threading
from pathlib import Path
from xml.sax.saxutils import quoteattr

import pytest
from invoke import Context, Exit

import tasks
from pipeline import build, check, publish, workflow
from pipeline import spec as specs
from pipeline.artifacts import BOOT_TEST, artifacts_for
from pipeline.check.report import CheckResult, Report
from pipeline.errors import PipelineError
from pipeline.paths import BOOT_TESTS, ROOT, SPEC_FILE
from pipeline.progress import Timings

QCOW2_SHA256 = "ab" * 32
FINAL = workflow.FINAL_CHECK


def junit(cases: list[tuple[str, str]]) -> str:
    """pytest's JUnit XML for these (test name, outcome) pairs; outcome: passed, failure, error, skipped."""
    body = "".join(f'<testcase classname="tests.integration.test_x" name={quoteattr(name)} time="1.0">'
                   + ("" if outcome == "passed" else f'<{outcome} message="no"/>') + "</testcase>"
                   for name, outcome in cases)
    return f'<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">{body}</testsuite></testsuites>'


ALL_PASSED_BOTH = [("test_ssh_ready[bios]", "passed"), ("test_ssh_ready[uefi]", "passed"),
                   (f"{FINAL}[bios]", "passed"), (f"{FINAL}[uefi]", "passed")]


def built(spec: specs.ImageSpec, output_dir: Path) -> None:
    art = artifacts_for(spec, output_dir)
    art.directory.mkdir(parents=True, exist_ok=True)
    art.info.write_text(json.dumps({"qcow2_sha256": QCOW2_SHA256}))


@pytest.fixture
def guest(tmp_path) -> specs.ImageSpec:
    spec = specs.load(SPEC_FILE).get("guest-image")
    built(spec, tmp_path)
    return spec


class Session:
    """The gateway faked as a pytest session: writes `xml` (unless None) to --junitxml, prints a
    line, and ends with `returncode`."""

    def __init__(self, xml: str | None, returncode: int):
        self.xml, self.returncode, self.calls = xml, returncode, []

    def run(self, argv, **kw):
        self.calls.append((argv, kw))
        if self.xml is not None:
            report = next(arg for arg in argv if arg.startswith("--junitxml="))
            Path(report.split("=", 1)[1]).write_text(self.xml)
        kw["on_line"]("tests/integration/test_boot.py ....")
        return subprocess.CompletedProcess(argv, self.returncode, "", "")


def boot_test(monkeypatch, spec, output_dir, xml, returncode=0, firmware="both", **kw):
    session = Session(xml, returncode)
    monkeypatch.setattr(workflow, "run", session.run)
    return workflow.boot_test(spec, output_dir, firmware, **kw), session


def written(spec, output_dir) -> dict:
    return json.loads(artifacts_for(spec, output_dir).boot_report.read_text())


def test_all_passed_on_every_firmware_is_a_verdict_publish_accepts(monkeypatch, guest, tmp_path):
    tested, session = boot_test(monkeypatch, guest, tmp_path, junit(ALL_PASSED_BOTH))
    verdict = written(guest, tmp_path)
    assert tested.passed and verdict == tested.verdict
    assert {key: verdict[key] for key in ("image", "passed", "qcow2_sha256", "firmwares", "tests", "failed")} == {
        "image": "guest-image", "passed": True, "qcow2_sha256": QCOW2_SHA256, "firmwares": ["bios", "uefi"],
        "tests": 4, "failed": 0}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", verdict["finished"])
    assert artifacts_for(guest, tmp_path).passed(BOOT_TEST)  # the rule publish applies
    argv, kw = session.calls[0]
    assert argv[1:] == ["-m", "pytest", "-m", "image", *BOOT_TESTS, "--use-built", "--image=guest-image",
                        f"--output-dir={tmp_path}", f"--spec-file={guest.source}", "--firmware=both", argv[-1]]
    assert kw["cwd"] == ROOT and kw["check"] is False
    assert kw["log"] == tested.log and tested.log.parent == artifacts_for(guest, tmp_path).logs
    assert not Path(argv[-1].split("=", 1)[1]).exists()  # the XML was temporary


@pytest.mark.parametrize("outcome", ["failure", "error"])
def test_one_failed_test_fails_the_verdict(monkeypatch, guest, tmp_path, outcome):
    cases = [("test_ssh_ready[bios]", outcome), *ALL_PASSED_BOTH[1:]]
    tested, _ = boot_test(monkeypatch, guest, tmp_path, junit(cases), returncode=1)
    assert not tested.passed
    assert written(guest, tmp_path) | {"finished": None} == {
        "image": "guest-image", "passed": False, "qcow2_sha256": QCOW2_SHA256, "firmwares": ["bios", "uefi"],
        "tests": 4, "failed": 1, "finished": None}
    assert not artifacts_for(guest, tmp_path).passed(BOOT_TEST)


@pytest.mark.parametrize("reboot, option", [(True, []), (False, ["--no-reboot"])])
def test_a_boot_test_without_reboot_asks_pytest_to_skip_it(monkeypatch, guest, tmp_path, reboot, option):
    _, session = boot_test(monkeypatch, guest, tmp_path, junit(ALL_PASSED_BOTH), reboot=reboot)
    argv, _ = session.calls[0]
    assert [arg for arg in argv if arg == "--no-reboot"] == option


def test_a_failed_boot_test_prints_the_end_of_each_kept_console(monkeypatch, guest, tmp_path, capsys):
    """A guest that stopped answering mid-session leaves its last words on the console: CI,
    which keeps only the end of the output, shows them."""
    console = artifacts_for(guest, tmp_path).boot_workdir("bios") / "console.log"
    console.parent.mkdir(parents=True)
    console.write_text("early line\r\n" + "".join(f"line {n}\r\n" for n in range(40)) + "\x1b[0mrcu: INFO stall\r\n")
    cases = [("test_ssh_ready[bios]", "failure"), *ALL_PASSED_BOTH[1:]]
    boot_test(monkeypatch, guest, tmp_path, junit(cases), returncode=1)
    printed = capsys.readouterr().err
    assert f"{console}'s last lines: line 16 | " in printed and "line 39 | rcu: INFO stall" in printed
    assert "early line" not in printed and "line 15 " not in printed


def test_a_passed_boot_test_prints_no_console(monkeypatch, guest, tmp_path, capsys):
    console = artifacts_for(guest, tmp_path).boot_workdir("bios") / "console.log"
    console.parent.mkdir(parents=True)
    console.write_text("booted\r\n")
    boot_test(monkeypatch, guest, tmp_path, junit(ALL_PASSED_BOTH))
    assert "last lines" not in capsys.readouterr().err


@pytest.mark.parametrize("final_uefi", [None, "skipped"], ids=["missing", "skipped"])
def test_final_check_not_passed_on_one_firmware_fails_the_verdict(monkeypatch, guest, tmp_path, final_uefi):
    """pytest exits 0 when the denial check was never collected (or skipped) for one firmware:
    the verdict still fails."""
    cases = ALL_PASSED_BOTH[:3] + ([(f"{FINAL}[uefi]", final_uefi)] if final_uefi else [])
    tested, _ = boot_test(monkeypatch, guest, tmp_path, junit(cases), returncode=0)
    verdict = written(guest, tmp_path)
    assert not tested.passed and verdict["passed"] is False and verdict["failed"] == 0


def test_final_check_of_the_one_firmware_asked_is_enough(monkeypatch, guest, tmp_path):
    cases = [("test_ssh_ready[uefi]", "passed"), (f"{FINAL}[uefi]", "passed")]
    tested, _ = boot_test(monkeypatch, guest, tmp_path, junit(cases), firmware="uefi")
    assert tested.passed and written(guest, tmp_path)["firmwares"] == ["uefi"]


@pytest.mark.parametrize("xml, returncode", [(None, -9), ("<testsuites><testsuite", 2), (junit(ALL_PASSED_BOTH), 2)],
                         ids=["no XML", "half-written XML", "non-zero exit"])
def test_crashed_or_interrupted_pytest_fails_the_verdict(monkeypatch, guest, tmp_path, xml, returncode):
    tested, _ = boot_test(monkeypatch, guest, tmp_path, xml, returncode=returncode)
    verdict = written(guest, tmp_path)
    assert not tested.passed and verdict["passed"] is False and verdict["qcow2_sha256"] == QCOW2_SHA256
    if xml is None or xml.endswith("<testsuite"):
        assert (verdict["tests"], verdict["failed"]) == (0, 0)


def test_a_verdict_from_before_is_replaced_by_a_failing_one(monkeypatch, guest, tmp_path):
    boot_test(monkeypatch, guest, tmp_path, junit(ALL_PASSED_BOTH))
    boot_test(monkeypatch, guest, tmp_path, None, returncode=1)
    assert not artifacts_for(guest, tmp_path).passed(BOOT_TEST)


def test_an_image_never_built_is_refused_before_any_boot(monkeypatch, tmp_path):
    spec = specs.load(SPEC_FILE).get("host-image")
    with pytest.raises(PipelineError, match=r"host-image has not been built: run \./inv build host-image"):
        boot_test(monkeypatch, spec, tmp_path, junit(ALL_PASSED_BOTH))
    assert not artifacts_for(spec, tmp_path).boot_report.exists()


def test_boot_session_runs_its_own_files_on_the_built_image(monkeypatch, guest, tmp_path):
    tested, session = boot_test(monkeypatch, guest, tmp_path, junit(ALL_PASSED_BOTH),
                                tests=["a/test_build.py", "a/test_zz_final.py"])
    argv, _ = session.calls[0]
    assert tested.passed and argv[5:8] == ["a/test_build.py", "a/test_zz_final.py", "--use-built"]


def test_image_tests_run_on_the_built_image_and_a_failure_names_the_log(monkeypatch, guest, tmp_path):
    session = Session(None, 0)
    monkeypatch.setattr(workflow, "run", session.run)
    workflow.image_tests(guest, tmp_path, ["a/test_deploy.py"])
    argv, options = session.calls[0]
    assert argv[5:7] == ["a/test_deploy.py", "--use-built"] and "--junitxml" not in " ".join(argv)
    assert options["log"].name.startswith("tests-") and options["log"].parent == artifacts_for(guest, tmp_path).logs
    monkeypatch.setattr(workflow, "run", Session(None, 1).run)
    with pytest.raises(PipelineError, match=r"image tests of guest-image failed: see .*/guest-image/logs/tests-"):
        workflow.image_tests(guest, tmp_path, ["a/test_deploy.py"])
    assert not artifacts_for(guest, tmp_path).boot_report.exists()  # only a boot session writes a verdict


def test_boot_test_task_fails_naming_the_log(monkeypatch, guest, tmp_path):
    monkeypatch.setattr(workflow, "run", Session(junit([(f"{FINAL}[bios]", "failure")]), 1).run)
    log = r".*/guest-image/logs/boot-test-.+\.log"
    with pytest.raises(Exit, match=f"error: boot test of guest-image failed: see {log}"):
        tasks.boot_test(Context(), "guest-image", output_dir=str(tmp_path), firmware="bios")


@pytest.mark.parametrize("choice", ["BIOS", "efi", "", "both "])
def test_unknown_firmware_is_refused(choice):
    with pytest.raises(PipelineError, match=f"--firmware is bios, uefi or both, not {re.escape(repr(choice))}"):
        workflow.firmwares(choice)


def test_the_final_check_is_the_last_boot_tests_denial_check():
    """The verdict looks for FINAL_CHECK by name: a rename there must fail here, not pass every verdict by."""
    final = Path(BOOT_TESTS[-1])
    assert final.name == "test_zz_final.py"
    assert re.search(rf"^def {FINAL}\(", final.read_text(), re.MULTILINE)


# --- inv ci


@pytest.fixture
def steps(monkeypatch, tmp_path):
    """Every step of ci faked where it begins, recorded in order; the boot test runs for real
    over a faked pytest session."""
    done: list[tuple[str, str]] = []
    fail: set[tuple[str, str]] = set()

    def fake_build(spec, output_dir, cache_dir, force=False):
        done.append(("build", spec.name))
        if ("build", spec.name) in fail:
            raise PipelineError(f"{spec.name}: mirror unreachable")
        built(spec, output_dir)
        return build.BuildResult(artifacts_for(spec, output_dir), built=True, timings=Timings({"tree": 1.0}))

    def fake_check(spec, output_dir):
        done.append(("check", spec.name))
        art = artifacts_for(spec, output_dir)
        passed = ("check", spec.name) not in fail
        return Report(spec.name, art.qcow2, art.check_report, [CheckResult("fstab", passed, "")])

    def fake_pytest(argv, **kw):
        image = next(arg for arg in argv if arg.startswith("--image=")).split("=", 1)[1]
        done.append(("boot", image))
        outcome = "failure" if ("boot", image) in fail else "passed"
        return Session(junit([(f"{FINAL}[bios]", outcome), (f"{FINAL}[uefi]", outcome)]),
                       int(outcome != "passed")).run(argv, **kw)

    monkeypatch.setattr(publish, "require_key", lambda key, home=None: done.append(("key", key)) or "FPR")
    monkeypatch.setattr(build, "build", fake_build)
    monkeypatch.setattr(check, "check_image", fake_check)
    monkeypatch.setattr(workflow, "run", fake_pytest)
    monkeypatch.setattr(publish, "publish", lambda directory, name, target, **kw: done.append(("publish", name))
                        or publish.Published(name, "20261125-00000000", str(target), True, ()))
    return done, fail


def ci(tmp_path, key="ops@example.org", **kw):
    tasks.ci(Context(), key=key, output_dir=str(tmp_path), **kw)


def test_every_image_is_built_checked_booted_and_published_in_order(steps, tmp_path):
    done, _ = steps
    ci(tmp_path)
    every_step = [(step, name) for name in ("host-image", "guest-image", "host-image-bookworm", "guest-image-bookworm")
                  for step in ("build", "check", "boot", "publish")]
    assert done == [("key", "ops@example.org"), *every_step,
                    ("build", "installer")]  # a netboot image: nothing to check, boot or publish
    assert written(specs.load(SPEC_FILE).get("host-image"), tmp_path)["firmwares"] == ["uefi"]


def test_image_runs_only_the_named_images_in_the_spec_files_order(steps, tmp_path):
    done, _ = steps
    ci(tmp_path, image=["guest-image", "host-image"])
    assert [step for step in done if step[0] == "build"] == [("build", "host-image"), ("build", "guest-image")]


def test_an_unknown_image_is_refused_before_the_key_is_asked_for(steps, tmp_path):
    done, _ = steps
    with pytest.raises(Exit, match=r"^error: .*images.toml: unknown image 'no-such-image'; known images: "):
        ci(tmp_path, image=["no-such-image"])
    assert done == []


def test_boot_test_that_passed_on_this_artifact_is_not_run_again(steps, monkeypatch, tmp_path):
    done, _ = steps
    ci(tmp_path)
    done.clear()
    def up_to_date(spec, output_dir, cache_dir, force=False):
        done.append(("build", spec.name))
        return build.BuildResult(artifacts_for(spec, output_dir), built=False)

    monkeypatch.setattr(build, "build", up_to_date)
    ci(tmp_path)
    assert ("boot", "host-image") not in done and ("check", "host-image") not in done
    assert ("publish", "host-image") in done and ("publish", "guest-image") in done


@pytest.mark.parametrize("failing, message", [
    (("build", "host-image"), "host-image: mirror unreachable"),
    (("check", "host-image"), "offline check of host-image failed: see .*/host-image/check.json"),
    (("boot", "host-image"), "boot test of host-image failed: not published"),
])
def test_first_failure_stops_everything_after_it(steps, tmp_path, failing, message):
    done, fail = steps
    fail.add(failing)
    with pytest.raises(Exit, match=f"^error: {message}$"):
        ci(tmp_path)
    assert done[-1] == failing  # nothing after it: not this image's publish, not the next image's build


def test_missing_key_fails_before_any_build(monkeypatch, tmp_path):
    called = []
    monkeypatch.setattr(build, "build", lambda *a, **k: called.append(a))
    with pytest.raises(Exit, match="no signing key given"):
        tasks.ci(Context(), key=None, gnupg_home=str(tmp_path / "empty"), output_dir=str(tmp_path))
    assert called == []


# --- ./inv test: the order of its sessions, and the builds beside the first one


def test_later_images_are_built_while_the_first_session_runs(monkeypatch):
    """The first image is built beside the unit tests, then its session runs while the later
    sessions' images (and the installer) are built one after another. Then two lanes run side by
    side: the host's deploy and bookworm's host boot, and the host's boot, bookworm's guest boot,
    the guest's rebuilds and the host's publishing. The waits make this test fail on a timeout if
    any pair ran one after the other."""
    events: list[str] = []
    building_later, second_lane_started = threading.Event(), threading.Event()
    unit_tests_running, building_first = threading.Event(), threading.Event()

    def unit_tests():
        unit_tests_running.set()
        assert building_first.wait(timeout=5), "the first image was not built beside the unit tests"
        events.append("unit tests")

    def fake_build(spec, output_dir, cache_dir, **options):
        if spec.name == "guest-image":
            building_first.set()
            assert unit_tests_running.wait(timeout=5), "the unit tests did not run beside the first build"
        events.append(f"build {spec.name}")
        if spec.name != "guest-image":
            building_later.set()

    def boot(spec, output_dir, firmware, tests, reboot):
        if reboot:
            events.append(f"reboot {spec.name}")
        if spec.name == "guest-image" and firmware == "both":
            assert building_later.wait(timeout=5), "the later images were not built beside the first session"
        if spec.name == "host-image":
            second_lane_started.set()
        events.append(f"boot {spec.name}")
        return workflow.BootTestRun({"passed": True}, Path("log"))

    def image_tests(spec, output_dir, tests):
        if Path(tests[0]).name == "test_deploy.py":
            assert second_lane_started.wait(timeout=5), "the second lane did not run beside the first"
        events.append(f"tests {spec.name} {Path(tests[0]).name}")

    monkeypatch.setattr(tasks, "lint", lambda c: None)
    monkeypatch.setattr(tasks, "_pytest", lambda c, args: None)
    monkeypatch.setattr(tasks, "_unit_tests", unit_tests)
    monkeypatch.setattr(build, "build", fake_build)
    monkeypatch.setattr(workflow, "boot_test", boot)
    monkeypatch.setattr(workflow, "image_tests", image_tests)
    tasks.test(Context())
    assert "unit tests" in events[:2]
    builds = [e for e in events if e.startswith("build")]
    assert builds == ["build guest-image", "build host-image", "build host-image-bookworm",
                      "build guest-image-bookworm", "build installer"]
    # No lane starts before the first session and the last build have ended.
    sessions = [e for e in events[max(events.index("boot guest-image"), events.index("build installer")) + 1:]
                if not e.startswith("reboot")]
    first_lane = ["tests host-image test_deploy.py", "boot host-image-bookworm"]
    second_lane = ["boot host-image", "boot guest-image-bookworm", "tests guest-image test_everyday.py",
                   "tests host-image test_publish_image.py"]
    assert sorted(sessions) == sorted(first_lane + second_lane)
    assert [e for e in sessions if e in first_lane] == first_lane
    assert [e for e in sessions if e in second_lane] == second_lane
    # One host and one guest, one of each release, reboot; both in the second lane.
    assert [e for e in events if e.startswith("reboot")] == ["reboot host-image", "reboot guest-image-bookworm"]


def test_an_image_without_tests_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(tasks, "lint", lambda c: None)
    monkeypatch.setattr(tasks, "_pytest", lambda c, args: None)
    with pytest.raises(Exit, match=r"^error: --image installer: no image tests; the images with tests are "
                                   r"guest-image, host-image, host-image-bookworm, guest-image-bookworm$"):
        tasks.test(Context(), image="installer")


def test_list_aligns_its_columns_to_the_longest_name(capsys):
    tasks.list_(Context())
    rows = capsys.readouterr().out.splitlines()
    names = specs.load(SPEC_FILE).images
    assert [row[2:].split()[0] for row in rows] == list(names)
    # Each row's release starts in the same column, whatever the length of its name.
    assert len({row.index(f" {names[row[2:].split()[0]].release} ") for row in rows}) == 1
    assert rows[0].startswith("* host-image ")


def test_every_publish_session_follows_its_images_boot_session_in_the_same_lane():
    """Publishing needs the boot-test verdict: the lanes run side by side, so the session that
    boots the image must be the first session or come earlier in the publish session's lane."""
    first, *first_lane = tasks.IMAGE_TEST_RUNS
    for lane in (first_lane, list(tasks.SECOND_LANE_TEST_RUNS)):
        booted = {first[0]} if first[1] else set()
        for name, firmware, files in lane:
            if any(f.startswith("test_publish") for f in files):
                assert name in booted, f"{name} is published before a session of its lane boots it"
            if firmware:
                booted.add(name)


def test_the_second_lane_starts_once_the_images_are_built_and_waits_for_the_first_sessions_image(monkeypatch):
    """./inv test's schedule, with builds and sessions that only note when they start and end:
    every later image is built before any lane's session starts; a session of the first session's
    image (the guest's rebuilds) starts after the first session ends; the second lane starts
    before the first session ends (its builds are done first), and each lane keeps its order."""
    events: list[tuple[str, str]] = []
    lock = threading.Lock()
    second_lane_started = threading.Event()

    def note(what: str, name: str) -> None:
        with lock:
            events.append((what, name))

    def fake_build(spec, output, cache):
        note("built", spec.name)

    def fake_session(name, firmware, files):
        key = f"{name} {firmware} {files[0]}"
        note("start", key)
        if (name, firmware, files) == tasks.SECOND_LANE_TEST_RUNS[0]:
            second_lane_started.set()
        if (name, firmware, files) == tasks.IMAGE_TEST_RUNS[0]:
            second_lane_started.wait(timeout=30)  # in vain, were the lanes to start only after it
        note("end", key)

    monkeypatch.setattr(tasks, "lint", lambda c: None)
    monkeypatch.setattr(tasks, "_unit_tests", lambda: None)
    monkeypatch.setattr(build, "build", fake_build)
    monkeypatch.setattr(tasks, "_image_session", fake_session)
    monkeypatch.delenv("PIPELINE_VM_CPUS", raising=False)
    tasks.test(Context())
    monkeypatch.delenv("PIPELINE_VM_CPUS", raising=False)  # tasks.test set it for its sessions

    def at(what: str, key: str) -> int:
        return events.index((what, key))

    def key(session) -> str:
        return f"{session[0]} {session[1]} {session[2][0]}"

    first, *lane_one = tasks.IMAGE_TEST_RUNS
    lane_two = list(tasks.SECOND_LANE_TEST_RUNS)
    last_build = max(i for i, (what, _) in enumerate(events) if what == "built")
    assert [name for what, name in events if what == "built"][-1] == "installer"
    for session in lane_one + lane_two:
        assert at("start", key(session)) > last_build
        if session[0] == first[0]:
            assert at("start", key(session)) > at("end", key(first))
    assert at("start", key(lane_two[0])) < at("end", key(first))
    for lane in (lane_one, lane_two):
        starts = [at("start", key(session)) for session in lane]
        assert starts == sorted(starts)
    assert at("start", key(lane_one[0])) > at("end", key(first))
