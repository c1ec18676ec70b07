"""Serving a PXE tree: HTTP from Python, TFTP and proxy DHCP by dnsmasq.

A tree's directory holds the served root and, beside it, what is the server's and not the nodes':

    pxe.json  dnsmasq.conf  nginx-site.conf  access.log  dnsmasq.log
    root/     the HTTP and TFTP root (pipeline.deploy.pxe lays it out)

HTTP is served by one thread that reads every connection's request head, so a client that is slow
to send one costs a socket, not a thread, and is dropped after HEAD_TIMEOUT; complete requests are
answered by a pool of WORKERS threads. At most MAX_CONNECTIONS are open: more are closed as soon as
accepted. Only regular files inside the root are served: no directory listing, no symbolic link out.
"""

from __future__ import annotations

import contextlib
import io
import os
import resource
import selectors
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler
from ipaddress import IPv4Address
from pathlib import Path
from urllib.parse import urlsplit

from .. import tools
from ..artifacts import read_json
from ..errors import CommandFailed, PipelineError
from ..paths import DEFAULT_OUTPUT
from ..run import spawn

DEFAULT_OUTPUT_DIR = DEFAULT_OUTPUT / "pxe"
SERVED = "root"  # the subdirectory of a tree that HTTP and TFTP serve
MANIFEST = "pxe.json"
DNSMASQ_CONF = "dnsmasq.conf"
ACCESS_LOG = "access.log"
DNSMASQ_LOG = "dnsmasq.log"
DNSMASQ_STARTUP = 2.0  # seconds dnsmasq has to fail on its configuration before we call it running
HEAD_TIMEOUT = 10.0  # seconds a client has for its whole request line and headers (nginx's client_header_timeout)
SEND_TIMEOUT = 60.0  # seconds a node may go without reading a byte of its answer (nginx's send_timeout)
MAX_HEAD = 8192  # bytes of request line and headers; iPXE, GRUB and the installer send a few hundred
MAX_CONNECTIONS = 1024
FD_RESERVE = 64  # file descriptors kept for the files being served, the logs and dnsmasq
WORKERS = 16  # threads answering complete requests
POLL = 0.05  # seconds between looks at the stop flag and the head deadlines; tests start and stop many servers


def connection_cap() -> int:
    """MAX_CONNECTIONS, or fewer where the process's file limit would make accept() fail first."""
    files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return MAX_CONNECTIONS if files == resource.RLIM_INFINITY else max(1, min(MAX_CONNECTIONS, files - FD_RESERVE))


def load_manifest(tree: Path) -> dict:
    """The tree's pxe.json: what was rendered, and the mark of a PXE tree."""
    return read_json(tree / MANIFEST, f"{tree} is not a PXE tree: run ./inv pxe.render first")


def printable(text: str) -> str:
    """text with what a terminal or a log reader could take for something else escaped as \\xHH, as
    nginx logs it: control characters, space, quote, backslash, anything beyond ASCII."""
    return "".join(char if "!" <= char <= "~" and char not in '"\\' else
                   "".join(f"\\x{byte:02x}" for byte in char.encode())
                   for char in text)


class _AccessLog:
    """One line per request, to stdout and to ACCESS_LOG beside the root; every field from the
    network escaped, so a line is always five fields (pxenode.parse_access_log).

    The file is opened for each line, so a render that swaps the tree in while we serve is
    logged into from then on.
    """

    def __init__(self, path: Path, echo: bool):
        self.path, self.echo, self.lock = path, echo, threading.Lock()

    def write(self, client: str, method: str, path: str, status: int | str) -> None:
        line = f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {client} {printable(method)} {printable(path)} {status}"
        with self.lock:
            if self.echo:
                print(line, flush=True)
            with open(self.path, "a") as log:
                log.write(line + "\n")


