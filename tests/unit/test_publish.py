"""Publishing to a local directory, from fake build directories; real gpg (a throw-away key),
sha256sum and CycloneDX's own schema validator. Each fault the issue names is a test."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import sys
import textwrap
import time
from pathlib import Path
from subprocess import CompletedProcess

import pytest

from pipeline import build, publish
from pipeline.artifacts import Artifacts
from pipeline.deploy import kickstart
from pipeline.errors import PipelineError
from pipeline.publish.sbom import SBOM, build_sbom, make_sbom, validate_sbom
from pipeline.publish.sign import SIGNATURE, SUMS, make_gpg_home, remove_gpg_home, require_key
from pipeline.publish.targets import local, remote
from pipeline.publish.verify import read_sums, verify_build, verify_version
from pipeline.run import run, spawn
from tests.unit.test_build import assembled, ctx  # noqa: F401 (ctx: a fixture) a build's state before move_into_place

NAME = "img"
DATE = "20261125"

DPKG_STATUS = textwrap.dedent("""\
    Package: libc6
    Status: install ok installed
    Architecture: amd64
    Multi-Arch: same
    Version: 2.36-9+deb12u9
    Description: GNU C Library: Shared libraries
     Contains the standard libraries that are used by nearly all programs.

    Package: mawk
    Status: install ok installed
    Architecture: amd64
    Version: 1.3.4.20200120-3.1
    Provides: awk
    Pre-Depends: libc6 (>= 2.34)
    Description: Pattern scanning and text processing language

    Package: openssh-server
    Status: install ok installed
    Architecture: amd64
    Version: 1:9.2p1-2+deb12u6
    Depends: libc6 (>= 2.36), gawk | awk, adduser
    Description: secure shell (SSH) server

    Package: tzdata
    Status: install ok installed
    Architecture: all
    Version: 2025b-0+deb12u1
    Description: time zone and daylight-saving time data

    Package: removed-package
    Status: deinstall ok config-files
    Architecture: amd64
    Version: 1.0-1
    Description: only its configuration files are left
    """)


def write_build(directory: Path, name: str = NAME, *, date: str = DATE, seed: str = "1",
                check: bool = True, boot: bool = True) -> dict:
    """A build directory as the build leaves it (small fake files); returns its build-info."""
    directory.mkdir(parents=True, exist_ok=True)
    input_hash = hashlib.sha256(f"inputs {seed}".encode()).hexdigest()
    files = {f"{name}.qcow2": f"qcow2 {seed}\n" * 1000, f"{name}.tar.gz": f"tarball {seed}\n" * 500,
             f"{name}.vmlinuz": "kernel\n", f"{name}.initrd": "initrd\n", f"{name}.dpkg-status": DPKG_STATUS,
             "manifest.json": json.dumps({"image": name, "input_hash": input_hash}) + "\n"}
    for file, text in files.items():
        (directory / file).write_text(text)
    digest = {file: hashlib.sha256(text.encode()).hexdigest() for file, text in files.items()}
    info = {"image": name, "version": f"{date}-{input_hash[:8]}", "input_hash": input_hash,
            "source_date_epoch": 1764000000, "qcow2_sha256": digest[f"{name}.qcow2"],
            "liveimg_sha256": digest[f"{name}.tar.gz"], "kernel": "6.1.0-41-cloud-amd64", "timings": {"tree": 1.0},
            "sha256": digest}
    (directory / "build-info.json").write_text(json.dumps(info))
    (directory / "check.json").write_text(json.dumps({"passed": check, "qcow2_sha256": info["qcow2_sha256"]}))
    (directory / "boot-test.json").write_text(json.dumps({"passed": boot, "qcow2_sha256": info["qcow2_sha256"]}))
    return info


def record(directory: Path, file: str) -> str:
    """Record a changed file's sha256 in build-info.json, as a build that made it would; returns it."""
    digest = hashlib.sha256((directory / file).read_bytes()).hexdigest()
    info = json.loads((directory / "build-info.json").read_text())
    info["sha256"][file] = digest
    (directory / "build-info.json").write_text(json.dumps(info))
    return digest


@pytest.fixture(scope="session")
def gpg_key():
    home, email = make_gpg_home()
    yield home, email
    remove_gpg_home(home)


@pytest.fixture
def signer(gpg_key):
    home, email = gpg_key
    return {"key": email, "gnupg_home": home}


@pytest.fixture
def build_dir(tmp_path):
    directory = tmp_path / "build" / NAME
    write_build(directory)
    return directory


@pytest.fixture
def target(tmp_path):
    return tmp_path / "publish"


def visible(target: Path) -> set[str]:
    image = target / NAME
    return {p.name for p in image.iterdir() if not p.name.startswith(".")} if image.exists() else set()


