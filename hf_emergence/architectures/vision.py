"""Vision models as rows: ViT-family Transformers (ViT, DeiT) and ConvNets (ResNet, the CIFAR ResNet, ConvNeXt).

* ViT/DeiT are Transformers: the layers are the encoder blocks (``layer_unit="block"``), base init
  Xavier-uniform; the patch embedding, position/cls tokens and the classifier are left alone.
* ResNet/ConvNeXt are ConvNets: every conv and the classifier is a layer in forward order
  (``layer_unit="matrix"``), base init Kaiming-normal (fan_in, ReLU gain). A ResNet 1x1 shortcut
  shares the exponent of the block's last conv, the one whose output it is added to.
  ``layer_unit="block"`` gives one exponent per residual block instead (stem and classifier are
  blocks of their own); ``chain="stage"`` one chain per stage.
"""

from __future__ import annotations

from ..layout import SHORTCUT
from .rows import ArchitectureRow, Blocks, ChainSpec, Single, convnet_row

_VIT_ORDER = (r"attention\.q_proj", r"attention\.k_proj", r"attention\.v_proj", r"attention\.o_proj", r"mlp\.fc1", r"mlp\.fc2")
_VIT_4X_ORDER = (r"attention\.attention\.query", r"attention\.attention\.key", r"attention\.attention\.value",
                 r"attention\.output\.dense", r"intermediate\.dense", r"output\.dense")

VIT = ArchitectureRow(
    name="vit_like", model_types=("vit", "deit"),
    chains=(ChainSpec("encoder", (Blocks(r"layers\.\d+", _VIT_ORDER, count="num_hidden_layers"),)),
            ChainSpec("encoder", (Blocks(r"encoder\.layer\.\d+", _VIT_4X_ORDER, count="num_hidden_layers"),))),
    base_init="xavier_uniform", layer_unit="block",
    description="Blocks ``<prefix>.layers.N`` (transformers 5.x) or ``<prefix>.encoder.layer.N`` (4.x names).",
)

RESNET = convnet_row(
    "resnet", stem=r"embedder\.embedder\.convolution", classifier=r"classifier\.1",
    blocks=Blocks(r"encoder\.stages\.\d+\.layers\.\d+", (r"layer\.\d+\.convolution", r"shortcut\.convolution"),
                  roles={r"shortcut\.convolution": SHORTCUT}, count="depths", stage=r"encoder\.stages\.\d+"),
    description="Stem conv, ``encoder.stages.S.layers.B`` residual blocks (convs in order, shortcut last), classifier.")

CIFAR_RESNET = convnet_row(
    "cifar_resnet", stem=r"stem\.convolution", classifier=r"classifier",
    blocks=Blocks(r"stages\.\d+\.blocks\.\d+", (r"conv1\.convolution", r"conv2\.convolution", r"shortcut\.convolution"),
                  roles={r"shortcut\.convolution": SHORTCUT}, count="depths", stage=r"stages\.\d+"),
    description="hf_emergence's CIFAR ResNet (3x3 stem): stem conv, `stages.S.blocks.B` BasicBlocks (conv1, conv2, "
                "projection shortcut last), classifier.")

CONVNEXT = convnet_row(
    "convnext", stem=r"embeddings\.patch_embeddings", classifier=r"classifier",
    between=(Single(r"encoder\.stages\.\d+\.downsampling_layer\.1"),),
    blocks=Blocks(r"encoder\.stages\.\d+\.layers\.\d+", ("dwconv", "pwconv1", "pwconv2"), count="depths",
                  stage=r"encoder\.stages\.\d+"),
    description="Patch-embedding stem, per stage (downsampling conv, blocks of dwconv/pwconv1/pwconv2), classifier.")

ROWS = (VIT, RESNET, CIFAR_RESNET, CONVNEXT)
