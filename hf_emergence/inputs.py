"""Small batches to run a model once, built from its config and its forward signature (no data, no RNG).

A transformers model names its main input (``main_input_name``); the batch for it is built from the config:

==================  ===========================================================================================
``input_ids``        (1, 8) token ids below ``vocab_size`` that are no special token of the config; plus
                     ``decoder_input_ids`` for encoder-decoders and one ``bbox`` per token for layout models
``pixel_values``     (1, C, H, W) from ``num_channels`` / ``image_size`` (of the config or its vision config),
                     a 64 x 64 image first when that is larger (a ConvNet runs on any size), 64 and 224 when
                     the config has no size; also
                     (1, T, C, H, W) with T = ``num_frames`` for video models
``input_values``     raw audio: (1, 16000), then (1, C, 16000) with C = ``audio_channels``; a spectrogram
                     (1, ``max_length``, ``num_mel_bins``) first when the config has both
``input_features``   spectrogram frames: (1, F, T) and (1, T, F), F = ``feature_projection_input_dim`` (stacked
                     frames) or ``num_mel_bins`` (``feature_size``, ...), T = 200, then T = 2 *
                     ``max_source_positions`` (Whisper's fixed length) when the config has it (a ``*_mask`` over the frames)
``past_values``      a time series: (1, ``context_length`` + largest lag, channels), with ``past_time_features``
                     and ``past_observed_mask`` when ``forward`` needs them
``inputs_embeds``    (1, 8, ``hidden_size``) vectors (also Perceiver's ``inputs``, with ``d_model``)
==================  ===========================================================================================

A model whose config has a vision (audio, text) sub-config, or an image size, and whose forward takes
``pixel_values`` (``input_features``/``input_values``, ``input_ids``) gets those too, in a first batch (with ``image_seq_length`` image tokens
in front of its ids when the config names an image token); a Qwen2-VL-style model taking
``grid_thw``/``image_grid_thw`` gets flattened patches with their grid (and image tokens in its ids). Other required arguments of ``forward`` are added when their name says what they are (``*_ids``,
``attention_mask``, ``pixel_values``); one that cannot be built is named in :attr:`Batches.gap`. Some arguments
``forward`` declares optional are needed all the same and are added from the config (X-MOD's ``lang_ids``,
LXMERT's visual features, SigLIP 2's NaFlex patches: :func:`_optional_inputs`).
``use_cache=False`` is passed where ``forward`` takes it (no cache object is needed to see the order). A plain
``nn.Module`` gets a (2, C, 32, ...) batch for a leading ConvNd, (2, 8) ids for a leading Embedding, and
(2, in) and (2, 8, in) batches for the input widths of its first three Linear layers (the first registered
may be the head). Tensors are real CPU float32/long tensors; the tracer moves them where it runs.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn

#: A tensor, a tuple of positional arguments or a dict (any Mapping) of keyword arguments.
ExampleInputs = Any

SEQ_LEN, AUDIO_SAMPLES, IMAGE_SIZE, FRAMES = 8, 16000, 32, 2
_FEATURE_FIELDS = ("feature_projection_input_dim", "num_mel_bins", "feature_size", "n_mels", "num_mel_filters",
                   "input_feat_per_channel", "input_dim")


@dataclass
class Batches:
    """Candidate batches, most plausible first, each with a short description; ``gap`` says what is missing."""

    candidates: list[tuple[str, ExampleInputs]] = field(default_factory=list)
    gap: Optional[str] = None


def describe(inputs: ExampleInputs) -> str:
    """``input_ids (1, 8), decoder_input_ids (1, 8)``: names and shapes of a batch."""
    if isinstance(inputs, torch.Tensor):
        return f"tensor {tuple(inputs.shape)}"
    if hasattr(inputs, "items"):
        return ", ".join(f"{k} {tuple(v.shape)}" if isinstance(v, torch.Tensor) else f"{k}={v!r}" for k, v in inputs.items())
    if isinstance(inputs, (list, tuple)):
        return ", ".join(describe(v) if isinstance(v, torch.Tensor) else type(v).__name__ for v in inputs)
    return type(inputs).__name__


def build_batches(model: nn.Module, watched: Sequence[nn.Module] = ()) -> Batches:
    """Candidate batches for ``model`` (see the module docstring)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return _plain_batches(model, watched)
    main = getattr(model, "main_input_name", None)
    names = main if isinstance(main, (list, tuple)) else [main]
    required, accepted = _arguments(model)
    patches = _patch_grids(config, required, accepted, names[0])
    builder = _BUILDERS.get(names[0])
    if builder is None and not patches:
        return Batches(gap=f"{type(model).__name__} takes {names[0]!r} as its main input, which cannot be built from its "
                            "config; pass example_inputs= (a batch)")
    out = Batches()
    shaped_batches = _with_other_modalities(builder(config), names[0], config, accepted) if builder else []
    for shaped in patches + shaped_batches:
        batch = dict(shaped)
        if "use_cache" in accepted:  # no cache object to build (hybrid caches refuse some layer mixes)
            batch["use_cache"] = False
        if "bbox" in accepted and "input_ids" in batch:  # layout models: one box per token
            batch["bbox"] = torch.tensor([[[0, 0, 1, 1]]]).expand(1, batch["input_ids"].shape[1], 4).contiguous()
        batch.update(_optional_inputs(config, accepted, batch))
        for name in names[1:] + required:
            if name in batch:
                continue
            extra = _extra(name, config, batch)
            if extra is None:
                if name in required:
                    out.gap = (f"{type(model).__name__}.forward needs {name!r}, which cannot be built from the config; "
                               "pass example_inputs= (a batch)")
                    break
                continue
            batch[name] = extra
        else:
            shown = describe(batch)
            if all(shown != seen for seen, _ in out.candidates):  # NaFlex patches replace every image shape
                out.candidates.append((shown, batch))
    if not out.candidates and out.gap is None:
        out.gap = f"no batch for {names[0]!r} can be built from {type(config).__name__}"
    return out


