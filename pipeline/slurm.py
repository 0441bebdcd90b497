"""``--cluster slurm``: Dask workers in SLURM batch jobs (dask-jobqueue's ``SLURMCluster``).

The command that runs ``tile`` (or ``classify``) becomes the Dask scheduler and the driver; the
workers are batch jobs submitted with ``sbatch``, scaled between ``cluster.minimum_jobs`` and
``cluster.maximum_jobs`` with the work queued (Dask's adaptive scaling), and cancelled when the
command ends, however it ends. The workers run this interpreter (``sys.executable``) with this
environment (sbatch exports it), so the nodes must see the same Python, the same slides and the
same output folder.

Before any job is queued the job script is checked with ``sbatch --test-only`` (a wrong partition,
account or resource request is one line and exit 2, not a job that never starts); then the first
job is waited for, up to ``cluster.start_timeout_s``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from distributed.deploy import Adaptive

from pipeline.batch import UsageError
from pipeline.config import ClusterConfig
from pipeline.executor import DaskExecutor

log = logging.getLogger("wsi_pipeline")

#: Dask settings of the worker processes (exported in the job script: they read their own config).
_WORKER_ENV = {
    "distributed.worker.profile.enabled": "False",
    "distributed.admin.tick.interval": "1s",
    "distributed.admin.system-monitor.interval": "2s",
}

#: Worker jobs retire this long before their time limit, when the limit leaves room for it.
RETIRE_BEFORE_MIN = 5


def walltime(minutes: int) -> str:
    """``cluster.walltime_min`` as SLURM's ``HH:MM:SS``."""
    return f"{minutes // 60:02d}:{minutes % 60:02d}:00"


def cluster_kwargs(c: ClusterConfig) -> dict:
    """Keyword arguments of ``dask_jobqueue.SLURMCluster`` for a cluster section."""
    kw = {
        "queue": c.queue,
        "account": c.account,
        "cores": c.cores,
        "processes": c.processes,
        "memory": f"{c.memory_gb}GiB",
        "walltime": walltime(c.walltime_min),
        "job_extra_directives": list(c.job_extra_directives),
        "local_directory": c.local_directory,
        "log_directory": c.log_directory,
        "interface": c.interface,
        "job_name": "wsi-pipeline",
        "scheduler_options": {"dashboard_address": None},
        # a worker whose driver is gone (killed, its node lost) exits instead of holding its job
        "death_timeout": 60,
        # Dask's dashboard bookkeeping off in the workers too (see pipeline.executor._QUIET_LOOP)
        "job_script_prologue": [f"export DASK_{k.upper().replace('.', '__').replace('-', '_')}={v}"
                                for k, v in _WORKER_ENV.items()],
    }
    if c.walltime_min >= 3 * RETIRE_BEFORE_MIN:
        # Leave before SLURM kills the job: the scheduler moves the worker's queued tasks elsewhere,
        # and adaptive scaling submits a new job while work remains.
        kw["worker_extra_args"] = ["--lifetime", f"{c.walltime_min - RETIRE_BEFORE_MIN}m",
                                   "--lifetime-stagger", "1m"]
    return kw


def import_slurm_cluster() -> type:
    """``dask_jobqueue.SLURMCluster``, importing the package without letting it take over Ctrl-C.

    dask-jobqueue 0.9.0 sets a SIGINT handler that calls ``sys.exit()`` when it is imported
    (dask/dask-jobqueue#696, fixed after 0.9.0): Ctrl-C would end the command with exit code 0
    instead of interrupting it. The handler in place before the import is put back.
    """
    first = "dask_jobqueue" not in sys.modules
    on_main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGINT) if on_main else None
    from dask_jobqueue import SLURMCluster

    if first and on_main and before is not None:
        signal.signal(signal.SIGINT, before)
    return SLURMCluster


def _require_slurm() -> type:
    try:
        SLURMCluster = import_slurm_cluster()
    except ImportError:
        raise UsageError("--cluster slurm needs dask-jobqueue: pip install 'wsi-pipeline[slurm]'") from None
    if shutil.which("sbatch") is None:
        raise UsageError("--cluster slurm needs SLURM's sbatch on PATH: run the command where jobs can be "
                         "submitted (a login node, or inside an allocation), or use --cluster local")
    return SLURMCluster


