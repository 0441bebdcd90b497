"""Configuration: typed sections with the papers' values as defaults.

A config is a tree of dataclasses. YAML files (``configs/*.yaml``) and
command-line flags override fields; an unknown or mistyped key is an error
that names the key, the file and the closest valid key.

Every number that comes from a paper lives here with the paper's value as its
default; ``configs/default.yaml`` repeats the defaults verbatim (a test keeps
the two in step) and ``configs/tiny.yaml`` shrinks them for CPU tests and the
demo.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


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
    block_tiles: int = 8
    """Output tiles per block side; a block is the unit of parallel work (performance only)."""

    def validate(self) -> None:
        if self.mpp <= 0:
            raise ConfigError(f"tiling.mpp must be > 0, got {self.mpp}")
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
        if self.mask_mpp <= 0:
            raise ConfigError("tissue.mask_mpp must be > 0")
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
    def validate(self) -> None:
        if self.codec not in ("jpeg", "zstd"):
            raise ConfigError(f"store.codec must be 'jpeg' or 'zstd', got {self.codec!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError("store.jpeg_quality must be in [1, 100]")


@dataclass
class RuntimeConfig:
    """Where and how work runs (does not change results)."""

    workers: int = 2
    """Dask worker processes for tiling; 0 runs everything in this process."""
    torch_threads: int = 0
    """torch.set_num_threads for training/inference; 0 leaves torch's default."""
    loader_workers: int = 2
    """DataLoader worker processes."""
    device: str = "auto"
    """'auto' (CUDA if available), 'cpu' or 'cuda[:N]'."""


@dataclass
class Config:
    tiling: TilingConfig = field(default_factory=TilingConfig)
    tissue: TissueConfig = field(default_factory=TissueConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def validate(self) -> "Config":
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate()
        return self

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
        return self.section_hash("tiling", "tissue", "store", exclude=("tiling.block_tiles",))


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
    if origin in (list, tuple):
        args = typing.get_args(typ)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
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


def _apply(section_obj: Any, values: Mapping[str, Any], where: str) -> None:
    hints = typing.get_type_hints(type(section_obj))
    names = {f.name for f in dataclasses.fields(section_obj)}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"{where}: unknown key {key!r}{_suggest(key, names)}")
        setattr(section_obj, key, _coerce(value, hints[key], f"{where}.{key}"))


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A config given as a path, or as a name of a file in ``configs/`` (``tiny``)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    candidate = CONFIG_DIR / (p.name if p.suffix else f"{p.name}.yaml")
    if not p.parent.parts and candidate.is_file():
        return candidate
    known = sorted(x.stem for x in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else []
    raise ConfigError(
        f"config {str(name_or_path)!r} not found: pass a YAML file path"
        + (f" or one of the built-in names {known}" if known else "")
    )


def load_config(
    path: str | Path | None = None, overrides: Mapping[str, Any] | None = None
) -> Config:
    """Load a config: defaults, then the YAML file, then dotted ``overrides``.

    Parameters
    ----------
    path : str or Path, optional
        A YAML file, or the name of one in ``configs/`` (e.g. ``"tiny"``).
    overrides : mapping, optional
        ``{"tiling.mpp": 1.0, ...}``; values may be strings (from the CLI) and are
        converted to the field's type.
    """
    types = _section_types()
    sections = {name: typ() for name, typ in types.items()}
    if path is not None:
        fpath = resolve_config_path(path)
        try:
            data = yaml.safe_load(fpath.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{fpath}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{fpath}: the top level must be a mapping of sections")
        for sec, values in data.items():
            if sec not in sections:
                raise ConfigError(f"{fpath}: unknown section {sec!r}{_suggest(sec, sections)}")
            if not isinstance(values, dict):
                raise ConfigError(f"{fpath}: section {sec!r} must be a mapping")
            _apply(sections[sec], values, f"{fpath}: {sec}")
    for key, value in (overrides or {}).items():
        sec, dot, leaf = key.partition(".")
        if not dot or sec not in sections:
            raise ConfigError(
                f"override {key!r}: expected SECTION.KEY with SECTION one of {sorted(sections)}"
                + _suggest(sec, sections)
            )
        _apply(sections[sec], {leaf: value}, f"override {sec}")
    return Config(**sections).validate()


def parse_set_options(items: typing.Iterable[str]) -> dict[str, Any]:
    """Parse ``--set section.key=value`` options (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    return out
