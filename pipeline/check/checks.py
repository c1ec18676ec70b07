"""The offline check's checks: each a small function over the launched image (a `Guest`)
that returns its problems, and one `CHECKS` table that says which images it is for.

To add a check: write `check_x(guest) -> Verdict` here and a row in `CHECKS`; parse any
new file format in parsers.py, where it is tested on strings.
"""

from __future__ import annotations

import contextlib
import json
import posixpath
import re
import stat
import struct
import tarfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from .. import manifest, selinux
from ..disk import BASE_DEV_NAMES
from ..manifest import parse_dpkg_status
from ..progress import Timings, step
from ..selinux import element_closure
from ..spec import DEBIAN_RELEASES, ImageSpec
from .elements import enabled_units, required_packages
from .parsers import (
    GPT_BIOS_BOOT,
    GPT_ESP,
    SECTOR,
    FileEntry,
    Ifupdown,
    as_text,
    cloud_datasources,
    fstab_uuid,
    label_sample,
    parse_env_file,
    parse_fstab,
    parse_ifupdown,
    passwd_problems,
    selinux_type,
    shadow_problems,
    sshd_effective,
    sshd_include_patterns,
    unit_install_links,
    unlabeled_names,
)
from .report import CheckResult
from .session import DEVICE, LABEL_SAMPLE, CheckFailed, Guest, first_line, mount

BOOT_KERNEL_SECTOR = 0x5C  # in GRUB's boot.img: LBA of core.img, see bootloader.py
GUEST_ELEMENT = "kvm-guest"
CLOUD_INIT_ELEMENT = "kvm-cloud-init"
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
# Where `systemctl enable` finds a unit file, in its order.
UNIT_DIRS = ("/etc/systemd/system", "/usr/lib/systemd/system", "/lib/systemd/system")
OVS_INTERFACES = "/etc/network/interfaces.d/ovs-bridges"
# What would make ifupdown run at boot beside the bridges' unit (kvm-host's 60-ovs-bridges).
NETWORKING_LINKS = tuple(f"/etc/systemd/system/{target}.wants/networking.service"
                         for target in ("multi-user.target", "network-online.target"))
IFUPDOWN_HOTPLUG_RULE = "/etc/udev/rules.d/80-ifupdown.rules"
POLICY_MODULES = "/var/lib/selinux/default/active/modules/400"  # semodule's default priority
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
# Where a release's refpolicy gives another type (trixie's file_contexts: /etc/machine-id is
# etc_runtime_t, written at first boot by systemd-machine-id-setup in its own domain).
RELEASE_LABELS: dict[str, dict[str, str]] = {"trixie": {"/etc/machine-id": "etc_runtime_t"}}
UNLABELED_BY_POLICY = {path for path, expected in LABELS if expected is None}
# The key files whose labels the liveimg tarball must share with the disk (the mountpoints
# are not in it: the build makes them when it assembles the disk).
LIVEIMG_LABELED = tuple(path for path, _ in (*LABELS, *HOST_LABELS)
                        if path not in ("/proc", "/sys", "/dev", "/run", "/boot/efi"))
TUNED_DAEMON = ("/usr/sbin/tuned", "/usr/bin/tuned")
TUNED_DAEMON_TYPE = "tuned_exec_t"
SHOWN = 10  # names listed in a failure's detail
# Names a shell or an interactive tool leaves its history under, in any home directory.
HISTORY_FILES = frozenset({".bash_history", ".sh_history", ".ash_history", ".zsh_history", ".history",
                           ".python_history", ".lesshst", ".viminfo", ".mysql_history", ".psql_history",
                           ".sqlite_history", ".wget-hsts"})
APT_LISTS_KEPT = ("/var/lib/apt/lists/lock", "/var/lib/apt/lists/partial")  # what apt itself keeps, empty



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
    # A root filesystem's /dev holds debootstrap's few nodes; anything more was copied from the
    # build host's /dev (disk-image-create's tar takes it while bind-mounted).
    ("device nodes of the build host", lambda e: e.path.startswith("/dev/") and e.path[5:] not in BASE_DEV_NAMES),
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



