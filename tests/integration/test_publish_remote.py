"""Publishing over rsync and ssh to a real sshd on a loopback port (its own host key and
authorized_keys in a temporary directory), from a fake build directory: no image is built."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
from packageurl import PackageURL

from pipeline import publish
from pipeline.errors import CommandFailed
from pipeline.run import run, start, stop
from pipeline.publish import make_gpg_home, remove_gpg_home
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
    proc = start([SSHD, "-D", "-e", "-f", config], log=log)
    try:
        wait_for_port(port, proc, log)
        yield {"port": port, "options": [f"IdentityFile={keys / 'client_key'}", "IdentitiesOnly=yes",
                                         f"UserKnownHostsFile={keys / 'known_hosts'}", "GlobalKnownHostsFile=/dev/null",
                                         "StrictHostKeyChecking=yes"]}
    finally:
        stop(proc)
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
    publish.validate_sbom(there("cat", f"{image_dir}/latest/sbom.cdx.json"))

    # A copy that fails before the rename leaves nothing half-done there, and latest as it was.
    monkeypatch.setattr(publish, "REMOTE_COMMIT", 'echo "refused for the test" >&2; exit 3')
    with pytest.raises(CommandFailed, match="refused for the test"):
        publish.publish(builds[1][0], NAME, target, **options)
    monkeypatch.undo()
    assert there("ls", "-A", image_dir).split() == [first.version, "latest"]

    # A killed publish's leftover is removed by the next; the retention count prunes the oldest.
    there("mkdir", "-p", f"{image_dir}/.incoming-20261122-deadbeef-4242")
    second = publish.publish(builds[1][0], NAME, target, **options)
    assert there("ls", "-A", image_dir).split() == [first.version, second.version, "latest"]
    third_dir = tmp_path / "build-3" / NAME
    write_build(third_dir, seed="3", date="20261123")
    third = publish.publish(third_dir, NAME, target, **options)
    assert third.pruned == (first.version,)
    assert there("ls", "-A", image_dir).split() == [second.version, third.version, "latest"]
    assert there("readlink", f"{image_dir}/latest").strip() == third.version

    # Republishing a version is a no-op that says so (and a rollback for latest).
    again = publish.publish(builds[1][0], NAME, target, **options)
    assert not again.new and again.pruned == ()
    assert there("readlink", f"{image_dir}/latest").strip() == second.version
    assert not list(builds[1][0].glob(".publish-*")), "the local staging directory is removed"


def test_sbom_of_a_real_package_database():
    """This machine's own dpkg database (Debian, hundreds of packages, epochs, multi-arch) makes a valid SBOM."""
    status = Path("/var/lib/dpkg/status")
    installed = publish.installed_packages(status)
    text = publish.make_sbom(status, "build-host", "20261125-00000000")
    publish.validate_sbom(text)
    sbom = json.loads(text)
    assert len(sbom["components"]) == len({(p["Package"], p["Architecture"]) for p in installed}) > 100
    for component in sbom["components"]:  # names like libstdc++6 are percent-encoded in a purl
        purl = PackageURL.from_string(component["purl"])
        expected = ("deb", "debian", component["name"], component["version"])
        assert (purl.type, purl.namespace, purl.name, purl.version) == expected
