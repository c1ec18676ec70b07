"""tuned profiles, checked before a build the way the image's tuned will read them.

tuned itself never refuses a bad profile loudly: an unknown plugin is logged and
skipped, an include loop is silently cut, and a profile that does not parse
leaves the machine untuned. So we read the profile with tuned's own rules and
its own reference data (built-in profiles, plugins), taken from the tuned .deb
the image installs (its release's, from its mirror: pipeline/archive.py), and
refuse it here with the file and line.

The rules mirrored are those of tuned 2.20.0's tuned/profiles/loader.py,
locator.py, unit.py and variables.py; each is cited where it is used.
"""

from __future__ import annotations

import configparser
import difflib
import io
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .archive import ReleaseArchive
from .errors import CommandFailed, PipelineError
from .paths import DEFAULT_CACHE
from .run import run

PACKAGE = "tuned"
# Inside the .deb: tuned's built-in profiles. consts.SYSTEM_PROFILES_DIR since tuned 2.23
# (trixie), consts.LOAD_DIRECTORIES[0] before (bookworm's 2.20).
PROFILES_DIRS = (Path("usr/lib/tuned/profiles"), Path("usr/lib/tuned"))
PLUGINS_DIR = Path("usr/lib/python3/dist-packages/tuned/plugins")
MAIN = "main"  # consts.PLUGIN_MAIN_UNIT_NAME: profile options, not a plugin
VARIABLES = "variables"  # loader.py:60-62 takes this unit out before plugins are made
# loader.py:32, Loader.safe_name: what `tuned-adm profile NAME` accepts.
SAFE_NAME = re.compile(r"[a-zA-Z0-9_.-]+")
# loader.py:95: expanded in every value as the file is read.
PROFILE_DIR_VAR = re.compile(r"(?<!\\)\$\{i:PROFILE_DIR\}")
# function_virt_check.py: argument 1 inside a VM, argument 2 on bare metal.
VIRT_CHECK = re.compile(r"(?<!\\)\$\{f:virt_check:([^:{}]*):([^:{}]*)\}")
UNEXPANDED = re.compile(r"(?<!\\)\$\{[^}]*\}?")
INLINE_COMMENT = re.compile(r"(?:^|(?<=\s))#")
# plugin_vm.py (tuned >= 2.23): `@command_custom("dirty_ratio")` writes /proc/sys/vm/dirty_ratio.
VM_SYSCTL_OPTION = re.compile(r'@command_custom\("(dirty_\w+)"')
TRUE = ("1", "true", "yes", "y", "on")  # tuned's utils/config.py get_bool


class ProfileError(PipelineError):
    """A tuned profile tuned would misread. Renders as `FILE:LINE: problem`."""

    def __init__(self, path: Path | None, line: int | None, problem: str):
        where = "" if path is None else f"{path}:{line}: " if line else f"{path}: "
        super().__init__(where + problem)


@dataclass(frozen=True)
class TunedReference:
    """What one tuned release knows: its built-in profiles and its plugins."""

    version: str
    profiles: dict[str, Path]  # built-in profile name -> its tuned.conf
    plugins: frozenset[str]
    # The vm plugin's options that set a vm.* sysctl (dirty_ratio, ...: tuned >= 2.23), which
    # the sysctl plugin can set too.
    vm_sysctl_options: frozenset[str] = frozenset()


# --- reference data, from the tuned .deb (never installed: its daemon would retune the host)


def _tool(argv: list[str | Path], what: str) -> str:
    try:
        return run(argv, capture=True).stdout
    except FileNotFoundError:
        raise PipelineError(f"{what}: {argv[0]} not found (Debian package dpkg)") from None
    except CommandFailed as error:
        raise PipelineError(f"{what}: {error}") from None


def _read_reference(version: str, root: Path) -> TunedReference:
    profiles_dir = next((d for d in PROFILES_DIRS if (root / d).is_dir()), PROFILES_DIRS[-1])
    profiles = {conf.parent.name: conf for conf in sorted((root / profiles_dir).glob("*/tuned.conf"))}
    plugins = frozenset(p.stem.removeprefix("plugin_") for p in (root / PLUGINS_DIR).glob("plugin_*.py"))
    if not profiles or not plugins:
        raise PipelineError(f"{root}: no built-in profiles in {profiles_dir} or no plugins in {PLUGINS_DIR}; "
                            f"has the {PACKAGE} package's layout changed? (remove {root} to extract it again)")
    vm_plugin = root / PLUGINS_DIR / "plugin_vm.py"
    vm_sysctl_options = frozenset(VM_SYSCTL_OPTION.findall(vm_plugin.read_text()) if vm_plugin.is_file() else ())
    return TunedReference(version=version, profiles=profiles, plugins=plugins, vm_sysctl_options=vm_sysctl_options)


