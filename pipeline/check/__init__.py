"""Offline check of a built image (`./inv check`): open the qcow2 read-only with libguestfs
and verify what the spec and its elements promise, without booting it.

- session.py: the libguestfs appliance, launched once, and the `Guest` the checks read
- parsers.py: pure parsers of the formats read (sshd, fstab, GPT, ifupdown, systemd, ...)
- elements.py: the packages and units the elements declare, read from the elements
- checks.py: the checks and the table of which image each is for
- report.py: the results, the printed table and check.json
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .. import liveimg
from ..artifacts import artifacts_for
from ..errors import PipelineError
from ..progress import Timings, step
from ..spec import ImageSpec
from .checks import LIVEIMG_LABELED, run_checks
from .parsers import selinux_type
from .report import CheckResult, Report, print_table, write_json
from .session import CheckFailed, find_root, first_line, launched

__all__ = ["Report", "check_image", "selinux_type"]

# What the checks read from build-info.
INFO_KEYS = ("kernel", "kernel_cmdline", "root_uuid", "esp_uuid", "input_hash", "version", "liveimg")


def check_image(spec: ImageSpec, output_dir: Path) -> Report:
    """Check the built artifact of `spec` offline; print a table, write check.json."""
    art = artifacts_for(spec, output_dir)
    info = art.read_info()
    lacking = [key for key in INFO_KEYS if key not in info]
    if lacking:
        raise PipelineError(f"{art.info} lacks {', '.join(lacking)}: rebuild with ./inv build {spec.name}")
    if not art.qcow2.is_file():
        raise PipelineError(f"{art.qcow2} has not been built: run ./inv build {spec.name}")
    timings = Timings()
    report = Report(spec.name, art.qcow2, art.check_report, qcow2_sha256=info.get("qcow2_sha256", ""))
    tarball = art.directory / info["liveimg"]
    # The liveimg tarball is read on the host (about 5 s for a host image's) while the appliance
    # launches: libguestfs's bindings release the GIL. Leaving the pool waits for the read.
    with ThreadPoolExecutor(max_workers=1) as pool:
        contents = pool.submit(liveimg.read, tarball, frozenset(LIVEIMG_LABELED)) if tarball.is_file() else None
        with launched(art.qcow2, timings) as g, step("check: inspect", timings):
            try:
                guest = find_root(g, spec, info, art.directory, contents)
            except (CheckFailed, RuntimeError) as error:
                report.results = [CheckResult("os", False, f"no root filesystem: {first_line(error)}")]
            else:
                report.results = run_checks(guest, timings)
    report.timings = timings.seconds
    print_table(report)
    write_json(report)
    return report
