"""The netboot format: a system that runs from RAM after a network boot (the installer).

The whole root tree is the initramfs. With no root= on the kernel command line, the kernel
unpacks it into a tmpfs and runs its /init, here systemd itself: there is no second root to
switch to, so no dracut or initramfs-tools stage and nothing to fetch after the kernel and
initrd. The tree is trimmed first of what a RAM system never reads (documentation, the
package lists, its own /boot, the kernel modules for graphics, sound, radios and cameras),
then archived as newc cpio (the only format the kernel unpacks) and compressed with zstd.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .errors import PipelineError
from .run import run

ZSTD_LEVEL = 12  # a tenth smaller than -3 at a third of -19's time (host-sized trees, 2 cores)
# Read by nobody on a machine that lives for one install.
UNREAD = ("boot", "usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "usr/share/lintian",
          "var/cache/apt", "var/lib/apt/lists", "var/cache/debconf/templates.dat")
# Kernel module trees no server install needs: storage, network, device-mapper, file
# systems and input stay.
UNNEEDED_MODULES = ("drivers/gpu", "drivers/media", "drivers/net/wireless", "drivers/staging", "drivers/infiniband",
                    "drivers/bluetooth", "drivers/iio", "drivers/isdn", "drivers/video", "sound", "net/bluetooth",
                    "net/mac80211", "net/wireless")


def trim(tree: Path, kernel_version: str) -> None:
    modules = tree / "lib/modules" / kernel_version
    for relative in (*UNREAD, *(f"{modules.relative_to(tree)}/kernel/{m}" for m in UNNEEDED_MODULES)):
        path = tree / relative
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    # The module index must list only what is left, or modprobe looks for the removed ones.
    run(["depmod", "--basedir", tree, kernel_version])


def make_initramfs(tree: Path, output: Path) -> None:
    """Archive `tree` as a compressed newc cpio whose /init is systemd."""
    init = tree / "sbin/init"
    if not init.exists() and not init.is_symlink():
        raise PipelineError(f"{init} is missing: a netboot image needs systemd as its init (systemd-sysv)")
    (tree / "init").unlink(missing_ok=True)
    (tree / "init").symlink_to("sbin/init")
    (tree / "etc/fstab").write_text("# Runs from RAM: the root is the kernel's tmpfs; nothing else is mounted.\n")
    names = sorted(str(p.relative_to(tree)) for p in tree.rglob("*"))
    archive = output.with_suffix(".cpio")
    # --reproducible: no inode or device numbers; mtimes are DIB's, clamped by SOURCE_DATE_EPOCH.
    run(["cpio", "--create", "--null", "--format=newc", "--reproducible", "--quiet", f"--file={archive}"],
        cwd=tree, input=b"\0".join(n.encode() for n in [".", *names]) + b"\0")
    run(["zstd", "--quiet", "--force", "--rm", f"-{ZSTD_LEVEL}", "-T0", archive, "-o", output])
