"""``EmergenceInit``: the settings of the emergence-promoting initialisation, and the call that applies it.

After a standard initialisation, the L weight layers of each chain are numbered around the pivot,
k = -n..n, and layer k's weight is multiplied by alpha**k: early layers shrink, late layers grow
(Li, George & Silva, arXiv 2407.19044). Biases, norm layers and embeddings are never touched.

    plan = EmergenceInit(alpha=1.2, base_init="xavier_uniform").apply(model)
    print(plan)
"""

from __future__ import annotations

import json
import math
import numbers
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

from ._json import JsonSource, read_json
from ._warnings import warn
import torch
import torch.nn as nn

from .architectures import discover
from .base_init import BASE_INITS
from .distributed import check_same_rng, is_dtensor, unwrap_model, writable
from .layout import LAYER_UNITS, UNSCALED_ROLES, logical_shape
from .plan import EmergencePlan, PlanError, build_plan
from .record import METADATA_KEYS, AlreadyAppliedError, already_applied, record_applied
from .schedule import EVEN_DEPTH_VARIANTS, SCALE_MODES
from .tracing import ExampleInputs

CHAINS = ("separate", "single", "stage")
#: Setting values written by earlier versions, read as their current names (config.json files on disk).
LEGACY_VALUES = {"chain": {"stacks": "separate"}}
ATTENTION = tuple(UNSCALED_ROLES)
#: The settings that take one of a fixed set of values, and those values (the CLI and the examples' flags use them).
SETTING_CHOICES: dict[str, tuple[str, ...]] = {
    "base_init": BASE_INITS, "scale_mode": SCALE_MODES, "even_depth": EVEN_DEPTH_VARIANTS, "chain": CHAINS,
    "attention": ATTENTION, "layer_unit": ("auto",) + LAYER_UNITS,
}
__all__ = ["AlreadyAppliedError", "EmergenceInit", "METADATA_KEYS", "PlanError", "SETTING_CHOICES", "SETTING_NAMES",
           "already_applied"]