def _arguments(model: nn.Module) -> tuple[list[str], set[str]]:
    """(required argument names, all argument names) of ``model.forward``."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return [], set()
    named = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    required = [p.name for p in params if p.default is inspect.Parameter.empty and p.kind in named]
    return required, {p.name for p in params if p.kind in named}


def _sub(config: Any, *names: str) -> list[Any]:
    """``config`` and the sub-configs named ``names`` it holds, in that order."""
    return [config] + [getattr(config, n) for n in names if getattr(config, n, None) is not None]


def _field(configs: Sequence[Any], names: Sequence[str], default: Any = None) -> Any:
    for cfg in configs:
        for name in names:
            value = getattr(cfg, name, None)
            if value is not None and not isinstance(value, bool):
                return value
    return default


def token_ids(config: Any, length: int = SEQ_LEN) -> Optional[torch.Tensor]:
    """(1, length) ids cycling through the lowest ids that no ``*_token_id`` / ``*_token_index`` field names."""
    configs = _sub(config, "text_config", "decoder", "text_encoder")
    vocab = _field(configs, ("vocab_size",), SEQ_LEN + 8)  # no vocab_size (byte/char models): small ids
    special = set()
    for cfg in configs:
        for name, value in vars(cfg).items():
            if (name.endswith("_id") or name.endswith("_index") or name.endswith("_ids")) and isinstance(value, int):
                special.add(value)
    usable = [i for i in range(min(vocab, 4 * length + len(special) + 8)) if i not in special] or [0]
    limit = _field(configs, ("max_position_embeddings", "n_positions", "max_seq_length"))
    if isinstance(limit, int) and 0 < limit < length:
        length = limit
    return torch.tensor([[usable[(3 + i) % len(usable)] for i in range(length)]], dtype=torch.long)


def _text(config: Any) -> list[dict[str, torch.Tensor]]:
    ids = token_ids(config)
    if ids is None:
        return []
    batch = {"input_ids": ids}
    if getattr(config, "is_encoder_decoder", False):
        batch["decoder_input_ids"] = ids
    return [batch]


def _image_hw(config: Any) -> tuple[tuple[int, int], bool]:
    """(height, width) of the config's images, and whether the config gives them."""
    size = _field(_sub(config, "vision_config", "backbone_config"), ("image_size", "img_size", "input_size"))
    if size is None:
        return (IMAGE_SIZE, IMAGE_SIZE), False
    if isinstance(size, dict):
        size = (size.get("height", IMAGE_SIZE), size.get("width", IMAGE_SIZE))
    if isinstance(size, (list, tuple)):
        size = tuple(size)[-2:] if len(size) >= 2 else (size[0], size[0])
    h, w = (size, size) if isinstance(size, int) else size
    return (int(h), int(w)), True


