"""Boot an image in QEMU: a throw-away overlay, a seed that gives the image's default cloud
user a fresh SSH key as a cloud would (NoCloud, or an OpenStack config drive), SSH on a
forwarded loopback port, and the guest agent on a socket.

KVM is used only where it really runs a guest: /dev/kvm exists on machines
whose nested KVM aborts QEMU or hangs guests, so probe_kvm boots the host's
kernel and waits for it to panic on purpose; otherwise TCG.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import shutil
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from . import tools
from .errors import PipelineError
from .progress import say
from .run import run, start, stop
from .spec import ImageSpec

OVMF_CODE = "/usr/share/OVMF/OVMF_CODE_4M.fd"
OVMF_VARS = "/usr/share/OVMF/OVMF_VARS_4M.fd"
SSH_DEADLINE = 420          # TCG boots reach SSH in 60-120 s; leave room for a loaded machine
KVM_PROBE_DEADLINE = 30
GROWTH = 2**30              # the overlay is this much larger than the image, so growth is visible
# Extra NICs (bridge uplinks) sit at these PCI slots of the q35 root bus, so udev
# names them enp0s8, enp0s9, ... whatever else the VM has.
UPLINK_SLOT = 8
HOST_MEMORY_MIB = 3072      # a KVM host image runs throw-away guests of its own in the boot test
# The default user of Debian's cloud-init (/etc/cloud/cloud.cfg): a cloud user logs in as it, not as root.
CLOUD_USER = "debian"
PRIVATE_KEY_PREFIX = "id_"  # a VM's private keys in its workdir: id_NAME (and the public halves, id_NAME.pub)


class Firmware(StrEnum):
    BIOS = "bios"
    UEFI = "uefi"


class Datasource(StrEnum):
    """How a boot hands the guest its identity, keys and user-data, as a cloud would."""
    NOCLOUD = "nocloud"             # a FAT volume labeled CIDATA: meta-data, user-data
    CONFIG_DRIVE = "config-drive"   # OpenStack's: config-2, openstack/latest/meta_data.json and user_data


class BootTimeout(PipelineError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def probe_kvm(kernel: Path) -> bool:
    """True if a KVM guest really runs here: the kernel must reach its (deliberate) panic."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    with tempfile.TemporaryDirectory(prefix="kvm-probe-") as tmp:
        console = Path(tmp) / "console.log"
        proc = start(["qemu-system-x86_64", "-machine", "q35,accel=kvm", "-cpu", "host", "-m", "512",
                      "-display", "none", "-monitor", "none", "-no-reboot", "-serial", f"file:{console}",
                      "-kernel", kernel, "-append", "console=ttyS0 panic=-1"], log=Path(tmp) / "qemu.log")
        try:
            proc.wait(timeout=KVM_PROBE_DEADLINE)
        except Exception:  # a hung guest: the failure this probe exists for
            pass
        finally:
            stop(proc)
        return "Kernel panic" in console.read_text(errors="replace")


PROBE_CACHE = Path("/run/kvm-image-pipeline/kvm-probe")


@functools.cache
def kvm_works() -> bool:
    """probe_kvm with the host's kernel, remembered until the host reboots (the answer
    cannot change before then, and a hung probe costs its whole deadline)."""
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    try:
        cached_boot, verdict = PROBE_CACHE.read_text().split()
        if cached_boot == boot_id:
            return verdict == "kvm"
    except (OSError, ValueError):
        pass
    kernels = sorted(Path("/boot").glob("vmlinuz-*"))
    if not kernels:
        tools.require_files("/boot/vmlinuz")  # names linux-image-amd64
    works = probe_kvm(kernels[-1])
    PROBE_CACHE.parent.mkdir(parents=True, exist_ok=True)
    PROBE_CACHE.write_text(f"{boot_id} {'kvm' if works else 'tcg'}\n")
    say(f"KVM probe: {'guests run under KVM' if works else 'KVM unusable here, using TCG'}")
    return works


def accelerator() -> tuple[str, str]:
    """(accel, cpu) for this machine."""
    return ("kvm", "host") if kvm_works() else ("tcg", "max")


def remove_private_keys(directory: Path) -> None:
    """Remove the private keys new_ssh_key made in directory (id_NAME), keeping their public halves."""
    for key in Path(directory).glob(f"{PRIVATE_KEY_PREFIX}*"):
        if key.suffix != ".pub":
            key.unlink(missing_ok=True)


def new_ssh_key(path: Path, comment: str) -> str:
    """A fresh passwordless ed25519 key pair at PATH (and PATH.pub); returns the public key."""
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path])
    return path.with_suffix(".pub").read_text().strip()


def firmware_argv(firmware: Firmware, workdir: Path) -> list[str]:
    """QEMU's firmware options: SeaBIOS is q35's default; UEFI is OVMF, with a fresh copy of its
    variable store in WORKDIR (the firmware writes its boot entries there)."""
    if firmware is not Firmware.UEFI:
        return []
    variables = workdir / "OVMF_VARS.fd"
    shutil.copyfile(OVMF_VARS, variables)
    return ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
            "-drive", f"if=pflash,format=raw,unit=1,file={variables}"]


