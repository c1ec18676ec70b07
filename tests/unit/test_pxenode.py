"""The PXE boot test's pure parts: the access log, the kernel's command line on the console, what
a boot got wrong; and the boot's deadline and QEMU's exit, with a fake QEMU. No root, no network."""

import dataclasses
from pathlib import Path

import pytest

from pipeline import qemu
from pipeline.deploy import inventory, pxe, pxenode, serve
from pipeline.deploy.inventory import Loader
from pipeline.errors import PipelineError
from pipeline.paths import SPEC_FILE
from pipeline.qemu import Firmware

BASE = "http://10.0.2.2:41234"
BIOS_SCRIPT, UEFI_SCRIPT = "/ipxe/01-52-54-00-7e-00-01.ipxe", "/ipxe/01-52-54-00-7e-00-02.ipxe"
OWN_FILES = ["/boot.ipxe", BIOS_SCRIPT, "/installer/installer.vmlinuz", "/installer/installer.initrd"]
BIOS_ARGS = (f"inst.ks={BASE}/kickstarts/pxe-bios.ks", "BOOTIF=01-52-54-00-7e-00-01", "console=ttyS0,115200")
# The start of a real console (OVMF's colours, iPXE's progress, then the kernel), as QEMU wrote it.
UEFI_CONSOLE = (
    "\x1b[2J\x1b[01;01H\x1b[=3h\x1b[2J\x1b[01;01HBdsDxe: starting Boot0001\r\n"
    "iPXE initialising devices...ok\r\n"
    "http://10.0.2.2:41234/installer/installer.initrd... 82%\r\x1b[K\r\n"
    "EFI stub: Loaded initrd from command line option\r\n"
    "[    0.000000] Linux version 6.1.0-28-amd64 (debian-kernel@lists.debian.org)\r\n"
    f"[    0.000000] Command line: installer.vmlinuz initrd=installer.initrd "
    f"inst.ks={BASE}/kickstarts/pxe-uefi.ks console=tty0 console=ttyS0,115200\r\n"
    "[    0.000000] BIOS-provided physical RAM map:\r\n"
)


def log_line(path: str, status: int | str = 200, method: str = "GET") -> str:
    return f"2026-11-25T10:45:12 127.0.0.1 {method} {path} {status}\n"


@pytest.fixture
def tree(tmp_path) -> pxe.Tree:
    """The test inventory's nodes, as a tree would boot them (nothing rendered: no build needed)."""
    loaded = inventory.load(pxenode.write_inventory(tmp_path / "inventory.toml", "host-image", SPEC_FILE, BASE))
    return pxe.Tree(tmp_path / "tree", tuple(pxe.node_boot(loaded, node) for node in loaded.nodes.values()))


def result(requests: list[str], args: tuple[str, ...] = BIOS_ARGS) -> pxenode.BootResult:
    return pxenode.BootResult("pxe-bios", Firmware.BIOS, 13.4, args,
                              pxenode.parse_access_log("".join(requests)), Path("console-bios.log"))


def test_the_test_inventory_has_a_node_per_firmware_with_its_own_mac(tree):
    nodes = {boot.node.name: boot.node for boot in tree.boots}
    assert {name: (node.boot, node.boot_mac) for name, node in nodes.items()} == {
        "pxe-bios": ("bios", "52:54:00:7e:00:01"), "pxe-uefi": ("uefi", "52:54:00:7e:00:02")}
    assert pxenode.own_files(tree, "pxe-bios") == OWN_FILES


def test_parse_access_log():
    text = log_line("/boot.ipxe") + log_line("/nope", 404) + "garbage\n" + log_line("/x", "-", "HEAD")
    assert pxenode.parse_access_log(text) == (
        pxenode.Request("2026-11-25T10:45:12", "127.0.0.1", "GET", "/boot.ipxe", 200),
        pxenode.Request("2026-11-25T10:45:12", "127.0.0.1", "GET", "/nope", 404),
        pxenode.Request("2026-11-25T10:45:12", "127.0.0.1", "HEAD", "/x", "-"),
    )


def test_command_line_from_a_uefi_console():
    # iPXE on UEFI puts the kernel's name first; the EFI stub reads initrd=.
    assert pxenode.command_line(UEFI_CONSOLE) == (
        "installer.vmlinuz", "initrd=installer.initrd", f"inst.ks={BASE}/kickstarts/pxe-uefi.ks",
        "console=tty0", "console=ttyS0,115200")


