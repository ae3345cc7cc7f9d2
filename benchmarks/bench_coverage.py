#!/usr/bin/env python
"""Coverage of layer discovery over every transformers model type that builds here with a tiny config.

    python benchmarks/bench_coverage.py                          # all AutoModel types, resumable, ~1 h on 2 CPUs
    python benchmarks/bench_coverage.py --only 'mixtral|swin'    # a regex over model types
    python benchmarks/bench_coverage.py --report                 # rewrite the JSON/markdown from what is done

For each ``model_type`` of ``AutoModel``'s mapping: ``AutoConfig.for_model(model_type)`` with its sizes shrunk
(:func:`shrink`: 2 layers, width 32, 2 heads, FFN 64, 4 experts, one block per stage, recursively into
sub-configs), then ``AutoModel.from_config`` on CPU (seed 0). Where that shrink breaks the config's own
consistency (tied widths: the built batch no longer runs), the depth alone is shrunk instead, up to
:data:`MILD_LIMIT` parameters (``shrink`` in each row says which). A type whose tiny build fails is
"unbuildable" (a transformers/config matter, not a discovery one) and is counted apart. On each built model:

* ``plan``: ``EmergenceInit(alpha=1.2).plan(model)``; its ``source`` (registry / traced / registration-order),
  how the forward order was found, the chains, and the weights (>= 2-d parameters) it leaves out, with reasons;
* ``apply``: the plan applied tensor by tensor without a redraw (``plan.apply_entry_(..., reinit=False)``, what
  ``apply`` does after planning); every planned tensor must equal its old value times the planned factor and
  every other parameter must be unchanged (``factor_errors``);
* ``meta``: the same config built under ``torch.device("meta")`` and planned there (no weights); whether its
  plan (names, factors) equals the plan of the real model (``meta_agrees``);
* ``full``: for a plan left in registration order (no forward pass ran on the tiny model), the type's default
  config at its own sizes, built on the meta device and planned there (``full_source``): whether the forward
  order is lost to the benchmark's shrink or to discovery itself (then ``full_warning`` says which pass failed).

A "crash" is an exception raised by hf_emergence in ``plan`` or in applying it; a model whose every chain has
one layer is "refused" (the plan's single-layer rule: nothing would be scaled), counted apart. Each model runs in a forked worker
with a time limit (``--timeout``); results are appended to ``results.jsonl`` in ``--out`` as they come, so an
interrupted run continues where it stopped (a type that overran its time is measured again). The report (``coverage.json``, ``coverage.md``) is rewritten at
the end, or on its own with ``--report``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import re
import sys
import time
import traceback
import warnings
from collections import Counter
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Config fields shrunk by :func:`shrink`, by kind. Integers above the target are lowered to it.
LAYER_FIELDS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "encoder_layers", "decoder_layers",
                "num_decoder_layers", "num_encoder_layers", "decoder_num_layers", "encoder_num_layers",
                "num_text_layers", "num_vision_layers", "depth")
WIDTH_FIELDS = ("hidden_size", "d_model", "n_embd", "embed_dim", "d_embed", "model_dim", "dim", "word_embed_proj_dim",
                "projection_dim", "out_hidden_size", "encoder_hidden_size", "emb_dim")
HEAD_FIELDS = ("num_attention_heads", "n_head", "n_heads", "encoder_attention_heads", "decoder_attention_heads",
               "num_heads", "num_key_value_heads", "n_kv_heads", "num_kv_heads")
FFN_FIELDS = ("intermediate_size", "d_ff", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "n_inner", "ffn_hidden_size",
              "moe_intermediate_size", "shared_expert_intermediate_size", "expert_intermediate_size",
              "decoder_intermediate_size")
EXPERT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
# Per-head sizes tied to head_dim (rotary, latent attention) and state-space sizes tied to the width.
HEAD_PART_FIELDS = ("rotary_dim", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "rope_dim")
RANK_FIELDS = ("kv_lora_rank", "q_lora_rank")
TARGETS = ((LAYER_FIELDS, 2), (WIDTH_FIELDS, 32), (HEAD_FIELDS, 2), (FFN_FIELDS, 64), (EXPERT_FIELDS, 4),
           (("head_dim",), 16), (HEAD_PART_FIELDS, 16), (RANK_FIELDS, 16), (("num_experts_per_tok",), 2),
           (("mamba_n_heads",), 2), (("mamba_d_head",), 32), (("moe_k", "moe_topk", "num_experts_per_token"), 2))
ALPHA = 1.2
LEGACY_VERSION = "5.24.0"  # rows written before each row named its transformers version were measured with it
MILD_LIMIT = 150_000_000  # parameters: largest depth-only shrink built when the full shrink does not run


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "coverage"), help="results folder")
    p.add_argument("--only", default=None, help="regex: only model types matching it (re.search)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per model type (build + plan + apply + meta)")
    p.add_argument("--report", action="store_true", help="only rewrite coverage.json / coverage.md from the rows recorded so far")
    p.add_argument("--redo", action="store_true", help="measure the selected types again instead of skipping them")
    return p.parse_args(argv)


def shrink(config: Any, widths: bool = True, _seen: Optional[set] = None) -> Any:
    """Lower the sizes of ``config`` (and of its sub-configs) in place; lists per layer are cut to match.

    Integers of the fields in :data:`TARGETS` above their target are set to it (with ``widths=False`` only the
    layer and expert counts, for configs whose widths are tied to each other); a per-stage ``depths`` becomes
    one block per stage and per-stage head counts one head; any list as long as the old layer count
    (``layer_types``) is cut to 2.
    """
    from transformers import PretrainedConfig

    seen = _seen if _seen is not None else set()
    if id(config) in seen:
        return config
    seen.add(id(config))
    fields = config.__dict__
    old_layers = None
    for names, target in TARGETS:
        if not widths and names not in (LAYER_FIELDS, EXPERT_FIELDS, ("num_experts_per_tok",)):
            continue
        for name in names:
            value = fields.get(name)
            stages = fields.get("depths")
            if names is LAYER_FIELDS and isinstance(stages, (list, tuple)) and len(stages) == value:
                continue  # Swin's num_layers counts the stages of depths: depths is shrunk instead
            if isinstance(value, int) and not isinstance(value, bool) and value > target:
                if names is LAYER_FIELDS:
                    old_layers = old_layers or value
                setattr(config, name, target)
    if old_layers:
        for name, value in list(fields.items()):
            if isinstance(value, (list, tuple)) and len(value) == old_layers and name != "depths":
                setattr(config, name, type(value)(value[:2]))
    if widths and isinstance(fields.get("qk_head_dim"), int):  # derived at init: recompute from its parts
        config.qk_head_dim = fields.get("qk_nope_head_dim", 0) + fields.get("qk_rope_head_dim", 0)
    if "num_experts_per_tok" in fields and fields["num_experts_per_tok"] is None and any(fields.get(n) for n in EXPERT_FIELDS):
        config.num_experts_per_tok = 2
    heads, hidden = fields.get("num_attention_heads"), fields.get("hidden_size")
    head_dim = fields.get("head_dim") or (hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads else None)
    rope = fields.get("rope_parameters")
    if isinstance(rope, dict) and "mrope_section" in getattr(config, "ignore_keys_at_rope_validation", ()):
        rope.setdefault("mrope_section", [8, 12, 12])  # the models' default, made explicit to be shrunk below
    for name, value in list(fields.items()):  # multimodal rotary sections must add up to half a head
        if widths and isinstance(head_dim, int) and isinstance(value, dict) and isinstance(value.get("mrope_section"), list):
            half, parts = head_dim // 2, len(value["mrope_section"])
            section = [half // parts] * parts
            section[0] += half - sum(section)
            setattr(config, name, {**value, "mrope_section": section})
    expand, heads_ = fields.get("expand"), fields.get("num_heads")
    if widths and isinstance(expand, int) and isinstance(heads_, int) and isinstance(fields.get("head_dim"), int):
        config.head_dim = max(1, expand * fields.get("hidden_size", 32) // heads_)  # Mamba-2: heads x head_dim = expand x width
    if "prediction_length" in fields and fields["prediction_length"] is None:  # time-series models require it
        config.prediction_length = 4
    if isinstance(fields.get("depths"), (list, tuple)):
        config.depths = type(fields["depths"])([1] * len(fields["depths"]))
    for name in HEAD_FIELDS if widths else ():  # per-stage head counts (Swin, PVT): one head divides any width
        value = fields.get(name)
        if isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
            setattr(config, name, type(value)([1] * len(value)))
    for value in list(fields.values()):
        if isinstance(value, PretrainedConfig):
            shrink(value, widths, seen)
    return config


def tiny_config(model_type: str, widths: Optional[bool] = True) -> Any:
    """The type's default config shrunk by :func:`shrink` (``widths=None``: not shrunk, the config's own sizes)."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    return config if widths is None else shrink(config, widths)


