"""Build an image: DIB root tree -> labeled tree -> GPT disk -> compressed qcow2.

The build reads as a flat list of named steps over a BuildContext. Everything is
written under a private work directory beside the artifacts and moved into place
only when finished, so an interrupted or failed build leaves no half-written
image, and `cleanup` removes any mount or loop device a killed DIB left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pykickstart

from . import archive, bootloader, disk, inputs, layer, liveimg, manifest, netboot, prefetch, profiles, selinux, tools
from .artifacts import CHECK, Artifacts, artifacts_for
from .errors import PipelineError
from .inputs import PIPELINE_SOURCES
from .manifest import sha256
from .progress import Timings, say, step
from .run import cleaning_up, concurrently, run
from .spec import ImageSpec, OutputFormat

MIRROR_TIMEOUT = 15
# DIB names each phase's hook directory as it runs it: root.d, install.d, finalise.d, ...
DIB_PHASE = re.compile(r"(?:hooks|in_target\.d)/([a-z-]+\.d)\b")
# dib-run-parts' profile of a phase: one line a script with its seconds. The package layer's save
# runs inside DIB, so its time is read from there.
LAYER_SCRIPT = re.compile(r"dib-run-parts (\d\d-package-layer(?:-[a-z-]+)?) +(\d+\.\d+)$")
LAYER_TIMING = "in tree: "  # the prefix of those timings


@dataclass(frozen=True)
class BuildResult:
    """What build() did: built is False when the image was up to date, and nothing ran."""

    artifacts: Artifacts
    built: bool
    timings: Timings = field(default_factory=Timings)  # of the steps that ran


@dataclass
class BuildContext:
    spec: ImageSpec
    artifacts: Artifacts
    cache_dir: Path
    work: Path
    log: Path
    timings: Timings = field(default_factory=Timings)
    profile_dirs: list[Path] = field(default_factory=list)  # tuned profiles to install
    input_hash: str = ""
    source_date_epoch: int = 0
    layer: layer.PackageLayer | None = None  # None: DIB as it comes (the benchmark's DIB alone)
    from_layer: bool = False
    layout: disk.Layout | None = None
    kernel: bootloader.Kernel | None = None
    manifest: dict | None = None

    @property
    def version(self) -> str:
        return inputs.version(self.input_hash)

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


Step = Callable[[BuildContext], None]


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
    if not spec.tuned_profile:  # a netboot image runs no tuned
        return []
    reference = profiles.reference(archive.for_spec(spec, cache_dir), cache_dir)  # the image's release's tuned
    loaded = profiles.resolve(spec.tuned_profile, list(spec.profile_dirs), reference)
    builtin = set(reference.profiles.values())
    return [conf.parent for conf in loaded if conf not in builtin]


def preflight(spec: ImageSpec, output_dir: Path, cache_dir: Path) -> list[Path]:
    tools.require(*tools.BUILD_TOOLS, *(tools.NETBOOT_TOOLS if spec.is_netboot else ()))
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
        # .debs are cached there by DIB's dpkg element (DIB_APT_LOCAL_CACHE); the package
        # layer moves the cache to its own directory, which shares them.
        "DIB_IMAGE_CACHE": str(ctx.cache_dir),
        **(ctx.layer.environment(saving=not ctx.from_layer) if ctx.layer else {}),
        **({"SOURCE_DATE_EPOCH": str(ctx.source_date_epoch)} if ctx.source_date_epoch else {}),
        "DIB_OVS_BRIDGES": " ".join(b.dib_value for b in spec.bridges),
        # The kvm-installer element copies these in: the installer runs the code that rendered
        # and validated the kickstarts.
        "DIB_INSTALLER_PACKAGES": ":".join(str(p) for p in installer_packages()),
        # DIB's own temporary mounts go under our work directory, so cleanup finds them.
        "TMPDIR": str(ctx.work / "tmp"),
        # Only its tar is used: kvm-build-speed leaves the tree in place of DIB's block device.
        "DIB_TREE_IN_PLACE": "1",
    }


def installer_packages() -> list[Path]:
    return [PIPELINE_SOURCES, Path(pykickstart.__file__).parent]


def compile_policy(ctx: BuildContext) -> None:
    """Our SELinux modules, compiled before DIB so a broken one fails in seconds."""
    sources = selinux.module_sources(ctx.spec.elements, ctx.spec.release, ctx.spec.element_dirs)
    for package in selinux.compile_modules(sources, ctx.selinux_modules):
        say(f"compiled {package.name}")


def build_tree(ctx: BuildContext) -> None:
    """diskimage-builder makes the root tree (as a tar: its disk output needs kpartx)."""
    (ctx.work / "tmp").mkdir()
    # One build at a time per package layer: a second with the same key waits, then starts from it.
    with ctx.layer.locked() if ctx.layer else contextlib.nullcontext():
        if ctx.layer:
            ctx.from_layer = ctx.layer.prepare()
            say(f"package layer {ctx.layer.directory.name}: "
                f"{'starting from it' if ctx.from_layer else 'none yet, this build saves one'}")
        argv: list[str | Path] = [tools.venv_tool("disk-image-create"), "-n", "-a", "amd64", "-t", "tar",
                "-o", ctx.tar.with_suffix(""), *inputs.dib_elements(ctx.spec, pipeline_elements=bool(ctx.layer))]
        if ctx.spec.packages:
            argv += ["-p", ",".join(ctx.spec.packages)]
        ctx.tar.parent.mkdir()
        environment = dib_environment(ctx)
        # Packages to install: fetched beside DIB, many at a time (stopped if DIB ends first).
        beside = [_prefetch_beside_dib(ctx, ctx.layer, environment)] if ctx.layer and not ctx.from_layer else []
        say(f"diskimage-builder log: {ctx.log}")

        def diskimage_builder() -> None:
            run(argv, env=environment, log=ctx.log, on_line=_phase_reporter(ctx.timings))

        try:
            concurrently(diskimage_builder, background=beside)
        finally:
            if ctx.layer:
                shutil.rmtree(ctx.layer.prefetched, ignore_errors=True)
        if ctx.layer:
            started = time.monotonic()
            ctx.layer.finish()
            ctx.timings.seconds[LAYER_TIMING + "layer record"] = round(time.monotonic() - started, 2)


def _prefetch_beside_dib(ctx: BuildContext, package_layer: layer.PackageLayer,
                        environment: dict[str, str]) -> Callable[[], None]:
    """The prefetch (pipeline/prefetch.py) to run beside DIB, and DIB's environment for it: debootstrap
    reads the apt cache when it runs (no base tarball yet), kvm-build-speed links the rest in."""
    apt_cache = None
    if not package_layer.tarball.is_file():
        package_layer.apt_cache.mkdir(parents=True, exist_ok=True)  # debootstrap wants it there
        arguments = prefetch.debootstrap_arguments(package_layer.apt_cache.resolve())
        if arguments:
            apt_cache = package_layer.apt_cache
            environment["DIB_DEBOOTSTRAP_EXTRA_ARGS"] = arguments
    package_layer.prefetched.mkdir()
    environment["DIB_PREFETCHED_PACKAGES"] = str(package_layer.prefetched)
    release = archive.for_spec(ctx.spec, ctx.cache_dir)
    return lambda: prefetch.prefetch(ctx.spec, release, package_layer.prefetched, apt_cache)


def _phase_reporter(timings: Timings):
    """A line callback that says each DIB phase once, as it starts, and records the package layer's
    scripts' times."""
    last = None

    def report(line: str) -> None:
        nonlocal last
        match = DIB_PHASE.search(line)
        if match and match[1] != last:
            last = match[1]
            say(f"dib: {last}")
        script = LAYER_SCRIPT.search(line)
        if script:
            timings.seconds[LAYER_TIMING + script[1]] = float(script[2])

    return report


