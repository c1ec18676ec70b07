"""Tasks: ./inv --list shows them, ./inv --help TASK explains one.

Thin by design: each task parses its arguments and calls the pipeline package.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from invoke import Collection, Exit, Local, task

from pipeline import spec as specs
from pipeline import workflow
from pipeline.errors import PipelineError
from pipeline.paths import DEFAULT_CACHE, DEFAULT_OUTPUT, ROOT, SPEC_FILE
from pipeline.progress import tagged
from pipeline.run import interrupt_on_termination

# A cancelled job (SIGTERM, SIGHUP) cleans up as Ctrl-C does (see InterruptingLocal for ./inv test).
interrupt_on_termination()


class InterruptingLocal(Local):
    """invoke's runner, passing an interrupt on to the command as SIGINT. Without a pty, invoke
    writes ^C into the command's stdin pipe, which pytest never reads: it ran on, and its
    fixtures' QEMU and nginx with it, after ./inv test had been told to stop."""

    def send_interrupt(self, interrupt: KeyboardInterrupt) -> None:
        os.kill(self.process.pid, signal.SIGINT)


def user_errors(function):
    """A PipelineError becomes one line on stderr and exit status 1; --debug keeps the traceback."""

    @functools.wraps(function)
    def wrapper(c, *args, **kwargs):
        try:
            return function(c, *args, **kwargs)
        except PipelineError as error:
            if os.environ.get("PIPELINE_DEBUG"):
                raise
            raise Exit(f"error: {error}", code=1) from None
        except KeyboardInterrupt:
            raise Exit("interrupted; nothing was left half-written", code=130) from None

    return wrapper


def _spec(name: str | None, spec_file: str | None):
    return specs.load(Path(spec_file) if spec_file else SPEC_FILE).get(name)


def _disk_image(spec, what: str):
    """The spec, if it is a disk image: a netboot image (the installer) has no disk to check,
    boot, benchmark or publish; the deploy test proves it."""
    if spec.is_netboot:
        raise PipelineError(f"{spec.source}: image {spec.name!r} is a netboot image (formats = [\"netboot\"]): "
                            f"it has no disk to {what}; tests/integration/test_deploy.py proves it")
    return spec


@task(name="list", help={"spec-file": f"image spec file (default {SPEC_FILE.name})"})
@user_errors
def list_(c, spec_file=None):
    """List the images that the spec file defines."""
    loaded = specs.load(Path(spec_file) if spec_file else SPEC_FILE)
    width = max(len(name) for name in loaded.images)  # names are the spec's (up to 63 characters)
    for name, image in loaded.images.items():
        marker = "*" if name == loaded.default else " "
        print(f"{marker} {name:<{width}}  {image.release:<10} {image.tuned_profile or '-':<18} {image.description}")


COMMON_HELP = {
    "image": "image name from the spec file (./inv list shows them)",
    "spec-file": f"image spec file (default {SPEC_FILE.name})",
    "output-dir": f"where artifacts go (default {DEFAULT_OUTPUT.name}/)",
}


@task(positional=["image"], help={**COMMON_HELP, "cache-dir": f"DIB download cache (default {DEFAULT_CACHE})",
            "skip-check": "do not run the offline check after the build",
            "force": "rebuild even if the image is up to date"})
@user_errors
def build(c, image, spec_file=None, output_dir=str(DEFAULT_OUTPUT), cache_dir=str(DEFAULT_CACHE),
          skip_check=False, force=False):
    """Build an image with diskimage-builder, assemble its disk and liveimg tarball, then check it offline.

    The artifacts go to build/NAME/: NAME.qcow2, NAME.tar.gz (for Anaconda's liveimg), kernel,
    initrd, build-info.json and manifest.json; DIB's full log to build/NAME/logs/. An image whose
    inputs (spec, elements, profiles, policy, pipeline) are unchanged since a build that passed
    its check is up to date: nothing is done (--force rebuilds).
    """
    workflow.build(_spec(image, spec_file), Path(output_dir), Path(cache_dir), force=force, check_after=not skip_check)


@task(positional=["image"], help=COMMON_HELP)
@user_errors
def check(c, image, spec_file=None, output_dir=str(DEFAULT_OUTPUT)):
    """Check a built image offline with libguestfs (read-only); prints a table and writes JSON."""
    workflow.check(_disk_image(_spec(image, spec_file), "check"), Path(output_dir))


@task(positional=["image"], help={**COMMON_HELP, "firmware": "bios, uefi or both (default both)",
                                   "reboot": "reboot the UEFI boot and check it too (default; --no-reboot "
                                             "saves about a boot's time)"})
