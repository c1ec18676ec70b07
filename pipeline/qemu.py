"""The one QEMU command of every VM the pipeline runs: the boot tests' guests (pipeline.testvm),
the PXE boot test's nodes (pipeline.deploy.pxenode) and the deploy test's (pipeline.deploy.nodes).

All are q35 machines with no default devices, a serial console written to a file, SeaBIOS or OVMF,
and NICs on QEMU's user network (the host at GUEST_HOST, forwarded ports on loopback). Each
caller adds its own devices, in its own order: PCI slots, hence NIC names, follow that order.

KVM is used only where it really runs a guest: /dev/kvm exists on machines whose nested KVM
aborts QEMU or hangs guests, so probe_kvm boots the host's kernel and waits for it to panic on
purpose; otherwise TCG.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from . import tools
from .errors import PipelineError
from .progress import say
from .run import ended, spawn

if TYPE_CHECKING:  # the gateway (run) alone starts processes; this is only the type it hands back
    from subprocess import Popen

QEMU = "qemu-system-x86_64"
OVMF_CODE = "/usr/share/OVMF/OVMF_CODE_4M.fd"
OVMF_VARS = "/usr/share/OVMF/OVMF_VARS_4M.fd"
KVM_PROBE_DEADLINE = 30
PROBE_CACHE = Path("/run/kvm-image-pipeline/kvm-probe")
GUEST_HOST = "10.0.2.2"  # the host as QEMU's user network shows it to the guest
# Extra NICs (bridge uplinks) sit at these PCI slots of the q35 root bus, so udev
# names them enp0s8, enp0s9, ... whatever else the VM has.
UPLINK_SLOT = 8
CONSOLE_TAIL = 3  # console lines quoted when a boot's deadline passes
ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|[\x00-\x08\x0b-\x1f\x7f]")  # firmware's colours and cursor moves


class Firmware(StrEnum):
    BIOS = "bios"
    UEFI = "uefi"


def plain_console(console: str) -> str:
    """The console's text without the firmware's escape sequences, carriage returns as line ends."""
    return ESCAPES.sub("", console.replace("\r", "\n"))


def console_tail(console: str, lines: int = CONSOLE_TAIL) -> str:
    """The last non-empty console lines, cleaned of escape sequences, as one line."""
    cleaned = [text.strip() for text in plain_console(console).splitlines()]
    return " | ".join([text for text in cleaned if text][-lines:]) or "(nothing)"


def free_port() -> int:
    """A TCP port free on loopback now (for a forwarded guest port or a server the guest reaches)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require(firmware: Firmware, *more_tools: str) -> None:
    """QEMU, the firmware's files and MORE_TOOLS are installed, else ToolMissing naming the package."""
    tools.require(QEMU, *more_tools)
    if firmware is Firmware.UEFI:
        tools.require_files(OVMF_CODE, OVMF_VARS)


def firmware_argv(firmware: Firmware, workdir: Path) -> list[str]:
    """QEMU's firmware options: SeaBIOS is q35's default; UEFI is OVMF, with a fresh copy of its
    variable store in WORKDIR (the firmware writes its boot entries there)."""
    if firmware is not Firmware.UEFI:
        return []
    variables = workdir / "OVMF_VARS.fd"
    shutil.copyfile(OVMF_VARS, variables)
    return ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
            "-drive", f"if=pflash,format=raw,unit=1,file={variables}"]


def user_nic(netdev_id: str, netdev: Sequence[str] = (), device: Sequence[str] = ()) -> list[str]:
    """A virtio NIC on its own user network: NETDEV options (hostfwd=, tftp=, bootfile=, restrict=)
    and DEVICE options (mac=, bootindex=, addr=)."""
    return ["-netdev", ",".join(["user", f"id={netdev_id}", *netdev]),
            "-device", ",".join(["virtio-net-pci", f"netdev={netdev_id}", *device])]


def ssh_forward(port: int, guest_address: str = "") -> str:
    """A user network's option forwarding loopback's PORT to the guest's SSH port."""
    return f"hostfwd=tcp:127.0.0.1:{port}-{guest_address}:22"


def uplink_nics(count: int) -> list[str]:
    """COUNT NICs with no network behind them (restrict=on), at UPLINK_SLOT on: for OVS bridges to own."""
    argv: list[str] = []
    for index in range(count):
        argv += user_nic(f"uplink{index}", ["restrict=on"], [f"addr={UPLINK_SLOT + index:#x}"])
    return argv


RNG = ["-device", "virtio-rng-pci"]


def command(name: str, *, firmware: Firmware, memory_mib: int, console: Path | None, workdir: Path,
            devices: Sequence[str | Path] = (), cpus: int | None = None, pidfile: Path | None = None,
            reboot: bool = True, accel: tuple[str, str] | None = None) -> list[str]:
    """The argv of a q35 VM named NAME: DEVICES (disks, NICs, ...) in the order given, the serial
    console written to CONSOLE, the firmware's variable store copied into WORKDIR.

    console: None puts the serial console on QEMU's own terminal instead (stdio, with QEMU's
    escape keys: Ctrl-A x quits, Ctrl-A h lists the others).
    cpus: None for QEMU's default (one). reboot: False makes a guest's reboot or panic end QEMU.
    accel: (accelerator, cpu model); None for this machine's (accelerator()).
    """
    accelerator_name, cpu = accel or accelerator()
    argv = [QEMU, "-name", name, "-machine", f"q35,accel={accelerator_name}", "-cpu", cpu]
    if cpus is not None:
        argv += ["-smp", str(cpus)]
    # No default VGA, NIC, CD-ROM or parallel port: less for TCG to emulate and probe.
    argv += ["-m", str(memory_mib), "-nodefaults", "-display", "none", "-monitor", "none"]
    if not reboot:
        argv.append("-no-reboot")
    argv += ["-serial", "mon:stdio" if console is None else f"file:{console}"]
    if pidfile is not None:
        argv += ["-pidfile", str(pidfile)]
    return argv + [str(arg) for arg in devices] + firmware_argv(firmware, workdir)


