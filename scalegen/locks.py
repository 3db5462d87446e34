"""Folder locks: one writer per output folder (a run, shards, assets, an evaluation, a refinement).

Two commands writing into one folder interleave their files (two trainers on one run folder end with
one's checkpoint, the other's config.yaml and both their metrics), so every command that writes a
folder holds its lock while it writes; a second writer is refused with a line naming the holder.

Shared filesystems (NFS) do not make ``flock`` reliable, so the lock is a file created with
``O_CREAT | O_EXCL`` (atomic on NFSv3+ and local filesystems) *beside* the folder
(``PARENT/.NAME.lock``, so a folder that is still to be created, or built in a staging sibling, can be
locked, and a refused or failed start leaves nothing inside it). The file holds the holder's host,
pid, start time, command and job id; a daemon thread refreshes its mtime every ``HEARTBEAT_S``
(the heartbeat). A lock is stale, and is taken over with a line saying so, when

- its holder ran on this host and that pid is no longer alive (a killed process), or
- its holder ran on another host and the heartbeat is older than ``STALE_S`` (a dead node), or
- it was left by an earlier attempt of this very job (same job id: a launcher that restarts the ranks
  of a job after a failure, ``torchrun --max-restarts``).

Several ranks of one job: only rank 0 (the process that writes the shared files) takes the lock; the
other ranks take none, so the launched ranks never refuse each other. A process may take the lock of a
folder it already holds again (nested: ``refine`` locks its folder, then trains in it).

Ground floor (beside ``errors`` and ``atomic``): any room may lock a folder.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

from scalegen import atomic
from scalegen.errors import ScalegenError

HEARTBEAT_S = 30.0  # how often a holder refreshes its lock file's mtime
STALE_S = 300.0  # a lock of another host whose heartbeat is older than this is stale (many heartbeats missed)

_held: dict[Path, FolderLock] = {}  # lock file -> the lock this process holds (for nesting)
_held_guard = threading.Lock()


class FolderLocked(ScalegenError):
    """Another live process writes into the folder."""


def lock_path(folder: str | Path) -> Path:
    """The lock file of ``folder``: a hidden sibling, so the folder itself need not exist."""
    folder = Path(os.path.abspath(folder))
    return folder.with_name(f".{folder.name}.lock")


def job_id() -> str | None:
    """An id shared by every rank and every restart of one launched job, or None outside a launcher:
    SLURM's job id, else torchrun's rendezvous id (``--rdzv-id``; "none" is torchrun's default and no id)."""
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm-{os.environ['SLURM_JOB_ID']}"
    rid = os.environ.get("TORCHELASTIC_RUN_ID")
    if rid and rid != "none":
        return f"torchrun-{rid}"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _describe(info: dict) -> str:
    return f"pid {info.get('pid')} on host {info.get('host')}"


class FolderLock:
    """The lock of one folder; ``with FolderLock(folder, "scalegen train"):`` writes under it.

    ``log``: where the takeover of a stale lock is announced (one line). ``rank``: only rank 0 locks.
    """

    def __init__(self, folder: str | Path, command: str, log=print, rank: int | None = None,
                 heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S):
        self.folder = Path(folder)
        self.path = lock_path(folder)
        self.command, self.log = command, log
        self.rank = int(os.environ.get("RANK", "0")) if rank is None else rank
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.host, self.pid, self.job = socket.gethostname(), os.getpid(), job_id()
        self.depth = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._made_parents: list[Path] = []

    # -- taking and giving back ------------------------------------------------------------
    def acquire(self) -> FolderLock:
        if self.rank != 0:
            return self  # rank 0 holds it for the whole job
        with _held_guard:
            mine = _held.get(self.path)
            if mine is not None:  # nested in this process
                mine.depth += 1
                self._outer = mine
                return self
        self._outer = None
        self._make_parent()
        info = {"host": self.host, "pid": self.pid, "start": time.time(), "command": self.command, "job": self.job,
                "folder": os.path.abspath(self.folder)}
        data = (json.dumps(info) + "\n").encode()
        for _ in range(5):  # a takeover race with another process is retried a few times
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            except OSError as e:
                raise FolderLocked(f"cannot create the lock file {self.path} of '{self.folder}' ({e.strerror}); "
                                   "choose an output folder whose parent folder you can write to") from None
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            break
        else:
            raise FolderLocked(f"'{self.folder}' is being written by another process (its lock {self.path} keeps "
                               "changing hands); wait for it to finish or choose another folder")
        self.depth = 1
        with _held_guard:
            _held[self.path] = self
        self._thread = threading.Thread(target=self._beat, name=f"lock-heartbeat {self.folder}", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        if self.rank != 0:
            return
        if self._outer is not None:
            self._outer.depth -= 1
            return
        self.depth -= 1
        if self.depth > 0:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with _held_guard:
            _held.pop(self.path, None)
        if self._owned():
            self.path.unlink(missing_ok=True)
        for d in self._made_parents:  # a failed start leaves no empty parents behind
            try:
                d.rmdir()
            except OSError:
                break

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False

    # -- internals -------------------------------------------------------------------------
    def _make_parent(self) -> None:
        parent = self.path.parent
        missing = []
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:
                continue
            except OSError as e:
                raise FolderLocked(f"cannot create folder '{d}' for '{self.folder}' ({e.strerror}); choose an output "
                                   "folder you can write to") from None
        self._made_parents = missing  # deepest first

    def _read(self, path: Path | None = None) -> dict | None:
        try:
            return json.loads((path or self.path).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # being written, or garbage: judged by its age alone

    def _owned(self) -> bool:
        info = self._read()
        return bool(info) and info.get("pid") == self.pid and info.get("host") == self.host

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def _stale_reason(self, info: dict) -> str | None:
        """Why the lock ``info`` (read from the file) may be taken over, or None while its holder lives."""
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "gone"
        if not info:  # unreadable: a writer that died between creating and filling it, or garbage
            return f"an unreadable lock file {age:.0f} s old" if age > self.heartbeat_s else None
        if self.job is not None and info.get("job") == self.job:
            return f"the lock of an earlier attempt of this job ({self.job}, {_describe(info)})"
        if info.get("host") == self.host:
            if not _pid_alive(int(info.get("pid", -1))):
                return f"the lock of {_describe(info)}, which is no longer running"
            return None
        if age > self.stale_s:
            return f"the lock of {_describe(info)}, whose heartbeat stopped {age:.0f} s ago"
        return None

    def _take_over_if_stale(self) -> None:
        info = self._read()
        if info is None:
            return  # released meanwhile: try again
        reason = self._stale_reason(info)
        if reason is None:
            what = info.get("command") or "another command"
            raise FolderLocked(f"'{self.folder}' is being written by {what} ({_describe(info)}, since "
                               f"{time.strftime('%H:%M:%S', time.localtime(info.get('start', 0)))}); wait for it to "
                               f"finish, stop it, or choose another folder (its lock: {self.path})")
        if reason == "gone":
            return
        # Break the stale lock by renaming it to a name of our own (one rename wins a race), then check
        # that what we moved is the lock we judged, not a fresh one another process made meanwhile.
        mine = self.path.with_name(f"{self.path.name}.stale-{self.host}-{self.pid}")
        try:
            atomic.replace(self.path, mine)
        except FileNotFoundError:
            return
        moved = self._read(mine)
        if moved != info:
            try:
                os.link(mine, self.path)  # give the fresh lock back (fails if a third made one: theirs stands)
            except OSError:
                pass
            mine.unlink(missing_ok=True)
            return
        mine.unlink(missing_ok=True)
        self.log(f"'{self.folder}': took over {reason}")
