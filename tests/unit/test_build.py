"""Build steps with the subprocess gateway faked: what DIB is asked for, and atomic publishing."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline import build, locking
from pipeline import spec as specs
from pipeline.artifacts import artifacts_for
from pipeline.paths import ROOT


@pytest.fixture
def ctx(tmp_path):
    spec = specs.load().get("guest-image")
    art = artifacts_for(spec, tmp_path / "out")
    art.directory.mkdir(parents=True)
    work = art.directory / ".work-1"
    work.mkdir()
    return build.BuildContext(spec=spec, artifacts=art, cache_dir=tmp_path / "cache", work=work,
                              log=tmp_path / "build.log", profile_dirs=[spec.profile_dir / spec.tuned_profile])


def assembled(ctx):
    """The state publish() finds after the steps: a kernel in the tree, a disk layout."""
    boot_dir = ctx.work / "tree/boot"
    boot_dir.mkdir(parents=True)
    (boot_dir / "vmlinuz-6.1.0-1-cloud-amd64").write_text("kernel")
    (boot_dir / "initrd.img-6.1.0-1-cloud-amd64").write_text("initrd")
    ctx.kernel = build.bootloader.find_kernel(ctx.work / "tree")
    ctx.layout = build.disk.new_layout(ctx.spec.disk_size)
    ctx.input_hash = "ab" * 32
    ctx.manifest = {"image": ctx.spec.name}
    art = ctx.artifacts
    for path in (art.liveimg, art.packages, art.files):
        (ctx.work / path.name).write_text(path.name)


def test_dib_gets_the_spec(ctx, monkeypatch):
    calls = []
    monkeypatch.setattr(build, "run", lambda argv, **kw: calls.append((argv, kw)))
    build.build_tree(ctx)
    (argv, kw), = calls
    assert argv[0].endswith("disk-image-create")
    assert argv[1:7] == ["-n", "-a", "amd64", "-t", "tar", "-o"]
    assert argv[-2:] == ["debian-minimal", "kvm-guest"]
    env = kw["env"]
    assert env["DIB_RELEASE"] == ctx.spec.release
    assert env["DIB_DEBIAN_SECURITY_MIRROR"] == "http://deb.debian.org/debian-security"
    assert env["DIB_TUNED_PROFILE"] == "kvm-guest"
    assert (Path(env["DIB_TUNED_PROFILES_DIR"]) / "kvm-guest/tuned.conf").is_file()
    assert env["TMPDIR"].startswith(str(ctx.work))
    assert kw["log"] == ctx.log



def test_dib_runs_holding_the_package_layers_lock(ctx, monkeypatch):
    """So a second build with the same key waits for this one's layer instead of writing it too."""
    directory = ctx.cache_dir / "layers" / "0123456789abcdef"
    ctx.layer = build.layer.PackageLayer(directory, ctx.cache_dir / "base.tar.gz", directory / "layer.tar.gz")
    held = []

    def fake_run(argv, **kw):
        if locking.holder(ctx.layer.lock_path) == os.getpid():
            held.append(argv[0])

    monkeypatch.setattr(build, "run", fake_run)
    build.build_tree(ctx)
    assert len(held) == 1 and held[0].endswith("disk-image-create")

def test_move_into_place_moves_qcow2_last_and_replaces_old(ctx, tmp_path):
    assembled(ctx)
    (ctx.work / ctx.artifacts.qcow2.name).write_text("new image")
    ctx.artifacts.qcow2.write_text("old image")
    build.move_into_place(ctx)
    assert ctx.artifacts.qcow2.read_text() == "new image"
    assert ctx.artifacts.read_info()["root_uuid"] == ctx.layout.root_uuid
    assert ctx.artifacts.kernel.read_text() == "kernel"
    info = ctx.artifacts.read_info()
    assert info["version"].endswith("-abababab")
    assert info["liveimg_sha256"] == build.sha256(ctx.artifacts.liveimg)
    assert build.json.loads(ctx.artifacts.manifest.read_text())["image"] == "guest-image"


