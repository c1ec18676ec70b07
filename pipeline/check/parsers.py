"""Pure parsers of what an image holds: text or bytes in, facts out, no libguestfs.

Each reads one format as the program that owns it does (sshd, mount, grub, cloud-init,
ifupdown, systemd, the GPT), so the checks can be tested on strings without an image.
"""

from __future__ import annotations

import fnmatch
import posixpath
import re
import shlex
import stat
import struct
import uuid
import zlib
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

SECTOR = 512          # the appliance's virtio-scsi disk; the pipeline writes 512-byte GPTs
GPT_BIOS_BOOT = "21686148-6449-6E6F-744E-656564454649"
GPT_ESP = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
GPT_ROOT_X86_64 = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"  # discoverable partitions spec


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
        source, mountpoint, fstype = (_fstab_unescape(f) for f in fields[:3])
        entries.append(FstabEntry(source, mountpoint, fstype, options))
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


def _sshd_lines(text: str) -> Iterator[tuple[str, str]]:
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
    return len(want) == len(have) and all(fnmatch.fnmatchcase(h, w) for w, h in zip(want, have, strict=True))


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


# find(1)'s -printf for one FileEntry a line: type letter, permission bits in octal, size, then
# the path, which the caller's format completes ("/%p\n" from a relative starting point).
FIND_PRINTF = "%y %m %s "
_FIND_LINE = re.compile(r"(?P<type>[fdlcbps]) (?P<perm>[0-7]{1,4}) (?P<size>[0-9]+) (?P<path>/.+)")
_FILE_TYPES = {"f": stat.S_IFREG, "d": stat.S_IFDIR, "l": stat.S_IFLNK, "c": stat.S_IFCHR,
               "b": stat.S_IFBLK, "p": stat.S_IFIFO, "s": stat.S_IFSOCK}


def parse_find_listing(listing: str) -> list[FileEntry]:
    """The entries of what `find -printf FIND_PRINTF/PATH` wrote; ValueError naming the first line
    that is not one (a name with a newline in it breaks its line in two)."""
    entries = []
    for line in listing.removesuffix("\n").split("\n") if listing else ():
        match = _FIND_LINE.fullmatch(line)
        if not match:
            raise ValueError(f"find listed a line that is not type, mode, size and path: {line[:80]!r}")
        entries.append(FileEntry(match["path"], _FILE_TYPES[match["type"]] | int(match["perm"], 8), int(match["size"])))
    return entries



# find(1)'s -printf for a path's SELinux label, then its path as above. find prints an unlabeled
# path's label empty (and says so on stderr).
FIND_LABEL_PRINTF = "%Z\t"
_LABEL_LINE = re.compile(r"(?P<label>[^\t]*)\t(?P<path>/.+)")


def parse_label_listing(listing: str) -> dict[str, str]:
    """Path -> SELinux label ("" for none) from what `find -printf FIND_LABEL_PRINTF/PATH` wrote;
    ValueError naming the first line that is not one."""
    labels = {}
    for line in listing.removesuffix("\n").split("\n") if listing else ():
        match = _LABEL_LINE.fullmatch(line)
        if not match:
            raise ValueError(f"find listed a line that is not a label and a path: {line[:80]!r}")
        labels[match["path"]] = match["label"]
    return labels


def parse_blkid_export(text: str) -> dict[str, dict[str, str]]:
    """Device -> blkid's tags (TYPE, UUID, ...) from `blkid -o export` for several devices: one
    block of KEY=value lines a device, DEVNAME first; blkid escapes shell specials with a backslash."""
    devices = {}
    for block in text.strip().split("\n\n") if text.strip() else ():
        tags = {}
        for line in block.strip().split("\n"):
            key, equals, value = line.partition("=")
            if not equals or not re.fullmatch(r"[A-Z][A-Z0-9_]*", key):
                raise ValueError(f"blkid printed a line that is not KEY=value: {line[:80]!r}")
            tags[key] = re.sub(r"\\(.)", r"\1", value)
        if "DEVNAME" not in tags:
            raise ValueError(f"blkid printed tags without a DEVNAME: {block[:80]!r}")
        devices[tags["DEVNAME"]] = tags
    return devices


def by_directory(top: str, found: list[str]) -> dict[str, list[str]]:
    """Directory -> names in it, for what libguestfs's find(TOP) answered (below TOP; "/a/b", or
    "a/b" from older libguestfs)."""
    groups: dict[str, list[str]] = defaultdict(list)
    for relative in found:
        directory, name = posixpath.split(posixpath.join(top, relative.lstrip("/")))
        groups[directory].append(name)
    return groups


def label_sample(paths: Iterable[str], sample: Sequence[tuple[str, bool]]) -> dict[str, list[str]]:
    """Directory -> names, for what `sample` picks out of a listing of the whole filesystem: each
    (TOP, recursive) picks TOP itself and every path below it (recursive) or directly in it."""
    groups: dict[str, list[str]] = defaultdict(list)
    for top, _ in sample:
        parent, name = posixpath.split(top)
        groups[parent].append(name)
    for path in paths:
        directory, name = posixpath.split(path)
        if any(directory == top or (recursive and directory.startswith(top + "/")) for top, recursive in sample):
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
        count = as_text(xattrs[position]["attrval"]).rstrip("\0")
        position += 1
        attributes = xattrs[position:position + int(count)] if count.isdigit() else []
        position += len(attributes)
        if not any(a["attrname"] == "security.selinux" and as_text(a["attrval"]).rstrip("\0")
                   for a in attributes):
            missing.append(name)
    return missing


def as_text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value



def unit_install_links(unit: str, text: str) -> list[str]:
    """The links `systemctl enable UNIT` makes, from the unit file's [Install] section:
    TARGET.wants/UNIT for each WantedBy=, TARGET.requires/UNIT for each RequiredBy=,
    relative to /etc/systemd/system. An empty assignment resets the list, as systemd reads it."""
    links: dict[str, list[str]] = {"WantedBy": [], "RequiredBy": []}
    section = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif section == "Install" and "=" in line:
            key, _, value = (part.strip() for part in line.partition("="))
            if key in links:
                links[key] = links[key] + value.split() if value else []
    return ([f"{target}.wants/{unit}" for target in links["WantedBy"]]
            + [f"{target}.requires/{unit}" for target in links["RequiredBy"]])
