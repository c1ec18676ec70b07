"""Host commands the pipeline runs, and the Debian package that provides each.

Checked before any long step, so a missing tool fails in a second with the
package to install, not half-way through a build.
"""

import os
import shutil

from .errors import ToolMissing

DEBIAN_PACKAGE = {
    "checkmodule": "checkpolicy",
    "cpio": "cpio",
    "depmod": "kmod",
    "zstd": "zstd",
    "debootstrap": "debootstrap",
    "dnsmasq": "dnsmasq-base",  # not dnsmasq, whose package starts a system service
    "mcopy": "mtools",
    "gpg": "gnupg",
    "guestfish": "libguestfs-tools",
    "mkfs.ext4": "e2fsprogs",
    "mkfs.vfat": "dosfstools",
    "mmd": "mtools",
    "nginx": "nginx",  # the binary itself since bookworm; nginx-light and nginx-core only add modules
    "pigz": "pigz",
    "qemu-img": "qemu-utils",
    "rsync": "rsync",
    "sha256sum": "coreutils",
    "qemu-system-x86_64": "qemu-system-x86",
    "semodule_package": "semodule-utils",
    "setfiles": "policycoreutils",
    "sgdisk": "gdisk",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "sshpass": "sshpass",
    "sudo": "sudo",
    "tar": "tar",
    "grub-mkimage": "grub-common",
}

# Files rather than commands: firmware and GRUB's platform directories.
DEBIAN_PACKAGE_OF_FILE = {
    "/boot/vmlinuz": "linux-image-amd64",
    "/usr/share/OVMF/OVMF_CODE_4M.fd": "ovmf",
    "/usr/share/OVMF/OVMF_VARS_4M.fd": "ovmf",
    # The PXE tree's network boot programs, and the GRUB modules its UEFI one is made of.
    "/usr/lib/ipxe/undionly.kpxe": "ipxe",
    "/usr/lib/ipxe/ipxe.efi": "ipxe",
    "/usr/lib/PXELINUX/pxelinux.0": "pxelinux",
    "/usr/lib/syslinux/modules/bios/ldlinux.c32": "syslinux-common",
    "/usr/lib/grub/x86_64-efi/linux.mod": "grub-efi-amd64-bin",
}

BUILD_TOOLS = ("checkmodule", "debootstrap", "grub-mkimage", "mcopy", "mkfs.ext4", "mkfs.vfat", "mmd",
               "pigz", "qemu-img", "semodule_package", "setfiles", "sgdisk", "sudo", "tar")
NETBOOT_TOOLS = ("cpio", "depmod", "zstd")
BOOT_TOOLS = ("qemu-img", "qemu-system-x86_64", "mcopy", "mkfs.vfat", "mmd", "ssh", "ssh-keygen")


def require(*tools: str, path: str | None = None) -> None:
    """Raise ToolMissing naming every missing tool and its Debian package."""
    search = path if path is not None else os.environ.get("PATH", os.defpath)
    missing = [tool for tool in tools if shutil.which(tool, path=search) is None]
    if missing:
        listing = ", ".join(f"{tool} (Debian package {DEBIAN_PACKAGE[tool]})" for tool in missing)
        packages = " ".join(sorted({DEBIAN_PACKAGE[tool] for tool in missing}))
        raise ToolMissing(f"missing host tools: {listing}; install with: apt-get install {packages}")


def require_files(*paths: str) -> None:
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        packages = " ".join(sorted({DEBIAN_PACKAGE_OF_FILE[p] for p in missing}))
        raise ToolMissing(f"missing host files: {', '.join(missing)}; install with: apt-get install {packages}")


def venv_tool(name: str) -> str:
    """A console script installed in the pipeline's own virtual environment."""
    import sys

    candidate = os.path.join(os.path.dirname(sys.executable), name)
    if os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which(name)
    if found is None:
        raise ToolMissing(f"missing {name}: run ./inv once to create the virtual environment")
    return found
