"""Many jobs, one output folder: per-slide leases, their takeover, merged reports, and real concurrent CLI runs."""

from __future__ import annotations

import csv
import errno
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.batch import BatchRun, RunLock, UsageError, merge_reports
from pipeline.leases import LEASES_DIR, TAKEOVER, Leases, read_lease, stale_reason
from tests.em_fixtures import em_cohort, em_run  # noqa: F401  (fixtures)
from wsi.store import STORES_LOCK, TileStore, list_stores, stores_lock, verify_store

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def _env():
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write_lease(folder: Path, key: str, **kw) -> Path:
    """A lease file as another process wrote it."""
    return _write_lease_file(folder / LEASES_DIR / f"{key}.lease", **kw)


def _write_lease_file(path: Path, *, pid: int, host: str = socket.gethostname(), age_s: float = 0.0,
                      token: str = "old") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": host, "pid": pid, "command": "tile", "token": token,
                                "since_utc": "2020-01-01T00:00:00Z"}))
    t = time.time() - age_s
    os.utime(path, (t, t))
    return path


# --------------------------------------------------------------------------- leases


def test_claim_busy_release(tmp_path):
    with Leases(tmp_path, "tile") as a, Leases(tmp_path, "classify") as b:
        assert a.claim("slide-x").ok
        got = b.claim("slide-x")
        assert not got.ok and f"pid {os.getpid()} on host {socket.gethostname()}, 'tile'" in got.holder
        data = json.loads(a.path("slide-x").read_text())
        assert data["pid"] == os.getpid() and data["host"] == socket.gethostname() and data["since_utc"]
        a.release("slide-x")
        assert b.claim("slide-x").ok
    assert not (tmp_path / LEASES_DIR).exists()  # released on exit, the empty folder removed


def test_a_lease_of_a_dead_process_is_taken_over_a_live_one_is_not(tmp_path):
    _write_lease(tmp_path, "slide-dead", pid=_dead_pid())
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lease(tmp_path, "slide-live", pid=live.pid)
        with Leases(tmp_path, "tile") as leases:
            got = leases.claim("slide-dead")
            assert got.ok and "on this host is gone" in got.took_over
            assert json.loads(leases.path("slide-dead").read_text())["pid"] == os.getpid()
            got = leases.claim("slide-live")
            assert not got.ok and f"pid {live.pid}" in got.holder
    finally:
        live.kill()
        live.wait()
    assert not (tmp_path / LEASES_DIR / f"slide-dead.lease{TAKEOVER}").exists()


def test_a_lease_past_the_timeout_is_taken_over(tmp_path):
    # a holder on another host: only its age tells
    path = _write_lease(tmp_path, "slide-a", pid=1, host="another-node", age_s=50)
    with Leases(tmp_path, "tile", timeout=60) as leases:
        got = leases.claim("slide-a")
        assert not got.ok and "host another-node" in got.holder
        t = time.time() - 61
        os.utime(path, (t, t))
        got = leases.claim("slide-a")
        assert got.ok and "not refreshed for 61 s" in got.took_over


def test_the_holder_refreshes_its_lease(tmp_path):
    with Leases(tmp_path, "tile", timeout=0.4) as leases:
        assert leases.claim("slide-a").ok
        time.sleep(0.8)
        seen = read_lease(leases.path("slide-a"))
        assert time.time() - seen.mtime < 0.35 and not stale_reason(seen, 0.4)


def test_a_takeover_whose_taker_died_is_finished_by_the_next(tmp_path):
    _write_lease(tmp_path, "slide-a", pid=_dead_pid(), token="first")
    marker = _write_lease_file(tmp_path / LEASES_DIR / f"slide-a.lease{TAKEOVER}", pid=_dead_pid(), token="taker")
    with Leases(tmp_path, "tile") as leases:
        assert leases.claim("slide-a").ok
        assert json.loads(leases.path("slide-a").read_text())["pid"] == os.getpid()
        assert not marker.exists()


def _race(folder: str, key: str, barrier, results) -> None:
    with Leases(folder, "racer") as leases:
        barrier.wait()
        got = leases.claim(key)
        results.put((os.getpid(), got.ok))
        if got.ok:
            time.sleep(0.3)  # hold it while the losers look
            path = leases.path(key)
            results.put(("owner", json.loads(path.read_text())["pid"]))


