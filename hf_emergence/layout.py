"""What layer discovery returns: the weight tensors of a model grouped into ordered chains of blocks.

A :class:`Layout` is pure structure (names, roles, fans), never tensor data, so it can be built for
a model on the meta device. The planner turns it into exponents:

* ``layer_unit="block"``: each block is one layer of the schedule (a Transformer block, a residual
  block); every scaled tensor in block l is multiplied by alpha**k_l.
* ``layer_unit="matrix"``: every scaled tensor is its own layer, in forward order (a conv / MLP layer);
  a ``shortcut`` member (1x1 projection beside a residual branch) and a ``parallel`` member (a branch
  reading the same input as the member before it, its output summed with that one's) share the exponent
  of the member before them instead of taking a slot of their own.

Blocks may carry a ``stage`` label (a stage of a hierarchical model: Swin, PVT, ResNet);
``chain="stage"`` numbers each stage on its own (:meth:`Layout.stage_chains`). ``left_out`` lists every
weight-bearing (>= 2-d) parameter the layout leaves alone, with the reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

# Roles of a weight tensor. Attention roles decide what the ``attention`` setting scales.
ATTN_Q, ATTN_K, ATTN_V, ATTN_O, ATTN_QKV = "attn_q", "attn_k", "attn_v", "attn_o", "attn_qkv"
FFN, CONV, LINEAR, SHORTCUT = "ffn", "conv", "linear", "shortcut"
#: The router of a mixture-of-experts block: scaling it changes the routing softmax's temperature, so it
#: keeps its scale under every ``attention`` setting, like Q/K under "vo".
ROUTER = "router"
ROLES = (ATTN_Q, ATTN_K, ATTN_V, ATTN_O, ATTN_QKV, FFN, CONV, LINEAR, SHORTCUT, ROUTER)
ATTENTION_ROLES = frozenset({ATTN_Q, ATTN_K, ATTN_V, ATTN_O, ATTN_QKV})

#: ``attention`` setting -> roles that keep their scale (still re-initialised by the base init).
#: "vo" (default): scaling Q and K multiplies the attention logits by alpha**(2k), a softmax temperature
#: change, so they are left alone; V and O act linearly on the residual stream and are scaled.
#: "none": attention untouched, only feed-forward matrices (the follow-up paper's reading).
#: "all": every matrix in the block, Q/K included.
UNSCALED_ROLES = {
    "vo": frozenset({ATTN_Q, ATTN_K, ATTN_QKV, ROUTER}),
    "none": frozenset({ATTN_Q, ATTN_K, ATTN_V, ATTN_O, ATTN_QKV, ROUTER}),
    "all": frozenset({ROUTER}),
}
LAYER_UNITS = ("block", "matrix")

_ATTENTION_SCOPE = re.compile(r"(?i)(^|\.)[a-z_]*(attn|attention)[a-z_]*(\.|$)")
_ROLE_BY_LEAF = (
    (re.compile(r"(?i)^(q|q_proj|query|q_lin|wq|to_q|q_proj_weight)$"), ATTN_Q),
    (re.compile(r"(?i)^(k|k_proj|key|k_lin|wk|to_k|k_proj_weight)$"), ATTN_K),
    (re.compile(r"(?i)^(v|v_proj|value|v_lin|wv|to_v|v_proj_weight)$"), ATTN_V),
    (re.compile(r"(?i)^(qkv|c_attn|query_key_value|queries_keys_values|wqkv|to_qkv|in_proj|in_proj_weight|qkv_proj)$"), ATTN_QKV),
)
# Leaves that only wrap a layer (LeViT's ``queries_keys_values.linear``): the name above them says what it is.
_WRAPPER_LEAVES = frozenset({"linear", "dense", "conv", "layer", "module"})
# A torchvision-style ``downsample.0`` (Sequential(conv, norm) beside a residual branch) is a shortcut by name;
# a ``downsample`` module on the main path (Swin's patch merging, timm's stage downsample) is not.
_SHORTCUT = re.compile(r"(?i)(^|\.)(shortcut|skip|residual_proj)(\.|$)|(^|\.)downsample\.\d+$")


@dataclass(frozen=True)
class Member:
    """One weight tensor: ``param`` is its full parameter name, ``role`` one of :data:`ROLES`.

    ``fan_in``/``fan_out`` are the module's true fans (a transformers ``Conv1D`` stores its weight
    transposed, so they cannot be read off the shape; for fused MoE experts they are one expert's); the
    base initialisers use them. ``init`` overrides the plan's base init for this tensor ("keep" for the
    magnitude of a weight-normed layer). ``parallel``: a branch beside the member before it (see above).
    """

    param: str
    role: str
    fan_in: int
    fan_out: int
    init: Optional[str] = None
    parallel: bool = False

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role={self.role!r} for {self.param!r} is not one of {', '.join(ROLES)}")


@dataclass
class Block:
    """A group of members that counts as one layer when ``layer_unit="block"``, in stage ``stage``."""

    name: str
    members: list[Member] = field(default_factory=list)
    stage: Optional[str] = None


@dataclass
class Chain:
    """An independently numbered sequence of blocks (an encoder, a decoder, or the whole model)."""

    name: str
    blocks: list[Block] = field(default_factory=list)


@dataclass
class Layout:
    """Discovery result: chains in forward order plus the architecture's defaults.

    ``source`` says how the layout was found ("registry:marian", "traced", "registration-order"),
    so a plan can tell the user what it relied on; ``order`` how the forward order was known ("registry",
    a trace route of :mod:`hf_emergence.tracing`: "model", "fake", "meta", "rebuilt", or
    "registration-order"). ``left_out``: (parameter, reason) for each >= 2-d parameter not in a chain.
    """

    chains: list[Chain]
    layer_unit: str
    base_init: str
    source: str
    notes: list[str] = field(default_factory=list)
    left_out: list[tuple[str, str]] = field(default_factory=list)
    order: str = "registry"

    def members(self) -> list[Member]:
        return [m for c in self.chains for b in c.blocks for m in b.members]

    def stage_chains(self) -> list[Chain]:
        """The chains cut at stage boundaries (``chain="stage"``); a chain with fewer than two stages stays whole.

        A block without a stage label (a stem, a between-stage layer) joins the stage of the next labelled
        block, else of the previous one.
        """
        out: list[Chain] = []
        for chain in self.chains:
            labels = [b.stage for b in chain.blocks]
            if len({s for s in labels if s is not None}) < 2:
                out.append(chain)
                continue
            for i in range(len(labels) - 1, -1, -1):  # fill from the next labelled block
                if labels[i] is None and i + 1 < len(labels):
                    labels[i] = labels[i + 1]
            for i in range(1, len(labels)):  # the tail after the last labelled block: the previous one
                if labels[i] is None:
                    labels[i] = labels[i - 1]
            pieces: list[Chain] = []
            for block, label in zip(chain.blocks, labels):
                if pieces and pieces[-1].name == label:
                    pieces[-1].blocks.append(block)
                else:
                    pieces.append(Chain(label, [block]))
            out.extend(pieces)
        taken: dict[str, int] = {}
        for chain in out:  # a stage met twice (interleaved) gets a numbered second chain
            taken[chain.name] = taken.get(chain.name, 0) + 1
            if taken[chain.name] > 1:
                chain.name = f"{chain.name}#{taken[chain.name]}"
        return out


def role_from_name(relative_name: str, is_conv: bool = False) -> str:
    """Classify a weight by its module path (relative to its block).

    Inside an attention scope (a path component containing "attn"/"attention"), q/k/v/fused-qkv are
    recognised by the leaf name and anything else (out_proj, o, output.dense, c_proj) is the output
    projection. Outside attention: shortcut projections by name, then conv or feed-forward.
    """
    parts = relative_name.split(".")
    leaf = parts[-2] if len(parts) > 1 and parts[-1].lower() in _WRAPPER_LEAVES else parts[-1]
    if _ATTENTION_SCOPE.search(relative_name):
        for pattern, role in _ROLE_BY_LEAF:
            if pattern.match(leaf):
                return role
        return ATTN_O
    if _SHORTCUT.search(relative_name):
        return SHORTCUT
    return CONV if is_conv else FFN


def conv_fans(shape: tuple[int, ...], groups: int = 1) -> tuple[int, int]:
    """(fan_in, fan_out) of a ConvNd / Linear weight of shape (out, in/groups, *kernel)."""
    receptive = 1
    for s in shape[2:]:
        receptive *= s
    return shape[1] * receptive, shape[0] * receptive


def logical_shape(param: "object") -> tuple[int, ...]:
    """The full shape of a parameter, also when DeepSpeed ZeRO-3 has partitioned it (data empty, ``ds_shape`` set)."""
    ds_shape = getattr(param, "ds_shape", None)
    return tuple(ds_shape) if ds_shape is not None else tuple(param.shape)


def member_for(name: str, module: "object", param_name: str = "weight", role: Optional[str] = None,
               relative_name: Optional[str] = None) -> Member:
    """Build a :class:`Member` for ``module.<param_name>``, computing fans from the module type."""
    import torch.nn as nn

    param = getattr(module, param_name)
    shape = logical_shape(param)
    is_conv = isinstance(module, nn.modules.conv._ConvNd)
    if _is_hf_conv1d(module):  # transformers.pytorch_utils.Conv1D: weight is (in, out)
        fan_in, fan_out = shape[0], shape[1]
    elif isinstance(module, nn.MultiheadAttention):  # fused in_proj_weight (3d, d): fans of one d -> d projection
        fan_in, fan_out = shape[1], shape[1]
    else:
        fan_in, fan_out = conv_fans(shape) if len(shape) >= 2 else (shape[0], shape[0])
    if role is None:
        role = role_from_name(relative_name if relative_name is not None else name, is_conv=is_conv)
    full = f"{name}.{param_name}" if name else param_name
    return Member(param=full, role=role, fan_in=int(fan_in), fan_out=int(fan_out))


def _is_hf_conv1d(module: object) -> bool:
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.")