@user_errors
def boot_test(c, image, spec_file=None, output_dir=str(DEFAULT_OUTPUT), firmware="both", reboot=True):
    """Boot a throw-away overlay of the image in QEMU and run the testinfra tests over SSH
    (the host tests too for a KVM host image), ending with a check for SELinux denials, a
    reboot whose shutdown and boot must log none either, and the logins with dontaudit off.

    Writes the verdict that ./inv publish requires, build/NAME/boot-test.json: passed only if
    every test passed and the denial check passed on every firmware booted. pytest's output
    also goes to build/NAME/logs/boot-test-TIME.log. Exits 1 if the boot test failed."""
    spec = _disk_image(_spec(image, spec_file), "boot")
    tested = workflow.boot_test(spec, Path(output_dir), firmware, reboot=reboot)
    if not tested.passed:
        raise PipelineError(f"boot test of {spec.name} failed: see {tested.log}")


def _pytest(c, args: list[str]) -> None:
    """Run pytest; a failure stops the task (invoke's UnexpectedExit)."""
    import shlex

    c.run(shlex.join([sys.executable, "-m", "pytest", *args]), pty=False)


@task(positional=["image"], help={**COMMON_HELP, "image": "image name; with --rebuilds also `all`",
                                 "runs": "runs; medians are reported",
                                 "rebuilds": "measure rebuilds instead: cold, no change, after an element change, "
                                             "and publish time, for every image",
                                 "publish-runs": "with --rebuilds: runs that also boot-test and publish (default 1)",
                                 "builds-only": "the cold builds and their ratios to DIB alone and plain DIB only: "
                                                "no check, boots or boot test (a third of the time)",
                                 "boots": "boot the built IMAGE --runs times by BIOS and by UEFI, no build: seconds "
                                          "to SSH-ready and systemd-analyze's critical chain of each boot",
                                 "side-by-side": "with --boots: VMs booted at once in each run (default 1), as "
                                                 "./inv test's two lanes boot; PIPELINE_VM_CPUS sets their vCPUs"})
@user_errors
def bench(c, image, spec_file=None, output_dir=str(DEFAULT_OUTPUT), runs=1, rebuilds=False, publish_runs=1,
          builds_only=False, boots=False, side_by_side=1):
    """Benchmark: stage times, peak memory, size, check and boot times, and DIB alone on the same elements.

    Every build is cold (fresh download cache). Writes build/bench/bench-NAME-TIME.json.
    With --rebuilds, for every image in one run: a cold build, a rebuild with nothing changed,
    a rebuild after a change to one of our elements (package layer and download cache warm),
    and, in the first --publish-runs runs, its boot test and publish time. With --boots, the
    built artifact is booted instead (build/bench/boots-NAME-TIME.json); with --side-by-side 2,
    two VMs at a time (compare PIPELINE_VM_CPUS=1 with the default 2).
    """
    from pipeline import bench as benchmark

    if boots:
        benchmark.boot_benchmark(_disk_image(_spec(image, spec_file), "benchmark"), Path(output_dir), int(runs),
                                 side_by_side=int(side_by_side))
    elif rebuilds:
        loaded = specs.load(Path(spec_file) if spec_file else SPEC_FILE)
        images = [i for i in loaded.images.values() if not i.is_netboot] if image == "all" \
            else [_disk_image(loaded.get(image), "benchmark")]
        benchmark.rebuild_benchmark(images, Path(output_dir), int(runs), int(publish_runs))
    else:
        benchmark.benchmark(_disk_image(_spec(image, spec_file), "benchmark"), Path(output_dir), int(runs),
                            builds_only=builds_only)


# What ./inv lint checks by default; ruff's rules and mypy's settings are in pyproject.toml.
# ruff checks the tests too; mypy only the code (the tests are not typed, and unit/ and integration/
# share module names such as test_build.py, which mypy refuses).
LINTED = ("pipeline", "tasks.py")
RUFF_ONLY = ("tests",)


@task(iterable=["path"], help={"path": "lint only this file or directory (repeatable; default: "
                                       f"{', '.join(LINTED + RUFF_ONLY)}, the last by ruff only)"})
def lint(c, path=None):
    """Lint the code: ruff (the rules chosen in pyproject.toml) over the code and the tests, then mypy's
    type check over the code.

    One line a finding; exits non-zero if there is any. ./inv test runs it first."""
    import shlex

    paths = path or [*LINTED, *RUFF_ONLY]
    typed = path or list(LINTED)
    ruff = c.run(shlex.join([sys.executable, "-m", "ruff", "check", "--quiet", "--output-format=concise", *paths]),
                 pty=False, warn=True)
    mypy = c.run(shlex.join([sys.executable, "-m", "mypy", "--no-error-summary", *typed]), pty=False, warn=True)
    if not (ruff.ok and mypy.ok):
        raise Exit("error: lint: fix the findings above", code=1)
    print(f"lint: no findings in {' '.join(paths)}")


