"""The seeds a VM is handed at boot, as a cloud would hand them: cloud-init's NoCloud volume or an
OpenStack config drive, made as small FAT volumes without mounting (mkfs.vfat and mtools). The
boot tests' VMs (pipeline.testvm) get their SSH key this way; the deploy test's nodes
(pipeline.deploy.nodes) get one an installed host must ignore.
"""

from __future__ import annotations

import json
import tempfile
import uuid
from enum import StrEnum
from pathlib import Path

from .run import run


class Datasource(StrEnum):
    """How a boot hands the guest its identity, keys and user-data, as a cloud would."""
    NOCLOUD = "nocloud"             # a FAT volume labeled CIDATA: meta-data, user-data
    CONFIG_DRIVE = "config-drive"   # OpenStack's: config-2, openstack/latest/meta_data.json and user_data


def cloud_config(config: dict) -> str:
    """User-data text. JSON is YAML, so json.dumps quotes keys and passwords safely for cloud-init."""
    return "#cloud-config\n" + json.dumps(config, indent=2) + "\n"


def _fat_volume(image: Path, label: str, files: dict[str, str]) -> None:
    """A small FAT volume holding FILES (path inside the volume: text), made without mounting."""
    run(["mkfs.vfat", "-n", label, "-C", image, "2048"])
    directories = sorted({str(parent) for path in files for parent in Path(path).parents} - {"."})
    if directories:  # sorted, so each parent is made before its children
        run(["mmd", "-i", image, *(f"::/{directory}" for directory in directories)])
    with tempfile.TemporaryDirectory(prefix="seed-") as tmp:
        for index, (path, text) in enumerate(files.items()):
            source = Path(tmp) / str(index)
            source.write_text(text)
            run(["mcopy", "-i", image, source, f"::/{path}"])


def nocloud_seed(image: Path, user_data: str, hostname: str = "boot-test") -> None:
    """cloud-init's NoCloud seed: a volume labeled CIDATA with meta-data and user-data."""
    meta_data = f"instance-id: {hostname}-{uuid.uuid4()}\nlocal-hostname: {hostname}\n"
    _fat_volume(image, "CIDATA", {"meta-data": meta_data, "user-data": user_data})


def config_drive(image: Path, public_key: str, user_data: str) -> None:
    """An OpenStack config drive as Nova writes one in vfat format (config_drive_format=vfat):
    label config-2, the instance's keypair in openstack/latest/meta_data.json's public_keys."""
    instance = str(uuid.uuid4())
    meta_data = {"uuid": instance, "name": "boot-test", "hostname": "boot-test", "launch_index": 0,
                 "availability_zone": "nova", "public_keys": {"boot-test": public_key},
                 "keys": [{"name": "boot-test", "type": "ssh", "data": public_key}]}
    _fat_volume(image, "config-2", {"openstack/latest/meta_data.json": json.dumps(meta_data),
                                    "openstack/latest/user_data": user_data})
