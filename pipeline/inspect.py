"""Offline check of a built image: open the qcow2 read-only with libguestfs and verify
what the spec promises, without booting it.

The appliance is launched once (about 20 s under TCG, most of the check's time) and
then asked only cheap questions: one read, stat or xattr list each, no shell. Its
inspection API is not used: inspect_os costs 13-23 s under TCG (a udev settle per
probe, then augeas for fstab), more than every check together. So the root is found
from the GPT, which is read in one call and parsed here, and /etc/os-release, the file
inspect_os reads first, is read directly. The same goes for list_filesystems (about
9 s, it probes LVM, MD and btrfs) and part_get_gpt_type (sgdisk, about 1 s a call).

Everything that parses text is a pure function of strings, tested without an image.
"""

from __future__ import annotations

import fnmatch
import json
import os
import posixpath
import re
import shlex
import stat
import struct
import sys
import tarfile
import uuid
import zlib
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Mapping

from . import atomic, boot, liveimg, manifest, selinux
from .manifest import parse_dpkg_status
from .errors import PipelineError, ToolMissing
from .progress import Timings, say, step
from .selinux import element_closure
from .spec import ImageSpec

DEVICE = "/dev/sda"   # libguestfs names the first drive added /dev/sda, whatever the backend
SECTOR = 512          # the appliance's virtio-scsi disk; the pipeline writes 512-byte GPTs
GPT_SECTORS = 34      # protective MBR, GPT header, 128 entries of 128 bytes

GPT_BIOS_BOOT = "21686148-6449-6E6F-744E-656564454649"
GPT_ESP = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
GPT_ROOT_X86_64 = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"  # discoverable partitions spec
BOOT_KERNEL_SECTOR = 0x5C  # in GRUB's boot.img: LBA of core.img, see bootloader.py

GUEST_ELEMENT = "kvm-guest"
CLOUD_INIT_ELEMENT = "kvm-cloud-init"
BASE_PACKAGES = ("openssh-server", "grub-pc", "grub-efi-amd64-bin", "tuned", "selinux-policy-default",
                 "policycoreutils", "systemd")
# kvm-guest swaps debian-minimal's generic kernel for the cloud one (virtio only, smaller).
KERNEL_PACKAGE = "linux-image-amd64"
GUEST_KERNEL_PACKAGE = "linux-image-cloud-amd64"
GUEST_PACKAGES = ("qemu-guest-agent",)
CLOUD_INIT_PACKAGES = ("cloud-init", "cloud-guest-utils")
HOST_PACKAGES = ("qemu-system-x86", "qemu-utils", "libvirt-daemon-system", "libvirt-clients", "ovmf",
                 "openvswitch-switch", "ifupdown", "lvm2", "thin-provisioning-tools")
# kvm-host: (wants directory, unit) links that `systemctl enable` made at build time.
HOST_UNITS = (("multi-user.target.wants", "libvirtd.service"),
              ("multi-user.target.wants", "openvswitch-switch.service"),
              ("multi-user.target.wants", "networking.service"),
              ("sockets.target.wants", "virtlogd.socket"))
HOST_LABELS: tuple[tuple[str, str], ...] = (
    ("/usr/sbin/libvirtd", "virtd_exec_t"),
    ("/usr/bin/qemu-system-x86_64", "qemu_exec_t"),
    ("/usr/share/openvswitch/scripts/ovs-ctl", "openvswitch_exec_t"),
    ("/usr/lib/openvswitch-switch/ovs-vswitchd", "openvswitch_exec_t"),   # from our kvmpipe_host.fc
    ("/usr/sbin/ovsdb-server", "openvswitch_exec_t"),   # from our kvmpipe_host.fc
    ("/etc/openvswitch", "openvswitch_conf_t"),
    ("/var/lib/libvirt/images", "virt_image_t"),
    ("/usr/libexec/kvmpipe/netns-port", "kvmpipe_netagent_exec_t"),
)
OVS_INTERFACES = "/etc/network/interfaces.d/ovs-bridges"
POLICY_MODULES = "/var/lib/selinux/default/active/modules/400"  # semodule's default priority
DEBIAN_MAJOR = {"buster": "10", "bullseye": "11", "bookworm": "12", "trixie": "13"}
DATASOURCES = ("NoCloud", "ConfigDrive", "OpenStack")

# Expected SELinux types, as Debian's refpolicy file_contexts give them and setfiles
# wrote them (verified against a bookworm image). None: file_contexts says <<none>>,
# so the file stays unlabeled: /proc is labeled by the kernel when procfs is mounted.
LABELS: tuple[tuple[str, str | None], ...] = (
    ("/usr/sbin/sshd", "sshd_exec_t"),
    ("/etc/shadow", "shadow_t"),
    ("/usr/lib/systemd/systemd", "init_exec_t"),
    ("/etc/ssh/sshd_config", "etc_t"),
    ("/etc/machine-id", "etc_t"),
    ("/etc/selinux/config", "selinux_config_t"),
    ("/etc/selinux/default/policy", "policy_config_t"),
    ("/etc/tuned/active_profile", "tuned_rw_etc_t"),
    ("/boot/grub/grub.cfg", "boot_t"),
    ("/boot/efi", "boot_t"),  # the mountpoint itself, read before the ESP is mounted on it
    ("/sys", "sysfs_t"),
    ("/dev", "device_t"),
    ("/run", "var_run_t"),
    ("/tmp", "tmp_t"),
    ("/proc", None),
)
UNLABELED_BY_POLICY = {path for path, expected in LABELS if expected is None}
TUNED_DAEMON = ("/usr/sbin/tuned", "/usr/bin/tuned")
TUNED_DAEMON_TYPE = "tuned_exec_t"
# Directories sampled for files with no label at all: (directory, recursive). About
# 1.5 s under TCG: a find, and one lxattrlist per directory that holds files; a find
# of /var/lib alone would cost 1.4 s more.
LABEL_SAMPLE = (("/etc", True), ("/usr/bin", False), ("/usr/sbin", False), ("/var/lib", False))
SHOWN = 10  # names listed in a failure's detail
STAT_BATCH = 500  # names per lstatnslist call, well under libguestfs's message limit
# Names a shell or an interactive tool leaves its history under, in any home directory.
HISTORY_FILES = frozenset({".bash_history", ".sh_history", ".ash_history", ".zsh_history", ".history",
                           ".python_history", ".lesshst", ".viminfo", ".mysql_history", ".psql_history",
                           ".sqlite_history", ".wget-hsts"})
APT_LISTS_KEPT = ("/var/lib/apt/lists/lock", "/var/lib/apt/lists/partial")  # what apt itself keeps, empty
READ_CHUNK = 2**20  # well under libguestfs's 4 MiB message limit
# What the checks read from build-info.
INFO_KEYS = ("kernel", "kernel_cmdline", "root_uuid", "esp_uuid", "input_hash", "version", "liveimg")


