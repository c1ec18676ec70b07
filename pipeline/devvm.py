"""Everyday use of a built image: `./inv vm` boots it for a person, `./inv ssh` logs into it,
`./inv shell` opens its file system without booting (as mkosi's vm, ssh and shell do).

A VM is a throw-away qcow2 overlay over the artifact (only ever its read-only backing file) and a
NoCloud seed giving the image's default cloud user the person's own SSH public key, with SSH
forwarded from a loopback port. While it runs, build/NAME/vm/ is its state: vm.json (port, user,
key, who started it), qemu.pid, the overlay, the seed, the ssh_config `./inv ssh` uses and QEMU's
log. Attached, the serial console is the terminal and leaving it powers the VM off; detached, QEMU
daemonizes, outlives ./inv, and `./inv vm --stop` ends it. Whatever ends a VM, its state
directory goes with it. The pieces are pipeline.testvm's (overlay, seed, devices, the wait for
SSH) and pipeline.qemu's (the command, a free port, the accelerator).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import atomic, qemu, testvm, tools
from .artifacts import Artifacts, read_json
from .errors import PipelineError
from .locking import lock_or_refuse
from .progress import say, step
from .qemu import Firmware
from .run import attach, run
from .spec import ImageSpec

STATE_DIR = "vm"        # build/NAME/vm/
STATE_FILE = "vm.json"
PIDFILE = "qemu.pid"
LOCK = ".vm.lock"       # build/NAME/.vm.lock: held while a VM's state directory is made or removed
ALIAS = "vm"            # the VM's host name in its ssh_config
DEFAULT_KEYS = ("id_ed25519.pub", "id_ecdsa.pub", "id_rsa.pub")  # ssh-keygen's names, in ssh's order of preference
PUBLIC_KEY = re.compile(r"(?:ssh-[a-z0-9-]+|ecdsa-sha2-nistp[0-9]+|sk-[a-z0-9@.-]+) [A-Za-z0-9+/]+={0,3}(?: [^\n]*)?")
STOP_DEADLINE = 15      # seconds QEMU gets to end after SIGTERM before SIGKILL


# --- the user's key and the port


@dataclass(frozen=True)
class UserKey:
    public: Path
    text: str
    identity: Path  # what ssh is given: the private half, or the public one when only an agent has the private key


def user_key(key: str | None, home: Path) -> UserKey:
    """The public key to give the VM: KEY, else the first of ~/.ssh/id_ed25519.pub, id_ecdsa.pub,
    id_rsa.pub; a one-line error if there is none, or it is not one line of an OpenSSH public key."""
    if key:
        public = Path(key).expanduser()
        if not public.is_file():
            raise PipelineError(f"--key {key}: no such file")
    else:
        candidates = [home / ".ssh" / name for name in DEFAULT_KEYS]
        found = next((path for path in candidates if path.is_file()), None)
        if found is None:
            raise PipelineError(f"no SSH public key: none of {', '.join(str(path) for path in candidates)} exists; "
                                "make one with ssh-keygen, or name one with --key")
        public = found
    text = public.read_text(errors="replace").strip()
    if not PUBLIC_KEY.fullmatch(text):
        raise PipelineError(f"{public}: not an SSH public key (one line, such as 'ssh-ed25519 AAAA... comment')")
    private = public.with_suffix("") if public.suffix == ".pub" else None
    return UserKey(public, text, private if private is not None and private.is_file() else public)


def ssh_port(port: int | None) -> int:
    """PORT if loopback's PORT is free now (else a one-line error), or a free one."""
    if port is None:
        return qemu.free_port()
    if not 1 <= port <= 65535:
        raise PipelineError(f"--port {port}: not a port number (1-65535)")
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as error:
            raise PipelineError(f"--port {port}: 127.0.0.1:{port} is in use ({error.strerror}); "
                                "choose another, or leave --port out for a free one") from None
    return port


# --- the state of a running VM


def state_dir(art: Artifacts) -> Path:
    return art.directory / STATE_DIR


