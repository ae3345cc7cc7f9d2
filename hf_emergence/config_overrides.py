"""``--config_overrides "d_model=512,encoder_layers=6,hidden_sizes=[32,64]"``: parsing and applying config changes.

Shared by the ``hf-emergence`` command line and the example scripts. Values are parsed as JSON
(numbers, lists, ``true``/``false``/``null``), then Python's ``True``/``False``/``None``, else kept as
strings; commas inside ``[...]``, ``{...}`` or a double-quoted string (``name="x,y"``) do not split items, and an
unclosed bracket or quote is an error.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional, Union

__all__ = ["ConfigOverrideError", "parse_config_overrides", "apply_config_overrides"]

try:  # transformers 5 configs are strict dataclasses validated by huggingface_hub on setattr
    from huggingface_hub.errors import StrictDataclassError as _StrictError
except ImportError:  # pragma: no cover - older huggingface_hub
    _StrictError = ValueError


class ConfigOverrideError(ValueError):
    """A malformed override, an unknown config key or a value the config rejects (one-line message)."""


def parse_config_overrides(text: Optional[str]) -> dict[str, Any]:
    """``"a=1,b=[2,3],c=true,d=gelu"`` -> ``{"a": 1, "b": [2, 3], "c": True, "d": "gelu"}`` (JSON values, else strings)."""
    if not text:
        return {}
    out: dict[str, Any] = {}
    for part in _split_items(text):
        if "=" not in part:
            raise ConfigOverrideError(f"--config_overrides: {part!r} is not key=value")
        key, raw = (s.strip() for s in part.split("=", 1))
        if not key:
            raise ConfigOverrideError(f"--config_overrides: {part!r} has no key before '='")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = {"True": True, "False": False, "None": None}.get(raw, raw)
        out[key] = value
    return out


def _split_items(text: str) -> list[str]:
    """Split at the commas outside ``[...]``, ``{...}`` and double-quoted strings (``\\"`` escapes a quote)."""
    parts, item, depth, quoted, escaped = [], "", 0, False, False
    for ch in text:
        if quoted:
            quoted = escaped or ch != '"'
            escaped = not escaped and ch == "\\"
        elif ch == '"':
            quoted = True
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
            if depth < 0:
                raise ConfigOverrideError(f"--config_overrides: {(item + ch)!r} closes a bracket that was never opened")
        elif ch == "," and depth == 0:
            parts.append(item)
            item = ""
            continue
        item += ch
    if quoted or depth:
        raise ConfigOverrideError(f"--config_overrides: {item!r} has an unclosed "
                                  f"{'quote' if quoted else 'bracket'}")
    return parts + [item]


def apply_config_overrides(config: Any, overrides: Union[str, Mapping[str, Any], None]) -> Any:
    """Set each override (a ``--config_overrides`` string or a dict) on ``config``, in place; returns ``config``.

    An unknown key, or a value the (strict, in transformers 5) config rejects, raises
    :class:`ConfigOverrideError` naming the model type and the key.
    """
    items = parse_config_overrides(overrides) if isinstance(overrides, str) or overrides is None else dict(overrides)
    known = set(config.to_dict()) | {k for k in dir(config)             # settings, never methods (to_dict=1)
                                     if not k.startswith("_") and not callable(getattr(type(config), k, None))}
    model_type = getattr(config, "model_type", None) or type(config).__name__
    for key in items:  # every key is checked before anything is set
        if key not in known:
            raise ConfigOverrideError(f"--config_overrides: the {model_type} config has no key {key!r}")
    for key, value in items.items():
        try:
            setattr(config, key, value)
        except (TypeError, ValueError, AttributeError, _StrictError) as err:
            detail = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
            raise ConfigOverrideError(f"--config_overrides: {key}={value!r} is invalid for the {model_type} config "
                                      f"({detail})") from None
    return config
