"""Leases: several jobs on one output folder, each slide handled by one of them.

Every ``tile`` or ``classify`` process on a folder claims a slide before working on it
and skips the slides other live processes hold, so jobs started side by side (cron
overlapping a manual run, one job per SLURM node) share the work instead of refusing
each other. Nothing here needs ``flock``, so it works on NFS and Lustre mounts without
locking; it needs only that creating a file with ``O_CREAT|O_EXCL`` and ``rename`` are
atomic, which NFSv3+ and Lustre guarantee.

Layout, in the folder's hidden ``.wsi-pipeline.leases/``::

    slide-<id>.lease           the process working on slide <id> (removed when it is done)
    slide-<id>.lease.takeover  a process replacing a stale lease (for a moment)
    run-<token>.lease          one per running job: who else works in this folder
    mutex.lease                held for a moment around folder-wide bookkeeping
    lock.lease                 :class:`pipeline.batch.RunLock` where ``flock`` is missing

A lease is a JSON file naming its holder: host, boot id, pid and that process's start
time, the command, when it started, and a random token that tells one lease from the
next. Its holder refreshes its mtime every ``min(30 s, timeout / 4)``.

**Stale.** A lease is stale when its holder is gone: on the same host, its pid no longer
exists (or is a zombie, or now belongs to a process that started later, or the host
rebooted since), or on any host, it was not refreshed for ``timeout`` seconds (a process
on another host that died, or one stopped for that long).

**Claim.** Create ``<key>.lease`` with ``O_EXCL``; when it exists and is live, the key is
busy. When it is stale, take it over: create ``<key>.lease.takeover`` with ``O_EXCL``
holding our own lease (only one taker at a time gets it; the others see the slide as
busy), read the lease again, and only if it is still the stale one we judged (same
token), ``rename`` the takeover file over it. A taker that judged a lease stale before
another one replaced it finds a different token and backs off, so two takers never both
win. A takeover file whose own taker died is finished by the next one (renamed over the
lease, which then holds a dead process and is taken over in turn).

A lease judged stale by its age while its holder still runs (a process stopped for longer
than the timeout) can be taken over and the slide processed twice; stores and results
are swapped in atomically, so the second copy only costs time.
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

log = logging.getLogger("wsi_pipeline")

LEASES_DIR = ".wsi-pipeline.leases"
SUFFIX = ".lease"
TAKEOVER = ".takeover"
#: Seconds without a refresh after which a lease is stale, whoever holds it.
DEFAULT_TIMEOUT_S = 3600.0
#: The folder mutex is held for moments; its holder refreshes it like any lease.
MUTEX_TIMEOUT_S = 120.0
MUTEX_KEY = "mutex"
HOST = socket.gethostname()


def _read_text(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return None


_BOOT_ID = (_read_text("/proc/sys/kernel/random/boot_id") or "").strip() or None


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """A process's state letter and start time (clock ticks after boot) from ``/proc``; None without it."""
    text = _read_text(f"/proc/{pid}/stat")
    if not text:
        return None
    fields = text.rpartition(")")[2].split()
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def pid_alive(pid: int, started: int | None = None) -> bool:
    """Whether process ``pid`` of this host runs, and is the one that started at ``started`` (``/proc`` ticks)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    stat = _proc_stat(pid)
    if stat is None:
        return True
    state, start = stat
    return state != "Z" and (started is None or start == started)


# --------------------------------------------------------------------------- lease files


@dataclass(frozen=True)
class Seen:
    """One reading of a lease file."""

    data: dict | None  # its JSON; None when unreadable (being written, damaged)
    key: str  # what tells this lease from the next: its token (inode and content when unreadable)
    mtime: float

    def describe(self) -> str:
        d = self.data or {}
        if not d:
            return "a process whose lease file is unreadable"
        return f"pid {d.get('pid')} on host {d.get('host')}, '{d.get('command')}' since {d.get('since_utc')}"


def read_lease(path: Path) -> Seen | None:
    """The lease at ``path``, or None when there is none."""
    try:
        with open(path, "rb") as fh:
            raw, st = fh.read(), os.fstat(fh.fileno())
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        data = json.loads(raw)
        token = data["token"]
        if not isinstance(token, str):
            raise TypeError(token)
    except (ValueError, KeyError, TypeError):
        return Seen(None, f"ino{st.st_ino}:{raw!r}", st.st_mtime)
    return Seen(data, token, st.st_mtime)


def stale_reason(seen: Seen, timeout: float) -> str:
    """Why the lease's holder is gone (one phrase), or "" while it is live."""
    d = seen.data or {}
    if d.get("host") == HOST:
        if d.get("boot_id") and _BOOT_ID and d["boot_id"] != _BOOT_ID:
            return "its host restarted since"
        if not pid_alive(d.get("pid"), d.get("process_start")):
            return f"its process {d.get('pid')} on this host is gone"
    age = time.time() - seen.mtime
    if age > timeout:
        return f"it was not refreshed for {age:.0f} s (lease timeout {timeout:.0f} s)"
    return ""


