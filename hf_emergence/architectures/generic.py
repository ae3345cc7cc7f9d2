"""Generic discovery for any ``nn.Module`` whose ``model_type`` is not registered.

1. Candidates: the weights of :mod:`.weights` (Linear/Conv, attention, weight-normed layers, fused MoE
   experts and their routers), minus weights tied to an embedding, the HF output embeddings and
   parameters a checkpoint never saves.
2. Order: one forward pass (:mod:`hf_emergence.tracing`: on the model itself when it has weights, else on
   a fake-tensor or meta replica); registration order, with a warning and a note, only when no pass works.
3. Blocks: the children of the innermost *block lists*, ``ModuleList``/``Sequential`` containers in which
   some child holds two or more weights. Classes may be mixed (hybrid attention / state-space stacks),
   but a list of distinct classes that is all an element of another block list holds is that block's
   sub-layers (T5's ``block.N.layer``), not a block list. A child that itself holds block lists is a *stage* (Swin's ``layers.N`` with its
   ``blocks`` and ``downsample``); its other weights (patch merging, downsampling) are layers of their own.
4. Chains:

   * Transformer-like (some block holds attention): block lists under one root (a model's encoder with
     all its stages) form one chain in forward order, with the between-stage layers as their own
     layers; each block is one layer (``layer_unit="block"``), base init Xavier-uniform. Weights before
     the first block or after the last (embeddings, stems, pooler, heads) are left alone.
   * Otherwise (ConvNets, MLPs, state-space stacks): one chain of everything in forward order, the stem
     and the head included; with block lists each block is one layer (``layer_unit="block"``: a residual
     block's convs and its parallel branches share one exponent), without them (a plain CNN/MLP) every
     weight is one (``layer_unit="matrix"``); base init Kaiming-normal.

   Each block carries its stage (``chain="stage"`` numbers stages apart). Within a block, the trace's
   data flow sets two roles for ``layer_unit="matrix"``: a weight reading the same tensor as the weight
   just before it is a parallel branch (same exponent, a re-parameterisable multi-branch conv), one
   reading the block's input after others ran is a shortcut (the exponent of the last main-path weight),
   and a weight named like a shortcut that reads no shared tensor is on the main path.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch.nn as nn

from .._warnings import warn
from ..layout import ATTENTION_ROLES, CONV, FFN, SHORTCUT, Block, Chain, Layout, Member
from ..tracing import ExampleInputs, Trace, trace_forward
from .weights import Candidate, candidates

_CONTAINERS = (nn.ModuleList, nn.Sequential)


def _under(path: str, prefix: str) -> bool:
    return not prefix or path == prefix or path.startswith(prefix + ".")


def block_lists(model: nn.Module, owners: list[str]) -> list[str]:
    """Paths of the block lists of ``model`` (see the module docstring), outermost first.

    ``owners`` are the module paths owning a weight, one entry per weight. A list of distinct classes that is
    the only weighted part of an element of another block list holds the sub-layers of one block (T5's
    ``block.N.layer``), unless a list at the same place in another element (same path, other indices) is a
    block list of its own.
    """
    found: list[str] = []
    sub_layers: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, _CONTAINERS):
            continue
        held = {}
        for child_name, child in module.named_children():
            path = f"{name}.{child_name}" if name else child_name
            n = sum(1 for o in owners if _under(o, path))
            if n and not _is_leaf_weight(child):
                held[path] = (type(child), n)
        if not held or max(n for _, n in held.values()) < 2:
            continue
        classes = [cls for cls, _ in held.values()]
        outer = next((f for f in reversed(found) if _under(name, f) and name != f), None)
        if outer is not None and len(classes) > 1 and len(set(classes)) == len(classes):
            element = _child_of(outer, name)
            if all(_under(o, name) for o in owners if _under(o, element)):
                sub_layers.append(name)
                continue
        found.append(name)
    shapes = {_pattern(f) for f in found}
    found += [s for s in sub_layers if _pattern(s) in shapes]
    return sorted(found, key=lambda f: (f.count("."), f))


def _pattern(path: str) -> str:
    """``stages.*.blocks`` for ``stages.0.blocks``: where a list sits, whatever the indices."""
    return ".".join("*" if part.isdigit() else part for part in path.split("."))


def _is_leaf_weight(module: nn.Module) -> bool:
    return not any(True for _ in module.children())


def _child_of(container: str, path: str) -> str:
    """The child of ``container`` on the way to ``path``."""
    rest = path[len(container) + 1:] if container else path
    head = rest.split(".", 1)[0]
    return f"{container}.{head}" if container else head


def generic_layout(model: nn.Module, example_inputs: Optional[ExampleInputs] = None) -> Layout:
    """Discover the weight layers of an arbitrary module (see the module docstring)."""
    found, left_out = candidates(model)
    runners = list({id(c.runner): c.runner for c in found}.values())
    trace, reasons = trace_forward(model, runners, example_inputs) if found else (Trace([], {}, "model", ""), [])
    notes: list[str] = []
    if trace is None:
        source, order = "registration-order", "registration-order"
        why = "; ".join(reasons[:3]) or "no forward pass could be run"
        warn(f"hf_emergence could not trace the forward order of {type(model).__name__} ({why}); weight layers are ordered "
             "by registration order, which may differ from execution order. Pass example_inputs= (a batch) to fix this.")
        notes.append(f"registration order: no forward pass was possible ({why})")
        rank = {id(r): i for i, r in enumerate(runners)}
        reads: dict[int, tuple[int, int]] = {}
    else:
        source, order = "traced", trace.route  # the route stays out of the notes: a plan does not depend on it
        notes.extend(trace.notes)
        rank = {id(m): i for i, m in enumerate(trace.order)}
        reads = trace.reads

    lists = block_lists(model, [c.owner for c in found])
    stages = {_child_of(outer, inner) for inner in lists for outer in lists
              if outer != inner and _under(inner, outer)}
    innermost: dict[str, Optional[str]] = {}
    for c in found:
        holders = [p for p in lists if _under(c.owner, p) and c.owner != p]
        innermost[c.member.param] = max(holders, key=len) if holders else None

    ran = [c for c in found if id(c.runner) in rank]
    ran.sort(key=lambda c: rank[id(c.runner)])
    blocks: dict[str, Block] = {}
    units: list[Block] = []
    previous: Optional[Candidate] = None
    for c in ran:
        name, stage = _unit_of(c, innermost[c.member.param], stages)
        if (innermost[c.member.param] is None and previous is not None and innermost[previous.member.param] is None
                and reads.get(id(c.runner)) is not None and reads.get(id(c.runner)) == reads.get(id(previous.runner))):
            name = units[-1].name  # a parallel branch outside the blocks (a multi-branch stem): the same layer
        previous = c
        if name not in blocks:
            blocks[name] = Block(name, [], stage)
            units.append(blocks[name])
        blocks[name].members.append(c.member)
    unran = [c for c in found if id(c.runner) not in rank]
    joined = 0
    for c in unran:  # a weight that did not run in a block that did (an expert no token reached) joins its block
        name, _ = _unit_of(c, innermost[c.member.param], stages)
        if name in blocks and innermost[c.member.param] is not None and trace is not None:
            blocks[name].members.append(c.member)
            joined += 1
        else:
            left_out.append((c.member.param, "never ran in the traced forward pass"))
    if joined:
        notes.append(f"{joined} weight(s) did not run in the traced pass but sit in blocks that did; they take their block's exponent")
    for block in units:
        _set_branch_roles(block, reads, {c.member.param: c.runner for c in found})

    in_blocks = [b for b in units if innermost[b.members[0].param] is not None]
    transformer = any(m.role in ATTENTION_ROLES for b in in_blocks for m in b.members)
    if transformer:
        chains = _transformer_chains(units, innermost, lists, stages, left_out)
        layer_unit, base_init = "block", "xavier_uniform"
    else:
        chains = [Chain("model", units)] if units else []
        layer_unit, base_init = ("block" if in_blocks else "matrix"), "kaiming_normal"
    return Layout(chains=chains, layer_unit=layer_unit, base_init=base_init, source=source, notes=notes,
                  left_out=left_out, order=order)


def _unit_of(c: Candidate, container: Optional[str], stages: set[str]) -> tuple[str, Optional[str]]:
    """(unit name, stage) of a weight: its block, or for a weight outside blocks its own module."""
    if container is None:
        return c.owner, None
    child = _child_of(container, c.owner)
    stage = _stage_of(container, stages)
    if child in stages:  # a stage's own weight (patch merging, downsampling): a layer of its own
        return _child_of(child, c.owner), child
    return child, stage


def _stage_of(container: str, stages: set[str]) -> str:
    holder = [s for s in stages if _under(container, s)]
    return max(holder, key=len) if holder else container


def _set_branch_roles(block: Block, reads: dict[int, tuple[int, int]], runner_of: dict[str, nn.Module]) -> None:
    """Parallel branches and shortcuts from the data flow (see the module docstring); attention untouched."""
    last_reader: dict[tuple[int, int], int] = {}  # tensor read -> index of the latest member that read it
    out: list[Member] = []
    for m in block.members:
        runner = runner_of[m.param]
        key = reads.get(id(runner))
        if m.role not in ATTENTION_ROLES and key is not None:
            if key not in last_reader:
                if m.role == SHORTCUT:  # named like a shortcut but reads what nothing before it read: main path
                    m = replace(m, role=CONV if isinstance(runner, nn.modules.conv._ConvNd) else FFN)
            elif last_reader[key] == len(out) - 1:
                m = replace(m, parallel=True)
            elif m.role != SHORTCUT:
                m = replace(m, role=SHORTCUT)
            last_reader[key] = len(out)
        out.append(m)
    block.members = out


def _transformer_chains(units: list[Block], innermost: dict[str, Optional[str]], lists: list[str], stages: set[str],
                        left_out: list[tuple[str, str]]) -> list[Chain]:
    """One chain per root (see the module docstring), in order of first execution."""
    def root_of(container: str) -> str:
        node = container
        while node:
            parent = node.rsplit(".", 1)[0] if "." in node else ""
            if not parent or not (parent in lists or parent in stages):
                return parent
            node = parent
        return ""

    by_root: dict[str, list[int]] = {}
    lists_of_root: dict[str, set[str]] = {}
    for i, unit in enumerate(units):
        container = innermost[unit.members[0].param]
        if not _is_anchor(unit, innermost, stages):
            continue  # outside the blocks, or a stage's own layer: a chain starts and ends at blocks
        root = root_of(container)
        by_root.setdefault(root, []).append(i)
        lists_of_root.setdefault(root, set()).add(container)
    chains: list[tuple[int, Chain]] = []
    taken: set[str] = set()
    used: set[int] = set()
    for root, indices in by_root.items():
        first, last = min(indices), max(indices)
        members = [i for i in range(first, last + 1) if i in indices or
                   (i not in used and _under(units[i].name, root) and not _is_anchor(units[i], innermost, stages))]
        used.update(members)
        only = next(iter(lists_of_root[root])) if len(lists_of_root[root]) == 1 else None
        name = _chain_name(only if only is not None else root, taken)
        taken.add(name)
        chains.append((first, Chain(name, [units[i] for i in members])))
    for i, unit in enumerate(units):
        if i not in used:
            left_out.extend((m.param, "outside the repeated blocks (embeddings, stem, pooler, head)") for m in unit.members)
    return [c for _, c in sorted(chains, key=lambda t: t[0])]


def _is_anchor(unit: Block, innermost: dict[str, Optional[str]], stages: set[str]) -> bool:
    """A unit that is a block of a block list (not a weight outside the lists, not a stage's own layer)."""
    container = innermost[unit.members[0].param]
    return container is not None and _child_of(container, unit.name) not in stages


def _chain_name(path: str, taken: set[str]) -> str:
    parts = path.split(".")
    name = "decoder" if "decoder" in parts else "encoder" if "encoder" in parts else path or "model"
    return name if name not in taken else path or "model"