def ssh_config(alias: str, port: int, user: str, key: Path) -> str:
    """An ssh_config whose host ALIAS is a VM's SSH port forwarded to loopback: KEY only, and no
    host key kept (each boot has new ones)."""
    return f"""\
Host {alias}
  HostName 127.0.0.1
  Port {port}
  User {user}
  IdentityFile {key}
  IdentitiesOnly yes
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  LogLevel ERROR
  ConnectTimeout 10
  ServerAliveInterval 10
"""


class QemuMachine:
    """A QEMU process (self.proc) that start() starts. Use as a context manager, so that it
    never outlives its block, nor a start that failed half-way."""

    proc = None

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class VM(QemuMachine):
    """A running guest. Use as a context manager, so the QEMU process never outlives it."""

    image: Path          # the artifact: only ever a read-only backing file
    disk_size: int
    firmware: Firmware
    workdir: Path
    memory_mib: int = 2048
    cpus: int = 2
    uplink_nics: int = 0    # NICs with no network behind them, for OVS bridges to own
    datasource: Datasource = Datasource.NOCLOUD
    users: list[dict] = field(default_factory=list)  # user-data users beside the default one

    def __post_init__(self):
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.console = self.workdir / "console.log"
        self.key = self.workdir / f"{PRIVATE_KEY_PREFIX}ed25519"
        self.ssh_config = self.workdir / "ssh_config"
        self.qga_socket = self.workdir / "qga.sock"
        self.port = 0
        self.proc = None
        self.boot_seconds: float | None = None

    # --- set-up

    def _overlay(self) -> Path:
        overlay = self.workdir / "overlay.qcow2"
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", self.image, "-F", "qcow2", overlay,
             str(self.disk_size + GROWTH)])
        return overlay

    def _seed(self) -> Path:
        """The seed volume: a fresh key for the default user, and user-data with self.users."""
        public_key = new_ssh_key(self.key, "boot-test")
        user_data = {"users": ["default", *self.users]}
        seed = self.workdir / "seed.img"
        if self.datasource is Datasource.CONFIG_DRIVE:
            config_drive(seed, public_key, cloud_config(user_data))
        else:
            nocloud_seed(seed, cloud_config({**user_data, "ssh_authorized_keys": [public_key]}))
        return seed

    def ssh_config_for(self, user: str, key: Path) -> Path:
        """An ssh_config whose host `guest` is this VM, logged into as USER with KEY only."""
        config = self.ssh_config if (user, key) == (CLOUD_USER, self.key) else self.workdir / f"ssh_config-{user}"
        config.write_text(ssh_config("guest", self.port, user, key))
        return config

    def ssh_argv(self, user: str = CLOUD_USER, key: Path | None = None, *options: str) -> list[str]:
        """ssh into this VM as USER with KEY (default: the seed's key), up to the remote command."""
        key = key or self.key
        config = self.ssh_config if (user, key) == (CLOUD_USER, self.key) else self.ssh_config_for(user, key)
        return ["ssh", "-F", config, *options, "guest", "--"]

    def _write_ssh_config(self) -> None:
        self.ssh_config_for(CLOUD_USER, self.key)

    def qemu_argv(self, overlay: Path, seed: Path) -> list[str]:
        accel, cpu = accelerator()
        argv = ["qemu-system-x86_64", "-name", f"boot-test-{self.firmware}",
                "-machine", f"q35,accel={accel}", "-cpu", cpu, "-smp", str(self.cpus), "-m", str(self.memory_mib),
                # No default VGA, CD-ROM or parallel port: less for TCG to emulate and probe.
                "-nodefaults", "-display", "none", "-monitor", "none", "-serial", f"file:{self.console}",
                "-pidfile", self.workdir / "qemu.pid",
                "-drive", f"file={overlay},if=virtio,format=qcow2,discard=unmap",
                "-drive", f"file={seed},if=virtio,format=raw,readonly=on",
                "-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{self.port}-:22",
                "-device", "virtio-net-pci,netdev=net0",
                "-device", "virtio-serial-pci",
                "-chardev", f"socket,id=qga0,path={self.qga_socket},server=on,wait=off",
                "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
                "-device", "virtio-rng-pci"]
        for index in range(self.uplink_nics):
            argv += ["-netdev", f"user,id=uplink{index},restrict=on",
                     "-device", f"virtio-net-pci,netdev=uplink{index},addr={UPLINK_SLOT + index:#x}"]
        return argv + firmware_argv(self.firmware, self.workdir)

    # --- life cycle

    def stop(self) -> None:
        """Stop QEMU, then remove the private keys made for this VM (new_ssh_key's, in its workdir):
        with the VM gone they open nothing, and a kept workdir (a failed run's console log, seed
        and public keys, for debugging) must not hold a secret."""
        super().stop()
        remove_private_keys(self.workdir)

    def start(self) -> None:
        tools.require(*tools.BOOT_TOOLS)
        if self.firmware is Firmware.UEFI:
            tools.require_files(OVMF_CODE, OVMF_VARS)
        overlay, seed = self._overlay(), self._seed()
        self.port = _free_port()
        self._write_ssh_config()
        self.started = time.monotonic()
        self.proc = start(self.qemu_argv(overlay, seed), log=self.workdir / "qemu.log")

    def wait_for_ssh(self, deadline: float = SSH_DEADLINE) -> float:
        """Seconds from QEMU start until `ssh guest true` succeeds; BootTimeout after deadline."""
        while time.monotonic() - self.started < deadline:
            if self.proc.poll() is not None:
                raise BootTimeout(f"QEMU exited with status {self.proc.returncode} before SSH was up; "
                                  f"see {self.workdir / 'qemu.log'} and console log {self.console}")
            if self.ssh(["true"], check=False, timeout=30).returncode == 0:
                self.boot_seconds = round(time.monotonic() - self.started, 1)
                return self.boot_seconds
            time.sleep(3)
        raise BootTimeout(f"{self.firmware} boot of {self.image.name} did not reach SSH within {deadline} s; "
                          f"console log: {self.console}")

    def ssh(self, command: list[str], *, check: bool = True, timeout: float = 120):
        # ssh hands the remote shell one string: quote, or arguments split again.
        return run([*self.ssh_argv(), shlex.join(command)], capture=True, check=check, timeout=timeout)

    def guest_agent(self, command: str, timeout: float = 30) -> dict:
        """Send one QEMU guest agent command over its socket and return the reply."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.qga_socket))
            sock.sendall(json.dumps({"execute": command}).encode() + b"\n")
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
        return json.loads(reply)



def cloud_config(config: dict) -> str:
    """User-data text. JSON is YAML, so json.dumps quotes keys and passwords safely for cloud-init."""
    return "#cloud-config\n" + json.dumps(config, indent=2) + "\n"


def _fat_volume(image: Path, label: str, files: dict[str, str]) -> None:
    """A small FAT volume holding FILES (path inside the volume: text), made without mounting."""
    run(["mkfs.vfat", "-n", label, "-C", image, "2048"])
    directories = sorted({str(parent) for path in files for parent in Path(path).parents} - {"."})
    if directories:  # sorted, so each parent is made before its children
        run(["mmd", "-i", image, *(f"::/{directory}" for directory in directories)])
    with tempfile.TemporaryDirectory(prefix="seed-") as tmp:
        for index, (path, text) in enumerate(files.items()):
            source = Path(tmp) / str(index)
            source.write_text(text)
            run(["mcopy", "-i", image, source, f"::/{path}"])


def nocloud_seed(image: Path, user_data: str) -> None:
    """cloud-init's NoCloud seed: a volume labeled CIDATA with meta-data and user-data."""
    meta_data = f"instance-id: boot-test-{uuid.uuid4()}\nlocal-hostname: boot-test\n"
    _fat_volume(image, "CIDATA", {"meta-data": meta_data, "user-data": user_data})


