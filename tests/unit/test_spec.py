"""Spec loading: good specs become typed objects; each bad one is refused naming file, image and key."""

import re
import textwrap
from pathlib import Path

import pytest

from pipeline import spec
from pipeline.errors import SpecError
from pipeline.paths import SPEC_FILE

GOOD = """
default = "g"
[image.g]
elements = ["kvm-guest"]
tuned_profile = "kvm-guest"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "images.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_project_spec_loads():
    loaded = spec.load()
    image = loaded.get(None)
    assert image.name == loaded.default
    assert image.selinux is spec.SelinuxMode.ENFORCING
    assert spec.OutputFormat.QCOW2 in image.formats


def test_defaults_fill_in(tmp_path):
    image = spec.load(write(tmp_path, GOOD)).get("g")
    assert (image.distro, image.release, image.disk_size) == ("debian", "bookworm", 3 * 2**30)
    assert image.mirrors.debian == "http://deb.debian.org/debian"
    assert image.profile_dir == spec.PROFILES


def test_unknown_image_lists_known(tmp_path):
    with pytest.raises(SpecError, match=r"unknown image 'nope'; known images: g"):
        spec.load(write(tmp_path, GOOD)).get("nope")


BAD = [
    ('colour = "red"', "colour", "unknown key"),
    ('elements = ["kvm-guest", "no-such-element"]', "elements", "unknown element"),
    ('tuned_profile = "no-such-profile"', "tuned_profile", "not found"),
    ('disk_size = "3 bananas"', "disk_size", "size must look like"),
    ('disk_size = "1GiB"', "disk_size", "outside"),
    ('selinux = "disabled"', "selinux", "must be one of"),
    ('kernel_args = ["quiet\\" init=/bin/sh"]', "kernel_args", "break the bootloader"),
    ('kernel_args = ["a\\nb"]', "kernel_args", "break the bootloader"),
    ('formats = ["vmdk"]', "formats", "formats must be among"),
    ('packages = ["Not A Package"]', "packages", "not a Debian package"),
    ('mirrors = { debian = "ftp:/nowhere" }', "mirrors", "not an http"),
    ('mirrors = { fedora = "http://x" }', "mirrors", "unknown mirror"),
    ('release = 12', "release", "code name"),
    ('release = "bullseye"', "release", "unsupported release 'bullseye'; supported: bookworm (Debian 12), trixie"),
    ('bridges = [{ name = "br-int" }]', "bridges", "needs the kvm-host element"),
    ('tuned_profile = "../profiles/kvm-guest"', "tuned_profile", "invalid tuned profile name"),
    # A trailing newline passed `re.match(...$)`: each pattern must match the whole value.
    ('kernel_args = ["quiet\\n"]', "kernel_args", "break the bootloader"),
    ('packages = ["vim\\n"]', "packages", "not a Debian package"),
    ('disk_size = "3GiB\\n"', "disk_size", "size must look like"),
    # SELinux is the pipeline's to set: refused by the argument's key, whatever its value.
    ('kernel_args = ["selinux=0"]', "kernel_args", "kernel argument 'selinux=0' sets selinux="),
    ('kernel_args = ["enforcing=00"]', "kernel_args", "sets enforcing="),
    ('kernel_args = ["lsm=capability,apparmor"]', "kernel_args", "sets lsm="),
    ('kernel_args = ["security=apparmor"]', "kernel_args", "sets security="),
    ('kernel_args = ["enforcing"]', "kernel_args", "sets enforcing="),
    # urlsplit dropped tabs and newlines while checking, and the URL was returned with them.
    ('mirrors = { debian = "http://deb.debian.org/debian\\n" }', "mirrors", "debian: not an http(s) URL"),
    ('mirrors = { debian = "http://deb.debian.org/deb\\tian" }', "mirrors", "debian: not an http(s) URL"),
    ('mirrors = { security = "http://mirror;reboot/debian" }', "mirrors", "security: not an http(s) URL"),
    ('mirrors = { debian = "http://deb.debian.org:99999/debian" }', "mirrors", "debian: not an http(s) URL"),
    ('mirrors = { debian = "http://user:secret@deb.debian.org/debian" }', "mirrors", "not an http(s) URL"),
    ('mirrors = { debian = "http:///debian" }', "mirrors", "not an http(s) URL"),
]

HOST = '[image.h]\nelements = ["kvm-host"]\ntuned_profile = "openstack-compute"\n'

BAD_BRIDGES = [
    ('[{ name = "br-int" }, { name = "br-int" }]', "bridge 'br-int' is declared twice"),
    ('[{ name = "br-ex", uplink = "eth1" }, { name = "br-tun", uplink = "eth1" }]', "'eth1' is used twice"),
    ('[{ name = "br-ex", uplink = "br-int" }, { name = "br-int" }]', "'br-int' is used twice"),
    ('[{ name = "a-very-long-bridge-name" }]', "is not an interface name"),
    ('[{ name = "br/int" }]', "is not an interface name"),
    ('[{ name = "br-ex", uplink = "" }]', "uplink '' is not an interface name"),
    ('[{ name = "br-ex", mtu = 9000 }]', "unknown bridge key 'mtu'"),
    ('["br-int"]', "must be a list of tables"),
    ('[{ name = "br-ex\\n" }]', "is not an interface name"),
]


@pytest.mark.parametrize("value, problem", BAD_BRIDGES, ids=[b[1] for b in BAD_BRIDGES])
def test_bad_bridges_are_refused(tmp_path, value, problem):
    path = write(tmp_path, HOST + f"bridges = {value}\n")
    with pytest.raises(SpecError) as caught:
        spec.load(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: image 'h': key 'bridges': "), message
    assert problem in message


def test_bridges_reach_dib_as_name_or_name_colon_uplink(tmp_path):
    path = write(tmp_path, HOST + 'bridges = [{ name = "br-int" }, { name = "br-ex", uplink = "enp0s8" }]\n')
    image = spec.load(path).get("h")
    assert image.is_kvm_host
    assert [b.dib_value for b in image.bridges] == ["br-int", "br-ex:enp0s8"]


@pytest.mark.parametrize("line, key, problem", BAD, ids=[b[1] + ":" + b[2] for b in BAD])
def test_bad_spec_names_file_image_and_key(tmp_path, line, key, problem):
    base = {"elements": 'elements = ["kvm-guest"]', "tuned_profile": 'tuned_profile = "kvm-guest"'}
    lines = [v for k, v in base.items() if k != key] + [line]
    path = write(tmp_path, "[image.g]\n" + "\n".join(lines) + "\n")
    with pytest.raises(SpecError) as caught:
        spec.load(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: image 'g': key '{key}': "), message
    assert problem in message
    assert "\n" not in message


def test_missing_required_key(tmp_path):
    with pytest.raises(SpecError, match="key 'tuned_profile': is required"):
        spec.load(write(tmp_path, '[image.g]\nelements = ["kvm-guest"]\n'))


def test_not_toml(tmp_path):
    with pytest.raises(SpecError, match="not valid TOML"):
        spec.load(write(tmp_path, "[image.g\n"))


def test_user_profile_dir(tmp_path):
    (tmp_path / "mine/site-tuning").mkdir(parents=True)
    (tmp_path / "mine/site-tuning/tuned.conf").write_text("[main]\ninclude=kvm-guest\n")
    path = write(tmp_path, '[image.g]\nelements = ["kvm-guest"]\ntuned_profile = "site-tuning"\n'
                           'profile_dirs = ["mine"]\n')
    image = spec.load(path).get("g")
    assert image.profile_dir == (tmp_path / "mine").resolve()


def test_json_round_trip_is_plain_data():
    import json

    data = spec.load().get(None).to_json()
    assert json.loads(json.dumps(data)) == data


GOOD_URLS = ["http://deb.debian.org/debian", "https://10.0.0.1:8080/a/b.c_d~e-f%20g", "http://[fd00::1]:3142/debian",
             "http://mirror"]


@pytest.mark.parametrize("url", GOOD_URLS)
def test_check_url_returns_exactly_what_it_checked(url):
    assert spec.check_url(url) == url


def test_mirror_urls_lose_a_trailing_slash(tmp_path):
    image = spec.load(write(tmp_path, GOOD + 'mirrors = { debian = "http://m/debian/" }\n')).get("g")
    assert image.mirrors.debian == "http://m/debian"


BAD_NAMES = ["../../tmp/x", "Host-Image", "host_image", "-x", "a.b", "x\\n", "a" * 64]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_image_names_are_safe_names(tmp_path, name):
    path = write(tmp_path, GOOD.replace("[image.g]", f'[image."{name}"]').replace('default = "g"', ""))
    with pytest.raises(SpecError) as caught:
        spec.load(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: image "), message
    assert "not a safe image name" in message and "\n" not in message


def test_the_project_image_names_are_safe():
    assert {"host-image", "guest-image", "installer"} <= set(spec.load().images)


def test_the_key_documentation_in_images_toml_names_every_key_and_no_other():
    """The comment block at the top of images.toml documents spec.KEYS, one `#   KEY  text` line each."""
    header = SPEC_FILE.read_text().split("\n\n", 1)[0]
    documented = re.findall(r"^#   ([a-z_]+)\s{2,}\S", header, re.MULTILINE)
    assert sorted(documented) == sorted(spec.KEYS)
