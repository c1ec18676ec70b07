"""The prefetch beside diskimage-builder (pipeline/prefetch.py) and the kvm-build-speed hooks that
hand DIB what it fetched and leave DIB's tree in place."""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pipeline import archive, prefetch
from pipeline import spec as specs
from pipeline.errors import CommandFailed, PipelineError
from pipeline.paths import ROOT, SPEC_FILE

SPEED = ROOT / "elements" / "kvm-build-speed"


class FakeRelease:
    """A ReleaseArchive that 'downloads' a .deb per name asked for, or fails."""

    def __init__(self, known: set[str], fail_on: str | None = None) -> None:
        self.known, self.fail_on = known, fail_on
        self.calls: list[tuple[list[str], Path, bool]] = []

    def fetch(self, packages: list[str], directory: Path, only_release: bool = False, timeout: float = 0) -> None:
        self.calls.append((packages, directory, only_release))
        if self.fail_on in packages:
            raise PipelineError(f"cannot download Debian trixie's packages from http://mirror.test: {self.fail_on}")
        for name in packages:
            (directory / f"{re.sub(r'[^a-z0-9.+-]', '', name)}_1_amd64.deb").write_text(name)

    def package_names(self) -> set[str]:
        return self.known


def _spec(name: str):
    return specs.load(SPEC_FILE).get(name)


def test_the_guest_fetches_the_cloud_kernel_not_the_generic_one():
    """kvm-build-speed's 99-zz-one-kernel leaves the generic kernel out of the guest's install."""
    known = {"linux-image-amd64", "linux-image-cloud-amd64", "qemu-guest-agent", "tuned", "sudo", "python3"}
    wanted = prefetch.element_packages(_spec("guest-image"), known)
    assert "linux-image-cloud-amd64" in wanted and "linux-image-amd64" not in wanted
    assert {"sudo", "python3", "tuned"} <= set(wanted)  # debian-minimal's base install, and an element's


def test_names_the_release_does_not_have_are_left_to_diskimage_builder():
    wanted = prefetch.element_packages(_spec("host-image"), known={"openvswitch-switch", "sudo"})
    assert sorted(wanted) == ["openvswitch-switch", "sudo"]


def test_the_base_goes_into_debootstraps_cache_and_the_rest_beside_it(tmp_path):
    apt_cache, directory = tmp_path / "apt", tmp_path / "prefetched"
    apt_cache.mkdir()
    directory.mkdir()
    (apt_cache / "apt_1_amd64.deb").write_text("an earlier build's")
    release = FakeRelease({"sudo", "python3", "openvswitch-switch"})
    prefetch.prefetch(_spec("host-image"), release, directory, apt_cache)
    base_call, elements_call = release.calls
    assert base_call[0] == list(prefetch.DEBOOTSTRAP_BASE) and base_call[2] is True  # RELEASE's versions
    assert elements_call[1] == directory and elements_call[2] is False
    # The base is linked in, a file already there left alone; the elements' stay beside it.
    assert (apt_cache / "apt_1_amd64.deb").read_text() == "an earlier build's"
    assert (apt_cache / "priorityrequired_1_amd64.deb").stat().st_nlink == 2
    assert (directory / "openvswitch-switch_1_amd64.deb").is_file()
    assert not (apt_cache / "openvswitch-switch_1_amd64.deb").exists()


def test_without_debootstrap_only_the_elements_packages_are_fetched(tmp_path):
    release = FakeRelease({"sudo"})
    prefetch.prefetch(_spec("host-image"), release, tmp_path, apt_cache=None)
    assert [call[0] for call in release.calls] == [["sudo"]]


def test_a_failed_prefetch_is_reported_and_the_build_goes_on(tmp_path, capsys):
    release = FakeRelease({"sudo"}, fail_on="apt")
    prefetch.prefetch(_spec("host-image"), release, tmp_path / "prefetched", tmp_path)
    assert "prefetch stopped, diskimage-builder downloads the rest itself: cannot download" in capsys.readouterr().err
    assert len(release.calls) == 1


@pytest.mark.parametrize(("path", "expected"), [
    ("/root/.cache/kvm-image-pipeline/apt/debian", "--cache-dir=/root/.cache/kvm-image-pipeline/apt/debian"),
    ("/home/my cache/apt/debian", ""),  # DIB runs debootstrap through sh -c: it would split the path
    ("/tmp/$(reboot)/apt", ""),
])
def test_debootstrap_is_given_the_cache_only_as_one_word(path, expected):
    assert prefetch.debootstrap_arguments(Path(path)) == expected


