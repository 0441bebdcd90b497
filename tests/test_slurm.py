"""``--cluster slurm``, ``tile --shard`` and the sbatch templates of docs/slurm/.

The fast tests need no SLURM (the job-script test needs dask-jobqueue, the ``slurm`` extra, and
skips without it). The slow ones run a real one-node SLURM on this machine, started by
``bench/slurm_local.sh`` (root, and Debian's ``slurm-wlm`` and ``munge``), and skip, saying why,
where it cannot run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.batch import UsageError
from pipeline.cli import main
from pipeline.config import Config, ConfigError, load_cluster_config, load_config
from pipeline.slurm import cluster_kwargs, import_slurm_cluster, walltime
from pipeline.tile import run_tile, select_shard
from wsi.store import TileStore

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = sorted((ROOT / "docs" / "slurm").glob("*.sbatch"))
SCRIPT = ROOT / "bench" / "slurm_local.sh"


def _env(**extra) -> dict:
    """This checkout first on PYTHONPATH (the SLURM jobs inherit it) and this interpreter's scripts on PATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(extra)
    return env


def _need_jobqueue() -> None:
    """Skip without dask-jobqueue (found without importing it: see :func:`pipeline.slurm.import_slurm_cluster`)."""
    if importlib.util.find_spec("dask_jobqueue") is None:
        pytest.skip("dask-jobqueue is not installed (pip install 'wsi-pipeline[slurm]')")


def _cli(*args, env=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], capture_output=True, text=True,
                          env=env or _env(), **kw)


# --------------------------------------------------------------------------- the cluster section


def test_cluster_section_defaults_and_default_yaml():
    import yaml

    c = Config().cluster
    assert (c.cores, c.processes, c.memory_gb, c.walltime_min, c.minimum_jobs, c.maximum_jobs) == (8, 1, 16.0, 60, 0, 4)
    assert c.queue is c.account is c.interface is c.local_directory is c.log_directory is None
    # the repository's default.yaml (not the installed copy) lists the section verbatim
    data = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    assert data["cluster"] == Config().to_dict()["cluster"]


@pytest.mark.parametrize("override, message", [
    ({"cluster.procesess": 2}, "unknown key 'procesess' (did you mean 'processes'?)"),
    ({"cluster.memory": 8}, "did you mean 'memory_gb'"),
    ({"cluster.cores": "eight"}, "cluster.cores: expected an integer"),
    ({"cluster.walltime_min": "1:00:00"}, "cluster.walltime_min: expected an integer"),
    ({"cluster.cores": 0}, "cluster.cores must be >= 1"),
    ({"cluster.processes": 3}, "cluster.processes=3 must divide cluster.cores=8"),
    ({"cluster.memory_gb": 0}, "cluster.memory_gb must be > 0"),
    ({"cluster.memory_gb": float("nan")}, "cluster.memory_gb must be a finite number"),
    ({"cluster.minimum_jobs": 5}, "cluster.minimum_jobs must be in [0, maximum_jobs=4]"),
    ({"cluster.start_timeout_s": 0}, "cluster.start_timeout_s must be > 0"),
    ({"cluster.queue": "gpu a100"}, "cluster.queue must be one name without spaces"),
    ({"cluster.job_extra_directives": ["#SBATCH --qos=high"]}, "leave out '#SBATCH', e.g. '--qos=high'"),
    ({"cluster.job_extra_directives": "qos=high"}, "expected an sbatch option such as '--qos=normal'"),
])
def test_cluster_section_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as exc:
        load_config(None, override)
    assert message in str(exc.value)


def test_cluster_config_file_gives_its_cluster_section_only(tmp_path):
    site = tmp_path / "site.yaml"
    site.write_text("tiling:\n  mpp: 1.0\ncluster:\n  queue: cpu\n  cores: 4\n  job_extra_directives: ['--qos=low']\n")
    c = load_cluster_config(site, {"cluster.maximum_jobs": 9})
    assert (c.queue, c.cores, c.job_extra_directives, c.maximum_jobs) == ("cpu", 4, ["--qos=low"], 9)
    with pytest.raises(ConfigError, match="only cluster.. settings apply here"):
        load_cluster_config(site, {"tiling.mpp": 2.0})
    site.write_text("tiling:\n  mmp: 1.0\ncluster:\n  queue: cpu\n")
    with pytest.raises(ConfigError, match="unknown key 'mmp'"):  # the whole file is checked
        load_cluster_config(site)
    site.write_text("cluster:\n  queue: cpu\n  acount: lab\n")
    with pytest.raises(ConfigError, match=r"site\.yaml: cluster: unknown key 'acount' \(did you mean 'account'\?\)"):
        load_cluster_config(site)


