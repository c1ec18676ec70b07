"""A built disk image booted as a throw-away VM, for the boot tests and the benchmark: a qcow2
overlay over the image, a seed that gives the image's default cloud user a fresh SSH key as a
cloud would (pipeline.seed: NoCloud, or an OpenStack config drive), SSH on a forwarded loopback
port, and the guest agent on a socket. The QEMU command is pipeline.qemu's.
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import qemu, tools
from .errors import CommandTimedOut, PipelineError
from .progress import say
from .qemu import Firmware
from .run import run
from .seed import Datasource, cloud_config, config_drive, nocloud_seed
from .spec import ImageSpec

# TCG boots reach SSH in 60-240 s, and a loaded machine (CI, two VMs and a build on two cores)
# may take several times that: wait while the console moves, up to the deadline; a console that
# says nothing new for CONSOLE_STALL seconds is a hung boot.
SSH_DEADLINE = 1200
CONSOLE_STALL = 300
# Seconds between SSH attempts. Before sshd listens an attempt costs the guest nothing (QEMU's
# forwarding is refused at once), so a boot is seen up within about a second of its first login.
SSH_POLL = 1
SSH_ATTEMPT_TIMEOUT = 30  # seconds one `ssh guest true` may take
GROWTH = 2**30              # the overlay is this much larger than the image, so growth is visible
BOOT_ID = "/proc/sys/kernel/random/boot_id"  # new on every boot
BOOT_ID_FORMAT = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
HOST_MEMORY_MIB = 3072      # a KVM host image runs throw-away guests of its own in the boot test
# The default user of Debian's cloud-init (/etc/cloud/cloud.cfg): a cloud user logs in as it, not as root.
CLOUD_USER = "debian"
PRIVATE_KEY_PREFIX = "id_"  # a VM's private keys in its workdir: id_NAME (and the public halves, id_NAME.pub)


class BootTimeout(PipelineError):
    pass


class KernelPanicked(BootTimeout):
    """The guest's kernel panicked: its console says so, and nothing will answer."""

    def __init__(self, message: str, emulator_race: bool):
        super().__init__(message)
        self.emulator_race = emulator_race


KERNEL_PANIC = b"Kernel panic - not syncing"
# A breakpoint trap in kernel text is QEMU's multi-threaded TCG racing the kernel's live code
# patching (text_poke_bp; Red Hat bug 2216496: "int3" oopses under TCG only, one boot in hundreds).
# Seen here twice in two days of benchmark boots, 2 s into the kernel; it is not the image's.
EMULATOR_RACE = b"Oops: int3"


def remove_private_keys(directory: Path) -> None:
    """Remove the private keys new_ssh_key made in directory (id_NAME), keeping their public halves."""
    for key in Path(directory).glob(f"{PRIVATE_KEY_PREFIX}*"):
        if key.suffix != ".pub":
            key.unlink(missing_ok=True)


def new_ssh_key(path: Path, comment: str) -> str:
    """A fresh passwordless ed25519 key pair at PATH (and PATH.pub); returns the public key."""
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path])
    return path.with_suffix(".pub").read_text().strip()


def make_overlay(image: Path, overlay: Path, size: int | None = None) -> Path:
    """A qcow2 OVERLAY over IMAGE, which stays its read-only backing file: every write of the VM
    (or of guestfish) goes to the overlay. SIZE: its virtual size (default the image's)."""
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", image, "-F", "qcow2", overlay,
         *([str(size)] if size is not None else [])])
    return overlay


def key_seed(seed: Path, public_key: str, datasource: Datasource = Datasource.NOCLOUD, users: Sequence[dict] = (),
             hostname: str = "boot-test") -> Path:
    """A seed giving the default cloud user PUBLIC_KEY, as a cloud would, with USERS beside it."""
    user_data = {"users": ["default", *users]}
    if datasource is Datasource.CONFIG_DRIVE:
        config_drive(seed, public_key, cloud_config(user_data))
    else:
        nocloud_seed(seed, cloud_config({**user_data, "ssh_authorized_keys": [public_key]}), hostname)
    return seed


