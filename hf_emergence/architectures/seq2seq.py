"""Encoder-decoder Transformers: the BART family (Marian, BART, mBART, M2M-100, Pegasus) and T5, as rows.

Layers are the Transformer blocks, numbered per chain (encoder, decoder) by default. Embeddings (tied
to the LM head), positional tables and LayerNorms are not weight layers and are never touched.
"""

from __future__ import annotations

from .rows import ArchitectureRow, Blocks, ChainSpec

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

BART = ArchitectureRow(
    name="bart_like", model_types=("marian", "bart", "mbart", "m2m_100", "pegasus"),
    chains=(ChainSpec("encoder", (Blocks(r"encoder\.layers\.\d+", _BART_ORDER, count="encoder_layers"),)),
            ChainSpec("decoder", (Blocks(r"decoder\.layers\.\d+", _BART_ORDER, count="decoder_layers"),))),
    base_init="xavier_uniform", layer_unit="block",
    description="``{encoder,decoder}.layers.N`` with self_attn / encoder_attn {q,k,v,out}_proj, fc1, fc2.\n\n"
                "Base init: Xavier-uniform (fairseq's Transformer default and the paper's named baseline).",
)

T5 = ArchitectureRow(
    name="t5_like", model_types=("t5", "mt5"),
    chains=(ChainSpec("encoder", (Blocks(r"encoder\.block\.\d+", _T5_ORDER, count="num_layers"),)),
            ChainSpec("decoder", (Blocks(r"decoder\.block\.\d+", _T5_ORDER, count="num_decoder_layers"),))),
    base_init="keep", layer_unit="block",
    description="``{encoder,decoder}.block.N`` with SelfAttention / EncDecAttention {q,k,v,o} and DenseReluDense.\n\n"
                "Base init: ``keep``. T5 has no 1/sqrt(d) in its attention; its own init folds that into q's std "
                "((d_model * d_kv)**-0.5), which a Xavier re-init would undo. The relative position bias is an "
                "embedding and is never scaled.",
)

ROWS = (BART, T5)