def _pattern(*shape: int) -> torch.Tensor:
    """A fixed, non-constant float tensor in [-1, 1] (no RNG drawn)."""
    n = 1
    for s in shape:
        n *= s
    return torch.linspace(-1.0, 1.0, n).reshape(shape)


def _images(config: Any) -> list[dict[str, torch.Tensor]]:
    channels = _field(_sub(config, "vision_config", "backbone_config"), ("num_channels", "in_channels", "in_chans"), 3)
    (h, w), configured = _image_hw(config)
    frames = _field(_sub(config, "vision_config"), ("num_frames", "frames_per_clip", "tubelet_size"), FRAMES)
    sizes = [(h, w)] if configured else [(2 * IMAGE_SIZE, 2 * IMAGE_SIZE), (224, 224)]  # detectors need some size
    if configured and h * w > IMAGE_SIZE * IMAGE_SIZE * 4:  # a ConvNet runs on any size: try a small image first
        sizes.insert(0, (2 * IMAGE_SIZE, 2 * IMAGE_SIZE))
    return ([{"pixel_values": _pattern(1, channels, a, b)} for a, b in sizes]
            + [{"pixel_values": _pattern(1, frames, channels, a, b)} for a, b in sizes])


def _videos(config: Any) -> list[dict[str, torch.Tensor]]:
    return [{"pixel_values_videos": b["pixel_values"]} for b in reversed(_images(config))]


def _audio(config: Any) -> list[dict[str, torch.Tensor]]:
    channels = _field([config], ("audio_channels", "num_channels"), 1)
    out = [{"input_values": _pattern(1, AUDIO_SAMPLES)}, {"input_values": _pattern(1, channels, AUDIO_SAMPLES)}]
    bins, frames = getattr(config, "num_mel_bins", None), getattr(config, "max_length", None)
    if isinstance(bins, int) and isinstance(frames, int):  # a spectrogram named input_values (AST)
        out.insert(0, {"input_values": _pattern(1, frames, bins)})
    return out


def _features(config: Any) -> list[dict[str, torch.Tensor]]:
    configs = _sub(config, "audio_config", "encoder_config")
    features = _field(configs, _FEATURE_FIELDS, 80)
    channels = _field(configs, ("input_channels",), 1)
    if isinstance(channels, int) and getattr(config, "input_feat_per_channel", None):
        features *= channels
    positions = _field(configs, ("max_source_positions",))
    lengths = [200] + ([2 * positions] if isinstance(positions, int) and 2 * positions != 200 else [])
    out = [{"input_features": _pattern(1, *shape)}
           for frames in lengths for shape in ((features, frames), (frames, features))]
    if getattr(config, "is_encoder_decoder", False):
        ids = token_ids(config)
        if ids is not None:
            for batch in out:
                batch["decoder_input_ids"] = ids
    return out


def _series(config: Any) -> list[dict[str, torch.Tensor]]:
    """(1, context + largest lag, channels) past values, then without the channel axis for one channel."""
    context = _field([config], ("context_length",), 32)
    lags = getattr(config, "lags_sequence", None) or [0]
    length = int(context) + max(lags)
    channels = _field([config], ("num_input_channels", "input_size"), 1)
    out = [{"past_values": _pattern(1, length, channels)}]
    if channels == 1:
        out.append({"past_values": _pattern(1, length)})
    return out


