"""The CIFAR ResNet (He et al. 2016, sec. 4.2; the ResNet-18 of kuangliu/pytorch-cifar) as a transformers model.

Unlike transformers' ``resnet`` (7x7 stride-2 stem + max-pool, built for 224 px ImageNet), the stem is one 3x3
stride-1 conv, so a 32x32 image keeps its resolution into the first stage:

    stem:    conv3x3(3 -> w_0, stride 1) -> BN -> ReLU
    stage s: depths[s] BasicBlocks of width w_s, the first with stride 2 for s > 0
    block:   x -> conv3x3 -> BN -> ReLU -> conv3x3 -> BN -> (+ shortcut(x)) -> ReLU
             shortcut = identity, or conv1x1(stride) -> BN where the shape changes (projection, "option B")
    head:    global average pool -> Linear(w_last -> num_labels)

Layouts: ``resnet18`` = depths [2, 2, 2, 2], widths [64, 128, 256, 512] (11.2M parameters); ``resnet20`` = depths
[3, 3, 3], widths [16, 32, 64] (0.27M; the paper uses zero-padding shortcuts, "option A", here the projection).
Convs have no bias (BN follows each). The config is in :mod:`.configuration_cifar_resnet`; :mod:`hf_emergence.models`
registers both with transformers' Auto classes.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import (BaseModelOutputWithPoolingAndNoAttention,
                                           ImageClassifierOutputWithNoAttention)

from .configuration_cifar_resnet import LAYOUTS, CifarResNetConfig

try:  # transformers >= 5: init functions that skip tensors flagged as already initialised
    from transformers import initialization as init
except ImportError:  # pragma: no cover
    from torch.nn import init

class CifarResNetConvNorm(nn.Module):
    """conv (no bias) -> BatchNorm."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> None:
        super().__init__()
        self.convolution = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                                     padding=kernel_size // 2, bias=False)
        self.normalization = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalization(self.convolution(x))


class CifarResNetBasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a shortcut (identity, or a 1x1 conv-BN projection when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = CifarResNetConvNorm(in_channels, out_channels, 3, stride)
        self.conv2 = CifarResNetConvNorm(out_channels, out_channels, 3)
        self.shortcut = (CifarResNetConvNorm(in_channels, out_channels, 1, stride)
                         if stride != 1 or in_channels != out_channels else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(torch.relu(self.conv1(x)))
        return torch.relu(out + (self.shortcut(x) if self.shortcut is not None else x))


class CifarResNetStage(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, depth: int, stride: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(CifarResNetBasicBlock(in_channels if i == 0 else out_channels, out_channels,
                                                          stride if i == 0 else 1) for i in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class CifarResNetPreTrainedModel(PreTrainedModel):
    config_class = CifarResNetConfig
    config: CifarResNetConfig
    base_model_prefix = "resnet"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["CifarResNetBasicBlock"]
    _can_compile_fullgraph = True

    def _init_weights(self, module: nn.Module) -> None:
        """torchvision's ResNet init, as transformers' ``resnet``: convs Kaiming-normal (fan_out, ReLU), BN weight 1 and
        bias 0 with fresh running statistics, the classifier as ``nn.Linear.reset_parameters``."""
        if isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.Linear):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1 / math.sqrt(module.weight.shape[1]) if module.weight.shape[1] > 0 else 0
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)


class CifarResNetModel(CifarResNetPreTrainedModel):
    """Stem, stages and global average pooling: ``pooler_output`` is (batch, hidden_sizes[-1])."""

    def __init__(self, config: CifarResNetConfig) -> None:
        super().__init__(config)
        widths = config.hidden_sizes
        self.stem = CifarResNetConvNorm(config.num_channels, widths[0], 3)
        self.stages = nn.ModuleList(CifarResNetStage(widths[max(s - 1, 0)], widths[s], depth, 1 if s == 0 else 2)
                                    for s, depth in enumerate(config.depths))
        self.pooler = nn.AdaptiveAvgPool2d(1)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: Optional[bool] = None,
                return_dict: Optional[bool] = None, **kwargs: Any) -> BaseModelOutputWithPoolingAndNoAttention:
        output_hidden_states = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        x = torch.relu(self.stem(pixel_values))
        hidden = (x,) if output_hidden_states else None
        for stage in self.stages:
            x = stage(x)
            if hidden is not None:
                hidden += (x,)
        pooled = self.pooler(x).flatten(1)
        out = BaseModelOutputWithPoolingAndNoAttention(last_hidden_state=x, pooler_output=pooled, hidden_states=hidden)
        return out if return_dict is not False else out.to_tuple()


class CifarResNetForImageClassification(CifarResNetPreTrainedModel):
    """:class:`CifarResNetModel` plus a linear classifier; cross-entropy loss when ``labels`` are given."""

    def __init__(self, config: CifarResNetConfig) -> None:
        super().__init__(config)
        self.resnet = CifarResNetModel(config)
        self.classifier = (nn.Linear(config.hidden_sizes[-1], config.num_labels) if config.num_labels > 0
                           else nn.Identity())
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, labels: Optional[torch.Tensor] = None,
                output_hidden_states: Optional[bool] = None, return_dict: Optional[bool] = None,
                **kwargs: Any) -> ImageClassifierOutputWithNoAttention:
        base = self.resnet(pixel_values, output_hidden_states=output_hidden_states, return_dict=True)
        logits = self.classifier(base.pooler_output)
        loss = self.loss_function(labels, logits, self.config) if labels is not None else None
        out = ImageClassifierOutputWithNoAttention(loss=loss, logits=logits, hidden_states=base.hidden_states)
        return out if return_dict is not False else out.to_tuple()


__all__ = ["LAYOUTS", "CifarResNetConfig", "CifarResNetForImageClassification", "CifarResNetModel",
           "CifarResNetPreTrainedModel"]
