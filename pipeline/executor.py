"""Where per-slide work runs: this process, a local Dask cluster, or an existing one.

Workers open slides and read pixels themselves; only small dicts travel back
to the driver. Dask worker processes are spawned (not forked), so no slide
handle or lock is ever inherited.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import logging
from contextlib import contextmanager
from typing import Any, Callable, Iterator

log = logging.getLogger("wsi_pipeline")


class InlineExecutor:
    """Runs each submitted call at once in this process (``--workers 0``)."""

    def __init__(self) -> None:
        self._done: collections.deque = collections.deque()

    def submit(self, fn: Callable, *args: Any, **kwargs: Any) -> cf.Future:
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


class DaskExecutor:
    """Submits calls to a Dask cluster and yields them as they finish."""

    def __init__(self, client) -> None:
        from distributed import as_completed

        self.client = client
        self._ac = as_completed([])
        self.description = f"dask {client.scheduler.address} ({len(client.scheduler_info()['workers'])} workers)"

    def submit(self, fn: Callable, *args: Any, **kwargs: Any):
        fut = self.client.submit(fn, *args, pure=False, **kwargs)
        self._ac.add(fut)
        return fut

    def completed(self) -> Iterator[Any]:
        for fut in self._ac:
            yield fut

    def close(self) -> None:
        self.client.close()


def future_error(fut) -> BaseException | None:
    """The exception a finished future raised, or None."""
    try:
        return fut.exception()
    except (cf.CancelledError, Exception) as exc:  # cancelled or lost futures
        return exc


@contextmanager
def make_executor(workers: int = 0, scheduler: str | None = None, *, quiet: bool = True):
    """An executor for per-slide work.

    Parameters
    ----------
    workers : int
        0 runs in this process; N >= 1 starts a Dask ``LocalCluster`` with N
        single-threaded worker processes.
    scheduler : str, optional
        Address of an existing Dask scheduler (``tcp://host:8786``), e.g. one
        started by dask-jobqueue on SLURM or a Kubernetes Dask cluster. The
        workers there must see the same file paths as this machine.
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
            yield ex
        finally:
            ex.close()
        return
    if workers <= 0:
        yield InlineExecutor()
        return
    import dask
    from distributed import Client, LocalCluster

    with dask.config.set({"distributed.worker.daemon": False, "distributed.logging.distributed": "error"}):
        cluster = LocalCluster(
            n_workers=int(workers),
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR if quiet else logging.WARNING,
        )
        client = Client(cluster)
        ex = DaskExecutor(client)
        try:
            yield ex
        finally:
            client.close()
            cluster.close()
