#!/usr/bin/env python
"""Cost of ``EmergenceInit.apply`` on a >= 100M-parameter model, as ratios against references measured in the
same process (so the numbers carry over between machines better than seconds do).

    python benchmarks/bench_apply.py                       # BART-base-sized config (~140M params), 3 repetitions
    python benchmarks/bench_apply.py --repeats 5 --threads 2 --out docs/results/bench_apply

Measured per repetition (model built with ``AutoModelForSeq2SeqLM.from_config``, never downloaded):

* ``apply / from_config``: wall time of ``EmergenceInit(alpha).apply(model)`` (base re-draw + scaling) over the
  wall time of the stock ``from_config`` that built the model; also with ``base_init="keep"`` (scaling only).
* The same ratios from process CPU time (``time.process_time``; one torch thread, so it is the work done, less
  sensitive than wall time to other jobs taking the CPU away), for the scaling and the hook.
* ``peak extra memory / model size``: the process's peak resident memory during ``apply`` minus its resident
  memory just before, over the bytes of all parameters and buffers; also over the bytes of the largest tensor the
  plan touches. Linux only: the kernel's high-water mark (``VmHWM``) is reset by writing 5 to
  ``/proc/self/clear_refs`` before ``apply`` and read after it. The script re-executes itself with
  ``MALLOC_MMAP_THRESHOLD_=65536`` so that every tensor above 64 KiB is its own mapping and is returned to the
  OS when freed: resident memory then follows live tensor memory instead of glibc's heap.
* ``plan on meta / from_config``: ``EmergenceInit(alpha).plan(model)`` on the same config built under
  ``torch.device("meta")`` (no weights), over the stock ``from_config`` time.
* ``hf_emergence.from_config / stock from_config``: building with the init inside transformers' construction
  against the stock build, same config (the stock and hf builds alternate order between repetitions). The hook
  draws each planned tensor once (transformers' init skips them), so it may be cheaper than the stock build.
* ``hook peak extra memory / largest planned tensor``: the peak resident memory of the hf build minus that of
  the stock build (each over the resident memory just before it), over the largest planned tensor.

Targets (issue 11): hook <= 1.03x stock ``from_config``; the scaling itself (``base_init="keep"``) <= 0.01 of
it; peak extra memory <= one tensor.

Ratios are computed per repetition; the report gives mean +- sample std (ddof=1) over repetitions.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"

SIZES = {
    # BART-base: 6+6 layers, d_model 768, FFN 3072, 12 heads, 50265-token vocabulary (~140M parameters).
    "bart-base": ("bart", dict(vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6, encoder_ffn_dim=3072,
                               decoder_ffn_dim=3072, encoder_attention_heads=12, decoder_attention_heads=12,
                               max_position_embeddings=1024)),
    # Marian of the same size (Marian's own vocabulary size, sinusoidal positions).
    "marian-base": ("marian", dict(vocab_size=58101, d_model=768, encoder_layers=6, decoder_layers=6, encoder_ffn_dim=3072,
                                   decoder_ffn_dim=3072, encoder_attention_heads=12, decoder_attention_heads=12,
                                   max_position_embeddings=512, decoder_start_token_id=58100, pad_token_id=58100)),
    # Small, for a quick check of the script itself.
    "tiny": ("bart", dict(vocab_size=1000, d_model=64, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=128,
                          decoder_ffn_dim=128, encoder_attention_heads=2, decoder_attention_heads=2,
                          max_position_embeddings=128)),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="bart-base", choices=sorted(SIZES))
    p.add_argument("--alpha", type=float, default=1.2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: least disturbed by other load)")
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "bench_apply"),
                   help="output path without extension: writes OUT.json and OUT.md")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    return args


def _status() -> dict[str, int]:
    """VmRSS and VmHWM of this process in bytes (Linux)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    return out


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _timed(fn, cpu: dict | None = None, key: str = ""):
    """``(fn(), wall seconds)``; with ``cpu``, also stores the process CPU seconds under ``cpu[key]``."""
    gc.collect()
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    if cpu is not None:
        cpu[key] = time.process_time() - c0
    return out, time.perf_counter() - t0


def mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else float("nan"),
            "n": len(values), "values": values}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if os.environ.get(MMAP_ENV) is None and sys.platform.startswith("linux"):
        env = dict(os.environ, **{MMAP_ENV: "65536"})
        os.execve(sys.executable, [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])], env)

    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    sys.path.insert(0, str(ROOT))
    import hf_emergence
    from hf_emergence import EmergenceInit
    from hf_emergence.atomic import atomic_write

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    model_type, kwargs = SIZES[args.size]
    config = AutoConfig.for_model(model_type, **kwargs)

    def stock():
        return AutoModelForSeq2SeqLM.from_config(config)

    def with_init():
        return hf_emergence.from_config(AutoModelForSeq2SeqLM, config, alpha=args.alpha)

    # Warm-up build (imports, lazy class resolution), not counted.
    warm = stock()
    n_params = sum(p.numel() for p in warm.parameters())
    model_bytes = sum(t.numel() * t.element_size() for t in list(warm.parameters()) + list(warm.buffers()))
    plan = EmergenceInit(alpha=args.alpha).plan(warm)
    largest_planned = max(e.numel for e in plan) * 4
    largest_param = max(p.numel() * p.element_size() for p in warm.parameters())
    del warm
    gc.collect()

    reps = []
    for rep in range(args.repeats):
        r: dict = {}
        order = ("stock", "hf") if rep % 2 == 0 else ("hf", "stock")
        for which in order:
            gc.collect()
            build_before = _status()["VmRSS"]
            peak_ok = _reset_peak()
            if which == "stock":
                model, r["from_config_s"] = _timed(stock, r, "from_config_cpu_s")
                r["stock_build_peak_bytes"] = _status()["VmHWM"] - build_before if peak_ok else None
                # apply on the model just built by the stock path: time and peak extra resident memory.
                gc.collect()
                before = _status()["VmRSS"]
                peak_ok = _reset_peak()
                _, r["apply_s"] = _timed(lambda: EmergenceInit(alpha=args.alpha).apply(model), r, "apply_cpu_s")
                after = _status()
                r["apply_peak_extra_bytes"] = after["VmHWM"] - before if peak_ok else None
                r["apply_rss_delta_bytes"] = after["VmRSS"] - before
                # control for the memory measure: one temporary copy of the largest planned tensor should read ~1.0.
                big = model.get_parameter(max(plan.entries, key=lambda e: e.numel).name)
                gc.collect()
                before = _status()["VmRSS"]
                _reset_peak()
                tmp = big.detach() * 1.0
                r["control_copy_peak_extra_bytes"] = _status()["VmHWM"] - before if peak_ok else None
                del tmp
                # scaling only (the weights are kept, as after a model's own init).
                _, r["apply_keep_s"] = _timed(lambda: EmergenceInit(alpha=args.alpha, base_init="keep").apply(model, force=True),
                                              r, "apply_keep_cpu_s")
                del model
            else:
                model, r["hf_from_config_s"] = _timed(with_init, r, "hf_from_config_cpu_s")
                r["hf_build_peak_bytes"] = _status()["VmHWM"] - build_before if peak_ok else None
                assert model.emergence_plan is not None
                del model
            gc.collect()
        with torch.device("meta"):
            meta_model, r["meta_build_s"] = _timed(stock)
        _, r["plan_meta_s"] = _timed(lambda: EmergenceInit(alpha=args.alpha).plan(meta_model))
        del meta_model
        r["ratio_apply_over_from_config"] = r["apply_s"] / r["from_config_s"]
        r["ratio_apply_keep_over_from_config"] = r["apply_keep_s"] / r["from_config_s"]
        r["ratio_plan_meta_over_from_config"] = r["plan_meta_s"] / r["from_config_s"]
        r["ratio_hf_from_config_over_stock"] = r["hf_from_config_s"] / r["from_config_s"]
        r["ratio_apply_keep_over_from_config_cpu"] = r["apply_keep_cpu_s"] / r["from_config_cpu_s"]
        r["ratio_hf_from_config_over_stock_cpu"] = r["hf_from_config_cpu_s"] / r["from_config_cpu_s"]
        if r["apply_peak_extra_bytes"] is not None:
            r["ratio_peak_extra_over_model_bytes"] = r["apply_peak_extra_bytes"] / model_bytes
            r["ratio_peak_extra_over_largest_planned_tensor"] = r["apply_peak_extra_bytes"] / largest_planned
            r["ratio_control_copy_over_largest_planned_tensor"] = r["control_copy_peak_extra_bytes"] / largest_planned
            r["ratio_hook_peak_extra_over_largest_planned_tensor"] = (
                (r["hf_build_peak_bytes"] - r["stock_build_peak_bytes"]) / largest_planned)
        reps.append(r)
        print(f"repetition {rep + 1}/{args.repeats}: " + ", ".join(f"{k}={v:.4g}" for k, v in r.items() if isinstance(v, float)),
              flush=True)

    keys = [k for k in reps[0] if all(isinstance(r.get(k), (int, float)) for r in reps)]
    summary = {k: mean_std([float(r[k]) for r in reps]) for k in keys}
    command = "python " + shlex.join([os.path.relpath(__file__, ROOT), *(argv if argv is not None else sys.argv[1:])])
    result = {
        "command": command,
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"size": args.size, "model_type": model_type, "class": plan.model,
                  "config": kwargs, "parameters": n_params, "bytes": model_bytes,
                  "largest_planned_tensor_bytes": largest_planned, "largest_parameter_bytes": largest_param,
                  "planned_tensors": len(plan), "alpha": args.alpha},
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
                        "hf_emergence": hf_emergence.__version__, "threads": torch.get_num_threads(),
                        "cpu_count": os.cpu_count(), "machine": platform.machine(), "platform": platform.platform(),
                        MMAP_ENV: os.environ.get(MMAP_ENV)},
        "repetitions": reps,
        "summary": summary,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out.with_suffix(".json"), json.dumps(result, indent=2))
    atomic_write(out.with_suffix(".md"), markdown(result))
    print(markdown(result))
    return result


