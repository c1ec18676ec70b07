"""The installer: reads our rendered kickstarts into a plan, refuses what it does not
implement before any disk is touched, and runs the plan in Anaconda's order.

Kickstarts are rendered by the real templates and parsed by the real pykickstart; only
the subprocess gateway (installer.run) is faked, recording every command.
"""

import hashlib
import json
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.deploy import installer, inventory, kickstart
from pipeline.errors import CommandFailed
from pipeline.paths import ROOT

EXAMPLE = ROOT / "kickstarts" / "inventory.example.toml"
DISK_COMMANDS = ("wipefs", "sgdisk", "pvcreate", "vgcreate", "lvcreate", "lvconvert", "mkfs.ext4", "mkfs.vfat",
                 "mount")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """The example inventory's kickstarts, as pxe.render writes them: {node: text}."""
    out = tmp_path_factory.mktemp("ks")
    image = {name: kickstart.LiveImage(f"{name}.tar.gz", "ab" * 32) for name in ("host-image", "guest-image")}
    kickstart.render_all(inventory.load(EXAMPLE), out, liveimgs=image)
    return {path.stem: path.read_text() for path in out.glob("*.ks")}


def lsblk(disk: str) -> str:
    """lsblk --json of a disk the installer partitioned: every ks-* name the example uses."""
    names = {"/dev/sda": ["ks-boot-efi", "ks-boot", "ks-pv.root"], "/dev/sdb": ["ks-pv.data"],
             "/dev/nvme0n1": ["ks-pv.ssd"]}.get(disk, [])
    separator = "p" if disk[-1].isdigit() else ""
    children = [{"name": f"{disk}{separator}{index}", "partlabel": name} for index, name in enumerate(names, start=1)]
    return json.dumps({"blockdevices": [{"name": disk, "partlabel": None, "children": children}]})


@pytest.fixture
def commands(monkeypatch):
    """The fake gateway: every argv the installer runs, in order."""
    seen: list[list[str]] = []

    def fake_run(argv, **options):
        argv = [str(arg) for arg in argv]
        seen.append(argv)
        stdout = {"blkid": "1234-uuid\n", "lsblk": lsblk(argv[-1])}.get(argv[0], "")
        return subprocess.CompletedProcess(argv, 0, stdout, "")

    monkeypatch.setattr(installer, "run", fake_run)
    return seen


def test_every_rendered_kickstart_is_implemented(rendered):
    for node, text in rendered.items():
        plan = installer.read(text, f"{node}.ks")
        assert plan.liveimg_sha256 == "ab" * 32 and plan.network.mac.count(":") == 5


def test_cache_node_plan(rendered):
    plan = installer.read(rendered["compute1"], "compute1.ks")
    assert plan.disks == ("sda", "sdb", "nvme0n1") and plan.boot_drive == "sda"
    assert plan.hostname == "compute1" and not plan.network.dhcp
    assert str(plan.network.address) == "10.0.0.11/24" and plan.network.nameservers == ("10.0.0.1",)
    images = next(lv for lv in plan.logical_volumes if lv.mountpoint == "/var/lib/libvirt/images")
    assert (images.cache_pvs, images.cache_size_mib, images.cache_mode) == (("pv.ssd",), 100000, "writethrough")
    assert [m for m, _, _ in plan.mounts()] == ["/", "/boot", "/boot/efi", "/var/lib/libvirt/images"]
    assert "hugepages=16" in plan.kernel_args and "security=selinux" in plan.kernel_args
    assert plan.lock_root and plan.post_scripts[0][2]  # %post --erroronfail


@pytest.mark.parametrize("line, refused", [
    ("firewall --enabled", "line 1: command 'firewall' is not implemented"),
    ("part /srv --fstype=xfs --size=100 --ondisk=sda --encrypted", "line 1: part option --encrypted"),
    ("%packages\nvim\n%end", "line 1: section '%packages' is not implemented"),
    ("%pre\nwipefs -a /dev/sdz\n%end", "line 1: section '%pre' is not implemented"),
])
def test_unimplemented_commands_are_refused_naming_the_line(rendered, line, refused):
    text = line + "\n" + rendered["compute2"]
    with pytest.raises(installer.KickstartRefused, match=refused):
        installer.read(text, "compute2.ks")


