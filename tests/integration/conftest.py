"""Integration fixtures: the image is built once per session, each firmware booted once.

Real parts only: diskimage-builder, libguestfs, QEMU and SSH. Marked `image`.
"""

from __future__ import annotations

import configparser
import functools
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import testinfra

from pipeline import build, testvm, tools
from pipeline import spec as specs
from pipeline.artifacts import Artifacts, artifacts_for
from pipeline.deploy.inventory import DEFAULT_INSTALLER
from pipeline.paths import DEFAULT_CACHE, DEFAULT_OUTPUT, SPEC_FILE
from pipeline.qemu import Firmware
from pipeline.run import concurrently, run
from pipeline.seed import Datasource

SETTLE_DEADLINE = 300
# (source domain, target type) of the one denial test_host.py causes on purpose:
# the confined network agent reading /etc/shadow. test_zz_final.py allows exactly it.
EXPECTED_DENIAL = ("kvmpipe_netagent_t", "shadow_t")


def is_expected(record: str, expected_denial: tuple[str, str]) -> bool:
    source, target = expected_denial
    return bool(re.search(rf"scontext=\w+:\w+:{source}:", record) and re.search(rf"tcontext=\w+:\w+:{target}:", record))


def kernel_logged_denials(host, boot: str, expected_denial: tuple[str, str] | None = None) -> list[str]:
    """The denials in the kernel's log of BOOT (journalctl's: 0 this one, -1 the one before),
    where what was denied while auditd was not running (before it started, after it stopped)
    is; all of them, or all but EXPECTED_DENIAL's."""
    journal = f"journalctl --boot={boot} --dmesg --no-pager --quiet"
    # --grep exits 1 both when nothing matched and when the journal could not be read (a boot
    # it does not have, say): only the first is silent, and only a kept log has lines.
    kernel = host.run(f"{journal} --grep 'avc:  denied'")
    assert kernel.rc in (0, 1) and not kernel.stderr.strip(), f"{journal}: status {kernel.rc}: {kernel.stderr}"
    assert host.run(f"{journal} --lines=1").stdout.strip(), f"{journal} --lines=1: the boot's kernel log is empty"
    return [line for line in kernel.stdout.splitlines()
            if line.strip() and not (expected_denial and is_expected(line, expected_denial))]


# Each boot hands the guest its keys as a cloud would: a BIOS boot by a NoCloud seed, a UEFI
# boot by an OpenStack config drive (the host image boots by UEFI only, so it gets that one).
DATASOURCE = {"bios": Datasource.NOCLOUD, "uefi": Datasource.CONFIG_DRIVE}
# Users the seed's user-data adds beside the default one: one with a key of its own, and
# one with a password (unlocked) and no key, which must still not get in over SSH.
KEY_USER = "probe"
PASSWORD_USER = "pwprobe"
PASSWORD = "not-a-login-over-ssh"
# SHA-512 crypt of PASSWORD: python3 -c 'import crypt; print(crypt.crypt(PASSWORD, crypt.METHOD_SHA512))'
PASSWORD_HASH = ("$6$xxmjaKqmEp15WMH9$C/euphXWxNzZZQQ9S0YNch8CxQa4gSiQLxW3RFRNeLzv.ijkc5srYcNTpLP1cg/"
                 "cybN6edEbAqwn9HDAJ/vOk0")


