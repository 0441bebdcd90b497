"""Neural network models (built by name through a registry).

Plain torch modules and functions; nothing here reads files, parses configs or
downloads weights::

    import models
    net = models.create_model("dla34_up", num_classes=1)   # theta1
    clf = models.create_model("dla34_cls")                 # theta2
    models.list_models("dla34*")
    models.get_size_divisor("dla34_up")                  # 32: tile sides must be multiples

Importing this package registers the built-in models (it imports torch and timm).
"""

from .registry import (
    UnknownModelError,
    create_model,
    get_model_entrypoint,
    get_size_divisor,
    is_model,
    list_models,
    register_model,
)
from .utils import LoadReport, load_state_dict_flexible, seed_everything, seed_worker, unwrap_state_dict
from .losses import soft_bce_with_logits, topk_mean_bce
from .dla import DLAClassifier, DLAUpSeg, create_dla_backbone  # registers dla34_up*, dla34_cls*
from .scorenet import ScoreNet  # registers scorenet, scorenet_tiny

__all__ = [
    "UnknownModelError",
    "create_model",
    "get_model_entrypoint",
    "get_size_divisor",
    "is_model",
    "list_models",
    "register_model",
    "LoadReport",
    "load_state_dict_flexible",
    "seed_everything",
    "seed_worker",
    "unwrap_state_dict",
    "soft_bce_with_logits",
    "topk_mean_bce",
    "DLAClassifier",
    "DLAUpSeg",
    "create_dla_backbone",
    "ScoreNet",
]
