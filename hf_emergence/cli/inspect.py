"""``hf-emergence inspect``: the plan, with the weight std of every layer measured before and after the scaling."""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any, Optional

import torch

from .._text import format_k, text_table
from ..emergence_init import METADATA_KEYS, SETTING_NAMES, EmergenceInit
from ..loading import load_config, load_pretrained, meta_model, model_class, recorded_settings
from .shared import (CLIError, add_command, add_setting_flags, add_source_args, build, fmt, given_settings, plan_for, print_json,
                     seed, settings_from_args)

PLAN_COLUMNS = ["chain", "layer", "block", "k", "factor", "tensors", "params"]


HELP = "print the plan and the weight std of each layer before/after the scaling"
DESCRIPTION = """\
Print the plan (layer, k, factor, #params) for a model type, a config or a local checkpoint, with the weight std
of every layer measured before and after the scaling (the model is built on CPU and each planned tensor is drawn
and scaled on a copy; with the same --seed these are exactly the weights `init` saves). A checkpoint that
already carries the init shows its recorded settings and its weights' std.
"""


def add_parser(sub: Any, formatter_class: type) -> None:
    p = add_command(sub, "inspect", run, help=HELP, description=DESCRIPTION, formatter_class=formatter_class)
    add_source_args(p, checkpoint=True)
    add_setting_flags(p)
    g = p.add_argument_group("output")
    g.add_argument("--plan_only", action="store_true",
                   help="build on the meta device and skip the std columns (no memory, any model size)")
    g.add_argument("--json", action="store_true", help="print JSON (plan.to_dict() plus per-layer and per-tensor stds)")


def run(args: argparse.Namespace) -> None:
    settings_from_args(args)                          # bad setting values fail before anything is loaded
    recorded = None
    if args.model:
        if args.config_overrides:
            raise CLIError("--config_overrides cannot change a saved checkpoint (--model); use --config instead")
        if args.plan_only:  # names and shapes are enough: build from its config on the meta device
            model, config = meta_model(args.model, args.auto_class)
        else:
            model = load_pretrained(args.model, args.auto_class).eval()
            config = model.config
        recorded = recorded_settings(config)
        source = f"checkpoint {args.model}"
    else:
        config = load_config(model_type=args.model_type, config=args.config, overrides=args.config_overrides)
        concrete = model_class(args.auto_class, config)
        seed(args.seed)
        model = build(concrete, config, meta=args.plan_only)
        source = f"model_type {config.model_type}" if args.model_type else f"config {args.config}"
    notes = []
    if recorded is not None:
        init = EmergenceInit.from_dict(recorded)
        if given_settings(args):
            notes.append(f"ignored --{', --'.join(given_settings(args))}: the plan shown is the one recorded in the checkpoint")
    else:  # like `init`: flags over the settings a --config may carry (a checkpoint's, as a template)
        spec = getattr(config, "emergence_init", None)
        init = settings_from_args(args, recorded=spec if isinstance(spec, dict) else None)
    plan = plan_for(init, model)

    rows = [dict(r) for r in plan.layers()]
    tensors: list[dict[str, Any]] = []
    if args.plan_only:
        pass
    elif recorded is not None:
        tensors, per_layer = stds_now(model, plan)
        for r in rows:
            r["std"] = per_layer.get((r["chain"], r["layer"]))
    else:
        if args.model and plan.base_init != "keep":
            notes.append(f"base_init={plan.base_init} re-draws these weights before scaling them; "
                         "--base_init keep scales the checkpoint's own weights")
        built = not args.model and plan.base_init != "keep"
        seed(args.seed)                               # the draws of a non-keep base init
        if built:  # from_config draws each planned tensor once, after transformers' init: build exactly as `init` does
            model = build(concrete, config, init=init)
        tensors, per_layer = stds_before_after(model, plan, built=built)
        for r in rows:
            before, after = per_layer.get((r["chain"], r["layer"]), (None, None))
            r["std_before"], r["std_after"] = before, after
            r["std_ratio"] = after / before if before else None

    if args.json:
        print_json({"model": type(model).__name__, "source": source, "seed": args.seed,
                    "already_applied": recorded is not None, "recorded_settings": recorded,
                    "plan": plan.to_dict(), "layers": rows, "tensors": tensors, "notes": notes})
        return
    if recorded is not None:
        meta = {k: recorded[k] for k in METADATA_KEYS if k in recorded}
        print(f"{args.model} already carries the emergence init (recorded in config.emergence_init"
              f"{', hf_emergence ' + str(meta['hf_emergence_version']) if 'hf_emergence_version' in meta else ''}); "
              "its settings:")
        for k in SETTING_NAMES:
            print(f"  {k} = {recorded.get(k)!r}")
    print(f"{plan.heading()} [{source}]")
    extra = [] if args.plan_only else (["std"] if recorded is not None else ["std_before", "std_after", "std_ratio"])
    cols = PLAN_COLUMNS + extra
    print(text_table(cols, [[format_k(r[c]) if c == "k" else fmt(r[c]) for c in cols] for r in rows]))
    for line in plan.summary():
        print(line)
    for note in notes:
        print(f"note: {note}")
    if not args.plan_only and recorded is None:
        print(f"std_before: weight std after the base init ({plan.base_init}), std_after: after the scaling "
              f"(measured on copies, seed {args.seed}); std over each layer's scaled tensors")


