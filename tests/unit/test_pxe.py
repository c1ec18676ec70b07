"""The PXE tree: rendered from an inventory and fake build artifacts, served on loopback, and walked
by `check` as booting nodes would. No root, no network but loopback (the dnsmasq test needs root)."""

import dataclasses
import hashlib
import json
import os
import shutil
import socket
import struct
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pipeline import tools
from pipeline.deploy import inventory, pxe, serve
from pipeline.errors import InventoryError, PipelineError, ToolMissing
from pipeline.paths import ROOT
from pipeline.run import run

EXAMPLE = ROOT / "kickstarts" / "inventory.example.toml"
SITE = "http://10.0.0.1:8080"  # the example's base_url
COMPUTE1, COMPUTE2, GUEST1 = "01-52-54-00-12-34-01", "01-52-54-00-12-34-02", "01-52-54-00-12-34-03"
ROLES = ("host-image", "guest-image")
SITE_PXE = '[site.pxe]\ninterface = "eth1"\nsubnet = "10.0.0.0/24"\nloader = "pxelinux-grub"'
DNSMASQ = shutil.which("dnsmasq", path=os.environ.get("PATH", "") + ":/usr/sbin")
no_dnsmasq = pytest.mark.skipif(not DNSMASQ, reason="dnsmasq (Debian package dnsmasq-base) is not installed")
TREE = sorted([  # what is served
    "boot.ipxe",
    "grubnetx64.efi", "ipxe.efi", "ldlinux.c32", "pxelinux.0", "undionly.kpxe",
    f"ipxe/{COMPUTE1}.ipxe", f"ipxe/{COMPUTE2}.ipxe", f"ipxe/{GUEST1}.ipxe",
    "grub/grub.cfg", f"grub/grub.cfg-{COMPUTE1}", f"grub/grub.cfg-{GUEST1}",  # the UEFI nodes
    "pxelinux.cfg/default", f"pxelinux.cfg/{COMPUTE2}",  # the BIOS node
    "kickstarts/compute1.ks", "kickstarts/compute2.ks", "kickstarts/guest1.ks",
    "installer/installer.vmlinuz", "installer/installer.initrd",
    *(f"{role}/{role}.tar.gz" for role in ROLES),
])


def fake_build(build: Path) -> Path:
    """The installer's kernel and initrd, and each role's kernel, initrd and liveimg, a few bytes each,
    with a build-info.json holding its real sha256."""
    (build / "installer").mkdir(parents=True)
    for ext in ("vmlinuz", "initrd"):
        (build / "installer" / f"installer.{ext}").write_bytes(f"fake {ext} of the installer\n".encode() * 100)
    for role in ROLES:
        (build / role).mkdir(parents=True)
        for ext in ("vmlinuz", "initrd", "tar.gz"):
            (build / role / f"{role}.{ext}").write_bytes(f"fake {ext} of {role}\n".encode() * 100)
        digest = hashlib.sha256((build / role / f"{role}.tar.gz").read_bytes()).hexdigest()
        (build / role / "build-info.json").write_text(json.dumps({"sha256": {f"{role}.tar.gz": digest}}))
    return build


def example(tmp_path: Path, site: str = "", pxe_table: str = "", base_url: str = SITE) -> inventory.Inventory:
    """The example inventory, with more [site] fields and a [site.pxe] table."""
    text = EXAMPLE.read_text().replace(f'base_url = "{SITE}"', f'base_url = "{base_url}"\n{site}')
    text = text.replace("\n[node.compute1]\n", f"\n{pxe_table}\n[node.compute1]\n")
    path = tmp_path / "inventory.toml"
    path.write_text(text)
    return inventory.load(path)


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def line_of(path: Path, first_word: str) -> str:
    return next(line.strip() for line in path.read_text().splitlines() if line.strip().split()[:1] == [first_word])


@pytest.fixture
def build(tmp_path):
    return fake_build(tmp_path / "build")


