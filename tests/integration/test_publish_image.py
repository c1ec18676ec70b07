"""Publishing the session's built host image (--use-built, after its boot test passed) to a
local directory with a throw-away signing key, then deploying from what was published: a PXE
tree rendered from the published version, checked as booting nodes would walk it."""

from __future__ import annotations

import json
import subprocess

import pytest

from pipeline import build, publish
from pipeline.deploy import pxe
from pipeline.paths import ROOT
from pipeline.publish.sbom import SBOM, declared
from pipeline.publish.sign import SIGNATURE, SUMS, make_gpg_home, remove_gpg_home
from pipeline.publish.verify import read_sums


@pytest.fixture(scope="module")
def signer():
    home, email = make_gpg_home()
    yield {"key": email, "gnupg_home": home}
    remove_gpg_home(home)


@pytest.fixture(scope="module")
def public_key(signer, tmp_path_factory):
    """The signing key's public half, as the operator who renders from the published versions has it."""
    key = tmp_path_factory.mktemp("key") / "signer.asc"
    exported = subprocess.run(["gpg", "--homedir", str(signer["gnupg_home"]), "--armor", "--export", signer["key"]],
                              check=True, capture_output=True, text=True)
    key.write_text(exported.stdout)
    return key


@pytest.fixture(scope="module")
def published(artifacts, spec, signer, tmp_path_factory):
    target = tmp_path_factory.mktemp("published")
    result = publish.publish(artifacts.directory, spec.name, target, **signer)
    return target, result


def test_published_version_is_complete_and_verifies(artifacts, published, signer):
    target, result = published
    version = target / artifacts.name / result.version
    assert (target / artifacts.name / "latest").resolve() == version.resolve()
    listed = read_sums((version / SUMS).read_text())
    assert {artifacts.qcow2.name, artifacts.liveimg.name, artifacts.kernel.name, artifacts.initrd.name,
            "manifest.json", SBOM} <= set(listed)
    subprocess.run(["sha256sum", "--check", "--strict", SUMS], cwd=version, check=True, capture_output=True)
    subprocess.run(["gpg", "--homedir", str(signer["gnupg_home"]), "--verify", SIGNATURE, SUMS],
                   cwd=version, check=True, capture_output=True)
    assert listed[artifacts.qcow2.name] == artifacts.read_info()["qcow2_sha256"]


def test_sbom_lists_every_package_of_the_image(artifacts, published):
    target, result = published
    sbom = json.loads((target / artifacts.name / result.version / SBOM).read_text())
    packages = json.loads(artifacts.manifest.read_text())["packages"]
    names = {component["name"] for component in sbom["components"]}
    assert names == set(packages)
    assert sbom["metadata"]["component"]["version"] == result.version
    # Each package's declared licenses, from the manifest (its copyright file), by SPDX id or Debian's
    # name; CycloneDX keeps a component's licenses as a sorted set.
    licenses = json.loads(artifacts.manifest.read_text())["licenses"]
    in_sbom = {component["name"]: {entry["license"].get("id") or entry["license"]["name"]
                                   for entry in component.get("licenses", [])} for component in sbom["components"]}
    assert {name: found for name, found in in_sbom.items() if found} == {
        name: {declared(license).id or license for license in names} for name, names in licenses.items()}


def test_republishing_keeps_the_version(artifacts, spec, published, signer):
    target, result = published
    again = publish.publish(artifacts.directory, spec.name, target, **signer)
    assert (again.version, again.new) == (result.version, False)


def test_pxe_tree_from_the_published_version(artifacts, spec, published, public_key, tmp_path):
    """The deploy path as the README gives it, through the CLI: kickstarts and a PXE tree rendered
    from the published version install its liveimg, checked against its published sha256, and
    the tree is walked over HTTP as booting nodes would."""
    target, result = published
    inventory_file = tmp_path / "inventory.toml"
    inventory_file.write_text(f'spec_file = "{spec.source}"\n[site]\nbase_url = "http://10.0.0.1:8080"\n'
                              '[node.compute1]\nmacs = ["52:54:00:12:34:01"]\nboot = "uefi"\n'
                              f'root_disk = "sda"\nrole = "{spec.name}"\n'
                              '[node.compute2]\nmacs = ["52:54:00:12:34:02"]\nboot = "bios"\n'
                              f'root_disk = "sda"\nrole = "{spec.name}"\n')
    sums = read_sums((target / spec.name / result.version / SUMS).read_text())
    unverified = cli(["kickstart.render", str(inventory_file), f"--build-dir={target}",
                      f"--output-dir={tmp_path / 'ks'}"], check=False)
    assert unverified.returncode == 1 and "give --verify-key" in unverified.stderr
    cli(["kickstart.render", str(inventory_file), f"--build-dir={target}", f"--output-dir={tmp_path / 'ks'}",
         "--target=RHEL10", f"--verify-key={public_key}"])
    assert f"--checksum={sums[artifacts.liveimg.name]}" in (tmp_path / "ks/compute1.ks").read_text()
    root = tmp_path / "pxe"
    cli(["pxe.render", str(inventory_file), f"--build-dir={target}", f"--output-dir={root}",
         f"--verify-key={public_key}"])
    assert f"--checksum={sums[artifacts.liveimg.name]}" in (root / pxe.SERVED / "kickstarts/compute2.ks").read_text()
    checked = cli(["pxe.check", f"--root={root}"])
    assert "2 nodes" in checked.stdout and "no problems" in checked.stdout
    assert build.sha256(root / pxe.SERVED / spec.name / artifacts.liveimg.name) == sums[artifacts.liveimg.name]


def test_pxe_check_catches_a_tampered_liveimg(artifacts, spec, published, public_key, tmp_path):
    target, _ = published
    inventory_file = tmp_path / "inventory.toml"
    inventory_file.write_text(f'spec_file = "{spec.source}"\n[site]\nbase_url = "http://10.0.0.1:8080"\n'
                              '[node.compute1]\nmacs = ["52:54:00:12:34:01"]\nboot = "uefi"\n'
                              f'root_disk = "sda"\nrole = "{spec.name}"\n')
    root = tmp_path / "pxe"
    cli(["pxe.render", str(inventory_file), f"--build-dir={target}", f"--output-dir={root}",
         f"--verify-key={public_key}"])
    served = root / pxe.SERVED / spec.name / artifacts.liveimg.name
    served.unlink()  # a hard link to the published file: replace it, never write through it
    served.write_bytes(b"not the image")
    failed = cli(["pxe.check", f"--root={root}"], check=False)
    assert failed.returncode == 1
    assert f"liveimg http://10.0.0.1:8080/{spec.name}/{artifacts.liveimg.name}: its sha256 is" in failed.stdout


def cli(args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(ROOT / "inv"), *args], capture_output=True, text=True, cwd=ROOT)
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result
