"""Measuring what the init does: per-layer activation statistics, the emergence score E, a safe alpha.

Everything here measures and returns data; nothing prints or plots (``str()`` of a result is a table,
``to_records`` gives long-format rows for a DataFrame).

**Layers** are the rows of an :class:`~hf_emergence.EmergencePlan` (``plan.layers()``), one per
(chain, layer). The plan is the ``plan=`` argument if given, else ``model.emergence_plan`` (set by
``EmergenceInit.apply``), else ``EmergenceInit(alpha=1, base_init="keep").plan(model)`` (same layers and
k, factor 1: the model carries no scaling). Unregistered models are traced with ``example_inputs``,
by default the batch itself.

**Neurons of a layer.** Each layer is measured at one module, its *probed module*: the module owning
its first plan entry with role ``"ffn"`` (a Transformer block's fc1 / wi / c_fc: the block's hidden
neurons), else its first entry (a single conv / linear layer; a shortcut sharing the layer comes after it).
Its neurons are

* for a ConvNd output (N, C, *spatial): the C channels, a neuron's value per sample being its mean over
  spatial positions;
* otherwise (Linear-like output (..., D)): the D features, a neuron's value per sample (first dim) being
  its mean over the remaining leading dims (tokens). When the batch holds an ``attention_mask`` (B, T)
  and the output is (B, T, D), padding positions are left out of that mean (and of ``mean_abs`` /
  ``in_abs``); a chain named ``*decoder*`` uses ``decoder_attention_mask`` when the batch has one.

A neuron's activity is measured after a nonlinearity ``activation`` (default ReLU). By default
(``neurons_at="after_batchnorm"``) a probed module whose output goes straight into a BatchNorm is read
after that BatchNorm: that is what the next layer sees, and with batch statistics it does not change
with the layer's own scale, so alpha**k of such a layer is not counted as activity the network never
sees. ``neurons_at="output"`` reads the probed module's own output (before its BatchNorm), as
hf_emergence 0.1.0 did. A neuron's batch value is the mean over samples; it is *active* if that value
exceeds ``threshold`` (0.05, method.md 2.3), or, with ``all_samples=True``, if every sample's value does.

**Emergence** (method.md 2.2-2.4). With n_l neurons and a_l active neurons in layer l = 1..N of a chain,
treating consecutive layers as fully connected, the number of paths from an inactive neuron into the
active sub-network up to the chain's last layer is

    E_chain = sum_{l=1}^{N-1} (n_l - a_l) * prod_{j=l+1}^{N} a_j ,     E = sum over chains.

Its maximum at fixed widths takes each term at its own maximum (layer l wholly inactive, all later
layers wholly active): E_max = sum_chains sum_{l=1}^{N-1} n_l * prod_{j>l} n_j, and
``normalised = E / E_max`` in [0, 1]. ``relative = E / (trainable parameters)`` is AlShinaifi et al.'s
"E / model params" normaliser. E is an exact Python int; ratios use exact int division.

**Modes.** During a measurement every module is in eval mode (no dropout) except BatchNorm layers,
which by default (``bn_stats="batch"``) use batch statistics as in training, since with fresh
running statistics (mean 0, var 1) an eval-mode BatchNorm does not normalise; their running buffers are
restored afterwards. ``bn_stats="running"`` keeps them in eval mode. Every module's training flag is
restored; no parameter, buffer or ``.grad`` of the caller's model is changed.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
import torch.nn as nn

from .distributed import unwrap_model
from .emergence_init import EmergenceInit
from .record import already_applied
from .plan import EmergencePlan, PlanEntry
from .schedule import scale_factor
from ._text import text_table
from .tracing import ExampleInputs

__all__ = ["ActivationProfile", "EmergenceScore", "SuggestedAlpha", "activation_profile", "emergence", "suggest_alpha",
           "STATS", "NEURONS_AT"]

Batch = Union[torch.Tensor, tuple, list, Mapping]
Activation = Callable[[torch.Tensor], torch.Tensor]

#: Per-layer statistics of :func:`activation_profile`, in column order.
STATS: dict[str, str] = {
    "mean_abs": "mean |probed module output| over all output elements (before the nonlinearity and any BatchNorm)",
    "in_abs": "mean |probed module input|: the signal the layer receives",
    "active_fraction": "fraction of neurons whose batch-mean activation exceeds the threshold",
    "weight_std": "std of the probed module's planned weight",
    "grad_norm": "L2 norm of d loss / d weight of the probed module after one backward pass",
}
BN_STATS = ("batch", "running")
#: Where a layer's neurons are read: after the BatchNorm that directly follows the probed module, or its output.
NEURONS_AT = ("after_batchnorm", "output")


# ---- results ----------------------------------------------------------------------------------------

@dataclass
class ActivationProfile:
    """One row per plan layer (plan order): identity columns plus the :data:`STATS`."""

    rows: list[dict[str, Any]] = field(default_factory=list)

    def to_records(self, **tags: Any) -> list[dict[str, Any]]:
        """Long format, one record per (layer, stat): ``{**tags, chain, layer, block, k, stat, value}``."""
        return [{**tags, "chain": r["chain"], "layer": r["layer"], "block": r["block"], "k": r["k"],
                 "stat": stat, "value": r[stat]} for r in self.rows for stat in STATS]

    def __str__(self) -> str:
        cols = ["chain", "layer", "block", "probe", "k", "factor", "n"] + list(STATS)
        return _table(cols, self.rows)


@dataclass
class EmergenceScore:
    """E over the layered graph of neurons (see the module docstring for every definition).

    ``E``, ``E_max`` and ``per_chain`` are exact ints; ``log10_E`` is ``-inf`` when E == 0;
    ``normalised`` is ``nan`` when E_max == 0 (only single-layer chains); ``params`` is the number of
    trainable parameters used by ``relative``.
    """

    E: int
    log10_E: float
    relative: float
    normalised: float
    per_layer: list[dict[str, Any]]
    threshold: float
    all_samples: bool
    E_max: int = 0
    params: int = 0
    per_chain: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable: the big ints as decimal strings, the rest as floats / lists."""
        return {"E": str(self.E), "log10_E": float(self.log10_E), "relative": float(self.relative),
                "normalised": float(self.normalised), "E_max": str(self.E_max), "params": self.params,
                "per_chain": {c: str(e) for c, e in self.per_chain.items()},
                "per_layer": [dict(r) for r in self.per_layer], "threshold": self.threshold,
                "all_samples": self.all_samples}

    def __str__(self) -> str:
        rule = "every sample" if self.all_samples else "batch mean"
        head = (f"emergence E = {_fmt_int(self.E)} (log10 {self.log10_E:.4g}); relative E/params = "
                f"{self.relative:.4g} ({self.params:,} params); normalised E/E_max = {self.normalised:.4g}; "
                f"active: {rule} > {self.threshold:g}")
        return head + "\n" + _table(["chain", "layer", "block", "k", "n", "a"], self.per_layer)