MEMINFO = Path("/proc/meminfo")


def meminfo(key: str, table: Path = MEMINFO) -> int:
    """A /proc/meminfo figure in bytes: MemTotal, MemAvailable, ..."""
    fields = dict(line.split(":", 1) for line in table.read_text().splitlines())
    return int(fields[key].split()[0]) * 1024


def unpack_tree(ctx: BuildContext) -> None:
    """The tree goes to memory when there is room for it twice over, as DIB keeps its own: every step
    after reads each file, relabel writes each one's label (on a busy disk, unpacking alone took
    5-8 s). A tmpfs under the work directory, which cleanup unmounts."""
    ctx.tree.mkdir()
    size = ctx.tar.stat().st_size
    if meminfo("MemAvailable") > 2 * size + 2**30:
        run(["mount", "-t", "tmpfs", "-o", f"mode=0755,size={2 * size // 2**20 + 256}m", "tmpfs", ctx.tree])
    else:
        say(f"tree on disk: less than {(2 * size + 2**30) / 2**30:.1f} GiB of memory available")
    # disk-image-create tars its tree with the build host's /dev still bind-mounted on it: a copy
    # of the host's device nodes (117 here, /dev/kvm with whatever group the host gave it last)
    # stays out, and the tree gets the few debootstrap makes.
    run(["tar", "--extract", "--file", ctx.tar, "--directory", ctx.tree, "--numeric-owner",
         "--preserve-permissions", "--xattrs", "--xattrs-include=*", "--exclude=./dev/*"])
    ctx.tar.unlink()
    (ctx.tree / "dev").mkdir(mode=0o755, exist_ok=True)
    disk.create_base_dev(ctx.tree)


