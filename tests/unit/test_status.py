"""./inv status (pipeline.status) over build directories and a local publish target made by hand:
the build's own up-to-date rule, the verdict rule on this very qcow2, the latest published version."""

import json
import os

import pytest

from pipeline import inputs, status
from pipeline import spec as specs
from pipeline.artifacts import artifacts_for

SHA = "ab" * 32


@pytest.fixture
def guest(tmp_path):
    """guest-image built in tmp_path/out, up to date, its offline check passed on this qcow2."""
    spec = specs.load().get("guest-image")
    art = artifacts_for(spec, tmp_path / "out")
    art.directory.mkdir(parents=True)
    for path in (art.qcow2, art.liveimg, art.kernel, art.initrd, art.manifest):
        path.write_bytes(b"x" * 2**20)
    art.info.write_text(json.dumps({"version": "20261201-abcdef01", "input_hash": inputs.input_hash(spec),
                                    "qcow2_sha256": SHA, "qcow2_size": 2**20}))
    art.check_report.write_text(json.dumps({"passed": True, "qcow2_sha256": SHA}))
    return spec, art


def test_a_built_image_up_to_date_with_its_verdicts(guest, tmp_path):
    spec, art = guest
    art.boot_report.write_text(json.dumps({"passed": True, "qcow2_sha256": "cd" * 32}))
    found = status.image_status(spec, tmp_path / "out", str(tmp_path / "publish"))
    assert found["version"] == "20261201-abcdef01"
    assert found["up_to_date"] is True and found["stale_reason"] is None
    assert found["check"] == {"state": "passed", "problem": None}
    assert found["boot_test"]["state"] == "other qcow2"
    assert found["boot_test"]["problem"] == art.verdict_problem(status.VERDICTS[1])
    assert found["sizes"]["guest-image.qcow2"] == 2**20 and found["disk_size"] == spec.disk_size
    assert found["published"] is None and found["vm"] is None


def test_why_not_up_to_date_is_the_builds_own_reason(guest, tmp_path):
    spec, art = guest
    art.check_report.write_text(json.dumps({"passed": False, "qcow2_sha256": SHA}))
    found = status.image_status(spec, tmp_path / "out", None)
    assert found["up_to_date"] is False and found["stale_reason"] == "its offline check has not passed"
    assert found["check"]["state"] == "failed" and found["boot_test"]["state"] == "not run"
    # The spec changed: another input hash.
    changed = specs.load().get("guest-image")
    object.__setattr__(changed, "disk_size", changed.disk_size * 2)
    found = status.image_status(changed, tmp_path / "out", None)
    assert found["stale_reason"].startswith("inputs changed (built from ")


def test_an_image_never_built(tmp_path):
    spec = specs.load().get("host-image")
    found = status.image_status(spec, tmp_path / "out", str(tmp_path / "publish"))
    assert found["version"] is None and found["stale_reason"] == "never built" and found["sizes"] == {}
    assert found["check"]["state"] == "not run"


def test_the_latest_published_version_and_where(guest, tmp_path):
    spec, _ = guest
    target = tmp_path / "publish"
    for version in ("20261130-00000000", "20261201-abcdef01"):
        (target / spec.name / version).mkdir(parents=True)
    os.symlink("20261130-00000000", target / spec.name / "latest")  # a rollback: latest is not the newest
    found = status.image_status(spec, tmp_path / "out", str(target))
    assert found["published"] == {"version": "20261130-00000000", "versions": 2, "this_build": False,
                                  "location": str(target / spec.name / "20261130-00000000")}


def test_table_and_json(guest, tmp_path):
    spec, art = guest
    installer = specs.load().get("installer")
    statuses = status.collect([spec, installer], tmp_path / "out", str(tmp_path / "publish"))
    assert json.loads(status.to_json(statuses)) == statuses
    lines = status.table(statuses).splitlines()
    assert lines[0].split() == ["image", "built", "up", "to", "date", "check", "boot", "test", "published",
                                "(latest)", "qcow2", "liveimg", "vm"]
    assert lines[1].split() == ["guest-image", "20261201-abcdef01", "yes", "passed", "not", "run", "-", "1", "MiB",
                                "1", "MiB", "-"]
    assert lines[2].split() == ["installer", "not", "built", "no", "-", "-", "-", "-", "-", "-"]
    assert f"guest-image: boot test: {art.boot_report} is missing" in status.table(statuses)
    assert "installer: not up to date: never built" in lines