@pytest.mark.parametrize("stale", [False, True], ids=["fresh", "stale"])
def test_racing_takers_exactly_one_wins(tmp_path, stale):
    ctx = multiprocessing.get_context("fork")
    n = 6
    for round_ in range(4):
        key = f"slide-r{round_}"
        if stale:
            _write_lease(tmp_path, key, pid=_dead_pid())
        barrier, results = ctx.Barrier(n), ctx.Queue()
        procs = [ctx.Process(target=_race, args=(str(tmp_path), key, barrier, results)) for _ in range(n)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        got = [results.get(timeout=5) for _ in range(n + 1)]
        winners = [pid for pid, ok in got if pid != "owner" and ok]
        owners = [pid for tag, pid in got if tag == "owner"]
        assert len(winners) == 1 and owners == winners, got
        assert all(p.exitcode == 0 for p in procs)
    assert not (tmp_path / LEASES_DIR).exists() or not list((tmp_path / LEASES_DIR).iterdir())


def test_the_mutex_serialises_read_modify_write(tmp_path):
    counter = tmp_path / "n.txt"
    counter.write_text("0")

    def bump():
        with Leases(tmp_path, "bump") as leases:
            for _ in range(15):
                with leases.mutex(), leases.mutex():  # re-entrant
                    n = int(counter.read_text())
                    time.sleep(0.001)
                    counter.write_text(str(n + 1))

    threads = [threading.Thread(target=bump) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counter.read_text() == "45"


# --------------------------------------------------------------------------- batch runs and reports


def _outcome_dict(sid, status, report="x"):
    return {"slide_id": sid, "path": f"{sid}.tif", "status": status, "reason": "", "seconds": 0.0, "details": {},
            "report": report}


def test_merge_keeps_the_runs_that_overlapped_and_the_job_that_did_the_work():
    prev = {"runs": [{"report": "r1", "finished_unix": 100.0}, {"report": "r0", "finished_unix": 10.0}],
            "slides": [_outcome_dict("a", "done", "r1"), _outcome_dict("b", "busy", "r1"),
                       _outcome_dict("c", "done", "r0")]}
    own = {"command": "tile", "host": "h", "pid": 1, "started_utc": "", "finished_utc": "", "started_unix": 50.0,
           "finished_unix": 120.0, "counts": {}, "settings": {},
           "slides": [_outcome_dict("a", "busy"), _outcome_dict("b", "done"), _outcome_dict("d", "skipped")]}
    m = merge_reports(prev, own, "r2")
    assert {s["slide_id"]: (s["status"], s["report"]) for s in m["slides"]} == {
        "a": ("done", "r1"), "b": ("done", "r2"), "d": ("skipped", "r2")}  # c: a run before this one started
    assert [r["report"] for r in m["runs"]] == ["r1", "r2"]
    assert m["counts"] == {"done": 2, "skipped": 1, "failed": 0}
    # one run after another: the last run's report alone (as before leases)
    assert [s["slide_id"] for s in merge_reports(prev, {**own, "started_unix": 101.0}, "r2")["slides"]] == ["a", "b", "d"]
    assert [s["status"] for s in merge_reports(prev, {**own, "started_unix": 101.0}, "r2")["slides"]] == [
        "busy", "done", "skipped"]


def test_two_batch_runs_share_a_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".tmp-left-by-someone.json").write_text("{}")
    with BatchRun("tile", out, {}, progress=False) as a, BatchRun("tile", out, {}, progress=False) as b:
        assert a.clean() == []  # another job works here: its temporaries look the same
        assert a.claim("s1").ok and not b.claim("s1").ok and b.claim("s2").ok
        a.outcome("s1", "s1.tif", "done")
        a.outcome("s2", "s2.tif", "busy", "being processed by another job")
        b.outcome("s1", "s1.tif", "busy", "being processed by another job")
        b.outcome("s2", "s2.tif", "done")
        assert "1 slide being processed by other jobs" in a.report.summary() and a.report.ok
    rep = json.loads((out / "tile-report.json").read_text())
    assert [(s["slide_id"], s["status"]) for s in rep["slides"]] == [("s1", "done"), ("s2", "done")]
    assert len(rep["runs"]) == 2 and len(list((out / "reports").glob("tile-*.json"))) == 2
    assert not (out / LEASES_DIR).exists()
    with BatchRun("tile", out, {}, progress=False) as c:
        assert [p.name for p in c.clean()] == [".tmp-left-by-someone.json"]  # alone now


# --------------------------------------------------------------------------- no flock


@pytest.fixture
def no_flock(monkeypatch):
    """A file system without flock (some NFS and Lustre mounts): every flock call fails with ENOLCK."""
    import fcntl

    def flock(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", flock)


def test_run_lock_without_flock_is_a_lease(tmp_path, no_flock, caplog):
    import logging

    logging.getLogger("wsi_pipeline").addHandler(caplog.handler)  # it may not propagate (setup_logging)
    with RunLock(tmp_path, "em-round"):
        with pytest.raises(UsageError, match=f"another wsi-pipeline run is using this folder \\(pid {os.getpid()} on "
                                             f"host {socket.gethostname()}, 'em-round'"):
            RunLock(tmp_path, "em-round").__enter__()
    assert list(tmp_path.iterdir()) == []
    with stores_lock(tmp_path, exclusive=True) as held:
        assert held is False
    logging.getLogger("wsi_pipeline").removeHandler(caplog.handler)
    assert "does not support flock" in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == [STORES_LOCK]


_NO_FLOCK_CLI = """
import errno, fcntl, os, sys
def flock(fd, op):
    raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
fcntl.flock = flock
from pipeline.cli import main
sys.argv = ["wsi-pipeline"] + sys.argv[1:]
main()
"""


def test_tile_on_a_file_system_without_flock(tmp_path, synth_slides):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-c", _NO_FLOCK_CLI, "tile", str(synth_slides["tissue"]), "--out", str(out),
                        "--config", TINY, "--workers", "0"], capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "does not support flock" in r.stderr and "1 done" in r.stderr
    assert list_stores(out) == [out / "tissue.zarr"] and not (out / LEASES_DIR).exists()


# --------------------------------------------------------------------------- real processes, one folder

#: The real CLI, imported first and started when ``<argv[1]>/go`` appears, so the jobs really start together.
_AT_ONCE = """
import os, sys, time
import pipeline.classify, pipeline.tile
from pipeline.cli import main
d = sys.argv[1]
open(os.path.join(d, f"ready-{os.getpid()}"), "w").close()
while not os.path.exists(os.path.join(d, "go")):
    time.sleep(0.005)
sys.argv = ["wsi-pipeline"] + sys.argv[2:]
main()
"""


def _together(tmp_path: Path, commands: list[list[str]], timeout: float = 300) -> list[subprocess.CompletedProcess]:
    sync = tmp_path / "sync"
    sync.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", _AT_ONCE, str(sync), *cmd], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=_env()) for cmd in commands]
    t0 = time.monotonic()
    while len(list(sync.glob("ready-*"))) < len(procs) and time.monotonic() - t0 < 120:
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.02)
    (sync / "go").touch()
    done = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