def test_stale_reason(ctx):
    assembled(ctx)
    (ctx.work / ctx.artifacts.qcow2.name).write_text("qcow2")
    build.move_into_place(ctx)
    art, info = ctx.artifacts, ctx.artifacts.read_info()
    assert build.stale_reason(art, ctx.input_hash) == "its offline check has not passed"
    art.check_report.write_text(build.json.dumps({"passed": True, "qcow2_sha256": info["qcow2_sha256"]}))
    assert build.stale_reason(art, ctx.input_hash) is None
    assert build.stale_reason(art, "cd" * 32).startswith("inputs changed (built from abababab, now cdcdcdcd)")
    art.qcow2.write_text("another qcow2")
    assert build.stale_reason(art, ctx.input_hash) == "guest-image.qcow2 is not the file that was built"
    art.liveimg.unlink()
    assert build.stale_reason(art, ctx.input_hash) == "missing guest-image.tar.gz"


def test_build_says_nothing_was_built_when_up_to_date(ctx, tmp_path):
    assembled(ctx)
    ctx.input_hash = build.inputs.input_hash(ctx.spec)
    (ctx.work / ctx.artifacts.qcow2.name).write_text("qcow2")
    build.move_into_place(ctx)
    art = ctx.artifacts
    art.check_report.write_text(json.dumps({"passed": True, "qcow2_sha256": art.read_info()["qcow2_sha256"]}))
    result = build.build(ctx.spec, tmp_path / "out", ctx.cache_dir)
    assert result == build.BuildResult(art, built=False)
    assert result.timings.seconds == {}


def test_cleanup_removes_work_dir(ctx, monkeypatch):
    monkeypatch.setattr(build, "run", lambda argv, **kw: type("R", (), {"stdout": ""})())
    (ctx.work / "tree/etc").mkdir(parents=True)
    build.cleanup(ctx.work)
    assert not ctx.work.exists()


def test_move_into_place_keeps_raw_on_request(ctx):
    import dataclasses

    ctx.spec = dataclasses.replace(ctx.spec, formats=(specs.OutputFormat.QCOW2, specs.OutputFormat.RAW))
    assembled(ctx)
    ctx.disk.write_text("raw disk")
    (ctx.work / ctx.artifacts.qcow2.name).write_text("qcow2")
    build.move_into_place(ctx)
    assert ctx.artifacts.raw.read_text() == "raw disk"
    assert ctx.artifacts.qcow2.read_text() == "qcow2"


class FakeMounts:
    """A mount table in the kernel's format, and the gateway: `umount` takes a mount out of it
    unless the mount is busy."""

    def __init__(self, path: Path, targets: list[str], busy: tuple[str, ...] = ()):
        self.path, self.targets, self.busy, self.calls = path, list(targets), busy, []
        self.write()

    def write(self) -> None:
        escape = str.maketrans({" ": r"\040", "\t": r"\011", "\n": r"\012", "\\": r"\134"})
        self.path.write_text("".join(f"tmpfs {t.translate(escape)} tmpfs rw 0 0\n"
                                     for t in ["/", *self.targets]))

    def run(self, argv, **kw):
        self.calls.append(argv)
        if argv[0] == "umount" and argv[-1] not in self.busy:
            self.targets.remove(argv[-1])
            self.write()
        return type("R", (), {"stdout": '{"loopdevices": []}', "returncode": 0})()


@pytest.fixture
def spaced_work(tmp_path):
    work = tmp_path / "my builds" / ".work-1"
    (work / "tmp/dib mnt/proc").mkdir(parents=True)
    return work


@pytest.mark.parametrize("name", ["dib mnt", "tab\there", "new\nline", "back\\slash"])
def test_mounts_below_decodes_the_kernels_escapes(tmp_path, name):
    target = str(tmp_path / name / "proc")
    table = FakeMounts(tmp_path / "mounts", [target, str(tmp_path) + "-other"])
    assert build.mounts_below(tmp_path, table.path) == [target]


def test_cleanup_unmounts_deepest_first_under_a_path_with_a_space(spaced_work, monkeypatch):
    mount = f"{spaced_work}/tmp/dib mnt"
    table = FakeMounts(spaced_work.parent / "mounts", [mount, f"{mount}/proc"])
    monkeypatch.setattr(build, "run", table.run)
    build.cleanup(spaced_work, table.path)
    assert [argv[-1] for argv in table.calls if argv[0] == "umount"] == [f"{mount}/proc", mount]
    assert not spaced_work.exists()


def test_cleanup_refuses_to_delete_through_a_mount_still_there(spaced_work, monkeypatch):
    mount = f"{spaced_work}/tmp/dib mnt"
    (spaced_work / "tmp/dib mnt/proc/precious").write_text("the host's")
    table = FakeMounts(spaced_work.parent / "mounts", [mount, f"{mount}/proc"], busy=(f"{mount}/proc",))
    monkeypatch.setattr(build, "run", table.run)
    with pytest.raises(build.PipelineError) as caught:
        build.cleanup(spaced_work, table.path)
    assert f"{mount}/proc" in str(caught.value) and "\n" not in str(caught.value)
    assert (spaced_work / "tmp/dib mnt/proc/precious").read_text() == "the host's"


