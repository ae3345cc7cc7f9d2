"""Forward order of a model's weight modules, found by running the model once.

Forward pre-hooks record the order in which the watched modules are first called, and the tensor each
one reads (two modules reading the same tensor are parallel branches). The first route that works:

1. ``model``: hooks on the model itself, one pass under ``torch.no_grad()`` in eval mode on a small real
   batch: the user's ``example_inputs`` as given, else batches built from the config
   (:mod:`hf_emergence.inputs`). Needs real weights. The model is left as it was: every module's
   attributes (train flags included), the buffers and the RNG state are restored and the hooks removed.
2. ``fake``: a replica whose parameters and buffers are FakeTensors (``torch._subclasses.FakeTensorMode``
   with a ``ShapeEnv``, so data-dependent shapes such as ``nonzero`` are allowed): shapes only, no memory.
   Used when there are no real weights (meta device, DeepSpeed ZeRO-3 partitions, DTensor shards, where
   a pass would need every rank) or when the pass on the model failed.
3. ``meta``: a replica of meta tensors. Both replica routes run in the model's dtypes, then in bfloat16
   (grouped-matmul kernels refuse float32 on meta).
4. ``rebuilt``: a transformers model without weights and with at most :data:`REBUILD_LIMIT` parameters is
   rebuilt from its config on CPU (RNG restored) and run for real: for forwards that read values
   (``.item()``, routing).

A pass that raises after every watched module has run still gives the order. A transformers sub-model
(a vision tower, an audio encoder) that the pass never reached is traced on its own batch and placed by
its registration position. When nothing works, :func:`trace_forward` returns ``None`` and the reasons.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.nn as nn

from .inputs import ExampleInputs, build_batches, describe

logger = logging.getLogger("hf_emergence")

#: Largest parameter count (elements) for which a weightless transformers model is rebuilt on CPU to trace it.
REBUILD_LIMIT = 1 << 26
ROUTES = ("model", "fake", "meta", "rebuilt")


@dataclass
class Trace:
    """What one forward pass showed: ``order`` of first calls, the tensor each module read first (a key
    per module id; equal keys mean parallel branches), the route and the batch it used."""

    order: list[nn.Module]
    reads: dict[int, tuple[int, int]]
    route: str
    batch: str
    notes: list[str] = field(default_factory=list)


def has_real_weights(model: nn.Module) -> bool:
    """True when every parameter holds its data locally (not meta, not DeepSpeed-partitioned, not a DTensor
    shard: a pass on a sharded model would need every rank to join it)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        DTensor = ()
    for p in model.parameters():
        if p.is_meta or hasattr(p, "ds_id") or isinstance(p, DTensor) or isinstance(p.data, DTensor):
            return False
    return True


def trace_forward(model: nn.Module, watched: Sequence[nn.Module],
                  example_inputs: Optional[ExampleInputs] = None) -> tuple[Optional[Trace], list[str]]:
    """The :class:`Trace` of ``watched`` in ``model`` (see the module docstring), or ``None``, plus why
    each attempt failed (one line each)."""
    trace, reasons = _trace_whole(model, watched, example_inputs)
    if trace is None or example_inputs is not None:
        return trace, reasons
    ran = {id(m) for m in trace.order}
    missed = [m for m in watched if id(m) not in ran]
    if missed:
        trace = _add_unreached_submodels(model, watched, trace, missed, reasons)
    return trace, reasons


def _trace_whole(model: nn.Module, watched: Sequence[nn.Module],
                 example_inputs: Optional[ExampleInputs]) -> tuple[Optional[Trace], list[str]]:
    reasons: list[str] = []
    if example_inputs is not None:
        batches = [(f"example_inputs ({describe(example_inputs)})", example_inputs)]
    else:
        built = build_batches(model, watched)
        batches = built.candidates
        if not batches:
            return None, [built.gap or "no batch can be built"]
    real = has_real_weights(model)
    if real:
        for label, batch in _as_given_then_moved(model, batches, example_inputs is not None):
            trace = _attempt(model, watched, lambda: _on_model(model, watched, batch), "model", label, reasons)
            if trace is not None:
                return trace, reasons
    for route, runner in (("fake", _on_fake_replica), ("meta", _on_meta_replica), ("rebuilt", _on_rebuilt)):
        if route == "rebuilt" and real:
            continue  # the model itself ran for real already
        for label, batch in batches:
            trace = _attempt(model, watched, lambda: runner(model, watched, batch), route, label, reasons)
            if trace is not None:
                return trace, reasons
    return None, reasons


