"""Build an image: DIB root tree -> labeled tree -> GPT disk -> compressed qcow2.

The build reads as a flat list of named steps over a BuildContext. Everything is
written under a private work directory beside the artifacts and moved into place
only when finished, so an interrupted or failed build leaves no half-written
image, and `cleanup` removes any mount or loop device a killed DIB left behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from . import bootloader, disk, profiles, selinux, tools
from .errors import PipelineError
from .progress import Timings, say, step
from .run import run
from .spec import ImageSpec, OutputFormat

MIRROR_TIMEOUT = 15
# DIB names each phase's hook directory as it runs it: root.d, install.d, finalise.d, ...
DIB_PHASE = re.compile(r"(?:hooks|in_target\.d)/([a-z-]+\.d)\b")


@dataclass(frozen=True)
class Artifacts:
    """Where a finished image's files live: build/NAME/..."""

    directory: Path
    name: str

    @property
    def qcow2(self) -> Path:
        return self.directory / f"{self.name}.qcow2"

    @property
    def raw(self) -> Path:
        return self.directory / f"{self.name}.raw"

    @property
    def kernel(self) -> Path:
        return self.directory / f"{self.name}.vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.directory / f"{self.name}.initrd"

    @property
    def info(self) -> Path:
        return self.directory / "build-info.json"

    @property
    def logs(self) -> Path:
        return self.directory / "logs"

    def read_info(self) -> dict:
        try:
            return json.loads(self.info.read_text())
        except FileNotFoundError:
            raise PipelineError(f"{self.qcow2} has not been built: run ./inv build {self.name}") from None


def artifacts_for(spec: ImageSpec, output_dir: Path) -> Artifacts:
    return Artifacts(Path(output_dir).resolve() / spec.name, spec.name)


@dataclass
class BuildContext:
    spec: ImageSpec
    artifacts: Artifacts
    cache_dir: Path
    work: Path
    log: Path
    timings: Timings = field(default_factory=Timings)
    profile_dirs: list[Path] = field(default_factory=list)  # tuned profiles to install
    layout: disk.Layout | None = None
    kernel: bootloader.Kernel | None = None

    @property
    def tree(self) -> Path:
        return self.work / "tree"

    @property
    def tar(self) -> Path:
        return self.work / "dib" / f"{self.spec.name}.tar"

    @property
    def selinux_modules(self) -> Path:
        return self.work / "selinux-modules"

    @property
    def disk(self) -> Path:
        return self.work / f"{self.spec.name}.raw"


# --- preflight: fail in seconds, not minutes


def check_mirrors(spec: ImageSpec) -> None:
    """Each apt source must answer for its suite, or DIB fails deep into debootstrap."""
    for url in (f"{spec.mirrors.debian}/dists/{spec.release}/Release",
                f"{spec.mirrors.security}/dists/{spec.release}-security/Release"):
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=MIRROR_TIMEOUT):
                pass
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise PipelineError(f"{spec.source}: image {spec.name!r}: mirror unreachable: {url}: {reason}") from None


def check_free_space(path: Path, spec: ImageSpec) -> None:
    # The tree, its tar and the sparse raw disk's written part: about 3x the tree,
    # which the virtual disk size bounds well enough (1.2 GB tree on 6 GiB for a host).
    needed = max(4 * 2**30, spec.disk_size)
    path.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path).free
    if free < needed:
        raise PipelineError(f"not enough free space in {path}: {free / 2**30:.1f} GiB free, "
                            f"a build of {spec.name} needs about {needed / 2**30:.0f} GiB")


def profile_chain(spec: ImageSpec, cache_dir: Path) -> list[Path]:
    """Validate the spec's tuned profile against tuned's own rules and profiles; return
    the directories of ours and the user's that it loads (tuned's built-ins ship with it)."""
    reference = profiles.reference(cache_dir)
    loaded = profiles.resolve(spec.tuned_profile, list(spec.profile_dirs), reference)
    builtin = set(reference.profiles.values())
    return [conf.parent for conf in loaded if conf not in builtin]


