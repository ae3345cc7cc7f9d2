"""Configs, model classes and saved checkpoints from local files, each failure one line naming the file or flag.

Shared by the ``hf-emergence`` command line and the example scripts, so a ``--config_overrides`` string, a
``--model_name_or_path`` / ``--model`` folder or a truncated ``model.safetensors`` mean the same and fail the
same way in both. Every error is a :class:`LoadError` (a ``ValueError``) whose message is one line.
"""

from __future__ import annotations

import difflib
import json
import re
import struct
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from .config_overrides import ConfigOverrideError, apply_config_overrides

__all__ = ["LoadError", "first_line", "safetensors_problem", "check_config", "apply_overrides", "load_config",
           "model_class", "load_pretrained", "meta_model", "recorded_settings"]

#: Config fields that hold one entry per stage and must have the same length (ResNet, ConvNeXt, Swin-like).
PER_STAGE_FIELDS = ("depths", "hidden_sizes", "num_heads", "embed_dims", "strides", "sr_ratios", "patch_sizes")


class LoadError(ValueError):
    """A config, class name or checkpoint that cannot be used; the message is one line naming the file or flag."""


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message, at most ``limit`` characters."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------------------------ safetensors
def safetensors_problem(path: Union[str, Path]) -> Optional[str]:
    """Why the safetensors file ``path`` is unreadable (truncated, not safetensors), or None if its layout is whole.

    A safetensors file is an 8-byte little-endian header length n, n bytes of JSON naming each tensor's byte
    range, then the data: the file must be exactly 8 + n + the end of the last range. Only the header is read.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{path.name} is truncated ({size} bytes, not even a safetensors header)"
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            return f"{path.name} is truncated or not a safetensors file ({size} bytes, shorter than its {n}-byte header)"
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return f"{path.name} is not a safetensors file (its header is not JSON)"
    if not isinstance(header, dict):
        return f"{path.name} is not a safetensors file (its header is not a JSON object)"
    ends = [t["data_offsets"][1] for k, t in header.items()
            if k != "__metadata__" and isinstance(t, dict) and len(t.get("data_offsets", ())) == 2]
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        return f"{path.name} is truncated ({size} bytes, its header describes {expected})"
    if size > expected:
        return f"{path.name} has {size - expected} bytes after its last tensor (expected {expected} bytes)"
    return None


def safetensors_shapes(path: Union[str, Path]) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` from a safetensors header (the data is not read)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: tuple(t["shape"]) for k, t in header.items() if k != "__metadata__"}


# ---------------------------------------------------------------------------------------------- configs
def _stage_lengths(config: Any) -> dict[str, int]:
    lengths = {k: len(v) for k in PER_STAGE_FIELDS if isinstance(v := getattr(config, k, None), (list, tuple))}
    stages = getattr(config, "num_stages", None)
    return {"num_stages": stages, **lengths} if isinstance(stages, int) and lengths else lengths


def check_config(config: Any) -> Any:
    """Refuse configs transformers builds but cannot run: per-stage lists whose lengths no longer relate as in
    the model type's default config (``depths=[1]`` against four ``hidden_sizes`` builds a ResNet whose classifier
    does not fit its last stage). The relation is read from the default config (TextNet's ``hidden_sizes`` holds
    one more entry than its ``depths``), so only a change the user made can fail."""
    now = _stage_lengths(config)
    if len(now) < 2:
        return config
    try:
        default = _stage_lengths(type(config)())
    except Exception:  # noqa: BLE001 - a config class that needs arguments: nothing to compare with
        return config
    shared = [k for k in now if k in default]
    if len(shared) < 2:
        return config
    base = shared[0]
    if all(now[k] - now[base] == default[k] - default[base] for k in shared):
        return config
    model_type = getattr(config, "model_type", None) or type(config).__name__

    def counts(lengths: dict[str, int]) -> str:
        return ", ".join(f"{k}={lengths[k]}" if k == "num_stages" else f"len({k})={lengths[k]}" for k in shared)

    raise LoadError(f"the {model_type} config's per-stage settings do not fit together: {counts(now)} (its default: "
                    f"{counts(default)}); change them together, e.g. --config_overrides \"depths=[1,1],hidden_sizes=[32,64]\"")


def apply_overrides(config: Any, overrides: Union[str, Mapping[str, Any], None]) -> Any:
    """``--config_overrides`` on ``config`` (in place), then :func:`check_config`; a bad key or value is a LoadError."""
    try:
        apply_config_overrides(config, overrides)
    except ConfigOverrideError as err:
        raise LoadError(str(err)) from None
    return check_config(config)


def load_config(*, model_type: Optional[str] = None, config: Optional[str] = None,
                overrides: Union[str, Mapping[str, Any], None] = None) -> Any:
    """The config of ``--model_type`` (``AutoConfig.for_model``) or ``--config`` (a config.json or a folder holding
    one), with ``--config_overrides`` applied."""
    from transformers import AutoConfig

    if model_type is not None:
        from transformers import CONFIG_MAPPING

        if model_type not in CONFIG_MAPPING:
            close = difflib.get_close_matches(model_type, list(CONFIG_MAPPING.keys()), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else " (see transformers.CONFIG_MAPPING)"
            raise LoadError(f"--model_type {model_type!r} is not a transformers model type{hint}")
        loaded = AutoConfig.for_model(model_type)
    elif config is not None:
        path = Path(config)
        if not path.exists():
            raise LoadError(f"--config {config}: no such file or folder")
        if path.is_dir() and not (path / "config.json").is_file():
            raise LoadError(f"--config {config}: the folder holds no config.json")
        loaded = _read_config(path, f"--config {config}")
    else:
        raise LoadError("give --model_type or --config")
    return apply_overrides(loaded, overrides)


def _read_config(path: Path, what: str) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise LoadError(f"{what}: not a transformers config ({first_line(err, 200)})") from None


def recorded_settings(config: Any) -> Optional[dict[str, Any]]:
    """``config.emergence_init`` if it records an applied init, else ``None``."""
    spec = getattr(config, "emergence_init", None)
    return dict(spec) if isinstance(spec, dict) and spec.get("applied") else None


# ---------------------------------------------------------------------------------------------- classes
def model_class(name: Optional[str], config: Any, flag: str = "--auto_class") -> type:
    """The concrete ``PreTrainedModel`` class for ``name`` (an Auto class or a model class name) and ``config``;
    ``None``: the config's ``architectures[0]``, else ``AutoModel``."""
    import transformers
    from transformers import PreTrainedModel

    from .modeling import resolve_model_class

    if name is None:
        for arch in getattr(config, "architectures", None) or ():
            cls = getattr(transformers, arch, None)
            if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
                return cls
        name = "AutoModel"
    obj = getattr(transformers, name, None) if re.fullmatch(r"[A-Za-z_]\w*", name) else None
    is_auto = obj is not None and hasattr(obj, "_model_mapping")
    is_model = isinstance(obj, type) and issubclass(obj, PreTrainedModel)
    if not (is_auto or is_model):
        known = [n for n in dir(transformers) if n.startswith("AutoModel")]
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else " (e.g. AutoModel, AutoModelForSeq2SeqLM)"
        raise LoadError(f"{flag} {name!r} is not a transformers Auto class or model class{hint}")
    if is_model:
        expected = getattr(obj, "config_class", None)
        if isinstance(expected, type) and not isinstance(config, expected):
            raise LoadError(f"{flag} {name} expects a {expected.__name__}, but the config is a {type(config).__name__}")
        return obj
    try:
        return resolve_model_class(obj, config)
    except (TypeError, ValueError) as err:
        raise LoadError(f"{flag}: {first_line(err)}") from None


