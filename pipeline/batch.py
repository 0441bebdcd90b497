"""What every batch command shares: finding slides, one run at a time, run reports.

Commands run from cron over folders that change. They must (1) find the same
slides the same way, (2) share one output folder with other jobs running at the
same time, each slide handled by one of them, and (3) leave a machine-readable
report of what happened to each slide. :class:`BatchRun` is the skeleton of such
a run that ``tile`` and ``classify`` share: per-slide leases
(:mod:`pipeline.leases`), clean-up of what a stopped run left, the
skip-if-current test (:func:`record_matches`), one outcome per slide and the
run report, merged with those of the jobs that ran alongside.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Container, Iterable, Mapping

from pipeline.leases import DEFAULT_TIMEOUT_S, Claim, Leases
from wsi import __version__
from wsi.atomic import atomic_write_json
from wsi.objstore import Remote, as_location, is_url
from wsi.slide import FLAT_IMAGE_EXTENSIONS, SLIDE_EXTENSIONS, dicom_slides, file_problem, slide_id_for
from wsi.store import FLOCK_UNSUPPORTED, STORE_SUFFIX

log = logging.getLogger("wsi_pipeline")


class UsageError(Exception):
    """Bad command-line input (no slides, unwritable output...): one clear line, exit code 2."""


# --------------------------------------------------------------------------- discovery


#: Pictures written beside slides and stores (our overlays and masks, annotation masks,
#: thumbnails): never slides when a folder is searched.
PICTURE_SUFFIXES = (".overlay.png", ".mask.png", "_mask.png", "-mask.png", "_thumbnail.jpg", "_thumbnail.png")


def discover_slides(source: str | Path, extensions: Iterable[str] = SLIDE_EXTENSIONS) -> list[Path | str]:
    """Slides named by ``source``: a folder (searched recursively), a slide file, or a list file.

    A list file is a ``.txt``/``.csv``/``.lst`` with one path per line (relative
    paths resolve against the list file's folder; ``#`` starts a comment; a
    ``.csv`` may have a header with a ``path`` column). MRXS companion folders
    and tile stores (``*.zarr``) are not searched. The ``.dcm`` instances of a
    DICOM scan are one slide per series (:func:`wsi.slide.dicom_slides`: the
    folder, when it holds one series). Flat images (``.png``, ``.jpg``,
    ``.jpeg``) named as a file or in a list are always slides; a folder search
    takes them only from folders without whole-slide files or tile stores, and
    never the pictures written beside slides (:data:`PICTURE_SUFFIXES`).
    Raises :class:`UsageError` when nothing is found.

    On object storage (``s3://bucket/prefix``; :func:`wsi.objstore.is_url`) ``source`` is one slide
    object or a prefix searched recursively (hidden names and ``*.zarr`` excluded), and a list file
    may name slide URLs; those slides come back as URL strings, to be staged before tiling.
    """
    exts = tuple(e.lower() for e in extensions)
    if is_url(source):
        return _remote_slides(str(source).rstrip("/"), exts)
    src = as_location(source)
    try:
        os.stat(src)
    except FileNotFoundError:
        raise UsageError(f"{src}: no such file or folder") from None
    except OSError as exc:
        raise UsageError(file_problem(src, exc)) from None
    if src.is_dir():
        found = []
        for root, dirs, files in os.walk(src):
            has_stores = any(d.lower().endswith(STORE_SUFFIX) for d in dirs)
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not d.lower().endswith(STORE_SUFFIX))
            found += _slides_in_folder(Path(root), dirs, files, exts, flat_images=not has_stores)
        if not found:
            looked = ", ".join(dict.fromkeys(exts + FLAT_IMAGE_EXTENSIONS))
            raise UsageError(f"{src}: no slides found (looked recursively for {looked})")
        return sorted(found)
    if src.suffix.lower() in (".txt", ".lst", ".csv"):
        try:
            lines = [ln.strip() for ln in src.read_text().splitlines()]
        except OSError as exc:
            raise UsageError(file_problem(src, exc).replace("a slide file", "a slide list")) from None
        except UnicodeDecodeError:
            raise UsageError(f"{src}: not a text file; a slide list has one path per line") from None
        lines = [ln for ln in lines if ln and not ln.startswith("#")]
        header = [c.strip().lower() for c in lines[0].split(",")] if lines else []
        if src.suffix.lower() == ".csv" and "path" not in header and {"slide_id", "label"} <= set(header):
            raise UsageError(
                f"{src}: this is a labels file (slide_id,label[,split]), not a list of slides; pass the folder of "
                "slides (or a list file of paths) as SLIDES, and the labels with --labels where a command takes them"
            )
        if src.suffix.lower() == ".csv" and "path" in header:
            col = header.index("path")
            lines = [ln.split(",")[col].strip() for ln in lines[1:]]
        paths = [_listed(src, ln) for ln in lines]
        if not paths:
            raise UsageError(f"{src}: the slide list is empty")
        if not any(is_url(p) or p.exists() for p in paths):
            raise UsageError(
                f"{src}: none of the {len(paths)} listed slide(s) exists (first: {paths[0]}); a list file names one "
                "slide path per line, relative paths resolve against the list file's folder"
            )
        return paths
    return [src]


def _listed(list_file: Path, line: str) -> Path | str:
    """One line of a slide list: a URL as it is, a path relative to the list file's folder."""
    loc = as_location(line)
    if isinstance(loc, str) or loc.is_absolute():
        return loc
    return list_file.parent / loc


def _remote_slides(url: str, exts: tuple[str, ...]) -> list[str]:
    """The slide objects at ``url``: the object itself, or those under the prefix (recursively)."""
    r = Remote(url)
    if not r.isdir():
        if not r.exists():
            bucket = r.root.split("/", 1)[0]
            if bucket and bucket != r.root and not r.fs.exists(bucket):
                raise UsageError(f"{url}: no such bucket ({bucket}); check the URL")
            raise UsageError(f"{url}: no such object or prefix")
        return [url]
    found = [r.url_of(rel) for rel in sorted(r.files())
             if rel.lower().endswith(exts) and not any(part.startswith(".") or part.lower().endswith(STORE_SUFFIX)
                                                        for part in rel.split("/"))]
    if not found:
        raise UsageError(f"{url}: no slides found (looked recursively for {', '.join(exts)})")
    return found


def _slides_in_folder(
    root: Path, dirs: list[str], files: list[str], exts: tuple[str, ...], *, flat_images: bool
) -> list[Path]:
    """The slides directly in one folder of a search (``dirs`` is pruned in place)."""
    names = set(files)
    # An MRXS slide's data folder has the slide's stem as its name.
    dirs[:] = [d for d in dirs if f"{d}.mrxs" not in names]
    visible = sorted(f for f in files if not f.startswith("."))
    slides = [root / f for f in visible if f.lower().endswith(exts) and not f.lower().endswith(".dcm")]
    if ".dcm" in exts and any(f.lower().endswith(".dcm") for f in visible):
        slides += dicom_slides(root)
    if not slides and flat_images:
        slides = [
            root / f for f in visible
            if f.lower().endswith(FLAT_IMAGE_EXTENSIONS) and not f.lower().endswith(PICTURE_SUFFIXES)
        ]
    return slides


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


def ensure_writable_dir(path: str | Path, what: str = "output folder", option: str = "--out") -> Path:
    """Create ``path`` if needed and prove it is writable, or raise :class:`UsageError` naming ``option``."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise UsageError(f"{path}: cannot write to this {what} ({exc.strerror}); choose another {option}") from None
    return path


class RunLock:
    """An exclusive lock on a folder, held for a run's lifetime (``em-round``, ``train-patches``, ``pretrain``).

    Uses ``flock`` on ``<folder>/.wsi-pipeline.lock``: the kernel releases it if
    the process dies, so a crashed cron run never leaves a stale lock. The file
    names the holder (host, pid, command); a second run on the same folder fails
    at once with :class:`UsageError` quoting it. The file is removed when the lock
    is released, so a folder a command refused is left as it was (a run that dies
    leaves it, unlocked, and the next run takes it over). On a file system without
    ``flock`` (some NFS and Lustre mounts) the lock is a lease instead
    (:mod:`pipeline.leases`: stale once its process is gone or after ``timeout`` s
    without a refresh).
    """

    NAME = ".wsi-pipeline.lock"

    def __init__(self, folder: str | Path, command: str, timeout: float = DEFAULT_TIMEOUT_S):
        self.path = Path(folder) / self.NAME
        self.command = command
        self.timeout = timeout
        self._fh = None
        self._leases: Leases | None = None

    def _open_locked(self):
        """Open and lock the lock file; None when another process holds it."""
        while True:
            fh = open(self.path, "a+")
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    fh.close()
                    raise
                fh.seek(0)
                self._holder = fh.read().strip() or "another process"
                fh.close()
                return None
            # The holder before us may have removed the file after we opened it: lock the one at the path.
            try:
                same = os.fstat(fh.fileno()).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fh
            fh.close()

    def __enter__(self) -> "RunLock":
        try:
            fh = self._open_locked()
        except OSError as exc:
            if exc.errno in FLOCK_UNSUPPORTED:
                return self._enter_lease()
            raise UsageError(f"{self.path}: cannot create the run lock ({exc.strerror}); choose another folder") from None
        if fh is None:
            raise UsageError(self._busy(self._holder))
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on host {socket.gethostname()}, '{self.command}' since {utc_now()}\n")
        fh.flush()
        self._fh = fh
        return self

    def _busy(self, holder: str) -> str:
        return (f"{self.path.parent}: another wsi-pipeline run is using this folder ({holder}); "
                "wait for it to finish or choose another --out")

    def _enter_lease(self) -> "RunLock":
        """Where ``flock`` is not supported: hold the folder's ``lock`` lease instead."""
        self.path.unlink(missing_ok=True)  # nobody can flock it here
        log.debug("%s: the file system does not support flock; using a lease file instead", self.path.parent)
        leases = Leases(self.path.parent, self.command, self.timeout).__enter__()
        try:
            got = leases.claim("lock")
        except BaseException:
            leases.__exit__(None, None, None)
            raise
        if not got.ok:
            leases.__exit__(None, None, None)
            raise UsageError(self._busy(got.holder))
        self._leases = leases
        return self

    def __exit__(self, *exc) -> None:
        if self._leases is not None:
            self._leases.__exit__(*exc)
            self._leases = None
        if self._fh is not None:
            try:
                self.path.unlink(missing_ok=True)
            except OSError:
                pass
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
    status: str  # "done", "skipped", "failed", or "busy" (another job held its lease)
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
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    started_unix: float = field(default_factory=time.time)
    finished_unix: float = 0.0

    def add(self, outcome: SlideOutcome) -> None:
        self.slides.append(outcome)

    def counts(self) -> dict[str, int]:
        return count_statuses(s.status for s in self.slides)

    @property
    def ok(self) -> bool:
        return self.counts()["failed"] == 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["counts"] = self.counts()
        return d

    def summary(self) -> str:
        c = self.counts()
        first = f"{self.command}: {c['done']} done, {c['skipped']} skipped, {c['failed']} failed in {self.seconds:.1f} s"
        if c.get("busy"):
            first += f"; {c['busy']} slide{'s' if c['busy'] > 1 else ''} being processed by other jobs"
        lines = [first]
        for s in self.slides:
            if s.status == "failed":
                lines.append(f"  FAILED {s.slide_id}: {s.reason}")
        return "\n".join(lines)


def count_statuses(statuses: Iterable[str]) -> dict[str, int]:
    """``{"done": n, "skipped": n, "failed": n}``, and ``"busy"`` (or another status) when there are any."""
    out = {"done": 0, "skipped": 0, "failed": 0}
    for st in statuses:
        out[st] = out.get(st, 0) + 1
    return out


#: Which outcome of a slide the folder report keeps when runs that overlapped both list it
#: (equal ranks: the later run's).
_RANK = {"busy": 0, "skipped": 1, "done": 2, "failed": 2}


def merge_reports(previous: dict | None, own: dict, own_file: str) -> dict:
    """The folder report (``<command>-report.json``) after a run: ``own`` (its :meth:`RunReport.to_dict`,
    kept at ``own_file``), with the slides of the runs in ``previous`` (the folder report before) that
    were still running when this one started. Runs one after another: the last run's report; jobs
    side by side: every slide any of them handled, with the outcome of the job that did the work."""
    prev = previous if isinstance(previous, dict) else {}
    runs = [r for r in prev.get("runs") or [] if isinstance(r, dict) and r.get("report") != own_file
            and float(r.get("finished_unix") or 0) >= own["started_unix"]]
    keep = {r.get("report") for r in runs}
    earlier = [s for s in prev.get("slides") or [] if isinstance(s, dict) and s.get("report") in keep]
    best: dict[str, dict] = {}
    for s in earlier + [{**s, "report": own_file} for s in own["slides"]]:
        cur = best.get(s["slide_id"])
        if cur is None or _RANK.get(s["status"], 0) >= _RANK.get(cur["status"], 0):
            best[s["slide_id"]] = s
    slides = [best[k] for k in sorted(best)]
    runs.append({"report": own_file, **{k: own[k] for k in ("host", "pid", "started_utc", "finished_utc",
                                                          "started_unix", "finished_unix", "counts")}})
    return {**own, "slides": slides, "counts": count_statuses(s["status"] for s in slides), "runs": runs}


def _read_json_or_none(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- one batch run


def clean_temporaries(folder: str | Path) -> list[Path]:
    """Remove what runs that stopped without finishing left in ``folder`` under temporary
    names (``.tmp-*`` being built, ``.old-*`` being replaced); returns what was removed.

    Call only when no other job works in the folder (:meth:`BatchRun.clean`): a live run's
    temporaries look the same.
    """
    removed = []
    for p in sorted(list(Path(folder).glob(".tmp-*")) + list(Path(folder).glob(".old-*"))):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def record_matches(record: Mapping | None, fmt: str, versions: Container, **expected) -> bool:
    """Whether an earlier output can be kept: its ``record`` (a store's attributes, a result's
    JSON) is of format ``fmt`` in one of the ``versions`` this software reads, and has every
    ``expected`` value (the input's fingerprint, the settings' hash...)."""
    if not record or record.get("format") != fmt or record.get("format_version") not in versions:
        return False
    return all(record.get(key) == value for key, value in expected.items())


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True, **options):
    """A tqdm bar on stderr, the way every command shows one: none when ``enabled`` is off (``--quiet``) or
    stderr is not a terminal (logs and CI output stay clean); log lines pass above it (:func:`setup_logging`)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=True if not enabled else None, **options)


class BatchRun:
    """One run of a batch command (``tile``, ``classify``) over one output folder, alongside any others.

    ``with BatchRun(command, out, settings) as run:`` registers the run in the folder's
    leases (:mod:`pipeline.leases`); :meth:`claim` a slide before working on it (a slide
    another live job holds is recorded as ``"busy"``) and :meth:`release` it when done;
    :meth:`clean` removes the temporaries a stopped run left (only when no other job works
    there); :meth:`mutex` guards read-modify-write of folder-wide files; :meth:`start` shows
    a progress bar; :meth:`outcome` records what happened to one slide. Leaving the block
    normally publishes the report (:meth:`publish`): ``reports/<command>-<time>-<id>.json``
    for this run, and ``<command>-report.json`` merged with the runs that overlapped it.
    ``t0`` (a ``time.perf_counter()`` value, default now) is when the run's time starts.
    """

    def __init__(self, command: str, out: str | Path, settings: dict, *, progress: bool = True,
                 t0: float | None = None, lease_timeout: float = DEFAULT_TIMEOUT_S):
        self.command = command
        self.out = Path(out)
        self.report = RunReport(command=command, settings=settings)
        self.progress = progress
        self.bar = None
        self._sub_bars: list = []
        self._left = 0
        self._t0 = time.perf_counter() if t0 is None else t0
        self.leases = Leases(self.out, command, lease_timeout)
        stamp = self.report.started_utc.replace(":", "").replace("-", "")
        self.own_file = f"reports/{command}-{stamp}-{uuid.uuid4().hex[:6]}.json"
        self.folder_report = self.out / f"{command}-report.json"
        self._published = False

    def __enter__(self) -> "BatchRun":
        self.leases.__enter__()
        try:
            with self.leases.mutex():
                self.leases.register()
        except BaseException:
            self.leases.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            for bar in [*self._sub_bars, self.bar]:  # closing twice is harmless; an interrupted run leaves none
                if bar is not None:
                    bar.close()
            if exc_type is None and not self._published:
                self.publish()
        finally:
            self.leases.__exit__(exc_type, exc, tb)

    # ---------------------------------------------------------------- slides and the folder

    def claim(self, slide_id: str) -> Claim:
        """Claim a slide for this run (see :meth:`pipeline.leases.Leases.claim`)."""
        got = self.leases.claim(f"slide-{slide_id}")
        if got.took_over:
            log.warning("%s: took over its lease from %s", slide_id, got.took_over)
        return got

    def release(self, slide_id: str) -> None:
        self.leases.release(f"slide-{slide_id}")

    def mutex(self):
        """The folder's bookkeeping mutex (a context manager; re-entrant)."""
        return self.leases.mutex()

    def clean(self, *subfolders: str) -> list[Path]:
        """:func:`clean_temporaries` in the output folder, or in these subfolders of it, unless other
        jobs work there (their temporaries look the same: the next job alone in the folder removes them)."""
        with self.mutex():
            others = self.leases.other_runs()
            if others:
                log.debug("%s: left temporaries in place, %d other job(s) work here (%s)", self.out, len(others),
                          others[0])
                return []
            return [p for sub in (subfolders or (".",)) for p in clean_temporaries(self.out / sub)]

    # ---------------------------------------------------------------- progress and outcomes

    def start(self, total: int, **bar_options) -> None:
        """Show a progress bar over the next ``total`` slides (unless ``progress`` is off); it closes
        when they all have an outcome."""
        self._left = total
        self.bar = progress_bar(total, self.command, "slide", self.progress, **bar_options)

    def sub_bar(self, total: int, desc: str, unit: str):
        """A bar for the work inside one item (e.g. the tiles of the slide being tiled), shown under the slide
        bar and cleared when closed; shown or not like the slide bar."""
        bar = progress_bar(total, desc, unit, self.progress, leave=False, mininterval=0.5)
        self._sub_bars = [b for b in self._sub_bars if not b.disable] + [bar]  # closed bars are disabled
        return bar

    def outcome(self, slide_id: str, path: str | Path, status: str, reason: str = "", seconds: float = 0.0,
                **details) -> SlideOutcome:
        """Record one slide as ``"done"``, ``"skipped"``, ``"failed"`` (with one line of ``reason``) or
        ``"busy"`` (another job holds it)."""
        out = SlideOutcome(slide_id, str(path), status, reason, round(seconds, 3), details)
        self.report.add(out)
        if self.bar is not None:
            self.bar.update(1)
            self._left -= 1
            if self._left == 0:
                self.bar.close()
        if status == "failed":
            log.warning("FAILED %s: %s", slide_id, reason)
        elif status == "busy":  # the summary counts them; one line each would flood a big cohort's log
            log.debug("%s: %s", slide_id, reason)
        return out

    # ---------------------------------------------------------------- the report

    def _finish(self) -> dict:
        r = self.report
        r.slides.sort(key=lambda s: s.slide_id)
        r.finished_utc, r.finished_unix = utc_now(), time.time()
        r.seconds = round(time.perf_counter() - self._t0, 3)
        return r.to_dict()

    def merged(self) -> dict:
        """The folder report as :meth:`publish` would write it now (call under :meth:`mutex`)."""
        return merge_reports(_read_json_or_none(self.folder_report), self._finish(), self.own_file)

    def publish(self) -> dict:
        """Write this run's report, then rebuild ``<command>-report.json`` under the folder mutex; returns it."""
        own = self._finish()
        atomic_write_json(self.out / self.own_file, own)
        with self.mutex():
            merged = merge_reports(_read_json_or_none(self.folder_report), own, self.own_file)
            atomic_write_json(self.folder_report, merged)
        self._published = True
        return merged


_console_redirect = None  # the logging_redirect_tqdm context entered by setup_logging


def setup_logging(quiet: bool = False, verbose: bool = False, log_file: str | Path | None = None) -> None:
    """Log lines of ``wsi_pipeline`` to stderr through ``tqdm.write`` (progress bars stay intact) at
    WARNING (``quiet``), DEBUG (``verbose``) or INFO; with ``log_file`` also appended to that file at
    INFO (DEBUG with ``verbose``), whatever ``quiet`` says, with the date on every line."""
    global _console_redirect
    from tqdm.contrib.logging import logging_redirect_tqdm

    if _console_redirect is not None:
        _console_redirect.__exit__(None, None, None)
        _console_redirect = None
    console_level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(console_level)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger("wsi_pipeline")
    for h in root.handlers:
        if isinstance(h, logging.FileHandler):
            h.close()
    root.handlers[:] = [handler]
    level = console_level
    if log_file is not None:
        try:
            Path(log_file).parent.mkdir(parents=True, exist_ok=True)
            fh = logging.FileHandler(log_file, mode="a", encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"{log_file}: cannot open the log file ({exc.strerror}); choose another --log-file") from None
        fh.setLevel(logging.DEBUG if verbose else logging.INFO)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        root.handlers.append(fh)
        level = min(level, fh.level)
    root.setLevel(level)
    root.propagate = False
    _console_redirect = logging_redirect_tqdm(loggers=[root])
    _console_redirect.__enter__()
    for h in root.handlers:  # the tqdm handler replacing the console one does not copy its level
        if not isinstance(h, logging.FileHandler):
            h.setLevel(console_level)
