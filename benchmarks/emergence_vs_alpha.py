#!/usr/bin/env python
"""Emergence E and activation profiles against alpha, at initialisation, on a fixed batch of real data.

    python benchmarks/emergence_vs_alpha.py                                  # all models, alphas 1.0..2.0, 3 seeds
    python benchmarks/emergence_vs_alpha.py --models mlp cnn --seeds 0 1 2 3 4 --alphas 1 1.05 1.1 1.2

For every model, alpha and seed: build the model from its config under ``torch.manual_seed(seed)``, apply
``EmergenceInit(alpha=alpha)`` (base init "auto": Kaiming-normal for the plain MLP/CNN, Xavier-uniform for the
Transformers; alpha = 1 is the base init alone), then measure on the same batch

* ``hf_emergence.emergence``: E, log10 E, E / E_max ("normalised"), with a neuron active when its batch-mean
  activation exceeds 0.05 (with ``--all_samples`` also with ``all_samples=True``: active on every sample);
* ``hf_emergence.activation_profile``: per plan layer the active fraction, mean |output|, mean |input|, weight std
  and gradient norm after one backward pass (cross-entropy on the batch's labels);
* ``plan.min_activation_scale()``: the U-shaped shrink the plan predicts for a bias-free homogeneous chain.

and once per model and seed ``hf_emergence.suggest_alpha`` on the base-initialised model (min_scale 0.1,
alpha_max 2.0, tol 0.01, min_active "auto": 0.5 for the models with norm layers). The activation applied to a neuron's
value is the model's own (ReLU for the MLP/CNN, GELU for Marian and ViT). BatchNorm uses batch statistics, and a conv
followed by a BatchNorm is read after it (the measure's defaults).

Data: 130 CIFAR-10 training images (``NNNN.jpg`` with NNNN < 13 of every class in
``../shared/data/cifar10_jpg.tar.gz``, normalised with the usual CIFAR-10 channel mean/std) for the vision
models; for Marian, the first 32 pairs of the translation example's built-in Multi30k validation sample,
tokenised with a BPE trained on the sample's training split exactly as ``examples/translation/run.py`` does
(``train_tokenizer``, vocabulary 8000).

Writes ``results.json``, ``README.md`` and PNG plots under ``--out`` (default docs/results/emergence_vs_alpha).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shlex
import statistics
import sys
import tarfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hf_emergence import EmergenceInit, activation_profile, emergence, suggest_alpha  # noqa: E402
from hf_emergence.atomic import atomic_write  # noqa: E402

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
DEFAULT_ALPHAS = (1.0, 1.1, 1.2, 1.35, 1.5, 2.0)
MODEL_NAMES = ("mlp", "cnn", "cnn_bn", "marian", "vit")
DESCRIPTIONS = {
    "mlp": "plain MLP 3072-512x6-10, ReLU, biases (PyTorch default init, left alone), 7 Linear layers",
    "cnn": "VGG-style CNN without BatchNorm: conv 32,32,pool,64,64,pool,128,128,pool, FC 256, FC 10; ReLU; 8 layers",
    "cnn_bn": "the same CNN with BatchNorm2d after every conv (batch statistics while measuring)",
    "marian": "MarianMT from examples/translation/run.py's preset 'small' (d_model 256, 3+3 layers, FFN 512, 4 heads, "
              "GELU); encoder and decoder are separate chains of 3 blocks",
    "vit": "ViT small for 32x32 (patch 4, hidden 192, 6 layers, 3 heads, MLP 768, GELU), 10 classes",
}


# ------------------------------------------------------------------------------------------------ models
class MLP(nn.Module):
    def __init__(self, width: int = 512, hidden_layers: int = 6, classes: int = 10):
        super().__init__()
        dims = [3 * 32 * 32] + [width] * hidden_layers
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.layers:
            x = F.relu(layer(x))
        return self.head(x)


class CNN(nn.Module):
    def __init__(self, batch_norm: bool, channels=(32, 32, "M", 64, 64, "M", 128, 128, "M"), classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c in channels:
            if c == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            layers.append(nn.Conv2d(c_in, c, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(c))
            layers.append(nn.ReLU())
            c_in = c
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in * 4 * 4, 256)
        self.head = nn.Linear(256, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc(self.features(x).flatten(1))))


# -------------------------------------------------------------------------------------------------- data
def cifar_batch(tar_path: Path, per_class: int = 13) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels): train images NNNN.jpg with NNNN < per_class of each class, class order alphabetical."""
    import numpy as np
    from PIL import Image

    wanted = {f"{i:04d}.jpg" for i in range(per_class)}
    found: dict[tuple[str, str], torch.Tensor] = {}
    with tarfile.open(tar_path, "r:gz") as tf:
        for member in tf:
            parts = member.name.split("/")
            if len(parts) == 4 and parts[1] == "train" and parts[3] in wanted and member.isfile():
                data = tf.extractfile(member).read()
                img = Image.open(io.BytesIO(data)).convert("RGB")
                found[(parts[2], parts[3])] = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
    if not found:
        raise SystemExit(f"error: {tar_path}: no cifar10/train/<class>/NNNN.jpg images found")
    classes = sorted({c for c, _ in found})
    keys = sorted(found)
    x = torch.stack([found[k] for k in keys]).float().div_(255)
    x = (x - torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    y = torch.tensor([classes.index(c) for c, _ in keys])
    return x, y


def translation_batch(n: int = 32) -> tuple[dict[str, torch.Tensor], Any]:
    """A batch of the built-in de->en sample, tokenised with a BPE trained as run.py trains it."""
    sys.path.insert(0, str(ROOT / "examples"))
    sys.path.insert(0, str(ROOT / "examples" / "translation"))
    import run as translation  # examples/translation/run.py

    data = translation.BUILTIN_DATA
    train = translation.read_parallel_text(str(data / "train"), "de", "en")
    valid = translation.read_parallel_text(str(data / "validation"), "de", "en")[:n]
    tokenizer = translation.train_tokenizer(train, 8000)
    src = tokenizer([s for s, _ in valid], max_length=128, truncation=True, padding=True, return_tensors="pt")
    tgt = tokenizer(text_target=[t for _, t in valid], max_length=128, truncation=True, padding=True, return_tensors="pt")
    labels = tgt["input_ids"].masked_fill(tgt["attention_mask"] == 0, -100)
    args = argparse.Namespace(model_preset="small", model_type="marian", max_source_length=128, max_target_length=128,
                              config_overrides=None)
    config = translation.build_config(args, tokenizer)
    return {"input_ids": src["input_ids"], "attention_mask": src["attention_mask"], "labels": labels}, config


# ------------------------------------------------------------------------------------------------- setup
class Case:
    """How to build one model, its batch, the activation of its neurons and its loss."""

    def __init__(self, name: str, build: Callable[[], nn.Module], batch: Any, activation: Callable, loss_fn: Callable | None):
        self.name, self.build, self.batch, self.activation, self.loss_fn = name, build, batch, activation, loss_fn


def make_cases(names: list[str], data_root: Path) -> list[Case]:
    cases = []
    images = labels = None
    if any(n in ("mlp", "cnn", "cnn_bn", "vit") for n in names):
        images, labels = cifar_batch(data_root / "cifar10_jpg.tar.gz")

    def ce(output: Any) -> torch.Tensor:
        return F.cross_entropy(output, labels)

    for name in names:
        if name == "mlp":
            cases.append(Case(name, MLP, images, torch.relu, ce))
        elif name in ("cnn", "cnn_bn"):
            cases.append(Case(name, lambda bn=(name == "cnn_bn"): CNN(bn), images, torch.relu, ce))
        elif name == "marian":
            from transformers import AutoModelForSeq2SeqLM

            batch, config = translation_batch()
            cases.append(Case(name, lambda c=config: AutoModelForSeq2SeqLM.from_config(c), batch, F.gelu, None))
        elif name == "vit":
            from transformers import AutoModelForImageClassification, ViTConfig

            config = ViTConfig(image_size=32, patch_size=4, num_channels=3, hidden_size=192, num_hidden_layers=6,
                               num_attention_heads=3, intermediate_size=768, num_labels=10)
            cases.append(Case(name, lambda c=config: AutoModelForImageClassification.from_config(c),
                              {"pixel_values": images, "labels": labels}, F.gelu, None))
    return cases


def example_inputs(batch: Any) -> Any:
    if isinstance(batch, dict):
        return {k: v for k, v in batch.items() if k != "labels"}
    return batch


def build(case: Case, seed: int, alpha: float) -> tuple[nn.Module, Any]:
    torch.manual_seed(seed)
    model = case.build()
    plan = EmergenceInit(alpha=alpha).apply(model, example_inputs=example_inputs(case.batch))
    return model, plan


def measure(case: Case, seed: int, alpha: float, all_samples: bool = False) -> dict[str, Any]:
    model, plan = build(case, seed, alpha)
    em = emergence(model, case.batch, activation=case.activation)
    em_all = emergence(model, case.batch, activation=case.activation, all_samples=True) if all_samples else None
    prof = activation_profile(model, case.batch, activation=case.activation, loss_fn=case.loss_fn)
    layers = []
    for row, counts in zip(prof.rows, em.per_layer):
        layers.append({k: row[k] for k in ("chain", "layer", "block", "k", "factor", "n", "mean_abs", "in_abs",
                                           "active_fraction", "weight_std", "grad_norm")} | {"a": counts["a"]})
    return {"model": case.name, "alpha": alpha, "seed": seed, "E": str(em.E), "log10_E": em.log10_E,
            "normalised": em.normalised, "relative": em.relative, "normalised_all_samples": em_all.normalised if em_all else None,
            "log10_E_all_samples": em_all.log10_E if em_all else None, "params": em.params, "min_activation_scale": plan.min_activation_scale(),
            "layers": layers}


def suggested(case: Case, seed: int) -> float:
    """suggest_alpha on the base-initialised model (the alpha = 1 build, its bookkeeping removed)."""
    model, _ = build(case, seed, 1.0)
    model.emergence_plan = None
    if hasattr(getattr(model, "config", None), "emergence_init"):
        del model.config.emergence_init
    return suggest_alpha(model, case.batch, min_scale=0.1, alpha_max=2.0, tol=0.01)


# ------------------------------------------------------------------------------------------------ report
def _ms(values: list[float], fmt: str = ".3g") -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:{fmt}}"
    return f"{statistics.fmean(values):{fmt}} ± {statistics.stdev(values):{fmt}}"