def test_publish_writes_a_signed_verified_version(build_dir, target, signer, gpg_key):
    info = json.loads((build_dir / "build-info.json").read_text())
    result = publish.publish(build_dir, NAME, target, **signer)
    version = target / NAME / info["version"]
    assert result.new and result.version == info["version"] and result.location == str(version)
    assert sorted(p.name for p in version.iterdir()) == sorted(
        ["img.qcow2", "img.tar.gz", "img.vmlinuz", "img.initrd", "manifest.json", "sbom.cdx.json",
         "SHA256SUMS", "SHA256SUMS.asc"])
    assert os.readlink(target / NAME / "latest") == info["version"]
    assert visible(target) == {info["version"], "latest"}
    assert not [p for p in (target / NAME).iterdir() if p.name.startswith(".incoming")]
    # What a downloader runs: the checksums, then the signature over them.
    run(["sha256sum", "--check", "--strict", "SHA256SUMS"], cwd=version)
    listed = {line.split("  ")[1] for line in (version / "SHA256SUMS").read_text().splitlines()}
    assert listed == {p.name for p in version.iterdir()} - {"SHA256SUMS", "SHA256SUMS.asc"}
    run(["gpg", "--batch", "--verify", version / "SHA256SUMS.asc", version / "SHA256SUMS"],
        env={"GNUPGHOME": str(gpg_key[0])})
    assert (version / "SHA256SUMS.asc").read_text().startswith("-----BEGIN PGP SIGNATURE-----")
    assert (version / "manifest.json").read_bytes() == (build_dir / "manifest.json").read_bytes()
    validate_sbom((version / "sbom.cdx.json").read_text())
    # Same file system: the big files are hard links, not copies.
    assert (version / "img.qcow2").stat().st_ino == (build_dir / "img.qcow2").stat().st_ino


def test_sbom_components_purls_and_dependencies(build_dir):
    text = make_sbom(build_dir / "img.dpkg-status", NAME, f"{DATE}-0badcafe")
    validate_sbom(text)
    sbom = json.loads(text)
    assert sbom["bomFormat"] == "CycloneDX" and sbom["specVersion"] == "1.6"
    root = sbom["metadata"]["component"]
    assert (root["name"], root["version"], root["type"]) == (NAME, f"{DATE}-0badcafe", "operating-system")
    purls = {c["name"]: c["purl"] for c in sbom["components"]}
    assert purls == {  # the package only its configuration files are left of is not installed
        "libc6": "pkg:deb/debian/libc6@2.36-9%2Bdeb12u9?arch=amd64",
        "mawk": "pkg:deb/debian/mawk@1.3.4.20200120-3.1?arch=amd64",
        "openssh-server": "pkg:deb/debian/openssh-server@1:9.2p1-2%2Bdeb12u6?arch=amd64",
        "tzdata": "pkg:deb/debian/tzdata@2025b-0%2Bdeb12u1?arch=all",
    }
    versions = {c["name"]: c["version"] for c in sbom["components"]}
    assert versions["openssh-server"] == "1:9.2p1-2+deb12u6"
    depends = {d["ref"]: set(d.get("dependsOn", [])) for d in sbom["dependencies"]}
    assert depends[root["bom-ref"]] == set(purls.values())
    # gawk | awk: mawk provides awk; adduser is not installed and is left out.
    assert depends[purls["openssh-server"]] == {purls["libc6"], purls["mawk"]}
    assert depends[purls["mawk"]] == {purls["libc6"]}


def test_sbom_carries_the_declared_licenses(build_dir):
    licenses = {"mawk": ["GPL-2"], "openssh-server": ["BSD-3-clause", "Expat", "public-domain"], "absent": ["MIT"]}
    sbom = json.loads(make_sbom(build_dir / "img.dpkg-status", NAME, f"{DATE}-0badcafe", licenses=licenses))
    found = {c["name"]: c.get("licenses") for c in sbom["components"]}
    assert found["mawk"] == [{"license": {"name": "GPL-2", "acknowledgement": "declared"}}]  # SPDX says GPL-2.0-only
    assert found["openssh-server"] == [  # SPDX ids where Debian's names are ones, its names otherwise
        {"license": {"id": "BSD-3-Clause", "acknowledgement": "declared"}},
        {"license": {"name": "Expat", "acknowledgement": "declared"}},
        {"license": {"name": "public-domain", "acknowledgement": "declared"}}]
    assert found["libc6"] is None and "absent" not in found


def test_published_sbom_takes_the_licenses_from_the_manifest(build_dir):
    manifest_file = build_dir / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest_file.write_text(json.dumps({**manifest, "licenses": {"tzdata": ["public-domain"]}}))
    record(build_dir, "manifest.json")
    sbom = json.loads(build_sbom(verify_build(build_dir, NAME)))
    assert [c["licenses"] for c in sbom["components"] if c["name"] == "tzdata"] == [
        [{"license": {"name": "public-domain", "acknowledgement": "declared"}}]]


def test_sbom_is_reproducible(build_dir):
    build = verify_build(build_dir, NAME)
    assert build_sbom(build) == build_sbom(build)


