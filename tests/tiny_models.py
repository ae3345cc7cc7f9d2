"""Tiny models for the tests: one row per registered architecture plus fallback-only models.

Each row: (name, factory) where factory() builds a fresh model from config (seed it first), and
EXPECTED[name] = (layout source, {chain: number of layers}, first planned tensor, last planned tensor).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForImageClassification, AutoModelForSeq2SeqLM,
                          AutoModelForSequenceClassification)

from hf_emergence import resolve_model_class

_SEQ2SEQ = dict(vocab_size=64, d_model=16, encoder_layers=3, decoder_layers=4, encoder_attention_heads=2,
                decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
                pad_token_id=1, eos_token_id=2, bos_token_id=0, decoder_start_token_id=2)
_T5 = dict(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=3, num_decoder_layers=4, num_heads=2,
           decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
_VIT = dict(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=5, num_attention_heads=2,
            intermediate_size=32, num_labels=10)

CONFIGS: dict[str, tuple[str, dict, type]] = {
    "marian": ("marian", _SEQ2SEQ, AutoModelForSeq2SeqLM),
    "bart": ("bart", _SEQ2SEQ, AutoModelForSeq2SeqLM),
    "mbart": ("mbart", _SEQ2SEQ, AutoModelForSeq2SeqLM),
    "m2m_100": ("m2m_100", _SEQ2SEQ, AutoModelForSeq2SeqLM),
    "pegasus": ("pegasus", _SEQ2SEQ, AutoModelForSeq2SeqLM),
    "t5": ("t5", _T5, AutoModelForSeq2SeqLM),
    "mt5": ("mt5", dict(_T5, feed_forward_proj="gated-gelu"), AutoModelForSeq2SeqLM),
    "vit": ("vit", _VIT, AutoModelForImageClassification),
    "deit": ("deit", _VIT, AutoModelForImageClassification),
    "resnet": ("resnet", dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 2], layer_type="basic", num_labels=10),
               AutoModelForImageClassification),
    "convnext": ("convnext", dict(hidden_sizes=[8, 16], depths=[1, 2], num_stages=2, num_labels=10),
                 AutoModelForImageClassification),
    "cifar_resnet": ("cifar_resnet", dict(hidden_sizes=[8, 16], depths=[1, 2], num_labels=10), AutoModelForImageClassification),
    # fallback only (not registered)
    "gpt2": ("gpt2", dict(n_layer=3, n_embd=16, n_head=2, vocab_size=64, n_positions=32), AutoModelForCausalLM),
    "bert": ("bert", dict(num_hidden_layers=3, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                          vocab_size=64, max_position_embeddings=32, num_labels=3), AutoModelForSequenceClassification),
}


def hf_config(name: str):
    model_type, kwargs, _ = CONFIGS[name]
    return AutoConfig.for_model(model_type, **kwargs)


def hf_class(name: str) -> type:
    """The concrete class the row's Auto class builds (DeiT's Auto mapping is ambiguous in 5.x)."""
    return resolve_model_class(CONFIGS[name][2], hf_config(name))


def hf_factory(name: str) -> Callable[[], nn.Module]:
    return lambda: hf_class(name)._from_config(hf_config(name))


class MLP(nn.Sequential):
    """Bias-free (optionally) ReLU MLP, the paper's simplest family."""

    def __init__(self, widths=(12, 24, 24, 24, 24, 5), bias: bool = True):
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(a, b, bias=bias))
            if i < len(widths) - 2:
                layers.append(nn.ReLU())
        super().__init__(*layers)


class CNN(nn.Module):
    """VGG-style ConvNet with BatchNorm; registers the classifier *first* to test forward-order tracing."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(16, 10)
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        return self.head(self.features(x))


class TorchTransformer(nn.Module):
    """Plain ``nn.TransformerEncoder`` (fused MultiheadAttention in_proj) with embedding and head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
        self.head = nn.Linear(16, 4)

    def forward(self, ids):
        return self.head(self.encoder(self.embed(ids)))


FACTORIES: dict[str, Callable[[], nn.Module]] = {name: hf_factory(name) for name in CONFIGS}
FACTORIES.update({"mlp": MLP, "cnn": CNN, "torch_transformer": TorchTransformer})
EXAMPLE_INPUTS = {"torch_transformer": torch.zeros(2, 5, dtype=torch.long)}

