"""The PXE tree: everything a node of an inventory needs to boot an installer that finds its own
kickstart. The tree's directory holds the server's files; its subdirectory root/ is both the HTTP
and the TFTP root, and holds the nodes' files alone (pipeline.deploy.serve serves it).

    pxe.json                    what was rendered, for `check`: base URL, target, each node's files
    dnsmasq.conf                proxy DHCP + TFTP for the site ([site.pxe] of the inventory)
    nginx-site.conf             an nginx server block serving root/ at base_url (pipeline.deploy.nginx)
    access.log dnsmasq.log      written by the servers
    root/
    boot.ipxe                   iPXE's first script: it chains ipxe/01-MAC.ipxe
    ipxe/01-MAC.ipxe            a node's kernel, initrd and command line, over HTTP
    grub/grub.cfg-01-MAC        the same for GRUB (UEFI nodes), over TFTP; grub/grub.cfg for others
    pxelinux.cfg/01-MAC         the same for pxelinux (BIOS nodes); pxelinux.cfg/default for others
    undionly.kpxe ipxe.efi pxelinux.0 ldlinux.c32 grubnetx64.efi    the network boot programs
    kickstarts/NODE.ks          each node's kickstart (pipeline.kickstart)
    INSTALLER/INSTALLER.vmlinuz INSTALLER.initrd  the installer every node boots (a netboot image,
                                [image.installer] in images.toml; pipeline/deploy/installer.py)
    ROLE/ROLE.tar.gz            a role's liveimg tarball, which the installer installs

Where Anaconda's kernel and initrd would go, the tree offers our installer's, with Anaconda's
inst.ks=URL argument. The tree is written beside the output directory and swapped in only when
complete; below, paths of the nodes' files are under root/.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shlex
import shutil
import stat
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import jinja2
from pykickstart.errors import KickstartError, KickstartWarning

from .. import tools
from ..artifacts import artifacts_for
from ..errors import InventoryError, PipelineError
from ..paths import DEFAULT_OUTPUT, ROOT
from ..run import run
from . import kickstart
from .inventory import Boot, Inventory, Loader, Node
from .serve import ACCESS_LOG, DEFAULT_OUTPUT_DIR, DNSMASQ_CONF, DNSMASQ_LOG, MANIFEST, SERVED, load_manifest, serving

TEMPLATES = ROOT / "kickstarts" / "pxe"
# Network boot programs, copied from their Debian packages (tools.DEBIAN_PACKAGE_OF_FILE).
PROGRAMS = {
    "undionly.kpxe": "/usr/lib/ipxe/undionly.kpxe",  # iPXE for BIOS, on the PXE ROM's own driver
    "ipxe.efi": "/usr/lib/ipxe/ipxe.efi",
    "pxelinux.0": "/usr/lib/PXELINUX/pxelinux.0",
    "ldlinux.c32": "/usr/lib/syslinux/modules/bios/ldlinux.c32",  # pxelinux.0 loads it from beside itself
}
# GRUB for UEFI network boot, made with grub-mkimage. Debian's own (monolithic/grubnetx64.efi)
# starts `normal (memdisk)/grub.cfg`, and a config named there skips GRUB's per-MAC lookup; ours
# has none, and its (tftp) prefix makes normal look up grub/grub.cfg-01-MAC, then grub/grub.cfg,
# on the TFTP server. Its modules are built in: it needs nothing else from the TFTP root.
GRUB_EFI = "grubnetx64.efi"
GRUB_EFI_MODULES = "/usr/lib/grub/x86_64-efi"
GRUB_NET_MODULES = ("normal", "configfile", "echo", "test", "sleep", "minicmd", "reboot", "linux", "efinet",
                    "net", "tftp", "efi_gop", "all_video")
BOOT_PROGRAM = {Loader.IPXE: ("undionly.kpxe", "ipxe.efi"), Loader.PXELINUX_GRUB: ("pxelinux.0", GRUB_EFI)}
# The installer's name for the boot NIC, given by its MAC (dracut's ifname=): the installer's
# kernel may name the NIC differently from the installed system.
BOOT_NIC = "bootnet"
SERIAL_CONSOLE = re.compile(r"console=ttyS(?P<port>\d+)(?:,(?P<speed>\d+)\S*)?")
HTTP_TIMEOUT = 30  # seconds without a byte before a fetch fails


def mac_name(mac: str) -> str:
    """01-52-54-00-12-34-56: the file name pxelinux, GRUB and our iPXE script look up (01 is Ethernet)."""
    return "01-" + mac.lower().replace(":", "-")


@dataclass(frozen=True)
class NodeBoot:
    """What one node boots; every boot configuration lays out the same, in its own syntax."""

    node: Node
    kernel: str  # paths under the tree's root
    initrd: str
    kickstart: str
    args: tuple[str, ...]  # the installer's kernel command line

    @property
    def files(self) -> dict[str, str]:
        """The node's boot configurations and kickstart, by kind, as paths under the root."""
        mac = mac_name(self.node.boot_mac)
        firmware = (("grub", f"grub/grub.cfg-{mac}") if self.node.boot is Boot.UEFI
                    else ("pxelinux", f"pxelinux.cfg/{mac}"))
        return dict([("ipxe", f"ipxe/{mac}.ipxe"), firmware, ("kickstart", self.kickstart)])

    @property
    def announcement(self) -> str:
        """What the node's GRUB configuration echoes first: the console shows it was read. (pxelinux's
        SAY does not reach a serial console, so its configuration has none.)"""
        return f"Installing {self.node.name} (role {self.node.role})"

    @property
    def serial(self) -> tuple[int, int] | None:
        """The serial port and speed of the kernel's last console=ttySN[,SPEED], for pxelinux's SERIAL."""
        for arg in reversed(self.args):
            if found := SERIAL_CONSOLE.fullmatch(arg):
                return int(found["port"]), int(found["speed"] or 9600)
        return None


