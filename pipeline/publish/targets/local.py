"""A publish target on this machine's file system: TARGET/NAME/ is a directory here."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

from ...errors import PipelineError
from ...locking import lock_or_refuse
from ..verify import check_sums
from .base import INCOMING, LATEST, LATEST_TEMP, LOCK, PRUNING, Listing, listing_of


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(directory: Path) -> None:
    for entry in directory.iterdir():
        _fsync(entry)
    _fsync(directory)


class LocalTarget:
    """TARGET/NAME/ on a local file system; versions are renamed into place and fsync'd."""

    tools: tuple[str, ...] = ("gpg", "sha256sum")

    def __init__(self, root: Path, name: str):
        self.directory = Path(root).resolve() / name

    def __str__(self) -> str:
        return str(self.directory)

    def location(self, entry: str) -> str:
        return str(self.directory / entry)

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Only one publish at a time per image and target: its leftovers are then surely dead."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with lock_or_refuse(self.directory / LOCK, f"{self.directory}: another publish is running"):
            yield

    def listing(self) -> Listing:
        entries = []
        with os.scandir(self.directory) as scan:
            for entry in scan:
                kind = "l" if entry.is_symlink() else "d" if entry.is_dir() else "f"
                link = os.readlink(entry.path) if kind == "l" else ""
                entries.append((entry.name, kind, entry.stat(follow_symlinks=False).st_mtime, link))
        return listing_of(entries)

    def read(self, entry: str) -> str | None:
        try:
            return (self.directory / entry).read_text()
        except FileNotFoundError:
            return None

    @contextlib.contextmanager
    def staging(self, version: str, near: Path) -> Iterator[Path]:
        """The hidden directory the version is assembled in; gone on failure, renamed by commit."""
        staged = self.directory / f"{INCOMING}{version}-{os.getpid()}"
        try:
            yield staged
        finally:
            shutil.rmtree(staged, ignore_errors=True)

    def commit(self, staged: Path, version: str) -> None:
        _fsync_tree(staged)
        try:
            os.rename(staged, self.directory / version)
        except OSError as error:
            raise PipelineError(f"{self.directory / version}: cannot move the new version into place: "
                                f"{error.strerror}") from None
        _fsync(self.directory)

    def point_latest(self, version: str) -> None:
        check_sums(self.directory / version)  # never point at a version whose files changed
        temporary = self.directory / f"{LATEST_TEMP}{os.getpid()}"
        temporary.unlink(missing_ok=True)
        os.symlink(version, temporary)
        try:
            os.replace(temporary, self.directory / LATEST)
        except OSError as error:
            temporary.unlink()
            raise PipelineError(f"{self.directory / LATEST}: cannot replace it: {error.strerror}") from None
        _fsync(self.directory)

    def remove(self, entries: Sequence[str]) -> None:
        for entry in entries:
            path = self.directory / entry
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)

    def prune(self, versions: Sequence[str]) -> None:
        """Each version hidden by a rename, then deleted: a crash mid-delete leaves a leftover that
        the next publish removes, never a half version."""
        hidden = [f"{PRUNING}{version}-{os.getpid()}" for version in versions]
        for version, name in zip(versions, hidden, strict=True):
            os.rename(self.directory / version, self.directory / name)
        _fsync(self.directory)
        self.remove(hidden)
