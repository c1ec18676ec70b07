"""Declarative image specs (images.toml), loaded into typed, validated objects.

Everything is checked before anything is built; each error names the file,
the image and the key.
"""

from __future__ import annotations

import ipaddress
import json
import re
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from .errors import SpecError
from .paths import DIB_ELEMENTS, ELEMENTS, PROFILES, SPEC_FILE
from .profiles import SAFE_NAME
from .selinux import element_closure

DISTRO_ELEMENT = {"debian": "debian-minimal"}
# The Debian releases our elements and policy modules are proven on, with their major version
# (/etc/os-release's VERSION_ID). Another release is refused rather than half working.
DEBIAN_RELEASES = {"bookworm": "12", "trixie": "13"}
# The element that makes a KVM host: libvirt, and OVS bridges from `bridges`.
HOST_ELEMENT = "kvm-host"
# Every pattern here validates a whole value: use fullmatch (match with `$` lets a trailing newline through).
# An image name is a directory under build/ and a publish target, a path in the PXE tree and a word
# in its boot scripts: lower case letters, digits and inner '-'.
IMAGE_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
PACKAGE_NAME = re.compile(r"[a-z0-9][a-z0-9+.-]+")
KERNEL_ARG = re.compile(r"[A-Za-z0-9_.,:=/+@-]+")
# The pipeline puts SELinux on every image's command line (ImageSpec.kernel_cmdline): these keys would
# override it (selinux=0, enforcing=0) or start another security module first (lsm=, security=).
SELINUX_KEYS = ("selinux", "enforcing", "lsm", "security")
SIZE = re.compile(r"(\d+)\s*(MiB|GiB|M|G)")
UNITS = {"M": 2**20, "MiB": 2**20, "G": 2**30, "GiB": 2**30}
# A Linux interface name: at most 15 characters (IFNAMSIZ - 1), no '/', ':' or space, not
# '.' or '..'; nothing that dnsmasq reads as a separator or a wildcard either.
INTERFACE_NAME = re.compile(r"(?!\.\.?\Z)[A-Za-z0-9_.-]{1,15}")
# The URLs a spec or inventory gives (mirrors, base_url, includes): http(s), a host name or an IP
# address, an optional port and a path of RFC 3986 unreserved characters and %XX escapes. No user
# or password, query or fragment, and none of the sub-delimiters (! $ & ' ( ) * + , ; =): each of
# those means something in a GRUB, iPXE or shell script, a kickstart or a dnsmasq line that the URL
# is written into, and a published tree needs none of them.
URL = re.compile(r"""
    https?://
    (?: [A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])? (?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*  # name, IPv4
      | \[ (?P<ipv6>[0-9A-Fa-f:.]+) \] )
    (?: : (?P<port>[0-9]{1,5}) )?
    (?: / (?:[A-Za-z0-9._~-] | %[0-9A-Fa-f]{2})* )*
""", re.VERBOSE)
MIN_DISK = 2 * 2**30
MAX_DISK = 2 * 2**40


class SelinuxMode(StrEnum):
    ENFORCING = "enforcing"
    PERMISSIVE = "permissive"


class OutputFormat(StrEnum):
    QCOW2 = "qcow2"
    RAW = "raw"
    # A kernel and the whole root tree as its initramfs: a system that runs from RAM
    # after a network boot (the installer). It has no disk, so none of the disk formats.
    NETBOOT = "netboot"


@dataclass(frozen=True)
class Mirrors:
    debian: str = "http://deb.debian.org/debian"
    security: str = "http://deb.debian.org/debian-security"


@dataclass(frozen=True)
class Bridge:
    """An Open vSwitch bridge made on every boot; `uplink` is the NIC it owns, if any."""

    name: str
    uplink: str | None = None

    @property
    def dib_value(self) -> str:
        return f"{self.name}:{self.uplink}" if self.uplink else self.name