def test_invalid_sbom_is_refused():
    with pytest.raises(PipelineError, match=r"not valid CycloneDX 1\.6"):
        validate_sbom(json.dumps({"bomFormat": "CycloneDX", "specVersion": "1.6", "components": "none"}))


def test_empty_package_database_is_refused(tmp_path):
    (tmp_path / "status").write_text("")
    with pytest.raises(PipelineError, match="no installed package"):
        make_sbom(tmp_path / "status", NAME, f"{DATE}-0badcafe")


# --- faults: each refused in one line naming the file, with nothing written


def refused(build_dir, target, signer, match):
    with pytest.raises(PipelineError, match=match) as caught:
        publish.publish(build_dir, NAME, target, **signer)
    assert "\n" not in str(caught.value)
    assert not target.exists()
    return str(caught.value)


@pytest.mark.parametrize("report, what", [("check.json", "offline check"), ("boot-test.json", "boot test")])
def test_failed_verdict_is_refused(tmp_path, target, signer, report, what):
    directory = tmp_path / "build" / NAME
    write_build(directory, check=report != "check.json", boot=report != "boot-test.json")
    message = refused(directory, target, signer, f"the {what} did not pass")
    assert message.startswith(str(directory / report))


@pytest.mark.parametrize("report", ["check.json", "boot-test.json"])
def test_missing_verdict_is_refused(build_dir, target, signer, report):
    (build_dir / report).unlink()
    refused(build_dir, target, signer, f"{build_dir / report} is missing: the .* has not run on this build")


@pytest.mark.parametrize("report", ["check.json", "boot-test.json"])
def test_verdict_about_another_qcow2_is_refused(build_dir, target, signer, report):
    (build_dir / report).write_text(json.dumps({"passed": True, "qcow2_sha256": "0" * 64}))
    message = refused(build_dir, target, signer, "was of another qcow2")
    assert message.startswith(str(build_dir / report))


@pytest.mark.parametrize("file", ["img.qcow2", "img.tar.gz", "img.vmlinuz", "img.initrd", "manifest.json",
                                  "img.dpkg-status"])
