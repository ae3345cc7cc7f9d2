"""Models held by wrappers and engines: what ``apply`` needs to read and write their weights.

* ``unwrap_model``: the module inside ``DataParallel`` / ``DistributedDataParallel`` / ``torch.compile``.
* DeepSpeed ZeRO-3 partitions every parameter (empty ``.data``, full shape in ``ds_shape``):
  :func:`writable` gathers one for an in-place edit on rank 0, whose values are then broadcast;
  :func:`readable` gathers one for reading.
* FSDP2 (``fully_shard``) holds each parameter as a DTensor of which a rank owns one slice:
  :func:`fill_dtensor_` draws the *full* tensor on every rank, in the same RNG stream a single process
  would use, and keeps this rank's slice, so the gathered result equals a single-process draw.
  That needs every rank to hold the same RNG state, which :func:`check_same_rng` verifies.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Callable, ContextManager, Optional

import torch
import torch.nn as nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """The underlying module of DataParallel / DistributedDataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


# ---- DeepSpeed ZeRO-3 ---------------------------------------------------------------------------------

def is_partitioned(param: torch.Tensor) -> bool:
    """True for a parameter that DeepSpeed ZeRO-3 partitioned (it carries a ``ds_id``)."""
    return hasattr(param, "ds_id")


def writable(param: torch.Tensor) -> ContextManager:
    """Gather a ZeRO-3 partitioned parameter for an in-place edit; rank 0's result is kept (a no-op otherwise)."""
    if is_partitioned(param):
        import deepspeed  # only reachable when the parameter was partitioned by DeepSpeed

        return deepspeed.zero.GatheredParameters([param], modifier_rank=0)
    return contextlib.nullcontext()


def readable(param: torch.Tensor) -> ContextManager:
    """Gather a ZeRO-3 partitioned parameter for reading (a no-op otherwise)."""
    if is_partitioned(param):
        import deepspeed

        return deepspeed.zero.GatheredParameters([param], modifier_rank=None)
    return contextlib.nullcontext()


def zero3_enabled() -> bool:
    """Whether transformers builds models inside ``deepspeed.zero.Init`` (a ZeRO-3 config is registered)."""
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover
        return False
    return bool(is_deepspeed_zero3_enabled())


# ---- FSDP2 DTensors -----------------------------------------------------------------------------------

def is_dtensor(tensor: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(tensor, DTensor)


@torch.no_grad()
def fill_dtensor_(tensor: torch.Tensor, fill: Callable[[torch.Tensor], object]) -> torch.Tensor:
    """Fill a DTensor as ``fill`` would fill the full tensor, each rank keeping only its own slice.

    ``fill`` writes into a full-size temporary (one tensor at a time: the peak extra memory is that
    tensor); its local slice is copied into this rank's shard.
    """
    from torch.distributed.tensor import distribute_tensor

    local = tensor.to_local()
    full = torch.empty(tensor.shape, dtype=local.dtype, device=local.device)
    fill(full)
    mine = distribute_tensor(full, tensor.device_mesh, tensor.placements, src_data_rank=None).to_local()
    local.copy_(mine)
    return tensor


def full_values(tensor: torch.Tensor) -> torch.Tensor:
    """The full tensor: gathered from every rank for a DTensor (a collective: call it on every rank)."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def check_same_rng(generator: Optional[torch.Generator] = None) -> None:
    """Raise unless every rank of the default process group holds the same RNG state (a collective).

    Drawing the full tensor on every rank gives the same values everywhere only if the stream is the same.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    state = generator.get_state() if generator is not None else torch.get_rng_state()
    digest = hashlib.sha1(state.numpy().tobytes()).hexdigest()
    digests: list[Optional[str]] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest)
    if len(set(digests)) > 1:
        raise RuntimeError(
            "the ranks hold different RNG states, so a base-init re-draw into FSDP2 shards would not give one "
            "consistent model: seed every rank the same way (accelerate.utils.set_seed(seed) or "
            "torch.manual_seed(seed)) before apply(), or pass base_init='keep' to scale the weights as they are")