@pytest.mark.parametrize("console", [
    "",
    "[    0.000000] Command line: initrd=installer.initrd inst.ks=http://10.0",  # still being written
    "[    1.234567] Kernel command line: inst.ks=x\n",  # a later line, not the kernel's first
])
def test_no_command_line_yet(console):
    assert pxenode.command_line(console) is None


def test_console_tail_drops_escapes_and_blank_lines():
    assert pxenode.console_tail("\x1b[2J\x1b[01;01HBdsDxe: x\r\n\r\n\niPXE ok\r\nlast\r\n", 2) == "iPXE ok | last"
    assert pxenode.console_tail("") == "(nothing)"


def test_a_boot_that_got_its_own_files_has_no_problems(tree):
    assert pxenode.problems(tree, result([log_line(path) for path in OWN_FILES])) == ()


def test_problems_name_what_the_boot_got_wrong(tree):
    requests = [log_line("/boot.ipxe"), log_line(UEFI_SCRIPT), log_line(BIOS_SCRIPT, 404),
                log_line("/installer/installer.vmlinuz")]
    args = (f"inst.ks={BASE}/kickstarts/pxe-uefi.ks", "console=ttyS0")
    assert pxenode.problems(tree, result(requests, args)) == (
        f"{BIOS_SCRIPT}: status 404",
        "/installer/installer.initrd: not fetched",
        f"fetched node 'pxe-uefi''s {UEFI_SCRIPT[1:]}",
        f"the kernel command line has node 'pxe-uefi''s inst.ks={BASE}/kickstarts/pxe-uefi.ks",
        f"the kernel command line has inst.ks {BASE}/kickstarts/pxe-uefi.ks, not {BASE}/kickstarts/pxe-bios.ks",
    )


def test_a_command_line_without_a_kickstart_is_a_problem(tree):
    found = pxenode.problems(tree, result([log_line(path) for path in OWN_FILES], ("console=ttyS0",)))
    assert found == (f"the kernel command line has inst.ks none, not {BASE}/kickstarts/pxe-bios.ks",)


def test_a_site_of_an_image_not_built_says_so_and_leaves_nothing(tmp_path):
    with pytest.raises(PipelineError, match=r"^role 'host-image': .* run ./inv build host-image$"), \
            pxenode.serving_site("host-image", SPEC_FILE, tmp_path / "build", tmp_path / "build/host-image/pxe"):
        pass
    assert not (tmp_path / "build/host-image/pxe").exists()


# --- the boot, with a fake QEMU: what it writes to the serial console is the test's to choose


@pytest.fixture
def site(tree, tmp_path, monkeypatch) -> pxenode.Site:
    monkeypatch.setattr(qemu, "accelerator", lambda: ("tcg", "max"))
    rom = tmp_path / "efi-virtio.rom"
    rom.write_bytes(b"rom")
    monkeypatch.setattr(pxenode, "NIC_ROM", str(rom))
    tree.root.mkdir(parents=True)
    (tree.directory / serve.ACCESS_LOG).write_text(log_line(UEFI_SCRIPT))  # an earlier boot's: not this one's
    return pxenode.Site(tree, BASE, tmp_path / "work")


def fake_qemu(tmp_path: Path, monkeypatch, then: str) -> None:
    """A qemu-system-x86_64 that logs the node's requests as our server would, then does `then`
    (Python, with `console` the serial console's path)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "qemu-system-x86_64"
    script.write_text(f"""#!/usr/bin/env python3
