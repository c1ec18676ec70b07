"""The offline check's parsers, on good and bad inputs. No libguestfs, no image, no root."""

from __future__ import annotations

import stat
import struct
import uuid
import zlib

import pytest

from pipeline.check.parsers import (
    GPT_BIOS_BOOT,
    GPT_ESP,
    GPT_ROOT_X86_64,
    FileEntry,
    by_directory,
    cloud_datasources,
    fstab_uuid,
    grub_linux_args,
    label_sample,
    parse_blkid_export,
    parse_env_file,
    parse_find_listing,
    parse_fstab,
    parse_gpt,
    parse_label_listing,
    passwd_problems,
    selinux_type,
    shadow_problems,
    sshd_effective,
    sshd_include_patterns,
    unit_install_links,
    unlabeled_names,
)
from pipeline.manifest import parse_dpkg_status

# --- dpkg status

STATUS = """\
Package: openssh-server
Status: install ok installed
Priority: optional
Version: 1:9.2p1-2+deb12u3
Description: secure shell (SSH) server
 A long description
 Status: install ok installed

Package: tuned
Status: deinstall ok config-files
Version: 2.19.0-2

Package: grub-pc
Status: hold ok installed
Version: 2.06-13

Package: cloud-init
Status: install reinstreq half-installed
Version: 22.4.2-1

Package: systemd
Status: install ok unpacked
Version: 252.30-1
"""


def test_dpkg_status_keeps_only_installed_packages():
    assert parse_dpkg_status(STATUS) == {"openssh-server": "1:9.2p1-2+deb12u3", "grub-pc": "2.06-13"}


def test_dpkg_status_ignores_status_text_in_a_description():
    text = "Package: tuned\nStatus: deinstall ok config-files\nDescription: x\n Status: install ok installed\n"
    assert parse_dpkg_status(text) == {}


def test_dpkg_status_empty():
    assert parse_dpkg_status("") == {}

# --- fstab

FSTAB = """\
# Written by the image pipeline
UUID=07d6742e-6dca-47ba-a292-ae321158a78d / ext4 defaults,errors=remount-ro 0 1
UUID=CD93-F34C /boot/efi vfat umask=0077,nofail 0 2   # ESP
LABEL=data /srv/my\\040data ext4
"""


def test_fstab_parses_entries_and_unescapes():
    entries = parse_fstab(FSTAB)
    assert [e.mountpoint for e in entries] == ["/", "/boot/efi", "/srv/my data"]
    assert entries[1].fstype == "vfat" and entries[1].options == "umask=0077,nofail"
    assert entries[2].options == "defaults"


def test_fstab_rejects_a_short_line():
    with pytest.raises(ValueError, match="line 2"):
        parse_fstab("# c\nUUID=abc /\n")


def test_fstab_uuid_is_case_insensitive():
    assert fstab_uuid("UUID=CD93-F34C") == "cd93-f34c"
    assert fstab_uuid('uuid="abc"') == "abc"
    assert fstab_uuid("LABEL=root") is None
    assert fstab_uuid("/dev/sda3") is None


# --- shadow and passwd


def test_locked_accounts_pass():
    assert shadow_problems("root:!*:20782:0:99999:7:::\nsshd:!:20782::::::\nbin:*:1::::::\n") == []


def test_locked_hash_passes():
    assert shadow_problems("root:!$6$salt$hash:20782:0:99999:7:::\n") == []


def test_empty_shadow_password_fails():
    problems = shadow_problems("root:!*:1::::::\nadmin::20782:0:99999:7:::\n")
    assert problems == ["admin: empty password (no password needed)"]


def test_usable_hash_fails():
    assert shadow_problems("root:$6$salt$hash:20782:0:99999:7:::\n") == ["root: usable password hash"]


def test_malformed_shadow_line_fails():
    assert shadow_problems("garbage\n") == ["line 1 is malformed"]