def test_importing_dask_jobqueue_leaves_ctrl_c_alone():
    _need_jobqueue()
    code = ("import signal; from pipeline.slurm import import_slurm_cluster; "
            "h = signal.getsignal(signal.SIGINT); import_slurm_cluster(); "
            "assert signal.getsignal(signal.SIGINT) is h is signal.default_int_handler")
    # a job started in the background by a non-interactive shell inherits SIGINT ignored, and Python then
    # installs no handler at all: give the child the default disposition a terminal would
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(),
                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert r.returncode == 0, r.stderr


def test_job_script_follows_the_cluster_section(tmp_path):
    _need_jobqueue()
    SLURMCluster = import_slurm_cluster()

    assert walltime(90) == "01:30:00" and walltime(5) == "00:05:00"
    c = load_config(None, {
        "cluster.queue": "cpu", "cluster.account": "lab42", "cluster.cores": 4, "cluster.processes": 2,
        "cluster.memory_gb": 7.5, "cluster.walltime_min": 120, "cluster.interface": "lo",
        "cluster.job_extra_directives": ["--qos=low", "--constraint=avx2"],
        "cluster.local_directory": str(tmp_path / "scratch"), "cluster.log_directory": str(tmp_path / "logs"),
    }).cluster
    with SLURMCluster(**cluster_kwargs(c)) as cluster:
        script = cluster.job_script()
    sbatch = [ln for ln in script.splitlines() if ln.startswith("#SBATCH")]
    for want in ("-J wsi-pipeline", "-p cpu", "-A lab42", "--cpus-per-task=4", "--mem=8G", "-t 02:00:00",
                 "--qos=low", "--constraint=avx2", f"-o {tmp_path / 'logs'}/wsi-pipeline-%J.out"):
        assert f"#SBATCH {want}" in sbatch, (want, sbatch)
    worker = script.splitlines()[-1]
    assert "--nworkers 2" in worker and "--nthreads 2" in worker and "--interface lo" in worker
    assert f"--local-directory {tmp_path / 'scratch'}" in worker
    assert "--lifetime 115m" in worker  # retire 5 minutes before the time limit
    assert "export DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False" in script
    short = load_config(None, {"cluster.walltime_min": 10}).cluster
    assert "worker_extra_args" not in cluster_kwargs(short)  # too short to retire early


def test_adaptive_scaling_follows_the_drivers_backlog():
    # BacklogAdaptive on a real (in-process) LocalCluster: one worker per `threads` calls waiting or
    # running in the driver, within minimum..maximum, and back down when the backlog is gone.
    from distributed import LocalCluster

    from pipeline.slurm import BacklogAdaptive

    backlog = [7]
    with LocalCluster(n_workers=0, threads_per_worker=2, processes=False, dashboard_address=None) as cluster:
        cluster.adapt(Adaptive=BacklogAdaptive, backlog=lambda: backlog[0], threads=2, minimum=0, maximum=3,
                      interval="100ms", wait_count=2)
        _wait_for(lambda: len(cluster.scheduler.workers) == 3)  # ceil(7 / 2) = 4, at most 3
        backlog[0] = 2
        _wait_for(lambda: len(cluster.scheduler.workers) == 1)
        backlog[0] = 0
        _wait_for(lambda: len(cluster.scheduler.workers) == 0)


def _wait_for(cond, timeout=20.0):
    t = time.monotonic()
    while not cond():
        assert time.monotonic() - t < timeout, "timed out"
        time.sleep(0.05)