import os, re, sys, time
argv = sys.argv[1:]
console = next(arg[5:] for arg in argv if arg.startswith("file:"))
root = re.search("tftp=([^,]+)", next(arg for arg in argv if arg.startswith("user,"))).group(1)
with open(os.path.dirname(root) + "/access.log", "a") as log:  # beside the served root
    log.write({"".join(log_line(path) for path in OWN_FILES)!r})
{then}
""")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{Path(__import__('sys').executable).parent}:/usr/bin:/bin")


def test_boot_returns_at_the_kernel_command_line_with_this_boots_requests(site, tmp_path, monkeypatch):
    line = f"[    0.000000] Command line: initrd=installer.initrd {' '.join(BIOS_ARGS)}\\r\\n"
    fake_qemu(tmp_path, monkeypatch, f"open(console, 'w').write('SeaBIOS\\r\\n{line}')\ntime.sleep(60)")
    site.workdir.mkdir()
    booted = pxenode.boot(site, Firmware.BIOS, deadline=20)
    assert booted.command_line == ("initrd=installer.initrd", *BIOS_ARGS)
    assert [request.path for request in booted.requests] == OWN_FILES
    assert 0 < booted.seconds < 20 and booted.console == site.workdir / "console-bios.log"
    assert pxenode.problems(site.tree, booted) == ()


def test_boot_deadline_names_the_requests_and_the_last_console_lines(site, tmp_path, monkeypatch):
    fake_qemu(tmp_path, monkeypatch, "open(console, 'w').write('iPXE ok\\r\\nboot: no such file\\r\\n')\n"
                                     "time.sleep(60)")
    site.workdir.mkdir()
    with pytest.raises(PipelineError, match=r"^pxe-bios \(bios\): no kernel command line on the console within "
                                            r"1 s; requests: /boot.ipxe .*initrd; last console lines: iPXE ok \| "
                                            r"boot: no such file$"):
        pxenode.boot(site, Firmware.BIOS, deadline=1)


def test_boot_notices_that_qemu_exited(site, tmp_path, monkeypatch):
    fake_qemu(tmp_path, monkeypatch, "print('qemu: could not load ROM', file=sys.stderr)\nsys.exit(1)")
    site.workdir.mkdir()
    with pytest.raises(PipelineError, match=r"^pxe-uefi \(uefi\): QEMU ended \(exit 1\) before the kernel "
                                            r"ran; console: \(nothing\); see .*qemu-uefi.log$"):
        pxenode.boot(site, Firmware.UEFI, deadline=20)


def test_qemu_boots_the_nodes_mac_from_the_sites_url(site, tmp_path):
    site.workdir.mkdir()
    argv = pxenode.qemu_argv(Firmware.UEFI, "52:54:00:7e:00:02", site, tmp_path / "console.log")
    assert argv[argv.index("-netdev") + 1] == f"user,id=n0,tftp={site.tree.root},bootfile={BASE}/boot.ipxe"
    assert argv[argv.index("-device") + 1] == "virtio-net-pci,netdev=n0,mac=52:54:00:7e:00:02,bootindex=1"
    assert "-no-reboot" in argv and "-drive" in argv  # a panic ends QEMU; OVMF's flash
    assert "-drive" not in pxenode.qemu_argv(Firmware.BIOS, "52:54:00:7e:00:01", site, tmp_path / "console.log")


def test_qemu_boots_pxelinux_or_grub_by_tftp(site, tmp_path):
    site = dataclasses.replace(site, loader=Loader.PXELINUX_GRUB)
    site.workdir.mkdir()
    for firmware, boot_file in ((Firmware.BIOS, "pxelinux.0"), (Firmware.UEFI, "grubnetx64.efi")):
        argv = pxenode.qemu_argv(firmware, "52:54:00:7e:00:01", site, tmp_path / "console.log")
        assert argv[argv.index("-netdev") + 1] == f"user,id=n0,tftp={site.tree.root},bootfile={boot_file}"


def test_pxelinux_and_grub_fetch_nothing_over_http_and_show_themselves_on_the_console(tree):
    assert pxenode.own_files(tree, "pxe-bios", Loader.PXELINUX_GRUB) == []
    assert pxenode.own_console_lines(tree, "pxe-bios", Loader.IPXE) == []
    assert pxenode.own_console_lines(tree, "pxe-bios", Loader.PXELINUX_GRUB) == [
        "PXELINUX ", "Loading installer/installer.vmlinuz"]
    assert pxenode.own_console_lines(tree, "pxe-uefi", Loader.PXELINUX_GRUB) == [
        "Welcome to GRUB!", "Installing pxe-uefi (role host-image)"]


def test_a_pxelinux_boot_is_proved_by_its_console(tree):
    console = ("PXELINUX 6.04 PXE 20200816 Copyright (C) 1994-2015 H. Peter Anvin et al\n"
               "Loading installer/installer.vmlinuz... ok\nLoading host-image/installer.initrd...ok\n")
    booted = dataclasses.replace(result([]), loader=Loader.PXELINUX_GRUB, console_text=console)
    assert pxenode.problems(tree, booted) == ()
    # The same boot without pxelinux's lines on the console (iPXE booted it, say).
    assert pxenode.problems(tree, dataclasses.replace(booted, console_text="iPXE ok\n")) == (
        "the console never showed 'PXELINUX '",
        "the console never showed 'Loading installer/installer.vmlinuz'")