class _Handler(SimpleHTTPRequestHandler):
    """Answers one request whose head the server has read already (HTTP/1.0: one request per connection)."""

    server: _Server  # type: ignore[assignment]  # the handler only ever serves a _Server
    server_version, sys_version = "pxe", ""  # no versions for the network to match exploits to

    def __init__(self, request, client_address, server, *, head: bytes, directory: str):
        self.head = head
        super().__init__(request, client_address, server, directory=directory)

    def setup(self) -> None:
        super().setup()
        self.rfile.close()
        self.rfile = io.BytesIO(self.head)

    def send_head(self):
        root = os.path.realpath(self.directory)
        path = os.path.realpath(self.translate_path(self.path))
        # No listing of a directory, and nothing outside the root, wherever a link in it points.
        if os.path.commonpath([root, path]) != root or os.path.isdir(path):
            self.send_error(HTTPStatus.NOT_FOUND)
            return None
        return super().send_head()

    def log_request(self, code="-", size="-") -> None:
        status = int(code) if code != "-" else code  # an HTTPStatus, logged as its number
        # A request line that did not parse leaves no command or path.
        self.server.access_log.write(self.client_address[0], self.command or "-", getattr(self, "path", "-"), status)

    def log_message(self, format, *args) -> None:
        pass  # the access log has the status of every request; this would repeat it on stderr


@dataclass
class _Head:
    """A connection whose request head is still coming."""

    client: tuple
    deadline: float
    data: bytes = b""


class _Server:
    """HTTP for the tree's root, on address: see the module's docstring for how it holds up."""

    def __init__(self, address: tuple[str, int], root: Path, access_log: _AccessLog):
        self.root, self.access_log = root, access_log
        self.listener = socket.create_server(address)
        self.listener.setblocking(False)
        self.server_address = self.listener.getsockname()
        self.slots = threading.BoundedSemaphore(connection_cap())
        self.heads: dict[socket.socket, _Head] = {}  # the selector thread's alone
        self.answering: set[socket.socket] = set()
        self.lock = threading.Lock()  # over answering
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.workers = ThreadPoolExecutor(WORKERS, thread_name_prefix="pxe-http")
        self.stopping = threading.Event()

    def serve_forever(self) -> None:
        while not self.stopping.is_set():
            for key, _ in self.selector.select(POLL):
                if key.fileobj is self.listener:
                    self._accept()
                else:
                    self._read(key.fileobj)  # type: ignore[arg-type]  # registered: listener and connections
            now = time.monotonic()
            for conn in [conn for conn, head in self.heads.items() if head.deadline < now]:
                self._drop(conn)

    def _accept(self) -> None:
        while True:
            try:
                conn, client = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # out of file descriptors, say: the others are served meanwhile
                return
            if not self.slots.acquire(blocking=False):
                conn.close()  # over the cap: refused at once, costing nothing
                continue
            conn.setblocking(False)
            self.heads[conn] = _Head(client, time.monotonic() + HEAD_TIMEOUT)
            self.selector.register(conn, selectors.EVENT_READ)

    def _read(self, conn: socket.socket) -> None:
        head = self.heads[conn]
        try:
            data = conn.recv(MAX_HEAD)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        head.data += data
        complete = b"\r\n\r\n" in head.data or b"\n\n" in head.data
        if not data or (len(head.data) > MAX_HEAD and not complete):  # gone, or no HTTP client
            self._drop(conn)
        elif complete:
            self.selector.unregister(conn)
            del self.heads[conn]
            self.workers.submit(self._answer, conn, head)

    def _answer(self, conn: socket.socket, head: _Head) -> None:
        with self.lock:
            self.answering.add(conn)
        try:
            conn.settimeout(SEND_TIMEOUT)  # a node that stops reading is dropped
            _Handler(conn, head.client, self, head=head.data, directory=str(self.root))
        except OSError:
            pass  # a node that hangs up mid-download is no error of ours
        finally:
            with self.lock:
                self.answering.discard(conn)
            self._close(conn)

    def _drop(self, conn: socket.socket) -> None:
        self.selector.unregister(conn)
        del self.heads[conn]
        self._close(conn)

    def _close(self, conn: socket.socket) -> None:
        conn.close()
        self.slots.release()

    def shutdown(self) -> None:
        """Stop serving; call after serve_forever's thread is joined."""
        for conn in list(self.heads):
            self._drop(conn)
        with self.lock:  # a download under way ends now, not when the node has it all
            for conn in self.answering:
                with contextlib.suppress(OSError):  # the node hung up first
                    conn.shutdown(socket.SHUT_RDWR)
        self.workers.shutdown(wait=True, cancel_futures=True)
        self.selector.close()
        self.listener.close()


