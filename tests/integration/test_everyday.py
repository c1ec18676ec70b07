"""Everyday use, as a user runs it: ./inv vm --detach boots the built image with the user's own key,
./inv ssh logs in as the default cloud user, ./inv vm --stop ends it; ./inv shell opens the image
without booting; ./inv status reflects a build, a changed spec and a publish. Each one-line error
(not built, no SSH key, port busy, nothing running) is run too, and nothing may be left behind: no
QEMU, overlay, seed or state directory. One boot of the image (BIOS), the rest takes seconds.

Publishing needs the boot test's verdict on this artifact: ./inv test runs this file after the
session that writes it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from pipeline import build, inputs
from pipeline.artifacts import BOOT_TEST
from pipeline.manifest import sha256
from pipeline.paths import ROOT
from pipeline.publish.sign import make_gpg_home, remove_gpg_home
from pipeline.run import run

DEADLINE = 900  # a ./inv command; the boot under TCG takes 60-120 s of it


def inv(args: list, home: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    """./inv ARGS as a user runs it, with HOME (where ~/.ssh is) set to HOME."""
    return subprocess.run([str(ROOT / "inv"), *(str(arg) for arg in args)], capture_output=True, text=True,
                          cwd=ROOT, input=stdin if stdin is not None else "", timeout=DEADLINE,
                          env={**os.environ, "HOME": str(home)})


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The error ./inv printed: exit status 1, one `error:` line, no traceback."""
    assert result.returncode == 1, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    return errors[0]


def processes_naming(path: Path) -> list[str]:
    """The command lines of live processes that name PATH (a VM's QEMU names its state directory)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(path) in text:
            found.append(text)
    return found


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """A user's HOME with an ed25519 key pair, as ssh-keygen makes it."""
    home = tmp_path_factory.mktemp("home")
    (home / ".ssh").mkdir(mode=0o700)
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "user@everyday", "-f", home / ".ssh/id_ed25519"])
    return home


@pytest.fixture(scope="module")
def state(artifacts) -> Path:
    return artifacts.directory / "vm"


def assert_nothing_left(state: Path) -> None:
    assert not state.exists(), sorted(p.name for p in state.iterdir())
    assert processes_naming(state) == []


# --- the one-line errors


def test_a_vm_of_an_image_not_built(spec, home, tmp_path):
    error = one_line_error(inv(["vm", spec.name, "--detach", "--output-dir", tmp_path], home))
    assert error == (f"error: {tmp_path.resolve() / spec.name}/build-info.json is missing: {spec.name} has not "
                     f"been built: run ./inv build {spec.name}")
    assert list(tmp_path.iterdir()) == []


def test_a_vm_without_an_ssh_key(spec, artifacts, output_dir, state, tmp_path):
    error = one_line_error(inv(["vm", spec.name, "--detach", "--output-dir", output_dir], tmp_path))
    assert error == (f"error: no SSH public key: none of {tmp_path}/.ssh/id_ed25519.pub, {tmp_path}/.ssh/id_ecdsa.pub, "
                     f"{tmp_path}/.ssh/id_rsa.pub exists; make one with ssh-keygen, or name one with --key")
    assert_nothing_left(state)


def test_a_vm_on_a_busy_port(spec, artifacts, output_dir, state, home):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        error = one_line_error(inv(["vm", spec.name, "--detach", "--port", port, "--output-dir", output_dir], home))
    assert error.startswith(f"error: --port {port}: 127.0.0.1:{port} is in use (")
    assert_nothing_left(state)


def test_ssh_with_no_vm_running(spec, artifacts, output_dir, state, home):
    error = one_line_error(inv(["ssh", spec.name, "--output-dir", output_dir, "--", "true"], home))
    assert error == (f"error: {spec.name} is not running (no VM in {state}): "
                     f"start one with ./inv vm {spec.name} --detach")


# --- one boot: vm --detach, ssh, a second vm refused, status, vm --stop


@pytest.fixture(scope="module")
def detached(spec, artifacts, output_dir, state, home):
    started = inv(["vm", spec.name, "--detach", "--firmware", "bios", "--output-dir", output_dir], home)
    assert started.returncode == 0, started.stdout + started.stderr[-3000:]
    print(started.stderr)
    yield started
    inv(["vm", "--stop", spec.name, "--output-dir", output_dir], home)  # if a test below failed first


def test_vm_detach_leaves_it_running_and_prints_how_to_log_in(spec, detached, state, home):
    recorded = json.loads((state / "vm.json").read_text())
    assert recorded["user"] == "debian" and recorded["identity"] == str(home / ".ssh/id_ed25519")
    assert recorded["public_key"] == str(home / ".ssh/id_ed25519.pub")
    assert {"overlay.qcow2", "seed.img", "qemu.pid", "ssh_config"} <= {p.name for p in state.iterdir()}
    pid = int((state / "qemu.pid").read_text())
    assert any(str(state) in line for line in processes_naming(state))
    assert f"{spec.name} is running (QEMU pid {pid})" in detached.stdout
    assert f"./inv ssh {spec.name}" in detached.stdout and f"./inv vm --stop {spec.name}" in detached.stdout
    assert listening(recorded["port"])


def test_ssh_is_the_default_user_with_selinux_enforcing(spec, detached, output_dir, home):
    # getenforce is in /usr/sbin, which is not on a user's PATH on Debian (as in test_boot.py)
    result = inv(["ssh", spec.name, "--output-dir", output_dir, "--", "id -un; /usr/sbin/getenforce"], home)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["debian", "Enforcing"]


def test_ssh_passes_the_commands_exit_status_through(spec, detached, output_dir, home):
    assert inv(["ssh", spec.name, "--output-dir", output_dir, "--", "exit 3"], home).returncode == 3


