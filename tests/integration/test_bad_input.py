"""Bad input and faults, through the real command line: one clear line, nothing left behind."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline import testvm, tools
from pipeline.paths import ROOT
from pipeline.qemu import Firmware

INVOKE = [sys.executable, "-m", "invoke"]


def inv(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*INVOKE, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def spec_file(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "images.toml"
    path.write_text(textwrap.dedent(body))
    return path


GOOD_IMAGE = """
[image.probe]
elements = ["kvm-guest"]
tuned_profile = "kvm-guest"
"""


def assert_nothing_built(output: Path, image: str = "probe"):
    leftovers = [*(output / image).glob("*.qcow2"), *(output / image).glob(".work-*")]
    assert not leftovers, leftovers
    assert str(output) not in Path("/proc/self/mounts").read_text()


def test_unknown_image_lists_known_ones(tmp_path):
    line = one_line_error(inv("build", "no-such-image", "--output-dir", str(tmp_path)))
    assert ("unknown image 'no-such-image'; known images: guest-image, guest-image-bookworm, host-image, "
            "host-image-bookworm, installer") in line
    assert not list(tmp_path.iterdir())


def test_spec_error_names_file_image_and_key(tmp_path):
    path = spec_file(tmp_path, GOOD_IMAGE + 'disk_size = "lots"\n')
    line = one_line_error(inv("build", "probe", "--spec-file", str(path), "--output-dir", str(tmp_path / "out")))
    assert line.startswith(f"error: {path}: image 'probe': key 'disk_size': ")
    assert not (tmp_path / "out").exists()


def test_missing_host_tool_names_debian_package(tmp_path):
    """A PATH with every build tool but sgdisk: the build stops before DIB starts."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("python3", "env", "sh", "bash", *tools.BUILD_TOOLS):
        found = shutil.which(tool)
        if found and tool != "sgdisk":
            (bin_dir / tool).symlink_to(found)
    path = spec_file(tmp_path, GOOD_IMAGE)
    result = inv("build", "probe", "--spec-file", str(path), "--output-dir", str(tmp_path / "out"),
                 env={"PATH": str(bin_dir)})
    line = one_line_error(result)
    assert "sgdisk (Debian package gdisk)" in line and "apt-get install gdisk" in line
    assert_nothing_built(tmp_path / "out")


def test_unreachable_mirror_names_url(tmp_path):
    path = spec_file(tmp_path, GOOD_IMAGE + '[image.probe.mirrors]\ndebian = "http://127.0.0.1:9/debian"\n')
    line = one_line_error(inv("build", "probe", "--spec-file", str(path), "--output-dir", str(tmp_path / "out")))
    assert "mirror unreachable: http://127.0.0.1:9/debian/dists/bookworm/Release" in line
    assert_nothing_built(tmp_path / "out")


HOST_IMAGE = """
[image.probe]
elements = ["kvm-host"]
tuned_profile = "openstack-compute"
bridges = [{ name = "br-int" }]
"""


def build_probe(tmp_path: Path, body: str) -> tuple[Path, str]:
    """`inv build probe` with this spec; returns the spec's path and the one error line."""
    path = spec_file(tmp_path, body)
    line = one_line_error(inv("build", "probe", "--spec-file", str(path), "--output-dir", str(tmp_path / "out")))
    assert_nothing_built(tmp_path / "out")
    return path, line


@pytest.mark.parametrize("edit, key, problem", [
    (lambda s: s.replace('"openstack-compute"', '"no-such-profile"'), "tuned_profile",
     "profile 'no-such-profile' not found"),
    (lambda s: s.replace('[{ name = "br-int" }]', '[{ name = "br-int" }, { name = "br-int" }]'), "bridges",
     "bridge 'br-int' is declared twice"),
    (lambda s: s + 'kernel_args = ["hugepages=16\\" init=/bin/sh"]\n', "kernel_args", "break the bootloader"),
    (lambda s: s + 'kernel_args = ["iommu=pt\\nlinux /evil"]\n', "kernel_args", "break the bootloader"),
], ids=["unknown-profile", "bridge-twice", "kernel-arg-quote", "kernel-arg-newline"])
def test_bad_host_spec_is_refused_naming_the_key(tmp_path, edit, key, problem):
    path, line = build_probe(tmp_path, edit(HOST_IMAGE))
    assert line.startswith(f"error: {path}: image 'probe': key '{key}': ") and problem in line, line
    assert not (tmp_path / "out").exists()


def test_profile_include_loop_is_refused_with_file_and_line(tmp_path):
    for name, include in (("site-a", "site-b"), ("site-b", "site-a")):
        (tmp_path / "profiles" / name).mkdir(parents=True)
        (tmp_path / "profiles" / name / "tuned.conf").write_text(f"[main]\ninclude={include}\n")
    body = HOST_IMAGE.replace('"openstack-compute"', '"site-a"') + 'profile_dirs = ["profiles"]\n'
    _, line = build_probe(tmp_path, body)
    assert "include loop" in line and f"{tmp_path}/profiles/site-" in line and "tuned.conf:2" in line, line


def test_policy_module_that_does_not_compile_is_refused_with_file_and_line(tmp_path):
    """A user's element (element_dirs) whose policy module has a typo: refused before DIB runs."""
    selinux_dir = tmp_path / "elements" / "site-agent" / "selinux"
    selinux_dir.mkdir(parents=True)
    (selinux_dir.parent / "README.rst").write_text("A site's agent.\n")
    (selinux_dir / "site_agent.te").write_text(
        "module site_agent 1.0;\nrequire { type init_t; }\nallow init_t no_such_t:file read;\n")
    body = HOST_IMAGE.replace('["kvm-host"]', '["kvm-host", "site-agent"]') + 'element_dirs = ["elements"]\n'
    _, line = build_probe(tmp_path, body)
    assert line.startswith(f"error: {selinux_dir / 'site_agent.te'}: SELinux policy module does not compile: "), line
    assert "line 3" in line, line


def test_boot_that_never_reaches_ssh_reports_deadline_and_console(spec, artifacts, tmp_path):
    """A deadline too short for any boot: the error names it and the console log; no QEMU survives."""
    with pytest.raises(testvm.BootTimeout) as caught:
        testvm.boot(artifacts.qcow2, spec.disk_size, Firmware.BIOS, tmp_path, deadline=5)
    message = str(caught.value)
    assert "did not reach SSH within 5 s" in message and str(tmp_path / "console.log") in message
    assert subprocess.run(["pgrep", "-f", f"qemu-system.*{tmp_path}"], capture_output=True).returncode == 1