def reference(archive: ReleaseArchive, cache_dir: Path = DEFAULT_CACHE, version: str | None = None) -> TunedReference:
    """tuned's built-in profiles and plugins, from the .deb an image of the archive's release installs.

    version defaults to that release's candidate, asked of its own package index (not the
    build host's apt: a Debian 12 host would name bookworm's tuned for a trixie image).
    The package is extracted once into cache_dir/tuned-VERSION; later calls read that
    directory, and need no network while the release's index is fresh.
    """
    version = version or archive.candidate(PACKAGE)
    root = Path(cache_dir) / f"{PACKAGE}-{version}"
    if root.is_dir():
        return _read_reference(version, root)
    root.parent.mkdir(parents=True, exist_ok=True)
    # Download and extract beside the final directory, then rename: a directory
    # that exists is always complete, even after an interrupt or a concurrent run.
    work = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        deb = archive.download(PACKAGE, version, work)
        found = _tool(["dpkg-deb", "-f", deb, "Version"], f"cannot read {deb.name}").strip()
        if found != version:
            raise PipelineError(f"{deb.name}: is {PACKAGE} {found}, not the {version} apt-cache named")
        _tool(["dpkg-deb", "-x", deb, work / "root"], f"cannot extract {deb.name}")
        try:
            (work / "root").rename(root)
        except OSError:
            if not root.is_dir():  # not a concurrent run that got there first
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _read_reference(version, root)


# --- one tuned.conf, read as tuned reads it


@dataclass(frozen=True)
class _Conf:
    path: Path
    sections: dict[str, dict[str, str]]  # as loader.py hands them on: raw values, PROFILE_DIR expanded
    lines: dict[tuple[str, str | None], int]  # (section, None): header line; (section, key): line of the value used

    def line(self, section: str, key: str | None = None) -> int | None:
        found = self.lines.get((section, key))
        if found is None and key is not None:  # a [DEFAULT] value shows in every section
            found = self.lines.get((configparser.DEFAULTSECT, key))
        return found


def _uncommented(line: str) -> str:
    """A line without its comment, as configparser's _read strips it for tuned's settings."""
    if line.strip().startswith(("#", ";")):  # default comment_prefixes
        return ""
    match = INLINE_COMMENT.search(line)  # inline_comment_prefixes=('#'): at the start or after a space
    return line[:match.start() if match else None].strip()


def _line_numbers(lines: list[str]) -> dict[tuple[str, str | None], int]:
    """Where each section and key is, for a file configparser has already accepted.

    configparser keeps no line numbers, so this follows its _read (Python 3.11,
    as on Debian 12): comments, continuation lines (indented deeper than their
    key), `[header]`, `key = value` split at the first '='. With strict=False a
    repeated key's last value wins, so its last line is kept; a repeated
    section keeps its first header.
    """
    found: dict[tuple[str, str | None], int] = {}
    section, key, indent = None, None, 0
    for number, line in enumerate(lines, start=1):
        value = _uncommented(line)
        if not value:
            continue  # empty_lines_in_values=True: a blank line does not end a value
        line_indent = len(line) - len(line.lstrip())
        if section is not None and key and line_indent > indent:
            continue
        indent = line_indent
        header = configparser.ConfigParser.SECTCRE.match(value)
        if header:
            section, key = header["header"], None
            found.setdefault((section, None), number)
        elif section is not None:  # configparser refuses a key before any [section]
            key = value.split("=", 1)[0].rstrip()  # optionxform = str: keys keep their case
            found[(section, key)] = number
    return found