def test_passwd_fields():
    good = "root:x:0:0:root:/root:/bin/bash\nnobody:*:65534:65534::/:/usr/sbin/nologin\n"
    assert passwd_problems(good) == []
    assert passwd_problems("root::0:0::/root:/bin/bash\n") == ["root: empty password in /etc/passwd"]
    assert passwd_problems("root:$6$x$y:0:0::/root:/bin/bash\n") == ["root: password hash in /etc/passwd"]


# --- sshd

DEBIAN_SSHD = """\
# This is the sshd server system-wide configuration file.
Include /etc/ssh/sshd_config.d/*.conf

#PasswordAuthentication yes
KbdInteractiveAuthentication no
UsePAM yes
"""


def test_sshd_include_at_top_wins_over_the_main_file():
    files = {"/etc/ssh/sshd_config.d/50-kvm-base.conf": "PasswordAuthentication no\n"}
    options = sshd_effective(DEBIAN_SSHD, files)
    assert options["passwordauthentication"].value == "no"
    assert options["passwordauthentication"].source == "/etc/ssh/sshd_config.d/50-kvm-base.conf"
    assert options["kbdinteractiveauthentication"].value == "no"
    assert options["kbdinteractiveauthentication"].source == "/etc/ssh/sshd_config"


def test_sshd_dropin_yes_before_the_main_files_no_makes_it_yes():
    main = "Include /etc/ssh/sshd_config.d/*.conf\nPasswordAuthentication no\n"
    files = {"/etc/ssh/sshd_config.d/10-cloud.conf": "PasswordAuthentication yes\n"}
    assert sshd_effective(main, files)["passwordauthentication"].value == "yes"


def test_sshd_dropins_in_lexical_order_first_wins():
    main = "Include /etc/ssh/sshd_config.d/*.conf\n"
    files = {"/etc/ssh/sshd_config.d/50-kvm-base.conf": "PasswordAuthentication no\n",
             "/etc/ssh/sshd_config.d/10-bad.conf": "passwordauthentication=yes\n"}
    option = sshd_effective(main, files)["passwordauthentication"]
    assert (option.value, option.source) == ("yes", "/etc/ssh/sshd_config.d/10-bad.conf")


def test_sshd_unset_means_the_default_yes():
    options = sshd_effective("UsePAM yes\n", {})
    assert options["passwordauthentication"].value == "yes"
    assert options["passwordauthentication"].source == "default"
    assert options["permitemptypasswords"].value == "no"


def test_sshd_match_blocks_set_no_global_value():
    main = "Match User backup\n  PasswordAuthentication no\nMatch all\nKbdInteractiveAuthentication no\n"
    options = sshd_effective(main, {})
    assert options["passwordauthentication"].value == "yes"
    assert options["kbdinteractiveauthentication"].value == "no"


def test_sshd_match_in_an_included_file_ends_with_it():
    main = "Include sshd_config.d/*.conf\nPasswordAuthentication no\n"
    files = {"/etc/ssh/sshd_config.d/a.conf": "Match Address 10.0.0.0/8\nPasswordAuthentication yes\n"}
    assert sshd_effective(main, files)["passwordauthentication"].value == "no"


def test_sshd_challenge_response_is_the_old_name_of_kbd_interactive():
    options = sshd_effective("ChallengeResponseAuthentication yes\nKbdInteractiveAuthentication no\n", {})
    assert options["kbdinteractiveauthentication"].value == "yes"


def test_sshd_wildcard_does_not_cross_a_slash():
    main = "Include /etc/ssh/sshd_config.d/*.conf\n"
    files = {"/etc/ssh/sshd_config.d/sub/x.conf": "PasswordAuthentication yes\n"}
    assert sshd_effective(main, files)["passwordauthentication"].source == "default"


def test_sshd_include_patterns_are_made_absolute():
    text = "# Include /nope\nInclude /etc/ssh/sshd_config.d/*.conf extra.conf\n"
    assert sshd_include_patterns(text) == ["/etc/ssh/sshd_config.d/*.conf", "/etc/ssh/extra.conf"]