def preflight(spec: ImageSpec, output_dir: Path, cache_dir: Path) -> list[Path]:
    tools.require(*tools.BUILD_TOOLS)
    tools.venv_tool("disk-image-create")
    check_free_space(output_dir, spec)
    check_mirrors(spec)
    return profile_chain(spec, cache_dir)


# --- steps


def dib_environment(ctx: BuildContext) -> dict[str, str]:
    spec = ctx.spec
    staged = ctx.work / "tuned-profiles"
    staged.mkdir()
    for directory in ctx.profile_dirs:
        shutil.copytree(directory, staged / directory.name, dirs_exist_ok=True)
    return {
        "ELEMENTS_PATH": ":".join(str(d) for d in spec.element_dirs),
        "DIB_RELEASE": spec.release,
        "DIB_DISTRIBUTION_MIRROR": spec.mirrors.debian,
        "DIB_DEBIAN_SECURITY_MIRROR": spec.mirrors.security,
        "DIB_TUNED_PROFILE": spec.tuned_profile,
        "DIB_TUNED_PROFILES_DIR": str(staged),
        "DIB_SELINUX_MODE": spec.selinux.value,
        "DIB_SELINUX_MODULES_DIR": str(ctx.selinux_modules) if any(ctx.selinux_modules.glob("*.pp")) else "",
        "DIB_IMAGE_CACHE": str(ctx.cache_dir),
        "DIB_OVS_BRIDGES": " ".join(b.dib_value for b in spec.bridges),
        # DIB's own temporary mounts go under our work directory, so cleanup finds them.
        "TMPDIR": str(ctx.work / "tmp"),
    }


def compile_policy(ctx: BuildContext) -> None:
    """Our SELinux modules, compiled before DIB so a broken one fails in seconds."""
    for package in selinux.compile_modules(selinux.module_sources(ctx.spec.elements, ctx.spec.element_dirs), ctx.selinux_modules):
        say(f"compiled {package.name}")


def build_tree(ctx: BuildContext) -> None:
    """diskimage-builder makes the root tree (as a tar: its disk output needs kpartx)."""
    (ctx.work / "tmp").mkdir()
    argv = [tools.venv_tool("disk-image-create"), "-n", "-a", "amd64", "-t", "tar",
            "-o", ctx.tar.with_suffix(""), ctx.spec.distro_element, *ctx.spec.elements]
    if ctx.spec.packages:
        argv += ["-p", ",".join(ctx.spec.packages)]
    ctx.tar.parent.mkdir()
    say(f"diskimage-builder log: {ctx.log}")
    run(argv, env=dib_environment(ctx), log=ctx.log, on_line=_phase_reporter())


def _phase_reporter():
    """A line callback that says each DIB phase once, as it starts."""
    last = None

    def report(line: str) -> None:
        nonlocal last
        match = DIB_PHASE.search(line)
        if match and match[1] != last:
            last = match[1]
            say(f"dib: {last}")

    return report


def unpack_tree(ctx: BuildContext) -> None:
    ctx.tree.mkdir()
    run(["tar", "--extract", "--file", ctx.tar, "--directory", ctx.tree, "--numeric-owner",
         "--preserve-permissions", "--xattrs", "--xattrs-include=*"])
    ctx.tar.unlink()


def configure_boot(ctx: BuildContext) -> None:
    ctx.layout = disk.new_layout(ctx.spec.disk_size)
    ctx.kernel = bootloader.find_kernel(ctx.tree)
    disk.create_mount_points(ctx.tree)
    disk.write_fstab(ctx.tree, ctx.layout)
    bootloader.install_modules(ctx.tree)
    bootloader.write_config(ctx.tree, ctx.kernel, ctx.layout.root_uuid, kernel_cmdline(ctx.spec))


def kernel_cmdline(spec: ImageSpec) -> list[str]:
    # Debian's kernel starts AppArmor unless told otherwise.
    return ["security=selinux", "selinux=1", *spec.kernel_args]