def test_an_included_file_is_held_to_the_same_rules(rendered, tmp_path):
    included = tmp_path / "site.ks"
    included.write_text("sshkey --username=root 'ssh-ed25519 AAAA x'\nfirewall --enabled\n")
    text = rendered["compute2"] + f"%include {included.as_uri()}\n"
    with pytest.raises(installer.KickstartRefused, match=f"{included.as_uri()}: line 2: command 'firewall'"):
        installer.read(text, "compute2.ks")


def test_an_unimplemented_file_system_is_refused(rendered):
    text = rendered["compute2"].replace("part /boot --fstype=ext4", "part /boot --fstype=xfs")
    with pytest.raises(installer.KickstartRefused, match=r"--fstype=xfs is not implemented"):
        installer.read(text, "compute2.ks")


def test_permissive_or_an_unchecked_image_is_refused(rendered):
    with pytest.raises(installer.KickstartRefused, match=r"line \d+: selinux option --permissive is not implemented"):
        installer.read(rendered["compute2"].replace("selinux --enforcing", "selinux --permissive"), "x.ks")
    unchecked = rendered["compute2"].replace("--checksum=" + "ab" * 32, "")
    with pytest.raises(installer.KickstartRefused, match="liveimg needs --checksum"):
        installer.read(unchecked, "x.ks")


def plan_for(tmp_path, text: str, payload: bytes, checksum: str | None = None) -> installer.Plan:
    image = tmp_path / "served.tar.gz"
    image.write_bytes(payload)
    plan = installer.read(text, "node.ks")
    plan.liveimg_url = image.as_uri()
    plan.liveimg_sha256 = checksum or hashlib.sha256(payload).hexdigest()
    return plan


def test_checksum_mismatch_stops_before_any_disk(rendered, commands, tmp_path):
    plan = plan_for(tmp_path, rendered["compute1"], b"not the image", checksum="cd" * 32)
    work = tmp_path / "ram"
    work.mkdir()
    setup = installer.Installer(plan, uefi=True, workdir=work, target=tmp_path / "target", say=lambda _: None)
    with pytest.raises(installer.InstallError) as caught:
        setup.install()
    message = str(caught.value)
    assert plan.liveimg_url in message and "cd" * 32 in message
    assert hashlib.sha256(b"not the image").hexdigest() in message
    assert commands == [] and list(work.iterdir()) == []


def test_partitioning_writes_only_the_listed_disks_with_a_real_cache(rendered, commands, tmp_path):
    plan = plan_for(tmp_path, rendered["compute1"], b"x")
    installer.Installer(plan, uefi=True, workdir=tmp_path, target=tmp_path / "t", say=lambda _: None).partition()
    written = {argv[-1] for argv in commands if argv[0] in ("wipefs", "sgdisk")}
    assert {"/dev/sda", "/dev/sdb", "/dev/nvme0n1"} <= written
    assert all(device.startswith(("/dev/sda", "/dev/sdb", "/dev/nvme0n1")) for device in written), written
    # An earlier install's partitions are wiped before the disk's table, the new ones before pvcreate.
    wipes = [argv[-1] for argv in commands if argv[0] == "wipefs"]
    assert wipes.index("/dev/sdb1") < wipes.index("/dev/sdb") < len(wipes) - 1 - wipes[::-1].index("/dev/sdb1")
    assert commands[0] == ["vgchange", "--activate", "n"]  # an earlier install's VGs let go of the disks
    layout = next(argv for argv in commands
                  if argv[0] == "sgdisk" and argv[-1] == "/dev/sda" and "--new=1:0:+600M" in argv)
    assert "--typecode=1:EF00" in layout and "--new=3:0:0" in layout  # the PV grows, last
    origin = next(argv for argv in commands if argv[:2] == ["lvcreate", "--yes"] and "images" in argv)
    assert origin[-1] == "/dev/sdb1" and "100%PVS" in origin  # not on the SSD
    pool = next(argv for argv in commands if "cache-pool" in argv)
    assert pool[-1] == "/dev/nvme0n1p1" and "100000m" in pool
    convert = next(argv for argv in commands if argv[0] == "lvconvert")
    assert convert[convert.index("--cachemode") + 1] == "writethrough" and convert[-1] == "vg_data/images"


