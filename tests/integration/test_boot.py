"""The booted image proves its properties live, over SSH (testinfra) and the guest agent.

Runs once per firmware (BIOS, UEFI) on one shared boot each. The AVC test is in
test_zz_final.py, so it covers everything the tests of every module did in the guest.
"""

from __future__ import annotations

import json

import pytest

from pipeline import selinux, testvm


def test_cloud_init_finished_without_errors(host, settled):
    status = host.run("cloud-init status --long")
    assert "status: done" in status.stdout, status.stdout
    result = json.loads(host.file("/run/cloud-init/result.json").content_string)
    assert result["v1"]["errors"] == []


def test_selinux_enforcing(host):
    assert host.check_output("/usr/sbin/getenforce") == "Enforcing"  # not on a user's PATH
    assert host.check_output("cat /proc/cmdline").count("security=selinux") == 1


def test_our_policy_modules_are_loaded(root, spec):
    wanted = {source.stem for source in selinux.module_sources(spec.elements, spec.release, spec.element_dirs)}
    loaded = set(root.check_output("semodule -l").split())
    assert wanted and wanted <= loaded, sorted(wanted - loaded)


def test_spec_kernel_args_are_live(host, spec):
    running = host.file("/proc/cmdline").content_string.split()
    assert [arg for arg in spec.kernel_args if arg not in running] == [], running


def test_no_failed_units(host, settled):
    failed = host.check_output("systemctl list-units --failed --no-legend --plain")
    assert failed == "", failed
    assert settled == "running"


def test_tuned_profile_active(host, spec, settled):
    # tuned-adm answers any user over D-Bus; /usr/sbin is not on a user's PATH.
    assert host.check_output("/usr/sbin/tuned-adm active") == f"Current active profile: {spec.tuned_profile}"


def test_tuned_verify_passes(host, settled):
    result = host.run("/usr/sbin/tuned-adm verify")
    # tuned 2.20 prints "Verfication succeeded" (sic), so match the part it spells right.
    assert result.rc == 0 and "succeeded" in result.stdout, result.stdout + result.stderr


def test_profile_sysctl_is_live(host, settled, sysctl):
    """Parametrized (conftest) with each [sysctl] setting of the spec's own profile."""
    key, value = sysctl
    expected = int(value) if value.lstrip("-").isdigit() else value
    assert host.sysctl(key) == expected


def test_root_filesystem_grew_to_disk(host, root, spec, settled):
    """The VM's disk is larger than the image: the root partition and filesystem must fill it."""
    disk = int(host.check_output("lsblk --bytes --nodeps --noheadings --output SIZE /dev/vda"))
    assert disk == spec.disk_size + testvm.GROWTH
    device = host.check_output("findmnt --noheadings --output SOURCE /")
    partition = int(host.check_output(f"lsblk --bytes --nodeps --noheadings --output SIZE {device}"))
    # Only the BIOS boot partition and the ESP (130 MiB) and the backup GPT precede or follow it.
    assert partition >= disk - 131 * 2**20, f"{device} is {partition} bytes on a {disk}-byte disk"
    superblock = dict(line.split(":", 1) for line in root.check_output(f"dumpe2fs -h {device}").splitlines()
                      if ":" in line)
    block = int(superblock["Block size"])
    assert partition - block < int(superblock["Block count"]) * block <= partition


def test_guest_agent_answers(vm, spec, settled):
    if "kvm-guest" not in spec.elements:
        pytest.skip("the QEMU guest agent comes with the kvm-guest element")
    assert vm.guest_agent("guest-ping") == {"return": {}}
    info = vm.guest_agent("guest-info")["return"]
    assert info["version"]


def test_sshd_refuses_passwords(root):
    effective = root.check_output("sshd -T").splitlines()
    assert "passwordauthentication no" in effective
    assert "kbdinteractiveauthentication no" in effective


def test_identity_made_on_first_boot(host):
    assert len(host.file("/etc/machine-id").content_string.strip()) == 32
    assert host.file("/etc/ssh/ssh_host_ed25519_key").exists


# Units that rebuild a cache when /usr is newer than /etc/.updated or /var/.updated. Bookworm's
# systemd starts only sysusers of these at boot; trixie's all three.
REBUILT_WHEN_USR_CHANGED = ("ldconfig.service", "systemd-sysusers.service", "systemd-journal-catalog-update.service")


def test_first_boot_redoes_no_build_step(host):
    """kvm-base leaves systemd-update-done's stamps, so none of those units ran: each that was
    started found its condition false."""
    started = []
    for unit in REBUILT_WHEN_USR_CHANGED:
        shown = dict(line.split("=", 1) for line in host.check_output(
            f"systemctl show --property=ConditionTimestampMonotonic,ConditionResult,ExecMainStartTimestampMonotonic "
            f"{unit}").splitlines())
        assert shown["ExecMainStartTimestampMonotonic"] == "0", f"{unit} ran on the first boot: {shown}"
        if int(shown["ConditionTimestampMonotonic"]) > 0:
            started.append(unit)
            assert shown["ConditionResult"] == "no", f"{unit}: {shown}"
    assert started, f"none of {REBUILT_WHEN_USR_CHANGED} was started at boot, so this proves nothing"