def bridge_problems(spec: ImageSpec, declared: Ifupdown) -> list[str]:
    """What is missing or wrong for the spec's OVS bridges in Debian's ifupdown form."""
    problems = []
    for bridge in spec.bridges:
        stanza = declared.interfaces.get(bridge.name)
        if stanza is None or stanza.get("ovs_type") != "OVSBridge":
            problems.append(f"{bridge.name}: no 'iface {bridge.name}' with ovs_type OVSBridge")
            continue
        if bridge.name not in declared.classes.get("allow-ovs", []):
            problems.append(f"{bridge.name}: not in 'allow-ovs'")
        # networking.service raises `auto`, and cloud-init's network stage waits for it.
        if bridge.name in declared.classes.get("auto", []):
            problems.append(f"{bridge.name}: in 'auto', so logins wait for Open vSwitch")
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
    expected_major = DEBIAN_RELEASES.get(spec.release)
    if expected_major and release.get("VERSION_ID", "").split(".")[0] != expected_major:
        problems.append(f"VERSION_ID={release.get('VERSION_ID')!r}, expected {expected_major} for {spec.release}")
    if release.get("VERSION_CODENAME") != spec.release:
        problems.append(f"VERSION_CODENAME={release.get('VERSION_CODENAME')!r}, expected {spec.release!r}")
    where = f"linux root {guest.device(guest.root)}: {release.get('PRETTY_NAME', '?')}"
    return ([f"{where}: {p}" for p in problems], where)


def check_kernel(guest: Guest) -> Verdict:
    version = guest.info["kernel"]
    paths = [f"/boot/vmlinuz-{version}", f"/boot/initrd.img-{version}"]
    problems = [f"{p} missing" for p in paths if not guest.is_file(p)]
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
    on_disk = {guest.uuid(p).lower() for p in guest.filesystem_partitions} - {""}
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
    if not guest.is_file(path):
        return [f"{path} missing on the ESP"], ""
    if guest.g.pread(path, 2, 0) != b"MZ":
        return [f"{path} is not a PE executable"], ""
    return [], f"ESP has EFI/BOOT/BOOTX64.EFI ({guest.g.filesize(path)} bytes)"


def check_grub_modules(guest: Guest) -> Verdict:
    paths = ["/boot/grub/i386-pc/normal.mod", "/boot/grub/x86_64-efi/normal.mod"]
    problems = [f"{p} missing" for p in paths if not guest.is_file(p)]
    return (problems, "normal.mod for i386-pc and x86_64-efi")


def check_bios_boot(guest: Guest) -> Verdict:
    mbr = guest.head[:SECTOR]
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
    active = (guest.text_if_readable("/etc/tuned/active_profile") or "").strip() or None
    if active != profile:
        problems.append(f"/etc/tuned/active_profile is {active!r}, expected {profile!r}")
    mode = (guest.text_if_readable("/etc/tuned/profile_mode") or "").strip() or None
    if mode != "manual":
        problems.append(f"/etc/tuned/profile_mode is {mode!r}, expected 'manual'")
    # tuned 2.23 (trixie) reads the administrator's profiles from /etc/tuned/profiles, 2.20 from /etc/tuned.
    ours = "/etc/tuned/profiles" if guest.is_dir("/usr/lib/tuned/profiles") else "/etc/tuned"
    if not guest.is_file(f"{ours}/{profile}/tuned.conf"):
        problems.append(f"{ours}/{profile}/tuned.conf missing")
    link = "/etc/systemd/system/multi-user.target.wants/tuned.service"
    # realpath resolves inside the guest's root, so the unit's absolute target is found there.
    if not guest.is_symlink(link):
        problems.append("tuned.service is not enabled (no multi-user.target.wants link)")
    elif not guest.is_file(g.realpath(link)):
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


def label_problems(guest: Guest, table: Iterable[tuple[str, str | None]]) -> list[str]:
    """Each path of the table whose SELinux type is not the one expected (None: no label)."""
    problems = []
    for path, expected in table:
        found = selinux_type(guest.label(path))
        if found != expected:
            problems.append(f"{path}: {found or 'unlabeled'}, expected {expected or 'unlabeled (<<none>>)'}")
    return problems


