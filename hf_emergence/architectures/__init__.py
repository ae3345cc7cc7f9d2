"""Layer discovery: a registry keyed by ``config.model_type`` plus a generic fallback.

Built-in families are registered by decorator in their own modules and imported here explicitly.
"""

from __future__ import annotations

import logging
from typing import Optional

from .._warnings import warn
import torch.nn as nn

from ..layout import Layout
from ..tracing import ExampleInputs
from . import seq2seq, vision  # noqa: F401  (registers the built-in families)
from .generic import generic_layout
from .registry import (LayoutMismatch, get_architecture, list_architectures, register_architecture,
                       unregister_architecture)

logger = logging.getLogger("hf_emergence")

__all__ = ["discover", "generic_layout", "get_architecture", "list_architectures", "register_architecture",
           "unregister_architecture", "LayoutMismatch"]


def model_type_of(model: nn.Module) -> Optional[str]:
    """``model.config.model_type`` for HF models, else ``None``."""
    return getattr(getattr(model, "config", None), "model_type", None)


def discover(model: nn.Module, example_inputs: Optional[ExampleInputs] = None) -> Layout:
    """The :class:`Layout` of ``model``: its registered discovery function, else the generic fallback.

    If a registered function finds a structure that contradicts the config (a customised model), the
    fallback is used and a warning names the mismatch.
    """
    model_type = model_type_of(model)
    fn = get_architecture(model_type)
    if fn is not None:
        try:
            return fn(model)
        except LayoutMismatch as err:
            warn(f"{err}; falling back to generic discovery")
    layout = generic_layout(model, example_inputs)
    logger.info("model_type %r is not registered; generic discovery (%s) found %d weight layers",
                model_type, layout.source, len(layout.members()))
    return layout