def summarise(records: list[dict], suggestions: dict[str, list[float]]) -> dict[str, dict[float, dict[str, Any]]]:
    out: dict[str, dict[float, dict[str, Any]]] = {}
    for model in dict.fromkeys(r["model"] for r in records):
        base = {r["seed"]: r for r in records if r["model"] == model and r["alpha"] == 1.0}
        out[model] = {}
        for alpha in sorted({r["alpha"] for r in records if r["model"] == model}):
            rs = [r for r in records if r["model"] == model and r["alpha"] == alpha]
            in_ratio = []
            for r in rs:
                b = base.get(r["seed"])
                if b is not None:
                    in_ratio.append(min(l["in_abs"] / bl["in_abs"] for l, bl in zip(r["layers"], b["layers"]) if bl["in_abs"] > 0))
            out[model][alpha] = {
                "n": len(rs),
                "normalised": [r["normalised"] for r in rs],
                "normalised_all_samples": [r["normalised_all_samples"] for r in rs],
                "log10_E": [r["log10_E"] for r in rs],
                "min_active_fraction": [min(l["active_fraction"] for l in r["layers"]) for r in rs],
                "mean_active_fraction": [statistics.fmean(l["active_fraction"] for l in r["layers"]) for r in rs],
                "min_in_abs_ratio": in_ratio,
                "min_activation_scale": rs[0]["min_activation_scale"],
            }
    return out


