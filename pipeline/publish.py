"""Publish built images: proven, signed, versioned, with an SBOM; `latest` moves last.

TARGET/NAME/VERSION/ holds NAME.qcow2, NAME.tar.gz (the liveimg artifact), NAME.vmlinuz,
NAME.initrd, manifest.json, sbom.cdx.json (CycloneDX 1.6), SHA256SUMS over all of them and
SHA256SUMS.asc (a detached, armored GnuPG signature); TARGET/NAME/latest is a symlink to a
VERSION. A version is the build date and the input hash's first 8 hex digits.

Nothing is written before the build is proven: build-info.json names a well-formed version,
the offline check (check.json) and the boot test (boot-test.json) passed on this very qcow2
(their qcow2_sha256), every file published or made into the SBOM hashes to the sha256 the
build recorded for it, the SBOM validates against CycloneDX's schema, and the signing key exists.

A version is assembled in a hidden TARGET/NAME/.incoming-VERSION-PID/ (hard links where the
file system allows), checked with `sha256sum --check`, signed, the signature verified,
fsync'd and only then renamed into place; `latest` is replaced after that by renaming a fresh
symlink over it (once the version's files pass `sha256sum --check`), and old versions beyond
the retention count are pruned last (never the one `latest` names), each renamed to a hidden
name before it is deleted. A publish killed at any point leaves the previous `latest` and every
visible version as they were; its hidden leftovers are removed by the next publish.

Versions are immutable. Publishing a version that is already there (same date, same inputs)
keeps what is published, says whether its artifacts are identical to this build's, and
points `latest` at it: a rerun CI job succeeds, republishing an older build is a rollback,
and published checksums never change under a name.

A remote target (`[user@]host:/path` as scp and rsync write it, or `ssh://[user@]host[:port]/path`)
gets the same tree: staged locally beside the build, copied with `rsync -a` over ssh into a
hidden .incoming-VERSION-PID there, checked there with `sha256sum --check`, renamed with
`mv -T`, and `latest` replaced with `ln -sfn` to a temporary name and `mv -T`. Every ssh has
connect and keep-alive timeouts and every remote command a deadline.

Either target is locked while it is published to (flock on TARGET/NAME/.publish.lock), so the
leftovers a publish finds are surely dead. On a remote target the lock is held by `flock` over
an ssh session whose stdin only this process holds: a publish killed with SIGKILL lets go too,
and if that session ends, the publish stops before its next change there.

verify_version is how a published version is used (kickstart.render, pxe.render): gpg --verify
of SHA256SUMS against a given key, then sha256sum --check of the files used.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import re
import select
import shlex
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Sequence
from urllib.parse import unquote, urlsplit

from cyclonedx.model.bom import Bom, BomMetaData
from cyclonedx.model.component import Component, ComponentType
from cyclonedx.model.dependency import Dependency
from cyclonedx.model.license import DisjunctiveLicense, LicenseAcknowledgement
from cyclonedx.output import make_outputter
from cyclonedx.schema import OutputFormat, SchemaVersion
from cyclonedx.spdx import fixup_id as spdx_id
from debian import deb822
from packageurl import PackageURL

from . import tools
from .errors import CommandTimedOut, PipelineError
from .manifest import sha256
from .progress import say, step
from .run import hold, release, run, stop

VERSION = re.compile(r"(\d{8})-([0-9a-f]{8})")
HEX64 = re.compile(r"[0-9a-f]{64}")
FINGERPRINT = re.compile(r"[0-9A-F]{40}|[0-9A-F]{64}")  # v4 and v5 OpenPGP keys
SUMS = "SHA256SUMS"
SIGNATURE = "SHA256SUMS.asc"
SBOM = "sbom.cdx.json"
SBOM_SCHEMA = SchemaVersion.V1_6
MANIFEST = "manifest.json"
LATEST = "latest"
INCOMING = ".incoming-"  # a version being assembled or copied
LATEST_TEMP = ".latest-"  # a symlink about to be renamed over `latest`
PRUNING = ".pruning-"  # a version being deleted: hidden first, so no half version is ever visible
LOCK = ".publish.lock"
# The reports that must say passed, about this build's qcow2: file, what, how to run it.
VERDICTS = (("check.json", "offline check", "./inv check"), ("boot-test.json", "boot test", "./inv boot-test"))
# Host commands publishing runs, and their Debian packages.


def artifact_names(name: str) -> dict[str, str]:
    """The build's files that are published as they are, by role."""
    return {"qcow2": f"{name}.qcow2", "liveimg": f"{name}.tar.gz",
            "kernel": f"{name}.vmlinuz", "initrd": f"{name}.initrd"}


