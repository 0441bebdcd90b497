"""The executors: a real Dask LocalCluster with the driver-side queue, and the inline one."""

from __future__ import annotations

import time

import pytest

from pipeline.executor import future_error, make_executor


def _stamp(tag: str, seconds: float) -> tuple[str, float, float]:
    t0 = time.time()
    time.sleep(seconds)
    return tag, t0, time.time()


def _boom() -> None:
    raise ValueError("bad slide")


def test_dask_queue_limits_in_flight_and_honours_priority():
    with make_executor(2, quiet=True, warm=("json",)) as ex:
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


def test_inline_executor_runs_at_once():
    with make_executor(0) as ex:
        assert ex.n_workers == 1
        f = ex.submit(_stamp, "x", 0.0, priority=3)
        g = ex.submit(_boom)
        got = list(ex.completed())
    assert got == [f, g]
    assert f.result()[0] == "x" and isinstance(future_error(g), ValueError)
