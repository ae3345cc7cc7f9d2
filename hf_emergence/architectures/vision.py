"""Vision models: ViT-family Transformers (ViT, DeiT) and ConvNets (ResNet, ConvNeXt).

* ViT/DeiT are Transformers: the layers are the encoder blocks (``layer_unit="block"``), base init
  Xavier-uniform; the patch embedding, position/cls tokens and the classifier are left alone.
* ResNet/ConvNeXt are ConvNets: every conv and the classifier is a layer in forward order
  (``layer_unit="matrix"``), base init Kaiming-normal (fan_in, ReLU gain). A ResNet 1x1 shortcut
  shares the exponent of the block's last conv, the one whose output it is added to.
  ``layer_unit="block"`` gives one exponent per residual block instead (stem and classifier are
  blocks of their own).
"""

from __future__ import annotations

import re

import torch.nn as nn

from ..layout import LINEAR, SHORTCUT, Chain, Layout
from ._helpers import check_count, find_blocks, ordered_block, single_block
from .registry import LayoutMismatch, register_architecture

_VIT_ORDER = (r"attention\.q_proj", r"attention\.k_proj", r"attention\.v_proj", r"attention\.o_proj", r"mlp\.fc1", r"mlp\.fc2")
_VIT_4X_ORDER = (r"attention\.attention\.query", r"attention\.attention\.key", r"attention\.attention\.value",
                 r"attention\.output\.dense", r"intermediate\.dense", r"output\.dense")


@register_architecture(["vit", "deit"])
def vit_like(model: nn.Module) -> Layout:
    """Blocks ``<prefix>.layers.N`` (transformers 5.x) or ``<prefix>.encoder.layer.N`` (4.x names)."""
    cfg = model.config
    blocks = find_blocks(model, r"(.*\.)?layers\.\d+")
    order = _VIT_ORDER
    if not blocks:
        blocks, order = find_blocks(model, r"(.*\.)?encoder\.layer\.\d+"), _VIT_4X_ORDER
    if not blocks:
        raise LayoutMismatch(f"no Transformer blocks ('layers.N') found in this {cfg.model_type!r} model")
    check_count(len(blocks), getattr(cfg, "num_hidden_layers", None), "encoder blocks", cfg.model_type)
    chain = Chain("encoder", [ordered_block(n, m, order) for n, m in blocks])
    return Layout(chains=[chain], layer_unit="block", base_init="xavier_uniform", source=f"registry:{cfg.model_type}")


@register_architecture("resnet")
def resnet(model: nn.Module) -> Layout:
    """Stem conv, ``encoder.stages.S.layers.B`` residual blocks (convs in order, shortcut last), classifier."""
    cfg = model.config
    prefix = _prefix_of(model, "embedder.embedder.convolution")
    blocks = [single_block(model, f"{prefix}embedder.embedder.convolution")]
    residual = find_blocks(model, rf"{re.escape(prefix)}encoder\.stages\.\d+\.layers\.\d+")
    check_count(len(residual), sum(cfg.depths), "residual blocks", "resnet")
    blocks += [ordered_block(n, m, (r"layer\.\d+\.convolution", r"shortcut\.convolution"),
                             roles={r"shortcut\.convolution": SHORTCUT}) for n, m in residual]
    blocks.append(single_block(model, "classifier.1", role=LINEAR))
    return Layout(chains=[Chain("model", [b for b in blocks if b is not None])], layer_unit="matrix",
                  base_init="kaiming_normal", source="registry:resnet")


@register_architecture("convnext")
def convnext(model: nn.Module) -> Layout:
    """Patch-embedding stem, per stage (downsampling conv, blocks of dwconv/pwconv1/pwconv2), classifier."""
    cfg = model.config
    prefix = _prefix_of(model, "embeddings.patch_embeddings")
    blocks = [single_block(model, f"{prefix}embeddings.patch_embeddings")]
    n_blocks = 0
    for s in range(len(cfg.depths)):
        blocks.append(single_block(model, f"{prefix}encoder.stages.{s}.downsampling_layer.1"))
        stage = find_blocks(model, rf"{re.escape(prefix)}encoder\.stages\.{s}\.layers\.\d+")
        n_blocks += len(stage)
        blocks += [ordered_block(n, m, ("dwconv", "pwconv1", "pwconv2")) for n, m in stage]
    check_count(n_blocks, sum(cfg.depths), "ConvNeXt blocks", "convnext")
    blocks.append(single_block(model, "classifier", role=LINEAR))
    return Layout(chains=[Chain("model", [b for b in blocks if b is not None])], layer_unit="matrix",
                  base_init="kaiming_normal", source="registry:convnext")


def _prefix_of(model: nn.Module, suffix: str) -> str:
    """The dotted prefix ("resnet.", "" for a bare backbone) under which ``suffix`` lives."""
    for name, _ in model.named_modules():
        if name == suffix or name.endswith("." + suffix):
            return name[: len(name) - len(suffix)]
    raise LayoutMismatch(f"no module named '*{suffix}' in {type(model).__name__}")
