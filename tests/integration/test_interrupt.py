"""A build stopped while diskimage-builder runs (its chroot mounts up) leaves nothing behind: no
process, mount, loop device, work directory or half-written artifact. Stopped as a cancelled CI
job stops it (SIGTERM to ./inv alone: DIB runs in a session of its own and gets no signal) and
as Ctrl-C in a terminal does (SIGINT to the whole process group). The build starts from the
package layer that the session's build left in the cache, so DIB is mounted within a minute."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.paths import ROOT
from pipeline.run import run

DIB_DEADLINE = 600  # to DIB's hooks in the chroot: preflight, policy, unpacking the package layer
# DIB's phases that run in its chroot, with /proc, /sys and /dev mounted in it (build.DIB_PHASE).
IN_CHROOT = ("dib: pre-install.d", "dib: install.d", "dib: post-install.d")
STOP_DEADLINE = 180  # DIB gets 30 s to clean up after SIGTERM (run._stop_group), then our cleanup


def mounted_below(directory: Path) -> list[str]:
    return [line.split(" ")[1] for line in Path("/proc/self/mounts").read_text().splitlines()
            if line.split(" ")[1].startswith(f"{directory}/")]


def processes_using(directory: Path) -> list[str]:
    """The processes whose command line, working directory or environment names `directory`:
    DIB and everything it starts (TMPDIR is below it), wherever their process group or session."""
    marker = os.fsencode(directory)
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            seen = (cmdline, (proc / "environ").read_bytes(), os.fsencode(os.readlink(proc / "cwd")))
        except OSError:  # ended meanwhile, or a kernel thread
            continue
        if any(marker in part for part in seen):
            found.append(f"{proc.name}: " + cmdline.replace(b"\0", b" ").decode(errors="replace"))
    return found


def loop_devices_below(directory: Path) -> list[str]:
    backing = run(["losetup", "--list", "--noheadings", "--output", "BACK-FILE"], capture=True).stdout
    return [line.strip() for line in backing.splitlines() if line.strip().startswith(f"{directory}/")]


def _ctrl_c_as_in_a_terminal() -> None:
    """SIGINT as a terminal's Ctrl-C finds it: a test run started in the background (as CI
    runners may) inherits SIGINT ignored, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _cancelled_job(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGTERM)


def _ctrl_c(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGINT)


@pytest.mark.parametrize("stop", [_cancelled_job, _ctrl_c], ids=["SIGTERM to ./inv", "Ctrl-C"])
def test_a_build_stopped_in_diskimage_builder_leaves_nothing_behind(spec, tmp_path, stop):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "invoke", "build", spec.name, "--spec-file", spec.source,
                             "--output-dir", out],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_ctrl_c_as_in_a_terminal)
    said: list[str] = []

    def read_stderr() -> None:
        for line in proc.stderr:
            said.append(line)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + DIB_DEADLINE
        while not any(line.strip() in IN_CHROOT for line in said):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(said)
            time.sleep(1)
        assert mounted_below(out) and processes_using(out), "DIB runs, but neither its mounts nor processes are found"
        started = time.monotonic()
        stop(proc)
        proc.wait(timeout=STOP_DEADLINE)
        reader.join(timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    print(f"stopped {time.monotonic() - started:.0f} s after the signal")
    output = "".join(said)
    assert proc.returncode == 130, output
    assert said[-1] == "interrupted; nothing was left half-written\n", output
    assert not processes_using(out)
    assert not mounted_below(out)
    assert not loop_devices_below(out)
    assert sorted(path.name for path in (out / spec.name).iterdir()) == ["logs"]  # no .work-*, no artifact
