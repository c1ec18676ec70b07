"""The build manifest, the tree's file list, and what differs between two builds.

The manifest says what an image is and how it was made: the spec, the resolved
elements, DIB's and the pipeline's versions and commit, every package read from the
image's own dpkg database with the licenses its copyright file declares, the kernel,
the tuned profile, the hash of our SELinux policy modules, the input hash and the
timings. It is written into the image too
(EMBEDDED), before the tree is labeled, so it carries the timings of the steps done
by then; the copy beside the artifacts has them all.

The file list (one line a path: type, mode, owner, size, label, sha256) is what two
builds are compared by: `./inv diff` reports the packages and files that differ.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from debian import copyright as debian_copyright

from .artifacts import MANIFEST, read_json
from .errors import PipelineError

EMBEDDED = "usr/share/kvm-image-pipeline/manifest.json"  # under the image's root
DPKG_STATUS = "var/lib/dpkg/status"
FILE_LIST_HEADER = "# path\ttype\tmode\tuid:gid\tsize\tselinux\tsha256\n"
FIELDS = ("type", "mode", "owner", "size", "selinux", "content")  # the header's columns after the path


def policy_hash(packages: list[Path]) -> dict[str, str]:
    """Each compiled policy module's sha256, and one over all of them (name order)."""
    hashes = {p.stem: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(packages)}
    combined = hashlib.sha256("".join(f"{name} {h}\n" for name, h in hashes.items()).encode()).hexdigest()
    return {"all": combined, **hashes}


def document(*, spec: dict, elements: list[dict], dib_version: str, pipeline_version: str,
             commit: str | None, packages: dict[str, str], kernel: str, tuned_profile: str,
             policy: dict[str, str], input_hash: str, version: str, source_date_epoch: int,
             timings: dict[str, float], licenses: dict[str, list[str]]) -> dict[str, Any]:
    return {
        "image": spec["name"],
        "version": version,
        "input_hash": input_hash,
        "spec": spec,
        "elements": elements,
        "diskimage_builder": dib_version,
        "pipeline": {"version": pipeline_version, "commit": commit},
        "source_date_epoch": source_date_epoch,
        "kernel": kernel,
        "tuned_profile": tuned_profile,
        "selinux_policy_modules": policy,
        "packages": dict(sorted(packages.items())),
        "licenses": dict(sorted(licenses.items())),
        "timings": timings,
    }


def parse_dpkg_status(text: str) -> dict[str, str]:
    """Installed packages in a dpkg status file: name -> version.

    Installed means the status word is `installed` with flag `ok`; the wanted state may
    be `install` or `hold` (a held package is still installed)."""
    installed = {}
    for paragraph in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for line in paragraph.splitlines():
            if line[:1] in (" ", "\t"):
                continue  # a continuation line: only Description and Conffiles have them
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip().lower()] = value.strip()
        name = fields.get("package")
        status = fields.get("status", "").split()
        if name and len(status) == 3 and status[0] in ("install", "hold") and status[1:] == ["ok", "installed"]:
            installed[name] = fields.get("version", "")
    return installed


def packages_of(tree: Path) -> dict[str, str]:
    return parse_dpkg_status((tree / DPKG_STATUS).read_text(errors="replace"))


DOC_DIR = "usr/share/doc"
SYMLINK_HOPS = 8  # doc directories link to their source package's (libfoo-dev -> libfoo1), seldom further


def _inside(tree: Path, path: Path) -> Path | None:
    """path with its symlinks followed inside the tree (an absolute link is relative to the tree's
    root, as it is in the image); None if it leads out of the tree or loops."""
    for _ in range(SYMLINK_HOPS):
        if not path.is_symlink():
            return path
        target = os.readlink(path)
        path = Path(os.path.normpath(tree / target.lstrip("/") if target.startswith("/") else path.parent / target))
        if not path.is_relative_to(tree):
            return None
    return None


def declared_licenses(tree: Path, packages: Iterable[str]) -> dict[str, list[str]]:
    """Each package's licenses as its /usr/share/doc/PACKAGE/copyright declares them, when that file
    is machine-readable (DEP-5): every Files paragraph's license, in order of first use, as Debian
    names them (GPL-2+, Expat). A package with a free-form copyright file, or none, is left out."""
    logging.getLogger("debian.copyright").setLevel(logging.ERROR)  # it logs each Format URL it fixes
    found = {}
    for name in packages:
        doc = _inside(tree, tree / DOC_DIR / name)
        copyright_file = _inside(tree, doc / "copyright") if doc else None
        if copyright_file is None or not copyright_file.is_file():
            continue
        try:
            with open(copyright_file, encoding="utf-8", errors="replace") as text:
                parsed = debian_copyright.Copyright(text, strict=False)
        except (debian_copyright.Error, ValueError):  # free-form, or DEP-5 that does not parse
            continue
        # Any: python-debian types the attribute as its descriptor, not the License it returns.
        licenses: list[Any] = [p.license for p in parsed.all_files_paragraphs()]
        names = [license.synopsis for license in licenses if license and license.synopsis]
        if names:
            found[name] = list(dict.fromkeys(names))
    return found


def embed(tree: Path, manifest: dict[str, Any]) -> None:
    target = tree / EMBEDDED
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(manifest, indent=2) + "\n")
    target.chmod(0o644)


