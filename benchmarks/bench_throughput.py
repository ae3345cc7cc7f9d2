#!/usr/bin/env python
"""Training throughput of the example scripts against a minimal hand-written PyTorch loop on the same model,
the same tensors and the same batches, measured in the same process (the hand loop is the reference run).

    python benchmarks/bench_throughput.py                              # vision + translation, 3 repetitions
    python benchmarks/bench_throughput.py --tasks vision --repeats 5 --threads 2

Vision: ``examples/vision/run.py`` with its defaults (``--model_type cnn``: BatchNorm, width 32, depth 6, SGD,
batch 128) on the built-in CIFAR-10 sample. Translation: ``examples/translation/run.py`` with ``--model_preset``
(default ``tiny``) on the built-in de-en sample. Each script is imported with importlib and its ``main(argv)`` is
called in this process for a fixed number of optimizer steps.

How the script is timed (from outside, not from its own log): ``MetricsLog.log`` is wrapped so that every
throughput record (written every ``--logging_steps``) gets a ``time.perf_counter()`` stamp when it is logged, and the
script's ``evaluate`` is wrapped to record the time it spends (the vision script always evaluates at the end of
epoch 1). The script's throughput is the number of images (tokens) of steps ``warmup+1 .. steps`` divided by the
wall time between the records of step ``warmup`` and step ``steps`` minus the evaluation time in between: the whole
loop body (data loading, accelerate wrappers, grad-norm clipping, scheduler, logging) is counted. The first
logging window (``warmup`` steps) is skipped. The script's own ``images_per_s`` / ``tokens_per_s`` and
``data_wait_share`` from ``metrics.jsonl`` over the same windows are reported beside it; they leave out the
few lines between ``timer.step_done`` and ``timer.restart`` of each step.

The hand loop: the model from the script's own ``build_model`` with the same parsed arguments (same seed, same
init), the same data tensors, the same batches (the script's ``EpochBatchSampler``, same seed, epochs, length
grouping), the same augmentation (``random_crop_flip``) and normalisation (vision) or ``collate`` and
``smoothed_loss`` (translation), plain ``torch.optim.SGD`` / ``AdamW``, no accelerate, no clipping, no scheduler,
no logging; it is timed from the end of step ``warmup`` to the end of the last step.

Each repetition runs the script and the hand loop back to back, alternating which goes first; the ratio
script/hand is taken per repetition and reported as mean +- sample std (ddof=1). Both use ``--threads`` CPU
threads. Other processes running on the machine at the same time are recorded in the results (they slow both
sides; the alternation and the per-repetition ratio are there to cancel that to first order).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def load_script(name: str, path: Path):
    """Import an example script as a module (it puts examples/ and its own folder on sys.path itself)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------ measuring
