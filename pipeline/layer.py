"""The package layer: the tree as it stands after package installation, cached across builds.

Installing some 350 packages is most of a build. A rebuild after a change to an element's
hooks, static files or policy needs none of it again, so the tree is saved right after
the installs (the kvm-package-layer element) under a key of everything that shapes it up
to there, and a later build with the same key starts from it: diskimage-builder unpacks it
as its own debootstrap cache tarball and the installs find nothing to do. Every later hook
runs as in a cold build, so the image is the same (the rebuild test compares file lists).

    CACHE/layers/KEY/debootstrap-debian-RELEASE-amd64.tar.gz   the layer (DIB's cache name)
    CACHE/layers/KEY/xattrs.json                               its file capabilities etc.
    CACHE/layers/KEY/complete                                  written after a successful build
    CACHE/layers/KEY/apt -> ../../apt                          .debs, shared by every layer
    CACHE/debootstrap-debian-RELEASE-amd64.tar.gz               debootstrap's base, shared too

A layer older than MAX_AGE is built again, so security updates reach the packages.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .inputs import PIPELINE_ELEMENTS, Element, dib_version, resolved_elements, tree_digest
from .spec import ImageSpec

ELEMENT, = PIPELINE_ELEMENTS  # kvm-package-layer
MAX_AGE = 7 * 24 * 3600
KEEP = 4  # layers kept in the cache, most recently used first
COMPLETE = "complete"
XATTRS = "xattrs.json"
# What runs up to and during package installation, in an element's tree.
BEFORE_INSTALL = ("root.d", "extra-data.d", "pre-install.d", "environment.d", "package-installs.yaml",
                  "pkg-map", "element-deps")


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
    return digest.hexdigest()


@dataclass(frozen=True)
class PackageLayer:
    directory: Path
    base: Path  # debootstrap's own tarball
    tarball: Path

    @property
    def complete(self) -> bool:
        marker = self.directory / COMPLETE
        return (marker.is_file() and self.tarball.is_file() and (self.directory / XATTRS).is_file()
                and time.time() - marker.stat().st_mtime < MAX_AGE)

    def prepare(self) -> bool:
        """Make the directory ready for DIB; True if the build starts from a saved layer."""
        self.directory.mkdir(parents=True, exist_ok=True)
        shared_apt = self.directory.parent.parent / "apt"
        shared_apt.mkdir(exist_ok=True)
        if not (self.directory / "apt").is_symlink():
            (self.directory / "apt").symlink_to(os.path.relpath(shared_apt, self.directory))
        if self.complete:
            os.utime(self.directory / COMPLETE)  # recently used: kept by prune
            return True
        for stale in (self.directory / COMPLETE, self.directory / XATTRS, self.tarball):
            stale.unlink(missing_ok=True)
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
            "DIB_DEBOOTSTRAP_CACHE": "1",  # no base yet: debootstrap's tree is kept (then moved to self.base)
            "DIB_PACKAGE_LAYER_SAVE": "1" if saving else "",
            "DIB_PACKAGE_LAYER_BASE": str(self.base),
        }

    def finish(self) -> None:
        """After a successful build: a layer saved by it is complete."""
        if self.tarball.is_file() and (self.directory / XATTRS).is_file():
            (self.directory / COMPLETE).write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ\n", time.gmtime()))
        prune(self.directory.parent)


def layer_for(spec: ImageSpec, cache_dir: Path) -> PackageLayer:
    elements = resolved_elements(spec)
    directory = Path(cache_dir) / "layers" / key(spec, elements)[:16]
    return PackageLayer(directory, Path(cache_dir) / _tarball_name(spec), directory / _tarball_name(spec))


def prune(layers: Path, keep: int = KEEP) -> None:
    """Remove all but the `keep` most recently used layers."""
    used = sorted(((d / COMPLETE).stat().st_mtime if (d / COMPLETE).is_file() else d.stat().st_mtime, d)
                  for d in layers.iterdir() if d.is_dir())
    for _, directory in used[:-keep]:
        shutil.rmtree(directory, ignore_errors=True)