def test_sshd_include_loop_is_refused():
    files = {"/etc/ssh/loop.conf": "Include /etc/ssh/loop.conf\n"}
    with pytest.raises(ValueError, match="too deep"):
        sshd_effective("Include loop.conf\n", files)


# --- grub.cfg, env files, cloud-init

GRUB_CFG = """\
search --no-floppy --fs-uuid --set=root 07d6742e
menuentry 'Debian GNU/Linux' {
  linux /boot/vmlinuz-6.1.0-56-cloud-amd64 root=UUID=07d6742e ro security=selinux console=ttyS0,115200
  initrd /boot/initrd.img-6.1.0-56-cloud-amd64
}
menuentry 'second' {
  linux /boot/vmlinuz-other root=/dev/sda3
}
"""


def test_grub_first_linux_line():
    args = grub_linux_args(GRUB_CFG)
    assert args[0] == "/boot/vmlinuz-6.1.0-56-cloud-amd64"
    assert "root=UUID=07d6742e" in args and "console=ttyS0,115200" in args


def test_grub_without_linux_line():
    with pytest.raises(ValueError):
        grub_linux_args("set timeout=1\n")


def test_env_file_unquotes_and_skips_comments():
    text = 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n# SELINUX=disabled\nVERSION_ID="12"\nSELINUX=enforcing\n'
    values = parse_env_file(text)
    assert values == {"PRETTY_NAME": "Debian GNU/Linux 12 (bookworm)", "VERSION_ID": "12", "SELINUX": "enforcing"}


def test_cloud_datasources_last_file_wins():
    texts = [("/etc/cloud/cloud.cfg", "datasource_list: [Ec2]\nusers: [default]\n"),
             ("/etc/cloud/cloud.cfg.d/05_logging.cfg", "_log: []\n"),
             ("/etc/cloud/cloud.cfg.d/91-dib.cfg", "datasource_list: [  NoCloud, ConfigDrive, OpenStack, None ]\n")]
    assert cloud_datasources(texts) == ["NoCloud", "ConfigDrive", "OpenStack", "None"]


def test_cloud_datasources_unset_and_invalid():
    assert cloud_datasources([("a.cfg", "# nothing\n")]) is None
    with pytest.raises(ValueError, match=r"b\.cfg"):
        cloud_datasources([("b.cfg", "datasource_list: [unclosed\n")])


# --- GPT


def _guid_bytes(text: str) -> bytes:
    return uuid.UUID(text).bytes_le


def make_gpt(partitions: list[tuple[str, int, int, str]], corrupt: bool = False) -> bytes:
    """The first 34 sectors of a disk: protective MBR, GPT header, 128 entries."""
    entries = bytearray(128 * 128)
    for index, (type_guid, first, last, name) in enumerate(partitions):
        entry = (_guid_bytes(type_guid) + uuid.uuid4().bytes + struct.pack("<QQQ", first, last, 0)
                 + name.encode("utf-16-le").ljust(72, b"\0"))
        entries[index * 128:(index + 1) * 128] = entry
    header = bytearray(92)
    header[:8] = b"EFI PART"
    struct.pack_into("<IIIIQQQQ", header, 8, 0x10000, 92, 0, 0, 1, 6291422, 34, 6291422)
    header[56:72] = uuid.uuid4().bytes
    struct.pack_into("<QIII", header, 72, 2, 128, 128, zlib.crc32(entries))
    struct.pack_into("<I", header, 16, zlib.crc32(header))
    if corrupt:
        entries[0] ^= 0xFF
    mbr = bytearray(512)
    mbr[510:] = b"\x55\xaa"
    return bytes(mbr) + bytes(header).ljust(512, b"\0") + bytes(entries)


