"""Running the init inside transformers' own construction.

``PreTrainedModel.__init__`` ends with ``post_init()``, which calls ``init_weights()``: the model's
standard init, then weight tying. :class:`EmergenceInitMixin` overrides ``init_weights`` to rescale
right after that, when the config carries ``emergence_init`` settings. ``from_pretrained`` builds the
model on the meta device, where the mixin does nothing, so a saved checkpoint is never rescaled twice.

:func:`from_config` gives any stock class this behaviour for one build, without a custom class: it
builds through a throw-away subclass that adds the mixin, then hands back an instance of the stock
class, so ``type(model)``, ``config.json``'s ``architectures`` and the init RNG stream are exactly
those of ``AutoModel*.from_config``.
"""

from __future__ import annotations

import copy
from typing import Any, Optional, Union

from ._warnings import warn
import torch
import torch.nn as nn

from .emergence_init import SETTING_NAMES, EmergenceInit


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


class EmergenceInitMixin:
    """Mixin for ``PreTrainedModel`` subclasses: ``class MyModel(EmergenceInitMixin, MyPreTrainedModel)``.

    When a model is *built* (``MyModel(config)``, ``from_config``) and ``config.emergence_init`` holds
    settings, the init is applied once, after transformers' init and weight tying. It is skipped on
    the meta device (``from_pretrained``, ``accelerate.init_empty_weights``) and under DeepSpeed ZeRO-3,
    whose ``initialize_weights_zero3`` runs later and would overwrite it (call ``apply`` after building).
    """

    def init_weights(self) -> None:
        super().init_weights()  # type: ignore[misc]
        spec = getattr(getattr(self, "config", None), "emergence_init", None)
        if not spec or getattr(self, "emergence_plan", None) is not None:
            return
        if _build_device() == torch.device("meta") or any(p.is_meta for p in self.parameters()):  # type: ignore[attr-defined]
            return
        if _zero3_enabled():
            warn("DeepSpeed ZeRO-3 is active: the emergence init is not applied during construction; "
                          "call EmergenceInit(...).apply(model) after the model is built")
            return
        EmergenceInit.from_dict(spec).apply(self, force=True)  # type: ignore[arg-type]


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
    config.emergence_init = init.to_dict()
    concrete = resolve_model_class(model_class, config)
    model = _mixed_class(concrete)._from_config(config, **kwargs)
    model.__class__ = concrete
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
    same RNG path as the stock class.
    """
    if concrete not in _MIXED_CLASSES:
        _MIXED_CLASSES[concrete] = type(concrete.__name__, (EmergenceInitMixin, concrete),
                                        {"__module__": concrete.__module__, "__qualname__": concrete.__qualname__,
                                         "__doc__": concrete.__doc__})
    return _MIXED_CLASSES[concrete]


def _zero3_enabled() -> bool:
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover
        return False
    return bool(is_deepspeed_zero3_enabled())
