"""Proving things before and after publishing: a build fit to publish (verify_build), a version's
SHA256SUMS (written, read, checked with sha256sum) and a published version as it is used
(verify_version: kickstart.render, pxe.render)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..artifacts import VERDICTS, Artifacts, read_json
from ..errors import PipelineError
from ..manifest import sha256
from ..run import run
from .sign import SIGNATURE, SUMS, gnupg_home_of, verify_signature

VERSION = re.compile(r"(\d{8})-([0-9a-f]{8})")
HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Build:
    """A built image proven fit to publish (verify_build)."""

    artifacts: Artifacts
    version: str
    info: dict[str, Any]
    sums: dict[str, str]  # published file name -> sha256


def verify_build(artifact_dir: Path, name: str) -> Build:
    """Refuse, in one line naming the file, a build that is not fit to publish.

    Hashes every file that is published or goes into the SBOM against the sha256 build-info.json
    records for it: a flipped byte, or a file the build did not record, is caught here."""
    art = Artifacts(Path(artifact_dir), name)
    info = art.read_info()
    if info.get("image") != name:
        raise PipelineError(f"{art.info}: image is {info.get('image')!r}, not {name!r}")
    if not isinstance(info.get("input_hash"), str) or not HEX64.fullmatch(info["input_hash"]):
        raise PipelineError(f"{art.info}: input_hash is not 64 hex digits: {info.get('input_hash')!r}")
    version = info.get("version")
    match = VERSION.fullmatch(version) if isinstance(version, str) else None
    if not match or match[2] != info["input_hash"][:8]:
        raise PipelineError(f"{art.info}: version {version!r} is not YYYYMMDD-HHHHHHHH "
                            f"(the build date and the input hash's first 8 hex digits)")
    for needed in (*art.published, *art.described):
        if not needed.is_file():
            raise PipelineError(f"{needed} is missing: rebuild with ./inv build {name}")
    published = [*art.published, *(file for file in art.published_if_built if file.is_file())]
    sums = {}
    for file in (*published, *art.described):
        expected = art.recorded_sha256(file, info)
        sums[file.name] = sha256(file)
        if sums[file.name] != expected:
            raise PipelineError(f"{file}: sha256 {sums[file.name]} is not the sha256 {art.info.name} "
                                f"records ({expected}): the file is corrupt or changed since the build")
    for verdict in VERDICTS:
        if problem := art.verdict_problem(verdict, qcow2_sha256=sums[art.qcow2.name]):
            raise PipelineError(problem)
    read_json(art.manifest, "")  # valid JSON, or one line saying where it is not
    return Build(artifacts=art, version=match[0], info=info, sums={file.name: sums[file.name] for file in published})


def write_sums(directory: Path, sums: dict[str, str]) -> Path:
    """SHA256SUMS in sha256sum's own format, so `sha256sum --check SHA256SUMS` verifies the tree."""
    path = directory / SUMS
    path.write_text("".join(f"{digest}  {name}\n" for name, digest in sorted(sums.items())))
    return path


def read_sums(text: str) -> dict[str, str]:
    """File name -> sha256 from SHA256SUMS: `DIGEST  NAME` (text mode) or `DIGEST *NAME` (binary)."""
    sums = {}
    for line in text.splitlines():
        digest, _, rest = line.partition(" ")
        sums[rest[1:]] = digest
    return sums


def check_sums(directory: Path, listing: str | None = None) -> None:
    """Every file against SHA256SUMS (or those `listing`, lines in its format, names), with the tool
    a user checks a download with."""
    result = run(["sha256sum", "--check", "--strict", "--quiet", SUMS if listing is None else "-"], cwd=directory,
                 input=None if listing is None else listing.encode(), capture=True, check=False)
    if result.returncode != 0:
        failed = "; ".join(line for line in result.stdout.splitlines() if line.strip()) or result.stderr.strip()
        raise PipelineError(f"{directory}: sha256sum --check {SUMS} failed: {failed}")


def verify_version(version: Path, files: Sequence[str], key: str, gnupg_home: Path | None = None) -> dict[str, str]:
    """A published version's SHA256SUMS (file -> sha256) once it is proven: signed by `key`
    (gpg --verify), and each of `files` hashing to what it lists (sha256sum --check)."""
    try:
        data = (version / SUMS).read_bytes()
    except FileNotFoundError:
        raise PipelineError(f"{version / SUMS} is missing: not a published version") from None
    verify_signature(data, version / SIGNATURE, key, gnupg_home_of(gnupg_home))
    try:
        sums = read_sums(data.decode())
    except UnicodeDecodeError:
        raise PipelineError(f"{version / SUMS}: not text") from None
    for file in files:
        if not HEX64.fullmatch(sums.get(file, "")):
            raise PipelineError(f"{version / SUMS} lists no sha256 of {file}")
    check_sums(version, "".join(f"{sums[file]}  {file}\n" for file in files))
    return sums