REGISTERED = ["bart", "cifar_resnet", "convnext", "deit", "m2m_100", "marian", "mbart", "mt5", "pegasus", "resnet", "t5", "vit"]
FALLBACK = ["gpt2", "bert", "mlp", "cnn", "torch_transformer"]

_ED = {"encoder": 3, "decoder": 4}
EXPECTED = {
    "marian": ("registry:marian", _ED, "model.encoder.layers.0.self_attn.q_proj.weight", "model.decoder.layers.3.fc2.weight"),
    "bart": ("registry:bart", _ED, "model.encoder.layers.0.self_attn.q_proj.weight", "model.decoder.layers.3.fc2.weight"),
    "mbart": ("registry:mbart", _ED, "model.encoder.layers.0.self_attn.q_proj.weight", "model.decoder.layers.3.fc2.weight"),
    "m2m_100": ("registry:m2m_100", _ED, "model.encoder.layers.0.self_attn.q_proj.weight", "model.decoder.layers.3.fc2.weight"),
    "pegasus": ("registry:pegasus", _ED, "model.encoder.layers.0.self_attn.q_proj.weight", "model.decoder.layers.3.fc2.weight"),
    "t5": ("registry:t5", _ED, "encoder.block.0.layer.0.SelfAttention.q.weight", "decoder.block.3.layer.2.DenseReluDense.wo.weight"),
    "mt5": ("registry:mt5", _ED, "encoder.block.0.layer.0.SelfAttention.q.weight", "decoder.block.3.layer.2.DenseReluDense.wo.weight"),
    "vit": ("registry:vit", {"encoder": 5}, "vit.layers.0.attention.q_proj.weight", "vit.layers.4.mlp.fc2.weight"),
    "deit": ("registry:deit", {"encoder": 5}, "deit.layers.0.attention.q_proj.weight", "deit.layers.4.mlp.fc2.weight"),
    # stem + 3 basic blocks x 2 convs + classifier; the stage-1 shortcut shares a layer
    "resnet": ("registry:resnet", {"model": 8}, "resnet.embedder.embedder.convolution.weight", "classifier.1.weight"),
    # stem + 3 basic blocks x 2 convs + classifier; the stage-1 shortcut shares a layer
    "cifar_resnet": ("registry:cifar_resnet", {"model": 8}, "resnet.stem.convolution.weight", "classifier.weight"),
    # stem + 3 blocks x 3 + 1 downsampling conv + classifier
    "convnext": ("registry:convnext", {"model": 12}, "convnext.embeddings.patch_embeddings.weight", "classifier.weight"),
    "gpt2": ("traced", {"transformer.h": 3}, "transformer.h.0.attn.c_attn.weight", "transformer.h.2.mlp.c_proj.weight"),
    "bert": ("traced", {"encoder": 3}, "bert.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.2.output.dense.weight"),
    "mlp": ("traced", {"model": 5}, "0.weight", "8.weight"),
    "cnn": ("traced", {"model": 4}, "features.0.weight", "head.weight"),
    "torch_transformer": ("traced", {"encoder": 3}, "encoder.layers.0.self_attn.in_proj_weight", "encoder.layers.2.linear2.weight"),
}


# ---- discovery's table of tiny models (issue 16 / issue 11): each kind of structure discovery must handle ----------
_MIXTRAL = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=2,
                num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
_SWIN = dict(image_size=32, patch_size=2, embed_dim=8, depths=[2, 1, 2], num_heads=[1, 1, 2], window_size=2,
             mlp_ratio=2.0)
_ENCODEC = dict(hidden_size=8, num_filters=4, upsampling_ratios=[2, 2], codebook_size=16, codebook_dim=8,
                num_lstm_layers=1, audio_channels=1, target_bandwidths=[1.5], sampling_rate=800)
# Models whose forward needs an argument it declares optional (hf_emergence.inputs._optional_inputs)
_XMOD = dict(vocab_size=64, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
             max_position_embeddings=32, languages=["en_XX", "de_DE"])
_LXMERT = dict(vocab_size=64, hidden_size=16, num_attention_heads=2, intermediate_size=32, l_layers=2, x_layers=1,
               r_layers=1, visual_feat_dim=8, visual_pos_dim=4, max_position_embeddings=32)
_SIGLIP2 = dict(text_config=dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=32, max_position_embeddings=16),
                vision_config=dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                   patch_size=4, num_patches=16))