# ---- public functions -------------------------------------------------------------------------------

def activation_profile(model: nn.Module, batch: Batch, *, plan: Optional[EmergencePlan] = None,
                       activation: Activation = torch.relu, loss_fn: Optional[Callable[[Any], torch.Tensor]] = None,
                       example_inputs: Optional[ExampleInputs] = None, threshold: float = 0.05,
                       bn_stats: str = "batch", neurons_at: str = "after_batchnorm") -> ActivationProfile:
    """Per-layer statistics (:data:`STATS`) from one forward and one backward pass on ``batch``.

    The loss for ``grad_norm`` is ``loss_fn(output)`` if given, else ``output.loss`` if present and not
    None, else mean(y**2) of the first output tensor y (``output.logits`` for HF outputs). Gradients
    come from ``torch.autograd.grad``, so no ``.grad`` is created or changed. For a positively
    homogeneous chain scaled by c_l = alpha**k_l: mean_abs_l scales by prod_{j<=l} c_j, grad_norm_l by
    1 / c_l (method.md 1.3-1.4).
    """
    _check_modes(bn_stats, neurons_at)
    target = unwrap_model(model)
    plan = _resolve_plan(target, plan, example_inputs, batch)
    probes = _probes(target, plan)
    stats, grads = _record(model, target, batch, probes, activation, bn_stats=bn_stats, neurons_at=neurons_at,
                           grad=True, loss_fn=loss_fn)
    rows = []
    for probe, st, g in zip(probes, stats, grads):
        means = st.per_sample().mean(0)
        rows.append({"chain": probe.chain, "layer": probe.layer, "block": probe.block, "probe": probe.module_name,
                     "k": probe.k, "factor": probe.factor, "n": int(means.numel()), "mean_abs": st.mean_abs,
                     "in_abs": st.in_abs, "active_fraction": float((means > threshold).double().mean()),
                     "weight_std": _std(probe.param),
                     "grad_norm": float(g.double().norm()) if g is not None else math.nan})
    return ActivationProfile(rows)