def check_job_script(script: str) -> None:
    """``sbatch --test-only`` on a worker job script: SLURM's own verdict on partition, account and
    resources, before a job is queued. A refusal is a :class:`UsageError` quoting sbatch."""
    with tempfile.NamedTemporaryFile("w", suffix=".sh", prefix="wsi-pipeline-job-") as f:
        f.write(script)
        f.flush()
        try:
            r = subprocess.run(["sbatch", "--test-only", f.name], capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            raise UsageError("sbatch --test-only did not answer within 60 s: is slurmctld reachable (sinfo)?") from None
    if r.returncode != 0:
        why = " ".join((r.stderr or r.stdout).split()) or f"exit code {r.returncode}"
        raise UsageError(f"SLURM refuses the cluster's worker job: {why} (sbatch --test-only; check that sinfo "
                         "works here, then cluster.queue, account, cores, memory_gb, walltime_min and "
                         "job_extra_directives)")


def _make_dirs(c: ClusterConfig) -> None:
    if c.log_directory:
        try:
            Path(c.log_directory).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cluster.log_directory {c.log_directory}: cannot create it ({exc.strerror})") from None


@contextmanager
def slurm_executor(c: ClusterConfig, settings: dict, warm: tuple[str, ...] = ()):
    """A :class:`~pipeline.executor.DaskExecutor` on a SLURMCluster of ``c``; closes the cluster (cancelling
    its jobs) when the block ends, also on an error or Ctrl-C. ``settings``: Dask config to apply."""
    import dask
    from distributed import Client

    SLURMCluster = _require_slurm()
    _make_dirs(c)
    with dask.config.set(settings):
        cluster = SLURMCluster(**cluster_kwargs(c))
    client = None
    try:
        check_job_script(cluster.job_script())
        client = Client(cluster)
        ex = SlurmExecutor(client, cluster, c)
        _first_worker(cluster, client, c, ex)
        ex.warm(warm)
        yield ex
    finally:
        if client is not None:
            client.close()
        cluster.close()


class SlurmExecutor(DaskExecutor):
    """A :class:`~pipeline.executor.DaskExecutor` whose worker slots follow the SLURM workers present.

    The driver's queue hands out as many calls as the connected workers have threads (read from
    the scheduler, which runs in this process), so a job that joins takes the most urgent waiting
    calls as others finish. Its size at start, ``maximum_jobs x cores``, is what callers plan for
    (tile's bands per slide, slides claimed ahead): the cluster once fully scaled.
    """

    def __init__(self, client, cluster, c: ClusterConfig) -> None:
        super().__init__(client, in_flight=c.maximum_jobs * c.cores)
        self._scheduler = cluster.scheduler
        self.n_workers = c.maximum_jobs * c.cores
        self.description = (f"dask-jobqueue SLURMCluster {cluster.scheduler_address} ({c.minimum_jobs}-"
                            f"{c.maximum_jobs} jobs of {c.cores} cores{f', partition {c.queue}' if c.queue else ''})")

    def _pump(self) -> None:
        self.in_flight = max(1, int(self._scheduler.total_nthreads))
        super()._pump()


class BacklogAdaptive(Adaptive):
    """Dask's adaptive scaling with the target from the driver's backlog: one worker per
    ``threads`` calls waiting or running. The scheduler's own estimate sees only the calls handed
    out, which the driver limits to the threads present, so it would never ask for more jobs."""

    def __init__(self, *args, backlog: Callable[[], int], threads: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._backlog, self._threads = backlog, max(1, int(threads))

    async def target(self) -> int:
        return math.ceil(self._backlog() / self._threads)


def _first_worker(cluster, client, c: ClusterConfig, ex: SlurmExecutor) -> None:
    """Start ``max(1, minimum_jobs)`` jobs, wait for the first worker, then scale with the work."""
    cluster.scale(jobs=max(1, c.minimum_jobs))
    log.info("waiting for the first SLURM job of the cluster to start (at most %.0f s)", c.start_timeout_s)
    try:
        client.wait_for_workers(1, timeout=c.start_timeout_s)
    except (TimeoutError, asyncio.TimeoutError):
        raise UsageError(f"no SLURM worker job started within cluster.start_timeout_s={c.start_timeout_s:g} s "
                         "(squeue --me shows why; the jobs were cancelled)") from None
    cluster.adapt(minimum_jobs=c.minimum_jobs, maximum_jobs=c.maximum_jobs, Adaptive=BacklogAdaptive,
                  backlog=ex.backlog, threads=c.cores // c.processes)