@dataclass(frozen=True)
class Tree:
    directory: Path  # the server's files (pxe.json, configurations, logs), and root/
    boots: tuple[NodeBoot, ...]

    @property
    def root(self) -> Path:
        """What HTTP and TFTP serve: the nodes' files, and nothing else."""
        return self.directory / SERVED


def installer_args(inventory: Inventory, node: Node, kickstart_url: str) -> tuple[str, ...]:
    """The kernel command line: the node's own kickstart, its network on the boot NIC, the image's consoles."""
    mac = node.boot_mac
    args = [f"inst.ks={kickstart_url}", f"BOOTIF={mac_name(mac)}", f"ifname={BOOT_NIC}:{mac}"]
    net = node.network
    if net is None:
        args.append(f"ip={BOOT_NIC}:dhcp")
    else:  # dracut's ip=address::gateway:netmask:hostname:interface:none
        args.append(f"ip={net.interface.ip}::{net.gateway or ''}:{net.interface.netmask}:{node.name}:{BOOT_NIC}:none")
        args += [f"nameserver={server}" for server in net.nameservers]
    # The installer talks on the consoles the installed system will (images.toml, then the node's).
    return (*args, *(arg for arg in inventory.kernel_args(node) if arg.startswith("console=")))


def node_boot(inventory: Inventory, node: Node) -> NodeBoot:
    ks = f"kickstarts/{node.name}.ks"
    installer = inventory.site.installer
    return NodeBoot(node=node, kernel=f"{installer}/{installer}.vmlinuz", initrd=f"{installer}/{installer}.initrd",
                    kickstart=ks, args=installer_args(inventory, node, f"{inventory.site.base_url}/{ks}"))


# --- render


@functools.cache
def templates() -> jinja2.Environment:
    """The PXE tree's templates, with pipeline.escape's filters: each value is written for its format."""
    from ..escape import FILTERS

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)
    env.filters.update(FILTERS)
    return env


def _dhcp_server(inventory: Inventory) -> IPv4Address | None:
    """Where proxy DHCP answers when [site.pxe] names no subnet: the network of base_url's address."""
    if inventory.site.pxe.subnet:
        return None
    host = urlsplit(inventory.site.base_url).hostname
    try:
        return IPv4Address(host)
    except ValueError:
        raise InventoryError(inventory.path, None, "site.pxe.subnet",
                             f"is required: base_url's host {host!r} is not an IPv4 address, so the network "
                             "where dnsmasq answers PXE clients cannot be told from it") from None