class CheckFailed(Exception):
    """A check's finding, raised from deep inside it; the message is the detail."""


@dataclass(frozen=True)
class CheckResult:
    name: str
    passed: bool
    detail: str


@dataclass
class Report:
    image: str
    qcow2: Path
    json_path: Path
    results: list[CheckResult] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    qcow2_sha256: str = ""  # build-info's: which artifact this verdict is about

    @property
    def passed(self) -> bool:
        return bool(self.results) and all(r.passed for r in self.results)

    @property
    def failed(self) -> list[CheckResult]:
        return [r for r in self.results if not r.passed]

    def to_json(self) -> dict[str, Any]:
        return {"image": self.image, "qcow2": str(self.qcow2), "qcow2_sha256": self.qcow2_sha256, "passed": self.passed,
                "checks": [asdict(r) for r in self.results], "timings": self.timings}


# --- pure parsers: strings in, facts out


def parse_env_file(text: str) -> dict[str, str]:
    """KEY=value lines as in /etc/os-release and /etc/selinux/config; shell quoting removed."""
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        try:
            words = shlex.split(value, comments=True)
        except ValueError:
            words = [value]
        values[key.strip()] = " ".join(words)
    return values


@dataclass(frozen=True)
class FstabEntry:
    source: str
    mountpoint: str
    fstype: str
    options: str


def _fstab_unescape(field_: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field_)


def parse_fstab(text: str) -> list[FstabEntry]:
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) < 3 or len(fields) > 6:
            raise ValueError(f"fstab line {number} has {len(fields)} fields: {line.strip()!r}")
        options = fields[3] if len(fields) > 3 else "defaults"
        entries.append(FstabEntry(*(_fstab_unescape(f) for f in fields[:3]), options))
    return entries


def fstab_uuid(source: str) -> str | None:
    """The UUID in a `UUID=...` source, lower-cased (vfat serials are upper-case); else None."""
    if source.upper().startswith("UUID="):
        return source[5:].strip('"').lower()
    return None


def shadow_problems(text: str) -> list[str]:
    """Accounts in /etc/shadow that could log in with a password.

    Only a locked field (starting with `!` or `*`) passes: an empty field means no
    password is needed at all, and anything else is a usable hash."""
    problems = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split(":")
        if len(fields) < 2:
            problems.append(f"line {number} is malformed")
            continue
        name, password = fields[0], fields[1]
        if password == "":
            problems.append(f"{name}: empty password (no password needed)")
        elif not password.startswith(("!", "*")):
            problems.append(f"{name}: usable password hash")
    return problems


def passwd_problems(text: str) -> list[str]:
    """Accounts whose /etc/passwd password field bypasses shadow: empty, or a hash."""
    problems = []
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) < 2 or not line.strip():
            continue
        if fields[1] == "":
            problems.append(f"{fields[0]}: empty password in /etc/passwd")
        elif fields[1] not in ("x", "*", "!") and not fields[1].startswith(("!", "*")):
            problems.append(f"{fields[0]}: password hash in /etc/passwd")
    return problems


# sshd: the first value obtained for a keyword wins; these are the defaults when unset.
SSHD_DEFAULTS = {"passwordauthentication": "yes", "kbdinteractiveauthentication": "yes",
                 "permitemptypasswords": "no"}
SSHD_ALIASES = {"challengeresponseauthentication": "kbdinteractiveauthentication"}
_SSHD_LINE = re.compile(r"\s*([^\s=]+)\s*(?:=\s*|\s+)(.*?)\s*$")


@dataclass(frozen=True)
class SshdOption:
    value: str
    source: str  # the file that set it, or "default"


def _sshd_lines(text: str):
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _SSHD_LINE.match(line)
        if match:
            yield match[1].lower(), match[2]


def _sshd_pattern(pattern: str) -> str:
    # sshd: "Files without absolute paths are assumed to be in /etc/ssh".
    return pattern if pattern.startswith("/") else posixpath.join("/etc/ssh", pattern)


def sshd_include_patterns(text: str) -> list[str]:
    """The absolute glob patterns of a config text's Include lines, in order."""
    patterns = []
    for keyword, value in _sshd_lines(text):
        if keyword == "include":
            patterns += [_sshd_pattern(p) for p in shlex.split(value)]
    return patterns


def _glob_matches(pattern: str, path: str) -> bool:
    # As glob(3): a wildcard never matches across a slash.
    want, have = pattern.split("/"), path.split("/")
    return len(want) == len(have) and all(fnmatch.fnmatchcase(h, w) for w, h in zip(want, have))


def sshd_effective(main: str, files: Mapping[str, str], main_path: str = "/etc/ssh/sshd_config",
                   ) -> dict[str, SshdOption]:
    """Effective global sshd options: keyword (lower-case) -> first value and its file.

    As sshd reads its config: top to bottom, each Include expanded in place in lexical
    order of the matching paths in `files` (path -> text), the first value of a keyword
    wins, and lines inside a Match block (up to the end of its file, or `Match all`)
    apply to some connections only, so they set no global value."""
    found: dict[str, SshdOption] = {}

    def read(path: str, text: str, depth: int) -> None:
        if depth > 16:
            raise ValueError(f"sshd config includes nest too deep at {path}")
        in_match = False
        for keyword, value in _sshd_lines(text):
            keyword = SSHD_ALIASES.get(keyword, keyword)
            if keyword == "match":
                in_match = value.strip().lower() != "all"
            elif keyword == "include":
                if in_match:
                    continue
                for pattern in shlex.split(value):
                    pattern = _sshd_pattern(pattern)
                    for included in sorted(p for p in files if _glob_matches(pattern, p)):
                        read(included, files[included], depth + 1)
            elif not in_match and keyword not in found:
                words = value.split()
                found[keyword] = SshdOption(words[0].lower() if words else "", path)

    read(main_path, main, 0)
    for keyword, default in SSHD_DEFAULTS.items():
        found.setdefault(keyword, SshdOption(default, "default"))
    return found


def grub_linux_args(text: str) -> list[str]:
    """The kernel path and arguments of grub.cfg's first `linux` line (the default entry)."""
    for line in text.splitlines():
        words = line.split()
        if words and words[0] in ("linux", "linuxefi", "linux16"):
            return words[1:]
    raise ValueError("grub.cfg has no linux line")


def cloud_datasources(texts: list[tuple[str, str]]) -> list[str] | None:
    """cloud-init's datasource_list from cloud.cfg then cloud.cfg.d/*.cfg in lexical
    order, as cloud-init merges them: the last file that sets it wins."""
    import yaml

    result = None
    for name, text in texts:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ValueError(f"{name} is not valid YAML: {error}") from None
        if isinstance(data, dict) and "datasource_list" in data:
            value = data["datasource_list"]
            result = [str(v) for v in value] if isinstance(value, list) else [str(value)]
    return result


