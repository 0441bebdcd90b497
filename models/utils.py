"""Model utilities: seeding and tolerant state-dict loading."""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

__all__ = ["seed_everything", "seed_worker", "LoadReport", "load_state_dict_flexible", "unwrap_state_dict"]


def seed_everything(seed: int, deterministic: Optional[bool] = None, warn_only: bool = True) -> int:
    """Seed Python's ``random``, NumPy and torch (CPU and every CUDA device).

    Args:
        seed: the seed (also exported as ``PYTHONHASHSEED`` for child processes).
        deterministic: ``True`` switches on ``torch.use_deterministic_algorithms``
            (and cuDNN deterministic mode, benchmark off, and sets
            ``CUBLAS_WORKSPACE_CONFIG`` if unset); ``False`` switches it off;
            ``None`` (default) leaves that global setting as it is.
        warn_only: with ``deterministic=True``, ops lacking a deterministic
            implementation warn instead of raising.  Keep it True to train the
            segmentation models on CUDA: the backward of bilinear upsampling has
            no deterministic CUDA kernel.

    Returns the seed.
    """
    seed = int(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds all CUDA devices
    if deterministic is not None:
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(bool(deterministic), warn_only=warn_only)
        torch.backends.cudnn.deterministic = bool(deterministic)
        if deterministic:
            torch.backends.cudnn.benchmark = False
    return seed


def seed_worker(worker_id: int) -> None:
    """``DataLoader(worker_init_fn=seed_worker)``: seed ``random`` and NumPy in
    each worker from the per-worker torch seed (which derives from the
    generator seeded by :func:`seed_everything`)."""
    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)


_NEST_KEYS = ("state_dict", "model", "model_state_dict", "net")
_STRIP_PREFIXES = ("module.", "_orig_mod.")


def unwrap_state_dict(obj: Any) -> Mapping:
    """The state dict inside a checkpoint: ``obj`` itself or ``obj[k]`` for ``k`` in
    ``state_dict``/``model``/``model_state_dict``/``net`` (nested, e.g.
    ``{'model': {'state_dict': ...}}``, is followed too)."""
    for _ in range(4):
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in _NEST_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise TypeError(f"expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    return obj


@dataclass
class LoadReport:
    """What :func:`load_state_dict_flexible` did."""

    loaded_keys: List[str] = field(default_factory=list)
    missing_keys: List[str] = field(default_factory=list)  # in the model, not in the file
    unexpected_keys: List[str] = field(default_factory=list)  # in the file, not in the model
    mismatched_keys: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)
    # (key, shape in file, shape in model); these were skipped
    stripped_prefixes: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every key matched (what ``strict=True`` requires)."""
        return not (self.missing_keys or self.unexpected_keys or self.mismatched_keys)

    def __str__(self) -> str:
        def few(keys: Sequence[Any], n: int = 8) -> str:
            keys = list(keys)
            s = ", ".join(str(k) for k in keys[:n])
            return s + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")

        lines = [f"loaded {len(self.loaded_keys)} tensors"]
        if self.stripped_prefixes:
            lines.append(f"stripped prefixes: {', '.join(self.stripped_prefixes)}")
        if self.missing_keys:
            lines.append(f"missing ({len(self.missing_keys)}): {few(self.missing_keys)}")
        if self.unexpected_keys:
            lines.append(f"unexpected ({len(self.unexpected_keys)}): {few(self.unexpected_keys)}")
        if self.mismatched_keys:
            lines.append(
                f"shape mismatch, skipped ({len(self.mismatched_keys)}): "
                + few([f"{k} {tuple(a)} vs {tuple(b)}" for k, a, b in self.mismatched_keys])
            )
        return "; ".join(lines)


def load_state_dict_flexible(model: nn.Module, state_dict: Any, strict: bool = False) -> LoadReport:
    """Load a checkpoint's weights into ``model`` tolerantly.

    ``state_dict`` is a plain state dict or a checkpoint with it under
    ``'model'``/``'state_dict'`` (see :func:`unwrap_state_dict`).  Key prefixes
    ``module.`` (DataParallel/DDP) and ``_orig_mod.`` (``torch.compile``) are
    stripped where the model has no such key.  Tensors whose shape differs from
    the model's are skipped (reported in ``mismatched_keys``) rather than
    raising as :meth:`torch.nn.Module.load_state_dict` would.

    With ``strict=True`` any missing, unexpected or mismatched key raises
    :class:`RuntimeError` and nothing is loaded.  Returns a :class:`LoadReport`.
    """
    sd = unwrap_state_dict(state_dict)
    own = model.state_dict()
    report = LoadReport()
    cleaned: Dict[str, torch.Tensor] = {}
    stripped = set()
    for key, value in sd.items():
        key = str(key)
        changed = True
        while changed and key not in own:
            changed = False
            for p in _STRIP_PREFIXES:
                if key.startswith(p):
                    key = key[len(p):]
                    stripped.add(p)
                    changed = True
        if not isinstance(value, torch.Tensor):
            if isinstance(value, np.ndarray):
                value = torch.from_numpy(value)
            else:
                report.unexpected_keys.append(key)
                continue
        if key not in own:
            report.unexpected_keys.append(key)
        elif tuple(value.shape) != tuple(own[key].shape):
            report.mismatched_keys.append((key, tuple(value.shape), tuple(own[key].shape)))
        else:
            cleaned[key] = value
    report.stripped_prefixes = sorted(stripped)
    mismatched = {m[0] for m in report.mismatched_keys}
    report.missing_keys = [k for k in own if k not in cleaned and k not in mismatched]
    if strict and not report.ok:
        raise RuntimeError(f"state dict does not match {type(model).__name__}: {report}")
    model.load_state_dict(cleaned, strict=False)
    report.loaded_keys = list(cleaned)
    return report
