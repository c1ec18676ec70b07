"""Node inventories (inventory.toml): the bare-metal nodes to install, loaded into typed,
validated objects.

Everything is checked before any kickstart is written; each error names the file,
the node and the field (`network.gateway` for a key inside a table).
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address
from pathlib import Path
from typing import Any

from .. import spec as specs
from ..errors import InventoryError
from ..paths import SPEC_FILE

# Each pattern validates a whole value: use fullmatch (match with `$` lets a trailing newline through).
MAC = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}")
# RFC 1123: dot-separated labels of letters, digits and inner hyphens, 253 characters at most.
HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
# A kernel disk name (sda, vdb, nvme0n1) or a path under /dev (/dev/disk/by-id/...). Never a
# ',' (kickstart's list separator), '=', quote or space.
DISK_NAME = re.compile(r"[a-z][a-z0-9]*")
DISK_PATH = re.compile(r"/dev(?:/[A-Za-z0-9_.:+@-]+)+")
# The netboot image the PXE tree boots, unless [site] names another (images.toml: [image.installer]).
DEFAULT_INSTALLER = "installer"


class Boot(StrEnum):
    BIOS = "bios"
    UEFI = "uefi"


class Loader(StrEnum):
    """What the PXE server hands a booting node first."""

    IPXE = "ipxe"  # iPXE for BIOS and UEFI, then boot.ipxe, kernel and initrd over HTTP
    PXELINUX_GRUB = "pxelinux-grub"  # pxelinux.0 for BIOS, GRUB for UEFI; kernel and initrd over TFTP


class CacheMode(StrEnum):
    WRITETHROUGH = "writethrough"
    WRITEBACK = "writeback"


@dataclass(frozen=True)
class StaticNetwork:
    interface: IPv4Interface  # the address with its prefix
    gateway: IPv4Address | None
    nameservers: tuple[IPv4Address | IPv6Address, ...]


@dataclass(frozen=True)
class Cache:
    """An SSD as LVM cache in front of a slower data disk, for the volume of VM images."""

    ssd: str
    data: str
    size_mib: int
    mode: CacheMode


@dataclass(frozen=True)
class Node:
    name: str
    macs: tuple[str, ...]  # lower case; the first is the boot (PXE) NIC
    boot: Boot
    network: StaticNetwork | None  # None: DHCP
    root_disk: str
    cache: Cache | None
    role: str  # an image of the spec file
    kernel_args: tuple[str, ...]  # after the role's
    tuned_profile: str | None  # instead of the role's

    @property
    def boot_mac(self) -> str:
        return self.macs[0]

    @property
    def disks(self) -> tuple[str, ...]:
        """Every disk the installer may touch, the root disk first."""
        return (self.root_disk, self.cache.data, self.cache.ssd) if self.cache else (self.root_disk,)


@dataclass(frozen=True)
class PxeSite:
    """[site.pxe]: where the PXE server's dnsmasq answers (proxy DHCP, TFTP) and what it hands out."""

    interface: str | None = None  # None: every interface
    subnet: IPv4Network | None = None  # None: the network that holds base_url's address
    loader: Loader = Loader.IPXE


@dataclass(frozen=True)
class Site:
    base_url: str  # where BASE_URL/ROLE/ARTIFACT is published
    snippets: Path | None  # a directory of *.ks files added to every kickstart
    includes: tuple[str, ...]  # URLs for %include lines, fetched by the installer
    pxe: PxeSite = PxeSite()
    installer: str = DEFAULT_INSTALLER  # the netboot image of the spec file that the PXE tree boots

    @property
    def snippet_files(self) -> list[Path]:
        return sorted(self.snippets.glob("*.ks")) if self.snippets else []


@dataclass(frozen=True)
class Inventory:
    path: Path
    site: Site
    spec: specs.SpecFile
    nodes: dict[str, Node]

    def image(self, node: Node) -> specs.ImageSpec:
        return self.spec.images[node.role]

    def kernel_args(self, node: Node) -> tuple[str, ...]:
        """The role's kernel command line, as the build puts it on GRUB's linux line, then the node's."""
        return (*self.image(node).kernel_cmdline, *node.kernel_args)

    def tuned_profile(self, node: Node) -> str:
        return node.tuned_profile or self.image(node).tuned_profile


class _Problem(ValueError):
    """A bad value inside a table; `field` is its key, dotted below the table's own."""

    def __init__(self, field: str, problem: str):
        super().__init__(problem)
        self.field = field


# --- one parser per field: (raw value, context) -> typed value, raising ValueError


