"""The plan: which tensor gets which exponent, computed from names and shapes only.

An :class:`EmergencePlan` is an ordered list of :class:`PlanEntry` (one per weight tensor that the
init touches) plus the settings that produced it. It is deterministic, JSON-serialisable, printable,
and can be applied tensor by tensor, which is what sharded training needs (see ``docs/scaling.md``).
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterable, Iterator, Mapping, Optional

import torch

from ._json import JsonSource, read_json
from ._text import format_k
from ._warnings import warn
from .base_init import base_init_
from .distributed import check_same_rng, is_dtensor
from .layout import SHORTCUT, UNSCALED_ROLES, Layout, Member
from .schedule import exponents, middle_shrink, scale_factor, warn_if_extreme


class PlanError(ValueError):
    """The init cannot be planned or applied as asked: the settings do not fit this model (a pivot outside a chain, no
    chain of 2 or more layers) or a factor over- or underflows in a tensor's dtype. Not a problem of the model itself."""


@dataclass(frozen=True)
class PlanEntry:
    """One weight tensor of the plan.

    ``layer`` is the index of its layer in its chain and ``k`` the exponent (``None`` and factor 1.0
    for tensors that are re-initialised but keep their scale, e.g. attention Q/K under
    ``attention="vo"``). ``aliases`` lists other names of the same Parameter (tied weights). ``init``
    overrides the plan's base init for this tensor ("keep": the magnitude of a weight-normed layer).
    """

    name: str
    chain: str
    layer: Optional[int]
    block: str
    role: str
    k: Optional[float]
    factor: float
    shape: tuple[int, ...]
    fan_in: int
    fan_out: int
    aliases: tuple[str, ...] = ()
    init: Optional[str] = None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def scaled(self) -> bool:
        return self.factor != 1.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"], d["aliases"] = list(self.shape), list(self.aliases)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PlanEntry":
        if not isinstance(d, dict):
            raise TypeError(f"expected an object, got {type(d).__name__}")
        entry = cls(**{**d, "shape": tuple(d["shape"]), "aliases": tuple(d.get("aliases", ()))})
        if not isinstance(entry.name, str) or not all(isinstance(s, int) and s >= 0 for s in entry.shape):
            raise ValueError(f"bad name or shape in {d!r:.120}")
        if not isinstance(entry.factor, (int, float)) or isinstance(entry.factor, bool):
            raise ValueError(f"factor of {entry.name!r} is {entry.factor!r}, not a number")
        if not (math.isfinite(entry.factor) and entry.factor > 0):
            raise ValueError(f"factor of {entry.name!r} is {entry.factor!r}: expected a finite number > 0 (alpha**k)")
        return entry