def relabel(ctx: BuildContext) -> None:
    """Label every file against the image's own policy, so the first boot needs no relabel."""
    contexts = ctx.tree / "etc/selinux/default/contexts/files/file_contexts"
    if not contexts.is_file():
        raise PipelineError(f"{contexts} is missing: the image has no SELinux policy")
    run(["setfiles", "-F", "-r", ctx.tree, contexts, ctx.tree])


def assemble(ctx: BuildContext) -> None:
    disk.assemble(ctx.tree, ctx.work, ctx.layout, ctx.disk)


def convert(ctx: BuildContext) -> None:
    run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type=zstd",
         ctx.disk, ctx.work / ctx.artifacts.qcow2.name])


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**20):
            digest.update(chunk)
    return digest.hexdigest()


def publish(ctx: BuildContext) -> None:
    """Move finished files into place; the qcow2 goes last, so its presence means done."""
    art = ctx.artifacts
    shutil.copyfile(ctx.kernel.vmlinuz, ctx.work / art.kernel.name)
    shutil.copyfile(ctx.kernel.initrd, ctx.work / art.initrd.name)
    info = {
        "image": ctx.spec.name,
        "spec": ctx.spec.to_json(),
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "kernel": ctx.kernel.version,
        "kernel_cmdline": kernel_cmdline(ctx.spec),
        "root_uuid": ctx.layout.root_uuid,
        "esp_uuid": ctx.layout.esp_uuid,
        "qcow2_sha256": sha256(ctx.work / art.qcow2.name),
        "timings": ctx.timings.seconds,
    }
    (ctx.work / art.info.name).write_text(json.dumps(info, indent=2) + "\n")
    names = [art.kernel.name, art.initrd.name, art.info.name]
    if OutputFormat.RAW in ctx.spec.formats:
        names.append(art.raw.name)
    names.append(art.qcow2.name)
    art.qcow2.unlink(missing_ok=True)  # an old image must not pass for this build's
    for name in names:
        os.replace(ctx.work / name, art.directory / name)


STEPS = (
    ("policy modules", compile_policy),
    ("tree", build_tree),
    ("unpack", unpack_tree),
    ("configure boot", configure_boot),
    ("relabel", relabel),
    ("assembly", assemble),
    ("conversion", convert),
)


def cleanup(work: Path) -> None:
    """Unmount and detach whatever a killed DIB left under `work`, then remove it."""
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    for mount in sorted((m for m in mounts if m.startswith(f"{work}/")), reverse=True):
        run(["umount", "--lazy", mount], check=False)
    loops = run(["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"], capture=True, check=False)
    for line in loops.stdout.splitlines():
        name, _, backing = line.partition(" ")
        if backing.strip().startswith(f"{work}/"):
            run(["losetup", "--detach", name], check=False)
    shutil.rmtree(work, ignore_errors=True)


def build(spec: ImageSpec, output_dir: Path, cache_dir: Path) -> tuple[Artifacts, Timings]:
    art = artifacts_for(spec, output_dir)
    art.logs.mkdir(parents=True, exist_ok=True)
    with step(f"preflight {spec.name}"):
        profile_dirs = preflight(spec, art.directory, Path(cache_dir))
    work = art.directory / f".work-{os.getpid()}"
    ctx = BuildContext(spec=spec, artifacts=art, cache_dir=Path(cache_dir), work=work,
                       log=art.logs / f"build-{time.strftime('%Y%m%d-%H%M%S')}.log", profile_dirs=profile_dirs)
    work.mkdir()
    try:
        for name, action in STEPS:
            with step(name, ctx.timings):
                action(ctx)
        publish(ctx)
    finally:
        cleanup(work)
    say(f"image: {art.qcow2} ({art.qcow2.stat().st_size / 2**20:.0f} MiB)")
    print(art.qcow2, file=sys.stdout)
    return art, ctx.timings