def test_fetch_asks_apt_for_the_closure_without_recommends_into_the_directory(tmp_path, monkeypatch):
    release = archive.ReleaseArchive("trixie", "http://mirror.test/debian", "http://mirror.test/security",
                                     tmp_path / "index")
    monkeypatch.setattr(archive.ReleaseArchive, "update", lambda self, max_age=0: None)
    seen: list[list[str]] = []

    def fake_run(argv, **kwargs):
        seen.append([str(a) for a in argv])
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(archive, "run", fake_run)
    release.fetch(["?priority(required)", "apt"], tmp_path / "debs", only_release=True)
    argv = seen[0]
    assert argv[0] == "apt-get" and argv[-3:] == ["install", "?priority(required)", "apt"]
    assert "--download-only" in argv and f"Dir::Cache::Archives={tmp_path / 'debs'}" in argv
    assert "APT::Install-Recommends=false" in argv and "APT::Default-Release=trixie" in argv
    assert f"Dir::State::status={tmp_path / 'index' / 'status'}" in argv  # nothing counts as installed


def test_a_fetch_apt_refuses_names_the_mirror(tmp_path, monkeypatch):
    release = archive.ReleaseArchive("trixie", "http://mirror.test/debian", "http://mirror.test/security",
                                     tmp_path / "index")
    monkeypatch.setattr(archive.ReleaseArchive, "update", lambda self, max_age=0: None)

    def failing_run(argv, **kwargs):
        raise CommandFailed([str(a) for a in argv], 100, "E: Unable to locate package nosuch")

    monkeypatch.setattr(archive, "run", failing_run)
    with pytest.raises(PipelineError, match=r"from http://mirror.test/debian: .*nosuch"):
        release.fetch(["nosuch"], tmp_path)


# --- kvm-build-speed's hooks, run as diskimage-builder runs them, on a fake build directory


def _hook_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"PATH": os.environ["PATH"], "TMP_BUILD_DIR": str(tmp_path), "TMP_MOUNT_PATH": str(tmp_path / "mnt"),
            "DIB_PYTHON_EXEC": sys.executable, **extra}


def _dib_build_dir(tmp_path: Path) -> None:
    """As disk-image-create leaves it before its block-device.d: the tree moved to built/."""
    (tmp_path / "built" / "etc").mkdir(parents=True)
    (tmp_path / "built" / "etc" / "hostname").write_text("tree\n")
    (tmp_path / "states" / "block-device").mkdir(parents=True)


def test_the_tree_stays_in_place_of_the_block_device(tmp_path):
    _dib_build_dir(tmp_path)
    done = subprocess.run([SPEED / "block-device.d/10-tree-in-place"], env=_hook_env(tmp_path, DIB_TREE_IN_PLACE="1"),
                          check=True, capture_output=True, text=True)
    # disk-image-create evaluates this line, and then makes no block device of its own.
    assert done.stdout.strip().splitlines()[-1] == "IMAGE_BLOCK_DEVICE=none"
    assert (tmp_path / "mnt" / "etc" / "hostname").read_text() == "tree\n"
    # Its `cp -ra built/* mnt` copies only the placeholder; its later calls read this state.
    assert [p.name for p in (tmp_path / "built").iterdir()] == ["kvm-build-speed-tree-in-place"]
    state = tmp_path / "states" / "block-device"
    assert json.loads((state / "state.json").read_text())["blockdev"]["image0"] == {"image": "", "device": ""}
    assert pickle.loads((state / "nodes.pickle").read_bytes()) == []  # nothing to unmount or clean up
    # pre-finalise: the placeholder out, the root's lost+found in, as mkfs would have made it.
    (tmp_path / "mnt" / "kvm-build-speed-tree-in-place").touch()
    fake_sudo = tmp_path / "bin"
    fake_sudo.mkdir()
    (fake_sudo / "sudo").write_text('#!/bin/sh\nexec "$@"\n')  # the pipeline runs DIB as root
    (fake_sudo / "sudo").chmod(0o755)
    env = _hook_env(tmp_path, DIB_TREE_IN_PLACE="1", PATH=f"{fake_sudo}:{os.environ['PATH']}")
    subprocess.run([SPEED / "pre-finalise.d/01-tree-in-place"], env=env, check=True)
    assert not (tmp_path / "mnt" / "kvm-build-speed-tree-in-place").exists()
    assert (tmp_path / "mnt" / "lost+found").stat().st_mode & 0o777 == 0o700


def test_without_the_pipelines_word_diskimage_builder_makes_its_block_device(tmp_path):
    _dib_build_dir(tmp_path)
    done = subprocess.run([SPEED / "block-device.d/10-tree-in-place"], env=_hook_env(tmp_path),
                          check=True, capture_output=True, text=True)
    assert "IMAGE_BLOCK_DEVICE" not in done.stdout
    assert (tmp_path / "built" / "etc" / "hostname").is_file() and not (tmp_path / "mnt").exists()