def optional_names(name: str) -> tuple[str, ...]:
    """Published as they are when the build made them: the tree's file list (`./inv diff` reads it)."""
    return (f"{name}.files.tsv",)


@dataclass(frozen=True)
class Build:
    """A built image proven fit to publish (verify_build)."""

    directory: Path
    name: str
    version: str
    info: dict
    sums: dict[str, str]  # artifact file name -> sha256

    @property
    def dpkg_status(self) -> Path:
        return self.directory / f"{self.name}.dpkg-status"


@dataclass(frozen=True)
class Published:
    image: str
    version: str
    location: str  # where the version directory is: a path, or host:path
    new: bool  # False: the version was published before and was kept
    pruned: tuple[str, ...] = ()


# --- proving the build


def _read_json(path: Path, missing: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path} is missing: {missing}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PipelineError(f"{path}: not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{path}: not a JSON object")
    return data


def _require_passed(path: Path, what: str, command: str, name: str, qcow2_sha256: str) -> None:
    report = _read_json(path, f"the {what} has not run on this build: run {command} {name}")
    if report.get("passed") is not True:
        raise PipelineError(f"{path}: the {what} did not pass: refusing to publish {name}")
    if report.get("qcow2_sha256") != qcow2_sha256:
        raise PipelineError(f"{path}: the {what} was of another qcow2 (sha256 {report.get('qcow2_sha256')}), "
                            f"not this build's ({qcow2_sha256}): run {command} {name} again")


def verify_build(artifact_dir: Path, name: str) -> Build:
    """Refuse, in one line naming the file, a build that is not fit to publish.

    Hashes every file that is published or goes into the SBOM against the sha256 build-info.json
    records for it: a flipped byte, or a file the build did not record, is caught here."""
    directory = Path(artifact_dir)
    info_path = directory / "build-info.json"
    info = _read_json(info_path, f"{name} has not been built: run ./inv build {name}")
    if info.get("image") != name:
        raise PipelineError(f"{info_path}: image is {info.get('image')!r}, not {name!r}")
    if not isinstance(info.get("input_hash"), str) or not HEX64.fullmatch(info["input_hash"]):
        raise PipelineError(f"{info_path}: input_hash is not 64 hex digits: {info.get('input_hash')!r}")
    version = info.get("version")
    match = VERSION.fullmatch(version) if isinstance(version, str) else None
    if not match or match[2] != info["input_hash"][:8]:
        raise PipelineError(f"{info_path}: version {version!r} is not YYYYMMDD-HHHHHHHH "
                            f"(the build date and the input hash's first 8 hex digits)")
    names = artifact_names(name)
    for needed in [*names.values(), MANIFEST, f"{name}.dpkg-status"]:
        if not (directory / needed).is_file():
            raise PipelineError(f"{directory / needed} is missing: rebuild with ./inv build {name}")
    published = [*names.values(), *(file for file in optional_names(name) if (directory / file).is_file())]
    recorded = info.get("sha256") if isinstance(info.get("sha256"), dict) else {}
    sums = {}
    for file in [*published, MANIFEST, f"{name}.dpkg-status"]:
        expected = recorded.get(file)
        if not isinstance(expected, str) or not HEX64.fullmatch(expected):
            raise PipelineError(f"{info_path} records no sha256 of {file}: rebuild with ./inv build {name}")
        sums[file] = sha256(directory / file)
        if sums[file] != expected:
            raise PipelineError(f"{directory / file}: sha256 {sums[file]} is not the sha256 build-info.json "
                                f"records ({expected}): the file is corrupt or changed since the build")
    for report, what, command in VERDICTS:
        _require_passed(directory / report, what, command, name, sums[names["qcow2"]])
    _read_json(directory / MANIFEST, "")  # valid JSON, or one line saying where it is not
    return Build(directory=directory, name=name, version=version, info=info,
                 sums={file: sums[file] for file in published})