@pytest.fixture
def fresh(tmp_path, build):
    """A tree of its own, to break."""
    return pxe.render_tree(example(tmp_path), tmp_path / "pxe", build_dir=build)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tree")
    return pxe.render_tree(example(tmp), tmp / "pxe", build_dir=fake_build(tmp / "build"))


@pytest.fixture(scope="module")
def server(tree):
    with serve.serving(tree.directory, echo=False) as url:
        yield url


def test_tree_layout(tree):
    assert listing(tree.root) == TREE
    # The servers' configurations beside the root, not in it; nothing else beside the tree (no work dir).
    assert sorted(p.name for p in tree.directory.iterdir()) == ["dnsmasq.conf", "nginx-site.conf", "pxe.json", "root"]
    assert sorted(p.name for p in tree.directory.parent.iterdir()) == ["build", "inventory.toml", "pxe"]
    built = [f"installer/installer.{ext}" for ext in ("vmlinuz", "initrd")] + [f"{r}/{r}.tar.gz" for r in ROLES]
    for name in built:  # hard links to the build's files, not copies
        assert (tree.root / name).stat().st_ino == (tree.directory.parent / "build" / name).stat().st_ino


def test_a_file_that_is_not_world_readable_is_copied(tmp_path, build):
    # dnsmasq, as root, serves only world-readable files; the build's own file is left as it is.
    built = build / "installer/installer.initrd"
    built.chmod(0o600)
    copy = pxe.render_tree(example(tmp_path), tmp_path / "pxe", build_dir=build).root / "installer/installer.initrd"
    assert copy.stat().st_ino != built.stat().st_ino and copy.read_bytes() == built.read_bytes()
    assert (copy.stat().st_mode & 0o777, built.stat().st_mode & 0o777) == (0o644, 0o600)


def test_boot_files_are_named_by_the_boot_mac():
    assert pxe.mac_name("52:54:00:AB:CD:EF") == "01-52-54-00-ab-cd-ef"  # as pxelinux and GRUB look it up


def test_manifest_names_each_nodes_files(tree):
    nodes = json.loads((tree.directory / "pxe.json").read_text())["nodes"]
    assert nodes["compute1"]["files"] == {"ipxe": f"ipxe/{COMPUTE1}.ipxe", "grub": f"grub/grub.cfg-{COMPUTE1}",
                                          "kickstart": "kickstarts/compute1.ks"}
    assert nodes["compute2"]["files"] == {"ipxe": f"ipxe/{COMPUTE2}.ipxe", "pxelinux": f"pxelinux.cfg/{COMPUTE2}",
                                          "kickstart": "kickstarts/compute2.ks"}


@pytest.mark.parametrize("node, config, kernel_word", [
    ("compute1", f"ipxe/{COMPUTE1}.ipxe", "kernel"),
    ("compute1", f"grub/grub.cfg-{COMPUTE1}", "linux"),
    ("compute2", f"ipxe/{COMPUTE2}.ipxe", "kernel"),
    ("compute2", f"pxelinux.cfg/{COMPUTE2}", "APPEND"),
    ("guest1", f"ipxe/{GUEST1}.ipxe", "kernel"),
    ("guest1", f"grub/grub.cfg-{GUEST1}", "linux"),
])
def test_the_kernel_command_line_carries_the_nodes_own_kickstart(tree, node, config, kernel_word):
    args = line_of(tree.root / config, kernel_word).split("||")[0].split()
    assert [a for a in args if a.startswith("inst.ks=")] == [f"inst.ks={SITE}/kickstarts/{node}.ks"]
    mac = json.loads((tree.directory / "pxe.json").read_text())["nodes"][node]["mac"]
    assert f"BOOTIF={pxe.mac_name(mac)}" in args and f"ifname=bootnet:{mac}" in args
    assert args[-2:] == ["console=tty0", "console=ttyS0,115200"]  # the image's consoles (images.toml)
    expected_ip = {"compute1": ["ip=10.0.0.11::10.0.0.1:255.255.255.0:compute1:bootnet:none", "nameserver=10.0.0.1"],
                   "compute2": ["ip=10.0.0.12::10.0.0.1:255.255.255.0:compute2:bootnet:none"],
                   "guest1": ["ip=bootnet:dhcp"]}[node]
    assert [a for a in args if a.startswith(("ip=", "nameserver="))] == expected_ip