@dataclass(frozen=True)
class ImageSpec:
    name: str
    description: str
    distro: str
    release: str
    element_dirs: tuple[Path, ...]
    elements: tuple[str, ...]
    packages: tuple[str, ...]
    tuned_profile: str
    profile_dirs: tuple[Path, ...]
    selinux: SelinuxMode
    kernel_args: tuple[str, ...]
    disk_size: int
    formats: tuple[OutputFormat, ...]
    mirrors: Mirrors
    bridges: tuple[Bridge, ...]
    source: Path = field(compare=False)

    @property
    def distro_element(self) -> str:
        return DISTRO_ELEMENT[self.distro]

    @property
    def profile_dir(self) -> Path:
        """The directory that holds tuned_profile (validated at load time)."""
        return next(d for d in self.profile_dirs if (d / self.tuned_profile / "tuned.conf").is_file())

    @property
    def is_netboot(self) -> bool:
        return OutputFormat.NETBOOT in self.formats

    @property
    def is_kvm_host(self) -> bool:
        return HOST_ELEMENT in element_closure(self.elements, self.element_dirs)

    @property
    def kernel_cmdline(self) -> list[str]:
        """What the image's kernel is started with: the build writes it into GRUB's config, the
        deploy tree into each node's kickstart."""
        # Debian's kernel starts AppArmor unless told otherwise.
        return ["security=selinux", "selinux=1", *self.kernel_args]

    def to_json(self) -> dict[str, Any]:
        # Paths and enums become strings, tuples lists: plain JSON data.
        return json.loads(json.dumps(asdict(self), default=str))


@dataclass(frozen=True)
class SpecFile:
    path: Path
    default: str
    images: dict[str, ImageSpec]

    def get(self, name: str | None) -> ImageSpec:
        name = name or self.default
        if name not in self.images:
            known = ", ".join(sorted(self.images))
            raise SpecError(self.path, None, None, f"unknown image {name!r}; known images: {known}")
        return self.images[name]


def known_elements(element_dirs: tuple[Path, ...] = (ELEMENTS,)) -> set[str]:
    found = set()
    for root in (*element_dirs, DIB_ELEMENTS):
        found |= {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("_")}
    return found


# --- one parser per key: (raw value, context) -> typed value, raising ValueError


def _text(value: Any, _ctx) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a non-empty string")
    return value


def _line(value: Any, _ctx) -> str:
    if not isinstance(value, str) or "\n" in value:
        raise ValueError("must be one line of text")
    return value