# --- SBOM


def installed_packages(dpkg_status: Path) -> list[deb822.Packages]:
    """The installed packages in a dpkg status file (status `installed`, flag `ok`)."""
    with open(dpkg_status, encoding="utf-8") as status:
        paragraphs = list(deb822.Packages.iter_paragraphs(status, use_apt_pkg=False))
    installed = []
    for paragraph in paragraphs:
        words = paragraph.get("Status", "").split()
        if len(words) == 3 and words[1:] == ["ok", "installed"] and "Package" in paragraph:
            installed.append(paragraph)
    return installed


def declared(license_name: str) -> DisjunctiveLicense:
    """A license as a copyright file declares it: by SPDX id where Debian's name is one (MIT,
    BSD-3-clause), by Debian's name otherwise (GPL-2+, Expat, public-domain)."""
    if known := spdx_id(license_name):
        return DisjunctiveLicense(id=known, acknowledgement=LicenseAcknowledgement.DECLARED)
    return DisjunctiveLicense(name=license_name, acknowledgement=LicenseAcknowledgement.DECLARED)


def make_sbom(dpkg_status: Path, image: str, version: str, *, licenses: dict[str, list[str]] | None = None,
              timestamp: datetime | None = None, serial: uuid.UUID | None = None) -> str:
    """A CycloneDX 1.6 JSON SBOM of an image from its package database.

    The image is the metadata component (an operating system) and depends on every
    installed package; each package is a component with name, version and purl
    pkg:deb/debian/NAME@VERSION?arch=ARCH, depending on the installed packages its
    Depends and Pre-Depends name (the first installed alternative, Provides included).
    dpkg's database carries no licenses: `licenses` (package -> names, from the manifest) gives
    those the packages' copyright files declare."""
    packages = installed_packages(dpkg_status)
    if not packages:
        raise PipelineError(f"{dpkg_status}: no installed package: not an image's dpkg status")
    root = Component(name=image, version=version, type=ComponentType.OPERATING_SYSTEM, bom_ref=f"{image}@{version}")
    bom = Bom(serial_number=serial, metadata=BomMetaData(component=root, timestamp=timestamp))
    bom.metadata.tools.components.add(Component(name="kvm-image-pipeline", type=ComponentType.APPLICATION))
    components, provided = [], {}
    for package in packages:
        arch = package.get("Architecture", "all")
        purl = PackageURL(type="deb", namespace="debian", name=package["Package"], version=package["Version"],
                          qualifiers={"arch": arch})
        description = package.get("Description", "").partition("\n")[0].strip() or None
        component = Component(name=package["Package"], version=package["Version"], purl=purl,
                              bom_ref=purl.to_string(), description=description,
                              licenses=[declared(name) for name in (licenses or {}).get(package["Package"], [])])
        components.append((component, package, arch))
        bom.components.add(component)
        for name in [package["Package"], *(alt["name"] for group in package.relations["provides"] for alt in group)]:
            provided.setdefault(name, []).append((component, arch))
    # Dependency objects made here: Bom.register_dependency searches all of them on every call.
    graph = [Dependency(ref=root.bom_ref, dependencies=[Dependency(ref=c.bom_ref) for c, _, _ in components])]
    for component, package, arch in components:
        depends = {_installed_alternative(group, provided, arch)
                   for field in ("pre-depends", "depends") for group in package.relations[field]}
        graph.append(Dependency(ref=component.bom_ref, dependencies=[
            Dependency(ref=dep.bom_ref) for dep in depends if dep is not None and dep is not component]))
    bom.dependencies = graph
    return make_outputter(bom, OutputFormat.JSON, SBOM_SCHEMA).output_as_string(indent=2)


def _installed_alternative(group: list[dict], provided: dict, arch: str) -> Component | None:
    for alternative in group:
        candidates = provided.get(alternative["name"], [])
        if candidates:
            same_arch = [component for component, their_arch in candidates if their_arch in (arch, "all")]
            return (same_arch or [component for component, _ in candidates])[0]
    return None