def test_gpt_partitions():
    data = make_gpt([(GPT_BIOS_BOOT, 2048, 4095, "bios-boot"),
                     (GPT_ESP, 4096, 266239, "esp"),
                     (GPT_ROOT_X86_64, 266240, 6289407, "root")])
    parts = parse_gpt(data)
    assert [(p.number, p.type_guid, p.first_lba, p.name) for p in parts] == [
        (1, GPT_BIOS_BOOT, 2048, "bios-boot"),
        (2, GPT_ESP, 4096, "esp"),
        (3, GPT_ROOT_X86_64, 266240, "root")]


def test_gpt_bad_inputs():
    with pytest.raises(ValueError, match="no GPT"):
        parse_gpt(bytes(34 * 512))
    with pytest.raises(ValueError, match="entries CRC"):
        parse_gpt(make_gpt([(GPT_ESP, 4096, 266239, "esp")], corrupt=True))
    good = make_gpt([(GPT_ESP, 4096, 266239, "esp")])
    with pytest.raises(ValueError, match="header CRC"):
        parse_gpt(good[:520] + b"X" + good[521:])
    with pytest.raises(ValueError, match="past"):
        parse_gpt(good[:4096])


# --- SELinux labels


def test_selinux_type():
    assert selinux_type(b"system_u:object_r:sshd_exec_t:s0\0") == "sshd_exec_t"
    assert selinux_type("system_u:object_r:etc_t:s0") == "etc_t"
    assert selinux_type(None) is None
    assert selinux_type(b"garbage\0") is None


def test_unlabeled_names_from_lxattrlist():
    xattrs = [
        {"attrname": "", "attrval": b"1\0"},
        {"attrname": "security.selinux", "attrval": b"system_u:object_r:etc_t:s0\0"},
        {"attrname": "", "attrval": b"0\0"},
        {"attrname": "", "attrval": b"2\0"},
        {"attrname": "user.comment", "attrval": b"x"},
        {"attrname": "security.selinux", "attrval": b"system_u:object_r:bin_t:s0\0"},
        {"attrname": "", "attrval": b"1\0"},
        {"attrname": "user.comment", "attrval": b"x"},
        {"attrname": "", "attrval": b""},  # libguestfs could not read this one's xattrs
    ]
    assert unlabeled_names(["a", "b", "c", "d", "e"], xattrs) == ["b", "d", "e"]


def test_unlabeled_names_short_answer():
    with pytest.raises(ValueError):
        unlabeled_names(["a", "b"], [{"attrname": "", "attrval": b"0\0"}])


def test_label_sample_picks_tops_recursively_or_not():
    paths = ["/etc", "/etc/passwd", "/etc/ssh", "/etc/ssh/sshd_config", "/etcetera/x", "/usr", "/usr/bin",
             "/usr/bin/ls", "/usr/bin/x", "/usr/bin/x/y", "/var", "/var/lib", "/var/lib/dpkg",
             "/var/lib/dpkg/status", "/tmp/z"]
    sample = label_sample(paths, (("/etc", True), ("/usr/bin", False), ("/var/lib", False)))
    assert sample == {"/": ["etc"], "/usr": ["bin"], "/var": ["lib"], "/etc": ["passwd", "ssh"],
                      "/etc/ssh": ["sshd_config"], "/usr/bin": ["ls", "x"], "/var/lib": ["dpkg"]}


def test_find_answers_are_grouped_by_directory():
    assert by_directory("/", ["/etc", "/etc/passwd", "etc/ssh"]) == {"/": ["etc"], "/etc": ["passwd", "ssh"]}
    assert by_directory("/etc", ["/ssh", "/ssh/sshd_config"]) == {"/etc": ["ssh"], "/etc/ssh": ["sshd_config"]}


# --- systemd units

LIBVIRTD_INSTALL = """\
[Unit]
Description=libvirt legacy monolithic daemon
WantedBy=not-in-install.target

[Service]
ExecStart=/usr/sbin/libvirtd $LIBVIRTD_ARGS

[Install]
# a comment
WantedBy=multi-user.target
Also=virtlockd.socket
Also=virtlogd.socket
"""