_DECISION = dict(state_dim=3, act_dim=2, hidden_size=16, n_layer=2, n_head=2, max_ep_len=10, n_positions=32, vocab_size=1)
DECISION_BATCH = {"states": torch.linspace(-1, 1, 12).reshape(1, 4, 3), "actions": torch.linspace(-1, 1, 8).reshape(1, 4, 2),
                  "rewards": torch.ones(1, 4, 1), "returns_to_go": torch.linspace(1, 0, 4).reshape(1, 4, 1),
                  "timesteps": torch.arange(4)[None], "attention_mask": torch.ones(1, 4, dtype=torch.long)}


def hf_model(model_type: str, kwargs: dict, cls: type = None) -> nn.Module:
    """``cls`` (default: ``AutoModel``'s class) built from a tiny ``AutoConfig.for_model`` config."""
    from transformers import AutoModel

    config = AutoConfig.for_model(model_type, **kwargs)
    return (cls or resolve_model_class(AutoModel, config))._from_config(config)


def bart_decoder() -> nn.Module:
    """A standalone ``BartDecoder`` (a registered model_type, another class than the registry's usual ones)."""
    from transformers.models.bart.modeling_bart import BartDecoder

    return BartDecoder(hf_config("bart"))


def marian_encoder() -> nn.Module:
    from transformers.models.marian.modeling_marian import MarianEncoder

    return MarianEncoder(hf_config("marian"))


class ItemGated(nn.Module):
    """Calls ``.item()`` in its forward (no meta or fake pass can run it) and registers its head first."""

    def __init__(self):
        super().__init__()
        self.head, self.a, self.b, self.c = nn.Linear(8, 3), nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        h = torch.relu(self.a(x))
        if h.abs().sum().item() >= 0:  # data-dependent Python branch
            h = torch.relu(self.b(h))
        return self.head(torch.relu(self.c(h)))


class NonzeroRouted(nn.Module):
    """Routes rows through ``torch.nonzero`` (a data-dependent shape) between its layers."""

    def __init__(self):
        super().__init__()
        self.out, self.inp, self.mid = nn.Linear(8, 2), nn.Linear(4, 8), nn.Linear(8, 8)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        rows = torch.nonzero(h.sum(-1) > -1e9).squeeze(-1)
        h = h.index_select(0, rows)
        return self.out(torch.relu(self.mid(h)))


