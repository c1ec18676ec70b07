"""./inv status: every image of a spec file at a glance: its built version, whether a build would
skip it (and if not, why: the build's own rule, pipeline.build.stale_reason), whether the offline
check and the boot test passed on this very artifact (pipeline.artifacts.verdict_problem, the rule
publish applies), the version `latest` names on a publish target and where, and sizes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import devvm, inputs
from .artifacts import VERDICTS, Artifacts, Verdict, artifacts_for, read_json
from .build import stale_reason
from .errors import PipelineError
from .spec import ImageSpec


def verdict_status(art: Artifacts, verdict: Verdict) -> dict[str, Any]:
    """passed, or in a word why not (not run, failed, of another qcow2), and the whole reason."""
    problem = art.verdict_problem(verdict)
    if problem is None:
        return {"state": "passed", "problem": None}
    report = art.directory / verdict.file
    if not report.is_file():
        state = "not run"
    else:
        try:
            state = "other qcow2" if read_json(report, "").get("passed") is True else "failed"
        except PipelineError:
            state = "unreadable"
    return {"state": state, "problem": problem}


def published_status(spec: ImageSpec, target: str, ssh_options: Sequence[str] = ()) -> dict[str, Any]:
    """The version TARGET/NAME/latest names and where it is; {} if none is published there."""
    from .publish import parse_target

    destination = parse_target(target, spec.name, ssh_options)
    try:
        listing = destination.listing()
    except FileNotFoundError:  # a local target where nothing of this image was ever published
        return {}
    if listing.latest is None:
        return {}
    return {"version": listing.latest, "location": destination.location(listing.latest),
            "versions": len(listing.versions)}


def image_status(spec: ImageSpec, output_dir: Path, target: str | None, ssh_options: Sequence[str] = ()) -> dict:
    art = artifacts_for(spec, output_dir)
    status: dict[str, Any] = {"image": spec.name, "directory": str(art.directory), "version": None}
    if art.info.is_file():
        try:
            info = art.read_info()
            status["version"] = info.get("version")
        except PipelineError as error:
            info = {}
            status["info_problem"] = str(error)
    else:
        info = {}
    try:
        reason = stale_reason(art, inputs.input_hash(spec))
    except PipelineError as error:  # an element the spec names cannot be resolved
        reason = str(error)
    status["up_to_date"] = reason is None
    status["stale_reason"] = reason
    if not spec.is_netboot:  # the installer has no disk to check or boot; the deploy test proves it
        for verdict in VERDICTS:
            status[verdict.file.removesuffix(".json").replace("-", "_")] = verdict_status(art, verdict)
    files = (art.kernel, art.initrd) if spec.is_netboot else (art.qcow2, art.liveimg, art.kernel, art.initrd)
    status["sizes"] = {path.name: path.stat().st_size for path in files if path.is_file()}
    status["disk_size"] = None if spec.is_netboot else spec.disk_size
    if target is not None and not spec.is_netboot:
        try:
            published = published_status(spec, target, ssh_options)
        except PipelineError as error:
            published = {"problem": str(error)}
        if published.get("version"):
            published["this_build"] = published["version"] == info.get("version")
        status["published"] = published or None
    vm = devvm.running(art)
    status["vm"] = devvm.describe(vm) if vm is not None else None
    return status


def collect(images: Sequence[ImageSpec], output_dir: Path, target: str | None,
            ssh_options: Sequence[str] = ()) -> list[dict[str, Any]]:
    return [image_status(spec, output_dir, target, ssh_options) for spec in images]


def _mib(size: int | None) -> str:
    return "-" if size is None else f"{size / 2**20:.0f} MiB"


def table(statuses: Sequence[dict[str, Any]]) -> str:
    """One row an image, then one line for each reason that a row gives in a word."""
    header = ("image", "built", "up to date", "check", "boot test", "published (latest)", "qcow2", "liveimg", "vm")
    rows = [header]
    notes = []
    for status in statuses:
        name = status["image"]
        sizes = status["sizes"]
        if status.get("info_problem"):
            notes.append(f"{name}: {status['info_problem']}")
        if status["stale_reason"] is not None:
            notes.append(f"{name}: not up to date: {status['stale_reason']}")
        verdicts = []
        for key, what in (("check", "offline check"), ("boot_test", "boot test")):
            verdict = status.get(key)
            verdicts.append("-" if verdict is None else verdict["state"])
            if verdict is not None and verdict["problem"] and status["version"]:
                notes.append(f"{name}: {what}: {verdict['problem']}")
        published = status.get("published")
        if published is None:
            shown = "-"
        elif "problem" in published:
            shown = "unknown"
            notes.append(f"{name}: publish target: {published['problem']}")
        else:
            shown = published["version"] + (" (this build)" if published["this_build"] else "")
            notes.append(f"{name}: published {published['version']} at {published['location']}")
        vm = status["vm"]
        art = Artifacts(Path(status["directory"]), name)  # the files' names
        rows.append((name, status["version"] or "not built",
                     "yes" if status["up_to_date"] else "no", *verdicts, shown,
                     _mib(sizes.get(art.qcow2.name)) if status["disk_size"] else "-",
                     _mib(sizes.get(art.liveimg.name)) if status["disk_size"] else "-",
                     f"running, ssh port {vm['port']}" if vm else "-"))
    widths = [max(len(str(row[column])) for row in rows) for column in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    return "\n".join(lines + (["", *notes] if notes else []))


def to_json(statuses: Sequence[dict[str, Any]]) -> str:
    return json.dumps(list(statuses), indent=2)
