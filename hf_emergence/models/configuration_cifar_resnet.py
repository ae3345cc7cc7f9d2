"""Config of the CIFAR ResNet (:mod:`.modeling_cifar_resnet`): its layout, and nothing that imports the model code.

Creating a config registers the model classes with transformers' Auto classes (:func:`hf_emergence.models.register_models`),
so that ``AutoModel*.from_config`` / ``from_pretrained`` find them by the time they look.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from transformers.configuration_utils import PreTrainedConfig

#: name -> (depths, hidden_sizes)
LAYOUTS: dict[str, tuple[list[int], list[int]]] = {
    "resnet18": ([2, 2, 2, 2], [64, 128, 256, 512]),
    "resnet20": ([3, 3, 3], [16, 32, 64]),
}


class CifarResNetConfig(PreTrainedConfig):
    """Config of :class:`CifarResNetForImageClassification`.

    Args:
        layout: "resnet18" or "resnet20" fills ``depths`` and ``hidden_sizes``; explicit ``depths``/``hidden_sizes``
            win. Reading ``config.layout`` names the preset the current lists match, or "custom"; setting it
            (``--config_overrides layout=resnet20``) sets both lists.
        depths: BasicBlocks per stage.
        hidden_sizes: channels per stage; the stem outputs ``hidden_sizes[0]``.
        num_channels: input channels.
    """

    model_type = "cifar_resnet"

    def __init__(self, layout: Optional[str] = "resnet18", depths: Optional[Sequence[int]] = None,
                 hidden_sizes: Optional[Sequence[int]] = None, num_channels: int = 3, **kwargs: Any) -> None:
        if layout not in (None, "custom", *LAYOUTS):
            raise ValueError(f"layout={layout!r} is not one of: {', '.join(LAYOUTS)}, custom")
        preset = LAYOUTS.get(layout or "", LAYOUTS["resnet18"])
        self.depths = [int(d) for d in (depths if depths is not None else preset[0])]
        self.hidden_sizes = [int(w) for w in (hidden_sizes if hidden_sizes is not None else preset[1])]
        self.num_channels = int(num_channels)
        self._check()
        super().__init__(**kwargs)
        from . import register_models

        register_models()

    def _check(self) -> None:
        if len(self.depths) != len(self.hidden_sizes) or not self.depths:
            raise ValueError(f"depths ({self.depths}) and hidden_sizes ({self.hidden_sizes}) need one entry per stage, "
                             "and at least one stage")
        if min(self.depths) < 1 or min(self.hidden_sizes) < 1 or self.num_channels < 1:
            raise ValueError(f"depths, hidden_sizes and num_channels must be >= 1, got depths={self.depths}, "
                             f"hidden_sizes={self.hidden_sizes}, num_channels={self.num_channels}")

    @property
    def layout(self) -> str:
        return next((name for name, (d, w) in LAYOUTS.items() if d == self.depths and w == self.hidden_sizes), "custom")

    @layout.setter
    def layout(self, name: str) -> None:
        if name not in LAYOUTS:
            raise ValueError(f"layout={name!r} is not one of: {', '.join(LAYOUTS)} (set depths/hidden_sizes for others)")
        self.depths, self.hidden_sizes = list(LAYOUTS[name][0]), list(LAYOUTS[name][1])

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "layout": self.layout}   # informative: the lists are what a load reads



__all__ = ["LAYOUTS", "CifarResNetConfig"]