def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "d"), (stat.S_ISREG, "f"), (stat.S_ISLNK, "l"), (stat.S_ISCHR, "c"),
                       (stat.S_ISBLK, "b"), (stat.S_ISFIFO, "p"), (stat.S_ISSOCK, "s")):
        if test(mode):
            return kind
    return "?"


def _label(path: Path) -> str:
    try:
        return os.getxattr(path, "security.selinux", follow_symlinks=False).rstrip(b"\0").decode()
    except OSError:
        return "-"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**20):
            digest.update(chunk)
    return digest.hexdigest()


def write_file_list(tree: Path, output: Path) -> int:
    """One tab-separated line a path, sorted; returns how many."""
    lines = []
    for directory, dirs, files in os.walk(tree):
        dirs.sort()
        for name in [*dirs, *files]:
            path = Path(directory, name)
            info = path.lstat()
            kind = _kind(info.st_mode)
            content = sha256(path) if kind == "f" else (os.readlink(path) if kind == "l" else "-")
            size = info.st_size if kind == "f" else 0
            lines.append(f"/{path.relative_to(tree).as_posix()}\t{kind}\t{stat.S_IMODE(info.st_mode):04o}\t"
                         f"{info.st_uid}:{info.st_gid}\t{size}\t{_label(path)}\t{content}\n")
    lines.sort()
    output.write_text(FILE_LIST_HEADER + "".join(lines))
    return len(lines)


def read_file_list(path: Path) -> dict[str, tuple[str, ...]]:
    """path -> its FIELDS; a row without exactly those is refused, naming the file and line."""
    entries = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line and not line.startswith("#"):
            fields = line.split("\t")
            if len(fields) != 1 + len(FIELDS):
                raise PipelineError(f"{path}: line {number}: {len(fields)} fields, expected {1 + len(FIELDS)} "
                                    f"(path, {', '.join(FIELDS)}) separated by tabs")
            entries[fields[0]] = tuple(fields[1:])
    return entries


@dataclass(frozen=True)
class Difference:
    packages_only_a: dict[str, str]
    packages_only_b: dict[str, str]
    packages_changed: dict[str, tuple[str, str]]
    files_only_a: list[str]
    files_only_b: list[str]
    files_changed: dict[str, list[str]]  # path -> the fields that differ

    @property
    def same_packages(self) -> bool:
        return not (self.packages_only_a or self.packages_only_b or self.packages_changed)

    @property
    def same_file_list(self) -> bool:
        return not (self.files_only_a or self.files_only_b)


def compare(packages_a: dict[str, str], packages_b: dict[str, str],
            files_a: dict[str, tuple[str, ...]], files_b: dict[str, tuple[str, ...]]) -> Difference:
    changed_files = {}
    for path in sorted(files_a.keys() & files_b.keys()):
        fields = [name for name, a, b in zip(FIELDS, files_a[path], files_b[path], strict=True) if a != b]
        if fields:
            changed_files[path] = fields
    return Difference(
        packages_only_a={n: v for n, v in packages_a.items() if n not in packages_b},
        packages_only_b={n: v for n, v in packages_b.items() if n not in packages_a},
        packages_changed={n: (packages_a[n], packages_b[n]) for n in sorted(packages_a.keys() & packages_b.keys())
                          if packages_a[n] != packages_b[n]},
        files_only_a=sorted(files_a.keys() - files_b.keys()),
        files_only_b=sorted(files_b.keys() - files_a.keys()),
        files_changed=changed_files,
    )


def format_difference(diff: Difference, a: str, b: str, shown: int = 20) -> str:
    def listing(title: str, items: list[str]) -> list[str]:
        if not items:
            return []
        more = [f"    ... and {len(items) - shown} more"] if len(items) > shown else []
        return [f"  {title} ({len(items)}):", *(f"    {item}" for item in items[:shown]), *more]

    lines = [f"A = {a}", f"B = {b}",
             (f"packages: {'same' if diff.same_packages else 'differ'}; "
              f"file list: {'same' if diff.same_file_list else 'differs'}; "
              f"files with other content or metadata: {len(diff.files_changed)}")]
    lines += listing("packages only in A", [f"{n} {v}" for n, v in diff.packages_only_a.items()])
    lines += listing("packages only in B", [f"{n} {v}" for n, v in diff.packages_only_b.items()])
    lines += listing("package versions", [f"{n}: {a_} -> {b_}" for n, (a_, b_) in diff.packages_changed.items()])
    lines += listing("files only in A", diff.files_only_a)
    lines += listing("files only in B", diff.files_only_b)
    lines += listing("files that differ", [f"{p}: {', '.join(f)}" for p, f in diff.files_changed.items()])
    return "\n".join(lines)


def _build_record(directory: Path) -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
    """A build's (or a published version's) packages from manifest.json, files from *.files.tsv."""
    manifest = read_json(directory / MANIFEST, "not a build directory or a published version")
    packages = manifest.get("packages")
    if not isinstance(packages, dict):
        raise PipelineError(f"{directory / MANIFEST}: no \"packages\" object: not a build's manifest")
    lists = sorted(directory.glob("*.files.tsv"))
    if len(lists) != 1:
        raise PipelineError(f"{directory}: expected one *.files.tsv (the build's file list), found {len(lists)}")
    return packages, read_file_list(lists[0])


def compare_builds(a: Path, b: Path) -> Difference:
    packages_a, files_a = _build_record(a)
    packages_b, files_b = _build_record(b)
    return compare(packages_a, packages_b, files_a, files_b)
