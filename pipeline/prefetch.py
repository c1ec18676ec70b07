"""The image's packages downloaded beside diskimage-builder, by apt, before it asks for them.

In a cold build, debootstrap fetches its 80-odd packages one at a time (6.7 s of a host build
here), and the elements' packages come in one apt run after debootstrap and debian-minimal's base
install (7 s for 184 MB). While diskimage-builder starts, apt with the image's own index
(archive.ReleaseArchive, fetched by the preflight) downloads them pipelined:

- debootstrap's base, as it takes it (priority required, and apt; from RELEASE alone), into
  `directory`, and linked from there into the apt cache that debootstrap is told to read
  (`--cache-dir`);
- then what the elements install, with what it depends on, into `directory` too, which
  kvm-build-speed's extra-data.d/30-prefetched-packages links into the apt cache after
  debian-minimal's root.d has emptied it (apt-get clean).

Both only fill a cache: debootstrap checks a file's checksum and apt its hash before using it, and
downloads whatever is missing itself. So a prefetch that fails costs its time and nothing else.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from . import archive, inputs
from .check.elements import PACKAGE_INSTALLS, package_installs
from .errors import PipelineError
from .progress import say
from .spec import ImageSpec

# debian-minimal's root.d/75-debian-minimal-baseinstall installs these after debootstrap.
BASE_INSTALL = ("systemd-sysv", "busybox", "sudo", "gnupg2", "python3")
# debootstrap --variant=minbase: every package of priority required, and apt.
DEBOOTSTRAP_BASE = ("?priority(required)", "apt")
# kvm-build-speed's extra-data.d/99-zz-one-kernel leaves the generic kernel out beside the cloud one.
CLOUD_KERNEL, GENERIC_KERNEL = "linux-image-cloud-amd64", "linux-image-amd64"
FETCH_TIMEOUT = 600
# debootstrap's arguments are split on white space (DIB runs it through sh -c).
_PLAIN_PATH = re.compile(r"/[A-Za-z0-9._/+-]*")


def element_packages(spec: ImageSpec, known: set[str]) -> list[str]:
    """What the build installs by name, as far as the elements say it without conditions: every
    element's package-installs.yaml (DIB's too), debian-minimal's base install, the spec's own.
    Names the release does not have (a pkg-map name, a virtual package) are left to DIB."""
    names: list[str] = [*BASE_INSTALL]
    for element in inputs.resolved_elements(spec):
        path = element.path / PACKAGE_INSTALLS
        if not path.is_file():
            continue
        try:
            names += package_installs(path)[0]
        except PipelineError:  # a form the check does not read: DIB fetches that element's packages
            continue
    wanted = [name for name in dict.fromkeys([*names, *spec.packages]) if name in known]
    if CLOUD_KERNEL in wanted and GENERIC_KERNEL in wanted:
        wanted.remove(GENERIC_KERNEL)
    return wanted


def debootstrap_arguments(apt_cache: Path) -> str:
    """debootstrap's extra arguments (DIB_DEBOOTSTRAP_EXTRA_ARGS): read and keep packages in the apt cache."""
    if not _PLAIN_PATH.fullmatch(str(apt_cache)):
        return ""  # a path sh would split: debootstrap downloads as before
    return f"--cache-dir={apt_cache}"


def _link_debs(source: Path, target: Path) -> int:
    """Hard links in target to source's .deb files that target does not have (both are under the
    cache directory); copies, renamed into place whole, where target is on another file system."""
    linked = 0
    for deb in source.glob("*.deb"):
        if (target / deb.name).exists():
            continue
        try:
            os.link(deb, target / deb.name)
        except FileExistsError:
            continue
        except OSError:  # EXDEV: the apt cache mounted or linked elsewhere
            partial = target / f".{deb.name}.partial"
            try:
                shutil.copyfile(deb, partial)
                os.replace(partial, target / deb.name)
            finally:
                partial.unlink(missing_ok=True)  # a copy cut short (a full disk) is not left in the cache
        linked += 1
    return linked


def prefetch(spec: ImageSpec, release: archive.ReleaseArchive, directory: Path, apt_cache: Path | None) -> None:
    """Fetch debootstrap's base (linked into apt_cache, when debootstrap will run) and then the
    elements' packages into directory. Best effort: a failure is reported and the build goes on."""
    try:
        if apt_cache:
            # Into the same directory: the elements' fetch then skips what the base holds already.
            release.fetch(list(DEBOOTSTRAP_BASE), directory, only_release=True, timeout=FETCH_TIMEOUT)
            say(f"prefetched debootstrap's base: {_link_debs(directory, apt_cache)} packages")
        packages = element_packages(spec, release.package_names())
        release.fetch(packages, directory, timeout=FETCH_TIMEOUT)
        say(f"prefetched the elements' packages: {len(list(directory.glob('*.deb')))} in all "
            f"(for {len(packages)} named)")
    except (PipelineError, OSError) as error:
        say(f"prefetch stopped, diskimage-builder downloads the rest itself: {error}")
