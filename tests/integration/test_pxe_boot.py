"""The PXE boot test (issue 4, item 7): a diskless QEMU VM with a node's MAC boots from the network.

QEMU's user network does DHCP and hands out the URL of our tree's boot.ipxe; the NIC's iPXE ROM
fetches boot.ipxe, the node's ipxe/01-MAC.ipxe, its kernel and its initrd from our HTTP server
(pipeline.pxe.serving), and the kernel starts with the node's own kickstart URL on its command
line. The inventory has two nodes, one per firmware, each booted by its own (SeaBIOS, then OVMF,
each with QEMU's iPXE ROM), whatever --firmware says: a boot takes seconds, and a site has nodes of
both kinds. The proof is the server's access log and the serial console.

No installer (anaconda) kernel and initrd can be had here: the built image's own kernel and
initrd stand in for them. What is proved is the chain up to the kernel running with the node's own
kickstart URL, not an installation.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import pxeboot
from pipeline.boot import Firmware


@pytest.fixture(scope="module")
def site(pytestconfig, spec, artifacts, output_dir):
    """The two-node inventory's tree, rendered from the built image and served; logs are kept in
    build/IMAGE/pxe-boot/."""
    with pxeboot.serving_site(spec.name, Path(pytestconfig.getoption("spec_file")), output_dir,
                              artifacts.directory / "pxe-boot") as served:
        yield served


@pytest.fixture(scope="module", params=list(Firmware), ids=str)
def booted(site, request) -> pxeboot.BootResult:
    """One network boot per firmware; QEMU is stopped once the kernel has printed its command line."""
    result = pxeboot.boot(site, request.param)
    print(f"\nPXE boot ({result.firmware}): VM start to the kernel running with its kickstart URL: "
          f"{result.seconds} s; console log {result.console}")
    return result


def other_node(site, booted) -> str:
    return next(boot.node.name for boot in site.tree.boots if boot.node.name != booted.node)


def test_the_node_fetched_its_own_files_and_nothing_else(site, booted):
    """The image's own kernel and initrd stand in for the installer's, which cannot be had here:
    the node fetched boot.ipxe, its own iPXE script, that kernel and that initrd, each with 200."""
    fetched = [(request.method, request.path, request.status) for request in booted.requests]
    assert fetched == [("GET", path, 200) for path in pxeboot.own_files(site.tree, booted.node)]
    others_script = pxeboot.own_files(site.tree, other_node(site, booted))[1]
    assert others_script not in [request.path for request in booted.requests]


def test_the_kernel_runs_with_the_nodes_own_kickstart_url(site, booted):
    """The image's kernel (standing in for the installer's) printed the node's own inst.ks, not the
    other node's."""
    assert pxeboot.kickstart_urls(booted.command_line) == [f"{site.base_url}/kickstarts/{booted.node}.ks"]
    assert f"inst.ks={site.base_url}/kickstarts/{other_node(site, booted)}.ks" not in booted.command_line


def test_the_boot_has_no_problems(site, booted):
    """The same verdict as ./inv pxe.boot-test gives."""
    assert pxeboot.problems(site.tree, booted) == ()