def _string_list(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("must be a list of strings")
    return value


def _distro(value: Any, _ctx) -> str:
    if value not in DISTRO_ELEMENT:
        raise ValueError(f"unsupported distro {value!r}; supported: {', '.join(DISTRO_ELEMENT)}")
    return value


def _release(value: Any, _ctx) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[a-z]+", value):
        raise ValueError(f"release must be a code name such as 'trixie', not {value!r}")
    if value not in DEBIAN_RELEASES:
        supported = ", ".join(f"{name} (Debian {major})" for name, major in DEBIAN_RELEASES.items())
        raise ValueError(f"unsupported release {value!r}; supported: {supported}")
    return value


def _directories(value: Any, ctx, what: str) -> list[Path]:
    dirs = [(ctx["base"] / p).resolve() for p in _string_list(value)]
    for d in dirs:
        if not d.is_dir():
            raise ValueError(f"{what} directory {d} does not exist")
    return dirs


def _element_dirs(value: Any, ctx) -> tuple[Path, ...]:
    # Yours first, so an element of yours may replace one of ours of the same name.
    ctx["element_dirs"] = (*_directories(value, ctx, "element"), ELEMENTS)
    return ctx["element_dirs"]


def _elements(value: Any, ctx) -> tuple[str, ...]:
    names = _string_list(value)
    if not names:
        raise ValueError("must name at least one element")
    searched = ctx["element_dirs"]
    unknown = sorted(set(names) - known_elements(searched))
    if unknown:
        where = ", ".join(str(d) for d in searched)
        raise ValueError(f"unknown element(s) {', '.join(map(repr, unknown))}: not in {where} or diskimage-builder")
    return tuple(names)


def _packages(value: Any, _ctx) -> tuple[str, ...]:
    names = _string_list(value)
    bad = [n for n in names if not PACKAGE_NAME.fullmatch(n)]
    if bad:
        raise ValueError(f"not a Debian package name: {', '.join(map(repr, bad))}")
    return tuple(names)


def _tuned_profile(value: Any, ctx) -> str:
    name = _line(value, ctx)
    # tuned's rule for names; it also keeps the name one directory, and one word in a kickstart's %post.
    if name and (not SAFE_NAME.fullmatch(name) or name in (".", "..")):
        raise ValueError(f"invalid tuned profile name {name!r}: only letters, digits, '_', '.' and '-'")
    return name


def _profile_dirs(value: Any, ctx) -> tuple[Path, ...]:
    return (*_directories(value, ctx, "profile"), PROFILES)


def _selinux(value: Any, _ctx) -> SelinuxMode:
    try:
        return SelinuxMode(value)
    except ValueError:
        raise ValueError(f"must be one of {', '.join(SelinuxMode)}, not {value!r}") from None


def _kernel_args(value: Any, _ctx) -> tuple[str, ...]:
    args = _string_list(value)
    for arg in args:
        if not KERNEL_ARG.fullmatch(arg):
            raise ValueError(f"kernel argument {arg!r} has a character (quote, space, newline, ...) "
                             "that would break the bootloader configuration")
        key = arg.partition("=")[0]
        if key in SELINUX_KEYS:
            raise ValueError(f"kernel argument {arg!r} sets {key}=, which the pipeline owns: every image "
                             "boots with security=selinux selinux=1 (use the spec's selinux key for its mode)")
    return tuple(args)


def parse_size(value: Any) -> int:
    match = SIZE.fullmatch(value) if isinstance(value, str) else None
    if not match:
        raise ValueError(f"size must look like '3GiB' or '2048MiB', not {value!r}")
    size = int(match[1]) * UNITS[match[2]]
    if not MIN_DISK <= size <= MAX_DISK:
        raise ValueError(f"size {value} is outside 2GiB..2TiB")
    return size


def _disk_size(value: Any, _ctx) -> int:
    return parse_size(value)


def _formats(value: Any, _ctx) -> tuple[OutputFormat, ...]:
    names = _string_list(value)
    try:
        formats = tuple(OutputFormat(n) for n in names)
    except ValueError:
        raise ValueError(f"formats must be among {', '.join(OutputFormat)}, not {names}") from None
    if formats == (OutputFormat.NETBOOT,):
        return formats
    if OutputFormat.NETBOOT in formats:
        raise ValueError("netboot is a format of its own (a kernel and a RAM root, no disk): "
                         "it cannot be combined with disk formats")
    if OutputFormat.QCOW2 not in formats:
        raise ValueError("formats must include qcow2 (the artifact that is checked and boot-tested)")
    return formats


def check_url(url: Any) -> str:
    """The URL, exactly as given, if URL matches it whole and its port and IPv6 address are real."""
    found = URL.fullmatch(url) if isinstance(url, str) else None
    try:
        valid = found and 0 < int(found["port"] or 80) < 65536 and (
            not found["ipv6"] or ipaddress.IPv6Address(found["ipv6"]))
    except ValueError:
        valid = False
    if not valid:
        raise ValueError(f"not an http(s) URL of a host, an optional port and a path of letters, digits, "
                         f"'.', '_', '~', '-' and %XX: {url!r}")
    return url


def _mirrors(value: Any, _ctx) -> Mirrors:
    if not isinstance(value, dict):
        raise ValueError("must be a table")
    unknown = set(value) - set(Mirrors.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown mirror {', '.join(sorted(unknown))}; known: debian, security")
    checked = {}
    for key, url in value.items():
        try:
            checked[key] = check_url(url).rstrip("/")  # paths are joined to it
        except ValueError as error:
            raise ValueError(f"{key}: {error}") from None
    return Mirrors(**checked)


def _interface(value: Any, what: str) -> str:
    if not isinstance(value, str) or not INTERFACE_NAME.fullmatch(value):
        raise ValueError(f"{what} {value!r} is not an interface name (1-15 of A-Z a-z 0-9 _ . -)")
    return value


def _bridges(value: Any, _ctx) -> tuple[Bridge, ...]:
    if not isinstance(value, list) or not all(isinstance(b, dict) for b in value):
        raise ValueError('must be a list of tables such as { name = "br-ex", uplink = "enp0s8" }')
    bridges: list[Bridge] = []
    for table in value:
        unknown = sorted(set(table) - {"name", "uplink"})
        if unknown:
            raise ValueError(f"unknown bridge key {unknown[0]!r}; known: name, uplink")
        name = _interface(table.get("name"), "bridge name")
        uplink = _interface(table["uplink"], f"bridge {name!r}: uplink") if "uplink" in table else None
        bridges.append(Bridge(name, uplink))
    names = [b.name for b in bridges]
    uplinks = [b.uplink for b in bridges if b.uplink]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(f"bridge {name!r} is declared twice")
    for uplink in uplinks:
        if uplinks.count(uplink) > 1 or uplink in names:
            raise ValueError(f"interface {uplink!r} is used twice (an uplink belongs to one bridge)")
    return tuple(bridges)


# key -> (parser, default or REQUIRED). One table drives parsing and the docs in images.toml.
REQUIRED = object()
KEYS: dict[str, tuple[Callable[[Any, dict], Any], Any]] = {
    "description": (_line, ""),
    "distro": (_distro, "debian"),
    "release": (_release, "bookworm"),
    "element_dirs": (_element_dirs, []),  # before elements: they are looked up there
    "elements": (_elements, REQUIRED),
    "packages": (_packages, []),
    "tuned_profile": (_tuned_profile, ""),  # required for disk images: checked in _image
    "profile_dirs": (_profile_dirs, []),
    "selinux": (_selinux, "enforcing"),
    "kernel_args": (_kernel_args, []),
    "disk_size": (_disk_size, "3GiB"),
    "formats": (_formats, ["qcow2"]),
    "mirrors": (_mirrors, {}),
    "bridges": (_bridges, []),
}


def _image(path: Path, name: str, table: Any) -> ImageSpec:
    if not IMAGE_NAME.fullmatch(name):
        raise SpecError(path, name, None, "not a safe image name: 1-63 lower case letters, digits and '-', "
                        "starting with a letter or digit")
    if not isinstance(table, dict):
        raise SpecError(path, name, None, "must be a table")
    unknown = sorted(set(table) - set(KEYS))
    if unknown:
        raise SpecError(path, name, unknown[0], f"unknown key; known keys: {', '.join(KEYS)}")
    ctx = {"base": path.parent}
    values = {}
    for key, (parse, default) in KEYS.items():
        if key not in table and default is REQUIRED:
            raise SpecError(path, name, key, "is required")
        try:
            values[key] = parse(table.get(key, default), ctx)
        except ValueError as error:
            raise SpecError(path, name, key, str(error)) from None
    spec = ImageSpec(name=name, source=path, **values)
    if spec.bridges and not spec.is_kvm_host:
        raise SpecError(path, name, "bridges", f"needs the {HOST_ELEMENT} element, which installs Open vSwitch")
    if not spec.tuned_profile:
        if not spec.is_netboot:
            raise SpecError(path, name, "tuned_profile", "is required (every disk image is tuned from first boot)")
        return spec
    if not any((d / spec.tuned_profile / "tuned.conf").is_file() for d in spec.profile_dirs):
        searched = ", ".join(str(d) for d in spec.profile_dirs)
        raise SpecError(path, name, "tuned_profile",
                        f"profile {spec.tuned_profile!r} not found (no {spec.tuned_profile}/tuned.conf in {searched})")
    return spec


def load(path: Path = SPEC_FILE) -> SpecFile:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise SpecError(path, None, None, "spec file not found") from None
    except tomllib.TOMLDecodeError as error:
        raise SpecError(path, None, None, f"not valid TOML: {error}") from None
    unknown = sorted(set(data) - {"default", "image"})
    if unknown:
        raise SpecError(path, None, unknown[0], "unknown top-level key; expected 'default' and [image.NAME] tables")
    tables = data.get("image", {})
    if not isinstance(tables, dict) or not tables:
        raise SpecError(path, None, "image", "no [image.NAME] tables")
    images = {name: _image(path, name, table) for name, table in tables.items()}
    default = data.get("default", next(iter(images)))
    if default not in images:
        raise SpecError(path, None, "default", f"names unknown image {default!r}")
    return SpecFile(path=path, default=default, images=images)