def config_drive(image: Path, public_key: str, user_data: str) -> None:
    """An OpenStack config drive as Nova writes one in vfat format (config_drive_format=vfat):
    label config-2, the instance's keypair in openstack/latest/meta_data.json's public_keys."""
    instance = str(uuid.uuid4())
    meta_data = {"uuid": instance, "name": "boot-test", "hostname": "boot-test", "launch_index": 0,
                 "availability_zone": "nova", "public_keys": {"boot-test": public_key},
                 "keys": [{"name": "boot-test", "type": "ssh", "data": public_key}]}
    _fat_volume(image, "config-2", {"openstack/latest/meta_data.json": json.dumps(meta_data),
                                    "openstack/latest/user_data": user_data})


def boot(image: Path, disk_size: int, firmware: Firmware, workdir: Path, deadline: float = SSH_DEADLINE,
         **options) -> VM:
    """Start a VM and wait for SSH; on any failure the VM is stopped before raising."""
    vm = VM(image=image, disk_size=disk_size, firmware=firmware, workdir=workdir, **options)
    vm.start()
    try:
        say(f"booting {image.name} by {firmware} (console log: {vm.console})")
        vm.wait_for_ssh(deadline)
    except BaseException:
        vm.stop()
        raise
    return vm


def boot_spec(spec: ImageSpec, image: Path, firmware: Firmware, workdir: Path, deadline: float = SSH_DEADLINE,
              **options) -> VM:
    """boot() sized for what the spec builds: a KVM host gets memory for guests of its
    own and one NIC per bridge uplink. OPTIONS go to VM (datasource, users)."""
    uplinks = sum(1 for bridge in spec.bridges if bridge.uplink)
    memory = HOST_MEMORY_MIB if spec.is_kvm_host else VM.memory_mib
    return boot(image, spec.disk_size, firmware, workdir, deadline, memory_mib=memory, uplink_nics=uplinks,
                **options)
