"""Base initialisers, parameterised by fans so they work on a whole tensor or on one shard of it.

=================  =====================================================
``xavier_uniform``  U(-a, a),  a = sqrt(3) * sqrt(2 / (fan_in + fan_out))
``xavier_normal``   N(0, s^2), s = sqrt(2 / (fan_in + fan_out))
``kaiming_normal``  N(0, s^2), s = sqrt(2) / sqrt(fan_in)        (ReLU gain, fan_in mode)
``kaiming_uniform`` U(-a, a),  a = sqrt(3) * sqrt(2) / sqrt(fan_in)
``keep``            the model's own initialisation is left as it is
=================  =====================================================

The arithmetic matches ``torch.nn.init`` exactly, so a tensor initialised here equals
``torch.nn.init.xavier_uniform_`` (etc.) under the same RNG state. An FSDP2 DTensor is drawn as its full
tensor would be, each rank keeping its slice (:func:`hf_emergence.distributed.fill_dtensor_`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .distributed import fill_dtensor_, is_dtensor

BASE_INITS = ("auto", "keep", "xavier_uniform", "xavier_normal", "kaiming_normal", "kaiming_uniform")


def base_std(name: str, fan_in: int, fan_out: int) -> float:
    """Standard deviation the initialiser ``name`` gives a weight with these fans."""
    if name.startswith("xavier"):
        return math.sqrt(2.0 / float(fan_in + fan_out))
    if name.startswith("kaiming"):
        return math.sqrt(2.0) / math.sqrt(fan_in)
    raise ValueError(f"base_init={name!r} has no closed-form std")


@torch.no_grad()
def base_init_(tensor: torch.Tensor, name: str, fan_in: int, fan_out: int,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Fill ``tensor`` in place from the base initialiser ``name`` (a no-op for ``keep``)."""
    if name == "keep":
        return tensor
    if is_dtensor(tensor):
        return fill_dtensor_(tensor, lambda full: base_init_(full, name, fan_in, fan_out, generator=generator))
    std = base_std(name, fan_in, fan_out)
    if name.endswith("uniform"):
        bound = math.sqrt(3.0) * std
        return tensor.uniform_(-bound, bound, generator=generator)
    if name.endswith("normal"):
        return tensor.normal_(0.0, std, generator=generator)
    raise ValueError(f"base_init={name!r} is not one of {', '.join(BASE_INITS)}")
