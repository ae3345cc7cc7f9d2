"""Measuring what the init does: per-layer activation statistics, the emergence score E, a safe alpha.

Everything here measures and returns data; nothing prints or plots (``str()`` of a result is a table,
``to_records`` gives long-format rows for a DataFrame).

**Layers** are the rows of an :class:`~hf_emergence.EmergencePlan` (``plan.layers()``), one per
(chain, layer). The plan is the ``plan=`` argument if given, else ``model.emergence_plan`` (set by
``EmergenceInit.apply``), else ``EmergenceInit(alpha=1, base_init="keep").plan(model)`` (same layers and
k, factor 1: the model carries no scaling). Unregistered models are traced with ``example_inputs``,
by default the batch itself.

**Units of a layer.** The *unit module* of a layer is the module owning its first plan entry with role
``"ffn"`` (a Transformer block's fc1 / wi / c_fc: the block's hidden neurons), else its first entry (a
single conv / linear layer: a matrix unit; a shortcut sharing the layer comes after it). Its units are

* for a ConvNd output (N, C, *spatial): the C channels, a unit's value per sample being its mean over
  spatial positions;
* otherwise (Linear-like output (..., D)): the D features, a unit's value per sample (first dim) being
  its mean over the remaining leading dims (tokens).

A unit's activity is measured after a nonlinearity ``activation`` (default ReLU) applied to the unit
module's output; its batch value is the mean over samples (= mean over all leading / spatial
positions). A unit is *active* if that value exceeds ``threshold`` (0.05, method.md 2.3), or, with
``all_samples=True``, if every sample's value does.

**Emergence** (method.md 2.2-2.4). With n_l units and a_l active units in layer l = 1..N of a chain,
treating consecutive layers as fully connected, the number of paths from an inactive unit into the
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

from .emergence_init import EmergenceInit, already_applied, unwrap_model
from .plan import EmergencePlan, PlanEntry
from .schedule import scale_factor
from ._text import text_table
from .tracing import ExampleInputs

__all__ = ["ActivationProfile", "EmergenceScore", "activation_profile", "emergence", "suggest_alpha", "STATS"]

Batch = Union[torch.Tensor, tuple, list, Mapping]
Activation = Callable[[torch.Tensor], torch.Tensor]

#: Per-layer statistics of :func:`activation_profile`, in column order.
STATS: dict[str, str] = {
    "mean_abs": "mean |unit module output| over all output elements (before the nonlinearity)",
    "in_abs": "mean |unit module input|: the signal the layer receives",
    "active_fraction": "fraction of units whose batch-mean activation(output) exceeds the threshold",
    "weight_std": "std of the unit module's planned weight",
    "grad_norm": "L2 norm of d loss / d weight of the unit module after one backward pass",
}
BN_STATS = ("batch", "running")


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
        cols = ["chain", "layer", "block", "unit", "k", "factor", "n"] + list(STATS)
        return _table(cols, self.rows)


@dataclass
class EmergenceScore:
    """E over the layered unit graph (see the module docstring for every definition).

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
                       bn_stats: str = "batch") -> ActivationProfile:
    """Per-layer statistics (:data:`STATS`) from one forward and one backward pass on ``batch``.

    The loss for ``grad_norm`` is ``loss_fn(output)`` if given, else ``output.loss`` if present and not
    None, else mean(y**2) of the first output tensor y (``output.logits`` for HF outputs). Gradients
    come from ``torch.autograd.grad``, so no ``.grad`` is created or changed. For a positively
    homogeneous chain scaled by c_l = alpha**k_l: mean_abs_l scales by prod_{j<=l} c_j, grad_norm_l by
    1 / c_l (method.md 1.3-1.4).
    """
    _check_bn_stats(bn_stats)
    target = unwrap_model(model)
    plan = _resolve_plan(target, plan, example_inputs, batch)
    units = _units(target, plan)
    stats, grads = _record(model, target, batch, units, activation, bn_stats=bn_stats, grad=True, loss_fn=loss_fn)
    rows = []
    for unit, st, g in zip(units, stats, grads):
        means = st.per_sample().mean(0)
        rows.append({"chain": unit.chain, "layer": unit.layer, "block": unit.block, "unit": unit.module_name,
                     "k": unit.k, "factor": unit.factor, "n": int(means.numel()), "mean_abs": st.mean_abs,
                     "in_abs": st.in_abs, "active_fraction": float((means > threshold).double().mean()),
                     "weight_std": _std(unit.param),
                     "grad_norm": float(g.double().norm()) if g is not None else math.nan})
    return ActivationProfile(rows)