@functools.cache
def _sbom_validator():
    from cyclonedx.validation.json import JsonStrictValidator  # imports jsonschema's format checkers: slow

    return JsonStrictValidator(SBOM_SCHEMA)


def validate_sbom(text: str, where: str = "SBOM") -> None:
    """Refuse an SBOM that CycloneDX's own JSON schema (strict) does not accept."""
    error = _sbom_validator().validate_str(text)
    if error is not None:
        raise PipelineError(f"{where}: not valid CycloneDX {SBOM_SCHEMA.to_version()}: "
                            f"{str(error).strip().splitlines()[0]}")


def build_sbom(build: Build) -> str:
    """The build's SBOM, validated; the same inputs give the same serial number and time."""
    epoch = build.info.get("source_date_epoch")
    timestamp = datetime.fromtimestamp(epoch, timezone.utc) if isinstance(epoch, int) else None
    serial = uuid.uuid5(uuid.NAMESPACE_URL, f"kvm-image-pipeline:{build.name}:{build.info['input_hash']}")
    licenses = _read_json(build.directory / MANIFEST, "").get("licenses", {})
    text = make_sbom(build.dpkg_status, build.name, build.version, licenses=licenses, timestamp=timestamp,
                     serial=serial)
    validate_sbom(text, f"SBOM of {build.dpkg_status}")
    return text


# --- signing


def _gpg_env(gnupg_home: Path | None) -> dict[str, str]:
    return {"GNUPGHOME": str(gnupg_home)} if gnupg_home else {}


def gnupg_home_of(given: Path | None) -> Path | None:
    """The GnuPG home given, else $GNUPGHOME: the gateway's clean environment drops it."""
    home = given or os.environ.get("GNUPGHOME")
    return Path(home) if home else None


def require_key(key: str | None, gnupg_home: Path | None = None) -> str:
    """The fingerprint of the one secret key `key` names that can sign, or a one-line error."""
    if not key:
        raise PipelineError("no signing key given: pass --key FINGERPRINT or EMAIL (gpg --list-secret-keys shows them)")
    where = f" in GNUPGHOME {gnupg_home}" if gnupg_home else " in ~/.gnupg"
    if gnupg_home and not Path(gnupg_home).is_dir():
        raise PipelineError(f"GNUPGHOME {gnupg_home} is not a directory")
    listing = run(["gpg", "--batch", "--with-colons", "--list-secret-keys", "--", key],
                  env=_gpg_env(gnupg_home), capture=True, check=False)
    keys = []  # (fingerprint, capabilities) of each primary secret key
    for line in listing.stdout.splitlines():
        fields = line.split(":")
        if fields[0] == "sec":
            keys.append(["", fields[11] if len(fields) > 11 else ""])
        elif fields[0] == "fpr" and keys and not keys[-1][0]:
            keys[-1][0] = fields[9]
    if listing.returncode != 0 or not keys:
        raise PipelineError(f"signing key {key!r} not found{where}: gpg --list-secret-keys shows the keys there")
    if len(keys) > 1:
        raise PipelineError(f"signing key {key!r} matches {len(keys)} secret keys{where}: give a fingerprint")
    fingerprint, capabilities = keys[0]
    if "S" not in capabilities:
        raise PipelineError(f"signing key {key!r} ({fingerprint}){where} cannot sign: "
                            "expired, revoked or without a signing subkey")
    return fingerprint


def sign(sums: Path, fingerprint: str, gnupg_home: Path | None = None) -> Path:
    """A detached, armored signature of `sums` beside it, checked with gpg --verify."""
    signature = sums.with_name(SIGNATURE)
    run(["gpg", "--batch", "--yes", "--local-user", fingerprint, "--armor", "--detach-sign",
         "--output", signature, sums], env=_gpg_env(gnupg_home))
    verify_signature(sums.read_bytes(), signature, fingerprint, gnupg_home)
    return signature


def _fingerprints(gnupg_home: Path) -> set[str]:
    listing = run(["gpg", "--batch", "--with-colons", "--list-keys"], env=_gpg_env(gnupg_home), capture=True)
    return {line.split(":")[9] for line in listing.stdout.splitlines() if line.startswith("fpr:")}