def _as_given_then_moved(model: nn.Module, batches: list, given: bool) -> Iterator[tuple[str, ExampleInputs]]:
    """Each batch on the device and in the float dtype of the model; a user's batch first exactly as given."""
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    for label, batch in batches:
        moved = _map_tensors(batch, lambda t: t.to(device, dtype) if t.is_floating_point() else t.to(device))
        if given:
            yield label, batch
            if _map_tensors(batch, lambda t: (t.device, t.dtype)) != _map_tensors(moved, lambda t: (t.device, t.dtype)):
                yield f"{label} moved to {device}/{dtype}", moved
        else:
            yield label, moved


def _attempt(model: nn.Module, watched: Sequence[nn.Module], run: Callable[[], tuple[list, dict, Optional[BaseException]]],
             route: str, label: str, reasons: list[str]) -> Optional[Trace]:
    try:
        order, reads, error = run()
    except Exception as err:  # cannot even set the pass up (un-copyable model, unknown structure): next route
        reasons.append(f"{route} pass on {label}: {_one_line(err)}")
        return None
    if error is None:
        return Trace(order, reads, route, label)
    if len(order) == len(watched) and watched:
        return Trace(order, reads, route, label, [f"the traced forward pass raised after every weight module had run "
                                                  f"({_one_line(error)}); its order is used"])
    reasons.append(f"{route} pass on {label}: {_one_line(error)}")
    return None


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:160] if text else ''}"


def _recorded_pass(root: nn.Module, watched: Sequence[nn.Module], args: tuple, kwargs: dict,
                   ) -> tuple[list[nn.Module], dict[int, tuple[int, int]], Optional[BaseException]]:
    """Run ``root(*args, **kwargs)`` once with pre-hooks on ``watched``; (order, reads, error or None)."""
    order: list[nn.Module] = []
    reads: dict[int, tuple[int, int]] = {}
    keep: list[torch.Tensor] = []  # holds each read tensor alive, so that no id is reused during the pass
    seen: set[int] = set()

    def hook(module: nn.Module, hook_args: tuple, hook_kwargs: dict) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        order.append(module)
        first = next((v for v in (*hook_args, *hook_kwargs.values()) if isinstance(v, torch.Tensor)), None)
        if first is not None:
            keep.append(first)
            reads[id(module)] = (id(first), first._version)

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in watched]
    error: Optional[BaseException] = None
    try:
        with torch.no_grad():
            root(*args, **kwargs)
    except Exception as err:  # reported by the caller; never a user-facing crash
        error = err
    finally:
        for h in handles:
            h.remove()
    return order, reads, error


def _split(inputs: ExampleInputs) -> tuple[tuple, dict]:
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    return tuple(inputs), {}


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


#: What every ``nn.Module`` keeps in its ``__dict__`` itself (parameters, buffers, children, hooks).
_MODULE_INTERNALS = frozenset(vars(nn.Module())) - {"training"}


@contextlib.contextmanager
def left_as_it_was(model: nn.Module) -> Iterator[None]:
    """Restore every module's attributes (the train flag, and what a forward may set: Swin resets its
    ``window_size`` for a small image), the buffers' values and the RNG state (CPU and the model's GPUs)."""
    attributes = [(m, {k: copy.copy(v) if isinstance(v, (list, dict, set)) else v
                       for k, v in vars(m).items() if k not in _MODULE_INTERNALS}) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers() if not b.is_meta]
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=cuda):
            model.eval()
            yield
    finally:
        for m, saved in attributes:
            own = vars(m)
            for k in [k for k in own if k not in saved and k not in _MODULE_INTERNALS]:
                del own[k]
            own.update(saved)
        with torch.no_grad():
            for b, saved in buffers:
                if b.shape == saved.shape and not torch.equal(b, saved):
                    b.copy_(saved)


def _on_model(model: nn.Module, watched: Sequence[nn.Module], batch: ExampleInputs):
    args, kwargs = _split(batch)
    with left_as_it_was(model):
        return _recorded_pass(model, watched, args, kwargs)


def _replica(model: nn.Module, make: Callable[[torch.Tensor], torch.Tensor]) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are ``make(tensor)`` (tied tensors stay tied).

    Seeding ``copy.deepcopy``'s memo with the new tensors means no tensor data is ever copied.
    """
    from .layout import logical_shape

    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(make(p, logical_shape(p)), requires_grad=False)
    for b in model.buffers():
        memo[id(b)] = make(b, tuple(b.shape))
    return copy.deepcopy(model, memo)


def _replica_pass(model: nn.Module, watched: Sequence[nn.Module], replica: nn.Module, batch: ExampleInputs):
    name_of = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    mirrored = [replica.get_submodule(name_of[id(m)]) for m in watched]
    original = {id(r): m for r, m in zip(mirrored, watched)}
    args, kwargs = _split(batch)
    replica.eval()
    order, reads, error = _recorded_pass(replica, mirrored, args, kwargs)
    return [original[id(m)] for m in order], {id(original[i]): key for i, key in reads.items()}, error


def _float_as(dtype: Optional[torch.dtype]) -> Callable[[torch.Tensor], torch.dtype]:
    """The dtype a replica gives a tensor: ``dtype`` for floating tensors when set, else the tensor's own."""
    return lambda t: dtype if dtype is not None and t.is_floating_point() else t.dtype


