"""An exclusive lock on an ingest folder, so that two ingests never write into one at once.

Each ingest rewrites a chunk's file as the rows it read from it plus its fresh rows; two
at once both read the same file, and the second rename drops the first one's rows.  So an
ingest first creates ``_ingest.lock`` in its folder, atomically and only if it does not
exist (``O_EXCL`` on a local disk, a conditional put, ``If-None-Match: *``, on S3), and
removes it when done.  The lock holds the holder's pid, host and start time; the holder
refreshes its modification time every :data:`HEARTBEAT_S` seconds.

Stale locks.  A crashed ingest leaves its lock behind; it is taken over, with a warning,
when its process is gone (same host) or it has had no heartbeat for :data:`STALE_S`
seconds (any host: a pid means nothing elsewhere).  That age is measured on the store's
clock, never this host's: the lock's modification time is stamped by the store (S3's
clock, an NFS server's), so it is compared with that of a probe written beside it; a host
whose clock ran minutes ahead took every live lock for a stale one.  Taking over is itself exclusive: the
ingest that creates ``_ingest.lock.break`` (the same way) reads the lock again and deletes
it only if it is still the stale one, so of several ingests that found it stale, one
deletes it and none deletes the fresh lock another made since.  The holder checks that
the lock is still its own before it commits.

The name starts with ``_``: Parquet readers (Spark's rule, pyarrow, modelfactory) skip it.

Where it lives.  The lock needs five things of the folder's storage: an exclusive create, a read
with the modification time, a removal, the storage's clock, and a refresh of the modification
time.  A local (or network) disk and an fsspec store do each differently; :class:`_Disk` and
:class:`_Fsspec` hold those differences, so :class:`FolderLock` is written once for both.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any

from .._io import _is_local, error_text
from ..exceptions import IngestError

__all__ = ["FolderLock", "LOCK_NAME", "HEARTBEAT_S", "STALE_S"]

log = logging.getLogger(__name__)

LOCK_NAME = "_ingest.lock"
#: Seconds between two refreshes of the lock's modification time by its holder.
HEARTBEAT_S = 30.0
#: A lock whose modification time is older than this is stale, whoever holds it.
STALE_S = 300.0
_ATTEMPTS = 50   # looks at a lock that vanishes or is being taken over before giving up
_PAUSE_S = 0.05  # between two looks while another ingest takes a stale lock over


class FolderLock:
    """The lock of the ingest folder ``root`` on ``fs`` (``out`` is the folder as the user wrote it).

    Use as a context manager; :meth:`check` raises if another ingest took the lock over meanwhile.
    """

    def __init__(self, fs: Any, root: str, out: str) -> None:
        self.out = out
        self.store: _Disk | _Fsspec = _Disk() if _is_local(fs) else _Fsspec(fs)
        self.root = root.rstrip("/")
        self.path = f"{self.root}/{LOCK_NAME}"
        self.shown = f"{out.rstrip('/')}/{LOCK_NAME}"
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._made: list[str] = []  # the folders acquire made for the lock, the deepest last

    # -- acquiring and releasing ----------------------------------------------------------

    def __enter__(self) -> "FolderLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def acquire(self) -> None:
        """Create the lock, taking over a stale one; raise :class:`IngestError` if it is held."""
        self._made = self.store.make_folder(self.root)  # removed again if left empty
        for _ in range(_ATTEMPTS):  # a lock that vanished, or is being taken over: look again
            try:
                self._create()
                break
            except FileExistsError:
                pass
            held = self._read()
            if held is None:
                continue
            now = self._now()
            why = self._stale(held, now)
            if why is None:
                raise IngestError(self._held_message(held, now))
            log.warning("taking over the lock %s of pid %s on host %r: %s", self.shown,
                        held["info"].get("pid", "?"), held["info"].get("host", "?"), why)
            self._break(held)
        else:
            held = self._read()
            raise IngestError(self._held_message(held, self._now()) if held else
                              f"Could not lock {self.out!r}: other ingests keep taking {self.shown}. "
                              "Run one ingest at a time into a folder.")
        self._thread = threading.Thread(target=self._beat, name="ingest-lock-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and remove the lock, if it is still this ingest's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            held = self._read()
            if held is not None and held["info"].get("token") == self.token:
                self._remove(self.path)
        except Exception as err:  # noqa: BLE001 - best effort: the ingest's own outcome is what matters
            log.warning("could not remove the lock %s: %s; delete it by hand", self.shown, error_text(err))
        for folder in reversed(self._made):  # a failed first ingest leaves no folder (out=new/data: nor new/)
            self.store.remove_empty_folder(folder)

    def check(self) -> None:
        """Raise :class:`IngestError` unless the lock is still this ingest's (call before committing)."""
        held = self._read()
        if held is None or held["info"].get("token") != self.token:
            who = self._who(held["info"]) if held else "nobody (it was deleted)"
            raise IngestError(
                f"The lock {self.shown} of this ingest is now held by {who}: it was taken over or deleted "
                f"while this ingest ran (a lock with no heartbeat for {STALE_S:g} s is taken over: was this "
                "machine suspended, or the lock deleted by hand?). Nothing was committed; rerun the ingest "
                "once the other one has finished.")

    # -- the lock file ----------------------------------------------------------------------

    def _content(self) -> bytes:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "token": self.token,
                           "started": _iso(time.time())}).encode()

    def _create(self, path: str | None = None) -> None:
        """Create the lock file (or ``path``) holding this ingest's token if it does not exist,
        or raise FileExistsError."""
        self.store.create(path or self.path, self._content())

    def _read(self, path: str | None = None) -> dict | None:
        """``{"info": the lock's JSON (empty if unreadable), "raw": bytes, "mtime": unix seconds}``
        of the lock (or ``path``), or None if there is none."""
        try:
            raw, mtime = self.store.read(path or self.path)
        except FileNotFoundError:
            return None
        try:
            info = json.loads(raw)
        except ValueError:  # being written, or cut short by a crash: judged by its age alone
            info = None
        return {"info": info if isinstance(info, dict) else {}, "raw": raw, "mtime": mtime}

    def _now(self) -> float:
        """The store's time now (unix seconds), from a probe written beside the lock."""
        return self.store.now(f"{self.path}.now-{self.token}")

    def _remove(self, path: str) -> None:
        self.store.remove(path)

    # -- stale locks ------------------------------------------------------------------------

    def _stale(self, held: dict, now: float) -> str | None:
        """Why the lock ``held`` is stale at the store's time ``now``, or None if its holder may be running."""
        info, age = held["info"], now - held["mtime"]
        pid = info.get("pid")
        if info.get("host") == socket.gethostname() and isinstance(pid, int) and not _running(pid):
            return f"its process {pid} is not running on this host any more"
        if age > STALE_S:
            return f"it has had no heartbeat for {age:.0f} s (stale after {STALE_S:g} s)"
        return None

    def _break(self, held: dict) -> None:
        """Remove the stale lock ``held``, and only it: not a fresh lock that another ingest,
        which found it stale too, made after removing it."""
        mutex = f"{self.path}.break"
        try:
            self._create(mutex)  # one ingest at a time takes a lock over
        except FileExistsError:
            # left by an ingest that died taking over (a window of a few requests): stale as a lock
            # is (its process gone from this host, or no heartbeat, which it never has, for STALE_S)
            other = self._read(mutex)
            if other is not None and self._stale(other, self._now()) is not None:
                again = self._read(mutex)  # not one another ingest made since (narrows, does not close)
                if again is not None and (again["raw"], again["mtime"]) == (other["raw"], other["mtime"]):
                    self._remove_quietly(mutex)
                return
            time.sleep(_PAUSE_S)
            return
        try:
            again = self._read()
            if again is not None and (again["raw"], again["mtime"]) == (held["raw"], held["mtime"]):
                self._remove_quietly(self.path)
        finally:
            self._remove_quietly(mutex)

    def _remove_quietly(self, path: str) -> None:
        try:
            self._remove(path)
        except FileNotFoundError:
            pass

    def _beat(self) -> None:
        """Refresh the lock's modification time while it is this ingest's."""
        while not self._stop.wait(HEARTBEAT_S):
            try:
                held = self._read()
                if held is None or held["info"].get("token") != self.token:
                    return  # taken over: check() says so before any commit
                self.store.touch(self.path, held["raw"])
            except Exception as err:  # noqa: BLE001 - a store hiccup: try again at the next beat
                log.warning("could not refresh the lock %s: %s", self.shown, error_text(err))

    # -- messages ---------------------------------------------------------------------------

    def _who(self, info: dict) -> str:
        if not info:
            return "an ingest whose lock cannot be read (being written, or cut short)"
        return (f"pid {info.get('pid', '?')} on host {info.get('host', '?')!r} (started "
                f"{info.get('started', '?')})")

    def _held_message(self, held: dict, now: float) -> str:
        age = max(0.0, now - held["mtime"])
        return (f"Another ingest is writing to {self.out!r}: {self.shown} is held by {self._who(held['info'])}, "
                f"last heartbeat {age:.0f} s ago. Two ingests into one folder at once lose rows (each rewrites "
                "the files the other merges into), so this one did not start. Wait for it to finish and run "
                f"again. A crashed ingest's lock is taken over once its process is gone (same host) or it has "
                f"had no heartbeat for {STALE_S:g} s; delete {self.shown} by hand only if you are sure that "
                "ingest is not running.")


