"""The session's build: artifacts in place, nothing left behind, offline check green."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.run import run
from pipeline.spec import OutputFormat


def test_artifacts_in_place(artifacts, spec):
    assert artifacts.qcow2.stat().st_size > 50 * 2**20
    assert artifacts.raw.exists() == (OutputFormat.RAW in spec.formats)
    info = run(["qemu-img", "info", "--output=json", artifacts.qcow2], capture=True).stdout
    details = json.loads(info)
    assert details["format"] == "qcow2"
    assert details["virtual-size"] == spec.disk_size
    assert details["format-specific"]["data"]["compression-type"] == "zstd"


def test_nothing_left_behind(artifacts):
    assert not list(artifacts.directory.glob(".work-*"))
    mounts = Path("/proc/self/mounts").read_text()
    assert str(artifacts.directory) not in mounts
    loops = run(["losetup", "--list", "--noheadings", "--output", "BACK-FILE"], capture=True).stdout
    assert str(artifacts.directory) not in loops


def test_dib_log_kept(artifacts):
    logs = sorted(artifacts.logs.glob("build-*.log"))
    assert logs and "Build completed successfully" in logs[-1].read_text(errors="replace")


def test_offline_check_passes(check_report):
    failed = [r for r in check_report.results if not r.passed]
    assert not failed, failed
    saved = json.loads(check_report.json_path.read_text())
    assert saved["passed"] is True


def test_artifact_unchanged_by_check_and_boots(artifacts):
    """The check opens it read-only and boots use an overlay: the artifact is as built.
    (This module runs after test_boot.py, so every boot of the session has happened.)"""
    from pipeline.build import sha256

    assert sha256(artifacts.qcow2) == artifacts.read_info()["qcow2_sha256"]
