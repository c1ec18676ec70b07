"""The installer: runs a node's kickstart on one of our Debian images, in Anaconda's order,
the Debian way (GRUB and initramfs-tools in the installed root, systemd-networkd).

Anaconda cannot install our images (its bootloader and initramfs tasks run grub2-* and
dracut; it writes only NetworkManager network config), so this runs where Anaconda would:
the PXE tree boots the installer image with the same `inst.ks=URL` argument.

Two halves:
- read(): the kickstart, parsed by pykickstart (the version we validate with) into a typed
  Plan. Only the commands and options our templates and documented snippets produce are
  implemented; anything else is refused here, naming the command and its line, before any
  disk is touched.
- Installer: fetches the liveimg and checks its sha256 (still before any disk), then
  partitions, LVM (with a real cache), file systems, the tree with its SELinux labels,
  fstab, network, system settings, bootloader (the image's own initramfs), %post, then the
  labels of all it wrote. Every command goes through the subprocess gateway (run).
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Interface
from pathlib import Path
from urllib.parse import quote, urlsplit

from ..errors import PipelineError, exit_status
from ..liveimg import ANACONDA_EXTRACT
from ..run import run

KICKSTART_VERSION = "RHEL9"   # what pxe.render validates with by default
# Command: the options it may carry. Aliases pykickstart knows (partition, ...) are not ours.
SUPPORTED: dict[str, frozenset[str]] = {
    "text": frozenset(),
    "reboot": frozenset(),
    "lang": frozenset(),
    "keyboard": frozenset({"--vckeymap"}),
    "timezone": frozenset({"--utc"}),
    "rootpw": frozenset({"--lock"}),
    "selinux": frozenset({"--enforcing"}),
    "network": frozenset({"--device", "--bootproto", "--ip", "--netmask", "--gateway", "--nameserver",
                          "--hostname", "--activate", "--onboot"}),
    "liveimg": frozenset({"--url", "--checksum"}),
    "bootloader": frozenset({"--boot-drive", "--append"}),
    "zerombr": frozenset(),
    "clearpart": frozenset({"--all", "--initlabel", "--disklabel", "--drives"}),
    "ignoredisk": frozenset({"--only-use"}),
    "part": frozenset({"--fstype", "--size", "--grow", "--ondisk"}),
    "volgroup": frozenset(),
    "logvol": frozenset({"--vgname", "--name", "--fstype", "--size", "--grow", "--cachepvs", "--cachesize",
                         "--cachemode"}),
    "sshkey": frozenset({"--username"}),
    "%include": frozenset(),
}
SECTIONS: dict[str, frozenset[str]] = {"%post": frozenset({"--erroronfail", "--interpreter"})}
FILESYSTEMS = ("ext4", "efi", "biosboot")
TARGET = Path("/mnt/sysimage")   # where Anaconda mounts the installed system
STAMP_TICK = 0.05  # seconds: longer than a clock tick of file times (1-10 ms)
PARTLABEL_PREFIX = "ks-"         # GPT partition names: how the installer finds each on its disk
CLOUD_INIT_DIR = "etc/cloud"
CLOUD_INIT_DISABLED = f"{CLOUD_INIT_DIR}/cloud-init.disabled"  # cloud-init's documented off switch
# Run in the installed system as `sh -c AUTHORIZE_KEY sh USER KEY`: the user and key are arguments, never code.
AUTHORIZE_KEY = ('home=$(getent passwd "$1" | cut -d: -f6) && mkdir -p -m 700 "$home/.ssh" && '
                 'printf "%s\\n" "$2" >> "$home/.ssh/authorized_keys" && chmod 600 "$home/.ssh/authorized_keys" && '
                 'chown -R "$1:" "$home/.ssh"')


class InstallError(PipelineError):
    """The install cannot go on; the message says where and why."""


class KickstartRefused(InstallError):
    """The kickstart asks for something this installer does not implement."""


# --- the plan, read from the kickstart


@dataclass(frozen=True)
class Partition:
    disk: str            # as the kickstart names it: sda, nvme0n1 or /dev/disk/by-id/...
    role: str            # "biosboot", a mount point, or a PV name (pv.root)
    fstype: str | None   # ext4, efi, biosboot; None for a PV
    size_mib: int
    grow: bool

    @property
    def partlabel(self) -> str:
        return PARTLABEL_PREFIX + re.sub(r"[^A-Za-z0-9.]+", "-", self.role.strip("/") or "root")

    @property
    def is_pv(self) -> bool:
        return self.role.startswith("pv.")


@dataclass(frozen=True)
class LogicalVolume:
    vg: str
    name: str
    mountpoint: str
    fstype: str
    size_mib: int
    grow: bool
    cache_pvs: tuple[str, ...] = ()
    cache_size_mib: int = 0
    cache_mode: str = ""


@dataclass(frozen=True)
class Network:
    mac: str
    address: IPv4Interface | None = None  # None: DHCP
    gateway: str = ""
    nameservers: tuple[str, ...] = ()

    @property
    def dhcp(self) -> bool:
        return self.address is None


@dataclass
class Plan:
    liveimg_url: str
    liveimg_sha256: str
    disks: tuple[str, ...]                  # the only disks ever written
    boot_drive: str
    kernel_args: str
    partitions: list[Partition]
    volume_groups: dict[str, tuple[str, ...]]
    logical_volumes: list[LogicalVolume]
    hostname: str
    network: Network
    timezone: str
    lock_root: bool
    ssh_keys: list[tuple[str, str]] = field(default_factory=list)   # (user, key)
    post_scripts: list[tuple[str, str, bool]] = field(default_factory=list)  # (interpreter, body, error on fail)

    def mounts(self) -> list[tuple[str, str, Partition | LogicalVolume]]:
        """(mount point, fstype, what holds it) shallowest first, as they must be mounted."""
        mounts: list[tuple[str, str, Partition | LogicalVolume]] = [
            (p.role, p.fstype, p) for p in self.partitions if p.fstype in ("ext4", "efi")]
        mounts += [(lv.mountpoint, lv.fstype, lv) for lv in self.logical_volumes]
        return sorted(mounts, key=lambda mount: mount[0].rstrip("/").count("/") if mount[0] != "/" else -1)


def fetch_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=60) as response:
        return response.read().decode()


def check_supported(text: str, source: str, fetch: Callable[[str], str] = fetch_text) -> None:
    """Refuse any command, section or option this installer does not implement, naming
    the line (in an %include's file, that file's URL and line). Runs on the text as the
    installer got it, before pykickstart and any disk."""
    in_section = False
    for number, line in enumerate(text.splitlines(), start=1):
        words = line.strip()
        if not words or words.startswith("#"):
            continue
        if in_section:
            in_section = words != "%end"
            continue
        try:
            tokens = shlex.split(words)
        except ValueError as error:
            raise KickstartRefused(f"{source}: line {number}: cannot be read ({error}): {words}") from None
        command, options = tokens[0], [token.split("=", 1)[0] for token in tokens[1:] if token.startswith("--")]
        if command.startswith("%") and command != "%include":
            allowed = SECTIONS.get(command)
            in_section = True
            what = "section"
        else:
            allowed = SUPPORTED.get(command)
            what = "command"
        if allowed is None:
            implemented = ", ".join(sorted(SUPPORTED) + sorted(SECTIONS))
            raise KickstartRefused(f"{source}: line {number}: {what} {command!r} is not implemented by this "
                                   f"installer (it implements {implemented})")
        unknown = [option for option in options if option not in allowed]
        if unknown:
            raise KickstartRefused(f"{source}: line {number}: {command} option {unknown[0]} is not implemented by "
                                   f"this installer")
        if command == "%include" and len(tokens) == 2:
            try:
                included = fetch(tokens[1])
            except OSError as error:
                raise KickstartRefused(f"{source}: line {number}: %include {tokens[1]}: {error}") from None
            check_supported(included, tokens[1], fetch)


def read(text: str, source: str, version: str = KICKSTART_VERSION, fetch: Callable[[str], str] = fetch_text) -> Plan:
    """The kickstart as a Plan; KickstartRefused names what is not implemented."""
    from pykickstart.constants import CLEARPART_TYPE_ALL, KS_SCRIPT_POST, SELINUX_ENFORCING
    from pykickstart.errors import KickstartError
    from pykickstart.parser import KickstartParser
    from pykickstart.version import makeVersion

    check_supported(text, source, fetch)
    parser = KickstartParser(makeVersion(version), followIncludes=True)
    try:
        parser.readKickstartFromString(text)
    except KickstartError as error:
        raise KickstartRefused(f"{source}: pykickstart ({version}) rejects it: {error}") from None
    handler = parser.handler

    def refuse(command, problem: str) -> KickstartRefused:
        return KickstartRefused(f"{source}: line {command.lineno}: {problem}")

    required = {"liveimg": handler.liveimg.seen, "bootloader": handler.bootloader.seen,
                "clearpart": handler.clearpart.seen, "ignoredisk": handler.ignoredisk.seen,
                "network": bool(handler.network.network)}
    missing = [name for name, seen in required.items() if not seen]
    if missing:
        raise KickstartRefused(f"{source}: no {missing[0]} command: this installer needs one")
    if handler.selinux.selinux != SELINUX_ENFORCING:
        raise refuse(handler.selinux, "selinux must be --enforcing: the images are built and labeled for it")
    if not re.fullmatch(r"[0-9a-f]{64}", handler.liveimg.checksum or ""):
        raise refuse(handler.liveimg, "liveimg needs --checksum=SHA256 (64 hex digits): the image is verified "
                                      "before any disk is touched")
    disks = tuple(handler.ignoredisk.onlyuse)
    if handler.clearpart.type != CLEARPART_TYPE_ALL or sorted(handler.clearpart.drives) != sorted(disks):
        raise refuse(handler.clearpart, "clearpart must be --all over exactly ignoredisk --only-use's disks")
    if handler.bootloader.bootDrive not in disks:
        raise refuse(handler.bootloader, f"--boot-drive={handler.bootloader.bootDrive} is not one of {disks}")

    partitions = []
    for data in handler.partition.partitions:
        if data.disk not in disks:
            raise KickstartRefused(f"{source}: line {data.lineno}: part --ondisk={data.disk} is not one of {disks}")
        role = data.mountpoint
        fstype = None if role.startswith("pv.") else data.fstype
        if fstype is not None and fstype not in FILESYSTEMS:
            raise KickstartRefused(f"{source}: line {data.lineno}: --fstype={fstype} is not implemented "
                                   f"(it implements {', '.join(FILESYSTEMS)})")
        partitions.append(Partition(data.disk, role, fstype, data.size, data.grow))
    pvs = {p.role for p in partitions if p.is_pv}
    volume_groups = {}
    for data in handler.volgroup.vgList:
        unknown = [pv for pv in data.physvols if pv not in pvs]
        if unknown:
            raise KickstartRefused(f"{source}: line {data.lineno}: volgroup {data.vgname}: no part {unknown[0]}")
        volume_groups[data.vgname] = tuple(data.physvols)
    volumes = []
    for data in handler.logvol.lvList:
        if data.vgname not in volume_groups or data.fstype != "ext4":
            raise KickstartRefused(f"{source}: line {data.lineno}: logvol {data.mountpoint}: needs a volgroup "
                                   f"of this kickstart and --fstype=ext4")
        if data.cache_pvs and not set(data.cache_pvs) <= set(volume_groups[data.vgname]):
            raise KickstartRefused(f"{source}: line {data.lineno}: --cachepvs must be PVs of {data.vgname}")
        volumes.append(LogicalVolume(data.vgname, data.name, data.mountpoint, data.fstype, data.size, data.grow,
                                     tuple(data.cache_pvs or ()), data.cache_size or 0, data.cache_mode or ""))
    if not any(volume.mountpoint == "/" for volume in volumes) and not any(p.role == "/" for p in partitions):
        raise KickstartRefused(f"{source}: nothing is mounted at /")

    net = handler.network.network[0]
    if net.bootProto == "static":
        network = Network(net.device.lower(), IPv4Interface(f"{net.ip}/{net.netmask}"), net.gateway or "",
                          tuple(filter(None, (net.nameserver or "").split(","))))
    else:
        network = Network(net.device.lower())
    if not re.fullmatch(r"([0-9a-f]{2}:){5}[0-9a-f]{2}", network.mac):
        raise KickstartRefused(f"{source}: line {net.lineno}: network --device must be the NIC's MAC address")

    posts = [(script.interp, script.script, script.errorOnFail) for script in handler.scripts
             if script.type == KS_SCRIPT_POST]
    return Plan(
        liveimg_url=handler.liveimg.url, liveimg_sha256=handler.liveimg.checksum, disks=disks,
        boot_drive=handler.bootloader.bootDrive, kernel_args=handler.bootloader.appendLine or "",
        partitions=partitions, volume_groups=volume_groups, logical_volumes=volumes,
        hostname=net.hostname or "localhost", network=network, timezone=handler.timezone.timezone or "Etc/UTC",
        lock_root=bool(handler.rootpw.lock),
        ssh_keys=[(data.username, data.key) for data in handler.sshkey.sshUserList], post_scripts=posts)


# --- running the plan


def disk_path(disk: str) -> str:
    return disk if disk.startswith("/dev/") else f"/dev/{disk}"


def networkd_file(network: Network) -> str:
    """systemd-networkd configuration for the kickstart's NIC, matched by its MAC."""
    lines = ["# From the kickstart's network line (the installer).", "[Match]", f"MACAddress={network.mac}", "",
             "[Network]"]
    if network.address is None:
        lines.append("DHCP=ipv4")
    else:
        lines.append(f"Address={network.address.with_prefixlen}")
        lines += [f"Gateway={network.gateway}"] if network.gateway else []
        lines += [f"DNS={server}" for server in network.nameservers]
    return "\n".join(lines) + "\n"