def build(model_type: str, widths: Optional[bool] = True, device: str = "cpu") -> Any:
    import torch
    from transformers import AutoModel

    torch.manual_seed(0)
    with torch.device(device):
        return AutoModel.from_config(tiny_config(model_type, widths))


def weight_params(model: Any) -> list[str]:
    """Names of the model's >= 2-d parameters (each Parameter once)."""
    return [n for n, p in model.named_parameters() if p.ndim >= 2]


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200] if text else ''}"


def plan_with_layout(model: Any) -> tuple[Any, Any, list[str]]:
    """``EmergenceInit(alpha=ALPHA).plan(model)``, the layout discovery gave it, and the warnings raised."""
    import hf_emergence.emergence_init as emergence_init
    from hf_emergence import EmergenceInit

    seen: list[Any] = []
    real = emergence_init.discover

    def capture(target: Any, example_inputs: Any = None) -> Any:
        seen.append(real(target, example_inputs))
        return seen[-1]

    emergence_init.discover = capture
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plan = EmergenceInit(alpha=ALPHA).plan(model)
    finally:
        emergence_init.discover = real
    return plan, seen[-1], [str(w.message).splitlines()[0][:200] for w in caught]


def measure(model_type: str) -> dict[str, Any]:
    """Everything recorded for one model type (see the module docstring)."""
    import torch

    row: dict[str, Any] = {"model_type": model_type, "transformers": version("transformers")}
    t0 = time.perf_counter()
    try:
        model, widths = build(model_type), True
    except Exception as err:  # a config this generic shrink cannot build: not a discovery matter
        row.update(status="unbuildable", error=_first_line(err), seconds=round(time.perf_counter() - t0, 2))
        return row
    try:
        plan, layout, caught = plan_with_layout(model)
        if plan.source == "registration-order":  # the shrink may have broken tied widths: shrink the depth only
            try:
                if sum(p.numel() for p in build(model_type, False, "meta").parameters()) <= MILD_LIMIT:
                    mild = build(model_type, widths=False)
                    mild_plan, mild_layout, mild_caught = plan_with_layout(mild)
                    if mild_plan.source != "registration-order":
                        model, widths, plan, layout, caught = mild, False, mild_plan, mild_layout, mild_caught
            except Exception:
                pass  # the milder shrink does not build or plan: keep the first model
    except Exception as err:
        refused = isinstance(err, ValueError) and "no chain of 2 or more" in str(err)  # the single-layer rule
        row.update(status="refused" if refused else "crash", stage="plan", error=_first_line(err),
                   trace=traceback.format_exc(limit=-3), seconds=round(time.perf_counter() - t0, 2))
        return row
    weights = weight_params(model)
    planned = {n for e in plan for n in (e.name, *e.aliases)}
    left_out = [tuple(x) for x in plan.left_out]
    row.update(shrink="sizes" if widths else "depth only", model_class=type(model).__name__, weights=len(weights),
               source=plan.source, order=layout.order, chains=plan.chains, entries=len(plan),
               scaled=sum(e.scaled for e in plan), layer_unit=plan.layer_unit, base_init=plan.base_init,
               left_out=len(left_out), left_out_reasons=dict(Counter(_reason_kind(r) for _, r in left_out)),
               unlisted=sorted(set(weights) - planned - {n for n, _ in left_out})[:20],
               max_abs_k=max((abs(e.k) for e in plan if e.k is not None), default=0),
               notes=list(plan.notes)[:6], warnings=caught[:4])
    try:  # what apply() does after planning, without tracing the model a second time
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        params = dict(model.named_parameters())
        with torch.no_grad():
            for entry in plan:
                plan.apply_entry_(entry, params[entry.name].data, reinit=False)
        factors = plan.factors()
        row["factor_errors"] = sum(not torch.allclose(p.detach(), before[n] * factors.get(n, 1.0), rtol=1e-5, atol=0)
                                   for n, p in model.named_parameters())
    except Exception as err:
        row.update(status="crash", stage="apply", error=_first_line(err), trace=traceback.format_exc(limit=-3),
                   seconds=round(time.perf_counter() - t0, 2))
        return row
    try:
        meta_plan, meta_layout, _ = plan_with_layout(build(model_type, widths, "meta"))
        row.update(meta_source=meta_plan.source, meta_order=meta_layout.order,
                   meta_agrees=[(e.name, e.factor) for e in meta_plan] == [(e.name, e.factor) for e in plan])
    except Exception as err:
        row.update(meta_error=_first_line(err))
    if plan.source == "registration-order":  # the shrink or discovery? the config's own sizes, without weights
        try:
            full_plan, full_layout, full_caught = plan_with_layout(build(model_type, None, "meta"))
            row.update(full_source=full_plan.source, full_order=full_layout.order,
                       full_warning=next((w for w in full_caught if "could not trace" in w), None))
        except Exception as err:
            row.update(full_error=_first_line(err))
    row.update(status="ok", seconds=round(time.perf_counter() - t0, 2))
    return row


