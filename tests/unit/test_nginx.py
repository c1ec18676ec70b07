"""The PXE tree's nginx site: the rendered server block, and a real nginx serving a small tree on
loopback (skipped where Debian's nginx is not installed)."""

import dataclasses
import os
import re
import shutil
import socket
import urllib.request
from pathlib import Path

import pytest

from pipeline.deploy import nginx, pxenode, serve
from pipeline.errors import CommandFailed, PipelineError, ToolMissing
from tests.unit.test_pxe import get as status

ROOT = Path("/srv/pxe")
no_nginx = pytest.mark.skipif(not shutil.which("nginx"), reason="nginx (Debian package nginx) is not on PATH")
# What each variable of the log format is, by the name parse_access_log gives it.
LOG_FIELDS = {"$time_iso8601": "time", "$remote_addr": "client", "$request_method": "method",
              "$request_uri": "path", "$status": "status"}


def site(tmp_path: Path, base_url: str) -> str:
    nginx.write_site(tmp_path, ROOT, base_url)
    return (tmp_path / nginx.SITE_CONF).read_text()


def directives(text: str, name: str) -> list[str]:
    """The arguments of every `name ...;` line, comments left out."""
    return [found.group(1) for found in re.finditer(rf"^\s*{name}\s+([^;#]*);", text, re.MULTILINE)]


@pytest.mark.parametrize(("base_url", "listen"), [
    ("http://10.0.0.1:8080", "8080"),
    ("http://10.0.0.1", "80"),
    ("http://pxe.example.org:81/boot", "81"),
])
def test_site_listens_on_base_url_port(tmp_path, base_url, listen):
    assert directives(site(tmp_path, base_url), "listen") == [listen]


def test_site_serves_tree_at_its_root(tmp_path):
    text = site(tmp_path, "http://10.0.0.1:8080")
    assert directives(text, "root") == [str(ROOT)]
    assert directives(text, "autoindex") == ["off"]
    assert directives(text, "disable_symlinks") == ["on from=$document_root"]
    assert directives(text, "access_log") == [f"{nginx.OPERATOR_ACCESS_LOG} pxe"]
    assert directives(text, "text/plain") == ["ipxe cfg ks"]
    assert directives(text, "client_header_timeout") and directives(text, "send_timeout")
    assert "alias" not in text


def test_site_serves_tree_at_base_url_path(tmp_path):
    text = site(tmp_path, "http://10.0.0.1/pxe/boot")
    assert directives(text, "alias") == [f"{ROOT}/"]
    assert "location /pxe/boot/ {" in text


def test_log_format_is_what_parse_access_log_reads(tmp_path):
    text = site(tmp_path, "http://10.0.0.1:8080")
    formats = re.findall(r"^log_format pxe '([^']*)';$", text, re.MULTILINE)  # top level: inside http {}
    assert len(formats) == 1
    assert [LOG_FIELDS.get(word, word) for word in formats[0].split(" ")] == \
        [field.name for field in dataclasses.fields(pxenode.Request)]


@pytest.mark.parametrize(("base_url", "problem"), [
    ("https://10.0.0.1", "serves plain http only"),
    ("ftp://10.0.0.1", "serves plain http only"),
    ("http://10.0.0.1:99999", "not a number from 0 to 65535"),
    ("http://10.0.0.1/a$b", "URL path"),
])
def test_write_site_refuses(tmp_path, base_url, problem):
    with pytest.raises(PipelineError) as caught:
        nginx.write_site(tmp_path, ROOT, base_url)
    message = str(caught.value)
    assert problem in message and "\n" not in message
    assert base_url in message
    assert not (tmp_path / nginx.SITE_CONF).exists()


@pytest.mark.parametrize("root", ["/srv/pxe $x", "/srv/$document_root", "/srv/pxe;include"])
def test_write_site_refuses_path_nginx_cannot_hold(tmp_path, root):
    with pytest.raises(PipelineError, match="characters nginx's configuration cannot hold"):
        nginx.write_site(tmp_path, Path(root), "http://10.0.0.1")


