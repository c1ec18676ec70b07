"""A QEMU node that boots from a PXE tree, as it would boot on the site's network, and the proof
that it got its own files (the PXE boot test, ./inv pxe.boot-test).

QEMU's user network does DHCP and TFTP (from the tree's served root), and the NIC's ROM is iPXE (Debian
package ipxe-qemu). The guest reaches the host's 127.0.0.1:PORT at 10.0.2.2:PORT, so the tree's
base_url is http://10.0.2.2:PORT. The VM has no disk; it is stopped as soon as its kernel prints
its command line on the serial console. By the site's loader:

- ipxe: the DHCP filename is the URL of the tree's boot.ipxe, so the whole chain (boot.ipxe,
  ipxe/01-MAC.ipxe, kernel, initrd) goes through our server and its access log;
- pxelinux-grub: the DHCP filename is pxelinux.0 (BIOS) or grubnetx64.efi (UEFI), which read
  their per-MAC configuration, kernel and initrd by TFTP. QEMU's TFTP keeps no log, so the proof
  is the console: the loader's own lines, and the node's own kickstart URL on the kernel's
  command line (their default configurations boot no installer).

The kernel and initrd are the installer's (pipeline.deploy.pxe). What is proved is the chain up to the
installer's kernel running with the node's own kickstart URL; the install is pipeline.deploy.nodes'.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .. import qemu
from ..errors import PipelineError, ToolMissing
from ..qemu import GUEST_HOST, Firmware, console_tail, plain_console
from ..run import ended, spawn
from . import inventory as inventories
from . import pxe, serve
from .inventory import Boot, Loader

BOOT_DEADLINE = 300  # seconds from QEMU start to the kernel's command line; ~15-25 s under TCG here
MEMORY_MIB = 1024  # the kernel and initrd fit, and the kernel starts; nothing more is asked of it
POLL = 0.1  # seconds between looks at the console
NIC_ROM = "/usr/lib/ipxe/qemu/efi-virtio.rom"  # virtio-net-pci's default ROM: iPXE for BIOS and UEFI
NIC_ROM_PACKAGE = "ipxe-qemu"
# The two nodes of the test inventory: one per firmware, each the other's "wrong" node.
NODES = {Firmware.BIOS: ("pxe-bios", "52:54:00:7e:00:01"), Firmware.UEFI: ("pxe-uefi", "52:54:00:7e:00:02")}
# The kernel's first line that names its command line, after an optional printk time stamp.
COMMAND_LINE = re.compile(r"^(?:\[\s*\d+\.\d+\]\s*)?Command line: (.*)$", re.MULTILINE)


@dataclass(frozen=True)
class Request:
    """One line of the server's access log (serve._AccessLog, or nginx's): time client method path status."""

    time: str
    client: str
    method: str
    path: str
    status: int | str  # "-" when the server never answered


def parse_access_log(text: str) -> tuple[Request, ...]:
    """The requests of an access log; a line that is not one (a malformed request) is skipped."""
    requests = []
    for line in text.splitlines():
        words = line.split()
        if len(words) == 5:
            when, client, method, path, status = words
            requests.append(Request(when, client, method, path, int(status) if status.isdigit() else status))
    return tuple(requests)


def command_line(console: str) -> tuple[str, ...] | None:
    """The kernel's command line as it printed it, from complete console lines; None before it has."""
    complete = console[:console.rfind("\n") + 1].replace("\r", "")
    found = COMMAND_LINE.search(complete)
    return tuple(found.group(1).split()) if found else None


def kickstart_urls(args: tuple[str, ...]) -> list[str]:
    """The inst.ks= URLs of a kernel command line."""
    return [arg.split("=", 1)[1] for arg in args if arg.startswith("inst.ks=")]


@dataclass(frozen=True)
class BootResult:
    node: str
    firmware: Firmware
    seconds: float  # from QEMU start until the console showed the kernel's command line
    command_line: tuple[str, ...]
    requests: tuple[Request, ...]  # this boot's, in the order the server answered them
    console: Path
    loader: Loader = Loader.IPXE
    console_text: str = ""  # the console as the boot left it, without escape sequences


def own_files(tree: pxe.Tree, node: str, loader: Loader = Loader.IPXE) -> list[str]:
    """The URL paths a node's chain fetches over HTTP, in order. iPXE: boot.ipxe, its script, kernel,
    initrd. pxelinux and GRUB fetch nothing over HTTP: they read everything by TFTP."""
    if loader is not Loader.IPXE:
        return []
    boot = _node_boot(tree, node)
    return ["/boot.ipxe", f"/{boot.files['ipxe']}", f"/{boot.kernel}", f"/{boot.initrd}"]


