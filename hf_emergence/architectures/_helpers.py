"""Small helpers shared by the per-family discovery functions (names and shapes only, no data)."""

from __future__ import annotations

import re
from typing import Iterator, Optional, Sequence

import torch.nn as nn

from ..layout import Block, Member, logical_shape, member_for
from .registry import LayoutMismatch

WEIGHT_MODULE_TYPES: tuple[type, ...] = (nn.Linear, nn.modules.conv._ConvNd)


def is_weight_module(module: nn.Module) -> bool:
    """Linear / ConvNd / ConvTransposeNd / transformers' Conv1D, and a custom ``*Linear`` with a 2-d ``weight``
    Parameter (I-BERT's ``QuantLinear``): the modules whose ``weight`` is a layer."""
    if isinstance(module, WEIGHT_MODULE_TYPES):
        return True
    cls = type(module)
    if cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers."):
        return True
    weight = getattr(module, "weight", None)
    return cls.__name__.endswith("Linear") and isinstance(weight, nn.Parameter) and weight.ndim == 2


def output_embeddings(model: nn.Module) -> Optional[nn.Module]:
    """The model's LM head (``get_output_embeddings()``), or ``None``."""
    try:
        return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    except (AttributeError, NotImplementedError, TypeError):
        return None


def iter_weight_modules(root: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(full name, module) of every weight module under ``root`` that owns a 2-D+ ``weight``."""
    for name, module in root.named_modules():
        weight = getattr(module, "weight", None)
        if is_weight_module(module) and isinstance(weight, nn.Parameter) and len(logical_shape(weight)) >= 2:
            yield (f"{prefix}.{name}" if prefix and name else prefix or name), module


def find_blocks(model: nn.Module, pattern: str) -> list[tuple[str, nn.Module]]:
    """Modules whose full name matches ``pattern`` (``re.fullmatch``), in registration (= chain) order."""
    rx = re.compile(pattern)
    return [(n, m) for n, m in model.named_modules() if n and rx.fullmatch(n)]


def ordered_block(name: str, module: nn.Module, forward_order: Sequence[str] = (),
                  roles: Optional[dict[str, str]] = None) -> Block:
    """A :class:`Block` with the weight modules under ``module``.

    ``forward_order`` lists relative module names (regexes, fullmatch) in the order they run; members
    are sorted by the first pattern they match, unmatched ones keep registration order at the end.
    ``roles`` optionally forces a role for relative names matching a regex key.
    """
    patterns = [re.compile(p) for p in forward_order]
    role_rules = [(re.compile(k), v) for k, v in (roles or {}).items()]
    found: list[tuple[int, int, Member]] = []
    for i, (rel, sub) in enumerate(iter_weight_modules(module)):
        rank = next((j for j, p in enumerate(patterns) if p.fullmatch(rel)), len(patterns))
        role = next((r for rx, r in role_rules if rx.fullmatch(rel)), None)
        full = f"{name}.{rel}" if rel else name
        found.append((rank, i, member_for(full, sub, role=role, relative_name=rel or full)))
    return Block(name=name, members=[m for _, _, m in sorted(found, key=lambda t: (t[0], t[1]))])


def single_block(model: nn.Module, name: str, role: Optional[str] = None) -> Optional[Block]:
    """A one-member block for the weight module at ``name`` (stem, classifier), or None if absent."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return None
    if not is_weight_module(module):
        return None
    return Block(name=name, members=[member_for(name, module, role=role)])


def check_count(found: int, expected: Optional[int], what: str, model_type: str) -> None:
    """Raise :class:`LayoutMismatch` when a registry layout disagrees with the config."""
    if expected is not None and found != expected:
        raise LayoutMismatch(
            f"the {model_type!r} layout found {found} {what} but the config says {expected}; the model's structure "
            "differs from the registered one (register your own with hf_emergence.register_architecture)"
        )
