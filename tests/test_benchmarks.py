"""benchmarks/study.py: grid expansion, exact commands, skip-finished / resume logic, atomic results, aggregation.

Runs a tiny fake "example script" (a Python file written to tmp_path) instead of the real examples, so the whole
file takes a few seconds.
"""

import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import study  # noqa: E402

FAKE = r'''
import argparse, json, os, sys
from pathlib import Path
p = argparse.ArgumentParser()
p.add_argument("--output_dir"); p.add_argument("--seed", type=int); p.add_argument("--gain", type=float, default=1.0)
p.add_argument("--exit_code", type=int, default=0); p.add_argument("--resume_from_checkpoint")
p.add_argument("--data", default=None); p.add_argument("--no_results", action="store_true")
p.add_argument("--init", default="default"); p.add_argument("--alpha", type=float, default=None)
p.add_argument("--sleep", type=float, default=0.0)
a = p.parse_args()
import time; time.sleep(a.sleep)
out = Path(a.output_dir); out.mkdir(parents=True, exist_ok=True)
with open(out.parent / "invocations.txt", "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\n")
if a.exit_code:
    print("error: fake failure", file=sys.stderr); sys.exit(a.exit_code)
score = a.gain * 10 + (a.seed % 7) * 0.37
with open(out / "metrics.jsonl", "w") as f:
    f.write(json.dumps({"step": 0, "epoch": 0, "emergence_normalised": 0.01 * (a.alpha or 1) + 0.001 * a.seed}) + "\n")
    for step in (10, 20, 30):
        f.write(json.dumps({"step": step, "epoch": step // 20, "validation_score": score * step / 30}) + "\n")
    f.write(json.dumps({"step": 30, "validation_score": score, "test_score": score + 1, "final": True}) + "\n")
if not a.no_results:
    (out / "all_results.json").write_text(json.dumps({"val_score": score, "epoch1_validation_score": score / 2}))
'''


def write_grid(tmp_path: Path, **changes) -> Path:
    script = tmp_path / "fake_run.py"
    script.write_text(FAKE)
    grid = {
        "name": "fake",
        "script": str(script),
        "vars": {"data_root": "/nowhere"},
        "common_args": ["--data", "{data_root}/x"],
        "axes": {"arm": {"base": ["--gain", "1", "--init", "xavier"], "better": ["--gain", "2", "--init", "emergence", "--alpha", "1.5"]},
                 "seed": [1, 2, 3]},
        "report": {"metrics": ["val_score", "test_score"], "first_epoch_metrics": ["validation_score"],
                   "curve_metrics": ["validation_score"], "baseline": "base"},
    }
    grid.update(changes)
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(grid))
    return path


def invocations(out: Path) -> list[list[str]]:
    f = out / "invocations.txt"
    return [json.loads(l) for l in f.read_text().splitlines()] if f.exists() else []


def test_dry_run_prints_the_exact_commands_that_run(tmp_path, capsys):
    grid, out = write_grid(tmp_path), tmp_path / "study"
    assert study.main(["run", str(grid), "--out", str(out), "--dry_run", "--data_root", "/data"]) == 0
    printed = [l for l in capsys.readouterr().out.splitlines() if not l.startswith("#")]
    assert len(printed) == 6 and not out.exists()                     # nothing ran
    first = shlex.split(printed[0])
    assert first[0] == sys.executable and first[1] == str(tmp_path / "fake_run.py")
    assert first[2:] == ["--data", "/data/x", "--gain", "1", "--init", "xavier", "--seed", "1", "--output_dir", str(out / "arm-base__seed-1")]
    assert study.main(["run", str(grid), "--out", str(out), "--data_root", "/data"]) == 0
    ran = sorted(json.loads((out / p.parent.name / study.RESULT).read_text())["command"] for p in out.glob("*/study_result.json"))
    assert ran == sorted(printed)


def test_skips_finished_runs_retries_failed_and_keeps_diverged(tmp_path):
    grid = write_grid(tmp_path, axes={"arm": {"ok": [], "diverged": ["--exit_code", "3"], "crash": ["--exit_code", "1"],
                                              "noresult": ["--no_results"]}, "seed": [1]})
    out = tmp_path / "study"
    assert study.main(["run", str(grid), "--out", str(out)]) == 1   # a failed run -> exit 1
    status = {d.name: json.loads((d / study.RESULT).read_text())["status"] for d in out.iterdir() if d.is_dir()}
    assert status == {"arm-ok__seed-1": "ok", "arm-diverged__seed-1": "diverged", "arm-crash__seed-1": "failed",
                      "arm-noresult__seed-1": "failed"}
    res = json.loads((out / "arm-diverged__seed-1" / study.RESULT).read_text())
    assert res["exit_code"] == 3 and res["all_results"] is None and "fake failure" in "\n".join(res["log_tail"])
    assert len(invocations(out)) == 4
    study.main(["run", str(grid), "--out", str(out)])               # only the two failed runs again
    again = invocations(out)[4:]
    assert sorted(a[-1] for a in again) == sorted([str(out / "arm-crash__seed-1"), str(out / "arm-noresult__seed-1")])
    ok = json.loads((out / "arm-ok__seed-1" / study.RESULT).read_text())
    assert ok["all_results"]["val_score"] == pytest.approx(10.37)
    assert [r["step"] for r in ok["curve"]] == [0, 10, 20, 30, 30] and ok["wall_time_s"] >= 0