class _Disk:
    """The lock's file operations on a local or network disk (``O_EXCL``, ``fstat``, ``utime``)."""

    def make_folder(self, root: str) -> list[str]:
        """Make ``root`` (the lock needs a folder to sit in); the folders made now (``root`` and
        its parents that were missing), the deepest last."""
        made, path = [], root
        while not os.path.isdir(path) and os.path.dirname(path) != path:
            made.insert(0, path)
            path = os.path.dirname(path)
        os.makedirs(root, exist_ok=True)
        return made

    def remove_empty_folder(self, root: str) -> None:
        try:
            os.rmdir(root)  # only if empty
        except OSError:
            pass

    def create(self, path: str, data: bytes) -> None:
        """Write ``data`` to ``path`` if there is no such file, or raise FileExistsError."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)

    def read(self, path: str) -> tuple[bytes, float]:
        """The bytes of ``path`` and its modification time, or FileNotFoundError."""
        with open(path, "rb") as f:
            return f.read(), os.fstat(f.fileno()).st_mtime

    def now(self, probe: str) -> float:
        """The disk's time now: the modification time its server stamps on ``probe``, removed at once."""
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            return os.fstat(fd).st_mtime
        finally:
            os.close(fd)
            _quietly(self.remove, probe)

    def touch(self, path: str, raw: bytes) -> None:
        """Give ``path`` (which holds ``raw``) a new modification time."""
        os.utime(path)

    def remove(self, path: str) -> None:
        os.remove(path)