def _patterns(name: str, value: Any) -> list[str]:
    """``exclude`` / ``unscaled``: one regular expression or a list of them, each compiled once to check it."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise TypeError(f"{name} must be a regular expression or a list of them, got {value!r} ({type(value).__name__})")
    for pattern in value:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as err:
            raise ValueError(f"{name} pattern {pattern!r} is not a valid regular expression: {err}") from None
    return list(value)


@dataclass
class EmergenceInit:
    """Settings of the emergence-promoting initialisation (serialisable with ``to_dict``/``from_dict``).

    Args:
        alpha: scale base, > 0 and finite. Layer k is multiplied by alpha**k. alpha > 1 shrinks early
            and grows late layers; alpha < 1 reverses that (allowed, with a warning); 1 only re-inits.
        base_init: standard init drawn first: "auto" (the architecture's: Xavier-uniform for
            Transformers, Kaiming-normal for ConvNets/MLPs, T5's own), "keep" (the model's own init),
            "xavier_uniform", "xavier_normal", "kaiming_normal", "kaiming_uniform".
        scale_mode: "weight" multiplies the weight (std) by alpha**k; "variance" multiplies the
            variance by alpha**k, i.e. the weight by alpha**(k/2).
        even_depth: exponents for an even number of layers: "skip0" (-n..-1, +1..+n), "half"
            (+-0.5, +-1.5, ...) or "floor" (-n..n-1, pivot floor(L/2)).
        pivot: index of the layer that gets k=0 (k_l = l - pivot), per chain; ``None`` = the middle.
        chain: "separate" numbers each chain the model has (encoder, decoder; a hierarchical encoder's
            stages form one chain) on its own; "single" joins them into one chain, encoder first;
            "stage" numbers each stage of a hierarchical model (Swin, PVT, ResNet stages) on its own.
        attention: which attention matrices are scaled: "vo" (V and output projections; Q/K keep
            their scale, since scaling them changes the softmax temperature), "none" (feed-forward
            only), "all".
        layer_unit: what counts as one layer: "auto" (the architecture's: Transformer blocks,
            single conv/linear layers for ConvNets), "block" or "matrix" (every weight tensor).
        exclude: regular expressions; matching parameter names are neither re-initialised nor scaled, and the
            layers are numbered without them.
        unscaled: regular expressions; matching parameters are re-initialised and counted in the numbering but keep
            factor 1 (like Q/K under attention="vo"), e.g. ["^classifier"] to leave a head that no norm follows at
            its base-init scale while every other layer keeps the exponent it has with the head counted.
    """

    alpha: float = 1.1
    base_init: str = "auto"
    scale_mode: str = "weight"
    even_depth: str = "skip0"
    pivot: Optional[int] = None
    chain: str = "separate"
    attention: str = "vo"
    layer_unit: str = "auto"
    exclude: list[str] = field(default_factory=list)
    unscaled: list[str] = field(default_factory=list)

    def __new__(cls, *args: Any, **kwargs: Any) -> "EmergenceInit":
        unknown = sorted(set(kwargs) - {f.name for f in fields(cls)})
        if unknown:  # the dataclass __init__ would only say "unexpected keyword argument"
            raise TypeError(f"EmergenceInit got unknown option(s) {', '.join(map(repr, unknown))}; "
                            f"valid options: {', '.join(f.name for f in fields(cls))}")
        return super().__new__(cls)

    def __post_init__(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, numbers.Real):
            raise TypeError(f"alpha must be a real number, got {self.alpha!r} ({type(self.alpha).__name__})")
        self.alpha = float(self.alpha)
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"alpha={self.alpha!r} is invalid: expected a finite number > 0 (typically 1.01 to 2)")
        if self.alpha < 1:
            warn(f"alpha={self.alpha} < 1 reverses the schedule: early layers grow and late layers shrink")
        for name, allowed in SETTING_CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not one of: {', '.join(allowed)}")
        if self.pivot is not None and (isinstance(self.pivot, bool) or not isinstance(self.pivot, numbers.Integral)):
            raise TypeError(f"pivot must be an integer layer index or None, got {self.pivot!r}")
        for name in ("exclude", "unscaled"):
            setattr(self, name, _patterns(name, getattr(self, name)))

    # ---- serialisation ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-serialisable dict (what ``config.emergence_init`` stores)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EmergenceInit":
        """Rebuild from ``to_dict()`` output or a saved ``config.emergence_init``.

        Metadata keys are ignored; unknown keys (written by a newer version) are dropped with a warning, but a dict
        with no setting at all among its keys (a plan, a model config, a typo) is a ValueError; values renamed
        since (``chain="stacks"``) are read under their current name.
        """
        if not isinstance(d, dict):
            raise TypeError(f"emergence_init settings must be a dict, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names - set(METADATA_KEYS))
        if {"entries", "settings"} <= set(d):
            raise ValueError("this is an EmergencePlan (EmergencePlan.from_dict / from_json read it), not settings; its "
                             "settings are under 'settings'")
        if unknown and not names & set(d):
            raise ValueError(f"no emergence_init setting among the keys {', '.join(map(repr, sorted(d)))}; known settings: "
                             f"{', '.join(f.name for f in fields(cls))}")
        if unknown:
            warn(f"ignoring unknown emergence_init setting(s) {', '.join(unknown)} (written by a newer hf_emergence?); "
                 f"known settings: {', '.join(f.name for f in fields(cls))}")
        settings = {k: LEGACY_VALUES.get(k, {}).get(v, v) if isinstance(v, str) else v for k, v in d.items() if k in names}
        return cls(**settings)

    def to_json(self, indent: Optional[int] = 2) -> str:
        """The settings as JSON text (:meth:`to_dict`)."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, source: JsonSource) -> "EmergenceInit":
        """Rebuild from :meth:`to_json` text (a ``str``), or from a file (a ``pathlib.Path``) holding it or a saved
        ``config.json`` (its ``emergence_init``; a checkpoint folder is read as its config.json).

        Bad input is one error naming the file: a missing file or invalid JSON (line and column) is a ValueError, and
        bad settings raise as in :meth:`from_dict` (unknown keys are dropped with a warning).
        """
        try:
            data, where = read_json(source)
        except ValueError as err:
            raise ValueError(f"EmergenceInit.from_json: {err}") from None
        if isinstance(data, dict) and ("model_type" in data or "architectures" in data):   # a model's config.json
            if not isinstance(data.get("emergence_init"), dict):
                raise ValueError(f"{where or 'the text'} is a model config with no emergence_init settings "
                                 "(the model was not built with the init)")
            data = data["emergence_init"]
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as err:
            if not where:
                raise
            raise type(err)(f"{where}: {err}") from None

    # ---- planning and applying --------------------------------------------------------------------
    def plan(self, model: nn.Module, example_inputs: Optional[ExampleInputs] = None) -> EmergencePlan:
        """The per-tensor plan for ``model``, from names and shapes only (works on the meta device).

        ``example_inputs`` (a tensor, tuple of args or dict of kwargs) is used to trace the forward
        order of models that are not in the registry.
        """
        target = unwrap_model(model)
        layout = discover(target, example_inputs)
        shapes: dict[str, tuple[int, ...]] = {}
        aliases: dict[str, list[str]] = {}
        first_name: dict[int, str] = {}
        for name, p in target.named_parameters(remove_duplicate=False):
            canonical = first_name.setdefault(id(p), name)
            if canonical == name:
                shapes[name] = logical_shape(p)
            else:
                aliases.setdefault(canonical, []).append(name)
        try:
            plan = build_plan(layout, self.to_dict(), shapes, {k: tuple(v) for k, v in aliases.items()},
                              type(target).__name__)
        except ValueError as err:  # e.g. a pivot outside a chain
            raise PlanError(f"cannot plan {type(target).__name__}: {err}") from None
        _check_chains(plan, type(target).__name__, layout.source)
        return plan

    @torch.no_grad()
    def apply(self, model: nn.Module, *, force: bool = False, example_inputs: Optional[ExampleInputs] = None,
              generator: Optional[torch.Generator] = None) -> EmergencePlan:
        """Base-initialise and rescale ``model`` in place (no copy; no extra full-model memory).

        Returns the plan, also stored as ``model.emergence_plan``; the record (settings, ``applied`` and a
        fingerprint of the weights, :mod:`hf_emergence.record`) goes to ``config.emergence_init`` (saved to
        config.json), or to ``model.emergence_init`` for a plain module. Applying twice raises
        :class:`AlreadyAppliedError` unless ``force=True``. A plan whose factors over- or underflow in a
        tensor's dtype is refused before anything is changed. FSDP2 (DTensor) parameters are drawn as the
        full tensor would be and sliced per rank, so every rank must hold the same RNG state (checked).
        """
        target = unwrap_model(model)
        on_meta = [n for n, p in target.named_parameters() if p.is_meta]
        if on_meta:
            raise ValueError(
                f"apply() needs real weights, but {len(on_meta)} parameter(s) of {type(target).__name__} are on the meta device "
                f"(e.g. {on_meta[0]!r}); materialise the model first, or compute .plan(model) and apply it per shard "
                "with plan.apply_to_state_dict_()")
        reason = None if force else already_applied(target)
        if reason:
            raise AlreadyAppliedError(f"{type(target).__name__} already carries the emergence init ({reason}); "
                                      "pass force=True to apply it again on top")
        plan = self.plan(target, example_inputs)
        params = dict(target.named_parameters())
        plan.check_factors({e.name: params[e.name].dtype for e in plan})
        if plan.base_init != "keep" and any(is_dtensor(params[e.name]) for e in plan):
            check_same_rng(generator)
        for entry in plan:
            param = params[entry.name]
            with writable(param):
                plan.apply_entry_(entry, param.data, reinit=True, generator=generator)
        target.emergence_plan = plan
        record_applied(target, self.to_dict(), plan)
        return plan


