"""The benchmark's summary: medians over runs, both build ratios, the image's release."""

import json
import threading

import pytest

from pipeline import bench
from pipeline import spec as specs
from pipeline.errors import PipelineError


def _run(build_s: float, dib_alone_s: float, plain_dib_s: float) -> dict:
    return {"stages_s": {"tree": build_s - 20, "relabel": 5.0}, "build_s": build_s, "dib_alone_s": dib_alone_s,
            "plain_dib_s": plain_dib_s, "qcow2_bytes": 160_000_000, "check_passed": True}


def test_the_summary_names_the_release_and_takes_medians_of_the_runs():
    catalog = specs.load()
    for name, release in (("guest-image", "trixie"), ("guest-image-bookworm", "bookworm")):
        summary = bench.summarize(catalog.get(name), [_run(200, 150, 160), _run(190, 140, 150), _run(300, 100, 100)])
        assert (summary["image"], summary["release"], summary["runs"]) == (name, release, 3)
        assert summary["median"]["build_s"] == 200 and summary["median_stages_s"]["tree"] == 180
        assert "check_passed" not in summary["median"]  # a verdict, not a figure
        assert (summary["ratio_build_to_dib_alone"], summary["ratio_build_to_plain_dib"]) == (1.43, 1.33)
        assert "check_s" not in summary["median"] and "all_checks_and_boot_tests_passed" not in summary


def test_the_table_states_issue_14s_targets_for_the_check_and_the_boots(capsys):
    run = {**_run(200, 150, 160), "dib_own_s": 150.0, "layer_save_s": 5.0, "after_dib_s": 15.0, "other_s": 3.0,
           "peak_memory_mib": 1400, "check_s": 16.0, "appliance_launch_s": 10.6, "boot_to_ssh_bios_s": 54.6,
           "boot_to_ssh_uefi_s": 55.6, "boot_test_s": 191.2, "virtual_bytes": 3 * 2**30,
           "largest_process_rss_mib": 200, "boot_test_passed": True}
    bench._print(bench.summarize(specs.load().get("guest-image"), [run]))
    lines = capsys.readouterr().out.splitlines()
    assert any(line.split() == ["check", "-", "launch", "(target", "<=", "5", "s)", "5.4", "s"] for line in lines)
    for firmware, seconds in (("BIOS", "54.6"), ("UEFI", "55.6")):
        assert any(line.split()[-5:] == ["<=", "60", "s)", seconds, "s"] and firmware in line for line in lines)


def test_the_task_runs_the_builds_alone_when_asked(monkeypatch, tmp_path):
    from invoke import Context

    import tasks

    calls = []
    monkeypatch.setattr(bench, "benchmark", lambda spec, output_dir, runs, builds_only=False:
                        calls.append((spec.name, runs, builds_only)))
    tasks.bench(Context(), "guest-image", output_dir=str(tmp_path), runs=3, builds_only=True)
    tasks.bench(Context(), "guest-image", output_dir=str(tmp_path))
    assert calls == [("guest-image", 3, True), ("guest-image", 1, False)]


def test_the_task_boots_the_built_image_when_asked(monkeypatch, tmp_path):
    from invoke import Context

    import tasks

    calls = []
    monkeypatch.setattr(bench, "boot_benchmark",
                        lambda spec, output_dir, runs, side_by_side: calls.append((spec.name, runs, side_by_side)))
    monkeypatch.setattr(bench, "benchmark", lambda *args, **kwargs: calls.append("build"))
    tasks.bench(Context(), "host-image", output_dir=str(tmp_path), runs=2, boots=True)
    tasks.bench(Context(), "host-image", output_dir=str(tmp_path), runs=1, boots=True, side_by_side="2")
    assert calls == [("host-image", 2, 1), ("host-image", 1, 2)]


def test_side_by_side_boots_start_together_and_count_in_the_medians(tmp_path, monkeypatch):
    """Two VMs a run boot at the same time (each waits until the other has started), and every
    one of them is in the report."""
    monkeypatch.setattr(bench.tools, "require", lambda *tools: None)
    monkeypatch.setattr(bench.artifacts.Artifacts, "read_info", lambda self: {"qcow2_sha256": "0" * 64})
    both_started = threading.Barrier(2, timeout=30)
    seconds = iter([50.0, 70.0, 60.0, 80.0])

    def boot(spec, qcow2, firmware, workdir):
        both_started.wait()  # BrokenBarrierError after 30 s, were they booted one after the other
        return {"boot_to_ssh_s": next(seconds), "systemd_analyze": "Startup finished"}

    monkeypatch.setattr(bench, "boot_run", boot)
    report = json.loads(bench.boot_benchmark(specs.load().get("guest-image"), tmp_path, 1, side_by_side=2).read_text())
    assert report["summary"]["side_by_side"] == 2
    assert sorted(report["summary"]["median_boot_to_ssh_s"].values()) == [60.0, 70.0]
    assert [len(found) for found in report["runs"].values()] == [2, 2]


def test_side_by_side_needs_at_least_one_vm(tmp_path, monkeypatch):
    monkeypatch.setattr(bench.tools, "require", lambda *tools: None)
    with pytest.raises(PipelineError, match=r"^--side-by-side 0: expected at least 1 VM at once$"):
        bench.boot_benchmark(specs.load().get("guest-image"), tmp_path, 1, side_by_side=0)


def test_boots_need_a_built_image(tmp_path, monkeypatch):
    monkeypatch.setattr(bench.tools, "require", lambda *tools: None)
    with pytest.raises(PipelineError, match=r"run \./inv build guest-image"):
        bench.boot_benchmark(specs.load().get("guest-image"), tmp_path, 1)
    assert not list(tmp_path.rglob("boots-*.json"))


def test_a_failed_boot_keeps_its_console_log_past_the_scratch_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(bench.tools, "require", lambda *tools: None)
    monkeypatch.setattr(bench.artifacts.Artifacts, "read_info", lambda self: {"qcow2_sha256": "0" * 64})

    def stalled_boot(spec, qcow2, firmware, workdir):
        workdir.mkdir(parents=True)
        (workdir / "console.log").write_text("Kernel panic - not syncing\n")
        raise PipelineError(f"{firmware} boot stalled; see {workdir / 'console.log'}")

    monkeypatch.setattr(bench, "boot_run", stalled_boot)
    with pytest.raises(PipelineError, match="boot stalled"):
        bench.boot_benchmark(specs.load().get("guest-image"), tmp_path, 1)
    [kept] = (tmp_path / "bench").glob("boots-guest-image-*-bios-1-failed")
    assert (kept / "console.log").read_text() == "Kernel panic - not syncing\n"


def test_rebuild_medians_print_as_measured_not_as_binary_floats():
    runs = [{"cold_s": 99.7, "no_change_s": 0.0, "element_change_s": 42.3, "element_change_ratio": 0.42,
             "check_passed": True},
            {"cold_s": 89.4, "no_change_s": 0.0, "element_change_s": 37.7, "element_change_ratio": 0.42,
             "check_passed": True}]
    summary = bench._rebuild_summary(runs)
    assert (summary["cold_s"], summary["element_change_s"], summary["ratio_of_medians"]) == (94.55, 40.0, 0.42)
    assert str(summary["cold_s"]) == "94.55"
