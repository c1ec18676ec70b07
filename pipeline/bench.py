"""Benchmark: each stage's wall time, peak memory and image size, against
diskimage-builder alone building the same elements, in the same run.

Machines here are shared and noisy: runs alternate the two builders, every
build is cold (a fresh download cache each time), and medians are reported.
"""

from __future__ import annotations

import functools
import json
import resource
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from . import artifacts, build, check, inputs, qemu, testvm, tools, workflow
from .errors import PipelineError
from .progress import say, step
from .run import concurrently, run
from .spec import ImageSpec


class MemorySampler:
    """Peak system memory in use above the level at start (DIB keeps its tree in tmpfs,
    which no process RSS shows), sampled twice a second."""

    def __init__(self):
        self.baseline = self._used()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def _used() -> int:
        return build.meminfo("MemTotal") - build.meminfo("MemAvailable")

    def _sample(self):
        while not self._stop.wait(0.5):
            self.peak = max(self.peak, self._used() - self.baseline)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _timed_tree(spec: ImageSpec, work: Path, cache: Path, make_tree) -> float:
    """Seconds to compile the policy modules and have DIB make the tree (the same modules go into
    the same tree), in a work directory of its own, cleaned up after."""
    ctx = build.BuildContext(spec=spec, artifacts=artifacts.artifacts_for(spec, work), cache_dir=cache,
                             work=work / "dib", log=work / "dib.log", profile_dirs=build.profile_chain(spec, cache))
    ctx.work.mkdir(parents=True)
    started = time.monotonic()
    try:
        build.compile_policy(ctx)
        make_tree(ctx)
    finally:
        build.cleanup(ctx.work)
    return time.monotonic() - started


def dib_alone(spec: ImageSpec, work: Path, cache: Path) -> float:
    """The same tree from disk-image-create alone (-t tar: its disk formats need kpartx), in the
    pipeline's environment, without the pipeline's steps around it (no package layer either)."""
    return _timed_tree(spec, work, cache, build.build_tree)


# What a user of diskimage-builder sets to build these elements: the release, the mirrors, and the
# inputs our elements read (profile, policy, bridges); none of the pipeline's own environment.
# DIB_IMAGE_CACHE is an empty directory, as on a first run; TMPDIR is where cleanup looks.
PLAIN_DIB_ENVIRONMENT = ("ELEMENTS_PATH", "DIB_RELEASE", "DIB_DISTRIBUTION_MIRROR", "DIB_DEBIAN_SECURITY_MIRROR",
                         "DIB_TUNED_PROFILE", "DIB_TUNED_PROFILES_DIR", "DIB_SELINUX_MODE", "DIB_SELINUX_MODULES_DIR",
                         "DIB_OVS_BRIDGES", "DIB_INSTALLER_PACKAGES", "DIB_IMAGE_CACHE", "TMPDIR")


def _plain_tree(ctx: build.BuildContext) -> None:
    (ctx.work / "tmp").mkdir()
    environment = {k: v for k, v in build.dib_environment(ctx).items() if k in PLAIN_DIB_ENVIRONMENT}
    run([tools.venv_tool("disk-image-create"), "-n", "-a", "amd64", "-t", "tar", "-o", ctx.work / ctx.spec.name,
         *inputs.dib_elements(ctx.spec, pipeline_elements=False),
         *(["-p", ",".join(ctx.spec.packages)] if ctx.spec.packages else [])], env=environment, log=ctx.log)


def plain_dib(spec: ImageSpec, work: Path, cache: Path) -> float:
    """`disk-image-create -t tar` as a user runs it: the spec's elements, DIB's own environment but
    for PLAIN_DIB_ENVIRONMENT, none of the pipeline's elements."""
    return _timed_tree(spec, work, cache, _plain_tree)