def test_cleanup_detaches_loop_devices_backed_under_work(spaced_work, monkeypatch):
    table = FakeMounts(spaced_work.parent / "mounts", [])
    loops = {"loopdevices": [{"name": "/dev/loop3", "back-file": f"{spaced_work}/disk 1.raw"},
                             {"name": "/dev/loop4", "back-file": f"{spaced_work}-other/disk.raw"}]}
    calls = []

    def fake_run(argv, **kw):
        calls.append(argv)
        return type("R", (), {"stdout": json.dumps(loops), "returncode": 0})()

    monkeypatch.setattr(build, "run", fake_run)
    build.cleanup(spaced_work, table.path)
    assert ["losetup", "--detach", "/dev/loop3"] in calls
    assert not any("/dev/loop4" in argv for argv in calls)


@pytest.fixture
def other_build():
    """A process that runs on, as another build would."""
    process = subprocess.Popen(["sleep", "60"])
    yield process.pid
    process.kill()
    process.wait()


def test_a_build_sweeps_the_work_directories_of_dead_builds_only(tmp_path, other_build, monkeypatch, capsys):
    ended = subprocess.Popen(["true"])
    ended.wait()  # its pid now names no process: a build killed before its cleanup
    dead, alive, own = (build.work_dir(tmp_path, pid) for pid in (ended.pid, other_build, os.getpid()))
    for work in (dead, alive, own, tmp_path / ".work-notapid"):
        (work / "tmp/dib mnt").mkdir(parents=True)
    table = FakeMounts(tmp_path / "mounts", [f"{dead}/tmp/dib mnt", f"{alive}/tmp/dib mnt"])
    monkeypatch.setattr(build, "run", table.run)
    build.sweep_stale_work(tmp_path, table.path)
    assert not dead.exists()
    assert [argv[-1] for argv in table.calls if argv[0] == "umount"] == [f"{dead}/tmp/dib mnt"]
    assert all(work.is_dir() for work in (alive, own, tmp_path / ".work-notapid"))
    assert capsys.readouterr().err == f"removing {dead}: left by build process {ended.pid}, which is gone\n"


# --- the outputs, made side by side (real processes through the real gateway)


def _command(*argv):
    """A step that runs one command through the gateway."""
    return lambda ctx: build.run(list(argv), timeout=120)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_the_outputs_are_made_at_once_each_step_timed(ctx, tmp_path):
    """The first lane waits for a file only the second lane makes: one after the other, it could not end."""
    flag = tmp_path / "second lane ran"
    step = build.side_by_side(
        (("waits", _command("sh", "-c", 'until [ -e "$0" ]; do sleep 0.05; done', flag)), ("then", _command("true"))),
        (("makes", _command("touch", flag)),))
    step(ctx)
    assert set(ctx.timings.seconds) == {"waits", "then", "makes"}


def test_a_failing_output_fails_the_build_and_stops_the_others(ctx, tmp_path):
    pidfile = tmp_path / "pid"
    after = tmp_path / "after"
    step = build.side_by_side(
        (("long", _command("sh", "-c", 'echo $$ > "$0"; exec sleep 600', pidfile)),
         ("after", _command("touch", after))),
        (("fails", _command("sh", "-c", 'until [ -s "$0" ]; do sleep 0.05; done; echo "no space left" >&2; exit 3',
                            pidfile)),))
    started = time.monotonic()
    with pytest.raises(build.PipelineError) as failed:
        step(ctx)
    assert time.monotonic() - started < 60, "the long step was waited for, not stopped"
    # The failing step's own one-line error, not the stopped one's.
    assert "(exit 3)" in str(failed.value) and str(failed.value).endswith(": no space left")
    assert not _alive(int(pidfile.read_text()))
    assert not after.exists(), "a stopped lane starts nothing more"
    assert set(ctx.timings.seconds) == set()