def test_the_printed_ssh_command_works_as_it_is(detached, home):
    printed = next(line.strip() for line in detached.stdout.splitlines() if line.strip().startswith("ssh -p "))
    result = run([*shlex.split(printed), "whoami"], capture=True, check=False, timeout=60, env={"HOME": str(home)})
    assert result.returncode == 0 and result.stdout.strip() == "debian", result.stderr


def test_a_second_vm_of_a_running_image_is_refused(spec, detached, output_dir, state, home):
    pid = int((state / "qemu.pid").read_text())
    error = one_line_error(inv(["vm", spec.name, "--detach", "--output-dir", output_dir], home))
    assert re.fullmatch(rf"error: {spec.name} is already running \(QEMU pid {pid}, SSH on 127.0.0.1:\d+\): "
                        rf"./inv ssh {spec.name} to log in, ./inv vm --stop {spec.name} to stop it", error)


def test_status_shows_the_running_vm(spec, detached, output_dir, state, home):
    statuses = json.loads(inv(["status", "--json", "--output-dir", output_dir], home).stdout)
    vm = next(s for s in statuses if s["image"] == spec.name)["vm"]
    assert vm["pid"] == int((state / "qemu.pid").read_text()) and vm["user"] == "debian"


def test_vm_stop_powers_it_off_and_leaves_nothing(spec, detached, output_dir, state, home):
    port = json.loads((state / "vm.json").read_text())["port"]
    stopped = inv(["vm", "--stop", spec.name, "--output-dir", output_dir], home)
    assert stopped.returncode == 0, stopped.stderr
    assert f"{spec.name}: powered off, {state} removed" in stopped.stdout
    assert_nothing_left(state)
    assert not listening(port)
    error = one_line_error(inv(["ssh", spec.name, "--output-dir", output_dir, "--", "true"], home))
    assert "is not running" in error


# --- shell: without booting; the artifact is never written


def test_shell_reads_the_image_read_only(spec, artifacts, output_dir, home):
    result = inv(["shell", spec.name, "--output-dir", output_dir], home, stdin="cat /etc/os-release\n")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ID=debian" in result.stdout.splitlines() and 'VERSION_CODENAME=' in result.stdout
    assert sha256(artifacts.qcow2) == artifacts.read_info()["qcow2_sha256"]


def test_shell_rw_writes_to_an_overlay_that_goes_away(spec, artifacts, output_dir, home):
    commands = "write /etc/everyday-probe hello\ncat /etc/everyday-probe\n"
    result = inv(["shell", spec.name, "--rw", "--output-dir", output_dir], home, stdin=commands)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "hello"
    assert list(artifacts.directory.glob(".shell-*")) == []
    assert processes_naming(artifacts.directory / ".shell-") == []
    assert sha256(artifacts.qcow2) == artifacts.read_info()["qcow2_sha256"]


# --- status: a build, a changed spec, a publish


def image_status(spec, args: list, home: Path) -> dict:
    result = inv(["status", "--json", *args], home)
    assert result.returncode == 0, result.stderr
    return next(s for s in json.loads(result.stdout) if s["image"] == spec.name)


def test_status_reflects_the_build(spec, artifacts, output_dir, home, tmp_path):
    found = image_status(spec, ["--output-dir", output_dir, "--target", tmp_path / "publish"], home)
    info = artifacts.read_info()
    assert found["version"] == info["version"]
    # Whether it is up to date is the build's own decision, made on this checkout as it is now.
    assert found["stale_reason"] == build.stale_reason(artifacts, inputs.input_hash(spec))
    assert found["up_to_date"] is (found["stale_reason"] is None)
    assert found["check"] == {"state": "passed", "problem": None}
    assert found["sizes"][artifacts.qcow2.name] == artifacts.qcow2.stat().st_size
    assert found["published"] is None


def test_status_reflects_a_changed_spec(spec, artifacts, output_dir, home, tmp_path):
    text = Path(spec.source).read_text()
    head, section = text.split(f"[image.{spec.name}]\n", 1)
    section, replaced = re.subn(r'disk_size = "[^"]*"', 'disk_size = "5GiB"', section, count=1)
    assert replaced == 1
    changed = tmp_path / "images.toml"
    changed.write_text(f"{head}[image.{spec.name}]\n{section}")
    found = image_status(spec, ["--spec-file", changed, "--output-dir", output_dir], home)
    built_from = artifacts.read_info()["input_hash"][:8]
    assert found["up_to_date"] is False
    assert found["stale_reason"].startswith(f"inputs changed (built from {built_from}, now ")


def test_status_reflects_a_publish(spec, artifacts, output_dir, home, tmp_path):
    assert artifacts.passed(BOOT_TEST), artifacts.verdict_problem(BOOT_TEST)  # publish requires it
    target = tmp_path / "publish"
    gnupg_home, email = make_gpg_home()
    try:
        published = inv(["publish", spec.name, "--output-dir", output_dir, "--target", target, "--key", email,
                         "--gnupg-home", gnupg_home], home)
    finally:
        remove_gpg_home(gnupg_home)
    assert published.returncode == 0, published.stderr[-2000:]
    version = artifacts.read_info()["version"]
    found = image_status(spec, ["--output-dir", output_dir, "--target", target], home)
    assert found["published"] == {"version": version, "location": str(target / spec.name / version),
                                  "versions": 1, "this_build": True}
    table = inv(["status", "--output-dir", output_dir, "--target", target], home).stdout
    row = next(line for line in table.splitlines() if line.startswith(f"{spec.name} "))
    assert row.split()[:2] == [spec.name, version] and f"{version} (this build)" in row
    assert f"{spec.name}: published {version} at {target / spec.name / version}" in table
    shutil.rmtree(target)