@dataclass(frozen=True)
class FileEntry:
    """A path of the image's root filesystem and what lstat says of it."""

    path: str
    mode: int  # st_mode: the file's type and permission bits
    size: int

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)


def _in_etc_as_resolv_conf_copy(entry: FileEntry) -> bool:
    # /etc/resolv.conf.ORIG (diskimage-builder's), /etc/.resolv.conf.systemd-resolved.bak (systemd-resolved's
    # postinst), *.bak, *~ ... ; not /etc/cloud/templates/resolv.conf.tmpl, a package's template.
    directory, name = posixpath.split(entry.path)
    return directory == "/etc" and re.fullmatch(r"\.?resolv\.conf.+", name) is not None


# What a build leaves behind of the build host or of its own run: (what it is, which paths).
# Logs have no exceptions: diskimage-builder's dpkg element empties what package installs
# logged, and any line left in /var/log was written on the build host, not on this machine.
LEFTOVERS: tuple[tuple[str, Callable[[FileEntry], bool]], ...] = (
    ("copies of the build host's resolv.conf", _in_etc_as_resolv_conf_copy),
    # A file, not the symlink to systemd-resolved's stub: debootstrap and diskimage-builder copy the host's.
    ("the build host's nameservers", lambda e: e.path == "/etc/resolv.conf" and e.is_file and e.size > 0),
    ("apt lists", lambda e: e.path.startswith("/var/lib/apt/lists/") and e.path not in APT_LISTS_KEPT),
    (".deb caches", lambda e: e.path.startswith("/var/cache/apt/archives/") and e.path.endswith(".deb")),
    ("shell history", lambda e: posixpath.basename(e.path) in HISTORY_FILES),
    ("non-empty logs", lambda e: e.path.startswith("/var/log/") and e.is_file and e.size > 0),
    # What `cloud-init clean` removes: the build's own instance would be every clone's.
    ("cloud-init instance state",
     lambda e: re.fullmatch(r"/var/lib/cloud/(instance|(instances|data|sem)/.+)", e.path) is not None),
)


def leftover_problems(entries: list[FileEntry]) -> list[str]:
    """One problem per kind of leftover found, naming the paths."""
    problems = []
    for what, found in LEFTOVERS:
        paths = [e.path for e in entries if found(e)]
        if paths:
            shown = ", ".join(paths[:SHOWN]) + (f" and {len(paths) - SHOWN} more" if len(paths) > SHOWN else "")
            problems.append(f"{what}: {shown}")
    return problems


def world_writable(entries: list[FileEntry]) -> list[str]:
    """Regular files anyone may write (a symlink's own mode means nothing)."""
    return [f"{e.path} ({stat.filemode(e.mode)})" for e in entries if e.is_file and e.mode & stat.S_IWOTH]


def by_directory(top: str, found: list[str]) -> dict[str, list[str]]:
    """Directory -> names in it, for what libguestfs's find(TOP) answered (below TOP; "/a/b", or
    "a/b" from older libguestfs)."""
    groups: dict[str, list[str]] = defaultdict(list)
    for relative in found:
        directory, name = posixpath.split(posixpath.join(top, relative.lstrip("/")))
        groups[directory].append(name)
    return groups


@dataclass
class Ifupdown:
    """What an interfaces(5) file declares: iface stanzas, auto/allow-* classes, sources."""

    interfaces: dict[str, dict[str, str]] = field(default_factory=dict)
    classes: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    sources: list[str] = field(default_factory=list)


def parse_ifupdown(text: str) -> Ifupdown:
    parsed = Ifupdown()
    current: dict[str, str] | None = None
    for raw in text.splitlines():
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        keyword, rest = words[0], words[1:]
        if keyword == "iface" and rest:
            current = parsed.interfaces.setdefault(rest[0], {})
        elif keyword == "auto" or keyword.startswith("allow-"):
            parsed.classes[keyword] += rest
            current = None
        elif keyword in ("source", "source-directory"):
            parsed.sources += rest
            current = None
        elif current is not None:
            current[keyword] = " ".join(rest)
    return parsed


def bridge_problems(spec: ImageSpec, declared: Ifupdown) -> list[str]:
    """What is missing or wrong for the spec's OVS bridges in Debian's ifupdown form."""
    problems = []
    for bridge in spec.bridges:
        stanza = declared.interfaces.get(bridge.name)
        if stanza is None or stanza.get("ovs_type") != "OVSBridge":
            problems.append(f"{bridge.name}: no 'iface {bridge.name}' with ovs_type OVSBridge")
            continue
        for klass in ("auto", "allow-ovs"):
            if bridge.name not in declared.classes.get(klass, []):
                problems.append(f"{bridge.name}: not in '{klass}'")
        ports = stanza.get("ovs_ports", "").split()
        if bridge.uplink:
            port = declared.interfaces.get(bridge.uplink, {})
            if bridge.uplink not in ports:
                problems.append(f"{bridge.name}: ovs_ports {ports} lacks uplink {bridge.uplink}")
            if port.get("ovs_type") != "OVSPort" or port.get("ovs_bridge") != bridge.name:
                problems.append(f"{bridge.uplink}: not declared an OVSPort of {bridge.name}")
            if bridge.uplink not in declared.classes.get(f"allow-{bridge.name}", []):
                problems.append(f"{bridge.uplink}: not in 'allow-{bridge.name}'")
        elif ports:
            problems.append(f"{bridge.name}: has ports {ports}, the spec gives no uplink")
    extra = sorted(name for name, stanza in declared.interfaces.items()
                   if stanza.get("ovs_type") == "OVSBridge" and name not in {b.name for b in spec.bridges})
    if extra:
        problems.append(f"bridges not in the spec: {', '.join(extra)}")
    return problems


@dataclass(frozen=True)
class GptPartition:
    number: int
    type_guid: str      # upper-case, as sgdisk and part_get_gpt_type print it
    first_lba: int
    last_lba: int
    name: str