# --- the accelerator


def probe_kvm(kernel: Path) -> bool:
    """True if a KVM guest really runs here: the kernel must reach its (deliberate) panic."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    with tempfile.TemporaryDirectory(prefix="kvm-probe-") as tmp:
        console = Path(tmp) / "console.log"
        argv = command("kvm-probe", firmware=Firmware.BIOS, memory_mib=512, console=console, workdir=Path(tmp),
                       devices=["-kernel", kernel, "-append", "console=ttyS0 panic=-1"], reboot=False,
                       accel=("kvm", "host"))
        # A timeout is a hung guest: the failure this probe exists for.
        with spawn(argv, log=Path(tmp) / "qemu.log") as proc, contextlib.suppress(Exception):
            proc.wait(timeout=KVM_PROBE_DEADLINE)
        return "Kernel panic" in console.read_text(errors="replace")


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


def libguestfs_settings() -> dict[str, str]:
    """libguestfs's backend settings (as its environment variables) where the user set none: the
    direct backend, and TCG where /dev/kvm exists but nested KVM hangs guests."""
    settings = {}
    if "LIBGUESTFS_BACKEND" not in os.environ:
        settings["LIBGUESTFS_BACKEND"] = "direct"
    if "LIBGUESTFS_BACKEND_SETTINGS" not in os.environ and not kvm_works():
        settings["LIBGUESTFS_BACKEND_SETTINGS"] = "force_tcg"
    return settings


# Under TCG, "max" offers AVX2 and the SHA extensions, which glibc and OpenSSL then use and TCG
# emulates slowly: with qemu64, sha256sum ran 3.3x and boots reached SSH 8-17% sooner (the
# README's Benchmark section). qemu64 is x86-64's baseline, all Debian needs. Without its SVM flag:
# with it, a KVM host image loaded kvm_amd on TCG's emulated SVM, libvirt made KVM VMs there to
# probe, and each flipped kernel static keys at run time, which QEMU's multi-threaded TCG races
# (testvm.EMULATOR_RACE): a CI deploy node died so in libvirt's start. Its guests are type='qemu'.
TCG_CPU = "qemu64,-svm"


def accelerator() -> tuple[str, str]:
    """(accel, cpu) for this machine."""
    return ("kvm", "host") if kvm_works() else ("tcg", TCG_CPU)


# The vCPUs of each VM the pipeline boots (boot tests, ./inv vm, deploy nodes). Under TCG each vCPU
# is a host thread: alone, a host image reached SSH in 57-60 s with two and 86-95 s with one; but
# two VMs of two vCPUs at once on two cores did less than two VMs of one (each vCPU spins on locks
# that a descheduled one holds): 87-123 s against 72-99 s. So `./inv test`, whose sessions run two
# at a time, gives each VM half the cores (shared_vm_cpus; README, Benchmark).
VM_CPUS_VARIABLE = "PIPELINE_VM_CPUS"
DEFAULT_VM_CPUS = 2


def vm_cpus() -> int:
    """The vCPUs of a VM: $PIPELINE_VM_CPUS, else DEFAULT_VM_CPUS."""
    value = os.environ.get(VM_CPUS_VARIABLE, str(DEFAULT_VM_CPUS))
    if not re.fullmatch(r"[1-9][0-9]{0,2}", value):
        raise PipelineError(f"{VM_CPUS_VARIABLE}={value!r}: expected a number of vCPUs from 1 to 999")
    return int(value)


def shared_vm_cpus(sharing: int) -> int:
    """vCPUs for each of SHARING VMs that run at once: their share of the cores, at most the default."""
    return max(1, min(DEFAULT_VM_CPUS, (os.cpu_count() or 1) // sharing))


# --- a running VM


class Machine:
    """A QEMU process (self.proc) that a subclass's start() launches. Use as a context manager, so
    that it never outlives its block, nor a start that failed half-way."""

    proc: Popen | None = None
    _running: ExitStack | None = None

    def start(self) -> None:
        raise NotImplementedError

    def launch(self, argv: list[str], log: Path) -> None:
        """Start QEMU (run.spawn); stop() stops it."""
        self._running = ExitStack()
        self.proc = self._running.enter_context(spawn(argv, log=log))

    def ended(self) -> str | None:
        """None while QEMU runs; once it has ended, how ("exit 1", "killed by SIGKILL")."""
        return ended(self.proc) if self.proc is not None else "not started"

    def stop(self) -> None:
        running, self._running, self.proc = self._running, None, None
        if running is not None:
            running.close()

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
