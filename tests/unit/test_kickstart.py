"""Kickstarts: rendered from the inventory and images.toml, checked by the real pykickstart
for each target, and written only when every one passes."""

import json
import re
import textwrap
from pathlib import Path

import pytest
from pykickstart.constants import SELINUX_ENFORCING
from pykickstart.parser import KickstartParser
from pykickstart.version import makeVersion

from pipeline import spec
from pipeline.deploy import inventory, kickstart
from pipeline.errors import InventoryError, PipelineError
from pipeline.paths import ROOT

EXAMPLE = ROOT / "kickstarts" / "inventory.example.toml"
SHA = "ab" * 32
FAKE = {name: kickstart.LiveImage(f"{name}.tar.gz", SHA) for name in ("host-image", "guest-image")}


def parsed(path: Path, target: str = "RHEL9"):
    """The kickstart as a plain pykickstart handler: made the slow, obvious way."""
    handler = makeVersion(target)
    KickstartParser(handler, followIncludes=False).readKickstartFromString(path.read_text())
    return handler


def with_site(tmp_path: Path, extra: str) -> inventory.Inventory:
    """The example inventory, with more [site] fields."""
    text = EXAMPLE.read_text().replace("\n[site]\n", f"\n[site]\n{extra}\n")
    path = tmp_path / "inventory.toml"
    path.write_text(text)
    return inventory.load(path)


def snippets(tmp_path: Path, files: dict[str, str]) -> inventory.Inventory:
    (tmp_path / "snippets").mkdir()
    for name, text in files.items():
        (tmp_path / "snippets" / name).write_text(textwrap.dedent(text))
    return with_site(tmp_path, 'snippets = "snippets"')


@pytest.fixture(scope="module")
def example():
    return inventory.load(EXAMPLE)