def test_only_max_runs_and_resume_from_checkpoint(tmp_path):
    grid, out = write_grid(tmp_path), tmp_path / "study"
    assert study.main(["run", str(grid), "--out", str(out), "--only", "better", "--max_runs", "2"]) == 0
    assert sorted(p.parent.name for p in out.glob("*/study_result.json")) == ["arm-better__seed-1", "arm-better__seed-2"]
    # a run cut short after writing a checkpoint restarts with --resume_from_checkpoint latest
    ckpt = out / "arm-base__seed-1" / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / "latest").write_text("step_00000010")
    study.main(["run", str(grid), "--out", str(out), "--only", "arm-base__seed-1$"])
    assert invocations(out)[-1][-2:] == ["--resume_from_checkpoint", "latest"]
    assert json.loads((out / "arm-base__seed-1" / study.RESULT).read_text())["resumed"] is True


def test_atomic_write_keeps_the_old_result_when_interrupted(tmp_path, monkeypatch):
    target = tmp_path / "run" / study.RESULT
    study.atomic_write(target, json.dumps({"status": "ok"}))
    assert study.is_finished(target.parent)

    def boom(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        study.atomic_write(target, "{half")
    assert json.loads(target.read_text()) == {"status": "ok"}
    # a half-written temp file never counts as a result
    assert not study.is_finished(tmp_path / "other")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / study.RESULT).write_text('{"status": "o')
    assert not study.is_finished(tmp_path / "other")


def test_interrupted_run_writes_no_result(tmp_path):
    grid = study.load_grid(write_grid(tmp_path))
    cell = grid.cells()[0]

    class Stop(BaseException):
        pass

    real_popen = study.subprocess.Popen

    class InterruptedPopen(real_popen):
        def wait(self, timeout=None):
            if timeout is None and not getattr(self, "_stopped", False):
                self._stopped = True
                raise Stop
            return super().wait(timeout)

    study.subprocess.Popen = InterruptedPopen
    try:
        with pytest.raises(Stop):
            study.execute(grid, cell, tmp_path / "study", [sys.executable], None)
    finally:
        study.subprocess.Popen = real_popen
    assert not (tmp_path / "study" / cell.name / study.RESULT).exists()


def test_aggregation_matches_numpy_and_report_is_written(tmp_path):
    grid, out = write_grid(tmp_path), tmp_path / "study"
    assert study.main(["run", str(grid), "--out", str(out)]) == 0
    results = study.load_results(out)
    agg = study.aggregate(results, study.load_grid(grid).report)
    rows = {g["cell"]["arm"]: g for g in agg["rows"]}
    assert list(rows) == ["base", "better"] and agg["group_axes"] == ["arm"]
    for arm, gain in (("base", 1), ("better", 2)):
        scores = np.array([gain * 10 + (s % 7) * 0.37 for s in (1, 2, 3)])
        st = rows[arm]["stats"]
        assert st["val_score"]["n"] == 3
        assert st["val_score"]["mean"] == pytest.approx(scores.mean())
        assert st["val_score"]["std"] == pytest.approx(scores.std(ddof=1))
        assert st["test_score"]["mean"] == pytest.approx((scores + 1).mean())       # from the final record
        first = rows[arm]["first_stats"]["validation_score"]                          # all_results' epoch1_*
        assert first["mean"] == pytest.approx((scores / 2).mean()) and first["std"] == pytest.approx((scores / 2).std(ddof=1))
    report = tmp_path / "report"
    assert study.main(["report", str(out), "--out", str(report)]) == 0
    text = (report / "README.md").read_text()
    m = (np.array([20.37, 20.74, 21.11])).mean()
    assert f"{m:.2f} ± {np.array([20.37, 20.74, 21.11]).std(ddof=1):.2f}" in text
    assert "| better | 3 |" in text and "+10.00" in text                      # delta vs the baseline arm
    assert "--output_dir" in text and (report / "curves_all.png").stat().st_size > 0
    assert (report / "E_vs_alpha.png").stat().st_size > 0                    # emergence_normalised at step 0
    summary = json.loads((report / "summary.json").read_text())
    assert summary["rows"][0]["stats"]["val_score"]["n"] == 3


