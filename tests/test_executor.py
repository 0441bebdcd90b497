"""The executors: threads of this process and a real Dask LocalCluster of worker processes, both
behind the driver-side queue, and the inline one."""

from __future__ import annotations

import os
import threading
import time

import pytest

from pipeline.executor import future_error, make_executor


def _stamp(tag: str, seconds: float) -> tuple[str, float, float]:
    t0 = time.time()
    time.sleep(seconds)
    return tag, t0, time.time()


def _boom() -> None:
    raise ValueError("bad slide")


def _where() -> tuple[int, int]:
    return os.getpid(), threading.get_ident()


def _crash() -> None:
    os.abort()  # what a segfault in a native decoder does to the process


@pytest.mark.parametrize("processes", [False, True], ids=["threads", "processes"])
def test_dask_queue_limits_in_flight_and_honours_priority(processes):
    with make_executor(2, processes=processes, warm=("json",)) as ex:
        assert ex.n_workers == 2 and ex.in_flight == 2
        futs = [ex.submit(_stamp, f"low{i}", 0.3) for i in range(4)]
        urgent = ex.submit(_stamp, "urgent", 0.05, priority=5)
        bad = ex.submit(_boom, priority=5)
        done = {}
        for fut in ex.completed():
            err = future_error(fut)
            if err is not None:
                done["bad"] = err
            else:
                tag, t0, t1 = fut.result()
                done[tag] = (t0, t1)
        assert isinstance(done.pop("bad"), ValueError)
        assert len(done) == 5 and {f.result()[0] for f in futs + [urgent]} == set(done)
        spans = sorted(done.values())
        # never more than two calls running at once
        for t0, _ in spans:
            assert sum(1 for a, b in spans if a <= t0 + 1e-3 and b > t0 + 1e-3) <= 2
        # the urgent call, submitted last, started before the low-priority calls still queued
        assert done["urgent"][0] < max(t0 for tag, (t0, _) in done.items() if tag.startswith("low"))


@pytest.mark.parametrize("processes", [False, True], ids=["threads", "processes"])
def test_local_cluster_workers_are_threads_or_processes(processes):
    with make_executor(2, processes=processes) as ex:
        assert ("processes" if processes else "threads") in ex.description
        futs = [ex.submit(_stamp, "x", 0.2) for _ in range(2)] + [ex.submit(_where) for _ in range(4)]
        where = {f.result() for f in ex.completed() if f.result()[0] != "x"}
    pids = {pid for pid, _ in where}
    if processes:
        assert os.getpid() not in pids
    else:
        assert pids == {os.getpid()} and threading.get_ident() not in {t for _, t in where}
    assert len(futs) == 6


def test_a_crashing_worker_process_fails_its_call_alone():
    # The reason --processes exists: a native crash kills one worker process, the
    # call is retried once on a fresh worker, then fails (Dask's KilledWorker), and
    # the other calls and the driver go on.
    with make_executor(2, processes=True) as ex:
        bad = ex.submit(_crash)
        good = [ex.submit(_stamp, f"ok{i}", 0.05) for i in range(3)]
        finished = list(ex.completed())
        assert len(finished) == 4
        assert type(future_error(bad)).__name__ == "KilledWorker"
        assert [g.result()[0] for g in good] == ["ok0", "ok1", "ok2"]


def test_inline_executor_runs_at_once():
    with make_executor(0) as ex:
        assert ex.n_workers == 1
        f = ex.submit(_stamp, "x", 0.0, priority=3)
        g = ex.submit(_boom)
        got = list(ex.completed())
    assert got == [f, g]
    assert f.result()[0] == "x" and isinstance(future_error(g), ValueError)