def own_console_lines(tree: pxe.Tree, node: str, loader: Loader) -> list[str]:
    """What the console shows when the loader read the node's own configuration and loaded its kernel
    by TFTP: pxelinux's banner and its loading of the kernel; GRUB's greeting and the line that the
    node's own grub.cfg echoes. Nothing for iPXE, whose proof is the access log."""
    if loader is Loader.IPXE:
        return []
    boot = _node_boot(tree, node)
    if boot.node.boot is Boot.UEFI:
        return ["Welcome to GRUB!", boot.announcement]
    return ["PXELINUX ", f"Loading {boot.kernel}"]


def problems(tree: pxe.Tree, result: BootResult) -> tuple[str, ...]:
    """What the boot got wrong: a file of its own not fetched with 200, a loader's line missing from
    the console, another node's script or kickstart fetched, a kernel command line without its own
    kickstart URL or with another's."""
    found = []
    fetched = {request.path: request.status for request in result.requests}
    for path in own_files(tree, result.node, result.loader):
        if fetched.get(path) != 200:
            found.append(f"{path}: {'not fetched' if path not in fetched else f'status {fetched[path]}'}")
    found += [f"the console never showed {line!r}" for line in own_console_lines(tree, result.node, result.loader)
              if line not in result.console_text]
    own = _node_boot(tree, result.node)
    own_urls, urls = kickstart_urls(own.args), kickstart_urls(result.command_line)
    for other in tree.boots:
        if other is not own:
            found += [f"fetched node {other.node.name!r}'s {other.files[kind]}" for kind in ("ipxe", "kickstart")
                      if f"/{other.files[kind]}" in fetched]
            found += [f"the kernel command line has node {other.node.name!r}'s inst.ks={url}"
                      for url in kickstart_urls(other.args) if url in urls]
    if urls != own_urls:
        found.append(f"the kernel command line has inst.ks {' '.join(urls) or 'none'}, not {' '.join(own_urls)}")
    return tuple(found)


def _node_boot(tree: pxe.Tree, node: str) -> pxe.NodeBoot:
    for boot in tree.boots:
        if boot.node.name == node:
            return boot
    raise PipelineError(f"node {node!r} is not in the PXE tree {tree.directory}")


# --- the test site: a two-node inventory, its tree, served


def write_inventory(path: Path, role: str, spec_file: Path, base_url: str, loader: Loader = Loader.IPXE) -> Path:
    """A two-node inventory of the role: one BIOS node and one UEFI node, by DHCP, fetching from
    the host as QEMU's guests see it, booted by the loader."""
    lines = ["# The PXE boot test's inventory (pipeline/deploy/pxenode.py): thrown away after the test.",
             f"spec_file = {json.dumps(str(Path(spec_file).resolve()))}", "", "[site]",
             f"base_url = {json.dumps(base_url)}", "", "[site.pxe]", f"loader = {json.dumps(str(loader))}"]
    for firmware, (name, mac) in NODES.items():  # JSON strings are TOML strings
        lines += ["", f"[node.{name}]", f"macs = [{json.dumps(mac)}]", f"boot = {json.dumps(str(firmware))}",
                  'root_disk = "vda"', f"role = {json.dumps(role)}"]
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass(frozen=True)
class Site:
    tree: pxe.Tree
    base_url: str  # as the guests see it: http://10.0.2.2:PORT
    workdir: Path  # the logs: console-FIRMWARE.log, qemu-FIRMWARE.log, access.log
    loader: Loader = Loader.IPXE


@contextmanager
def serving_site(role: str, spec_file: Path, build_dir: Path, workdir: Path,
                 loader: Loader = Loader.IPXE) -> Iterator[Site]:
    """Render the test inventory's tree from the built role into workdir/tree and serve it on the
    loopback port its base_url names. On leaving, the server stops, the access log is kept in
    workdir and the tree (hard links to the build's files) is removed."""
    workdir = Path(workdir).resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    port = qemu.free_port()  # free now; the tree must name it before the server can take it
    base_url = f"http://{GUEST_HOST}:{port}"
    try:
        inventory = inventories.load(write_inventory(workdir / "inventory.toml", role, spec_file, base_url, loader))
        # The tree beside the build, so that its kernel, initrd and liveimg are hard links, not copies.
        tree = pxe.render_tree(inventory, workdir / "tree", build_dir=Path(build_dir))
    except BaseException:  # the image not built, say: nothing to keep
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    try:
        with serve.serving(tree.directory, "127.0.0.1", port, echo=False):
            yield Site(tree, base_url, workdir, loader)
    finally:
        if (tree.directory / serve.ACCESS_LOG).is_file():
            shutil.copyfile(tree.directory / serve.ACCESS_LOG, workdir / serve.ACCESS_LOG)
        shutil.rmtree(tree.directory, ignore_errors=True)


