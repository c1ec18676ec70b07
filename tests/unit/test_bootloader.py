"""The BIOS boot sector and core.img block list, patched as grub-bios-setup does."""

import struct

from pipeline import bootloader, disk


def fake_tree(tmp_path):
    grub = tmp_path / "tree/usr/lib/grub/i386-pc"
    grub.mkdir(parents=True)
    boot = bytearray(range(256)) * 2
    boot[510:512] = b"\x55\xaa"
    (grub / "boot.img").write_bytes(bytes(boot))
    return tmp_path / "tree"


def test_bios_setup_keeps_partition_table_and_points_at_core(tmp_path):
    tree = fake_tree(tmp_path)
    image = tmp_path / "disk.raw"
    mbr = bytearray(512)
    mbr[0x1B8:0x1FE] = bytes([0xAB]) * (0x1FE - 0x1B8)  # disk signature + protective MBR entry
    image.write_bytes(bytes(mbr) + bytes(4 * 2**20))
    core = tmp_path / "core.img"
    core.write_bytes(bytes(512 * 3 + 100))  # pads to 4 sectors

    bootloader.bios_setup(image, tree, core, *disk.BIOS_BOOT)

    data = image.read_bytes()
    assert data[0x1B8:0x1FE] == bytes([0xAB]) * (0x1FE - 0x1B8)
    assert data[510:512] == b"\x55\xaa"
    assert struct.unpack_from("<Q", data, 0x5C)[0] == 2048
    assert data[0x66:0x68] == b"\x90\x90"
    start, sectors, segment = struct.unpack_from("<QHH", data, 2**20 + 512 - 12)
    assert (start, sectors, segment) == (2049, 3, 0x820)


def test_layout_fits_gpt_backup_and_is_aligned():
    layout = disk.new_layout(3 * 2**30)
    offset, size = layout.root
    assert offset == 130 * 2**20 and offset % 2**20 == 0
    assert offset + size <= layout.disk_size - disk.GPT_BACKUP
    assert len(layout.esp_uuid) == 9 and layout.esp_uuid[4] == "-"


def test_grub_config_carries_uuid_and_arguments(tmp_path):
    (tmp_path / "boot/grub").mkdir(parents=True)
    kernel = bootloader.Kernel("6.1.0-1-amd64", tmp_path / "boot/vmlinuz-6.1.0-1-amd64",
                               tmp_path / "boot/initrd.img-6.1.0-1-amd64")
    bootloader.write_config(tmp_path, kernel, "1234-uuid", ["security=selinux", "console=ttyS0,115200"])
    cfg = (tmp_path / "boot/grub/grub.cfg").read_text()
    assert "search --no-floppy --fs-uuid --set=root 1234-uuid" in cfg
    assert "linux /boot/vmlinuz-6.1.0-1-amd64 root=UUID=1234-uuid ro security=selinux console=ttyS0,115200" in cfg
    defaults = (tmp_path / "etc/default/grub.d/50-image-pipeline.cfg").read_text()
    assert 'GRUB_CMDLINE_LINUX="security=selinux console=ttyS0,115200"' in defaults


def test_grub_waits_for_no_menu(tmp_path):
    (tmp_path / "boot/grub").mkdir(parents=True)
    kernel = bootloader.Kernel("6.1.0-1-amd64", tmp_path / "boot/vmlinuz-6.1.0-1-amd64",
                               tmp_path / "boot/initrd.img-6.1.0-1-amd64")
    bootloader.write_config(tmp_path, kernel, "1234-uuid", [])
    assert "set timeout=0\n" in (tmp_path / "boot/grub/grub.cfg").read_text()
    assert "GRUB_TIMEOUT=0\n" in (tmp_path / "etc/default/grub.d/50-image-pipeline.cfg").read_text()


def test_modules_are_copied_without_the_prebuilt_loaders(tmp_path):
    for platform in bootloader.PLATFORMS:
        (tmp_path / "usr/lib/grub" / platform / "monolithic").mkdir(parents=True)
        (tmp_path / "usr/lib/grub" / platform / "normal.mod").write_bytes(b"mod")
        (tmp_path / "usr/lib/grub" / platform / "monolithic/grubx64.efi").write_bytes(b"efi")
    bootloader.install_modules(tmp_path)
    for platform in bootloader.PLATFORMS:
        assert (tmp_path / "boot/grub" / platform / "normal.mod").read_bytes() == b"mod"
        assert not (tmp_path / "boot/grub" / platform / "monolithic").exists()


def test_the_graphical_menus_font_is_left_out_of_boot(tmp_path):
    for platform in bootloader.PLATFORMS:
        (tmp_path / "usr/lib/grub" / platform).mkdir(parents=True)
    (tmp_path / "boot/grub").mkdir(parents=True)
    (tmp_path / bootloader.GRUB_FONT).write_bytes(b"font")
    bootloader.install_modules(tmp_path)
    assert not (tmp_path / bootloader.GRUB_FONT).exists()