def _run_reports(out: Path, command: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "reports").glob(f"{command}-*.json"))]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    from wsi.synth import make_cohort

    d = tmp_path_factory.mktemp("lease_cohort") / "cohort"
    make_cohort(d, n_positive=6, n_negative=6, width_px=1536, height_px=1536, mpp=0.5, seed=5, workers=2,
                difficulty="easy")
    return d


def test_four_tile_jobs_on_one_folder_tile_every_slide_once(tmp_path, cohort):
    out = tmp_path / "stores"
    ids = sorted(p.stem for p in cohort.glob("*.tif"))
    cmd = ["tile", str(cohort), "--out", str(out), "--config", TINY, "--set", "tiling.mpp=1.0", "--workers", "1"]
    runs = _together(tmp_path, [cmd] * 4)
    assert all(r.returncode == 0 and "Traceback" not in r.stderr for r in runs), [r.stderr for r in runs]
    reports = _run_reports(out, "tile")
    assert len(reports) == 4
    done = [s["slide_id"] for rep in reports for s in rep["slides"] if s["status"] == "done"]
    assert sorted(done) == ids  # every slide tiled, by exactly one job
    assert sum(1 for rep in reports if rep["counts"]["done"]) >= 2  # the jobs really shared the work
    for rep in reports:  # each job accounts for every slide
        assert sorted(s["slide_id"] for s in rep["slides"]) == ids
        assert all(s["status"] in ("done", "skipped", "busy") for s in rep["slides"])
    busy = sum(rep["counts"].get("busy", 0) for rep in reports)
    if busy:
        assert any("being processed by other jobs" in r.stderr for r in runs)
    folder = json.loads((out / "tile-report.json").read_text())
    assert [(s["slide_id"], s["status"]) for s in folder["slides"]] == [(i, "done") for i in ids]
    assert list_stores(out) == [out / f"{i}.zarr" for i in ids]
    for i in ids:
        st = TileStore(out / f"{i}.zarr")
        assert st.attrs["complete"] and len(st) > 0 and verify_store(st.path, checksums=True) == []
    assert not (out / LEASES_DIR).exists()
    assert not [p.name for p in out.iterdir() if p.name.startswith((".tmp-", ".old-"))]


@pytest.mark.slow
def test_two_classify_jobs_on_one_folder_score_every_slide_once(tmp_path, em_cohort, em_run):
    out = tmp_path / "out"
    ids = sorted(s["slide_id"] for s in em_cohort.info["slides"])
    cmd = ["classify", str(em_cohort.cohort), "--run", str(em_run), "--out", str(out), "--workers", "1",
           "--loader-workers", "0", "--quiet"]
    runs = _together(tmp_path, [cmd] * 2, timeout=600)
    assert all(r.returncode == 0 and "Traceback" not in r.stderr for r in runs), [r.stderr for r in runs]
    with open(out / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["slide_id"] for r in rows) == ids  # every slide, once
    reports = _run_reports(out, "classify")
    scored = [s["slide_id"] for rep in reports for s in rep["slides"] if s["status"] == "done"]
    assert sorted(scored) == ids  # each scored by exactly one job
    tiled = [s["slide_id"] for rep in _run_reports(out / "stores", "tile") for s in rep["slides"]
             if s["status"] == "done"]
    assert sorted(tiled) == ids
    folder = json.loads((out / "classify-report.json").read_text())
    assert [(s["slide_id"], s["status"]) for s in folder["slides"]] == [(i, "done") for i in ids]
    assert not (out / LEASES_DIR).exists() and not (out / "stores" / LEASES_DIR).exists()