class Moments:
    """Running count / sum / sum of squares in float64, for the std of several tensors together."""

    def __init__(self) -> None:
        self.n, self.s, self.ss = 0, 0.0, 0.0

    def add(self, t: torch.Tensor) -> None:
        t = t.detach().double()
        self.n += t.numel()
        self.s += float(t.sum())
        self.ss += float((t * t).sum())

    def std(self) -> Optional[float]:
        if self.n < 2:
            return None
        return math.sqrt(max(0.0, (self.ss - self.s * self.s / self.n) / (self.n - 1)))


def tensor_std(t: torch.Tensor) -> Optional[float]:
    return float(t.detach().double().std()) if t.numel() > 1 else None


@torch.no_grad()
def stds_before_after(model: Any, plan: Any, built: bool = False) -> tuple[list[dict[str, Any]], dict[tuple[str, int], tuple]]:
    """Draw and scale every planned tensor on a copy, in plan order, exactly as ``EmergenceInit.apply`` does
    (``built``: ``model`` already carries the init; its weights divided by the factors are the base draws)."""
    params = dict(model.named_parameters())
    tensors, layers = [], {}
    for entry in plan:
        t = params[entry.name].detach().clone()
        if built:
            t.div_(entry.factor)                                                    # back to the base draw
        else:
            plan.apply_entry_(dataclasses.replace(entry, factor=1.0), t, reinit=True)   # the base init only
        before = tensor_std(t)
        if entry.layer is not None:
            layers.setdefault((entry.chain, entry.layer), (Moments(), Moments()))[0].add(t)
        plan.apply_entry_(entry, t, reinit=False)                                   # the scaling only
        after = tensor_std(t)
        if entry.layer is not None:
            layers[(entry.chain, entry.layer)][1].add(t)
        tensors.append({"name": entry.name, "chain": entry.chain, "layer": entry.layer, "role": entry.role,
                        "k": entry.k, "factor": entry.factor, "std_before": before, "std_after": after})
    return tensors, {key: (b.std(), a.std()) for key, (b, a) in layers.items()}


@torch.no_grad()
def stds_now(model: Any, plan: Any) -> tuple[list[dict[str, Any]], dict[tuple[str, int], Optional[float]]]:
    params = dict(model.named_parameters())
    tensors, layers = [], {}
    for entry in plan:
        t = params[entry.name]
        if entry.layer is not None:
            layers.setdefault((entry.chain, entry.layer), Moments()).add(t)
        tensors.append({"name": entry.name, "chain": entry.chain, "layer": entry.layer, "role": entry.role,
                        "k": entry.k, "factor": entry.factor, "std": tensor_std(t)})
    return tensors, {key: m.std() for key, m in layers.items()}