# The image tests: every image is built once and booted once per firmware listed.
# The guest image proves both firmwares, the bad-input cases and rebuilds; the host
# image, whose boot test runs guests of its own, boots by UEFI as compute nodes do, and
# is the one deployed by PXE and published. Each entry is one pytest session (so one
# build and one boot per firmware); files run in the order given: test_build.py's last
# test sees the artifact after the boots. A rebuild or publish session comes after the
# session that booted its image (the first session, or an earlier one in its own lane), since
# publishing needs the boot-test verdict: a session that boots runs as the boot test does
# (pipeline.workflow.boot_test), which writes it.
# The deploy test renders its tree from the built host image and needs no verdict.
INTEGRATION = ROOT / "tests" / "integration"
IMAGE_TEST_RUNS = (
    ("guest-image", "both", ["test_artifacts.py", "test_bad_input.py", "test_boot.py", "test_login.py",
                             "test_build.py", "test_zz_final.py"]),
    ("host-image", None, ["test_deploy.py"]),
    ("host-image-bookworm", "uefi", ["test_artifacts.py", "test_boot.py", "test_login.py", "test_build.py",
                                     "test_host.py", "test_zz_final.py"]),
)
# These run in a second lane beside the first, from when the later images are built (the first
# session's VMs still run then); the first lane goes on after the first session. The longest
# session, the deploy, leads the first lane; the README's Benchmark section has each session's
# time in CI.
# Bookworm (old stable) boots its two images once each, by UEFI: the default release carries
# the full matrix, and what differs by release is the packages and the policy, which one boot
# proves.
SECOND_LANE_TEST_RUNS = (
    ("host-image", "uefi", ["test_artifacts.py", "test_boot.py", "test_login.py", "test_build.py",
                            "test_host.py", "test_pxe_boot.py", "test_zz_final.py"]),
    ("guest-image-bookworm", "uefi", ["test_artifacts.py", "test_boot.py", "test_login.py", "test_build.py",
                                      "test_zz_final.py"]),
    ("guest-image", None, ["test_everyday.py", "test_rebuild.py", "test_interrupt.py"]),
    ("host-image", None, ["test_publish_image.py", "test_publish_remote.py"]),
)
# The boot sessions that also reboot their VM (test_zz_final.py): a reboot costs about what a
# first boot does under TCG, so one host and one guest, one of each release.
# The lanes as balanced in a cold local run (f315fff, seconds): the deploy 771 and the bookworm
# host 293 (1064) beside the host's boot test 617, the bookworm guest 305, the guest's rebuilds
# 210 and the publish 36 (1168). The second lane, the longer, now starts first, by about 80 s.
REBOOTING_SESSIONS = ("host-image", "guest-image-bookworm")


@task(help={"unit": "run only the unit tests (seconds; no root, no network)",
            "image": "run the image tests of this image only"})
@user_errors
def test(c, unit=False, image=None):
    """Run the unit tests, then the image tests: build, offline check and boot tests of each
    image (guest-image by BIOS and UEFI, host-image and bookworm's two by UEFI), the bad-input cases,
    a rebuild compared with the first build, the PXE boot, the deploy and publishing. Lint runs first: it
    takes seconds. The unit tests run beside the first image's build. While the first image's VMs
    run, the images of the later sessions are built; then two lanes run side by side: after the
    first session, the host's deploy and bookworm's host; once the images are built, the host's boot,
    bookworm's guest, the guest's rebuilds and the host's publishing."""
    from pipeline import build, qemu
    from pipeline.deploy.inventory import DEFAULT_INSTALLER
    from pipeline.run import Milestone, concurrently

    lanes = [[run for run in lane if image in (None, run[0])] for lane in (IMAGE_TEST_RUNS, SECOND_LANE_TEST_RUNS)]
    lanes = [lane for lane in lanes if lane]
    if not lanes:  # before minutes of lint and unit tests
        tested = ", ".join(dict.fromkeys(name for name, _, _ in IMAGE_TEST_RUNS + SECOND_LANE_TEST_RUNS))
        raise PipelineError(f"--image {image}: no image tests; the images with tests are {tested}")
    lint(c)
    if unit:
        _pytest(c, ["tests/unit"])
        return
    first, lanes[0] = lanes[0][0], lanes[0][1:]
    lane_one, lane_two = lanes[0], (lanes[1] if len(lanes) > 1 else [])
    # Two sessions run at once from here on, each VM with half the cores (pipeline/qemu.py says why).
    os.environ.setdefault(qemu.VM_CPUS_VARIABLE, str(qemu.shared_vm_cpus(sharing=2)))
    # The later sessions' images, and the installer their PXE and deploy tests boot.
    later_images = [name for name in dict.fromkeys(name for lane in lanes for name, _, _ in lane) if name != first[0]]
    later_images += [DEFAULT_INSTALLER] if later_images else []
    builds_done, first_done = Milestone("the later images' builds"), Milestone(f"{first[0]}'s first session")

    def build_first_image() -> None:
        build.build(_spec(first[0], None), DEFAULT_OUTPUT, DEFAULT_CACHE)

    def lane(sessions: Sequence[tuple[str, str | None, list[str]]]) -> None:
        """SESSIONS one after another, each once every image is built (the rebuild and interrupt
        sessions run DIB, whose apt cache a build would share) and, for the first session's image,
        once that session is done (its rebuild changes its artifacts)."""
        for session in sessions:
            builds_done.wait()
            if session[0] == first[0]:
                first_done.wait()
            with tagged(session[0]):
                _image_session(*session)

    def first_session_then_lane_one() -> None:
        _image_session(*first)
        first_done.reached()
        lane(lane_one)

    def builds_then_lane_two() -> None:
        for name in later_images:  # one after another: two DIB builds would share apt's cache lock
            with tagged(name):
                build.build(_spec(name, None), DEFAULT_OUTPUT, DEFAULT_CACHE)
        builds_done.reached()
        lane(lane_two)

    # The unit tests (a minute, mostly one core) run beside the first build; either failing stops
    # the other. The other images are built while the first session's VMs run, and the second lane
    # starts as soon as they are: the first session's last minutes would leave a core idle.
    concurrently(_unit_tests, build_first_image)
    concurrently(first_session_then_lane_one, builds_then_lane_two)


