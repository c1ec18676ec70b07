"""kvm-private-dev: the chroot's /dev is a tmpfs of its own, not the build host's /dev that
diskimage-builder bind-mounts, so maintainer scripts cannot touch the host's device nodes.
Runs the hook on a bind mount made as diskimage-builder's mount_proc_dev_sys makes it."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

HOOK = Path(__file__).parents[2] / "elements/kvm-private-dev/extra-data.d/00-private-dev"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts and mknod need root")


def _fstype(path: Path) -> str:
    return subprocess.run(["findmnt", "--noheadings", "--output", "FSTYPE", "--mountpoint", path],
                          capture_output=True, text=True).stdout.strip()


@pytest.fixture
def chroot(tmp_path):
    """TMP_MOUNT_PATH with the host's /dev bound and a devpts on it, as diskimage-builder leaves it."""
    dev = tmp_path / "mnt/dev"
    dev.mkdir(parents=True)
    subprocess.run(["mount", "--bind", "/dev", dev], check=True)
    subprocess.run(["mount", "-t", "devpts", "-o", "newinstance,ptmxmode=0666", "devpts", dev / "pts"], check=True)
    yield tmp_path / "mnt"
    subprocess.run(["umount", "--recursive", "--lazy", dev], check=False)


def _hook(mount_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([HOOK], env={"PATH": os.environ["PATH"], "TMP_MOUNT_PATH": str(mount_path)},
                          capture_output=True, text=True)


def test_the_chroot_gets_a_dev_of_its_own(chroot):
    assert _hook(chroot).returncode == 0
    dev = chroot / "dev"
    assert _fstype(dev) == "tmpfs" and _fstype(dev / "pts") == "devpts"
    assert not (dev / "kvm").exists() and not (dev / "sda").exists()  # none of the host's nodes
    assert {path.name for path in dev.iterdir()} == {
        "null", "zero", "full", "random", "urandom", "tty", "fd", "stdin", "stdout", "stderr", "pts", "shm", "ptmx"}
    null = (dev / "null").lstat()
    assert stat.S_ISCHR(null.st_mode) and (os.major(null.st_rdev), os.minor(null.st_rdev)) == (1, 3)
    assert stat.S_IMODE(null.st_mode) == 0o666 and stat.S_IMODE((dev / "shm").stat().st_mode) == 0o1777
    assert os.readlink(dev / "ptmx") == "pts/ptmx" and (dev / "pts/ptmx").exists()
    (dev / "null").write_text("written to the chroot's own null")


def test_a_dev_that_is_not_mounted_as_expected_stops_the_build(tmp_path):
    (tmp_path / "mnt/dev").mkdir(parents=True)
    result = _hook(tmp_path / "mnt")
    assert result.returncode == 1
    assert result.stderr == (f"private-dev: {tmp_path}/mnt/dev is not a mount point; diskimage-builder no longer "
                             "mounts /dev as expected\n")
    assert _fstype(tmp_path / "mnt/dev") == ""