# --- a real nginx


def nginx_pids() -> set[int]:
    pids = set()
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "comm").read_text().strip() == "nginx":
                pids.add(int(proc.name))
        except OSError:
            pass  # gone since the listing
    return pids


@pytest.fixture
def tree(tmp_path):
    """A few files as a rendered tree has them in its root, its pxe.json and dnsmasq.conf beside
    the root, and links out of the root."""
    tree = tmp_path / "pxe"
    root = tree / serve.SERVED
    (root / "ipxe").mkdir(parents=True)
    (root / "boot.ipxe").write_text("#!ipxe\nchain ipxe/01-${netX/mac:hexhyp}.ipxe\n")
    (root / "ipxe" / "01-52-54-00-12-34-01.ipxe").write_text("#!ipxe\nkernel x\n")
    (tree / "pxe.json").write_text("{}\n")
    (tree / serve.DNSMASQ_CONF).write_text(f"tftp-root={root}\n")
    (tmp_path / "secret").write_text("not the tree's\n")
    (root / "outside").symlink_to(tmp_path / "secret")
    (root / "manifest").symlink_to(tree / "pxe.json")
    return tree


@no_nginx
def test_serving_serves_the_tree_and_logs_each_request(tree):
    before = nginx_pids()
    with nginx.serving(tree) as url:
        started = nginx_pids() - before
        with urllib.request.urlopen(f"{url}/boot.ipxe", timeout=10) as response:
            assert response.read().startswith(b"#!ipxe")
            assert response.headers["Content-Type"] == "text/plain"
        asked = {"/ipxe/01-52-54-00-12-34-01.ipxe": 200, "/missing.ipxe": 404, f"/{serve.DNSMASQ_CONF}": 404,
                 "/pxe.json": 404, "/outside": 403, "/manifest": 403, "/ipxe/": 403, "/": 403}
        assert {path: status(url + path) for path in asked} == asked
    assert len(started) >= 2  # a master and its worker
    assert not started & nginx_pids(), "nginx processes left after serving"
    logged = pxenode.parse_access_log((tree / serve.ACCESS_LOG).read_text())
    assert [(request.method, request.path, request.status) for request in logged] == \
        [("GET", "/boot.ipxe", 200)] + [("GET", path, code) for path, code in asked.items()]
    assert {request.client for request in logged} == {"127.0.0.1"}


@no_nginx
def test_serving_at_a_url_path(tree):
    with nginx.serving(tree, prefix="/pxe") as url:
        assert url.endswith("/pxe")
        assert status(f"{url}/boot.ipxe") == 200
        assert status(f"{url}/{serve.DNSMASQ_CONF}") == 404
        assert status(f"{url}/outside") == 403
        assert status(url.removesuffix("/pxe") + "/boot.ipxe") == 404


@no_nginx
def test_serving_names_nginx_failure(tree):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(CommandFailed, match="Address already in use"), nginx.serving(tree, port):
            pass


def test_serving_needs_nginx(tree, monkeypatch):
    monkeypatch.setenv("PATH", str(tree))
    with pytest.raises(ToolMissing, match=r"nginx \(Debian package nginx\)"), nginx.serving(tree):
        pass


def test_serving_refuses_what_is_not_a_tree(tree, tmp_path):
    with pytest.raises(PipelineError, match="is not a PXE tree"), nginx.serving(tmp_path / "none"):
        pass
    with pytest.raises(PipelineError, match="not an IP address"), nginx.serving(tree, address="localhost"):
        pass
    shutil.rmtree(tree / serve.SERVED)
    with pytest.raises(PipelineError, match=f"cannot serve {tree / serve.SERVED}: not a directory"), \
            nginx.serving(tree):
        pass


def test_root_runs_workers_as_root_so_they_pass_private_parents(tmp_path):
    config = nginx._main_config(tmp_path, tmp_path / nginx.SITE_CONF)
    assert ("user root;" in config) == (os.geteuid() == 0)
    assert f"pid {tmp_path}/nginx.pid;" in config
