"""Serving a PXE tree over HTTP on loopback, as nodes and as hostile or broken clients would use it:
only the nodes' files, no listings, no links out, an escaped log, and a bounded server that still
answers a node while hundreds of slow clients hold connections."""

import hashlib
import resource
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline.deploy import pxe, pxenode, serve
from tests.unit.test_pxe import example, fake_build, get

SLOW_CLIENTS = 500


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A rendered tree with, in its root, a link out of it, a link to a file beside it, and a link
    inside it."""
    tmp = tmp_path_factory.mktemp("serve")
    tree = pxe.render_tree(example(tmp), tmp / "pxe", build_dir=fake_build(tmp / "build"))
    (tmp / "secret").write_text("not the tree's\n")
    (tree.root / "outside").symlink_to(tmp / "secret")
    (tree.root / "manifest").symlink_to(tree.directory / serve.MANIFEST)
    (tree.root / "kernel").symlink_to("installer/installer.vmlinuz")
    return tree


@pytest.fixture(scope="module")
def url(tree):
    with serve.serving(tree.directory, echo=False) as url:
        get(url + "/boot.ipxe")  # so that the access log exists
        yield url


def raw(url: str, request: bytes) -> bytes:
    """What the server answers to these bytes, read to the end."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(request)
        answer = b""
        while data := conn.recv(65536):
            answer += data
        return answer


def status(url: str) -> int | None:
    """The status of a GET; None when the server closes the connection without an answer."""
    try:
        return get(url)
    except ConnectionError:
        return None


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def closed_by_server(conn: socket.socket, within: float) -> bool:
    """Whether the server closes the connection (with nothing sent) within the time."""
    conn.settimeout(within)
    try:
        return conn.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@pytest.mark.parametrize("name", [serve.MANIFEST, serve.DNSMASQ_CONF, "nginx-site.conf", serve.ACCESS_LOG,
                                  f"../{serve.MANIFEST}", f"%2e%2e/{serve.MANIFEST}"])
def test_the_servers_own_files_are_not_served(tree, url, name):
    assert (tree.directory / Path(name).name).is_file()
    assert get(f"{url}/{name}") == 404


@pytest.mark.parametrize("path", ["/", "/grub/", "/grub", "/kickstarts/"])
def test_no_directory_is_listed(url, path):
    assert get(url + path) == 404


@pytest.mark.parametrize(("path", "status"), [("/outside", 404), ("/manifest", 404), ("/kernel", 200)])
def test_a_link_is_followed_only_inside_the_root(url, path, status):
    assert get(url + path) == status


def test_control_characters_from_the_network_are_escaped_in_the_log(tree, url):
    assert raw(url, b"GET /a\x1b[2J\x07\xe9b\\\"c HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 404 ")
    assert b"Error code: 400" in raw(url, b"\x1b[31mGET\x00 \r\n\r\n")  # no request: no method, no path
    lines = (tree.directory / serve.ACCESS_LOG).read_text().splitlines()
    assert lines[-2].split()[1:] == ["127.0.0.1", "GET", r'/a\x1b[2J\x07\xc3\xa9b\x5c\x22c', "404"]
    assert lines[-1].split()[1:] == ["127.0.0.1", "-", "-", "400"]
    assert all(char.isprintable() for line in lines for char in line)
    assert [request.status for request in pxenode.parse_access_log("\n".join(lines[-2:]))] == [404, 400]


@pytest.mark.parametrize(("text", "logged"), [
    ("/boot.ipxe", "/boot.ipxe"),
    ("/a b", r"/a\x20b"),
    ("/\r\n\t", r"/\x0d\x0a\x09"),
    ("/é", r"/\xc3\xa9"),
    ('/"\\', r"/\x22\x5c"),
])
def test_printable(text, logged):
    assert serve.printable(text) == logged


