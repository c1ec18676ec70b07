"""One kickstart per inventory node, rendered from kickstarts/*.j2 and checked with pykickstart.

Every kickstart is rendered and validated before any is written. They are then
written beside the output directory and moved into place, so a kickstart that
pykickstart rejects never reaches it, and nor does any other of that run.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import shutil
import tempfile
import time
import types
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from pykickstart.errors import KickstartError, KickstartWarning
from pykickstart.parser import KickstartParser
from pykickstart.version import makeVersion

from .. import escape
from ..artifacts import Artifacts, artifacts_for
from ..errors import InventoryError, PipelineError
from ..paths import DEFAULT_OUTPUT, ROOT
from ..spec import ImageSpec
from . import inventory as inventories
from .inventory import Inventory, Node

TEMPLATES = ROOT / "kickstarts"
TEMPLATE = "node.ks.j2"
DEFAULT_OUTPUT_DIR = DEFAULT_OUTPUT / "kickstarts"
# The installers we validate for (the tests render for each); pykickstart knows older ones too.
TARGETS = ("RHEL9", "RHEL10", "F42", "F43")
DEFAULT_TARGET = "RHEL9"
# liveimg installs a role's Artifacts.liveimg (the root tree with its SELinux labels, pipeline.liveimg),
# build/ROLE/ROLE.tar.gz at BASE_URL/ROLE/, checked against the sha256 its build-info.json records.
SHA256 = re.compile(r"[0-9a-f]{64}")
LINE = re.compile(r"\bline (\d+)\b")


@dataclass(frozen=True)
class LiveImage:
    """A role's liveimg artifact: its file name under BASE_URL/ROLE/, its sha256, and the directory
    it is in (a build, or a published version once verified; None when the caller gave it)."""

    file: str
    sha256: str
    directory: Path | None = None


@dataclass(frozen=True)
class Kickstart:
    """What one node's kickstart says; the templates only lay it out."""

    node: Node
    kernel_args: tuple[str, ...]
    tuned_profile: str
    liveimg_url: str
    liveimg_sha256: str
    includes: tuple[str, ...]
    inventory: Path
    target: str


@dataclass(frozen=True)
class Snippet:
    path: Path
    text: str


def published_version(role: str, build_dir: Path, verify_key: str | None) -> tuple[Path, dict[str, str]] | None:
    """build_dir/ROLE/latest's version and its SHA256SUMS when build_dir is a publish target
    (./inv publish), verified first: signed by verify_key, and the files rendering uses (liveimg,
    kernel, initrd) hashing to what it lists. None when build_dir is a build directory."""
    latest = Path(build_dir) / role / "latest"
    if not latest.is_symlink() and not latest.exists():
        return None
    from ..publish.verify import VERSION, verify_version  # publishing's libraries are only needed here

    if not verify_key:
        raise PipelineError(f"{latest} is a published version: give --verify-key FINGERPRINT or KEYFILE "
                            "(the public key that signs its SHA256SUMS) to render from it")
    version = latest.resolve()
    if version.parent != latest.parent.resolve() or not VERSION.fullmatch(version.name):
        raise PipelineError(f"{latest} points at {version}, not at a version beside it")
    used = Artifacts(version, role)
    return version, verify_version(version, [used.liveimg.name, used.kernel.name, used.initrd.name], verify_key)


def _built_liveimage(image: ImageSpec, build_dir: Path, verify_key: str | None) -> LiveImage:
    art = artifacts_for(image, build_dir)
    file = art.liveimg.name
    if published := published_version(image.name, build_dir, verify_key):
        version, sums = published
        return LiveImage(file, sums[file], version)
    try:
        return LiveImage(file, art.recorded_sha256(art.liveimg), art.directory)
    except PipelineError as error:
        raise PipelineError(f"role {image.name!r}: {error}") from None


