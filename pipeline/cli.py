"""The ``wsi-pipeline`` command line.

Exit codes: 0 everything succeeded; 1 some slides failed (the others were
processed and the report says why); 2 bad input (config, paths, lock).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from wsi import __version__


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
    fn = click.option("--quiet", "-q", is_flag=True, help="Only warnings and the final summary.")(fn)
    fn = click.option("--verbose", "-v", is_flag=True, help="Debug logging.")(fn)
    return fn


def _handle_errors(fn):
    """Turn expected errors into one clear line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from pipeline.batch import UsageError
        from pipeline.config import ConfigError
        from wsi.slide import SlideError

        try:
            return fn(*args, **kwargs)
        except (UsageError, ConfigError, SlideError) as exc:
            click.echo(f"error: {exc}", err=True)
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
      wsi-pipeline demo --out demo-out            # everything on a generated cohort
      wsi-pipeline tile slides/ --out stores/     # cut tissue tiles into Zarr
    """


@main.command()
@click.argument("slides", type=click.Path(path_type=Path))
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(path_type=Path), help="Store folder.")
@_config_options
@click.option("--mpp", type=float, default=None, help="Target resolution in um/px (config tiling.mpp, default 0.5).")
@click.option("--tile-px", type=int, default=None, help="Tile size in pixels (tiling.tile_px).")
@click.option("--overlap-px", type=int, default=None, help="Overlap in pixels (tiling.overlap_px).")
@click.option("--codec", type=click.Choice(["jpeg", "zstd"]), default=None, help="Tile codec (store.codec).")
@click.option("--jpeg-quality", type=int, default=None, help="JPEG quality (store.jpeg_quality).")
@click.option("--workers", type=int, default=None, help="Dask worker processes; 0 = in this process (runtime.workers).")
@click.option("--scheduler", default=None, metavar="ADDRESS", help="Existing Dask scheduler, e.g. tcp://head:8786.")
@click.option("--mpp-csv", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Per-slide µm/px overrides: CSV with slide_id,mpp.")
@click.option("--assume-mpp", type=float, default=None, help="µm/px for slides whose metadata has none.")
@_common_options
@_handle_errors
def tile(slides, out_dir, config_path, set_items, mpp, tile_px, overlap_px, codec, jpeg_quality, workers,
         scheduler, mpp_csv, assume_mpp, quiet, verbose):
    """Cut tissue tiles from SLIDES into one Zarr store per slide.

    SLIDES is a folder (searched recursively for slide files), one slide, or a
    text file listing slide paths. Re-running skips slides whose file and
    tiling settings are unchanged; a failed slide never stops the others.

    \b
    Examples:
      wsi-pipeline tile /data/slides --out /data/stores
      wsi-pipeline tile slides.txt --out stores --config tiny --workers 4
      wsi-pipeline tile scan.svs --out stores --mpp 1.0 --codec zstd
      wsi-pipeline tile slides/ --out stores --mpp-csv mpp.csv --assume-mpp 0.25
      wsi-pipeline tile slides/ --out stores --scheduler tcp://head:8786
    """
    from pipeline.batch import setup_logging
    from pipeline.tile import run_tile
    from wsi.slide import load_mpp_csv

    setup_logging(quiet, verbose)
    cfg = build_config(
        config_path,
        set_items,
        {
            "tiling.mpp": mpp,
            "tiling.tile_px": tile_px,
            "tiling.overlap_px": overlap_px,
            "store.codec": codec,
            "store.jpeg_quality": jpeg_quality,
        },
    )
    overrides = load_mpp_csv(mpp_csv) if mpp_csv else None
    report = run_tile(
        slides, out_dir, cfg, workers=workers, scheduler=scheduler, mpp_overrides=overrides,
        assume_mpp=assume_mpp, quiet=quiet,
    )
    click.echo(report.summary(), err=True)
    click.echo(f"report: {Path(out_dir) / 'tile-report.json'}", err=True)
    sys.exit(0 if report.ok else 1)


@main.command()
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--positives", type=int, default=4, show_default=True, help="Slides with lesions.")
@click.option("--negatives", type=int, default=4, show_default=True, help="Slides without lesions.")
@click.option("--size-px", type=int, default=4096, show_default=True, help="Slide width and height at level 0.")
@click.option("--mpp", type=float, default=0.5, show_default=True, help="Level-0 µm/px.")
@click.option("--annotated", type=int, default=2, show_default=True, help="Positive slides given pixel annotations.")
@click.option("--seed", type=int, default=0, show_default=True)
def synth(out_dir, positives, negatives, size_px, mpp, annotated, seed):
    """Generate a synthetic cohort of pyramidal TIFF slides with lesions, labels and annotations.

    \b
    Examples:
      wsi-pipeline synth cohort/ --positives 6 --negatives 6
      wsi-pipeline synth big/ --positives 1 --negatives 0 --size-px 20000
    """
    from wsi.synth import make_cohort

    info = make_cohort(
        out_dir, n_positive=positives, n_negative=negatives, width_px=size_px, height_px=size_px,
        mpp=mpp, seed=seed, annotate=annotated,
    )
    click.echo(f"wrote {positives + negatives} slides to {out_dir}")
    return info


if __name__ == "__main__":  # pragma: no cover
    main()