@contextlib.contextmanager
def _verifying_keys(key: str, gnupg_home: Path | None) -> Iterator[tuple[Path | None, set[str]]]:
    """(GnuPG home, the fingerprints a good signature may be by) for `key`: a key file, imported
    into a throw-away home that holds nothing else, or a full fingerprint of a key in gnupg_home."""
    if Path(key).is_file():
        home = Path(tempfile.mkdtemp(prefix="gpg-", dir="/tmp"))  # short: gpg-agent's socket lives in it
        try:
            imported = run(["gpg", "--batch", "--import", "--", Path(key).resolve()], env=_gpg_env(home),
                           check=False, capture=True)
            allowed = _fingerprints(home) if imported.returncode == 0 else set()
            if not allowed:
                raise PipelineError(f"verify key {key}: no OpenPGP public key in the file")
            yield home, allowed
        finally:
            remove_gpg_home(home)
    elif FINGERPRINT.fullmatch(key.upper()):
        yield gnupg_home, {key.upper()}
    else:
        raise PipelineError(f"verify key {key!r}: neither a file nor a full fingerprint (40 hex digits): give "
                            "the public key that signs the published versions")


def verify_signature(data: bytes, signature: Path, key: str, gnupg_home: Path | None = None) -> str:
    """The fingerprint that made `signature`, a good detached signature over `data` by `key` (a key
    file or a full fingerprint); any other signature is a one-line error naming the file."""
    if not signature.is_file():
        raise PipelineError(f"{signature} is missing: {signature.with_name(SUMS)} is not signed")
    with _verifying_keys(key, gnupg_home) as (home, allowed):
        # The data on stdin: what is verified is exactly what the caller goes on to read.
        result = run(["gpg", "--batch", "--status-fd", "1", "--verify", "--", signature, "-"], env=_gpg_env(home),
                     input=data, capture=True, check=False)
    status = [line.split()[1:] for line in result.stdout.splitlines() if line.startswith("[GNUPG:] ")]
    valid = [fields for fields in status if fields[0] == "VALIDSIG" and len(fields) > 2]
    signers = {fields[1] for fields in valid} | {fields[-1] for fields in valid}
    if result.returncode == 0 and any(fields[0] == "GOODSIG" for fields in status) and signers & allowed:
        return (signers & allowed).pop()
    if any(fields[0] == "BADSIG" for fields in status):
        problem = f"a bad signature: {signature.with_name(SUMS).name} was changed after it was signed"
    elif valid:
        problem = f"signed by {valid[0][-1]}, not by the key given"
    else:
        problem = (result.stderr.strip().splitlines() or [f"gpg exited {result.returncode}"])[-1]
    raise PipelineError(f"{signature}: not a good signature by {key}: {problem}")


# --- the version's tree


def _link_or_copy(source: Path, destination: Path) -> None:
    try:
        os.link(source, destination)
    except OSError:  # another file system, or links not allowed there
        shutil.copyfile(source, destination)


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


def assemble(build: Build, staged: Path, sbom: str, fingerprint: str, gnupg_home: Path | None) -> None:
    """Write the version's whole tree into `staged`, checked and signed."""
    staged.mkdir()
    for file in build.sums:
        _link_or_copy(build.directory / file, staged / file)
    shutil.copyfile(build.directory / MANIFEST, staged / MANIFEST)
    (staged / SBOM).write_text(sbom)
    sums = {**build.sums, MANIFEST: sha256(staged / MANIFEST), SBOM: sha256(staged / SBOM)}
    check_sums(write_sums(staged, sums).parent)
    sign(staged / SUMS, fingerprint, gnupg_home)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(directory: Path) -> None:
    for entry in directory.iterdir():
        _fsync(entry)
    _fsync(directory)


# --- targets


@dataclass
class Listing:
    """What a target's NAME directory holds."""

    versions: dict[str, float]  # visible version -> modification time
    latest: str | None
    leftovers: list[str]  # hidden remains of killed publishes


def _listing(entries: list[tuple[str, str, float, str]]) -> Listing:
    """From (name, type d|l|f, mtime, symlink target) of each entry."""
    listing = Listing({}, None, [])
    for name, kind, mtime, link in entries:
        if kind == "d" and VERSION.fullmatch(name):
            listing.versions[name] = mtime
        elif name == LATEST and kind == "l":
            listing.latest = link
        elif name.startswith((INCOMING, LATEST_TEMP, PRUNING)):
            listing.leftovers.append(name)
    return listing