# --------------------------------------------------------------------------- the command line


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("extra, message", [
    (["--cluster", "slurm", "--workers", "2"], "--workers size a local run; with --cluster slurm the cluster section"),
    (["--cluster", "slurm", "--processes"], "--processes/--threads size a local run"),
    (["--cluster", "slurm", "--scheduler", "tcp://head:8786"], "--scheduler and --cluster slurm both say where"),
    (["--cluster-config", "tiny"], "--cluster-config describes the SLURM jobs of --cluster slurm: add --cluster slurm"),
    (["--cluster", "slurm", "--set", "cluster.coers=2"], "unknown key 'coers' (did you mean 'cores'?)"),
    (["--cluster", "slurm", "--set", "cluster.walltime_min=1h"], "cluster.walltime_min: expected an integer"),
    (["--shard", "3/3"], "--shard 3/3: expected I/N with 0 <= I < N"),
    (["--shard", "two"], "--shard two: expected I/N"),
])
def test_tile_cluster_mistakes_exit_2_in_one_line(tmp_path, synth_slides, extra, message):
    r = _invoke("tile", synth_slides["tissue"], "--out", tmp_path / "out", "--config", "tiny", *extra)
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.output


def test_cluster_slurm_without_sbatch_exits_2(tmp_path, synth_slides, monkeypatch):
    _need_jobqueue()
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch there
    r = _invoke("tile", synth_slides["tissue"], "--out", tmp_path / "out", "--config", "tiny", "--cluster", "slurm")
    assert r.exit_code == 2 and "--cluster slurm needs SLURM's sbatch on PATH" in r.output, r.output


def test_classify_takes_the_cluster_options():
    from tests.test_cli import parse_only

    ctx = parse_only(["classify", "s", "--run", "r", "--out", "o", "--cluster", "slurm", "--cluster-config", "site.yaml"])
    assert ctx.params["cluster"] == "slurm" and ctx.params["cluster_config"] == "site.yaml"
    assert parse_only(["classify", "s", "--run", "r", "--out", "o"]).params["cluster"] == "local"


# --------------------------------------------------------------------------- --shard


def test_select_shard_keeps_repeated_ids_across_shards(tmp_path):
    paths = [tmp_path / "a" / "x.tif", tmp_path / "b" / "y.tif", tmp_path / "c" / "x.tif", tmp_path / "d" / "z.tif"]
    assert select_shard(paths, None) == check_all(paths)
    usable0, dups0 = select_shard(paths, (0, 2))
    usable1, dups1 = select_shard(paths, (1, 2))
    assert usable0 == [paths[0]] and list(dups0) == [paths[2]]  # c/x.tif repeats a/x.tif of the other shard
    assert usable1 == [paths[1], paths[3]] and not dups1
    with pytest.raises(UsageError, match="0 <= I < N"):
        select_shard(paths, (2, 2))


def check_all(paths):
    from pipeline.batch import check_unique_ids

    return check_unique_ids(paths)


def test_shards_tile_every_slide_once(tmp_path, synth_slides):
    slides = [synth_slides[k] for k in ("tissue", "tissue40x", "blank")]
    lst = tmp_path / "slides.txt"
    lst.write_text("".join(f"{p}\n" for p in slides))
    cfg = load_config("tiny", {"runtime.workers": 0})
    done = []
    for i in range(2):
        rep = run_tile(lst, tmp_path / "out", cfg, shard=(i, 2), quiet=True, progress=False)
        assert rep.ok and rep.settings["shard"] == f"{i}/2"
        done.append({s.slide_id for s in rep.slides if s.status == "done"})
    assert done == [{"tissue", "blank"}, {"tissue40x"}]
    rep = run_tile(lst, tmp_path / "out", cfg, quiet=True, progress=False)  # all of them: every store is current
    assert {s.status for s in rep.slides} == {"skipped"} and len(rep.slides) == 3


# --------------------------------------------------------------------------- templates


