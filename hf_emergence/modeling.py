"""Running the init inside transformers' own construction.

``PreTrainedModel.__init__`` ends with ``post_init()``, which calls ``init_weights()``: the model's
standard init, then weight tying. :class:`EmergenceInitMixin` overrides ``init_weights`` to rescale
right after that, when the config carries ``emergence_init`` settings. ``from_pretrained`` builds the
model on the meta device, where the mixin does nothing, so a saved checkpoint is never rescaled twice; a later
``init_weights()`` / ``post_init()`` on the loaded model leaves weights that match the record's fingerprint alone.

**Drawing once.** Nested sub-models (an encoder, a decoder) run their own ``post_init`` during
construction. While a model with a base-init re-draw is built, those nested ``init_weights`` calls tie
their weights at once (so untied copies are freed when a stock build frees them) but defer the init,
which the top model replays, in the same order, after it has flagged the tensors the plan
re-draws as initialised (transformers' ``_is_hf_initialized``, which its init functions honour). So
transformers initialises everything else exactly as a stock build does, and the planned tensors are
drawn once, by the base init. With ``base_init="keep"`` nothing is deferred: the build is the stock one.

:func:`from_config` gives any stock class this behaviour for one build, without a custom class: it
builds through a throw-away subclass that adds the mixin, then hands back an instance of the stock
class, so ``type(model)``, ``config.json``'s ``architectures`` and the init RNG stream of a ``keep``
build are exactly those of ``AutoModel*.from_config``.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterator, Optional, Union

from ._warnings import warn
import torch
import torch.nn as nn

from .distributed import is_partitioned, zero3_enabled
from .emergence_init import SETTING_NAMES, EmergenceInit
from .record import holds_recorded_weights


def _build_device() -> torch.device:
    """The device context the model is being built under (meta inside ``from_pretrained``).

    transformers is imported here, not at module level, so that ``import hf_emergence`` stays light.
    """
    try:  # transformers >= 5
        from transformers.modeling_utils import get_torch_context_manager_or_global_device
    except ImportError:  # pragma: no cover - older transformers
        return torch.get_default_device()
    return get_torch_context_manager_or_global_device()


_MIXED_CLASSES: dict[type, type] = {}
#: Classes whose ``_from_config`` is running (it applies the init itself after a ZeRO-3 build).
_IN_FROM_CONFIG: list[type] = []
#: Models under construction that defer their nested sub-models' init: (top model, deferred sub-models).
_BUILDS: list[tuple[nn.Module, list[nn.Module]]] = []


class EmergenceInitMixin:
    """Mixin for ``PreTrainedModel`` subclasses: ``class MyModel(EmergenceInitMixin, MyPreTrainedModel)``.

    When a model is *built* (``MyModel(config)``, ``from_config``) and ``config.emergence_init`` holds
    settings, the init is applied once, after transformers' init and weight tying, drawing each planned
    tensor once (module docstring). It is skipped on the meta device (``from_pretrained``,
    ``accelerate.init_empty_weights``). Under DeepSpeed ZeRO-3, ``from_config`` / ``_from_config``
    apply it after transformers' ``initialize_weights_zero3``, gathering each parameter.
    """

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        with _deferred_nested_init(self, _redraws(config)):
            super().__init__(config, *args, **kwargs)  # type: ignore[call-arg]

    @classmethod
    def _from_config(cls, config: Any, **kwargs: Any) -> Any:
        _IN_FROM_CONFIG.append(cls)
        try:
            model = super()._from_config(config, **kwargs)  # type: ignore[misc]
        finally:
            _IN_FROM_CONFIG.pop()
        spec = _requested(model.config)
        if spec and getattr(model, "emergence_plan", None) is None and any(is_partitioned(p) for p in model.parameters()):
            EmergenceInit.from_dict(spec).apply(model, force=True)   # ZeRO-3: after initialize_weights_zero3
        return model

    def init_weights(self) -> None:
        deferred = _end_deferral(self)
        spec = _requested(getattr(self, "config", None))
        ready = bool(spec) and getattr(self, "emergence_plan", None) is None and not _on_meta(self) \
            and not any(is_partitioned(p) for p in self.parameters())  # type: ignore[attr-defined]
        init = EmergenceInit.from_dict(spec) if ready else None
        if spec and not spec.get("applied") and not _IN_FROM_CONFIG \
                and any(is_partitioned(p) for p in self.parameters()):  # type: ignore[attr-defined]  # not from_pretrained
            warn(f"{type(self).__name__} was built inside deepspeed.zero.Init, so the emergence init was not applied "
                 "during construction; call EmergenceInit(...).apply(model) now (it gathers each parameter), or build "
                 "with from_config, which does")
        with _skipped_by_transformers(self, init if deferred is not None else None) as skipped:
            for nested in deferred or ():
                _stock_init_weights(nested)
            super().init_weights()  # type: ignore[misc]
        if init is not None and not holds_recorded_weights(self):  # loaded weights that carry it: init_weights() again
            plan = init.apply(self, force=True)  # type: ignore[arg-type]
            _initialise_left_out(self, skipped, plan)


def _requested(config: Any) -> Optional[dict]:
    spec = getattr(config, "emergence_init", None)
    return spec if isinstance(spec, dict) and spec else None


def _redraws(config: Any) -> bool:
    """Whether building with this config may re-draw planned tensors (then nested inits are deferred)."""
    spec = _requested(config)
    return bool(spec) and spec.get("base_init", "auto") != "keep" and _build_device() != torch.device("meta") \
        and not zero3_enabled()


def _on_meta(model: nn.Module) -> bool:
    return _build_device() == torch.device("meta") or any(p.is_meta for p in model.parameters())


_STOCK_INIT_WEIGHTS: dict[str, Any] = {}


def _stock_init_weights(model: nn.Module) -> None:
    from transformers import PreTrainedModel

    _STOCK_INIT_WEIGHTS.get("fn", PreTrainedModel.init_weights)(model)


@contextlib.contextmanager
def _deferred_nested_init(top: nn.Module, active: bool) -> Iterator[None]:
    """While ``top`` is built, nested sub-models' ``PreTrainedModel.init_weights`` only tie their weights and
    queue themselves; the top model replays their init in the same order (module docstring)."""
    if not active:
        yield
        return
    from transformers import PreTrainedModel

    if not _BUILDS:
        _STOCK_INIT_WEIGHTS["fn"] = stock = PreTrainedModel.init_weights

        def init_weights(model: nn.Module) -> None:
            if _BUILDS and model is not _BUILDS[-1][0]:
                _BUILDS[-1][1].append(model)                 # its initialize_weights is replayed by the top model
                model.tie_weights(recompute_mapping=False)    # tie now: untied copies are freed as in a stock build
            else:
                stock(model)

        PreTrainedModel.init_weights = init_weights
    _BUILDS.append((top, []))
    try:
        yield
    finally:
        _end_deferral(top)


def _end_deferral(top: nn.Module) -> Optional[list[nn.Module]]:
    """Stop deferring for ``top``; returns the sub-models it deferred (``None`` if it deferred nothing)."""
    for i, (model, deferred) in enumerate(_BUILDS):
        if model is top:
            del _BUILDS[i]
            if not _BUILDS:
                from transformers import PreTrainedModel

                PreTrainedModel.init_weights = _STOCK_INIT_WEIGHTS.pop("fn")
            return deferred
    return None


@contextlib.contextmanager
def _skipped_by_transformers(model: nn.Module, init: Optional[EmergenceInit]) -> Iterator[list[torch.Tensor]]:
    """Flag the tensors ``init`` will re-draw as initialised while transformers initialises ``model``.

    The plan is made before weight tying; the tensors flagged are yielded, to check them against the
    plan that ``apply`` makes afterwards.
    """
    flagged: list[torch.Tensor] = []
    if init is not None:
        plan = init.plan(model)
        if plan.base_init != "keep":
            for entry in plan:
                param = model.get_parameter(entry.name)
                if not getattr(param, "_is_hf_initialized", False):
                    param._is_hf_initialized = True
                    flagged.append(param)
    try:
        yield flagged
    finally:
        for param in flagged:
            del param._is_hf_initialized


def _initialise_left_out(model: nn.Module, skipped: list[torch.Tensor], plan: Any) -> None:
    """Give transformers' init to any skipped tensor that the final plan did not re-draw (a plan changed by tying)."""
    redrawn = {id(model.get_parameter(e.name)) for e in plan} if plan.base_init != "keep" else set()
    owners = [m for m in model.modules() if any(id(p) in {id(t) for t in skipped} - redrawn
                                                for p in m.parameters(recurse=False))]
    for module in owners:
        module.__dict__.pop("_is_hf_initialized", None)
    if owners:
        model.initialize_weights()  # type: ignore[operator]  # only the unflagged owners are initialised