def _in_each_dtype(run: Callable[[Optional[torch.dtype]], tuple], watched: Sequence[nn.Module]) -> tuple:
    """``run`` in the model's dtypes, then with floats in bfloat16 (grouped-matmul kernels refuse float32 on
    meta); the first result that gives the order, else the first result."""
    first = None
    for dtype in (None, torch.bfloat16):
        result = run(dtype)
        if result[2] is None or (watched and len(result[0]) == len(watched)):
            return result
        first = first or result
    return first


def _on_fake_replica(model: nn.Module, watched: Sequence[nn.Module], batch: ExampleInputs):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    def run(dtype: Optional[torch.dtype]) -> tuple:
        as_dtype = _float_as(dtype)
        mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv(), static_shapes=True)
        with mode:
            replica = _replica(model, lambda t, shape: torch.empty(shape, dtype=as_dtype(t), device="cpu"))
            fake_batch = _map_tensors(batch, lambda t: mode.from_tensor(torch.zeros(t.shape, dtype=as_dtype(t))))
        with mode:
            return _replica_pass(model, watched, replica, fake_batch)

    quiet = logging.getLogger("torch._subclasses.fake_tensor")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        return _in_each_dtype(run, watched)
    finally:
        quiet.setLevel(level)


def _on_meta_replica(model: nn.Module, watched: Sequence[nn.Module], batch: ExampleInputs):
    def run(dtype: Optional[torch.dtype]) -> tuple:
        as_dtype = _float_as(dtype)
        replica = _replica(model, lambda t, shape: torch.empty(shape, dtype=as_dtype(t), device="meta"))
        return _replica_pass(model, watched, replica,
                             _map_tensors(batch, lambda t: torch.empty(t.shape, dtype=as_dtype(t), device="meta")))

    return _in_each_dtype(run, watched)


def _on_rebuilt(model: nn.Module, watched: Sequence[nn.Module], batch: ExampleInputs):
    from .layout import logical_shape

    config = getattr(model, "config", None)
    if config is None or not hasattr(type(model), "_from_config"):
        raise ValueError("not a transformers model, so it cannot be rebuilt from a config")
    numel = 0
    for p in model.parameters():
        n = 1
        for s in logical_shape(p):
            n *= s
        numel += n
    if numel > REBUILD_LIMIT:
        raise ValueError(f"{numel:,} parameters is above the {REBUILD_LIMIT:,} a CPU rebuild is allowed")
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        rebuilt = type(model)._from_config(copy.deepcopy(config))
    if [n for n, _ in rebuilt.named_modules()] != [n for n, _ in model.named_modules()]:
        raise ValueError("the model rebuilt from its config has other modules than the model")
    return _replica_pass(model, watched, rebuilt, _map_tensors(batch, lambda t: t.to("cpu")))


def _add_unreached_submodels(model: nn.Module, watched: Sequence[nn.Module], trace: Trace, missed: list[nn.Module],
                             reasons: list[str]) -> Trace:
    """Trace each transformers sub-model that the pass never entered on its own batch; merge by position."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return trace
    missed_ids = {id(m) for m in missed}
    ran = {id(m) for m in trace.order}
    position = {id(m): i for i, (_, m) in enumerate(model.named_modules())}
    segments = [trace.order]
    taken: set[int] = set()
    for name, sub in model.named_modules():
        if not name or sub is model or not isinstance(sub, PreTrainedModel) or id(sub) in taken:
            continue
        inside = [m for m in sub.modules() if id(m) in missed_ids]
        if not inside or any(id(m) in ran for m in sub.modules()):
            continue
        sub_trace, sub_reasons = _trace_whole(sub, inside, None)
        taken.update(id(m) for m in sub.modules())
        if sub_trace is None:
            reasons.extend(f"{name}: {r}" for r in sub_reasons)
            continue
        segments.append(sub_trace.order)
        trace.reads.update(sub_trace.reads)
        trace.notes.append(f"{name} ({type(sub).__name__}) did not run in the forward pass on the model's batch; "
                           "its order comes from a pass of its own on a batch built from its config")
    segments.sort(key=lambda seg: min((position.get(id(m), 1 << 30) for m in seg), default=1 << 30))
    trace.order = [m for seg in segments for m in seg]
    return trace