def _reason_kind(reason: str) -> str:
    return reason.split(":")[0].split(" (")[0][:60]


def _worker(conn: Any) -> None:
    import torch

    torch.set_num_threads(1)
    import transformers

    transformers.logging.set_verbosity_error()
    while True:
        model_type = conn.recv()
        if model_type is None:
            return
        try:
            conn.send(measure(model_type))
        except Exception as err:  # never lose the worker to one model
            conn.send({"model_type": model_type, "status": "crash", "stage": "benchmark", "error": _first_line(err)})


class Worker:
    """A forked process measuring one model type at a time; killed and replaced when it overruns."""

    def __init__(self) -> None:
        self.conn, child = mp.Pipe()
        self.process = mp.get_context("fork").Process(target=_worker, args=(child,), daemon=True)
        self.process.start()

    def run(self, model_type: str, timeout: float) -> dict[str, Any]:
        self.conn.send(model_type)
        if self.conn.poll(timeout):
            try:
                return self.conn.recv()
            except EOFError:
                pass
        self.close(kill=True)
        alive = self.process.exitcode is None
        return {"model_type": model_type, "status": "timeout" if alive or self.process.exitcode == -9 else "died",
                "exitcode": self.process.exitcode}

    def close(self, kill: bool = False) -> None:
        if kill:
            self.process.kill()
        else:
            self.conn.send(None)
        self.process.join(10)


