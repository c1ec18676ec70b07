"""A publish target over ssh: `[user@]host:/path` or `ssh://[user@]host[:port]/path`.

The version is staged locally beside the build, copied with `rsync -a` over ssh into a hidden
.incoming-VERSION-PID there, checked there with `sha256sum --check`, renamed with `mv -T`, and
`latest` replaced with `ln -sfn` to a temporary name and `mv -T`. Every ssh has connect and
keep-alive timeouts and every remote command a deadline. The lock is held by `flock` over an ssh
session whose stdin only this process holds: a publish killed with SIGKILL lets go too, and if
that session ends, the publish stops before its next change there.
"""

from __future__ import annotations

import contextlib
import os
import select
import shlex
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

from ...errors import CommandTimedOut, PipelineError
from ...progress import step
from ...run import hold, release, run
from .base import INCOMING, LATEST, LATEST_TEMP, LOCK, PRUNING, Listing, listing_of


def _alive(pid: str) -> bool:
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


# Remote steps are fixed scripts run by `sh -c SCRIPT sh ARGS...`: arguments never go into a script's text.
REMOTE_LIST = 'mkdir -p -- "$1" && find "$1" -mindepth 1 -maxdepth 1 -printf "%f\\t%y\\t%T@\\t%l\\n"'
# The copy checked with sha256sum and flushed, then renamed into place.
REMOTE_COMMIT = ('cd -- "$1/$2" && sha256sum --check --strict --quiet SHA256SUMS && sync -- * . '
                 '&& mv -T -- "$1/$2" "$1/$3" && sync -- "$1"')
# Prints "locked" once it holds the lock, then holds it until its stdin ends.
REMOTE_LOCK = ('mkdir -p -- "$1" && exec flock --nonblock --conflict-exit-code 75 "$1/$2" '
               'sh -c \'echo locked && exec cat >/dev/null\'')
REMOTE_LOCK_BUSY = 75
# The version's files checked, then a fresh symlink renamed over `latest`.
REMOTE_LATEST = ('cd -- "$1/$2" && sha256sum --check --strict --quiet SHA256SUMS '
                 '&& ln -sfn -- "$2" "$1/$3" && mv -T -- "$1/$3" "$1/latest" && sync -- "$1"')
# Every version hidden by a rename first, then deleted (as LocalTarget.prune).
REMOTE_PRUNE = (f'dir=$1 tag=$2; shift 2; for v; do mv -T -- "$dir/$v" "$dir/{PRUNING}$v-$tag" || exit; done; '
                f'sync -- "$dir"; for v; do rm -rf -- "$dir/{PRUNING}$v-$tag" || exit; done')
# ssh gives up on a host that does not answer, or stops answering; the user's -o options come
# first, and ssh keeps the first value it is given, so they can set these too.
SSH_DEADLINES = ("ConnectTimeout=30", "ServerAliveInterval=15", "ServerAliveCountMax=4")
REMOTE_DEADLINE = 15 * 60  # seconds for any remote command (sha256sum --check of a version included)
COPY_DEADLINE = 4 * 3600  # seconds for rsync to copy a version


