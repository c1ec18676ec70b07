"""What the offline check requires is read from the elements: their package-installs.yaml
and enabled-units lists. No libguestfs, no image, no root."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline import spec
from pipeline.check.elements import enabled_units, package_installs, read_units, required_packages
from pipeline.errors import PipelineError
from pipeline.paths import ELEMENTS


def test_required_packages_per_kind_of_image():
    images = spec.load().images
    guest = required_packages(images["guest-image"])
    assert {"cloud-init", "qemu-guest-agent", "cloud-guest-utils", "linux-image-cloud-amd64", "tuned",
            "selinux-policy-default", "grub-pc"} <= set(guest)
    assert "linux-image-amd64" not in guest and "libvirt-daemon-system" not in guest
    assert len(guest) == len(set(guest))
    host = required_packages(images["host-image"])
    assert {"linux-image-amd64", "cloud-init", "libvirt-daemon-system", "openvswitch-switch", "ovmf"} <= set(host)
    assert "qemu-guest-agent" not in host and "linux-image-cloud-amd64" not in host
    base = required_packages(replace(images["guest-image"], elements=("kvm-base",), packages=("htop",)))
    assert base == [*package_installs(ELEMENTS / "kvm-base" / "package-installs.yaml")[0], "htop"]


def _with_element(tmp_path: Path, name: str, files: dict[str, str]) -> spec.ImageSpec:
    """The guest image with one more element of ours, in a directory of the user's."""
    element = tmp_path / name
    for relative, text in files.items():
        (element / relative).parent.mkdir(parents=True, exist_ok=True)
        (element / relative).write_text(text)
    guest = spec.load().images["guest-image"]
    return replace(guest, elements=(*guest.elements, name), element_dirs=(tmp_path, *guest.element_dirs))


def test_a_package_an_element_installs_is_required(tmp_path):
    extra = _with_element(tmp_path, "site-tools", {"element-deps": "package-installs\n",
                                                   "package-installs.yaml": "htop:\nstrace:\n  phase: install.d\n"})
    assert {"htop", "strace"} <= set(required_packages(extra))
    assert "htop" not in required_packages(spec.load().images["guest-image"])


def test_a_user_element_that_shadows_ours_is_read_instead(tmp_path):
    ours = (ELEMENTS / "kvm-guest" / "package-installs.yaml").read_text()
    shutil.copytree(ELEMENTS / "kvm-guest", tmp_path / "kvm-guest")
    (tmp_path / "kvm-guest" / "package-installs.yaml").write_text(ours + "mtr-tiny:\n")
    guest = spec.load().images["guest-image"]
    assert "mtr-tiny" in required_packages(replace(guest, element_dirs=(tmp_path, *guest.element_dirs)))


def test_removed_and_conditional_packages_are_not_required(tmp_path):
    extra = _with_element(tmp_path, "site-tools", {"package-installs.yaml": (
        "build-essential:\n  build-only: true\n"
        "nano:\n  uninstall: true\n"
        "qemu-guest-agent:\n  uninstall: true\n"   # kvm-guest installs it, this element removes it
        "linux-image-arm64:\n  arch: arm64\n"
        "bpftrace:\n  when: DIB_DEBUG=1\n")})
    required = required_packages(extra)
    assert not {"build-essential", "nano", "qemu-guest-agent", "linux-image-arm64", "bpftrace"} & set(required)


@pytest.mark.parametrize("text, error", [
    ("htop: [\n", "package-installs.yaml: not valid YAML: "),
    ("- htop\n", "package-installs.yaml: expected a mapping of package names, found list"),
    ("Htop:\n", "package-installs.yaml: package 'Htop': not a Debian package name"),
    ("htop: yes\n", "package-installs.yaml: package htop: expected nothing or a mapping of options, found True"),
    ("htop:\n  phse: install.d\n", "package-installs.yaml: package htop: unknown option 'phse'"),
])
def test_a_bad_package_installs_yaml_is_refused_naming_file_and_package(tmp_path, text, error):
    path = tmp_path / "package-installs.yaml"
    path.write_text(text)
    with pytest.raises(PipelineError) as raised:
        package_installs(path)
    assert str(raised.value).startswith(f"{tmp_path}/{error}") and "\n" not in str(raised.value)


def test_enabled_units_are_the_host_elements_list():
    images = spec.load().images
    listed = read_units(ELEMENTS / "kvm-host" / "enabled-units" / "kvm-host")
    host_units = {"libvirtd.service", "virtlogd.socket", "openvswitch-switch.service", "kvmpipe-ovs-bridges.service"}
    assert host_units <= set(listed)
    assert enabled_units(images["host-image"]) == listed
    assert enabled_units(images["guest-image"]) == []


def test_a_unit_an_element_lists_is_checked(tmp_path):
    extra = _with_element(tmp_path, "site-agent", {"enabled-units/site-agent": "# ours\n\nsite-agent.service\n"})
    assert enabled_units(extra) == ["site-agent.service"]


@pytest.mark.parametrize("line", ["site agent.service", " site-agent.service", "site-agent", "site-agent.service # x"])
def test_a_bad_unit_line_is_refused_naming_file_and_line(tmp_path, line):
    path = tmp_path / "site-agent"
    path.write_text(f"# ours\n{line}\n")
    with pytest.raises(PipelineError, match=rf"^{tmp_path}/site-agent: line 2: .* is not a systemd unit name$"):
        read_units(path)