def markdown(result: dict) -> str:
    summ = result["summary"]
    lines = ["# Emergence E and activation profiles against alpha (at initialisation)", "",
             "Measured by `benchmarks/emergence_vs_alpha.py` with `hf_emergence.emergence` / `activation_profile` / "
             "`suggest_alpha` on one fixed batch of real data. Mean ± sample std over seeds "
             f"({', '.join(map(str, result['seeds']))}); nothing here is trained.", "",
             "Definitions (see `hf_emergence/measure.py`): a neuron (Linear output feature, conv channel, a Transformer "
             "block's FFN hidden neuron) is active when its batch-mean activation exceeds 0.05 ('all samples': "
             "when it does on every sample); E = sum_l (n_l - a_l) prod_{j>l} a_j per chain; E/E_max divides by its "
             "maximum at the same widths. 'min input ratio' is, over layers, the smallest mean |layer input| relative "
             "to the same seed at alpha = 1; 'planned shrink' is `plan.min_activation_scale()`, the prediction for a "
             "bias-free homogeneous chain. A neuron's value is its probed module's output passed through the model's "
             "activation: for `cnn_bn` the conv output *after* its BatchNorm (what the next layer sees; "
             "`neurons_at=\"output\"` would read it before), for `marian` / `vit` the FFN's first projection, whose "
             "input is the LayerNorm-ed residual stream (so 'min input ratio' stays near 1 there).", "",
             "Data: " + result["data"], ""]
    lines += ["## Models", ""] + [f"- `{m}`: {DESCRIPTIONS[m]}" for m in summ] + [""]
    lines += ["## suggest_alpha (min_scale 0.1, alpha_max 2.0, tol 0.01, min_active auto, on the base-initialised model)", "",
              "| model | suggested alpha (mean ± std) | per seed |", "|---|---|---|"]
    for m, vals in result["suggest_alpha"].items():
        lines.append(f"| {m} | {_ms(vals, '.3f')} | {', '.join(f'{v:.3f}' for v in vals)} |")
    lines.append("")
    for m, by_alpha in summ.items():
        lines += [f"## {m}", "",
                  "| alpha | n | E/E_max | E/E_max (all samples) | log10 E | mean active fraction | min active fraction "
                  "| min input ratio | planned shrink |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for alpha, s in by_alpha.items():
            lines.append(f"| {alpha:g} | {s['n']} | {_ms(s['normalised'], '.3g')} | {_ms(s['normalised_all_samples'], '.3g')} | "
                         f"{_ms(s['log10_E'], '.2f')} | {_ms(s['mean_active_fraction'], '.3f')} | "
                         f"{_ms(s['min_active_fraction'], '.3f')} | {_ms(s['min_in_abs_ratio'], '.3f')} | "
                         f"{s['min_activation_scale']:.3g} |")
        lines.append("")
    lines += ["## Plots", "", "- `E_vs_alpha.png`: E/E_max (batch mean and all samples) and log10 E against alpha, "
              "per model, mean ± std over seeds.",
              "- `active_fraction.png`: active fraction per layer (plan order; Marian: encoder then decoder), one "
              "line per alpha, mean over seeds.",
              "- `mean_abs.png`: mean |layer input| per layer relative to alpha = 1 (log scale), mean over seeds.", "",
              "![E vs alpha](E_vs_alpha.png)", "", "![active fraction](active_fraction.png)", "",
              "![mean abs](mean_abs.png)", "",
              "## Command", "", "```", result["command"], "```", "",
              f"Run {result['date_utc']} on CPU ({result['environment']}), {result['wall_s']:.0f} s.", ""]
    return "\n".join(lines)


def plots(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    summ, records = result["summary"], result["records"]
    models = list(summ)
    panels = [(k, t) for k, t in (("normalised", "E / E_max (batch mean > 0.05)"),
                                  ("normalised_all_samples", "E / E_max (every sample > 0.05)"), ("log10_E", "log10 E"))
              if any(v is not None for m in models for a in summ[m] for v in summ[m][a][k])]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2))
    for m in models:
        alphas = list(summ[m])
        for ax, (key, _) in zip(axes, panels):
            vals = [[v for v in summ[m][a][key] if v is not None and math.isfinite(v)] for a in alphas]
            mean = [np.mean(v) if v else np.nan for v in vals]
            std = [np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in vals]
            ax.errorbar(alphas, mean, yerr=std, marker="o", capsize=3, label=m)
    for ax, (key, title) in zip(axes, panels):
        ax.set_xlabel("alpha")
        ax.set_title(title)
        if key != "log10_E":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "E_vs_alpha.png", dpi=110)
    plt.close(fig)

    for fname, key, ylabel, log in (("active_fraction.png", "active_fraction", "active fraction", False),
                                     ("mean_abs.png", "in_abs", "mean |layer input| / same at alpha=1", True)):
        fig, axes = plt.subplots(1, len(models), figsize=(4 * len(models), 3.8), squeeze=False)
        for ax, m in zip(axes[0], models):
            alphas = list(summ[m])
            cmap = plt.get_cmap("viridis")
            base = {r["seed"]: r for r in records if r["model"] == m and r["alpha"] == 1.0}
            for i, a in enumerate(alphas):
                rs = [r for r in records if r["model"] == m and r["alpha"] == a]
                if key == "in_abs":
                    rows = [[l["in_abs"] / bl["in_abs"] if bl["in_abs"] > 0 else np.nan
                             for l, bl in zip(r["layers"], base[r["seed"]]["layers"])] for r in rs if r["seed"] in base]
                else:
                    rows = [[l[key] for l in r["layers"]] for r in rs]
                if not rows:
                    continue
                ax.plot(range(len(rows[0])), np.nanmean(np.array(rows, dtype=float), 0), marker=".",
                        color=cmap(i / max(1, len(alphas) - 1)), label=f"{a:g}")
            labels = [f"{l['chain'][:3]}{l['layer']}" if len({x['chain'] for x in rs[0]['layers']}) > 1 else str(l["layer"])
                      for l in rs[0]["layers"]]
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels(labels, rotation=90 if len(labels) > 8 else 0, fontsize=8)
            ax.set_title(m)
            ax.set_xlabel("layer (plan order)")
            if log:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel(ylabel)
        axes[0][-1].legend(title="alpha", fontsize=7)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)