def emergence(model: nn.Module, batch: Batch, *, threshold: float = 0.05, all_samples: bool = False,
              plan: Optional[EmergencePlan] = None, activation: Activation = torch.relu,
              example_inputs: Optional[ExampleInputs] = None, bn_stats: str = "batch",
              neurons_at: str = "after_batchnorm") -> EmergenceScore:
    """The emergence E of ``model`` on ``batch``: one forward pass under ``no_grad``.

    E_chain = sum_{l<N} (n_l - a_l) prod_{j>l} a_j, summed over chains (module docstring).
    """
    _check_modes(bn_stats, neurons_at)
    target = unwrap_model(model)
    plan = _resolve_plan(target, plan, example_inputs, batch)
    probes = _probes(target, plan)
    stats, _ = _record(model, target, batch, probes, activation, bn_stats=bn_stats, neurons_at=neurons_at, grad=False)
    per_layer, by_chain = [], {}
    for probe, st in zip(probes, stats):
        values = st.per_sample()
        active = (values > threshold).all(0) if all_samples else values.mean(0) > threshold
        row = {"chain": probe.chain, "layer": probe.layer, "block": probe.block, "k": probe.k,
               "n": int(active.numel()), "a": int(active.sum())}
        per_layer.append(row)
        by_chain.setdefault(probe.chain, []).append(row)
    per_chain, e_max = {}, 0
    for chain, rows in by_chain.items():
        rows = sorted(rows, key=lambda r: r["layer"])
        ns, as_ = [r["n"] for r in rows], [r["a"] for r in rows]
        per_chain[chain] = path_count(ns, as_)
        e_max += path_count(ns, [0] * len(ns), ns)
    e = sum(per_chain.values())
    params = sum(p.numel() for p in target.parameters() if p.requires_grad)
    return EmergenceScore(E=e, log10_E=math.log10(e) if e > 0 else -math.inf, relative=_ratio(e, params),
                          normalised=_ratio(e, e_max) if e_max > 0 else math.nan, per_layer=per_layer,
                          threshold=float(threshold), all_samples=bool(all_samples), E_max=e_max, params=params,
                          per_chain=per_chain)


def path_count(n: list[int], a: list[int], a_later: Optional[list[int]] = None) -> int:
    """sum_{l=1}^{N-1} (n_l - a_l) * prod_{j=l+1}^{N} a'_j with a' = ``a_later`` (default ``a``), exactly.

    ``path_count(n, a)`` is one chain's E; ``path_count(n, [0]*N, n)`` its maximum E_max.
    """
    a_later = a if a_later is None else a_later
    total, suffix = 0, 1
    for l in range(len(n) - 1, 0, -1):          # suffix = prod_{j >= l} a'_j (0-based), term for l - 1
        suffix *= int(a_later[l])
        total += (int(n[l - 1]) - int(a[l - 1])) * suffix
    return total


