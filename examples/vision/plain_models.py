"""The paper's plain families for CIFAR-style inputs: an MLP and a VGG-style CNN, each with or without BatchNorm.

They are ordinary ``nn.Module`` s (no transformers class), so ``hf_emergence`` discovers their layers with its
generic fallback (forward order of the Linear/Conv layers, Kaiming base init). A model carries a
:class:`PlainConfig` as ``model.config``; ``EmergenceInit.apply`` records its settings there, and
:func:`save_plain` / :func:`load_plain` write and read ``config.json`` + ``model.safetensors``.

* ``mlp``: Flatten -> depth x [Linear(width) -> BatchNorm1d? -> ReLU] -> Linear(num_labels):  depth + 1 weight layers.
* ``cnn``: depth x [Conv3x3 -> BatchNorm2d? -> ReLU] in three stages of widths w, 2w, 4w with a 2x2 max-pool
  between stages, then global average pooling -> Linear(num_labels):  depth + 1 weight layers.

Layers followed by BatchNorm have no bias (the BatchNorm shift replaces it).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

PLAIN_MODEL_TYPES = ("mlp", "cnn")
CONFIG_TYPE = "hf_emergence_plain"


@dataclass
class PlainConfig:
    """Everything needed to rebuild a plain model; saved as ``config.json`` next to ``model.safetensors``."""

    architecture: str = "cnn"
    depth: int = 6
    width: int = 64
    batch_norm: bool = True
    num_labels: int = 10
    image_size: int = 32
    num_channels: int = 3
    id2label: dict[str, str] = field(default_factory=dict)
    image_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])   # input normalisation, [0, 1] units
    image_std: list[float] = field(default_factory=lambda: [0.25, 0.25, 0.25])
    emergence_init: Optional[dict[str, Any]] = None
    model_type: str = CONFIG_TYPE

    def __post_init__(self) -> None:
        if self.architecture not in PLAIN_MODEL_TYPES:
            raise ValueError(f"architecture={self.architecture!r} is not one of: {', '.join(PLAIN_MODEL_TYPES)}")
        if self.depth < 1 or self.width < 1:
            raise ValueError(f"depth and width must be >= 1, got depth={self.depth}, width={self.width}")
        if self.architecture == "cnn" and self.depth < 3:
            raise ValueError(f"the cnn has three stages, so depth must be >= 3, got {self.depth}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


def _block(layer: nn.Module, channels: int, batch_norm: bool, conv: bool) -> list[nn.Module]:
    norm = (nn.BatchNorm2d if conv else nn.BatchNorm1d)(channels) if batch_norm else None
    return [layer] + ([norm] if norm is not None else []) + [nn.ReLU(inplace=True)]


def build_plain_model(config: PlainConfig) -> nn.Module:
    """The MLP or CNN described by ``config`` (PyTorch's default init; apply EmergenceInit afterwards)."""
    bias = not config.batch_norm
    layers: list[nn.Module] = []
    if config.architecture == "mlp":
        layers.append(nn.Flatten())
        fan_in = config.num_channels * config.image_size ** 2
        for _ in range(config.depth):
            layers += _block(nn.Linear(fan_in, config.width, bias=bias), config.width, config.batch_norm, conv=False)
            fan_in = config.width
        layers.append(nn.Linear(fan_in, config.num_labels))
    else:
        per_stage = [config.depth // 3 + (1 if i < config.depth % 3 else 0) for i in range(3)]
        channels = config.num_channels
        for stage, count in enumerate(per_stage):
            if stage:
                layers.append(nn.MaxPool2d(2))
            width = config.width * 2 ** stage
            for _ in range(count):
                layers += _block(nn.Conv2d(channels, width, 3, padding=1, bias=bias), width, config.batch_norm, conv=True)
                channels = width
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, config.num_labels)]
    model = nn.Sequential(*layers)
    model.config = config
    return model


def save_plain(model: nn.Module, folder: str | Path) -> None:
    """``model.safetensors`` + ``config.json`` (with the ``emergence_init`` settings when applied)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(model.config.to_json_string())


def is_plain_checkpoint(folder: str | Path) -> bool:
    path = Path(folder) / "config.json"
    return path.is_file() and json.loads(path.read_text()).get("model_type") == CONFIG_TYPE


def load_plain(folder: str | Path) -> nn.Module:
    """Rebuild a saved plain model with its exact weights (the init is not re-applied)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = PlainConfig(**json.loads((folder / "config.json").read_text()))
    model = build_plain_model(config)
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model