def from_config(model_class: type, config: Any, init: Optional[Union[EmergenceInit, dict]] = None,
                **kwargs: Any) -> nn.Module:
    """Build ``model_class`` from ``config`` with the emergence init applied inside its ``post_init``.

    Args:
        model_class: an Auto class (``AutoModelForSeq2SeqLM``) or a concrete ``PreTrainedModel`` class.
        config: the model config; it is copied, and the copy's ``emergence_init`` records the settings.
        init: an :class:`EmergenceInit` or its dict. Alternatively pass its fields as keywords
            (``alpha=1.3``). With neither, ``config.emergence_init`` is used if set, else the defaults.
        **kwargs: other keywords go to transformers' ``_from_config`` (``dtype=``, ``attn_implementation=``).

    Returns:
        an instance of the stock class; ``model.emergence_plan`` holds the plan that was applied.
    """
    settings = {k: kwargs.pop(k) for k in list(kwargs) if k in SETTING_NAMES}
    if init is not None and settings:
        raise TypeError(f"pass either init= or setting keywords ({', '.join(settings)}), not both")
    if isinstance(init, dict):
        init = EmergenceInit.from_dict(init)
    elif init is None:
        saved = getattr(config, "emergence_init", None)
        init = EmergenceInit(**settings) if settings or not saved else EmergenceInit.from_dict(saved)
    elif not isinstance(init, EmergenceInit):
        raise TypeError(f"init must be an EmergenceInit or a dict, got {type(init).__name__}")
    config = copy.deepcopy(config)
    before = getattr(config, "emergence_init", None)
    config.emergence_init = init.to_dict()
    concrete = resolve_model_class(model_class, config)
    model = _mixed_class(concrete)._from_config(config, **kwargs)
    model.__class__ = concrete
    if getattr(model, "emergence_plan", None) is None:   # meta device, empty weights: nothing was applied
        model.config.emergence_init = before
        if before is None:
            del model.config.emergence_init
        warn(f"{concrete.__name__} was built without real weights (meta device or accelerate.init_empty_weights), so "
             "the emergence init was not applied and config.emergence_init records nothing new; apply it after the "
             "weights exist (EmergenceInit(...).apply(model)) or per shard (docs/scaling.md)")
    return model


