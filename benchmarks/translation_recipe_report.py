#!/usr/bin/env python
"""Table and plot of the translation recipe screening runs (issue 10), from their ``metrics.jsonl``, including runs
stopped before the end of their epoch (their training loss up to the stop is still a measurement).

    python benchmarks/translation_recipe_report.py RUN_DIR [RUN_DIR ...] --out docs/results/translation_recipe

Every run here trained on the same batches in the same order (same seed, same data, same BPE size), so the training
loss of a logged step compares the recipes on the same batch. Writes ``README.md`` (a table: training loss at the
logged steps, validation loss / BLEU at the end of epoch 1 where reached), ``loss.png`` and a copy of each run's
``metrics.jsonl`` and ``study_result.json`` (when present) under ``runs/<name>/``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def read(run: Path) -> dict:
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    losses = {r["step"]: r["loss"] for r in records if "loss" in r and "validation_loss" not in r}
    epoch1 = next((r for r in records if r.get("epoch") == 1 and "validation_loss" in r), {})
    final = next((r for r in records if r.get("final")), {})
    result = json.loads((run / "study_result.json").read_text()) if (run / "study_result.json").exists() else {}
    return {"name": run.name.replace("arm-", "").replace("__seed-1", ""), "losses": losses, "epoch1": epoch1,
            "final": final, "command": result.get("command"), "status": result.get("status", "stopped early")}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--out", required=True)
    parser.add_argument("--title", default="Translation recipe screening")
    parser.add_argument("--note", default="")
    opts = parser.parse_args(argv)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [read(Path(r)) for r in opts.runs if (Path(r) / "metrics.jsonl").exists()]
    steps = sorted({s for r in runs for s in r["losses"]})
    shown = [s for s in steps if s <= 400]
    lines = [f"# {opts.title}", "", opts.note, "",
             "Training loss (label-smoothed, one batch: the same batch for every run at a given step); validation loss "
             "(per BPE token, no smoothing) and greedy detokenised sacreBLEU on Multi30k val at the end of epoch 1 "
             "where the run got there.", "",
             "| run | " + " | ".join(f"loss @{s}" for s in shown) + " | val loss, epoch 1 | val BLEU, epoch 1 | status |",
             "|---|" + "---|" * (len(shown) + 3)]
    for r in runs:
        cells = [f"{r['losses'][s]:.3f}" if s in r["losses"] else "" for s in shown]
        e = r["epoch1"]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + f" | {e.get('validation_loss', float('nan')):.3f} | "
                     f"{e.get('validation_bleu', float('nan')):.2f} | {r['status']} |")
    lines += ["", "![training loss](loss.png)", "", "## Commands", ""]
    for r in runs:
        if r["command"]:
            lines += [f"- `{r['name']}`: `{r['command']}`"]
    lines += ["", f"Report: `python benchmarks/translation_recipe_report.py {' '.join(opts.runs)} --out {opts.out}`", ""]
    (out / "README.md").write_text("\n".join(lines))
    for run_dir, r in zip([Path(x) for x in opts.runs if (Path(x) / "metrics.jsonl").exists()], runs):
        dest = out / "runs" / r["name"]
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("metrics.jsonl", "study_result.json"):
            if (run_dir / name).exists():
                shutil.copy(run_dir / name, dest / name)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in runs:
        xs = sorted(r["losses"])
        ax.plot(xs, [r["losses"][x] for x in xs], marker="o", ms=3, label=r["name"])
    ax.set_xlabel("optimizer step (1,200-token batches)")
    ax.set_ylabel("training loss (label smoothing 0.1)")
    ax.set_ylim(top=7.5)
    ax.legend(fontsize=7)
    ax.set_title(opts.title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    print(f"wrote {out}/README.md, loss.png")


if __name__ == "__main__":
    main()