def test_an_interrupt_stops_every_output(tmp_path):
    """SIGTERM to a build making its outputs (./inv turns it into KeyboardInterrupt) stops all of them."""
    pids = [tmp_path / "1", tmp_path / "2"]
    script = f"""
from pipeline import run
run.interrupt_on_termination()
run.concurrently(*(lambda pid=pid: run.run(["sh", "-c", 'echo $$ > "$0"; exec sleep 600', pid])
                   for pid in {[str(p) for p in pids]!r}))
"""
    driver = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not all(p.is_file() and p.read_text().strip() for p in pids):
            assert time.monotonic() < deadline and driver.poll() is None, "the children did not start"
            time.sleep(0.05)
        driver.send_signal(signal.SIGTERM)
        assert driver.wait(timeout=60) != 0
        deadline = time.monotonic() + 15
        while any(_alive(int(p.read_text())) for p in pids):
            assert time.monotonic() < deadline, "a child outlived the interrupted build"
            time.sleep(0.05)
    finally:
        driver.kill()
        driver.wait()


def test_the_package_layers_time_inside_dib_is_read_from_its_profile(ctx):
    timings = build.Timings()
    report = build._phase_reporter(timings)
    for line in ("2026-12-01 14:18:57.526 | dib-run-parts 08-debootstrap                               38.985",
                 "2026-12-01 14:18:57.530 | dib-run-parts 08-package-layer                              2.104",
                 "2026-12-01 14:20:41.533 | dib-run-parts 02-package-layer-save                         2.615",
                 "2026-12-01 14:20:41.540 | + echo 'dib-run-parts 02-package-layer-save 9.000 '"):
        report(line)
    assert timings.seconds == {"in tree: 08-package-layer": 2.104, "in tree: 02-package-layer-save": 2.615}


@pytest.mark.parametrize("available_mib, in_memory", [(8192, True), (1500, False)])
def test_the_tree_is_unpacked_into_memory_when_there_is_room(ctx, monkeypatch, available_mib, in_memory):
    ctx.tar.parent.mkdir()
    with open(ctx.tar, "wb") as tar:
        tar.truncate(300 * 2**20)  # a 300 MiB tree
    monkeypatch.setattr(build, "meminfo", lambda key: available_mib * 2**20)
    calls = []
    monkeypatch.setattr(build, "run", lambda argv, **kw: calls.append([str(a) for a in argv]))
    monkeypatch.setattr(build.disk, "create_base_dev", lambda tree: calls.append(["base dev", str(tree)]))
    build.unpack_tree(ctx)
    assert calls[-1] == ["base dev", str(ctx.tree)]
    calls.pop()
    mounts = [argv for argv in calls if argv[0] == "mount"]
    assert mounts == ([["mount", "-t", "tmpfs", "-o", "mode=0755,size=856m", "tmpfs", str(ctx.tree)]]
                      if in_memory else [])
    assert calls[-1][:2] == ["tar", "--extract"] and not ctx.tar.exists()
    assert "--exclude=./dev/*" in calls[-1]  # DIB's tar holds the build host's /dev


def test_meminfo_reads_bytes(tmp_path):
    table = tmp_path / "meminfo"
    table.write_text("MemTotal:       24576000 kB\nMemAvailable:   20000000 kB\n")
    assert build.meminfo("MemAvailable", table) == 20000000 * 1024


def test_a_build_stopped_by_a_failed_concurrent_step_still_unmounts_its_work(tmp_path, monkeypatch):
    """./inv test builds the first image beside the unit tests: when they failed while the build
    was cleaning up, its umount was refused ("a concurrent step failed") and its tmpfs stayed."""
    from pipeline import run as gateway

    work = tmp_path / "work"
    (work / "tree").mkdir(parents=True)
    table = tmp_path / "mounts"
    table.write_text(f"tmpfs {work / 'tree'} tmpfs rw 0 0\n")
    unmounted: list[str] = []

    def recording_run(argv, **kwargs):
        if argv[0] == "umount":
            gateway.run(["true"])  # raises if the gateway refuses to start a command here
            unmounted.append(str(argv[-1]))
            table.write_text("")
            return subprocess.CompletedProcess(argv, 0, "", "")
        return gateway.run(["true"], **kwargs)

    monkeypatch.setattr(build, "run", recording_run)
    failed = threading.Event()

    def failing_step():
        failed.set()
        raise build.PipelineError("unit tests failed")

    def building():
        assert failed.wait(timeout=5)
        time.sleep(0.2)  # the failure has reached the group: new commands are refused
        build.cleanup(work, table)

    with pytest.raises(build.PipelineError, match="unit tests failed"):
        gateway.concurrently(failing_step, building)
    assert unmounted == [str(work / "tree")] and not work.exists()
