"""Name -> constructor registry for models (timm style).

Model constructors register themselves with :func:`register_model` and are
built by name with :func:`create_model`::

    @register_model("dla34_up")
    def dla34_up(**kwargs) -> nn.Module:
        ...

    model = create_model("dla34_up", num_classes=1)

Each model declares the number its input height and width must be a multiple
of (``@register_model("dla34_up", size_divisor=32)``; an int, or a function of
the constructor kwargs when that number depends on them).
:func:`get_size_divisor` reads it without building anything, so a config can
be checked before any training starts; built models carry it as
``model.size_divisor``.

This module is pure Python (no torch import) so that listing the available
names is cheap.  Nothing here ever downloads anything: ``pretrained=True`` is
refused, weights are loaded from local files by the caller (see
:func:`models.utils.load_state_dict_flexible`).
"""

from __future__ import annotations

import difflib
import fnmatch
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

__all__ = [
    "UnknownModelError",
    "register_model",
    "create_model",
    "list_models",
    "is_model",
    "get_model_entrypoint",
    "get_size_divisor",
]

SizeDivisor = Union[int, Callable[..., int]]

_model_entrypoints: Dict[str, Callable[..., Any]] = {}
_model_size_divisors: Dict[str, SizeDivisor] = {}


class UnknownModelError(KeyError, ValueError):
    """Raised for a model name that is not registered.

    Subclasses both :class:`KeyError` and :class:`ValueError` so callers may
    catch either.  ``str()`` gives the plain message (KeyError would quote it).
    """

    def __init__(self, name: str, known: Iterable[str]):
        self.name = name
        self.known = sorted(known)
        self.closest = difflib.get_close_matches(name, self.known, n=3, cutoff=0.5)
        msg = f"Unknown model {name!r}."
        if self.closest:
            msg += " Did you mean " + " or ".join(repr(c) for c in self.closest) + "?"
        msg += " Known models: " + (", ".join(self.known) if self.known else "(none registered)")
        self.message = msg
        super().__init__(msg)

    def __str__(self) -> str:  # KeyError.__str__ would repr() the message
        return self.message

    def __reduce__(self):  # picklable across processes despite the custom __init__
        return (type(self), (self.name, self.known))


def register_model(
    name: Union[str, Callable[..., Any], None] = None,
    *,
    size_divisor: SizeDivisor = 1,
    overwrite: bool = False,
) -> Any:
    """Register a model constructor under ``name``.

    Usable as ``@register_model("name")``, ``@register_model()`` or bare
    ``@register_model`` (the function's ``__name__`` is then the name).
    Registering a second, different constructor under an existing name raises
    :class:`ValueError` unless ``overwrite=True``.

    ``size_divisor``: the input height and width must be multiples of this
    (e.g. 32 for a network with five stride-2 stages; 1 = any size). An int,
    or a cheap function ``(**kwargs) -> int`` of the constructor kwargs.
    """
    if callable(name):  # bare decorator
        return register_model(None, size_divisor=size_divisor, overwrite=overwrite)(name)
    if not callable(size_divisor) and (isinstance(size_divisor, bool) or not isinstance(size_divisor, int)
                                       or size_divisor < 1):
        raise ValueError(f"size_divisor must be an int >= 1 or a function of the model kwargs, got {size_divisor!r}")

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        model_name = name if name is not None else fn.__name__
        if not isinstance(model_name, str) or not model_name:
            raise ValueError(f"model name must be a non-empty string, got {model_name!r}")
        existing = _model_entrypoints.get(model_name)
        if existing is not None and existing is not fn and not overwrite:
            same_def = (
                getattr(existing, "__module__", None) == getattr(fn, "__module__", None)
                and getattr(existing, "__qualname__", None) == getattr(fn, "__qualname__", None)
            )
            if not same_def:  # a module re-import re-registers the same definition: allow
                raise ValueError(
                    f"model {model_name!r} is already registered by "
                    f"{existing.__module__}.{existing.__qualname__}"
                )
        _model_entrypoints[model_name] = fn
        _model_size_divisors[model_name] = size_divisor
        return fn

    return decorator


def get_model_entrypoint(name: str) -> Callable[..., Any]:
    """The registered constructor for ``name`` (:class:`UnknownModelError` if none)."""
    try:
        return _model_entrypoints[name]
    except (KeyError, TypeError):
        raise UnknownModelError(str(name), _model_entrypoints) from None


def get_size_divisor(name: str, **kwargs: Any) -> int:
    """The number the input side of model ``name`` built with ``kwargs`` must be a
    multiple of (builds nothing; :class:`UnknownModelError` for an unknown name)."""
    get_model_entrypoint(name)
    d = _model_size_divisors.get(name, 1)
    if callable(d):
        d = d(**kwargs)
    if isinstance(d, bool) or not isinstance(d, int) or d < 1:
        raise ValueError(f"model {name!r} declares size_divisor {d!r}; expected an int >= 1")
    return d


def create_model(name: str, pretrained: bool = False, **kwargs: Any) -> Any:
    """Build the model registered as ``name`` with constructor ``kwargs``.

    ``pretrained=True`` is refused: this project never downloads weights.
    Load a local checkpoint into the returned model instead.

    The returned module gets the attributes ``model_name`` and
    ``model_kwargs``, so a checkpoint writer can record how to rebuild it, and
    ``size_divisor`` (see :func:`get_size_divisor`) unless it sets its own.
    """
    entry = get_model_entrypoint(name)
    if pretrained:
        raise ValueError(
            "pretrained=True is not supported: nothing is downloaded at run time. "
            "Build the model with pretrained=False and load a local weights file "
            "with models.load_state_dict_flexible()."
        )
    model = entry(**kwargs)
    divisor = get_size_divisor(name, **kwargs)
    try:
        model.model_name = name
        model.model_kwargs = dict(kwargs)
        if not isinstance(getattr(model, "size_divisor", None), int):
            model.size_divisor = divisor
    except Exception:  # pragma: no cover - exotic module types that forbid attributes
        pass
    return model


def list_models(pattern: Optional[str] = None) -> List[str]:
    """Sorted registered names, optionally filtered by an fnmatch ``pattern``
    (e.g. ``"dla34*"``; a pattern without wildcards matches as a substring)."""
    names = sorted(_model_entrypoints)
    if pattern:
        if not any(ch in pattern for ch in "*?["):
            pattern = f"*{pattern}*"
        names = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    return names


def is_model(name: str) -> bool:
    """Whether ``name`` is a registered model."""
    return name in _model_entrypoints
