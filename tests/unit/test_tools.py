import pytest

from pipeline import tools
from pipeline.errors import ToolMissing


def test_missing_tool_names_debian_package(tmp_path):
    with pytest.raises(ToolMissing) as caught:
        tools.require("sgdisk", "mkfs.vfat", path=str(tmp_path))
    message = str(caught.value)
    assert "sgdisk (Debian package gdisk)" in message
    assert "mkfs.vfat (Debian package dosfstools)" in message
    assert message.endswith("apt-get install dosfstools gdisk")


def test_present_tool_passes(tmp_path):
    exe = tmp_path / "sgdisk"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    tools.require("sgdisk", path=str(tmp_path))


def test_every_tool_package_is_installed_by_set_up():
    from pipeline.paths import ROOT

    listed = {line.strip() for line in (ROOT / "debian-packages.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    needed = set(tools.DEBIAN_PACKAGE.values()) | set(tools.DEBIAN_PACKAGE_OF_FILE.values())
    assert needed - {"tar", "coreutils"} <= listed  # both are essential in Debian