class _Fsspec:
    """The lock's file operations on an fsspec store (S3: a conditional put, ``LastModified``)."""

    def __init__(self, fs: Any) -> None:
        self.fs = fs

    def make_folder(self, root: str) -> list[str]:
        return []  # object stores have no folders (and makedirs would create a bucket)

    def remove_empty_folder(self, root: str) -> None:
        pass

    def create(self, path: str, data: bytes) -> None:
        """Write ``data`` to ``path`` if there is no such object, or raise FileExistsError."""
        try:
            self.fs.pipe_file(path, data, mode="create")  # S3: If-None-Match: *
        except TypeError:  # a filesystem with no exclusive create: look, then write
            self.fs.invalidate_cache(path)
            if self.fs.exists(path):
                raise FileExistsError(path) from None
            self.fs.pipe_file(path, data)
        self.fs.invalidate_cache(path)  # a store that ignored the condition: the last writer holds it
        if self.fs.cat_file(path) != data:
            raise FileExistsError(path)

    def read(self, path: str) -> tuple[bytes, float]:
        self.fs.invalidate_cache(path)
        return self.fs.cat_file(path), self.fs.modified(path).timestamp()

    def now(self, probe: str) -> float:
        """The store's time now: the ``LastModified`` it stamps on ``probe``, removed at once."""
        self.fs.pipe_file(probe, b"")
        try:
            self.fs.invalidate_cache(probe)
            return self.fs.modified(probe).timestamp()
        finally:
            _quietly(self.remove, probe)

    def touch(self, path: str, raw: bytes) -> None:
        self.fs.pipe_file(path, raw)  # a new LastModified

    def remove(self, path: str) -> None:
        self.fs.rm_file(path)


def _quietly(remove: Any, path: str) -> None:
    try:
        remove(path)
    except FileNotFoundError:
        pass


def _running(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
