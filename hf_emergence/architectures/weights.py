"""Which tensors of a model are weight layers, with their roles and fans, and why the others are not.

* Linear / ConvNd / ConvTransposeNd / transformers ``Conv1D``: ``weight``.
* ``nn.MultiheadAttention``: ``in_proj_weight`` (or ``q/k/v_proj_weight``) and ``out_proj.weight``, run by
  the attention module (which calls ``out_proj``'s weight directly).
* Weight-normed layers (``torch.nn.utils.parametrizations.weight_norm``, or the older hook version): the
  effective weight is g * v / ||v||, so scaling the magnitude g (``parametrizations.weight.original0``,
  ``weight_g``) by alpha**k scales the effective weight by alpha**k. Both g and v keep their own
  initialisation (``init="keep"``): a redraw of v alone would be undone by the normalisation, and g = ||v||
  needs v's values, which a per-tensor, per-shard plan does not read. The direction v is listed as left out.
  Any other parametrization is left out with a warning, never a crash.
* Fused mixture-of-experts weights (3-d ``(experts, out, in)`` parameters of an experts module, e.g.
  ``mlp.experts.gate_up_proj`` / ``down_proj``): the experts are parallel branches of one block, so each
  tensor is one member (every expert gets the block's exponent) with the fans of one expert; transformers'
  ``is_transposed`` experts store ``(experts, in, out)``. Their routers (``gate``, ``router``) keep their
  scale (role ``router``): scaling a router changes its softmax temperature.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch.nn as nn

from .._warnings import warn
from ..layout import (ATTENTION_ROLES, ATTN_O, ATTN_QKV, FFN, ROUTER, Member, conv_fans, logical_shape, member_for,
                      role_from_name)
from ._helpers import is_weight_module, output_embeddings

_ROUTER_NAME = re.compile(r"(?i)^(gate|wg|router|moe_gate)$|_gate$|router")
_EXPERTS_NAME = re.compile(r"(?i)experts?$")
_DOWN_NAME = re.compile(r"(?i)(down|w2|fc2|wo|out)")
# A class that is an attention module, not a block holding one (``LevitAttention``, not ``SamTwoWayAttentionBlock``).
_ATTENTION_CLASS = re.compile(r"(?i)attention")
_BLOCK_CLASS = re.compile(r"(?i)(block|layer|encoder|decoder|model|stage)")


@dataclass(frozen=True)
class Candidate:
    """A weight ``member``; ``owner`` names the module it belongs to (for block membership) and ``runner``
    is the module whose call the forward trace watches for it."""

    owner: str
    runner: nn.Module
    member: Member


def _hidden_size(model: nn.Module) -> Optional[int]:
    config = getattr(model, "config", None)
    for cfg in (config, getattr(config, "text_config", None)):
        value = getattr(cfg, "hidden_size", None)
        if isinstance(value, int):
            return value
    return None


def is_experts(name: str, module: nn.Module) -> bool:
    """A module holding fused expert weights: 3-d parameters of its own, named or typed as experts."""
    if is_weight_module(module):
        return False
    own = [p for p in module.parameters(recurse=False) if len(logical_shape(p)) >= 3]
    return bool(own) and ("expert" in type(module).__name__.lower() or bool(_EXPERTS_NAME.search(name.rsplit(".", 1)[-1])))


def expert_fans(module: nn.Module, param_name: str, shape: tuple[int, ...], hidden: Optional[int]) -> tuple[int, int]:
    """(fan_in, fan_out) of one expert of a fused ``(experts, a, b)`` weight.

    transformers' experts say ``is_transposed`` ((experts, in, out), as ``x @ W``); otherwise (experts, out,
    in), as ``F.linear``, unless the hidden size shows the other layout (a down projection outputs it).
    """
    a, b = shape[-2], shape[-1]
    receptive = 1
    for s in shape[1:-2]:
        receptive *= s
    transposed = getattr(module, "is_transposed", None)
    if transposed is None and hidden is not None and a != b:
        down = bool(_DOWN_NAME.search(param_name))
        transposed = (b == hidden) if down else (a == hidden)
    return (a, b) if transposed else (b, a)


def candidates(model: nn.Module) -> tuple[list[Candidate], list[tuple[str, str]]]:
    """Every weight of ``model`` as a :class:`Candidate`, in registration order, and (param, reason) for the
    weight-like tensors that are not candidates (tied embeddings, weight-norm directions, ...)."""
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = output_embeddings(model)
    unsaved = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_save", None) or [])]
    mha_children = {id(m.out_proj): n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    modules = dict(model.named_modules())
    routers = _routers(model)
    hidden = _hidden_size(model)
    attention = [n for n, m in model.named_modules() if n and _ATTENTION_CLASS.search(type(m).__name__)
                 and not _BLOCK_CLASS.search(type(m).__name__)]

    out: list[Candidate] = []
    left_out: list[tuple[str, str]] = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, nn.MultiheadAttention):
            params = ["in_proj_weight"] if module.in_proj_weight is not None else ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
            for p in params:
                out.append(Candidate(name, module, member_for(name, module, p, role=ATTN_QKV if p == "in_proj_weight" else None,
                                                               relative_name=f"{name}.{p}")))
            continue
        if is_experts(name, module):
            for pname, p in module.named_parameters(recurse=False):
                shape = logical_shape(p)
                if len(shape) >= 3:
                    fan_in, fan_out = expert_fans(module, pname, shape, hidden)
                    out.append(Candidate(name, module, Member(prefix + pname, FFN, fan_in, fan_out)))
                elif len(shape) == 2:
                    left_out.append((prefix + pname, "bias of fused experts (biases are never scaled)"))
            continue
        if id(module) in routers and not is_weight_module(module):
            weight = getattr(module, "weight", None)
            if isinstance(weight, nn.Parameter) and len(logical_shape(weight)) == 2:
                shape = logical_shape(weight)
                out.append(Candidate(name, module, Member(prefix + "weight", ROUTER, shape[1], shape[0])))
            continue
        if not is_weight_module(module):
            continue
        if module is head:
            left_out.append((prefix + "weight", "output embedding (LM head)"))
            continue
        member = _weight_member(name, module, left_out, _role_name(name, attention))
        if member is None:
            continue
        weight = getattr(module, "weight", None)
        if weight is not None and id(weight) in embedding_params:
            left_out.append((member.param, "tied to an embedding"))
            continue
        if any(rx.search(member.param) for rx in unsaved):
            left_out.append((member.param, "not saved in checkpoints (_keys_to_ignore_on_save)"))
            continue
        if id(module) in routers:
            member = Member(member.param, ROUTER, member.fan_in, member.fan_out, member.init)
        runner_name = mha_children.get(id(module))
        if runner_name is not None:
            member = Member(member.param, ATTN_O, member.fan_in, member.fan_out)
        out.append(Candidate(runner_name or name, modules[runner_name] if runner_name else module, member))
    return out, left_out


def _role_name(name: str, attention: list[str]) -> str:
    """The name to read a role from: inside a module whose class is an attention (LeViT's ``LevitAttention``
    at ``layers.0.module``) but whose path does not say so, the path below it under an ``attention.`` scope."""
    holder = max((a for a in attention if name.startswith(a + ".")), key=len, default=None)
    if holder is None or role_from_name(name) in ATTENTION_ROLES:
        return name
    return "attention." + name[len(holder) + 1:]


def _weight_member(name: str, module: nn.Module, left_out: list[tuple[str, str]], role_name: str) -> Optional[Member]:
    """The member of a Linear/Conv module's weight, through a weight norm; ``None`` (listed) when unknown."""
    from torch.nn.utils import parametrize

    prefix = f"{name}." if name else ""
    if parametrize.is_parametrized(module, "weight"):
        plist = module.parametrizations.weight
        if len(plist) == 1 and type(plist[0]).__name__ == "_WeightNorm":
            shape = logical_shape(plist.original1)
            fan_in, fan_out = conv_fans(shape) if len(shape) >= 2 else (shape[0], shape[0])
            left_out.append((prefix + "parametrizations.weight.original1",
                             "weight-norm direction (its magnitude original0 carries the layer's factor)"))
            return Member(prefix + "parametrizations.weight.original0", _role(role_name, module), fan_in, fan_out, init="keep")
        kinds = ", ".join(type(p).__name__ for p in plist)
        warn(f"{prefix}weight is parametrized by {kinds}, which hf_emergence does not know how to scale; it is left out")
        for pname, p in plist.named_parameters():
            if len(logical_shape(p)) >= 2:
                left_out.append((f"{prefix}parametrizations.weight.{pname}", f"unknown parametrization ({kinds})"))
        return None
    weight = getattr(module, "weight", None)
    if isinstance(weight, nn.Parameter):
        return member_for(name, module, relative_name=role_name) if len(logical_shape(weight)) >= 2 else None
    g, v = getattr(module, "weight_g", None), getattr(module, "weight_v", None)
    if isinstance(g, nn.Parameter) and isinstance(v, nn.Parameter):  # torch.nn.utils.weight_norm (hooks)
        fan_in, fan_out = conv_fans(logical_shape(v))
        left_out.append((prefix + "weight_v", "weight-norm direction (its magnitude weight_g carries the layer's factor)"))
        return Member(prefix + "weight_g", _role(role_name, module), fan_in, fan_out, init="keep")
    if weight is not None:
        warn(f"{prefix}weight of {type(module).__name__} is not a Parameter and no known structure; it is left out")
        for pname, p in module.named_parameters(recurse=False):
            if len(logical_shape(p)) >= 2:
                left_out.append((prefix + pname, f"unknown weight structure of {type(module).__name__}"))
    return None


def _role(name: str, module: nn.Module) -> str:
    return role_from_name(name, is_conv=isinstance(module, nn.modules.conv._ConvNd))


def _routers(model: nn.Module) -> set[int]:
    """ids of the router modules of MoE blocks: weight-bearing siblings of an experts module named like a
    gate/router, and everything inside them."""
    found: set[int] = set()
    for name, module in model.named_modules():
        children = dict(module.named_children())
        if not any(is_experts(f"{name}.{c}", m) or (_EXPERTS_NAME.search(c) and isinstance(m, nn.ModuleList))
                   for c, m in children.items()):
            continue
        for child_name, child in children.items():
            if _ROUTER_NAME.search(child_name) and not _EXPERTS_NAME.search(child_name):
                found.update(id(m) for m in child.modules())
    return found