def _process(pid: int) -> str | None:
    """The command line of a live process (arguments joined by spaces); None if there is none."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None
    return None if state == "Z" else cmdline.replace(b"\0", b" ").decode(errors="replace")


def qemu_pid(directory: Path) -> int | None:
    """The pid of the QEMU that runs the VM of state DIRECTORY, if it still runs: the pid its
    pidfile names, if that process is QEMU with this directory's overlay (not a reused pid)."""
    try:
        pid = int((directory / PIDFILE).read_text().strip())
    except (OSError, ValueError):
        return None
    cmdline = _process(pid)
    return pid if cmdline is not None and qemu.QEMU in cmdline and str(directory / "overlay.qcow2") in cmdline \
        else None


@dataclass(frozen=True)
class Running:
    """A VM of an image, as its state directory describes it."""

    image: str
    directory: Path
    pid: int | None          # QEMU's; None while it is being started
    port: int
    user: str
    identity: Path
    detached: bool

    @property
    def ssh_config(self) -> Path:
        return self.directory / "ssh_config"

    def ssh_argv(self) -> list[str]:
        """ssh into the VM, up to the remote command: the way ./inv ssh does."""
        return ["ssh", "-F", str(self.ssh_config), ALIAS]

    def plain_ssh(self) -> str:
        """The same, written out for a terminal (no file of ours needed)."""
        return shlex.join(["ssh", "-p", str(self.port), "-i", str(self.identity), "-o", "IdentitiesOnly=yes",
                           "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                           f"{self.user}@127.0.0.1"])


def read_state(art: Artifacts) -> tuple[Running, int] | None:
    """The VM's state and the pid of the ./inv that made it; None when there is no state directory
    or it has no readable vm.json."""
    directory = state_dir(art)
    try:
        state = read_json(directory / STATE_FILE, "no VM")
        running = Running(art.name, directory, qemu_pid(directory), int(state["port"]), str(state["user"]),
                          Path(state["identity"]), bool(state["detached"]))
        return running, int(state["owner"])
    except (PipelineError, KeyError, TypeError, ValueError):
        return None


def running(art: Artifacts) -> Running | None:
    """The image's VM if its QEMU runs."""
    state = read_state(art)
    return state[0] if state is not None and state[0].pid is not None else None


def _starting(art: Artifacts) -> int | None:
    """The pid of a ./inv vm that is still making the image's VM (no QEMU yet)."""
    state = read_state(art)
    if state is None or state[0].pid is not None:
        return None
    owner = state[1]
    return owner if owner != os.getpid() and _process(owner) is not None else None


def _end(pid: int, deadline: float = STOP_DEADLINE) -> None:
    """SIGTERM a process that is not our child (a daemonized QEMU), then SIGKILL; return once it is gone."""
    for signum, wait in ((signal.SIGTERM, deadline), (signal.SIGKILL, deadline)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
        until = time.monotonic() + wait
        while _process(pid) is not None and time.monotonic() < until:
            time.sleep(0.1)
        if _process(pid) is None:
            return
    raise PipelineError(f"QEMU (pid {pid}) did not end after SIGKILL")


def _remove(directory: Path) -> None:
    """Power off the VM of state DIRECTORY, if it runs, and remove the directory."""
    if (pid := qemu_pid(directory)) is not None:
        _end(pid)
    shutil.rmtree(directory, ignore_errors=True)


def _refuse_if_in_use(art: Artifacts, spec: ImageSpec) -> None:
    if (vm := running(art)) is not None:
        raise PipelineError(f"{spec.name} is already running (QEMU pid {vm.pid}, SSH on 127.0.0.1:{vm.port}): "
                            f"./inv ssh {spec.name} to log in, ./inv vm --stop {spec.name} to stop it")
    if (owner := _starting(art)) is not None:
        raise PipelineError(f"{spec.name} is being started by ./inv vm (pid {owner}); "
                            f"./inv vm --stop {spec.name} stops it")


# --- ./inv vm


def start(spec: ImageSpec, art: Artifacts, *, firmware: Firmware, key: str | None, port: int | None,
          detach: bool, home: Path | None = None) -> Running | None:
    """Boot a throw-away overlay of the built image. Detached, return once SSH answers, leaving it
    running; attached, return when the VM has been powered off (None). Every check that can fail
    comes before anything is written; a start that fails leaves no QEMU and no state directory."""
    art.read_info()  # "NAME has not been built: run ./inv build NAME"
    if spec.is_netboot:
        raise PipelineError(f"{spec.source}: image {spec.name!r} is a netboot image: it has no disk to boot")
    qemu.require(firmware, *tools.BOOT_TOOLS)
    chosen = user_key(key, home or Path.home())
    directory = state_dir(art)
    with lock_or_refuse(art.directory / LOCK, f"{spec.name}: another ./inv vm is starting or stopping it"):
        _refuse_if_in_use(art, spec)
        if directory.exists():
            say(f"removing {directory}: left by a VM that is gone")
            _remove(directory)
        forwarded = ssh_port(port)
        directory.mkdir()
        state = {"image": spec.name, "owner": os.getpid(), "port": forwarded, "user": testvm.CLOUD_USER,
                 "identity": str(chosen.identity), "public_key": str(chosen.public), "firmware": str(firmware),
                 "detached": detach}
        atomic.write_json(directory / STATE_FILE, state)
    try:
        vm = Running(spec.name, directory, None, forwarded, testvm.CLOUD_USER, chosen.identity, detach)
        vm.ssh_config.write_text(testvm.ssh_config(ALIAS, forwarded, testvm.CLOUD_USER, chosen.identity))
        overlay = testvm.make_overlay(art.qcow2, directory / "overlay.qcow2", spec.disk_size + testvm.GROWTH)
        seed = testvm.key_seed(directory / "seed.img", chosen.text, hostname=spec.name)
        argv = qemu_argv(spec, directory, firmware, forwarded, overlay, seed, detach)
        say(f"{spec.name}: {firmware}, {qemu.accelerator()[0].upper()}, SSH on 127.0.0.1:{forwarded} "
            f"as {testvm.CLOUD_USER} with {chosen.public}")
        if detach:
            return _detached(spec, vm, argv)
        say(f"serial console follows; Ctrl-A x (or Ctrl-C) powers the VM off and removes it. "
            f"From another terminal: ./inv ssh {spec.name}, or {vm.plain_ssh()}")
        status = attach(argv)
        say(f"{spec.name}: powered off ({'QEMU exit ' + str(status) if status else 'QEMU ended'}); "
            f"{directory} removed")
        return None
    except BaseException:
        if detach:  # an attached VM's state goes in the finally below, whatever happened
            _remove(directory)
        raise
    finally:
        if not detach:
            _remove(directory)


def qemu_argv(spec: ImageSpec, directory: Path, firmware: Firmware, port: int, overlay: Path, seed: Path,
              detach: bool) -> list[str]:
    """The VM's QEMU: the boot tests' devices and sizes; detached, it daemonizes (the parent
    exits once the VM runs) and its serial console goes to a file; attached, to the terminal."""
    sizes = testvm.resources(spec)
    argv = qemu.command(f"vm-{spec.name}", firmware=firmware, memory_mib=sizes["memory_mib"],
                        console=directory / "console.log" if detach else None, workdir=directory,
                        devices=testvm.devices(overlay, seed, port, directory / "qga.sock", sizes["uplink_nics"]),
                        cpus=qemu.vm_cpus(), pidfile=directory / PIDFILE)
    return [*argv, "-daemonize"] if detach else argv


def _detached(spec: ImageSpec, vm: Running, argv: list[str]) -> Running:
    started = time.monotonic()
    run(argv, log=vm.directory / "qemu.log")  # returns once the daemon runs; it is no child of ours
    pid = qemu_pid(vm.directory)
    if pid is None:
        raise PipelineError(f"{spec.name}: QEMU ended right after it started; see {vm.directory / 'qemu.log'}")
    with step(f"waiting for SSH on 127.0.0.1:{vm.port} (console log {vm.directory / 'console.log'})"):
        testvm.await_ssh([*vm.ssh_argv(), "--"], lambda: None if qemu_pid(vm.directory) else "it is gone", started,
                         testvm.SSH_DEADLINE, f"{spec.name}'s boot",
                         f"{vm.directory / 'qemu.log'} and the console log {vm.directory / 'console.log'}",
                         vm.directory / "console.log")
    return Running(vm.image, vm.directory, pid, vm.port, vm.user, vm.identity, vm.detached)


def stop(art: Artifacts) -> bool:
    """Power off the image's VM and remove its state directory; False if there was none."""
    directory = state_dir(art)
    if not directory.exists():
        return False
    with lock_or_refuse(art.directory / LOCK, f"{art.name}: another ./inv vm is starting or stopping it"):
        state = read_state(art)
        _remove(directory)
    if state is not None and not state[0].detached and (owner := state[1]) != os.getpid():
        # An attached ./inv vm: its QEMU is gone, so it returns and says so; let it finish first.
        until = time.monotonic() + STOP_DEADLINE
        while _process(owner) is not None and time.monotonic() < until:
            time.sleep(0.1)
    return True


def stop_all(output_dir: Path) -> list[str]:
    """Stop every image's VM in OUTPUT_DIR; the names of those stopped."""
    stopped = []
    for directory in sorted(Path(output_dir).glob(f"*/{STATE_DIR}")):
        art = Artifacts(directory.parent.resolve(), directory.parent.name)
        if stop(art):
            stopped.append(art.name)
    return stopped


# --- ./inv ssh


def ssh(art: Artifacts, command: str | None) -> int:
    """Log into the image's running VM as its default user (or run COMMAND there); its exit status."""
    vm = running(art)
    if vm is None:
        raise PipelineError(f"{art.name} is not running (no VM in {state_dir(art)}): "
                            f"start one with ./inv vm {art.name} --detach")
    agent = {"SSH_AUTH_SOCK": os.environ["SSH_AUTH_SOCK"]} if "SSH_AUTH_SOCK" in os.environ else {}
    return attach([*vm.ssh_argv(), *(["--", command] if command else [])], env=agent)


# --- ./inv shell


def guestfish_environment() -> dict[str, str]:
    """libguestfs's settings as the offline check uses them; the user's own settings win."""
    own = {key: value for key, value in os.environ.items() if key.startswith(("LIBGUESTFS_", "SUPERMIN_"))}
    return {**own, **qemu.libguestfs_settings()}


def shell(spec: ImageSpec, art: Artifacts, *, writable: bool = False) -> int:
    """guestfish on the image's file systems, mounted as the image mounts them (inspection, -i):
    read-only on the artifact, or with WRITABLE on a temporary overlay removed afterwards. The
    artifact is never written. Commands come from the terminal, or from stdin when it is not one.
    Returns guestfish's exit status."""
    art.read_info()
    if spec.is_netboot:
        raise PipelineError(f"{spec.source}: image {spec.name!r} is a netboot image: it has no disk to open")
    tools.require("guestfish", "qemu-img")
    environment = guestfish_environment()
    if not writable:
        say(f"opening {art.qcow2} read-only with libguestfs (its appliance starts in about 20 s under TCG); "
            "--rw writes to a throw-away overlay")
        return attach(["guestfish", "--ro", "--format=qcow2", "-a", art.qcow2, "-i"], env=environment)
    with tempfile.TemporaryDirectory(prefix=".shell-", dir=art.directory) as scratch:
        overlay = testvm.make_overlay(art.qcow2, Path(scratch) / "overlay.qcow2")
        say(f"opening {spec.name} writable on a throw-away overlay ({overlay}, removed when guestfish ends; "
            "the artifact is not written)")
        return attach(["guestfish", "--rw", "--format=qcow2", "-a", overlay, "-i"], env=environment)


def describe(vm: Running) -> dict[str, Any]:
    """The VM as ./inv status reports it."""
    return {"pid": vm.pid, "port": vm.port, "user": vm.user, "detached": vm.detached,
            "ssh": vm.plain_ssh()}