def _unit_tests() -> None:
    with tagged("unit tests"):
        workflow.unit_tests(DEFAULT_OUTPUT)


def _image_session(name: str, firmware: str | None, files: list[str]) -> None:
    """One pytest session of IMAGE_TEST_RUNS on the built image; a boot session writes its verdict."""
    tests = [str(INTEGRATION / f) for f in files]
    if firmware:
        tested = workflow.boot_test(_spec(name, None), DEFAULT_OUTPUT, firmware, tests=tests,
                                    reboot=name in REBOOTING_SESSIONS)
        if not tested.passed:
            raise PipelineError(f"image tests of {name} failed: see {tested.log}")
    else:
        workflow.image_tests(_spec(name, None), DEFAULT_OUTPUT, tests)


@task(positional=["a", "b"], help={
    "a": "a build directory (build/NAME) or a published version directory",
    "b": "another one, e.g. a second build of the same inputs"})
@user_errors
def diff(c, a, b):
    """Report what differs between two builds: packages (name, version) and files (path, type, mode,
    owner, size, SELinux label, content). Exits 1 if the package list or the file list differ."""
    from pipeline import manifest

    difference = manifest.compare_builds(Path(a), Path(b))
    print(manifest.format_difference(difference, a, b))
    if not (difference.same_packages and difference.same_file_list):
        raise Exit(code=1)


namespace = Collection(list_, build, check, boot_test, bench, lint, test, diff)
namespace.configure({"run": {"echo": True}, "runners": {"local": InterruptingLocal}})


# --- kickstart: ./inv kickstart.render, ./inv kickstart.bench (invoke names sub-collection tasks with a dot)


VERIFY_KEY_HELP = ("with a publish target as --build-dir (required then): the public key that signs its versions, "
                   "a key file or a full fingerprint (of a key in $GNUPGHOME); each role's SHA256SUMS is checked "
                   "with gpg --verify and its liveimg, kernel and initrd with sha256sum --check before use")


@task(positional=["inventory"], help={
    "inventory": "the node inventory (see kickstarts/inventory.example.toml)",
    "output-dir": f"where NODE.ks files go (default {DEFAULT_OUTPUT.name}/kickstarts/); other *.ks there are removed",
    "target": "installer version for pykickstart: RHEL9 (default), RHEL10, F42 or F43",
    "build-dir": f"where each role's liveimg sha256 is read: a build directory (default {DEFAULT_OUTPUT.name}/) "
                 "or a publish target (its latest version's SHA256SUMS, verified with --verify-key)",
    "verify-key": VERIFY_KEY_HELP})
@user_errors
def render(c, inventory, output_dir=str(DEFAULT_OUTPUT / "kickstarts"), target="RHEL9", build_dir=str(DEFAULT_OUTPUT),
           verify_key=None):
    """Render one kickstart per inventory node, each checked with pykickstart; none is written unless all pass."""
    from pipeline.deploy import inventory as inventories
    from pipeline.deploy import kickstart

    written = kickstart.render_all(inventories.load(Path(inventory)), Path(output_dir), target,
                                   build_dir=Path(build_dir), verify_key=verify_key)
    print(f"{len(written)} kickstarts for {target} in {output_dir}")


