"""Model cards for emergence-initialised checkpoints (used by the CLI and the example scripts)."""

from __future__ import annotations

from typing import Any, Optional

from huggingface_hub import ModelCardData

from .plan import EmergencePlan

CITATION = """@article{li2024emergence,
  title   = {Advancing Neural Network Performance through Emergence-Promoting Initialization Scheme},
  author  = {Li, Johnny Jingze and George, Vivek Kurien and Silva, Gabriel A.},
  journal = {arXiv preprint arXiv:2407.19044},
  year    = {2024}
}"""

PIPELINE_TAGS = {"translation": "translation", "image-classification": "image-classification"}
METRIC_IDS = {"bleu": "sacrebleu", "chrf": "chrf", "accuracy": "accuracy"}


def model_card(*, title: str, model_class: str, settings: Optional[dict[str, Any]], plan: Optional[EmergencePlan] = None,
               task: Optional[str] = None, datasets: tuple[str, ...] = (), metrics: Optional[dict[str, float]] = None,
               auto_class: str = "AutoModel", training: Optional[dict[str, Any]] = None, example: Optional[str] = None,
               license: str = "apache-2.0", usage: Optional[str] = None) -> str:
    """Markdown model card with YAML metadata: settings, plan summary, loading, training and citation.

    ``settings`` is ``config.emergence_init``: the card claims the init only when that record says it was
    applied (``"applied": True``, written by ``apply``); ``None``, or settings that were never applied (a
    build on the meta device), give a baseline card. ``metrics``
    maps names ("bleu", "chrf", "accuracy", "loss") to values; ``example`` names the example script
    that trains it further ("translation" or "vision"); ``usage`` replaces the stock ``from_pretrained``
    loading text (for checkpoints that are not transformers models).
    """
    applied = isinstance(settings, dict) and bool(settings.get("applied"))
    if not applied:
        settings, plan = None, None
    tags = ["hf-emergence", "emergence-init"] if applied else ["hf-emergence", "baseline-init"]
    metric_ids = sorted({METRIC_IDS[m] for m in (metrics or {}) if m in METRIC_IDS})
    data = ModelCardData(library_name="transformers", license=license, tags=tags,
                         pipeline_tag=PIPELINE_TAGS.get(task or ""), datasets=list(datasets) or None,
                         metrics=metric_ids or None)
    lines = ["---", data.to_yaml(), "---", "", f"# {title}", ""]
    if settings:
        lines += [f"`{model_class}` initialised with the emergence-promoting initialisation of Li, George & Silva "
                  "([arXiv 2407.19044](https://arxiv.org/abs/2407.19044)) using "
                  "[hf-emergence](https://github.com/hf-emergence/hf-emergence): after the base initialisation, the "
                  "weight layers of each chain are numbered k = -n..n around the middle and layer k's weight is "
                  "multiplied by alpha**k (early layers shrink, late layers grow).", "",
                  "## Initialisation", "", "| setting | value |", "|---|---|"]
        lines += [f"| `{k}` | `{v}` |" for k, v in settings.items() if k != "fingerprint"]
    else:
        lines += [f"`{model_class}` trained from its standard initialisation (a baseline for the emergence init).", ""]
    if plan is not None:
        lines += ["", f"Plan ({plan.source}, base init `{plan.base_init}`, layer unit `{plan.layer_unit}`):", "",
                  "| chain | layer | block | k | factor | tensors | params |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['chain']} | {r['layer']} | `{r['block']}` | {r['k']} | {r['factor']:.4f} | {r['tensors']} | {r['params']:,} |"
                  for r in plan.layers()]
    if metrics:
        lines += ["", "## Results", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    if training:
        lines += ["", "## Training", "", "| argument | value |", "|---|---|"]
        lines += [f"| `{k}` | `{v}` |" for k, v in training.items() if v is not None]
    lines += ["", "## Usage", ""]
    if usage is not None:
        lines += [usage]
    else:
        lines += ["The initialisation is in the weights: stock transformers loads the checkpoint, no custom code or "
                  "`trust_remote_code` needed.", "", "```python", f"from transformers import {auto_class}",
                  f"model = {auto_class}.from_pretrained(\"<this repo or folder>\")", "```"]
    if example:
        lines += ["", "Continue training with the hf-emergence example script:", "", "```bash",
                  f"accelerate launch examples/{example}/run.py --model_name_or_path <this repo or folder>", "```"]
    lines += ["", "Rebuilding from `config.json` with `hf_emergence.from_config` re-draws fresh weights with the same "
              "settings (`config.emergence_init`).", "", "## Citation", "", "```bibtex", CITATION, "```", ""]
    return "\n".join(lines)