def _parse(path: Path) -> _Conf:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ProfileError(path, None, f"cannot read: {error.strerror}") from None
    try:
        text = data.decode()
    except UnicodeDecodeError as error:
        raise ProfileError(path, data[:error.start].count(b"\n") + 1, "not UTF-8 text") from None
    # newline=None: universal newlines, as tuned's open(file_name) gives configparser.
    lines = io.StringIO(text, newline=None).readlines()
    # loader.py:99-100, Loader._load_config_data: exactly tuned's parser settings.
    # strict=False: a repeated section or key is no error, the last value wins.
    parser = configparser.ConfigParser(delimiters=("=",), inline_comment_prefixes=("#",), strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # as tuned does: keys keep their case
    try:
        parser.read_file(lines, str(path))
    except configparser.MissingSectionHeaderError as error:
        raise ProfileError(path, error.lineno, f"{error.line.strip()!r} comes before any [section] header "
                           "(tuned.conf starts with [main] or a plugin's section)") from None
    except configparser.ParsingError as error:
        number = error.errors[0][0]
        more = f" (and {len(error.errors) - 1} more bad lines)" if len(error.errors) > 1 else ""
        raise ProfileError(path, number, f"tuned cannot parse {lines[number - 1].strip()!r}: expected "
                           f"'[section]', 'key=value' or a '#' comment{more}") from None
    except configparser.Error as error:
        raise ProfileError(path, None, f"tuned cannot parse it: {str(error).splitlines()[0]}") from None
    profile_dir = os.path.dirname(path)
    # loader.py:111-112: values are read raw (no % interpolation), then ${i:PROFILE_DIR} is expanded.
    sections = {name: {key: PROFILE_DIR_VAR.sub(lambda _: profile_dir, parser.get(name, key, raw=True))
                       for key in parser.options(name)}
                for name in parser.sections()}
    return _Conf(path=path, sections=sections, lines=_line_numbers(lines))


def _check_units(conf: _Conf, ref: TunedReference) -> None:
    known = ", ".join(sorted(ref.plugins))
    for name, options in conf.sections.items():
        if name in (MAIN, VARIABLES):
            continue
        # unit.py:186: a section is an instance of the plugin named by type=, else by its own name.
        plugin = options.get("type", name)
        if plugin in ref.plugins:
            continue
        if "type" in options:
            raise ProfileError(conf.path, conf.line(name, "type"),
                               f"[{name}] type={plugin} names no tuned {ref.version} plugin; known plugins: {known}")
        raise ProfileError(conf.path, conf.line(name),
                           f"section [{name}] is no tuned {ref.version} plugin (set type=PLUGIN for a named "
                           f"instance); known plugins: {known}")


def _include_names(conf: _Conf) -> list[str]:
    """The profiles [main] include= names, split and expanded as loader.py:89 does."""
    raw = conf.sections[MAIN]["include"]
    line = conf.line(MAIN, "include")
    # tuned expands include= with the variables it has when it reads it: none from
    # [variables] yet (those are added after every profile is loaded, loader.py:60),
    # and ${f:...} functions that run on the target. Only virt_check is knowable
    # here, and both of its branches must name good profiles.
    variants = [VIRT_CHECK.sub(r"\1", raw), VIRT_CHECK.sub(r"\2", raw)] if VIRT_CHECK.search(raw) else [raw]
    names: list[str] = []
    for value in variants:
        left = UNEXPANDED.search(value)
        if left:
            raise ProfileError(conf.path, line, f"include={raw}: tuned cannot expand {left[0]} when it reads "
                               "include= ([variables] are not defined yet, ${f:...} runs on the target); "
                               "name the profiles")
        value = re.sub(r"\\(\$\{\w+\})", r"\1", value)  # variables.py:359: \${X} is a literal ${X}
        # Comma or semicolon, NOT whitespace: "a b" is one (unknown) profile name.
        names += [n for n in re.split(r"\s*[,;]\s*", value) if n not in names]
    return names


# --- the include chain, walked as Loader._load_profile walks it


class _Walk:
    def __init__(self, search_dirs: list[Path], ref: TunedReference):
        self.search_dirs = [Path(d) for d in search_dirs]
        self.ref = ref
        self.loaded: list[Path] = []  # loader.py's processed_files, in load order
        self.merged: list[_Conf] = []  # in merge order: a profile's includes before the profile
        self.chain: list[tuple[str, Path]] = []  # the includes being followed, outermost first

    def candidates(self, name: str) -> list[Path]:
        """Every NAME/tuned.conf, most important first: ours in order, then the built-in.

        locator.py:32-41: tuned tries /etc/tuned before /usr/lib/tuned and takes
        the first file it has not loaded yet, so a profile of ours can include the
        built-in of the same name. basename() as there: "a/b" means "b".
        """
        base = os.path.basename(name)
        found = [Path(os.path.normpath(os.path.join(d, base, "tuned.conf"))) for d in self.search_dirs]
        found = [p for p in found if p.is_file()]
        if base in self.ref.profiles:
            found.append(self.ref.profiles[base])
        return found

    def unknown(self, name: str) -> str:
        searched = ", ".join(str(d) for d in self.search_dirs) or "no profile directory"
        problem = (f"no {name}/tuned.conf in {searched}, and tuned {self.ref.version} has no built-in "
                   f"profile {name!r}")
        if re.search(r"\s", name):
            problem += " (tuned separates include= names with ',' or ';', not spaces)"
        else:
            close = difflib.get_close_matches(name, list(self.ref.profiles), n=1)
            problem += f" (did you mean {close[0]!r}?)" if close else ""
        return problem

    def include(self, name: str, conf: _Conf | None) -> None:
        where: tuple[Path | None, int | None] = (conf.path, conf.line(MAIN, "include")) if conf else (None, None)
        # locator.py:28-30: "-name" is a conditional include, skipped when missing.
        optional = name.startswith("-") and conf is not None
        name = name[1:] if optional else name
        if not name:
            raise ProfileError(*where, "include= has an empty profile name (a stray ',' or ';'?)")
        files = self.candidates(name)
        fresh = [f for f in files if f not in self.loaded]
        if not fresh:
            # tuned skips every file it has loaded already (locator.py:36-38). After
            # a diamond that is harmless; back into the chain it is a loop tuned cuts
            # without a word, so the profile is not what its author meant.
            back = next((i for i, (_, f) in enumerate(self.chain) if f in files), None)
            if back is not None:
                loop = " -> ".join([n for n, _ in self.chain[back:]] + [name])
                raise ProfileError(*where, f"include loop: {loop}")
            if files or optional:
                return
            if conf is None:
                raise ProfileError(None, None, f"tuned profile {name!r} not found: {self.unknown(name)}")
            raise ProfileError(*where, f"include={name}: unknown profile: {self.unknown(name)}")
        self.load(name, fresh[0])

    def load(self, name: str, path: Path) -> None:
        self.loaded.append(path)
        conf = _parse(path)
        _check_units(conf, self.ref)
        if "include" in conf.sections.get(MAIN, {}):
            self.chain.append((name, path))
            for included in _include_names(conf):
                self.include(included, conf)
            self.chain.pop()
        self.merged.append(conf)


def _check_one_value_per_sysctl(merged: list[_Conf], ref: TunedReference) -> None:
    """tuned >= 2.23 sets vm.dirty_* from [vm] too (its own profiles moved them there). A value
    set by both plugins, differently, is applied twice, and `tuned-adm verify` fails on the
    plugin whose value lost; refuse that here, pointing at the [sysctl] line."""
    # profiles/merger.py: units merge by section name, the later profile's options winning,
    # unless it says replace=1.
    units: dict[str, dict[str, tuple[str, _Conf, str]]] = {}
    for conf in merged:
        for name, options in conf.sections.items():
            if name in (MAIN, VARIABLES):
                continue
            if options.get("replace", "").strip().lower() in TRUE:
                units[name] = {}
            units.setdefault(name, {}).update({key: (value, conf, name) for key, value in options.items()})

    def settings(plugin: str) -> dict[str, tuple[str, _Conf, str]]:
        return {key: value for name, unit in units.items() if unit.get("type", (name,))[0].strip() == plugin
                for key, value in unit.items()}

    sysctl, vm = settings("sysctl"), settings("vm")
    for option in sorted(ref.vm_sysctl_options & vm.keys()):
        if f"vm.{option}" not in sysctl:
            continue
        (value, conf, section), (vm_value, vm_conf, vm_section) = sysctl[f"vm.{option}"], vm[option]
        if value.strip() != vm_value.strip():
            raise ProfileError(conf.path, conf.line(section, f"vm.{option}"),
                               f"[{section}] vm.{option}={value.strip()}, but [{vm_section}] {option}="
                               f"{vm_value.strip()} ({vm_conf.path}:{vm_conf.line(vm_section, option)}): tuned "
                               f"{ref.version} sets it from both, and `tuned-adm verify` fails; set "
                               f"{option}={value.strip()} in [vm] too")


def resolve(name: str, search_dirs: list[Path], ref: TunedReference) -> list[Path]:
    """The tuned.conf files tuned loads for profile NAME, in its load order; ProfileError if any is bad.

    search_dirs are ours, most important first; tuned's built-ins come after them.
    """
    if not SAFE_NAME.fullmatch(name):
        raise ProfileError(None, None, f"invalid tuned profile name {name!r}: tuned accepts only letters, "
                           "digits, '_', '.' and '-'")
    walk = _Walk(search_dirs, ref)
    walk.include(name, None)
    _check_one_value_per_sysctl(walk.merged, ref)
    return walk.loaded


def validate_profile(name: str, search_dirs: list[Path], ref: TunedReference) -> None:
    """Refuse, with file and line, a profile that tuned would misread, loop on, or not find."""
    resolve(name, search_dirs, ref)
