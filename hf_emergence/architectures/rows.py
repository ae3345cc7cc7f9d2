"""Discovery as data: a registered architecture is a row (where its blocks are, which members in which
order, which base init and layer unit, which config fields give the counts) read by one walker.

    ROW = ArchitectureRow(
        name="bart_like", model_types=("bart", "marian"), base_init="xavier_uniform", layer_unit="block",
        chains=(ChainSpec("encoder", (Blocks(r"encoder\\.layers\\.\\d+", order=(r"self_attn\\.q_proj", ...),
                                             count="encoder_layers"),)),
                ChainSpec("decoder", (Blocks(r"decoder\\.layers\\.\\d+", ..., count="decoder_layers"),))),
        description="...")
    register_architecture(ROW.model_types, ROW)       # a row is a discovery function

A chain's parts are :class:`Blocks` (each matching module is one block; its weight modules are members,
sorted by ``order``) and :class:`Single` (one weight module: a stem, a between-stage conv, a classifier),
taken together in registration order, which is forward order for every row here. Paths are regexes
matched against full module names after any prefix (``model.``, ``resnet.``). A model that is itself
one chain (a standalone ``BartDecoder``, a ``T5Stack``) is matched as if it sat under that chain's name.
Anything a row cannot say stays a function: ``register_architecture(model_type, fn)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Optional, Union

import torch.nn as nn

from ..layout import LINEAR, Block, Chain, Layout, member_for
from ._helpers import check_count, is_weight_module, ordered_block
from .registry import LayoutMismatch


@dataclass(frozen=True)
class Blocks:
    """Repeated blocks: every module whose name matches ``path``.

    ``order``: member names relative to the block (regexes, fullmatch) in forward order; ``roles``: forced
    roles by relative name; ``count``: config field(s) holding the number of blocks (a list value, such as
    ``depths``, is summed); ``stage``: regex of the path prefix shared by one stage's blocks.
    """

    path: str
    order: tuple[str, ...] = ()
    roles: Union[Mapping[str, str], tuple[tuple[str, str], ...]] = ()
    count: Union[str, tuple[str, ...], None] = None
    stage: Optional[str] = None

    def __post_init__(self) -> None:  # a dict of roles is stored as pairs, so that rows stay hashable
        if isinstance(self.roles, Mapping):
            object.__setattr__(self, "roles", tuple(self.roles.items()))


@dataclass(frozen=True)
class Single:
    """One weight module (``path`` a regex) as a block of its own, with an optional forced role."""

    path: str
    role: Optional[str] = None


@dataclass(frozen=True)
class ChainSpec:
    """A chain (``name``) built from its parts, in registration order."""

    name: str
    parts: tuple[Union[Blocks, Single], ...]


@dataclass(frozen=True, eq=False)
class ArchitectureRow:
    """One row of the registry: ``model_types`` share the chains, base init and layer unit."""

    name: str
    model_types: tuple[str, ...]
    chains: tuple[ChainSpec, ...]
    base_init: str
    layer_unit: str
    description: str

    def __call__(self, model: nn.Module) -> Layout:
        return walk(self, model)


def convnet_row(model_type: str, stem: str, blocks: Blocks, classifier: str, description: str,
                between: tuple[Single, ...] = ()) -> ArchitectureRow:
    """A ConvNet's row: stem conv, (between-stage convs and) blocks in registration order, classifier;
    Kaiming-normal base init, one layer per conv (``layer_unit="matrix"``)."""
    parts = (Single(stem), *between, blocks, Single(classifier, role=LINEAR))
    return ArchitectureRow(name=model_type, model_types=(model_type,), chains=(ChainSpec("model", parts),),
                           base_init="kaiming_normal", layer_unit="matrix", description=description)


def _stack_name(model: nn.Module) -> Optional[str]:
    """"encoder"/"decoder" when ``model`` is itself one stack (``BartDecoder``, ``T5Stack``), else ``None``."""
    name = type(model).__name__
    if name.endswith("Decoder") or name.endswith("Encoder"):
        return name[-7:].lower()
    if name.endswith("Stack"):
        return "decoder" if getattr(getattr(model, "config", None), "is_decoder", False) else "encoder"
    return None


def _expected(config: object, count: Union[str, tuple[str, ...], None]) -> Optional[int]:
    for name in ((count,) if isinstance(count, str) else count or ()):
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)):
            return sum(value)
        if isinstance(value, int):
            return value
    return None


def walk(row: ArchitectureRow, model: nn.Module) -> Layout:
    """The :class:`Layout` ``row`` describes for ``model``; :class:`LayoutMismatch` when it does not fit."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", row.name)
    stack = _stack_name(model)
    modules = list(model.named_modules())
    chains = []
    for spec in row.chains:
        rules = [(re.compile(rf"(?:.*\.)?{part.path}"), part) for part in spec.parts]
        found: dict[int, list[Block]] = {i: [] for i in range(len(spec.parts))}
        ordered: list[Block] = []
        inside: list[str] = []
        for name, module in modules:
            if not name or any(name.startswith(p + ".") for p in inside):
                continue
            virtual = f"{stack}.{name}" if stack and not name.startswith(f"{spec.name}.") else name
            hit = next(((i, part) for i, (rx, part) in enumerate(rules) if rx.fullmatch(virtual) or rx.fullmatch(name)), None)
            if hit is None:
                continue
            i, part = hit
            if isinstance(part, Blocks):
                block = ordered_block(name, module, part.order, dict(part.roles))
                block.stage = _stage(name, part.stage)
                inside.append(name)
            elif is_weight_module(module):
                block = Block(name, [member_for(name, module, role=part.role)])
            else:
                continue
            found[i].append(block)
            ordered.append(block)
        if not any(found[i] for i, p in enumerate(spec.parts) if isinstance(p, Blocks)):
            continue
        for i, part in enumerate(spec.parts):
            if isinstance(part, Blocks):
                check_count(len(found[i]), _expected(config, part.count), f"{spec.name} blocks" if part.count else "blocks",
                            model_type)
        chains.append(Chain(spec.name, ordered))
    if not chains:
        paths = ", ".join(p.path.replace("\\", "") for s in row.chains for p in s.parts if isinstance(p, Blocks))
        raise LayoutMismatch(f"no blocks ({paths}) found in this {model_type!r} model")
    return Layout(chains=chains, layer_unit=row.layer_unit, base_init=row.base_init, source=f"registry:{model_type}")


def _stage(name: str, pattern: Optional[str]) -> Optional[str]:
    if pattern is None:
        return None
    m = re.match(rf"((?:.*\.)?{pattern})\.", name)
    return m.group(1) if m else None
