"""The liveimg artifact: the labeled root tree as a tarball that Anaconda's `liveimg` installs.

Anaconda takes a URL ending in .tar, .tgz, .tar.gz, .tar.bz2, .tar.xz (pyanaconda's
is_tar), lists it with Python's tarfile to find boot/vmlinuz-*, and unpacks it with
`tar --numeric-owner --selinux --acls --xattrs --xattrs-include '*'`. So: a POSIX
(pax) archive that carries every file's security.selinux label as an xattr record,
gzip-compressed by pigz on every core (xz is several times slower; zstd is not read
by Anaconda). Entries are sorted and their times clamped to SOURCE_DATE_EPOCH, so the
same tree gives the same archive.
"""

from __future__ import annotations

import tarfile
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path

from .run import run

COMPRESSION = 1  # pigz level: -1 took 11 s where -6 took 36 s, for 9% more bytes (host image)
LABEL = "SCHILY.xattr.security.selinux"
# How Anaconda unpacks a liveimg tarball (InstallFromTarTask), minus its --exclude list.
ANACONDA_EXTRACT = ("tar", "--numeric-owner", "--selinux", "--acls", "--xattrs", "--xattrs-include=*")
# Mount points whose contents Anaconda does not unpack (and a booted system mounts over):
# left out of the tarball. Their contents carry no label (file_contexts says <<none>>).
MOUNTED_OVER = ("./dev/*", "./proc/*", "./run/*", "./sys/*", "./tmp/*")


def make(tree: Path, output: Path, source_date_epoch: int) -> None:
    """Archive `tree` into `output` with labels and xattrs, reproducibly."""
    run(["tar", "--create", "--file", output, "--directory", tree, "--format=pax",
         "--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls",
         "--sort=name", f"--mtime=@{source_date_epoch}", "--clamp-mtime",
         # No access or change times, which differ from one build to the next.
         "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
         *(f"--exclude={pattern}" for pattern in MOUNTED_OVER),
         f"--use-compress-program=pigz -{COMPRESSION} --no-name", "."])


@dataclass
class Contents:
    """What a liveimg tarball holds, as Anaconda's tarfile listing would see it."""

    entries: int = 0
    unlabeled: list[str] = field(default_factory=list)
    kernels: list[str] = field(default_factory=list)  # versions, from boot/vmlinuz-VERSION
    labels: dict[str, str] = field(default_factory=dict)  # path -> context, for the paths asked


def read(path: Path, wanted: AbstractSet[str] = frozenset()) -> Contents:
    """Stream through the archive once: count entries, find unlabeled ones and kernels,
    and collect the labels of `wanted` paths (absolute, as in the image)."""
    contents = Contents()
    with tarfile.open(path, mode="r|gz") as archive:
        for member in archive:
            name = "/" + member.name.removeprefix("./").lstrip("/")
            contents.entries += 1
            label = member.pax_headers.get(LABEL)
            if label is None:
                # Hard links carry the label of the file they link to.
                if not member.islnk():
                    contents.unlabeled.append(name)
            elif name in wanted:
                contents.labels[name] = label.rstrip("\0")
            if name.startswith("/boot/vmlinuz-"):
                contents.kernels.append(name.removeprefix("/boot/vmlinuz-"))
    return contents
