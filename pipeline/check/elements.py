"""What the image's elements promise, read from the elements themselves: the packages
their `package-installs.yaml` install and the units their `enabled-units/ELEMENT` lists
enable. The check verifies these facts, so they are written down once, where the build
reads them too.

Only our elements and the user's are read (those the spec names and their element-deps,
as diskimage-builder resolves them): DIB's own map package names per distribution
(pkg-map), and what they install is DIB's promise, not ours.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from ..errors import PipelineError
from ..inputs import Element, resolved_elements
from ..spec import ImageSpec

PACKAGE_INSTALLS = "package-installs.yaml"
# One unit per line, read by the element's own post-install.d script and by the check. In a
# directory, under the element's name: DIB copies every element's top-level files to the same
# place, where one element's would overwrite another's.
ENABLED_UNITS = "enabled-units"
# package-installs' options (diskimage-builder's package-installs element).
_CONDITIONS = frozenset({"arch", "not-arch", "installtype", "when", "dib_python_version"})
_REMOVALS = frozenset({"uninstall", "build-only"})
_OPTIONS = _CONDITIONS | _REMOVALS | {"phase"}
_DEBIAN_PACKAGE = re.compile(r"[a-z0-9][a-z0-9+.-]+")  # Debian policy 5.6.1
_UNIT = re.compile(r"[A-Za-z0-9:_.\\-]+\.(service|socket|timer|path|target|mount)")


def our_elements(spec: ImageSpec) -> list[Element]:
    return [element for element in resolved_elements(spec) if element.ours]


def package_installs(path: Path) -> tuple[list[str], list[str]]:
    """(installed, removed) by one package-installs.yaml. An entry with a condition (arch,
    installtype, when, ...) is in neither list: it depends on the build's environment."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise PipelineError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{path}: expected a mapping of package names, found {type(data).__name__}")
    installed, removed = [], []
    for name, options in data.items():
        if not isinstance(name, str) or not _DEBIAN_PACKAGE.fullmatch(name):
            raise PipelineError(f"{path}: package {name!r}: not a Debian package name")
        options = _options(path, name, options)
        if any(options.get(key) for key in _REMOVALS):
            removed.append(name)
        elif not _CONDITIONS & options.keys():
            installed.append(name)
    return installed, removed


def _options(path: Path, name: str, options: Any) -> dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise PipelineError(f"{path}: package {name}: expected nothing or a mapping of options, found {options!r}")
    unknown = sorted(str(key) for key in options if key not in _OPTIONS)
    if unknown:
        raise PipelineError(f"{path}: package {name}: unknown option {unknown[0]!r} "
                            f"(package-installs knows {', '.join(sorted(_OPTIONS))})")
    return options


def required_packages(spec: ImageSpec) -> list[str]:
    """What the elements install and none removes, then the spec's own packages."""
    installed, removed = [], set()
    for element in our_elements(spec):
        path = element.path / PACKAGE_INSTALLS
        if path.is_file():
            adds, drops = package_installs(path)
            installed += adds
            removed.update(drops)
    return list(dict.fromkeys([*(name for name in installed if name not in removed), *spec.packages]))


def read_units(path: Path) -> list[str]:
    """An enabled-units file: one unit name per line; blank lines and lines starting with # skipped."""
    units = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line or line.startswith("#"):
            continue
        if not _UNIT.fullmatch(line):
            raise PipelineError(f"{path}: line {number}: {line!r} is not a systemd unit name")
        units.append(line)
    return units


def enabled_units(spec: ImageSpec) -> list[str]:
    """The units the elements enable at build time, in element order."""
    units = []
    for element in our_elements(spec):
        path = element.path / ENABLED_UNITS / element.name
        if path.is_file():
            units += read_units(path)
    return list(dict.fromkeys(units))