def model_types(only: Optional[str]) -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    types = sorted(MODEL_MAPPING_NAMES)
    return [t for t in types if re.search(only, t)] if only else types


def load_results(out: Path) -> dict[str, dict[str, Any]]:
    """Rows by model type: the committed ``coverage.json`` ones, then ``results.jsonl``'s (later lines win).

    ``results.jsonl`` is a local log (gitignored); reading the committed rows first means a fresh clone's
    ``--report`` rewrites the same report, and an ``--only`` run there adds to the committed rows instead of
    replacing them.
    """
    rows: dict[str, dict[str, Any]] = {}
    try:
        committed = json.loads((out / "coverage.json").read_text())["rows"]
    except (OSError, ValueError, KeyError):
        committed = []
    for row in committed:
        rows[row["model_type"]] = row
    log = out / "results.jsonl"
    if log.exists():
        for line in log.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[row["model_type"]] = row
    return rows


def summarise(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    built = [r for r in rows.values() if r["status"] not in ("unbuildable",)]
    planned = [r for r in built if r["status"] == "ok"]
    by_source = Counter("registry" if r["source"].startswith("registry") else r["source"] for r in planned)
    real_order = by_source["registry"] + by_source["traced"]
    reasons: Counter = Counter()
    for r in planned:
        reasons.update(r.get("left_out_reasons", {}))
    return {
        "model_types": len(rows), "unbuildable": len(rows) - len(built), "built": len(built),
        "rows_by_transformers": dict(sorted(Counter(r.get("transformers", LEGACY_VERSION) for r in rows.values()).items())),
        "crashes": sorted(r["model_type"] for r in built if r["status"] == "crash"),
        "refused": sorted(r["model_type"] for r in built if r["status"] == "refused"),
        "timeouts": sorted(r["model_type"] for r in built if r["status"] in ("timeout", "died")),
        "planned": len(planned), "by_source": dict(by_source),
        "share_registry_or_traced": round(real_order / len(planned), 4) if planned else None,
        "by_order": dict(Counter(r.get("order") for r in planned)),
        "registration_order": sorted(r["model_type"] for r in planned if r["source"] == "registration-order"),
        "full_size_by_source": dict(Counter(r.get("full_source") or ("error" if "full_error" in r else "not measured")
                                            for r in planned if r["source"] == "registration-order")),
        "full_size_registration_order": sorted(r["model_type"] for r in planned if r["source"] == "registration-order"
                                               and r.get("full_source", "registration-order") == "registration-order"),
        "weights": sum(r.get("weights", 0) for r in planned), "entries": sum(r.get("entries", 0) for r in planned),
        "left_out": sum(r.get("left_out", 0) for r in planned), "left_out_by_reason": dict(reasons.most_common()),
        "unlisted": sum(len(r.get("unlisted", [])) for r in planned),
        "factor_errors": sum(r.get("factor_errors", 0) for r in planned),
        "meta_agrees": sum(bool(r.get("meta_agrees")) for r in planned),
        "meta_by_source": dict(Counter(r.get("meta_source", "error") for r in planned)),
        "max_abs_k_over_10": sorted(r["model_type"] for r in planned if r.get("max_abs_k", 0) > 10),
    }


def _versions(by_version: dict[str, int]) -> str:
    """``5.25.0`` when every row has it, else ``5.24.0 (546 rows), 5.25.0 (85 rows)``: rows say what measured them."""
    if len(by_version) == 1:
        return next(iter(by_version))
    return ", ".join(f"{v} ({n} rows)" for v, n in by_version.items())


def command_history(out: Path, command: Optional[str], types: int) -> list[dict[str, Any]]:
    """The measuring commands recorded in ``out/coverage.json`` so far, plus ``command`` when it measured ``types``."""
    try:
        meta = json.loads((out / "coverage.json").read_text())["meta"]
    except (OSError, ValueError, KeyError):
        meta = {}
    history = list(meta.get("commands") or ([{"command": meta["command"], "date": meta.get("date"),
                                              "transformers": meta.get("transformers")}] if "command" in meta else []))
    if command is not None:
        history.append({"command": command, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        "transformers": version("transformers"), "model_types": types})
    return history


def write_report(out: Path, rows: dict[str, dict[str, Any]], commands: list[dict[str, Any]]) -> dict[str, Any]:
    import torch
    import transformers

    summary = summarise(rows)
    meta = {"commands": commands, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "alpha": ALPHA}
    (out / "coverage.json").write_text(json.dumps({"meta": meta, "summary": summary,
                                                   "rows": [rows[k] for k in sorted(rows)]}, indent=1) + "\n")
    s = summary
    share = f"{100 * s['share_registry_or_traced']:.1f}%" if s["share_registry_or_traced"] is not None else "n/a"
    lines = [
        "# Layer discovery over transformers' model types (tiny configs)", "",
        f"transformers {_versions(s['rows_by_transformers'])}, torch {meta['torch']}: every `model_type` of `AutoModel`'s mapping, "
        "built from `AutoConfig.for_model` with its sizes shrunk (see `benchmarks/bench_coverage.py`), then planned "
        f"and applied with `EmergenceInit(alpha={ALPHA})`.", "",
        "| quantity | value |", "|---|---|",
        f"| model types tried | {s['model_types']} |",
        f"| built with a tiny config | {s['built']} (unbuildable by the generic shrink: {s['unbuildable']}) |",
        f"| planned and applied | {s['planned']} |",
        f"| crashes in hf_emergence | {len(s['crashes'])} {', '.join(s['crashes'])} |",
        f"| refused by the single-layer rule (every chain one layer) | {len(s['refused'])} {', '.join(s['refused'])} |",
        f"| timeouts | {len(s['timeouts'])} {', '.join(s['timeouts'])} |",
        f"| plans by source | " + ", ".join(f"{k}: {v}" for k, v in sorted(s["by_source"].items())) + " |",
        f"| **share from the registry or a traced forward order** | **{share}** |",
        f"| how the forward order was found | " + ", ".join(f"{k}: {v}" for k, v in sorted(s["by_order"].items(), key=str)) + " |",
        f"| weights (>= 2-d parameters) | {s['weights']} |",
        f"| planned tensors | {s['entries']} |",
        f"| weights left out, listed with a reason | {s['left_out']} |",
        f"| weights left out without a listed reason | {s['unlisted']} |",
        f"| measured factor != planned factor (tensors) | {s['factor_errors']} |",
        f"| plan on the meta device equals the real one | {s['meta_agrees']} of {s['planned']} |",
        f"| plans with a layer exponent abs(k) > 10 | {len(s['max_abs_k_over_10'])} {', '.join(s['max_abs_k_over_10'])} |",
        "", "Weights left out, by reason:", "", "| reason | weights |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in s["left_out_by_reason"].items()], "",
        "Plans in registration order (no forward pass possible): " + (", ".join(s["registration_order"]) or "none"), "",
        "The same types at their config's own sizes (built on the meta device, planned there): "
        + ", ".join(f"{k}: {v}" for k, v in sorted(s["full_size_by_source"].items())) + ". Still in registration "
        "order (a limit of discovery, not of the shrink): " + (", ".join(s["full_size_registration_order"]) or "none"), "",
        f"Meta-device plans by source: " + ", ".join(f"{k}: {v}" for k, v in sorted(s["meta_by_source"].items())), "",
        "Commands (in order; a later one measured its types again):", "", "```",
        *[f"{c['command']}    # {c.get('date')}, transformers {c.get('transformers')}" for c in commands], "```", "",
        f"Run {meta['date']}. Per model type: `coverage.json` (`rows`).", ""]
    (out / "coverage.md").write_text("\n".join(lines))
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    rows = load_results(out)
    command = ("python benchmarks/bench_coverage.py" + (f" --only '{args.only}'" if args.only else "")
               + (" --redo" if args.redo else ""))
    if not args.report:
        todo = [t for t in model_types(args.only)
                if args.redo or t not in rows or rows[t]["status"] in ("timeout", "died")]  # overruns: again
        print(f"{len(todo)} model types to measure ({len(rows)} already in {results_path})", flush=True)
        worker = Worker()
        with results_path.open("a") as log:
            for i, model_type in enumerate(todo):
                row = worker.run(model_type, args.timeout)
                row.setdefault("transformers", version("transformers"))  # an overrun's row, made here
                if row["status"] in ("timeout", "died"):
                    worker = Worker()
                rows[model_type] = row
                log.write(json.dumps(row) + "\n")
                log.flush()
                print(f"[{i + 1}/{len(todo)}] {model_type}: {row['status']} {row.get('source', row.get('error', ''))}",
                      flush=True)
        worker.close()
    summary = write_report(out, rows, command_history(out, None if args.report else command,
                                                      0 if args.report else len(todo)))
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, list)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