def write_manifest(ctx: BuildContext) -> None:
    """The build manifest, read from the tree (packages, kernel) and written into it."""
    spec = ctx.spec
    packages = manifest.packages_of(ctx.tree)
    ctx.manifest = manifest.document(
        spec=spec.to_json(),
        elements=[{"name": e.name, "source": "ours" if e.ours else "diskimage-builder"}
                  for e in inputs.resolved_elements(spec)],
        dib_version=inputs.dib_version(), pipeline_version=inputs.pipeline_version(), commit=inputs.git_commit(),
        packages=packages, licenses=manifest.declared_licenses(ctx.tree, packages),
        kernel=bootloader.find_kernel(ctx.tree).version,
        tuned_profile=spec.tuned_profile, policy=manifest.policy_hash(list(ctx.selinux_modules.glob("*.pp"))),
        input_hash=ctx.input_hash, version=ctx.version, source_date_epoch=ctx.source_date_epoch,
        timings=dict(ctx.timings.seconds))
    manifest.embed(ctx.tree, ctx.manifest)
    shutil.copyfile(ctx.tree / manifest.DPKG_STATUS, ctx.work / ctx.artifacts.packages.name)


def configure_boot(ctx: BuildContext) -> None:
    ctx.layout = disk.new_layout(ctx.spec.disk_size, seed=ctx.input_hash or None)
    ctx.kernel = bootloader.find_kernel(ctx.tree)
    disk.create_mount_points(ctx.tree)
    disk.write_fstab(ctx.tree, ctx.layout)
    bootloader.install_modules(ctx.tree)
    bootloader.write_config(ctx.tree, ctx.kernel, ctx.layout.root_uuid, ctx.spec.kernel_cmdline)


def relabel(ctx: BuildContext) -> None:
    """Label every file against the image's own policy, so the first boot needs no relabel."""
    contexts = ctx.tree / "etc/selinux/default/contexts/files/file_contexts"
    if not contexts.is_file():
        raise PipelineError(f"{contexts} is missing: the image has no SELinux policy")
    # -T 0: a thread a core (setfiles >= 3.4); the labels are the same.
    run(["setfiles", "-F", "-T", "0", "-r", ctx.tree, contexts, ctx.tree])


def make_liveimg(ctx: BuildContext) -> None:
    liveimg.make(ctx.tree, ctx.work / ctx.artifacts.liveimg.name, ctx.source_date_epoch)


def list_files(ctx: BuildContext) -> None:
    count = manifest.write_file_list(ctx.tree, ctx.work / ctx.artifacts.files.name)
    say(f"{count} paths")