def _strings(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("must be a list of strings")
    return value


def _optional(parse: Callable[[Any, dict], Any]) -> Callable[[Any, dict], Any]:
    # TOML has no null: None is only ever the default of a field left out.
    return lambda value, ctx: None if value is None else parse(value, ctx)


def _choice(kind: type[StrEnum]) -> Callable[[Any, dict], Any]:
    def parse(value: Any, _ctx) -> StrEnum:
        try:
            return kind(value)
        except ValueError:
            raise ValueError(f"must be one of {', '.join(kind)}, not {value!r}") from None

    return parse


def _macs(value: Any, _ctx) -> tuple[str, ...]:
    macs = [mac.lower() for mac in _strings(value)]
    if not macs:
        raise ValueError("must list at least one MAC address; the first is the PXE NIC")
    for i, mac in enumerate(macs):
        if not MAC.fullmatch(mac):
            raise ValueError(f"{mac!r} is not a MAC address such as 52:54:00:12:34:56")
        if mac in macs[:i]:
            raise ValueError(f"MAC {mac} is listed twice")
    return tuple(macs)


def _disk(value: Any, _ctx) -> str:
    path_like = isinstance(value, str) and DISK_PATH.fullmatch(value) and not {".", ".."} & set(value.split("/"))
    if not (path_like or (isinstance(value, str) and DISK_NAME.fullmatch(value))):
        raise ValueError(f"{value!r} is not a block device name (sda, nvme0n1) or a path under /dev "
                         "(/dev/disk/by-id/...)")
    return value


def _root_disk(value: Any, ctx) -> str:
    ctx["root_disk"] = _disk(value, ctx)  # the cache's disks must differ from it
    return ctx["root_disk"]


def _same_disk(a: str, b: str) -> bool:
    return a.removeprefix("/dev/") == b.removeprefix("/dev/")


def _ipv4(value: Any, _ctx) -> IPv4Address:
    try:
        return IPv4Address(value if isinstance(value, str) else "")
    except ValueError:
        raise ValueError(f"{value!r} is not an IPv4 address") from None


def _prefix(value: Any, _ctx) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 32:
        raise ValueError(f"{value!r} is not a prefix length from 1 to 32")
    return value


def _netmask(value: Any, ctx) -> int:
    mask = _ipv4(value, ctx)
    try:
        net = IPv4Network(f"0.0.0.0/{mask}")
    except ValueError:
        net = None
    # ipaddress also reads a host mask (0.0.0.255); only a contiguous netmask is one.
    if net is None or net.netmask != mask or net.prefixlen == 0:
        raise ValueError(f"{value!r} is not a netmask such as 255.255.255.0")
    return net.prefixlen


def _nameservers(value: Any, _ctx) -> tuple[IPv4Address | IPv6Address, ...]:
    servers = []
    for server in _strings(value):
        try:
            servers.append(ipaddress.ip_address(server))
        except ValueError:
            raise ValueError(f"{server!r} is not an IP address") from None
    return tuple(servers)


def _network(value: Any, ctx) -> StaticNetwork | None:
    if value == "dhcp":
        return None
    if not isinstance(value, dict):
        raise ValueError('must be "dhcp" or a table { address = "10.0.0.11", prefix = 24, gateway = "10.0.0.1" }')
    fields = _table(value, NETWORK_KEYS, ctx)
    if (fields["prefix"] is None) == (fields["netmask"] is None):
        raise _Problem("prefix", "give the prefix or the netmask: one of them")
    interface = IPv4Interface((fields["address"], fields["prefix"] or fields["netmask"]))
    net = interface.network
    if net.prefixlen < 31 and interface.ip in (net.network_address, net.broadcast_address):
        raise _Problem("address", f"{interface.ip} is the network or broadcast address of {net}")
    gateway = fields["gateway"]
    if gateway is not None and (gateway not in net or gateway == interface.ip):
        raise _Problem("gateway", f"{gateway} is not another address in {net}")
    return StaticNetwork(interface, gateway, fields["nameservers"])


def _size_mib(value: Any, _ctx) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{value!r} is not a size in MiB (a positive whole number)")
    return value


def _cache(value: Any, ctx) -> Cache:
    if not isinstance(value, dict):
        raise ValueError('must be a table { ssd = "nvme0n1", data = "sdb", size_mib = 100000 }')
    cache = Cache(**_table(value, CACHE_KEYS, ctx))
    if _same_disk(cache.ssd, cache.data):
        raise _Problem("ssd", f"{cache.ssd} is also the data disk: the cache needs a disk of its own")
    for key in ("ssd", "data"):
        if _same_disk(getattr(cache, key), ctx["root_disk"]):
            raise _Problem(key, f"{getattr(cache, key)} is the root disk")
    return cache


def _role(value: Any, ctx) -> str:
    spec: specs.SpecFile = ctx["spec"]
    if not isinstance(value, str) or value not in spec.images:
        raise ValueError(f"unknown role {value!r}: not an image of {spec.path}; "
                         f"known images: {', '.join(sorted(spec.images))}")
    if spec.images[value].is_netboot:
        raise ValueError(f"role {value!r} is a netboot image (an installer), not an image to install")
    ctx["image"] = spec.images[value]  # the overrides below are checked against it
    return value


def _installer(value: Any, ctx) -> str:
    spec: specs.SpecFile = ctx["spec"]
    if not isinstance(value, str) or value not in spec.images:
        raise ValueError(f"unknown installer image {value!r}: not an image of {spec.path}; "
                         f"known images: {', '.join(sorted(spec.images))}")
    if not spec.images[value].is_netboot:
        raise ValueError(f"image {value!r} is not a netboot image (formats = [\"netboot\"]): it cannot boot "
                         "a node as its installer")
    return value


def _kernel_args(value: Any, ctx) -> tuple[str, ...]:
    parse, _default = specs.KEYS["kernel_args"]  # the spec's own rule, so both refuse the same
    return parse(value, ctx)


def _tuned_profile(value: Any, ctx) -> str:
    parse, _default = specs.KEYS["tuned_profile"]
    name = parse(value, ctx)  # the spec's own rule for names
    image: specs.ImageSpec = ctx["image"]
    if not any((d / name / "tuned.conf").is_file() for d in image.profile_dirs):
        searched = ", ".join(str(d) for d in image.profile_dirs)
        raise ValueError(f"profile {name!r} not found (no {name}/tuned.conf in {searched}, "
                         f"the profile_dirs of image {image.name!r})")
    return name


def _base_url(value: Any, _ctx) -> str:
    return specs.check_url(value)


def _snippets(value: Any, ctx) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, str) or not (ctx["base"] / value).is_dir():
        raise ValueError(f"{value!r} is not a directory (relative to the inventory)")
    return (ctx["base"] / value).resolve()


