"""What a build writes, named in one place, and the one reader and rules over it.

build/NAME/ holds, once NAME is built (a netboot image has no disk, file list or liveimg):

    NAME.qcow2          the disk, compressed; written last, so its presence means done
    NAME.raw            the same disk uncompressed, when images.toml asks for the raw format
    NAME.vmlinuz        the kernel, and NAME.initrd its initramfs (a netboot image's whole tree)
    NAME.tar.gz         the root tree as a tarball for Anaconda's liveimg (pipeline.liveimg)
    NAME.dpkg-status    a copy of the image's dpkg database: the SBOM is made from it
    NAME.files.tsv      the tree's file list (pipeline.manifest), for comparing two builds
    manifest.json       the build manifest (pipeline.manifest)
    build-info.json     version, inputs, and the sha256 of every file above but the raw disk
    check.json          the offline check's verdict (./inv check)
    boot-test.json      the boot test's verdict (./inv boot-test)
    logs/               the builds' logs

A verdict counts for a build only when it says passed about that build's very qcow2: the one
rule is `verdict_problem`, used by the build (is it up to date?) and by publish.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import PipelineError

if TYPE_CHECKING:
    from .spec import ImageSpec

LIVEIMG_SUFFIX = ".tar.gz"  # Anaconda reads .tar, .tgz, .tar.gz, .tar.bz2, .tar.xz (pipeline.liveimg)
INFO = "build-info.json"
MANIFEST = "manifest.json"
SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Verdict:
    """A report that must say passed, about this build's qcow2, before the image counts as proven."""

    file: str  # in the build's directory
    what: str
    command: str  # what writes it, given the image's name


CHECK = Verdict("check.json", "offline check", "./inv check")
BOOT_TEST = Verdict("boot-test.json", "boot test", "./inv boot-test")
VERDICTS = (CHECK, BOOT_TEST)


def read_json(path: Path, if_missing: str) -> dict[str, Any]:
    """The JSON object in `path`; otherwise a PipelineError, in one line that names the file:
    "PATH is missing: IF_MISSING", "PATH: not valid JSON: ..." or "PATH: not a JSON object"."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path} is missing: {if_missing}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PipelineError(f"{path}: not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{path}: not a JSON object")
    return data


@dataclass(frozen=True)
class Artifacts:
    """Where a build's files live: build/NAME/... (see the module's docstring)."""

    directory: Path
    name: str

    @property
    def qcow2(self) -> Path:
        return self.directory / f"{self.name}.qcow2"

    @property
    def raw(self) -> Path:
        return self.directory / f"{self.name}.raw"

    @property
    def kernel(self) -> Path:
        return self.directory / f"{self.name}.vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.directory / f"{self.name}.initrd"

    @property
    def liveimg(self) -> Path:
        return self.directory / f"{self.name}{LIVEIMG_SUFFIX}"

    @property
    def info(self) -> Path:
        return self.directory / INFO

    @property
    def manifest(self) -> Path:
        return self.directory / MANIFEST

    @property
    def packages(self) -> Path:
        return self.directory / f"{self.name}.dpkg-status"

    @property
    def files(self) -> Path:
        return self.directory / f"{self.name}.files.tsv"

    @property
    def check_report(self) -> Path:
        return self.directory / CHECK.file

    @property
    def boot_report(self) -> Path:
        return self.directory / BOOT_TEST.file

    @property
    def logs(self) -> Path:
        return self.directory / "logs"

    def boot_workdir(self, firmware: str) -> Path:
        """Where a boot test's VM by FIRMWARE keeps its console log, kept after the session."""
        return self.directory / f"boot-{firmware}"

    @property
    def published(self) -> tuple[Path, ...]:
        """The files a publish copies as they are."""
        return (self.qcow2, self.liveimg, self.kernel, self.initrd)

    @property
    def published_if_built(self) -> tuple[Path, ...]:
        """Copied as they are too, when the build made them (`./inv diff` reads the file list)."""
        return (self.files,)

    @property
    def described(self) -> tuple[Path, ...]:
        """What a publish describes the build from: the manifest (copied too) and the dpkg
        database (the SBOM)."""
        return (self.manifest, self.packages)

    def read_info(self) -> dict[str, Any]:
        return read_json(self.info, f"{self.name} has not been built: run ./inv build {self.name}")

    def recorded_sha256(self, file: Path, info: dict[str, Any] | None = None) -> str:
        """The sha256 of `file` that build-info.json (or `info`, read from it) records."""
        recorded = (self.read_info() if info is None else info).get("sha256")
        digest = recorded.get(file.name) if isinstance(recorded, dict) else None
        if not isinstance(digest, str) or not SHA256.fullmatch(digest):
            raise PipelineError(f"{self.info} records no sha256 of {file.name}: rebuild with ./inv build {self.name}")
        return digest

    def verdict_problem(self, verdict: Verdict, qcow2_sha256: str | None = None) -> str | None:
        """Why `verdict` does not count for this build, in one line naming its file; None when it
        says passed about this build's qcow2: the sha256 given (one just computed), else the one
        build-info.json records."""
        report_path = self.directory / verdict.file
        again = f"{verdict.command} {self.name}"
        try:
            built = qcow2_sha256 or self.read_info().get("qcow2_sha256")
            report = read_json(report_path, f"the {verdict.what} has not run on this build: run {again}")
        except PipelineError as error:
            return str(error)
        if report.get("passed") is not True:
            return f"{report_path}: the {verdict.what} did not pass"
        if not isinstance(built, str) or report.get("qcow2_sha256") != built:
            return (f"{report_path}: the {verdict.what} was of another qcow2 (sha256 {report.get('qcow2_sha256')}), "
                    f"not this build's ({built}): run {again} again")
        return None

    def passed(self, verdict: Verdict) -> bool:
        return self.verdict_problem(verdict) is None


def artifacts_for(spec: ImageSpec, output_dir: Path) -> Artifacts:
    return Artifacts(Path(output_dir).resolve() / spec.name, spec.name)