@pytest.mark.parametrize("target", kickstart.TARGETS)
def test_example_renders_and_validates(example, tmp_path, target):
    written = kickstart.render_all(example, tmp_path / "ks", target, liveimgs=FAKE)
    assert [p.name for p in written] == ["compute1.ks", "compute2.ks", "guest1.ks"]
    for path in written:
        parsed(path, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ks"]  # no work directory left beside it


def test_kernel_args_and_tuned_profile_from_images_toml_plus_overrides(example, tmp_path):
    kickstart.render_all(example, tmp_path, liveimgs=FAKE)
    host = spec.load().get("host-image")
    compute1, compute2 = parsed(tmp_path / "compute1.ks"), parsed(tmp_path / "compute2.ks")
    assert compute1.bootloader.appendLine == " ".join([*host.kernel_cmdline, "hugepagesz=1G", "hugepages=16"])
    assert compute2.bootloader.appendLine == " ".join(host.kernel_cmdline)
    assert "intel_iommu=on" in compute2.bootloader.appendLine  # from images.toml, not a copy
    assert compute1.scripts[0].script.splitlines()[1] == f"profile={host.tuned_profile}"
    assert "echo manual > /etc/tuned/profile_mode" in compute1.scripts[0].script
    assert compute1.scripts[0].errorOnFail


@pytest.mark.parametrize("installed", [
    pytest.param("etc/tuned/profiles/openstack-compute", id="trixie-ours"),  # tuned >= 2.23
    pytest.param("usr/lib/tuned/profiles/openstack-compute", id="trixie-builtin"),
    pytest.param("etc/tuned/openstack-compute", id="bookworm-ours"),  # tuned 2.20
    pytest.param(None, id="missing"),
])
def test_tuned_post_finds_the_profile_in_either_tuned_layout(example, tmp_path, installed):
    """The %post runs in the installed image, which is bookworm's or trixie's: run it with sh over a
    fake root (its absolute paths moved under tmp_path) for each place tuned keeps profiles."""
    import subprocess

    kickstart.render_all(example, tmp_path / "ks", liveimgs=FAKE)
    script = parsed(tmp_path / "ks/compute2.ks").scripts[0].script
    root = tmp_path / "root"
    (root / "etc/tuned").mkdir(parents=True)
    if installed:
        (root / installed).mkdir(parents=True)
        (root / installed / "tuned.conf").write_text("[main]\n")
    moved = script.replace("/etc/tuned", f"{root}/etc/tuned").replace("/usr/lib/tuned", f"{root}/usr/lib/tuned")
    result = subprocess.run(["sh", "-c", moved], capture_output=True, text=True)
    if installed:
        assert result.returncode == 0, result.stderr
        assert (root / "etc/tuned/active_profile").read_text() == "openstack-compute\n"
    else:
        assert result.returncode == 1
        assert result.stderr == "tuned profile openstack-compute is not installed in the image\n"


def test_tuned_profile_override(tmp_path):
    text = EXAMPLE.read_text().replace('kernel_args = ["hugepagesz=1G", "hugepages=16"]', 'tuned_profile = "kvm-guest"')
    (tmp_path / "inventory.toml").write_text(text)
    kickstart.render_all(inventory.load(tmp_path / "inventory.toml"), tmp_path / "ks", liveimgs=FAKE)
    assert "profile=kvm-guest\n" in (tmp_path / "ks/compute1.ks").read_text()
    assert "profile=openstack-compute\n" in (tmp_path / "ks/compute2.ks").read_text()


def test_selinux_liveimg_and_network(example, tmp_path):
    kickstart.render_all(example, tmp_path, liveimgs=FAKE)
    compute1, guest1 = parsed(tmp_path / "compute1.ks"), parsed(tmp_path / "guest1.ks")
    assert compute1.selinux.selinux == SELINUX_ENFORCING
    assert compute1.liveimg.url == "http://10.0.0.1:8080/host-image/host-image.tar.gz"
    assert compute1.liveimg.checksum == SHA
    assert guest1.liveimg.url == "http://10.0.0.1:8080/guest-image/guest-image.tar.gz"
    static = compute1.network.network[0]
    assert (static.device, static.bootProto, static.ip, static.netmask, static.gateway, static.nameserver,
            static.hostname) == ("52:54:00:12:34:01", "static", "10.0.0.11", "255.255.255.0", "10.0.0.1",
                                 "10.0.0.1", "compute1")
    dhcp = guest1.network.network[0]
    assert (dhcp.device, dhcp.bootProto, dhcp.hostname) == ("52:54:00:12:34:03", "dhcp", "guest1")


def test_storage_bios_uefi_and_cache(example, tmp_path):
    kickstart.render_all(example, tmp_path, liveimgs=FAKE)
    compute1, compute2 = parsed(tmp_path / "compute1.ks"), parsed(tmp_path / "compute2.ks")
    assert compute1.zerombr.zerombr
    assert compute1.clearpart.drives == compute1.ignoredisk.onlyuse == ["sda", "sdb", "nvme0n1"]
    parts = {p.mountpoint: p.disk for p in compute1.partition.partitions}
    assert parts == {"/boot/efi": "sda", "/boot": "sda", "pv.root": "sda", "pv.data": "sdb", "pv.ssd": "nvme0n1"}
    assert [v.physvols for v in compute1.volgroup.vgList] == [["pv.root"], ["pv.data", "pv.ssd"]]
    images = next(lv for lv in compute1.logvol.lvList if lv.mountpoint == "/var/lib/libvirt/images")
    assert (images.cache_pvs, images.cache_size, images.cache_mode) == (["pv.ssd"], 100000, "writethrough")
    disk = "/dev/disk/by-id/wwn-0x5000c500a1b2c3d4"
    assert compute2.clearpart.drives == [disk]
    assert {p.mountpoint: p.fstype for p in compute2.partition.partitions}["biosboot"] == "biosboot"
    assert "/boot/efi" not in {p.mountpoint for p in compute2.partition.partitions}
    assert [lv.mountpoint for lv in compute2.logvol.lvList] == ["/"]
    assert compute2.bootloader.bootDrive == disk


def test_snippets_are_appended_in_name_order(tmp_path):
    loaded = snippets(tmp_path, {"20-tz.ks": "timezone Europe/Paris",  # no final newline: one is added
                                 "10-key.ks": 'sshkey --username=root "ssh-ed25519 AAAA x"\n',
                                 "notes.txt": "not a snippet\n"})
    kickstart.render_all(loaded, tmp_path / "ks", liveimgs=FAKE)
    text = (tmp_path / "ks/compute1.ks").read_text()
    assert text.index("sshkey") < text.index("timezone Europe/Paris") and "not a snippet" not in text
    assert parsed(tmp_path / "ks/compute1.ks").timezone.timezone == "Europe/Paris"  # the last one wins


def test_a_snippet_that_is_not_text(tmp_path):
    loaded = snippets(tmp_path, {})
    (tmp_path / "snippets/10-binary.ks").write_bytes(b"\xff\xfe")
    with pytest.raises(InventoryError, match=r"field 'site.snippets': cannot read .*10-binary.ks: 'utf-8' codec"):
        kickstart.render_all(loaded, tmp_path / "ks", liveimgs=FAKE)
    assert not (tmp_path / "ks").exists()


def test_includes_are_left_to_the_installer(tmp_path):
    loaded = with_site(tmp_path, 'includes = ["http://10.0.0.1:8080/site.ks"]')
    kickstart.render_all(loaded, tmp_path / "ks", liveimgs=FAKE)
    assert "\n%include http://10.0.0.1:8080/site.ks\n" in (tmp_path / "ks/guest1.ks").read_text()


BAD_SNIPPETS = [
    ("# fine\nbogus --x\n", "line 2): Unknown command: bogus"),
    ("logging --level=info\n", "line 1): Ignoring deprecated option on line"),  # a warning, as an error
    ("part /boot --size=100\n", "A partition with the mountpoint /boot has already been defined"),
    ("raid / --level=RAID77 --device=md0 raid.01\n", "line 1): Invalid raid level: RAID77"),
]


@pytest.mark.parametrize("text, problem", BAD_SNIPPETS, ids=[b[1] for b in BAD_SNIPPETS])
def test_a_rejected_kickstart_is_never_written(tmp_path, text, problem):
    loaded = snippets(tmp_path, {"10-good.ks": "# ours\n", "90-bad.ks": text})
    output = tmp_path / "ks"
    output.mkdir()
    (output / "compute1.ks").write_text("old\n")
    with pytest.raises(InventoryError) as caught:
        kickstart.render_all(loaded, output, liveimgs=FAKE)
    message = str(caught.value)
    assert message.startswith(f"{loaded.path}: node 'compute1': pykickstart (RHEL9) rejects its kickstart: "), message
    assert problem in message and "\n" not in message
    if "line" in problem:
        assert f"({tmp_path / 'snippets/90-bad.ks'} line" in message
    assert [p.name for p in output.iterdir()] == ["compute1.ks"]
    assert (output / "compute1.ks").read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inventory.toml", "ks", "snippets"]


def test_the_validator_starts_clean_for_each_kickstart(example, tmp_path):
    kickstart.render_all(example, tmp_path, liveimgs=FAKE)
    text = (tmp_path / "compute1.ks").read_text()
    validator = kickstart.Validator("RHEL9")
    for _ in range(3):  # state left by a parse would show as "already defined" warnings
        validator.check(text)
    with pytest.raises(Exception) as caught:
        validator.check(text + "raid / --level=RAID77 --device=md0 raid.01\n")
    assert caught.value.lineno == text.count("\n") + 1  # a check that is a method of its command


def test_a_new_render_replaces_the_old_and_removes_stale_kickstarts(example, tmp_path):
    (tmp_path / "gone.ks").write_text("a node no longer in the inventory\n")
    (tmp_path / "compute1.ks").write_text("old\n")
    (tmp_path / "pxelinux.cfg").write_text("not ours\n")
    kickstart.render_all(example, tmp_path, liveimgs=FAKE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compute1.ks", "compute2.ks", "guest1.ks", "pxelinux.cfg"]
    assert (tmp_path / "compute1.ks").read_text() != "old\n"


def test_artifacts_come_from_build_info(example, tmp_path):
    for role, sha in (("host-image", "1" * 64), ("guest-image", "2" * 64)):
        (tmp_path / "build" / role).mkdir(parents=True)
        (tmp_path / "build" / role / "build-info.json").write_text(json.dumps({"sha256": {f"{role}.tar.gz": sha}}))
    kickstart.render_all(example, tmp_path / "ks", build_dir=tmp_path / "build")
    assert parsed(tmp_path / "ks/compute1.ks").liveimg.checksum == "1" * 64
    assert parsed(tmp_path / "ks/guest1.ks").liveimg.checksum == "2" * 64


@pytest.mark.parametrize("info, problem", [
    (None, "role 'guest-image': {info} is missing: guest-image has not been built: run ./inv build guest-image"),
    ({"image": "guest-image"}, ("role 'guest-image': {info} records no sha256 of guest-image.tar.gz: "
                                "rebuild with ./inv build guest-image")),
    ("[]", "role 'guest-image': {info}: not a JSON object"),
])
def test_missing_artifact_names_the_role_and_file(example, tmp_path, info, problem):
    path = tmp_path / "build/guest-image/build-info.json"
    path.parent.mkdir(parents=True)
    if info is not None:
        path.write_text(info if isinstance(info, str) else json.dumps(info))
    given = {"host-image": FAKE["host-image"]}
    with pytest.raises(PipelineError) as caught:
        kickstart.render_all(example, tmp_path / "ks", build_dir=tmp_path / "build", liveimgs=given)
    assert str(caught.value) == problem.format(info=path)
    assert not (tmp_path / "ks").exists()


@pytest.mark.parametrize("sha256", ["not-a-sum", SHA + "\n"])
def test_a_given_artifact_needs_a_sha256(example, tmp_path, sha256):
    given = {**FAKE, "guest-image": kickstart.LiveImage("guest-image.tar.gz", sha256)}
    with pytest.raises(PipelineError, match=re.escape(f"role 'guest-image': {sha256!r} is not a sha256")):
        kickstart.render_all(example, tmp_path / "ks", liveimgs=given)


def test_a_value_no_kickstart_can_hold_names_the_node(tmp_path):
    (tmp_path / "a\nb").mkdir()
    path = tmp_path / "a\nb/inventory.toml"
    path.write_text(EXAMPLE.read_text())
    with pytest.raises(InventoryError) as caught:
        kickstart.render_all(inventory.load(path), tmp_path / "ks", liveimgs=FAKE)
    message = str(caught.value)
    assert message.startswith(f"{path}: node 'compute1': cannot write "), message  # the comment naming the file
    assert "into a comment line: it holds a control character" in message
    assert not (tmp_path / "ks").exists()


def test_unknown_target(example, tmp_path):
    with pytest.raises(PipelineError, match="unknown kickstart target 'RHEL5'; supported: RHEL9, RHEL10"):
        kickstart.render_all(example, tmp_path / "ks", "RHEL5", liveimgs=FAKE)
    assert not (tmp_path / "ks").exists()


def test_benchmark_runs(capsys):
    assert kickstart.benchmark(8) > 0
    assert "8 kickstarts for RHEL9: load" in capsys.readouterr().out
