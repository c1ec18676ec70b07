"""QEMU machines as bare-metal nodes: blank disks, a NIC that boots from the network, and a
firmware that boots the disk once something is installed on it. The deploy test and the deploy
benchmark drive them through a whole install, as an operator's nodes would go:

    power on -> disk empty, so PXE -> installer (pipeline/deploy/installer.py) -> /status/NODE/ok
    -> reboot -> GRUB from the node's own disk -> the installed host, reachable over SSH

The site is the tree of an inventory written here (static addresses on QEMU's user network,
10.0.2.0/24, the host at 10.0.2.2), served by nginx from Debian (pipeline.deploy.nginx). Each
node's SSH port is forwarded to its inventory address, so a login proves that the address too
is the inventory's.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .. import qemu
from ..errors import PipelineError
from ..progress import say
from ..qemu import GUEST_HOST, Firmware
from ..run import run
from ..seed import Datasource, cloud_config, config_drive, nocloud_seed
from ..testvm import new_ssh_key, remove_private_keys, ssh_config
from . import inventory as inventories
from . import nginx, pxe, serve
from .pxenode import parse_access_log, plain_console

SUBNET_PREFIX = "10.0.2"          # QEMU's user network
GATEWAY = GUEST_HOST
NAMESERVER = "10.0.2.3"           # QEMU's user network's DNS
INSTALL_DEADLINE = 1200           # power-on to /status/NODE/ok|fail; 4-6 min under TCG here
SSH_DEADLINE = 600                # reboot to SSH on the installed system
POLL = 1.0
POST_MARKER = "/etc/kvmpipe-post-marker"
STATUS = re.compile(r"/status/(?P<node>[^/?]+)/(?P<outcome>ok|fail)(?:\?reason=(?P<reason>.*))?")
# A cloud-init seed on a disk an attacker put in a compute node's drive bay (or a volume a guest
# wrote): a new user with this key, and the key for the default user. Only the public half was kept.
SEED_DISK_USER = "intruder"
SEED_DISK_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA2kbsDwOLygyff05Vvu9LyBkPza2ptIaOsbL9BExqJv seed-disk"
# The installer prints each step's start and end: "installer: NAME done in S s".
STEP_DONE = re.compile(r"installer: (?P<step>.+?) done in (?P<seconds>[\d.]+) s")


@dataclass(frozen=True)
class Disk:
    name: str        # as the kernel names it: vda (virtio-blk), nvme0n1 (NVMe)
    size_gib: int

    @property
    def nvme(self) -> bool:
        return self.name.startswith("nvme")


@dataclass(frozen=True)
class NodeSpec:
    """A node of the deploy site: its inventory entry and its hardware."""

    name: str
    mac: str
    firmware: Firmware
    address: str
    disks: tuple[Disk, ...]
    kernel_args: tuple[str, ...] = ()
    cache: dict | None = None   # the inventory's cache table
    seed_disk: Datasource | None = None  # a SATA disk with a cloud-init seed, in from power-on
    memory_mib: int = 3072      # the installer keeps the liveimg in RAM until it is verified

    @property
    def root_disk(self) -> str:
        return self.disks[0].name

    def inventory_table(self, role: str) -> list[str]:
        network = {"address": self.address, "prefix": 24, "gateway": GATEWAY, "nameservers": [NAMESERVER]}
        lines = [f"[node.{self.name}]", f"macs = [{json.dumps(self.mac)}]", f"boot = {json.dumps(str(self.firmware))}",
                 f"network = {_toml_inline(network)}", f"root_disk = {json.dumps(self.root_disk)}",
                 f"role = {json.dumps(role)}", f"kernel_args = {json.dumps(list(self.kernel_args))}"]
        if self.cache:
            lines.append(f"cache = {_toml_inline(self.cache)}")
        return lines


def _toml_inline(table: dict) -> str:
    # JSON strings, numbers and arrays are TOML's too.
    return "{ " + ", ".join(f"{key} = {json.dumps(value)}" for key, value in table.items()) + " }"


# The deploy test's nodes: the two machines, and two that must fail before any disk is written.
UEFI_NODE = NodeSpec("deploy-uefi", "52:54:00:de:00:01", Firmware.UEFI, f"{SUBNET_PREFIX}.21",
                     (Disk("vda", 8), Disk("vdb", 3), Disk("nvme0n1", 1)), kernel_args=("panic=60",),
                     cache={"ssd": "nvme0n1", "data": "vdb", "size_mib": 512, "mode": "writeback"},
                     seed_disk=Datasource.CONFIG_DRIVE)
BIOS_NODE = NodeSpec("deploy-bios", "52:54:00:de:00:02", Firmware.BIOS, f"{SUBNET_PREFIX}.22", (Disk("vda", 8),),
                     kernel_args=("panic=61",), seed_disk=Datasource.NOCLOUD)
BAD_CHECKSUM_NODE = NodeSpec("deploy-badsum", "52:54:00:de:00:03", Firmware.BIOS, f"{SUBNET_PREFIX}.23",
                             (Disk("vda", 8),))
UNSUPPORTED_NODE = NodeSpec("deploy-unsupported", "52:54:00:de:00:04", Firmware.UEFI, f"{SUBNET_PREFIX}.24",
                            (Disk("vda", 8),))
NODES = (UEFI_NODE, BIOS_NODE, BAD_CHECKSUM_NODE, UNSUPPORTED_NODE)


@dataclass(frozen=True)
class Site:
    tree: pxe.Tree
    base_url: str       # as the nodes see it
    workdir: Path       # inventory, ssh key, each node's disks and logs
    key: Path           # root's key on every installed node (the inventory's sshkey snippet)

    @property
    def access_log(self) -> Path:
        return self.tree.directory / serve.ACCESS_LOG


def write_inventory(workdir: Path, role: str, spec_file: Path, base_url: str, public_key: str,
                    nodes: tuple[NodeSpec, ...]) -> Path:
    """The deploy site's inventory, and snippets: root gets the test's key (kickstart's sshkey: bare
    metal has no cloud datasource), and a %post writes POST_MARKER."""
    snippets = workdir / "snippets"
    snippets.mkdir()
    (snippets / "50-root-key.ks").write_text(f'sshkey --username=root "{public_key}"\n')
    # A %post of the operator's that makes a new file: it must be labeled like the rest.
    (snippets / "60-post-marker.ks").write_text(f"%post\necho installed > {POST_MARKER}\n%end\n")
    lines = ["# The deploy test's inventory (pipeline/deploy/nodes.py): thrown away after the test.",
             f"spec_file = {json.dumps(str(Path(spec_file).resolve()))}", "", "[site]",
             f"base_url = {json.dumps(base_url)}", 'snippets = "snippets"']
    for node in nodes:
        lines += ["", *node.inventory_table(role)]
    path = workdir / "inventory.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@contextmanager
def serving_site(role: str, spec_file: Path, build_dir: Path, workdir: Path,
                 nodes: tuple[NodeSpec, ...] = NODES) -> Iterator[Site]:
    """Render the deploy inventory's tree from the built role and installer, and serve it with
    nginx on the loopback port its base_url names. The tree (hard links) is removed on leaving;
    the access log is kept in workdir, and the nodes' root key is removed."""
    workdir = Path(workdir).resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    port = qemu.free_port()
    base_url = f"http://{GUEST_HOST}:{port}"
    key = workdir / "id_ed25519"
    try:
        inventory = inventories.load(write_inventory(workdir, role, spec_file, base_url,
                                                     new_ssh_key(key, "deploy-test"), nodes))
        tree = pxe.render_tree(inventory, workdir / "tree", build_dir=Path(build_dir))
    except BaseException:  # the role or the installer not built, say: nothing to keep
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    try:
        with nginx.serving(tree.directory, port):
            yield Site(tree, base_url, workdir, key)
    finally:
        if (tree.directory / serve.ACCESS_LOG).is_file():
            shutil.copyfile(tree.directory / serve.ACCESS_LOG, workdir / serve.ACCESS_LOG)
        shutil.rmtree(tree.directory, ignore_errors=True)
        remove_private_keys(workdir)


