#!/usr/bin/env python
"""Peak memory of examples/vision/run.py against the size of an image folder, streaming and in memory.

    flock /tmp/bench.lock python benchmarks/bench_memory.py                 # 1,000 vs 6,000 images, 224 px

Each run is a short training run in a fresh subprocess: 2 optimizer steps of a tiny CNN (``--model_type cnn --depth 3
--width 8``, batch 16) at ``--image_size 224`` on an image folder, then the final evaluation of the held-out 10%
(``--dataloader_num_workers 0 --preprocessing_num_workers 0``: everything in the one process that is measured). Its
peak resident set (``ru_maxrss`` of the child, from ``os.wait4``) is recorded, for two cache states: ``cold`` (fresh
``--image_cache_dir``: the check / decode pass runs and writes the cache) and ``warm`` (the same run again, reading it).
The folders hold CIFAR-10 JPEGs (32x32, resized to 224 on decode) from ``--source``, the first N/10 of each class; the
datasets cache of ``imagefolder`` is filled once beforehand, outside the measured runs.

Reported:

- **streaming** (``--in_memory no``): peak RSS at the large folder / at the small folder (target <= 1.2);
- **in memory** (``--in_memory yes``): the resident bytes the pixels add, (peak RSS in memory - peak RSS streaming)
  at the same folder, over the uint8 size of every image of the folder (N x 3 x 224 x 224) (target <= ~1.5), and the
  same from the difference between the two folders.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "vision" / "run.py"
MIB = 1 << 20


def make_folder(source: Path, dest: Path, n: int) -> Path:
    """The first n/10 files (sorted) of each of the 10 class folders of ``source``, hard-linked (copied if needed)."""
    classes = sorted(p.name for p in source.iterdir() if p.is_dir())
    per_class = n // len(classes)
    for cls in classes:
        (dest / cls).mkdir(parents=True, exist_ok=True)
        files = sorted((source / cls).iterdir())[:per_class]
        if len(files) < per_class:
            raise SystemExit(f"{source / cls} has {len(files)} images, {per_class} needed")
        for f in files:
            target = dest / cls / f.name
            if not target.exists():
                try:
                    os.link(f, target)
                except OSError:
                    shutil.copyfile(f, target)
    return dest


def run_once(argv: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run the script in a fresh process; its peak RSS (MiB) and wall time."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *argv], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}): {' '.join(argv)}\n{out[-3000:]}")
    return {"peak_rss_mib": usage.ru_maxrss * 1024 / MIB, "wall_s": time.perf_counter() - t0}


def main(argv=None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="/tmp/hf_emergence_data/cifar10/train", help="CIFAR-10 class folders")
    parser.add_argument("--sizes", type=int, nargs=2, default=[1000, 6000], metavar=("SMALL", "LARGE"))
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--work", default=None, help="folder for the generated data and caches (default: a temp dir)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "vision_memory"))
    opts = parser.parse_args(argv)
    work = Path(opts.work or tempfile.mkdtemp(prefix="bench_memory_"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    folders = {n: make_folder(Path(opts.source), work / f"folder_{n}", n) for n in opts.sizes}
    common = ["--image_size", str(opts.image_size), "--model_type", "cnn", "--depth", "3", "--width", "8",
              "--per_device_train_batch_size", str(opts.batch_size), "--max_train_steps", "2", "--num_threads", "1",
              "--no_progress_bar", "--dataloader_num_workers", "0", "--preprocessing_num_workers", "0",
              "--cache_dir", str(work / "datasets"), "--logging_steps", "1"]
    for n, folder in folders.items():                     # fill datasets' imagefolder cache (not measured)
        run_once(["--train_dir", str(folder), *common, "--in_memory", "no", "--image_cache_dir", "",
                  "--output_dir", str(work / f"warmup_{n}")], env)
    runs = []
    for n, folder in folders.items():
        for mode in ("no", "yes"):
            cache = work / f"pixels_{n}_{mode}"
            for state in ("cold", "warm"):
                argv_ = ["--train_dir", str(folder), *common, "--in_memory", mode, "--image_cache_dir", str(cache),
                         "--output_dir", str(work / f"out_{n}_{mode}_{state}")]
                r = run_once(argv_, env)
                runs.append({"images": n, "in_memory": mode, "cache": state, **r})
                print(f"{n} images, --in_memory {mode}, {state} cache: peak RSS {r['peak_rss_mib']:.0f} MiB "
                      f"({r['wall_s']:.0f} s)", flush=True)
    small, large = opts.sizes
    peak = {(r["images"], r["in_memory"], r["cache"]): r["peak_rss_mib"] for r in runs}
    uint8 = {n: n * 3 * opts.image_size ** 2 / MIB for n in opts.sizes}
    summary: dict[str, Any] = {"uint8_mib": uint8}
    for state in ("cold", "warm"):
        summary[state] = {
            "streaming_ratio_large_over_small": peak[large, "no", state] / peak[small, "no", state],
            "in_memory_overhead_vs_uint8": {n: (peak[n, "yes", state] - peak[n, "no", state]) / uint8[n] for n in opts.sizes},
            "in_memory_marginal_vs_uint8": (peak[large, "yes", state] - peak[small, "yes", state]) / (uint8[large] - uint8[small]),
        }
    import torch

    result = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "command": "flock /tmp/bench.lock python benchmarks/bench_memory.py "
                         + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
              "script_args": common, "machine": {"cpu_cores": os.cpu_count(), "python": platform.python_version(),
                                                 "torch": torch.__version__, "platform": platform.platform()},
              "targets": {"streaming_ratio": 1.2, "in_memory_overhead": 1.5}, "runs": runs, "summary": summary}
    write_report(result, Path(opts.out), small, large)
    if not opts.work:
        shutil.rmtree(work, ignore_errors=True)
    return result


def write_report(result: dict[str, Any], out: Path, small: int, large: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    s = result["summary"]
    peak = {(r["images"], r["in_memory"], r["cache"]): r for r in result["runs"]}
    lines = ["# Vision data: peak memory against the size of the image folder", "",
             f"Measured {result['date']} with:", "", "```bash", result["command"], "```", "",
             f"Machine: {result['machine']['cpu_cores']} CPU cores, torch {result['machine']['torch']}, Python "
             f"{result['machine']['python']}, {result['machine']['platform']}. Each run: `python examples/vision/run.py "
             f"--train_dir <folder> {' '.join(result['script_args'])} --in_memory <no|yes> --image_cache_dir <cache>` in "
             "a fresh process; peak RSS is the child's `ru_maxrss`. Folders: CIFAR-10 training JPEGs (32x32, resized to "
             "224 on decode). `cold`: empty `--image_cache_dir` (the check / decode pass runs and writes its cache); "
             "`warm`: the same run again.", "",
             "| images | uint8 pixels | streaming, cold | streaming, warm | in memory, cold | in memory, warm |",
             "|---|---|---|---|---|---|"]
    for n in (small, large):
        cells = [f"{peak[n, m, c]['peak_rss_mib']:.0f} MiB ({peak[n, m, c]['wall_s']:.0f} s)"
                 for m in ("no", "yes") for c in ("cold", "warm")]
        lines.append(f"| {n} | {s['uint8_mib'][n]:.0f} MiB | " + " | ".join(cells) + " |")
    lines += ["", "| measure | cold cache | warm cache | target |", "|---|---|---|---|",
              f"| streaming: peak RSS at {large} / at {small} images | "
              f"**{s['cold']['streaming_ratio_large_over_small']:.2f}x** | "
              f"**{s['warm']['streaming_ratio_large_over_small']:.2f}x** | <= 1.2x |"]
    for n in (small, large):
        lines.append(f"| in memory: (peak in memory - peak streaming) / uint8 size, {n} images | "
                     f"{s['cold']['in_memory_overhead_vs_uint8'][n]:.2f}x | "
                     f"{s['warm']['in_memory_overhead_vs_uint8'][n]:.2f}x | <= ~1.5x |")
    lines += [f"| in memory: (peak at {large} - peak at {small}) / (uint8 at {large} - at {small}) | "
              f"**{s['cold']['in_memory_marginal_vs_uint8']:.2f}x** | **{s['warm']['in_memory_marginal_vs_uint8']:.2f}x** "
              "| <= ~1.5x |", "",
              "Before this change (issue 12, measured by the session that filed it): 2.9 GiB at 1,000 images and "
              "15.4 GiB at 6,000 (5.3x), every image of every split decoded into memory first.", ""]
    (out / "README.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
