"""What every batch command shares: finding slides, one run at a time, run reports.

Commands run from cron over folders that change. They must (1) find the same
slides the same way, (2) refuse to run twice on one output folder at once, and
(3) leave a machine-readable report of what happened to each slide.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import logging
import os
import sys
import tempfile
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from wsi import __version__
from wsi.atomic import atomic_write_json
from wsi.slide import SLIDE_EXTENSIONS, slide_id_for

log = logging.getLogger("wsi_pipeline")


class UsageError(Exception):
    """Bad command-line input (no slides, unwritable output...): one clear line, exit code 2."""


# --------------------------------------------------------------------------- discovery


def discover_slides(source: str | Path, extensions: Iterable[str] = SLIDE_EXTENSIONS) -> list[Path]:
    """Slides named by ``source``: a folder (searched recursively), a slide file, or a list file.

    A list file is a ``.txt``/``.csv``/``.lst`` with one path per line (relative
    paths resolve against the list file's folder; ``#`` starts a comment; a
    ``.csv`` may have a header with a ``path`` column). MRXS companion folders
    are not searched. Raises :class:`UsageError` when nothing is found.
    """
    src = Path(source)
    exts = tuple(e.lower() for e in extensions)
    if not src.exists():
        raise UsageError(f"{src}: no such file or folder")
    if src.is_dir():
        found = []
        for root, dirs, files in os.walk(src):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            names = set(files)
            # An MRXS slide's data folder has the slide's stem as its name.
            dirs[:] = [d for d in dirs if f"{d}.mrxs" not in names]
            for f in sorted(files):
                if f.lower().endswith(exts) and not f.startswith("."):
                    found.append(Path(root) / f)
        if not found:
            raise UsageError(f"{src}: no slides found (looked recursively for {', '.join(exts)})")
        return sorted(found)
    if src.suffix.lower() in (".txt", ".lst", ".csv"):
        lines = [ln.strip() for ln in src.read_text().splitlines()]
        lines = [ln for ln in lines if ln and not ln.startswith("#")]
        if src.suffix.lower() == ".csv" and lines and "path" in [c.strip() for c in lines[0].split(",")]:
            col = [c.strip() for c in lines[0].split(",")].index("path")
            lines = [ln.split(",")[col].strip() for ln in lines[1:]]
        paths = [(src.parent / ln) if not Path(ln).is_absolute() else Path(ln) for ln in lines]
        if not paths:
            raise UsageError(f"{src}: the slide list is empty")
        return paths
    return [src]


def check_unique_ids(paths: list[Path]) -> tuple[list[Path], dict[Path, str]]:
    """Split slides into usable ones and those whose id repeats an earlier slide's."""
    seen: dict[str, Path] = {}
    ok, dup = [], {}
    for p in paths:
        sid = slide_id_for(p)
        if sid in seen:
            dup[p] = (
                f"{p}: slide id {sid!r} is already used by {seen[sid]}; slide ids are file names "
                "without extension and must be unique in one run: rename one of them"
            )
        else:
            seen[sid] = p
            ok.append(p)
    return ok, dup


# --------------------------------------------------------------------------- output folder


def ensure_writable_dir(path: str | Path, what: str = "output folder") -> Path:
    """Create ``path`` if needed and prove it is writable, or raise :class:`UsageError`."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise UsageError(f"{path}: cannot write to this {what} ({exc.strerror}); choose another --out") from None
    return path


class RunLock:
    """An exclusive lock on an output folder, held for a run's lifetime.

    Uses ``flock`` on ``<folder>/.wsi-pipeline.lock``: the kernel releases it if
    the process dies, so a crashed cron run never leaves a stale lock. A second
    run on the same folder fails at once with :class:`UsageError`.
    """

    def __init__(self, folder: str | Path, command: str):
        self.path = Path(folder) / ".wsi-pipeline.lock"
        self.command = command
        self._fh = None

    def __enter__(self) -> "RunLock":
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                fh.close()
                raise
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise UsageError(
                f"{self.path.parent}: another wsi-pipeline run is using this folder ({holder}); "
                "wait for it to finish or choose another --out"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} '{self.command}' since {utc_now()}\n")
        fh.flush()
        self._fh = fh
        return self

    def __exit__(self, *exc) -> None:
        if self._fh is not None:
            self._fh.seek(0)
            self._fh.truncate()
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


# --------------------------------------------------------------------------- reports


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class SlideOutcome:
    """What happened to one slide in a run."""

    slide_id: str
    path: str
    status: str  # "done", "skipped" or "failed"
    reason: str = ""
    seconds: float = 0.0
    details: dict = field(default_factory=dict)


@dataclass
class RunReport:
    command: str
    started_utc: str = field(default_factory=utc_now)
    finished_utc: str = ""
    seconds: float = 0.0
    software_version: str = __version__
    settings: dict = field(default_factory=dict)
    slides: list[SlideOutcome] = field(default_factory=list)

    def add(self, outcome: SlideOutcome) -> None:
        self.slides.append(outcome)

    def counts(self) -> dict[str, int]:
        out = {"done": 0, "skipped": 0, "failed": 0}
        for s in self.slides:
            out[s.status] = out.get(s.status, 0) + 1
        return out

    @property
    def ok(self) -> bool:
        return self.counts()["failed"] == 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["counts"] = self.counts()
        return d

    def write(self, folder: str | Path, name: str) -> Path:
        """Write ``reports/<name>-<time>.json`` and ``<name>-report.json`` (the latest) in ``folder``."""
        folder = Path(folder)
        stamp = self.started_utc.replace(":", "").replace("-", "")
        path = folder / "reports" / f"{name}-{stamp}-{uuid.uuid4().hex[:6]}.json"
        data = self.to_dict()
        atomic_write_json(path, data)
        atomic_write_json(folder / f"{name}-report.json", data)
        return path

    def summary(self) -> str:
        c = self.counts()
        lines = [
            f"{self.command}: {c['done']} done, {c['skipped']} skipped, {c['failed']} failed "
            f"in {self.seconds:.1f} s"
        ]
        for s in self.slides:
            if s.status == "failed":
                lines.append(f"  FAILED {s.slide_id}: {s.reason}")
        return "\n".join(lines)


def setup_logging(quiet: bool = False, verbose: bool = False) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger("wsi_pipeline")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
