"""Deploy for real: QEMU nodes with blank disks boot from the network, run our installer on their
generated kickstarts, reboot from their own disks and are tested over SSH as the operator's
inventory says (pipeline/deploy/nodes.py). The tree is served by nginx, whose access log is the
proof of each node's fetches and of the installer's report.

- deploy-uefi: a root disk, a data disk and an NVMe disk as the data disk's LVM cache (writeback);
  it also runs the host image's own live tests (libvirt's SELinux secmodel, sVirt, the bridges,
  a ping across br-int).
- deploy-bios: one disk.
- both: a SATA disk with a cloud-init seed in from power-on, which the installed host ignores.
- deploy-badsum and deploy-unsupported: a kickstart with a wrong liveimg checksum and one with a
  command the installer does not implement; both must fail before any disk is written.
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import time
from urllib.parse import unquote

import pytest

# The host image's live tests, run again here on the installed UEFI node (through `root` below),
# in test_host.py's order (pytest runs them in the order they are imported): the bridges are
# looked at before `plugged` adds namespaces' ports to br-int. So not sorted: isort off.
# isort: off
from test_host import _only_hosts, plugged, svirt_guests  # noqa: F401
from test_host import test_libvirtd_answers_with_selinux_secmodel  # noqa: F401
from test_host import test_svirt_guests_run_as_svirt_t_with_distinct_categories  # noqa: F401
from test_host import test_svirt_disks_carry_svirt_image_t_with_their_guests_categories  # noqa: F401
from test_host import test_spec_bridges_exist_with_their_uplinks  # noqa: F401
from test_host import test_ping_crosses_br_int_between_namespaces  # noqa: F401
# isort: on

from conftest import kernel_logged_denials, shared_connection_host

from pipeline.deploy import nodes
from pipeline.deploy.pxenode import parse_access_log
from pipeline.seed import Datasource

INSTALLED = (nodes.UEFI_NODE, nodes.BIOS_NODE)
UNSUPPORTED_COMMAND = "firewall --enabled"
WRONG_SHA256 = "0" * 64
SETTLE = "timeout 600 systemctl is-system-running --wait"


@pytest.fixture(scope="module")
def site(pytestconfig, spec, artifacts, installer, output_dir):
    with nodes.serving_site(spec.name, pytestconfig.getoption("spec_file"), output_dir,
                            artifacts.directory / "deploy") as served:
        kickstarts = served.tree.root / "kickstarts"
        # The faults: a kickstart whose liveimg checksum is not the image's, and one that asks for
        # a command the installer does not implement (valid for pykickstart and Anaconda).
        badsum = kickstarts / f"{nodes.BAD_CHECKSUM_NODE.name}.ks"
        badsum.write_text(re.sub(r"--checksum=[0-9a-f]{64}", f"--checksum={WRONG_SHA256}", badsum.read_text()))
        unsupported = kickstarts / f"{nodes.UNSUPPORTED_NODE.name}.ks"
        unsupported.write_text(unsupported.read_text().replace("\ntext\n", f"\ntext\n{UNSUPPORTED_COMMAND}\n", 1))
        yield served


@pytest.fixture(scope="module")
def deployed(site):
    """Each installed node, powered on and installed once, kept up for every test that needs it.
    One after the other: two nodes installing side by side under TCG took longer than both in turn
    (each step 2-3 times as long, 650 s against about 500)."""
    running: dict[str, nodes.Node] = {}
    with contextlib.ExitStack() as powered:
        def get(node_spec: nodes.NodeSpec) -> nodes.Node:
            if node_spec.name not in running:
                node = running[node_spec.name] = powered.enter_context(nodes.Node(node_spec, site))
                node.install()
                node.ssh(SETTLE.split(), check=False)
            return running[node_spec.name]

        yield get


@pytest.fixture(params=INSTALLED, ids=[n.name for n in INSTALLED])
def node(request, deployed) -> nodes.Node:
    return deployed(request.param)


@pytest.fixture(scope="module")
def remote(ssh_masters):
    """remote(node): a testinfra host on NODE as root, its commands sharing one connection."""
    def connect(node: nodes.Node):
        return shared_connection_host(node.ssh_config, "node", ssh_masters)
    return connect


# The host image's live tests above ask for `root` and `settled`: the installed UEFI node.
@pytest.fixture(scope="module")
def root(deployed, remote):
    return remote(deployed(nodes.UEFI_NODE))


@pytest.fixture(scope="module")
def settled(root):
    return root.run(SETTLE).stdout.strip()


# --- every installed node


def test_the_node_fetched_its_own_files_then_reported_ok(site, node, spec):
    """In nginx's access log, in this order: the installer's kernel and initrd, the node's own
    kickstart, the role's liveimg, each with 200, then the node's report."""
    requests = [(r.method, r.path, r.status) for r in parse_access_log(site.access_log.read_text())]
    own = [("GET", "/installer/installer.vmlinuz", 200), ("GET", "/installer/installer.initrd", 200),
           ("GET", f"/kickstarts/{node.spec.name}.ks", 200), ("GET", f"/{spec.name}/{spec.name}.tar.gz", 200)]
    assert all(request in requests for request in own), requests
    report = [r for r in requests if r[1].startswith(f"/status/{node.spec.name}/")]
    assert [r[1] for r in report] == [f"/status/{node.spec.name}/ok"], report
    # Every node shares the installer and the liveimg (and QEMU's NAT, one client address): the
    # node's own kickstart, then a liveimg fetch, then its report.
    kickstart = requests.index(own[2])
    liveimg = requests.index(own[3], kickstart)
    assert liveimg < requests.index(report[0]), requests


def test_hostname_and_address_are_the_inventorys(node, remote):
    host = remote(node)
    assert host.check_output("hostname") == node.spec.name
    # The login itself came through the forward to this address; the NIC is the inventory's MAC.
    link = json.loads(host.check_output("ip -json -4 address show"))
    by_mac = {entry["address"]: entry for entry in json.loads(host.check_output("ip -json link show"))}
    nic = by_mac[node.spec.mac]["ifname"]
    addresses = [f"{a['local']}/{a['prefixlen']}"
                 for entry in link if entry["ifname"] == nic for a in entry["addr_info"]]
    assert addresses == [f"{node.spec.address}/24"]


def test_kernel_command_line_has_the_roles_and_the_nodes_arguments(node, spec, remote):
    words = remote(node).file("/proc/cmdline").content_string.split()
    for arg in (*spec.kernel_args, *node.spec.kernel_args):
        assert arg in words, words


def test_enforcing_with_no_failed_units_and_no_relabel(node, remote):
    host = remote(node)
    assert host.check_output("getenforce") == "Enforcing"
    failed = host.check_output("systemctl list-units --failed --plain --no-legend")
    # What the failed units logged: CI keeps the output, not the node.
    units = " ".join(f"-u {shlex.quote(line.split()[0])}" for line in failed.splitlines() if line.split())
    assert failed == "", failed + "\n" + host.run(f"journalctl --boot --no-pager --quiet -n 60 {units}").stdout
    assert not host.file("/.autorelabel").exists


def test_no_selinux_denials_since_boot(node, remote):
    """In the audit log, and in the kernel's log for what was denied before auditd started."""
    audit = remote(node).run("ausearch --input-logs --start boot --raw --message AVC,USER_AVC,SELINUX_ERR")
    assert audit.rc == 1 and audit.stdout == "", audit.stdout[-4000:] + audit.stderr  # 1: none found
    denied = kernel_logged_denials(remote(node), "0")
    assert denied == [], "\n".join(denied)[-4000:]