class SuggestedAlpha(float):
    """The alpha :func:`suggest_alpha` found (a float), with the bound that decided it.

    ``bound``: ``"alpha_max"`` (every check passed up to it), ``"input"`` (a layer's input fell below
    ``min_scale`` of its alpha=1 value), ``"active"`` (a layer's active fraction fell below ``min_active``
    of its alpha=1 value) or ``"input+active"`` (both, at the same alpha); ``min_active`` is the fraction
    used (``None``: the active-fraction bound was off).
    """

    bound: str
    min_active: Optional[float]

    def __new__(cls, value: float, bound: str, min_active: Optional[float]) -> "SuggestedAlpha":
        obj = super().__new__(cls, value)
        obj.bound, obj.min_active = bound, min_active
        return obj

    def __repr__(self) -> str:
        return f"SuggestedAlpha({float(self)!r}, bound={self.bound!r}, min_active={self.min_active!r})"


def suggest_alpha(model: nn.Module, batch: Batch, *, min_scale: float = 0.1, alpha_max: float = 2.0,
                  tol: float = 1e-3, init: Optional[EmergenceInit] = None, plan: Optional[EmergencePlan] = None,
                  example_inputs: Optional[ExampleInputs] = None, bn_stats: str = "batch",
                  min_active: Union[float, str, None] = "auto", threshold: float = 0.05,
                  neurons_at: str = "after_batchnorm") -> SuggestedAlpha:
    """Largest alpha in [1, alpha_max] (to within ``tol``) keeping every layer's input signal and active neurons.

    With the schedule of ``init`` (its alpha ignored; the model's current weights are the base, i.e.
    ``base_init="keep"``) at a candidate alpha:

    * input bound: the mean |input| of every planned layer's probed module must stay >= ``min_scale``
      times its value at alpha = 1 (layers whose value at alpha = 1 is 0 are skipped). For a bias-free
      ReLU chain the input of layer l scales by prod_{j<l} alpha**k_j, so this bounds the U-shaped
      shrink alpha**(-n(n+1)/2) of method.md 1.4 (the input, not the output, so that a layer's own
      factor, harmless before a normalisation, does not count);
    * active bound (``min_active``, a fraction in (0, 1]): every layer's active fraction (as in
      :func:`emergence`) must stay >= ``min_active`` times its value at alpha = 1. Where layers see
      normalised inputs the input bound rarely binds while the first blocks' FFN neurons die, so
      ``min_active="auto"`` (the default) is 0.5 for a model with normalisation layers (LayerNorm,
      BatchNorm, GroupNorm, RMSNorm) and ``None`` (off) for one without (plain ReLU MLPs / CNNs).

    Returns a :class:`SuggestedAlpha`: the alpha, which bound decided it, and the ``min_active`` used.
    Bisection on a deep copy: 2 + ceil(log2((alpha_max - 1) / tol)) forward passes; ``model`` is never modified.
    """
    if not (_is_real(min_scale) and 0 < min_scale <= 1):
        raise ValueError(f"min_scale={min_scale!r} is invalid: expected a fraction in (0, 1], e.g. 0.1")
    if not (_is_real(alpha_max) and math.isfinite(alpha_max) and alpha_max > 1):
        raise ValueError(f"alpha_max={alpha_max!r} is invalid: expected a finite number > 1, e.g. 2.0")
    if not (_is_real(tol) and tol > 0):
        raise ValueError(f"tol={tol!r} is invalid: expected a number > 0, e.g. 1e-3")
    if min_active is not None and min_active != "auto" and not (_is_real(min_active) and 0 < min_active <= 1):
        raise ValueError(f"min_active={min_active!r} is invalid: expected 'auto', None or a fraction in (0, 1], e.g. 0.5")
    _check_modes(bn_stats, neurons_at)
    target = unwrap_model(model)
    reason = already_applied(target)
    if reason:
        raise ValueError(f"{type(target).__name__} already carries the emergence init ({reason}); "
                         "call suggest_alpha on the model before applying it")
    if min_active == "auto":
        min_active = 0.5 if any(_is_norm(m) for m in target.modules()) else None
    work = copy.deepcopy(target)
    if plan is None:
        init = EmergenceInit(base_init="keep") if init is None else init
        plan = dataclasses.replace(init, alpha=1.0, base_init="keep").plan(
            work, example_inputs if example_inputs is not None else batch)
    mode = plan.settings.get("scale_mode", "weight")
    scaled = [(work.get_parameter(e.name), e.k) for e in plan.entries if e.k is not None]
    probes = _probes(work, plan)

    def measure() -> list[tuple[float, float]]:
        """(mean |input|, active fraction) per layer."""
        stats, _ = _record(work, work, batch, probes, torch.relu, bn_stats=bn_stats, neurons_at=neurons_at, grad=False)
        return [(st.in_abs, float((st.per_sample().mean(0) > threshold).double().mean())) for st in stats]

    current = 1.0

    @torch.no_grad()
    def failing(alpha: float) -> str:
        """Which bounds fail at ``alpha`` ("" when every one holds)."""
        nonlocal current
        for param, k in scaled:                      # rescale by the factor ratio: no second copy
            param.mul_(scale_factor(alpha, k, mode) / scale_factor(current, k, mode))
        current = alpha
        now = measure()
        inputs_ok = all(x >= min_scale * b for (x, _), (b, _) in zip(now, base) if b > 0)
        active_ok = min_active is None or all(a >= min_active * b for (_, a), (_, b) in zip(now, base))
        return "+".join(name for name, ok in (("input", inputs_ok), ("active", active_ok)) if not ok)

    base = measure()
    bound = failing(float(alpha_max))
    if not bound:
        return SuggestedAlpha(float(alpha_max), "alpha_max", min_active)
    lo, hi = 1.0, float(alpha_max)
    while hi - lo > tol:                             # invariant: lo passes, hi fails (for the reason ``bound``)
        mid = (lo + hi) / 2
        why = failing(mid)
        if why:
            hi, bound = mid, why
        else:
            lo = mid
    return SuggestedAlpha(lo, bound, min_active)


