"""Optional experiment tracking for ``em-round`` (``--tracker tensorboard|mlflow``; off by default).

A tracker receives each finished round's metrics (the content of
``RUN/round_k/metrics.json``) through :class:`pipeline.em.EMHooks` ``on_round_end``
and logs every number in it:

* round-level values (``stage2_loss``, ``val/auc``, ``val/specificity_at_full_sensitivity``,
  ``e_step/...`` statistics, ``time_s/...``) at step = round;
* per-epoch training histories (``seg/epochs``, ``stage2/epochs``: the losses of each
  epoch) as ``round_k/<step>/<key>`` at step = epoch.

TensorBoard writes event files into ``RUN/tensorboard`` (``torch.utils.tensorboard``,
which needs the ``tensorboard`` package: ``pip install 'wsi-pipeline[tensorboard]'``);
MLflow logs to the tracking URI MLflow is configured with (``MLFLOW_TRACKING_URI``;
MLflow 3's default is ``sqlite:///mlflow.db`` in the working directory, and its plain-folder
store needs ``MLFLOW_ALLOW_FILE_STORE=true``; ``pip install 'wsi-pipeline[mlflow]'``), one
MLflow run per call named after the run directory; a backend MLflow cannot open is one line. Neither is needed for anything else.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Iterator

from pipeline.batch import UsageError

__all__ = ["TRACKERS", "make_tracker", "round_scalars", "epoch_scalars", "Tracker"]

#: ``--tracker`` name -> the package it needs.
TRACKERS = {"tensorboard": "tensorboard", "mlflow": "mlflow"}


def _numbers(prefix: str, value) -> Iterator[tuple[str, float]]:
    if isinstance(value, bool):
        yield prefix, float(value)
    elif isinstance(value, (int, float)):
        if math.isfinite(float(value)):
            yield prefix, float(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            if k not in ("epochs", "slides"):
                yield from _numbers(f"{prefix}/{k}" if prefix else str(k), v)


def round_scalars(metrics: dict) -> dict[str, float]:
    """Every finite number of a round's metrics, by slash-joined key (epoch histories and per-slide lists left out)."""
    return dict(_numbers("", {k: v for k, v in metrics.items() if k != "round"}))


def epoch_scalars(metrics: dict) -> Iterator[tuple[str, int, float]]:
    """``(tag, epoch, value)`` of the per-epoch histories (``seg/epochs``, ``stage2/epochs``)."""
    for step in ("seg", "stage2"):
        for n, ep in enumerate((metrics.get(step) or {}).get("epochs") or []):
            if isinstance(ep, dict):
                e = int(ep.get("epoch", n)) if isinstance(ep.get("epoch", n), (int, float)) else n
                for key, v in _numbers("", {k: v for k, v in ep.items() if k != "epoch"}):
                    yield f"{step}/{key}", e, v


class Tracker:
    """Base: :meth:`log_round` per finished round, :meth:`close` at the end."""

    name = "none"

    def hooks(self):
        from pipeline.em import EMHooks

        return EMHooks(on_round_end=self.log_round)

    def log_round(self, k: int, metrics: dict) -> None:
        for tag, v in round_scalars(metrics).items():
            self.scalar(tag, v, k)
        for tag, epoch, v in epoch_scalars(metrics):
            self.scalar(f"round_{k}/{tag}", v, epoch)
        self.flush()

    def scalar(self, tag: str, value: float, step: int) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(run_dir) / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def scalar(self, tag, value, step):
        self.writer.add_scalar(tag, value, step)

    def flush(self):
        self.writer.flush()

    def close(self):
        self.writer.close()


class MLflowTracker(Tracker):
    name = "mlflow"

    def __init__(self, run_dir: Path):
        import mlflow

        self.mlflow = mlflow
        try:
            self.run = mlflow.start_run(run_name=Path(run_dir).resolve().name)
        except Exception as exc:  # MLflow raises its own and its backends' errors (no database driver, ...)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UsageError(f"--tracker mlflow: cannot start an MLflow run at {mlflow.get_tracking_uri()} ({first}); "
                             "set MLFLOW_TRACKING_URI to a server or database you can write "
                             "(e.g. sqlite:///mlflow.db with the full mlflow package)") from None
        mlflow.set_tag("wsi_pipeline.run_dir", str(Path(run_dir).resolve()))

    def scalar(self, tag, value, step):
        self.mlflow.log_metric(tag, value, step=step)

    def close(self):
        self.mlflow.end_run()


def make_tracker(name: str | None, run_dir: str | Path) -> Tracker | None:
    """The tracker for ``--tracker NAME`` (None for ``none``); :class:`UsageError` naming the extra to
    install when its package is missing."""
    if name in (None, "", "none"):
        return None
    if name not in TRACKERS:
        raise UsageError(f"--tracker {name!r}: choose one of none, {', '.join(TRACKERS)}")
    if importlib.util.find_spec(TRACKERS[name]) is None:
        raise UsageError(f"--tracker {name} needs the {TRACKERS[name]} package: pip install 'wsi-pipeline[{name}]'")
    return (TensorBoardTracker if name == "tensorboard" else MLflowTracker)(Path(run_dir))
