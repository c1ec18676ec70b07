"""./inv vm, ssh and shell (pipeline.devvm) with the subprocess gateway faked: the detached QEMU's
argv, the state directory, the one-line errors, and nothing left behind. Where QEMU would run, the
fake starts a stand-in process whose command line names QEMU and the overlay, as QEMU's does, so
that finding, refusing and stopping a running VM are exercised on a real process."""

import json
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import devvm, seed, testvm
from pipeline import spec as specs
from pipeline.artifacts import artifacts_for
from pipeline.errors import CommandFailed, PipelineError
from pipeline.qemu import Firmware

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBx1Hs1hB8lTpyxWXGnmD6Rk0U3oUzdqM5jlkUy5m1xR user@laptop"


@pytest.fixture
def home(tmp_path):
    """A HOME with an ed25519 and an RSA key pair (ssh-keygen's names)."""
    ssh = tmp_path / "home" / ".ssh"
    ssh.mkdir(parents=True)
    for name in ("id_ed25519", "id_rsa"):
        (ssh / name).write_text("PRIVATE")
        (ssh / f"{name}.pub").write_text(KEY + "\n")
    return tmp_path / "home"


@pytest.fixture
def built(tmp_path):
    spec = specs.load().get("guest-image")
    art = artifacts_for(spec, tmp_path / "out")
    art.directory.mkdir(parents=True)
    art.info.write_text(json.dumps({"version": "20261201-abcdef01"}))
    art.qcow2.write_bytes(b"qcow2")
    return spec, art


class FakeGateway:
    """pipeline.run's run and attach as devvm, testvm and seed call them."""

    def __init__(self, ssh_answers=True):
        self.calls: list[list[str]] = []
        self.stand_ins: list[subprocess.Popen] = []
        self.ssh_answers = ssh_answers

    def run(self, argv, **options):
        argv = [str(arg) for arg in argv]
        self.calls.append(argv)
        if argv[0] == "qemu-img":
            Path(argv[argv.index("-F") + 2]).write_bytes(b"overlay")
        elif argv[0] == "mkfs.vfat":
            Path(argv[-2]).write_bytes(b"fat")
        elif argv[0] == "qemu-system-x86_64":
            assert "-daemonize" in argv
            self._stand_in(argv)
        elif argv[0] == "ssh":
            return subprocess.CompletedProcess(argv, 0 if self.ssh_answers else 255, "", "")
        return subprocess.CompletedProcess(argv, 0, "", "")

    def attach(self, argv, **options):
        argv = [str(arg) for arg in argv]
        self.calls.append(argv)
        if argv[0] == "qemu-system-x86_64":
            self._stand_in(argv).terminate()  # the user left the console
        return 0

    def _stand_in(self, argv):
        overlay = next(a.split("file=")[1].split(",")[0] for a in argv if "overlay.qcow2" in a)
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "qemu-system-x86_64", overlay])
        self.stand_ins.append(proc)
        while overlay.encode() not in Path(f"/proc/{proc.pid}/cmdline").read_bytes():  # until it has exec'd
            time.sleep(0.01)
        Path(argv[argv.index("-pidfile") + 1]).write_text(f"{proc.pid}\n")
        return proc

    def qemu(self) -> list[str]:
        return next(call for call in self.calls if call[0] == "qemu-system-x86_64")


@pytest.fixture
def gateway(monkeypatch):
    fake = FakeGateway()
    for module in (devvm, testvm, seed):
        monkeypatch.setattr(module, "run", fake.run)
    monkeypatch.setattr(devvm, "attach", fake.attach)
    monkeypatch.setattr(devvm.qemu, "accelerator", lambda: ("tcg", "max"))
    monkeypatch.setattr(devvm.qemu, "require", lambda *args: None)
    monkeypatch.setattr(testvm.time, "sleep", lambda seconds: None)
    yield fake
    for proc in fake.stand_ins:
        proc.kill()
        proc.wait()


def test_the_default_key_is_the_first_of_ssh_keygens_names(home):
    chosen = devvm.user_key(None, home)
    assert chosen.public == home / ".ssh/id_ed25519.pub" and chosen.text == KEY
    assert chosen.identity == home / ".ssh/id_ed25519"