def _template_commands(path: Path) -> list[list[str]]:
    """The shell words of each command line of a template (continuations joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(shlex.split(line, comments=True))
    return out


def _wsi_calls(words: list[str]) -> list[tuple[str, list[str]]]:
    """``(command, long options)`` of each ``wsi-pipeline`` call in one command line (after torchrun's
    ``--no-python wsi-pipeline --`` too)."""
    calls = []
    for i, w in enumerate(words):
        if w == "wsi-pipeline":
            rest = [x for x in words[i + 1:] if x != "--"]
            calls.append((rest[0], [x.split("=")[0] for x in rest[1:] if x.startswith("--")]))
    return calls


def test_templates_parse_and_use_options_that_exist():
    assert {p.name for p in TEMPLATES} == {"tile-array.sbatch", "em-round-torchrun.sbatch"}
    used: dict[str, set[str]] = {}
    torchrun_opts: set[str] = set()
    for path in TEMPLATES:
        r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert r.returncode == 0, f"{path.name}: {r.stderr}"
        text = path.read_text()
        assert text.startswith("#!/bin/bash\n")
        sbatch = [ln.split(None, 1)[1] for ln in text.splitlines() if ln.startswith("#SBATCH")]
        assert sbatch and all(re.fullmatch(r"--[a-z-]+=\S+", d) for d in sbatch), sbatch
        calls = [c for words in _template_commands(path) for c in _wsi_calls(words)]
        assert calls, f"{path.name} runs no wsi-pipeline command"
        for cmd, opts in calls:
            used.setdefault(cmd, set()).update(opts)
        for words in _template_commands(path):
            if "torchrun" in words:
                i = words.index("torchrun")
                torchrun_opts |= {w for w in words[i + 1:words.index("wsi-pipeline")] if w.startswith("--")}
    assert set(used) == {"tile", "em-round"}
    for cmd, opts in used.items():
        r = _cli(cmd, "--help")
        assert r.returncode == 0, r.stderr
        missing = sorted(o for o in opts if not re.search(rf"(^|[\s,/]){re.escape(o)}\b", r.stdout, re.M))
        assert not missing, f"wsi-pipeline {cmd} has no option {missing}"
    assert "--shard" in used["tile"] and {"--stores", "--labels", "--run"} <= used["em-round"]
    try:
        from torch.distributed.run import get_args_parser
    except ImportError:
        return
    known = {o for a in get_args_parser()._actions for o in a.option_strings}
    assert torchrun_opts and torchrun_opts <= known, sorted(torchrun_opts - known)


def test_readme_and_design_point_at_the_templates(tmp_path):
    readme = (ROOT / "README.md").read_text()
    design = (ROOT / "docs" / "design.md").read_text()
    for p in TEMPLATES:
        assert f"docs/slurm/{p.name}" in readme, p.name
    assert "--cluster slurm" in readme and "--cluster slurm" in design and "pip install 'wsi-pipeline[slurm]'" in readme
    # the README's example cluster section is a valid one
    block = re.search(r"```yaml\n(cluster:\n.*?)```", readme, re.S)
    assert block, "README: the example cluster: section"
    (tmp_path / "site.yaml").write_text(block.group(1))
    c = load_cluster_config(tmp_path / "site.yaml")
    assert (c.queue, c.account, c.job_extra_directives) == ("cpu", "lab42", ["--qos=normal"])


# --------------------------------------------------------------------------- a real SLURM on this machine


def _sh(*args, env, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, **kw)


@pytest.fixture(scope="module")
def slurm():
    """The environment of a running one-node SLURM (bench/slurm_local.sh), stopped afterwards unless it
    was running before."""
    if shutil.which("slurmctld") is None or shutil.which("sbatch") is None:
        pytest.skip("SLURM is not installed here (apt-get install -y slurm-wlm munge)")
    if os.geteuid() != 0:
        pytest.skip("bench/slurm_local.sh starts slurmctld, slurmd and munged as root; this test runs as a user")
    _need_jobqueue()
    env = _env(SLURM_CONF=os.environ.get("WSI_SLURM_DIR", "/tmp/wsi-slurm") + "/slurm.conf")
    was_running = _sh(SCRIPT, "running", env=env).returncode == 0
    r = _sh(SCRIPT, "start", env=env, timeout=120)
    if r.returncode != 0:
        pytest.skip(f"cannot start a local SLURM with bench/slurm_local.sh: {r.stderr.strip()[-400:]}")
    yield env
    _sh("scancel", "--name", "wsi-blocker", env=env)
    if not was_running:
        _sh(SCRIPT, "stop", env=env, timeout=60)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Three small generated slides and their stores from one thread (``--workers 0``)."""
    from wsi.synth import make_cohort

    d = tmp_path_factory.mktemp("slurm_cohort")
    make_cohort(d / "slides", n_positive=2, n_negative=1, width_px=1536, height_px=1536, difficulty="easy",
                split={"train": 1.0}, workers=1)
    rep = run_tile(d / "slides", d / "inline", load_config("tiny", {"runtime.workers": 0}), quiet=True, progress=False)
    assert rep.ok and len(rep.slides) == 3
    return d