class RemoteTarget:
    """TARGET/NAME/ on a host reached over ssh (see the module's docstring)."""

    tools: tuple[str, ...] = ("gpg", "sha256sum", "rsync", "ssh")

    def __init__(self, host: str, path: str, name: str, port: int | None = None, ssh_options: Sequence[str] = ()):
        # host as rsync writes it: [user@]name, an IPv6 address in brackets
        self.host, self.port, self.ssh_options = host, port, tuple(ssh_options)
        self.directory = f"{path.rstrip('/') or '/'}/{name}".replace("//", "/")
        self._lock: subprocess.Popen | None = None  # run.hold's process: the ssh session holding LOCK there

    def __str__(self) -> str:
        return self.location("").rstrip("/")

    def location(self, entry: str) -> str:
        """As the user wrote the target: host:path, or an ssh:// URL when it has a port."""
        if self.port is None:
            return f"{self.host}:{self.directory}/{entry}"
        return f"ssh://{self.host}:{self.port}{self.directory}/{entry}"

    def ssh_command(self) -> list[str]:
        argv = ["ssh", "-o", "BatchMode=yes"]
        if self.port is not None:
            argv += ["-p", str(self.port)]
        for option in (*self.ssh_options, *SSH_DEADLINES):
            argv += ["-o", option]
        return argv

    def _ssh_argv(self, argv: list[str]) -> list[str]:
        """argv run on the host: quoted for its shell, as ssh hands the command to it."""
        host = self.host.replace("[", "").replace("]", "")  # ssh takes an IPv6 address bare
        return [*self.ssh_command(), "--", host, shlex.join(argv)]

    def _run(self, argv: list[str], what: str, deadline: float | None = None, **options):
        deadline = deadline or REMOTE_DEADLINE
        try:
            return run(argv, timeout=deadline, **options)
        except CommandTimedOut:
            raise PipelineError(f"{self.host}: {what} did not finish within {deadline:g} s: "
                                "the host or the network is not answering") from None

    def ssh(self, argv: list[str], *, capture: bool = False, check: bool = True):
        return self._run(self._ssh_argv(argv), f"ssh {argv[0]}", capture=capture, check=check)

    def _script(self, script: str, *args: str, capture: bool = False):
        return self.ssh(["sh", "-c", script, "sh", *args], capture=capture)

    def _require_lock(self, before: str) -> None:
        """Stop if the ssh session holding the lock has ended: another publish may hold it now."""
        if self._lock is None or self._lock.poll() is not None:
            raise PipelineError(f"{self}: the ssh session holding {LOCK} there has ended: stopped before {before}")

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Only one publish at a time per image and target, as on a local target."""
        holder = hold(self._ssh_argv(["sh", "-c", REMOTE_LOCK, "sh", self.directory, LOCK]))
        assert holder.stdin and holder.stdout and holder.stderr  # hold() opens all three pipes
        try:
            answered, _, _ = select.select([holder.stdout], [], [], REMOTE_DEADLINE)
            if not answered:  # released below: stdin closed, then stopped if it lingers
                raise PipelineError(f"{self.host}: taking {LOCK} did not finish within {REMOTE_DEADLINE:g} s: "
                                    "the host or the network is not answering")
            if holder.stdout.readline().strip() != b"locked":
                holder.stdin.close()
                error = holder.stderr.read().decode(errors="replace").strip()
                if holder.wait() == REMOTE_LOCK_BUSY:
                    raise PipelineError(f"{self}: another publish is running (it holds {LOCK})")
                raise PipelineError(f"{self}: cannot take {LOCK} there: "
                                    f"{error.splitlines()[-1] if error else f'ssh exited {holder.returncode}'}")
            self._lock = holder
            yield
        finally:
            self._lock = None
            release(holder)

    def listing(self) -> Listing:
        out = self._script(REMOTE_LIST, self.directory, capture=True).stdout
        entries = []
        for line in out.splitlines():
            name, kind, mtime, link = ([*line.split("\t"), "", "", "", ""])[:4]
            entries.append((name, kind, float(mtime or 0), link))
        return listing_of(entries)

    def read(self, entry: str) -> str | None:
        result = self.ssh(["cat", "--", f"{self.directory}/{entry}"], capture=True, check=False)
        return result.stdout if result.returncode == 0 else None

    @contextlib.contextmanager
    def staging(self, version: str, near: Path) -> Iterator[Path]:
        """Assembled locally beside the build (hard links work there), removed afterwards,
        and by the next publish if this one is killed."""
        for leftover in Path(near).glob(".publish-*"):
            if not _alive(leftover.name.rpartition("-")[2]):
                shutil.rmtree(leftover, ignore_errors=True)
        staged = Path(near) / f".publish-{version}-{os.getpid()}"
        try:
            yield staged
        finally:
            shutil.rmtree(staged, ignore_errors=True)

    def commit(self, staged: Path, version: str) -> None:
        incoming = staged.name.replace(".publish-", INCOMING, 1)
        try:
            self._require_lock(f"copying {version}")
            with step(f"copy to {self.host}"):
                self._run(["rsync", "-a", "-e", shlex.join(self.ssh_command()), "--",
                           f"{staged}/", f"{self.host}:{self.directory}/{incoming}/"], "rsync", deadline=COPY_DEADLINE)
            self._require_lock(f"moving {version} into place")
            self._script(REMOTE_COMMIT, self.directory, incoming, version)
        except BaseException:
            self.ssh(["rm", "-rf", "--", f"{self.directory}/{incoming}"], check=False)
            raise

    def point_latest(self, version: str) -> None:
        self._require_lock(f"pointing {LATEST} at {version}")
        self._script(REMOTE_LATEST, self.directory, version, f"{LATEST_TEMP}{os.getpid()}")

    def remove(self, entries: Sequence[str]) -> None:
        if entries:
            self._require_lock(f"removing {', '.join(entries)}")
            self.ssh(["rm", "-rf", "--", *(f"{self.directory}/{entry}" for entry in entries)])

    def prune(self, versions: Sequence[str]) -> None:
        if versions:
            self._require_lock(f"pruning {', '.join(versions)}")
            self._script(REMOTE_PRUNE, self.directory, str(os.getpid()), *versions)
