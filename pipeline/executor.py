"""Where per-slide work runs: this process, a local Dask cluster, or an existing one.

Workers open slides and read pixels themselves; only small dicts travel back
to the driver. A local Dask cluster has thread workers in this process by
default and worker processes on request; worker processes are spawned (not
forked), so no slide handle or lock is ever inherited.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import heapq
import logging
from contextlib import contextmanager
from typing import Any, Callable, Iterator

log = logging.getLogger("wsi_pipeline")


class InlineExecutor:
    """Runs each submitted call at once in this process (``--workers 0``)."""

    n_workers = 1

    def __init__(self) -> None:
        self._done: collections.deque = collections.deque()

    def submit(self, fn: Callable, *args: Any, priority: int = 0, **kwargs: Any) -> cf.Future:
        fut: cf.Future = cf.Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # delivered to the driver like a remote failure
            fut.set_exception(exc)
        self._done.append(fut)
        return fut

    def completed(self) -> Iterator[cf.Future]:
        """Yield finished futures; new submissions made meanwhile are yielded too."""
        while self._done:
            yield self._done.popleft()

    def close(self) -> None:
        pass

    description = "in-process"


class _Queued:
    """A call waiting in the driver's queue; becomes a Dask future once dispatched."""

    __slots__ = ("fn", "args", "kwargs", "future")

    def __init__(self, fn, args, kwargs) -> None:
        self.fn, self.args, self.kwargs, self.future = fn, args, kwargs, None

    def result(self):
        return self.future.result()

    def exception(self):
        return self.future.exception()


class DaskExecutor:
    """Submits calls to a Dask cluster and yields them as they finish.

    Calls wait in a priority queue here and go to the cluster only when a
    worker thread is free (at most ``in_flight`` at once, by default one per
    worker thread). Dask assigns tasks without dependencies to workers as
    soon as they are submitted, guessing their duration; with a handful of
    second-long tasks that guess leaves one worker with two tasks queued
    while another sits idle. Holding them here makes every free worker take
    the next most urgent call instead.
    """

    def __init__(self, client, *, in_flight: int | None = None) -> None:
        from distributed import as_completed

        self.client = client
        self._ac = as_completed([])
        info = client.scheduler_info()["workers"]
        self.n_workers = max(1, len(info))
        threads = sum(int(w.get("nthreads", 1)) for w in info.values()) or self.n_workers
        self.in_flight = int(in_flight) if in_flight else threads
        self._queue: list = []
        self._seq = 0
        self._running: dict = {}
        self.description = f"dask {client.scheduler.address} ({self.n_workers} workers)"

    def warm(self, modules: tuple[str, ...]) -> None:
        """Import ``modules`` on every worker now, so the first tasks don't pay for it."""
        if modules:
            self.client.run(_import_modules, tuple(modules))

    def submit(self, fn: Callable, *args: Any, priority: int = 0, **kwargs: Any) -> _Queued:
        """Queue ``fn(*args, **kwargs)``; higher ``priority`` goes first, then first come first served."""
        item = _Queued(fn, args, kwargs)
        heapq.heappush(self._queue, (-int(priority), self._seq, item))
        self._seq += 1
        self._pump()
        return item

    def _pump(self) -> None:
        while self._queue and len(self._running) < self.in_flight:
            _, _, item = heapq.heappop(self._queue)
            item.future = self.client.submit(item.fn, *item.args, pure=False, **item.kwargs)
            item.fn = item.args = item.kwargs = None
            self._running[item.future] = item
            self._ac.add(item.future)

    def completed(self) -> Iterator[_Queued]:
        """Yield calls as they finish; calls submitted meanwhile are yielded too."""
        for fut in self._ac:
            item = self._running.pop(fut)
            self._pump()
            yield item

    def close(self) -> None:
        self.client.close()


def _import_modules(names: tuple[str, ...]) -> None:
    import importlib

    for name in names:
        importlib.import_module(name)


def future_error(fut) -> BaseException | None:
    """The exception a finished future raised, or None."""
    try:
        return fut.exception()
    except (cf.CancelledError, Exception) as exc:  # cancelled or lost futures
        return exc


#: Dask's periodic bookkeeping, which serves its dashboard (not started here): the
#: statistical profiler samples every worker thread's stack each 10 ms, the event-loop
#: tick runs every 20 ms and the system monitor every 0.5 s. With thread workers all of
#: it takes the GIL from the tiling threads; turned off or slowed it cost 4-6 % less
#: CPU on the 20000 px bench slide (medians of 7 interleaved runs).
_QUIET_LOOP = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "1s",
    "distributed.admin.system-monitor.interval": "2s",
}


@contextmanager
def make_executor(
    workers: int = 0,
    scheduler: str | None = None,
    *,
    processes: bool = False,
    quiet: bool = True,
    warm: tuple[str, ...] = (),
):
    """An executor for per-slide work.

    Parameters
    ----------
    workers : int
        0 runs in this process, one call after another; N >= 1 starts a Dask
        ``LocalCluster`` with N single-threaded workers.
    processes : bool
        False (default): the ``LocalCluster``'s workers are threads of this
        process. Tiling's heavy work (JPEG decode and encode, OpenSlide reads,
        OpenCV, file writes) runs in C with the GIL released, so N threads do
        the work of N processes, start in ~0.03 s instead of ~0.8 s (spawned
        interpreters importing Dask and the tiling modules) and share one copy
        of the imported libraries. True: the workers are spawned processes; a
        crash inside a native library (a segfault on a malformed file) then
        takes down one worker, and its slide fails alone, instead of the whole
        run. Ignored with ``scheduler`` or ``workers=0``.
    scheduler : str, optional
        Address of an existing Dask scheduler (``tcp://host:8786``), e.g. one
        started by dask-jobqueue on SLURM or a Kubernetes Dask cluster. The
        workers there must see the same file paths as this machine.
    warm : tuple of str
        Modules every Dask worker process imports before the executor is
        handed out (part of the start-up, like the workers themselves).
    """
    if scheduler:
        from distributed import Client

        try:
            client = Client(scheduler, timeout="20s")
        except OSError as exc:
            from pipeline.batch import UsageError

            raise UsageError(f"cannot reach the Dask scheduler at {scheduler} ({exc})") from None
        ex = DaskExecutor(client)
        try:
            ex.warm(warm)
            yield ex
        finally:
            ex.close()
        return
    if workers <= 0:
        yield InlineExecutor()
        return
    import dask
    from distributed import Client, LocalCluster

    with dask.config.set({"distributed.worker.daemon": False, "distributed.logging.distributed": "error", **_QUIET_LOOP}):
        cluster = LocalCluster(
            n_workers=int(workers),
            threads_per_worker=1,
            processes=bool(processes),
            dashboard_address=None,
            silence_logs=logging.ERROR if quiet else logging.WARNING,
        )
        client = Client(cluster)
        ex = DaskExecutor(client)
        ex.description = f"dask LocalCluster ({ex.n_workers} {'processes' if processes else 'threads'})"
        try:
            if processes:
                ex.warm(warm)
            yield ex
        finally:
            client.close()
            cluster.close()