def grub_defaults(kernel_args: str) -> str:
    # GRUB's defaults file is sourced by a shell: quote the value for it.
    return ("# From the kickstart's bootloader --append (the installer).\n"
            f"GRUB_CMDLINE_LINUX={shlex.quote(kernel_args)}\n")


@dataclass
class Installer:
    plan: Plan
    uefi: bool
    workdir: Path                      # RAM: the liveimg is kept here until verified
    target: Path = TARGET
    say: Callable[[str], None] = print
    timings: dict[str, float] = field(default_factory=dict)
    partition_devices: dict[str, str] = field(default_factory=dict)  # role -> /dev/..., once partitioned

    def step(self, name: str, action: Callable[[], None]) -> None:
        self.say(f"installer: {name} ...")
        started = time.monotonic()
        action()
        self.timings[name] = round(time.monotonic() - started, 1)
        self.say(f"installer: {name} done in {self.timings[name]} s")

    def install(self) -> None:
        """Everything, in Anaconda's order; the disks are first written after the image is verified."""
        image = self.workdir / "liveimg.tar.gz"
        self.step("fetch image", lambda: self.fetch_image(image))
        try:
            self.step("partitioning", self.partition)
            self.step("file systems", self.make_filesystems)
            self.step("image", lambda: self.unpack(image))
            self.step("system", self.configure)
            self.step("bootloader", self.install_bootloader)
            self.step("%post", self.run_post)
            # After %post (Anaconda labels as files are made; the installer runs without SELinux):
            # whatever %post wrote gets its label too.
            self.step("labels", self.relabel)
        except BaseException:
            # Leave nothing mounted (the target, the chroot's binds); the disks are as far as they got.
            run(["umount", "--recursive", self.target], check=False)
            image.unlink(missing_ok=True)
            raise
        self.step("unmount", self.unmount)

    # -- before any disk

    def fetch_image(self, image: Path) -> None:
        digest = hashlib.sha256()
        with urllib.request.urlopen(self.plan.liveimg_url, timeout=60) as response, open(image, "wb") as out:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != self.plan.liveimg_sha256:
            image.unlink()
            raise InstallError(f"liveimg {self.plan.liveimg_url}: sha256 mismatch: expected "
                               f"{self.plan.liveimg_sha256}, got {digest.hexdigest()}; no disk was touched")

    # -- storage

    def device(self, holder: Partition | LogicalVolume) -> str:
        if isinstance(holder, LogicalVolume):
            return f"/dev/{holder.vg}/{holder.name}"
        return self.partition_devices[holder.role]

    def partitions_on(self, disk: str) -> list[tuple[str, str | None]]:
        """(device, GPT name) of each partition on DISK, as the kernel sees them now."""
        listing = json.loads(run(["lsblk", "--json", "--paths", "--output", "NAME,PARTLABEL", disk_path(disk)],
                                 capture=True).stdout)
        return [(child["name"], child.get("partlabel")) for child in listing["blockdevices"][0].get("children", [])]

    def find_partitions(self, disk: str) -> None:
        """Our partitions on DISK by their GPT names, looked up on that disk only (another
        disk may carry the same names from an earlier install)."""
        by_label = {label: device for device, label in self.partitions_on(disk)}
        for part in self.plan.partitions:
            if part.disk == disk:
                if part.partlabel not in by_label:
                    raise InstallError(f"{disk_path(disk)}: partition {part.role} ({part.partlabel}) not found after "
                                       f"partitioning")
                self.partition_devices[part.role] = by_label[part.partlabel]

    def partition(self) -> None:
        # Volume groups an earlier install left are activated by udev as the installer boots,
        # and would keep their disks busy.
        run(["vgchange", "--activate", "n"], check=False)
        for disk in self.plan.disks:  # zerombr + clearpart --all --initlabel
            # An earlier install's PV and file-system signatures live inside its partitions,
            # which wiping the disk's partition table alone leaves in place.
            for device, _ in self.partitions_on(disk):
                run(["wipefs", "--all", "--force", device])
            run(["wipefs", "--all", "--force", disk_path(disk)])
            run(["sgdisk", "--zap-all", "--clear", disk_path(disk)])
        type_codes = {"biosboot": "EF02", "efi": "EF00"}
        for disk in self.plan.disks:
            on_disk = [p for p in self.plan.partitions if p.disk == disk]
            argv = ["sgdisk"]
            for number, part in enumerate(sorted(on_disk, key=lambda p: p.grow), start=1):
                end = "0" if part.grow else f"+{part.size_mib}M"
                code = type_codes.get(part.fstype or "", "8E00" if part.is_pv else "8300")
                argv += [f"--new={number}:0:{end}", f"--typecode={number}:{code}",
                         f"--change-name={number}:{part.partlabel}"]
            if on_disk:
                run([*argv, disk_path(disk)])
        run(["udevadm", "settle"])
        for disk in self.plan.disks:
            self.find_partitions(disk)
        for device in self.partition_devices.values():  # what an older layout left at the same offsets
            run(["wipefs", "--all", "--force", device])
        pv_device = {p.role: self.partition_devices[p.role] for p in self.plan.partitions if p.is_pv}
        for pv in pv_device.values():
            run(["pvcreate", "--yes", "--force", pv])
        for vg, pvs in self.plan.volume_groups.items():
            run(["vgcreate", "--yes", vg, *(pv_device[pv] for pv in pvs)])
        for lv in self.plan.logical_volumes:
            origin_pvs = [pv_device[pv] for pv in self.plan.volume_groups[lv.vg] if pv not in lv.cache_pvs]
            if lv.grow:
                extent = ["--extents", "100%PVS" if lv.cache_pvs else "100%FREE"]
            else:
                extent = ["--size", f"{lv.size_mib}m"]
            run(["lvcreate", "--yes", "--wipesignatures", "y", "--name", lv.name, *extent, lv.vg, *origin_pvs])
            if lv.cache_pvs:
                pool = f"{lv.name}_cache"
                run(["lvcreate", "--yes", "--type", "cache-pool", "--name", pool, "--size", f"{lv.cache_size_mib}m",
                     lv.vg, *(pv_device[pv] for pv in lv.cache_pvs)])
                run(["lvconvert", "--yes", "--type", "cache", "--cachepool", f"{lv.vg}/{pool}",
                     "--cachemode", lv.cache_mode or "writethrough", f"{lv.vg}/{lv.name}"])

    def make_filesystems(self) -> None:
        for _mountpoint, fstype, holder in self.plan.mounts():
            device = self.device(holder)
            if fstype == "efi":
                run(["mkfs.vfat", "-F", "32", "-n", "EFI", device])
            else:
                run(["mkfs.ext4", "-F", "-q", device])
        for mountpoint, fstype, holder in self.plan.mounts():
            where = self.target / mountpoint.lstrip("/")
            where.mkdir(parents=True, exist_ok=True)
            run(["mount", *(["-t", "vfat"] if fstype == "efi" else []), self.device(holder), where])

    # -- the root tree and the system

    def unpack(self, image: Path) -> None:
        # pigz inflates in half gzip's time (zlib's inflate); under TCG, gzip took about half of this step.
        run([*ANACONDA_EXTRACT, "--extract", "--use-compress-program=pigz", "--file", image,
             "--directory", self.target])
        image.unlink()
        # What changes after this is what relabel() labels (tar sets each directory's times last,
        # so the stamp comes after all of them). File times move in clock ticks: wait one out, so
        # that nothing written after counts as no newer than the stamp.
        self.unpacked_stamp.touch()
        time.sleep(STAMP_TICK)

    @property
    def unpacked_stamp(self) -> Path:
        return self.workdir / "unpacked"

    def uuid(self, device: str) -> str:
        return run(["blkid", "--match-tag", "UUID", "--output", "value", device], capture=True).stdout.strip()

    def configure(self) -> None:
        fstab = ["# From the kickstart's part and logvol lines (the installer)."]
        for mountpoint, fstype, holder in self.plan.mounts():
            device = self.device(holder)
            kind, options, passno = ("vfat", "umask=0077", 2) if fstype == "efi" else ("ext4", "defaults",
                                                                                        1 if mountpoint == "/" else 2)
            fstab.append(f"UUID={self.uuid(device)} {mountpoint} {kind} {options} 0 {passno}")
        self.write("etc/fstab", "\n".join(fstab) + "\n")
        self.write(f"etc/systemd/network/10-kickstart-{self.plan.network.mac.replace(':', '')}.network",
                   networkd_file(self.plan.network))
        self.write("etc/hostname", self.plan.hostname + "\n")
        zone = self.target / "usr/share/zoneinfo" / self.plan.timezone
        if not zone.is_file():
            raise InstallError(f"timezone {self.plan.timezone}: not in the image's /usr/share/zoneinfo")
        localtime = self.target / "etc/localtime"
        localtime.unlink(missing_ok=True)
        localtime.symlink_to(f"/usr/share/zoneinfo/{self.plan.timezone}")
        self.write("etc/timezone", self.plan.timezone + "\n")
        if self.plan.lock_root:
            self.chroot(["passwd", "--lock", "root"])
        for user, key in self.plan.ssh_keys:
            self.chroot(["sh", "-c", AUTHORIZE_KEY, "sh", user, key])
        self.disable_cloud_init()

    def disable_cloud_init(self) -> None:
        """A bare-metal host takes its users, keys, name and network from the kickstart and has no
        cloud to ask: with cloud-init on, any disk labelled cidata or config-2 (a USB stick, a volume
        a guest wrote) could hand it root keys at its next boot. So no datasource is kept: this file
        stops cloud-init's systemd generator from starting any of its units."""
        if (self.target / CLOUD_INIT_DIR).is_dir():
            self.write(CLOUD_INIT_DISABLED, "# A host installed from a kickstart (the installer): no cloud-init.\n")

    def install_bootloader(self) -> None:
        self.write("etc/default/grub.d/90-kickstart.cfg", grub_defaults(self.plan.kernel_args))
        self.bind_system()
        # No update-initramfs: the image's initramfs was made at build time, generic (MODULES=most)
        # and with lvm2's hook, which activates root's volume group from root= on any machine; and
        # remaking it here takes 5 minutes under TCG. test_host.py checks it carries lvm and dm-cache.
        if self.uefi:
            # The removable path (EFI/BOOT/BOOTX64.EFI) needs no NVRAM entry, as the image itself.
            self.chroot(["grub-install", "--target=x86_64-efi", "--efi-directory=/boot/efi", "--removable",
                         "--no-nvram"])
        else:
            self.chroot(["grub-install", "--target=i386-pc", disk_path(self.plan.boot_drive)])
        self.chroot(["update-grub"])

    def relabel(self) -> None:
        """Label what the installer and %post wrote from the image's own file contexts, so the first
        boot needs no relabel; the unpacked tree keeps the labels it was built with.

        What changed since the unpack is what has a newer ctime (any write, rename, chmod or new link
        sets it); setfiles recurses into each directory given (within its file system), so a
        directory's contents are not listed again. Labelling the whole tree instead took a minute
        under TCG, and setfiles never crossed into /boot or other mounted file systems."""
        contexts = self.target / "etc/selinux/default/contexts/files/file_contexts"
        # The chroot's dev, proc and sys are the installer's own; the ESP is FAT, which holds no
        # labels (its mount gives it one): setfiles fails on it.
        skipped = ["dev", "proc", "sys", *(m.lstrip("/") for m, fstype, _ in self.plan.mounts() if fstype == "efi")]
        pruned = [arg for path in skipped for arg in ("-path", str(self.target / path), "-o")][:-1]
        found = run(["find", self.target, "(", *pruned, ")", "-prune", "-o", "-cnewer", self.unpacked_stamp,
                     "-print0"], capture=True).stdout
        changed = [Path(path) for path in found.split("\0") if path]
        # Made by mkfs before the unpack, and not in the image: each file system's lost+found.
        changed += [self.target / m.lstrip("/") / "lost+found" for m, kind, _ in self.plan.mounts() if kind != "efi"]
        excluded = [arg for path in skipped for arg in ("-e", self.target / path)]
        if any("\n" in str(path) for path in changed):  # setfiles -f reads a path a line: label it all
            run(["setfiles", "-F", *excluded, "-r", self.target, contexts, self.target])
            return
        listing = self.workdir / "relabel.list"
        listing.write_text("".join(f"{path}\n" for path in outermost(p for p in changed if p.exists())))
        run(["setfiles", "-F", *excluded, "-r", self.target, contexts, "-f", listing])
        listing.unlink()

    def run_post(self) -> None:
        for index, (interpreter, body, error_on_fail) in enumerate(self.plan.post_scripts, start=1):
            script = f"/tmp/ks-post-{index}"
            self.write(script.lstrip("/"), body)
            result = self.chroot([interpreter, script], check=False)
            (self.target / script.lstrip("/")).unlink()
            if result.returncode != 0 and error_on_fail:
                raise InstallError(f"%post number {index} failed ({exit_status(result.returncode)}): "
                                   f"{result.stderr.strip()[-300:]}")

    # -- helpers

    def write(self, relative: str, text: str) -> None:
        path = self.target / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    def chroot(self, argv: list[str], check: bool = True):
        return run(["chroot", self.target, *argv], capture=True, check=check)

    def bind_system(self) -> None:
        """What grub-install and update-grub need in the chroot: devices, and proc and sys of
        their own (not binds of the installer's, whose cgroup mounts stay busy at unmount)."""
        run(["mount", "--bind", "/dev", self.target / "dev"])
        run(["mount", "-t", "proc", "proc", self.target / "proc"])
        run(["mount", "-t", "sysfs", "sysfs", self.target / "sys"])

    def unmount(self) -> None:
        run(["umount", "--recursive", self.target])


