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

REGISTERED = ["bart", "convnext", "deit", "m2m_100", "marian", "mbart", "mt5", "pegasus", "resnet", "t5", "vit"]
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
    # stem + 3 blocks x 3 + 1 downsampling conv + classifier
    "convnext": ("registry:convnext", {"model": 12}, "convnext.embeddings.patch_embeddings.weight", "classifier.weight"),
    "gpt2": ("traced", {"transformer.h": 3}, "transformer.h.0.attn.c_attn.weight", "transformer.h.2.mlp.c_proj.weight"),
    "bert": ("traced", {"encoder": 3}, "bert.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.2.output.dense.weight"),
    "mlp": ("traced", {"model": 5}, "0.weight", "8.weight"),
    "cnn": ("traced", {"model": 4}, "features.0.weight", "head.weight"),
    "torch_transformer": ("traced", {"encoder": 3}, "encoder.layers.0.self_attn.in_proj_weight", "encoder.layers.2.linear2.weight"),
}


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
