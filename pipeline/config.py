"""Configuration: typed sections with the papers' values as defaults.

A config is a tree of dataclasses. YAML files (``configs/*.yaml``) and
command-line flags override fields; an unknown or mistyped key is an error
that names the key, the file and the closest valid key. The built-in YAML
files live in the repository's ``configs/`` folder, which is installed as the
package ``pipeline.configs`` (see :func:`builtin_configs`).

Every number that comes from a paper lives here with the paper's value as its
default; ``configs/default.yaml`` repeats the defaults verbatim (a test keeps
the two in step) and ``configs/tiny.yaml`` shrinks them for CPU tests and the
demo.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.resources
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from pipeline.leases import DEFAULT_TIMEOUT_S as DEFAULT_LEASE_TIMEOUT_S

if typing.TYPE_CHECKING:
    from importlib.resources.abc import Traversable


class ConfigError(ValueError):
    """A config file or override is wrong; the message says where and how to fix it."""


# --------------------------------------------------------------------------- sections


@dataclass
class TilingConfig:
    """How slides are cut into tiles."""

    mpp: float = 0.5
    """Target resolution in micrometres per pixel (0.5 ~ 20x)."""
    tile_px: int = 512
    """Tile side in pixels at the target resolution."""
    overlap_px: int = 128
    """Overlap between neighbouring tiles in pixels (stride = tile_px - overlap_px)."""
    mpp_tolerance: float = 0.05
    """Relative mpp mismatch under which a pyramid level is used without resizing."""
    min_tissue_fraction: float = 0.25
    """Keep a tile when at least this fraction of its area is tissue."""
    pad_value: int = 255
    """Grey value used for tile pixels beyond the slide's edge (255 = white glass)."""
    fast_read: bool = True
    """Decode source JPEG tiles directly with tifffile/imagecodecs where possible."""
    block_tiles: int = 4
    """Output tiles per side of the canvas a worker decodes at once (memory and speed only)."""
    task_tiles: int = 2048
    """Most tiles per parallel task; a slide is cut into bands of consecutive grid rows,
    at least four per worker (speed only)."""

    def validate(self) -> None:
        if not self.mpp > 0:
            raise ConfigError(f"tiling.mpp must be > 0, got {self.mpp}")
        if not 0 <= self.mpp_tolerance < 1:
            raise ConfigError(f"tiling.mpp_tolerance must be in [0, 1) (a relative mismatch), got {self.mpp_tolerance}")
        if self.tile_px < 16:
            raise ConfigError(f"tiling.tile_px must be >= 16, got {self.tile_px}")
        if not 0 <= self.overlap_px < self.tile_px:
            raise ConfigError(
                f"tiling.overlap_px must be in [0, tile_px={self.tile_px}), got {self.overlap_px}"
            )
        if not 0 <= self.min_tissue_fraction <= 1:
            raise ConfigError("tiling.min_tissue_fraction must be in [0, 1]")
        if not 0 <= self.pad_value <= 255:
            raise ConfigError("tiling.pad_value must be in [0, 255]")
        if self.block_tiles < 1:
            raise ConfigError("tiling.block_tiles must be >= 1")
        if self.task_tiles < 1:
            raise ConfigError("tiling.task_tiles must be >= 1")

    @property
    def stride_px(self) -> int:
        return self.tile_px - self.overlap_px


@dataclass
class TissueConfig:
    """Otsu tissue detection on a low-resolution rendering of the slide."""

    mask_mpp: float = 8.0
    """Resolution of the tissue mask in micrometres per pixel (8-16 is typical)."""
    channel: str = "saturation"
    """Channel thresholded by Otsu: 'saturation' (HSV) or 'od' (optical density)."""
    blur_um: float = 24.0
    """Median-blur window in micrometres before thresholding."""
    min_threshold: float = 20.0
    """Lower bound on the Otsu threshold (0-255 channel units): blank glass has no tissue."""
    max_background_value: int = 235
    """Pixels whose darkest RGB channel is above this are background (glass)."""
    close_um: float = 32.0
    """Morphological closing radius in micrometres (joins fragments)."""
    open_um: float = 16.0
    """Morphological opening radius in micrometres (removes specks)."""
    max_hole_area_um2: float = 250_000.0
    """Holes inside tissue smaller than this (um^2) are filled; larger stay (real lumens, tears)."""
    min_tissue_area_um2: float = 20_000.0
    """Connected tissue regions smaller than this (um^2) are dropped."""

    def validate(self) -> None:
        if not self.mask_mpp > 0:
            raise ConfigError(f"tissue.mask_mpp must be > 0, got {self.mask_mpp}")
        if not 0 <= self.min_threshold <= 255:
            raise ConfigError(f"tissue.min_threshold must be in [0, 255] (channel units), got {self.min_threshold}")
        if not 0 <= self.max_background_value <= 255:
            raise ConfigError(f"tissue.max_background_value must be in [0, 255], got {self.max_background_value}")
        if self.channel not in ("saturation", "od"):
            raise ConfigError(f"tissue.channel must be 'saturation' or 'od', got {self.channel!r}")
        for name in ("blur_um", "close_um", "open_um", "max_hole_area_um2", "min_tissue_area_um2"):
            if getattr(self, name) < 0:
                raise ConfigError(f"tissue.{name} must be >= 0")