def outermost(paths: Iterable[Path], device: Callable[[Path], int] = lambda path: path.lstat().st_dev) -> list[Path]:
    """PATHS without those inside another of them on the same file system: setfiles recurses
    into a directory it is given, but does not cross into another file system (/boot, say)."""
    kept: set[tuple[Path, int]] = set()
    for path in sorted(set(paths)):
        on = device(path)
        if not any((parent, on) in kept for parent in path.parents):
            kept.add((path, on))
    return sorted(path for path, _ in kept)


def report_url(kickstart_url: str, hostname: str, outcome: str, reason: str = "") -> str:
    """Where the outcome is reported: /status/HOSTNAME/ok|fail on the kickstart's server, so the
    server's access log shows every node's outcome."""
    parts = urlsplit(kickstart_url)
    url = f"{parts.scheme}://{parts.netloc}/status/{quote(hostname, safe='')}/{outcome}"
    return url + (f"?reason={quote(reason[:200], safe='')}" if reason else "")


def kernel_argument(name: str, cmdline: str) -> str | None:
    """The value of NAME=VALUE on a kernel command line, or None."""
    for word in cmdline.split():
        key, _, value = word.partition("=")
        if key == name and value:
            return value
    return None


# On the root tmpfs (half the RAM), not /run (a fifth): the liveimg waits there until verified.
WORKDIR = Path("/var/tmp/kvmpipe-installer")