@task(name="bench", help={"nodes": "how many synthetic nodes (default 1000)", "target": "installer version"})
@user_errors
def kickstart_bench(c, nodes=1000, target="RHEL9"):
    """Time loading, rendering, validating and writing kickstarts for many synthetic nodes."""
    from pipeline.deploy import kickstart

    kickstart.benchmark(int(nodes), target)


namespace.add_collection(Collection("kickstart", render, kickstart_bench))


# --- pxe: ./inv pxe.render, ./inv pxe.serve, ./inv pxe.check, ./inv pxe.boot-test


PXE_ROOT = DEFAULT_OUTPUT / "pxe"


@task(name="render", positional=["inventory"], help={
    "inventory": "the node inventory (see kickstarts/inventory.example.toml; [site.pxe] in kickstarts/README.md)",
    "output-dir": f"the tree's root (default {DEFAULT_OUTPUT.name}/pxe/); it is replaced whole",
    "target": "installer version for pykickstart: RHEL9 (default), RHEL10, F42 or F43",
    "build-dir": f"where the roles' liveimg tarballs are: a build directory (default {DEFAULT_OUTPUT.name}/) "
                 "or a publish target (each role's latest version, verified with --verify-key)",
    "verify-key": VERIFY_KEY_HELP,
    "installer-dir": f"the build directory of the installer ([site] installer, default `installer`; "
                     f"default {DEFAULT_OUTPUT.name}/)"})
@user_errors
def pxe_render(c, inventory, output_dir=str(PXE_ROOT), target="RHEL9", build_dir=str(DEFAULT_OUTPUT),
               installer_dir=str(DEFAULT_OUTPUT), verify_key=None):
    """Render the PXE tree: iPXE, GRUB and pxelinux configurations per MAC, kickstarts, dnsmasq.conf,
    an nginx site, boot programs, the installer's kernel and initrd, and each role's liveimg. Nothing
    is written unless all of it is good."""
    from pipeline.deploy import inventory as inventories
    from pipeline.deploy import pxe

    tree = pxe.render_tree(inventories.load(Path(inventory)), Path(output_dir), target, build_dir=Path(build_dir),
                           installer_dir=Path(installer_dir), verify_key=verify_key)
    roles = sorted({boot.node.role for boot in tree.boots})
    print(f"PXE tree for {len(tree.boots)} nodes ({', '.join(roles)}) in {tree.directory}; ./inv pxe.serve serves it")


@task(name="serve", help={
    "root": f"the tree to serve (default {DEFAULT_OUTPUT.name}/pxe/)",
    "address": "IPv4 address to serve HTTP on (default 127.0.0.1; nodes need one they can reach, "
               "the inventory's base_url)",
    "port": "HTTP port (default 8080)",
    "no-tftp": "serve HTTP only: no dnsmasq (TFTP and proxy DHCP need root)"})
@user_errors
def pxe_serve(c, root=str(PXE_ROOT), address="127.0.0.1", port=8080, no_tftp=False):
    """Serve the PXE tree over HTTP and, with dnsmasq, TFTP and proxy DHCP, until Ctrl-C.

    Each request is logged to stdout and to ROOT/access.log; dnsmasq logs to ROOT/dnsmasq.log.
    """
    from pipeline.deploy import serve

    serve.serve(Path(root), address, int(port), tftp=not no_tftp)


@task(name="check", help={
    "root": f"the tree to check (default {DEFAULT_OUTPUT.name}/pxe/)",
    "base-url": "a running server of the tree (./inv pxe.serve); default: start one on loopback for the check"})
@user_errors
def pxe_check(c, root=str(PXE_ROOT), base_url=None):
    """Walk the tree as booting nodes would: every boot configuration's kernel, initrd and kickstart URL,
    every kickstart (pykickstart), its liveimg (sha256) and %include URLs, all over HTTP."""
    from pipeline.deploy import pxe

    report = pxe.check(Path(root), base_url)
    for problem in report.problems:
        print(problem)
    if not report.passed:
        count = len(report.problems)
        raise Exit(f"error: PXE check of {report.root} failed: {count} problem{'s' if count > 1 else ''}", code=1)
    print(f"PXE tree {report.root}: {report.nodes} nodes, {report.urls} URLs fetched, no problems")


