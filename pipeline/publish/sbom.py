"""The SBOM of a build: CycloneDX 1.6 JSON made from the image's dpkg database, with the
licenses its manifest records, validated against CycloneDX's own schema."""

from __future__ import annotations

import functools
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from cyclonedx.model.bom import Bom, BomMetaData
from cyclonedx.model.component import Component, ComponentType
from cyclonedx.model.dependency import Dependency
from cyclonedx.model.license import DisjunctiveLicense, LicenseAcknowledgement
from cyclonedx.output import make_outputter
from cyclonedx.schema import OutputFormat, SchemaVersion
from cyclonedx.spdx import fixup_id as spdx_id
from debian import deb822
from packageurl import PackageURL

from ..artifacts import read_json
from ..errors import PipelineError

if TYPE_CHECKING:
    from .verify import Build

SBOM = "sbom.cdx.json"
SBOM_SCHEMA = SchemaVersion.V1_6


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
    components = []
    provided: dict[str, list[tuple[Component, str]]] = {}  # package or virtual name -> who provides it
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
        provides = [alt["name"] for group in package.relations["provides"] or [] for alt in group]
        for name in [package["Package"], *provides]:
            provided.setdefault(name, []).append((component, arch))
    # Dependency objects made here: Bom.register_dependency searches all of them on every call.
    graph = [Dependency(ref=root.bom_ref, dependencies=[Dependency(ref=c.bom_ref) for c, _, _ in components])]
    for component, package, arch in components:
        depends = {_installed_alternative(group, provided, arch)
                   for field in ("pre-depends", "depends") for group in package.relations[field] or []}
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
    timestamp = datetime.fromtimestamp(epoch, UTC) if isinstance(epoch, int) else None
    serial = uuid.uuid5(uuid.NAMESPACE_URL, f"kvm-image-pipeline:{build.artifacts.name}:{build.info['input_hash']}")
    art = build.artifacts
    licenses = read_json(art.manifest, "").get("licenses", {})
    text = make_sbom(art.packages, art.name, build.version, licenses=licenses, timestamp=timestamp, serial=serial)
    validate_sbom(text, f"SBOM of {art.packages}")
    return text
