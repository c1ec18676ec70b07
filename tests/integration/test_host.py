"""A KVM host image proves, live, what a compute node needs: libvirt with sVirt,
Open vSwitch bridges, and a network agent confined by our policy module.

Shares the session's boot with test_boot.py (which proves SELinux, tuned and
units for every image); test_zz_final.py then checks for AVC denials after all
of this has run. Skipped for images without the kvm-host element.
"""

from __future__ import annotations

import re

import pytest

from pipeline.check import selinux_type

AGENT = "/usr/libexec/kvmpipe/netns-port"
AGENT_DOMAIN = "kvmpipe_netagent_t"
SVIRT_DOMAINS = ("kvmpipe-svirt-a", "kvmpipe-svirt-b")
IMAGES = "/var/lib/libvirt/images"
DOMAIN_START_DEADLINE = 300   # QEMU under TCG inside a TCG guest: slow to start
NAMESPACES = {"kvmpipe-ns-a": ("kvmpipe-a", "10.99.0.1/24"), "kvmpipe-ns-b": ("kvmpipe-b", "10.99.0.2/24")}
# user:role:type:level, the level's low part "s0" or "s0:c1,c2" (sVirt gives each guest two).
CONTEXT = re.compile(r"^(?P<user>\w+):(?P<role>\w+):(?P<type>\w+):s\d+(?::(?P<cats>c\d+(?:,c\d+)*))?(?:-\S+)?$")


@pytest.fixture(scope="module", autouse=True)
def _only_hosts(spec):
    """Module-scoped, so it runs before the module-scoped fixtures that set up guests."""
    if not spec.is_kvm_host:
        pytest.skip(f"{spec.name} has no kvm-host element")


def domain_xml(name: str, disk: str) -> str:
    # No network and no display: the domain only has to run, under TCG (type='qemu').
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def categories(context: str) -> frozenset[str]:
    match = CONTEXT.match(context.strip())
    assert match, f"not an SELinux context: {context!r}"
    return frozenset((match["cats"] or "").split(",")) - {""}


# --- libvirt and sVirt


def test_libvirtd_answers_with_selinux_secmodel(root, settled):
    capabilities = root.check_output("virsh -c qemu:///system capabilities")
    assert re.search(r"<secmodel>\s*<model>selinux</model>", capabilities), capabilities[-2000:]


@pytest.fixture(scope="module")
def svirt_guests(root, settled):
    """Two throw-away libvirt domains, each with its own qcow2 disk: {name: (process label, disk)}."""
    started = {}
    try:
        for name in SVIRT_DOMAINS:
            disk = f"{IMAGES}/{name}.qcow2"
            root.check_output(f"qemu-img create -q -f qcow2 {disk} 64M")
            root.check_output(f"cat > /tmp/{name}.xml <<'XML'\n{domain_xml(name, disk)}XML")
            result = root.run(f"timeout {DOMAIN_START_DEADLINE} virsh -c qemu:///system create /tmp/{name}.xml")
            assert result.rc == 0, result.stdout + result.stderr
            started[name] = disk
        labels = {}
        for name, disk in started.items():
            pid = root.check_output(f"cat /run/libvirt/qemu/{name}.pid")
            labels[name] = (root.file(f"/proc/{pid}/attr/current").content_string.strip("\0\n"), disk)
        yield labels
    finally:
        for name, disk in started.items():
            root.run(f"virsh -c qemu:///system destroy {name}")
            root.run(f"rm -f {disk} /tmp/{name}.xml")


def test_svirt_guests_run_as_svirt_t_with_distinct_categories(svirt_guests):
    process_labels = [label for label, _ in svirt_guests.values()]
    assert all(selinux_type(label) == "svirt_t" for label in process_labels), process_labels
    first, second = (categories(label) for label in process_labels)
    assert first and second and first != second, process_labels


def test_svirt_disks_carry_svirt_image_t_with_their_guests_categories(root, svirt_guests):
    for name, (label, disk) in svirt_guests.items():
        disk_label = root.check_output(f"stat -c %C {disk}")
        assert selinux_type(disk_label) == "svirt_image_t", (name, disk_label)
        assert categories(disk_label) == categories(label), (name, disk_label, label)


# --- Open vSwitch and the confined network agent


