"""A local cache of slides staged from object storage (OpenSlide reads only local files).

Layout: ``ROOT/<key>/`` per slide URL (``key``: a hash of the URL), holding the slide under its own
file name, ``entry.json`` (the URL, the remote object's size, ETag and modification time, and
``"state": "complete"`` once the file is in place) and ``pin`` (a lock file). Rules:

* **Atomic.** A download goes to a hidden temporary name, is checked against the remote size,
  fsynced and renamed into place; only then does ``entry.json`` say complete. A killed download
  never looks complete: its leftovers are evicted like any unused entry.
* **Re-used only when current.** A staged copy is used when the remote object still has the
  size and the ETag (or, without one, the modification time) recorded when it was staged;
  otherwise it is downloaded again.
* **Bounded.** Before a download, entries are evicted, least recently used first, until the
  cache plus the new slide fit in ``limit_bytes``. An entry in use (its ``pin`` held shared, by
  this or another process on the machine) is never evicted; a slide that does not fit even then
  fails with one line.

``ROOT/.lock`` (``flock``) serialises the bookkeeping (look-up, eviction, reservation) of every
process using the cache; downloads run outside it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from wsi.atomic import atomic_write_json, fsync_dir
from wsi.objstore import Remote, RemoteError, remote_identity, url_name

log = logging.getLogger("wsi_pipeline")

__all__ = ["SlideCache", "default_cache_root", "GB"]

GB = 10**9
ENTRY = "entry.json"
PIN = "pin"


def default_cache_root() -> Path:
    """``$WSI_PIPELINE_CACHE``, else ``$XDG_CACHE_HOME/wsi-pipeline``, else ``~/.cache/wsi-pipeline``."""
    env = os.environ.get("WSI_PIPELINE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "wsi-pipeline"


def _size(n: float) -> str:
    return f"{n / GB:.2f} GB" if n >= GB / 10 else f"{n / 1e6:.1f} MB"


def _same(entry: dict, ident: dict) -> bool:
    if entry.get("state") != "complete" or int(entry.get("size", -1)) != ident["size"]:
        return False
    if ident["etag"] or entry.get("etag"):
        return entry.get("etag") == ident["etag"]
    return entry.get("mtime") == ident["mtime"]


class SlideCache:
    """Stages slides from object storage into ``root``, at most ``limit_bytes`` in all.

    >>> cache = SlideCache(Path("~/.cache/wsi-pipeline/slides").expanduser(), 100 * GB)   # doctest: +SKIP
    >>> with cache.staged("s3://bucket/slides/a.svs") as local:                          # doctest: +SKIP
    ...     tile(local)
    """

    def __init__(self, root: str | Path, limit_bytes: int, *, setting: str = "runtime.stage_cache_gb"):
        self.root = Path(root)
        self.limit = int(limit_bytes)
        self.setting = setting
        self._pins: dict[str, int] = {}  # url -> fd of its pin file, held shared
        self._lock = threading.RLock()  # this process's threads, around the flock'd bookkeeping

    # -- public ---------------------------------------------------------------
    @contextmanager
    def staged(self, url: str) -> Iterator[Path]:
        """The local copy of ``url`` (staged now or re-used), pinned for the block."""
        path = self.stage(url)
        try:
            yield path
        finally:
            self.unpin(url)

    def stage(self, url: str, ident: dict | None = None) -> Path:
        """Stage ``url`` (or re-use its current copy) and pin it until :meth:`unpin`; returns the local file."""
        ident = ident or remote_identity(url)
        if ident["size"] > self.limit:
            raise RemoteError(f"{url}: the slide is {_size(ident['size'])}, more than the whole stage cache "
                              f"({self.setting} = {self.limit / GB:g} GB); raise {self.setting}")
        d = self._dir(url)
        final = d / url_name(url)
        with self._bookkeeping():
            self._pin(url, d)
            entry = _read_entry(d)
            if entry and _same(entry, ident) and final.is_file() and final.stat().st_size == ident["size"]:
                os.utime(d / ENTRY)  # most recently used
                log.debug("%s: re-using its staged copy %s", url, final)
                return final
            try:
                self._make_room(ident["size"], keep=d)
                atomic_write_json(d / ENTRY, {**ident, "state": "staging", "started_unix": time.time()})
            except BaseException:
                self.unpin(url)
                raise
        try:
            self._download(url, final, ident)
        except BaseException:
            _drop_entry(d)
            self.unpin(url)
            raise
        return final

    def unpin(self, url: str) -> None:
        with self._lock:
            fd = self._pins.pop(url, None)
        if fd is not None:
            os.close(fd)  # closing drops the shared flock

    def used_bytes(self) -> int:
        return sum(_entry_bytes(d) for d in self._entries())

    # -- inside ---------------------------------------------------------------
    def _dir(self, url: str) -> Path:
        return self.root / hashlib.sha256(url.encode()).hexdigest()[:20]

    @contextmanager
    def _bookkeeping(self):
        self.root.mkdir(parents=True, exist_ok=True)
        with self._lock:
            fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    def _pin(self, url: str, d: Path) -> None:
        """Hold a shared lock on the entry's pin file (kept in ``self._pins``) so it is not evicted while used."""
        if url in self._pins:
            raise RemoteError(f"{url}: staged twice at once in one run (two slides with one URL?)")
        d.mkdir(parents=True, exist_ok=True)
        fd = os.open(d / PIN, os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(fd, fcntl.LOCK_SH)  # the evictor only takes it (LOCK_EX, non-blocking) under the cache lock
        self._pins[url] = fd

    def _entries(self) -> list[Path]:
        try:
            return [p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")]
        except FileNotFoundError:
            return []

    def _make_room(self, need: int, keep: Path) -> None:
        """Evict unpinned entries, least recently used first, until ``need`` more bytes fit (call under the lock)."""
        others = [d for d in self._entries() if d != keep]
        used = sum(_entry_bytes(d) for d in others)
        for d in sorted(others, key=_last_used):
            if used + need <= self.limit:
                return
            size = _entry_bytes(d)
            if _evict(d):
                used -= size
                log.info("stage cache: evicted %s (%s, least recently used)", d.name, _size(size))
        if used + need > self.limit:
            raise RemoteError(
                f"{self.root}: the stage cache holds {_size(used)} of slides in use and cannot take "
                f"{_size(need)} more within {self.setting} = {self.limit / GB:g} GB; raise {self.setting} "
                "or lower --workers")

    def _download(self, url: str, final: Path, ident: dict) -> None:
        d = final.parent
        for old in d.glob(".tmp-*"):  # a killed download's leftovers (another job's live one is younger)
            if time.time() - old.stat().st_mtime > 3600:
                old.unlink(missing_ok=True)
        tmp = d / f".tmp-{uuid.uuid4().hex[:8]}-{final.name}"
        t0 = time.perf_counter()
        try:
            Remote(url).get("", tmp)
            size = tmp.stat().st_size
            if size != ident["size"]:
                raise RemoteError(f"{url}: downloaded {size} bytes, the object has {ident['size']}; "
                                  "it changed while being staged: run again")
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
            fsync_dir(d)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        atomic_write_json(d / ENTRY, {**ident, "state": "complete", "staged_unix": time.time()})
        secs = time.perf_counter() - t0
        log.info("staged %s (%.1f MB in %.1f s) to %s", url, ident["size"] / 1e6, secs, final)


def _read_entry(d: Path) -> dict | None:
    try:
        data = json.loads((d / ENTRY).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _entry_bytes(d: Path) -> int:
    """What an entry takes or has reserved: the recorded size, or its files' sizes without a record."""
    e = _read_entry(d)
    if e and "size" in e:
        return int(e["size"])
    return sum(f.stat().st_size for f in d.iterdir() if f.is_file() and f.name not in (ENTRY, PIN))


def _last_used(d: Path) -> float:
    for name in (ENTRY, PIN):
        try:
            return (d / name).stat().st_mtime
        except OSError:
            continue
    return 0.0


def _evict(d: Path) -> bool:
    """Remove an entry nobody has pinned; False when one is in use."""
    try:
        fd = os.open(d / PIN, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    try:
        shutil.rmtree(d, ignore_errors=True)
    finally:
        os.close(fd)
    return True


def _drop_entry(d: Path) -> None:
    (d / ENTRY).unlink(missing_ok=True)