def time_script(run_module, common, argv: list[str], key: str, warmup: int, steps: int,
                items_per_step: list[int]) -> dict[str, Any]:
    """Run ``run_module.main(argv)`` and time steps warmup+1..steps from the log-record stamps (see module doc)."""
    stamps: dict[int, float] = {}
    records: dict[int, dict[str, Any]] = {}
    evals: list[tuple[float, float]] = []
    original_log, original_eval = common.MetricsLog.log, run_module.evaluate

    def log(self, record):
        if key in record:
            stamps[record["step"]] = time.perf_counter()
            records[record["step"]] = dict(record)
        return original_log(self, record)

    def evaluate(*a, **k):
        t0 = time.perf_counter()
        try:
            return original_eval(*a, **k)
        finally:
            evals.append((t0, time.perf_counter()))

    common.MetricsLog.log, run_module.evaluate = log, evaluate
    try:
        t_start = time.perf_counter()
        run_module.main(argv)
        t_total = time.perf_counter() - t_start
    finally:
        common.MetricsLog.log, run_module.evaluate = original_log, original_eval
    if warmup not in stamps or steps not in stamps:
        raise RuntimeError(f"expected throughput records at steps {warmup} and {steps}, got {sorted(stamps)}")
    t0, t1 = stamps[warmup], stamps[steps]
    eval_inside = sum(min(b, t1) - max(a, t0) for a, b in evals if b > t0 and a < t1)
    seconds = t1 - t0 - eval_inside
    items = sum(items_per_step[warmup:steps])
    window = [records[s] for s in sorted(records) if warmup < s <= steps]
    marks = [s for s in sorted(stamps) if warmup <= s <= steps]
    windows = []                       # throughput of each logging window, same eval exclusion
    for a, b in zip(marks, marks[1:]):
        ta, tb = stamps[a], stamps[b]
        inside = sum(min(y, tb) - max(x, ta) for x, y in evals if y > ta and x < tb)
        windows.append(sum(items_per_step[a:b]) / (tb - ta - inside))
    # the script's own numbers, over the same windows (each window has the same number of steps)
    own = statistics.mean(r[key] for r in window)
    wait = statistics.mean(r["data_wait_share"] for r in window)
    return {"items_per_s": items / seconds, "seconds": seconds, "items": items, "eval_seconds_excluded": eval_inside,
            "window_items_per_s": windows, "median_window_items_per_s": statistics.median(windows),
            "self_reported_items_per_s": own, "data_wait_share": wait, "wall_seconds_whole_run": t_total}


def time_hand_loop(step_fn: Callable[[int], tuple[int, float]], warmup: int, steps: int) -> dict[str, Any]:
    """``step_fn(i)`` does step i (0-based) and returns (items, seconds spent preparing the batch); windows of
    ``warmup`` steps, like the script's logging windows."""
    items = window_items = 0
    data_seconds = 0.0
    windows = []
    t0 = t_window = time.perf_counter()
    for i in range(steps):
        n, data_s = step_fn(i)
        if i + 1 == warmup:
            t0 = t_window = time.perf_counter()
        elif i + 1 > warmup:
            items += n
            window_items += n
            data_seconds += data_s
            if (i + 1) % warmup == 0:
                now = time.perf_counter()
                windows.append(window_items / (now - t_window))
                t_window, window_items = now, 0
    seconds = time.perf_counter() - t0
    return {"items_per_s": items / seconds, "seconds": seconds, "items": items, "data_wait_share": data_seconds / seconds,
            "window_items_per_s": windows, "median_window_items_per_s": statistics.median(windows)}


def planned_batches(sampler, steps: int) -> list[list[int]]:
    """The index batches the script consumes in its first ``steps`` steps (epochs in order, as in its loop)."""
    out: list[list[int]] = []
    epoch = 0
    while len(out) < steps:
        sampler.use_epoch(epoch)
        out += list(sampler)
        epoch += 1
    return out[:steps]