def parse_gpt(data: bytes, sector: int = SECTOR) -> list[GptPartition]:
    """Partitions of a GPT from the disk's first sectors (protective MBR, header, entries).

    Raises ValueError for a missing signature, a CRC mismatch or too little data."""
    header = data[sector:2 * sector]
    if header[:8] != b"EFI PART":
        raise ValueError("no GPT header at LBA 1")
    size, crc = struct.unpack_from("<II", header, 12)
    if zlib.crc32(header[:16] + b"\0\0\0\0" + header[20:size]) != crc:
        raise ValueError("GPT header CRC mismatch")
    entries_lba, count, entry_size, entries_crc = struct.unpack_from("<QIII", header, 72)
    start = entries_lba * sector
    table = data[start:start + count * entry_size]
    if len(table) < count * entry_size:
        raise ValueError(f"GPT entries end past the {len(data)} bytes read")
    if zlib.crc32(table) != entries_crc:
        raise ValueError("GPT partition entries CRC mismatch")
    partitions = []
    for index in range(count):
        entry = table[index * entry_size:(index + 1) * entry_size]
        if entry[:16] == bytes(16):
            continue
        first, last = struct.unpack_from("<QQ", entry, 32)
        name = entry[56:128].decode("utf-16-le", errors="replace").rstrip("\0")
        partitions.append(GptPartition(index + 1, str(uuid.UUID(bytes_le=entry[:16])).upper(), first, last, name))
    return partitions


def selinux_type(context: bytes | str | None) -> str | None:
    """The type field of a security.selinux value such as b'system_u:object_r:etc_t:s0\\0'."""
    if context is None:
        return None
    text = context.decode(errors="replace") if isinstance(context, bytes) else context
    parts = text.rstrip("\0").split(":")
    return parts[2] if len(parts) >= 3 else None


def unlabeled_names(names: list[str], xattrs: list[Mapping[str, Any]]) -> list[str]:
    """Names without a security.selinux xattr, from libguestfs lxattrlist's answer: per
    name, a header entry (empty attrname, attrval the count, empty on error), then the
    name's attributes."""
    missing = []
    position = 0
    for name in names:
        if position >= len(xattrs):
            raise ValueError(f"lxattrlist answered for fewer than {len(names)} names")
        count = _as_text(xattrs[position]["attrval"]).rstrip("\0")
        position += 1
        attributes = xattrs[position:position + int(count)] if count.isdigit() else []
        position += len(attributes)
        if not any(a["attrname"] == "security.selinux" and _as_text(a["attrval"]).rstrip("\0")
                   for a in attributes):
            missing.append(name)
    return missing


def _as_text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


# --- the guest: a launched, read-only libguestfs handle with the root mounted


@dataclass
class Guest:
    g: Any
    spec: ImageSpec
    info: dict
    partitions: list[GptPartition]
    root: GptPartition
    directory: Path  # the artifacts' (build/NAME/): the liveimg tarball is checked against the disk
    _blkid: dict[str, dict[str, str]] = field(default_factory=dict)

    @staticmethod
    def device(partition: GptPartition) -> str:
        return f"{DEVICE}{partition.number}"

    def partition(self, type_guid: str, what: str) -> GptPartition:
        found = [p for p in self.partitions if p.type_guid == type_guid]
        if len(found) != 1:
            raise CheckFailed(f"expected one {what} partition (type {type_guid}), found {len(found)}")
        return found[0]

    def blkid(self, partition: GptPartition) -> dict[str, str]:
        """blkid's TYPE, UUID, ... of a partition; {} if it holds no filesystem."""
        device = self.device(partition)
        if device not in self._blkid:
            try:
                self._blkid[device] = self.g.blkid(device)  # 0.3 s: one udev settle and blkid
            except RuntimeError:
                self._blkid[device] = {}
        return self._blkid[device]

    def uuid(self, partition: GptPartition) -> str:
        return self.blkid(partition).get("UUID", "")

    def read(self, path: str) -> bytes:
        """A file's content. pread, not read_file or cat: those download through a
        temporary file and cost about 0.25 s each under TCG, pread a few milliseconds."""
        data = bytearray()
        while True:
            chunk = self.g.pread(path, READ_CHUNK, len(data))
            data += chunk
            if len(chunk) < READ_CHUNK:
                return bytes(data)

    def text(self, path: str, missing_ok: bool = False) -> str | None:
        """A file's text; None if missing_ok and it cannot be read."""
        try:
            return self.read(path).decode(errors="replace")
        except RuntimeError as error:
            if missing_ok:
                return None
            raise CheckFailed(f"cannot read {path}: {_first_line(error)}") from None

    def label(self, path: str) -> bytes | None:
        try:
            return self.g.lgetxattr(path, "security.selinux")
        except RuntimeError:
            return None

    @cached_property
    def files(self) -> list[FileEntry]:
        """Every path of the root filesystem with its lstat: a find, then one lstatnslist per
        directory (about 8 s under TCG for a host image's 22,000 paths)."""
        entries = []
        for directory, names in by_directory("/", self.g.find("/")).items():
            for start in range(0, len(names), STAT_BATCH):
                batch = names[start:start + STAT_BATCH]
                entries += [FileEntry(posixpath.join(directory, name), found["st_mode"], found["st_size"])
                            for name, found in zip(batch, self.g.lstatnslist(directory, batch))]
        return entries

    @cached_property
    def linux_args(self) -> list[str]:
        try:
            return grub_linux_args(self.text("/boot/grub/grub.cfg"))
        except ValueError as error:
            raise CheckFailed(str(error)) from None


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


# A check's answer: (problems, what was found when there are none).
Verdict = tuple[list[str], str]


def _result(name: str, verdict: Verdict) -> CheckResult:
    problems, ok = verdict
    if problems:
        shown = problems[:SHOWN] + ([f"... {len(problems) - SHOWN} more"] if len(problems) > SHOWN else [])
        return CheckResult(name, False, "; ".join(shown))
    return CheckResult(name, True, ok)


# --- the checks: each returns a Verdict; CheckFailed and RuntimeError become a FAIL


def check_os(guest: Guest) -> Verdict:
    release = parse_env_file(guest.text("/etc/os-release"))
    spec = guest.spec
    problems = []
    if release.get("ID") != spec.distro:
        problems.append(f"ID={release.get('ID')!r}, expected {spec.distro!r}")
    expected_major = DEBIAN_MAJOR.get(spec.release)
    if expected_major and release.get("VERSION_ID", "").split(".")[0] != expected_major:
        problems.append(f"VERSION_ID={release.get('VERSION_ID')!r}, expected {expected_major} for {spec.release}")
    if release.get("VERSION_CODENAME") != spec.release:
        problems.append(f"VERSION_CODENAME={release.get('VERSION_CODENAME')!r}, expected {spec.release!r}")
    where = f"linux root {guest.device(guest.root)}: {release.get('PRETTY_NAME', '?')}"
    return ([f"{where}: {p}" for p in problems], where)


def check_kernel(guest: Guest) -> Verdict:
    version = guest.info["kernel"]
    paths = [f"/boot/vmlinuz-{version}", f"/boot/initrd.img-{version}"]
    problems = [f"{p} missing" for p in paths if not guest.g.is_file(p)]
    return (problems, f"{', '.join(paths)} present")


