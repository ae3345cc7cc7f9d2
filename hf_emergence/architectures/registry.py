"""Registry of layer-discovery functions keyed by ``config.model_type``.

A discovery function takes a model (possibly on the meta device) and returns a :class:`Layout`. It
must only read names, shapes and the config, never tensor data. Register one with the decorator::

    @register_architecture("my_model")
    def my_model_layout(model) -> Layout: ...

or ``register_architecture("my_model", my_model_layout)``. Model types without an entry go through
the generic fallback (forward-order tracing), see :mod:`hf_emergence.architectures.generic`.
"""

from __future__ import annotations

import fnmatch
from typing import Callable, Iterable, Optional, Union

import torch.nn as nn

from ..layout import Layout

ArchitectureFn = Callable[[nn.Module], Layout]
_REGISTRY: dict[str, ArchitectureFn] = {}


class LayoutMismatch(ValueError):
    """A registered discovery function found a structure that does not match the model's config."""


def register_architecture(
    model_type: Union[str, Iterable[str]], fn: Optional[ArchitectureFn] = None, *, overwrite: bool = False
) -> Callable:
    """Register ``fn`` as the layer discovery for one or more ``model_type`` values.

    Usable as ``register_architecture("vit", fn)`` or as a decorator ``@register_architecture("vit")``.
    Registering a type twice raises unless ``overwrite=True``.
    """
    types = [model_type] if isinstance(model_type, str) else list(model_type)
    if not types or not all(isinstance(t, str) and t for t in types):
        raise TypeError(f"model_type must be a non-empty string or list of strings, got {model_type!r}")

    def decorate(func: ArchitectureFn) -> ArchitectureFn:
        if not callable(func):
            raise TypeError(f"register_architecture expects a callable, got {type(func).__name__}")
        for t in types:
            if t in _REGISTRY and not overwrite and _REGISTRY[t] is not func:
                raise ValueError(
                    f"model_type {t!r} is already registered to {_REGISTRY[t].__module__}.{_REGISTRY[t].__qualname__}; "
                    "pass overwrite=True to replace it"
                )
        for t in types:
            _REGISTRY[t] = func
        return func

    return decorate(fn) if fn is not None else decorate


def unregister_architecture(model_type: str) -> None:
    """Remove a registration (mainly for tests and notebooks)."""
    _REGISTRY.pop(model_type, None)


def get_architecture(model_type: Optional[str]) -> Optional[ArchitectureFn]:
    """The discovery function registered for ``model_type``, or ``None``."""
    return _REGISTRY.get(model_type) if model_type else None


def list_architectures(filter: str = "", exclude: str = "") -> list[str]:
    """Sorted registered model types, optionally filtered by fnmatch patterns."""
    names = sorted(_REGISTRY)
    if filter:
        names = [n for n in names if fnmatch.fnmatch(n, filter)]
    if exclude:
        names = [n for n in names if not fnmatch.fnmatch(n, exclude)]
    return names