def _includes(value: Any, _ctx) -> tuple[str, ...]:
    return tuple(specs.check_url(url) for url in _strings(value))


def _interface(value: Any, _ctx) -> str:
    if not isinstance(value, str) or not specs.INTERFACE_NAME.fullmatch(value):
        raise ValueError(f"{value!r} is not a network interface name such as eth0 or enp1s0")
    return value


def _subnet(value: Any, _ctx) -> IPv4Network:
    try:
        # With its prefix: a bare address would read as a /32.
        return IPv4Network(value if isinstance(value, str) and "/" in value else "")
    except ValueError:
        raise ValueError(f"{value!r} is not an IPv4 network such as 10.0.0.0/24") from None


def _pxe(value: Any, ctx) -> PxeSite:
    return PxeSite(**_table(value, PXE_KEYS, ctx))


# field -> (parser, default or REQUIRED), in the order they are parsed. One table per
# level drives parsing and the errors; the docs are in kickstarts/inventory.example.toml.
REQUIRED = specs.REQUIRED
Keys = dict[str, tuple[Callable[[Any, dict], Any], Any]]
SITE_KEYS: Keys = {
    "base_url": (_base_url, REQUIRED),
    "snippets": (_snippets, None),
    "includes": (_includes, []),
    "pxe": (_pxe, {}),
    "installer": (_optional(_installer), None),
}
PXE_KEYS: Keys = {
    "interface": (_optional(_interface), None),
    "subnet": (_optional(_subnet), None),
    "loader": (_choice(Loader), Loader.IPXE),
}
NETWORK_KEYS: Keys = {
    "address": (_ipv4, REQUIRED),
    "prefix": (_optional(_prefix), None),
    "netmask": (_optional(_netmask), None),
    "gateway": (_optional(_ipv4), None),
    "nameservers": (_nameservers, []),
}
CACHE_KEYS: Keys = {
    "ssd": (_disk, REQUIRED),
    "data": (_disk, REQUIRED),
    "size_mib": (_size_mib, REQUIRED),
    "mode": (_choice(CacheMode), CacheMode.WRITETHROUGH),
}
NODE_KEYS: Keys = {
    "macs": (_macs, REQUIRED),
    "boot": (_choice(Boot), REQUIRED),
    "network": (_network, "dhcp"),
    "root_disk": (_root_disk, REQUIRED),  # before cache: its disks must differ
    "cache": (_optional(_cache), None),
    "role": (_role, REQUIRED),  # before the overrides: they are checked against its image
    "kernel_args": (_kernel_args, []),
    "tuned_profile": (_optional(_tuned_profile), None),
}
TOP_KEYS = ("site", "spec_file", "node")


