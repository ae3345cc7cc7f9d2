"""Encoder-decoder Transformers: the BART family (Marian, BART, mBART, M2M-100, Pegasus) and T5.

Layers are the Transformer blocks, numbered per chain (encoder, decoder) by default. Embeddings (tied
to the LM head), positional tables and LayerNorms are not weight layers and are never touched.
"""

from __future__ import annotations

import torch.nn as nn

from ..layout import Chain, Layout
from ._helpers import check_count, find_blocks, ordered_block
from .registry import LayoutMismatch, register_architecture

_BART_ORDER = (
    r"self_attn\.q_proj", r"self_attn\.k_proj", r"self_attn\.v_proj", r"self_attn\.out_proj",
    r"encoder_attn\.q_proj", r"encoder_attn\.k_proj", r"encoder_attn\.v_proj", r"encoder_attn\.out_proj",
    r"fc1", r"fc2",
)
_T5_ORDER = (
    r"layer\.0\.SelfAttention\.q", r"layer\.0\.SelfAttention\.k", r"layer\.0\.SelfAttention\.v", r"layer\.0\.SelfAttention\.o",
    r"layer\.1\.EncDecAttention\.q", r"layer\.1\.EncDecAttention\.k", r"layer\.1\.EncDecAttention\.v", r"layer\.1\.EncDecAttention\.o",
    r"layer\.\d\.DenseReluDense\.wi(_0)?", r"layer\.\d\.DenseReluDense\.wi_1", r"layer\.\d\.DenseReluDense\.wo",
)


def _encoder_decoder(model: nn.Module, model_type: str, block_path: str, order: tuple[str, ...],
                     counts: dict[str, object], base_init: str) -> Layout:
    chains = []
    for side in ("encoder", "decoder"):
        blocks = find_blocks(model, rf"(.*\.)?{side}\.{block_path}\.\d+")
        if not blocks:
            continue
        check_count(len(blocks), counts.get(side), f"{side} blocks", model_type)
        chains.append(Chain(side, [ordered_block(n, m, order) for n, m in blocks]))
    if not chains:
        raise LayoutMismatch(f"no '{{encoder,decoder}}.{block_path}.N' blocks found in this {model_type!r} model")
    return Layout(chains=chains, layer_unit="block", base_init=base_init, source=f"registry:{model_type}")


@register_architecture(["marian", "bart", "mbart", "m2m_100", "pegasus"])
def bart_like(model: nn.Module) -> Layout:
    """``{encoder,decoder}.layers.N`` with self_attn / encoder_attn {q,k,v,out}_proj, fc1, fc2.

    Base init: Xavier-uniform (fairseq's Transformer default and the paper's named baseline).
    """
    cfg = model.config
    counts = {"encoder": getattr(cfg, "encoder_layers", None), "decoder": getattr(cfg, "decoder_layers", None)}
    return _encoder_decoder(model, cfg.model_type, "layers", _BART_ORDER, counts, "xavier_uniform")


@register_architecture(["t5", "mt5"])
def t5_like(model: nn.Module) -> Layout:
    """``{encoder,decoder}.block.N`` with SelfAttention / EncDecAttention {q,k,v,o} and DenseReluDense.

    Base init: ``keep``. T5 has no 1/sqrt(d) in its attention; its own init folds that into q's std
    ((d_model * d_kv)**-0.5), which a Xavier re-init would undo. The relative position bias is an
    embedding and is never scaled.
    """
    cfg = model.config
    counts = {"encoder": getattr(cfg, "num_layers", None), "decoder": getattr(cfg, "num_decoder_layers", None)}
    return _encoder_decoder(model, cfg.model_type, "block", _T5_ORDER, counts, "keep")