# ------------------------------------------------------------------------------------------ checkpoints
def _checkpoint_folder(path: Path, flag: str) -> None:
    """A saved model folder: config.json and intact weights, or a LoadError naming what is wrong."""
    if not path.exists():
        raise LoadError(f"{flag} {path}: no such folder")
    if not path.is_dir():
        raise LoadError(f"{flag} {path}: expected a checkpoint folder (config.json + model.safetensors), got a file")
    if not (path / "config.json").is_file():
        raise LoadError(f"{flag} {path}: the folder holds no config.json (not a saved model)")
    weights = sorted(path.glob("*.safetensors"))
    if not weights and not any(path.glob("pytorch_model*.bin")):
        raise LoadError(f"{flag} {path}: the folder holds no weights (*.safetensors)")
    for file in weights:
        problem = safetensors_problem(file)
        if problem:
            raise LoadError(f"{flag} {path}: {problem}")


def load_pretrained(name_or_path: Union[str, Path], auto_class: Union[str, type, None] = None, *,
                    flag: str = "--model", local_only: bool = True) -> Any:
    """A saved model, loaded with stock ``from_pretrained`` on CPU.

    ``auto_class`` is an Auto class (or its name), a model class, or None (the config's ``architectures[0]``).
    A local folder is checked first (config.json, weights present and not truncated); anything else is a Hub
    id, refused when ``local_only``. Weights missing from the checkpoint, which transformers would silently
    draw afresh, are reported with a warning.
    """
    path = Path(name_or_path)
    local = path.exists() or local_only
    if local:
        _checkpoint_folder(path, flag)
        config = _read_config(path, f"{flag} {path}: config.json")
    else:
        config = None
    cls = auto_class if isinstance(auto_class, type) else None
    if cls is None or hasattr(cls, "_model_mapping"):
        if config is None:
            try:
                from transformers import AutoConfig

                config = AutoConfig.from_pretrained(str(name_or_path))
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise LoadError(f"{flag} {name_or_path}: {first_line(err, 200)}") from None
        cls = model_class(cls.__name__ if cls is not None else auto_class, config, flag=flag)
    try:
        model, info = cls.from_pretrained(str(name_or_path), output_loading_info=True)
    except Exception as err:  # safetensors, pickle, size mismatches and Hub errors share no base class
        raise LoadError(f"{flag} {name_or_path}: cannot load it as {cls.__name__} "
                        f"({type(err).__name__}: {first_line(err, 200)})") from None
    missing = list(info.get("missing_keys", ()))
    if missing:
        warnings.warn(f"{len(missing)} weight(s) missing from {name_or_path} were freshly initialised by {cls.__name__} "
                      f"(e.g. {missing[0]}); is the model class right?")
    return model


def meta_model(path: Union[str, Path], auto_class: Optional[str] = None, flag: str = "--model") -> tuple[Any, Any]:
    """(model on the meta device, config) of a checkpoint folder, from its config.json alone (any size)."""
    import torch

    path = Path(path)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise LoadError(f"{flag} {path}: not a checkpoint folder with a config.json")
    config = _read_config(path, f"{flag} {path}: config.json")
    cls = model_class(auto_class, config)
    with torch.device("meta"):
        return cls._from_config(config), config