def test_a_build_directory_not_as_expected_fails_the_build(tmp_path):
    _dib_build_dir(tmp_path)
    (tmp_path / "mnt").mkdir()  # a block device mounted there already
    done = subprocess.run([SPEED / "block-device.d/10-tree-in-place"], env=_hook_env(tmp_path, DIB_TREE_IN_PLACE="1"),
                          capture_output=True, text=True)
    assert done.returncode != 0 and "not as disk-image-create leaves them" in done.stderr
    assert (tmp_path / "built" / "etc" / "hostname").is_file()  # nothing moved


def test_prefetched_packages_are_linked_into_the_apt_cache(tmp_path):
    prefetched, image_cache = tmp_path / "prefetched", tmp_path / "layer"
    prefetched.mkdir()
    (image_cache / "apt" / "debian").mkdir(parents=True)
    (prefetched / "tuned_2.25_all.deb").write_text("fetched")
    (prefetched / "sudo_1.9_amd64.deb").write_text("fetched")
    (image_cache / "apt" / "debian" / "sudo_1.9_amd64.deb").write_text("cached before")
    env = _hook_env(tmp_path, DIB_PREFETCHED_PACKAGES=str(prefetched), DIB_IMAGE_CACHE=str(image_cache),
                    DISTRO_NAME="debian")
    done = subprocess.run([SPEED / "extra-data.d/30-prefetched-packages"], env=env, check=True,
                          capture_output=True, text=True)
    assert "1 prefetched packages linked" in done.stdout
    linked = image_cache / "apt/debian/tuned_2.25_all.deb"
    assert linked.stat().st_ino == (prefetched / "tuned_2.25_all.deb").stat().st_ino
    assert (image_cache / "apt/debian/sudo_1.9_amd64.deb").read_text() == "cached before"


def test_no_prefetch_no_links(tmp_path):
    env = _hook_env(tmp_path, DIB_IMAGE_CACHE=str(tmp_path), DISTRO_NAME="debian")
    subprocess.run([SPEED / "extra-data.d/30-prefetched-packages"], env=env, check=True)
    assert not (tmp_path / "apt").exists()


@pytest.fixture
def across_file_systems(tmp_path, monkeypatch):
    """(source, target): a fetched .deb in source, and os.link failing as across file systems (EXDEV)."""
    source, target = tmp_path / "base", tmp_path / "apt"
    source.mkdir()
    target.mkdir()
    (source / "apt_3.0_amd64.deb").write_text("fetched")

    def cross_device(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(prefetch.os, "link", cross_device)
    return source, target


def test_an_apt_cache_on_another_file_system_gets_copies(across_file_systems):
    """os.link fails across file systems (EXDEV): the base is copied in, renamed into place whole."""
    source, target = across_file_systems
    assert prefetch._link_debs(source, target) == 1
    assert (target / "apt_3.0_amd64.deb").read_text() == "fetched"
    assert sorted(p.name for p in target.iterdir()) == ["apt_3.0_amd64.deb"]  # no partial file left


def test_a_copy_cut_short_leaves_nothing_in_the_apt_cache(across_file_systems, monkeypatch):
    """A full disk while copying: the error goes on to the prefetch's report, and no partial file stays."""
    source, target = across_file_systems

    def disk_full(src, dst):
        Path(dst).write_text("fetc")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(prefetch.shutil, "copyfile", disk_full)
    with pytest.raises(OSError, match="No space left"):
        prefetch._link_debs(source, target)
    assert list(target.iterdir()) == []


def test_the_link_hook_copies_into_an_apt_cache_on_another_file_system(tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on a file system other than the test's temporary directory")
    with tempfile.TemporaryDirectory(dir=shm) as prefetched:
        (Path(prefetched) / "tuned_2.25_all.deb").write_text("fetched")
        image_cache = tmp_path / "layer"
        (image_cache / "apt" / "debian").mkdir(parents=True)
        env = _hook_env(tmp_path, DIB_PREFETCHED_PACKAGES=prefetched, DIB_IMAGE_CACHE=str(image_cache),
                        DISTRO_NAME="debian")
        subprocess.run([SPEED / "extra-data.d/30-prefetched-packages"], env=env, check=True, capture_output=True)
    assert [p.name for p in (image_cache / "apt" / "debian").iterdir()] == ["tuned_2.25_all.deb"]
    assert (image_cache / "apt" / "debian" / "tuned_2.25_all.deb").read_text() == "fetched"
