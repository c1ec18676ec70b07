"""The PXE tree served by Debian's nginx, as a site serves it.

write_site puts SITE_CONF in a tree: a server block for an operator's /etc/nginx/sites-enabled/,
serving the tree's root/ on base_url's port, logging each request in the form
pxenode.parse_access_log reads. serving runs a private nginx with the same server block (its own
main configuration in a temporary directory, no system service touched), logging to the tree's
ACCESS_LOG as serve.serving does, so whatever reads that log reads either server's.
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from ipaddress import IPv6Address, ip_address
from pathlib import Path
from urllib.parse import urlsplit

from .. import tools
from ..errors import CommandFailed, PipelineError
from ..qemu import free_port
from ..run import spawn
from .pxe import templates
from .serve import ACCESS_LOG, SERVED, load_manifest

SITE_CONF = "nginx-site.conf"
OPERATOR_ACCESS_LOG = Path("/var/log/nginx/pxe-access.log")
STARTUP = 10.0  # seconds nginx has to answer on its port
# What nginx can be given bare: its configuration has no escape for `$` (a variable), and
# quoting the rest buys nothing for paths the pipeline makes.
CONFIG_SAFE = re.compile(r"/[A-Za-z0-9._+@/-]*")
URL_PATH = re.compile(r"(?:/[A-Za-z0-9._~-]+)*")
DEFAULT_PORT = {"http": 80}
FATAL = re.compile(r"\[(?:emerg|alert|crit)\] (?:\d+#\d+: )?(.*)")  # an error log's line, less time and pid


def _safe_path(path: Path, what: str) -> str:
    text = str(path)
    if not CONFIG_SAFE.fullmatch(text):
        raise PipelineError(f"cannot serve with nginx: the {what} {text!r} has characters nginx's configuration "
                            "cannot hold bare (only A-Z a-z 0-9 . _ + @ / -): move it")
    return text


def site_config(root: Path, listen_port: int, access_log: Path, *, address: str | None = None,
                prefix: str = "", base_url: str | None = None) -> str:
    """The server block (and its log_format) serving root on listen_port, at URL path prefix.

    address: listen on that address alone (a private server); None, on every IPv4 address.
    """
    if not 0 < listen_port < 65536:
        raise PipelineError(f"cannot serve with nginx on port {listen_port}: not a TCP port")
    listen = str(listen_port)
    if address is not None:
        host = ip_address(address)  # a ValueError here is the caller's bug: serving checks it
        listen = f"[{host}]:{listen_port}" if isinstance(host, IPv6Address) else f"{host}:{listen_port}"
    if not URL_PATH.fullmatch(prefix):
        of = f" (of base_url {base_url})" if base_url else ""
        raise PipelineError(f"cannot serve with nginx at the URL path {prefix!r}{of}: only /NAME/NAME parts "
                            "of A-Z a-z 0-9 . _ ~ -")
    return templates().get_template(f"{SITE_CONF}.j2").render(
        root=_safe_path(root, "tree's path"), listen=listen, access_log=_safe_path(access_log, "access log's path"),
        prefix=prefix, base_url=base_url)


def write_site(work: Path, root: Path, base_url: str, access_log: Path = OPERATOR_ACCESS_LOG) -> None:
    """Write SITE_CONF into work, the tree being rendered whose root/ will be moved to root: nginx
    serves root on base_url's port, at its path."""
    url = urlsplit(base_url)
    if url.scheme not in DEFAULT_PORT:
        raise PipelineError(f"base_url {base_url} is {url.scheme or 'not http'}: the tree's nginx site "
                            "serves plain http only (iPXE scripts and kernels need no TLS); use an http:// base_url")
    try:
        port = url.port or DEFAULT_PORT[url.scheme]
    except ValueError:  # urlsplit checks the port only when asked
        raise PipelineError(f"base_url {base_url}: its port is not a number from 0 to 65535") from None
    text = site_config(Path(root), port, access_log, prefix=url.path.rstrip("/"), base_url=base_url)
    (Path(work) / SITE_CONF).write_text(text)


