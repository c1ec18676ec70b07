"""Our SELinux policy modules: sources live in elements/<element>/selinux/*.te (every
release) and elements/<element>/selinux/<release>/*.te (what only that Debian release's
policy lacks), and are compiled on the build host before DIB starts, so a module that
does not compile stops the build in seconds with the compiler's message, not deep
inside a chroot.
"""

from __future__ import annotations

from pathlib import Path

from .errors import PipelineError
from .paths import ELEMENTS
from .run import run


def _element_dir(name: str, search: tuple[Path, ...]) -> Path | None:
    return next((d / name for d in search if (d / name).is_dir()), None)


def _closure_dirs(elements: tuple[str, ...], search: tuple[Path, ...]) -> dict[str, Path]:
    """Each element of the closure (see element_closure) with its directory."""
    seen: dict[str, Path] = {}
    pending = list(elements)
    while pending:
        name = pending.pop()
        directory = _element_dir(name, search)
        if name in seen or directory is None:
            continue
        seen[name] = directory
        deps = directory / "element-deps"
        if deps.is_file():
            pending += [line.strip() for line in deps.read_text().splitlines() if line.strip()]
    return seen


def element_closure(elements: tuple[str, ...], search: tuple[Path, ...] = (ELEMENTS,)) -> list[str]:
    """The spec's elements plus everything they depend on, among the elements in `search`
    (the user's element directories, then ours; DIB's own carry no policy)."""
    return sorted(_closure_dirs(elements, search))


def module_sources(elements: tuple[str, ...], release: str, search: tuple[Path, ...] = (ELEMENTS,)) -> list[Path]:
    """The closure's modules for every release, then those for `release` only."""
    return sorted((source for directory in _closure_dirs(elements, search).values()
                   for pattern in ("*.te", f"{release}/*.te") for source in (directory / "selinux").glob(pattern)),
                  key=lambda source: source.name)


def compile_modules(sources: list[Path], output: Path) -> list[Path]:
    """Compile each .te into a .pp in `output`; a PipelineError names the file and the line."""
    output.mkdir(parents=True, exist_ok=True)
    packages = []
    for source in sources:
        module = output / f"{source.stem}.mod"
        package = output / f"{source.stem}.pp"
        result = run(["checkmodule", "-M", "-m", "-o", module, source], capture=True, check=False)
        if result.returncode != 0:
            # checkmodule says "ERROR '...' at token '...' on line N:" somewhere in its output.
            output_lines = (result.stderr + result.stdout).splitlines()
            detail = next((line for line in output_lines if "ERROR" in line), output_lines[-1:] or ["failed"])
            raise PipelineError(f"{source}: SELinux policy module does not compile: {''.join(detail)}")
        contexts = source.with_suffix(".fc")
        command: list[str | Path] = ["semodule_package", "-o", package, "-m", module]
        if contexts.is_file():
            command += ["-f", contexts]
        run(command)
        packages.append(package)
    return packages
