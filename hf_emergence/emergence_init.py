"""``EmergenceInit``: the settings of the emergence-promoting initialisation, and the call that applies it.

After a standard initialisation, the L weight layers of each chain are numbered around the pivot,
k = -n..n, and layer k's weight is multiplied by alpha**k: early layers shrink, late layers grow
(Li, George & Silva, arXiv 2407.19044). Biases, norm layers and embeddings are never touched.

    plan = EmergenceInit(alpha=1.2, base_init="xavier_uniform").apply(model)
    print(plan)
"""

from __future__ import annotations

import contextlib
import math
import numbers
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ContextManager, Optional

from ._warnings import warn
import torch
import torch.nn as nn

from .architectures import discover
from .base_init import BASE_INITS
from .layout import LAYER_UNITS, UNSCALED_ROLES, logical_shape
from .plan import EmergencePlan, build_plan
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
#: Keys written to ``config.emergence_init`` next to the settings.
METADATA_KEYS = ("applied", "hf_emergence_version")


class AlreadyAppliedError(RuntimeError):
    """Raised when the init is applied to a model whose weights already carry it."""


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
        exclude: regular expressions; matching parameter names are neither re-initialised nor scaled.
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
        if isinstance(self.exclude, str):
            self.exclude = [self.exclude]
        self.exclude = list(self.exclude)
        for pattern in self.exclude:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as err:
                raise ValueError(f"exclude pattern {pattern!r} is not a valid regular expression: {err}") from None

    # ---- serialisation ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-serialisable dict (what ``config.emergence_init`` stores)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EmergenceInit":
        """Rebuild from ``to_dict()`` output or a saved ``config.emergence_init``.

        Metadata keys are ignored; unknown keys (written by a newer version) are dropped with a warning;
        values renamed since (``chain="stacks"``) are read under their current name.
        """
        if not isinstance(d, dict):
            raise TypeError(f"emergence_init settings must be a dict, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names - set(METADATA_KEYS))
        if unknown:
            warn(f"ignoring unknown emergence_init setting(s) {', '.join(unknown)} (written by a newer hf_emergence?)")
        settings = {k: LEGACY_VALUES.get(k, {}).get(v, v) if isinstance(v, str) else v for k, v in d.items() if k in names}
        return cls(**settings)

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
            raise ValueError(f"cannot plan {type(target).__name__}: {err}") from None
        n_layers = sum(plan.chains.values())
        if n_layers < 2:
            raise ValueError(f"{type(target).__name__} has {n_layers} weight layer(s) to scale (found via {layout.source}); "
                             "the emergence init needs at least 2 (a chain of Linear/Conv layers)")
        for chain, n in plan.chains.items():
            if n == 1:
                warn(f"chain {chain!r} of {type(target).__name__} has a single layer: it gets k=0 and is not scaled")
        return plan

    @torch.no_grad()
    def apply(self, model: nn.Module, *, force: bool = False, example_inputs: Optional[ExampleInputs] = None,
              generator: Optional[torch.Generator] = None) -> EmergencePlan:
        """Base-initialise and rescale ``model`` in place (no copy; no extra full-model memory).

        Returns the plan, also stored as ``model.emergence_plan``; a ``PreTrainedModel`` also gets the
        settings in ``config.emergence_init`` (saved to config.json). Applying twice raises
        :class:`AlreadyAppliedError` unless ``force=True``.
        """
        target = unwrap_model(model)
        on_meta = [n for n, p in target.named_parameters() if p.is_meta]
        if on_meta:
            raise ValueError(
                f"apply() needs real weights, but {len(on_meta)} parameter(s) of {type(target).__name__} are on the meta device "
                f"(e.g. {on_meta[0]!r}); materialise the model first, or compute .plan(model) and apply it per shard "
                "with plan.apply_to_state_dict_()")
        reason = already_applied(target)
        if reason and not force:
            raise AlreadyAppliedError(f"{type(target).__name__} already carries the emergence init ({reason}); "
                                      "pass force=True to apply it again on top")
        plan = self.plan(target, example_inputs)
        params = dict(target.named_parameters())
        for entry in plan:
            param = params[entry.name]
            with _writable(param):
                plan.apply_entry_(entry, param.data, reinit=True, generator=generator)
        target.emergence_plan = plan
        record_in_config(target, self)
        return plan


#: The setting names, in declaration order (the fields of :class:`EmergenceInit`).
SETTING_NAMES: tuple[str, ...] = tuple(f.name for f in fields(EmergenceInit))


def unwrap_model(model: nn.Module) -> nn.Module:
    """The underlying module of DataParallel / DistributedDataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def already_applied(model: nn.Module) -> Optional[str]:
    """Why ``model``'s weights already carry the init, or ``None``.

    True for a model that went through :meth:`EmergenceInit.apply` in this process, and for one loaded
    by ``from_pretrained`` from a checkpoint whose ``config.emergence_init`` says ``applied`` (loaded
    parameters carry transformers' ``_is_hf_initialized`` flag; a fresh ``from_config`` build does not).
    """
    if getattr(model, "emergence_plan", None) is not None:
        return "EmergenceInit.apply already ran on this model object"
    spec = getattr(getattr(model, "config", None), "emergence_init", None)
    if isinstance(spec, dict) and spec.get("applied") and any(getattr(p, "_is_hf_initialized", False) for p in model.parameters()):
        return "its weights were loaded from a checkpoint whose config.emergence_init records the init"
    return None


def record_in_config(model: nn.Module, init: EmergenceInit) -> None:
    """Store the settings in ``model.config.emergence_init`` (saved to config.json) for HF models."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return
    from . import __version__

    config.emergence_init = {**init.to_dict(), "applied": True, "hf_emergence_version": __version__}


def _writable(param: torch.Tensor) -> ContextManager:
    """Gather a DeepSpeed ZeRO-3 partitioned parameter for in-place edits (a no-op otherwise)."""
    if hasattr(param, "ds_id"):
        import deepspeed  # only reachable when the parameter was partitioned by DeepSpeed

        return deepspeed.zero.GatheredParameters([param], modifier_rank=0)
    return contextlib.nullcontext()