def one_run(spec: ImageSpec, scratch: Path, index: int, builds_only: bool = False) -> dict:
    result: dict = {}
    with tempfile.TemporaryDirectory(dir=scratch) as cache, step(f"run {index}: diskimage-builder alone (cold)"):
        result["dib_alone_s"] = round(dib_alone(spec, scratch / f"alone-{index}", Path(cache)), 1)
    with tempfile.TemporaryDirectory(dir=scratch) as cache, step(f"run {index}: plain disk-image-create (cold)"):
        result["plain_dib_s"] = round(plain_dib(spec, scratch / f"plain-{index}", Path(cache)), 1)
    with tempfile.TemporaryDirectory(dir=scratch) as cache, MemorySampler() as memory:
        out = scratch / f"out-{index}"
        started = time.monotonic()
        with step(f"run {index}: pipeline build (cold)"):
            built = build.build(spec, out, Path(cache))
        art, timings = built.artifacts, built.timings
        result["build_s"] = round(time.monotonic() - started, 1)
    result["stages_s"] = timings.seconds
    result |= pipeline_adds(timings.seconds, result["build_s"])
    result["peak_memory_mib"] = round(memory.peak / 2**20)
    result["largest_process_rss_mib"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
    result["qcow2_bytes"] = art.qcow2.stat().st_size
    if builds_only:
        shutil.rmtree(out, ignore_errors=True)
        return result
    with step(f"run {index}: offline check"):
        started = time.monotonic()
        report = check.check_image(spec, out)
        result["check_s"] = round(time.monotonic() - started, 1)
        result["check_passed"] = report.passed
    result["appliance_launch_s"] = report.timings["check: launch appliance"]
    info = json.loads(run(["qemu-img", "info", "--output=json", art.qcow2], capture=True).stdout)
    result["virtual_bytes"] = info["virtual-size"]
    for firmware in qemu.Firmware:
        with step(f"run {index}: boot to SSH ({firmware})"):
            vm = testvm.boot_spec(spec, art.qcow2, firmware, out / f"boot-{firmware}")
            vm.stop()
        result[f"boot_to_ssh_{firmware}_s"] = vm.boot_seconds
    result["accelerator"] = qemu.accelerator()[0]
    with step(f"run {index}: boot test ({BOOT_TEST_FIRMWARE}, testinfra)"):
        started = time.monotonic()
        passed = run_boot_test(spec, out)
        result["boot_test_s"] = round(time.monotonic() - started, 1)
        result["boot_test_passed"] = passed
    shutil.rmtree(out, ignore_errors=True)
    return result


def pipeline_adds(stages: dict[str, float], build_s: float) -> dict[str, float]:
    """What the pipeline spends beyond DIB's own work, wall time: the package layer's save (inside
    the tree stage, from DIB's profile), the steps after DIB, and the rest (preflight, hashing,
    moving into place)."""
    top = [name for name, _ in build.STEPS]
    after_dib = top[top.index("tree") + 1:]
    layer_save = sum(seconds for name, seconds in stages.items() if name.startswith(build.LAYER_TIMING))
    steps = sum(stages.get(name, 0) for name in top)
    return {"layer_save_s": round(layer_save, 1), "after_dib_s": round(sum(stages.get(n, 0) for n in after_dib), 1),
            "other_s": round(build_s - steps, 1),
            "dib_own_s": round(stages.get("tree", 0) - layer_save, 1)}


BOOT_TEST_FIRMWARE = qemu.Firmware.UEFI


def run_boot_test(spec: ImageSpec, output_dir: Path) -> bool:
    """The boot-test task on this run's artifact: one boot, then every live test; it writes the
    verdict that publishing needs. Without the reboot test, so boot_test_s compares with the
    figures from before it."""
    return workflow.boot_test(spec, output_dir, BOOT_TEST_FIRMWARE, reboot=False).passed


QCOW2_TARGET_MB = {"guest": 157, "host": 314}  # issue 14's: 150 and 300 MiB


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def benchmark(spec: ImageSpec, output_dir: Path, runs: int, builds_only: bool = False) -> Path:
    """builds_only: the builds and their ratios, no check, boots or boot test."""
    tools.require(*tools.BUILD_TOOLS, *tools.BOOT_TOOLS)
    scratch = Path(output_dir).resolve() / "bench"
    scratch.mkdir(parents=True, exist_ok=True)
    report = scratch / f"bench-{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    results: list[dict] = []
    for index in range(1, runs + 1):
        results.append(one_run(spec, scratch, index, builds_only))
        summary = summarize(spec, results)
        # Rewritten after every run: an interrupted benchmark keeps the runs it finished.
        partial = report.with_suffix(".tmp")
        partial.write_text(json.dumps({"summary": summary, "runs": results}, indent=2) + "\n")
        partial.replace(report)
    _print(summary)
    say(f"full results: {report}")
    return report


def summarize(spec: ImageSpec, results: list[dict]) -> dict:
    stages = {name: statistics.median(r["stages_s"][name] for r in results) for name in results[0]["stages_s"]}
    summary: dict[str, Any] = {
        "image": spec.name,
        "release": spec.release,
        "runs": len(results),
        "median": {key: median(results, key) for key in results[0]
                   if isinstance(results[0][key], (int, float)) and not isinstance(results[0][key], bool)},
        "median_stages_s": stages,
    }
    summary["qcow2_target_mb"] = QCOW2_TARGET_MB["host" if spec.is_kvm_host else "guest"]
    m = summary["median"]
    summary["ratio_build_to_dib_alone"] = round(m["build_s"] / m["dib_alone_s"], 2)
    summary["ratio_build_to_plain_dib"] = round(m["build_s"] / m["plain_dib_s"], 2)
    if "check_s" in m:  # not with builds_only
        summary["all_checks_and_boot_tests_passed"] = all(r["check_passed"] and r["boot_test_passed"]
                                                          for r in results)
        summary["check_minus_launch_s"] = round(m["check_s"] - m["appliance_launch_s"], 1)
    return summary


def _print(summary: dict) -> None:
    m = summary["median"]
    rows = [(f"stage: {name}", f"{seconds:.1f} s") for name, seconds in summary["median_stages_s"].items()]
    rows += [
        ("pipeline build, cold (all stages)", f"{m['build_s']:.1f} s"),
        ("  of it: DIB's own tree", f"{m['dib_own_s']:.1f} s"),
        ("  of it: package layer save, inside DIB", f"{m['layer_save_s']:.1f} s"),
        ("  of it: steps after DIB, wall", f"{m['after_dib_s']:.1f} s"),
        ("  of it: preflight, hashing, moving into place", f"{m['other_s']:.1f} s"),
        ("diskimage-builder alone, cold, same elements and environment", f"{m['dib_alone_s']:.1f} s"),
        (f"ratio build / DIB alone (target <= {DIB_ALONE_TARGET})", f"{summary['ratio_build_to_dib_alone']:.2f}"),
        ("plain disk-image-create -t tar, cold, spec's elements", f"{m['plain_dib_s']:.1f} s"),
        (f"ratio build / plain DIB (target <= {PLAIN_DIB_TARGET})", f"{summary['ratio_build_to_plain_dib']:.2f}"),
        (f"qcow2 on disk (target <= {summary['qcow2_target_mb']} MB)", f"{m['qcow2_bytes'] / 1e6:.0f} MB"),
        ("peak memory in use during the build", f"{m['peak_memory_mib']} MiB"),
    ]
    if "check_s" in m:
        rows += _check_and_boot_rows(summary)
    width = max(len(name) for name, _ in rows)
    print(f"benchmark of {summary['image']} ({summary['release']}): medians of {summary['runs']} run(s)")
    for name, value in rows:
        print(f"  {name:<{width}}  {value:>10}")


DIB_ALONE_TARGET = 1.10  # issue 14's targets
PLAIN_DIB_TARGET = 0.9
CHECK_AFTER_LAUNCH_TARGET_S = 5
BOOT_TARGET_S = 60


def _check_and_boot_rows(summary: dict) -> list[tuple[str, str]]:
    m = summary["median"]
    return [
        ("offline check", f"{m['check_s']:.1f} s"),
        ("libguestfs appliance launch alone", f"{m['appliance_launch_s']:.1f} s"),
        (f"check - launch (target <= {CHECK_AFTER_LAUNCH_TARGET_S} s)", f"{summary['check_minus_launch_s']:.1f} s"),
        *((f"boot to SSH-ready, {firmware.upper()} (target <= {BOOT_TARGET_S} s)",
           f"{m[f'boot_to_ssh_{firmware}_s']:.1f} s") for firmware in ("bios", "uefi")),
        (f"boot test, {BOOT_TEST_FIRMWARE} boot included", f"{m['boot_test_s']:.1f} s"),
        ("virtual size", f"{m['virtual_bytes'] / 2**30:.1f} GiB"),
        ("largest subprocess RSS, whole run (QEMU included)", f"{m['largest_process_rss_mib']} MiB"),
        ("every check and boot test passed", "yes" if summary["all_checks_and_boot_tests_passed"] else "NO"),
    ]


# --- rebuilds (./inv bench --rebuilds): what the input hash and the package layer save


REBUILD_CHANGE = "kvm-base/post-install.d/60-lock-passwords"  # one of our elements; a comment added
REBUILD_TARGET = 0.35  # issue 14's: a rebuild after an element change, at most 0.35x a cold build
NO_CHANGE_TARGET_S = 1.0


def changed_elements(spec: ImageSpec, scratch: Path) -> ImageSpec:
    """The spec with a copy of our elements in which one hook gained a comment."""
    from dataclasses import replace

    from .paths import ELEMENTS

    copy = scratch / "changed-elements"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(ELEMENTS, copy)
    hook = copy / REBUILD_CHANGE
    hook.write_text(hook.read_text() + "# changed by the benchmark\n")
    return replace(spec, element_dirs=(copy, *spec.element_dirs))


def _timed_build(spec: ImageSpec, out: Path, cache: Path, force: bool = False) -> tuple[artifacts.Artifacts, float]:
    started = time.monotonic()
    art = build.build(spec, out, cache, force=force).artifacts
    return art, round(time.monotonic() - started, 1)


def rebuild_run(images: list[ImageSpec], scratch: Path, index: int, publish_key: tuple[str, Path] | None) -> dict:
    """One run: every image cold (empty cache), unchanged, after an element change; then,
    with a key, its boot test and publish (publishing needs the boot test's verdict)."""
    from . import publish

    result: dict = {}
    with tempfile.TemporaryDirectory(dir=scratch) as cache:
        for spec in images:
            out = scratch / f"rebuild-out-{index}"
            figures: dict = {}
            with step(f"run {index}: {spec.name} cold build"):
                art, figures["cold_s"] = _timed_build(spec, out, Path(cache), force=True)
            figures["check_passed"] = check.check_image(spec, out).passed
            with step(f"run {index}: {spec.name} no-change rebuild"):
                _, figures["no_change_s"] = _timed_build(spec, out, Path(cache))
            with step(f"run {index}: {spec.name} rebuild after an element change"):
                _, figures["element_change_s"] = _timed_build(changed_elements(spec, scratch),
                                                              scratch / f"rebuild-changed-{index}", Path(cache))
            figures["element_change_ratio"] = round(figures["element_change_s"] / figures["cold_s"], 2)
            if publish_key:
                with step(f"run {index}: {spec.name} boot test (for the verdict publishing needs)"):
                    figures["boot_test_passed"] = run_boot_test(spec, out)
                key, home = publish_key
                started = time.monotonic()
                publish.publish(art.directory, spec.name, scratch / f"published-{index}", key=key, gnupg_home=home)
                figures["publish_s"] = round(time.monotonic() - started, 1)
            result[spec.name] = figures
            shutil.rmtree(scratch / f"rebuild-changed-{index}", ignore_errors=True)
    return result


def rebuild_benchmark(images: list[ImageSpec], output_dir: Path, runs: int, publish_runs: int = 1) -> Path:
    """Cold, no-change and element-change builds of every image in each run; boot test and
    publish in the first `publish_runs` runs (a host image's boot test takes minutes)."""
    from .publish.sign import make_gpg_home, remove_gpg_home

    tools.require(*tools.BUILD_TOOLS, *tools.BOOT_TOOLS, "gpg")
    scratch = Path(output_dir).resolve() / "bench"
    scratch.mkdir(parents=True, exist_ok=True)
    report = scratch / f"bench-rebuilds-{time.strftime('%Y%m%d-%H%M%S')}.json"
    home, email = make_gpg_home()  # a throw-away signing key
    results: list[dict] = []
    try:
        for index in range(1, runs + 1):
            results.append(rebuild_run(images, scratch, index, (email, home) if index <= publish_runs else None))
            summary = {spec.name: _rebuild_summary([r[spec.name] for r in results]) for spec in images}
            partial = report.with_suffix(".tmp")
            partial.write_text(json.dumps({"summary": summary, "runs": results}, indent=2) + "\n")
            partial.replace(report)
            shutil.rmtree(scratch / f"rebuild-out-{index}", ignore_errors=True)
            shutil.rmtree(scratch / f"published-{index}", ignore_errors=True)
    finally:
        remove_gpg_home(home)
        shutil.rmtree(scratch / "changed-elements", ignore_errors=True)
    for name, figures in summary.items():
        print(f"rebuilds of {name}: medians of {len(results)} run(s)")
        for key, value in figures.items():
            print(f"  {key:<40} {value}")
    say(f"full results: {report}")
    return report


def _rebuild_summary(runs: list[dict]) -> dict:
    medians = {key: round(statistics.median(r[key] for r in runs if key in r), 2)  # 94.55, not 94.55000000000001
               for key in ("cold_s", "no_change_s", "element_change_s", "element_change_ratio", "publish_s")
               if any(key in r for r in runs)}
    medians["ratio_of_medians"] = round(medians["element_change_s"] / medians["cold_s"], 2)
    medians[f"element_change_target_<={REBUILD_TARGET}"] = medians["ratio_of_medians"] <= REBUILD_TARGET
    medians[f"no_change_target_<={NO_CHANGE_TARGET_S}s"] = medians["no_change_s"] <= NO_CHANGE_TARGET_S
    medians["all_checks_passed"] = all(r["check_passed"] for r in runs)
    return medians


# --- boots (./inv bench IMAGE --boots): boot to SSH-ready of the built artifact, and why


BOOT_SETTLE_S = 600  # for systemd to finish starting up: twice the boot test's settle deadline
# Asked once systemd has finished: its own account of the boot and of SSH's wait.
BOOT_REPORT = {
    "systemd_analyze": ["systemd-analyze"],
    "critical_chain_ssh": ["systemd-analyze", "critical-chain", "ssh.service"],
    "blame": ["sh", "-c", "systemd-analyze blame | head -15"],
}


def boot_run(spec: ImageSpec, qcow2: Path, firmware: qemu.Firmware, workdir: Path) -> dict:
    """One boot of the artifact to SSH-ready; then, once systemd has finished, its own account."""
    vm = testvm.boot_spec(spec, qcow2, firmware, workdir)
    try:
        figures: dict[str, Any] = {"boot_to_ssh_s": vm.boot_seconds}
        vm.ssh(["timeout", str(BOOT_SETTLE_S), "systemctl", "is-system-running", "--wait"], check=False,
               timeout=BOOT_SETTLE_S + 30)
        for name, command in BOOT_REPORT.items():
            figures[name] = vm.ssh(command, check=False).stdout.strip()
    finally:
        vm.stop()
    return figures


def boots_at_once(spec: ImageSpec, qcow2: Path, firmware: qemu.Firmware, workdirs: list[Path]) -> list[dict]:
    """boot_run in each of WORKDIRS at the same time, as ./inv test's two lanes boot: each one's figures."""
    found: list[dict] = [{} for _ in workdirs]

    def boot(index: int) -> None:
        found[index] = boot_run(spec, qcow2, firmware, workdirs[index])

    concurrently(*(functools.partial(boot, index) for index in range(len(workdirs))))
    return found


def boot_benchmark(spec: ImageSpec, output_dir: Path, runs: int, side_by_side: int = 1) -> Path:
    """Boot the built artifact RUNS times by each firmware: seconds to SSH-ready (medians), with
    systemd-analyze's critical chain of ssh.service for each boot. SIDE_BY_SIDE VMs boot at once in
    each run (each with qemu.vm_cpus() vCPUs), and the medians are over all of them."""
    tools.require(*tools.BOOT_TOOLS)
    if side_by_side < 1:
        raise PipelineError(f"--side-by-side {side_by_side}: expected at least 1 VM at once")
    art = artifacts.artifacts_for(spec, output_dir)
    qcow2_sha256 = art.read_info().get("qcow2_sha256")  # a clear error if it was never built
    scratch = Path(output_dir).resolve() / "bench"
    scratch.mkdir(parents=True, exist_ok=True)
    report = scratch / f"boots-{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    results: dict[str, list[dict]] = {firmware: [] for firmware in qemu.Firmware}
    summary: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir=scratch) as workdir:
        for index in range(1, runs + 1):
            for firmware in qemu.Firmware:  # alternated, so a noisy minute does not hit one firmware only
                names = [f"{firmware}-{index}"] if side_by_side == 1 else \
                    [f"{firmware}-{index}-vm{vm}" for vm in range(1, side_by_side + 1)]
                boot_dirs = [Path(workdir) / name for name in names]
                at_once = f" ({side_by_side} VMs at once)" if side_by_side > 1 else ""
                try:
                    with step(f"run {index}: boot {spec.name} to SSH ({firmware}){at_once}"):
                        results[firmware] += boots_at_once(spec, art.qcow2, firmware, boot_dirs)
                except BaseException:
                    # The error names the console log: keep it past the scratch directory's removal.
                    for boot_dir in boot_dirs:
                        kept = report.with_name(f"{report.stem}-{boot_dir.name}-failed")
                        if boot_dir.is_dir():
                            shutil.copytree(boot_dir, kept)
                            say(f"the failed boot's console and QEMU logs are kept in {kept}")
                    raise
                accel, cpu = qemu.accelerator()
                summary = {"image": spec.name, "qcow2_sha256": qcow2_sha256, "runs": index,
                           "accelerator": accel, "cpu": cpu, "vm_cpus": qemu.vm_cpus(), "side_by_side": side_by_side,
                           "median_boot_to_ssh_s": {f: statistics.median(r["boot_to_ssh_s"] for r in found)
                                                    for f, found in results.items() if found}}
                partial = report.with_suffix(".tmp")
                partial.write_text(json.dumps({"summary": summary, "runs": results}, indent=2) + "\n")
                partial.replace(report)
    for name, found in results.items():
        seconds = ", ".join(f"{r['boot_to_ssh_s']:.1f}" for r in found)
        print(f"boot of {spec.name} to SSH-ready, {name.upper()}, {summary['side_by_side']} at a time with "
              f"{summary['vm_cpus']} vCPUs each (target <= {BOOT_TARGET_S} s, one at a time): "
              f"median {summary['median_boot_to_ssh_s'][name]:.1f} s ({seconds})")
        last = found[-1]["systemd_analyze"].splitlines()
        print(f"  last run's systemd-analyze: {last[0] if last else '-'}")
    say(f"full results, with each boot's critical chain: {report}")
    return report
