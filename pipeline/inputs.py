"""What an image is built from, and its identity: the input hash.

The hash covers everything of ours that shapes the image: the spec, the trees of the
elements it uses (ours and the user's; DIB's own by DIB's version), the tuned profiles
and SELinux policy sources (which live in element trees), and the pipeline itself
(its version and its code). It does not cover the mirror's state: a rebuild with the
same inputs on a later day may install newer packages (`--force` asks for that).
An image whose input hash is unchanged and whose artifact passed its check is up to
date, and a build of it is skipped (osbuild finds finished stages the same way).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from diskimage_builder import element_dependencies

from .errors import PipelineError
from .paths import DIB_ELEMENTS, PROFILES, ROOT
from .run import run
from .spec import ImageSpec

PACKAGE = "kvm-image-pipeline"
PIPELINE_SOURCES = ROOT / "pipeline"
SHORT = 8  # hex digits of the input hash in a version
# Elements every build gets from the pipeline itself (the package layer, a private /dev, build
# speed), whatever the spec says.
PACKAGE_LAYER_ELEMENT = "kvm-package-layer"  # pipeline.layer
PIPELINE_ELEMENTS = (PACKAGE_LAYER_ELEMENT, "kvm-private-dev", "kvm-build-speed")


@dataclass(frozen=True)
class Element:
    name: str
    path: Path

    @property
    def ours(self) -> bool:
        """Ours or the user's; DIB's own elements are covered by DIB's version."""
        return not self.path.is_relative_to(DIB_ELEMENTS)


def dib_elements(spec: ImageSpec, pipeline_elements: bool = True) -> list[str]:
    """The elements disk-image-create is given: the distribution's, the spec's, and ours."""
    return [spec.distro_element, *spec.elements, *(PIPELINE_ELEMENTS if pipeline_elements else ())]


def resolved_elements(spec: ImageSpec) -> list[Element]:
    """The elements of a build with every dependency, as DIB itself resolves them."""
    search = ":".join([*(str(d) for d in spec.element_dirs), str(DIB_ELEMENTS)])
    try:
        found = element_dependencies.get_elements(dib_elements(spec), paths=search)
    except Exception as error:  # DIB raises several types, all with a readable message
        raise PipelineError(f"{spec.source}: image {spec.name!r}: key 'elements': {error}") from None
    return sorted((Element(name, Path(path)) for name, path in found), key=lambda e: e.name)


def tree_digest(digest, top: Path) -> None:
    """Every file's relative path, mode and content (symlinks by target), in a stable order."""
    for path in sorted(p for p in top.rglob("*") if "__pycache__" not in p.parts):
        relative = path.relative_to(top).as_posix()
        if path.is_symlink():
            digest.update(f"L {relative} {os.readlink(path)}\n".encode())
        elif path.is_file():
            digest.update(f"F {relative} {path.stat().st_mode & 0o111:o}\n".encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())


def pipeline_version() -> str:
    return metadata.version(PACKAGE)


def dib_version() -> str:
    return metadata.version("diskimage-builder")


def input_hash(spec: ImageSpec) -> str:
    """sha256 over the spec, our element trees, DIB's version, profiles, and the pipeline."""
    digest = hashlib.sha256()
    spec_json = spec.to_json()
    # Words for `inv list`, and where the spec and the directories it names are: the contents
    # of those directories are hashed below, so a checkout moved elsewhere keeps its versions.
    for key in ("description", "source", "element_dirs", "profile_dirs"):
        spec_json.pop(key)
    digest.update(json.dumps(spec_json, sort_keys=True).encode())
    digest.update(f"diskimage-builder {dib_version()}\n".encode())
    for element in resolved_elements(spec):
        digest.update(f"element {element.name}\n".encode())
        if element.ours:
            tree_digest(digest, element.path)
    for profiles in sorted({PROFILES, *spec.profile_dirs}):
        digest.update(f"profiles {profiles.name}\n".encode())
        tree_digest(digest, profiles)
    digest.update(f"pipeline {pipeline_version()}\n".encode())
    tree_digest(digest, PIPELINE_SOURCES)
    return digest.hexdigest()


def version(input_digest: str, when: float | None = None) -> str:
    """A published version: the build's UTC date and the input hash's first digits."""
    return f"{time.strftime('%Y%m%d', time.gmtime(when))}-{input_digest[:SHORT]}"


def git_commit() -> str | None:
    """The pipeline checkout's commit, with '+dirty' when it has local changes; None outside git."""
    head = run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture=True, check=False)
    if head.returncode != 0:
        return None
    dirty = run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"], capture=True, check=False)
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def source_date_epoch() -> int:
    """SOURCE_DATE_EPOCH: the user's, else the last commit's time, else the newest input's mtime."""
    if given := os.environ.get("SOURCE_DATE_EPOCH"):
        try:
            return int(given)
        except ValueError:
            raise PipelineError(f"SOURCE_DATE_EPOCH={given!r} is not a number of seconds") from None
    commit_time = run(["git", "-C", ROOT, "log", "-1", "--format=%ct"], capture=True, check=False)
    if commit_time.returncode == 0 and commit_time.stdout.strip().isdigit():
        return int(commit_time.stdout.strip())
    return int(max(p.stat().st_mtime for p in ROOT.glob("*") if p.is_file()))