@dataclass
class StoreConfig:
    """How tile pixels are written to Zarr."""

    codec: str = "jpeg"
    """'jpeg' (lossy, ~8x smaller) or 'zstd' (lossless)."""
    jpeg_quality: int = 90
    """JPEG quality 1-100 when codec is 'jpeg'."""
    zstd_level: int = 3
    """zstd compression level when codec is 'zstd'."""
    tiles_per_shard: int = 32
    """Tiles grouped into one shard file (zarr v3 sharding); 1 = one file per tile.
    Layout only: the pixels and arrays are the same."""
    def validate(self) -> None:
        if self.codec not in ("jpeg", "zstd"):
            raise ConfigError(f"store.codec must be 'jpeg' or 'zstd', got {self.codec!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError("store.jpeg_quality must be in [1, 100]")
        if not -7 <= self.zstd_level <= 22:
            raise ConfigError(f"store.zstd_level must be in [-7, 22] (zstd's levels), got {self.zstd_level}")
        if self.tiles_per_shard < 1:
            raise ConfigError("store.tiles_per_shard must be >= 1")


@dataclass
class RuntimeConfig:
    """Where and how work runs (does not change results)."""

    workers: int = 2
    """Parallel tiling workers; -1 one per core (joblib's convention), 0 runs everything in this
    thread, one task after another."""
    processes: bool = False
    """Workers as a Dask LocalCluster of spawned processes (a native crash fails one slide,
    not the run) instead of threads of this process (no start-up; same throughput, since
    tiling's decoding and encoding release the GIL)."""
    torch_threads: int = 0
    """torch.set_num_threads for training/inference; 0 leaves torch's default."""
    loader_workers: int = 2
    """DataLoader worker processes."""
    device: str = "auto"
    """'auto' (CUDA if available), 'cpu' or 'cuda[:N]'."""
    amp: bool = True
    """Mixed precision (float16 autocast + gradient scaling) on CUDA; ignored on CPU."""
    lease_timeout_s: float = DEFAULT_LEASE_TIMEOUT_S
    """Seconds without a refresh after which another job's lease on a slide is stale and taken over
    (``tile``/``classify`` on a shared folder; holders refresh theirs every 30 s, and a holder on this
    host that is gone is noticed at once)."""
    dist_timeout_s: int = 1800
    """Under torchrun: how long a collective (a barrier, a gradient all-reduce) waits for a rank
    that stopped answering before every rank gives up (the process group's timeout)."""

    stage_dir: str = ""
    """Local folder for object storage work: ``slides/`` caches slides staged from ``s3://`` (OpenSlide reads
    local files only), ``outputs/`` holds the bookkeeping (leases, reports) and the stores being built of an
    ``s3://`` ``--out``. Empty: ``$WSI_PIPELINE_CACHE``, else ``~/.cache/wsi-pipeline``."""
    stage_cache_gb: float = 100.0
    """Most GB (10^9 bytes) of staged slides kept in ``stage_dir/slides``; least recently used ones go first."""

    def validate(self) -> None:
        if not (self.stage_cache_gb > 0 and math.isfinite(self.stage_cache_gb)):
            raise ConfigError(f"runtime.stage_cache_gb must be a number of GB > 0, got {self.stage_cache_gb}")
        if not self.lease_timeout_s > 0:
            raise ConfigError(f"runtime.lease_timeout_s must be > 0 seconds, got {self.lease_timeout_s}")
        if self.dist_timeout_s < 1:
            raise ConfigError("runtime.dist_timeout_s must be >= 1 (seconds a rank waits for the others under torchrun)")
        if self.workers < -1:
            raise ConfigError("runtime.workers must be >= -1 (-1 = all cores, 0 = one task at a time in this thread)")
        if self.torch_threads < 0:
            raise ConfigError("runtime.torch_threads must be >= 0 (0 = torch's default)")
        if self.loader_workers < 0:
            raise ConfigError("runtime.loader_workers must be >= 0 (0 = load in the main process)")
        dev = self.device
        if not (dev in ("auto", "cpu", "cuda", "mps") or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise ConfigError(f"runtime.device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {dev!r}")


@dataclass
class ClusterConfig:
    """The SLURM cluster ``tile --cluster slurm`` / ``classify --cluster slurm`` starts (dask-jobqueue's
    SLURMCluster): batch jobs of Dask workers, scaled between minimum_jobs and maximum_jobs with the work
    queued. Does not change results. The defaults ask for a slice of a workstation-class node."""

    queue: Optional[str] = None
    """Partition of the worker jobs (#SBATCH -p); null = the site's default partition."""
    account: Optional[str] = None
    """Account the worker jobs are charged to (#SBATCH -A); null = the user's default account."""
    cores: int = 8
    """CPU cores per job (#SBATCH --cpus-per-task): as many tasks run at once in each job."""
    processes: int = 1
    """Dask worker processes per job, sharing its cores as threads (tiling releases the GIL, so one
    process does the work of many; more processes isolate a native crash to fewer running tasks)."""
    memory_gb: float = 16.0
    """Memory per job in GiB (#SBATCH --mem); tiling needs about 0.2 GiB per core."""
    walltime_min: int = 60
    """Time limit of each job in minutes (#SBATCH -t). Workers retire 5 minutes before it (when it is
    at least 15 minutes) and, with work left, new jobs replace them."""
    job_extra_directives: list[str] = field(default_factory=list)
    """More #SBATCH options, one per item without the '#SBATCH' prefix, e.g. ['--qos=normal',
    '--constraint=avx2']."""
    local_directory: Optional[str] = None
    """Scratch folder of each worker on its node (Dask's spill and lock files); null = the node's
    temporary folder."""
    log_directory: Optional[str] = None
    """Folder for the jobs' stdout/stderr files (created); null = SLURM's default (slurm-<job id>.out
    in the folder the command ran in)."""
    interface: Optional[str] = None
    """Network interface the scheduler and the workers talk over, e.g. 'ib0'; null = Dask's choice."""
    minimum_jobs: int = 0
    """Jobs kept running while the cluster is open, even without work."""
    maximum_jobs: int = 4
    """Most jobs running at once (at most maximum_jobs x cores tasks in flight)."""
    start_timeout_s: float = 1800.0
    """Seconds to wait for the first job to start and its worker to connect; then the command stops
    (exit 2) and cancels the jobs. Long queue waits need more."""

    def validate(self) -> None:
        for name in ("cores", "processes", "walltime_min", "maximum_jobs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"cluster.{name} must be >= 1, got {getattr(self, name)}")
        if self.cores % self.processes:
            raise ConfigError(f"cluster.processes={self.processes} must divide cluster.cores={self.cores} "
                              "(each process gets cores / processes threads)")
        if not self.memory_gb > 0:
            raise ConfigError(f"cluster.memory_gb must be > 0 (GiB per job), got {self.memory_gb}")
        if not 0 <= self.minimum_jobs <= self.maximum_jobs:
            raise ConfigError(f"cluster.minimum_jobs must be in [0, maximum_jobs={self.maximum_jobs}], "
                              f"got {self.minimum_jobs}")
        if not self.start_timeout_s > 0:
            raise ConfigError(f"cluster.start_timeout_s must be > 0 seconds, got {self.start_timeout_s}")
        for name in ("queue", "account", "interface"):
            value = getattr(self, name)
            if value is not None and (not value or any(c.isspace() for c in value)):
                raise ConfigError(f"cluster.{name} must be one name without spaces or null, got {value!r}")
        for i, d in enumerate(self.job_extra_directives):
            if d.lstrip().upper().startswith("#SBATCH"):
                raise ConfigError(f"cluster.job_extra_directives[{i}] = {d!r}: leave out '#SBATCH', "
                                  f"e.g. {d.lstrip()[7:].strip()!r}")
            if not d.startswith("-"):
                raise ConfigError(f"cluster.job_extra_directives[{i}] = {d!r}: expected an sbatch option such as "
                                  "'--qos=normal'")


EM_MODES = ("mixed", "pixel", "image")
THRESHOLD_MODES = ("fixed", "negative_fpr")
MIL_LOSSES = ("tile", "pixel")
SELECT_ROUNDS = ("em", "all")
SELECT_BY = ("stage2_loss", "val_loss", "val_auc")
SLIDE_SCORES = ("theta2", "theta1_max", "theta1_topk_mean")
THETA2_INITS = ("random", "theta1")


def _choice(key: str, value: str, options: tuple[str, ...]) -> None:
    """A ConfigError naming the key, the choices and the closest one, unless ``value`` is one of them."""
    if value not in options:
        raise ConfigError(f"{key} must be one of {list(options)}, got {value!r}{_suggest(str(value), options)}")
LR_SCHEDULES = ("constant", "cosine")
OPTIMIZERS = ("adam", "adamw", "sgd")
# Constructor arguments the pipeline sets itself (one positive-probability channel / logit).
RESERVED_ARCH_KWARGS = ("num_classes", "pretrained")


def _check_optimizer(name: str, where: str) -> None:
    if name not in OPTIMIZERS:
        raise ConfigError(f"{where} must be one of {list(OPTIMIZERS)}, got {name!r}{_suggest(str(name).lower(), OPTIMIZERS)}")


@dataclass
class ModelConfig:
    """Which networks are trained (built by name through ``models.create_model``)."""

    seg_arch: str = "dla34_up"
    """theta1, the patch segmentation network: one positive-probability channel ('DLA34-up')."""
    cls_arch: str = "dla34_cls"
    """theta2, the tile classifier of stage 2: DLA34 with one logit."""
    seg_weights: Optional[str] = None
    """Local file with initial theta1 weights (round 0); None = random initialisation."""
    cls_weights: Optional[str] = None
    """Local file with initial theta2 weights (every round); None = random initialisation."""
    map_stride_px: int = 4
    """Probability maps (E-step, heatmaps) are kept at tile_px / map_stride_px (DLA34-up: stride 4)."""
    seg_trainer: str = "soft_bce"
    """How theta1 is trained (pipeline.trainers registry): pixel-wise soft-label BCE."""
    cls_trainer: str = "topk_mean"
    """How theta2 is trained (pipeline.trainers registry): BCE of the mean top-K tile probability."""
    seg_arch_kwargs: dict[str, Any] = field(default_factory=dict)
    """Constructor arguments of seg_arch (e.g. {width_mult: 0.5}); {} = the architecture's defaults.
    num_classes is set by the pipeline."""
    cls_arch_kwargs: dict[str, Any] = field(default_factory=dict)
    """Constructor arguments of cls_arch (e.g. {drop_rate: 0.2}); {} = the architecture's defaults."""
    seg_mix: list[dict[str, Any]] = field(default_factory=list)
    """Batch mixers of theta1's trainer (pipeline.mixers registry), applied in order after colour jitter:
    [{name: cellmix, p: 0.5, strategy: group, drive: hold, T0: auto}]; [] = none."""
    cls_mix: list[dict[str, Any]] = field(default_factory=list)
    """Batch mixers of theta2's trainer, e.g. [{name: scoremix, p: 0.5}] (needs a cls_arch with a
    saliency map: scorenet, scorenet_tiny); [] = none."""

    def validate(self) -> None:
        for name in ("seg_arch", "cls_arch", "seg_trainer", "cls_trainer"):
            if not getattr(self, name):
                raise ConfigError(f"model.{name} must not be empty")
        if self.map_stride_px < 1:
            raise ConfigError("model.map_stride_px must be >= 1")
        for name in ("seg_arch_kwargs", "cls_arch_kwargs"):
            taken = sorted(set(getattr(self, name)) & set(RESERVED_ARCH_KWARGS))
            if taken:
                raise ConfigError(f"model.{name} must not set {taken}: the pipeline sets them itself")
        for key in ("seg_mix", "cls_mix"):
            for i, m in enumerate(getattr(self, key)):
                if not isinstance(m, Mapping) or not m.get("name"):
                    raise ConfigError(f"model.{key}[{i}] must be a mapping with a name, such as "
                                      f"{{name: cellmix, p: 0.5}}; got {m!r}")


@dataclass
class EMConfig:
    """The mixed-supervision EM loop (Li et al., Algorithm 1): round 0, E-step, M-step."""

    mode: str = "mixed"
    """'mixed' (EM with pixel + image labels), 'pixel' (theta1 from annotations only, no EM) or
    'image' (no pixel labels: top-K MIL baseline after Campanella et al. 2019)."""
    threshold_T: float = 0.4
    """E-step: a tile whose maximum pixel probability is below T is removed."""
    reweight_V: float = 4.0
    """E-step: pseudo-positive targets are clip(V * p, 0, 1)."""
    floor: float = 0.01
    """E-step: re-weighted values below this become 0."""
    threshold_mode: str = "fixed"
    """How T is set each round: 'fixed' (the paper: T = threshold_T) or 'negative_fpr' (the lowest T at
    which at most em.negative_fpr of the negative slides' tiles pass: the false-positive rate is held
    where the truth is known, whatever theta1's calibration)."""
    negative_fpr: float = 0.01
    """'negative_fpr' mode: the share of negative-slide tiles allowed to pass T (never below threshold_T)."""
    max_positive_tiles_per_slide: Optional[float] = None
    """Cap on each positive slide's pseudo-positive tiles: a count (>= 1) or a share of its tiles (< 1),
    the highest-scoring kept; None = no cap (the paper)."""
    hard_negative_top_up: bool = True
    """When fewer negative-slide tiles pass T than one batch's hard-negative share, add the
    highest-scoring negative-slide tiles below T (all truly negative), so hard negatives keep their
    share of every batch instead of repeating within it or handing their share to the other sources."""
    min_pseudo_precision: float = 0.5
    """Warn (log, metrics.json, classify's report) when the E-step's estimated share of lesion among
    the pseudo-positives, 1 - (negative slides' kept share) / (positive slides' kept share), is below
    this: theta1 then keeps tiles of positive slides no more often than of negative ones. Not a paper
    value; a report knob, outside the run's identity."""
    val_fraction: float = 0.0
    """Without a 'val' split in labels.csv: the share of training patients (labels.csv 'patient_id', else
    each slide its own patient) moved to a validation split, per class, seeded by em.seed; 0 = none.
    Patients with annotated slides stay in training."""
    select_rounds: str = "em"
    """Which rounds may be 'best': 'em' (rounds >= 1 of a mixed run: round 0 is the pixel-only model,
    not the paper's method) or 'all'."""
    select_by: str = "stage2_loss"
    """Round choice: 'stage2_loss' (the paper: lowest stage-2 loss on the training slides),
    'val_loss' (class-balanced BCE on the val split) or 'val_auc' (highest val AUC, ties -> val loss)."""
    ratio: list[float] = field(default_factory=lambda: [2.0, 1.0, 7.0])
    """M-step batch mix annotated : pseudo-positive : hard-negative (exact per batch, largest-remainder
    rounding, see pipeline.sampling.ratio_counts). The official code samples about 51 : 9 : 40."""
    batch_size: int = 32
    """Tiles per theta1 training batch."""
    lr: float = 0.001
    """Learning rate of theta1's optimiser."""
    weight_decay: float = 0.0
    """Weight decay of theta1's optimiser (decoupled from the gradient for 'adamw')."""
    optimizer: str = "adam"
    """theta1's optimiser: 'adam' (the paper's), 'adamw' or 'sgd' (momentum 0.9)."""
    lr_schedule: str = "constant"
    """'constant' or 'cosine' (over the epochs of one round)."""
    epochs_init: int = 30
    """Epochs of round 0 (theta1 on the annotated tiles only)."""
    epochs: int = 30
    """Epochs of each M-step (rounds >= 1)."""
    batches_per_epoch: Optional[int] = None
    """Cap on batches per epoch; None = one pass over the annotated tiles (image mode: the selected tiles)."""
    positive_classes: list[str] = field(default_factory=lambda: ["Tumor", "Tumour"])
    """GeoJSON classification names that count as positive (case-insensitive)."""
    annotated_region_classes: list[str] = field(default_factory=lambda: ["Region*"])
    """GeoJSON classification names (case-insensitive, shell patterns) of the regions inside which the
    annotation is complete; outside them pixels are unlabelled. A file without such a feature annotates
    the whole slide. See wsi.annotations."""
    mask_downsample: Optional[float] = None
    """Level-0 pixels per pixel of annotation mask images; None = from a '<mask>.json' sidecar
    ('downsample' key) or from the slide's width / the mask's width."""
    flip: bool = True
    """Augmentation: random horizontal/vertical flips."""
    rotate90: bool = True
    """Augmentation: random multiples of 90 degree rotation."""
    brightness: float = 0.1
    """Colour jitter: brightness factor drawn from [1 - b, 1 + b]."""
    contrast: float = 0.1
    """Colour jitter: contrast factor drawn from [1 - c, 1 + c]."""
    saturation: float = 0.1
    """Colour jitter: saturation factor drawn from [1 - s, 1 + s]."""
    hue: float = 0.02
    """Colour jitter: hue shift drawn from [-h, h] (fraction of the colour circle)."""
    hed_scale: float = 0.0
    """Stain jitter in HED space (pipeline.stain.HEDJitter), per tile: the amount of each stain
    (haematoxylin, eosin, DAB/residual) is multiplied by a factor drawn from [1 - s, 1 + s]; 0 = off."""
    hed_shift: float = 0.0
    """Stain jitter in HED space, per tile: then each stain's amount is shifted by a value drawn from
    [-d, d], in decadic optical density along the stain's unit colour vector (0.05 changes a pixel's
    channels by at most 11 %); 0 = off."""
    mil_top_k: int = 1
    """Image mode: tiles per slide that get the slide's label in each MIL epoch (Campanella: 1)."""
    mil_loss: str = "tile"
    """Image mode: how a top-K tile's slide label trains theta1. ``tile`` (trainer ``tile_lse_bce``): as the
    label of the tile (Campanella et al. train a tile classifier), read through a smooth maximum of theta1's
    map; ``pixel``: every pixel of the tile gets the label (``model.seg_trainer``), which teaches that the
    normal tissue of a positive slide's tile is lesion, so theta1 flags every tile (measured)."""
    mil_lse_r: float = 5.0
    """Image mode, ``mil_loss: tile``: sharpness r of the log-sum-exp pool ``(1/r) log mean exp(r z)`` of a
    tile's logit map (large: its maximum; small: its mean). Not from the paper (Li et al. give no image-only
    details; Campanella's tiles have no map); 5 learns a small lesion from random init where the hard
    maximum does not."""
    mil_epochs: Optional[int] = None
    """Image mode: epochs of each round. Every MIL epoch first ranks all training tiles under the current
    theta1 (a prediction pass over the training slides), so an epoch costs far more than a mixed/pixel one;
    None = em.epochs_init in round 0 and em.epochs after, like the other modes."""
    seed: int = 0
    """Seed of initialisation, sampling and augmentation (reproducible on CPU)."""
    predict_batch_size: int = 64
    """Tiles per inference batch (performance only)."""
    heatmap_slides: int = 4
    """Heatmap PNGs written per round (half positive, half negative slides where possible)."""

    def theta1_epochs(self, k: int) -> int:
        """Epochs theta1 trains in round ``k``."""
        if self.mode == "image" and self.mil_epochs is not None:
            return self.mil_epochs
        return self.epochs_init if k == 0 else self.epochs

    def validate(self) -> None:
        if self.mode not in EM_MODES:
            raise ConfigError(f"em.mode must be one of {list(EM_MODES)}, got {self.mode!r}")
        if not 0.0 <= self.threshold_T <= 1.0:
            raise ConfigError(f"em.threshold_T must be in [0, 1], got {self.threshold_T}")
        if self.reweight_V < 0:
            raise ConfigError(f"em.reweight_V must be >= 0, got {self.reweight_V}")
        if not 0.0 <= self.floor < 1.0:
            raise ConfigError(f"em.floor must be in [0, 1), got {self.floor}")
        _choice("em.threshold_mode", self.threshold_mode, THRESHOLD_MODES)
        _choice("em.select_rounds", self.select_rounds, SELECT_ROUNDS)
        _choice("em.select_by", self.select_by, SELECT_BY)
        if not 0.0 <= self.val_fraction <= 0.9:
            raise ConfigError(f"em.val_fraction must be in [0, 0.9], got {self.val_fraction}")
        if not 0.0 <= self.negative_fpr < 1.0:
            raise ConfigError(f"em.negative_fpr must be in [0, 1), got {self.negative_fpr}")
        if not 0.0 <= self.min_pseudo_precision <= 1.0:
            raise ConfigError(f"em.min_pseudo_precision must be in [0, 1], got {self.min_pseudo_precision}")
        cap = self.max_positive_tiles_per_slide
        if cap is not None and not (0 < cap < 1 or (cap >= 1 and float(cap).is_integer())):
            raise ConfigError(f"em.max_positive_tiles_per_slide must be a share in (0, 1), a whole count >= 1 or "
                              f"null, got {cap}")
        if len(self.ratio) != 3 or any(r < 0 for r in self.ratio) or sum(self.ratio) <= 0:
            raise ConfigError(
                f"em.ratio must be three non-negative numbers (annotated, pseudo-positive, hard-negative) "
                f"with a positive sum, got {list(self.ratio)}"
            )
        if self.batch_size < 1:
            raise ConfigError("em.batch_size must be >= 1")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError("em.lr must be > 0 and em.weight_decay >= 0")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"em.lr_schedule must be one of {list(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.epochs_init < 0 or self.epochs < 0:
            raise ConfigError("em.epochs_init and em.epochs must be >= 0")
        if self.batches_per_epoch is not None and self.batches_per_epoch < 1:
            raise ConfigError("em.batches_per_epoch must be >= 1 or null (one pass)")
        if not self.positive_classes:
            raise ConfigError("em.positive_classes must name at least one class, e.g. [Tumor]")
        clash = {c.casefold() for c in self.positive_classes} & {c.casefold() for c in self.annotated_region_classes}
        if clash:
            raise ConfigError(f"em.annotated_region_classes repeats positive class(es) {sorted(clash)}; "
                              "a class is either positive or a region")
        if self.mask_downsample is not None and self.mask_downsample <= 0:
            raise ConfigError("em.mask_downsample must be > 0 or null")
        for name in ("brightness", "contrast", "saturation"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"em.{name} must be in [0, 1)")
        if not 0.0 <= self.hue <= 0.5:
            raise ConfigError("em.hue must be in [0, 0.5]")
        if not 0.0 <= self.hed_scale < 1.0:
            raise ConfigError(f"em.hed_scale must be in [0, 1) (0 = off), got {self.hed_scale}")
        if not 0.0 <= self.hed_shift <= 1.0:
            raise ConfigError(f"em.hed_shift must be in [0, 1] optical density (0 = off), got {self.hed_shift}")
        _check_optimizer(self.optimizer, "em.optimizer")
        if self.mil_top_k < 1:
            raise ConfigError("em.mil_top_k must be >= 1")
        _choice("em.mil_loss", self.mil_loss, MIL_LOSSES)
        if not self.mil_lse_r > 0:
            raise ConfigError(f"em.mil_lse_r must be > 0, got {self.mil_lse_r}")
        if self.mil_epochs is not None and self.mil_epochs < 0:
            raise ConfigError(f"em.mil_epochs must be >= 0 or null (em.epochs_init / em.epochs), got {self.mil_epochs}")
        if self.predict_batch_size < 1:
            raise ConfigError("em.predict_batch_size must be >= 1")
        if self.heatmap_slides < 0:
            raise ConfigError("em.heatmap_slides must be >= 0")


@dataclass
class Stage2Config:
    """Stage 2: the slide classifier theta2 on each slide's top-K tiles."""

    top_k: int = 16
    """K: tiles per slide with the highest maximum pixel probability under theta1."""
    epochs: int = 15
    """Training epochs of theta2 per round."""
    lr: float = 0.001
    """Learning rate of theta2's optimiser."""
    weight_decay: float = 0.0
    """Weight decay of theta2's optimiser (decoupled from the gradient for 'adamw')."""
    optimizer: str = "adam"
    """theta2's optimiser: 'adam' (the paper's), 'adamw' or 'sgd' (momentum 0.9)."""
    batch_slides: int = 2
    """Slides per batch (each contributes its K tiles: 2 x 16 = 32 tiles)."""
    slides_per_epoch: Optional[int] = None
    """Slides drawn per epoch, half positive and half negative; None = twice the larger class."""
    augment: bool = True
    """Flips, rotations and colour jitter (the em.* settings) on theta2's tiles too."""
    slide_score: str = "theta2"
    """The slide probability: 'theta2' (the paper: mean theta2 probability of the top-K tiles),
    'theta1_max' (theta1's highest tile maximum) or 'theta1_topk_mean' (mean theta1 maximum of the
    top-K tiles). Every score's validation AUC is recorded either way."""
    fit_warning_auc: float = 0.8
    """Warn (log, metrics.json, classify's report) when theta2's AUC on its own training slides is below
    this: a classifier that did not fit its training set must not look like a working one."""
    init: str = "random"
    """theta2's starting weights: 'random' (seeded, the same in every round) or 'theta1': its DLA trunk
    from this round's theta1 (the timm DLA trunk both models share; the classifier head stays seeded).
    The paper does not say how theta2 is initialised (its image-level baseline starts from ImageNet);
    nothing is downloaded here, and on a few dozen training slides a random theta2 learns the training
    lesions' look rather than the lesions, where theta1's trunk has learned them from every round's
    tiles (README, issue #10). model.cls_weights (a local file) is the other way to start it."""

    def validate(self) -> None:
        if self.top_k < 1:
            raise ConfigError("stage2.top_k must be >= 1")
        _choice("stage2.slide_score", self.slide_score, SLIDE_SCORES)
        _choice("stage2.init", self.init, THETA2_INITS)
        if not 0.0 <= self.fit_warning_auc <= 1.0:
            raise ConfigError(f"stage2.fit_warning_auc must be in [0, 1], got {self.fit_warning_auc}")
        if self.epochs < 0:
            raise ConfigError("stage2.epochs must be >= 0")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError("stage2.lr must be > 0 and stage2.weight_decay >= 0")
        if self.batch_slides < 1:
            raise ConfigError("stage2.batch_slides must be >= 1")
        if self.slides_per_epoch is not None and self.slides_per_epoch < 1:
            raise ConfigError("stage2.slides_per_epoch must be >= 1 or null")
        _check_optimizer(self.optimizer, "stage2.optimizer")


@dataclass
class PretrainConfig:
    """Self-supervised DINO pre-training (Caron et al. 2021) of a model part: ``wsi-pipeline pretrain``.

    Defaults are DINO's (``main_dino.py``, ViT-S/16) except the projection head, which is
    ScoreNet's (Stegmueller et al., App. B.2)."""

    arch: str = "scorenet"
    """Model whose part is pre-trained (models registry); the weights file loads into it."""
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    """Constructor arguments of arch (as model.cls_arch_kwargs)."""
    part: str = "auto"
    """'scorer' (ScoreNet's recommendation ViT, on images downsampled by its factor s), 'fine'
    (its fine-grained ViT, on full-resolution crops), 'backbone' (a DLA classifier's trunk);
    'auto' = the first of these the model has."""
    epochs: int = 100
    """Training epochs (DINO: 100 for the ablations, 300-800 for the best ViT-S)."""
    batch_size: int = 128
    """Images per batch (DINO: 64 per GPU, 1024 in all; ScoreNet: >= 128)."""
    lr: float = 0.0005
    """Peak AdamW learning rate at batch 256, scaled linearly with batch_size (DINO)."""
    min_lr: float = 1e-6
    """Learning rate at the end of the cosine decay."""
    warmup_epochs: int = 10
    """Linear learning-rate warm-up from 0."""
    weight_decay: float = 0.04
    """Weight decay at the start (cosine to weight_decay_end); not applied to biases and norms."""
    weight_decay_end: float = 0.4
    """Weight decay at the end."""
    momentum_teacher: float = 0.996
    """EMA momentum of the teacher at the start, cosine to 1.0 at the end."""
    teacher_temp: float = 0.04
    """Teacher softmax temperature (sharpening) after the warm-up."""
    warmup_teacher_temp: float = 0.04
    """Teacher temperature at the start, linear to teacher_temp (DINO paper: 0.04 -> 0.07; code default 0.04)."""
    warmup_teacher_temp_epochs: int = 0
    """Epochs of the teacher-temperature warm-up (DINO paper: 30; code default 0)."""
    student_temp: float = 0.1
    """Student softmax temperature."""
    center_momentum: float = 0.9
    """Momentum of the running centre of the teacher's outputs (centring)."""
    out_dim: int = 1024
    """Prototypes of the projection head (ScoreNet; DINO: 65536)."""
    hidden_dim: int = 1024
    """Hidden width of the head's MLP (ScoreNet; DINO: 2048)."""
    bottleneck_dim: int = 128
    """Width before the prototype layer (ScoreNet; DINO: 256)."""
    head_layers: int = 3
    """Linear layers of the head's MLP."""
    norm_last_layer: bool = True
    """Fix the prototypes' lengths to 1 (weight norm with g = 1)."""
    clip_grad: float = 3.0
    """Clip each parameter's gradient norm to this; 0 = off."""
    freeze_last_layer: int = 1
    """Epochs during which the prototype layer gets no update."""
    global_crop_px: int = 224
    """Side of the 2 global crops in input pixels (of the downsampled image for 'scorer')."""
    local_crop_px: int = 96
    """Side of the local crops."""
    local_crops: int = 8
    """Local crops per image (the N of multi-crop)."""
    global_scale: list[float] = field(default_factory=lambda: [0.4, 1.0])
    """Area fraction of the image a global crop covers, [min, max]."""
    local_scale: list[float] = field(default_factory=lambda: [0.05, 0.4])
    """Area fraction of the image a local crop covers, [min, max]."""
    seed: int = 0
    """Seed of initialisation, data order and crops (reproducible on CPU)."""
    knn_k: int = 20
    """--probe: neighbours of the weighted k-NN classifier on the teacher's features (DINO's eval_knn: 20;
    ScoreNet App. C reports k 1-100)."""
    knn_temperature: float = 0.07
    """--probe: a neighbour votes with weight exp(cosine / knn_temperature) (DINO's eval_knn)."""
    collapse_entropy: float = 0.95
    """Warn of uniform collapse when the teacher's per-image target entropy ends above this fraction of
    ln(out_dim) (not in the papers: a monitor; DINO Sec. 5.3 shows collapse by the same entropy)."""

    #: fields that judge a run without changing its weights (not part of its identity)
    EVALUATION_FIELDS = ("knn_k", "knn_temperature", "collapse_entropy")

    def validate(self) -> None:
        if self.part not in ("auto", "scorer", "fine", "backbone"):
            raise ConfigError(f"pretrain.part must be auto, scorer, fine or backbone, got {self.part!r}"
                              f"{_suggest(str(self.part), ('auto', 'scorer', 'fine', 'backbone'))}")
        taken = sorted(set(self.arch_kwargs) & set(RESERVED_ARCH_KWARGS))
        if taken:
            raise ConfigError(f"pretrain.arch_kwargs must not set {taken}: the pipeline sets them itself")
        for name in ("epochs", "batch_size", "out_dim", "hidden_dim", "bottleneck_dim", "head_layers",
                     "global_crop_px", "local_crop_px"):
            if getattr(self, name) < 1:
                raise ConfigError(f"pretrain.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_epochs", "warmup_teacher_temp_epochs", "freeze_last_layer", "local_crops"):
            if getattr(self, name) < 0:
                raise ConfigError(f"pretrain.{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0 or self.min_lr < 0 or self.weight_decay < 0 or self.weight_decay_end < 0:
            raise ConfigError("pretrain.lr must be > 0; min_lr, weight_decay and weight_decay_end >= 0")
        if not 0.0 <= self.momentum_teacher <= 1.0 or not 0.0 <= self.center_momentum <= 1.0:
            raise ConfigError("pretrain.momentum_teacher and pretrain.center_momentum must be in [0, 1]")
        if min(self.teacher_temp, self.warmup_teacher_temp, self.student_temp, self.knn_temperature) <= 0:
            raise ConfigError("pretrain temperatures (teacher, student, knn) must be > 0")
        if self.knn_k < 1:
            raise ConfigError(f"pretrain.knn_k must be >= 1, got {self.knn_k}")
        if not 0.0 < self.collapse_entropy <= 1.0:
            raise ConfigError(f"pretrain.collapse_entropy is a fraction of ln(out_dim) in (0, 1], got "
                              f"{self.collapse_entropy}")
        for name in ("global_scale", "local_scale"):
            v = getattr(self, name)
            if len(v) != 2 or not 0 < v[0] <= v[1] <= 1:
                raise ConfigError(f"pretrain.{name} must be [min, max] with 0 < min <= max <= 1, got {list(v)}")


@dataclass
class PatchesConfig:
    """Patch / ROI classification: ``wsi-pipeline train-patches``. The network is
    ``model.cls_arch`` (with ``model.cls_arch_kwargs``, ``model.cls_weights``) with one
    logit per class. Defaults: ScoreNet's TRoI classifier (Stegmueller et al., Sec. 4)."""

    trainer: str = "soft_ce"
    """Trainer (pipeline.trainers registry): multi-class cross-entropy with soft labels."""
    epochs: int = 15
    """Training epochs."""
    batch_size: int = 8
    """Images per batch."""
    lr: float = 3.125e-4
    """Learning rate: 1e-2 * batch / 256 (linear scaling rule)."""
    weight_decay: float = 0.0
    """Weight decay (not given by the paper)."""
    optimizer: str = "sgd"
    """'sgd' (momentum 0.9, the paper's), 'adam' or 'adamw'."""
    lr_schedule: str = "cosine"
    """'cosine' (the paper anneals to 1e-6, this to 0) or 'constant'."""
    augment: bool = True
    """Flips, rotations and colour jitter (the em.* settings) on the training images."""
    image_px: Optional[int] = None
    """Resize every image to this square side; None = use images as stored (all one size)."""
    seed: int = 0
    """Seed of initialisation, data order and augmentation (reproducible on CPU)."""
    predict_batch_size: int = 64
    """Images per inference batch (performance only)."""

    def validate(self) -> None:
        if not self.trainer:
            raise ConfigError("patches.trainer must not be empty")
        if self.epochs < 0 or self.batch_size < 1 or self.predict_batch_size < 1:
            raise ConfigError("patches.epochs must be >= 0, patches.batch_size and predict_batch_size >= 1")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError("patches.lr must be > 0 and patches.weight_decay >= 0")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"patches.lr_schedule must be one of {list(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        _check_optimizer(self.optimizer, "patches.optimizer")
        if self.image_px is not None and self.image_px < 8:
            raise ConfigError(f"patches.image_px must be >= 8 or null, got {self.image_px}")


@dataclass
class Config:
    tiling: TilingConfig = field(default_factory=TilingConfig)
    tissue: TissueConfig = field(default_factory=TissueConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    em: EMConfig = field(default_factory=EMConfig)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    patches: PatchesConfig = field(default_factory=PatchesConfig)

    def validate(self) -> "Config":
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            _check_finite(section, f.name)
            if hasattr(section, "validate"):
                section.validate()
        if self.stage2.init == "theta1" and self.model.cls_weights:
            raise ConfigError("stage2.init: theta1 and model.cls_weights both give theta2's starting weights; "
                              "set one (stage2.init: random to start from the file)")
        return self

    def validate_for_training(self, tile_px: int | None = None, where: str = "tiling.tile_px") -> "Config":
        """Checks that only matter for training and inference (tiling alone accepts any tile size).

        ``tile_px`` defaults to ``tiling.tile_px``; pass the tile size of existing stores
        (and name them in ``where``) to check those instead. The tile side must be a multiple
        of each architecture's size divisor (``models.get_size_divisor``).
        """
        t = self.tiling.tile_px if tile_px is None else int(tile_px)
        divisors = self.model_size_divisors()
        step = math.lcm(self.model.map_stride_px, *divisors.values())  # a tile size that suits every check
        for key, d in divisors.items():
            if t % d:
                lo, hi = (t // step) * step, (t // step + 1) * step
                raise ConfigError(
                    f"{where}={t} is not a multiple of {d}: model.{key}={getattr(self.model, key)!r} needs "
                    f"inputs whose side is a multiple of {d}; re-tile with tiling.tile_px={lo or hi} or {hi}"
                )
        if t % self.model.map_stride_px:
            raise ConfigError(f"model.map_stride_px={self.model.map_stride_px} must divide {where}={t}")
        self.check_mixers()
        return self

    def check_mixers(self) -> None:
        """Build every ``model.seg_mix`` / ``model.cls_mix`` entry and check it suits its trainer's target
        kind (and, for a mixer that reads a saliency map, the architecture): a bad name or option is a
        ConfigError before any training. Imports torch: training commands only."""
        import models
        import torch

        from pipeline.mixers import create_mixer
        from pipeline.trainers import trainer_target_kind

        for key, trainer, arch in (("seg_mix", "seg_trainer", "seg_arch"), ("cls_mix", "cls_trainer", "cls_arch")):
            for i, entry in enumerate(getattr(self.model, key)):
                where = f"model.{key}[{i}]"
                mixer = create_mixer(**{"where": where, **entry})
                kind = trainer_target_kind(getattr(self.model, trainer))
                if kind is not None:
                    try:
                        mixer.check(kind)
                    except ConfigError as exc:
                        raise ConfigError(f"{where}: {exc} (model.{trainer}={getattr(self.model, trainer)!r})") from None
                if mixer.needs_saliency:
                    with torch.random.fork_rng(devices=[]):
                        net = models.create_model(getattr(self.model, arch), num_classes=1,
                                                  **getattr(self.model, f"{arch}_kwargs"))
                    try:
                        mixer.check(mixer.kinds[0], net)
                    except ConfigError as exc:
                        raise ConfigError(f"{where}: {exc} (model.{arch}={getattr(self.model, arch)!r})") from None

    def model_size_divisors(self) -> dict[str, int]:
        """``{"seg_arch": d, "cls_arch": d}``: the number each architecture's input side must be a
        multiple of, with its ``*_arch_kwargs``. Imports :mod:`models` (torch): training commands only."""
        import models  # registers the built-in architectures

        out = {}
        for key in ("seg_arch", "cls_arch"):
            arch, kwargs = getattr(self.model, key), getattr(self.model, f"{key}_kwargs")
            if not models.is_model(arch):
                near = models.list_models(arch[:5]) or models.list_models()
                raise ConfigError(f"model.{key}={arch!r} is not a registered model; choose one of {near}")
            try:
                out[key] = models.get_size_divisor(arch, **kwargs)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"model.{key}_kwargs={kwargs!r} do not suit {arch!r}: {exc}") from None
        return out

    TRAIN_SECTIONS = ("model", "em", "stage2")
    TRAIN_EXCLUDE = ("em.predict_batch_size", "em.heatmap_slides", "em.select_rounds", "em.select_by",
                     "stage2.fit_warning_auc",
                     "em.min_pseudo_precision")

    def train_hash(self, tiling_hash: str | None = None) -> str:
        """Hash of everything that changes what training produces: the model, em and stage2
        sections (less pure performance/report knobs) and the tiling hash (by default this
        config's; pass the stores' ``config_hash`` to tie a run to the data it was trained on)."""
        h = self.section_hash(*self.TRAIN_SECTIONS, exclude=self.TRAIN_EXCLUDE)
        th = self.tiling_hash() if tiling_hash is None else tiling_hash
        return hashlib.sha256(f"{h}:{th}".encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def section_hash(self, *names: str, exclude: tuple[str, ...] = ()) -> str:
        """A short stable hash of the given sections (dotted keys in ``exclude`` left out)."""
        data = {n: dataclasses.asdict(getattr(self, n)) for n in names}
        for key in exclude:
            sec, _, leaf = key.partition(".")
            data.get(sec, {}).pop(leaf, None)
        blob = json.dumps(data, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def tiling_hash(self) -> str:
        """Hash of everything that changes a tile store's content."""
        return self.section_hash("tiling", "tissue", "store", exclude=("tiling.block_tiles", "tiling.task_tiles", "store.tiles_per_shard"))


def _check_finite(section: Any, name: str) -> None:
    """No NaN or infinity in any number of a section (nor in its lists): every comparison with
    NaN is False, so range checks alone would let it through."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{name}.{f.name} must be a finite number, got {value}")


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


# --------------------------------------------------------------------------- loading


def _suggest(key: str, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(value: Any, typ: Any, where: str) -> Any:
    origin = typing.get_origin(typ)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if origin is dict:
        return _coerce_dict(value, typ, where)
    if origin in (list, tuple):
        args = typing.get_args(typ)
        inner = args[0] if args else Any
        if isinstance(value, str) and typing.get_origin(inner) is dict:  # a list of mappings: YAML
            try:
                value = yaml.safe_load(value) if value.strip() else []
            except yaml.YAMLError:
                raise ConfigError(f"{where}: expected a list of mappings such as [{{name: cellmix}}], got {value!r}") from None
            value = [] if value is None else value
        elif isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        items = [_coerce(v, inner, f"{where}[{i}]") if inner is not Any else v for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if typ is Any:
        return value
    # Optional[X]
    args = typing.get_args(typ)
    if args and type(None) in args:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        inner = next(a for a in args if a is not type(None))
        return _coerce(value, inner, where)
    return value


def _coerce_dict(value: Any, typ: Any, where: str) -> dict:
    """A mapping with string keys; a string (``--set``, Python overrides) is parsed as YAML."""
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value) if value.strip() else {}
        except yaml.YAMLError:
            raise ConfigError(f"{where}: expected a mapping such as {{width_mult: 0.5}}, got {value!r}") from None
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping such as {{width_mult: 0.5}}, got {value!r}")
    args = typing.get_args(typ)
    inner = args[1] if len(args) == 2 else Any
    out = {}
    for k, v in value.items():
        if not isinstance(k, str):
            raise ConfigError(f"{where}: keys must be names (strings), got {k!r}")
        out[k] = v if inner is Any else _coerce(v, inner, f"{where}.{k}")
    return out


def _apply(section_obj: Any, values: Mapping[str, Any], where: str) -> None:
    hints = typing.get_type_hints(type(section_obj))
    names = {f.name for f in dataclasses.fields(section_obj)}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"{where}: unknown key {key!r}{_suggest(key, names)}")
        setattr(section_obj, key, _coerce(value, hints[key], f"{where}.{key}"))


def builtin_configs() -> Traversable:
    """The folder of built-in configs (``default.yaml``, ``tiny.yaml``).

    Installed (a wheel, or the editable install of ``make setup``), it is the
    package ``pipeline.configs``; from a source checkout that is only on
    ``sys.path`` it is the checkout's ``configs/`` folder, beside ``pipeline/``.
    """
    try:
        return importlib.resources.files("pipeline.configs")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "configs"


def resolve_config_path(name_or_path: str | Path) -> Path | Traversable:
    """A config given as a path, or as the name of a built-in config (``tiny``)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    builtin = builtin_configs()
    candidate = builtin / (p.name if p.suffix else f"{p.name}.yaml")
    if not p.parent.parts and candidate.is_file():
        return candidate
    known = sorted(x.name[:-5] for x in builtin.iterdir() if x.name.endswith(".yaml")) if builtin.is_dir() else []
    raise ConfigError(
        f"config {str(name_or_path)!r} not found: pass a YAML file path"
        + (f" or one of the built-in names {known}" if known else "")
    )


class _DuplicateKey(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                continue  # the base class reports unhashable keys
            if key in seen:
                raise _DuplicateKey(
                    f"key {key!r} appears twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1}); keep one"
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_config(
    path: str | Path | None = None, overrides: Mapping[str, Any] | None = None
) -> Config:
    """Load a config: defaults, then the YAML file, then dotted ``overrides``.

    Parameters
    ----------
    path : str or Path, optional
        A YAML file, or the name of a built-in config (``"default"``, ``"tiny"``).
    overrides : mapping, optional
        ``{"tiling.mpp": 1.0, ...}``; values may be strings (from the CLI) and are
        converted to the field's type.
    """
    data: Mapping[str, Any] = {}
    where = "defaults"
    if path is not None:
        fpath = resolve_config_path(path)
        where = str(fpath)
        try:
            data = yaml.load(fpath.read_text(), Loader=_UniqueKeyLoader) or {}
        except _DuplicateKey as exc:
            raise ConfigError(f"{fpath}: {exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{fpath}: not valid YAML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{fpath}: cannot read the config ({exc.strerror})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{fpath}: the top level must be a mapping of sections")
    sections = _sections_from(data, where)
    for key, value in (overrides or {}).items():
        sec, dot, leaf = key.partition(".")
        if not dot or sec not in sections:
            raise ConfigError(
                f"override {key!r}: expected SECTION.KEY with SECTION one of {sorted(sections)}"
                + _suggest(sec, sections)
            )
        _apply(sections[sec], {leaf: value}, f"override {sec}")
    return Config(**sections).validate()


def load_cluster_config(path: str | Path | None, overrides: Mapping[str, Any] | None = None) -> ClusterConfig:
    """The ``cluster:`` section of a config file (or of the defaults), with ``cluster.*`` ``overrides``.

    The whole file is checked as :func:`load_config` checks it (a typo anywhere is an error), but only its
    cluster section is used: ``--cluster-config`` names where the machine's cluster is described, apart
    from the settings that decide what is computed.
    """
    extra = sorted(k for k in (overrides or {}) if not k.startswith("cluster."))
    if extra:
        raise ConfigError(f"override {extra[0]!r}: only cluster.* settings apply here")
    return load_config(path, overrides).cluster


def _sections_from(data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Default sections updated from a nested mapping ``{section: {key: value}}`` (not yet validated)."""
    sections = {name: typ() for name, typ in _section_types().items()}
    for sec, values in (data or {}).items():
        if sec not in sections:
            raise ConfigError(f"{where}: unknown section {sec!r}{_suggest(sec, sections)}")
        if not isinstance(values, Mapping):
            raise ConfigError(f"{where}: section {sec!r} must be a mapping")
        _apply(sections[sec], values, f"{where}: {sec}")
    return sections


def config_from_dict(data: Mapping[str, Any], where: str = "config") -> Config:
    """A typed, validated Config from a nested mapping (``Config.to_dict()``, e.g. read back from a run's
    ``run.json``); keys missing there keep their defaults, unknown ones are an error naming ``where``."""
    return Config(**_sections_from(data, where)).validate()


def parse_set_options(items: typing.Iterable[str]) -> dict[str, Any]:
    """Parse ``--set section.key=value`` options (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    return out
