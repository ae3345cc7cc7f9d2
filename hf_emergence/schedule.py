"""The exponent schedule: which power of alpha each of the L weight layers of a chain gets.

Layers are numbered in forward order around a pivot. With the default pivot (the middle):

* L odd,  L = 2n + 1:  k = -n, ..., -1, 0, 1, ..., n
* L even, L = 2n, ``even_depth="skip0"``: k = -n, ..., -1, +1, ..., +n   (no layer keeps its scale)
* L even, ``even_depth="half"``:  k = -(n - 1/2), ..., -1/2, +1/2, ..., +(n - 1/2)
* L even, ``even_depth="floor"``: k = -n, ..., n - 1  (pivot floor(L/2), as a third-party reading does)

The first two keep sum(k) = 0, so prod(alpha**k) = 1 and a positively homogeneous chain (bias-free ReLU
net) computes exactly the same function at initialisation; "floor" shrinks the whole chain by alpha**-n.
An explicit integer ``pivot`` p gives k_l = l - p.

Layer l's weight is multiplied by ``alpha**k`` (``scale_mode="weight"``: std x alpha^k, variance
x alpha^(2k)) or by ``alpha**(k/2)`` (``scale_mode="variance"``: variance x alpha^k).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

from ._warnings import warn

EVEN_DEPTH_VARIANTS = ("skip0", "half", "floor")
SCALE_MODES = ("weight", "variance")
#: Factors outside [1/FACTOR_RANGE, FACTOR_RANGE] are warned about (two orders of magnitude either way).
FACTOR_RANGE = 100.0

Exponent = Union[int, float]


def exponents(num_layers: int, even_depth: str = "skip0", pivot: Optional[int] = None) -> list[Exponent]:
    """Exponents k_0..k_{L-1} for a chain of ``num_layers`` weight layers (see the module docstring).

    Integral exponents are returned as ``int`` so plans serialise without ``.0`` noise.
    """
    if num_layers < 1:
        raise ValueError(f"a chain needs at least 1 layer, got num_layers={num_layers}")
    if even_depth not in EVEN_DEPTH_VARIANTS:
        raise ValueError(f"even_depth={even_depth!r} is not one of {', '.join(EVEN_DEPTH_VARIANTS)}")
    if pivot is not None:
        if not -num_layers <= pivot < num_layers:
            raise ValueError(f"pivot={pivot} is outside a chain of {num_layers} layers (valid: 0..{num_layers - 1})")
        p = pivot % num_layers
        return [i - p for i in range(num_layers)]
    n = num_layers // 2
    if num_layers % 2 == 1:
        return [i - n for i in range(num_layers)]
    if even_depth == "skip0":
        return [i - n if i < n else i - n + 1 for i in range(num_layers)]
    if even_depth == "half":
        return [i - (num_layers - 1) / 2 for i in range(num_layers)]
    return [i - n for i in range(num_layers)]  # floor


def scale_factor(alpha: float, k: Exponent, scale_mode: str = "weight") -> float:
    """The multiplier for a weight with exponent ``k``: alpha**k, or alpha**(k/2) in variance mode."""
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"scale_mode={scale_mode!r} is not one of {', '.join(SCALE_MODES)}")
    try:
        return float(alpha ** (k if scale_mode == "weight" else k / 2))
    except OverflowError:  # beyond the float range: the plan keeps inf and apply() refuses it by name
        return math.inf


def middle_shrink(alpha: float, ks: list[Exponent], scale_mode: str = "weight") -> float:
    """Smallest cumulative activation scale along the chain, min_l prod_{j<=l} factor_j.

    For a positively homogeneous chain the hidden activations after layer l are scaled by this
    running product; with the symmetric schedule it is smallest in the middle, alpha**(-n(n+1)/2).
    """
    running, smallest = 0.0, 0.0
    for k in ks:
        running += (k if scale_mode == "weight" else k / 2) * math.log(alpha)   # log space: no overflow
        smallest = min(smallest, running)
    return math.exp(smallest)


def alpha_within(max_k: Exponent, scale_mode: str = "weight", bound: float = FACTOR_RANGE) -> float:
    """The largest alpha whose factors stay within [1/bound, bound] for exponents up to ``max_k`` in size."""
    power = abs(max_k) if scale_mode == "weight" else abs(max_k) / 2
    return float(bound ** (1.0 / power)) if power else math.inf


def warn_if_extreme(alpha: float, ks: Sequence[Exponent], scale_mode: str = "weight", what: str = "the model") -> None:
    """Warn when a factor alpha**k leaves [1/FACTOR_RANGE, FACTOR_RANGE], naming the alpha that keeps it.

    Factors that over- or underflow float32 are left to ``apply``, which refuses them by name.
    """
    if not ks:
        return
    max_k = max(abs(k) for k in ks)
    largest = max(scale_factor(alpha, max_k, scale_mode), scale_factor(alpha, -max_k, scale_mode))
    if largest <= FACTOR_RANGE or not largest < 1e37:
        return
    bound = alpha_within(max_k, scale_mode)
    keep = f"alpha <= {bound:.4g}" if alpha > 1 else f"alpha >= {1 / bound:.4g}"
    warn(f"alpha={alpha} on {what}: exponents reach |k|={format(max_k, 'g')}, so factors span "
         f"{1 / largest:.2g} to {largest:.2g}; {keep} keeps every factor within "
         f"[{1 / FACTOR_RANGE:g}, {FACTOR_RANGE:g}] (or shorten the chains: layer_unit='block', chain='stage'; "
         "hf_emergence.suggest_alpha(model) picks alpha from measured activations)")