def _main_config(workdir: Path, site: Path) -> str:
    """nginx.conf of a private server: everything it writes is under workdir, except the site's log."""
    # As root, the workers read the tree as the caller does (the Python server in serve.serving reads
    # it as root too); nginx's default worker user, nobody, cannot pass a 0700 parent such as a
    # test's temporary directory. Not root, nginx keeps the caller's user and warns about `user`.
    user = "user root;\n" if os.geteuid() == 0 else ""
    # nginx makes its temporary directories at start-up, by default under /var/lib/nginx.
    temp_paths = "".join(f"    {kind}_temp_path {workdir}/{kind};\n"
                         for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return (f"{user}daemon off;\nmaster_process on;\nworker_processes 1;\npid {workdir}/nginx.pid;\n"
            f"error_log {workdir}/error.log notice;\n"
            f"events {{\n    worker_connections 256;\n}}\n"
            f"http {{\n{temp_paths}    include {site};\n}}\n")


def _cause(*logs: Path) -> str:
    """nginx's first fatal message, else its last line. The first is the cause: a port in use is
    retried and logged five times, then ends in a bare "still could not bind()"."""
    lines = [line for log in logs if log.is_file() for line in log.read_text(errors="replace").splitlines()]
    fatal = next((found[1] for line in lines if (found := FATAL.search(line))), None)
    return fatal or next((line for line in reversed(lines) if line.strip()), "(no message)")


def _wait_until_answering(proc, argv: list[str], pid_file: Path, address: str, port: int,
                          logs: tuple[Path, ...]) -> None:
    """Until nginx answers on the port. nginx writes its pid file once its sockets are bound: until
    then, another server on the port would answer in its place."""
    deadline = time.monotonic() + STARTUP
    while time.monotonic() < deadline:
        if proc.poll() is not None:  # a bad configuration or a port in use ends it (after 2.5 s of retries)
            raise CommandFailed(argv, proc.returncode, _cause(*logs))
        try:
            if pid_file.read_text().strip() == str(proc.pid):
                with socket.create_connection((address, port), timeout=0.5):
                    return
        except OSError:  # no pid file yet, or no answer yet
            pass
        time.sleep(0.05)
    raise PipelineError(f"nginx did not answer on {address}:{port} within {STARTUP:.0f} s: {_cause(*logs)}")


@contextmanager
def serving(tree: Path, port: int = 0, address: str = "127.0.0.1", *, prefix: str = "") -> Iterator[str]:
    """Serve the tree's root with a private nginx; yields the tree's URL (port 0: a free port, for tests).

    prefix: the URL path to serve the tree at, as a site whose base_url has one does.
    Requests are logged to the tree's ACCESS_LOG, beside the root. On leaving, nginx is stopped,
    workers and all.
    """
    tree = Path(tree).resolve()
    load_manifest(tree)
    root = tree / SERVED
    if not root.is_dir():
        raise PipelineError(f"cannot serve {root}: not a directory")
    try:
        host = ip_address(address)
    except ValueError:
        raise PipelineError(f"cannot serve on {address!r}: not an IP address") from None
    tools.require("nginx")
    port = int(port) or free_port()
    with tempfile.TemporaryDirectory(prefix="pxe-nginx-") as tmp:
        workdir = Path(tmp)
        site = workdir / SITE_CONF
        site.write_text(site_config(root, port, tree / ACCESS_LOG, address=address, prefix=prefix))
        (workdir / "nginx.conf").write_text(_main_config(workdir, site))
        # -e: the error log from the start, before the configuration names it (Debian's is stderr).
        argv = ["nginx", "-p", f"{workdir}/", "-e", str(workdir / "error.log"), "-c", str(workdir / "nginx.conf")]
        with spawn(argv, log=workdir / "nginx.out") as proc:
            # Listening on every address: answer on loopback.
            reach = ("127.0.0.1" if host.version == 4 else "::1") if host.is_unspecified else str(host)
            _wait_until_answering(proc, argv, workdir / "nginx.pid", reach, port,
                                  (workdir / "error.log", workdir / "nginx.out"))
            yield f"http://{f'[{reach}]' if host.version == 6 else reach}:{port}{prefix}"