class LocalTarget:
    tools = ("gpg", "sha256sum")

    def __init__(self, root: Path, name: str):
        self.directory = Path(root).resolve() / name

    def __str__(self) -> str:
        return str(self.directory)

    def location(self, entry: str) -> str:
        return str(self.directory / entry)

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Only one publish at a time per image and target: its leftovers are then surely dead."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / LOCK, "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise PipelineError(f"{self.directory}: another publish is running (it holds {LOCK})") from None
            yield

    def listing(self) -> Listing:
        entries = []
        with os.scandir(self.directory) as scan:
            for entry in scan:
                kind = "l" if entry.is_symlink() else "d" if entry.is_dir() else "f"
                link = os.readlink(entry.path) if kind == "l" else ""
                entries.append((entry.name, kind, entry.stat(follow_symlinks=False).st_mtime, link))
        return _listing(entries)

    def read(self, entry: str) -> str | None:
        try:
            return (self.directory / entry).read_text()
        except FileNotFoundError:
            return None

    @contextlib.contextmanager
    def staging(self, version: str, near: Path) -> Iterator[Path]:
        """The hidden directory the version is assembled in; gone on failure, renamed by commit."""
        staged = self.directory / f"{INCOMING}{version}-{os.getpid()}"
        try:
            yield staged
        finally:
            shutil.rmtree(staged, ignore_errors=True)

    def commit(self, staged: Path, version: str) -> None:
        _fsync_tree(staged)
        try:
            os.rename(staged, self.directory / version)
        except OSError as error:
            raise PipelineError(f"{self.directory / version}: cannot move the new version into place: "
                                f"{error.strerror}") from None
        _fsync(self.directory)

    def point_latest(self, version: str) -> None:
        check_sums(self.directory / version)  # never point at a version whose files changed
        temporary = self.directory / f"{LATEST_TEMP}{os.getpid()}"
        temporary.unlink(missing_ok=True)
        os.symlink(version, temporary)
        try:
            os.replace(temporary, self.directory / LATEST)
        except OSError as error:
            temporary.unlink()
            raise PipelineError(f"{self.directory / LATEST}: cannot replace it: {error.strerror}") from None
        _fsync(self.directory)

    def remove(self, entries: Sequence[str]) -> None:
        for entry in entries:
            path = self.directory / entry
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)

    def prune(self, versions: Sequence[str]) -> None:
        """Each version hidden by a rename, then deleted: a crash mid-delete leaves a leftover that
        the next publish removes, never a half version."""
        hidden = [f"{PRUNING}{version}-{os.getpid()}" for version in versions]
        for version, name in zip(versions, hidden):
            os.rename(self.directory / version, self.directory / name)
        _fsync(self.directory)
        self.remove(hidden)


def _alive(pid: str) -> bool:
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


# Remote steps are fixed scripts run by `sh -c SCRIPT sh ARGS...`: arguments never go into a script's text.
REMOTE_LIST = 'mkdir -p -- "$1" && find "$1" -mindepth 1 -maxdepth 1 -printf "%f\\t%y\\t%T@\\t%l\\n"'
# The copy checked with sha256sum and flushed, then renamed into place.
REMOTE_COMMIT = ('cd -- "$1/$2" && sha256sum --check --strict --quiet SHA256SUMS && sync -- * . '
                 '&& mv -T -- "$1/$2" "$1/$3" && sync -- "$1"')
# Prints "locked" once it holds the lock, then holds it until its stdin ends.
REMOTE_LOCK = ('mkdir -p -- "$1" && exec flock --nonblock --conflict-exit-code 75 "$1/$2" '
               'sh -c \'echo locked && exec cat >/dev/null\'')
REMOTE_LOCK_BUSY = 75
# The version's files checked, then a fresh symlink renamed over `latest`.
REMOTE_LATEST = ('cd -- "$1/$2" && sha256sum --check --strict --quiet SHA256SUMS '
                 '&& ln -sfn -- "$2" "$1/$3" && mv -T -- "$1/$3" "$1/latest" && sync -- "$1"')