def assemble(ctx: BuildContext) -> None:
    assert ctx.layout, "configure_boot comes first"
    disk.assemble(ctx.tree, ctx.work, ctx.layout, ctx.disk)


def side_by_side(*lanes: tuple[tuple[str, Step], ...]) -> Step:
    """A step that runs each lane (steps in order) in a thread of its own, all at once: for the steps
    that only read the labeled tree. Each inner step's own time is recorded; a failure in one lane
    stops the others (run.concurrently)."""

    def lane_call(ctx: BuildContext, lane: tuple[tuple[str, Step], ...]) -> Callable[[], None]:
        def call() -> None:
            for name, action in lane:
                started = time.monotonic()
                action(ctx)
                ctx.timings.seconds[name] = round(time.monotonic() - started, 2)
                say(f"{name} done in {ctx.timings.seconds[name]:.1f} s")
        call.__name__ = " + ".join(name for name, _ in lane)
        return call

    def action(ctx: BuildContext) -> None:
        concurrently(*(lane_call(ctx, lane) for lane in lanes))

    return action


# zstd compresses each cluster on its own: 256 KiB clusters gave a trixie guest 4.3% less than
# the 64 KiB default, with no change in boot time under TCG (README, Benchmark).
QCOW2_OPTIONS = "compression_type=zstd,cluster_size=262144"


def convert(ctx: BuildContext) -> None:
    run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", QCOW2_OPTIONS,
         ctx.disk, ctx.work / ctx.artifacts.qcow2.name])


def make_netboot(ctx: BuildContext) -> None:
    """The kernel, and the whole trimmed tree as its initramfs (pipeline.netboot)."""
    ctx.kernel = bootloader.find_kernel(ctx.tree)
    shutil.copyfile(ctx.kernel.vmlinuz, ctx.work / ctx.artifacts.kernel.name)
    netboot.trim(ctx.tree, ctx.kernel.version)
    netboot.make_initramfs(ctx.tree, ctx.work / ctx.artifacts.initrd.name)


def move_into_place(ctx: BuildContext) -> None:
    """Move finished files into place; the qcow2 (a netboot image's initrd) goes last, so its
    presence means done."""
    art, kernel, layout = ctx.artifacts, ctx.kernel, ctx.layout
    assert kernel and ctx.manifest is not None, "the steps come first"
    if not ctx.spec.is_netboot:
        shutil.copyfile(kernel.vmlinuz, ctx.work / art.kernel.name)
        shutil.copyfile(kernel.initrd, ctx.work / art.initrd.name)
    ctx.manifest["timings"] = ctx.timings.seconds
    (ctx.work / art.manifest.name).write_text(json.dumps(ctx.manifest, indent=2) + "\n")
    if ctx.spec.is_netboot:
        names = [art.kernel.name, art.packages.name, art.manifest.name, art.info.name, art.initrd.name]
    else:
        names = [art.kernel.name, art.initrd.name, art.packages.name, art.files.name, art.manifest.name,
                 art.liveimg.name, art.info.name, *([art.raw.name] if OutputFormat.RAW in ctx.spec.formats else []),
                 art.qcow2.name]
    # Every file but the raw disk (never published, and the largest), hashed once: publish refuses
    # a file whose sha256 is not recorded here or differs.
    sums = {name: sha256(ctx.work / name) for name in names if name not in (art.info.name, art.raw.name)}
    info = {
        "image": ctx.spec.name,
        "version": ctx.version,
        "input_hash": ctx.input_hash,
        "source_date_epoch": ctx.source_date_epoch,
        "spec": ctx.spec.to_json(),
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "kernel": kernel.version,
        "kernel_sha256": sums[art.kernel.name],
        "initrd_sha256": sums[art.initrd.name],
        "initrd_size": (ctx.work / art.initrd.name).stat().st_size,
        "sha256": sums,
        "timings": ctx.timings.seconds,
    }
    if layout:  # a disk image's
        info |= {
            "kernel_cmdline": ctx.spec.kernel_cmdline,
            "root_uuid": layout.root_uuid,
            "esp_uuid": layout.esp_uuid,
            "qcow2_sha256": sums[art.qcow2.name],
            "qcow2_size": (ctx.work / art.qcow2.name).stat().st_size,
            "liveimg": art.liveimg.name,
            "liveimg_sha256": sums[art.liveimg.name],
        }
    (ctx.work / art.info.name).write_text(json.dumps(info, indent=2) + "\n")
    # An old image must not pass for this build's, nor its check or boot test for this one's.
    for old in (art.qcow2, art.check_report, art.boot_report):
        old.unlink(missing_ok=True)
    for name in names:
        os.replace(ctx.work / name, art.directory / name)


