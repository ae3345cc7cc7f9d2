"""Top-1 accuracy as an `evaluate` metric that loads offline (the Hub's "accuracy" script needs a network).

    metric = evaluate.load("examples/metrics/accuracy_offline")
    metric.compute(predictions=[0, 2, 1], references=[0, 1, 1])  # {"accuracy": 0.666..., "correct": 2, "total": 3}
"""

import datasets
import evaluate


class AccuracyOffline(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Fraction of predictions equal to their reference label.",
            citation="",
            inputs_description="predictions: list of int; references: list of int",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        correct = sum(int(p == r) for p, r in zip(predictions, references))
        total = len(references)
        return {"accuracy": correct / total if total else float("nan"), "correct": correct, "total": total}