def pytest_addoption(parser):
    group = parser.getgroup("image pipeline")
    group.addoption("--image", default=None, help="image to test (default: the spec file's default)")
    group.addoption("--spec-file", default=str(SPEC_FILE))
    group.addoption("--output-dir", default=str(DEFAULT_OUTPUT))
    group.addoption("--firmware", default="both", choices=["bios", "uefi", "both"])
    group.addoption("--use-built", action="store_true",
                    help="test the artifact already in --output-dir instead of building it")
    group.addoption("--no-reboot", action="store_true",
                    help="skip the reboot test (./inv test reboots two of its four boot sessions)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        item.add_marker(pytest.mark.image)


@pytest.fixture(scope="session")
def spec(pytestconfig) -> specs.ImageSpec:
    return _configured_spec(pytestconfig)


@pytest.fixture(scope="session")
def output_dir(pytestconfig) -> Path:
    return Path(pytestconfig.getoption("output_dir")).resolve()


@pytest.fixture(scope="session")
def artifacts(pytestconfig, spec, output_dir) -> Artifacts:
    """The built image: built here once, unless --use-built."""
    if pytestconfig.getoption("use_built"):
        art = artifacts_for(spec, output_dir)
        art.read_info()  # a clear error if it was never built
        return art
    return build.build(spec, output_dir, DEFAULT_CACHE).artifacts


@pytest.fixture(scope="session")
def installer(pytestconfig, output_dir) -> Artifacts:
    """The installer (the netboot image the PXE tree boots): built here unless up to date, by the
    first session that network-boots a node; later sessions find it built."""
    loaded = specs.load(Path(pytestconfig.getoption("spec_file")))
    return build.build(loaded.get(DEFAULT_INSTALLER), output_dir, DEFAULT_CACHE).artifacts


@pytest.fixture(scope="session")
def check_report(spec, output_dir, artifacts):
    from pipeline.check import check_image

    return check_image(spec, output_dir)


def _firmwares(config) -> list[str]:
    choice = config.getoption("firmware")
    return ["bios", "uefi"] if choice == "both" else [choice]


def _configured_spec(config) -> specs.ImageSpec:
    return specs.load(Path(config.getoption("spec_file"))).get(config.getoption("image"))


def profile_sysctls(spec: specs.ImageSpec) -> list[tuple[str, str]]:
    conf = configparser.ConfigParser(interpolation=None)
    conf.read(spec.profile_dir / spec.tuned_profile / "tuned.conf")
    return sorted(conf["sysctl"].items()) if conf.has_section("sysctl") else []


def pytest_generate_tests(metafunc):
    if "firmware" in metafunc.fixturenames:
        metafunc.parametrize("firmware", _firmwares(metafunc.config), scope="session")
    if "sysctl" in metafunc.fixturenames:
        settings = profile_sysctls(_configured_spec(metafunc.config))
        assert settings, "the profile sets no sysctl: nothing to prove live"
        metafunc.parametrize("sysctl", settings, ids=[key for key, _ in settings])


def key_user_identity(workdir: Path) -> Path:
    return workdir / f"{testvm.PRIVATE_KEY_PREFIX}{KEY_USER}"  # the VM's stop() removes it with its own


@pytest.fixture(scope="session")
def vm(spec, artifacts, firmware):
    """One boot per firmware per session, shared by every test that needs a live guest."""
    workdir = artifacts.boot_workdir(firmware)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    key_user_key = testvm.new_ssh_key(key_user_identity(workdir), KEY_USER)
    users = [{"name": KEY_USER, "shell": "/bin/bash", "ssh_authorized_keys": [key_user_key]},
             {"name": PASSWORD_USER, "shell": "/bin/bash", "lock_passwd": False, "passwd": PASSWORD_HASH}]
    machine = testvm.boot_spec(spec, artifacts.qcow2, Firmware(firmware), workdir,
                             datasource=DATASOURCE[firmware], users=users)
    print(f"\n{firmware}: SSH ready after {machine.boot_seconds} s; console log {machine.console}")
    yield machine
    machine.stop()
    (workdir / "overlay.qcow2").unlink(missing_ok=True)  # the guest's writes; the log is what helps
    print(f"\n{firmware}: console log kept at {machine.console}")


@pytest.fixture(scope="session")
def ssh_masters():
    """Where the testinfra hosts' SSH connection masters live: each command then opens a channel
    on one login instead of logging in anew (0.4 s instead of 1.7 s a command under TCG). A unix
    socket's path is short, so a directory in /tmp, not under the output dir. The logins the tests
    are about (attempt_logins, ./inv ssh) do not use it: each is a connection of its own."""
    masters = Path(tempfile.mkdtemp(prefix="kvmpipe-ssh-"))
    yield masters
    close_masters(masters)
    shutil.rmtree(masters, ignore_errors=True)


def close_masters(masters: Path) -> None:
    """Stop every connection master in MASTERS: the next command of each host logs in anew (after
    a reboot, a master's connection is to a boot that is gone)."""
    for socket in masters.iterdir():   # a master whose guest is gone has exited already
        run(["ssh", "-o", f"ControlPath={socket}", "-O", "exit", "master"], check=False, capture=True, timeout=30)


def shared_connection_host(ssh_config: Path, alias: str, masters: Path, **kwargs):
    """A testinfra host for ALIAS in SSH_CONFIG whose commands share one connection. testinfra
    asks ssh for ControlMaster=auto and ControlPersist; the ControlPath is ours."""
    shared = ssh_config.with_name(f"{ssh_config.name}-shared")
    shared.write_text(f"{ssh_config.read_text()}  ControlPath {masters}/%C\n")
    return testinfra.get_host(f"ssh://{alias}", ssh_config=str(shared), **kwargs)


@pytest.fixture(scope="session")
def host(vm, ssh_masters):
    """The guest as a cloud user sees it: the default user, logged in with the seed's key."""
    return shared_connection_host(vm.ssh_config, "guest", ssh_masters)


@pytest.fixture(scope="session")
def root(vm, ssh_masters):
    """The same login, with sudo for what needs root."""
    return shared_connection_host(vm.ssh_config, "guest", ssh_masters, sudo=True)


@pytest.fixture(scope="session")
def settled(host):
    """Wait (with a deadline) until boot has finished: systemd and cloud-init both done."""
    started = time.monotonic()
    while time.monotonic() - started < SETTLE_DEADLINE:
        state = host.run("systemctl is-system-running").stdout.strip()
        if state not in ("initializing", "starting"):
            break
        time.sleep(3)
    host.run("cloud-init status --wait")
    return state


def attempt_logins(vm) -> dict[str, subprocess.CompletedProcess]:
    """Every way a cloud user (or an attacker) would try to log in, each a fresh SSH session
    (so sshd reads authorized_keys anew): the default user and the user-data user by key,
    root by the seed's key, and the password user by password only. All at once, as users
    come: each is about 6 s of key exchange, PAM and session set-up under TCG."""
    tools.require("sshpass")
    key_user_key = key_user_identity(vm.workdir)
    password_only = ("-o", "PubkeyAuthentication=no", "-o", "PreferredAuthentications=keyboard-interactive,password")
    attempts: dict[str, tuple[list, dict | None]] = {
        testvm.CLOUD_USER: (vm.ssh_argv(), None),
        KEY_USER: (vm.ssh_argv(KEY_USER, key_user_key), None),
        "root": (vm.ssh_argv("root"), None),
        # sshpass answers any password prompt: if sshd offered one, this login would succeed.
        PASSWORD_USER: (["sshpass", "-e", *vm.ssh_argv(PASSWORD_USER, key_user_key, *password_only)],
                        {"SSHPASS": PASSWORD}),
    }
    results: dict[str, subprocess.CompletedProcess] = {}

    def attempt(user: str) -> None:
        argv, env = attempts[user]
        results[user] = run([*argv, "id -un"], capture=True, check=False, timeout=60, env=env)

    concurrently(*(functools.partial(attempt, user) for user in attempts))
    return results


@pytest.fixture(scope="session")
def logins(vm, settled) -> dict[str, subprocess.CompletedProcess]:
    """The login attempts of attempt_logins, once boot has settled."""
    return attempt_logins(vm)


@pytest.fixture(scope="session")
def expected_denial() -> tuple[str, str]:
    return EXPECTED_DENIAL


# Where the image keeps its compiled policy (policy.NN), as load_policy reads it.
POLICY_DIR = "/etc/selinux/default/policy"


@pytest.fixture(scope="session")
def policy_without_dontaudit(artifacts, tmp_path_factory) -> Path:
    """The image's policy with its dontaudit rules left out, as `semodule -DB` builds it in the
    guest: the same store, built by the image's own semodule in a chroot of its liveimg tree,
    natively here (seconds) instead of under TCG in the guest (60-90 s a boot). Docs, kernel
    modules and firmware are not unpacked: semodule reads none of them."""
    tree = tmp_path_factory.mktemp("policy-tree")
    try:
        run(["tar", "-xzf", artifacts.liveimg, "-C", tree, "--exclude=./usr/share", "--exclude=./usr/lib/modules",
             "--exclude=./usr/lib/firmware", "--exclude=./boot"], timeout=600)
        run(["chroot", tree, "semodule", "--disable_dontaudit", "--build", "--noreload"], timeout=600)
        built = sorted((tree / POLICY_DIR.lstrip("/")).glob("policy.*"))
        assert len(built) == 1, f"expected one policy binary, found {built}"
        policy = tmp_path_factory.mktemp("policy-without-dontaudit") / built[0].name
        shutil.copyfile(built[0], policy)
    finally:
        shutil.rmtree(tree)  # a few hundred MiB a session, failed or not
    return policy
