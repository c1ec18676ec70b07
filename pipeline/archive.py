"""A Debian release's archive as an image sees it: apt with a private state for that release.

The build host's own apt knows the host's release, not the image's: a Debian 12 host asked
about tuned names bookworm's, whatever the spec says. So each (release, mirrors) gets its own
sources list, index and empty dpkg status under the cache, and apt reads only those. The index
is fetched and its signature checked by apt itself (against the host's trusted archive keys),
with the sources DIB's debian-minimal gives the image: RELEASE, RELEASE-updates and
RELEASE-security, main. Nothing is installed on the host.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import PipelineError
from .locking import lock_or_wait
from .paths import DEFAULT_CACHE
from .progress import say
from .run import run

if TYPE_CHECKING:
    from .spec import ImageSpec

ARCH = "amd64"
COMPONENT = "main"
# An index younger than this is used as it is: validating a profile or a package list needs no
# newer one, and a rebuild or a unit test run then needs no network.
MAX_AGE = 24 * 3600
UPDATE_TIMEOUT = 600
RETRIES = 3  # apt's own default: a mirror that drops one connection is not unreachable
LOCK_TIMEOUT = 600
# apt's line for a source it could not read: "E: Failed to fetch URL  REASON" (two spaces).
FAILED_FETCH = re.compile(r"^[EW]: Failed to fetch (\S+)\s+(.*)$", re.MULTILINE)


@dataclass(frozen=True)
class ReleaseArchive:
    """One release's package index, kept in `root` (cache_dir/apt-index/RELEASE-HASH)."""

    release: str
    debian: str  # mirror URLs, as in a spec's `mirrors`
    security: str
    root: Path

    @property
    def sources(self) -> str:
        return (f"deb {self.debian} {self.release} {COMPONENT}\n"
                f"deb {self.debian} {self.release}-updates {COMPONENT}\n"
                f"deb {self.security} {self.release}-security {COMPONENT}\n")

    def options(self) -> list[str]:
        """apt's -o options that make it read this release's state and nothing of the host's."""
        settings = {
            "Dir::Etc::SourceList": self.root / "sources.list",
            "Dir::Etc::SourceParts": "/dev/null",
            "Dir::Etc::Preferences": "/dev/null",  # no host pinning
            "Dir::Etc::PreferencesParts": "/dev/null",
            "Dir::State::Lists": self.root / "lists",
            "Dir::State::status": self.root / "status",  # empty: nothing counts as installed
            "Dir::Cache": self.root,
            "Dir::Cache::pkgcache": "pkgcache.bin",  # apt's binary cache of the index, made once
            "Dir::Cache::srcpkgcache": "",
            "Acquire::Retries": str(RETRIES),
            "APT::Architecture": ARCH,
            "APT::Architectures": ARCH,
            "Acquire::Languages": "none",
            # As root, apt downloads as _apt, which cannot enter a root-only cache directory.
            "APT::Sandbox::User": "root",
        }
        return [arg for key, value in settings.items() for arg in ("-o", f"{key}={value}")]

    def _apt(self, tool: str, *args: str | Path, **kwargs):
        try:
            # LC_ALL=C: we parse apt's output, which is translated otherwise.
            return run([tool, *self.options(), *args], capture=True, env={"LC_ALL": "C"}, **kwargs)
        except FileNotFoundError:
            raise PipelineError(f"{tool} not found: reading Debian {self.release}'s package index needs apt "
                                "(Debian package apt)") from None

    def update(self, max_age: float = MAX_AGE) -> None:
        """Fetch the index unless one younger than max_age seconds is there; one process at a time."""
        stamp = self.root / "updated"
        self.root.mkdir(parents=True, exist_ok=True)
        with lock_or_wait(self.root / "lock", f"Debian {self.release}'s package index", LOCK_TIMEOUT):
            if stamp.is_file() and time.time() - stamp.stat().st_mtime < max_age:
                return
            (self.root / "lists" / "partial").mkdir(parents=True, exist_ok=True)
            (self.root / "sources.list").write_text(self.sources)
            (self.root / "status").touch()
            say(f"fetching Debian {self.release}'s package index from {self.debian}")
            # --error-on=any: a source that cannot be read is an error, not a warning with exit 0.
            done = self._apt("apt-get", "-q", "--error-on=any", "update", timeout=UPDATE_TIMEOUT, check=False)
            if done.returncode != 0:
                failed = FAILED_FETCH.search(done.stderr)
                if failed:
                    raise PipelineError(f"cannot read Debian {self.release}'s package index: mirror unreachable: "
                                        f"{failed[1]}: {failed[2].strip()}")
                last = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
                raise PipelineError(f"cannot read Debian {self.release}'s package index from {self.debian}: {last}")
            stamp.touch()

    def candidate(self, package: str) -> str:
        """The version of `package` an image of this release would install."""
        self.update()
        out = self._apt("apt-cache", "policy", package).stdout
        match = re.search(r"^\s*Candidate:\s*(\S+)", out, re.MULTILINE)
        if not match or match[1] == "(none)":
            raise PipelineError(f"Debian {self.release} has no package {package} in {self.debian} "
                                f"({self.release}, {self.release}-updates) or {self.security} "
                                f"({self.release}-security), {COMPONENT}, {ARCH}")
        return match[1]

    def download(self, package: str, version: str, directory: Path) -> Path:
        """Download package=version's .deb into `directory` (apt checks its hash against the index)."""
        self.update()
        try:
            self._apt("apt-get", "-q", "download", f"{package}={version}", cwd=directory, timeout=UPDATE_TIMEOUT)
        except PipelineError as error:
            raise PipelineError(f"cannot download {package} {version} of Debian {self.release} from {self.debian}: "
                                f"{error}") from None
        debs = list(directory.glob(f"{package}_*.deb"))
        if len(debs) != 1:
            raise PipelineError(f"apt-get download {package}={version} left {len(debs)} .deb files in {directory}")
        return debs[0]

    def fetch(self, packages: list[str], directory: Path, only_release: bool = False,
              timeout: float = UPDATE_TIMEOUT) -> None:
        """Download packages (names or apt patterns), with everything they depend on but not what they
        recommend, as for an image with nothing installed yet, into directory (apt checks each
        hash). only_release: the versions in RELEASE itself, not -updates or -security (the ones
        debootstrap takes)."""
        self.update()
        options = ["-o", f"Dir::Cache::Archives={directory}", "-o", "APT::Install-Recommends=false"]
        if only_release:
            options += ["-o", f"APT::Default-Release={self.release}"]
        try:
            self._apt("apt-get", "-q", "-y", "--download-only", *options, "install", *packages, timeout=timeout)
        except PipelineError as error:
            raise PipelineError(f"cannot download Debian {self.release}'s packages from {self.debian}: "
                                f"{error}") from None

    def package_names(self) -> set[str]:
        """Every real package of the release (a name only other packages Provide is not one)."""
        self.update()
        return set(self._apt("apt-cache", "pkgnames").stdout.split())


def release_archive(release: str, debian: str, security: str, cache_dir: Path = DEFAULT_CACHE) -> ReleaseArchive:
    # One state per release and mirrors: a private mirror's index never mixes with Debian's.
    key = hashlib.sha256(f"{debian}\n{security}\n".encode()).hexdigest()[:12]
    return ReleaseArchive(release, debian, security, Path(cache_dir) / "apt-index" / f"{release}-{key}")


def for_spec(spec: ImageSpec, cache_dir: Path = DEFAULT_CACHE) -> ReleaseArchive:
    """The archive that an image is built from."""
    return release_archive(spec.release, spec.mirrors.debian, spec.mirrors.security, cache_dir)