def _our_jobs(env, name="wsi-pipeline") -> list[str]:
    """Pending or running jobs of this name."""
    r = _sh("squeue", "-h", "-n", name, "-t", "PD,R,CF", "-o", "%i %T", env=env)
    return r.stdout.split("\n") if r.stdout.strip() else []


SMALL_JOBS = ["--set", "cluster.cores=1", "--set", "cluster.memory_gb=1", "--set", "cluster.maximum_jobs=2",
              "--set", "cluster.walltime_min=10"]


def _assert_same_stores(a_dir: Path, b_dir: Path, ids) -> None:
    for sid in ids:
        a, b = TileStore(a_dir / f"{sid}.zarr"), TileStore(b_dir / f"{sid}.zarr")
        assert len(a) == len(b) > 0, sid
        np.testing.assert_array_equal(a.coords, b.coords)
        np.testing.assert_array_equal(a.read(range(len(a))), b.read(range(len(b))))


@pytest.mark.slow
def test_tile_on_slurm_equals_one_thread(slurm, cohort, tmp_path):
    out, logs = tmp_path / "slurm", tmp_path / "logs"
    r = _cli("tile", cohort / "slides", "--out", out, "--config", "tiny", "--cluster", "slurm", *SMALL_JOBS,
             "--set", f"cluster.log_directory={logs}", "--set", "cluster.start_timeout_s=120", env=slurm, timeout=300)
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / "tile-report.json").read_text())
    assert "dask-jobqueue SLURMCluster" in rep["settings"]["executor"] and rep["settings"]["cluster"] == "slurm"
    assert rep["settings"]["config"]["cluster"]["cores"] == 1
    ids = sorted(s["slide_id"] for s in rep["slides"] if s["status"] == "done")
    assert len(ids) == 3
    _assert_same_stores(cohort / "inline", out, ids)
    assert list(logs.glob("wsi-pipeline-*.err"))  # the workers ran as SLURM jobs
    assert not _our_jobs(slurm), "the worker jobs were not cancelled"


@pytest.mark.slow
def test_a_job_that_cannot_start_times_out_and_ctrl_c_cancels_it(slurm, cohort, tmp_path):
    cpus = _sh("sinfo", "-h", "-o", "%c", env=slurm).stdout.split()[0]
    r = _sh("sbatch", "--parsable", "-J", "wsi-blocker", "-c", cpus, "-o", "/dev/null", "--wrap", "sleep 300",
            env=slurm)
    assert r.returncode == 0, r.stderr
    try:
        for _ in range(100):  # the node is full once the blocker runs
            if _sh("squeue", "-h", "-j", r.stdout.strip(), "-o", "%T", env=slurm).stdout.strip() == "RUNNING":
                break
            time.sleep(0.2)
        args = [sys.executable, "-m", "pipeline.cli", "tile", str(cohort / "slides"), "--out", str(tmp_path / "o"),
                "--config", "tiny", "--cluster", "slurm", *SMALL_JOBS]
        t = _cli(*args[3:], "--set", "cluster.start_timeout_s=3", env=slurm, timeout=120)
        assert t.returncode == 2, t.stderr
        assert t.stderr.strip().splitlines()[-1].startswith(
            "error: no SLURM worker job started within cluster.start_timeout_s=3 s"), t.stderr
        assert not _our_jobs(slurm)
        # Ctrl-C while the worker job waits in the queue: exit 130 and the job is cancelled
        p = subprocess.Popen(args, env=slurm, stderr=subprocess.PIPE, text=True)
        for _ in range(300):
            if _our_jobs(slurm):
                break
            time.sleep(0.1)
        assert _our_jobs(slurm), "the worker job was never submitted"
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
        assert p.returncode == 130, err
        assert not _our_jobs(slurm)
    finally:
        _sh("scancel", "--name", "wsi-blocker", env=slurm)


