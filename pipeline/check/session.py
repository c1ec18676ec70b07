"""The libguestfs session of a check: one appliance, launched once, the image read-only.

The appliance costs about 20 s to launch under TCG, most of the check's time; after
that it is asked only cheap questions: one read, stat or xattr list each, and one command
running the image's own tools (SURVEY_SCRIPT): find for the file list (one call instead of one
a directory) and the sampled labels, blkid for the partitions. Its
inspection API is not used: inspect_os costs 13-23 s under TCG (a udev settle per probe,
then augeas for fstab), more than every check together. So the root is found from the
GPT, which is read in one call and parsed here, and /etc/os-release, the file inspect_os
reads first, is read directly. The same goes for list_filesystems (about 9 s, it probes
LVM, MD and btrfs) and part_get_gpt_type (sgdisk, about 1 s a call).
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import stat
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from .. import qemu
from ..errors import PipelineError, ToolMissing
from ..liveimg import Contents
from ..progress import Timings, say, step
from ..spec import ImageSpec
from .parsers import (
    FIND_LABEL_PRINTF,
    FIND_PRINTF,
    GPT_BIOS_BOOT,
    GPT_ROOT_X86_64,
    SECTOR,
    FileEntry,
    GptPartition,
    by_directory,
    grub_linux_args,
    parse_blkid_export,
    parse_find_listing,
    parse_gpt,
    parse_label_listing,
)

DEVICE = "/dev/sda"   # libguestfs names the first drive added /dev/sda, whatever the backend
GPT_SECTORS = 34      # protective MBR, GPT header, 128 entries of 128 bytes
STAT_BATCH = 500  # names per lstatnslist call, well under libguestfs's message limit
READ_CHUNK = 2**20  # well under libguestfs's 4 MiB message limit
# libguestfs mounts the appliance's own over these in the image's root for a command: the
# file list's find leaves them out, and their image contents are read by libguestfs calls.
COMMAND_MOUNTS = ("/dev", "/proc", "/sys")
# The file list is two finds at once, one for LISTED_BESIDE (about half the paths of a guest's and
# of a host's tree) and one for the rest, on the appliance's two vCPUs (APPLIANCE_VCPUS). Each
# find's output is held until it is whole, so their lines never interleave; either failing fails
# the script. $1 is the root (/ in the appliance; a directory in the unit tests).
LISTED_BESIDE = "usr/lib"
_PRUNED = " -o ".join(f"-path ./{top.lstrip('/')}" for top in (*COMMAND_MOUNTS, f"/{LISTED_BESIDE}"))
LIST_FILES_SCRIPT = f"""cd "$1" || exit 1
{{ half=$(find {LISTED_BESIDE} -xdev -printf '{FIND_PRINTF}/%p\\n') || exit 1; printf '%s\\n' "$half"; }} &
rest=$(find . -xdev -mindepth 1 \\( {_PRUNED} \\) -prune -o -printf '{FIND_PRINTF}/%P\\n') || {{ wait; exit 1; }}
wait $! || exit 1
printf '%s\\n' "$rest"
"""
APPLIANCE_VCPUS = 2  # TCG runs each on a host thread: the two finds above, and the kernel's I/O beside one
# Directories sampled for files with no label at all: (directory, recursive). Their labels are read
# by the command that lists the files, beside the listing (about 0.1 s under TCG); libguestfs's
# lxattrlist takes one directory's names a call (0.35 s for these, a host's 140 directories).
LABEL_SAMPLE = (("/etc", True), ("/usr/bin", False), ("/usr/sbin", False), ("/var/lib", False))
# A command costs about 0.5 s under TCG (libguestfs bind-mounts /dev, /proc and /sys into the
# image's root and back), blkid 0.2 s a partition (a udev settle first): so the one command that
# lists the files also asks the image's own find for the sample's labels and its own blkid for the
# partitions ($2...), each answer after a line of its own. Neither may fail the listing: an
# unlabeled path makes find fail, and a partition without a filesystem blkid.
SURVEY_LABELS = "#kvmpipe: labels"
SURVEY_BLKID = "#kvmpipe: blkid"
_LABEL_FINDS = "\n".join(
    f"find {top.lstrip('/')} -xdev {'' if recursive else '-maxdepth 1 '}-printf '{FIND_LABEL_PRINTF}/%p\\n'"
    for top, recursive in LABEL_SAMPLE)
SURVEY_SCRIPT = f"""{LIST_FILES_SCRIPT}echo '{SURVEY_LABELS}'
{{ {_LABEL_FINDS}
}} 2>/dev/null
echo '{SURVEY_BLKID}'
shift
[ $# -eq 0 ] || blkid -c /dev/null -o export "$@" 2>/dev/null
exit 0
"""


class CheckFailed(Exception):
    """A check's finding, raised from deep inside it; the message is the detail."""


def first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


@dataclass
class Guest:
    g: Any
    spec: ImageSpec
    info: dict
    partitions: list[GptPartition]
    root: GptPartition
    directory: Path  # the artifacts' (build/NAME/): the liveimg tarball is checked against the disk
    head: bytes = b""  # the disk's first GPT_SECTORS sectors: the MBR and the GPT
    tarball: Future[Contents] | None = None  # the liveimg tarball, read while the appliance launched
    _blkid: dict[str, dict[str, str]] = field(default_factory=dict)
    # LABEL_SAMPLE's paths -> SELinux label ("" for none), read with the file list; None until
    # then, and if the image's find could not read them.
    labels: dict[str, str] | None = None

    @staticmethod
    def device(partition: GptPartition) -> str:
        return f"{DEVICE}{partition.number}"

    @property
    def filesystem_partitions(self) -> list[GptPartition]:
        """Every partition but the BIOS boot one, which holds GRUB's core.img, never a filesystem."""
        return [p for p in self.partitions if p.type_guid != GPT_BIOS_BOOT]

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

    @cached_property
    def _listed_modes(self) -> dict[str, int]:
        try:
            return {entry.path: entry.mode for entry in self.files}
        except CheckFailed:
            return {}

    def _is(self, path: str, kind: Callable[[int], bool], ask: Callable[[str], bool]) -> bool:
        """What the file list's lstat of PATH says, or libguestfs's answer (about 8 ms a call under
        TCG) for a path it does not hold: not there, below a symlink or on a later mount."""
        mode = self._listed_modes.get(path)
        return kind(mode) if mode is not None else ask(path)

    def is_file(self, path: str) -> bool:
        """A regular file, not followed if a symlink, as libguestfs's is_file."""
        return self._is(path, stat.S_ISREG, self.g.is_file)

    def is_dir(self, path: str) -> bool:
        return self._is(path, stat.S_ISDIR, self.g.is_dir)

    def is_symlink(self, path: str) -> bool:
        return self._is(path, stat.S_ISLNK, self.g.is_symlink)

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

    def text(self, path: str) -> str:
        """A file's text; CheckFailed if it cannot be read."""
        try:
            return self.read(path).decode(errors="replace")
        except RuntimeError as error:
            raise CheckFailed(f"cannot read {path}: {first_line(error)}") from None

    def text_if_readable(self, path: str) -> str | None:
        """A file's text, or None if it is missing or cannot be read."""
        try:
            return self.text(path)
        except CheckFailed:
            return None

    def label(self, path: str) -> bytes | None:
        try:
            return self.g.lgetxattr(path, "security.selinux")
        except RuntimeError:
            return None

    @cached_property
    def files(self) -> list[FileEntry]:
        """Every path of the root filesystem with its lstat, from the image's own find
        (SURVEY_SCRIPT, which also reads the labels and blkid the other checks ask for): one call
        instead of one a directory (medians under TCG, a loaded machine: 6.0 against 10.2 s for a
        guest's 16,000 paths, 14.5 against 19.5 s for a host's 22,000, with one find). An image
        without sh or find, or a listing over libguestfs's 4 MiB reply limit, is listed by those
        calls instead."""
        filesystems = [self.device(p) for p in self.filesystem_partitions]
        try:
            output = self.g.command(["sh", "-c", SURVEY_SCRIPT, "sh", "/", *filesystems])
        except RuntimeError as error:
            say(f"check: find from the image failed ({first_line(error)}); listing by libguestfs calls")
            return self._lstat_tree("/")
        listing, _, answers = output.partition(f"{SURVEY_LABELS}\n")
        labels, _, blkid = answers.partition(f"{SURVEY_BLKID}\n")
        try:
            entries = parse_find_listing(listing)
            self.labels = parse_label_listing(labels) or None  # none at all: a find without SELinux
        except ValueError as error:
            raise CheckFailed(str(error)) from None
        # A partition blkid found nothing on, or an answer that does not parse, is asked again of
        # libguestfs, after a udev settle: the image may lack blkid, and it found none in 1 of
        # about 15 fresh appliances.
        with contextlib.suppress(ValueError):
            self._blkid.update((device, tags) for device, tags in parse_blkid_export(blkid).items()
                               if device in filesystems)
        # The image's own, which the appliance's mounts hid from the command.
        return entries + self._lstat_walk("/", [top.lstrip("/") for top in COMMAND_MOUNTS])

    def _lstat_tree(self, top: str) -> list[FileEntry]:
        """Every path below TOP by libguestfs calls: a find, then one lstatnslist per directory
        (libguestfs takes one directory's names a call, and no call answers for a whole tree)."""
        return [entry for directory, names in by_directory(top, self.g.find(top)).items()
                for entry in self._lstat(directory, names)]

    def _lstat_walk(self, directory: str, names: list[str]) -> list[FileEntry]:
        """NAMES in DIRECTORY that exist and everything below those that are directories, one ls
        and one lstatnslist a directory: for the few paths a command cannot see, where libguestfs's
        find (which runs find in the appliance: 0.1 s a call under TCG, ls a few ms) costs more."""
        entries = [entry for entry in self._lstat(directory, names) if entry.mode]  # 0: no such name
        for entry in list(entries):
            if stat.S_ISDIR(entry.mode):
                entries += self._lstat_walk(entry.path, self.g.ls(entry.path))
        return entries

    def _lstat(self, directory: str, names: list[str]) -> list[FileEntry]:
        entries = []
        for start in range(0, len(names), STAT_BATCH):
            batch = names[start:start + STAT_BATCH]
            entries += [FileEntry(posixpath.join(directory, name), found["st_mode"], found["st_size"])
                        for name, found in zip(batch, self.g.lstatnslist(directory, batch), strict=False)]
        return entries

    @cached_property
    def linux_args(self) -> list[str]:
        try:
            return grub_linux_args(self.text("/boot/grub/grub.cfg"))
        except ValueError as error:
            raise CheckFailed(str(error)) from None


def import_guestfs() -> Any:
    try:
        import guestfs
    except ImportError:
        raise ToolMissing("the libguestfs Python bindings are missing; install with: apt-get install "
                          "python3-guestfs libguestfs-tools (and run from ./inv's virtual environment, "
                          "which sees Debian's Python packages)") from None
    return guestfs


def require_appliance_kernel() -> None:
    """supermin builds libguestfs's appliance from the host's kernel; without one, launch
    fails with a message that names neither the cause nor the package."""
    if os.environ.get("SUPERMIN_KERNEL") or os.environ.get("LIBGUESTFS_PATH"):
        return
    if not (list(Path("/boot").glob("vmlinuz-*")) or list(Path("/lib/modules").glob("*/vmlinuz"))):
        raise ToolMissing("libguestfs needs a host kernel for its appliance and /boot has none; "
                          "install with: apt-get install linux-image-amd64")


def _handle(guestfs: Any, qcow2: Path) -> Any:
    g = guestfs.GuestFS(python_return_dict=True)
    settings = qemu.libguestfs_settings()  # the user's own settings win
    if "LIBGUESTFS_BACKEND" in settings:
        g.set_backend(settings["LIBGUESTFS_BACKEND"])
    if "LIBGUESTFS_BACKEND_SETTINGS" in settings:
        g.set_backend_settings([settings["LIBGUESTFS_BACKEND_SETTINGS"]])
    g.set_smp(APPLIANCE_VCPUS)
    g.add_drive_opts(str(qcow2), format="qcow2", readonly=1)
    return g


def find_root(g: Any, spec: ImageSpec, info: dict, directory: Path, tarball: Future[Contents] | None = None) -> Guest:
    head = g.pread_device(DEVICE, GPT_SECTORS * SECTOR, 0)
    try:
        partitions = parse_gpt(head)
    except ValueError as error:
        raise CheckFailed(f"{DEVICE}: {error}") from None
    roots = [p for p in partitions if p.type_guid == GPT_ROOT_X86_64]
    if len(roots) != 1:
        raise CheckFailed(f"expected one Linux x86-64 root partition, found {len(roots)}")
    return Guest(g, spec, info, partitions, roots[0], directory, head, tarball)




@contextmanager
def launched(qcow2: Path, timings: Timings) -> Iterator[Any]:
    """A launched libguestfs handle on `qcow2`, read-only; shut down and closed on leaving,
    whatever happened: nothing is left running."""
    guestfs = import_guestfs()
    require_appliance_kernel()
    g = _handle(guestfs, qcow2)
    try:
        with step("check: launch appliance", timings):
            try:
                g.launch()
            except RuntimeError as error:
                raise PipelineError(f"libguestfs could not start its appliance: {first_line(error)}; "
                                    "run libguestfs-test-tool to see why") from None
        yield g
    finally:
        try:
            g.shutdown()  # waits for qemu to exit
        except RuntimeError as error:
            say(f"warning: libguestfs shutdown: {first_line(error)}")
        finally:
            g.close()


def mount(guest: Guest, partition: GptPartition, mountpoint: str, fstype: str | None = None) -> str | None:
    """Mount read-only; None on success, else why not."""
    try:
        if fstype:
            guest.g.mount_vfs("ro", fstype, guest.device(partition), mountpoint)
        else:
            guest.g.mount_ro(guest.device(partition), mountpoint)
    except RuntimeError as error:
        return f"cannot mount {guest.device(partition)} on {mountpoint}: {first_line(error)}"
    return None