# --- the boot


def qemu_argv(firmware: Firmware, mac: str, site: Site, console: Path) -> list[str]:
    """A diskless VM whose NIC (the node's MAC, first in the boot order) boots the site's loader:
    boot.ipxe by URL (iPXE takes a URL as the DHCP filename), or pxelinux.0 or GRUB by TFTP."""
    if site.loader is Loader.IPXE:
        boot_file = f"{site.base_url}/boot.ipxe"
    else:
        boot_file = pxe.BOOT_PROGRAM[site.loader][firmware is Firmware.UEFI]
    nic = qemu.user_nic("n0", [f"tftp={site.tree.root}", f"bootfile={boot_file}"], [f"mac={mac}", "bootindex=1"])
    return qemu.command(f"pxe-boot-{firmware}", firmware=firmware, memory_mib=MEMORY_MIB, console=console,
                        workdir=site.workdir, devices=nic, reboot=False)


def _require(firmware: Firmware) -> None:
    qemu.require(firmware)
    if not Path(NIC_ROM).is_file():
        raise ToolMissing(f"missing host file: {NIC_ROM} (QEMU's iPXE ROM); install with: "
                          f"apt-get install {NIC_ROM_PACKAGE}")


def boot(site: Site, firmware: Firmware, deadline: float = BOOT_DEADLINE) -> BootResult:
    """Boot the site's node of this firmware (NODES) from the network until its kernel prints its
    command line. QEMU is stopped on return, on error and on Ctrl-C."""
    _require(firmware)
    name, mac = NODES[firmware]
    own = _node_boot(site.tree, name)
    if not any(arg.startswith("console=ttyS0") for arg in own.args):
        raise PipelineError(f"node {name!r}: role {own.node.role!r} has no console=ttyS0 in its kernel_args, so "
                            "the kernel's command line would not reach the serial console")
    console, qemu_log = site.workdir / f"console-{firmware}.log", site.workdir / f"qemu-{firmware}.log"
    console.unlink(missing_ok=True)
    access_log = site.tree.directory / serve.ACCESS_LOG
    logged = access_log.stat().st_size if access_log.exists() else 0  # this boot's requests come after
    argv = qemu_argv(firmware, mac, site, console)
    started = time.monotonic()
    with spawn(argv, log=qemu_log) as proc:
        while (args := command_line(_read(console))) is None:
            if (how := ended(proc)) is not None:
                raise PipelineError(f"{name} ({firmware}): QEMU ended ({how}) before the "
                                    f"kernel ran; console: {console_tail(_read(console))}; see {qemu_log}")
            if time.monotonic() - started > deadline:
                requests = " ".join(r.path for r in parse_access_log(_read(access_log, logged))) or "none"
                raise PipelineError(f"{name} ({firmware}): no kernel command line on the console within {deadline} s; "
                                    f"requests: {requests}; last console lines: {console_tail(_read(console))}")
            time.sleep(POLL)
        seconds = round(time.monotonic() - started, 1)
    return BootResult(name, firmware, seconds, args, parse_access_log(_read(access_log, logged)), console,
                      site.loader, plain_console(_read(console)))


def _read(path: Path, offset: int = 0) -> str:
    try:
        with open(path, "rb") as file:
            file.seek(offset)
            return file.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


# --- the whole test, for ./inv pxe.boot-test


def boot_test(role: str, spec_file: Path, build_dir: Path, firmwares: list[Firmware], deadline: float = BOOT_DEADLINE,
              loader: Loader = Loader.IPXE) -> list[tuple[BootResult, tuple[str, ...]]]:
    """Boot the test inventory's node of each firmware, one after the other, from a throw-away tree
    of the built role; each boot with what it got wrong (problems). Logs stay in build/ROLE/pxe-boot/."""
    with serving_site(role, spec_file, build_dir, Path(build_dir) / role / "pxe-boot", loader) as site:
        results = [boot(site, firmware, deadline) for firmware in firmwares]
        return [(result, problems(site.tree, result)) for result in results]


def summary(result: BootResult) -> list[str]:
    """What a boot fetched and how long its kernel took to run, for people."""
    urls = " ".join(kickstart_urls(result.command_line)) or "none"
    return [(f"{result.node} ({result.firmware}, {result.loader}): kernel running {result.seconds} s after QEMU "
             f"start, inst.ks: {urls} (console: {result.console})"),
            *(f"  {request.method} {request.path} {request.status}" for request in result.requests)]