def test_ipxe_scripts(tree):
    assert line_of(tree.root / "boot.ipxe", "chain") == "chain ipxe/01-${netX/mac:hexhyp}.ipxe || goto unknown"
    script = tree.root / f"ipxe/{COMPUTE1}.ipxe"
    assert script.read_text().startswith("#!ipxe\n")
    kernel = f"kernel {SITE}/installer/installer.vmlinuz initrd=installer.initrd "
    assert line_of(script, "kernel").startswith(kernel)
    assert line_of(script, "initrd") == f"initrd {SITE}/installer/installer.initrd || goto failed"
    assert line_of(script, "iseq") == "iseq ${platform} efi || goto wrong_firmware"  # compute1 is UEFI
    assert line_of(tree.root / f"ipxe/{COMPUTE2}.ipxe", "iseq").startswith("iseq ${platform} pcbios ")


def test_grub_and_pxelinux_read_the_kernel_by_tftp_from_the_same_root(tree):
    grub = tree.root / f"grub/grub.cfg-{COMPUTE1}"
    assert line_of(grub, "linux").startswith("linux /installer/installer.vmlinuz inst.ks=")
    assert line_of(grub, "initrd") == "initrd /installer/installer.initrd"
    pxelinux = tree.root / f"pxelinux.cfg/{COMPUTE2}"
    assert line_of(pxelinux, "KERNEL") == "KERNEL installer/installer.vmlinuz"
    assert line_of(pxelinux, "INITRD") == "INITRD installer/installer.initrd"
    # A machine not in the inventory is not installed: it boots the next device.
    assert line_of(tree.root / "grub/grub.cfg", "exit") == "exit"
    assert line_of(tree.root / "pxelinux.cfg/default", "LOCALBOOT") == "LOCALBOOT 0"
    # pxelinux writes to the kernel's serial console too; SERIAL must be its first directive.
    directives = [line for line in pxelinux.read_text().splitlines() if line and not line.startswith("#")]
    assert directives[0] == "SERIAL 0 115200"
    assert line_of(grub, "echo") == 'echo "Installing compute1 (role host-image)"'


@pytest.mark.parametrize("args, serial", [
    (("console=tty0", "console=ttyS0,115200"), (0, 115200)),
    (("console=ttyS1,57600n8", "console=tty0"), (1, 57600)),
    (("console=ttyS0",), (0, 9600)),
    (("console=ttyS0,115200", "console=ttyS1,9600"), (1, 9600)),  # the kernel's last console is its main one
    (("console=tty0", "console=ttyUSB0"), None),
])
def test_serial_console_of_the_kernel_args(tree, args, serial):
    boot = dataclasses.replace(tree.boots[0], args=args)
    assert boot.serial == serial


def test_boot_programs(tree):
    for name, source in pxe.PROGRAMS.items():
        assert (tree.root / name).read_bytes() == Path(source).read_bytes()
    assert (tree.root / pxe.GRUB_EFI).read_bytes()[:2] == b"MZ"  # a PE image, made by grub-mkimage


def conf_lines(tree: pxe.Tree) -> list[str]:
    lines = (tree.directory / "dnsmasq.conf").read_text().splitlines()
    return [line for line in lines if line and not line.startswith("#")]


def test_dnsmasq_conf_by_default(tree):
    assert conf_lines(tree) == [
        "port=0", "leasefile-ro",
        "dhcp-range=10.0.0.1,proxy",  # the network of base_url's address
        "log-dhcp", "enable-tftp", f"tftp-root={tree.root}",
        "dhcp-match=set:bios,option:client-arch,0",
        "dhcp-match=set:efi64,option:client-arch,7",
        "dhcp-match=set:efi64,option:client-arch,9",
        "dhcp-match=set:ipxe,175",
        f"dhcp-boot=tag:ipxe,{SITE}/boot.ipxe",
        "dhcp-boot=tag:!ipxe,tag:bios,undionly.kpxe",
        "dhcp-boot=tag:!ipxe,tag:efi64,ipxe.efi",
        'pxe-service=tag:!ipxe,x86PC,"Install (BIOS)",undionly.kpxe',
        'pxe-service=tag:!ipxe,BC_EFI,"Install (UEFI)",ipxe.efi',
        'pxe-service=tag:!ipxe,x86-64_EFI,"Install (UEFI)",ipxe.efi',
    ]