def emergence(model: nn.Module, batch: Batch, *, threshold: float = 0.05, all_samples: bool = False,
              plan: Optional[EmergencePlan] = None, activation: Activation = torch.relu,
              example_inputs: Optional[ExampleInputs] = None, bn_stats: str = "batch") -> EmergenceScore:
    """The emergence E of ``model`` on ``batch``: one forward pass under ``no_grad``.

    E_chain = sum_{l<N} (n_l - a_l) prod_{j>l} a_j, summed over chains (module docstring).
    """
    _check_bn_stats(bn_stats)
    target = unwrap_model(model)
    plan = _resolve_plan(target, plan, example_inputs, batch)
    units = _units(target, plan)
    stats, _ = _record(model, target, batch, units, activation, bn_stats=bn_stats, grad=False)
    per_layer, by_chain = [], {}
    for unit, st in zip(units, stats):
        values = st.per_sample()
        active = (values > threshold).all(0) if all_samples else values.mean(0) > threshold
        row = {"chain": unit.chain, "layer": unit.layer, "block": unit.block, "k": unit.k,
               "n": int(active.numel()), "a": int(active.sum())}
        per_layer.append(row)
        by_chain.setdefault(unit.chain, []).append(row)
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


def suggest_alpha(model: nn.Module, batch: Batch, *, min_scale: float = 0.1, alpha_max: float = 2.0,
                  tol: float = 1e-3, init: Optional[EmergenceInit] = None, plan: Optional[EmergencePlan] = None,
                  example_inputs: Optional[ExampleInputs] = None, bn_stats: str = "batch",
                  min_active: Optional[float] = None, threshold: float = 0.05) -> float:
    """Largest alpha in [1, alpha_max] (to within ``tol``) keeping every layer's input signal >= min_scale x.

    With the schedule of ``init`` (its alpha ignored; the model's current weights are the base, i.e.
    ``base_init="keep"``) at a candidate alpha, the mean |input| of every planned layer's unit module
    must stay >= ``min_scale`` times its value at alpha = 1 (layers whose value at alpha = 1 is 0 are
    skipped). For a bias-free ReLU chain the input of layer l scales by prod_{j<l} alpha**k_j, so this
    bounds the U-shaped shrink alpha**(-n(n+1)/2) of method.md 1.4; the input rather than the output is
    used so that a layer's own factor (harmless before a normalisation) does not count.

    With ``min_active`` (a fraction in (0, 1]), every layer's active fraction (units whose batch-mean
    ReLU(output) exceeds ``threshold``, as in :func:`emergence`) must also stay >= ``min_active`` times its
    value at alpha = 1. Use it for pre-LayerNorm Transformers: their blocks see normalised inputs, so the
    input bound passes while the first blocks' FFN units die (e.g. ``min_active=0.5``).

    Bisection on a deep copy: 2 + ceil(log2((alpha_max - 1) / tol)) forward passes; ``model`` is never modified.
    """
    if not (_is_real(min_scale) and 0 < min_scale <= 1):
        raise ValueError(f"min_scale={min_scale!r} is invalid: expected a fraction in (0, 1], e.g. 0.1")
    if not (_is_real(alpha_max) and math.isfinite(alpha_max) and alpha_max > 1):
        raise ValueError(f"alpha_max={alpha_max!r} is invalid: expected a finite number > 1, e.g. 2.0")
    if not (_is_real(tol) and tol > 0):
        raise ValueError(f"tol={tol!r} is invalid: expected a number > 0, e.g. 1e-3")
    if min_active is not None and not (_is_real(min_active) and 0 < min_active <= 1):
        raise ValueError(f"min_active={min_active!r} is invalid: expected None or a fraction in (0, 1], e.g. 0.5")
    _check_bn_stats(bn_stats)
    target = unwrap_model(model)
    reason = already_applied(target)
    if reason:
        raise ValueError(f"{type(target).__name__} already carries the emergence init ({reason}); "
                         "call suggest_alpha on the model before applying it")
    work = copy.deepcopy(target)
    if plan is None:
        init = EmergenceInit(base_init="keep") if init is None else init
        plan = dataclasses.replace(init, alpha=1.0, base_init="keep").plan(
            work, example_inputs if example_inputs is not None else batch)
    mode = plan.settings.get("scale_mode", "weight")
    scaled = [(work.get_parameter(e.name), e.k) for e in plan.entries if e.k is not None]
    units = _units(work, plan)

    def measure() -> list[tuple[float, float]]:
        """(mean |input|, active fraction) per layer."""
        stats, _ = _record(work, work, batch, units, torch.relu, bn_stats=bn_stats, grad=False)
        return [(st.in_abs, float((st.per_sample().mean(0) > threshold).double().mean())) for st in stats]

    current = 1.0

    @torch.no_grad()
    def passes(alpha: float) -> bool:
        nonlocal current
        for param, k in scaled:                      # rescale by the factor ratio: no second copy
            param.mul_(scale_factor(alpha, k, mode) / scale_factor(current, k, mode))
        current = alpha
        now = measure()
        inputs_ok = all(x >= min_scale * b for (x, _), (b, _) in zip(now, base) if b > 0)
        active_ok = min_active is None or all(a >= min_active * b for (_, a), (_, b) in zip(now, base))
        return inputs_ok and active_ok

    base = measure()
    if passes(float(alpha_max)):
        return float(alpha_max)
    lo, hi = 1.0, float(alpha_max)
    while hi - lo > tol:                             # invariant: lo passes, hi fails
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if passes(mid) else (lo, mid)
    return lo


# ---- internals --------------------------------------------------------------------------------------