def liveimages(inventory: Inventory, build_dir: Path, given: Mapping[str, LiveImage],
               verify_key: str | None = None) -> dict[str, LiveImage]:
    """The liveimg artifact of each role in use: given, or read from build/ROLE/build-info.json
    (or, where build_dir is a publish target, from ROLE/latest/SHA256SUMS, verified with verify_key)."""
    found = {}
    for role in sorted({node.role for node in inventory.nodes.values()}):
        found[role] = given.get(role) or _built_liveimage(inventory.spec.images[role], build_dir, verify_key)
        if not SHA256.fullmatch(found[role].sha256):
            raise PipelineError(f"role {role!r}: {found[role].sha256!r} is not a sha256 (64 hex digits)")
    return found


@functools.cache
def _template() -> jinja2.Template:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)
    env.filters.update(escape.FILTERS)
    return env.get_template(TEMPLATE)


def kickstart_for(inventory: Inventory, node: Node, image: LiveImage, target: str) -> Kickstart:
    return Kickstart(node=node, kernel_args=inventory.kernel_args(node), tuned_profile=inventory.tuned_profile(node),
                     liveimg_url=f"{inventory.site.base_url}/{node.role}/{image.file}",
                     liveimg_sha256=image.sha256, includes=inventory.site.includes,
                     inventory=inventory.path, target=target)


def render(ks: Kickstart, snippets: list[Snippet]) -> tuple[str, list[tuple[int, int, Path]]]:
    """The kickstart's text, and where each snippet landed in it: (first line, last line, file)."""
    parts = [_template().render(ks=ks)]
    line = parts[0].count("\n")
    origins = []
    for snippet in snippets:
        text = snippet.text if snippet.text.endswith("\n") else snippet.text + "\n"
        parts += [f"# snippet {snippet.path.name}\n", text]
        origins.append((line + 2, line + 1 + text.count("\n"), snippet.path))
        line += 1 + text.count("\n")
    return "".join(parts), origins


class Validator:
    """pykickstart for one target, with a fresh handler for every kickstart, made cheaply.

    makeVersion builds some 70 argparse parsers (25 ms, eight times a parse). A deep
    copy of one pristine handler that shares those parsers takes 1 ms and starts from
    the same clean state; a parser keeps nothing between parses but the line number.
    """

    def __init__(self, target: str):
        self.target = target
        self.pristine = makeVersion(target)
        self.shared = {}
        # A few parsers check a value with a method of their command (raid --level,
        # autopart --type, ...), which reports the command's line number: before each
        # parse they are pointed at the copy's command.
        self.callbacks: list[tuple[Any, str]] = []
        for name, command in self.pristine.commands.items():
            op = getattr(command, "op", None)
            if op is not None:
                self.shared[id(op)] = op
                self.callbacks += [(action, name) for action in op._actions
                                   if getattr(action.type, "__self__", None) is command]

    def check(self, text: str) -> None:
        """Parse text as the installer would; any pykickstart error or warning is raised.

        %include is not followed: the installer fetches it, at install time.
        """
        handler = copy.deepcopy(self.pristine, dict(self.shared))
        for action, name in self.callbacks:
            action.type = types.MethodType(action.type.__func__, handler.commands[name])
        parser = KickstartParser(handler, followIncludes=False)
        with warnings.catch_warnings():
            # pykickstart's warnings (deprecated or ignored options) as errors; not other libraries'.
            warnings.simplefilter("error", KickstartWarning)
            parser.readKickstartFromString(text)


def rejection(error: Exception, origins: list[tuple[int, int, Path]]) -> str:
    message = " ".join(str(getattr(error, "message", None) or error).split())
    lineno = getattr(error, "lineno", None)
    if lineno is None and (found := LINE.search(message)):  # warnings carry it only in the text
        lineno = int(found[1])
    if lineno is None:
        return message
    where = f"line {lineno}"
    for first, last, path in origins:
        if first <= lineno <= last:
            where += f" ({path} line {lineno - first + 1})"
    return f"{where}: {message}"