def check_labels(guest: Guest) -> Verdict:
    """Runs before the ESP is mounted, so /boot/efi is the root filesystem's mountpoint."""
    changed = RELEASE_LABELS.get(guest.spec.release, {})
    table = [(path, changed.get(path, expected)) for path, expected in LABELS]
    daemon = next((p for p in TUNED_DAEMON if guest.is_file(p)), None)
    problems = [] if daemon else [f"no tuned daemon at {' or '.join(TUNED_DAEMON)}"]
    if daemon:
        table.append((daemon, TUNED_DAEMON_TYPE))
    problems += label_problems(guest, table)
    return (problems, f"{len(table)} key files carry refpolicy's types")


def check_unlabeled(guest: Guest) -> Verdict:
    """LABEL_SAMPLE's paths, picked out of the file list, each have a label: as the command that
    listed them read it, or else by lxattrlist. A path it did not read counts as unlabeled."""
    missing = []
    count = 0
    for directory, names in label_sample((e.path for e in guest.files), LABEL_SAMPLE).items():
        count += len(names)
        if guest.labels is not None:
            missing += [path for path in (posixpath.join(directory, name) for name in names)
                        if not guest.labels.get(path)]
        else:
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
    if not guest.is_file(path):
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
            ("no resolv.conf copy, apt lists, .debs, shell history, logged lines, cloud-init instance state "
             "or host device nodes"))


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
    problems = [s for k, s in zip(wanted, summary, strict=True) if options[k].value != "no"]
    return (problems, "; ".join(summary))


def check_datasources(guest: Guest) -> Verdict:
    paths = ["/etc/cloud/cloud.cfg", *sorted(guest.g.glob_expand("/etc/cloud/cloud.cfg.d/*.cfg"))]
    texts = [(p, guest.text_if_readable(p)) for p in paths]
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
    spec = guest.spec
    wanted = [source.stem for source in selinux.module_sources(spec.elements, spec.release, spec.element_dirs)]
    missing = [m for m in wanted if not guest.is_dir(f"{POLICY_MODULES}/{m}")]
    return ([f"not installed in the policy store: {', '.join(missing)}"] if missing else [],
            f"installed: {', '.join(wanted)}")


def check_enabled_units(guest: Guest) -> Verdict:
    """The units the elements' enabled-units lists name have the links `systemctl enable`
    makes, as their own [Install] sections in the image say."""
    units = enabled_units(guest.spec)
    problems = []
    for unit in units:
        text = next((found for found in (guest.text_if_readable(f"{d}/{unit}") for d in UNIT_DIRS)
                     if found is not None), None)
        if text is None:
            problems.append(f"{unit}: no unit file in {' or '.join(UNIT_DIRS)}")
            continue
        links = unit_install_links(unit, text)
        if not links:
            problems.append(f"{unit}: its [Install] section has no WantedBy= or RequiredBy=")
        for link in links:
            path = f"/etc/systemd/system/{link}"
            if not guest.is_symlink(path):
                problems.append(f"{unit} is not enabled (no {posixpath.dirname(link)} link)")
            elif not guest.is_file(guest.g.realpath(path)):
                problems.append(f"{path} -> {guest.g.readlink(path)}, which does not exist")
    return (problems, f"enabled: {', '.join(units)}")


def check_host_labels(guest: Guest) -> Verdict:
    problems = label_problems(guest, HOST_LABELS)
    return (problems, f"libvirtd, qemu, OVS and the network agent: {len(HOST_LABELS)} labels as expected")


def check_libvirt_svirt(guest: Guest) -> Verdict:
    config = parse_env_file(guest.text("/etc/libvirt/qemu.conf"))
    driver = config.get("security_driver")
    return ([] if driver == "selinux" else [f"qemu.conf security_driver is {driver!r}, expected 'selinux'"],
            "libvirt qemu.conf: security_driver = selinux (sVirt)")


def check_bridges(guest: Guest) -> Verdict:
    text = guest.text_if_readable(OVS_INTERFACES)
    if text is None:
        return [f"{OVS_INTERFACES} missing"], ""
    declared = parse_ifupdown(text)
    problems = bridge_problems(guest.spec, declared)
    main = parse_ifupdown(guest.text_if_readable("/etc/network/interfaces") or "")
    if "/etc/network/interfaces.d/*" not in main.sources:
        problems.append("/etc/network/interfaces does not source /etc/network/interfaces.d/*")
    problems += ifupdown_boot_problems(guest)
    shown = ", ".join(f"{b.name}{f' (uplink {b.uplink})' if b.uplink else ''}" for b in guest.spec.bridges)
    return (problems, f"{OVS_INTERFACES}: {shown}")


