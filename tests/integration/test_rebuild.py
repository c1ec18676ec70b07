"""A rebuild after a change to one of our elements, against the session's build (--use-built):
it starts from the package layer, downloads nothing that is cached, and gives the same package
list and the same file list. The change is a comment in a post-install hook of a copy of our
elements, so the image's contents should not change at all; `inv diff` reports what did."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess

import pytest

from pipeline import build, check, manifest
from pipeline.artifacts import Artifacts
from pipeline.paths import DEFAULT_CACHE, ELEMENTS, ROOT

CHANGED_HOOK = "kvm-base/post-install.d/60-lock-passwords"
NEED_TO_GET = re.compile(r"Need to get (\S+ \S+?)(?:/| of archives)")
# What differs between any two builds of the same inputs, and why: DIB's record of its own
# command line and environment (work directories, our settings), and the manifest (timings,
# and here the input hash, which the element change alters); the filesystem UUIDs in fstab
# and grub.cfg derive from the input hash too; systemd-update-done's stamps (kvm-base) hold the
# time the build last changed /usr.
VOLATILE = {"/etc/dib-manifests/dib_arguments", "/etc/dib-manifests/dib_environment",
            "/usr/share/kvm-image-pipeline/manifest.json", "/etc/fstab", "/boot/grub/grub.cfg",
            "/etc/.updated", "/var/.updated"}


@pytest.fixture(scope="module")
def rebuilt(spec, artifacts, output_dir, tmp_path_factory):
    elements = tmp_path_factory.mktemp("elements") / "elements"
    shutil.copytree(ELEMENTS, elements)
    hook = elements / CHANGED_HOOK
    hook.write_text(hook.read_text() + "# changed for the rebuild test: no effect on the image\n")
    changed = dataclasses.replace(spec, element_dirs=(elements, *spec.element_dirs))
    out = output_dir / "rebuild-test"
    shutil.rmtree(out, ignore_errors=True)
    art = build.build(changed, out, DEFAULT_CACHE).artifacts
    yield changed, art
    shutil.rmtree(out, ignore_errors=True)


def dib_log(art: Artifacts) -> str:
    return sorted(art.logs.glob("build-*.log"))[-1].read_text(errors="replace")


def test_element_change_rebuilds(artifacts, rebuilt):
    _, art = rebuilt
    assert art.read_info()["input_hash"] != artifacts.read_info()["input_hash"]


def test_rebuild_starts_from_the_package_layer_and_downloads_nothing_cached(rebuilt, spec):
    _, art = rebuilt
    log = dib_log(art)
    assert f"debootstrap-debian-{spec.release}-amd64.tar.gz found in cache. Using." in log  # the layer
    assert "I: Retrieving" not in log  # debootstrap did not run
    assert "0 upgraded, 0 newly installed" in log  # the packages were there already
    downloads = [size for size in NEED_TO_GET.findall(log) if size != "0 B"]
    assert downloads == [], f"apt downloaded {downloads}"


def test_same_packages_and_file_list(artifacts, rebuilt):
    _, art = rebuilt
    difference = manifest.compare_builds(artifacts.directory, art.directory)
    report = manifest.format_difference(difference, str(artifacts.directory), str(art.directory))
    print(report)
    assert difference.same_packages and difference.same_file_list, report
    unexpected = {path: fields for path, fields in difference.files_changed.items() if path not in VOLATILE}
    assert unexpected == {}, report


def test_diff_task_reports_the_same_lists(artifacts, rebuilt):
    _, art = rebuilt
    result = subprocess.run([str(ROOT / "inv"), "diff", str(artifacts.directory), str(art.directory)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "packages: same; file list: same" in result.stdout
    assert "/etc/fstab: content" in result.stdout  # what differs is named


def test_rebuilt_image_passes_its_offline_check(rebuilt):
    changed, art = rebuilt
    report = check.check_image(changed, art.directory.parent)
    assert report.passed, [r for r in report.results if not r.passed]
