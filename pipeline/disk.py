"""Assemble a GPT disk image from a labeled root tree, with no mount, loop device or
device-mapper: every filesystem is written straight into the image file.

    1  BIOS boot   1 MiB    GRUB's core.img for BIOS
    2  ESP       128 MiB    FAT32, GRUB at the removable-media path EFI/BOOT/BOOTX64.EFI
    3  root      the rest   ext4 filled from the tree by mkfs.ext4 -d, which keeps
                            the security.selinux labels
"""

from __future__ import annotations

import os
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path

from . import bootloader
from .run import run

MiB = 2**20
SECTOR = 512
GPT_BACKUP = 33 * SECTOR        # backup GPT header and entries at the end of the disk
BIOS_BOOT = (1 * MiB, 1 * MiB)  # (offset, size)
ESP = (2 * MiB, 128 * MiB)
ROOT_START = ESP[0] + ESP[1]
X86_64_ROOT_TYPE = "4f68bce3-e8cd-4db1-96e7-fbcaf984b709"  # discoverable partitions spec


@dataclass(frozen=True)
class Layout:
    disk_size: int
    root_uuid: str
    esp_serial: str       # FAT volume serial, 8 hex digits; fstab writes it as XXXX-XXXX

    @property
    def root(self) -> tuple[int, int]:
        end = (self.disk_size - GPT_BACKUP) // MiB * MiB
        return ROOT_START, end - ROOT_START

    @property
    def esp_uuid(self) -> str:
        return f"{self.esp_serial[:4]}-{self.esp_serial[4:]}".upper()


# Filesystem identities derive from the build's input hash, so two builds of the same inputs
# write the same fstab and grub.cfg (as mkosi seeds its UUIDs); without one, random.
UUID_NAMESPACE = uuid.UUID("6f1c4a8e-3b52-4d8f-9c1e-7a2d5b9e0f13")


def new_layout(disk_size: int, seed: str | None = None) -> Layout:
    if seed is None:
        return Layout(disk_size=disk_size, root_uuid=str(uuid.uuid4()), esp_serial=uuid.uuid4().hex[:8])
    return Layout(disk_size=disk_size, root_uuid=str(uuid.uuid5(UUID_NAMESPACE, f"{seed} root")),
                  esp_serial=uuid.uuid5(UUID_NAMESPACE, f"{seed} esp").hex[:8])


def write_fstab(tree: Path, layout: Layout) -> None:
    (tree / "etc/fstab").write_text(
        "# Written by the image pipeline: root and ESP by UUID.\n"
        f"UUID={layout.root_uuid} / ext4 defaults,errors=remount-ro 0 1\n"
        f"UUID={layout.esp_uuid} /boot/efi vfat umask=0077,nofail 0 2\n")


# The /dev of a Debian tree as debootstrap makes it (setup_devices_simple): what a root
# filesystem holds under the devtmpfs that boot mounts over it. name: (mode, major, minor).
BASE_DEVICE_NODES = {"null": (0o666, 1, 3), "zero": (0o666, 1, 5), "full": (0o666, 1, 7),
                     "random": (0o666, 1, 8), "urandom": (0o666, 1, 9), "tty": (0o666, 5, 0),
                     "console": (0o600, 5, 1), "ptmx": (0o666, 5, 2)}
BASE_DEV_LINKS = {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1",
                  "stderr": "/proc/self/fd/2"}
BASE_DEV_DIRS = ("pts", "shm")
BASE_DEV_NAMES = frozenset({*BASE_DEVICE_NODES, *BASE_DEV_LINKS, *BASE_DEV_DIRS})


def create_base_dev(tree: Path) -> None:
    """TREE/dev (empty) gets debootstrap's device nodes, links and directories."""
    dev = tree / "dev"
    for name, (mode, major, minor) in BASE_DEVICE_NODES.items():
        os.mknod(dev / name, mode | stat.S_IFCHR, os.makedev(major, minor))
        os.chmod(dev / name, mode)  # mknod applies the umask
    for name, target in BASE_DEV_LINKS.items():
        (dev / name).symlink_to(target)
    for name in BASE_DEV_DIRS:
        (dev / name).mkdir(mode=0o755)


def create_mount_points(tree: Path) -> None:
    """DIB's tar has no /proc and /sys; without them the image cannot boot."""
    for name, mode in (("proc", 0o555), ("sys", 0o555), ("dev", 0o755), ("run", 0o755),
                       ("tmp", 0o1777), ("boot/efi", 0o700)):
        path = tree / name
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(mode)


def _partition(disk: Path, layout: Layout) -> None:
    def sectors(offset_size: tuple[int, int]) -> str:
        offset, size = offset_size
        return f"{offset // SECTOR}:{(offset + size) // SECTOR - 1}"

    run(["sgdisk", "--clear",
         "--new", f"1:{sectors(BIOS_BOOT)}", "--typecode", "1:ef02", "--change-name", "1:bios-boot",
         "--new", f"2:{sectors(ESP)}", "--typecode", "2:ef00", "--change-name", "2:esp",
         "--new", f"3:{sectors(layout.root)}", "--typecode", f"3:{X86_64_ROOT_TYPE}",
         "--change-name", "3:root", disk])


def _esp(work: Path, layout: Layout, efi_binary: Path) -> Path:
    image = work / "esp.img"
    run(["mkfs.vfat", "-F", "32", "-n", "ESP", "-i", layout.esp_serial, "-C", image, str(ESP[1] // 1024)])
    run(["mmd", "-i", image, "::/EFI", "::/EFI/BOOT"])
    run(["mcopy", "-i", image, efi_binary, "::/EFI/BOOT/BOOTX64.EFI"])
    return image


def assemble(tree: Path, work: Path, layout: Layout, disk: Path) -> None:
    """Write the partitioned, bootable raw disk image `disk` from the labeled tree."""
    with open(disk, "wb") as f:
        f.truncate(layout.disk_size)
    _partition(disk, layout)
    bios_core, efi_binary = bootloader.make_core_images(tree, work, layout.root_uuid)
    esp = _esp(work, layout, efi_binary)
    run(["dd", f"if={esp}", f"of={disk}", "bs=1M", f"seek={ESP[0] // MiB}", "conv=notrunc,sparse",
         "status=none"])
    esp.unlink()
    offset, size = layout.root
    run(["mkfs.ext4", "-q", "-F", "-L", "root", "-U", layout.root_uuid, "-d", tree,
         "-E", f"offset={offset},nodiscard", disk, f"{size // 1024}k"])
    bootloader.bios_setup(disk, tree, bios_core, *BIOS_BOOT)
