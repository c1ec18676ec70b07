"""The package layer: the tree as it stands after package installation, cached across builds.

Installing some 350 packages is most of a build. A rebuild after a change to an element's
hooks, static files or policy needs none of it again, so the tree is saved right after
the installs (the kvm-package-layer element) under a key of everything that shapes it up
to there, and a later build with the same key starts from it: diskimage-builder unpacks it
in place of its own debootstrap cache tarball and the installs find nothing to do. Every later hook
runs as in a cold build, so the image is the same (the rebuild test compares file lists).

    CACHE/layers/KEY/layer.tar                                 the layer, uncompressed
    CACHE/layers/KEY/debootstrap-debian-RELEASE-amd64.tar.gz   DIB's cache name: an empty tarball
                                                               (debootstrap's base while one is made)
    CACHE/layers/KEY/xattrs.json                               its file capabilities etc.
    CACHE/layers/KEY/layer.json                                written after a successful build:
                                                               when it was made, the sha256 of the three above
    CACHE/layers/KEY/apt -> ../../apt                          .debs, shared by every layer
    CACHE/layers/KEY/policy/MODULES.tar                        the policy store our SELinux modules
                                                               make from the layer's (kvm-build-speed)
    CACHE/layers/KEY.lock                                      held by the build using the layer
    CACHE/debootstrap-debian-RELEASE-amd64.tar.gz               debootstrap's base, shared too

A layer is used only if its files have the sha256 recorded; one made more than MAX_AGE ago
is built again, so security updates reach the packages. A build holds the layer's lock from
prepare() to finish(), so a second build with the same key waits, then starts from the layer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from . import atomic, locking
from .artifacts import read_json
from .errors import PipelineError
from .inputs import PACKAGE_LAYER_ELEMENT, Element, dib_version, resolved_elements, tree_digest
from .manifest import sha256
from .spec import ImageSpec

ELEMENT = PACKAGE_LAYER_ELEMENT
MAX_AGE = 7 * 24 * 3600
# Layers kept in the cache, most recently used first: one per image of images.toml (five: each
# release's guest and host, and the installer), with room for a user's own. With fewer, building
# every image evicts the first one's layer before its next build (seen in CI: the guest's rebuild
# downloaded its packages again).
KEEP = 8
# The holder runs diskimage-builder, a few minutes (a cold build's tree: under 4 on the benchmark
# machine); waiting an hour means that build is stuck, and this one should not wait on.
LOCK_TIMEOUT = 3600
RECORD = "layer.json"
XATTRS = "xattrs.json"
SAVING = "saving"  # where install.d/02-package-layer-save writes (root.d/08-package-layer mounts it)
PREFETCHED = "prefetched"
# What runs up to and during package installation, in an element's tree (bin/: the commands
# its hooks call, as kvm-build-speed's pre-install.d does).
BEFORE_INSTALL = ("root.d", "extra-data.d", "pre-install.d", "environment.d", "package-installs.yaml",
                  "pkg-map", "element-deps", "bin")
# install.d hooks named before this one (the layer's save) run before the save: kvm-build-speed's
# 01-zz-initramfs-once makes the initramfs that the layer keeps, and 01-zzz-policy-build-wait
# waits for the policy build whose store it keeps.
SAVE_HOOK = "02-package-layer-save"


def _tarball_name(spec: ImageSpec) -> str:
    """diskimage-builder's debootstrap cache name (elements/debootstrap/root.d/08-debootstrap)."""
    return f"debootstrap-{spec.distro}-{spec.release}-amd64.tar.gz"


def key(spec: ImageSpec, elements: list[Element]) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({"distro": spec.distro, "release": spec.release, "mirrors": spec.to_json()["mirrors"],
                              "packages": sorted(spec.packages), "diskimage-builder": dib_version(),
                              "elements": [e.name for e in elements]}, sort_keys=True).encode())
    for element in elements:
        if element.ours:
            for part in BEFORE_INSTALL if element.name != ELEMENT else ("",):
                path = element.path / part
                digest.update(f"{element.name}/{part}\n".encode())
                if path.is_dir():
                    tree_digest(digest, path)
                elif path.is_file():
                    digest.update(hashlib.sha256(path.read_bytes()).digest())
            for hook in sorted((element.path / "install.d").glob("*")):
                if hook.name < SAVE_HOOK and element.name != ELEMENT:
                    digest.update(f"{element.name}/install.d/{hook.name}\n".encode())
                    digest.update(hashlib.sha256(hook.read_bytes()).digest())
    return digest.hexdigest()


