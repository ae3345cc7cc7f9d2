"""Named recipes for examples/translation/run.py (``--model_preset``): a model size plus the training settings it was
measured with. Every value is only a default: the flag of the same name overrides it.

The recipe is fairseq's Transformer recipe (Vaswani et al. 2017; fairseq ``transformer_iwslt_de_en``): one shared
source/target/output embedding, token embeddings scaled by sqrt(d_model) on top of sinusoidal positions, ReLU
feed-forward, Adam(0.9, 0.98) with decoupled weight decay, linear warm-up then inverse-sqrt decay, label smoothing
0.1, gradient clipping, batches of about ``max_tokens_per_batch`` tokens (fairseq's ``--max-tokens``: a batch of n
pairs counts n x its longest side), beam search with a length penalty.

``m2m_100`` is transformers' port of fairseq's pre-LN Transformer (``--encoder-normalize-before``; LayerNorm before
each sub-layer plus a final one, sinusoidal positions, scaled embeddings); ``marian`` is the post-LN original. Why
the presets use which, and the values below, come from the measurements in ``docs/results/translation_recipe/``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Preset:
    """Model size and recipe; the field names are the flags they set (``--learning_rate`` etc.)."""

    model_type: str
    d_model: int
    layers: int                  # encoder layers = decoder layers
    ffn: int
    heads: int
    dropout: float
    learning_rate: float
    num_warmup_steps: int
    max_tokens_per_batch: int
    vocab_size: int
    num_train_epochs: float
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    attention_dropout: float = 0.0
    num_beams: int = 5
    length_penalty: float = 1.0

    def flag_defaults(self) -> dict:
        """Defaults for the flags a preset sets (the size fields are read by build_config)."""
        size = ("d_model", "layers", "ffn", "heads")
        return {k: v for k, v in asdict(self).items() if k not in size}


PRESETS = {
    # for tests: a few seconds on one CPU core
    "tiny": Preset(model_type="marian", d_model=32, layers=2, ffn=64, heads=2, dropout=0.0, learning_rate=1e-3,
                   num_warmup_steps=10, max_tokens_per_batch=500, vocab_size=400, num_train_epochs=1, num_beams=1),
    # Multi30k-sized data on CPU (the README default) or a GPU; the bentrevett/pytorch-seq2seq Transformer's size
    # 600-token batches, lr 2.8e-3 (4e-3 x sqrt(1/2)), warm-up 400 (the same tokens as 200 x 1,200): on 2 epochs of
    # Multi30k, greedy, seeds 1-3, test BLEU 14.74 +- 0.34 against 9.78 +- 2.36 for 1,200 tokens, lr 4e-3, warm-up 200
    # (docs/results/translation_cpu_batch). 3 epochs: README command 1 (the built-in 10k sample, 2 idle
    # CPU cores) then takes 5:52 for test BLEU 15.85 (beam 5); 5 epochs take 8:18 for 20.81, over the ~6-minute budget
    # (docs/results/translation_readme_default)
    "small": Preset(model_type="m2m_100", d_model=256, layers=3, ffn=1024, heads=4, dropout=0.1, learning_rate=2.8e-3,
                    num_warmup_steps=400, max_tokens_per_batch=600, vocab_size=6000, num_train_epochs=3),
    # fairseq transformer_iwslt_de_en (the paper's IWSLT14 setting), for GPUs
    "iwslt": Preset(model_type="marian", d_model=512, layers=6, ffn=1024, heads=4, dropout=0.3, learning_rate=5e-4,
                    num_warmup_steps=4000, max_tokens_per_batch=4096, vocab_size=10000, num_train_epochs=60),
}
