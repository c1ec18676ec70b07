"""What every publish target is: the Target protocol that LocalTarget (local.py) and
RemoteTarget (remote.py) implement, and the names a target's NAME directory holds.

TARGET/NAME/ holds one directory per VERSION, `latest` (a symlink to one) and the lock; any other
entry is the hidden remains of a killed publish, which the next publish removes.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..verify import VERSION

LATEST = "latest"
INCOMING = ".incoming-"  # a version being assembled or copied
LATEST_TEMP = ".latest-"  # a symlink about to be renamed over `latest`
PRUNING = ".pruning-"  # a version being deleted: hidden first, so no half version is ever visible
LOCK = ".publish.lock"


@dataclass
class Listing:
    """What a target's NAME directory holds."""

    versions: dict[str, float]  # visible version -> modification time
    latest: str | None
    leftovers: list[str]  # hidden remains of killed publishes


def listing_of(entries: list[tuple[str, str, float, str]]) -> Listing:
    """From (name, type d|l|f, mtime, symlink target) of each entry."""
    listing = Listing({}, None, [])
    for name, kind, mtime, link in entries:
        if kind == "d" and VERSION.fullmatch(name):
            listing.versions[name] = mtime
        elif name == LATEST and kind == "l":
            listing.latest = link
        elif name.startswith((INCOMING, LATEST_TEMP, PRUNING)):
            listing.leftovers.append(name)
    return listing


class Target(Protocol):
    """A place versions are published to, as TARGET/NAME/VERSION and TARGET/NAME/latest.

    publish() calls, in order: session() around everything else; listing(); remove() of the
    leftovers; staging() and commit() of a new version, or read() of a published one's SHA256SUMS;
    point_latest(); prune()."""

    tools: tuple[str, ...]  # host commands it runs

    def location(self, entry: str) -> str:
        """Where `entry` of NAME/ is, as the user would write it."""
        ...

    def session(self) -> AbstractContextManager[None]:
        """Holds LOCK on NAME/ for the block: one publish at a time, so leftovers are surely dead."""
        ...

    def listing(self) -> Listing: ...

    def read(self, entry: str) -> str | None:
        """The text of NAME/entry; None when there is no such file."""
        ...

    def staging(self, version: str, near: Path) -> AbstractContextManager[Path]:
        """A directory to assemble the version in (`near` the build), removed when the block ends."""
        ...

    def commit(self, staged: Path, version: str) -> None:
        """Make the staged tree NAME/version, whole or not at all."""
        ...

    def point_latest(self, version: str) -> None:
        """Point NAME/latest at version, once its files pass sha256sum --check."""
        ...

    def remove(self, entries: Sequence[str]) -> None: ...

    def prune(self, versions: Sequence[str]) -> None:
        """Delete versions, each hidden by a rename first: never a half version visible."""
        ...
