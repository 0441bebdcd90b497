"""Where per-slide work runs: threads of this process, a local Dask cluster of
worker processes, an existing Dask cluster, Dask workers in SLURM jobs
(:mod:`pipeline.slurm`), or this thread alone.

Workers open slides and read pixels themselves; only small dicts travel back
to the driver. Dask worker processes are spawned (not forked), so no slide
handle or lock is ever inherited.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import heapq
import logging
import os
import queue
from contextlib import contextmanager
from typing import Any, Callable, Iterator

log = logging.getLogger("wsi_pipeline")


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def resolve_workers(workers: int) -> int:
    """A ``--workers`` / ``runtime.workers`` value as a count, joblib's convention.

    -1 is every core this process may use (:func:`available_cores`), 0 one task
    at a time in this thread, N >= 1 N at a time. Below -1 is a :class:`UsageError`.
    """
    if workers < -1:
        from pipeline.batch import UsageError

        raise UsageError(
            f"--workers {workers}: use -1 (all cores), 0 (one task at a time in this thread) or a number >= 1"
        )
    return available_cores() if workers == -1 else int(workers)


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

    description = "one task at a time in this thread"


class _Queued:
    """A call waiting in the driver's queue; gets its backend future once dispatched."""

    __slots__ = ("fn", "args", "kwargs", "future")

    def __init__(self, fn, args, kwargs) -> None:
        self.fn, self.args, self.kwargs, self.future = fn, args, kwargs, None

    def result(self):
        return self.future.result()

    def exception(self):
        return self.future.exception()


class _DriverQueue:
    """Calls wait in a priority queue in the driver and start only when a worker slot is free.

    At most ``in_flight`` calls run at once (one per worker thread); a free
    slot takes the most urgent call queued (higher ``priority`` first, then
    first come first served). Backends say how a call starts (``_start``) and
    how finished ones come back (``_finished``).
    """

    n_workers: int
    in_flight: int
    description: str

    def __init__(self, in_flight: int) -> None:
        self.in_flight = max(1, int(in_flight))
        self._queue: list = []
        self._seq = 0
        self._running: dict = {}

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
            item.future = self._start(item.fn, item.args, item.kwargs)
            item.fn = item.args = item.kwargs = None
            self._running[item.future] = item

    def backlog(self) -> int:
        """Calls submitted and not finished yet: waiting in the queue or running."""
        return len(self._queue) + len(self._running)

    def completed(self) -> Iterator[_Queued]:
        """Yield calls as they finish; calls submitted meanwhile are yielded too."""
        for fut in self._finished():
            item = self._running.pop(fut)
            self._pump()
            yield item

    def _start(self, fn, args, kwargs):  # pragma: no cover - abstract
        raise NotImplementedError

    def _finished(self) -> Iterator:  # pragma: no cover - abstract
        raise NotImplementedError


class ThreadExecutor(_DriverQueue):
    """Runs calls on ``n_threads`` threads of this process (the default for local runs).

    Tiling's heavy work (JPEG decoding and encoding in imagecodecs, OpenSlide
    reads through ctypes, OpenCV, file writes) runs in C with the GIL
    released, so N threads do the work of N processes, with nothing to start
    (a spawned interpreter importing Dask and the tiling modules costs
    ~0.4 s of CPU) and nothing to pass between processes. A crash inside a
    native library takes this process down, though: see ``--processes``.
    """

    def __init__(self, n_threads: int) -> None:
        super().__init__(n_threads)
        self.n_workers = int(n_threads)
        self._pool = cf.ThreadPoolExecutor(self.n_workers, thread_name_prefix="wsi-worker")
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self.description = f"{self.n_workers} threads in this process"

    def _start(self, fn, args, kwargs) -> cf.Future:
        fut = self._pool.submit(fn, *args, **kwargs)
        fut.add_done_callback(self._done.put)
        return fut

    def _finished(self) -> Iterator[cf.Future]:
        while self._running:
            yield self._done.get()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class DaskExecutor(_DriverQueue):
    """Submits calls to a Dask cluster and yields them as they finish.

    Calls wait in the driver's queue (:class:`_DriverQueue`) and go to the
    cluster only when a worker thread is free. Dask assigns tasks without
    dependencies to workers as soon as they are submitted, guessing their
    duration; with a handful of second-long tasks that guess leaves one worker
    with two tasks queued while another sits idle. Holding them here makes
    every free worker take the next most urgent call instead.
    """

    def __init__(self, client, *, in_flight: int | None = None) -> None:
        from distributed import as_completed

        info = client.scheduler_info()["workers"]
        n_workers = max(1, len(info))
        threads = sum(int(w.get("nthreads", 1)) for w in info.values()) or n_workers
        super().__init__(int(in_flight) if in_flight else threads)
        self.client = client
        self.n_workers = n_workers
        self._ac = as_completed([])
        self.description = f"dask {client.scheduler.address} ({self.n_workers} workers)"

    def warm(self, modules: tuple[str, ...]) -> None:
        """Import ``modules`` on every worker now, so the first tasks don't pay for it."""
        if modules:
            self.client.run(_import_modules, tuple(modules))

    def _start(self, fn, args, kwargs):
        fut = self.client.submit(fn, *args, pure=False, **kwargs)
        self._ac.add(fut)
        return fut

    def _finished(self):
        return iter(self._ac)

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


