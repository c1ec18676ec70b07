"""What a build leaves beside the qcow2, used for real: the liveimg tarball unpacked the way
Anaconda unpacks it, the build manifest, and a second `inv build` that finds nothing to do."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile

from pipeline import liveimg, manifest
from pipeline.paths import ROOT

# Files unpacked from the tarball and the label each must get (refpolicy's types).
UNPACKED_LABELS = {"usr/sbin/sshd": "sshd_exec_t", "etc/shadow": "shadow_t", "etc/selinux/config": "selinux_config_t"}
# What the issue asks the manifest to record.
MANIFEST_KEYS = ("spec", "elements", "diskimage_builder", "pipeline", "packages", "kernel", "tuned_profile",
                 "selinux_policy_modules", "input_hash", "timings")


def test_liveimg_unpacks_with_labels_as_anaconda_does(artifacts, tmp_path):
    """GNU tar with Anaconda's own options restores each file's SELinux label from the tarball."""
    members = [f"./{path}" for path in UNPACKED_LABELS]
    subprocess.run([*liveimg.ANACONDA_EXTRACT, "-xzf", str(artifacts.liveimg), "-C", str(tmp_path), *members],
                   check=True, capture_output=True)
    for path, expected in UNPACKED_LABELS.items():
        label = os.getxattr(tmp_path / path, "security.selinux").rstrip(b"\0").decode()
        assert label.split(":")[2] == expected, f"{path}: {label}"


def test_liveimg_lists_the_kernel_as_anaconda_does(artifacts):
    """Anaconda finds the kernels to set up by listing boot/vmlinuz-* with Python's tarfile."""
    with tarfile.open(artifacts.liveimg) as archive:
        kernels = [n.split("/")[-1][8:] for n in archive.getnames() if "boot/vmlinuz-" in n]
    assert kernels == [artifacts.read_info()["kernel"]]


def test_manifest_records_the_build(artifacts, spec):
    recorded = json.loads(artifacts.manifest.read_text())
    info = artifacts.read_info()
    assert [key for key in MANIFEST_KEYS if not recorded.get(key)] == []
    assert recorded["spec"] == spec.to_json()
    assert recorded["input_hash"] == info["input_hash"] and recorded["version"] == info["version"]
    assert recorded["kernel"] == info["kernel"]
    assert recorded["packages"] == manifest.parse_dpkg_status(artifacts.packages.read_text())
    assert "linux-image-amd64" in recorded["packages"] or "linux-image-cloud-amd64" in recorded["packages"]
    assert {e["name"] for e in recorded["elements"]} >= {"debian-minimal", *spec.elements, "selinux-enforcing"}
    # Every stage of the build, including those after the manifest was embedded in the image.
    assert {"tree", "relabel", "liveimg", "conversion"} <= set(recorded["timings"])


def test_manifest_has_the_licenses_the_copyright_files_declare(artifacts):
    """Most Debian packages have a machine-readable copyright file; each license read is one the
    image's own file declares (dpkg keeps /usr/share/doc/*/copyright: elements/kvm-base)."""
    recorded = json.loads(artifacts.manifest.read_text())
    licenses, packages = recorded["licenses"], recorded["packages"]
    assert set(licenses) <= set(packages) and len(licenses) > len(packages) / 2, f"{len(licenses)} of {len(packages)}"
    assert "GPL-3+" in licenses["bash"] and "LGPL-2.1+" in licenses["systemd"] and all(licenses.values())


def test_unchanged_inputs_are_up_to_date(artifacts, spec, output_dir, check_report):
    """A second `inv build` of the same inputs rebuilds nothing: it says so and leaves the artifact."""
    assert check_report.passed
    before = artifacts.qcow2.stat()
    result = subprocess.run([str(ROOT / "inv"), "build", spec.name, f"--spec-file={spec.source}",
                             f"--output-dir={output_dir}"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{spec.name} is up to date" in result.stderr
    after = artifacts.qcow2.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_file_list_covers_the_tree(artifacts):
    files = manifest.read_file_list(artifacts.files)
    assert files["/usr/sbin/sshd"][0] == "f" and "sshd_exec_t" in files["/usr/sbin/sshd"][4]
    assert files[f"/{manifest.EMBEDDED}"][0] == "f"
    assert len(files) > 10_000