# Every version hidden by a rename first, then deleted (as LocalTarget.prune).
REMOTE_PRUNE = (f'dir=$1 tag=$2; shift 2; for v; do mv -T -- "$dir/$v" "$dir/{PRUNING}$v-$tag" || exit; done; '
                f'sync -- "$dir"; for v; do rm -rf -- "$dir/{PRUNING}$v-$tag" || exit; done')
# ssh gives up on a host that does not answer, or stops answering; the user's -o options come
# first, and ssh keeps the first value it is given, so they can set these too.
SSH_DEADLINES = ("ConnectTimeout=30", "ServerAliveInterval=15", "ServerAliveCountMax=4")
REMOTE_DEADLINE = 15 * 60  # seconds for any remote command (sha256sum --check of a version included)
COPY_DEADLINE = 4 * 3600  # seconds for rsync to copy a version


class RemoteTarget:
    tools = ("gpg", "sha256sum", "rsync", "ssh")

    def __init__(self, host: str, path: str, name: str, port: int | None = None, ssh_options: Sequence[str] = ()):
        # host as rsync writes it: [user@]name, an IPv6 address in brackets
        self.host, self.port, self.ssh_options = host, port, tuple(ssh_options)
        self.directory = f"{path.rstrip('/') or '/'}/{name}".replace("//", "/")
        self._lock = None  # run.hold's process: the ssh session holding LOCK there

    def __str__(self) -> str:
        return self.location("").rstrip("/")

    def location(self, entry: str) -> str:
        """As the user wrote the target: host:path, or an ssh:// URL when it has a port."""
        if self.port is None:
            return f"{self.host}:{self.directory}/{entry}"
        return f"ssh://{self.host}:{self.port}{self.directory}/{entry}"

    def ssh_command(self) -> list[str]:
        argv = ["ssh", "-o", "BatchMode=yes"]
        if self.port is not None:
            argv += ["-p", str(self.port)]
        for option in (*self.ssh_options, *SSH_DEADLINES):
            argv += ["-o", option]
        return argv

    def _ssh_argv(self, argv: list[str]) -> list[str]:
        """argv run on the host: quoted for its shell, as ssh hands the command to it."""
        host = self.host.replace("[", "").replace("]", "")  # ssh takes an IPv6 address bare
        return [*self.ssh_command(), "--", host, shlex.join(argv)]

    def _run(self, argv: list[str], what: str, deadline: float | None = None, **options):
        deadline = deadline or REMOTE_DEADLINE
        try:
            return run(argv, timeout=deadline, **options)
        except CommandTimedOut:
            raise PipelineError(f"{self.host}: {what} did not finish within {deadline:g} s: "
                                "the host or the network is not answering") from None

    def ssh(self, argv: list[str], *, capture: bool = False, check: bool = True):
        return self._run(self._ssh_argv(argv), f"ssh {argv[0]}", capture=capture, check=check)

    def _script(self, script: str, *args: str, capture: bool = False):
        return self.ssh(["sh", "-c", script, "sh", *args], capture=capture)

    def _require_lock(self, before: str) -> None:
        """Stop if the ssh session holding the lock has ended: another publish may hold it now."""
        if self._lock is None or self._lock.poll() is not None:
            raise PipelineError(f"{self}: the ssh session holding {LOCK} there has ended: stopped before {before}")

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Only one publish at a time per image and target, as on a local target."""
        holder = hold(self._ssh_argv(["sh", "-c", REMOTE_LOCK, "sh", self.directory, LOCK]))
        try:
            answered, _, _ = select.select([holder.stdout], [], [], REMOTE_DEADLINE)
            if not answered:
                stop(holder)
                raise PipelineError(f"{self.host}: taking {LOCK} did not finish within {REMOTE_DEADLINE:g} s: "
                                    "the host or the network is not answering")
            if holder.stdout.readline().strip() != b"locked":
                holder.stdin.close()
                error = holder.stderr.read().decode(errors="replace").strip()
                if holder.wait() == REMOTE_LOCK_BUSY:
                    raise PipelineError(f"{self}: another publish is running (it holds {LOCK})")
                raise PipelineError(f"{self}: cannot take {LOCK} there: "
                                    f"{error.splitlines()[-1] if error else f'ssh exited {holder.returncode}'}")
            self._lock = holder
            yield
        finally:
            self._lock = None
            release(holder)

    def listing(self) -> Listing:
        out = self._script(REMOTE_LIST, self.directory, capture=True).stdout
        entries = []
        for line in out.splitlines():
            name, kind, mtime, link = (line.split("\t") + ["", "", "", ""])[:4]
            entries.append((name, kind, float(mtime or 0), link))
        return _listing(entries)

    def read(self, entry: str) -> str | None:
        result = self.ssh(["cat", "--", f"{self.directory}/{entry}"], capture=True, check=False)
        return result.stdout if result.returncode == 0 else None

    @contextlib.contextmanager
    def staging(self, version: str, near: Path) -> Iterator[Path]:
        """Assembled locally beside the build (hard links work there), removed afterwards,
        and by the next publish if this one is killed."""
        for leftover in Path(near).glob(".publish-*"):
            if not _alive(leftover.name.rpartition("-")[2]):
                shutil.rmtree(leftover, ignore_errors=True)
        staged = Path(near) / f".publish-{version}-{os.getpid()}"
        try:
            yield staged
        finally:
            shutil.rmtree(staged, ignore_errors=True)

    def commit(self, staged: Path, version: str) -> None:
        incoming = staged.name.replace(".publish-", INCOMING, 1)
        try:
            self._require_lock(f"copying {version}")
            with step(f"copy to {self.host}"):
                self._run(["rsync", "-a", "-e", shlex.join(self.ssh_command()), "--",
                           f"{staged}/", f"{self.host}:{self.directory}/{incoming}/"], "rsync", deadline=COPY_DEADLINE)
            self._require_lock(f"moving {version} into place")
            self._script(REMOTE_COMMIT, self.directory, incoming, version)
        except BaseException:
            self.ssh(["rm", "-rf", "--", f"{self.directory}/{incoming}"], check=False)
            raise

    def point_latest(self, version: str) -> None:
        self._require_lock(f"pointing {LATEST} at {version}")
        self._script(REMOTE_LATEST, self.directory, version, f"{LATEST_TEMP}{os.getpid()}")

    def remove(self, entries: Sequence[str]) -> None:
        if entries:
            self._require_lock(f"removing {', '.join(entries)}")
            self.ssh(["rm", "-rf", "--", *(f"{self.directory}/{entry}" for entry in entries)])

    def prune(self, versions: Sequence[str]) -> None:
        if versions:
            self._require_lock(f"pruning {', '.join(versions)}")
            self._script(REMOTE_PRUNE, self.directory, str(os.getpid()), *versions)


SCP_STYLE = re.compile(r"(?P<host>(?:[^@/:\s]+@)?(?:\[[0-9A-Fa-f:.]+\]|[^@/:\[\]\s]+)):(?P<path>.*)")
# [user@]host, whole: neither may start with '-' (ssh and rsync would take it for an option).
REMOTE_HOST = re.compile(r"(?:[A-Za-z0-9_][A-Za-z0-9._-]*@)?"
                         r"(?:[A-Za-z0-9_](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?|\[[0-9A-Fa-f:.]+\])")
CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def parse_target(target: str | Path, name: str, ssh_options: Sequence[str] = ()) -> LocalTarget | RemoteTarget:
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
                with destination.staging(build.version, near=build.directory) as staged:
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


# --- a throw-away signing key, for the tests and the benchmark


def make_gpg_home() -> tuple[Path, str]:
    """A throw-away GNUPGHOME (a short path: gpg-agent's socket lives in it) with one signing key."""
    home = Path(tempfile.mkdtemp(prefix="gpg-", dir="/tmp"))
    email = "publish-test@example.invalid"
    run(["gpg", "--batch", "--passphrase", "", "--quick-gen-key", f"Publish Test <{email}>",
         "ed25519", "sign", "never"], env={"GNUPGHOME": str(home)})
    return home, email


def remove_gpg_home(home: Path) -> None:
    run(["gpgconf", "--homedir", home, "--kill", "all"], check=False)  # the agent gpg started
    shutil.rmtree(home, ignore_errors=True)
