"""The seeds a boot hands the guest, as a cloud would: NoCloud and an OpenStack config drive.

Made with the real mkfs.vfat and mtools (no root, no mount) and read back with mtools.
"""

import json
import subprocess

import yaml

from pipeline import seed, testvm
from pipeline.qemu import Firmware

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHd0ZXN0a2V5dGVzdGtleXRlc3RrZXl0ZXN0a2V5 boot-test"
USERS = [{"name": "probe", "ssh_authorized_keys": [KEY]},
         # A crypt hash is full of characters YAML and shells care about.
         {"name": "pw", "lock_passwd": False, "passwd": "$6$salt$a:b#c 'd\" e"}]


def read(image, path: str) -> str:
    return subprocess.run(["mtype", "-i", image, f"::/{path}"], check=True, capture_output=True, text=True).stdout


def label(image) -> str:
    out = subprocess.run(["mlabel", "-s", "-i", image, "::"], check=True, capture_output=True, text=True).stdout
    return out.split("is", 1)[1].strip()


def test_user_data_is_cloud_config_that_parses_back_exactly():
    text = seed.cloud_config({"users": ["default", *USERS]})
    assert text.startswith("#cloud-config\n")
    assert yaml.safe_load(text) == {"users": ["default", *USERS]}


def test_nocloud_seed_is_a_cidata_volume_with_meta_and_user_data(tmp_path):
    image = tmp_path / "seed.img"
    seed.nocloud_seed(image, seed.cloud_config({"users": ["default"], "ssh_authorized_keys": [KEY]}))
    assert label(image).upper() == "CIDATA"
    meta = yaml.safe_load(read(image, "meta-data"))
    assert meta["instance-id"].startswith("boot-test-")
    assert yaml.safe_load(read(image, "user-data"))["ssh_authorized_keys"] == [KEY]


def test_config_drive_is_laid_out_as_nova_writes_it(tmp_path):
    image = tmp_path / "config-drive.img"
    seed.config_drive(image, KEY, seed.cloud_config({"users": ["default", *USERS]}))
    assert label(image).lower() == "config-2"
    meta = json.loads(read(image, "openstack/latest/meta_data.json"))
    assert meta["public_keys"] == {"boot-test": KEY}
    assert meta["uuid"] and meta["hostname"] == "boot-test"
    user_data = yaml.safe_load(read(image, "openstack/latest/user_data"))
    assert user_data["users"][1:] == USERS
    # The default user's key comes from the metadata, as on OpenStack, not from user-data.
    assert "ssh_authorized_keys" not in user_data


def test_a_stopped_vm_keeps_no_private_key(tmp_path):
    """After a boot session (or a failed boot) the workdir keeps what helps debugging, not a secret:
    the seed's key and a user-data user's key (made as the integration fixture makes it)."""
    vm = testvm.VM(image=tmp_path / "image.qcow2", disk_size=2**30, firmware=Firmware.BIOS,
                 workdir=tmp_path / "boot-bios")
    seed_image = vm._seed()
    user_key = vm.workdir / f"{testvm.PRIVATE_KEY_PREFIX}probe"
    testvm.new_ssh_key(user_key, "probe")
    vm.console.write_text("boot log\n")
    vm.stop()
    assert not vm.key.exists() and not user_key.exists()
    assert vm.key.with_suffix(".pub").is_file() and user_key.with_suffix(".pub").is_file()
    assert seed_image.is_file() and vm.console.is_file()