def devices(overlay: Path, seed: Path, port: int, qga_socket: Path, uplinks: int = 0) -> list[str]:
    """A VM's devices: the overlay, the seed, a NIC with SSH forwarded from loopback's PORT, the
    guest agent's channel on QGA_SOCKET, a random number source, and UPLINKS NICs for OVS bridges."""
    return ["-drive", f"file={overlay},if=virtio,format=qcow2,discard=unmap",
            "-drive", f"file={seed},if=virtio,format=raw,readonly=on",
            *qemu.user_nic("net0", [qemu.ssh_forward(port)]),
            "-device", "virtio-serial-pci",
            "-chardev", f"socket,id=qga0,path={qga_socket},server=on,wait=off",
            "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            *qemu.RNG, *qemu.uplink_nics(uplinks)]


def resources(spec: ImageSpec) -> dict[str, int]:
    """What a VM of SPEC needs beside the defaults: a KVM host memory for guests of its own and
    one NIC per bridge uplink."""
    return {"memory_mib": HOST_MEMORY_MIB if spec.is_kvm_host else VM.memory_mib,
            "uplink_nics": sum(1 for bridge in spec.bridges if bridge.uplink)}


def await_ssh(ssh_argv: Sequence[str | Path], ended: Callable[[], str | None], started: float, deadline: float,
              what: str, logs: str, console: Path | None = None, stall: float = CONSOLE_STALL,
              command: Sequence[str] = ("true",)) -> float:
    """Seconds from STARTED (time.monotonic) until `SSH_ARGV COMMAND` succeeds. BootTimeout, naming
    WHAT and LOGS and quoting CONSOLE's last lines, once ENDED says how QEMU ended, after DEADLINE
    seconds, or once CONSOLE has not grown for STALL seconds."""
    console_size, moved, last_ssh_error = -1, time.monotonic(), ""
    while (now := time.monotonic()) - started < deadline:
        if (how := ended()) is not None:
            raise BootTimeout(f"QEMU ended ({how}) before SSH was up; {_last_lines(console)}see {logs}")
        if console is not None:
            if (size := _size(console)) != console_size:
                console_size, moved = size, now
                _raise_on_panic(console, what, logs)
            elif now - moved > stall:
                raise BootTimeout(f"{what} stalled: no SSH login, and nothing new on the console for {stall} s "
                                  f"({round(now - started)} s after start); {last_ssh_error}{_last_lines(console)}"
                                  f"see {logs}")
        try:
            attempt = run([*ssh_argv, *command], capture=True, check=False, timeout=SSH_ATTEMPT_TIMEOUT)
        except CommandTimedOut:
            # sshd is up but the login is slow: under TCG on a loaded machine the first session's
            # set-up (PAM, logind, the user's systemd) has taken over 30 s. Another attempt, within
            # the deadline, not a failed boot.
            last_ssh_error = f"last ssh attempt: no answer within {SSH_ATTEMPT_TIMEOUT} s; "
            continue
        if attempt.returncode == 0:
            return round(time.monotonic() - started, 1)
        if errors := (attempt.stderr or "").strip().splitlines():
            last_ssh_error = f"last ssh error: {errors[-1]}; "  # a boot that is up but refuses the key says so
        time.sleep(SSH_POLL)
    raise BootTimeout(f"{what} did not reach SSH within {deadline} s; {last_ssh_error}{_last_lines(console)}see {logs}")


def _raise_on_panic(console: Path, what: str, logs: str) -> None:
    """KernelPanicked if CONSOLE shows a kernel panic: a panicked guest hangs, and waiting for its
    console to stall would cost CONSOLE_STALL seconds."""
    try:
        text = console.read_bytes()
    except FileNotFoundError:  # QEMU has not made it yet
        return
    if KERNEL_PANIC in text:
        raise KernelPanicked(f"{what}: the kernel panicked; {_last_lines(console)}see {logs}",
                             emulator_race=EMULATOR_RACE in text and qemu.accelerator()[0] == "tcg")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _last_lines(console: Path | None) -> str:
    """The console's last lines for an error message, or nothing without a console."""
    if console is None or not console.exists():
        return ""
    return f"last console lines: {qemu.console_tail(console.read_bytes()[-4096:].decode(errors='replace'))}; "


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


@dataclass
class VM(qemu.Machine):
    """A running guest. Use as a context manager, so the QEMU process never outlives it."""

    image: Path          # the artifact: only ever a read-only backing file
    disk_size: int
    firmware: Firmware
    workdir: Path
    memory_mib: int = 2048
    cpus: int = field(default_factory=qemu.vm_cpus)
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
        return make_overlay(self.image, self.workdir / "overlay.qcow2", self.disk_size + GROWTH)

    def _seed(self) -> Path:
        """The seed volume: a fresh key for the default user, and user-data with self.users."""
        return key_seed(self.workdir / "seed.img", new_ssh_key(self.key, "boot-test"), self.datasource, self.users)

    def ssh_config_for(self, user: str, key: Path) -> Path:
        """An ssh_config whose host `guest` is this VM, logged into as USER with KEY only."""
        config = self.ssh_config if (user, key) == (CLOUD_USER, self.key) else self.workdir / f"ssh_config-{user}"
        config.write_text(ssh_config("guest", self.port, user, key))
        return config

    def ssh_argv(self, user: str = CLOUD_USER, key: Path | None = None, *options: str) -> list[str | Path]:
        """ssh into this VM as USER with KEY (default: the seed's key), up to the remote command."""
        key = key or self.key
        config = self.ssh_config if (user, key) == (CLOUD_USER, self.key) else self.ssh_config_for(user, key)
        return ["ssh", "-F", config, *options, "guest", "--"]

    def _write_ssh_config(self) -> None:
        self.ssh_config_for(CLOUD_USER, self.key)

    def qemu_argv(self, overlay: Path, seed: Path) -> list[str]:
        return qemu.command(f"boot-test-{self.firmware}", firmware=self.firmware, memory_mib=self.memory_mib,
                            console=self.console, workdir=self.workdir, cpus=self.cpus,
                            devices=devices(overlay, seed, self.port, self.qga_socket, self.uplink_nics),
                            pidfile=self.workdir / "qemu.pid")

    # --- life cycle

    def stop(self) -> None:
        """Stop QEMU, then remove the private keys made for this VM (new_ssh_key's, in its workdir):
        with the VM gone they open nothing, and a kept workdir (a failed run's console log, seed
        and public keys, for debugging) must not hold a secret."""
        super().stop()
        remove_private_keys(self.workdir)

    def start(self) -> None:
        qemu.require(self.firmware, *tools.BOOT_TOOLS)
        overlay, seed = self._overlay(), self._seed()
        self.port = qemu.free_port()
        self._write_ssh_config()
        self.started = time.monotonic()
        self.launch(self.qemu_argv(overlay, seed), log=self.workdir / "qemu.log")

    def wait_for_ssh(self, deadline: float = SSH_DEADLINE) -> float:
        """Seconds from QEMU start until `ssh guest true` succeeds; BootTimeout after deadline."""
        self.boot_seconds = await_ssh(self.ssh_argv(), self.ended, self.started, deadline,
                                      f"{self.firmware} boot of {self.image.name}",
                                      self._logs, self.console)
        return self.boot_seconds

    def reboot(self, deadline: float = SSH_DEADLINE) -> float:
        """Reboot from inside, as its user would, and wait for SSH on the new boot (its boot id
        differs): seconds from the reboot until then."""
        before = self.ssh(["cat", BOOT_ID]).stdout.strip()
        if not BOOT_ID_FORMAT.fullmatch(before):
            raise PipelineError(f"{BOOT_ID} in the guest is not a boot id: {before[:80]!r}")
        started = time.monotonic()
        with contextlib.suppress(CommandTimedOut):  # its session may end before it answers
            self.ssh(["sudo", "systemctl", "reboot"], check=False, timeout=SSH_ATTEMPT_TIMEOUT)
        return await_ssh(self.ssh_argv(), self.ended, started, deadline, f"reboot of {self.image.name}",
                         self._logs, self.console, command=["grep", "-qvx", before, BOOT_ID])

    @property
    def _logs(self) -> str:
        return f"{self.workdir / 'qemu.log'} and console log {self.console}"

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



def boot(image: Path, disk_size: int, firmware: Firmware, workdir: Path, deadline: float = SSH_DEADLINE,
         **options) -> VM:
    """Start a VM and wait for SSH; on any failure the VM is stopped before raising. A boot that
    QEMU's TCG race panicked (EMULATOR_RACE) is started once more, its console kept beside."""
    for attempt in (1, 2):
        vm = VM(image=image, disk_size=disk_size, firmware=firmware, workdir=workdir, **options)
        vm.start()
        try:
            say(f"booting {image.name} by {firmware} (console log: {vm.console})")
            vm.wait_for_ssh(deadline)
            return vm
        except KernelPanicked as panic:
            vm.stop()
            if attempt == 2 or not panic.emulator_race:
                raise
            kept = vm.console.rename(vm.console.with_name("console-panicked.log"))
            say(f"warning: {panic}; QEMU's TCG race with the kernel's code patching, not the image: "
                f"booting again (that console: {kept})")
        except BaseException:
            vm.stop()
            raise
    raise AssertionError("unreachable")


def boot_spec(spec: ImageSpec, image: Path, firmware: Firmware, workdir: Path, deadline: float = SSH_DEADLINE,
              **options) -> VM:
    """boot() sized for what the spec builds: a KVM host gets memory for guests of its
    own and one NIC per bridge uplink. OPTIONS go to VM (datasource, users)."""
    return boot(image, spec.disk_size, firmware, workdir, deadline, **resources(spec), **options)