def _table(value: Any, keys: Keys, ctx: dict) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError("must be a table")
    unknown = sorted(set(value) - set(keys))
    if unknown:
        raise _Problem(unknown[0], f"unknown field; known fields: {', '.join(keys)}")
    fields = {}
    for key, (parse, default) in keys.items():
        if key not in value and default is REQUIRED:
            raise _Problem(key, "is required")
        try:
            fields[key] = parse(value.get(key, default), ctx)
        except _Problem as problem:
            raise _Problem(f"{key}.{problem.field}", str(problem)) from None
        except ValueError as error:
            raise _Problem(key, str(error)) from None
    return fields


def _fields(path: Path, node: str | None, prefix: str, value: Any, keys: Keys, ctx: dict) -> dict[str, Any]:
    try:
        return _table(value, keys, ctx)
    except _Problem as problem:
        raise InventoryError(path, node, prefix + problem.field, str(problem)) from None
    except ValueError as error:
        raise InventoryError(path, node, prefix.rstrip(".") or None, str(error)) from None


def _check_name(path: Path, name: str, table: Any) -> None:
    if len(name) > 253 or not all(HOST_LABEL.fullmatch(label) for label in name.split(".")):
        raise InventoryError(path, name, "hostname", "not a host name: dot-separated labels of letters, "
                             "digits and inner '-', 63 characters each")
    # [node.a.example.com] is table a with a table example in it: say what was meant.
    fields = table if isinstance(table, dict) else {}
    nested = [key for key, value in fields.items() if isinstance(value, dict) and key not in NODE_KEYS]
    if nested:
        raise InventoryError(path, name, nested[0], f'unknown field; a host name with dots needs quotes: '
                             f'[node."{name}.{nested[0]}..."]')


def _spec_file(path: Path, value: Any) -> specs.SpecFile:
    if value is None:
        return specs.load(SPEC_FILE)
    if not isinstance(value, str) or not (path.parent / value).is_file():
        raise InventoryError(path, None, "spec_file", f"{value!r} is not a file (relative to the inventory)")
    return specs.load((path.parent / value).resolve())


def _check_unique(path: Path, nodes: list[Node]) -> None:
    """Host names (in any case), MACs and static addresses each belong to one node."""
    owners: dict[tuple[str, str], str] = {}
    for node in nodes:
        claims = [("hostname", node.name.lower()), *(("macs", mac) for mac in node.macs)]
        if node.network:
            claims.append(("network.address", str(node.network.interface.ip)))
        for field, value in claims:
            owner = owners.setdefault((field, value), node.name)
            if owner != node.name:
                hint = " (host names ignore case)" if field == "hostname" else ""
                raise InventoryError(path, node.name, field, f"{value} belongs to node {owner!r} already{hint}")


def load(path: Path) -> Inventory:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise InventoryError(path, None, None, "inventory file not found") from None
    except tomllib.TOMLDecodeError as error:
        raise InventoryError(path, None, None, f"not valid TOML: {error}") from None
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise InventoryError(path, None, unknown[0], "unknown top-level key; expected spec_file, [site] "
                             "and [node.HOSTNAME] tables")
    spec = _spec_file(path, data.get("spec_file"))
    site_fields = _fields(path, None, "site.", data.get("site", {}), SITE_KEYS, {"base": path.parent, "spec": spec})
    # The installer is looked up when a PXE tree is rendered: kickstarts alone need none.
    site = Site(**{**site_fields, "installer": site_fields["installer"] or DEFAULT_INSTALLER})
    tables = data.get("node", {})
    if not isinstance(tables, dict) or not tables:
        raise InventoryError(path, None, "node", "no [node.HOSTNAME] tables")
    nodes = []
    for name, table in tables.items():
        _check_name(path, name, table)
        fields = _fields(path, name, "", table, NODE_KEYS, {"base": path.parent, "spec": spec})
        nodes.append(Node(name=name, **fields))
    _check_unique(path, nodes)
    return Inventory(path=path, site=site, spec=spec, nodes={node.name: node for node in nodes})