def test_flipped_byte_is_caught_before_publishing(build_dir, target, signer, file):
    data = bytearray((build_dir / file).read_bytes())
    data[len(data) // 2] ^= 0x01
    (build_dir / file).write_bytes(bytes(data))
    message = refused(build_dir, target, signer, "is not the sha256 build-info.json records")
    assert message.startswith(f"{build_dir / file}: sha256 ")


@pytest.mark.parametrize("file", ["img.vmlinuz", "img.initrd", "manifest.json", "img.dpkg-status"])
def test_artifact_without_a_recorded_sha256_is_refused(build_dir, target, signer, file):
    info = json.loads((build_dir / "build-info.json").read_text())
    del info["sha256"][file]
    (build_dir / "build-info.json").write_text(json.dumps(info))
    message = refused(build_dir, target, signer, f"records no sha256 of {file}: rebuild")
    assert message.startswith(str(build_dir / "build-info.json"))


def test_file_list_is_published_only_with_its_recorded_sha256(build_dir, target, signer):
    (build_dir / "img.files.tsv").write_text("# path\n/etc\td\n")  # made by the build, but not recorded
    refused(build_dir, target, signer, "records no sha256 of img.files.tsv")


def test_missing_signing_key_is_refused(build_dir, target, gpg_key):
    message = refused(build_dir, target, {"key": "nobody@example.invalid", "gnupg_home": gpg_key[0]},
                      "signing key 'nobody@example.invalid' not found in GNUPGHOME")
    assert "gpg --list-secret-keys" in message


def test_key_that_cannot_sign_is_refused(build_dir, target, gpg_key):
    home, _ = gpg_key
    run(["gpg", "--batch", "--passphrase", "", "--quick-gen-key", "Certify Only <cert-only@example.invalid>",
         "ed25519", "cert", "never"], env={"GNUPGHOME": str(home)})
    refused(build_dir, target, {"key": "cert-only@example.invalid", "gnupg_home": home}, "cannot sign")


def test_no_key_and_missing_gnupg_home_are_refused(build_dir, target, tmp_path):
    refused(build_dir, target, {"key": None}, "no signing key given: pass --key")
    refused(build_dir, target, {"key": "x@example.invalid", "gnupg_home": tmp_path / "nowhere"}, "is not a directory")


def test_unbuilt_image_and_bad_version_are_refused(tmp_path, build_dir, target, signer):
    refused(tmp_path / "empty", target, signer, "has not been built: run ./inv build img")
    info = json.loads((build_dir / "build-info.json").read_text())
    (build_dir / "build-info.json").write_text(json.dumps({**info, "version": "../../etc"}))
    refused(build_dir, target, signer, "version '../../etc' is not YYYYMMDD-HHHHHHHH")


def test_retention_below_one_is_refused(build_dir, target, signer):
    with pytest.raises(PipelineError, match="retention must be at least 1"):
        publish.publish(build_dir, NAME, target, retention=0, **signer)


# --- versions, latest, retention


def publish_version(tmp_path, target, signer, seed, date=DATE, **options):
    directory = tmp_path / f"build-{seed}" / NAME
    info = write_build(directory, seed=seed, date=date)
    result = publish.publish(directory, NAME, target, **signer, **options)
    assert result.version == info["version"]
    return result


def test_interrupted_publish_leaves_latest_and_versions(tmp_path, target, signer, monkeypatch):
    first = publish_version(tmp_path, target, signer, "1")

    def killed(directory):
        assert directory.name.startswith(".incoming-20261126-")
        assert (directory / "SHA256SUMS.asc").is_file()  # fully staged and signed: the rename is next
        raise KeyboardInterrupt

    monkeypatch.setattr(local, "_fsync_tree", killed)
    with pytest.raises(KeyboardInterrupt):
        publish_version(tmp_path, target, signer, "2", date="20261126")
    assert os.readlink(target / NAME / "latest") == first.version
    assert visible(target) == {first.version, "latest"}
    assert not [p for p in (target / NAME).iterdir() if p.name.startswith(".incoming")]


KILLED_PUBLISH = """
import os, sys, time
from pathlib import Path
from pipeline import publish

def stall(self, staged, version):  # staged and signed; the rename would come next
    Path(sys.argv[4]).write_text(staged.name)
    time.sleep(60)

from pipeline.publish.targets.local import LocalTarget
LocalTarget.commit = stall
publish.publish(Path(sys.argv[1]), "img", sys.argv[2], key=sys.argv[3], gnupg_home=Path(sys.argv[5]))
"""


def test_killed_publish_leaves_latest_and_next_publish_cleans_up(tmp_path, target, signer):
    first = publish_version(tmp_path, target, signer, "1")
    second_build = tmp_path / "build-2" / NAME
    second = write_build(second_build, seed="2", date="20261126")
    ready = tmp_path / "ready"
    with spawn([sys.executable, "-c", KILLED_PUBLISH, second_build, target, signer["key"], ready,
                signer["gnupg_home"]], log=tmp_path / "child.log") as child:
        deadline = time.monotonic() + 60
        while not ready.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ready.exists(), (tmp_path / "child.log").read_text()
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
    leftover = target / NAME / ready.read_text()
    assert leftover.is_dir() and (leftover / "SHA256SUMS.asc").is_file()
    assert os.readlink(target / NAME / "latest") == first.version
    assert visible(target) == {first.version, "latest"}
    # The next publish (the same version again) removes the leftover and completes.
    result = publish.publish(second_build, NAME, target, **signer)
    assert result.new and result.version == second["version"]
    assert not leftover.exists()
    assert os.readlink(target / NAME / "latest") == second["version"]


def test_leftover_latest_symlink_is_removed(tmp_path, target, signer):
    first = publish_version(tmp_path, target, signer, "1")
    (target / NAME / ".latest-4242").symlink_to(first.version)
    publish_version(tmp_path, target, signer, "2", date="20261126")
    assert not (target / NAME / ".latest-4242").is_symlink()


def test_retention_prunes_oldest_never_latest(tmp_path, target, signer):
    results = [publish_version(tmp_path, target, signer, str(day), date=f"202611{day}", retention=2)
               for day in (21, 22, 23, 24)]
    versions = [r.version for r in results]
    assert visible(target) == {versions[2], versions[3], "latest"}
    assert results[2].pruned == (versions[0],) and results[3].pruned == (versions[1],)
    # Republishing the older build kept at 1 is a rollback: latest moves to it, and it is not pruned.
    rollback = publish_version(tmp_path, target, signer, "23", date="20261123", retention=1)
    assert not rollback.new and rollback.pruned == ()
    assert os.readlink(target / NAME / "latest") == versions[2]
    assert visible(target) == {versions[2], versions[3], "latest"}
    newest = publish_version(tmp_path, target, signer, "25", date="20261125", retention=1)
    assert newest.pruned == (versions[2], versions[3])


def test_republishing_a_version_keeps_it(tmp_path, build_dir, target, signer, capsys):
    first = publish.publish(build_dir, NAME, target, **signer)
    version = target / NAME / first.version
    before = {p.name: p.stat().st_mtime_ns for p in version.iterdir()}
    again = publish.publish(build_dir, NAME, target, **signer)
    assert not again.new and again.version == first.version
    assert "already published with these very artifacts" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in version.iterdir()} == before


def test_republishing_a_version_with_other_artifacts_keeps_the_published_ones(
        tmp_path, build_dir, target, signer, capsys):
    first = publish.publish(build_dir, NAME, target, **signer)
    published = (target / NAME / first.version / "img.qcow2").read_bytes()
    rebuilt = tmp_path / "rebuilt" / NAME
    info = write_build(rebuilt)  # the same inputs, so the same version ...
    (rebuilt / "img.qcow2").write_text("not bit for bit the same\n")  # ... but another qcow2
    digest = record(rebuilt, "img.qcow2")
    for file in ("build-info.json", "check.json", "boot-test.json"):
        data = json.loads((rebuilt / file).read_text())
        (rebuilt / file).write_text(json.dumps({**data, "qcow2_sha256": digest}))
    again = publish.publish(rebuilt, NAME, target, **signer)
    assert not again.new and again.version == info["version"] == first.version
    assert "the published ones are kept" in capsys.readouterr().err
    assert (target / NAME / first.version / "img.qcow2").read_bytes() == published