def check_partition_uuids(guest: Guest) -> Verdict:
    esp = guest.partition(GPT_ESP, "EFI system")
    problems = []
    root_uuid, esp_uuid = guest.uuid(guest.root), guest.uuid(esp)
    if root_uuid.lower() != guest.info["root_uuid"].lower():
        problems.append(f"root {guest.device(guest.root)} has UUID {root_uuid!r}, "
                        f"build-info says {guest.info['root_uuid']}")
    fstype = guest.blkid(esp).get("TYPE")
    if fstype != "vfat":
        problems.append(f"ESP {guest.device(esp)} is {fstype or 'not formatted'}, expected vfat")
    if esp_uuid.lower() != guest.info["esp_uuid"].lower():
        problems.append(f"ESP {guest.device(esp)} has UUID {esp_uuid!r}, build-info says {guest.info['esp_uuid']}")
    return (problems, f"root {root_uuid}, ESP {esp_uuid} (vfat)")


def check_fstab(guest: Guest) -> Verdict:
    try:
        entries = parse_fstab(guest.text("/etc/fstab"))
    except ValueError as error:
        raise CheckFailed(str(error)) from None
    # A BIOS boot partition holds GRUB's core.img, never a filesystem: no need to ask blkid.
    on_disk = {guest.uuid(p).lower() for p in guest.partitions if p.type_guid != GPT_BIOS_BOOT} - {""}
    mounts = {e.mountpoint: e for e in entries}
    problems = []
    for mountpoint, key in (("/", "root_uuid"), ("/boot/efi", "esp_uuid")):
        want = f"UUID={guest.info[key]}"
        entry = mounts.get(mountpoint)
        if entry is None:
            problems.append(f"no entry for {mountpoint}")
        elif fstab_uuid(entry.source) != guest.info[key].lower():
            problems.append(f"{mountpoint} is mounted from {entry.source}, expected {want}")
    for entry in entries:
        wanted = fstab_uuid(entry.source)
        if wanted is not None and wanted not in on_disk:
            problems.append(f"{entry.mountpoint}: {entry.source} is on no partition of the disk")
    return (problems, f"/ and /boot/efi by UUID; {len(entries)} entries, all on this disk")


def check_grub_cfg(guest: Guest) -> Verdict:
    args = guest.linux_args
    problems = []
    kernel = f"/boot/vmlinuz-{guest.info['kernel']}"
    if not args or args[0] != kernel:
        problems.append(f"linux line boots {args[0] if args else 'nothing'}, expected {kernel}")
    # The spec's own kernel_args too: build-info could be stale, the spec is what was asked for.
    wanted = [f"root=UUID={guest.info['root_uuid']}", *guest.info["kernel_cmdline"], *guest.spec.kernel_args]
    problems += [f"{arg} missing from the linux line" for arg in wanted if arg not in args[1:]]
    return (problems, " ".join(args))


def check_uefi(guest: Guest) -> Verdict:
    """Runs after the ESP is mounted on /boot/efi."""
    path = "/boot/efi/EFI/BOOT/BOOTX64.EFI"
    if not guest.g.is_file(path):
        return [f"{path} missing on the ESP"], ""
    if guest.g.pread(path, 2, 0) != b"MZ":
        return [f"{path} is not a PE executable"], ""
    return [], f"ESP has EFI/BOOT/BOOTX64.EFI ({guest.g.filesize(path)} bytes)"


def check_grub_modules(guest: Guest) -> Verdict:
    paths = ["/boot/grub/i386-pc/normal.mod", "/boot/grub/x86_64-efi/normal.mod"]
    problems = [f"{p} missing" for p in paths if not guest.g.is_file(p)]
    return (problems, "normal.mod for i386-pc and x86_64-efi")


def check_bios_boot(guest: Guest) -> Verdict:
    mbr = guest.g.pread_device(DEVICE, SECTOR, 0)
    problems = []
    if mbr[510:512] != b"\x55\xaa":
        problems.append(f"MBR ends with {mbr[510:512].hex()}, not 55aa")
    bios = guest.partition(GPT_BIOS_BOOT, "BIOS boot")
    core = guest.g.pread_device(DEVICE, SECTOR, bios.first_lba * SECTOR)
    if core == bytes(len(core)):
        problems.append(f"BIOS boot partition {bios.number} starts with zeros: no GRUB core.img")
    (pointer,) = struct.unpack_from("<Q", mbr, BOOT_KERNEL_SECTOR)
    if pointer != bios.first_lba:
        problems.append(f"MBR boot code loads sector {pointer}, the BIOS boot partition starts at {bios.first_lba}")
    return (problems,
            f"MBR 55aa, boot code -> sector {pointer} = BIOS boot partition {bios.number}, core.img present")


def is_guest(spec: ImageSpec) -> bool:
    return GUEST_ELEMENT in element_closure(spec.elements, spec.element_dirs)


def has_cloud_init(spec: ImageSpec) -> bool:
    return CLOUD_INIT_ELEMENT in element_closure(spec.elements, spec.element_dirs)


def is_host(spec: ImageSpec) -> bool:
    return spec.is_kvm_host


def required_packages(spec: ImageSpec) -> list[str]:
    wanted = [GUEST_KERNEL_PACKAGE if is_guest(spec) else KERNEL_PACKAGE, *BASE_PACKAGES]
    if is_guest(spec):
        wanted += GUEST_PACKAGES
    if has_cloud_init(spec):
        wanted += CLOUD_INIT_PACKAGES
    if is_host(spec):
        wanted += HOST_PACKAGES
    return list(dict.fromkeys([*wanted, *spec.packages]))


def check_packages(guest: Guest) -> Verdict:
    installed = parse_dpkg_status(guest.text("/var/lib/dpkg/status"))
    wanted = required_packages(guest.spec)
    missing = [p for p in wanted if p not in installed]
    return ([f"not installed: {', '.join(missing)}"] if missing else [],
            f"{len(wanted)} required installed ({len(installed)} packages in all)")


def check_tuned(guest: Guest) -> Verdict:
    profile = guest.spec.tuned_profile
    g = guest.g
    problems = []
    active = (guest.text("/etc/tuned/active_profile", missing_ok=True) or "").strip() or None
    if active != profile:
        problems.append(f"/etc/tuned/active_profile is {active!r}, expected {profile!r}")
    mode = (guest.text("/etc/tuned/profile_mode", missing_ok=True) or "").strip() or None
    if mode != "manual":
        problems.append(f"/etc/tuned/profile_mode is {mode!r}, expected 'manual'")
    if not g.is_file(f"/etc/tuned/{profile}/tuned.conf"):
        problems.append(f"/etc/tuned/{profile}/tuned.conf missing")
    link = "/etc/systemd/system/multi-user.target.wants/tuned.service"
    # realpath resolves inside the guest's root, so the unit's absolute target is found there.
    if not g.is_symlink(link):
        problems.append("tuned.service is not enabled (no multi-user.target.wants link)")
    elif not g.is_file(g.realpath(link)):
        problems.append(f"{link} -> {g.readlink(link)}, which does not exist")
    return (problems, f"profile {profile} active (manual), tuned.service enabled")