def _publish(texts: dict[str, str], output_dir: Path) -> list[Path]:
    """Write beside output_dir, then move each file into place: a reader (the PXE server)
    sees the old kickstart or the new one, never half of one."""
    output_dir = output_dir.resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        for name, text in texts.items():
            (work / name).write_text(text)
        for name in texts:
            os.replace(work / name, output_dir / name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # A node gone from the inventory must not be installed from a stale kickstart.
    for stale in output_dir.glob("*.ks"):
        if stale.name not in texts:
            stale.unlink()
    return [output_dir / name for name in texts]


def _snippet(inventory: Inventory, path: Path) -> Snippet:
    try:
        return Snippet(path, path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise InventoryError(inventory.path, None, "site.snippets", f"cannot read {path}: {error}") from None


def render_all(inventory: Inventory, output_dir: Path = DEFAULT_OUTPUT_DIR, target: str = DEFAULT_TARGET, *,
               build_dir: Path = DEFAULT_OUTPUT, liveimgs: Mapping[str, LiveImage] | None = None,
               verify_key: str | None = None) -> list[Path]:
    """Render, validate and write output_dir/NODE.ks for every node; nothing is written unless all pass.

    liveimgs: each role's artifact; a role not given is read from build_dir/ROLE/build-info.json
    (from a publish target: its latest version, verified with verify_key, a fingerprint or key file).
    The output directory holds one inventory's kickstarts: any other *.ks in it is removed.
    """
    if target not in TARGETS:
        raise PipelineError(f"unknown kickstart target {target!r}; supported: {', '.join(TARGETS)}")
    images = liveimages(inventory, Path(build_dir), liveimgs or {}, verify_key)
    snippets = [_snippet(inventory, path) for path in inventory.site.snippet_files]
    validator = Validator(target)
    texts = {}
    for node in inventory.nodes.values():
        try:
            text, origins = render(kickstart_for(inventory, node, images[node.role], target), snippets)
        except escape.EscapeError as error:
            raise InventoryError(inventory.path, node.name, None, str(error)) from None
        try:
            validator.check(text)
        except (KickstartError, KickstartWarning) as error:
            raise InventoryError(inventory.path, node.name, None, f"pykickstart ({target}) rejects its kickstart: "
                                 f"{rejection(error, origins)}") from None
        texts[f"{node.name}.ks"] = text
    return _publish(texts, Path(output_dir))


# --- benchmark: many synthetic nodes, through the same code as `inv kickstart.render`


def synthetic_inventory(nodes: int) -> str:
    """An inventory of `nodes` nodes mixing boot modes, DHCP and static addresses, cache or none."""
    lines = ['[site]', 'base_url = "http://10.0.0.1:8080"', '']
    for i in range(nodes):
        host = i + 2  # past the network address and the gateway
        lines += [f'[node.node{i:05d}]',
                  f'macs = ["52:54:00:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}"]',
                  f'boot = "{"uefi" if i % 2 else "bios"}"',
                  'root_disk = "sda"',
                  f'role = "{"host-image" if i % 4 else "guest-image"}"']
        if i % 2:
            lines.append(f'network = {{ address = "10.0.{host >> 8}.{host & 255}", prefix = 16, '
                         'gateway = "10.0.0.1", nameservers = ["10.0.0.1"] }')
        if i % 3 == 0:
            lines.append('cache = { ssd = "nvme0n1", data = "sdb", size_mib = 100000 }')
        lines.append("")
    return "\n".join(lines)


def benchmark(nodes: int = 1000, target: str = DEFAULT_TARGET) -> float:
    """Load, render, validate and write `nodes` synthetic nodes; print and return the seconds taken."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "inventory.toml"
        path.write_text(synthetic_inventory(nodes))
        start = time.perf_counter()
        inventory = inventories.load(path)
        loaded = time.perf_counter()
        fake = {role: LiveImage(Artifacts(Path(tmp), role).liveimg.name, "0" * 64) for role in inventory.spec.images}
        written = render_all(inventory, Path(tmp) / "kickstarts", target, liveimgs=fake)
        end = time.perf_counter()
    print(f"{len(written)} kickstarts for {target}: load {loaded - start:.2f} s, render + validate + write "
          f"{end - loaded:.2f} s, total {end - start:.2f} s")
    return end - start