@task(name="boot-test", positional=["image"], help={
    "image": "the image whose built kernel and initrd the nodes boot (./inv list shows them)",
    "spec-file": f"image spec file (default {SPEC_FILE.name})",
    "build-dir": f"where the image was built (default {DEFAULT_OUTPUT.name}/); logs go to BUILD_DIR/IMAGE/pxe-boot/",
    "firmware": "bios, uefi or both (default both)",
    "loader": "ipxe (default: iPXE, everything over HTTP) or pxelinux-grub (pxelinux for BIOS, GRUB for "
              "UEFI, by TFTP)"})
@user_errors
def pxe_boot_test(c, image, spec_file=None, build_dir=str(DEFAULT_OUTPUT), firmware="both", loader="ipxe"):
    """Boot QEMU VMs from the network as nodes of a two-node inventory (one BIOS, one UEFI) and prove
    each got its own files: with iPXE, its script, kernel and initrd (from the access log); with
    pxelinux or GRUB, the loader's own lines (from the serial console); and its own kickstart URL on
    the kernel's command line. Prints each boot's time from VM start to the kernel running. What
    boots is the installer (./inv build installer): this proves the chain up to it, not an install
    (tests/integration/test_deploy.py proves that)."""
    from pipeline.deploy import pxenode
    from pipeline.deploy.inventory import Loader

    firmwares = workflow.firmwares(firmware)
    if loader not in tuple(Loader):
        raise Exit(f"error: --loader is {' or '.join(Loader)}, not {loader!r}", code=1)
    role = _spec(image, spec_file).name
    results = pxenode.boot_test(role, Path(spec_file) if spec_file else SPEC_FILE, Path(build_dir), firmwares,
                                loader=Loader(loader))
    for result, problems in results:
        print("\n".join(pxenode.summary(result) + [f"  problem: {problem}" for problem in problems]))
    if any(problems for _, problems in results):
        raise Exit("error: PXE boot test failed: a node did not get its own files", code=1)


@task(name="bench", positional=["image"], help={
    "image": "the role to deploy (default: the spec file's default image)",
    "spec-file": f"image spec file (default {SPEC_FILE.name})",
    "build-dir": f"where the role and the installer are built (default {DEFAULT_OUTPUT.name}/)",
    "runs": "deploys of each node; medians are reported (default 3)",
    "node": "deploy-uefi, deploy-bios or both (default both)"})
@user_errors
def pxe_bench(c, image=None, spec_file=None, build_dir=str(DEFAULT_OUTPUT), runs=3, node="both"):
    """Deploy benchmark: QEMU nodes with blank disks (the deploy test's UEFI node with its NVMe cache,
    and its one-disk BIOS node) boot from the network, install the role with the installer and
    reboot from disk, RUNS times each. Reports, from power-on: installer running, install reported,
    SSH-ready on the installed system, and each installer step's own time (medians). Writes
    build/bench/deploy-TIME.json. Needs the role and the installer built."""
    import time

    from pipeline.deploy import nodes

    chosen = {"both": (nodes.UEFI_NODE, nodes.BIOS_NODE), "deploy-uefi": (nodes.UEFI_NODE,),
              "deploy-bios": (nodes.BIOS_NODE,)}
    if node not in chosen:
        raise Exit(f"error: --node is {', '.join(chosen)}, not {node!r}", code=1)
    role = _disk_image(_spec(image, spec_file), "deploy").name
    output = Path(build_dir) / "bench" / f"deploy-{time.strftime('%Y%m%d-%H%M%S')}.json"
    report = nodes.benchmark(role, Path(spec_file) if spec_file else SPEC_FILE, Path(build_dir), int(runs),
                             chosen[node], output)
    for name, medians in report["medians"].items():
        print(f"{name} (medians of {runs}):")
        for key, seconds in medians.items():
            print(f"  {key:<28} {seconds:8.1f} s")
    print(f"every run: {output}")


namespace.add_collection(Collection("pxe", pxe_render, pxe_serve, pxe_check, pxe_boot_test, pxe_bench))


# --- publish: ./inv publish


@task(positional=["image"], iterable=["ssh_option"], auto_shortflags=False, help={
    "image": "image name, several separated by commas, or `all` for every image in the spec file",
    "spec-file": f"image spec file (default {SPEC_FILE.name})",
    "output-dir": f"where the images were built (default {DEFAULT_OUTPUT.name}/)",
    "target": f"a directory (default {DEFAULT_OUTPUT.name}/publish), [user@]host:/path or "
              "ssh://[user@]host[:port]/path (rsync over ssh)",
    "key": "GnuPG key that signs SHA256SUMS: fingerprint or email (required)",
    "gnupg-home": "GnuPG home holding the key (default $GNUPGHOME, else ~/.gnupg)",
    "retention": "versions kept per image (default 5); the one latest names is never pruned",
    "ssh-option": "an ssh -o option for a remote target, e.g. IdentityFile=KEY or UserKnownHostsFile=FILE "
                  "(repeatable)"})