TREE_STEPS = (
    ("policy modules", compile_policy),
    ("tree", build_tree),
    ("unpack", unpack_tree),
    ("manifest", write_manifest),
)
# The outputs read the labeled tree and nothing else: made side by side (host image, 2 busy cores:
# 27 s one after another, 16.5 s side by side; ./inv bench). The disk lane is the longest: first.
OUTPUTS = "outputs (disk, liveimg, file list side by side)"
STEPS = (
    *TREE_STEPS,
    ("configure boot", configure_boot),
    ("relabel", relabel),
    (OUTPUTS, side_by_side((("assembly", assemble), ("conversion", convert)),
                           (("liveimg", make_liveimg),),
                           (("file list", list_files),))),
)
NETBOOT_STEPS = (*TREE_STEPS, ("netboot", make_netboot))


WORK_PREFIX = ".work-"
WORK_NAME = re.compile(rf"{re.escape(WORK_PREFIX)}([1-9][0-9]*)")
MOUNT_TABLE = Path("/proc/self/mounts")
# The kernel writes a space, tab, newline or backslash in a mount path as \040, \011, \012, \134.
MOUNT_ESCAPE = re.compile(rb"\\([0-7]{3})")


def mounts_below(directory: Path, table: Path = MOUNT_TABLE) -> list[str]:
    """What is mounted at or under `directory`, deepest first (a path mounted twice, twice)."""
    directory = Path(directory).resolve()  # the table holds absolute paths, symlinks resolved
    mounts = []
    for line in table.read_bytes().splitlines():
        target = os.fsdecode(MOUNT_ESCAPE.sub(lambda code: bytes([int(code[1], 8)]), line.split(b" ")[1]))
        if Path(target).is_relative_to(directory):
            mounts.append(target)
    return sorted(mounts, key=lambda mount: len(Path(mount).parts), reverse=True)


def cleanup(work: Path, mount_table: Path = MOUNT_TABLE) -> None:
    """Unmount and detach whatever a killed DIB left under `work`, then remove it; refuse to
    remove it while anything is still mounted there (rmtree would delete through the mount)."""
    with cleaning_up():
        for mount in mounts_below(work, mount_table):
            run(["umount", "--lazy", mount], check=False)
        loops = run(["losetup", "--list", "--json", "--output", "NAME,BACK-FILE"], capture=True, check=False)
        for loop in json.loads(loops.stdout or "{}").get("loopdevices", []):
            if Path(loop["back-file"] or "/").is_relative_to(Path(work).resolve()):
                run(["losetup", "--detach", loop["name"]], check=False)
    still_mounted = mounts_below(work, mount_table)
    if still_mounted:
        raise PipelineError(f"{work} is left in place: {still_mounted[0]!r} is still mounted under it "
                            f"(umount failed); unmount it, then remove {work}")
    shutil.rmtree(work, ignore_errors=True)


def work_dir(directory: Path, pid: int | None = None) -> Path:
    """A build's private work directory beside its artifacts, named after the building process."""
    return directory / f"{WORK_PREFIX}{pid or os.getpid()}"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def sweep_stale_work(directory: Path, mount_table: Path = MOUNT_TABLE) -> None:
    """Clean up after builds that died without their `finally` (SIGKILL, a power cut): each
    work directory whose process is gone. One whose process runs is another build's, and kept
    (a reused pid keeps one too long, never removes a live one)."""
    for work in sorted(directory.glob(f"{WORK_PREFIX}*")):
        match = WORK_NAME.fullmatch(work.name)
        if not match or not work.is_dir() or int(match[1]) == os.getpid() or _running(int(match[1])):
            continue
        say(f"removing {work}: left by build process {match[1]}, which is gone")
        cleanup(work, mount_table)