def check_selinux_config(guest: Guest) -> Verdict:
    config = parse_env_file(guest.text("/etc/selinux/config"))
    mode = guest.spec.selinux.value
    problems = []
    if config.get("SELINUX") != mode:
        problems.append(f"SELINUX={config.get('SELINUX')}, expected {mode}")
    if config.get("SELINUXTYPE") != "default":
        problems.append(f"SELINUXTYPE={config.get('SELINUXTYPE')}, expected default")
    if not guest.g.glob_expand("/etc/selinux/default/policy/policy.*"):
        problems.append("no compiled policy in /etc/selinux/default/policy")
    args = guest.linux_args[1:]
    if "security=selinux" not in args:
        problems.append("security=selinux missing from the kernel command line")
    problems += [f"{arg} on the kernel command line" for arg in ("selinux=0", "enforcing=0")
                 if arg in args and (arg == "selinux=0" or mode == "enforcing")]
    return (problems, f"SELINUX={mode}, SELINUXTYPE=default, security=selinux")


def check_labels(guest: Guest) -> Verdict:
    """Runs before the ESP is mounted, so /boot/efi is the root filesystem's mountpoint."""
    table = list(LABELS)
    daemon = next((p for p in TUNED_DAEMON if guest.g.is_file(p)), None)
    problems = [] if daemon else [f"no tuned daemon at {' or '.join(TUNED_DAEMON)}"]
    if daemon:
        table.append((daemon, TUNED_DAEMON_TYPE))
    for path, expected in table:
        found = selinux_type(guest.label(path))
        if found != expected:
            problems.append(f"{path}: {found or 'unlabeled'}, expected {expected or 'unlabeled (<<none>>)'}")
    return (problems, f"{len(table)} key files carry refpolicy's types")


def _sample_names(g: Any) -> dict[str, list[str]]:
    """Directory -> names in it, for every file in LABEL_SAMPLE (and the directories)."""
    groups: dict[str, list[str]] = defaultdict(list)
    for top, recursive in LABEL_SAMPLE:
        parent, name = posixpath.split(top)
        groups[parent].append(name)
        if recursive:
            for directory, names in by_directory(top, g.find(top)).items():
                groups[directory] += names
        else:
            groups[top] += g.ls(top)
    return groups


def check_unlabeled(guest: Guest) -> Verdict:
    missing = []
    count = 0
    for directory, names in _sample_names(guest.g).items():
        count += len(names)
        missing += [posixpath.join(directory, name)
                    for name in unlabeled_names(names, guest.g.lxattrlist(directory, names))]
    sample = ", ".join(f"{top}{'/**' if recursive else '/*'}" for top, recursive in LABEL_SAMPLE)
    return ([f"{len(missing)} unlabeled: {', '.join(missing[:SHOWN])}"] if missing else [],
            f"all {count} files in {sample} labeled")


def check_host_keys(guest: Guest) -> Verdict:
    keys = guest.g.glob_expand("/etc/ssh/ssh_host_*")
    return ([f"baked into the image: {', '.join(keys)}"] if keys else [],
            "none in the image (made on first boot)")


def check_machine_id(guest: Guest) -> Verdict:
    path = "/etc/machine-id"
    if not guest.g.is_file(path):
        return [f"{path} missing or not a regular file"], ""
    size = guest.g.filesize(path)
    return ([f"{path} has {size} bytes: every clone would share it"] if size else [],
            f"{path} empty (made on first boot)")


def check_passwords(guest: Guest) -> Verdict:
    problems = shadow_problems(guest.text("/etc/shadow")) + passwd_problems(guest.text("/etc/passwd"))
    return (problems, "every account's password is locked")


def check_world_writable(guest: Guest) -> Verdict:
    files = sum(1 for e in guest.files if e.is_file)
    return (world_writable(guest.files), f"none of {files} regular files is writable by all")


def check_leftovers(guest: Guest) -> Verdict:
    return (leftover_problems(guest.files),
            "no resolv.conf copy, apt lists, .debs, shell history, logged lines or cloud-init instance state")


def read_sshd_config(guest: Guest) -> tuple[str, dict[str, str]]:
    """The main sshd_config and every file its Includes (recursively) name."""
    main = guest.text("/etc/ssh/sshd_config")
    files: dict[str, str] = {}
    pending = sshd_include_patterns(main)
    seen_patterns: set[str] = set()
    while pending:
        pattern = pending.pop(0)
        if pattern in seen_patterns:
            continue
        seen_patterns.add(pattern)
        for path in guest.g.glob_expand(pattern):
            if path not in files and guest.g.is_file(path, followsymlinks=True):
                files[path] = guest.text(path)
                pending += sshd_include_patterns(files[path])
    return main, files


def check_sshd(guest: Guest) -> Verdict:
    main, files = read_sshd_config(guest)
    try:
        options = sshd_effective(main, files)
    except ValueError as error:
        raise CheckFailed(str(error)) from None
    wanted = ("passwordauthentication", "kbdinteractiveauthentication", "permitemptypasswords")
    shown = {"passwordauthentication": "PasswordAuthentication",
             "kbdinteractiveauthentication": "KbdInteractiveAuthentication",
             "permitemptypasswords": "PermitEmptyPasswords"}
    summary = [f"{shown[k]} {options[k].value} ({options[k].source})" for k in wanted]
    problems = [s for k, s in zip(wanted, summary) if options[k].value != "no"]
    return (problems, "; ".join(summary))


def check_datasources(guest: Guest) -> Verdict:
    paths = ["/etc/cloud/cloud.cfg", *sorted(guest.g.glob_expand("/etc/cloud/cloud.cfg.d/*.cfg"))]
    texts = [(p, guest.text(p, missing_ok=True)) for p in paths]
    try:
        found = cloud_datasources([(p, t) for p, t in texts if t is not None])
    except ValueError as error:
        raise CheckFailed(str(error)) from None
    if found is None:
        return ["no datasource_list in /etc/cloud"], ""
    missing = [d for d in DATASOURCES if d not in found]
    return ([f"{', '.join(missing)} not in datasource_list {found}"] if missing else [],
            f"datasource_list: {', '.join(found)}")


def check_serial_console(guest: Guest) -> Verdict:
    consoles = [a for a in guest.linux_args[1:] if re.fullmatch(r"console=ttyS\d+(,.*)?", a)]
    return ([] if consoles else ["no console=ttyS<n> on the kernel command line"],
            " ".join(consoles))