def test_bios_node_gets_grub_on_its_boot_drive(rendered, commands, tmp_path):
    plan = installer.read(rendered["compute2"], "compute2.ks")
    target = tmp_path / "t"
    installer.Installer(plan, uefi=False, workdir=tmp_path, target=target, say=lambda _: None).install_bootloader()
    grub = [argv for argv in commands if "grub-install" in argv]
    assert grub == [["chroot", str(target), "grub-install", "--target=i386-pc",
                     "/dev/disk/by-id/wwn-0x5000c500a1b2c3d4"]]
    defaults = (target / "etc/default/grub.d/90-kickstart.cfg").read_text()
    assert f"GRUB_CMDLINE_LINUX='{plan.kernel_args}'" in defaults


def test_network_file_matches_the_nic_by_mac():
    static = installer.Network("52:54:00:12:34:01", installer.IPv4Interface("10.0.0.11/255.255.255.0"),
                               "10.0.0.1", ("10.0.0.1", "10.0.0.2"))
    text = installer.networkd_file(static)
    assert "MACAddress=52:54:00:12:34:01" in text and "Address=10.0.0.11/24" in text
    assert "Gateway=10.0.0.1" in text and text.count("DNS=") == 2
    assert "DHCP=ipv4" in installer.networkd_file(installer.Network("52:54:00:12:34:03"))


def test_grub_arguments_are_quoted_for_the_shell_that_sources_them():
    assert installer.grub_defaults("a='b' $(reboot)").splitlines()[1] == (
        "GRUB_CMDLINE_LINUX='a='\"'\"'b'\"'\"' $(reboot)'")


def test_outcome_is_reported_to_the_kickstart_server():
    url = installer.report_url("http://10.0.0.1:8080/kickstarts/compute1.ks", "compute1", "fail", "sha256 mismatch")
    assert url == "http://10.0.0.1:8080/status/compute1/fail?reason=sha256%20mismatch"


def test_kernel_argument():
    assert installer.kernel_argument("inst.ks", "console=ttyS0 inst.ks=http://h/k.ks quiet") == "http://h/k.ks"
    assert installer.kernel_argument("inst.ks", "inst.ks2=x inst.ks=") is None


def test_a_kickstart_that_cannot_be_fetched_fails_with_one_line(tmp_path, commands, capsys):
    cmdline = tmp_path / "cmdline"
    cmdline.write_text(f"inst.ks={(tmp_path / 'missing.ks').as_uri()}\n")
    assert installer.main(cmdline, tmp_path / "work") == 1
    out = capsys.readouterr().out
    assert "installer: FAILED: missing:" in out and commands == []


def test_a_partition_missing_after_partitioning_is_an_error_naming_it(rendered, commands, tmp_path):
    plan = installer.read(rendered["compute1"].replace("sdb", "sdx"), "compute1.ks")  # lsblk shows sdx bare
    setup = installer.Installer(plan, uefi=True, workdir=tmp_path, target=tmp_path / "t", say=lambda _: None)
    with pytest.raises(installer.InstallError, match=r"/dev/sdx: partition pv.data \(ks-pv.data\) not found"):
        setup.partition()


def test_a_failed_step_leaves_nothing_mounted(rendered, commands, monkeypatch, tmp_path):
    recording = installer.run

    def failing_run(argv, **options):
        result = recording(argv, **options)
        if argv[0] == "mkfs.ext4":
            raise CommandFailed([str(a) for a in argv], 1, "no space left on device")
        return result

    monkeypatch.setattr(installer, "run", failing_run)
    plan = plan_for(tmp_path, rendered["compute1"], b"image")
    work = tmp_path / "ram"
    work.mkdir()
    setup = installer.Installer(plan, uefi=True, workdir=work, target=tmp_path / "t", say=lambda _: None)
    with pytest.raises(CommandFailed, match="no space left"):
        setup.install()
    assert commands[-1] == ["umount", "--recursive", str(tmp_path / "t")]
    assert list(work.iterdir()) == []  # the fetched image is not kept either