def resolve_model_class(model_class: type, config: Any) -> type:
    """The concrete ``PreTrainedModel`` class an Auto class would build for ``config``.

    Where an Auto mapping holds several classes (DeiT: with and without teacher) the one named in
    ``config.architectures`` is used, else the first (transformers 5.x raises on this case).
    """
    from transformers import PreTrainedModel

    if isinstance(model_class, type) and issubclass(model_class, PreTrainedModel):
        return model_class
    mapping = getattr(model_class, "_model_mapping", None)
    if mapping is None:
        raise TypeError(f"model_class must be an Auto class or a PreTrainedModel subclass, got {model_class!r}")
    try:
        found = mapping[type(config)]
    except KeyError:
        raise ValueError(f"{getattr(model_class, '__name__', model_class)} has no model for {type(config).__name__} "
                         f"(model_type {getattr(config, 'model_type', None)!r})") from None
    if isinstance(found, (tuple, list)):
        wanted = set(getattr(config, "architectures", None) or ())
        found = next((c for c in found if c.__name__ in wanted), found[0])
    return found


def _mixed_class(concrete: type) -> type:
    """``concrete`` with :class:`EmergenceInitMixin` first in its MRO, same name and module (cached).

    Keeping ``__module__`` means transformers does not treat it as custom code, so the init takes the
    same RNG path as the stock class. A class that already uses the mixin is returned as it is.
    """
    if issubclass(concrete, EmergenceInitMixin):
        return concrete
    if concrete not in _MIXED_CLASSES:
        _MIXED_CLASSES[concrete] = type(concrete.__name__, (EmergenceInitMixin, concrete),
                                        {"__module__": concrete.__module__, "__qualname__": concrete.__qualname__,
                                         "__doc__": concrete.__doc__})
    return _MIXED_CLASSES[concrete]