@dataclass(frozen=True)
class PackageLayer:
    directory: Path
    base: Path  # debootstrap's own tarball
    tarball: Path  # in DIB's debootstrap cache's place: the base while a layer is made, then empty

    @property
    def contents(self) -> Path:
        """The tree as a plain tar (kvm-package-layer's root.d/07-package-layer-unpack)."""
        return self.directory / "layer.tar"

    @property
    def files(self) -> tuple[Path, Path, Path]:
        return self.contents, self.tarball, self.directory / XATTRS

    @property
    def complete(self) -> bool:
        """Saved by a build that succeeded, less than MAX_AGE ago, and its files unchanged since."""
        try:
            record = read_json(self.directory / RECORD, "no layer saved")
            return (time.time() - record["created"] < MAX_AGE
                    and all(record["sha256"][path.name] == sha256(path) for path in self.files))
        except (PipelineError, OSError, KeyError, TypeError):  # a layer that is unusable is rebuilt
            return False

    @property
    def apt_cache(self) -> Path:
        """DIB's apt cache (its dpkg element's DIB_APT_LOCAL_CACHE: DIB_IMAGE_CACHE/apt/DISTRO_NAME),
        shared by every layer (prepare links apt/ to it)."""
        return self.directory / "apt" / "debian"

    @property
    def prefetched(self) -> Path:
        """Where the build's prefetch (pipeline/prefetch.py) puts the elements' packages."""
        return self.directory / PREFETCHED

    @property
    def policy_cache(self) -> Path:
        return self.directory / "policy"

    @property
    def lock_path(self) -> Path:
        return _lock_path(self.directory)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the layer's lock: a second build with the same key waits here."""
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        with locking.lock_or_wait(self.lock_path, f"package layer {self.directory.name}", LOCK_TIMEOUT):
            yield

    def prepare(self) -> bool:
        """Make the directory ready for DIB; True if the build starts from a saved layer."""
        self.directory.mkdir(parents=True, exist_ok=True)
        shared_apt = self.directory.parent.parent / "apt"
        shared_apt.mkdir(exist_ok=True)
        if not (self.directory / "apt").is_symlink():
            (self.directory / "apt").symlink_to(os.path.relpath(shared_apt, self.directory))
        if self.complete:
            os.utime(self.directory / RECORD)  # recently used: kept by prune
            return True
        for stale in (self.directory / RECORD, *self.files):
            stale.unlink(missing_ok=True)
        for leftover in (SAVING, PREFETCHED):  # what a failed build was saving, and had fetched
            shutil.rmtree(self.directory / leftover, ignore_errors=True)
        shutil.rmtree(self.policy_cache, ignore_errors=True)  # made from the old layer's store
        if self.base.is_file():  # debootstrap need not run: start from its base
            try:
                os.link(self.base, self.tarball)
            except OSError:
                shutil.copyfile(self.base, self.tarball)
        return False

    def environment(self, saving: bool) -> dict[str, str]:
        return {
            "DIB_IMAGE_CACHE": str(self.directory),
            "DIB_DEBIAN_USE_DEBOOTSTRAP_CACHE": "1",  # the layer, or debootstrap's base when there is one
            # (no base yet: root.d/08-package-layer keeps debootstrap's tree as the base)
            "DIB_PACKAGE_LAYER_SAVE": "1" if saving else "",
            "DIB_PACKAGE_LAYER_BASE": str(self.base),
            "DIB_POLICY_STORE_CACHE": str(self.policy_cache),
        }

    def finish(self) -> None:
        """After a successful build: a layer saved by it is complete (one it started from keeps
        its record, and so its age)."""
        record = self.directory / RECORD
        if not record.is_file() and all(path.is_file() for path in self.files):
            atomic.write_json(record, {"created": time.time(),
                                       "sha256": {path.name: sha256(path) for path in self.files}})
        prune(self.directory.parent)


def layer_for(spec: ImageSpec, cache_dir: Path) -> PackageLayer:
    elements = resolved_elements(spec)
    directory = Path(cache_dir) / "layers" / key(spec, elements)[:16]
    return PackageLayer(directory, Path(cache_dir) / _tarball_name(spec), directory / _tarball_name(spec))


def _lock_path(directory: Path) -> Path:
    """Beside the layer's directory, so that it outlives a rmtree of it."""
    return directory.with_name(directory.name + ".lock")


def prune(layers: Path, keep: int = KEEP) -> None:
    """Remove all but the `keep` most recently used layers; never one a build holds."""
    used = sorted(((d / RECORD).stat().st_mtime if (d / RECORD).is_file() else d.stat().st_mtime, d)
                  for d in layers.iterdir() if d.is_dir())
    for _, directory in used[:max(len(used) - keep, 0)]:
        lock_path = _lock_path(directory)
        with locking.try_lock(lock_path) as free:
            if free:
                shutil.rmtree(directory, ignore_errors=True)
                lock_path.unlink()