def ifupdown_boot_problems(guest: Guest) -> list[str]:
    """networking.service is ordered after Open vSwitch, and cloud-init's network stage after
    it: enabled, it holds every login behind Open vSwitch. The hotplug rule would run ifquery."""
    problems = [f"networking.service is enabled ({link}), so logins wait for Open vSwitch"
                for link in NETWORKING_LINKS if guest.is_symlink(link)]
    if not (guest.is_symlink(IFUPDOWN_HOTPLUG_RULE) and guest.g.readlink(IFUPDOWN_HOTPLUG_RULE) == "/dev/null"):
        problems.append(f"{IFUPDOWN_HOTPLUG_RULE} does not mask udev's ifupdown hotplug rule")
    return problems


def check_manifest(guest: Guest) -> Verdict:
    """The manifest inside the image is this build's, and its package list is the image's own."""
    text = guest.text_if_readable(f"/{manifest.EMBEDDED}")
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
    return (problems, (f"/{manifest.EMBEDDED}: version {embedded.get('version')}, {len(installed)} packages, "
                       f"input hash {str(embedded.get('input_hash'))[:8]}"))


def check_liveimg(guest: Guest) -> Verdict:
    """The liveimg tarball, read as Anaconda lists it: every entry labeled, the same labels
    as the disk on key files, the image's kernel in boot/."""
    path = guest.directory / guest.info["liveimg"]
    if guest.tarball is None:
        return [f"{path} missing"], ""
    paths = [p for p in LIVEIMG_LABELED if guest.g.exists(p)]
    try:
        contents = guest.tarball.result()
    except (OSError, EOFError, tarfile.TarError) as error:
        return [f"{path.name}: not a readable gzip tarball: {error}"], ""
    problems = []
    unlabeled = [p for p in contents.unlabeled if p not in UNLABELED_BY_POLICY]
    if unlabeled:
        problems.append(f"{len(unlabeled)} entries without a security.selinux label: {', '.join(unlabeled[:SHOWN])}")
    if guest.info["kernel"] not in contents.kernels:
        problems.append(f"no boot/vmlinuz-{guest.info['kernel']} (Anaconda finds the kernel there): {contents.kernels}")
    for p in paths:
        disk = as_text(guest.label(p) or b"").rstrip("\0")
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
    Check("enabled units", check_enabled_units, applies=lambda spec: bool(enabled_units(spec))),
    Check("host selinux labels", check_host_labels, applies=is_host),
    Check("libvirt svirt", check_libvirt_svirt, applies=is_host),
    Check("ovs bridges", check_bridges, applies=lambda spec: bool(spec.bridges)),
    Check("build manifest", check_manifest),
    Check("liveimg tarball", check_liveimg),
)


def _run(check: Check, guest: Guest) -> CheckResult:
    started = time.monotonic()
    try:
        result = _result(check.name, check.run(guest))
    except CheckFailed as error:
        result = CheckResult(check.name, False, str(error))
    except RuntimeError as error:  # from libguestfs: a missing file, an unreadable device
        result = CheckResult(check.name, False, f"error: {first_line(error)}")
    return replace(result, seconds=round(time.monotonic() - started, 2))


def run_checks(guest: Guest, timings: Timings | None = None) -> list[CheckResult]:
    wanted = [c for c in CHECKS if c.applies(guest.spec)]
    results = {}
    # The checks that read the disk's raw blocks still run when the root does not mount.
    unmounted = mount(guest, guest.root, "/")
    if not unmounted:
        # Several checks read the file list, the one walk of the whole tree: timed on its own, so
        # each check's time is its own. If it fails, each check that reads it says why.
        with contextlib.suppress(RuntimeError, CheckFailed), step("check: list files", timings):
            guest.files  # noqa: B018 (a cached property)
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
            unmounted = mount(guest, guest.partition(GPT_ESP, "EFI system"), "/boot/efi", "vfat")
        except CheckFailed as error:
            unmounted = str(error)
    for check in wanted:
        if check.needs_esp:
            results[check.name] = CheckResult(check.name, False, unmounted) if unmounted else _run(check, guest)
    return [results[c.name] for c in wanted]