def check_policy_modules(guest: Guest) -> Verdict:
    wanted = [source.stem for source in selinux.module_sources(guest.spec.elements, guest.spec.element_dirs)]
    missing = [m for m in wanted if not guest.g.is_dir(f"{POLICY_MODULES}/{m}")]
    return ([f"not installed in the policy store: {', '.join(missing)}"] if missing else [],
            f"installed: {', '.join(wanted)}")


def check_host_units(guest: Guest) -> Verdict:
    problems = []
    for wants, unit in HOST_UNITS:
        link = f"/etc/systemd/system/{wants}/{unit}"
        if not guest.g.is_symlink(link):
            problems.append(f"{unit} is not enabled (no {wants} link)")
        elif not guest.g.is_file(guest.g.realpath(link)):
            problems.append(f"{link} -> {guest.g.readlink(link)}, which does not exist")
    return (problems, f"enabled: {', '.join(unit for _, unit in HOST_UNITS)}")


def check_host_labels(guest: Guest) -> Verdict:
    problems = []
    for path, expected in HOST_LABELS:
        found = selinux_type(guest.label(path))
        if found != expected:
            problems.append(f"{path}: {found or 'unlabeled'}, expected {expected}")
    return (problems, f"libvirtd, qemu, OVS and the network agent: {len(HOST_LABELS)} labels as expected")


def check_libvirt_svirt(guest: Guest) -> Verdict:
    config = parse_env_file(guest.text("/etc/libvirt/qemu.conf"))
    driver = config.get("security_driver")
    return ([] if driver == "selinux" else [f"qemu.conf security_driver is {driver!r}, expected 'selinux'"],
            "libvirt qemu.conf: security_driver = selinux (sVirt)")


def check_bridges(guest: Guest) -> Verdict:
    text = guest.text(OVS_INTERFACES, missing_ok=True)
    if text is None:
        return [f"{OVS_INTERFACES} missing"], ""
    declared = parse_ifupdown(text)
    problems = bridge_problems(guest.spec, declared)
    main = parse_ifupdown(guest.text("/etc/network/interfaces", missing_ok=True) or "")
    if "/etc/network/interfaces.d/*" not in main.sources:
        problems.append("/etc/network/interfaces does not source /etc/network/interfaces.d/*")
    shown = ", ".join(f"{b.name}{f' (uplink {b.uplink})' if b.uplink else ''}" for b in guest.spec.bridges)
    return (problems, f"{OVS_INTERFACES}: {shown}")


def check_manifest(guest: Guest) -> Verdict:
    """The manifest inside the image is this build's, and its package list is the image's own."""
    text = guest.text(f"/{manifest.EMBEDDED}", missing_ok=True)
    if text is None:
        return [f"/{manifest.EMBEDDED} missing"], ""
    try:
        embedded = json.loads(text)
    except json.JSONDecodeError as error:
        return [f"/{manifest.EMBEDDED}: not JSON: {error}"], ""
    problems = [f"{key} is {embedded.get(key)!r}, build-info says {guest.info[key]!r}"
                for key in ("input_hash", "version", "kernel") if embedded.get(key) != guest.info[key]]
    installed = parse_dpkg_status(guest.text("/var/lib/dpkg/status"))
    if embedded.get("packages") != installed:
        listed = embedded.get("packages") or {}
        differ = sorted(set(listed.items()) ^ set(installed.items()))
        shown = ", ".join(f"{name} {version}" for name, version in differ[:SHOWN])
        problems.append(f"its packages differ from the image's dpkg database: {shown}")
    return (problems, f"/{manifest.EMBEDDED}: version {embedded.get('version')}, {len(installed)} packages, "
                      f"input hash {str(embedded.get('input_hash'))[:8]}")


def check_liveimg(guest: Guest) -> Verdict:
    """The liveimg tarball, read as Anaconda lists it: every entry labeled, the same labels
    as the disk on key files, the image's kernel in boot/."""
    path = guest.directory / guest.info["liveimg"]
    if not path.is_file():
        return [f"{path} missing"], ""
    paths = [p for p, _ in (*LABELS, *HOST_LABELS)
             if p not in ("/proc", "/sys", "/dev", "/run", "/boot/efi") and guest.g.exists(p)]
    try:
        contents = liveimg.read(path, set(paths))
    except (OSError, EOFError, tarfile.TarError) as error:
        return [f"{path.name}: not a readable gzip tarball: {error}"], ""
    problems = []
    unlabeled = [p for p in contents.unlabeled if p not in UNLABELED_BY_POLICY]
    if unlabeled:
        problems.append(f"{len(unlabeled)} entries without a security.selinux label: {', '.join(unlabeled[:SHOWN])}")
    if guest.info["kernel"] not in contents.kernels:
        problems.append(f"no boot/vmlinuz-{guest.info['kernel']} (Anaconda finds the kernel there): {contents.kernels}")
    for p in paths:
        disk = _as_text(guest.label(p) or b"").rstrip("\0")
        if contents.labels.get(p) != disk:
            in_tarball = contents.labels.get(p) or "unlabeled"
            problems.append(f"{p}: {in_tarball} in the tarball, {disk or 'unlabeled'} on disk")
    return (problems, f"{path.name}: {contents.entries} entries, all labeled; {len(paths)} key labels match the disk")


@dataclass(frozen=True)
class Check:
    name: str
    run: Callable[[Guest], Verdict]
    needs_root: bool = True   # False: reads only raw blocks and blkid, runs even if / does not mount
    needs_esp: bool = False   # mounted on /boot/efi after the others ran: it hides the mountpoint's label
    applies: Callable[[ImageSpec], bool] = lambda spec: True  # which images it is for


CHECKS = (
    Check("os", check_os),
    Check("kernel", check_kernel),
    Check("partition uuids", check_partition_uuids, needs_root=False),
    Check("fstab", check_fstab),
    Check("grub.cfg", check_grub_cfg),
    Check("uefi boot", check_uefi, needs_esp=True),
    Check("grub modules", check_grub_modules),
    Check("bios boot", check_bios_boot, needs_root=False),
    Check("packages", check_packages),
    Check("tuned", check_tuned),
    Check("selinux config", check_selinux_config),
    Check("selinux labels", check_labels),
    Check("unlabeled files", check_unlabeled),
    Check("ssh host keys", check_host_keys),
    Check("machine-id", check_machine_id),
    Check("passwords", check_passwords),
    Check("world-writable files", check_world_writable),
    Check("build leftovers", check_leftovers),
    Check("sshd auth", check_sshd),
    Check("selinux policy modules", check_policy_modules),
    Check("cloud-init datasources", check_datasources, applies=has_cloud_init),
    Check("serial console", check_serial_console, applies=lambda spec: is_guest(spec) or is_host(spec)),
    Check("host packages' units", check_host_units, applies=is_host),
    Check("host selinux labels", check_host_labels, applies=is_host),
    Check("libvirt svirt", check_libvirt_svirt, applies=is_host),
    Check("ovs bridges", check_bridges, applies=lambda spec: bool(spec.bridges)),
    Check("build manifest", check_manifest),
    Check("liveimg tarball", check_liveimg),
)


