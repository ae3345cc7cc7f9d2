"""Layer discovery: a registry keyed by ``config.model_type`` (rows read by one walker, or functions) plus a
generic fallback that traces the forward order.

The built-in rows live in their family modules and are registered here explicitly.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch.nn as nn

from .._warnings import warn
from ..layout import Layout, logical_shape
from ..tracing import ExampleInputs
from . import seq2seq, vision
from ._helpers import is_weight_module, output_embeddings
from .generic import generic_layout
from .registry import (LayoutMismatch, get_architecture, list_architectures, register_architecture,
                       unregister_architecture)
from .rows import ArchitectureRow, Blocks, ChainSpec, Single, convnet_row

logger = logging.getLogger("hf_emergence")

#: The built-in rows (peft-style data: adding a model type to a row is one entry in its ``model_types``).
BUILTIN_ROWS: tuple[ArchitectureRow, ...] = (*seq2seq.ROWS, *vision.ROWS)
for _row in BUILTIN_ROWS:
    register_architecture(_row.model_types, _row)

__all__ = ["ArchitectureRow", "BUILTIN_ROWS", "Blocks", "ChainSpec", "LayoutMismatch", "Single", "convnet_row", "discover",
           "generic_layout", "get_architecture", "list_architectures", "register_architecture", "unregister_architecture"]


def model_type_of(model: nn.Module) -> Optional[str]:
    """``model.config.model_type`` for HF models, else ``None``."""
    return getattr(getattr(model, "config", None), "model_type", None)


def discover(model: nn.Module, example_inputs: Optional[ExampleInputs] = None) -> Layout:
    """The :class:`Layout` of ``model``: its registered discovery, else the generic fallback.

    Any class of a registered ``model_type`` (a standalone ``BartDecoder`` too) uses the registered layout.
    If it finds a structure that contradicts the config (a customised model), the fallback is used and a
    warning names the mismatch. Members that name no parameter of the model are dropped with a warning,
    and every >= 2-d parameter outside the layout is listed in ``layout.left_out`` with its reason.
    """
    model_type = model_type_of(model)
    fn = get_architecture(model_type)
    layout = None
    if fn is not None:
        try:
            layout = fn(model)
        except LayoutMismatch as err:
            warn(f"{err}; falling back to generic discovery")
    if layout is None:
        layout = generic_layout(model, example_inputs)
        logger.info("model_type %r is not registered; generic discovery (%s) found %d weight layers",
                    model_type, layout.source, len(layout.members()))
    return complete_left_out(model, layout)


def complete_left_out(model: nn.Module, layout: Layout) -> Layout:
    """Drop members that are no parameter of ``model`` and list every >= 2-d parameter outside ``layout``."""
    param_of = {n: p for n, p in model.named_parameters(remove_duplicate=False)}
    unknown = [m.param for m in layout.members() if m.param not in param_of]
    if unknown:
        warn(f"{len(unknown)} weight(s) found by discovery are not parameters of {type(model).__name__} "
             f"({', '.join(unknown[:3])}); they are left out")
        for chain in layout.chains:
            for block in chain.blocks:
                block.members = [m for m in block.members if m.param in param_of]
            chain.blocks = [b for b in chain.blocks if b.members]
        layout.left_out.extend((n, "not a parameter of the model (unknown structure)") for n in unknown)
    planned = {id(param_of[m.param]) for m in layout.members() if m.param in param_of}
    listed = {n for n, _ in layout.left_out}
    modules = dict(model.named_modules(remove_duplicate=False))
    head = output_embeddings(model)
    for name, p in param_of.items():  # every name, tied ones too, so that tying never changes the list
        if len(logical_shape(p)) < 2 or id(p) in planned or name in listed:
            continue
        owner = modules.get(name.rsplit(".", 1)[0] if "." in name else "")
        if isinstance(owner, nn.Embedding):
            reason = "embedding (never scaled)"
        elif owner is not None and owner is head:
            reason = "output embedding (LM head)"
        elif is_weight_module(owner) and layout.source.startswith("registry"):
            reason = f"outside the registered layout ({layout.source}: stem, pooler, head)"
        elif is_weight_module(owner):
            reason = "outside the repeated blocks (embeddings, stem, pooler, head)"
        else:
            reason = f"not a Linear/Conv weight ({type(owner).__name__}.{name.rsplit('.', 1)[-1]}: a table, token or custom parameter)"
        layout.left_out.append((name, reason))
    return layout

