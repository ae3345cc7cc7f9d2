"""Generic fallback for any ``nn.Module`` whose ``model_type`` is not registered.

1. Candidates: every Linear / ConvNd / transformers ``Conv1D`` weight and ``nn.MultiheadAttention``
   projections, minus weights shared with an embedding (a tied LM head), the HF output embeddings and
   parameters a checkpoint never saves.
2. Order: the order the modules first run in one forward pass on meta tensors (inputs from the HF
   config, from ``example_inputs=``, or inferred from a leading Linear/Conv). Modules that never run
   are left out. If no pass is possible, registration order is used and a warning says so.
3. Shape of the chain:

   * Transformer-like (``nn.ModuleList``s of repeated blocks that contain attention): each list is a
     chain and each block one layer (``layer_unit="block"``), base init Xavier-uniform; weights
     outside the blocks (embeddings, pooler, heads) are left alone, as for registered Transformers.
   * Otherwise (MLPs, ConvNets): one chain of every weight in forward order, each its own layer
     (``layer_unit="matrix"``), base init Kaiming-normal.
"""

from __future__ import annotations

import re
from typing import Optional

from .._warnings import warn
import torch.nn as nn

from ..layout import ATTN_O, ATTN_QKV, ATTN_Q, ATTN_K, ATTN_V, Block, Chain, Layout, Member, logical_shape, member_for
from ..tracing import ExampleInputs, first_call_order
from ._helpers import is_weight_module

_ATTENTION_ROLES = {ATTN_Q, ATTN_K, ATTN_V, ATTN_O, ATTN_QKV}


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module, Member]]:
    """(owning module name, module that runs, member) for every candidate weight, registration order."""
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    output_embeddings = None
    if hasattr(model, "get_output_embeddings"):
        try:
            output_embeddings = model.get_output_embeddings()
        except (AttributeError, NotImplementedError):
            output_embeddings = None
    unsaved = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_save", None) or [])]
    mha_children = {id(m.out_proj): n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}

    out: list[tuple[str, nn.Module, Member]] = []
    modules = dict(model.named_modules())
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            params = ["in_proj_weight"] if module.in_proj_weight is not None else ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
            for p in params:
                out.append((name, module, member_for(name, module, p, role=ATTN_QKV if p == "in_proj_weight" else None,
                                                     relative_name=f"{name}.{p}")))
            continue
        if not is_weight_module(module) or module is output_embeddings:
            continue
        weight = getattr(module, "weight", None)
        if weight is None or len(logical_shape(weight)) < 2 or id(weight) in embedding_params:
            continue
        member = member_for(name, module)
        if any(rx.search(member.param) for rx in unsaved):
            continue
        runner_name = mha_children.get(id(module))  # MHA calls out_proj's weight directly, not the module
        if runner_name is not None:
            member = Member(member.param, ATTN_O, member.fan_in, member.fan_out)
        out.append((runner_name or name, modules[runner_name] if runner_name else module, member))
    return out


def _repeated_block_lists(model: nn.Module, members_by_owner: dict[str, list[Member]]) -> list[tuple[str, nn.ModuleList]]:
    """Innermost ModuleLists of same-class children where some child holds attention weights."""
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 1:
            continue
        if len({type(c) for c in module}) != 1:
            continue
        prefix = f"{name}." if name else ""
        owned = [m for owner, ms in members_by_owner.items() if owner.startswith(prefix) for m in ms]
        if any(m.role in _ATTENTION_ROLES for m in owned):
            found.append((name, module))
    names = [n for n, _ in found]
    return [(n, m) for n, m in found if not any(o != n and o.startswith(n + ".") for o in names)]


def _chain_name(path: str, taken: set[str]) -> str:
    parts = path.split(".")
    name = "decoder" if "decoder" in parts else "encoder" if "encoder" in parts else path or "model"
    return name if name not in taken else path


def generic_layout(model: nn.Module, example_inputs: Optional[ExampleInputs] = None) -> Layout:
    """Discover the weight layers of an arbitrary module (see the module docstring)."""
    candidates = _candidates(model)
    runners = list(dict.fromkeys(id(r) for _, r, _ in candidates))
    by_id = {id(r): r for _, r, _ in candidates}
    order = first_call_order(model, [by_id[i] for i in runners], example_inputs) if candidates else []
    notes: list[str] = []
    if order is None:
        source = "registration-order"
        warn(f"hf_emergence could not trace the forward order of {type(model).__name__}; weight layers are ordered "
             "by registration order, which may differ from execution order. Pass example_inputs= (a batch) to fix this.")
        rank = {i: r for r, i in enumerate(runners)}
    else:
        source = "traced"
        rank = {id(m): r for r, m in enumerate(order)}
        skipped = [m.param for _, r, m in candidates if id(r) not in rank]
        if skipped:
            notes.append(f"{len(skipped)} weight(s) never ran in the traced forward pass and are left alone: {', '.join(skipped[:4])}"
                         + (" ..." if len(skipped) > 4 else ""))
    ranked = sorted(((rank[id(r)], i, owner, m) for i, (owner, r, m) in enumerate(candidates) if id(r) in rank))

    members_by_owner: dict[str, list[Member]] = {}
    for _, _, owner, m in ranked:
        members_by_owner.setdefault(owner, []).append(m)
    block_lists = _repeated_block_lists(model, members_by_owner)
    if block_lists:
        chains, taken = [], set()
        for path, mlist in block_lists:
            blocks = []
            for i in range(len(mlist)):
                prefix = f"{path}.{i}." if path else f"{i}."
                members = [m for _, _, owner, m in ranked if (owner + ".").startswith(prefix)]
                if members:
                    blocks.append(Block(prefix[:-1], members))
            name = _chain_name(path, taken)
            taken.add(name)
            chains.append((min(_rank_of(blocks, ranked)), Chain(name, blocks)))
        inside = {m.param for _, ch in chains for b in ch.blocks for m in b.members}
        outside = [m.param for _, _, _, m in ranked if m.param not in inside]
        if outside:
            notes.append(f"{len(outside)} weight(s) outside the repeated blocks (embeddings, heads) are left alone")
        return Layout(chains=[c for _, c in sorted(chains, key=lambda t: t[0])], layer_unit="block",
                      base_init="xavier_uniform", source=source, notes=notes)
    blocks = [Block(m.param.rsplit(".", 1)[0], [m]) for _, _, _, m in ranked]
    return Layout(chains=[Chain("model", blocks)], layer_unit="matrix", base_init="kaiming_normal",
                  source=source, notes=notes)


def _rank_of(blocks: list[Block], ranked: list) -> list[int]:
    """Trace positions of the members of ``blocks`` (used to order chains by first execution)."""
    params = {m.param for b in blocks for m in b.members}
    return [r for r, _, _, m in ranked if m.param in params] or [len(ranked)]
