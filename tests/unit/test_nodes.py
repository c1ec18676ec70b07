"""The deploy site's nodes (pipeline.deploy.nodes) without QEMU: their inventory and how a
node's report is found in the access log."""

from pipeline.deploy import inventory, nodes, pxe, serve
from pipeline.paths import SPEC_FILE


def test_the_deploy_inventory_is_one_an_operator_could_write(tmp_path):
    path = nodes.write_inventory(tmp_path, "host-image", SPEC_FILE, "http://10.0.2.2:8080", "ssh-ed25519 AAAA t",
                                 nodes.NODES)
    loaded = inventory.load(path)
    uefi = loaded.nodes[nodes.UEFI_NODE.name]
    assert (uefi.boot_mac, str(uefi.network.interface)) == (nodes.UEFI_NODE.mac, "10.0.2.21/24")
    assert uefi.cache.ssd == "nvme0n1" and uefi.cache.mode == "writeback" and uefi.kernel_args == ("panic=60",)
    assert loaded.nodes[nodes.BIOS_NODE.name].disks == ("vda",)
    assert [p.name for p in loaded.site.snippet_files] == ["50-root-key.ks", "60-post-marker.ks"]


def test_a_report_counts_only_after_this_power_on(tmp_path):
    root = tmp_path / "tree"
    root.mkdir()
    site = nodes.Site(pxe.Tree(root, ()), "http://10.0.2.2:8080", tmp_path, tmp_path / "key")
    node = nodes.Node(nodes.BIOS_NODE, site)
    log = root / serve.ACCESS_LOG
    log.write_text(f"2026-12-01T08:00:00+00:00 127.0.0.1 GET /status/{nodes.BIOS_NODE.name}/ok 404\n")
    assert node.status() == ("ok", "")
    node.log_offset = log.stat().st_size  # as start() records it: an earlier deploy's report is not this one's
    assert node.status() is None
    with open(log, "a") as appended:
        appended.write(f"2026-12-01T08:05:00+00:00 127.0.0.1 GET /status/{nodes.BIOS_NODE.name}/fail?reason=a%20b"
                       " 404\n")
    assert node.status() == ("fail", "a%20b")