def test_kickstart_system_settings_and_post_took_effect(node, remote):
    """rootpw --lock, timezone, and the inventory's own %post, whose new file is labeled as the
    policy says with no relabel at boot (the installer labels after %post)."""
    host = remote(node)
    assert host.check_output("passwd --status root").split()[1] == "L"
    assert host.check_output("readlink /etc/localtime") == "/usr/share/zoneinfo/Etc/UTC"
    assert host.file(nodes.POST_MARKER).content_string == "installed\n"
    assert host.check_output(f"stat -c %C {nodes.POST_MARKER}").split(":")[2] == "etc_t"
    assert host.check_output(f"restorecon -n -v {nodes.POST_MARKER}") == ""


def test_what_the_installer_wrote_carries_the_policys_labels(node, remote):
    """The installer labels only what changed after the unpack: everywhere it and the kickstart
    write, on every file system (/boot is one of its own), nothing differs from the policy. Not
    the FAT ESP, whose mount gives the label, nor the images in /var/lib/libvirt/images, which
    libvirt labels for their guests (test_host.py's)."""
    host = remote(node)
    trees = [path for path in ("/etc", "/root", "/boot") if host.file(path).exists]
    single = [path for path in ("/", "/lost+found", "/boot/lost+found", "/var/lib/libvirt/images",
                                "/var/lib/libvirt/images/lost+found") if host.file(path).exists]
    check = host.run(f"restorecon -n -v {' '.join(single)} && restorecon -R -n -v -e /boot/efi {' '.join(trees)}")
    assert check.rc == 0 and check.stdout == "", check.stdout[-4000:] + check.stderr


