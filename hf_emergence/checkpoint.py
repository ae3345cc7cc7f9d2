"""Putting the init into a saved checkpoint one file at a time, under the checkpoint's own key names.

The plan names parameters; a checkpoint file may name them otherwise: transformers 5 saves some models
under their 4.x keys (ViT: ``vit.encoder.layer.N.attention.attention.value.weight`` in the file for the
parameter ``vit.layers.N.attention.v_proj.weight``). :func:`checkpoint_key_map` maps a file's keys to
parameter names with transformers' own loading conversion (what ``from_pretrained`` does), and
:func:`apply_to_checkpoint` scales a ``save_pretrained`` folder file by file, checking first that every
planned tensor is found exactly once, so that a mismatch is an error naming the tensors before any file
changes, never a silent no-op.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch
import torch.nn as nn

from .emergence_init import EmergenceInit
from .plan import EmergencePlan
from .record import AlreadyAppliedError, get_record, new_record


def checkpoint_key_map(model: nn.Module, keys: Iterable[str]) -> dict[str, str]:
    """``{checkpoint key: parameter name}`` for the keys that transformers renames one to one when loading.

    ``model`` may be on the meta device. Keys that need a conversion beyond a rename (fused or split
    tensors) are left out, so the plan reports their tensors as missing; keys already named like the
    parameters map to themselves.
    """
    keys = list(keys)
    names = dict(model.state_dict(keep_vars=True))
    try:
        from transformers import PreTrainedModel
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # pragma: no cover - a transformers without the loading conversion API
        return {k: k for k in keys if k in names}
    if not isinstance(model, PreTrainedModel):
        return {k: k for k in keys if k in names}
    conversions = get_model_conversion_mapping(model)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    out = {}
    for key in keys:
        renamed, converted = rename_source_key(key, renamings, converters, model.base_model_prefix, names)
        if renamed not in names and key in names:
            renamed, converted = key, None
        if converted is None and renamed in names:
            out[key] = renamed
    return out


def apply_to_checkpoint(folder: Union[str, os.PathLike], init: EmergenceInit, *, model_class: Optional[type] = None,
                        force: bool = False, generator: Optional[torch.Generator] = None) -> EmergencePlan:
    """Apply ``init`` to the ``*.safetensors`` files of a ``save_pretrained`` folder, one file in memory at a time.

    The plan is made on the meta device from ``config.json`` (``model_class``: default the config's
    ``architectures[0]``). With ``base_init="keep"`` the stored weights are scaled as they are; another base
    init re-draws them first, from the full tensors' fans. Before any file changes, every planned tensor must
    be found once (under its name or the checkpoint's key for it) with its shape, else a ValueError names what
    is missing. Each file is rewritten atomically; then ``config.emergence_init`` records the init.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    if get_record(config) is not None and not force:
        raise AlreadyAppliedError(f"{folder} already carries the emergence init (config.emergence_init records it); "
                                  "pass force=True to apply it again on top")
    model = _meta_model(config, model_class)
    plan = init.plan(model)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder} has no *.safetensors file")
    by_name = {n: e for e in plan.entries for n in (e.name, *e.aliases)}
    key_maps, metadata, found, all_keys = {}, {}, [], []
    for path in files:                                      # 1. check, reading keys and shapes only
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            all_keys += keys
            metadata[path] = f.metadata()
            key_maps[path] = checkpoint_key_map(model, keys)
            for key in keys:
                entry = by_name.get(key_maps[path].get(key, key))
                if entry is not None:
                    if tuple(f.get_slice(key).get_shape()) != entry.shape:
                        raise ValueError(f"{path.name}: {key!r} has shape {f.get_slice(key).get_shape()}, the plan's "
                                         f"{entry.name!r} is {list(entry.shape)}")
                    found.append(entry.name)
    doubled = sorted(n for n, count in Counter(found).items() if count > 1)
    if doubled:
        raise ValueError(f"{folder}: planned tensor(s) stored more than once: {', '.join(doubled[:5])}")
    plan.check_complete(found, keys=all_keys)
    kept: dict[str, torch.Tensor] = {}
    for path in files:                                      # 2. scale, one file at a time
        tensors = load_file(str(path))
        done = plan.apply_to_state_dict_(tensors, reinit=plan.base_init != "keep", generator=generator,
                                         key_map=key_maps[path], partial=True)
        if done:
            to_key = {v: k for k, v in key_maps[path].items()}
            kept.update({name: tensors[to_key.get(name, name)].flatten()[:16].clone() for name in done})
            tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
            save_file(tensors, str(tmp), metadata=metadata[path] or {"format": "pt"})
            os.replace(tmp, path)
    config.emergence_init = new_record(init.to_dict(), plan, kept.__getitem__)
    config.save_pretrained(folder)
    return plan


def _meta_model(config: Any, model_class: Optional[type]) -> nn.Module:
    import transformers

    if model_class is None:
        names = getattr(config, "architectures", None) or []
        model_class = getattr(transformers, names[0], None) if names else None
        if model_class is None:
            model_class = transformers.AutoModel
    from .modeling import resolve_model_class

    with torch.device("meta"):
        return resolve_model_class(model_class, config)._from_config(config)