def test_first_epoch_from_curve_and_select(tmp_path):
    res = {"all_results": {}, "curve": [{"step": 10, "epoch": 0, "validation_bleu": 1.0},
                                        {"step": 20, "epoch": 1, "validation_bleu": 2.0},
                                        {"step": 30, "epoch": 1, "validation_bleu": 3.0}]}
    assert study.first_epoch_metrics(res, ["validation_bleu"]) == {"validation_bleu": 2.0}

    def run(arm, seed, v):
        return {"name": f"arm-{arm}__seed-{seed}", "axes": ["arm", "seed"], "cell": {"arm": arm, "seed": str(seed)},
                "status": "ok", "all_results": {"val": v}, "curve": []}

    results = [run("warmup_0", 1, 1.0), run("warmup_0", 2, 2.0), run("warmup_100", 1, 5.0), run("warmup_100", 2, 6.0),
               run("xavier", 1, 9.0), run("xavier", 2, 8.0), run("warmup_35", 1, 99.0)]
    agg = study.aggregate(results, {"metrics": ["val"], "select": [{"name": "warmup_tuned", "arms": "warmup_*", "by": "val"}]})
    assert [s["cell"]["arm"] for s in agg["selected"]] == ["warmup_tuned (= warmup_100)"]   # not warmup_35: 1 seed of 2
    assert agg["selected"][0]["stats"]["val"]["mean"] == 5.5
    # a list of globs: the candidates are the arms matching any of them
    agg = study.aggregate(results, {"metrics": ["val"], "select": [{"name": "t", "arms": ["xavier", "warmup_0"], "by": "val"}]})
    assert [s["cell"]["arm"] for s in agg["selected"]] == ["t (= xavier)"]
    agg = study.aggregate(results, {"metrics": ["val"], "select": [{"name": "t", "arms": ["warmup_35", "xavier"], "by": "val"}]})
    assert agg["selected"] == []                                  # one candidate with every seed is no choice


@pytest.mark.parametrize("content, expected", [
    ("{", "not valid JSON"),
    ("[]", "expected a JSON object"),
    ('{"axes": {"seed": [1]}}', '"script"'),
    ('{"script": "x.py", "axes": {}}', '"axes"'),
    ('{"script": "x.py", "axes": {"seed": [1]}, "bogus": 1}', "unknown key(s) bogus"),
    ('{"script": "x.py", "axes": {"arm": {"a b": []}}}', "value 'a b'"),
    ('{"script": "x.py", "axes": {"arm": {"a": "--x"}}}', "expected a list of argument strings"),
    ('{"script": "x.py", "common_args": ["{data_root}"], "axes": {"seed": [1]}}', "uses {data_root}"),
    ('{"script": "x.py", "axes": {"seed": [1]}, "exclude": [{"nope": "*"}]}', '"exclude"'),
    ('{"script": "x.py", "axes": {"seed": [1]}, "exclude": [{"seed": "*"}]}', "leave no cell"),
    ('{"script": "x.py", "axes": {"seed": [1]}, "report": {"select": [{"name": "t", "arms": [], "by": "v"}]}}',
     'report.select[0]: expected {"name": ..., "arms": "glob" or ["glob", ...]'),
    ('{"script": "x.py", "axes": {"model": {"a": {"args": ["--a"], "vars": {"head": "h"}}, "b": ["--b"]}, '
     '"arm": {"held": ["--unscaled", "{head}"]}}}',
     "cell model-b__arm-held: uses {head}, which only model a set(s)"),
    ('{"script": "x.py", "vars": {"head": "h"}, "axes": {"model": {"a": {"args": [], "vars": {"head": "g"}}}}}',
     "axis 'model' value 'a': sets {head}, which vars (or --set) sets for every cell"),
    ('{"script": "x.py", "axes": {"model": {"a": {"argv": [], "vars": {"head": "g"}}}}}',
     'axis \'model\' value \'a\': expected [args] or {"args": [args], "vars": {"name": "value"}}'),
    ('{"script": "x.py", "axes": {"model": {"a": {"args": [], "vars": {"head": 1}}}}}',
     'axis \'model\' value \'a\': expected [args] or {"args": [args], "vars"'),
    ('{"script": "x.py", "requires": ["{head}/x"], "axes": {"model": {"a": {"args": [], "vars": {"head": "g"}}}}}',
     "requires: '{head}/x' uses {head}, which an axis value sets; requires is the same for every cell"),
    ('{"script": "x.py", "env": {"H": "{head}"}, "axes": {"model": {"a": {"args": [], "vars": {"head": "g"}}}}}',
     "env H: '{head}' uses {head}, which an axis value sets"),
])
def test_bad_grid_is_one_line_naming_the_file(tmp_path, capsys, content, expected):
    path = tmp_path / "bad.json"
    path.write_text(content)
    assert study.main(["run", str(path), "--out", str(tmp_path / "o"), "--dry_run"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"error: {path}:") and expected in err


def test_axis_values_set_variables_for_their_cells(tmp_path, capsys):
    """A value written as {"args", "vars"} fills {name} in its cells' arguments only, once: a regex's {{2}} stays {2}."""
    grid = write_grid(tmp_path, axes={
        "model": {"small": {"args": ["--gain", "1"], "vars": {"head": "^9\\."}},
                  "large": {"args": ["--gain", "2"], "vars": {"head": "^13\\."}}},
        "arm": {"base": ["--init", "xavier"], "held": ["--init", "emergence", "--data", "{head}", "--sleep", "0"],
                "quantified": ["--init", "emergence", "--data", "{head}x{{2}}"]},
        "seed": [1]})
    cells = {c.name: c.args for c in study.load_grid(grid).cells()}
    assert cells["model-small__arm-held__seed-1"][-8:-2] == ["--init", "emergence", "--data", "^9\\.", "--sleep", "0"]
    assert cells["model-large__arm-held__seed-1"][-8:-4] == ["--init", "emergence", "--data", "^13\\."]
    assert cells["model-large__arm-quantified__seed-1"][-3] == "^13\\.x{2}"
    assert cells["model-small__arm-base__seed-1"] == ["--data", "/nowhere/x", "--gain", "1", "--init", "xavier", "--seed", "1"]
    out, report = tmp_path / "study", tmp_path / "report"
    assert study.main(["run", str(grid), "--out", str(out), "--only", "arm-held"]) == 0
    assert sorted(i[i.index("emergence") + 2] for i in invocations(out)) == ["^13\\.", "^9\\."]   # "--data" {head}
    grid_raw = json.loads(grid.read_text())
    grid_raw["report"] = {"metrics": ["val_score"], "labels": {"held": "head held"}}
    grid.write_text(json.dumps(grid_raw))
    assert study.main(["report", str(out), "--out", str(report), "--grid", str(grid)]) == 0
    assert "head held = `held` (`--init emergence --data '{head}' --sleep 0`)" in (report / "README.md").read_text()


def test_shipped_grid_head_variables_name_the_models_classifier():
    """Each model's {head} in a shipped grid matches exactly its classifier's weight and bias (the last Linear)."""
    import importlib.util
    import re

    spec = importlib.util.spec_from_file_location("_vision_run_heads", ROOT / "examples" / "vision" / "run.py")
    vision = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vision)
    checked = 0
    for path in sorted((ROOT / "benchmarks" / "grids").glob("*.json")):
        grid = study.load_grid(path, {"data_root": "/data"})
        for axis, per_value in grid.value_vars.items():
            for value, variables in per_value.items():
                if "head" not in variables:
                    continue
                cell = next(c for c in grid.cells() if c.values[axis] == value)
                args = vision.parse_args(cell.args + ["--output_dir", "/tmp/unused", "--init", "kaiming"])
                model = vision.build_model(args, [str(i) for i in range(10)], [0.5] * 3, [0.25] * 3)
                last = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1]
                held = [n for n, _ in model.named_parameters() if re.search(variables["head"], n)]
                assert held == [f"{last}.weight", f"{last}.bias"], (path.name, value, held)
                checked += 1
    assert checked >= 4