def _sources(inventory: Inventory, installer_dir: Path,
             images: dict[str, kickstart.LiveImage]) -> list[tuple[Path, str]]:
    """The installer's kernel and initrd and each role's built (or published) liveimg, with their
    names in the tree; a missing one names the image and the file."""
    installer = inventory.site.installer
    if installer not in inventory.spec.images:
        raise InventoryError(inventory.path, None, "site.installer",
                             f"the PXE tree boots the netboot image {installer!r}, which is not an image of "
                             f"{inventory.spec.path}: add it (see images.toml) or name another")
    built = artifacts_for(inventory.spec.images[installer], installer_dir)
    wanted = [("installer image", installer, built.kernel), ("installer image", installer, built.initrd)]
    for role, image in images.items():
        assert image.directory is not None, "liveimages() with none given finds every one in a directory"
        wanted.append(("role", role, image.directory / image.file))  # a published one: verified
    for what, name, path in wanted:
        if not path.is_file():
            raise PipelineError(f"{what} {name!r}: {path} not found, so the PXE tree cannot offer it: "
                                f"run ./inv build {name}")
    return [(path, f"{name}/{path.name}") for _, name, path in wanted]


def _place(source: Path, target: Path) -> None:
    """Hard-link a built file into the tree, or copy it when that cannot be done (another file system).

    A link costs nothing and keeps what was rendered: a new build replaces build/ROLE/ROLE.tar.gz
    with a new file, which leaves the tree's link, and its checksum in the kickstarts, as they were.
    dnsmasq (as root) serves only world-readable files: a file that is not is copied and made so.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.stat().st_mode & stat.S_IROTH:
        try:
            os.link(source, target)
            return
        except OSError:
            pass
    shutil.copyfile(source, target)
    target.chmod(0o644)


def _write(root: Path, name: str, text: str) -> None:
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(text)


def _check_output(output_dir: Path) -> None:
    # The whole directory is replaced: never one that a render did not make (build/, say).
    if output_dir.exists() and any(output_dir.iterdir()) and not (output_dir / MANIFEST).is_file():
        raise PipelineError(f"{output_dir} is not empty and is not a PXE tree (it has no {MANIFEST}); it would "
                            "be replaced whole: choose another output directory")


def _swap(work: Path, output_dir: Path) -> None:
    """Put the finished tree in place of the old one, carrying over the server's logs."""
    if not output_dir.exists():
        os.rename(work, output_dir)
        return
    for log in (ACCESS_LOG, DNSMASQ_LOG):
        if (output_dir / log).is_file():
            # A link, not a copy: a running dnsmasq keeps writing into the same file.
            os.link(output_dir / log, work / log)
    old = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old.", dir=output_dir.parent))
    os.rename(output_dir, old / "tree")
    try:
        os.rename(work, output_dir)
    except OSError:
        os.rename(old / "tree", output_dir)  # the old tree back in place, then the error
        old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)