#: Dask's periodic bookkeeping for its dashboard, which is never started here: the
#: statistical profiler samples each worker thread's stack every 10 ms and the event loop
#: ticks every 20 ms, both taking the GIL from the task running in the worker process.
_QUIET_LOOP = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "1s",
    "distributed.admin.system-monitor.interval": "2s",
}


#: Values of ``--cluster``: the executors above on this machine, or SLURM jobs.
CLUSTERS = ("local", "slurm")


def cluster_section(cluster: str, scheduler: str | None, config):
    """``config.cluster`` for ``cluster="slurm"``, None for ``"local"``; a :class:`UsageError` for
    anything else, or for a SLURM cluster together with an existing ``scheduler``."""
    from pipeline.batch import UsageError

    if cluster not in CLUSTERS:
        raise UsageError(f"--cluster {cluster!r}: use one of {list(CLUSTERS)}")
    if cluster == "slurm" and scheduler:
        raise UsageError("--scheduler and --cluster slurm both say where to run: give one")
    return config.cluster if cluster == "slurm" else None


#: Dask settings of the clusters started here (LocalCluster, SLURMCluster).
_DASK_SETTINGS = {
    "distributed.worker.daemon": False,
    "distributed.logging.distributed": "error",
    # A call whose worker process dies is retried once on a fresh worker, then fails
    # (KilledWorker): a slide that crashes a native library fails alone, quickly.
    "distributed.scheduler.allowed-failures": 1,
    **_QUIET_LOOP,
}


@contextmanager
def make_executor(
    workers: int = 0,
    scheduler: str | None = None,
    *,
    processes: bool = False,
    warm: tuple[str, ...] = (),
    slurm=None,
):
    """An executor for per-slide work.

    Parameters
    ----------
    workers : int
        0 runs every call at once in this thread; -1 one call per core
        (:func:`resolve_workers`); N >= 1 runs N calls at a time
        on N threads of this process (:class:`ThreadExecutor`) or, with
        ``processes``, on a Dask ``LocalCluster`` of N single-threaded worker
        processes.
    processes : bool
        Spawned Dask worker processes instead of threads. They cost ~0.7 s to
        start and ~0.2 s to stop here (each interpreter imports Dask and the
        tiling modules) and a few milliseconds per task, for the same
        throughput; in exchange a crash inside a native library (a segfault on
        a malformed file) kills one worker and fails its call alone instead of
        taking down the run. Ignored with ``scheduler`` or ``workers=0``.
    scheduler : str, optional
        Address of an existing Dask scheduler (``tcp://host:8786``), e.g. one
        started by dask-jobqueue on SLURM or a Kubernetes Dask cluster. The
        workers there must see the same file paths as this machine.
    warm : tuple of str
        Modules every Dask worker imports before the executor is handed out
        (part of the start-up, like the workers themselves).
    slurm : pipeline.config.ClusterConfig, optional
        Start a dask-jobqueue SLURMCluster of this cluster section instead
        (:mod:`pipeline.slurm`; ``workers``, ``processes`` and ``scheduler``
        are not used: see :func:`cluster_section`), and close it, cancelling
        its jobs, when the block ends.
    """
    workers = resolve_workers(workers)
    if slurm is not None:
        from pipeline.slurm import slurm_executor

        with slurm_executor(slurm, _DASK_SETTINGS, warm) as ex:
            yield ex
        return
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
    if not processes:
        ex = ThreadExecutor(int(workers))
        try:
            yield ex
        finally:
            ex.close()
        return
    import dask
    from distributed import Client, LocalCluster

    with dask.config.set(_DASK_SETTINGS):
        cluster = LocalCluster(
            n_workers=int(workers),
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            # Task errors come back to the driver, which reports each as its slide's failure in
            # one line; the workers' own "Compute Failed" tracebacks would only repeat it.
            silence_logs=logging.CRITICAL,
        )
        client = Client(cluster)
        ex = DaskExecutor(client)
        ex.description = f"dask LocalCluster ({ex.n_workers} worker processes)"
        try:
            ex.warm(warm)
            yield ex
        finally:
            client.close()
            cluster.close()