def stale_reason(art: Artifacts, input_hash: str) -> str | None:
    """Why the artifact must be rebuilt; None if it is up to date: built from these inputs,
    every file in place, and its offline check passed on this very qcow2. Cheap: no hashing."""
    if not art.info.is_file():
        return "never built"
    try:
        info = art.read_info()
    except PipelineError as unreadable:
        return str(unreadable)
    if info.get("input_hash") != input_hash:
        built_from = str(info.get("input_hash"))[:inputs.SHORT]
        return f"inputs changed (built from {built_from}, now {input_hash[:inputs.SHORT]})"
    netboot = info.get("spec", {}).get("formats") == ["netboot"]
    wanted = (art.kernel, art.initrd, art.manifest) if netboot else (art.qcow2, art.liveimg, art.kernel, art.initrd,
                                                                      art.manifest)
    missing = [p.name for p in wanted if not p.is_file()]
    if missing:
        return f"missing {', '.join(missing)}"
    if netboot:  # no disk, so no offline check: the deploy test proves it
        return None if art.initrd.stat().st_size == info.get("initrd_size") else \
            f"{art.initrd.name} is not the file that was built"
    if art.qcow2.stat().st_size != info.get("qcow2_size"):
        return f"{art.qcow2.name} is not the file that was built"
    if not art.passed(CHECK):
        return "its offline check has not passed"
    return None


def build(spec: ImageSpec, output_dir: Path, cache_dir: Path, force: bool = False) -> BuildResult:
    """Build the image unless it is up to date (see stale_reason) or force."""
    art = artifacts_for(spec, output_dir)
    input_hash = inputs.input_hash(spec)
    reason = "--force" if force else stale_reason(art, input_hash)
    if reason is None:
        say(f"{spec.name} is up to date: version {art.read_info().get('version')}, "
            f"input hash {input_hash[:inputs.SHORT]}, offline check passed ({art.qcow2}); --force rebuilds")
        print(art.initrd if spec.is_netboot else art.qcow2, file=sys.stdout)
        return BuildResult(art, built=False)
    say(f"building {spec.name}: {reason}")
    art.logs.mkdir(parents=True, exist_ok=True)
    sweep_stale_work(art.directory)  # before preflight measures the free space they take
    with step(f"preflight {spec.name}"):
        profile_dirs = preflight(spec, art.directory, Path(cache_dir))
    work = work_dir(art.directory)
    ctx = BuildContext(spec=spec, artifacts=art, cache_dir=Path(cache_dir), work=work,
                       log=art.logs / f"build-{time.strftime('%Y%m%d-%H%M%S')}.log", profile_dirs=profile_dirs,
                       input_hash=input_hash, source_date_epoch=inputs.source_date_epoch(),
                       layer=layer.layer_for(spec, Path(cache_dir)))
    work.mkdir()
    try:
        for name, action in NETBOOT_STEPS if spec.is_netboot else STEPS:
            with step(name, ctx.timings):
                action(ctx)
        move_into_place(ctx)
    finally:
        cleanup(work)
    if spec.is_netboot:
        say(f"netboot image: {art.kernel.name} and {art.initrd} ({art.initrd.stat().st_size / 2**20:.0f} MiB), "
            f"version {ctx.version}")
        print(art.initrd, file=sys.stdout)
    else:
        say(f"image: {art.qcow2} ({art.qcow2.stat().st_size / 2**20:.0f} MiB), version {ctx.version}; "
            f"liveimg {art.liveimg.name} ({art.liveimg.stat().st_size / 2**20:.0f} MiB)")
        print(art.qcow2, file=sys.stdout)
    return BuildResult(art, built=True, timings=ctx.timings)