@dataclass
class Node(qemu.Machine):
    """One powered-on node. Use as a context manager: QEMU never outlives it."""

    spec: NodeSpec
    site: Site
    workdir: Path = field(init=False)
    port: int = 0
    started: float = 0.0
    log_offset: int = 0  # where this power-on's requests start in the site's access log
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        self.workdir = self.site.workdir / self.spec.name
        self.workdir.mkdir(exist_ok=True)
        self.console = self.workdir / "console.log"
        self.ssh_config = self.workdir / "ssh_config"

    def disk(self, disk: Disk) -> Path:
        return self.workdir / f"{disk.name}.qcow2"

    @property
    def seed_disk(self) -> Path:
        return self.workdir / "seed-disk.img"

    def write_seed_disk(self) -> None:
        """The disk's seed (config-2 or CIDATA), as cloud-init would take it on a cloud image."""
        user_data = cloud_config({"users": ["default", {"name": SEED_DISK_USER, "shell": "/bin/bash",
                                                        "ssh_authorized_keys": [SEED_DISK_KEY]}],
                                  "ssh_authorized_keys": [SEED_DISK_KEY]})
        self.seed_disk.unlink(missing_ok=True)
        if self.spec.seed_disk is Datasource.CONFIG_DRIVE:
            config_drive(self.seed_disk, SEED_DISK_KEY, user_data)
        else:
            nocloud_seed(self.seed_disk, user_data)

    def seed_disk_argv(self) -> list[str]:
        """On q35's own SATA controller, which the initramfs probes before the root is mounted: a USB
        stick may come up after cloud-init has looked (seen here), which would prove nothing. Not in
        the boot order: the firmware boots the node's disk or the network. snapshot: the node's
        writes (SATA disks cannot be read-only) go nowhere."""
        return ["-drive", f"file={self.seed_disk},if=none,id=seed,format=raw,snapshot=on",
                "-device", "ide-hd,bus=ide.2,drive=seed"]

    def qemu_argv(self) -> list[str]:
        """The node's disks first in the boot order, its NIC second: a blank disk falls through to the
        network, an installed one boots (as a server set to boot disk, then network)."""
        devices = [*qemu.RNG,
                   *qemu.user_nic("n0", [f"bootfile={self.site.base_url}/boot.ipxe",
                                         qemu.ssh_forward(self.port, self.spec.address)],
                                  [f"mac={self.spec.mac}", "bootindex=2"]),
                   # The host image's br-ex takes the NIC at this slot as its uplink (images.toml).
                   *qemu.uplink_nics(1)]
        for index, disk in enumerate(self.spec.disks):
            devices += ["-drive", f"file={self.disk(disk)},if=none,id=d{index},format=qcow2,discard=unmap"]
            if disk.nvme:
                devices += ["-device", f"nvme,drive=d{index},serial=deploy{index}"]
            else:
                devices += ["-device", f"virtio-blk-pci,drive=d{index}" + (",bootindex=1" if index == 0 else "")]
        if self.spec.seed_disk:
            devices += self.seed_disk_argv()
        return qemu.command(self.spec.name, firmware=self.spec.firmware, memory_mib=self.spec.memory_mib,
                            console=self.console, workdir=self.workdir, devices=devices, cpus=qemu.vm_cpus(),
                            pidfile=self.workdir / "qemu.pid")

    def start(self) -> None:
        """Power on with blank disks."""
        qemu.require(self.spec.firmware, "qemu-img")
        for disk in self.spec.disks:  # blank, as a new machine's
            run(["qemu-img", "create", "-q", "-f", "qcow2", self.disk(disk), f"{disk.size_gib}G"])
        if self.spec.seed_disk:
            self.write_seed_disk()
        self.port = qemu.free_port()
        self.ssh_config.write_text(ssh_config("node", self.port, "root", self.site.key))
        self.console.unlink(missing_ok=True)
        self.log_offset = self.site.access_log.stat().st_size if self.site.access_log.exists() else 0
        self.started = time.monotonic()
        self.launch(self.qemu_argv(), log=self.workdir / "qemu.log")
        say(f"{self.spec.name}: powered on ({self.spec.firmware}); console: {self.console}")

    def console_text(self) -> str:
        try:
            return plain_console(self.console.read_bytes().decode(errors="replace"))
        except FileNotFoundError:
            return ""

    def status(self) -> tuple[str, str] | None:
        """The installer's report in the access log since this power-on: (ok|fail, reason), or
        None before it came (an earlier deploy of the same node has a report of its own)."""
        try:
            with open(self.site.access_log, "rb") as log:
                log.seek(self.log_offset)
                text = log.read().decode(errors="replace")
        except FileNotFoundError:
            return None
        for request in parse_access_log(text):
            found = STATUS.fullmatch(request.path)
            if found and found["node"] == self.spec.name:
                return found["outcome"], found["reason"] or ""
        return None

    def wait_for_install(self, deadline: float = INSTALL_DEADLINE) -> tuple[str, str]:
        """Power-on to the installer's report; the console's installer steps go into timings."""
        seen_installer = None
        while (outcome := self.status()) is None:
            self._alive("before the installer reported")
            if seen_installer is None and "installer: fetch image ..." in self.console_text():
                seen_installer = self.timings["installer running"] = self.elapsed()
            if self.elapsed() > deadline:
                raise PipelineError(f"{self.spec.name}: no /status report within {deadline} s; "
                                    f"console: {self.console}")
            time.sleep(POLL)
        self.timings["install reported"] = self.elapsed()
        for step in STEP_DONE.finditer(self.console_text()):
            self.timings[f"step: {step['step']}"] = float(step["seconds"])
        return outcome

    def install(self) -> None:
        """Until the installed system answers SSH; an install that reports fail is an error."""
        outcome, reason = self.wait_for_install()
        if outcome != "ok":
            raise PipelineError(f"{self.spec.name}: the installer reported {outcome}: {reason}; "
                                f"console: {self.console}")
        self.wait_for_ssh()

    def wait_for_ssh(self, deadline: float = SSH_DEADLINE) -> float:
        """Until the installed system answers SSH as root with the inventory's key."""
        reported = self.elapsed()
        while self.ssh(["true"], check=False).returncode != 0:
            self._alive("before SSH was up")
            if self.elapsed() - reported > deadline:
                raise PipelineError(f"{self.spec.name}: the installed system did not answer SSH within {deadline} s "
                                    f"of the install; console: {self.console}")
            time.sleep(3)
        self.timings["ssh ready"] = self.elapsed()
        return self.timings["ssh ready"]

    def ssh(self, command: list[str], check: bool = True):
        return run(["ssh", "-F", self.ssh_config, "node", "--", shlex.join(command)], capture=True, check=check,
                   timeout=120)

    def disk_is_blank(self, disk: Disk) -> bool:
        """No byte of the disk was ever written: qcow2 allocated nothing."""
        extents = json.loads(run(["qemu-img", "map", "--output=json", self.disk(disk)], capture=True).stdout)
        return not any(extent.get("data") for extent in extents)

    def elapsed(self) -> float:
        return round(time.monotonic() - self.started, 1)

    def _alive(self, when: str) -> None:
        if (how := self.ended()) is not None:
            raise PipelineError(f"{self.spec.name}: QEMU ended ({how}) {when}; "
                                f"console: {self.console}")


# --- the deploy benchmark: ./inv pxe.bench


def deploy(site: Site, node_spec: NodeSpec) -> dict[str, float]:
    """One node from power-on to SSH on its installed system; its timings (seconds from power-on,
    and each installer step's own duration)."""
    with Node(node_spec, site) as node:
        node.install()
        return dict(node.timings)


def benchmark(role: str, spec_file: Path, build_dir: Path, runs: int, node_specs: tuple[NodeSpec, ...],
              output: Path) -> dict:
    """Deploy each node RUNS times from one served tree; medians per figure, every run kept."""
    import statistics

    results: dict[str, list[dict[str, float]]] = {spec.name: [] for spec in node_specs}
    with serving_site(role, spec_file, build_dir, Path(build_dir) / "bench" / "deploy", node_specs) as site:
        for index in range(runs):
            for node_spec in node_specs:
                say(f"deploy benchmark: {node_spec.name}, run {index + 1} of {runs}")
                results[node_spec.name].append(deploy(site, node_spec))
    summary = {name: {key: statistics.median(run[key] for run in runs_ if key in run)
                      for key in runs_[0]} for name, runs_ in results.items()}
    report = {"role": role, "runs": runs, "medians": summary, "all": results}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    return report
