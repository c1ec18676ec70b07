"""Publish built images: proven, signed, versioned, with an SBOM; `latest` moves last.

TARGET/NAME/VERSION/ holds NAME.qcow2, NAME.tar.gz (the liveimg artifact), NAME.vmlinuz,
NAME.initrd, NAME.files.tsv (when built), manifest.json, sbom.cdx.json (CycloneDX 1.6),
SHA256SUMS over all of them and SHA256SUMS.asc (a detached, armored GnuPG signature);
TARGET/NAME/latest is a symlink to a VERSION. A version is the build date and the input hash's
first 8 hex digits.

Nothing is written before the build is proven (verify.verify_build): build-info.json names a
well-formed version, the offline check and the boot test passed on this very qcow2, every file
published or made into the SBOM hashes to the sha256 the build recorded for it, the SBOM
validates against CycloneDX's schema (sbom.py), and the signing key exists (sign.py).

A version is assembled in a hidden directory (hard links where the file system allows),
checked with `sha256sum --check`, signed, the signature verified, and only then moved into
place; `latest` is replaced after that (once the version's files pass `sha256sum --check`),
and old versions beyond the retention count are pruned last (never the one `latest` names),
each hidden by a rename before it is deleted. A publish killed at any point leaves the previous
`latest` and every visible version as they were; its hidden leftovers are removed by the next
publish, which the target's lock proves is the only one.

Versions are immutable. Publishing a version that is already there (same date, same inputs)
keeps what is published, says whether its artifacts are identical to this build's, and
points `latest` at it: a rerun CI job succeeds, republishing an older build is a rollback,
and published checksums never change under a name.

Where it goes is a Target (targets/base.py): a local directory (targets/local.py), or a host
over ssh (targets/remote.py). verify.verify_version is how a published version is used
(kickstart.render, pxe.render): gpg --verify of SHA256SUMS, then sha256sum --check of the files.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from .. import tools
from ..errors import PipelineError
from ..manifest import sha256
from ..progress import say, step
from .sbom import SBOM, build_sbom
from .sign import gnupg_home_of, require_key, sign
from .targets.base import LATEST, Target
from .targets.local import LocalTarget
from .targets.remote import RemoteTarget
from .verify import SUMS, Build, check_sums, read_sums, verify_build, write_sums


@dataclass(frozen=True)
class Published:
    image: str
    version: str
    location: str  # where the version directory is: a path, or host:path
    new: bool  # False: the version was published before and was kept
    pruned: tuple[str, ...] = ()


def _link_or_copy(source: Path, destination: Path) -> None:
    try:
        os.link(source, destination)
    except OSError:  # another file system, or links not allowed there
        shutil.copyfile(source, destination)


def assemble(build: Build, staged: Path, sbom: str, fingerprint: str, gnupg_home: Path | None) -> None:
    """Write the version's whole tree into `staged`, checked and signed."""
    art = build.artifacts
    staged.mkdir()
    for file in build.sums:
        _link_or_copy(art.directory / file, staged / file)
    shutil.copyfile(art.manifest, staged / art.manifest.name)
    (staged / SBOM).write_text(sbom)
    sums = {**build.sums, art.manifest.name: sha256(staged / art.manifest.name), SBOM: sha256(staged / SBOM)}
    check_sums(write_sums(staged, sums).parent)
    sign(staged / SUMS, fingerprint, gnupg_home)


SCP_STYLE = re.compile(r"(?P<host>(?:[^@/:\s]+@)?(?:\[[0-9A-Fa-f:.]+\]|[^@/:\[\]\s]+)):(?P<path>.*)")
# [user@]host, whole: neither may start with '-' (ssh and rsync would take it for an option).
REMOTE_HOST = re.compile(r"(?:[A-Za-z0-9_][A-Za-z0-9._-]*@)?"
                         r"(?:[A-Za-z0-9_](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?|\[[0-9A-Fa-f:.]+\])")
CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def parse_target(target: str | Path, name: str, ssh_options: Sequence[str] = ()) -> Target:
    """A local directory, `[user@]host:/path` (as scp and rsync write it; ./a:b is local) or
    `ssh://[user@]host[:port]/path`."""
    text = str(target)
    if CONTROL.search(text):
        raise PipelineError(f"target {text!r}: has a control character")
    if text.startswith("ssh://"):
        url = urlsplit(text)
        try:
            port = url.port
        except ValueError:
            raise PipelineError(f"target {text}: the port is not a number from 1 to 65535") from None
        if not url.hostname or not url.path.strip("/"):
            raise PipelineError(f"target {text}: write ssh://[user@]host[:port]/path")
        hostname = f"[{url.hostname}]" if ":" in url.hostname else url.hostname
        host = f"{url.username}@{hostname}" if url.username is not None else hostname
        path = unquote(url.path)
    elif (match := SCP_STYLE.fullmatch(text)) and not text.startswith(("/", "./", "../")):
        host, path = match["host"], match["path"]
        port = None
        if not path:
            raise PipelineError(f"target {text}: no path after the host: write [user@]host:/path")
    else:
        return LocalTarget(Path(text), name)
    if not REMOTE_HOST.fullmatch(host) or CONTROL.search(path):
        raise PipelineError(f"target {text}: {host!r} is not [user@]host (letters, digits, '.', '_', '-'; "
                            "neither starting with '-')")
    return RemoteTarget(host, path, name, port, ssh_options)


# --- publishing


def to_prune(versions: dict[str, float], latest: str | None, retention: int) -> list[str]:
    """The versions beyond the newest `retention` (by date, then by when they were published),
    never the one `latest` names."""
    newest_first = sorted(versions, key=lambda v: (v[:8], versions[v], v), reverse=True)
    return sorted(v for v in newest_first[retention:] if v != latest)


def _same_artifacts(published: str | None, build: Build) -> bool | None:
    """Whether the published SHA256SUMS lists this build's artifacts; None without one."""
    if published is None:
        return None
    sums = read_sums(published)
    return all(sums.get(file) == digest for file, digest in build.sums.items())


def publish(artifact_dir: Path, name: str, target: str | Path, *, key: str | None,
            gnupg_home: Path | None = None, retention: int = 5, ssh_options: Sequence[str] = ()) -> Published:
    """Publish build/NAME (`artifact_dir`) to `target` as TARGET/NAME/VERSION and point
    TARGET/NAME/latest at it; then prune all but the newest `retention` versions.

    Every check runs before anything is written (see the module's documentation); a
    PipelineError says in one line what is wrong."""
    if retention < 1:
        raise PipelineError(f"retention must be at least 1, not {retention}")
    destination = parse_target(target, name, ssh_options)
    tools.require(*destination.tools)
    gnupg_home = gnupg_home_of(gnupg_home)
    with step(f"publish {name} to {destination}"):
        with step("verify build"):
            build = verify_build(artifact_dir, name)
            fingerprint = require_key(key, gnupg_home)
            sbom = build_sbom(build)
            say(f"version {build.version}; signing key {fingerprint}")
        with destination.session():
            listing = destination.listing()
            if listing.leftovers:
                say(f"removing what killed publishes left: {', '.join(sorted(listing.leftovers))}")
                destination.remove(listing.leftovers)
            new = build.version not in listing.versions
            if new:
                with destination.staging(build.version, near=build.artifacts.directory) as staged:
                    with step(f"stage {build.version}"):
                        assemble(build, staged, sbom, fingerprint, gnupg_home)
                    destination.commit(staged, build.version)
                listing.versions[build.version] = float("inf")
            else:
                same = _same_artifacts(destination.read(f"{build.version}/{SUMS}"), build)
                if same is None:
                    raise PipelineError(f"{destination.location(build.version)} has no {SUMS}: "
                                        f"not a published version; remove it to publish {build.version}")
                say(f"{build.version} is already published" + (" with these very artifacts" if same else
                    " (same inputs; this build's artifacts differ, the published ones are kept)"))
            if listing.latest != build.version:
                destination.point_latest(build.version)
            say(f"{LATEST} -> {build.version}")
            pruned = to_prune(listing.versions, build.version, retention)
            if pruned:
                destination.prune(pruned)
                say(f"pruned {', '.join(pruned)} (keeping {retention})")
    return Published(image=name, version=build.version, location=destination.location(build.version),
                     new=new, pruned=tuple(pruned))