def test_dnsmasq_conf_from_site_pxe(tmp_path, build):
    lines = conf_lines(pxe.render_tree(example(tmp_path, pxe_table=SITE_PXE), tmp_path / "pxe", build_dir=build))
    assert lines[:5] == ["port=0", "leasefile-ro", "interface=eth1", "bind-interfaces",
                         "dhcp-range=10.0.0.0,proxy,255.255.255.0"]
    assert lines[-5:] == ["dhcp-boot=tag:bios,pxelinux.0", "dhcp-boot=tag:efi64,grubnetx64.efi",
                          'pxe-service=x86PC,"Install (BIOS)",pxelinux.0',
                          'pxe-service=BC_EFI,"Install (UEFI)",grubnetx64.efi',
                          'pxe-service=x86-64_EFI,"Install (UEFI)",grubnetx64.efi']
    assert not any("ipxe" in line for line in lines)


@no_dnsmasq
@pytest.mark.parametrize("pxe_table", ["", SITE_PXE])
def test_dnsmasq_accepts_the_conf(tmp_path, build, pxe_table):
    tree = pxe.render_tree(example(tmp_path, pxe_table=pxe_table), tmp_path / "pxe", build_dir=build)
    conf = tree.directory / "dnsmasq.conf"
    assert "syntax check OK" in run([DNSMASQ, "--test", f"--conf-file={conf}"], capture=True).stderr


def test_a_site_without_an_address_needs_a_subnet(tmp_path, build):
    loaded = example(tmp_path, base_url="http://pxe.example.com:8080")
    with pytest.raises(InventoryError) as caught:
        pxe.render_tree(loaded, tmp_path / "pxe", build_dir=build)
    assert str(caught.value).startswith(f"{loaded.path}: field 'site.pxe.subnet': is required: base_url's host "
                                        "'pxe.example.com' is not an IPv4 address")
    assert not (tmp_path / "pxe").exists()
    loaded = example(tmp_path, base_url="http://pxe.example.com:8080", pxe_table='[site.pxe]\nsubnet = "10.0.0.0/24"')
    assert "dhcp-range=10.0.0.0,proxy,255.255.255.0" in conf_lines(
        pxe.render_tree(loaded, tmp_path / "pxe", build_dir=build))


# --- serve and check


def get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_check_passes_against_a_loopback_server(tree, server):
    report = pxe.check(tree.directory, server)
    assert report.passed, [str(p) for p in report.problems]
    assert (report.nodes, report.urls) == (3, 19)  # the nodes share the installer's kernel and initrd
    log = (tree.directory / "access.log").read_text()
    assert " 127.0.0.1 GET /kickstarts/compute1.ks 200\n" in log
    assert " 127.0.0.1 HEAD /installer/installer.vmlinuz 200\n" in log
    assert " 127.0.0.1 GET /guest-image/guest-image.tar.gz 200\n" in log  # hashed as the installer would fetch it


def test_serving_logs_every_request_and_stops(fresh, capsys):
    with serve.serving(fresh.directory) as url:
        assert get(url + "/boot.ipxe") == 200
        assert get(url + "/nowhere.ks") == 404
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[1:] for line in out] == [["127.0.0.1", "GET", "/boot.ipxe", "200"],
                                                  ["127.0.0.1", "GET", "/nowhere.ks", "404"]]
    assert (fresh.directory / "access.log").read_text().splitlines() == out
    with pytest.raises(urllib.error.URLError):  # nothing listens any more
        urllib.request.urlopen(url, timeout=5)