class RepVGGBlock(nn.Module):
    """Re-parameterisable multi-branch conv: conv3x3-BN + conv1x1-BN (+ identity), outputs summed."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.dense = nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out))
        self.one_by_one = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        self.identity = nn.BatchNorm2d(c_out) if c_in == c_out and stride == 1 else None

    def forward(self, x):
        out = self.dense(x) + self.one_by_one(x)
        return torch.relu(out + self.identity(x) if self.identity is not None else out)


class RepVGG(nn.Module):
    """Stem, two stages of RepVGG blocks, classifier."""

    def __init__(self):
        super().__init__()
        self.stem = RepVGGBlock(3, 8, stride=2)
        self.stage1 = nn.Sequential(RepVGGBlock(8, 8), RepVGGBlock(8, 8))
        self.stage2 = nn.Sequential(RepVGGBlock(8, 16, stride=2), RepVGGBlock(16, 16))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stage2(self.stage1(self.stem(x)))
        return self.head(x.mean((2, 3)))


class ConvBlock(nn.Module):
    """A residual block with a 1x1 projection called ``downsample.0`` (torchvision's shortcut name)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c_in, c_out, 3, padding=1), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1), nn.BatchNorm2d(c_out)) if c_in != c_out else None

    def forward(self, x):
        out = self.conv2(torch.relu(self.conv1(x)))
        return torch.relu(out + (self.downsample(x) if self.downsample is not None else x))


class TimmStage(nn.Module):
    """timm-style stage: a main-path ``downsample`` conv, then ``blocks``."""

    def __init__(self, c_in: int, c_out: int, depth: int):
        super().__init__()
        self.downsample = nn.Conv2d(c_in, c_out, 2, stride=2)
        self.blocks = nn.Sequential(*[ConvBlock(c_out, c_out) for _ in range(depth)])

    def forward(self, x):
        return self.blocks(self.downsample(x))


class TimmStyleNet(nn.Module):
    """``stem``, ``stages.N.{downsample,blocks}``, ``head``; stage 0's first block has a projection shortcut."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stages = nn.Sequential(nn.Sequential(ConvBlock(8, 12), ConvBlock(12, 12)), TimmStage(12, 16, 1),
                                    TimmStage(16, 24, 2))
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


class AttentionBlock(nn.Module):
    def __init__(self, d: int = 16):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        h = self.norm(x)
        return x + self.attn(h, h, h, need_weights=False)[0]


class MLPBlock(nn.Module):
    def __init__(self, d: int = 16):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class PatchMerge(nn.Module):
    """Swin-style patch merging on a (batch, tokens, d) sequence: pairs of tokens -> one, width doubled."""

    def __init__(self, d: int):
        super().__init__()
        self.reduction = nn.Linear(2 * d, 2 * d)

    def forward(self, x):
        b, n, d = x.shape
        return self.reduction(x.reshape(b, n // 2, 2 * d))


class HierarchicalStage(nn.Module):
    def __init__(self, d: int, depth: int, merge: bool):
        super().__init__()
        self.blocks = nn.ModuleList([AttentionBlock(d) if i % 2 == 0 else MLPBlock(d) for i in range(depth)])
        self.downsample = PatchMerge(d) if merge else None  # main path, between stages: not a shortcut

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class HierarchicalTransformer(nn.Module):
    """Swin/PVT-like: ``embed``, ``stages.N.blocks`` (attention and MLP blocks mixed in one list, a one-block
    stage included) with patch merging between stages, ``head``. Not registered anywhere."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.stages = nn.ModuleList([HierarchicalStage(8, 2, True), HierarchicalStage(16, 1, True),
                                     HierarchicalStage(32, 3, False)])
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        x = self.embed(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(x.mean(1))


class WeightNormedConvNet(nn.Module):
    """Convs under ``parametrizations.weight_norm``, the older hook ``weight_norm``, and a spectral norm
    (a parametrization discovery does not know: left out with a warning)."""

    def __init__(self):
        super().__init__()
        from torch.nn.utils import parametrizations, weight_norm

        self.conv1 = parametrizations.weight_norm(nn.Conv1d(2, 8, 3, padding=1))
        self.conv2 = parametrizations.weight_norm(nn.Conv1d(8, 8, 3, padding=1))
        self.conv3 = weight_norm(nn.Conv1d(8, 8, 3, padding=1))
        self.odd = parametrizations.spectral_norm(nn.Conv1d(8, 8, 1))
        self.conv4 = parametrizations.weight_norm(nn.Conv1d(8, 4, 3, padding=1))

    def forward(self, x):
        for layer in (self.conv1, self.conv2, self.conv3, self.odd, self.conv4):
            x = torch.tanh(layer(x))
        return x


class StatefulNet(nn.Module):
    """Changes a buffer and draws random numbers in its forward, holds a BatchNorm: the trace must leave no trace."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))
        self.b, self.a = nn.Linear(4, 4), nn.Linear(4, 4)
        self.norm = nn.BatchNorm1d(4)

    def forward(self, x):
        self.calls += 1
        self.last_batch = x.shape[0]  # an attribute set in forward (Swin resets its window size so)
        self.a.in_features = x.shape[-1]
        x = self.a(x) + 0.0 * torch.rand_like(x)
        return self.b(self.norm(x))


def _albert() -> nn.Module:
    """ALBERT: one layer's weights shared across all 4 depths (not registered)."""
    config = AutoConfig.for_model("albert", num_hidden_layers=4, hidden_size=16, embedding_size=8, num_attention_heads=2,
                                  intermediate_size=32, vocab_size=64, max_position_embeddings=32, num_labels=3)
    return AutoModelForSequenceClassification.from_config(config)


def _marian_one_layer_per_chain() -> nn.Module:
    config = AutoConfig.for_model("marian", **dict(_SEQ2SEQ, encoder_layers=1, decoder_layers=1))
    return AutoModelForSeq2SeqLM.from_config(config)


#: Models whose every chain has a single layer: the init would scale nothing, so planning them is refused.
SINGLE_LAYER: dict[str, Callable[[], nn.Module]] = {
    "linear": lambda: nn.Linear(3, 3),
    "albert": _albert,
    "marian_1+1": _marian_one_layer_per_chain,
}