@dataclass
class _Unit:
    chain: str
    layer: int
    block: str
    k: Any
    factor: float
    module_name: str
    module: nn.Module
    param: torch.Tensor


class _Stats:
    """Running sums for one unit module over every call in the forward pass."""

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
        """(samples, units) float64: each unit's activation averaged over a sample's positions."""
        return torch.cat(self.samples, 0)


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_bn_stats(bn_stats: str) -> None:
    if bn_stats not in BN_STATS:
        raise ValueError(f"bn_stats={bn_stats!r} is not one of: {', '.join(BN_STATS)}")


def _resolve_plan(target: nn.Module, plan: Optional[EmergencePlan], example_inputs: Optional[ExampleInputs],
                  batch: Batch) -> EmergencePlan:
    if plan is not None:
        return plan
    own = getattr(target, "emergence_plan", None)
    if own is not None:
        return own
    return EmergenceInit(alpha=1.0, base_init="keep").plan(target, example_inputs if example_inputs is not None else batch)


def _units(target: nn.Module, plan: EmergencePlan) -> list[_Unit]:
    """The unit module of every plan layer, in plan order (first "ffn" entry, else first entry)."""
    by_layer: dict[tuple[str, int], list[PlanEntry]] = {}
    for e in plan.entries:
        if e.layer is not None:
            by_layer.setdefault((e.chain, e.layer), []).append(e)
    units = []
    for row in plan.layers():
        entries = by_layer[(row["chain"], row["layer"])]
        entry = next((e for e in entries if e.role == "ffn"), entries[0])
        module_name = entry.name.rpartition(".")[0].removesuffix(".parametrizations.weight")  # weight norm: the layer
        try:
            param, module = target.get_parameter(entry.name), target.get_submodule(module_name)
        except AttributeError:
            raise ValueError(f"the plan does not match {type(target).__name__}: it has no parameter {entry.name!r}") from None
        units.append(_Unit(row["chain"], row["layer"], row["block"], row["k"], row["factor"], module_name, module, param))
    return units


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


def _unit_values(z: torch.Tensor, conv: bool, batched: bool) -> torch.Tensor:
    """(samples, units) float64 per-sample unit means of a post-activation output ``z``."""
    if conv:
        z = z if batched else z.unsqueeze(0)
        return z.flatten(2).mean(2, dtype=torch.float64)
    if z.dim() == 1:
        return z.unsqueeze(0).to(torch.float64)
    return z.reshape(z.shape[0], -1, z.shape[-1]).mean(1, dtype=torch.float64)


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


def _record(model: nn.Module, target: nn.Module, batch: Batch, units: list[_Unit], activation: Activation, *,
            bn_stats: str, grad: bool, loss_fn: Optional[Callable[[Any], torch.Tensor]] = None
            ) -> tuple[list[_Stats], list[Optional[torch.Tensor]]]:
    """One forward pass (plus ``torch.autograd.grad`` when ``grad``) with hooks on the unit modules."""
    stats: dict[int, _Stats] = {id(u.module): _Stats() for u in units}
    modules = {id(u.module): u.module for u in units}

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        st = stats[id(module)]
        with torch.no_grad():
            y = _first_tensor(output)
            if y is None:
                return
            y = y.detach()
            x = _first_tensor(list(args) + list(kwargs.values()))
            if x is not None and x.is_floating_point():
                st.in_sum += float(x.detach().abs().sum(dtype=torch.float64))
                st.in_count += x.numel()
            st.out_sum += float(y.abs().sum(dtype=torch.float64))
            st.out_count += y.numel()
            conv = isinstance(module, nn.modules.conv._ConvNd)
            st.samples.append(_unit_values(activation(y), conv, conv and y.dim() == module.weight.dim()))

    training = [(m, m.training) for m in model.modules()]
    bn_buffers: list[tuple[torch.Tensor, torch.Tensor]] = []
    handles = []
    try:
        model.eval()
        if bn_stats == "batch":
            for m in target.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.train()
                    bn_buffers.extend((b, b.detach().clone()) for b in m.buffers(recurse=False))
        handles = [m.register_forward_hook(hook, with_kwargs=True) for m in modules.values()]
        params = list({id(u.param): u.param for u in units if u.param.requires_grad}.values())
        grads: dict[int, Optional[torch.Tensor]] = {}
        with torch.set_grad_enabled(grad and bool(params)):
            output = _call(model, batch)
            if grad and params:
                loss = _loss(output, loss_fn)
                if loss is not None and loss.requires_grad:
                    got = torch.autograd.grad(loss, params, allow_unused=True)
                    grads = {id(p): g for p, g in zip(params, got)}
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for buf, saved in bn_buffers:
                buf.copy_(saved)
        for m, mode in training:
            m.training = mode
    out = []
    for u in units:
        st = stats[id(u.module)]
        if not st.samples:
            raise ValueError(f"layer {u.layer} of chain {u.chain!r}: its unit module {u.module_name!r} did not run "
                             "in the forward pass on this batch (does the batch hold every input the model needs?)")
        out.append(st)
    return out, [grads.get(id(u.param)) for u in units]


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
