"""The PXE boot test (issue 4, item 7): a diskless QEMU VM with a node's MAC boots from the network.

The inventory has two nodes, one per firmware, each booted by its own (SeaBIOS, then OVMF, each
with QEMU's iPXE ROM), whatever --firmware says: a boot takes seconds, and a site has nodes of both
kinds. The site is rendered once per loader:

- ipxe: QEMU's user network does DHCP and hands out the URL of our tree's boot.ipxe; the NIC's iPXE
  ROM fetches boot.ipxe, the node's ipxe/01-MAC.ipxe, its kernel and its initrd from our HTTP
  server (pipeline.deploy.serve.serving). The proof is the server's access log and the serial console.
- pxelinux-grub: QEMU's DHCP hands out pxelinux.0 (BIOS) or grubnetx64.efi (UEFI), which read the
  node's pxelinux.cfg/01-MAC or grub/grub.cfg-01-MAC, kernel and initrd from QEMU's TFTP server
  (the tree's root). QEMU's TFTP keeps no log: the proof is the serial console, where the loader
  shows itself and the node's own configuration (their default configurations boot no installer).

Either way the kernel starts with the node's own kickstart URL on its command line. While iPXE
fetches over HTTP, 500 slow clients hold connections to the same server (each sends half a request
line and waits; one the server drops is replaced at once): the node's fetches must still complete.

What boots is our installer (the netboot image `installer`); what is proved here is the chain
up to its kernel running with the node's own kickstart URL. The install itself is test_deploy.py's.
"""

from __future__ import annotations

import resource
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from pipeline.deploy import pxe, pxenode
from pipeline.deploy.inventory import Loader
from pipeline.qemu import Firmware


@pytest.fixture(scope="module", params=list(Loader), ids=str)
def site(pytestconfig, spec, artifacts, installer, output_dir, request):
    """The two-node inventory's tree for a loader, rendered from the built image and served; logs
    are kept in build/IMAGE/pxe-boot-LOADER/."""
    with pxenode.serving_site(spec.name, Path(pytestconfig.getoption("spec_file")), output_dir,
                              artifacts.directory / f"pxe-boot-{request.param}", request.param) as served:
        yield served


SLOW_CLIENTS = 500
SLOW_START = b"GET /boot.ipxe HT"  # half a request line, never finished


class SlowClients:
    """count connections to port on loopback, each sending SLOW_START and then nothing; one the
    server closes is replaced, so the server is never without count of them."""

    def __init__(self, port: int, count: int):
        self.port, self.count = port, count
        self.open: list[socket.socket] = []
        self.replaced = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._hold, name="slow-clients", daemon=True)

    def _connect(self) -> socket.socket:
        conn = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        conn.sendall(SLOW_START)
        conn.setblocking(False)
        return conn

    def closed_by_server(self, conn: socket.socket) -> bool:
        try:
            return conn.recv(1) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def _hold(self) -> None:
        while not self.stopping.wait(0.5):
            for index, conn in enumerate(self.open):
                if self.closed_by_server(conn):
                    conn.close()
                    self.open[index] = self._connect()
                    self.replaced += 1

    def __enter__(self) -> SlowClients:
        self.open = [self._connect() for _ in range(self.count)]
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.thread.join(timeout=30)
        for conn in self.open:
            conn.close()


@contextmanager
def files_for(sockets: int) -> Iterator[None]:
    """Enough file descriptors for the clients' sockets and the server's ends of them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * sockets + 256
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.fail(f"the hard limit on open files ({hard}) is below {wanted}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture(scope="module", params=list(Firmware), ids=str)
def booted(site, request) -> pxenode.BootResult:
    """One network boot per firmware; QEMU is stopped once the kernel has printed its command line.
    With iPXE, the boot fetches over HTTP while SLOW_CLIENTS hold connections to the server."""
    if site.loader is not Loader.IPXE:
        return _boot(site, request.param)
    with files_for(SLOW_CLIENTS), SlowClients(urlsplit(site.base_url).port, SLOW_CLIENTS) as slow:
        result = _boot(site, request.param)
        still_open = sum(not slow.closed_by_server(conn) for conn in slow.open)
    print(f"{SLOW_CLIENTS} slow clients held during the boot ({slow.replaced} replaced after the server "
          f"dropped them); {still_open} open at its end")
    assert still_open >= SLOW_CLIENTS // 2, "the slow clients were not holding connections during the boot"
    return result


def _boot(site, firmware: Firmware) -> pxenode.BootResult:
    result = pxenode.boot(site, firmware)
    print(f"\nPXE boot ({result.firmware}, {result.loader}): VM start to the kernel running with its kickstart URL: "
          f"{result.seconds} s; console log {result.console}")
    return result


def other_node(site, booted) -> pxe.NodeBoot:
    return next(boot for boot in site.tree.boots if boot.node.name != booted.node)


def test_the_node_fetched_its_own_files_and_nothing_else(site, booted):
    """iPXE: the node fetched boot.ipxe, its own iPXE script, that kernel and that initrd, each with 200,
    and not the other node's script. pxelinux and GRUB: nothing over HTTP (all came by TFTP)."""
    fetched = [(request.method, request.path, request.status) for request in booted.requests]
    assert fetched == [("GET", path, 200) for path in pxenode.own_files(site.tree, booted.node, site.loader)]
    assert f"/{other_node(site, booted).files['ipxe']}" not in [request.path for request in booted.requests]


def test_the_loader_read_the_nodes_own_configuration(site, booted):
    """pxelinux printed its banner and loaded the kernel by TFTP; GRUB greeted and echoed the line
    of the node's own grub.cfg-01-MAC."""
    if site.loader is Loader.IPXE:
        pytest.skip("iPXE fetches everything over HTTP: the access log is its proof (the test above)")
    lines = pxenode.own_console_lines(site.tree, booted.node, site.loader)
    assert lines and all(line in booted.console_text for line in lines), f"see {booted.console}"


def test_the_kernel_runs_with_the_nodes_own_kickstart_url(site, booted):
    """The image's kernel (standing in for the installer's) printed the node's own inst.ks, not the
    other node's."""
    assert pxenode.kickstart_urls(booted.command_line) == [f"{site.base_url}/kickstarts/{booted.node}.ks"]
    assert f"inst.ks={site.base_url}/{other_node(site, booted).kickstart}" not in booted.command_line


def test_the_boot_has_no_problems(site, booted):
    """The same verdict as ./inv pxe.boot-test gives."""
    assert pxenode.problems(site.tree, booted) == ()