def test_shipped_grids_load_and_expand():
    grids = sorted((ROOT / "benchmarks" / "grids").glob("*.json"))
    assert grids, "benchmarks/grids/*.json missing"
    for path in grids:
        grid = study.load_grid(path, {"data_root": "/data"})
        cells = grid.cells()
        assert cells and len({c.name for c in cells}) == len(cells)
        assert all("{" not in a for c in cells for a in c.args), path


def test_shipped_grid_cells_parse_with_their_script():
    """Every cell of every shipped grid is accepted by the example script's own argument parser."""
    import importlib.util

    for path in sorted((ROOT / "benchmarks" / "grids").glob("*.json")):
        grid = study.load_grid(path, {"data_root": "/data"})
        script = ROOT / grid.script
        if not script.is_file():
            pytest.skip(f"{grid.script} not present")
        spec = importlib.util.spec_from_file_location(f"_grid_script_{path.stem}", script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for cell in grid.cells():
            module.parse_args(cell.args + ["--output_dir", "/tmp/unused"])


HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, str(os.getpid()).encode())
print("held", flush=True)
time.sleep(60)
"""


def test_parallel_workers_share_a_study_folder(tmp_path):
    """A run locked by a live worker is skipped; a lock file left by a dead worker is locked again."""
    import subprocess

    grid, out = write_grid(tmp_path), tmp_path / "study"
    busy, stale = out / "arm-base__seed-1", out / "arm-base__seed-2"
    busy.mkdir(parents=True)
    stale.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(busy / study.LOCK)], stdout=subprocess.PIPE, text=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        assert holder.stdout.readline().strip() == "held"
        (stale / study.LOCK).write_text(str(dead.pid))
        assert study.is_held(busy) and not study.is_held(stale)
        assert study.main(["run", str(grid), "--out", str(out), "--only", "arm-base"]) == 0
        report = tmp_path / "report"
        assert study.main(["report", str(out), "--out", str(report), "--grid", str(grid)]) == 0
        assert "| `arm-base` | running | 1 |" in (report / "README.md").read_text()
    finally:
        holder.kill()
        holder.wait()
    assert not (busy / study.RESULT).exists() and (busy / study.LOCK).exists()
    assert study.is_finished(stale) and not (stale / study.LOCK).exists()
    assert study.is_finished(out / "arm-base__seed-3")
    assert not study.is_held(busy)                                          # its holder died: free again
    # --max_runs counts runs executed, not runs skipped because another worker holds them
    assert study.main(["run", str(grid), "--out", str(out), "--max_runs", "1"]) == 0
    assert len([p for p in out.glob("*/study_result.json")]) == 3


def test_paired_differences_match_a_hand_computed_t_interval(tmp_path):
    """Δ = arm - baseline per seed, mean ± t(0.975, n-1) * sd / sqrt(n); the interval decides the reading."""
    import paired

    assert paired.t_quantile(0.975, 4) == pytest.approx(2.7764451, abs=1e-6)     # tables: 2.776
    assert paired.t_quantile(0.975, 9) == pytest.approx(2.2621572, abs=1e-6)     # 2.262
    assert paired.t_quantile(0.975, 3) == pytest.approx(3.1824463, abs=1e-6)     # 3.182
    assert paired.t_cdf(0.0, 3) == pytest.approx(0.5)

    def run(arm, seed, v, status="ok"):
        return {"name": f"arm-{arm}__seed-{seed}", "axes": ["arm", "seed"], "cell": {"arm": arm, "seed": str(seed)},
                "status": status, "all_results": {"val": v}, "curve": []}

    base = {1: 10.0, 2: 11.0, 3: 12.0, 4: 10.5}
    noisy = {1: 10.4, 2: 10.9, 3: 12.9, 4: 10.4}
    shifted = {1: 11.0, 2: 12.1, 3: 12.9, 4: 11.6}
    results = ([run("base", s, v) for s, v in base.items()] + [run("noisy", s, v) for s, v in noisy.items()]
               + [run("shifted", s, v) for s, v in shifted.items() if s != 4] + [run("shifted", 4, 0.0, "failed")])
    agg = study.aggregate(results, {"metrics": ["val"], "baseline": "base"})
    rows = {r["cell"]["arm"]: r for r in agg["paired"]}
    d = np.array([noisy[s] - base[s] for s in (1, 2, 3, 4)])
    half = 3.1824463 * d.std(ddof=1) / np.sqrt(4)                               # 4 pairs: 3 degrees of freedom
    assert rows["noisy"]["n"] == 4 and rows["noisy"]["mean"] == pytest.approx(d.mean())
    assert rows["noisy"]["low"] == pytest.approx(d.mean() - half, abs=1e-6)
    assert rows["noisy"]["verdict"] == "no detectable effect"
    assert rows["shifted"]["n"] == 3 and rows["shifted"]["seeds"] == ["1", "2", "3"]   # the failed seed is not paired
    assert rows["shifted"]["verdict"] == "better" and rows["shifted"]["low"] > 0
    text = study.paired_table(agg)
    assert "no detectable effect" in text and "| shifted | final: val | 3 |" in text


def test_contrasts_pair_two_arms_against_each_other():
    def run(arm, seed, v):
        return {"name": f"arm-{arm}__seed-{seed}", "axes": ["arm", "seed"], "cell": {"arm": arm, "seed": str(seed)},
                "status": "ok", "all_results": {"val": v}, "curve": []}

    emergence, control = {1: 11.0, 2: 12.5, 3: 11.9}, {1: 11.2, 2: 12.0, 3: 11.1, 4: 13.0}
    results = ([run("base", s, 10.0) for s in (1, 2, 3, 4)] + [run("emergence", s, v) for s, v in emergence.items()]
               + [run("control", s, v) for s, v in control.items()])
    agg = study.aggregate(results, {"metrics": ["val"], "baseline": "base", "contrasts": [["emergence", "control"]],
                                    "labels": {"control": "per-layer LR"}})
    [row] = agg["contrasts"]
    d = np.array([emergence[s] - control[s] for s in (1, 2, 3)])                 # seed 4: control only, not paired
    half = 4.3026527 * d.std(ddof=1) / np.sqrt(3)
    assert row["n"] == 3 and row["baseline"] == "control" and row["cell"]["arm"] == "emergence"
    assert row["mean"] == pytest.approx(d.mean()) and row["high"] == pytest.approx(d.mean() + half, abs=1e-6)
    assert len(agg["paired"]) == 2                                               # vs base: unchanged
    verdict = {r["cell"]["arm"]: r["verdict"] for r in agg["paired"]}
    assert verdict == {"emergence": "no detectable effect", "control": "better"}   # 11.1-13.0 vs 10.0 over 4 seeds
    assert f"| emergence | per-layer LR | final: val | 3 | {d.mean():+.2f} [" in study.paired_table(agg, "contrasts")
    agg = study.aggregate(results, {"metrics": ["val"], "baseline": "base", "lower_is_better": ["val"]})
    assert {r["cell"]["arm"]: r["verdict"] for r in agg["paired"]}["control"] == "worse"   # read lower-is-better


def test_report_lists_unfinished_runs_and_milestones(tmp_path):
    grid = write_grid(tmp_path, report={"metrics": ["val_score"], "baseline": "base",
                                        "milestones": {"metric": "validation_score", "values": [5, 15]}})
    out = tmp_path / "study"
    assert study.main(["run", str(grid), "--out", str(out), "--only", "seed-(1|2)"]) == 0
    report = tmp_path / "report"
    assert study.main(["report", str(out), "--out", str(report), "--grid", str(grid)]) == 0
    text = (report / "README.md").read_text()
    assert "## Not finished (2 runs, not averaged)" in text
    assert "| `arm-base` | not run | 3 |" in text and "| `arm-better` | not run | 3 |" in text
    # base: score = 10 + 0.37 * (seed % 7) reaches 5 at step 20 (score * 20/30 >= 5) and 15 never; better reaches 15 at 30
    assert "| base | 20 ± 0 (2/2 reached) | – (0/2 reached) |" in text
    assert "| better | 10 ± 0 (2/2 reached) | 30 ± 0 (2/2 reached) |" in text
    assert (report / "forest_all.png").stat().st_size > 0
    summary = json.loads((report / "summary.json").read_text())
    assert [u["name"] for u in summary["unfinished"]] == ["arm-base__seed-3", "arm-better__seed-3"]
    assert json.loads((out / "arm-base__seed-1" / study.RESULT).read_text())["code_version"]["commit"]


def test_labels_name_arms_and_a_hand_written_reading_survives_a_new_report(tmp_path, capsys):
    grid = write_grid(tmp_path, report={"metrics": ["val_score"], "baseline": "base", "curve_metrics": ["validation_score"],
                                        "labels": {"better": "emergence alpha 1.5"}, "contrasts": [["base", "better"]]})
    out, report = tmp_path / "study", tmp_path / "report"
    assert study.main(["run", str(grid), "--out", str(out), "--only", "seed-(1|2)"]) == 0
    assert study.main(["report", str(out), "--out", str(report), "--grid", str(grid)]) == 0
    text = (report / "README.md").read_text()
    assert "| emergence alpha 1.5 | 2 |" in text and "\n| better |" not in text        # tables show the label
    assert "emergence alpha 1.5 = `better` (`--gain 2 --init emergence --alpha 1.5`)" in text
    assert "## Contrasts" in text and "| base | emergence alpha 1.5 | final: val_score | 2 | -10.00 [" in text
    reading = "## Reading\n\nWritten by hand: alpha 1.5 wins here.\n\n```\n## not a heading\n```"
    (report / "README.md").write_text(text + "\n" + reading + "\n\n## Commands of mine\ndropped\n")
    assert study.main(["run", str(grid), "--out", str(out)]) == 0                  # seed 3 too: the numbers change
    capsys.readouterr()
    assert study.main(["report", str(out), "--out", str(report), "--grid", str(grid)]) == 0
    assert "kept the hand-written '## Reading' section" in capsys.readouterr().out
    again = (report / "README.md").read_text()
    assert "| emergence alpha 1.5 | 3 |" in again and again.count(reading) == 1 and again.rstrip().endswith("```")
    assert "## Not finished" not in again and "dropped" not in again


@pytest.mark.parametrize("labels, expected", [
    ({"nope": "x"}, "report.labels / contrasts: 'nope' is not a value of the arm axis 'arm' (base, better)"),
    ({"base": ""}, "non-empty label"),
    (["base"], "non-empty label"),
    ({"contrasts": [["better", "worse"]]}, "report.labels / contrasts: 'worse' is not a value of the arm axis"),
    ({"contrasts": [["better", "better"]]}, "a list of [arm, other arm] pairs"),
    ({"contrasts": ["better"]}, "a list of [arm, other arm] pairs"),
    ({"contrasts": [], "lower_is_better": "fit_epoch"}, '"report.lower_is_better": a list of metric names'),
    ({"contrasts": [], "curve_groups": {"lr": ["base_lr*"]}}, "report.curve_groups: 'base_lr*' matches no value of the arm axis 'arm' (base, better)"),
    ({"contrasts": [], "curve_groups": {"a/b": ["better"]}}, '"report.curve_groups": an object of group name'),
    ({"contrasts": [], "curve_groups": {"lr": []}}, '"report.curve_groups": an object of group name'),
])
def test_bad_labels_are_one_line(tmp_path, capsys, labels, expected):
    grid = write_grid(tmp_path, report=labels if "contrasts" in labels else {"labels": labels})
    assert study.main(["run", str(grid), "--out", str(tmp_path / "o"), "--dry_run"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and expected in err


def test_stop_at_starts_only_runs_expected_to_finish_and_cuts_off_the_one_in_flight(tmp_path):
    import time

    grid, out = write_grid(tmp_path), tmp_path / "study"
    soon = str(time.time() + 60)
    assert study.main(["run", str(grid), "--out", str(out), "--stop_at", soon, "--expected_run_s", "600"]) == 0
    assert invocations(out) == []                                          # 600 s expected, 60 s left: none started
    assert study.main(["run", str(grid), "--out", str(out), "--only", "arm-base__seed-1$"]) == 0
    # a finished seed of the cell replaces the guess with its measured wall time (well under a second here)
    assert study.main(["run", str(grid), "--out", str(out), "--only", "arm-base", "--stop_at", soon,
                       "--expected_run_s", "600"]) == 0
    assert sorted(p.parent.name for p in out.glob("*/study_result.json")) == [f"arm-base__seed-{s}" for s in (1, 2, 3)]
    # another arm: the same cell but for seed and arm has a measured time, so it runs too
    assert study.main(["run", str(grid), "--out", str(out), "--only", "arm-better__seed-1$", "--stop_at", soon,
                       "--expected_run_s", "600"]) == 0 and len(invocations(out)) == 4
    assert study.expected_wall_time(out, study.Cell("x", {"arm": "new", "seed": "9"}, []), ["seed"], 123.0) == 123.0
    grid = write_grid(tmp_path, common_args=["--sleep", "30"])
    t0 = time.monotonic()
    assert study.main(["run", str(grid), "--out", str(out), "--only", "arm-better__seed-2$",
                       "--stop_at", str(time.time() + 2)]) == 1
    res = json.loads((out / "arm-better__seed-2" / study.RESULT).read_text())
    assert res["status"] == "timeout" and time.monotonic() - t0 < 20 and not study.is_finished(out / "arm-better__seed-2")


def test_a_folder_that_cannot_be_locked_is_one_line(tmp_path, capsys, monkeypatch):
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    grid, out = write_grid(tmp_path), tmp_path / "study"
    assert study.main(["run", str(grid), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {out / 'arm-base__seed-1' / study.LOCK}: cannot lock it ({os.strerror(errno.ENOLCK)}); "
                   "put the study folder on a local filesystem") and invocations(out) == []


def test_of_workers_claiming_one_run_at_once_exactly_one_wins(tmp_path):
    """Eight processes claim the same run at the same moment, over a lock file left by a dead worker: one gets it
    (pid-file locks let two takers of a stale lock both run the cell)."""
    import subprocess

    run_dir = tmp_path / "study" / "arm-base__seed-1"
    run_dir.mkdir(parents=True)
    (run_dir / study.LOCK).write_text("999999999")
    claim = ("import sys, time; sys.path.insert(0, sys.argv[1]); import study; from pathlib import Path\n"
             "time.sleep(max(0.0, float(sys.argv[3]) - time.time()))\n"
             "print(study.acquire(Path(sys.argv[2])), flush=True); sys.stdin.read()")   # holds until all answered
    at = str(time.time() + 3)
    procs = [subprocess.Popen([sys.executable, "-c", claim, str(ROOT / "benchmarks"), str(run_dir), at],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(8)]
    got = [p.stdout.readline().strip() for p in procs]
    for p in procs:
        p.communicate(timeout=60)
    assert sorted(got) == ["False"] * 7 + ["True"]
    assert study.acquire(run_dir) and (run_dir / study.LOCK).read_text() == str(os.getpid())
    study.release(run_dir)
    assert not (run_dir / study.LOCK).exists() and not study.is_held(run_dir)

def test_gpu_study_chunks_resume_from_the_carried_results(tmp_path):
    """Two device commands: the first packs its finished runs into one file; the second starts from that file
    unpacked into a fresh folder (a fresh machine), reruns none of them and packs the whole grid."""
    import subprocess
    import tarfile

    grid = write_grid(tmp_path)

    def chunk(results: Path, out: Path, only: str = "") -> subprocess.CompletedProcess:
        env = dict(os.environ, RESULTS=str(results), OUT=str(out), CACHE_WAIT="0", PYTHON=sys.executable,
                   EXPECTED_RUN_S="0")
        return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_study.sh"), str(grid), "2", "120", only],
                              env=env, capture_output=True, text=True, timeout=300)

    first = chunk(tmp_path / "m1", tmp_path / "out1", "seed-1$")
    assert first.returncode == 0, first.stderr
    assert "2 of 6 cells of fake finished" in first.stdout
    packed = tmp_path / "out1" / "fake_results.tar.gz"
    with tarfile.open(packed) as tar:
        names = sorted(tar.getnames())
    assert names == ["fake/arm-base__seed-1/study_result.json", "fake/arm-better__seed-1/study_result.json",
                     "fake/study_invocations.jsonl"]
    assert sorted(os.listdir(tmp_path / "out1")) == ["fake_log.txt", "fake_results.tar.gz", "fake_status.txt"]
    fresh = tmp_path / "m2"                                   # the next command: a bare machine plus the carried files
    fresh.mkdir()
    with tarfile.open(packed) as tar:
        tar.extractall(fresh, filter="data")
    second = chunk(fresh, tmp_path / "out2")
    assert second.returncode == 0, second.stderr
    assert "6 of 6 cells of fake finished" in second.stdout
    ran = [a[a.index("--seed") + 1] for a in invocations(fresh / "fake")]
    assert sorted(ran) == ["2", "2", "3", "3"]                # the carried seed-1 runs were not redone
    with tarfile.open(tmp_path / "out2" / "fake_results.tar.gz") as tar:
        assert len([n for n in tar.getnames() if n.endswith("study_result.json")]) == 6
    dry = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_study.sh"), str(grid), "3", "60"], capture_output=True,
                         text=True, timeout=120, env=dict(os.environ, DRY_RUN="1", RESULTS=str(fresh), PYTHON=sys.executable,
                                                          OUT=str(tmp_path / "out3")))
    assert dry.returncode == 0 and "plan: 3 workers" in dry.stdout and "6 finished, 0 to run" in dry.stdout
    bad = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_study.sh"), str(grid), "two"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: WORKERS must be a whole number, got 'two'"


def test_mean_curve_keeps_the_runs_that_got_further():
    xs, mean, std, count = study.mean_curve([{1: 0.2, 2: 0.4, 3: 0.6}, {1: 0.4, 2: 0.6}, {1: 0.3, 2: 0.5, 3: 0.8, 4: 0.9}])
    assert xs.tolist() == [1, 2, 3, 4] and count.tolist() == [3, 3, 2, 1]
    assert mean == pytest.approx([0.3, 0.5, 0.7, 0.9]) and std == pytest.approx([0.1, 0.1, 0.1414214, 0.0])


def test_a_select_row_that_picks_the_baseline_is_not_paired_with_itself():
    def run(arm, seed, v):
        return {"name": f"arm-{arm}__seed-{seed}", "axes": ["arm", "seed"], "cell": {"arm": arm, "seed": str(seed)},
                "status": "ok", "all_results": {"val": v}, "curve": []}

    spec = {"metrics": ["val"], "baseline": "base", "select": [{"name": "tuned", "arms": "base*", "by": "val"}]}
    results = [run("base", s, 10.0 + s) for s in (1, 2, 3)] + [run("base_warmup", s, 9.0 + s) for s in (1, 2, 3)]
    agg = study.aggregate(results, spec)
    assert [s["cell"]["arm"] for s in agg["selected"]] == ["tuned (= base)"]
    assert [r["cell"]["arm"] for r in agg["paired"]] == ["base_warmup"]
    results = [run("base", s, 10.0 + s) for s in (1, 2, 3)] + [run("base_warmup", s, 11.0 + s) for s in (1, 2, 3)]
    agg = study.aggregate(results, spec)
    assert [r["cell"]["arm"] for r in agg["paired"]] == ["base_warmup", "tuned (= base_warmup)"]
    assert agg["paired"][1]["mean"] == pytest.approx(1.0)
    agg = study.aggregate(results, {**spec, "labels": {"base_warmup": "warm-up (100)", "base": "Kaiming"}})
    assert [study.shown(agg, "arm", r["cell"]["arm"]) for r in agg["paired"]] == ["warm-up (100)", "tuned (= warm-up (100))"]
    assert study.shown(agg, "arm", "tuned (= nothing)") == "tuned (= nothing)"       # not a select row: left as is
    agg = study.aggregate([run("base", s, 10.0 + s) for s in (1, 2, 3)], spec)     # only one candidate has run
    assert agg["selected"] == [] and agg["paired"] == []


def test_paired_verdict_reads_a_loss_in_its_own_direction():
    from paired import paired_difference

    base = {"1": 1.0, "2": 1.1, "3": 0.9}
    lower = {s: v - 0.1 for s, v in base.items()}
    assert paired_difference(lower, base).verdict == "worse"                       # accuracy-like: lower is worse
    assert paired_difference(lower, base, lower_is_better=True).verdict == "better"  # a loss: lower is better


def test_curve_groups_split_a_crowded_figure_into_distinctly_coloured_ones(tmp_path):
    arms = ["default", "base", "emergence_a1.2", "emergence_a1.2_lr0.2", "base_lr0.1", "base_lr0.2", "base_noclip"]
    groups = {"alpha": ["default", "emergence_a?.?"], "lr": ["base_lr*", "*_lr*", "emergence_a1.2"],
              "warmup": ["base_warmup*"], "again": ["emergence_a1.2"]}
    assert study.curve_groups(arms, groups, "base") == {                     # baseline first, then grid order
        "alpha": ["base", "default", "emergence_a1.2"],
        "lr": ["base", "emergence_a1.2", "emergence_a1.2_lr0.2", "base_lr0.1", "base_lr0.2"],
        "other": ["base", "base_noclip"]}   # no figure of the baseline alone or of arms already shown; the rest: other
    assert study.curve_groups(arms, None, "base") == {"": arms}
    colors = study.arm_colors([f"arm{i}" for i in range(20)], "arm3")
    assert colors["arm3"] == "black" and len(set(colors.values())) == 20     # tab10 alone repeats after 10
    grid = write_grid(tmp_path, report={"metrics": ["val_score"], "baseline": "base", "curve_metrics": ["validation_score"],
                                        "curve_groups": {"gain": ["better"]}})
    out, report = tmp_path / "study", tmp_path / "report"
    assert study.main(["run", str(grid), "--out", str(out)]) == 0
    assert study.main(["report", str(out), "--out", str(report), "--grid", str(grid)]) == 0
    assert (report / "curves_gain.png").stat().st_size > 0 and not (report / "curves_all.png").exists()
    assert "![curves_gain.png](curves_gain.png)" in (report / "README.md").read_text()