def _create(path: Path, content: bytes) -> bool:
    """Create ``path`` holding ``content`` unless it exists (``O_EXCL``); True when created."""
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return False
        except FileNotFoundError:  # the leases folder was removed when it emptied: make it again
            path.parent.mkdir(parents=True, exist_ok=True)
            continue
        with os.fdopen(fd, "wb") as fh:
            fh.write(content)
        return True
    raise FileNotFoundError(errno.ENOENT, "cannot create the lease file", str(path))


def _unlink_if(path: Path, token: str) -> None:
    """Remove the lease at ``path`` if it is still the one with ``token``."""
    seen = read_lease(path)
    if seen is not None and seen.key == token:
        path.unlink(missing_ok=True)


@dataclass(frozen=True)
class Claim:
    """What :meth:`Leases.claim` got: ``ok`` when this process now holds the key, else who does."""

    ok: bool
    holder: str = ""  # the live holder, when not ok
    took_over: str = ""  # the stale holder and why it was stale, when ok by a takeover


# --------------------------------------------------------------------------- leases of one folder


class Leases:
    """The leases of one folder held by this process, kept fresh by a background thread.

    ``with Leases(folder, command, timeout) as leases:`` then :meth:`claim` /
    :meth:`release` keys (slide ids), :meth:`mutex` for folder-wide bookkeeping and
    :meth:`register` / :meth:`other_runs` for who else works here. Leaving the block
    releases every lease still held and removes the leases folder when it is empty.
    """

    def __init__(self, folder: str | Path, command: str, timeout: float = DEFAULT_TIMEOUT_S):
        if not timeout > 0:
            raise ValueError(f"lease timeout {timeout}: must be > 0 seconds")
        self.dir = Path(folder) / LEASES_DIR
        self.command = command
        self.timeout = float(timeout)
        self._held: dict[str, str] = {}  # key -> token
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex_depth = 0
        self._run_key: str | None = None

    # ---------------------------------------------------------------- life cycle

    def __enter__(self) -> "Leases":
        self._stop.clear()
        self._thread = threading.Thread(target=self._refresh_loop, name="wsi-leases", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for key in list(self._held):
            self.release(key)
        try:
            self.dir.rmdir()
        except OSError:  # not empty (other jobs, a takeover left by a dead one) or already gone
            pass

    @property
    def refresh_s(self) -> float:
        return min(30.0, self.timeout / 4)

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.refresh_s):
            self.refresh()

    def refresh(self) -> None:
        """Set the mtime of every lease held to now (a live holder's lease never grows old)."""
        with self._guard:
            keys = list(self._held)
        for key in keys:
            try:
                os.utime(self.path(key))
            except OSError:
                pass

    # ---------------------------------------------------------------- claims

    def path(self, key: str) -> Path:
        return self.dir / f"{key}{SUFFIX}"

    def timeout_for(self, key: str) -> float:
        return min(self.timeout, MUTEX_TIMEOUT_S) if key == MUTEX_KEY else self.timeout

    def _content(self) -> tuple[str, bytes]:
        token = uuid.uuid4().hex
        stat = _proc_stat(os.getpid())
        data = {"host": HOST, "boot_id": _BOOT_ID, "pid": os.getpid(), "process_start": stat[1] if stat else None,
                "command": self.command, "token": token,
                "since_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
        return token, (json.dumps(data) + "\n").encode()

    def _hold(self, key: str, token: str) -> None:
        with self._guard:
            self._held[key] = token

    def claim(self, key: str) -> Claim:
        """Claim ``key`` for this process: create its lease, or take over a stale one (see the module notes)."""
        path = self.path(key)
        for _ in range(50):
            token, content = self._content()
            if _create(path, content):
                self._hold(key, token)
                return Claim(True)
            seen = read_lease(path)
            if seen is None:  # released meanwhile
                continue
            why = stale_reason(seen, self.timeout_for(key))
            if not why:
                return Claim(False, seen.describe())
            result = self._take_over(path, seen, token, content)
            if result == "won":
                self._hold(key, token)
                return Claim(True, took_over=f"{seen.describe()}: {why}")
            if result != "retry":
                return Claim(False, result)
        return Claim(False, "other jobs claiming it at the same moment")

    def _take_over(self, path: Path, seen: Seen, token: str, content: bytes) -> str:
        """Replace the stale lease ``seen``: 'won', 'retry' (it changed meanwhile) or who holds it now."""
        marker = path.with_name(path.name + TAKEOVER)
        if not _create(marker, content):
            return self._settle_takeover(path, marker)
        try:
            now = read_lease(path)
            if now is not None and now.key == seen.key:
                os.replace(marker, path)
        except FileNotFoundError:  # another process finished our takeover for us (see _settle_takeover)
            pass
        now = read_lease(path)
        if now is not None and now.key == token:
            return "won"
        _unlink_if(marker, token)
        return "retry"

    def _settle_takeover(self, path: Path, marker: Path) -> str:
        """Another takeover file is there: 'retry' once it is gone or finished, else who is taking over."""
        taker = read_lease(marker)
        if taker is None:
            return "retry"
        if not stale_reason(taker, self.timeout_for(MUTEX_KEY)):
            return f"{taker.describe()} (taking it over)"
        lease = read_lease(path)
        if lease is not None and not stale_reason(lease, self.timeout):
            return lease.describe()
        try:  # its taker died: finish its takeover; the lease then names a dead process and is taken over next
            os.replace(marker, path)
        except FileNotFoundError:
            pass
        return "retry"

    def release(self, key: str) -> None:
        """Remove this process's lease on ``key`` (a lease taken over by another process is left to it)."""
        with self._guard:
            token = self._held.pop(key, None)
        if token is not None:
            _unlink_if(self.path(key), token)

    def holds(self, key: str) -> bool:
        return key in self._held

    # ---------------------------------------------------------------- the folder mutex and the jobs

    @contextmanager
    def mutex(self, wait_note_s: float = 5.0) -> Iterator[None]:
        """Hold the folder's mutex (re-entrant within this object); waits, saying so once after ``wait_note_s``."""
        if self._mutex_depth:
            self._mutex_depth += 1
            try:
                yield
            finally:
                self._mutex_depth -= 1
            return
        t0, told = time.monotonic(), False
        while True:
            got = self.claim(MUTEX_KEY)
            if got.ok:
                break
            if not told and time.monotonic() - t0 > wait_note_s:
                log.info("waiting for the bookkeeping lock of %s (held by %s)", self.dir.parent, got.holder)
                told = True
            time.sleep(0.01 + 0.04 * random.random())
        self._mutex_depth = 1
        try:
            yield
        finally:
            self._mutex_depth = 0
            self.release(MUTEX_KEY)

    def register(self) -> None:
        """Record this job in the folder (call under :meth:`mutex`), so others know it is working here."""
        self._run_key = f"run-{uuid.uuid4().hex[:12]}"
        if not self.claim(self._run_key).ok:  # pragma: no cover - a fresh random name
            raise RuntimeError(f"cannot register in {self.dir}")

    def other_runs(self) -> list[str]:
        """The other live jobs registered in this folder (call under :meth:`mutex`); stale entries are removed."""
        live = []
        for p in sorted(self.dir.glob(f"run-*{SUFFIX}")):
            if p.name == f"{self._run_key}{SUFFIX}":
                continue
            seen = read_lease(p)
            if seen is None:
                continue
            if stale_reason(seen, self.timeout):
                _unlink_if(p, seen.key)
            else:
                live.append(seen.describe())
        return live