def test_no_key_is_one_line_naming_the_files_and_ssh_keygen(tmp_path):
    with pytest.raises(PipelineError) as error:
        devvm.user_key(None, tmp_path)
    message = str(error.value)
    assert "\n" not in message and "ssh-keygen" in message and "--key" in message
    for name in ("id_ed25519.pub", "id_ecdsa.pub", "id_rsa.pub"):
        assert str(tmp_path / ".ssh" / name) in message


def test_a_given_key_is_checked(tmp_path):
    with pytest.raises(PipelineError, match=r"^--key /nowhere/k.pub: no such file$"):
        devvm.user_key("/nowhere/k.pub", tmp_path)
    bad = tmp_path / "k.pub"
    bad.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nxyz\n")
    with pytest.raises(PipelineError, match=rf"^{bad}: not an SSH public key"):
        devvm.user_key(str(bad), tmp_path)
    bad.write_text(KEY + "\n")  # no private half beside it: ssh offers the agent's, found by the public key
    assert devvm.user_key(str(bad), tmp_path).identity == bad


def test_a_busy_port_is_refused_in_one_line():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(PipelineError, match=rf"^--port {port}: 127.0.0.1:{port} is in use .*leave --port out"):
            devvm.ssh_port(port)
    assert devvm.ssh_port(port) == port  # free again
    with pytest.raises(PipelineError, match=r"^--port 70000: not a port number"):
        devvm.ssh_port(70000)


def test_an_image_not_built_is_refused_before_anything(tmp_path, gateway, home):
    spec = specs.load().get("guest-image")
    art = artifacts_for(spec, tmp_path / "out")
    with pytest.raises(PipelineError, match=r"guest-image has not been built: run ./inv build guest-image$"):
        devvm.start(spec, art, firmware=Firmware.BIOS, key=None, port=None, detach=True, home=home)
    assert gateway.calls == [] and not art.directory.exists()


def test_detached_vm_daemonizes_with_its_state_and_stops(built, gateway, home):
    spec, art = built
    vm = devvm.start(spec, art, firmware=Firmware.BIOS, key=None, port=None, detach=True, home=home)
    state = art.directory / "vm"
    argv = gateway.qemu()
    assert argv[:argv.index("-cpu")] == ["qemu-system-x86_64", "-name", "vm-guest-image", "-machine", "q35,accel=tcg"]
    assert argv[-1] == "-daemonize"
    assert argv[argv.index("-serial") + 1] == f"file:{state}/console.log"
    assert argv[argv.index("-pidfile") + 1] == f"{state}/qemu.pid"
    assert f"file={state}/overlay.qcow2,if=virtio,format=qcow2,discard=unmap" in argv
    assert f"file={state}/seed.img,if=virtio,format=raw,readonly=on" in argv
    assert f"user,id=net0,hostfwd=tcp:127.0.0.1:{vm.port}-:22" in argv
    # The overlay is backed by the artifact, which QEMU never opens itself.
    overlay = next(call for call in gateway.calls if call[0] == "qemu-img")
    assert overlay[overlay.index("-b") + 1] == str(art.qcow2) and str(art.qcow2) not in " ".join(argv)
    # The seed gives the default user the person's own key, and the image's name as host name.
    user_data = next(call for call in gateway.calls if call[0] == "mcopy" and call[-1] == "::/user-data")
    assert user_data  # its text was a temporary file; what it held is seed.cloud_config's (test_boot_seed)
    recorded = json.loads((state / "vm.json").read_text())
    assert recorded["port"] == vm.port and recorded["user"] == "debian" and recorded["detached"] is True
    assert recorded["identity"] == str(home / ".ssh/id_ed25519")
    assert f"Port {vm.port}" in (state / "ssh_config").read_text()
    assert devvm.running(art) == vm and vm.pid == gateway.stand_ins[0].pid
    assert shlex.split(vm.plain_ssh())[-1] == "debian@127.0.0.1"

    refused = (r"^guest-image is already running \(QEMU pid \d+, SSH on 127.0.0.1:\d+\): "
               r"./inv ssh guest-image to log in, ./inv vm --stop guest-image to stop it$")
    with pytest.raises(PipelineError, match=refused):
        devvm.start(spec, art, firmware=Firmware.BIOS, key=None, port=None, detach=True, home=home)

    assert devvm.stop(art) is True
    assert gateway.stand_ins[0].wait(timeout=5) is not None  # SIGTERM reached "QEMU"
    assert not state.exists() and devvm.running(art) is None
    assert devvm.stop(art) is False