def test_a_cloud_init_seed_disk_gives_the_installed_host_nothing(node, remote):
    """Each installed node has had a seed disk in since power-on, one cloud-init takes on a cloud
    image (config-2 on one node, CIDATA on the other; the host image booted with such a disk let the
    new user in) with a new user and a key for the default user. The host sees the disk, and neither
    the user nor the key is anywhere; cloud-init is off."""
    host = remote(node)
    labels = host.check_output("blkid --output value --match-tag LABEL").lower().split()
    assert {Datasource.CONFIG_DRIVE: "config-2", Datasource.NOCLOUD: "cidata"}[node.spec.seed_disk] \
        in labels, labels
    assert host.run(f"getent passwd {nodes.SEED_DISK_USER}").rc == 2  # no such user
    key = nodes.SEED_DISK_KEY.split()[1]
    found = host.run(f"grep -rlF {key} /root /home /etc/ssh")
    assert found.rc == 1, found.stdout  # 1: in no file
    assert not host.file("/var/lib/cloud/instance").exists
    assert "status: disabled" in host.run("cloud-init status").stdout


def test_root_is_on_the_volume_group(node, remote):
    host = remote(node)
    assert host.check_output("findmnt --noheadings --output SOURCE /") == "/dev/mapper/vg_root-root"
    assert host.check_output("lvs --noheadings -o vg_name,lv_name vg_root").split() == ["vg_root", "root"]


def test_tuned_runs_the_roles_profile_and_verifies(node, spec, remote):
    host = remote(node)
    assert host.check_output("tuned-adm active") == f"Current active profile: {spec.tuned_profile}"
    verify = host.run("tuned-adm verify")
    assert verify.rc == 0, verify.stdout + verify.stderr


# --- the UEFI node's cached volume


@pytest.fixture(scope="module")
def uefi(deployed, remote):
    return remote(deployed(nodes.UEFI_NODE))


def test_images_volume_is_cached_with_the_inventorys_mode_and_size(uefi):
    cache = nodes.UEFI_NODE.cache
    report = json.loads(uefi.check_output(
        "lvs --reportformat json --units m --nosuffix -a -o lv_name,segtype,cache_mode,lv_size,devices vg_data"))
    volumes = {lv["lv_name"]: lv for lv in report["report"][0]["lv"]}
    assert volumes["images"]["segtype"] == "cache" and volumes["images"]["cache_mode"] == cache["mode"], volumes
    pool_data = next(lv for name, lv in volumes.items() if name.endswith("_cdata]"))
    assert float(pool_data["lv_size"]) == cache["size_mib"], volumes
    assert pool_data["devices"].startswith(f"/dev/{cache['ssd']}p"), volumes
    assert uefi.check_output("findmnt --noheadings --output SOURCE /var/lib/libvirt/images") == \
        "/dev/mapper/vg_data-images"


def test_data_written_through_the_cache_reads_back(uefi):
    write = ("head -c 64M /dev/urandom > /var/lib/libvirt/images/probe && sync"
             " && sha256sum /var/lib/libvirt/images/probe")
    written = uefi.check_output(write).split()[0]
    uefi.run_expect([0], "echo 3 > /proc/sys/vm/drop_caches")
    assert uefi.check_output("sha256sum /var/lib/libvirt/images/probe").split()[0] == written
    # The file system sits on the cache target itself: what was read went through dm-cache.
    assert uefi.check_output("dmsetup table vg_data-images").split()[2] == "cache"
    uefi.run("rm -f /var/lib/libvirt/images/probe")


# --- faults: nothing is written


@pytest.mark.parametrize("node_spec, says", [
    (nodes.BAD_CHECKSUM_NODE, rf"sha256 mismatch: expected {WRONG_SHA256}, got [0-9a-f]{{64}}; no disk was touched"),
    (nodes.UNSUPPORTED_NODE, rf"line \d+: command '{UNSUPPORTED_COMMAND.split()[0]}' is not implemented"),
], ids=["wrong liveimg checksum", "unimplemented command"])
def test_a_bad_kickstart_fails_before_any_disk_is_written(site, node_spec, says):
    """The console says why in full; the server's log has the report (its reason cut at 200 characters)."""
    with nodes.Node(node_spec, site) as node:
        outcome, reason = node.wait_for_install()
        time.sleep(2)  # the report follows the console line at once; let the console file catch up
        console = node.console_text()
    assert outcome == "fail"
    assert unquote(reason) and unquote(reason) in console, (reason, console[-2000:])
    failed = [line for line in console.splitlines() if f"installer: FAILED: {node_spec.name}:" in line]
    assert failed and re.search(says, failed[0]), console[-2000:]
    assert all(node.disk_is_blank(disk) for disk in node_spec.disks)