def _run(check: Check, guest: Guest) -> CheckResult:
    try:
        return _result(check.name, check.run(guest))
    except CheckFailed as error:
        return CheckResult(check.name, False, str(error))
    except RuntimeError as error:  # from libguestfs: a missing file, an unreadable device
        return CheckResult(check.name, False, f"error: {_first_line(error)}")


def _mount(guest: Guest, partition: GptPartition, mountpoint: str, fstype: str | None = None) -> str | None:
    """Mount read-only; None on success, else why not."""
    try:
        if fstype:
            guest.g.mount_vfs("ro", fstype, guest.device(partition), mountpoint)
        else:
            guest.g.mount_ro(guest.device(partition), mountpoint)
    except RuntimeError as error:
        return f"cannot mount {guest.device(partition)} on {mountpoint}: {_first_line(error)}"
    return None


def run_checks(guest: Guest) -> list[CheckResult]:
    wanted = [c for c in CHECKS if c.applies(guest.spec)]
    results = {}
    # The checks that read the disk's raw blocks still run when the root does not mount.
    unmounted = _mount(guest, guest.root, "/")
    for check in wanted:
        if check.needs_esp:
            continue
        if unmounted and check.needs_root:
            detail = unmounted if check is wanted[0] else "not checked: the root filesystem did not mount"
            results[check.name] = CheckResult(check.name, False, detail)
        else:
            results[check.name] = _run(check, guest)
    if not unmounted:
        try:
            unmounted = _mount(guest, guest.partition(GPT_ESP, "EFI system"), "/boot/efi", "vfat")
        except CheckFailed as error:
            unmounted = str(error)
    for check in wanted:
        if check.needs_esp:
            results[check.name] = CheckResult(check.name, False, unmounted) if unmounted else _run(check, guest)
    return [results[c.name] for c in wanted]


# --- opening the image


def _import_guestfs():
    try:
        import guestfs
    except ImportError:
        raise ToolMissing("the libguestfs Python bindings are missing; install with: apt-get install "
                          "python3-guestfs libguestfs-tools (and run from ./inv's virtual environment, "
                          "which sees Debian's Python packages)") from None
    return guestfs


def _require_appliance_kernel() -> None:
    """supermin builds libguestfs's appliance from the host's kernel; without one, launch
    fails with a message that names neither the cause nor the package."""
    if os.environ.get("SUPERMIN_KERNEL") or os.environ.get("LIBGUESTFS_PATH"):
        return
    if not (list(Path("/boot").glob("vmlinuz-*")) or list(Path("/lib/modules").glob("*/vmlinuz"))):
        raise ToolMissing("libguestfs needs a host kernel for its appliance and /boot has none; "
                          "install with: apt-get install linux-image-amd64")


def _handle(guestfs, qcow2: Path):
    g = guestfs.GuestFS(python_return_dict=True)
    # Where /dev/kvm exists but nested KVM hangs guests, TCG; the user's settings win.
    if "LIBGUESTFS_BACKEND" not in os.environ:
        g.set_backend("direct")
    if "LIBGUESTFS_BACKEND_SETTINGS" not in os.environ and not boot.kvm_works():
        g.set_backend_settings(["force_tcg"])
    g.add_drive_opts(str(qcow2), format="qcow2", readonly=1)
    return g


def _find_root(g: Any, spec: ImageSpec, info: dict, directory: Path) -> Guest:
    try:
        partitions = parse_gpt(g.pread_device(DEVICE, GPT_SECTORS * SECTOR, 0))
    except ValueError as error:
        raise CheckFailed(f"{DEVICE}: {error}") from None
    roots = [p for p in partitions if p.type_guid == GPT_ROOT_X86_64]
    if len(roots) != 1:
        raise CheckFailed(f"expected one Linux x86-64 root partition, found {len(roots)}")
    return Guest(g, spec, info, partitions, roots[0], directory)


def check_image(spec: ImageSpec, output_dir: Path) -> Report:
    """Check the built artifact of `spec` offline; print a table, write check.json."""
    from .build import artifacts_for

    art = artifacts_for(spec, output_dir)
    info = art.read_info()
    lacking = [key for key in INFO_KEYS if key not in info]
    if lacking:
        raise PipelineError(f"{art.info} lacks {', '.join(lacking)}: rebuild with ./inv build {spec.name}")
    if not art.qcow2.is_file():
        raise PipelineError(f"{art.qcow2} has not been built: run ./inv build {spec.name}")
    guestfs = _import_guestfs()
    _require_appliance_kernel()
    timings = Timings()
    report = Report(spec.name, art.qcow2, art.check_report, qcow2_sha256=info.get("qcow2_sha256", ""))
    g = _handle(guestfs, art.qcow2)
    try:
        with step("check: launch appliance", timings):
            try:
                g.launch()
            except RuntimeError as error:
                raise PipelineError(f"libguestfs could not start its appliance: {_first_line(error)}; "
                                    "run libguestfs-test-tool to see why") from None
        with step("check: inspect", timings):
            try:
                guest = _find_root(g, spec, info, art.directory)
            except (CheckFailed, RuntimeError) as error:
                report.results = [CheckResult("os", False, f"no root filesystem: {_first_line(error)}")]
            else:
                report.results = run_checks(guest)
    finally:
        try:
            g.shutdown()  # waits for qemu to exit: nothing is left running
        except RuntimeError as error:
            say(f"warning: libguestfs shutdown: {_first_line(error)}")
        finally:
            g.close()
    report.timings = timings.seconds
    print_table(report)
    write_json(report)
    return report


def format_table(results: list[CheckResult]) -> str:
    width = max([len("check"), *(len(r.name) for r in results)])
    lines = [f"{'check':<{width}}  {'':4}  detail"]
    lines += [f"{r.name:<{width}}  {'PASS' if r.passed else 'FAIL'}  {r.detail}" for r in results]
    return "\n".join(lines)


def print_table(report: Report) -> None:
    verdict = "passed" if report.passed else f"FAILED ({len(report.failed)} of {len(report.results)})"
    timings = ", ".join(f"{name.removeprefix('check: ')} {seconds:.1f} s" for name, seconds in report.timings.items())
    print(f"{format_table(report.results)}\noffline check of {report.image}: {verdict} ({timings})",
          file=sys.stderr, flush=True)


def write_json(report: Report) -> None:
    """Write check.json whole or not at all: a reader never sees half a report."""
    atomic.write_json(report.json_path, report.to_json())