def test_ssh_runs_the_command_with_the_vms_config_and_passes_its_status(built, gateway, home, monkeypatch):
    spec, art = built
    with pytest.raises(PipelineError, match=r"^guest-image is not running \(no VM in .*\): "
                                            r"start one with ./inv vm guest-image --detach$"):
        devvm.ssh(art, "getenforce")
    devvm.start(spec, art, firmware=Firmware.BIOS, key=None, port=None, detach=True, home=home)
    monkeypatch.setattr(devvm, "attach", lambda argv, **options: (gateway.calls.append([str(a) for a in argv]), 3)[1])
    assert devvm.ssh(art, "getenforce") == 3
    assert gateway.calls[-1] == ["ssh", "-F", str(art.directory / "vm/ssh_config"), "vm", "--", "getenforce"]
    devvm.stop(art)


def test_a_vm_whose_qemu_is_gone_is_not_running_and_is_cleared(built, gateway, home):
    spec, art = built
    devvm.start(spec, art, firmware=Firmware.BIOS, key=None, port=None, detach=True, home=home)
    gateway.stand_ins[0].kill()
    gateway.stand_ins[0].wait()
    assert devvm.running(art) is None
    devvm.start(spec, art, firmware=Firmware.BIOS, key=None, port=None, detach=True, home=home)
    assert devvm.running(art) is not None
    devvm.stop(art)


def test_a_failed_start_leaves_no_state_and_no_qemu(built, gateway, home, monkeypatch):
    spec, art = built

    def failing(argv, **options):
        if str(argv[0]) == "qemu-system-x86_64":
            gateway._stand_in([str(a) for a in argv])  # it started, then the daemon's parent failed
            raise CommandFailed([str(a) for a in argv], 1, "see qemu.log")
        return gateway.run(argv, **options)

    monkeypatch.setattr(devvm, "run", failing)
    with pytest.raises(CommandFailed):
        devvm.start(spec, art, firmware=Firmware.UEFI, key=None, port=None, detach=True, home=home)
    assert not (art.directory / "vm").exists()
    assert gateway.stand_ins[0].wait(timeout=5) is not None


def test_a_vm_that_never_answers_ssh_is_stopped_and_removed(built, gateway, home, monkeypatch):
    spec, art = built
    gateway.ssh_answers = False
    monkeypatch.setattr(testvm, "SSH_DEADLINE", 0.5)
    with pytest.raises(testvm.BootTimeout, match=r"^guest-image's boot did not reach SSH within 0.5 s; see "):
        devvm.start(spec, art, firmware=Firmware.BIOS, key=None, port=None, detach=True, home=home)
    assert not (art.directory / "vm").exists()
    assert gateway.stand_ins[0].wait(timeout=5) is not None


def test_attached_vm_has_the_console_on_the_terminal_and_is_removed_after(built, gateway, home):
    spec, art = built
    assert devvm.start(spec, art, firmware=Firmware.UEFI, key=None, port=None, detach=False, home=home) is None
    argv = gateway.qemu()
    assert argv[argv.index("-serial") + 1] == "mon:stdio" and "-daemonize" not in argv
    assert "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd" in argv
    assert not (art.directory / "vm").exists()


def test_shell_is_read_only_on_the_artifact_or_writes_to_a_removed_overlay(built, gateway):
    spec, art = built
    assert devvm.shell(spec, art) == 0
    assert gateway.calls[-1] == ["guestfish", "--ro", "--format=qcow2", "-a", str(art.qcow2), "-i"]
    assert devvm.shell(spec, art, writable=True) == 0
    create, fish = gateway.calls[-2:]
    overlay = create[-1]
    assert create == ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(art.qcow2), "-F", "qcow2", overlay]
    assert fish == ["guestfish", "--rw", "--format=qcow2", "-a", overlay, "-i"]
    assert not Path(overlay).exists() and list(art.directory.glob(".shell-*")) == []
    assert art.qcow2.read_bytes() == b"qcow2"


def test_shell_on_an_image_not_built(tmp_path, gateway):
    spec = specs.load().get("guest-image")
    with pytest.raises(PipelineError, match=r"guest-image has not been built"):
        devvm.shell(spec, artifacts_for(spec, tmp_path))
    assert gateway.calls == []