def main(cmdline_path: Path = Path("/proc/cmdline"), workdir: Path = WORKDIR) -> int:
    """What the installer image runs at boot: the kickstart named by inst.ks=, then the
    outcome on the console and to the server (/status/HOSTNAME/ok|fail), then reboot."""
    def say(line: str) -> None:
        print(line, flush=True)

    url = kernel_argument("inst.ks", cmdline_path.read_text())
    if url is None:
        say("installer: FAILED: no inst.ks=URL on the kernel command line")
        return 2
    hostname = Path(urlsplit(url).path).stem or "unknown"  # until the kickstart names it
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        plan = read(fetch_text(url), url)
        hostname = plan.hostname
        setup = Installer(plan, uefi=Path("/sys/firmware/efi").is_dir(), workdir=workdir, say=say)
        setup.install()
    except (PipelineError, OSError) as error:
        say(f"installer: FAILED: {hostname}: {error}")
        _report(url, hostname, "fail", str(error), say)
        return 1
    say(f"installer: {hostname} installed; " + ", ".join(f"{k} {v} s" for k, v in setup.timings.items()))
    _report(url, hostname, "ok", "", say)
    run(["systemctl", "reboot"])
    return 0


def _report(kickstart_url: str, hostname: str, outcome: str, reason: str, say: Callable[[str], None]) -> None:
    try:
        urllib.request.urlopen(report_url(kickstart_url, hostname, outcome, reason), timeout=30).close()
    except OSError as error:  # a 404 from a static server still leaves the line in its access log
        say(f"installer: reported {outcome} ({error})")


if __name__ == "__main__":
    raise SystemExit(main())
