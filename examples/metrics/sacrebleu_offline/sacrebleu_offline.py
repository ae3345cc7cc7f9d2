"""Corpus BLEU and chrF with sacreBLEU, as an `evaluate` metric that loads offline; optionally also the tokenised,
lowercased BLEU that fairseq papers report.

    metric = evaluate.load("examples/metrics/sacrebleu_offline")
    metric.add_batch(predictions=["a detokenised hypothesis"], references=["its one reference"])
    metric.compute()  # {"score": BLEU, "chrf": chrF, "signature": "nrefs:1|case:mixed|...", ...}
    metric.compute(tokenized_bleu_lang="en")  # also "tokenized_bleu", "tokenized_signature"

``score`` equals `sacrebleu.corpus_bleu(predictions, [references])` (one reference stream, its default 13a
tokenisation): detokenised, cased BLEU as sacreBLEU reports it, the number to compare across papers.

``tokenized_bleu`` is BLEU as fairseq reports it on IWSLT14 (``fairseq-generate --remove-bpe``, i.e. multi-bleu.perl
on text that prepare-iwslt14.sh tokenised with the Moses tokenizer and lowercased): both sides are lowercased and
Moses-tokenised (sacremoses, the Python port of tokenizer.perl, with its default escaping), then scored by
`sacrebleu.corpus_bleu(..., tokenize="none", lowercase=True, force=True)`. With ``pretokenized=True`` the text is
already in that form (prepare_iwslt14.py's output) and is scored as it is. It is higher than the detokenised BLEU and comparable only to
numbers computed the same way.
"""

import datasets
import evaluate
import sacrebleu

_CITATION = """@inproceedings{post-2018-call, title = "A Call for Clarity in Reporting {BLEU} Scores",
author = "Post, Matt", booktitle = "Proceedings of the Third Conference on Machine Translation", year = "2018"}"""


def moses_tokenize(texts, lang):
    """Moses-tokenised text (tokenizer.perl -l LANG with its default escaping); sacreBLEU lowercases it."""
    from sacremoses import MosesTokenizer

    tokenizer = MosesTokenizer(lang=lang)
    return [tokenizer.tokenize(t, return_str=True, escape=True) for t in texts]


class SacrebleuOffline(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="sacreBLEU corpus BLEU and chrF over detokenised text, one reference per prediction; optionally "
                        "tokenised lowercased BLEU (fairseq's IWSLT14 convention).",
            citation=_CITATION,
            inputs_description="predictions: list of str; references: list of str (one reference each); "
                               "tokenized_bleu_lang: language for the Moses tokenizer (None: no tokenised BLEU); "
                               "pretokenized: the text is already Moses-tokenised",
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, tokenized_bleu_lang=None, pretokenized=False):
        bleu = sacrebleu.metrics.BLEU()
        chrf = sacrebleu.metrics.CHRF()
        b = bleu.corpus_score(predictions, [references])
        c = chrf.corpus_score(predictions, [references])
        out = {"score": b.score, "chrf": c.score, "signature": str(bleu.get_signature()),
               "chrf_signature": str(chrf.get_signature()), "counts": b.counts, "totals": b.totals,
               "bp": b.bp, "sys_len": b.sys_len, "ref_len": b.ref_len, "num_sentences": len(predictions)}
        if tokenized_bleu_lang is not None:
            if pretokenized:
                hyps, refs = predictions, references
            else:
                hyps, refs = moses_tokenize(predictions, tokenized_bleu_lang), moses_tokenize(references, tokenized_bleu_lang)
            tok = sacrebleu.metrics.BLEU(tokenize="none", lowercase=True, force=True)
            out["tokenized_bleu"] = tok.corpus_score(hyps, [refs]).score
            how = "pretokenized" if pretokenized else f"moses-{tokenized_bleu_lang}"
            out["tokenized_signature"] = f"{tok.get_signature()}|input:{how}"
        return out