# ----------------------------------------------------------------------------------------------- vision
def vision_task(opts, work: Path) -> dict[str, Any]:
    run = load_script("bench_vision_run", EXAMPLES / "vision" / "run.py")
    import common

    cache = work / "image_cache"
    base = ["--model_type", "cnn", "--per_device_train_batch_size", str(opts.vision_batch_size),
            "--max_train_steps", str(opts.vision_steps), "--logging_steps", str(opts.vision_warmup),
            "--eval_steps", "1000000", "--no_progress_bar", "--image_cache_dir", str(cache),
            "--num_threads", str(opts.threads), "--seed", "42", "--cache_dir", str(work / "datasets_cache")]
    args = run.parse_args(base + ["--output_dir", str(work / "vision_hand")])
    splits = run.load_splits(args)                       # decodes once and fills the cache (not timed)
    train = splits["train"]
    mean, std = run.channel_stats(train)
    images_u8 = train.images                             # the split's uint8 pixels as one tensor, gathered once
    sampler = common.EpochBatchSampler(len(train), args.per_device_train_batch_size, args.seed)
    batches = planned_batches(sampler, opts.vision_steps)
    sizes = [len(b) for b in batches]
    mean_t = torch.tensor(mean).view(1, -1, 1, 1) * 255
    std_t = torch.tensor(std).view(1, -1, 1, 1) * 255

    def script(rep: int) -> dict[str, Any]:
        argv = base + ["--output_dir", str(work / f"vision_script_{rep}")]
        return time_script(run, common, argv, "images_per_s", opts.vision_warmup, opts.vision_steps, sizes)

    def hand(rep: int) -> dict[str, Any]:
        torch.set_num_threads(opts.threads)
        torch.manual_seed(args.seed)
        model = run.build_model(args, train.classes, mean, std)
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=args.learning_rate, momentum=args.momentum,
                                    weight_decay=args.weight_decay)
        generator = torch.Generator().manual_seed(args.seed)

        def step(i: int) -> tuple[int, float]:
            t = time.perf_counter()
            index = torch.tensor(batches[i], dtype=torch.long)
            images = run.random_crop_flip(images_u8[index], generator)
            pixels = (images.float() - mean_t) / std_t
            labels = train.labels[index]
            data_s = time.perf_counter() - t
            loss = F.cross_entropy(run.logits_of(model(pixels)), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return len(index), data_s

        return time_hand_loop(step, opts.vision_warmup, opts.vision_steps)

    return {"name": "vision", "script": "examples/vision/run.py", "unit": "images/s",
            "model": f"cnn (BatchNorm, width {args.width}, depth {args.depth}), SGD, batch {args.per_device_train_batch_size}, "
                     f"{args.image_size}x{args.image_size}, built-in CIFAR-10 sample ({len(train)} train images)",
            "script_argv": base + ["--output_dir", "<tmp>"], "steps": opts.vision_steps, "warmup_steps": opts.vision_warmup,
            "run_script": script, "run_hand": hand}


# ------------------------------------------------------------------------------------------ translation
def translation_task(opts, work: Path) -> dict[str, Any]:
    run = load_script("bench_translation_run", EXAMPLES / "translation" / "run.py")
    import common
    from transformers import AutoTokenizer

    tok_dir = work / "tokenizer"
    base = ["--model_preset", opts.translation_preset, "--max_train_steps", str(opts.translation_steps),
            "--logging_steps", str(opts.translation_warmup), "--eval_steps", "1000000", "--no_progress_bar",
            "--num_beams", "1", "--max_eval_samples", "16", "--max_target_length", "32",
            "--num_threads", str(opts.threads), "--seed", "42", "--cache_dir", str(work / "datasets_cache")]
    if opts.translation_data:
        base += ["--train_file", f"{opts.translation_data}/train", "--validation_file", f"{opts.translation_data}/val"]
    args = run.parse_args(base + ["--output_dir", str(work / "translation_hand")])
    splits = run.load_splits(args)
    run.train_tokenizer(splits["train"], args.vocab_size).save_pretrained(tok_dir)   # shared by both sides
    base += ["--tokenizer_name", str(tok_dir)]
    args = run.parse_args(base + ["--output_dir", str(work / "translation_hand")])
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    data = run.encode(splits, tokenizer, args)["train"]
    rows = [{"input_ids": a, "labels": b, "index": i} for i, (a, b) in enumerate(zip(data["input_ids"], data["labels"]))]
    pad = tokenizer.pad_token_id
    sampler = common.EpochBatchSampler(len(rows), args.per_device_train_batch_size, args.seed, lengths=list(data["length"]),
                                       max_tokens=args.max_tokens_per_batch or None)
    batches = planned_batches(sampler, opts.translation_steps)
    sizes = [sum(len(rows[i]["labels"]) for i in b) for b in batches]          # target tokens, as the script counts

    def script(rep: int) -> dict[str, Any]:
        argv = base + ["--output_dir", str(work / f"translation_script_{rep}")]
        return time_script(run, common, argv, "target_tokens_per_s", opts.translation_warmup, opts.translation_steps, sizes)

    def hand(rep: int) -> dict[str, Any]:
        torch.set_num_threads(opts.threads)
        torch.manual_seed(args.seed)
        model = run.build_model(args, tokenizer)
        model.train()
        start, pad_id = model.config.decoder_start_token_id, model.config.pad_token_id
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, betas=(0.9, args.adam_beta2),
                                      weight_decay=args.weight_decay)

        def step(i: int) -> tuple[int, float]:
            t = time.perf_counter()
            batch = run.collate([rows[j] for j in batches[i]], pad)
            data_s = time.perf_counter() - t
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           decoder_input_ids=run.decoder_inputs(batch["labels"], start, pad_id)).logits
            loss = run.smoothed_loss(logits, batch["labels"], args.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return int((batch["labels"] != -100).sum()), data_s

        return time_hand_loop(step, opts.translation_warmup, opts.translation_steps)

    p = run.PRESETS[opts.translation_preset]
    batching = (f"{args.max_tokens_per_batch}-token batches" if args.max_tokens_per_batch
                else f"batch {args.per_device_train_batch_size}")
    return {"name": "translation", "script": "examples/translation/run.py", "unit": "target tokens/s",
            "model": f"{args.model_type}, preset {opts.translation_preset} (d_model {p.d_model}, {p.layers}+{p.layers} layers, "
                     f"FFN {p.ffn}, {p.heads} heads, vocab {len(tokenizer)}), AdamW(0.9, {args.adam_beta2}), {batching}, "
                     f"{'Multi30k' if opts.translation_data else 'built-in de-en sample'} ({len(rows)} train pairs)",
            "script_argv": base[:-1] + ["<tmp>/tokenizer", "--output_dir", "<tmp>"], "steps": opts.translation_steps,
            "warmup_steps": opts.translation_warmup, "run_script": script, "run_hand": hand}


# --------------------------------------------------------------------------------------------- report
def other_processes() -> list[str]:
    """Other busy processes at this moment (ps), to record the load the timings ran under."""
    try:
        out = subprocess.run(["ps", "-eo", "pid,pcpu,etime,args", "--sort=-pcpu"], capture_output=True, text=True).stdout
    except OSError:
        return []
    rows = []
    for line in out.splitlines()[1:]:
        parts = line.split(None, 3)
        if len(parts) == 4 and int(parts[0]) != os.getpid() and float(parts[1]) >= 20:
            rows.append(f"pid {parts[0]} {parts[1]}% cpu: {parts[3][:200]}")
    return rows


def summarise(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def write_report(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    m = result["machine"]
    lines = ["# Throughput: example scripts vs a minimal hand-written loop", "",
             f"Measured {result['date']} with:", "", "```bash", result["command"], "```", "",
             f"Machine: {m['cpu_cores']} CPU cores, {m['threads']} torch thread(s) on both sides, torch {m['torch']}, "
             f"transformers {m['transformers']}, accelerate {m['accelerate']}, Python {m['python']}, {m['platform']}.", "",
             f"Target: script >= {result['target']}x the hand loop (issues 4 and 5; translation: issue 10).", "",
             "| script | model | steps timed | hand loop (reference) | script | script / hand | script / hand, median "
             "windows | script's own log | data_wait_share script / hand |",
             "|---|---|---|---|---|---|---|---|---|"]
    for t in result["tasks"]:
        s = t["summary"]
        u = t["unit"]
        lines.append(f"| `{t['script']}` | {t['model']} | {t['steps'] - t['warmup_steps']} (after {t['warmup_steps']} warm-up) | "
                     f"{s['hand']['mean']:.0f} ± {s['hand']['std']:.0f} {u} | {s['script']['mean']:.0f} ± {s['script']['std']:.0f} {u} | "
                     f"**{s['ratio']['mean']:.3f} ± {s['ratio']['std']:.3f}** | {s['ratio_median_windows']['mean']:.3f} ± "
                     f"{s['ratio_median_windows']['std']:.3f} | {s['self_reported']['mean']:.0f} ± "
                     f"{s['self_reported']['std']:.0f} {u} | {s['data_wait_share_script']['mean']:.3f} / "
                     f"{s['data_wait_share_hand']['mean']:.3f} |")
    lines += ["", f"Mean ± sample std (ddof=1) over {result['repeats']} repetitions; each repetition runs the script and "
              "the hand loop back to back in one process, alternating which goes first, and the ratio is taken per "
              "repetition. Per-repetition numbers are in `results.json`.", "",
              "- **script**: images (tokens) of the timed steps over the wall time between the script's log records at "
              "the first and last timed step, minus the time spent in its `evaluate` in between (the vision script "
              "always evaluates after epoch 1). Everything else in its loop counts: accelerate's DataLoader and "
              "optimizer wrappers, grad-norm clipping, the scheduler, logging.",
              "- **median windows**: the timed steps split into windows of `warmup` steps (the script's logging "
              "windows; the hand loop is cut the same way), the median window throughput of each side, their ratio per "
              "repetition. Less sensitive to slow spells of the machine, which on this VM move a 10-step window by up "
              "to ~30% with nothing else running.",
              "- **script's own log**: mean of the `images_per_s` / `tokens_per_s` records of `metrics.jsonl` over the "
              "same windows (its timer leaves out the few lines between `timer.step_done` and `timer.restart`).",
              "- **hand loop**: same model (`build_model`, same args and seed), same tensors and batches (the script's "
              "sampler, same seed), same augmentation/normalisation or collate/loss; plain `torch.optim` SGD/AdamW, no "
              "accelerate, no clipping, no scheduler, no logging.",
              "- **data_wait_share**: share of the timed wall time spent producing batches (script: its own log; hand "
              "loop: the same measurement around its batch construction).", ""]
    if result.get("background"):
        lines += ["Other processes running during the measurement (they compete for the same cores, so absolute "
                  "numbers are lower and noisier than on an idle machine; the ratios are what to compare):", ""]
        lines += [f"- {row}" for row in result["background"]] + [""]
    lines += ["![script / hand-loop throughput](throughput.png)", ""]
    (out / "README.md").write_text("\n".join(lines))
    plot(result, out / "throughput.png")


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = result["tasks"]
    fig, axes = plt.subplots(1, 1 + len(tasks), figsize=(3.2 * (1 + len(tasks)), 3.4))
    ax = axes[0]
    names = [t["name"] for t in tasks]
    means = [t["summary"]["ratio"]["mean"] for t in tasks]
    stds = [t["summary"]["ratio"]["std"] for t in tasks]
    ax.bar(names, means, yerr=stds, capsize=6, color="tab:blue")
    ax.axhline(result["target"], color="tab:red", ls="--", label=f"target {result['target']}x")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_ylabel("script / hand loop")
    ax.set_ylim(0, max(1.15, max(m + s for m, s in zip(means, stds)) + 0.05))
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("throughput ratio")
    for ax, t in zip(axes[1:], tasks):
        s = t["summary"]
        ax.bar(["hand loop", "script"], [s["hand"]["mean"], s["script"]["mean"]],
               yerr=[s["hand"]["std"], s["script"]["std"]], capsize=6, color=["tab:gray", "tab:blue"])
        ax.set_ylabel(t["unit"])
        ax.set_title(t["name"])
    fig.suptitle(f"{result['repeats']} repetitions, mean ± std, {result['machine']['threads']} CPU thread(s)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> dict[str, Any]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["vision", "translation"], choices=["vision", "translation"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=cores, help="torch CPU threads on both sides (default: the cores)")
    parser.add_argument("--vision_steps", type=int, default=60)
    parser.add_argument("--vision_warmup", type=int, default=10, help="also the script's --logging_steps")
    parser.add_argument("--vision_batch_size", type=int, default=128)
    parser.add_argument("--translation_preset", default="small", choices=["tiny", "small"])
    parser.add_argument("--translation_data", default=None,
                        help="Multi30k folder (train/val .de/.en.gz); default: the built-in sample")
    parser.add_argument("--translation_steps", type=int, default=60)
    parser.add_argument("--translation_warmup", type=int, default=10, help="also the script's --logging_steps")
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "throughput"))
    opts = parser.parse_args(argv)
    for name in ("vision", "translation"):
        steps, warm = getattr(opts, f"{name}_steps"), getattr(opts, f"{name}_warmup")
        if warm < 1 or steps <= warm or steps % warm:
            parser.error(f"--{name}_steps must be a multiple of --{name}_warmup and larger than it")
    if opts.repeats < 1:
        parser.error("--repeats must be >= 1")
    logging.basicConfig(level=logging.WARNING)   # the scripts' basicConfig then leaves the level alone
    import accelerate
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(opts.threads)
    background = other_processes()
    result: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/bench_throughput.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "machine": {"cpu_cores": cores, "threads": opts.threads, "torch": torch.__version__, "transformers": transformers.__version__,
                    "accelerate": accelerate.__version__, "python": platform.python_version(), "platform": platform.platform()},
        "repeats": opts.repeats, "target": opts.target, "background": background, "tasks": []}
    t_begin = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_throughput_") as tmp:
        work = Path(tmp)
        for name in opts.tasks:
            task = (vision_task if name == "vision" else translation_task)(opts, work)
            reps = []
            for rep in range(opts.repeats):
                order = ("script", "hand") if rep % 2 == 0 else ("hand", "script")
                r: dict[str, Any] = {"order": list(order)}
                for side in order:
                    r[side] = task[f"run_{side}"](rep)
                r["ratio"] = r["script"]["items_per_s"] / r["hand"]["items_per_s"]
                r["ratio_median_windows"] = r["script"]["median_window_items_per_s"] / r["hand"]["median_window_items_per_s"]
                print(f"{name} rep {rep + 1}/{opts.repeats} ({order[0]} first): script {r['script']['items_per_s']:.1f} "
                      f"(own log {r['script']['self_reported_items_per_s']:.1f}, data wait {r['script']['data_wait_share']:.3f}), "
                      f"hand {r['hand']['items_per_s']:.1f} {task['unit']} -> ratio {r['ratio']:.3f} "
                      f"(median windows {r['ratio_median_windows']:.3f})", flush=True)
                reps.append(r)
            summary = {"ratio": summarise([r["ratio"] for r in reps]),
                       "ratio_median_windows": summarise([r["ratio_median_windows"] for r in reps]),
                       "script": summarise([r["script"]["items_per_s"] for r in reps]),
                       "hand": summarise([r["hand"]["items_per_s"] for r in reps]),
                       "self_reported": summarise([r["script"]["self_reported_items_per_s"] for r in reps]),
                       "data_wait_share_script": summarise([r["script"]["data_wait_share"] for r in reps]),
                       "data_wait_share_hand": summarise([r["hand"]["data_wait_share"] for r in reps])}
            result["tasks"].append({k: v for k, v in task.items() if not k.startswith("run_")} | {"repetitions": reps,
                                                                                                    "summary": summary})
    seen = {row.split()[1] for row in background}            # one line per pid: the first sighting
    result["background"] = background + [row for row in other_processes() if row.split()[1] not in seen]
    result["benchmark_wall_seconds"] = time.perf_counter() - t_begin
    write_report(result, Path(opts.out))
    for t in result["tasks"]:
        s = t["summary"]["ratio"]
        w = t["summary"]["ratio_median_windows"]
        print(f"{t['name']}: script / hand = {s['mean']:.3f} ± {s['std']:.3f}; median of windows {w['mean']:.3f} ± "
              f"{w['std']:.3f} (target {opts.target})")
    print(f"wrote {opts.out}/results.json, README.md, throughput.png ({result['benchmark_wall_seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