# ---- internals --------------------------------------------------------------------------------------

@dataclass
class _Probe:
    """Where one plan layer is measured: its probed module and planned weight."""

    chain: str
    layer: int
    block: str
    k: Any
    factor: float
    module_name: str
    module: nn.Module
    param: torch.Tensor


class _Stats:
    """Running sums for one probed module over every call in the forward pass."""

    def __init__(self) -> None:
        self.out_sum = self.in_sum = 0.0
        self.out_count = self.in_count = 0
        self.samples: list[torch.Tensor] = []

    @property
    def mean_abs(self) -> float:
        return self.out_sum / self.out_count if self.out_count else math.nan

    @property
    def in_abs(self) -> float:
        return self.in_sum / self.in_count if self.in_count else math.nan

    def per_sample(self) -> torch.Tensor:
        """(samples, neurons) float64: each neuron's activation averaged over a sample's positions."""
        return torch.cat(self.samples, 0)


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)) or \
        type(module).__name__.endswith(("LayerNorm", "RMSNorm", "GroupNorm", "BatchNorm"))


def _check_modes(bn_stats: str, neurons_at: str) -> None:
    if bn_stats not in BN_STATS:
        raise ValueError(f"bn_stats={bn_stats!r} is not one of: {', '.join(BN_STATS)}")
    if neurons_at not in NEURONS_AT:
        raise ValueError(f"neurons_at={neurons_at!r} is not one of: {', '.join(NEURONS_AT)}")


def _resolve_plan(target: nn.Module, plan: Optional[EmergencePlan], example_inputs: Optional[ExampleInputs],
                  batch: Batch) -> EmergencePlan:
    if plan is not None:
        return plan
    own = getattr(target, "emergence_plan", None)
    if own is not None:
        return own
    return EmergenceInit(alpha=1.0, base_init="keep").plan(target, example_inputs if example_inputs is not None else batch)


def _probes(target: nn.Module, plan: EmergencePlan) -> list[_Probe]:
    """The probed module of every plan layer, in plan order (first "ffn" entry, else first entry)."""
    by_layer: dict[tuple[str, int], list[PlanEntry]] = {}
    for e in plan.entries:
        if e.layer is not None:
            by_layer.setdefault((e.chain, e.layer), []).append(e)
    probes = []
    for row in plan.layers():
        entries = by_layer[(row["chain"], row["layer"])]
        entry = next((e for e in entries if e.role == "ffn"), entries[0])
        module_name = entry.name.rpartition(".")[0].removesuffix(".parametrizations.weight")  # weight norm: the layer
        try:
            param, module = target.get_parameter(entry.name), target.get_submodule(module_name)
        except AttributeError:
            raise ValueError(f"the plan does not match {type(target).__name__}: it has no parameter {entry.name!r}") from None
        probes.append(_Probe(row["chain"], row["layer"], row["block"], row["k"], row["factor"], module_name, module, param))
    return probes


