"""The PXE boot test (issue 4, item 7): a diskless QEMU VM with a node's MAC boots from the network.

The inventory has two nodes, one per firmware, each booted by its own (SeaBIOS, then OVMF, each
with QEMU's iPXE ROM), whatever --firmware says: a boot takes seconds, and a site has nodes of both
kinds. The site is rendered once per loader:

- ipxe: QEMU's user network does DHCP and hands out the URL of our tree's boot.ipxe; the NIC's iPXE
  ROM fetches boot.ipxe, the node's ipxe/01-MAC.ipxe, its kernel and its initrd from our HTTP
  server (pipeline.pxe.serving). The proof is the server's access log and the serial console.
- pxelinux-grub: QEMU's DHCP hands out pxelinux.0 (BIOS) or grubnetx64.efi (UEFI), which read the
  node's pxelinux.cfg/01-MAC or grub/grub.cfg-01-MAC, kernel and initrd from QEMU's TFTP server
  (the tree's root). QEMU's TFTP keeps no log: the proof is the serial console, where the loader
  shows itself and the node's own configuration (their default configurations boot no installer).

Either way the kernel starts with the node's own kickstart URL on its command line.

What boots is our installer (the netboot image `installer`); what is proved here is the chain
up to its kernel running with the node's own kickstart URL. The install itself is test_deploy.py's.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.deploy import pxeboot
from pipeline.boot import Firmware
from pipeline.deploy.inventory import Loader


@pytest.fixture(scope="module", params=list(Loader), ids=str)
def site(pytestconfig, spec, artifacts, installer, output_dir, request):
    """The two-node inventory's tree for a loader, rendered from the built image and served; logs
    are kept in build/IMAGE/pxe-boot-LOADER/."""
    with pxeboot.serving_site(spec.name, Path(pytestconfig.getoption("spec_file")), output_dir,
                              artifacts.directory / f"pxe-boot-{request.param}", request.param) as served:
        yield served


@pytest.fixture(scope="module", params=list(Firmware), ids=str)
def booted(site, request) -> pxeboot.BootResult:
    """One network boot per firmware; QEMU is stopped once the kernel has printed its command line."""
    result = pxeboot.boot(site, request.param)
    print(f"\nPXE boot ({result.firmware}, {result.loader}): VM start to the kernel running with its kickstart URL: "
          f"{result.seconds} s; console log {result.console}")
    return result


def other_node(site, booted) -> pxeboot.pxe.NodeBoot:
    return next(boot for boot in site.tree.boots if boot.node.name != booted.node)


def test_the_node_fetched_its_own_files_and_nothing_else(site, booted):
    """iPXE: the node fetched boot.ipxe, its own iPXE script, that kernel and that initrd, each with 200,
    and not the other node's script. pxelinux and GRUB: nothing over HTTP (all came by TFTP)."""
    fetched = [(request.method, request.path, request.status) for request in booted.requests]
    assert fetched == [("GET", path, 200) for path in pxeboot.own_files(site.tree, booted.node, site.loader)]
    assert f"/{other_node(site, booted).files['ipxe']}" not in [request.path for request in booted.requests]


def test_the_loader_read_the_nodes_own_configuration(site, booted):
    """pxelinux printed its banner and loaded the kernel by TFTP; GRUB greeted and echoed the line
    of the node's own grub.cfg-01-MAC."""
    if site.loader is Loader.IPXE:
        pytest.skip("iPXE fetches everything over HTTP: the access log is its proof (the test above)")
    lines = pxeboot.own_console_lines(site.tree, booted.node, site.loader)
    assert lines and all(line in booted.console_text for line in lines), f"see {booted.console}"


def test_the_kernel_runs_with_the_nodes_own_kickstart_url(site, booted):
    """The image's kernel (standing in for the installer's) printed the node's own inst.ks, not the
    other node's."""
    assert pxeboot.kickstart_urls(booted.command_line) == [f"{site.base_url}/kickstarts/{booted.node}.ks"]
    assert f"inst.ks={site.base_url}/{other_node(site, booted).kickstart}" not in booted.command_line


def test_the_boot_has_no_problems(site, booted):
    """The same verdict as ./inv pxe.boot-test gives."""
    assert pxeboot.problems(site.tree, booted) == ()