def test_labels_what_changed_after_the_unpack_from_the_images_contexts(rendered, commands, monkeypatch, tmp_path):
    """A real tree and a real find: what was written after the unpack is labelled, each directory
    once (setfiles recurses), with each file system's lost+found; not the unpacked tree, the
    installer's dev, proc and sys, or the FAT ESP."""
    plan = installer.read(rendered["compute1"], "compute1.ks")
    target, work = tmp_path / "t", tmp_path / "ram"
    work.mkdir()
    setup = installer.Installer(plan, uefi=True, workdir=work, target=target, say=lambda _: None)
    for old in ("usr/bin/tool", "etc/old.conf", "lost+found/.keep", "var/lib/libvirt/images/lost+found/.keep"):
        (target / old).parent.mkdir(parents=True, exist_ok=True)
        (target / old).write_text("unpacked\n")
    for directory in ("dev", "proc", "sys", "boot/efi/EFI", "boot/grub"):
        (target / directory).mkdir(parents=True)
    time.sleep(0.05)
    setup.unpacked_stamp.touch()
    time.sleep(0.05)
    for new in ("etc/fstab", "etc/post.d/a", "etc/post.d/b", "boot/grub/grub.cfg", "dev/null", "proc/1",
                "boot/efi/EFI/BOOT/BOOTX64.EFI"):
        (target / new).parent.mkdir(parents=True, exist_ok=True)
        (target / new).write_text("written\n")
    (target / "etc/old.conf").chmod(0o600)
    listed: list[str] = []

    def real_find(argv, **options):
        if argv[0] == "find":
            return subprocess.run([str(arg) for arg in argv], capture_output=True, text=True, check=True)
        listed.extend(Path(argv[-1]).read_text().splitlines())
        return commands_run(argv, **options)

    commands_run = installer.run
    monkeypatch.setattr(installer, "run", real_find)
    setup.relabel()
    [setfiles] = commands
    excluded = [str(target / path) for path in ("dev", "proc", "sys", "boot/efi")]
    assert setfiles[:-3] == ["setfiles", "-F", *(arg for path in excluded for arg in ("-e", path)), "-r", str(target)]
    assert setfiles[-3:-1] == [str(target / "etc/selinux/default/contexts/files/file_contexts"), "-f"]
    # etc/ itself changed (new entries), so setfiles is given it and labels all inside it.
    assert listed == [str(target / path)
                      for path in ("boot/grub", "etc", "lost+found", "var/lib/libvirt/images/lost+found")]
    assert not Path(setfiles[-1]).exists()


def test_outermost_drops_paths_inside_another_on_the_same_file_system():
    paths = [Path(p) for p in ("/t/etc/a", "/t/etc", "/t/etcetera", "/t/var/x/y", "/t/var/x", "/t/etc/b/c",
                               "/t", "/t/boot/grub", "/t/boot/grub/i386-pc/a.mod", "/t/boot/lost+found")]
    boot = Path("/t/boot")
    on_boot_fs = {path: 2 if path == boot or boot in path.parents else 1 for path in paths}
    assert installer.outermost(paths, on_boot_fs.__getitem__) == [Path("/t"), Path("/t/boot/grub"),
                                                                  Path("/t/boot/lost+found")]


def test_labels_come_after_post_so_what_it_wrote_is_labeled(rendered, monkeypatch, tmp_path):
    done = []
    setup = installer.Installer(installer.read(rendered["compute1"], "compute1.ks"), uefi=True, workdir=tmp_path,
                                target=tmp_path / "t", say=lambda _: None)
    for name in ("fetch_image", "unpack"):
        monkeypatch.setattr(setup, name, lambda image, name=name: done.append(name))
    for name in ("partition", "make_filesystems", "configure", "install_bootloader", "run_post", "relabel", "unmount"):
        monkeypatch.setattr(setup, name, lambda name=name: done.append(name))
    setup.install()
    assert done == ["fetch_image", "partition", "make_filesystems", "unpack", "configure", "install_bootloader",
                    "run_post", "relabel", "unmount"]


@pytest.mark.parametrize("has_cloud_init", [True, False], ids=["image with cloud-init", "image without"])
def test_an_installed_host_takes_no_cloud_init_seed(rendered, commands, tmp_path, has_cloud_init):
    """The kickstart gives the users and keys; a cidata or config-2 disk must give nothing."""
    target = tmp_path / "t"
    (target / "usr/share/zoneinfo/Etc").mkdir(parents=True)
    (target / "usr/share/zoneinfo/Etc/UTC").write_text("TZif")
    if has_cloud_init:
        (target / "etc/cloud").mkdir(parents=True)
    plan = installer.read(rendered["compute1"], "compute1.ks")
    setup = installer.Installer(plan, uefi=True, workdir=tmp_path, target=target, say=lambda _: None)
    setup.partition_devices = {part.role: f"/dev/sda{index}" for index, part in enumerate(plan.partitions, 1)}
    setup.configure()
    assert (target / "etc/cloud/cloud-init.disabled").is_file() == has_cloud_init
    assert (target / "etc/cloud").is_dir() == has_cloud_init  # nothing made for an image without it