@pytest.fixture
def files_for_many_clients():
    """Enough file descriptors for the slow clients' sockets and the server's ends of them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4 * SLOW_CLIENTS + serve.FD_RESERVE
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"the hard limit on open files ({hard}) is below {wanted}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("slow_start", [b"", b"GET /installer/installer.vmlinuz HT"], ids=["silent", "half a request"])
def test_a_node_is_served_while_500_slow_clients_hold_connections(tree, files_for_many_clients, slow_start):
    kernel = (tree.root / "installer/installer.vmlinuz").read_bytes()
    before = threading.active_count()
    with serve.serving(tree.directory, echo=False) as url:
        slow = []
        try:
            for _ in range(SLOW_CLIENTS):
                slow.append(connect(url))
                slow[-1].sendall(slow_start)
            time.sleep(0.5)  # every one accepted and read
            started = time.monotonic()
            with urllib.request.urlopen(f"{url}/installer/installer.vmlinuz", timeout=10) as response:
                fetched = response.read()
            seconds = time.monotonic() - started
            threads = threading.active_count() - before
            assert not any(closed_by_server(conn, 0.001) for conn in slow)  # all still held
        finally:
            for conn in slow:
                conn.close()
    assert hashlib.sha256(fetched).digest() == hashlib.sha256(kernel).digest()
    assert seconds < 2, f"the node waited {seconds:.1f} s"
    assert threads <= serve.WORKERS + 1  # the pool and the thread reading request heads, not one per client


def test_a_client_that_sends_no_request_is_dropped(tree, monkeypatch):
    monkeypatch.setattr(serve, "HEAD_TIMEOUT", 0.5)
    with serve.serving(tree.directory, echo=False) as url, connect(url) as silent, connect(url) as slow:
        slow.sendall(b"GET /boot.ipxe HTTP/1.0\r\n")  # and never the blank line
        assert closed_by_server(silent, 5) and closed_by_server(slow, 5)


def test_connections_over_the_cap_are_closed_at_once(tree, monkeypatch):
    monkeypatch.setattr(serve, "MAX_CONNECTIONS", 3)
    with serve.serving(tree.directory, echo=False) as url:
        held = [connect(url) for _ in range(3)]
        with connect(url) as over:
            assert closed_by_server(over, 2)
        assert not any(closed_by_server(conn, 0.1) for conn in held)
        for conn in held:
            conn.close()
        deadline = time.monotonic() + 5  # the server sees them go at its next look
        while status(f"{url}/boot.ipxe") != 200:
            assert time.monotonic() < deadline, "the closed connections' slots were not given back"
            time.sleep(0.1)


def test_a_node_that_stops_reading_is_dropped(tree, monkeypatch):
    """Past SEND_TIMEOUT without reading, a download ends and its worker and slot are free again."""
    monkeypatch.setattr(serve, "SEND_TIMEOUT", 2)
    monkeypatch.setattr(serve, "MAX_CONNECTIONS", 1)
    big = tree.root / "big.img"
    big.write_bytes(b"\0" * 64 * 2**20)  # more than the sockets' buffers hold
    try:
        with serve.serving(tree.directory, echo=False) as url, connect(url) as stalled:
            stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            stalled.sendall(b"GET /big.img HTTP/1.0\r\n\r\n")
            assert status(f"{url}/boot.ipxe") is None  # over the cap while the stalled download holds the slot
            deadline = time.monotonic() + 10
            while status(f"{url}/boot.ipxe") != 200:
                assert time.monotonic() < deadline, "the stalled download was never dropped"
                time.sleep(0.2)
    finally:
        big.unlink()


def test_leaving_ends_a_download_under_way(tree):
    big = tree.root / "big.img"
    big.write_bytes(b"\0" * 64 * 2**20)
    before = threading.active_count()  # the module's server's among them
    try:
        with serve.serving(tree.directory, echo=False) as url:
            stalled = connect(url)
            stalled.sendall(b"GET /big.img HTTP/1.0\r\n\r\n")
            stalled.recv(1)  # the answer has started
            started = time.monotonic()
        assert time.monotonic() - started < 2 and threading.active_count() == before  # no thread left sending
        stalled.close()
    finally:
        big.unlink()