#: The setting names, in declaration order (the fields of :class:`EmergenceInit`).
SETTING_NAMES: tuple[str, ...] = tuple(f.name for f in fields(EmergenceInit))


def _check_chains(plan: EmergencePlan, model_name: str, source: str) -> None:
    """One rule for single layers: a plan needs a chain of >= 2 layers, else nothing would be scaled.

    A chain's only layer gets k = 0. When every chain has one layer (one weight layer in all, or one
    layer per chain, as with ALBERT's single shared layer), the init would change nothing, so it is
    refused rather than recorded as applied. Weight sharing across depth cannot follow the rule: one
    tensor used at every depth cannot carry a different factor alpha**k per depth.
    """
    if not plan.chains or max(plan.chains.values()) < 2:
        counts = ", ".join(f"{c}: {n}" for c, n in plan.chains.items()) or "none"
        n_layers = sum(plan.chains.values())
        raise PlanError(
            f"{model_name} has {n_layers} weight layer(s) to scale and no chain of 2 or more (chains {counts}; found via "
            f"{source}): the emergence init needs at least 2 in a chain, since a chain's only layer gets k=0 and nothing "
            "would be scaled (a layer shared across depth, as in ALBERT, is one layer: one tensor cannot carry a "
            "different alpha**k per depth); layer_unit='matrix' numbers each weight matrix instead")
    single = [c for c, n in plan.chains.items() if n == 1]
    for chain in single:
        warn(f"chain {chain!r} of {model_name} has a single layer: it gets k=0 and is not scaled")
    if single:
        plan.notes.append(f"chain(s) {', '.join(single)} have a single layer: k=0, not scaled (a layer shared across "
                          "depth counts once: one tensor cannot carry a different alpha**k per depth)")