@user_errors
def publish(c, image, spec_file=None, output_dir=str(DEFAULT_OUTPUT), target=str(DEFAULT_OUTPUT / "publish"),
            key=None, gnupg_home=None, retention=5, ssh_option=None):
    """Publish built images as TARGET/NAME/VERSION (qcow2, liveimg tarball, kernel, initrd, manifest,
    CycloneDX SBOM, SHA256SUMS and its GnuPG signature), then point TARGET/NAME/latest at it.

    Refused, with nothing written, unless the offline check and the boot test passed on this very
    qcow2 and every artifact still matches its build-time sha256. A version already published is
    kept as it is (versions are immutable) and latest points at it."""
    from pipeline import publish as publisher
    from pipeline.artifacts import artifacts_for

    loaded = specs.load(Path(spec_file) if spec_file else SPEC_FILE)
    if image == "all" and "all" not in loaded.images:
        images = [i for i in loaded.images.values() if not i.is_netboot]
    else:
        images = [_disk_image(loaded.get(name), "publish") for name in image.split(",")]
    for spec in images:
        result = publisher.publish(artifacts_for(spec, Path(output_dir)).directory, spec.name, target,
                                   key=key, gnupg_home=Path(gnupg_home) if gnupg_home else None,
                                   retention=int(retention), ssh_options=ssh_option or [])
        print(result.location)


namespace.add_task(publish)


# --- ci: ./inv ci


@task(iterable=["ssh_option", "image"], auto_shortflags=False, help={
    "spec-file": f"image spec file (default {SPEC_FILE.name})",
    "output-dir": f"where artifacts go (default {DEFAULT_OUTPUT.name}/)",
    "cache-dir": f"DIB download cache and package layers (default {DEFAULT_CACHE})",
    "target": "publish target, as for ./inv publish",
    "key": "GnuPG key that signs SHA256SUMS (required; checked before anything is built)",
    "gnupg-home": "GnuPG home holding the key",
    "retention": "versions kept per image (default 5)",
    "ssh-option": "an ssh -o option for a remote target (repeatable)",
    "force": "rebuild every image even if it is up to date",
    "image": "only this image of the spec file (repeatable; default every image): one CI job per image"})
@user_errors
def ci(c, spec_file=None, output_dir=str(DEFAULT_OUTPUT), cache_dir=str(DEFAULT_CACHE),
       target=str(DEFAULT_OUTPUT / "publish"), key=None, gnupg_home=None, retention=5, ssh_option=None, force=False,
       image=None):
    """What CI runs: for every image of the spec file (or each --image), in order, build it (skipped
    when up to date), check it offline, boot-test it (skipped when it passed on this very artifact)
    and publish it. Stops at the first failure; an image is published only after all of its steps
    passed. examples/ci/github-actions.yml runs one job per image and release."""
    workflow.ci(Path(spec_file) if spec_file else SPEC_FILE, Path(output_dir), Path(cache_dir), target=target, key=key,
                gnupg_home=Path(gnupg_home) if gnupg_home else None, retention=int(retention),
                ssh_options=ssh_option or [], force=force, images=image or [])


namespace.add_task(ci)


# --- everyday use: ./inv vm, ./inv ssh, ./inv shell, ./inv status (pipeline/devvm.py, pipeline/status.py)


def _built_disk(image: str, spec_file: str | None, output_dir: str, what: str):
    from pipeline.artifacts import artifacts_for

    spec = _disk_image(_spec(image, spec_file), what)
    return spec, artifacts_for(spec, Path(output_dir))


@task(positional=["image"], auto_shortflags=False, help={
    **COMMON_HELP,
    "image": "image name from the spec file; with --stop also `all` (every VM of --output-dir)",
    "firmware": "bios (SeaBIOS, the default) or uefi (OVMF)",
    "key": "the SSH public key the default user gets (default: the first of ~/.ssh/id_ed25519.pub, "
           "~/.ssh/id_ecdsa.pub, ~/.ssh/id_rsa.pub); ./inv ssh logs in with its private half (or an agent's)",
    "port": "the loopback port forwarded to the VM's SSH (default: a free one); a port in use is refused",
    "detach": "boot in the background: return once SSH answers, printing how to log in; "
              "./inv vm --stop IMAGE powers it off",
    "stop": "power off the image's VM (started with --detach, or attached in another terminal) and remove "
            "its overlay, seed and state directory"})
