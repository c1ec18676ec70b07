"""GRUB for BIOS and UEFI, installed into a disk image file with no device.

grub-install and grub-bios-setup both insist that the boot directory sit on a
mounted block device, which would need a loop device or device-mapper. So the
core images are made with grub-mkimage from the image's own GRUB modules, the
UEFI one goes to the removable-media path of the ESP, and the BIOS one is
embedded in the BIOS boot partition with the boot sector patched to find it,
as grub-bios-setup does (grub-core/boot/i386/pc/boot.S, util/setup.c).
"""

from __future__ import annotations

import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from .run import run

SECTOR = 512
# Offsets in GRUB's boot.img (include/grub/i386/pc/boot.h).
BOOT_BPB = slice(0x03, 0x5A)          # a DOS BPB: keep whatever the disk has
BOOT_KERNEL_SECTOR = 0x5C             # LBA of core.img's first sector
BOOT_DRIVE_CHECK = 0x66               # 2-byte jump: NOP it for hard disks
BOOT_PARTITION_TABLE = slice(0x1B8, 0x1FE)  # disk signature and MBR table: keep
KERNEL_SEGMENT = 0x800
BLOCKLIST_ENTRY = 12                  # u64 start, u16 sectors, u16 segment

PLATFORMS = ("i386-pc", "x86_64-efi")
BIOS_MODULES = ("biosdisk", "part_gpt", "ext2", "search", "search_fs_uuid")
EFI_MODULES = ("part_gpt", "ext2", "search", "search_fs_uuid")
GRUB_FONT = "boot/grub/unicode.pf2"


@dataclass(frozen=True)
class Kernel:
    version: str
    vmlinuz: Path   # inside the tree
    initrd: Path


def find_kernel(tree: Path) -> Kernel:
    kernels = sorted((tree / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise RuntimeError(f"expected one kernel in {tree}/boot, found {[k.name for k in kernels]}")
    version = kernels[0].name.removeprefix("vmlinuz-")
    return Kernel(version, kernels[0], tree / "boot" / f"initrd.img-{version}")


def install_modules(tree: Path) -> None:
    """Copy GRUB's modules to /boot/grub/<platform>, where its core images look for them."""
    for platform in PLATFORMS:
        source = tree / "usr/lib/grub" / platform
        if not source.is_dir():
            raise RuntimeError(f"{source} is missing: the image lacks GRUB for {platform}")
        # monolithic/ holds prebuilt EFI loaders (15 MiB) that only grub-install reads, from
        # /usr/lib/grub; our loaders are made by make_core_images and load modules from here.
        shutil.copytree(source, tree / "boot/grub" / platform, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("monolithic"))
    # grub-pc's postinst copies GRUB's font (2.4 MB) for a graphical menu; the terminal here is
    # text and serial (write_config), and /usr/share/grub keeps the font for whoever wants one.
    (tree / GRUB_FONT).unlink(missing_ok=True)


def write_config(tree: Path, kernel: Kernel, root_uuid: str, cmdline: list[str]) -> None:
    """grub.cfg for the first boot, and /etc/default/grub so that a later update-grub in
    the running machine keeps the same kernel arguments and serial console."""
    args = " ".join(cmdline)
    # Timeout 0: there is one entry, so no menu to wait a second on at every boot.
    (tree / "boot/grub/grub.cfg").write_text(f"""\
# Written by the image pipeline; update-grub in the running machine replaces it.
set default=0
set timeout=0
if serial --unit=0 --speed=115200; then
  terminal_input console serial
  terminal_output console serial
fi
search --no-floppy --fs-uuid --set=root {root_uuid}
menuentry 'Debian GNU/Linux' {{
  linux /boot/vmlinuz-{kernel.version} root=UUID={root_uuid} ro {args}
  initrd /boot/initrd.img-{kernel.version}
}}
""")
    (tree / "etc/default/grub.d").mkdir(parents=True, exist_ok=True)
    (tree / "etc/default/grub.d/50-image-pipeline.cfg").write_text(f"""\
# Written by the image pipeline from the image spec.
GRUB_CMDLINE_LINUX="{args}"
GRUB_TIMEOUT=0
GRUB_TERMINAL="console serial"
GRUB_SERIAL_COMMAND="serial --unit=0 --speed=115200"
""")


def make_core_images(tree: Path, work: Path, root_uuid: str) -> tuple[Path, Path]:
    """Return (BIOS core.img, UEFI BOOTX64.EFI); both find /boot/grub by the root UUID."""
    early = work / "grub-early.cfg"
    early.write_text(f"search --no-floppy --fs-uuid --set=root {root_uuid}\nset prefix=($root)/boot/grub\n")
    bios, efi = work / "core.img", work / "BOOTX64.EFI"
    for platform, output, modules in (("i386-pc", bios, BIOS_MODULES), ("x86_64-efi", efi, EFI_MODULES)):
        run(["grub-mkimage", "--directory", tree / "usr/lib/grub" / platform, "--format", platform,
             "--config", early, "--prefix", "/boot/grub", "--output", output, *modules])
    return bios, efi


def bios_setup(disk: Path, tree: Path, core_img: Path, bios_boot_start: int, bios_boot_size: int) -> None:
    """Embed core.img in the BIOS boot partition and point the MBR's boot code at it."""
    boot = bytearray((tree / "usr/lib/grub/i386-pc/boot.img").read_bytes())
    core = bytearray(core_img.read_bytes())
    core += bytes(-len(core) % SECTOR)
    if len(core) > bios_boot_size:
        raise RuntimeError(f"core.img is {len(core)} bytes, larger than the BIOS boot partition")
    first_sector = bios_boot_start // SECTOR
    with open(disk, "r+b") as f:
        mbr = f.read(SECTOR)
        boot[BOOT_BPB] = mbr[BOOT_BPB]
        boot[BOOT_PARTITION_TABLE] = mbr[BOOT_PARTITION_TABLE]
        struct.pack_into("<Q", boot, BOOT_KERNEL_SECTOR, first_sector)
        boot[BOOT_DRIVE_CHECK:BOOT_DRIVE_CHECK + 2] = b"\x90\x90"
        # core.img's first sector (diskboot) loads the rest from this block list.
        last = SECTOR - BLOCKLIST_ENTRY
        struct.pack_into("<QHH", core, last, first_sector + 1, len(core) // SECTOR - 1,
                         KERNEL_SEGMENT + (SECTOR >> 4))
        struct.pack_into("<QHH", core, last - BLOCKLIST_ENTRY, 0, 0, 0)
        f.seek(0)
        f.write(boot)
        f.seek(bios_boot_start)
        f.write(core)