def test_concurrent_publish_is_refused(build_dir, target, signer):
    import fcntl

    (target / NAME).mkdir(parents=True)
    with open(target / NAME / ".publish.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(PipelineError, match="another publish is running"):
            publish.publish(build_dir, NAME, target, **signer)
    assert visible(target) == set()


def test_copies_when_hard_links_fail(build_dir, target, signer, monkeypatch):
    def no_links(source, destination):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(publish.os, "link", no_links)
    result = publish.publish(build_dir, NAME, target, **signer)
    published = target / NAME / result.version / "img.qcow2"
    assert published.stat().st_ino != (build_dir / "img.qcow2").stat().st_ino
    assert published.read_bytes() == (build_dir / "img.qcow2").read_bytes()


@pytest.mark.parametrize("versions, latest, retention, pruned", [
    ({"20261121-aaaaaaaa": 1, "20261122-bbbbbbbb": 2, "20261123-cccccccc": 3}, "20261123-cccccccc", 2,
     ["20261121-aaaaaaaa"]),
    ({"20261121-aaaaaaaa": 1, "20261122-bbbbbbbb": 2, "20261123-cccccccc": 3}, "20261121-aaaaaaaa", 1,
     ["20261122-bbbbbbbb"]),
    # The same day: the one published later is newer, whatever its hash.
    ({"20261121-ffffffff": 1, "20261121-00000000": 2}, "20261121-00000000", 1, ["20261121-ffffffff"]),
    ({"20261121-aaaaaaaa": 1}, "20261121-aaaaaaaa", 5, []),
])
def test_to_prune(versions, latest, retention, pruned):
    assert publish.to_prune(versions, latest, retention) == pruned


def test_read_sums_takes_text_and_binary_lines():
    text = f"{'a' * 64}  img.qcow2\n{'b' * 64} *img name with spaces.tar.gz\n"
    assert read_sums(text) == {"img.qcow2": "a" * 64, "img name with spaces.tar.gz": "b" * 64}


# --- targets


def test_remote_staging_removes_dead_publishes_leftovers(tmp_path):
    dead, alive = tmp_path / ".publish-20261125-cf78cc2f-999999999", tmp_path / f".publish-x-{os.getppid()}"
    dead.mkdir()
    alive.mkdir()
    target = publish.parse_target("host:/srv", NAME)
    with target.staging("20261125-cf78cc2f", near=tmp_path) as staged:
        staged.mkdir()
        assert not dead.exists() and alive.exists()
    assert not staged.exists()


@pytest.mark.parametrize("text, host, port, directory", [
    ("deploy@mirror.example.org:/srv/images", "deploy@mirror.example.org", None, "/srv/images/img"),
    ("mirror:images", "mirror", None, "images/img"),
    ("ssh://deploy@127.0.0.1:2222/srv/images/", "deploy@127.0.0.1", 2222, "/srv/images/img"),
    ("ssh://[::1]:22/srv", "[::1]", 22, "/srv/img"),
    ("deploy@[::1]:/srv", "deploy@[::1]", None, "/srv/img"),
])
def test_remote_targets(text, host, port, directory):
    target = publish.parse_target(text, NAME)
    assert isinstance(target, remote.RemoteTarget)
    assert (target.host, target.port, target.directory) == (host, port, directory)
    assert target.location("v") == (f"{host}:{directory}/v" if port is None else f"ssh://{host}:{port}{directory}/v")


@pytest.mark.parametrize("text", ["build/publish", "/srv/images", "./odd:name", "/srv/odd:name"])
def test_local_targets(text):
    target = publish.parse_target(text, NAME)
    assert isinstance(target, local.LocalTarget)
    assert target.directory == (Path(text).resolve() / NAME)


@pytest.mark.parametrize("text, problem", [
    ("ssh://host:99999/srv", "port is not a number"),
    ("ssh://host", "write ssh://"),
    ("deploy@mirror:", "no path after the host"),
    ("-oProxyCommand=x:/srv", r"'-oProxyCommand=x' is not \[user@\]host"),
    ("ssh://-oProxyCommand=x@host/srv", r"'-oProxyCommand=x@host' is not \[user@\]host"),
    ("-oProxyCommand=x@host:/srv", r"'-oProxyCommand=x@host' is not \[user@\]host"),
    ("ssh://user@-host/srv", "is not \\[user@\\]host"),
    ("ssh://us%20er@host/srv", "is not \\[user@\\]host"),
    ("ssh://user@host/srv\nx", "has a control character"),
    ("user@host:/srv\tx", "has a control character"),
])
def test_bad_targets(text, problem):
    with pytest.raises(PipelineError, match=problem):
        publish.parse_target(text, NAME)


def test_remote_commands_are_quoted_for_the_remote_shell(monkeypatch):
    calls = []
    monkeypatch.setattr(remote, "run", lambda argv, **kw: calls.append(argv) or CompletedProcess(argv, 1, "", ""))
    target = publish.parse_target("ssh://deploy@[::1]:2222/srv/my images", NAME,
                                  ["IdentityFile=/keys/id ed25519", "UserKnownHostsFile=/keys/known"])
    target.read("20261121-aaaaaaaa/SHA256SUMS")
    argv, = calls
    # The user's options first: ssh keeps the first value of each, so they may change the deadlines too.
    assert argv[:-3] == ["ssh", "-o", "BatchMode=yes", "-p", "2222", "-o", "IdentityFile=/keys/id ed25519",
                         "-o", "UserKnownHostsFile=/keys/known", "-o", "ConnectTimeout=30",
                         "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4"]
    assert argv[-3:-1] == ["--", "deploy@::1"]
    assert argv[-1] == "cat -- '/srv/my images/img/20261121-aaaaaaaa/SHA256SUMS'"


class FakeHolder:
    """What run.hold returns, for an ssh that printed `out`, `err` and exited with `code`."""

    def __init__(self, out: bytes, err: bytes, code: int):
        self.stdin, self.stdout, self.stderr = io.BytesIO(), self._pipe(out), self._pipe(err)
        self.returncode = code

    @staticmethod
    def _pipe(data: bytes):  # a real file descriptor: session() waits for it with select
        read, write = os.pipe()
        os.write(write, data)
        os.close(write)
        return os.fdopen(read, "rb")

    def poll(self):
        return None  # still holding the lock

    def wait(self, timeout=None):
        return self.returncode


@pytest.mark.parametrize("out, err, code, problem", [
    (b"", b"", 75, r"ssh://root@127\.0\.0\.1:2222/srv/img: another publish is running \(it holds \.publish\.lock\)"),
    (b"", b"ssh: connect to host 127.0.0.1 port 2222: Connection refused\n", 255,
     r"cannot take \.publish\.lock there: ssh: connect to host .* Connection refused$"),
    (b"", b"", 1, r"cannot take \.publish\.lock there: ssh exited 1$"),
])
def test_remote_lock_failures_are_one_line(monkeypatch, out, err, code, problem):
    argvs = []
    monkeypatch.setattr(remote, "hold", lambda argv: argvs.append(argv) or FakeHolder(out, err, code))
    monkeypatch.setattr(remote, "release", lambda holder: None)
    target = publish.parse_target("ssh://root@127.0.0.1:2222/srv", NAME)
    with pytest.raises(PipelineError, match=problem), target.session():
        pytest.fail("the session must not start without the lock")
    assert argvs[0][-1].startswith("sh -c ") and argvs[0][-1].endswith("/srv/img .publish.lock")


def test_remote_lock_is_held_for_the_session_and_released(monkeypatch):
    released = []
    monkeypatch.setattr(remote, "hold", lambda argv: FakeHolder(b"locked\n", b"", 0))
    monkeypatch.setattr(remote, "release", released.append)
    with publish.parse_target("host:/srv", NAME).session():
        assert not released
    assert len(released) == 1


# --- what the build records is what publish verifies


def test_a_builds_own_build_info_records_every_published_file(ctx, tmp_path):  # noqa: F811 (ctx: test_build's fixture)
    assembled(ctx)
    (ctx.work / ctx.artifacts.qcow2.name).write_text("qcow2")
    build.move_into_place(ctx)
    art = ctx.artifacts
    for report in (art.check_report, art.boot_report):
        report.write_text(json.dumps({"passed": True, "qcow2_sha256": art.read_info()["qcow2_sha256"]}))
    proven = verify_build(art.directory, art.name)
    assert set(proven.sums) == {art.qcow2.name, art.liveimg.name, art.kernel.name, art.initrd.name, art.files.name}
    art.kernel.write_text("another kernel")
    with pytest.raises(PipelineError, match=f"^{art.kernel}: sha256 .* is not the sha256 build-info.json records"):
        verify_build(art.directory, art.name)


def test_artifacts_names_every_file_the_build_records_and_publish_copies(ctx, target, signer):  # noqa: F811 (fixture)
    """pipeline.artifacts is the one place a build's file names are: a file added to the build or to
    publish alone fails here."""
    assembled(ctx)
    (ctx.work / ctx.artifacts.qcow2.name).write_text("qcow2")
    (ctx.work / ctx.artifacts.packages.name).write_text(DPKG_STATUS)  # the SBOM is made from it
    build.move_into_place(ctx)
    art = ctx.artifacts
    for report in (art.check_report, art.boot_report):
        report.write_text(json.dumps({"passed": True, "qcow2_sha256": art.read_info()["qcow2_sha256"]}))
    named = {getattr(art, name).name for name, value in vars(Artifacts).items()
             if isinstance(value, property) and isinstance(getattr(art, name), Path)}
    assert set(art.read_info()["sha256"]) <= named
    result = publish.publish(art.directory, art.name, target, **signer)
    copied = {file.name for file in (target / art.name / result.version).iterdir()}
    assert copied - {SUMS, SIGNATURE, SBOM} <= named
    assert {file.name for file in (*art.published, *art.published_if_built, art.manifest)} <= copied


# --- a published version is verified before kickstart.render and pxe.render use it


@pytest.fixture
def public_key(gpg_key, tmp_path):
    """The signing key's public half, as a file an operator is given."""
    home, email = gpg_key
    key = tmp_path / "signer.asc"
    key.write_text(run(["gpg", "--batch", "--armor", "--export", email], env={"GNUPGHOME": str(home)},
                       capture=True).stdout)
    return key


@pytest.fixture
def published_version(build_dir, target, signer):
    return target / NAME / publish.publish(build_dir, NAME, target, **signer).version


def test_published_version_is_verified_with_a_key_file_or_a_fingerprint(
        published_version, build_dir, target, public_key, gpg_key, monkeypatch):
    version, sums = kickstart.published_version(NAME, target, str(public_key))
    assert version == published_version
    assert sums["img.tar.gz"] == hashlib.sha256((build_dir / "img.tar.gz").read_bytes()).hexdigest()
    monkeypatch.setenv("GNUPGHOME", str(gpg_key[0]))
    fingerprint = require_key(gpg_key[1], gpg_key[0])
    assert kickstart.published_version(NAME, target, fingerprint.lower())[0] == published_version
    assert kickstart.published_version(NAME, build_dir.parent, None) is None  # a build directory


def test_published_version_needs_a_verify_key(published_version, target):
    with pytest.raises(PipelineError, match=r"latest is a published version: give --verify-key FINGERPRINT or KEYFILE"):
        kickstart.published_version(NAME, target, None)
    with pytest.raises(PipelineError, match="neither a file nor a full fingerprint"):
        kickstart.published_version(NAME, target, "publish-test@example.invalid")


def test_edited_sha256sums_is_refused(published_version, target, public_key):
    sums = published_version / "SHA256SUMS"
    sums.write_text(sums.read_text().replace("img.tar.gz", "img.tar.gz.orig") + f"{'0' * 64}  img.tar.gz\n")
    with pytest.raises(PipelineError, match=r"SHA256SUMS.asc: not a good signature by .*: a bad signature: "
                                            r"SHA256SUMS was changed after it was signed$"):
        kickstart.published_version(NAME, target, str(public_key))


@pytest.mark.parametrize("file", ["img.tar.gz", "img.vmlinuz", "img.initrd"])
def test_changed_artifact_of_a_published_version_is_refused(published_version, target, public_key, file):
    (published_version / file).unlink()  # a hard link to the build's: replace it
    (published_version / file).write_text("not what was signed\n")
    with pytest.raises(PipelineError, match=rf"sha256sum --check SHA256SUMS failed: {file}: FAILED"):
        kickstart.published_version(NAME, target, str(public_key))


def test_version_signed_by_another_key_is_refused(published_version, target, tmp_path):
    other_home, other_email = make_gpg_home()
    try:
        other = tmp_path / "other.asc"
        other.write_text(run(["gpg", "--batch", "--armor", "--export", other_email],
                             env={"GNUPGHOME": str(other_home)}, capture=True).stdout)
        with pytest.raises(PipelineError, match=r"not a good signature by .*other.asc: .*No public key"):
            kickstart.published_version(NAME, target, str(other))
        fingerprint = require_key(other_email, other_home)
        with pytest.raises(PipelineError, match="not a good signature"):
            verify_version(published_version, ["img.tar.gz"], fingerprint, other_home)
    finally:
        remove_gpg_home(other_home)


# --- pruning, latest and the remote lock, over a stand-in for ssh


def test_crash_while_pruning_leaves_no_half_version(tmp_path, target, signer, monkeypatch):
    first = publish_version(tmp_path, target, signer, "21", date="20261121", retention=1)
    real_rmtree = shutil.rmtree

    def crash_midway(path, *args, **kwargs):
        if Path(path).parent == target / NAME and Path(path).is_dir():  # pruning: one file gone, then killed
            next(Path(path).iterdir()).unlink()
            raise KeyboardInterrupt
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(publish.shutil, "rmtree", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        publish_version(tmp_path, target, signer, "22", date="20261122", retention=1)
    monkeypatch.undo()
    second = json.loads((tmp_path / "build-22" / NAME / "build-info.json").read_text())["version"]
    assert visible(target) == {second, "latest"}  # the half-deleted first version is hidden
    assert [p.name for p in (target / NAME).iterdir() if p.name.startswith(".pruning-")]
    publish_version(tmp_path, target, signer, "23", date="20261123", retention=2)
    assert not [p for p in (target / NAME).iterdir() if p.name.startswith(".pruning-")]
    assert first.version not in visible(target)


def test_latest_is_not_pointed_at_a_changed_version(tmp_path, target, signer):
    first = publish_version(tmp_path, target, signer, "21", date="20261121")
    second = publish_version(tmp_path, target, signer, "22", date="20261122")
    tampered = target / NAME / first.version / "img.tar.gz"
    tampered.unlink()  # a hard link to the build's: replace it
    tampered.write_text("changed after publishing\n")
    with pytest.raises(PipelineError, match=r"sha256sum --check SHA256SUMS failed: img.tar.gz: FAILED"):
        publish_version(tmp_path, target, signer, "21", date="20261121")  # a rollback to the changed one
    assert os.readlink(target / NAME / "latest") == second.version


FAKE_SSH = """#!/bin/sh
# ssh as these tests need it: its argv logged, options skipped, the command run here as sshd would.
printf '%s\\n' "$*" >> "$(dirname "$0")/ssh.log"
while [ $# -gt 0 ]; do
    case $1 in
        -o|-p|-l|-i) shift 2 ;;
        --) shift; break ;;
        -*) shift ;;
        *) break ;;
    esac
done
shift
exec sh -c "$*"
"""


@pytest.fixture
def fake_ssh(tmp_path, monkeypatch):
    """An `ssh` first on PATH that runs the remote side on this machine (rsync's too): the remote
    scripts run for real, with no sshd. Returns its log of argv lines."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text(FAKE_SSH)
    (bin_dir / "ssh").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return bin_dir / "ssh.log"


def test_remote_publish_checks_prunes_by_renaming_and_gives_every_ssh_deadlines(tmp_path, signer, fake_ssh):
    remote = tmp_path / "remote"
    target = f"somehost:{remote}"
    results = [publish_version(tmp_path, target, signer, str(day), date=f"202611{day}", retention=2)
               for day in (21, 22, 23)]
    assert results[2].pruned == (results[0].version,)
    assert sorted(p.name for p in (remote / NAME).iterdir()) == [
        ".publish.lock", results[1].version, results[2].version, "latest"]
    # Rolling back to a version whose files changed there is refused; latest stays.
    (remote / NAME / results[1].version / "img.qcow2").write_text("changed there\n")
    with pytest.raises(PipelineError, match="computed checksum did NOT match"):
        publish_version(tmp_path, target, signer, "22", date="20261122")
    assert os.readlink(remote / NAME / "latest") == results[2].version
    log = fake_ssh.read_text().splitlines()
    assert any("mv -T" in line and ".pruning-" in line for line in log)
    for line in log:  # every ssh, rsync's included
        assert "-o ConnectTimeout=30 -o ServerAliveInterval=15 -o ServerAliveCountMax=4" in line
    assert all(" -- somehost " in line for line in log if " rsync --server " not in line)


@pytest.mark.parametrize("step", ["commit", "point_latest", "prune"])
def test_remote_steps_stop_when_the_lock_session_died(tmp_path, fake_ssh, step):
    directory = tmp_path / "remote" / NAME
    (directory / "20261121-aaaaaaaa").mkdir(parents=True)
    target = publish.parse_target(f"somehost:{tmp_path / 'remote'}", NAME)
    with target.session():
        os.killpg(target._lock.pid, signal.SIGKILL)  # the lock's ssh session dies
        target._lock.wait()
        staged = tmp_path / ".publish-20261122-bbbbbbbb-1"
        staged.mkdir()
        calls = {"commit": lambda: target.commit(staged, "20261122-bbbbbbbb"),
                 "point_latest": lambda: target.point_latest("20261121-aaaaaaaa"),
                 "prune": lambda: target.prune(["20261121-aaaaaaaa"])}
        with pytest.raises(PipelineError, match=r"somehost:.*/img: the ssh session holding \.publish\.lock "
                                                r"there has ended: stopped before"):
            calls[step]()
    assert sorted(p.name for p in directory.iterdir()) == [".publish.lock", "20261121-aaaaaaaa"]


def test_remote_host_that_does_not_answer_is_given_up_in_one_line(tmp_path, fake_ssh, monkeypatch):
    (fake_ssh.parent / "ssh").write_text("#!/bin/sh\nexec sleep 60\n")  # connected, then nothing
    monkeypatch.setattr(remote, "REMOTE_DEADLINE", 1)
    target = publish.parse_target(f"somehost:{tmp_path}", NAME)
    started = time.monotonic()
    with pytest.raises(PipelineError, match=r"^somehost: ssh sh did not finish within 1 s: the host or the network"):
        target.listing()
    with (pytest.raises(PipelineError, match=r"^somehost: taking \.publish\.lock did not finish within 1 s"),
          target.session()):
        pytest.fail("no lock was taken")
    assert time.monotonic() - started < 15
