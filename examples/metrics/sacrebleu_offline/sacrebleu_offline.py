"""Corpus BLEU and chrF with sacreBLEU, as an `evaluate` metric that loads offline.

    metric = evaluate.load("examples/metrics/sacrebleu_offline")
    metric.add_batch(predictions=["a detokenised hypothesis"], references=["its one reference"])
    metric.compute()  # {"score": BLEU, "chrf": chrF, "signature": "nrefs:1|case:mixed|...", ...}

Scores equal `sacrebleu.corpus_bleu(predictions, [references])` (one reference stream) with its default
13a tokenisation, i.e. detokenised BLEU as reported by sacreBLEU.
"""

import datasets
import evaluate
import sacrebleu

_CITATION = """@inproceedings{post-2018-call, title = "A Call for Clarity in Reporting {BLEU} Scores",
author = "Post, Matt", booktitle = "Proceedings of the Third Conference on Machine Translation", year = "2018"}"""


class SacrebleuOffline(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="sacreBLEU corpus BLEU and chrF over detokenised text, one reference per prediction.",
            citation=_CITATION,
            inputs_description="predictions: list of str; references: list of str (one reference each)",
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        bleu = sacrebleu.metrics.BLEU()
        chrf = sacrebleu.metrics.CHRF()
        b = bleu.corpus_score(predictions, [references])
        c = chrf.corpus_score(predictions, [references])
        return {"score": b.score, "chrf": c.score, "signature": str(bleu.get_signature()),
                "chrf_signature": str(chrf.get_signature()), "counts": b.counts, "totals": b.totals,
                "bp": b.bp, "sys_len": b.sys_len, "ref_len": b.ref_len, "num_sentences": len(predictions)}
