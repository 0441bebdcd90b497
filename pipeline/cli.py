"""The ``wsi-pipeline`` command line.

Exit codes: 0 everything succeeded; 1 some slides failed (the others were
processed and the report says why); 2 bad input (config, paths, lock, a
missing optional dependency), said in one line.

The contract every command keeps: ``--quiet``/``--verbose``; ``--config`` and
``--set`` where the command has settings in the config (``synth`` and
``classify`` have none of their own: ``synth``'s options are all there is to a
cohort, and ``classify`` uses the run's settings); ``--workers N`` with -1 = all
cores; examples in ``--help`` that parse (``tests/test_cli.py`` checks them).
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

import click

from wsi import __version__


class _Location(click.ParamType):
    """A local path (a ``Path``; ``file://`` URLs too) or an object storage URL (``s3://bucket/prefix``, kept a
    string: a ``Path`` would fold its ``//``)."""

    name = "path|url"

    def convert(self, value, param, ctx):
        from wsi.objstore import as_location

        return value if isinstance(value, Path) else as_location(str(value))


LOCATION = _Location()


def _config_options(fn):
    fn = click.option(
        "--set",
        "set_items",
        multiple=True,
        metavar="SECTION.KEY=VALUE",
        help="Override one config value (repeatable), e.g. --set tissue.mask_mpp=16.",
    )(fn)
    fn = click.option(
        "--config",
        "config_path",
        default=None,
        metavar="FILE|NAME",
        help="YAML config file, or a built-in name from configs/ (default, tiny).",
    )(fn)
    return fn


def _common_options(fn):
    fn = click.option("--log-file", "log_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                      metavar="FILE", help="Also append the log (INFO, DEBUG with --verbose; dated lines) to FILE.")(fn)
    fn = click.option("--quiet", "-q", is_flag=True, help="Only warnings and the final summary.")(fn)
    fn = click.option("--verbose", "-v", is_flag=True, help="Debug logging.")(fn)
    return fn


class _BadValue(click.ClickException):
    """A bad option value found while parsing: one line and exit code 2, like every bad input."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def _check_workers(ctx, param, value):
    if value is None:
        return None
    from pipeline.batch import UsageError
    from pipeline.executor import resolve_workers

    try:
        return resolve_workers(value)
    except UsageError as exc:
        raise _BadValue(str(exc)) from None


def _positive(flag: str, unit: str, example: str):
    """A click callback: ``flag``'s value, when given, must be a finite number > 0 (in ``unit``)."""
    def check(ctx, param, value):
        import math

        if value is not None and not (math.isfinite(value) and value > 0):
            raise _BadValue(f"{flag} {value}: must be a number of {unit} > 0, e.g. {example}")
        return value

    return check


_check_assume_mpp = _positive("--assume-mpp", "µm/px", "0.25")
_check_lease_timeout = _positive("--lease-timeout", "seconds", "3600")


def _workers_option(what: str):
    return click.option(
        "--workers", type=int, default=None, callback=_check_workers,
        help=f"Parallel {what}: -1 = one per core, 0 = one task at a time in this thread (runtime.workers).",
    )


#: Modules of the ``train`` extra (``pip install 'wsi-pipeline[train]'``).
TRAIN_MODULES = ("torch", "torchvision", "timm")


def _lease_timeout_option(default_note: str):
    return click.option(
        "--lease-timeout", "lease_timeout", type=float, default=None, callback=_check_lease_timeout,
        metavar="SECONDS",
        help="Several jobs may work on one --out folder at once, each slide claimed by one of them; another "
             "job's claim counts as abandoned after this long without a refresh (its holders refresh every "
             f"30 s; a holder on this host that is gone is noticed at once). {default_note}")


def _needs_train_extra(fn):
    """A command that runs the networks: without the ``train`` extra it stops before any work."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        for name in TRAIN_MODULES:
            if importlib.util.find_spec(name) is None:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return fn(*args, **kwargs)

    return wrapper


def _worker_kind_option(fn):
    return click.option(
        "--processes/--threads",
        "processes",
        default=None,
        help="Run the --workers as a Dask LocalCluster of spawned worker processes (a native-library crash "
        "then fails one slide, not the run) or as threads of this process (the default: no start-up, "
        "same throughput; runtime.processes).",
    )(fn)


def _cluster_options(fn):
    fn = click.option(
        "--cluster-config", "cluster_config", default=None, metavar="FILE|NAME",
        help="Config file whose cluster: section describes the SLURM jobs of --cluster slurm (its other sections "
             "are checked, not used).",
    )(fn)
    fn = click.option(
        "--cluster", "cluster", type=click.Choice(["local", "slurm"]), default="local", show_default=True,
        help="local: --workers / --processes / --scheduler as usual; slurm: Dask workers in SLURM batch jobs "
             "(dask-jobqueue), sized and scaled by the config's cluster: section, cancelled when the command ends.",
    )(fn)
    return fn


def _check_shard(ctx, param, value):
    if value is None:
        return None
    i, slash, n = value.partition("/")
    try:
        i, n = int(i), int(n)
    except ValueError:
        i, n = -1, 0
    if not slash or not 0 <= i < n:
        raise _BadValue(f"--shard {value}: expected I/N with 0 <= I < N, e.g. --shard $SLURM_ARRAY_TASK_ID/8")
    return i, n


def cluster_section_from(cluster: str, cluster_config, set_items, workers, processes):
    """The cluster section for ``--cluster``/``--cluster-config`` (with ``--set cluster.*``), or None to keep
    the config's; a :class:`UsageError` for flags that contradict ``--cluster``."""
    from pipeline.batch import UsageError
    from pipeline.config import load_cluster_config, parse_set_options

    if cluster != "slurm":
        if cluster_config:
            raise UsageError("--cluster-config describes the SLURM jobs of --cluster slurm: add --cluster slurm")
        return None
    given = [flag for flag, v in (("--workers", workers), ("--processes/--threads", processes)) if v is not None]
    if given:
        raise UsageError(f"{' and '.join(given)} size a local run; with --cluster slurm the cluster section does "
                         "(cluster.cores, cluster.maximum_jobs)")
    if cluster_config is None:
        return None
    sets = {k: v for k, v in parse_set_options(set_items).items() if k.startswith("cluster.")}
    return load_cluster_config(cluster_config, sets)


def describe_os_error(exc: OSError) -> str:
    """One line naming the path and the cause of a file-system error outside a slide's own work."""
    import errno

    causes = {
        errno.ENOSPC: "no space left on the device; free space or choose another folder",
        errno.EDQUOT: "disk quota exceeded; free space or choose another folder",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.EROFS: "read-only file system",
        errno.EFBIG: "file too large for this file system or the process's file size limit",
    }
    where = exc.filename if exc.filename is not None else "a file"
    if exc.filename2 is not None:
        where = f"{where} -> {exc.filename2}"
    return f"{where}: {causes.get(exc.errno, exc.strerror or str(exc))}"


def _handle_errors(fn):
    """Turn expected errors into one clear line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from pipeline.batch import UsageError
        from pipeline.config import ConfigError
        from wsi.objstore import RemoteError
        from pipeline.distributed import RankFailed
        from wsi.slide import SlideError

        try:
            return fn(*args, **kwargs)
        except (UsageError, ConfigError, SlideError, RemoteError) as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except RankFailed as exc:  # torchrun: another rank failed and said why in its own output
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except ModuleNotFoundError as exc:
            missing = (exc.name or "").partition(".")[0]
            if missing not in TRAIN_MODULES:
                raise
            command = click.get_current_context().command_path
            click.echo(f"error: {command} needs PyTorch ({missing} is not installed): "
                       "pip install 'wsi-pipeline[train]'", err=True)
            sys.exit(2)
        except OSError as exc:  # the lock, reports, predictions.csv...: not one slide's failure (exit 1)
            click.echo(f"error: {describe_os_error(exc)}", err=True)
            sys.exit(2)

    return wrapper


def build_config(config_path, set_items, flag_overrides: dict):
    from pipeline.config import load_config, parse_set_options

    overrides = parse_set_options(set_items)
    overrides.update({k: v for k, v in flag_overrides.items() if v is not None})
    return load_config(config_path, overrides)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="wsi-pipeline")
def main():
    """Whole-slide image pipeline: tile slides, train with mixed supervision, classify.

    \b
    Typical use:
      wsi-pipeline demo demo-out                  # everything on a generated cohort
      wsi-pipeline tile slides/ --out stores/     # cut tissue tiles into Zarr
    """


@main.command()
@click.argument("slides", type=LOCATION)
@click.option("--out", "-o", "out_dir", required=True, type=LOCATION,
              help="Store folder: a local folder, or object storage (s3://bucket/prefix; pip install "
                   "'wsi-pipeline[s3]').")
@_config_options
@click.option("--mpp", type=float, default=None, help="Target resolution in um/px (config tiling.mpp, default 0.5).")
@click.option("--tile-px", type=int, default=None, help="Tile size in pixels (tiling.tile_px).")
@click.option("--overlap-px", type=int, default=None, help="Overlap in pixels (tiling.overlap_px).")
@click.option("--codec", type=click.Choice(["jpeg", "zstd"]), default=None, help="Tile codec (store.codec).")
@click.option("--jpeg-quality", type=int, default=None, help="JPEG quality (store.jpeg_quality).")
@_workers_option("workers")
@_worker_kind_option
@click.option("--scheduler", default=None, metavar="ADDRESS", help="Existing Dask scheduler, e.g. tcp://head:8786.")
@_cluster_options
@click.option("--shard", default=None, callback=_check_shard, metavar="I/N",
              help="Tile only slides I, I+N, I+2N, ... of SLIDES (0 <= I < N; in the order a folder search or the "
                   "list file gives): one share per task of a SLURM job array.")
@click.option("--mpp-csv", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Per-slide µm/px overrides: CSV with slide_id,mpp.")
@click.option("--assume-mpp", type=float, default=None, callback=_check_assume_mpp,
              help="µm/px for slides whose metadata has none.")
@click.option("--verify", is_flag=True,
              help="Before skipping a slide, check every file of its store against the crc32c recorded when it "
                   "was written (default: presence and sizes only); a damaged store is re-tiled.")
@click.option("--verify-content", is_flag=True,
              help="Before skipping a slide, compare a crc32c of every byte of the slide file with the one recorded "
                   "at tiling (default: size, mtime, ctime and inode, then a sampled fingerprint if they differ).")
@_lease_timeout_option("Default: runtime.lease_timeout_s (3600).")
@_common_options
@_handle_errors
def tile(slides, out_dir, config_path, set_items, mpp, tile_px, overlap_px, codec, jpeg_quality, workers,
         processes, scheduler, cluster, cluster_config, shard, mpp_csv, assume_mpp, verify, verify_content, lease_timeout,
         quiet, verbose, log_file):
    """Cut tissue tiles from SLIDES into one Zarr store per slide.

    SLIDES is a folder (searched recursively for slide files), one slide, or a
    text file listing slide paths. Re-running skips slides whose file and
    tiling settings are unchanged; a failed slide never stops the others.
    The work runs on --workers threads of this process, on a Dask LocalCluster
    of worker processes (--processes), on an existing Dask cluster
    (--scheduler), or on Dask workers in SLURM jobs this command submits and
    cancels (--cluster slurm; the config's cluster: section). Several tile
    jobs may share one --out folder (one per node, the tasks of a job array
    with --shard, cron beside a manual run): each slide is tiled by one of
    them, and the others list it as being processed by another job.

    Object storage: SLIDES may be an s3:// (gs://, ...) prefix or slide, staged
    to a local cache (runtime.stage_dir, at most runtime.stage_cache_gb); --out
    may be s3://bucket/prefix: each store is built locally, uploaded, and
    published by writing its complete zarr.json last; leases and reports stay
    in a local work folder under runtime.stage_dir (see docs/design.md).

    \b
    Examples:
      wsi-pipeline tile /data/slides --out /data/stores
      wsi-pipeline tile slides.txt --out stores --config tiny --workers 4
      wsi-pipeline tile slides/ --out stores --workers 8 --processes
      wsi-pipeline tile scan.svs --out stores --mpp 1.0 --codec zstd
      wsi-pipeline tile slides/ --out stores --mpp-csv mpp.csv --assume-mpp 0.25
      wsi-pipeline tile slides/ --out stores --scheduler tcp://head:8786
      wsi-pipeline tile slides/ --out stores --cluster slurm --set cluster.queue=cpu --set cluster.maximum_jobs=10
      wsi-pipeline tile slides/ --out stores --config tiny --cluster slurm --cluster-config site.yaml
      wsi-pipeline tile slides.txt --out stores --shard 3/8 --workers 8   # task 3 of a job array of 8
      wsi-pipeline tile slides/ --out stores --verify --verify-content
      wsi-pipeline tile /nfs/slides --out /nfs/stores --lease-timeout 600   # one job per node
      wsi-pipeline tile s3://bucket/slides --out s3://bucket/stores --set runtime.stage_cache_gb=50
    """
    from pipeline.batch import setup_logging
    from pipeline.tile import run_tile
    from wsi.slide import load_mpp_csv

    setup_logging(quiet, verbose, log_file)
    cfg = build_config(
        config_path,
        set_items,
        {
            "tiling.mpp": mpp,
            "tiling.tile_px": tile_px,
            "tiling.overlap_px": overlap_px,
            "store.codec": codec,
            "store.jpeg_quality": jpeg_quality,
            "runtime.processes": processes,
        },
    )
    section = cluster_section_from(cluster, cluster_config, set_items, workers, processes)
    if section is not None:
        cfg.cluster = section
    overrides = load_mpp_csv(mpp_csv) if mpp_csv else None
    try:
        report = run_tile(
            slides, out_dir, cfg, workers=workers, scheduler=scheduler, cluster=cluster, shard=shard,
            mpp_overrides=overrides, assume_mpp=assume_mpp, quiet=quiet, verify=verify,
            verify_content=verify_content, lease_timeout=lease_timeout,
        )
    except KeyboardInterrupt:
        click.echo(f"interrupted; run the same command again: stores already finished in {out_dir} are skipped",
                   err=True)
        sys.exit(130)
    click.echo(report.summary(), err=True)
    where = f"{out_dir}/tile-report.json" if isinstance(out_dir, str) else Path(out_dir) / "tile-report.json"
    work = report.settings.get("work_dir")
    click.echo(f"report: {where}" + (f" (leases and run reports in {work})" if work else ""), err=True)
    sys.exit(0 if report.ok else 1)


@main.command()
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--positives", type=int, default=4, show_default=True, help="Slides with lesions.")
@click.option("--negatives", type=int, default=4, show_default=True, help="Slides without lesions.")
@click.option("--size-px", type=int, default=4096, show_default=True, help="Slide width and height at level 0.")
@click.option("--mpp", type=float, default=0.5, show_default=True, help="Level-0 µm/px.")
@click.option("--annotated", type=int, default=2, show_default=True, help="Positive slides given pixel annotations.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--patches", is_flag=True,
              help="Write a multi-class patch set (ImageFolder OUT_DIR/{train,val,test}/<class>/*.png, classes "
                   "told apart by texture) for train-patches instead of a slide cohort.")
@click.option("--classes", "n_classes", type=int, default=4, show_default=True, help="With --patches: classes (2-5).")
@click.option("--per-class", type=int, nargs=3, default=(40, 12, 12), show_default=True, metavar="TRAIN VAL TEST",
              help="With --patches: images per class in train, val and test.")
@click.option("--patch-px", type=int, default=64, show_default=True, help="With --patches: image side in pixels.")
@click.option("--difficulty", type=click.Choice(["easy", "realistic"]), default="easy", show_default=True,
              help="easy: large dark lesions any colour feature finds (fast tests, the demo); realistic: small "
                   "lesions that differ only in nuclear texture, normal-tissue decoys and confounders in both "
                   "classes, test lesions of a kind not seen in training, Region*-limited QuPath annotations "
                   "in region_annotations/.")
@_common_options
@_handle_errors
def synth(out_dir, positives, negatives, size_px, mpp, annotated, seed, patches, n_classes, per_class, patch_px,
          difficulty, quiet, verbose, log_file):
    """Generate a synthetic cohort of pyramidal TIFF slides with lesions, labels and annotations.

    Takes no --config/--set: the options below are all there is to a cohort
    (a config says how slides are processed, not how they are made).

    \b
    Examples:
      wsi-pipeline synth cohort/ --positives 6 --negatives 6
      wsi-pipeline synth big/ --positives 1 --negatives 0 --size-px 20000
      wsi-pipeline synth hard/ --difficulty realistic --positives 20 --negatives 20 --annotated 4
      wsi-pipeline synth patches/ --patches --classes 4 --per-class 40 12 12
    """
    import logging

    from pipeline.batch import UsageError, progress_bar, setup_logging
    from wsi.synth import make_cohort, make_patch_set

    setup_logging(quiet, verbose, log_file)
    if patches:
        try:
            info = make_patch_set(out_dir, n_classes=n_classes, per_class=per_class, size_px=patch_px, seed=seed)
        except ValueError as exc:
            raise UsageError(f"cannot generate this patch set ({exc}); check --classes, --per-class and --patch-px") \
                from None
        click.echo(f"wrote a {len(info['classes'])}-class patch set ({', '.join(info['classes'])}) to {out_dir}")
        return info
    logging.getLogger("wsi_pipeline").info(
        "generating %d slides of %d x %d px at %s um/px in %s", positives + negatives, size_px, size_px, mpp, out_dir
    )
    try:
        with progress_bar(max(positives + negatives, 0), "synth", "slide", not quiet) as bar:
            info = make_cohort(
                out_dir, n_positive=positives, n_negative=negatives, width_px=size_px, height_px=size_px,
                mpp=mpp, seed=seed, annotate=annotated, difficulty=difficulty, on_slide=lambda _: bar.update(1),
            )
    except ValueError as exc:  # the generator's checks of these options
        raise UsageError(
            f"cannot generate this cohort ({exc}); check --positives, --negatives, --annotated, --size-px and --mpp"
        ) from None
    click.echo(f"wrote {positives + negatives} slides to {out_dir}")
    return info



@main.command("em-round")
@click.option("--stores", required=True, type=LOCATION,
              help="Tile store folder (the --out of 'tile'): local, or object storage (s3://bucket/stores).")
@click.option("--labels", "labels_csv", required=True, type=click.Path(path_type=Path),
              help="CSV slide_id,label[,split]: 1 = positive, 0 = negative; split train/val/test (default train).")
@click.option("--run", "run_dir", required=True, type=click.Path(path_type=Path), help="Run directory (created).")
@click.option("--annotations", "annotations", multiple=True, type=click.Path(path_type=Path), metavar="PATH",
              help="Pixel annotations: QuPath GeoJSON (<slide_id>.geojson, level-0 px) and/or mask images "
                   "(<slide_id>_mask.png); files or folders, repeatable.")
@_config_options
@click.option("--mode", type=click.Choice(["mixed", "pixel", "image"]), default=None,
              help="mixed: EM with pixel + image labels (default); pixel: annotations only, no EM; "
                   "image: top-K MIL without pixel labels (em.mode).")
@click.option("--rounds", type=int, default=1, show_default=True,
              help="Make rounds 0..N-1 complete; finished rounds are skipped, an interrupted one resumes.")
@click.option("--weights", type=click.Path(path_type=Path), default=None,
              help="Local file with initial theta1 weights (model.seg_weights); nothing is downloaded.")
@click.option("--val-fraction", type=float, default=None,
              help="Without a val split in the labels: carve this share of the training patients out as one "
                   "(per class, seeded; em.val_fraction).")
@click.option("--force", is_flag=True, help="Delete the run's rounds and train them again.")
@click.option("--allow-restore", is_flag=True,
              help="When tile stores changed since the run read them (re-tiled), train the run's rounds again on "
                   "the stores as they are now instead of refusing; run.json then records their new content.")
@click.option("--theta1-from", "theta1_from", type=click.Path(path_type=Path, file_okay=False), default=None,
              metavar="RUN",
              help="Copy each round's theta1 (seg.pt and probability maps) from this finished run instead of "
                   "training it, and train only stage 2: other stage2.* or model.cls_* settings on the same theta1. "
                   "RUN must come from the same inputs and theta1 settings.")
@click.option("--tracker", type=click.Choice(["none", "tensorboard", "mlflow"]), default="none", show_default=True,
              help="Log losses, E-step statistics and validation metrics per round to TensorBoard (RUN/tensorboard) "
                   "or MLflow (pip install 'wsi-pipeline[tensorboard]' / '[mlflow]').")
@_common_options
@_handle_errors
@_needs_train_extra
def em_round(stores, labels_csv, run_dir, annotations, config_path, set_items, mode, rounds, weights, val_fraction,
             force, allow_restore, theta1_from, tracker, quiet, verbose, log_file):
    """Train rounds of the mixed-supervision EM loop (Li et al., Algorithm 1).

    Round 0 trains the segmentation net theta1 on the annotated tiles; each
    later round pseudo-labels the other training slides with the previous
    theta1 (E-step) and retrains it on a 2:1:7 mix of annotated,
    pseudo-positive and hard-negative tiles (M-step). Every round then trains
    the slide classifier theta2 on each slide's top-K tiles, reports the
    stage-2 loss (and validation AUC when the labels have a val split) and
    updates RUN/best (by default the EM round with the lowest stage-2 loss; em.select_by,
    em.select_rounds).

    \b
    Examples:
      wsi-pipeline em-round --stores stores --labels labels.csv --annotations ann/ --run run --rounds 3
      wsi-pipeline em-round --stores stores --labels labels.csv --annotations ann/ --run run --config tiny
      wsi-pipeline em-round --stores stores --labels labels.csv --annotations ann/ --run run-pixel --mode pixel
      wsi-pipeline em-round --stores stores --labels labels.csv --run run-mil --mode image --rounds 2
      wsi-pipeline em-round --stores stores --labels labels.csv --annotations ann/ --run run \\
          --set em.epochs=10 --set stage2.top_k=8 --weights theta1.pt
      wsi-pipeline em-round --stores stores --labels labels.csv --annotations ann/ --run run --tracker tensorboard
      wsi-pipeline em-round --stores stores --labels labels.csv --annotations ann/ --run run --rounds 3 --allow-restore
      wsi-pipeline em-round --stores stores --labels labels.csv --annotations ann/ --run run-scorenet --rounds 3 \\
          --theta1-from run --set model.cls_arch=scorenet_tiny
      wsi-pipeline em-round --stores s3://bucket/stores --labels labels.csv --annotations ann/ --run run
      torchrun --nproc-per-node 4 --no-python wsi-pipeline -- em-round --stores stores --labels labels.csv \\
          --annotations ann/ --run run

    Under torchrun every rank trains its slice of each batch (DistributedDataParallel) and
    predicts its share of the slides; rank 0 writes the run directory and logs. The `--` keeps
    torchrun from reading --run as its own --run-path.
    """
    from pipeline.batch import UsageError, setup_logging
    from pipeline.em import run_em
    from wsi.store import StoreError

    setup_logging(quiet, verbose, log_file)
    cfg = build_config(
        config_path,
        set_items,
        {"em.mode": mode, "model.seg_weights": str(weights.resolve()) if weights is not None else None,
         "em.val_fraction": val_fraction},
    )
    from pipeline.distributed import is_main_process
    from pipeline.tracking import make_tracker

    tracker_obj = make_tracker(tracker, run_dir) if is_main_process() else None  # torchrun: rank 0 tracks
    try:
        summary = run_em(stores, labels_csv, run_dir, cfg, annotations=list(annotations), rounds=rounds,
                         force=force, allow_restore=allow_restore, progress=not quiet,
                         hooks=tracker_obj.hooks() if tracker_obj else None, theta1_from=theta1_from)
    except StoreError as exc:
        raise UsageError(str(exc)) from None
    except KeyboardInterrupt:
        click.echo(f"interrupted; run the same command again to resume from the last checkpoint in {run_dir}", err=True)
        sys.exit(130)
    finally:
        if tracker_obj is not None:
            tracker_obj.close()
    if is_main_process():
        _echo_em_summary(summary, run_dir)


def _echo_em_summary(summary: dict, run_dir) -> None:
    rows = []
    for k in summary["rounds_completed"]:
        m = summary["rounds"].get(k, {})
        val = m.get("val") or {}
        auc = val.get("auc")
        spec = val.get("specificity_at_full_sensitivity")
        loss = m.get("stage2_loss")
        rows.append(
            f"  round {k}: stage-2 loss {loss:.4f}" if loss is not None else f"  round {k}: stage-2 loss n/a"
        )
        if auc is not None:
            rows[-1] += f", val AUC {auc:.3f}, specificity at 100% sensitivity {spec if spec is None else round(spec, 3)}"
        if k == summary["best_round"]:
            rows[-1] += "  <- best"
    ran = ", ".join(map(str, summary["rounds_run"])) or "none"
    click.echo(f"em-round ({summary['mode']}): ran round(s) {ran}; rounds complete:", err=True)
    click.echo("\n".join(rows), err=True)
    click.echo(f"run: {run_dir} (best round {summary['best_round']})", err=True)

@main.command()
@click.argument("slides", type=LOCATION)
@click.option("--run", "run_dir", required=True, type=click.Path(path_type=Path), help="Run directory of 'em-round'.")
@click.option("--out", "-o", "out_dir", required=True, type=LOCATION,
              help="Output folder: local, or object storage (s3://bucket/results; written locally first, see "
                   "--stage-dir, and uploaded).")
@click.option("--round", "round_", default="best", show_default=True, metavar="best|last|K",
              help="Which round's models: the run's best, its last, or round K.")
@click.option("--threshold", type=float, default=None,
              help="Decision threshold on the slide probability (default: the run's threshold at 100% "
                   "sensitivity on its validation split; required when the run has none).")
@click.option("--region-threshold", type=float, default=0.5, show_default=True,
              help="theta1 probability above which heatmap pixels form the GeoJSON regions and outlines.")
@click.option("--geojson/--no-geojson", default=True, show_default=True,
              help="Write QuPath GeoJSON: the predicted positive regions (OUT/regions/) and every tile as a "
                   "detection with its theta1/theta2 measurements (OUT/detections/).")
@click.option("--labels", "labels_csv", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="CSV slide_id,label[,split]: report.html then shows the truth, the ROC with AUC and its "
                   "bootstrap 95% interval, and the confusion counts at the threshold.")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA if available), cpu, cuda or cuda:N.")
@click.option("--batch-size", type=int, default=None, help="Tiles per inference batch (default: the run's em.predict_batch_size).")
@click.option("--loader-workers", type=int, default=None,
              help="DataLoader processes reading tiles (default: the run's runtime.loader_workers).")
@_workers_option("tiling workers")
@_worker_kind_option
@click.option("--scheduler", default=None, metavar="ADDRESS", help="Existing Dask scheduler for tiling, e.g. tcp://head:8786.")
@_cluster_options
@click.option("--mpp-csv", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Per-slide µm/px overrides: CSV with slide_id,mpp.")
@click.option("--assume-mpp", type=float, default=None, callback=_check_assume_mpp,
              help="µm/px for slides whose metadata has none.")
@_lease_timeout_option("Default: 3600.")
@click.option("--stage-dir", "stage_dir", default=None, metavar="DIR",
              help="Object storage work folder: slides staged from s3:// and the local copy of an s3:// --out "
                   "(default: $WSI_PIPELINE_CACHE or ~/.cache/wsi-pipeline).")
@click.option("--stage-cache-gb", "stage_cache_gb", type=float, default=None, metavar="GB",
              help="Most GB of slides staged from object storage kept in the work folder (default 100).")
@_common_options
@_handle_errors
@_needs_train_extra
def classify(slides, run_dir, out_dir, round_, threshold, region_threshold, geojson, labels_csv, device, batch_size,
             loader_workers, workers, processes, scheduler, cluster, cluster_config, mpp_csv, assume_mpp, lease_timeout,
             stage_dir, stage_cache_gb, quiet, verbose, log_file):
    """Score slides with a trained run: predictions.csv, heatmaps, GeoJSON regions and report.html.

    SLIDES is a folder of slides (searched recursively; tiled into OUT/stores with
    the run's own tiling settings, current stores are reused), one slide, a list
    file, or a folder of tile stores (*.zarr) tiled with the run's settings.
    Each slide's probability is the mean theta2 probability of the K tiles
    theta1 ranks highest; it is positive at probability >= threshold.

    Takes no --config/--set: tiling, models and top-K are the run's own
    settings; what depends on this machine is a flag.

    Tiling runs like `tile` (--workers, --processes, --scheduler, --cluster slurm with the
    cluster: section of --cluster-config, default values without one); scoring runs in this
    process with batched inference on the chosen device and --loader-workers
    DataLoader processes. Re-running skips slides already scored with the same
    run, round and store; predictions.csv and report.html are rebuilt from all
    results in OUT/slides. Several classify jobs may share one --out folder: each
    slide is scored by one of them. Exit code 1 when a slide failed (the others are done).

    \b
    Examples:
      wsi-pipeline classify /data/new-slides --run run --out results
      wsi-pipeline classify stores/ --run run --out results --round 2
      wsi-pipeline classify slides/ --run run --out results --threshold 0.35 --device cuda
      wsi-pipeline classify slides/ --run run --out results --workers 4 --loader-workers 4 --quiet
      wsi-pipeline classify slides.txt --run run --out results --scheduler tcp://head:8786
      wsi-pipeline classify slides/ --run run --out results --cluster slurm --cluster-config site.yaml
      wsi-pipeline classify slides/ --run run --out results --labels labels.csv --log-file classify.log
      wsi-pipeline classify s3://bucket/stores --run run --out s3://bucket/results --stage-dir /scratch/wsi
      torchrun --nproc-per-node 4 --no-python wsi-pipeline -- classify stores/ --run run --out results
    """
    from pipeline.batch import setup_logging
    from pipeline.classify import run_classify
    from wsi.slide import load_mpp_csv

    setup_logging(quiet, verbose, log_file)
    section = cluster_section_from(cluster, cluster_config, (), workers, processes)
    overrides = load_mpp_csv(mpp_csv) if mpp_csv else None
    try:
        report = run_classify(
            slides, run_dir, out_dir, round_=round_, threshold=threshold, device=device, batch_size=batch_size,
            loader_workers=loader_workers, workers=workers, processes=processes, scheduler=scheduler,
            cluster=cluster, cluster_config=section, mpp_overrides=overrides,
            assume_mpp=assume_mpp, region_threshold=region_threshold, geojson=geojson, labels=labels_csv, quiet=quiet,
            progress=not quiet, lease_timeout=lease_timeout, stage_dir=stage_dir, stage_cache_gb=stage_cache_gb,
        )
    except KeyboardInterrupt:
        click.echo(f"interrupted; run the same command again: slides already scored in {out_dir} are skipped", err=True)
        sys.exit(130)
    from pipeline.distributed import is_main_process

    if not is_main_process():  # torchrun: rank 0 reports, every rank exits with the same code
        sys.exit(0 if report.ok else 1)
    click.echo(report.summary(), err=True)
    s = report.settings
    click.echo(f"threshold {s['threshold']:.4f} ({s['threshold_source']}); round {s['round']}", err=True)
    click.echo(f"predictions: {s['predictions']} ({s['slides_in_predictions']} slides)", err=True)
    click.echo(f"report: {s['report_html']}", err=True)
    sys.exit(0 if report.ok else 1)


@main.command()
@click.option("--predictions", required=True, type=click.Path(path_type=Path), help="predictions.csv of 'classify'.")
@click.option("--labels", "labels_csv", required=True, type=click.Path(path_type=Path),
              help="CSV slide_id,label[,split]: 1 = positive, 0 = negative.")
@click.option("--out", "-o", "out_dir", default=None, type=click.Path(path_type=Path),
              help="Folder for evaluation.json and roc.png (default: the predictions file's folder).")
@click.option("--masks", multiple=True, type=click.Path(path_type=Path), metavar="DIR",
              help="Ground-truth folder (repeatable): <slide_id>.geojson (level-0 px) and/or "
                   "<slide_id>_lesion_mask.png with <mask>.json {\"downsample\": N}; adds pixel Dice/IoU.")
@click.option("--split", type=click.Choice(["auto", "train", "val", "test", "all"]), default="auto", show_default=True,
              help="Slides of this split of the labels CSV; auto = the held-out test split when there is one, "
                   "else all labelled slides with a warning that training slides give optimistic figures.")
@click.option("--pixel-threshold", type=float, default=0.5, show_default=True,
              help="theta1 probability at which a heatmap pixel counts as positive for Dice/IoU.")
@click.option("--report", is_flag=True,
              help="Also write report.html (in --out): the classify report with a truth column, the ROC with AUC "
                   "and its bootstrap 95% interval, and the confusion counts at the threshold.")
@_config_options
@_common_options
@_handle_errors
def evaluate(predictions, labels_csv, out_dir, masks, split, pixel_threshold, report, config_path, set_items, quiet,
             verbose, log_file):
    """Slide AUC, sensitivity and specificity of a classify output (and pixel Dice/IoU of its heatmaps).

    Prints AUC, sensitivity and specificity at the threshold stored in
    predictions.csv and at the threshold that finds every positive slide of the
    table (100% sensitivity), and writes roc.png and evaluation.json. With
    --masks, heatmaps (>= --pixel-threshold) are compared with the ground truth at
    heatmap scale over the tissue; GeoJSON regions count as lesion when their
    class is one of em.positive_classes (--config/--set).

    \b
    Examples:
      wsi-pipeline evaluate --predictions results/predictions.csv --labels labels.csv
      wsi-pipeline evaluate --predictions results/predictions.csv --labels labels.csv --split test
      wsi-pipeline evaluate --predictions results/predictions.csv --labels labels.csv --report --out eval/
      wsi-pipeline evaluate --predictions results/predictions.csv --labels cohort/labels.csv \\
          --masks cohort/annotations --out eval/
      wsi-pipeline evaluate --predictions results/predictions.csv --labels labels.csv --masks ann/ \\
          --set "em.positive_classes=[Tumor, Metastasis]"
    """
    from pipeline.batch import setup_logging
    from pipeline.evaluate import format_evaluation, run_evaluate

    setup_logging(quiet, verbose, log_file)
    cfg = build_config(config_path, set_items, {})
    res = run_evaluate(predictions, labels_csv, out_dir=out_dir, masks=list(masks), split=split,
                       pixel_threshold=pixel_threshold, config=cfg, report=report)
    click.echo(format_evaluation(res))


@main.command()
@click.argument("stores", type=click.Path(path_type=Path))
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Export folder: <format>/ per format inside.")
@click.option("--format", "formats", multiple=True, required=True, type=click.Choice(["h5", "imagefolder", "webdataset"]),
              help="h5: CLAM/TRIDENT coords file per slide; imagefolder: <class>/<slide_id>/ tile images; "
                   "webdataset: one .tar shard per slide. Repeatable.")
@click.option("--labels", "labels_csv", default=None, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="CSV slide_id,label[,split]: the ImageFolder class and the WebDataset .cls of each slide.")
@_common_options
@_handle_errors
def export(stores, out_dir, formats, labels_csv, quiet, verbose, log_file):
    """Export tile stores for other tools: CLAM/TRIDENT coordinates, ImageFolder, WebDataset.

    STORES is a store folder (the --out of 'tile') or one <slide_id>.zarr.
    h5 writes OUT/h5/<slide_id>.h5: dataset 'coords' (level-0 x, y) with
    attributes patch_level and patch_size, the layout CLAM's and TRIDENT's
    feature extractors read (needs h5py: pip install 'wsi-pipeline[export]').
    imagefolder and webdataset write the tile images themselves (a JPEG
    store's own JPEG bytes; PNG for zstd stores). Takes no --config: the
    stores carry their settings.

    \b
    Examples:
      wsi-pipeline export stores --out export --format h5
      wsi-pipeline export stores --out export --format imagefolder --labels labels.csv
      wsi-pipeline export stores/slide_000.zarr --out export --format webdataset --format h5
    """
    from pipeline.batch import setup_logging
    from pipeline.export import run_export

    setup_logging(quiet, verbose, log_file)
    res = run_export(stores, out_dir, list(formats), labels_csv=labels_csv)
    click.echo(f"exported {res.tiles} tiles of {res.slides} slides to {out_dir} ({', '.join(res.written)})", err=True)


@main.command()
@click.argument("out_dir", type=click.Path(path_type=Path), default=Path("demo-out"), required=False)
@_config_options
@click.option("--positives", type=int, default=12, show_default=True, help="Slides with lesions.")
@click.option("--negatives", type=int, default=12, show_default=True, help="Slides without lesions.")
@click.option("--size-px", type=int, default=4096, show_default=True, help="Slide side at level 0 (0.5 um/px).")
@click.option("--rounds", type=int, default=2, show_default=True, help="EM rounds.")
@click.option("--seed", type=int, default=0, show_default=True)
@_workers_option("tiling workers")
@_worker_kind_option
@_common_options
@_handle_errors
@_needs_train_extra
def demo(out_dir, config_path, set_items, positives, negatives, size_px, rounds, seed, workers, processes, quiet,
         verbose, log_file):
    """Run every stage on a generated cohort: synth -> tile -> em-round -> classify -> evaluate.

    Uses configs/tiny.yaml unless --config is given, so it runs in minutes on a
    laptop CPU. Re-running reuses what is already in OUT_DIR (default demo-out).

    \b
    Examples:
      wsi-pipeline demo
      wsi-pipeline demo /tmp/demo --positives 20 --negatives 20 --rounds 3
    """
    import time

    from pipeline.batch import setup_logging
    from pipeline.demo import run_demo
    from pipeline.evaluate import format_evaluation

    setup_logging(quiet, verbose, log_file)
    t = time.perf_counter()
    cfg = build_config(config_path or "tiny", set_items, {"runtime.processes": processes})
    res = run_demo(out_dir, cfg, n_positive=positives, n_negative=negatives, size_px=size_px, rounds=rounds,
                   seed=seed, workers=workers, quiet=quiet)
    val = res["val"] or {}
    click.echo("")
    click.echo(f"EM run: best round {res['best_round']} (stage-2 losses {res['round_losses']})")
    if val:
        click.echo(f"validation: slide AUC {val.get('auc', float('nan')):.3f}, specificity at 100% sensitivity "
                   f"{val.get('specificity_at_full_sensitivity', float('nan')):.3f} "
                   f"(threshold {val.get('threshold_at_full_sensitivity', float('nan')):.3f})")
    click.echo("held-out test slides:")
    click.echo(format_evaluation(res["test"]))
    click.echo(f"timings (s): {res['timings_s']}, total {time.perf_counter() - t:.0f} s")
    click.echo(f"report: {res['report']}")


@main.command()
@click.option("--method", type=click.Choice(["dino"]), default="dino", show_default=True,
              help="Self-supervised method: DINO (Caron et al. 2021), as ScoreNet pre-trains its ViTs.")
@click.option("--stores", type=click.Path(path_type=Path), default=None, help="Tile store folder (the --out of 'tile').")
@click.option("--images", type=click.Path(path_type=Path), default=None,
              help="Folder of images (searched recursively, e.g. an ImageFolder tree; labels are not used).")
@click.option("--out", "-o", "out_path", required=True, type=click.Path(path_type=Path),
              help="Weights file to write (loads with --weights / model.*_weights).")
@_config_options
@click.option("--arch", default=None, help="Model whose part is pre-trained (pretrain.arch), e.g. scorenet_tiny.")
@click.option("--part", type=click.Choice(["auto", "scorer", "fine", "backbone"]), default=None,
              help="scorer: ScoreNet's recommendation ViT on images downsampled by s; fine: its fine-grained ViT "
                   "on full-resolution crops; backbone: a DLA classifier's trunk (pretrain.part).")
@click.option("--init", "init_path", type=click.Path(path_type=Path), default=None,
              help="Earlier weights file: loaded first, its tensors carried into --out (scorer, then fine).")
@click.option("--force", is_flag=True, help="Train again even if --out exists.")
@click.option("--probe", "probe", type=click.Path(path_type=Path), default=None,
              help="Labelled ImageFolder tree (train/<class>/, val/<class>/): weighted k-NN accuracy of its val "
                   "images on the teacher's features, before and after (pretrain.knn_*). Judges, never trains.")
@_common_options
@_handle_errors
@_needs_train_extra
def pretrain(method, stores, images, out_path, config_path, set_items, arch, part, init_path, force, probe, quiet,
             verbose, log_file):
    """Self-supervised pre-training of a model part; writes local weights.

    DINO: a student and an EMA teacher (same backbone + projection head) see
    2 global and N local crops of each image; the student learns to match the
    teacher's centred, sharpened output on the other views (pretrain.*: DINO's
    values by default, ScoreNet's head sizes). The teacher's backbone is saved
    under the target model's key names. Re-running resumes from the last epoch;
    a finished --out with the same settings is left as it is.

    \b
    Examples:
      wsi-pipeline pretrain --method dino --stores stores --out scorer.pt
      wsi-pipeline pretrain --images patches/train --out scorer.pt --config tiny
      wsi-pipeline pretrain --images patches/train --out both.pt --part fine --init scorer.pt
      wsi-pipeline pretrain --images patches/train --out dla.pt --arch dla34_cls_tiny --set pretrain.epochs=10
      wsi-pipeline pretrain --images patches/train --out scorer.pt --config tiny --probe patches
    """
    from pipeline.batch import setup_logging
    from pipeline.pretrain import run_pretrain

    setup_logging(quiet, verbose, log_file)
    cfg = build_config(config_path, set_items, {"pretrain.arch": arch, "pretrain.part": part})
    try:
        res = run_pretrain(out_path, cfg, method=method, stores=stores, images=images, init=init_path, force=force,
                           progress=not quiet, probe=probe)
    except KeyboardInterrupt:
        click.echo(f"interrupted; run the same command again to resume from the last epoch of {out_path}", err=True)
        sys.exit(130)
    if res["skipped"]:
        click.echo(f"{out_path}: already pre-trained with these settings; nothing to do", err=True)
    else:
        losses = [round(h["loss"], 4) for h in res["history"]]
        click.echo(f"pretrain ({method}, {res['arch']} {res['part']}): DINO loss per epoch {losses}", err=True)
        if res.get("probe"):
            pr = res["probe"]
            click.echo(f"k-NN probe, {pr['final']['images']['val']} val images of {pr['root']}: accuracy "
                       f"{pr['init']['accuracy']:.3f} at initialisation, {pr['final']['accuracy']:.3f} after (class "
                       f"margin {pr['init']['margin']:+.3f} -> {pr['final']['margin']:+.3f})", err=True)
        for w in res.get("warnings", []):
            click.echo(f"WARNING: {w}", err=True)
    click.echo(f"weights: {out_path}", err=True)


@main.command("train-patches")
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="ImageFolder tree (train/<class>/*.png, val/<class>/..., optional test/), or a tile store "
                   "folder with --labels.")
@click.option("--labels", "labels_csv", type=click.Path(path_type=Path), default=None,
              help="With a store folder as --data: CSV slide_id,tile_index,label[,split].")
@click.option("--run", "run_dir", required=True, type=click.Path(path_type=Path), help="Run directory (created).")
@_config_options
@click.option("--weights", type=click.Path(path_type=Path), default=None,
              help="Local file with initial weights, e.g. from 'pretrain' (model.cls_weights).")
@click.option("--predict", "predict_dir", type=click.Path(path_type=Path), default=None,
              help="Folder of images to classify with the trained model (per-image probabilities CSV).")
@click.option("--predictions", "predictions_csv", type=click.Path(path_type=Path), default=None,
              help="Where --predict writes (default RUN/predictions.csv).")
@click.option("--force", is_flag=True, help="Delete the run and train again.")
@_common_options
@_handle_errors
@_needs_train_extra
def train_patches(data, labels_csv, run_dir, config_path, set_items, weights, predict_dir, predictions_csv, force,
                  quiet, verbose, log_file):
    """Train a multi-class patch / ROI classifier (model.cls_arch, trainer patches.trainer).

    Reports accuracy, macro-F1, per-class recall and the confusion matrix of
    val (and test) in RUN/report (JSON + PNG). Re-running resumes from the last
    epoch or, when the run is complete, only predicts; other settings or data in
    the same --run stop with one line.

    \b
    Examples:
      wsi-pipeline train-patches --data patches --run patch-run --config tiny
      wsi-pipeline train-patches --data patches --run patch-run --predict new-images/
      wsi-pipeline train-patches --data patches --run sn-run --set model.cls_arch=scorenet_tiny --weights scorer.pt
      wsi-pipeline train-patches --data stores --labels tile_labels.csv --run tile-run --set patches.epochs=30
    """
    from pipeline.batch import setup_logging
    from pipeline.patches import run_train_patches

    setup_logging(quiet, verbose, log_file)
    cfg = build_config(config_path, set_items,
                       {"model.cls_weights": str(weights.resolve()) if weights is not None else None})
    try:
        res = run_train_patches(data, run_dir, cfg, labels_csv=labels_csv, predict=predict_dir,
                                predictions=predictions_csv, force=force, progress=not quiet)
    except KeyboardInterrupt:
        click.echo(f"interrupted; run the same command again to resume from the last checkpoint in {run_dir}", err=True)
        sys.exit(130)
    if res["skipped"]:
        click.echo(f"{run_dir}: already trained; nothing to train", err=True)
    for split, rep in res["reports"].items():
        recall = ", ".join(f"{c} {'n/a' if r is None else f'{r:.2f}'}" for c, r in rep["per_class_recall"].items())
        click.echo(f"{split}: accuracy {rep['accuracy']:.3f}, macro-F1 {rep['macro_f1']:.3f}; recall {recall}", err=True)
    click.echo(f"report: {Path(run_dir) / 'report'}", err=True)
    if res["predictions"]:
        click.echo(f"predictions: {res['predictions']}", err=True)


if __name__ == "__main__":  # pragma: no cover
    main()
