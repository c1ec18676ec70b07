"""The root filesystem's own /dev: debootstrap's few nodes, nothing of the build host's."""

from __future__ import annotations

import os
import stat

import pytest

from pipeline import disk


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod of a character device needs root")
def test_base_dev_is_debootstraps(tmp_path):
    (tmp_path / "dev").mkdir()
    disk.create_base_dev(tmp_path)
    dev = tmp_path / "dev"
    assert {path.name for path in dev.iterdir()} == disk.BASE_DEV_NAMES
    null, console = (dev / "null").lstat(), (dev / "console").lstat()
    assert stat.S_ISCHR(null.st_mode) and stat.S_IMODE(null.st_mode) == 0o666
    assert (os.major(null.st_rdev), os.minor(null.st_rdev)) == (1, 3)
    assert stat.S_IMODE(console.st_mode) == 0o600 and os.minor(console.st_rdev) == 1
    assert os.readlink(dev / "stderr") == "/proc/self/fd/2" and (dev / "pts").is_dir()