def _embeddings(name: str) -> Callable[[Any], list[dict[str, torch.Tensor]]]:
    """(1, 8, width) vectors for a model that takes embeddings (``inputs_embeds``, Perceiver's ``inputs``)."""
    def build(config: Any) -> list[dict[str, torch.Tensor]]:
        width = _field([config], ("hidden_size", "d_model"))
        return [{name: _pattern(1, SEQ_LEN, width)}] if isinstance(width, int) else []
    return build


_BUILDERS: dict[str, Callable[[Any], list[dict[str, torch.Tensor]]]] = {
    "input_ids": _text, "pixel_values": _images, "pixel_values_videos": _videos, "input_values": _audio,
    "input_features": _features, "past_values": _series, "inputs_embeds": _embeddings("inputs_embeds"),
    "inputs": _embeddings("inputs"),
}


def _patch_grids(config: Any, required: list[str], accepted: set[str], main: str) -> list[dict[str, torch.Tensor]]:
    """Qwen2-VL-style vision inputs: flattened patches (n, C * T * P * P) with their ``grid_thw`` (1, h, w).

    A vision tower (``forward(hidden_states, grid_thw)``) gets them alone; a model taking ``image_grid_thw``
    gets them as ``pixel_values`` with ``input_ids`` holding one image token per merged patch group.
    """
    vision = _sub(config, "vision_config")[-1]
    patch = getattr(vision, "patch_size", None)
    if not isinstance(patch, int) or not ({"grid_thw", "image_grid_thw"} & accepted):
        return []
    merge = getattr(vision, "spatial_merge_size", None) or 2
    temporal = getattr(vision, "temporal_patch_size", None) or 1
    channels = _field([vision], ("in_channels", "num_channels", "in_chans"), 3)
    side = 2 * merge
    flat = _pattern(side * side, channels * temporal * patch * patch)
    grid = torch.tensor([[1, side, side]])
    if "grid_thw" in accepted:
        tensor_arg = next((n for n in required if n != "grid_thw"), "hidden_states")
        return [{tensor_arg: flat, "grid_thw": grid}]
    image_token = getattr(config, "image_token_id", None)
    ids = token_ids(config)
    if main != "input_ids" or not isinstance(image_token, int) or ids is None:
        return []
    image = torch.full((1, (side * side) // (merge * merge)), image_token, dtype=torch.long)
    batch = {"input_ids": torch.cat([ids, image], dim=1), "pixel_values": flat, "image_grid_thw": grid}
    if "mm_token_type_ids" in accepted:  # 0 for text tokens, 1 for image tokens
        batch["mm_token_type_ids"] = (batch["input_ids"] == image_token).long()
    return [batch]


def _with_other_modalities(batches: list[dict[str, torch.Tensor]], main: str, config: Any,
                           accepted: set[str]) -> list[dict[str, torch.Tensor]]:
    """A model taking text and images (or audio) gets both first, then each batch alone (a dual encoder
    needs both towers fed; a captioner whose ids hold no image token runs its text part alone)."""
    has = {"pixel_values": bool(_sub(config, "vision_config")[1:]) or hasattr(config, "image_size"),
           "input_features": bool(_sub(config, "audio_config")[1:]), "input_values": bool(_sub(config, "audio_config")[1:]),
           "input_ids": bool(_sub(config, "text_config")[1:])}
    others = [name for name, present in has.items() if present and name != main and name in accepted]
    combined = []
    for name in others:  # images: 4-d and 5-d (video) at both sizes
        combined.extend({**batches[0], **extra} for extra in _BUILDERS[name](config)[:4] if batches)
    image_token = next((getattr(config, n) for n in ("image_token_id", "image_token_index")
                        if isinstance(getattr(config, n, None), int)), None)
    length = getattr(config, "image_seq_length", None)
    if image_token is not None and isinstance(length, int) and 0 < length <= 4096:
        for batch in combined:  # a captioner's ids hold one placeholder per image feature
            if "pixel_values" in batch and "input_ids" in batch:
                image = torch.full((1, length), image_token, dtype=torch.long)
                batch["input_ids"] = torch.cat([image, batch["input_ids"]], dim=1)
    return combined + batches


def _optional_inputs(config: Any, accepted: set[str], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Arguments that ``forward`` declares optional but the model cannot run without, named by its config.

    ``lang_ids`` (1,) for X-MOD's language adapters (``languages``); LXMERT's ``visual_feats`` / ``visual_pos``
    (1, 4, ``visual_feat_dim`` / ``visual_pos_dim``); NaFlex images (SigLIP 2: forward takes ``spatial_shapes``)
    as (1, 16, C * P * P) patches of a 4 x 4 grid, with ``spatial_shapes`` [[4, 4]] and a full ``pixel_attention_mask``.
    """
    extra: dict[str, torch.Tensor] = {}
    if "lang_ids" in accepted and getattr(config, "languages", None):
        extra["lang_ids"] = torch.zeros(1, dtype=torch.long)
    feats, pos = getattr(config, "visual_feat_dim", None), getattr(config, "visual_pos_dim", None)
    if {"visual_feats", "visual_pos"} <= accepted and isinstance(feats, int) and isinstance(pos, int):
        extra.update(visual_feats=_pattern(1, 4, feats), visual_pos=_pattern(1, 4, pos).abs())
    vision = _sub(config, "vision_config")[-1]
    patch = getattr(vision, "patch_size", None)
    if {"spatial_shapes", "pixel_attention_mask"} <= accepted and "pixel_values" in batch and isinstance(patch, int):
        channels = _field([vision], ("num_channels", "in_channels"), 3)
        extra.update(pixel_values=_pattern(1, 16, channels * patch * patch), spatial_shapes=torch.tensor([[4, 4]]),
                     pixel_attention_mask=torch.ones(1, 16, dtype=torch.long))
    return extra


def _extra(name: str, config: Any, batch: dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
    """A value for another argument ``name`` of forward, or ``None`` when its name does not say what it is."""
    if name.endswith("input_ids"):
        return token_ids(config)
    if name.endswith("attention_mask"):
        ids = batch.get("input_ids", batch.get("decoder_input_ids"))
        return torch.ones_like(ids) if ids is not None else None
    if name == "pixel_values":
        return _images(config)[0]["pixel_values"]
    if name == "input_features":
        return _features(config)[0]["input_features"]
    features, values = batch.get("input_features"), batch.get("past_values")
    if name.endswith("_mask") and features is not None:  # a mask over the frames of a spectrogram
        bins = _field(_sub(config, "audio_config", "encoder_config"), _FEATURE_FIELDS, 80)
        frames = features.shape[-1] if features.shape[1] == bins else features.shape[1]
        return torch.ones(1, frames, dtype=torch.long)
    if values is not None and name == "past_observed_mask":
        return torch.ones_like(values)
    if values is not None and name == "past_time_features":
        return torch.zeros(1, values.shape[1], getattr(config, "num_time_features", None) or 0)
    return None


def _plain_batches(model: nn.Module, watched: Sequence[nn.Module]) -> Batches:
    out = Batches()
    for dims, cls in ((2, nn.Conv2d), (1, nn.Conv1d), (3, nn.Conv3d)):
        first = next((m for m in watched if isinstance(m, cls)), None)
        if first is not None:
            x = _pattern(2, first.in_channels, *([IMAGE_SIZE] * dims))
            out.candidates.append((describe(x), (x,)))
    embedding = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if embedding is not None:
        ids = torch.arange(2 * SEQ_LEN).reshape(2, SEQ_LEN) % embedding.num_embeddings
        out.candidates.append((describe(ids), (ids,)))
    linears = [m for m in watched if isinstance(m, nn.Linear) or type(m).__name__.endswith("Linear")]
    widths = list(dict.fromkeys(getattr(m, "in_features", None) or m.weight.shape[1] for m in linears
                                if getattr(m, "weight", None) is not None and m.weight.ndim == 2))[:3]
    for width in widths:  # the first Linear registered may be the head: try the first few widths
        for shape in ((2, width), (2, SEQ_LEN, width)):
            x = _pattern(*shape)
            out.candidates.append((describe(x), (x,)))
    if not out.candidates:
        out.gap = f"{type(model).__name__} has no leading Linear/Conv/Embedding to build a batch for; pass example_inputs="
    return out
