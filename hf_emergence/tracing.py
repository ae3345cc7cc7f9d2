"""Forward-order tracing without touching tensor data.

One forward pass runs on a structural replica of the model whose parameters and buffers are empty
tensors on the ``meta`` device, so it costs no memory or compute whatever the size of the model,
works for models that are themselves on meta, and never reads, writes or hooks the real model.
Forward hooks on the replica record the order in which the watched modules are first called.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

logger = logging.getLogger("hf_emergence")

ExampleInputs = Any  # a tensor, a tuple of positional args, or a dict of keyword args


def _to_meta(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return torch.empty_like(obj, device="meta")
    if isinstance(obj, dict):
        return {k: _to_meta(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_meta(v) for v in obj)
    return obj


def dummy_inputs(model: nn.Module, watched: Sequence[nn.Module] = ()) -> list[ExampleInputs]:
    """Candidate minimal batches for ``model``, most plausible first (empty if none can be built).

    HF models: ``pixel_values`` (1, C, H, W) from ``num_channels``/``image_size`` (32 when unset), or
    ``input_ids`` (1, 8) plus ``decoder_input_ids`` for encoder-decoders. Plain modules: a
    (2, C, 32[, 32[, 32]]) batch for the first ConvNd, then a (2, in) batch for the first Linear.
    """
    config = getattr(model, "config", None)
    main = getattr(model, "main_input_name", None) if config is not None else None
    if main == "pixel_values":
        size = getattr(config, "image_size", None) or 32
        h, w = (size, size) if isinstance(size, int) else tuple(size)[:2]
        return [{"pixel_values": torch.zeros(1, getattr(config, "num_channels", 3) or 3, h, w, device="meta")}]
    if main == "input_ids":
        ids = torch.ones(1, 8, dtype=torch.long, device="meta")
        if getattr(config, "is_encoder_decoder", False):
            return [{"input_ids": ids, "decoder_input_ids": ids}]
        return [{"input_ids": ids}]
    if config is not None:
        return []
    candidates: list[ExampleInputs] = []
    for dims, cls in ((2, nn.Conv2d), (1, nn.Conv1d), (3, nn.Conv3d)):
        first = next((m for m in watched if isinstance(m, cls)), None)
        if first is not None:
            candidates.append((torch.zeros(2, first.in_channels, *([32] * dims), device="meta"),))
    first_linear = next((m for m in watched if isinstance(m, nn.Linear)), None)
    if first_linear is not None:
        candidates.append((torch.zeros(2, first_linear.in_features, device="meta"),))
    return candidates


def first_call_order(model: nn.Module, watched: Sequence[nn.Module],
                     example_inputs: Optional[ExampleInputs] = None) -> Optional[list[nn.Module]]:
    """The watched modules in the order of their first call in one meta forward pass.

    The pass runs on a structural replica of ``model`` whose parameters and buffers live on the meta
    device (tied tensors stay tied), so the model itself is never run, hooked or modified. Modules
    that never run are left out. Returns ``None`` (and logs why) when no inputs can be built, the
    model cannot be replicated, or the pass fails on meta tensors (``.item()``, data-dependent flow).
    """
    candidates = [example_inputs] if example_inputs is not None else dummy_inputs(model, watched)
    if not candidates:
        logger.info("no example inputs for %s; pass example_inputs= to trace the forward order", type(model).__name__)
        return None
    try:
        replica = meta_replica(model)
    except Exception as err:  # un-copyable attributes: no tracing, never a crash
        logger.info("cannot replicate %s on meta for tracing: %s: %s", type(model).__name__, type(err).__name__, err)
        return None
    name_of = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    replica_watched = [replica.get_submodule(name_of[id(m)]) for m in watched]
    original = {id(r): m for r, m in zip(replica_watched, watched)}
    for inputs in candidates:
        order = _trace_once(replica, replica_watched, _to_meta(inputs))
        if order is not None:
            return [original[id(m)] for m in order]
    return None


def meta_replica(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in which every parameter and buffer is an empty meta tensor.

    Seeding ``copy.deepcopy``'s memo with the meta tensors means no tensor data is ever copied and
    parameters shared between modules stay shared in the replica.
    """
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def _trace_once(replica: nn.Module, watched: Sequence[nn.Module], inputs: ExampleInputs) -> Optional[list[nn.Module]]:
    args, kwargs = ((), inputs) if isinstance(inputs, dict) else ((inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs), {})
    order: list[nn.Module] = []
    seen: set[int] = set()

    def hook(module: nn.Module, _inputs: Any, _output: Any) -> None:
        if id(module) not in seen:
            seen.add(id(module))
            order.append(module)

    handles = [m.register_forward_hook(hook) for m in watched]
    replica.eval()
    try:
        with torch.no_grad():
            replica(*args, **kwargs)
    except Exception as err:  # any failure means "cannot trace", never a user-facing crash
        logger.info("forward-order tracing of %s failed on meta tensors: %s: %s",
                    type(replica).__name__, type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        return None
    finally:
        for h in handles:
            h.remove()
    return order