@contextmanager
def _running_dnsmasq(tree: Path) -> Iterator[None]:
    """dnsmasq for TFTP and proxy DHCP, for the length of the block, once it did not fail at once."""
    if os.geteuid() != 0:
        raise PipelineError("TFTP and proxy DHCP need root (dnsmasq binds ports 67 and 69): run as root, "
                            "or serve HTTP only (--no-tftp)")
    tools.require("dnsmasq")
    conf = tree / DNSMASQ_CONF
    tftp_root = next((line.split("=", 1)[1] for line in conf.read_text().splitlines()
                      if line.startswith("tftp-root=")), None)
    if tftp_root != str(tree / SERVED):
        raise PipelineError(f"{conf}: tftp-root is {tftp_root}, not {tree / SERVED}: the tree was moved; "
                            "render it again")
    argv = ["dnsmasq", "--no-daemon", f"--conf-file={conf}"]
    with spawn(argv, log=tree / DNSMASQ_LOG) as proc:
        deadline = time.monotonic() + DNSMASQ_STARTUP
        while time.monotonic() < deadline:  # a bad interface or a port in use ends it at once
            if proc.poll() is not None:
                lines = (tree / DNSMASQ_LOG).read_text(errors="replace").strip().splitlines()
                last = f": {lines[-1]}" if lines else ""
                raise CommandFailed(argv, proc.returncode, f"see {tree / DNSMASQ_LOG}{last}")
            time.sleep(0.05)
        yield


@contextmanager
def serving(tree: Path, address: str = "127.0.0.1", port: int = 0, *, tftp: bool = False,
            echo: bool = True) -> Iterator[str]:
    """Serve the tree's root over HTTP and, with tftp, run dnsmasq for TFTP and proxy DHCP.

    Yields the server's URL (port 0: an ephemeral port, for tests). Every request is logged to
    stdout (echo) and to ACCESS_LOG beside the root. On leaving, dnsmasq and the server are stopped.
    """
    tree = Path(tree).resolve()
    load_manifest(tree)
    try:
        IPv4Address(address)
    except ValueError:
        raise PipelineError(f"cannot serve on {address!r}: not an IPv4 address") from None
    try:
        server = _Server((address, int(port)), tree / SERVED, _AccessLog(tree / ACCESS_LOG, echo))
    except OSError as error:
        raise PipelineError(f"cannot serve HTTP on {address}:{port}: {error.strerror}") from None
    thread = threading.Thread(target=server.serve_forever, name="pxe-http", daemon=True)
    thread.start()
    try:
        with ExitStack() as children:
            if tftp:
                children.enter_context(_running_dnsmasq(tree))
            host, bound = server.server_address[:2]
            yield f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{bound}"
    finally:
        server.stopping.set()
        thread.join(timeout=10)
        server.shutdown()


def serve(tree: Path = DEFAULT_OUTPUT_DIR, address: str = "127.0.0.1", port: int = 8080, tftp: bool = True) -> None:
    """Serve the tree until Ctrl-C (or SIGTERM); nothing is left running after."""
    def terminate(_signum, _frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate)  # dnsmasq is in its own process group: stop it too
    try:
        with serving(tree, address, port, tftp=tftp) as url:
            base_url = load_manifest(Path(tree).resolve())["base_url"]
            extra = f", TFTP and proxy DHCP by dnsmasq (log: {Path(tree) / DNSMASQ_LOG})" if tftp else ""
            print(f"serving {Path(tree) / SERVED} at {url}{extra}; Ctrl-C stops", flush=True)
            site = urlsplit(base_url)
            if (site.port or 80) != urlsplit(url).port or address not in ("0.0.0.0", site.hostname):
                print(f"note: the tree's nodes fetch from {base_url} (the inventory's base_url)", flush=True)
            threading.Event().wait()
    except KeyboardInterrupt:
        print("stopped", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