def test_spec_bridges_exist_with_their_uplinks(root, spec, settled):
    assert sorted(root.check_output("ovs-vsctl list-br").split()) == sorted(b.name for b in spec.bridges)
    for bridge in spec.bridges:
        ports = root.check_output(f"ovs-vsctl list-ports {bridge.name}").split()
        assert ports == ([bridge.uplink] if bridge.uplink else []), (bridge.name, ports)


def test_logins_do_not_wait_for_open_vswitch(root, settled):
    """networking.service, which Open vSwitch's units order themselves before and cloud-init's
    network stage (so every login) after, did not run; the bridges' own unit did."""
    assert root.run("systemctl is-active networking.service").stdout.strip() == "inactive"
    assert root.run("systemctl is-active kvmpipe-ovs-bridges.service").stdout.strip() == "active"


@pytest.fixture(scope="module")
def plugged(root, settled):
    """Two namespaces on br-int as OVS internal ports, plugged by the confined agent."""
    plugged = []
    try:
        for namespace, (port, address) in NAMESPACES.items():
            result = root.run(f"{AGENT} plug {namespace} br-int {port} {address}")
            assert result.rc == 0, result.stdout + result.stderr
            plugged.append((namespace, port))
        yield plugged
    finally:
        for namespace, port in plugged:
            root.run(f"{AGENT} unplug {namespace} br-int {port}")


def br_int_packets(root, port: str) -> int:
    """Packets OVS counted on a br-int port, both directions, straight from the datapath."""
    stats = root.check_output(f"ovs-ofctl dump-ports br-int {port}")
    return sum(int(n) for n in re.findall(r"[rt]x pkts=(\d+)", stats))


def test_ping_crosses_br_int_between_namespaces(root, plugged):
    (_, port_a), (namespace_b, port_b) = plugged
    ports = root.check_output("ovs-vsctl list-ports br-int").split()
    assert {port_a, port_b} <= set(ports)
    before = br_int_packets(root, port_b)
    address_a = NAMESPACES["kvmpipe-ns-a"][1].split("/")[0]
    ping = root.run(f"{AGENT} exec {namespace_b} ping -c 3 -W 5 {address_a}")
    assert ping.rc == 0 and " 0% packet loss" in ping.stdout, ping.stdout + ping.stderr
    # Both namespaces' only link is their br-int port: the echo and reply crossed OVS.
    assert br_int_packets(root, port_b) - before >= 6


def test_agent_runs_in_its_confined_domain(root, plugged):
    namespace = plugged[0][0]
    label = root.check_output(f"{AGENT} exec {namespace} cat /proc/self/attr/current").strip("\0")
    assert selinux_type(label) == AGENT_DOMAIN, label


def test_agent_is_denied_what_it_was_not_granted(root, plugged, expected_denial):
    """Root may read /etc/shadow (DAC allows it); the agent's domain may not: that is SELinux."""
    assert root.run("head -c 1 /etc/shadow").rc == 0
    result = root.run(f"{AGENT} exec {plugged[0][0]} cat /etc/shadow")
    assert result.rc != 0 and "Permission denied" in result.stderr, result.stdout + result.stderr
    audit = root.run("ausearch --input-logs --message AVC --start boot --raw")
    denials = [line for line in audit.stdout.splitlines()
               if "denied" in line and f":{expected_denial[0]}:" in line and f":{expected_denial[1]}:" in line]
    assert denials, audit.stdout + audit.stderr


# --- what an installed node needs: root on LVM, VM images on an LVM-cached volume


def test_initramfs_activates_lvm_and_cache_tools_are_there(root):
    """The kickstarts put root on LVM and /var/lib/libvirt/images on a cached LV. The running
    kernel's initramfs must activate LVM (lvm2's udev rule activates each VG as its PVs
    appear) and check a cache's metadata (cache_check, with dm-cache)."""
    initramfs = set(root.check_output("lsinitramfs /boot/initrd.img-$(uname -r)").split())
    wanted = {"usr/sbin/lvm", "usr/lib/udev/rules.d/69-lvm.rules", "usr/sbin/cache_check"}
    assert wanted <= initramfs, sorted(wanted - initramfs)
    # bookworm's kernel ships dm-cache.ko, trixie's dm-cache.ko.xz.
    assert any(re.search(r"/dm-cache\.ko(\.xz|\.zst)?$", path) for path in initramfs)
    assert root.run("cache_check -V").rc == 0