@pytest.mark.slow
def test_tile_array_template_on_slurm(slurm, cohort, tmp_path):
    if shutil.which("wsi-pipeline", path=_env()["PATH"]) is None:
        pytest.skip("the wsi-pipeline command is not installed beside this interpreter (pip install -e .)")
    lst = tmp_path / "slides.txt"
    lst.write_text("".join(f"{p}\n" for p in sorted((cohort / "slides").glob("*.tif"))))
    out = tmp_path / "stores"
    r = _sh("sbatch", "--wait", "--array=0-2", "--cpus-per-task=1", "--mem=1G", f"--chdir={tmp_path}",
            TEMPLATES[[p.name for p in TEMPLATES].index("tile-array.sbatch")], lst, out, "--config", "tiny",
            env=slurm, timeout=600)
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("wsi-tile-*.out")))
    assert r.returncode == 0, r.stderr + logs
    shards = {}
    for p in (out / "reports").glob("tile-*.json"):
        rep = json.loads(p.read_text())
        shards[rep["settings"]["shard"]] = {s["slide_id"] for s in rep["slides"] if s["status"] == "done"}
    assert sorted(shards) == ["0/3", "1/3", "2/3"] and all(len(v) == 1 for v in shards.values()), shards
    ids = sorted(set().union(*shards.values()))
    assert len(ids) == 3
    _assert_same_stores(cohort / "inline", out, ids)


@pytest.mark.slow
def test_em_round_torchrun_template_on_slurm(slurm, tmp_path):
    # The template on one node without GPUs: srun starts torchrun, whose c10d rendezvous on the host
    # `scontrol show hostnames` names joins two CPU ranks (NPROC_PER_NODE=2, gloo), and the em-round
    # options reach the command through torchrun's "--".
    pytest.importorskip("torch")
    if shutil.which("wsi-pipeline", path=_env()["PATH"]) is None or shutil.which("torchrun", path=_env()["PATH"]) is None:
        pytest.skip("wsi-pipeline or torchrun is not installed beside this interpreter")
    from wsi.synth import make_cohort

    make_cohort(tmp_path / "cohort", n_positive=4, n_negative=4, width_px=1024, height_px=1024, annotate=1,
                difficulty="easy", workers=1)
    rep = run_tile(tmp_path / "cohort", tmp_path / "stores", load_config("tiny", {"runtime.workers": 0}),
                   quiet=True, progress=False)
    assert rep.ok
    template = TEMPLATES[[p.name for p in TEMPLATES].index("em-round-torchrun.sbatch")]
    r = _sh("sbatch", "--wait", "--cpus-per-task=2", "--mem=4G", "--gpus-per-node=0", f"--chdir={tmp_path}", template,
            "stores", "cohort/labels.csv", "run", "--annotations", "cohort/annotations", "--config", "tiny",
            "--set", "em.epochs_init=1", "--set", "em.batches_per_epoch=2", "--set", "stage2.epochs=1", "--quiet",
            env={**slurm, "NPROC_PER_NODE": "2"}, timeout=600)
    log = "\n".join(p.read_text() for p in tmp_path.glob("wsi-em-*.out"))
    assert r.returncode == 0, r.stderr + log
    host = _sh("scontrol", "show", "hostnames", _sh("sinfo", "-h", "-o", "%N", env=slurm).stdout.strip(),
               env=slurm).stdout.split()[0]
    assert f"1 node(s) x 2 rank(s), rendezvous {host}:" in log
    assert "ran round(s) 0" in log and (tmp_path / "run" / "run.json").is_file()
    metrics = json.loads((tmp_path / "run" / "round_0" / "metrics.json").read_text())
    assert metrics["distributed"]["world_size"] == 2 and metrics["distributed"]["backend"] == "gloo"
