"""What travels with a model that carries the init: its record, and the guard against applying it twice.

The record is ``{**settings, "applied": True, "hf_emergence_version": ..., "fingerprint": {name: [...]}}``,
kept in ``model.config.emergence_init`` for transformers models (so it is saved to config.json and comes
back with ``from_pretrained``) and in ``model.emergence_init`` for plain modules. The fingerprint holds the
first values of the first and the last scaled tensor as the init left them. That tells the weights the
init produced apart from fresh weights built from the same saved config (``AutoModel.from_config`` of a
checkpoint's config carries the record too, but not the weights).

:func:`already_applied` says the weights carry the init when

* ``model.emergence_plan`` is set: this object, or a copy of it, went through ``apply`` / ``from_config``;
* the record says applied and its fingerprint matches the weights, to a relative 1e-2 so that
  ``.half()`` / bfloat16 copies still match: deep copies, ``load_state_dict`` of a saved checkpoint into a
  fresh build, ``from_pretrained``;
* the record says applied and transformers' loader flagged the parameters (``_is_hf_initialized``): a
  checkpoint trained after the init, or one whose record has no fingerprint (hf_emergence 0.1.0).

A plain module's state dict carries nothing, so weights loaded into a fresh plain module are not recognised.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
import torch.nn as nn

from .distributed import full_values, readable

if TYPE_CHECKING:  # pragma: no cover
    from .plan import EmergencePlan

#: Keys written to the record next to the settings.
METADATA_KEYS = ("applied", "hf_emergence_version", "fingerprint")
#: Values kept per fingerprinted tensor, and the relative tolerance they are compared with.
FINGERPRINT_VALUES = 8
FINGERPRINT_RTOL = 1e-2


class AlreadyAppliedError(RuntimeError):
    """Raised when the init is applied to a model whose weights already carry it."""


def record_holder(model: nn.Module) -> Any:
    """Where the record lives: the transformers config, else the module itself."""
    config = getattr(model, "config", None)
    return config if config is not None and hasattr(config, "to_dict") else model


def get_record(model: Any) -> Optional[dict[str, Any]]:
    """The record of ``model`` (or of a bare config) if it says the init was applied, else ``None``."""
    spec = getattr(record_holder(model), "emergence_init", None)
    return spec if isinstance(spec, dict) and spec.get("applied") else None


@torch.no_grad()
def fingerprint(plan: "EmergencePlan", tensor_of: Callable[[str], torch.Tensor]) -> dict[str, list[float]]:
    """The first values of the first and the last scaled tensor of ``plan``, ``tensor_of(name)`` giving each."""
    scaled = [e.name for e in plan.entries if e.scaled]
    return {name: [float(v) for v in tensor_of(name).flatten()[:FINGERPRINT_VALUES].double()]
            for name in dict.fromkeys(scaled[:1] + scaled[-1:])}


def model_tensor(model: nn.Module) -> Callable[[str], torch.Tensor]:
    """``name ->`` the first fingerprint values of that parameter of ``model`` (gathered for ZeRO-3 and FSDP2:
    a collective there); a KeyError for a name the model does not have."""
    params = dict(model.named_parameters(remove_duplicate=False))

    def tensor_of(name: str) -> torch.Tensor:
        param = params[name]
        with readable(param):
            return full_values(param.detach()).flatten()[:FINGERPRINT_VALUES].clone().cpu()

    return tensor_of


def new_record(settings: dict[str, Any], plan: "EmergencePlan", tensor_of: Callable[[str], torch.Tensor]) -> dict[str, Any]:
    """The record of an init just applied with ``settings`` (the plan's scaled tensors read through ``tensor_of``)."""
    from . import __version__

    return {**settings, "applied": True, "hf_emergence_version": __version__, "fingerprint": fingerprint(plan, tensor_of)}


def record_applied(model: nn.Module, settings: dict[str, Any], plan: "EmergencePlan") -> dict[str, Any]:
    """Write the record of an init that was just applied to ``model``; returns it."""
    record = new_record(settings, plan, model_tensor(model))
    setattr(record_holder(model), "emergence_init", record)
    return record


def already_applied(model: nn.Module) -> Optional[str]:
    """Why ``model``'s weights already carry the init, or ``None`` (see the module docstring)."""
    if getattr(model, "emergence_plan", None) is not None:
        return "EmergenceInit.apply already ran on this model (or on the one it was copied from)"
    record = get_record(model)
    if record is None:
        return None
    if holds_recorded_weights(model):
        return "config.emergence_init records the init and the weights are the ones it produced"
    if any(getattr(p, "_is_hf_initialized", False) for p in model.parameters()):
        return "its weights were loaded from a checkpoint whose config.emergence_init records the init"
    return None


def holds_recorded_weights(model: nn.Module) -> bool:
    """Whether ``model``'s record has a fingerprint and its weights match it: they are the ones the init produced."""
    stored = (get_record(model) or {}).get("fingerprint")
    return isinstance(stored, dict) and bool(stored) and _matches(model, stored)


@torch.no_grad()
def _matches(model: nn.Module, stored: dict[str, Any]) -> bool:
    tensor_of = model_tensor(model)
    informative = False
    for name, values in stored.items():
        if not isinstance(values, list) or not values:
            return False
        expected = torch.tensor(values, dtype=torch.float64)
        try:
            current = tensor_of(name)[:len(values)].double()
        except KeyError:
            return False
        if current.shape != expected.shape or not torch.allclose(current, expected, rtol=FINGERPRINT_RTOL, atol=1e-12):
            return False
        informative = informative or bool(expected.abs().sum() > 0)
    return informative
