"""Publishing over rsync and ssh to a real sshd on a loopback port (its own host key and
authorized_keys in a temporary directory), from a fake build directory: no image is built."""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from packageurl import PackageURL

from pipeline import publish
from pipeline.errors import CommandFailed, PipelineError
from pipeline.publish.sbom import installed_packages, make_sbom, validate_sbom
from pipeline.publish.sign import make_gpg_home, remove_gpg_home
from pipeline.publish.targets import remote as remote_target
from pipeline.publish.targets.base import LOCK
from pipeline.run import run, spawn
from tests.unit.test_publish import NAME, write_build

SSHD = "/usr/sbin/sshd"
READY_DEADLINE = 15


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, proc, log: Path) -> None:
    deadline = time.monotonic() + READY_DEADLINE
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"sshd exited: {log.read_text()}"
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"sshd did not listen on port {port} within {READY_DEADLINE} s: {log.read_text()}")


def processes_mentioning(text: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if text.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            pass
    return found


@pytest.fixture
def sshd(tmp_path):
    """An sshd of our own on 127.0.0.1, root logging in by a throw-away key; always stopped."""
    if not os.access(SSHD, os.X_OK):
        pytest.fail(f"{SSHD} is missing: ./inv installs openssh-server (debian-packages.txt)")
    keys = tmp_path / "ssh"
    keys.mkdir()
    for key in ("host_key", "client_key"):
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", key, "-f", keys / key])
    (keys / "authorized_keys").write_text((keys / "client_key.pub").read_text())
    port = free_port()
    (keys / "known_hosts").write_text(f"[127.0.0.1]:{port} {(keys / 'host_key.pub').read_text()}")
    config = keys / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {keys / 'host_key'}",
        f"AuthorizedKeysFile {keys / 'authorized_keys'}", "PidFile none", "UsePAM no", "StrictModes no",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "PermitRootLogin prohibit-password",
        "LogLevel VERBOSE", ""]))
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    run([SSHD, "-t", "-f", config])
    log = tmp_path / "sshd.log"
    with spawn([SSHD, "-D", "-e", "-f", config], log=log) as proc:
        wait_for_port(port, proc, log)
        yield {"port": port, "options": [f"IdentityFile={keys / 'client_key'}", "IdentitiesOnly=yes",
                                         f"UserKnownHostsFile={keys / 'known_hosts'}", "GlobalKnownHostsFile=/dev/null",
                                         "StrictHostKeyChecking=yes"]}
    assert proc.poll() is not None
    deadline = time.monotonic() + 10  # connection children end with their sessions
    while processes_mentioning(str(config)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not processes_mentioning(str(config)), "an sshd process outlived the test"


@pytest.fixture(scope="module")
def gpg_key():
    home, email = make_gpg_home()
    yield home, email
    remove_gpg_home(home)


def test_publish_over_rsync_and_ssh(tmp_path, sshd, gpg_key, monkeypatch):
    home, email = gpg_key
    remote = tmp_path / "remote"
    target = f"ssh://root@127.0.0.1:{sshd['port']}{remote}"
    options = {"key": email, "gnupg_home": home, "retention": 2, "ssh_options": sshd["options"]}
    ssh = publish.parse_target(target, NAME, sshd["options"]).ssh

    def there(*argv: str) -> str:
        return ssh(list(argv), capture=True).stdout

    def entries() -> list[str]:
        """What the image's directory holds, hidden leftovers included, but the lock file."""
        return [entry for entry in there("ls", "-A", image_dir).split() if entry != LOCK]

    builds = []
    for seed, date in (("1", "20261121"), ("2", "20261122")):
        directory = tmp_path / f"build-{seed}" / NAME
        builds.append((directory, write_build(directory, seed=seed, date=date)))
    first = publish.publish(builds[0][0], NAME, target, **options)
    assert first.new and first.location == f"{target}/{NAME}/{first.version}"

    # The tree, checked there: latest, the checksums with sha256sum, the signature with gpg.
    image_dir = f"{remote}/{NAME}"
    assert there("readlink", f"{image_dir}/latest").strip() == first.version
    assert sorted(there("ls", f"{image_dir}/latest/").split()) == sorted(
        ["img.qcow2", "img.tar.gz", "img.vmlinuz", "img.initrd", "manifest.json", "sbom.cdx.json",
         "SHA256SUMS", "SHA256SUMS.asc"])
    assert there("sh", "-c", 'cd "$1" && sha256sum --check --strict SHA256SUMS', "sh",
                 f"{image_dir}/latest").count(": OK") == 6
    there("env", f"GNUPGHOME={home}", "gpg", "--batch", "--verify", f"{image_dir}/latest/SHA256SUMS.asc",
          f"{image_dir}/latest/SHA256SUMS")
    validate_sbom(there("cat", f"{image_dir}/latest/sbom.cdx.json"))

    # A copy that fails before the rename leaves nothing half-done there, and latest as it was.
    monkeypatch.setattr(remote_target, "REMOTE_COMMIT", 'echo "refused for the test" >&2; exit 3')
    with pytest.raises(CommandFailed, match="refused for the test"):
        publish.publish(builds[1][0], NAME, target, **options)
    monkeypatch.undo()
    assert entries() == [first.version, "latest"]

    # A killed publish's leftover is removed by the next; the retention count prunes the oldest.
    there("mkdir", "-p", f"{image_dir}/.incoming-20261122-deadbeef-4242")
    second = publish.publish(builds[1][0], NAME, target, **options)
    assert entries() == [first.version, second.version, "latest"]
    third_dir = tmp_path / "build-3" / NAME
    write_build(third_dir, seed="3", date="20261123")
    third = publish.publish(third_dir, NAME, target, **options)
    assert third.pruned == (first.version,)
    assert entries() == [second.version, third.version, "latest"]
    assert there("readlink", f"{image_dir}/latest").strip() == third.version

    # Republishing a version is a no-op that says so (and a rollback for latest).
    again = publish.publish(builds[1][0], NAME, target, **options)
    assert not again.new and again.pruned == ()
    assert there("readlink", f"{image_dir}/latest").strip() == second.version
    assert not list(builds[1][0].glob(".publish-*")), "the local staging directory is removed"


def test_one_publish_at_a_time_and_a_killed_one_lets_go(tmp_path, sshd, gpg_key):
    """The remote lock is flock held over an ssh session: a second publish is refused while it
    is held, and a publisher killed with SIGKILL (no cleanup runs) releases it."""
    home, email = gpg_key
    target = f"ssh://root@127.0.0.1:{sshd['port']}{tmp_path / 'remote'}"
    build_dir = tmp_path / "build" / NAME
    write_build(build_dir, seed="1", date="20261121")
    options = {"key": email, "gnupg_home": home, "ssh_options": sshd["options"]}

    holder = publish.parse_target(target, NAME, sshd["options"])
    with (holder.session(),
          pytest.raises(PipelineError, match=r"another publish is running \(it holds \.publish\.lock\)")):
        publish.publish(build_dir, NAME, target, **options)
    assert publish.publish(build_dir, NAME, target, **options).new

    # A publisher that takes the lock and is then killed outright.
    script = ("import sys, time; from pipeline import publish\n"
              "target = publish.parse_target(sys.argv[1], sys.argv[2], sys.argv[3:])\n"
              "with target.session():\n"
              "    print('holding', flush=True)\n"
              "    time.sleep(600)\n")
    killed = subprocess.Popen([sys.executable, "-c", script, target, NAME, *sshd["options"]],
                              cwd=Path(__file__).parents[2], stdout=subprocess.PIPE)
    try:
        ready, _, _ = select.select([killed.stdout], [], [], READY_DEADLINE)
        assert ready and killed.stdout.readline().strip() == b"holding", "the publisher never took the lock"
        with pytest.raises(PipelineError, match="another publish is running"):
            publish.publish(build_dir, NAME, target, **options)
    finally:
        killed.kill()
        killed.wait()
        killed.stdout.close()
    deadline = time.monotonic() + 10  # the remote flock ends when its ssh session does
    while True:
        try:
            assert not publish.publish(build_dir, NAME, target, **options).new
            break
        except PipelineError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_sbom_of_a_real_package_database():
    """This machine's own dpkg database (Debian, hundreds of packages, epochs, multi-arch) makes a valid SBOM."""
    status = Path("/var/lib/dpkg/status")
    installed = installed_packages(status)
    text = make_sbom(status, "build-host", "20261125-00000000")
    validate_sbom(text)
    sbom = json.loads(text)
    assert len(sbom["components"]) == len({(p["Package"], p["Architecture"]) for p in installed}) > 100
    for component in sbom["components"]:  # names like libstdc++6 are percent-encoded in a purl
        purl = PackageURL.from_string(component["purl"])
        expected = ("deb", "debian", component["name"], component["version"])
        assert (purl.type, purl.namespace, purl.name, purl.version) == expected