def test_serving_needs_a_tree(tmp_path):
    not_a_tree = f"{tmp_path / 'pxe.json'} is missing: {tmp_path} is not a PXE tree: run ./inv pxe.render"
    with pytest.raises(PipelineError, match=not_a_tree), serve.serving(tmp_path):
        pass


def test_tftp_needs_root(fresh, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with (pytest.raises(PipelineError, match=r"TFTP and proxy DHCP need root .*\(--no-tftp\)"),
          serve.serving(fresh.directory, tftp=True)):
        pass


def problems(tree: pxe.Tree) -> list[str]:
    """check() with its own loopback server."""
    report = pxe.check(tree.directory)
    assert report.passed == (not report.problems)
    return [str(p) for p in report.problems]


def test_check_starts_its_own_server(fresh):
    assert problems(fresh) == []


REMOVED = [
    ("installer/installer.vmlinuz", [
        f"node 'compute1': ipxe/{COMPUTE1}.ipxe: kernel {SITE}/installer/installer.vmlinuz: HTTP 404",
        f"node 'compute1': grub/grub.cfg-{COMPUTE1}: kernel {SITE}/installer/installer.vmlinuz: HTTP 404",
        f"node 'compute2': ipxe/{COMPUTE2}.ipxe: kernel {SITE}/installer/installer.vmlinuz: HTTP 404",
        f"node 'compute2': pxelinux.cfg/{COMPUTE2}: kernel {SITE}/installer/installer.vmlinuz: HTTP 404",
        f"node 'guest1': ipxe/{GUEST1}.ipxe: kernel {SITE}/installer/installer.vmlinuz: HTTP 404",
        f"node 'guest1': grub/grub.cfg-{GUEST1}: kernel {SITE}/installer/installer.vmlinuz: HTTP 404"]),
    (f"ipxe/{COMPUTE1}.ipxe", [f"node 'compute1': boot.ipxe: chain {SITE}/ipxe/{COMPUTE1}.ipxe: HTTP 404"]),
    (f"pxelinux.cfg/{COMPUTE2}",
     [f"node 'compute2': pxelinux.cfg/{COMPUTE2}: {SITE}/pxelinux.cfg/{COMPUTE2}: HTTP 404"]),
    ("kickstarts/guest1.ks", [f"node 'guest1': kickstarts/guest1.ks: {SITE}/kickstarts/guest1.ks: HTTP 404"]),
    ("guest-image/guest-image.tar.gz",
     [f"node 'guest1': kickstarts/guest1.ks: liveimg {SITE}/guest-image/guest-image.tar.gz: HTTP 404"]),
    ("ldlinux.c32", [f"ldlinux.c32: {SITE}/ldlinux.c32: HTTP 404"]),
]


@pytest.mark.parametrize("removed, expected", REMOVED, ids=[r[0] for r in REMOVED])
def test_check_names_node_and_file_when_a_file_is_gone(fresh, removed, expected):
    (fresh.root / removed).unlink()
    assert problems(fresh) == expected


def test_check_finds_a_corrupted_liveimg(fresh):
    image = fresh.root / "host-image/host-image.tar.gz"
    data = bytearray(image.read_bytes())
    checksum = hashlib.sha256(data).hexdigest()
    data[len(data) // 2] ^= 1  # one bit of one byte
    image.write_bytes(bytes(data))
    served = hashlib.sha256(data).hexdigest()
    assert problems(fresh) == [
        f"node '{node}': kickstarts/{node}.ks: liveimg {SITE}/host-image/host-image.tar.gz: its sha256 is {served}, "
        f"not the --checksum {checksum}" for node in ("compute1", "compute2")]


def test_check_follows_includes_under_the_site_url_only(tmp_path, build):
    loaded = example(tmp_path, site=f'includes = ["{SITE}/site.ks", "http://elsewhere.example/x.ks"]')
    tree = pxe.render_tree(loaded, tmp_path / "pxe", build_dir=build)
    assert problems(tree) == [f"node '{node}': kickstarts/{node}.ks: %include {SITE}/site.ks: HTTP 404"
                              for node in ("compute1", "compute2", "guest1")]
    (tree.root / "site.ks").write_text("# the site's own additions\n")
    assert problems(tree) == []  # the other one is the installer's to fetch


def test_check_validates_the_served_kickstarts(fresh):
    ks = fresh.root / "kickstarts/compute2.ks"
    ks.write_text(ks.read_text() + "bogus --x\n")
    lines = ks.read_text().count("\n")
    assert problems(fresh) == [(f"node 'compute2': kickstarts/compute2.ks: pykickstart (RHEL9) rejects it: "
                                f"line {lines}: Unknown command: bogus")]


def test_check_wants_each_node_on_its_own_kickstart(fresh):
    script = fresh.root / f"ipxe/{GUEST1}.ipxe"
    script.write_text(script.read_text().replace("kickstarts/guest1.ks", "kickstarts/compute1.ks"))
    assert problems(fresh) == [(f"node 'guest1': ipxe/{GUEST1}.ipxe: inst.ks is {SITE}/kickstarts/compute1.ks, "
                                f"not the node's own kickstart {SITE}/kickstarts/guest1.ks")]


# --- nothing half-written


def snippet(tmp_path: Path, text: str) -> inventory.Inventory:
    (tmp_path / "snippets").mkdir()
    (tmp_path / "snippets/90-bad.ks").write_text(text)
    return example(tmp_path, site='snippets = "snippets"')


FAILURES = [
    ("a snippet pykickstart rejects", lambda tmp, build: snippet(tmp, "bogus --x\n"), None,
     "node 'compute1': pykickstart (RHEL9) rejects its kickstart: line"),
    ("a missing kernel", lambda tmp, build: example(tmp), "installer/installer.vmlinuz",
     ("installer image 'installer': {build}/installer/installer.vmlinuz not found, so the PXE tree cannot offer it: "
      "run ./inv build installer")),
    ("a missing liveimg", lambda tmp, build: example(tmp), "guest-image/guest-image.tar.gz",
     "role 'guest-image': {build}/guest-image/guest-image.tar.gz not found"),
    ("no build-info.json", lambda tmp, build: example(tmp), "guest-image/build-info.json",
     "role 'guest-image': {build}/guest-image/build-info.json is missing"),
]


@pytest.mark.parametrize("make, removed, problem", [f[1:] for f in FAILURES], ids=[f[0] for f in FAILURES])
@pytest.mark.parametrize("previous", [False, True], ids=["first render", "over a tree"])
def test_a_failed_render_leaves_nothing(tmp_path, build, make, removed, problem, previous):
    output = tmp_path / "pxe"
    if previous:
        pxe.render_tree(example(tmp_path), output, build_dir=build)
        before = {name: (output / name).read_bytes() for name in listing(output)}
    loaded = make(tmp_path, build)
    if removed:
        (build / removed).unlink()
    with pytest.raises(PipelineError) as caught:
        pxe.render_tree(loaded, output, build_dir=build)
    assert problem.format(build=build) in str(caught.value) and "\n" not in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no work directory
    if previous:
        assert {name: (output / name).read_bytes() for name in listing(output)} == before
    else:
        assert not output.exists()


def test_a_new_render_replaces_the_tree_under_a_running_server(tmp_path, build, fresh):
    (fresh.root / "stale.txt").write_text("not rendered\n")
    text = (tmp_path / "inventory.toml").read_text()
    (tmp_path / "inventory.toml").write_text(text[:text.index("[node.guest1]")])  # guest1 is gone
    with serve.serving(fresh.directory, echo=False) as url:
        assert get(f"{url}/ipxe/{GUEST1}.ipxe") == 200
        pxe.render_tree(inventory.load(tmp_path / "inventory.toml"), fresh.directory, build_dir=build)
        assert get(f"{url}/ipxe/{GUEST1}.ipxe") == 404
    files = listing(fresh.root)
    assert not [f for f in files if "guest" in f or GUEST1 in f] and "stale.txt" not in files
    log = (fresh.directory / "access.log").read_text().splitlines()  # from before and after the render
    assert [line.split()[-2:] for line in log] == [[f"/ipxe/{GUEST1}.ipxe", "200"], [f"/ipxe/{GUEST1}.ipxe", "404"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build", "inventory.toml", "pxe"]


def test_never_replaces_a_directory_that_is_not_a_tree(tmp_path, build):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious/data").write_text("keep\n")
    with pytest.raises(PipelineError, match="precious is not empty and is not a PXE tree"):
        pxe.render_tree(example(tmp_path), tmp_path / "precious", build_dir=build)
    assert listing(tmp_path / "precious") == ["data"]


def test_a_missing_boot_program_names_its_debian_package(tmp_path, build, monkeypatch):
    missing = str(tmp_path / "usr/lib/PXELINUX/pxelinux.0")
    monkeypatch.setitem(tools.DEBIAN_PACKAGE_OF_FILE, missing, "pxelinux")
    monkeypatch.setitem(pxe.PROGRAMS, "pxelinux.0", missing)
    with pytest.raises(ToolMissing, match=f"missing host files: {missing}; install with: apt-get install pxelinux$"):
        pxe.render_tree(example(tmp_path), tmp_path / "pxe", build_dir=build)
    assert not (tmp_path / "pxe").exists()


def test_a_missing_grub_mkimage_names_its_debian_package(tmp_path, build, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ToolMissing, match=r"grub-mkimage \(Debian package grub-common\)"):
        pxe.render_tree(example(tmp_path), tmp_path / "pxe", build_dir=build)
    assert not (tmp_path / "pxe").exists()


# --- dnsmasq for real: TFTP on loopback (needs root for ports 67 and 69)


def tftp_get(name: str, port: int = 69) -> bytes:
    """A TFTP read (RFC 1350), as a PXE ROM, pxelinux or GRUB makes it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.sendto(b"\0\1" + name.encode() + b"\0octet\0", ("127.0.0.1", port))
        data = b""
        while True:
            packet, server = sock.recvfrom(516)
            opcode, block = struct.unpack("!HH", packet[:4])
            if opcode == 5:
                raise FileNotFoundError(packet[4:].rstrip(b"\0").decode())
            data += packet[4:]
            sock.sendto(struct.pack("!HH", 4, block), server)
            if len(packet) < 516:
                return data


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@pytest.mark.skipif(os.geteuid() != 0, reason="dnsmasq binds ports 67 and 69: root only")
@no_dnsmasq
def test_dnsmasq_serves_the_tree_by_tftp_and_stops(tmp_path, build, monkeypatch):
    if not port_free(69):
        pytest.skip("something else serves TFTP here")
    monkeypatch.setenv("PATH", os.environ.get("PATH", "") + ":/usr/sbin")
    monkeypatch.setattr(serve, "DNSMASQ_STARTUP", 0.5)
    loaded = example(tmp_path, base_url="http://127.0.0.1:8080", pxe_table='[site.pxe]\ninterface = "lo"')
    tree = pxe.render_tree(loaded, tmp_path / "pxe", build_dir=build)
    root = tree.root
    with serve.serving(tree.directory, tftp=True, echo=False):
        assert tftp_get(f"pxelinux.cfg/{COMPUTE2}") == (root / f"pxelinux.cfg/{COMPUTE2}").read_bytes()
        assert tftp_get("/grub/grub.cfg") == (root / "grub/grub.cfg").read_bytes()  # GRUB sends a leading /
        assert tftp_get("undionly.kpxe") == (root / "undionly.kpxe").read_bytes()
        for name in ("../inventory.toml", "dnsmasq.conf", "pxe.json", "dnsmasq.log"):  # the server's files too
            with pytest.raises(FileNotFoundError):
                tftp_get(name)
    assert port_free(69)  # dnsmasq is gone
    assert "exiting on receipt of SIGTERM" in (tree.directory / "dnsmasq.log").read_text()