@dataclass
class EmergencePlan:
    """Ordered per-tensor plan plus the settings and discovery facts behind it."""

    settings: dict[str, Any]
    base_init: str
    layer_unit: str
    source: str
    model: str
    entries: list[PlanEntry] = field(default_factory=list)
    chains: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: (parameter, reason) for every weight-bearing (>= 2-d) parameter the plan leaves alone.
    left_out: list[tuple[str, str]] = field(default_factory=list)

    # ---- access -----------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[PlanEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, name: str) -> PlanEntry:
        for e in self.entries:
            if e.name == name or name in e.aliases:
                return e
        raise KeyError(f"{name!r} is not in the plan")

    def __contains__(self, name: object) -> bool:
        return any(e.name == name or name in e.aliases for e in self.entries)

    def factors(self) -> dict[str, float]:
        """``{parameter name: factor}`` for every entry (aliases included)."""
        out = {}
        for e in self.entries:
            for n in (e.name, *e.aliases):
                out[n] = e.factor
        return out

    # ---- application, tensor by tensor --------------------------------------------------------------
    def check_factors(self, dtypes: Mapping[str, torch.dtype]) -> None:
        """Refuse the plan if a factor is not finite and non-zero in its tensor's dtype (``{name: dtype}``)."""
        for e in self.entries:
            dtype = dtypes.get(e.name)
            if e.scaled and dtype is not None:
                _check_factor(e, dtype)

    @torch.no_grad()
    def apply_entry_(self, entry: PlanEntry, tensor: torch.Tensor, reinit: bool = True,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Base-initialise (unless ``reinit=False``) and scale ``tensor``, or one shard of it, in place.

        The base initialisers depend only on the full tensor's fans (stored in the entry), so a shard
        is drawn from exactly the distribution the whole tensor would be.
        """
        if entry.scaled:
            _check_factor(entry, tensor.dtype)
        if reinit:
            base_init_(tensor, entry.init or self.base_init, entry.fan_in, entry.fan_out, generator=generator)
        if entry.scaled:
            tensor.mul_(entry.factor)
        return tensor

    def apply_to_state_dict_(self, state_dict: Mapping[str, torch.Tensor], reinit: bool = True,
                             generator: Optional[torch.Generator] = None, *, key_map: Optional[Mapping[str, str]] = None,
                             partial: bool = False) -> list[str]:
        """Apply the plan to the planned tensors of ``state_dict``, in place; returns the entry names handled.

        ``state_dict`` is a whole model's, one rank's local shards (FSDP2 ``p.to_local()``), or one file of a
        checkpoint. Its keys are the plan's parameter names (or aliases), or are mapped to them by
        ``key_map`` (``{key: parameter name}``; :func:`hf_emergence.checkpoint.checkpoint_key_map` gives it
        for checkpoints that transformers saves under other names, such as ViT's 4.x keys).

        * Each entry is applied once per storage: a tied weight listed under two names (as in
          ``model.state_dict()``) is scaled once; two separate copies of it are each scaled.
        * A tensor must be the planned tensor or a shard of it: the same shape, the same trailing dims and
          at most as many rows (dim-0 shards), or 1-d with at most as many elements (flat shards).
        * Unless ``partial=True`` (one file of several: check their union with :meth:`check_complete`),
          every entry must be found; otherwise nothing is changed and a ValueError names the missing ones.
        * Every check (shapes, floating-point dtypes, factors that over- or underflow in a tensor's dtype) is made
          before the first tensor changes: a refused state dict is left as it was.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping of parameter names to tensors (e.g. model.state_dict()), "
                            f"got {type(state_dict).__name__}")
        by_name = {n: e for e in self.entries for n in (e.name, *e.aliases)}
        key_map = key_map or {}
        matches: list[tuple[PlanEntry, torch.Tensor]] = []
        for key, tensor in state_dict.items():
            entry = by_name.get(key_map.get(key, key))
            if entry is not None:
                _check_shard(entry, key, tensor)
                matches.append((entry, tensor))
        if not partial:
            self.check_complete([e.name for e, _ in matches], keys=list(state_dict))
        for entry, tensor in matches:
            if entry.scaled:
                _check_factor(entry, tensor.dtype)
        if reinit and self.base_init != "keep" and any(is_dtensor(t) for _, t in matches):
            check_same_rng(generator)           # DTensors are drawn whole on every rank (a collective)
        done: list[str] = []
        seen: set[tuple[str, int, int]] = set()
        for entry, tensor in matches:
            storage = _storage_key(tensor)
            if (entry.name, *storage) in seen:
                continue
            seen.add((entry.name, *storage))
            self.apply_entry_(entry, tensor, reinit=reinit, generator=generator)
            if entry.name not in done:
                done.append(entry.name)
        return done

    def check_complete(self, handled: Iterable[str], keys: Optional[Iterable[str]] = None) -> None:
        """Raise a ValueError naming the plan entries missing from ``handled`` (names or aliases).

        ``keys`` (the state dict's keys, if known) are quoted to show what the names looked like instead.
        """
        by_name = {n: e.name for e in self.entries for n in (e.name, *e.aliases)}
        found = {by_name[n] for n in handled if n in by_name}
        missing = [e.name for e in self.entries if e.name not in found]
        if not missing:
            return
        hint = ""
        if keys is not None:
            keys = list(keys)
            hint = (f"; the state dict has {len(keys)} key(s), e.g. {_some(keys)}: if it uses other key names (transformers 5 "
                    "saves ViT under its 4.x names) pass key_map=hf_emergence.checkpoint.checkpoint_key_map(model, keys)")
        raise ValueError(f"the state dict matched {len(found)} of the plan's {len(self.entries)} tensors; missing: "
                         f"{_some(missing)}{hint}")

    # ---- serialisation ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "source": self.source, "settings": dict(self.settings),
                "base_init": self.base_init, "layer_unit": self.layer_unit, "chains": dict(self.chains),
                "notes": list(self.notes), "left_out": [list(x) for x in self.left_out],
                "entries": [e.to_dict() for e in self.entries]}

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EmergencePlan":
        """Rebuild from :meth:`to_dict` output; anything else is one ValueError saying what is wrong."""
        try:
            if not isinstance(d, dict):
                raise TypeError(f"expected a JSON object, got {type(d).__name__}")
            missing = [k for k in ("settings", "base_init", "layer_unit", "source", "model", "entries") if k not in d]
            if missing:
                raise KeyError(f"missing key(s) {', '.join(missing)}")
            if not isinstance(d["entries"], list) or not isinstance(d["settings"], dict):
                raise TypeError("'entries' must be a list and 'settings' an object")
            entries = []
            for i, e in enumerate(d["entries"]):
                try:
                    entries.append(PlanEntry.from_dict(e))
                except (TypeError, KeyError, ValueError) as err:
                    raise ValueError(f"entry {i}: {err}") from None
            return cls(settings=d["settings"], base_init=d["base_init"], layer_unit=d["layer_unit"], source=d["source"],
                       model=d["model"], entries=entries, chains=dict(d.get("chains", {})), notes=list(d.get("notes", [])),
                       left_out=[(str(n), str(r)) for n, r in d.get("left_out", [])])
        except (TypeError, KeyError, ValueError) as err:
            raise ValueError(f"not an EmergencePlan: {str(err).strip(chr(39))}") from None

    @classmethod
    def from_json(cls, source: JsonSource) -> "EmergencePlan":
        """Rebuild from :meth:`to_json` text (a ``str``) or a file holding it (a ``pathlib.Path``).

        Bad input is one ValueError: the file, or the line and column of invalid JSON, or what is wrong with the plan.
        """
        try:
            data, where = read_json(source)
        except (TypeError, ValueError) as err:
            raise ValueError(f"not an EmergencePlan: {err}") from None
        try:
            return cls.from_dict(data)
        except ValueError as err:
            if not where:
                raise
            raise ValueError(f"not an EmergencePlan: {where}: {str(err).removeprefix('not an EmergencePlan: ')}") from None

    # ---- summaries ----------------------------------------------------------------------------------
    def layers(self) -> list[dict[str, Any]]:
        """One row per (chain, layer): its k, factor, tensors and parameter count, in plan order."""
        rows: dict[tuple[str, int], dict[str, Any]] = {}
        for e in self.entries:
            if e.layer is None:
                continue
            row = rows.setdefault((e.chain, e.layer), {"chain": e.chain, "layer": e.layer, "block": e.block, "k": e.k,
                                                      "factor": e.factor, "tensors": 0, "params": 0})
            row["tensors"] += 1
            row["params"] += e.numel
        return list(rows.values())

    def min_activation_scale(self) -> float:
        """Smallest cumulative scale prod(factor) along any chain (the U-shaped shrink, see schedule)."""
        alpha, mode = float(self.settings["alpha"]), self.settings.get("scale_mode", "weight")
        by_chain: dict[str, list[float]] = {}
        for row in self.layers():
            by_chain.setdefault(row["chain"], []).append(row["k"])
        return min((middle_shrink(alpha, ks, mode) for ks in by_chain.values()), default=1.0)

    def heading(self) -> str:
        """The first line of the printed plan: the model, the settings and where the layers came from."""
        s = self.settings
        return (f"EmergencePlan for {self.model}: alpha={s['alpha']} scale_mode={s.get('scale_mode')} "
                f"base_init={self.base_init} layer_unit={self.layer_unit} chain={s.get('chain')} "
                f"attention={s.get('attention')} (layers from {self.source})")

    def summary(self) -> list[str]:
        """The lines printed under the layer table: what is scaled, the smallest activation scale, the notes and
        the weights left alone, grouped by reason."""
        scaled = [e for e in self.entries if e.scaled]
        unscaled = [re.compile(x) for x in self.settings.get("unscaled", ())]
        kept = [e for e in self.entries if e.layer is None]
        held = [e for e in kept if _matches(unscaled, e.name, e.aliases)]
        by_role = [e for e in kept if e not in held]
        tail = (f"{len(scaled)} tensors ({sum(e.numel for e in scaled):,} params) scaled across {len(self.layers())} "
                f"layers in {len(self.chains)} chain(s)")
        if by_role:
            tail += f"; {len(by_role)} tensors keep their scale ({', '.join(sorted({e.role for e in by_role}))})"
        if held:
            tail += f"; {len(held)} held at factor 1 by unscaled="
        lines = [tail, f"smallest cumulative activation scale along a chain: {self.min_activation_scale():.3g}",
                 *(f"note: {n}" for n in self.notes)]
        if self.left_out:
            by_reason = Counter(r for _, r in self.left_out)
            lines.append(f"left alone: {len(self.left_out)} weight(s) (>= 2-d), by reason:")
            for reason, n in by_reason.most_common():
                names = [name for name, r in self.left_out if r == reason]
                lines.append(f"  {n:>4}  {reason}: {', '.join(names[:3])}" + (" ..." if n > 3 else ""))
        return lines

    def __str__(self) -> str:
        rows = self.layers()
        width = max([len(r["block"]) for r in rows] + [5])
        cw = max([len(r["chain"]) for r in rows] + [5])
        lines = [self.heading(),
                 f"{'chain':<{cw}} {'layer':>5}  {'block':<{width}} {'k':>6} {'factor':>9} {'tensors':>7} {'params':>11}"]
        for r in rows:
            lines.append(f"{r['chain']:<{cw}} {r['layer']:>5}  {r['block']:<{width}} {format_k(r['k']):>6} {r['factor']:>9.4f} "
                         f"{r['tensors']:>7} {r['params']:>11,}")
        return "\n".join(lines + self.summary())

    def __repr__(self) -> str:
        return f"EmergencePlan(model={self.model!r}, entries={len(self.entries)}, chains={self.chains})"


def _matches(patterns: Iterable[re.Pattern], name: str, aliases: Iterable[str]) -> bool:
    """Whether any of ``patterns`` matches the parameter ``name`` or one of its other names (``exclude=``, ``unscaled=``)."""
    return any(rx.search(n) for rx in patterns for n in (name, *aliases))


def build_plan(layout: Layout, settings: dict[str, Any], shapes: dict[str, tuple[int, ...]],
               aliases: dict[str, tuple[str, ...]], model_name: str) -> EmergencePlan:
    """Turn a discovered layout into a plan under ``settings`` (the validated EmergenceInit fields).

    ``shapes`` maps canonical parameter names to shapes, ``aliases`` canonical names to their other
    names. Members matching ``settings["exclude"]`` are dropped (and listed in ``left_out``); members matching
    ``settings["unscaled"]`` keep their layer's place in the numbering but factor 1 (entries without layer or k, as
    Q/K under ``attention="vo"``); a Parameter met twice (shared across blocks) keeps its first entry.
    ``chain="stage"`` numbers each stage apart.
    """
    exclude = [re.compile(p) for p in settings.get("exclude", ())]
    unscaled = [re.compile(p) for p in settings.get("unscaled", ())]
    held: dict[str, Any] = {}   # parameter -> the k it would have had
    unscaled_roles = UNSCALED_ROLES[settings["attention"]]
    layer_unit = layout.layer_unit if settings["layer_unit"] == "auto" else settings["layer_unit"]
    canonical = {alias: name for name, names in aliases.items() for alias in names}

    # 1. layers per chain: lists of (block name, [members]) that share one exponent.
    chains: list[tuple[str, list[tuple[str, list[Member]]]]] = []
    seen: set[str] = set()
    duplicates = 0
    left_out = list(layout.left_out)
    for chain in (layout.stage_chains() if settings["chain"] == "stage" else layout.chains):
        layers: list[tuple[str, list[Member]]] = []
        for block in chain.blocks:
            members = []
            for m in block.members:
                name = canonical.get(m.param, m.param)
                if _matches(exclude, name, aliases.get(name, ())):
                    left_out.append((name, "matches exclude="))
                    continue
                if name in seen:
                    duplicates += 1
                    continue
                seen.add(name)
                members.append(replace(m, param=name))
            if not members:
                continue
            if layer_unit == "block":
                layers.append((block.name, members))
                continue
            for m in members:  # matrix: each scaled tensor is a layer, shortcuts and parallel branches join the previous one
                if (m.role == SHORTCUT or m.parallel) and layers:
                    layers[-1][1].append(m)
                else:
                    layers.append((m.param.rsplit(".", 1)[0].removesuffix(".parametrizations.weight"), [m]))
        chains.append((chain.name, layers))
    if settings["chain"] == "single" and len(chains) > 1:
        chains = [("+".join(n for n, _ in chains), [layer for _, ls in chains for layer in ls])]

    # 2. exponents per chain over the layers that hold at least one scaled member.
    entries: list[PlanEntry] = []
    counts: dict[str, int] = {}
    notes = list(layout.notes)
    if duplicates:
        notes.append(f"{duplicates} shared parameter occurrence(s) skipped: each Parameter is scaled once, at its first layer")
    for chain_name, layers in chains:
        scaled_layers = [layer for layer in layers if any(m.role not in unscaled_roles for m in layer[1])]
        counts[chain_name] = len(scaled_layers)
        ks = exponents(len(scaled_layers), settings["even_depth"], settings["pivot"]) if scaled_layers else []
        k_of = {id(layer): (i, k) for i, (layer, k) in enumerate(zip(scaled_layers, ks))}
        for layer in layers:
            index, k = k_of.get(id(layer), (None, None))
            block_name, members = layer
            for m in members:
                hold = _matches(unscaled, m.param, aliases.get(m.param, ()))
                if hold and k is not None and m.role not in unscaled_roles:
                    held[m.param] = k
                keep = m.role in unscaled_roles or k is None or hold
                factor = 1.0 if keep else scale_factor(settings["alpha"], k, settings["scale_mode"])
                entries.append(PlanEntry(name=m.param, chain=chain_name, layer=None if keep else index, block=block_name,
                                         role=m.role, k=None if keep else k, factor=factor, shape=shapes[m.param],
                                         fan_in=m.fan_in, fan_out=m.fan_out, aliases=aliases.get(m.param, ()), init=m.init))
    if held:
        shown = ", ".join(f"{name} (k={format_k(k)})" for name, k in list(held.items())[:3]) + (" ..." if len(held) > 3 else "")
        notes.append(f"{len(held)} tensor(s) matching unscaled= re-drawn at factor 1, counted in the numbering: {shown}")
    idle = [p for p, rx in zip(settings.get("unscaled", ()), unscaled)
            if not any(_matches([rx], e.name, e.aliases) for e in entries)]
    if idle:
        warn(f"unscaled pattern(s) {', '.join(map(repr, idle))} match no planned tensor of {model_name}: nothing is held "
             "at factor 1 (`print(plan)` lists the planned tensors)")
    base_init = layout.base_init if settings["base_init"] == "auto" else settings["base_init"]
    plan = EmergencePlan(settings=dict(settings), base_init=base_init, layer_unit=layer_unit, source=layout.source,
                         model=model_name, entries=entries, chains=counts, notes=notes, left_out=left_out)
    warn_if_extreme(settings["alpha"], [e.k for e in entries if e.k is not None], settings["scale_mode"], model_name)
    return plan


@functools.lru_cache(maxsize=1024)
def _factor_in_dtype(factor: float, dtype: torch.dtype) -> str:
    """"" if ``factor`` is finite and non-zero in ``dtype``, else "infinite" or "zero"."""
    value = torch.tensor(factor, dtype=torch.float64).to(dtype)
    if not math.isfinite(factor) or not torch.isfinite(value):
        return "infinite"
    return "zero" if value == 0 else ""


def _check_factor(entry: PlanEntry, dtype: torch.dtype) -> None:
    """A factor must be finite and non-zero in the tensor's dtype (alpha**k over- or underflows otherwise)."""
    if not dtype.is_floating_point:
        return
    what = _factor_in_dtype(entry.factor, dtype)
    if not what:
        return
    raise PlanError(f"{entry.name} (chain {entry.chain!r}, layer {entry.layer}) would be multiplied by "
                     f"alpha**{format_k(entry.k)} = {entry.factor:.4g}, which is {what} in {str(dtype).replace('torch.', '')}: "
                     "choose an alpha closer to 1")


def _check_shard(entry: PlanEntry, key: str, tensor: torch.Tensor) -> None:
    """``tensor`` is a floating-point tensor: the planned tensor, a dim-0 shard of it, or a flat 1-d shard; else an error."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{key!r} is a {type(tensor).__name__}, expected a torch.Tensor (the plan's {entry.name!r})")
    if not tensor.is_floating_point():
        raise ValueError(f"{key!r} has dtype {str(tensor.dtype).replace('torch.', '')}, expected a floating-point tensor: "
                         "the init draws and scales real-valued weights (dequantize a quantized checkpoint first)")
    shape = tuple(tensor.shape)
    full = tuple(entry.shape)
    if shape == full:
        return
    if len(shape) == len(full) and shape[1:] == full[1:] and shape[:1] <= full[:1]:
        return
    if len(shape) == 1 and shape[0] <= entry.numel:
        return
    raise ValueError(f"{key!r} has shape {list(shape)}, but the plan's {entry.name!r} is {list(full)} "
                     "(expected that shape, a dim-0 shard of it or a flat shard of at most its size)")


def _storage_key(tensor: torch.Tensor) -> tuple[int, int]:
    """Where a tensor's data lives: two views of one storage at one offset are one tensor."""
    try:
        return tensor.untyped_storage().data_ptr(), tensor.storage_offset()
    except Exception:  # tensors without a plain storage (some subclasses)
        return id(tensor), 0


def _some(names: list[str], n: int = 5) -> str:
    shown = ", ".join(names[:n])
    return shown + (f" (+{len(names) - n} more)" if len(names) > n else "")