def markdown(res: dict) -> str:
    s, m = res["summary"], res["model"]

    def ms(key: str, fmt: str = ".3f", scale: float = 1.0) -> str:
        if key not in s:
            return "n/a"
        v = s[key]
        return f"{v['mean'] * scale:{fmt}} ± {v['std'] * scale:{fmt}}"

    mib = 1024 ** 2
    lines = [
        "# Cost of `EmergenceInit.apply` on a >= 100M-parameter model",
        "",
        f"Model: `{m['class']}` built with `AutoModelForSeq2SeqLM.from_config` ({m['size']}: "
        + ", ".join(f"{k}={v}" for k, v in m["config"].items())
        + f"), {m['parameters']:,} parameters, {m['bytes'] / mib:.1f} MiB; {m['planned_tensors']} planned tensors, "
        f"the largest {m['largest_planned_tensor_bytes'] / mib:.2f} MiB (largest parameter: "
        f"{m['largest_parameter_bytes'] / mib:.2f} MiB, the shared embedding, not planned); alpha = {m['alpha']}.",
        "",
        f"Mean ± sample std over {len(res['repetitions'])} repetitions, each ratio taken within one repetition, "
        f"all in one process ({res['environment']['threads']} torch thread(s), {res['environment']['cpu_count']} CPUs "
        f"visible, shared with other jobs; torch {res['environment']['torch']}, transformers "
        f"{res['environment']['transformers']}).",
        "",
        "| quantity | ratio | reference |",
        "|---|---|---|",
        f"| `apply()` time (base re-draw + scaling) / stock `from_config` time | {ms('ratio_apply_over_from_config')} | "
        f"from_config {ms('from_config_s', '.2f')} s |",
        f"| `apply()` time with `base_init=\"keep\"` (scaling only) / stock `from_config` time (target <= 0.01) | "
        f"{ms('ratio_apply_keep_over_from_config')} | |",
        f"| peak extra resident memory during `apply()` / model size | {ms('ratio_peak_extra_over_model_bytes', '.4f')} | "
        f"peak extra {ms('apply_peak_extra_bytes', '.2f', 1 / mib)} MiB |",
        f"| peak extra resident memory during `apply()` / largest planned tensor | "
        f"{ms('ratio_peak_extra_over_largest_planned_tensor', '.2f')} | largest planned tensor "
        f"{m['largest_planned_tensor_bytes'] / mib:.2f} MiB |",
        f"| control: the same measure around one copy of the largest planned tensor / its size | "
        f"{ms('ratio_control_copy_over_largest_planned_tensor', '.2f')} | shows the measure sees a one-tensor temporary |",
        f"| `plan()` on the meta device / stock `from_config` time | {ms('ratio_plan_meta_over_from_config', '.4f')} | "
        f"plan {ms('plan_meta_s', '.3f', 1000)} ms |",
        f"| `hf_emergence.from_config` time / stock `from_config` time (target <= 1.03) | "
        f"{ms('ratio_hf_from_config_over_stock')} | hf from_config {ms('hf_from_config_s', '.2f')} s |",
        f"| the same two ratios from process CPU time: scaling only / stock `from_config` | "
        f"{ms('ratio_apply_keep_over_from_config_cpu')} | stock from_config CPU {ms('from_config_cpu_s', '.2f')} s |",
        f"| hf_emergence.from_config / stock `from_config` | {ms('ratio_hf_from_config_over_stock_cpu')} | |",
        f"| peak memory of the `hf_emergence.from_config` build minus that of the stock build / largest planned "
        f"tensor (target <= 1) | {ms('ratio_hook_peak_extra_over_largest_planned_tensor', '.2f')} | stock build peak "
        f"{ms('stock_build_peak_bytes', '.1f', 1 / mib)} MiB |",
        "",
        "Peak memory: the kernel's resident high-water mark (VmHWM, reset through /proc/self/clear_refs just before "
        "`apply`) minus the resident memory just before it, with glibc's mmap threshold fixed at 64 KiB so that freed "
        "tensors leave the resident set (see the script's docstring). Times are wall-clock on a shared CPU.",
        "",
        "Command:",
        "",
        "```",
        res["command"],
        "```",
        "",
        f"Run {res['date_utc']}. Raw numbers per repetition: `bench_apply.json`.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