def test_unit_install_links_from_the_install_section():
    assert unit_install_links("libvirtd.service", LIBVIRTD_INSTALL) == ["multi-user.target.wants/libvirtd.service"]


def test_unit_install_links_lists_add_and_an_empty_value_resets():
    text = ("[Install]\nWantedBy=multi-user.target network-online.target\nRequiredBy = a.target\n"
            "WantedBy=\nWantedBy=sockets.target\n")
    assert unit_install_links("x.socket", text) == ["sockets.target.wants/x.socket", "a.target.requires/x.socket"]


def test_unit_without_install_section_makes_no_links():
    assert unit_install_links("x.service", "[Unit]\nDescription=x\n[Service]\nExecStart=/bin/true\n") == []


# --- find -printf listing (the offline check's file list)


def test_find_listing_gives_each_paths_type_permissions_and_size():
    listing = "d 755 4096 /etc\nf 4755 62672 /usr/bin/su\nl 777 7 /bin\nf 644 0 /etc/a name\np 600 0 /run/fifo\n"
    assert parse_find_listing(listing) == [
        FileEntry("/etc", stat.S_IFDIR | 0o755, 4096), FileEntry("/usr/bin/su", stat.S_IFREG | 0o4755, 62672),
        FileEntry("/bin", stat.S_IFLNK | 0o777, 7), FileEntry("/etc/a name", stat.S_IFREG | 0o644, 0),
        FileEntry("/run/fifo", stat.S_IFIFO | 0o600, 0)]
    assert parse_find_listing("") == []


@pytest.mark.parametrize("listing", ["f 644 10 /etc/bad\nname\n", "f 644 /etc/no-size\n", "x 644 1 /odd-type\n",
                                     "f 644 1 relative\n", "f 8644 1 /not-octal\n"],
                         ids=["newline in a name", "no size", "unknown type", "relative path", "not octal"])
def test_find_listing_with_a_line_that_is_no_entry_is_refused(listing):
    with pytest.raises(ValueError, match="find listed a line that is not type, mode, size and path"):
        parse_find_listing(listing)


def test_label_listing_keeps_an_unlabeled_path_as_empty():
    listing = "system_u:object_r:etc_t:s0\t/etc\n\t/etc/new file\nsystem_u:object_r:bin_t:s0\t/usr/bin/ls\n"
    assert parse_label_listing(listing) == {"/etc": "system_u:object_r:etc_t:s0", "/etc/new file": "",
                                            "/usr/bin/ls": "system_u:object_r:bin_t:s0"}
    assert parse_label_listing("") == {}


def test_a_label_listing_line_without_a_path_is_an_error():
    with pytest.raises(ValueError, match="not a label and a path: 'broken'"):
        parse_label_listing("system_u:object_r:etc_t:s0\t/etc\nbroken\n")


def test_blkid_export_of_several_devices():
    text = ("DEVNAME=/dev/sda2\nLABEL_FATBOOT=ESP\nUUID=97AA-FF08\nTYPE=vfat\n\n"
            "DEVNAME=/dev/sda3\nLABEL=my\\ root\nUUID=e833b020-3ac9-547f-9aa8-cbe84db4471b\nTYPE=ext4\n")
    found = parse_blkid_export(text)
    assert found["/dev/sda2"]["UUID"] == "97AA-FF08" and found["/dev/sda2"]["TYPE"] == "vfat"
    assert found["/dev/sda3"]["LABEL"] == "my root" and found["/dev/sda3"]["TYPE"] == "ext4"
    assert parse_blkid_export("") == {}


@pytest.mark.parametrize("text, error", [("DEVNAME=/dev/sda2\nnot a tag\n", "not KEY=value: 'not a tag'"),
                                         ("UUID=97AA-FF08\nTYPE=vfat\n", "without a DEVNAME")])
def test_blkid_export_that_is_not_is_an_error(text, error):
    with pytest.raises(ValueError, match=error):
        parse_blkid_export(text)