@user_errors
def vm(c, image, spec_file=None, output_dir=str(DEFAULT_OUTPUT), firmware="bios", key=None, port=None,
       detach=False, stop=False):
    """Boot a throw-away copy of a built image in QEMU and log into it with your own SSH key.

    The VM runs on a qcow2 overlay (the artifact is never written) with a NoCloud seed that gives
    the image's default cloud user (debian) your public key; SSH is forwarded from 127.0.0.1:PORT;
    KVM where it really works, TCG otherwise. Attached (the default), the serial console is this
    terminal: Ctrl-A x or Ctrl-C powers the VM off and removes the overlay and seed. With --detach
    it keeps running (its state in build/IMAGE/vm/) until ./inv vm --stop IMAGE; ./inv ssh IMAGE logs in.
    """
    from pipeline import devvm
    from pipeline.qemu import Firmware

    if stop:
        if image == "all":
            stopped = devvm.stop_all(Path(output_dir))
            print(f"stopped: {', '.join(stopped)}" if stopped else f"no VM running in {output_dir}")
            return
        spec, art = _built_disk(image, spec_file, output_dir, "stop")
        print(f"{spec.name}: powered off, {devvm.state_dir(art)} removed" if devvm.stop(art)
              else f"{spec.name}: no VM running")
        return
    if firmware not in tuple(Firmware):
        raise Exit(f"error: --firmware is bios or uefi, not {firmware!r}", code=1)
    if port is not None and not str(port).isdigit():
        raise Exit(f"error: --port is a number, not {port!r}", code=1)
    spec, art = _built_disk(image, spec_file, output_dir, "boot")
    started = devvm.start(spec, art, firmware=Firmware(firmware), key=key, port=int(port) if port else None,
                          detach=detach)
    if started is not None:
        print(f"{spec.name} is running (QEMU pid {started.pid}); log in with\n"
              f"  ./inv ssh {spec.name}\n  {started.plain_ssh()}\n"
              f"power it off with\n  ./inv vm --stop {spec.name}")


@task(name="ssh", positional=["image"], help={**COMMON_HELP, "image": "the image whose VM (./inv vm) to log into"})
@user_errors
def ssh_(c, image, spec_file=None, output_dir=str(DEFAULT_OUTPUT)):
    """Log into the image's running VM (./inv vm) as its default cloud user; `-- CMD ARGS` runs a
    command there instead, as ssh does: ./inv ssh guest-image -- /usr/sbin/getenforce.

    Uses the private half of the key given to ./inv vm (or an ssh-agent's). Exits with the
    command's (or the login's) exit status."""
    from pipeline import devvm

    _, art = _built_disk(image, spec_file, output_dir, "log into")
    status = devvm.ssh(art, c.remainder or None)
    if status:
        raise Exit(code=status)


@task(positional=["image"], help={**COMMON_HELP, "rw": "writable, on a throw-away overlay removed afterwards "
                                                        "(the artifact is never written)"})
@user_errors
def shell(c, image, spec_file=None, output_dir=str(DEFAULT_OUTPUT), rw=False):
    """Open a built image's file systems with libguestfs's guestfish, without booting it:
    read-only on the artifact, or --rw on a throw-away overlay.

    They are mounted as the image mounts them; guestfish's `help` lists its commands (cat, ls,
    ll, find, download, edit with --rw, ...). Commands are read from the terminal, or from stdin:
    echo 'cat /etc/os-release' | ./inv shell guest-image. Exits with guestfish's status."""
    from pipeline import devvm

    spec, art = _built_disk(image, spec_file, output_dir, "open")
    status = devvm.shell(spec, art, writable=rw)
    if status:
        raise Exit(code=status)


@task(iterable=["ssh_option"], auto_shortflags=False, help={
    "spec-file": f"image spec file (default {SPEC_FILE.name})",
    "output-dir": f"where the images are built (default {DEFAULT_OUTPUT.name}/)",
    "target": f"the publish target to look at, as for ./inv publish (default {DEFAULT_OUTPUT.name}/publish)",
    "ssh-option": "an ssh -o option for a remote target (repeatable)",
    "json": "print the status as JSON, for scripts"})
@user_errors
def status(c, spec_file=None, output_dir=str(DEFAULT_OUTPUT), target=str(DEFAULT_OUTPUT / "publish"),
           ssh_option=None, json=False):
    """Every image of the spec file at a glance: its built version; up to date, or why a build would
    rebuild it (the build's own rule); whether the offline check and the boot test passed on this
    very artifact; the version `latest` names on the publish target, and where; sizes; a running VM.

    Reasons given in a word in the table are spelled out below it."""
    from pipeline import status as report

    loaded = specs.load(Path(spec_file) if spec_file else SPEC_FILE)
    statuses = report.collect(list(loaded.images.values()), Path(output_dir), target, ssh_option or [])
    print(report.to_json(statuses) if json else report.table(statuses))


namespace.add_task(vm)
namespace.add_task(ssh_)
namespace.add_task(shell)
namespace.add_task(status)