def _first_tensor(obj: Any) -> Optional[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return obj
    logits = getattr(obj, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    values = obj.values() if isinstance(obj, Mapping) else obj if isinstance(obj, (tuple, list)) else ()
    for v in values:
        t = _first_tensor(v)
        if t is not None:
            return t
    return None


def _positions(z: torch.Tensor, mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The (B, T) float mask of real tokens when ``z`` is (B, T, ...) and ``mask`` is (B, T), else ``None``."""
    if mask is None or z.dim() < 3 or tuple(z.shape[:2]) != tuple(mask.shape):
        return None
    return mask.to(device=z.device, dtype=torch.float64)


def _neuron_values(z: torch.Tensor, conv: bool, batched: bool, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """(samples, neurons) float64 per-sample neuron means of a post-activation output ``z`` (padding left out)."""
    if conv:
        z = z if batched else z.unsqueeze(0)
        return z.flatten(2).mean(2, dtype=torch.float64)
    if z.dim() == 1:
        return z.unsqueeze(0).to(torch.float64)
    if mask is not None:
        weights = mask.flatten(1)                                          # (B, T)
        summed = (z.reshape(z.shape[0], -1, z.shape[-1]).double() * weights[..., None]).sum(1)
        return summed / weights.sum(1, keepdim=True).clamp_min(1.0)
    return z.reshape(z.shape[0], -1, z.shape[-1]).mean(1, dtype=torch.float64)


def _abs_sum(t: torch.Tensor, mask: Optional[torch.Tensor]) -> tuple[float, int]:
    """(sum |t|, count) over the real-token positions of ``t`` (all positions without a mask)."""
    if mask is None:
        return float(t.abs().sum(dtype=torch.float64)), t.numel()
    inner = t[0, 0].numel()
    weights = mask.reshape(*mask.shape, *([1] * (t.dim() - 2)))
    return float((t.double().abs() * weights).sum()), int(mask.sum()) * inner


def _masks(batch: Batch) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(attention_mask, decoder_attention_mask) of a dict batch."""
    if not isinstance(batch, Mapping):
        return None, None
    found = [batch.get(k) for k in ("attention_mask", "decoder_attention_mask")]
    return tuple(m if isinstance(m, torch.Tensor) and m.dim() == 2 else None for m in found)  # type: ignore[return-value]


def _call(model: nn.Module, batch: Batch) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _loss(output: Any, loss_fn: Optional[Callable[[Any], torch.Tensor]]) -> Optional[torch.Tensor]:
    if loss_fn is not None:
        return loss_fn(output)
    loss = getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    y = _first_tensor(output)
    return None if y is None else y.float().pow(2).mean()


def _record(model: nn.Module, target: nn.Module, batch: Batch, probes: list[_Probe], activation: Activation, *,
            bn_stats: str, neurons_at: str, grad: bool, loss_fn: Optional[Callable[[Any], torch.Tensor]] = None
            ) -> tuple[list[_Stats], list[Optional[torch.Tensor]]]:
    """One forward pass (plus ``torch.autograd.grad`` when ``grad``) with hooks on the probed modules.

    With ``neurons_at="after_batchnorm"``, a BatchNorm called on a probed module's output tensor replaces
    that call's neuron values by those of its own output.
    """
    stats: dict[int, _Stats] = {id(p.module): _Stats() for p in probes}
    modules = {id(p.module): p.module for p in probes}
    chain_of = {id(p.module): p.chain for p in probes}
    encoder_mask, decoder_mask = _masks(batch)
    pending: dict[int, tuple[torch.Tensor, _Stats, Optional[torch.Tensor]]] = {}   # output id -> (output, stats, mask)

    def probe_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        st = stats[id(module)]
        with torch.no_grad():
            y = _first_tensor(output)
            if y is None:
                return
            mask_source = decoder_mask if "decoder" in chain_of[id(module)] and decoder_mask is not None else encoder_mask
            x = _first_tensor(list(args) + list(kwargs.values()))
            if x is not None and x.is_floating_point():
                total, count = _abs_sum(x.detach(), _positions(x, mask_source))
                st.in_sum, st.in_count = st.in_sum + total, st.in_count + count
            mask = _positions(y, mask_source)
            total, count = _abs_sum(y.detach(), mask)
            st.out_sum, st.out_count = st.out_sum + total, st.out_count + count
            conv = isinstance(module, nn.modules.conv._ConvNd)
            st.samples.append(_neuron_values(activation(y.detach()), conv, conv and y.dim() == module.weight.dim(), mask))
            if neurons_at == "after_batchnorm":
                pending[id(y)] = (y, st, mask)

    def norm_hook(module: nn.Module, args: tuple, output: Any) -> None:
        found = pending.pop(id(args[0]), None) if args else None
        if found is None or not isinstance(output, torch.Tensor):
            return
        _, st, mask = found
        conv = output.dim() > 2                                   # BatchNorm{2,3}d, or 1d over (N, C, L)
        with torch.no_grad():
            st.samples[-1] = _neuron_values(activation(output.detach()), conv, conv, mask)

    training = [(m, m.training) for m in model.modules()]
    bn_buffers: list[tuple[torch.Tensor, torch.Tensor]] = []
    handles = []
    try:
        model.eval()
        batchnorms = [m for m in target.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if bn_stats == "batch":
            for m in batchnorms:
                m.train()
                bn_buffers.extend((b, b.detach().clone()) for b in m.buffers(recurse=False))
        handles = [m.register_forward_hook(probe_hook, with_kwargs=True) for m in modules.values()]
        if neurons_at == "after_batchnorm":
            handles += [m.register_forward_hook(norm_hook) for m in batchnorms]
        params = list({id(p.param): p.param for p in probes if p.param.requires_grad}.values())
        grads: dict[int, Optional[torch.Tensor]] = {}
        with torch.set_grad_enabled(grad and bool(params)):
            output = _call(model, batch)
            pending.clear()
            if grad and params:
                loss = _loss(output, loss_fn)
                if loss is not None and loss.requires_grad:
                    got = torch.autograd.grad(loss, params, allow_unused=True)
                    grads = {id(p): g for p, g in zip(params, got)}
    finally:
        pending.clear()
        for h in handles:
            h.remove()
        with torch.no_grad():
            for buf, saved in bn_buffers:
                buf.copy_(saved)
        for m, mode in training:
            m.training = mode
    out = []
    for p in probes:
        st = stats[id(p.module)]
        if not st.samples:
            raise ValueError(f"layer {p.layer} of chain {p.chain!r}: its probed module {p.module_name!r} did not run "
                             "in the forward pass on this batch (does the batch hold every input the model needs?)")
        out.append(st)
    return out, [grads.get(id(p.param)) for p in probes]


def _std(param: torch.Tensor) -> float:
    return float(param.detach().double().std()) if param.numel() > 1 else math.nan


def _ratio(a: int, b: int) -> float:
    """a / b for ints of any size (exact rounding; inf if the quotient exceeds the float range)."""
    if a == 0:
        return 0.0
    try:
        return a / b
    except OverflowError:
        return math.inf


def _fmt_int(e: int) -> str:
    """Exact with separators below 1e15, else d.ddde<exponent> (no float conversion, no overflow)."""
    if e < 10 ** 15:
        return f"{e:,}"
    digits = str(e)
    return f"{digits[0]}.{digits[1:4]}e{len(digits) - 1}"


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "-" if v is None else str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _table(cols: list[str], rows: list[dict[str, Any]]) -> str:
    """Aligned text table of ``rows`` (dicts) in column order ``cols``."""
    return text_table(cols, [[_fmt(r.get(c)) for c in cols] for r in rows])