# -------------------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    p.add_argument("--alphas", nargs="+", type=float, default=list(DEFAULT_ALPHAS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--data_root", default=str(ROOT.parent / "shared" / "data"),
                   help="folder holding cifar10_jpg.tar.gz")
    p.add_argument("--all_samples", action="store_true",
                   help="also E with all_samples=True (a neuron active only if active on every sample; one more forward pass)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "emergence_vs_alpha"))
    p.add_argument("--from_json", default=None, help="only redraw the plots and markdown from an earlier results.json")
    args = p.parse_args(argv)
    if args.from_json:
        return args
    if 1.0 not in args.alphas:
        args.alphas = [1.0] + args.alphas  # the reference for the input ratios
    if any(not (math.isfinite(a) and a > 0) for a in args.alphas):
        p.error(f"--alphas must be finite and > 0, got {args.alphas}")
    tar = Path(args.data_root) / "cifar10_jpg.tar.gz"
    if any(m != "marian" for m in args.models) and not tar.is_file():
        p.error(f"{tar} not found: expected CIFAR-10 as cifar10/train/<class>/NNNN.jpg in a .tar.gz (--data_root)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
        result["summary"] = summarise(result["records"], result["suggest_alpha"])
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        plots(result, out)
        (out / "README.md").write_text(markdown(result))
        print(f"redrew {out}/README.md and the plots from {args.from_json}")
        return result
    import transformers

    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    cases = make_cases(args.models, Path(args.data_root))
    records, suggestions = [], {}
    for case in cases:
        for seed in args.seeds:
            for alpha in sorted(args.alphas):
                rec = measure(case, seed, alpha, args.all_samples)
                records.append(rec)
                print(f"{case.name:7s} seed {seed} alpha {alpha:<5g} E/E_max {rec['normalised']:.4g}  log10 E "
                      f"{rec['log10_E']:.4g}  active {[round(l['active_fraction'], 2) for l in rec['layers']]}", flush=True)
            suggestions.setdefault(case.name, []).append(suggested(case, seed))
            print(f"{case.name:7s} seed {seed} suggest_alpha {suggestions[case.name][-1]:.3f}", flush=True)
    argv_list = argv if argv is not None else sys.argv[1:]
    result = {
        "command": "python " + shlex.join([os.path.relpath(__file__, ROOT), *argv_list]),
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_s": time.time() - t0,
        "environment": f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)",
        "seeds": args.seeds, "alphas": sorted(args.alphas), "threshold": 0.05,
        "data": ("130 CIFAR-10 training images (train/<class>/0000-0012.jpg from cifar10_jpg.tar.gz, CIFAR-10 mean/std "
                 "normalisation) for mlp/cnn/cnn_bn/vit; for marian the first 32 pairs of "
                 "examples/translation/data/multi30k_sample/validation, tokenised with run.py's train_tokenizer "
                 "(BPE, vocabulary 8000) trained on the sample's train split."),
        "models": {m: DESCRIPTIONS[m] for m in args.models},
        "suggest_alpha": suggestions,
        "records": records,
    }
    result["summary"] = summarise(records, suggestions)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps({**result, "summary": {m: {str(a): s for a, s in v.items()} for m, v in result["summary"].items()}},
                      indent=1)
    atomic_write(out / "results.json", text)
    plots(result, out)
    atomic_write(out / "README.md", markdown(result))
    print(f"wrote {out}/results.json, README.md, E_vs_alpha.png, active_fraction.png, mean_abs.png ({result['wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