def render_tree(inventory: Inventory, output_dir: Path = DEFAULT_OUTPUT_DIR, target: str = kickstart.DEFAULT_TARGET,
                *, build_dir: Path = DEFAULT_OUTPUT, installer_dir: Path | None = None,
                verify_key: str | None = None) -> Tree:
    """Write the PXE tree of the inventory to output_dir, replacing a previous one whole.

    Everything is checked first (boot programs, built artifacts, kickstarts by pykickstart) and
    written to a directory beside output_dir, which is swapped in only when complete: on any
    error, nothing is left and a previous tree stays as it was.
    """
    output_dir = Path(output_dir).resolve()
    tools.require("grub-mkimage")
    tools.require_files(*PROGRAMS.values(), f"{GRUB_EFI_MODULES}/linux.mod")
    _check_output(output_dir)
    server = _dhcp_server(inventory)
    images = kickstart.liveimages(inventory, Path(build_dir), {}, verify_key)
    # The installer is built, not published: by default it is beside the roles' builds.
    sources = _sources(inventory, Path(installer_dir or build_dir), images)
    boots = tuple(node_boot(inventory, node) for node in inventory.nodes.values())

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        work.chmod(0o755)  # mkdtemp's 0700 would hide the tree from a server that is not root
        served = Tree(work, boots).root
        served.mkdir(mode=0o755)
        kickstart.render_all(inventory, served / "kickstarts", target, liveimgs=images)
        for source, name in sources:
            _place(source, served / name)
        for program, path in PROGRAMS.items():
            shutil.copyfile(path, served / program)
        run(["grub-mkimage", "--directory", GRUB_EFI_MODULES, "--format", "x86_64-efi", "--prefix", "(tftp)/grub",
             "--output", served / GRUB_EFI, *GRUB_NET_MODULES])
        _write_configs(work, output_dir, inventory, boots, server)
        _write(work, MANIFEST, json.dumps(_manifest(inventory, boots, target), indent=2) + "\n")
        _swap(work, output_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # gone already if the swap was made
    return Tree(output_dir, boots)


def _write_configs(work: Path, directory: Path, inventory: Inventory, boots: tuple[NodeBoot, ...],
                   server: IPv4Address | None) -> None:
    """The nodes' boot configurations into work's root, the servers' beside it; directory is
    where work will be moved, and what the servers' configurations name."""
    env = templates()
    common = {"inventory": inventory.path, "base_url": inventory.site.base_url}
    served, root = Tree(work, boots).root, Tree(directory, boots).root
    _write(served, "boot.ipxe", env.get_template("boot.ipxe.j2").render(common))
    _write(served, "grub/grub.cfg", env.get_template("grub.cfg.j2").render(common, boot=None))
    _write(served, "pxelinux.cfg/default", env.get_template("pxelinux.cfg.j2").render(common, boot=None))
    node_templates = {"ipxe": "node.ipxe.j2", "grub": "grub.cfg.j2", "pxelinux": "pxelinux.cfg.j2"}
    for boot in boots:
        for kind, name in boot.files.items():
            if kind in node_templates:
                _write(served, name, env.get_template(node_templates[kind]).render(common, boot=boot))
    pxe = inventory.site.pxe
    bios, efi = BOOT_PROGRAM[pxe.loader]
    _write(work, DNSMASQ_CONF, env.get_template("dnsmasq.conf.j2").render(
        common, root=root, conf=directory / DNSMASQ_CONF, pxe=pxe, server=server, bios=bios, efi=efi))
    from . import nginx  # here, not at the top: nginx builds on this module's names

    nginx.write_site(work, root, inventory.site.base_url)


def _manifest(inventory: Inventory, boots: tuple[NodeBoot, ...], target: str) -> dict:
    return {
        "inventory": str(inventory.path),
        "base_url": inventory.site.base_url,
        "target": target,
        "programs": [*PROGRAMS, GRUB_EFI],
        "nodes": {boot.node.name: {"mac": boot.node.boot_mac, "boot": str(boot.node.boot), "role": boot.node.role,
                                   "files": boot.files} for boot in boots},
    }


# --- check


@dataclass(frozen=True)
class Problem:
    node: str | None
    file: str  # under the tree's root
    problem: str

    def __str__(self) -> str:
        return ": ".join(part for part in (f"node {self.node!r}" if self.node else "", self.file, self.problem) if part)


@dataclass(frozen=True)
class CheckReport:
    root: Path  # the tree's directory, as given
    nodes: int
    urls: int  # distinct URLs fetched
    problems: tuple[Problem, ...]

    @property
    def passed(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class _BootEntry:
    """What a boot configuration loads: absolute URLs (TFTP paths are under the site's URL too)."""

    kernel: str | None
    initrd: str | None
    args: tuple[str, ...]


class _Fetcher:
    """Fetches the tree's URLs from the server being checked, each once: many nodes share a kernel."""

    def __init__(self, site_url: str, server_url: str):
        self.site_url, self.server_url = site_url.rstrip("/"), server_url.rstrip("/")
        self.cache: dict[tuple[str, str], tuple[str | None, str | None]] = {}

    def served(self, url: str) -> str | None:
        """The server's URL for a URL under the site's base URL; None for one elsewhere."""
        if url == self.site_url or url.startswith(self.site_url + "/"):
            return self.server_url + url[len(self.site_url):]
        return None

    def _fetch(self, url: str, how: str) -> tuple[str | None, str | None]:
        """(result, error): how is 'head' (result ''), 'text', or 'sha256' (hashed as it streams)."""
        key = (how, url)
        if key not in self.cache:
            request = urllib.request.Request(self.served(url) or url, method="HEAD" if how == "head" else "GET")
            try:
                with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
                    if how == "text":
                        result = response.read().decode(errors="replace")
                    elif how == "sha256":
                        digest = hashlib.sha256()
                        while chunk := response.read(2**20):
                            digest.update(chunk)
                        result = digest.hexdigest()
                    else:
                        result = ""
                self.cache[key] = (result, None)
            except urllib.error.HTTPError as error:
                self.cache[key] = (None, f"HTTP {error.code}")
            except (urllib.error.URLError, OSError) as error:
                self.cache[key] = (None, f"cannot fetch: {getattr(error, 'reason', error)}")
        return self.cache[key]

    def head(self, url: str) -> str | None:
        return self._fetch(url, "head")[1]

    def text(self, url: str) -> tuple[str | None, str | None]:
        return self._fetch(url, "text")

    def sha256(self, url: str) -> tuple[str | None, str | None]:
        return self._fetch(url, "sha256")


def _boot_entry(text: str, site_url: str) -> _BootEntry:
    """The kernel, initrd and arguments of an iPXE script, a GRUB cfg or a pxelinux cfg.

    The three say it alike: `kernel|linux|KERNEL PATH [ARGS]`, `initrd|INITRD PATH`, `APPEND ARGS`.
    GRUB's and pxelinux's paths are under the TFTP root, which is the site's URL.
    """
    kernel = initrd = None
    args: list[str] = []
    for line in text.splitlines():
        words = line.split("||")[0].split()
        if not words or words[0].startswith("#"):
            continue
        keyword = words[0].lower()
        if keyword in ("kernel", "linux") and len(words) > 1:
            kernel, args = words[1], args + words[2:]
        elif keyword == "initrd" and len(words) > 1:
            initrd = words[1]
        elif keyword == "append":
            args += words[1:]

    def absolute(path: str | None) -> str | None:
        return path if path is None or "://" in path else f"{site_url}/{path.lstrip('/')}"

    # iPXE's initrd=NAME is for the EFI stub, not a file to fetch.
    return _BootEntry(absolute(kernel), absolute(initrd), tuple(arg for arg in args if not arg.startswith("initrd=")))


def _option(line: str, name: str) -> str | None:
    """The value of --name=VALUE or --name VALUE in a kickstart command line."""
    words = shlex.split(line)
    for i, word in enumerate(words):
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
        if word == name and i + 1 < len(words):
            return words[i + 1]
    return None


class _Checker:
    def __init__(self, manifest: dict, fetch: _Fetcher):
        self.fetch = fetch
        self.site_url = manifest["base_url"]
        self.target = manifest["target"]
        self.validator = kickstart.Validator(self.target)
        self.problems: list[Problem] = []

    def problem(self, node: str | None, file: str, text: str) -> None:
        self.problems.append(Problem(node, file, text))

    def programs(self, names: list[str]) -> None:
        for name in names:
            if error := self.fetch.head(f"{self.site_url}/{name}"):
                self.problem(None, name, f"{self.site_url}/{name}: {error}")

    def node(self, name: str, entry: dict) -> None:
        files = entry["files"]
        own_kickstart = f"{self.site_url}/{files['kickstart']}"
        # iPXE: boot.ipxe chains the MAC's script, as iPXE would expand it.
        boot_ipxe = f"{self.site_url}/boot.ipxe"
        text, error = self.fetch.text(boot_ipxe)
        chained = next((words[1] for line in (text or "").splitlines()
                        if (words := line.split("||")[0].split()) and words[0] == "chain" and len(words) > 1), None)
        if error or chained is None:
            self.problem(name, "boot.ipxe", f"{boot_ipxe}: {error or 'no chain command'}")
        else:
            script = urljoin(boot_ipxe, chained.replace("${netX/mac:hexhyp}", entry["mac"].replace(":", "-")))
            self.config(name, "boot.ipxe", script, own_kickstart, chained=True)
        for kind in ("grub", "pxelinux"):  # read by TFTP from the same root
            if kind in files:
                self.config(name, files[kind], f"{self.site_url}/{files[kind]}", own_kickstart)
        self.kickstart(name, files["kickstart"], own_kickstart)

    def config(self, name: str, file: str, url: str, own_kickstart: str, chained: bool = False) -> None:
        text, error = self.fetch.text(url)
        if text is None:
            self.problem(name, file, f"{'chain ' if chained else ''}{url}: {error}")
            return
        if chained:  # the problems below are in the chained script
            file = url.removeprefix(self.site_url + "/")
        entry = _boot_entry(text, self.site_url)
        for what, target in (("kernel", entry.kernel), ("initrd", entry.initrd)):
            if target is None:
                self.problem(name, file, f"no {what}")
            elif error := self.fetch.head(target):
                self.problem(name, file, f"{what} {target}: {error}")
        kickstarts = [arg.split("=", 1)[1] for arg in entry.args if arg.startswith("inst.ks=")]
        if kickstarts != [own_kickstart]:
            self.problem(name, file, f"inst.ks is {' '.join(kickstarts) or 'missing'}, not the node's own "
                                     f"kickstart {own_kickstart}")

    def kickstart(self, name: str, file: str, url: str) -> None:
        text, error = self.fetch.text(url)
        if text is None:
            self.problem(name, file, f"{url}: {error}")
            return
        try:
            self.validator.check(text)
        except (KickstartError, KickstartWarning) as rejected:
            self.problem(name, file, f"pykickstart ({self.target}) rejects it: "
                                     f"{kickstart.rejection(rejected, [])}")
        lines = text.splitlines()
        liveimg = [line for line in lines if line.split()[:1] == ["liveimg"]]
        if not liveimg:
            self.problem(name, file, "no liveimg command")
        else:  # the last one is the one the installer keeps
            image, checksum = _option(liveimg[-1], "--url"), _option(liveimg[-1], "--checksum")
            digest, error = self.fetch.sha256(image) if image else (None, "no --url")
            if error:
                self.problem(name, file, f"liveimg {image or ''}: {error}")
            elif digest != checksum:
                self.problem(name, file, f"liveimg {image}: its sha256 is {digest}, not the --checksum {checksum}")
        for line in lines:
            words = line.split()
            # An %include elsewhere is the installer's to fetch; one under the site's URL is ours.
            if (words[:1] == ["%include"] and len(words) > 1 and self.fetch.served(words[1])
                    and (error := self.fetch.head(words[1]))):
                self.problem(name, file, f"%include {words[1]}: {error}")


def check(tree: Path = DEFAULT_OUTPUT_DIR, base_url: str | None = None) -> CheckReport:
    """Walk the tree as booting nodes would, over HTTP from the server at base_url.

    For each node: boot.ipxe's chain to its iPXE script, its GRUB or pxelinux configuration (read
    by TFTP from the same root), each one's kernel and initrd and its own kickstart URL; then the
    kickstart, validated by pykickstart, its liveimg checked against its sha256, its %include
    URLs under the site's URL. URLs under the inventory's base_url are fetched from base_url.
    Without base_url, a server on loopback is started for the check.
    """
    tree = Path(tree).resolve()
    manifest = load_manifest(tree)
    if base_url is None:
        with serving(tree, echo=False) as url:
            return check(tree, url)
    checker = _Checker(manifest, _Fetcher(manifest["base_url"], base_url))
    checker.programs(manifest["programs"])
    for name, entry in manifest["nodes"].items():
        checker.node(name, entry)
    return CheckReport(tree, len(manifest["nodes"]), len(checker.fetch.cache), tuple(checker.problems))
