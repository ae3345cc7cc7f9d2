#!/usr/bin/env python
"""Study runner: drive an example script over a grid of settings, one subprocess per cell, and aggregate.

    python benchmarks/study.py run benchmarks/grids/multi30k.json --out runs/multi30k [--data_root DIR]
        [--launcher "python" | "accelerate launch"] [--only REGEX] [--max_runs N] [--dry_run] [--timeout S]
    python benchmarks/study.py report runs/multi30k --out docs/results/multi30k
    python benchmarks/study.py list benchmarks/grids/multi30k.json      # the cells and their status

**Grid file** (JSON)::

    {
      "name": "multi30k",                                    # optional (default: the file name)
      "description": "...",                                  # optional, copied into the report
      "script": "examples/translation/run.py",               # relative to the repository root
      "vars": {"data_root": "../shared/data"},               # {name} substitutions in every argument
      "requires": ["{data_root}/multi30k/train.de.gz"],      # optional: paths that must exist before a run
      "common_args": ["--train_file", "{data_root}/multi30k/train", "--max_train_steps", "2000"],
      "axes": {                                              # the grid is the cross product, in this order
        "optimizer": {"adamw": ["--optimizer", "adamw"], "sgd": ["--optimizer", "sgd", "--learning_rate", "0.1"]},
        "arm": {"default": ["--init", "default"], "emergence_a1.2": ["--init", "emergence", "--alpha", "1.2"]},
        "seed": [1, 2, 3],                                   # a list of values v means ["--<axis>", "v"]
        "model": {"cnn": {"args": ["--model_type", "cnn"], "vars": {"head": "^16\\."}}}  # a value can set {head}
      },
      "exclude": [{"optimizer": "sgd", "arm": "warmup_*"}],  # optional: cells matching every key (fnmatch) are dropped
      "report": {                                            # optional
        "seed_axis": "seed", "arm_axis": "arm", "baseline": "xavier",
        "metrics": ["validation_bleu", "test_bleu"],         # final metrics (all_results.json or the final record)
        "first_epoch_metrics": ["validation_bleu"],          # taken from the first evaluation logged with epoch >= 1
        "curve_metrics": ["validation_bleu", "validation_loss"], "curve_x": "step",
        "select": [{"name": "warmup_tuned", "arms": ["xavier", "warmup_*"], "by": "validation_bleu", "mode": "max"}],
        "milestones": {"metric": "validation_bleu", "values": [10, 20, 30], "x": "step"},  # steps to reach each value
        "labels": {"emergence_a1.2": "emergence alpha 1.2"},  # optional: how arms are shown in tables and plots
        "contrasts": [["emergence_a1.5", "per_layer_lr_a1.5"]],  # optional: arms paired against each other
        "curve_groups": {"lr": ["base_lr*"]},                # optional: one curves figure per group (+ baseline)
        "lower_is_better": ["fit_epoch"]                     # optional: read as better when lower (besides *loss*)
      }
    }

Variables are replaced in ``common_args``, axis arguments and ``requires`` (``{data_root}``); the command line
``--data_root DIR`` and ``--set NAME=VALUE`` override the grid's ``vars``. Relative paths in the grid are relative
to the repository root (the subprocess's working directory); ``--data_root`` given on the command line is made
absolute. ``{out}`` is the study folder and ``{run_dir}`` the run's folder. An axis value written as
``{"args": [...], "vars": {...}}`` sets those variables for the cells that have it (e.g. each model names its own
classifier for an arm's ``--unscaled {head}``); every cell that uses such a variable must have a value that sets it,
and it fills arguments only (``script``, ``requires`` and ``env`` are the same for every cell).

**Runs.** A cell's run name is ``axis-value`` joined by ``__`` (e.g. ``optimizer-sgd__arm-default__seed-1``); it
runs as ``LAUNCHER SCRIPT COMMON_ARGS AXIS_ARGS... --output_dir OUT/RUN`` (plus ``--resume_from_checkpoint latest``
when ``OUT/RUN/checkpoints/latest`` exists, i.e. it was cut short after a checkpoint), output appended to
``OUT/RUN/study_log.txt``. When it ends, ``OUT/RUN/study_result.json`` is written atomically: the cell, arguments,
exact command, exit code, status, wall time, ``all_results.json`` and the ``metrics.jsonl`` records. A run with a
result of status ``ok`` or ``diverged`` (exit code 3: the script stopped on a non-finite loss) is skipped next time;
``failed`` and ``timeout`` runs are retried. Ctrl-C / SIGTERM stops the current run's process group and writes no
result for it, so the study can be stopped at any time and restarted with the same command. Several workers may
share one study folder (e.g. side by side on one GPU, with or without disjoint ``--only``): each run is claimed with a
``flock`` on ``OUT/RUN/.study_lock`` (the file holds the worker's pid), runs claimed by a live worker are skipped, and
a dead worker's claim ends with its process. ``--max_runs`` counts the runs this worker executes.

**Deadlines** (device-sized chunks, ``benchmarks/gpu_study.sh``). With ``--stop_at T`` (Unix seconds) a worker
starts a run only if it is expected to end by T: its expected wall time is the longest one recorded among finished
runs of the same cell but for the seed axis (or of one cut off: a lower bound), else among those of the same cell
but for the seed and arm axes, else ``--expected_run_s``; a run
that is started gets at most the time left before T (it is then recorded as ``timeout`` and retried next time). Runs whose result folder came from an
earlier chunk (only ``study_result.json`` carried back) count as finished.

**Report.** Runs are grouped by every axis except the seed axis; each group gives n (finished runs with the
metric; diverged and failed runs are counted separately) and the mean ± sample std (ddof=1) of each metric over
seeds. First-epoch metrics are ``all_results["epoch1_<m>"]`` when the script records them (vision:
``epoch1_accuracy``), else the metric of the first evaluation logged with ``epoch >= 1``. A ``select`` entry adds,
per group of the other axes, a row that repeats the arm (among those matching ``arms``) with the best mean ``by``
metric: the tuned warm-up control, chosen on validation data (only where at least two candidates finished, and only
among the candidates with the most finished runs: an arm still short of seeds is not picked on fewer of them). With a ``baseline`` arm, every other arm (and every
selected row) gets its paired difference against the baseline over the seeds both finished, with a 95% Student-t
interval and the reading "no detectable effect" when it covers 0 (``paired.py``), drawn as one forest plot per group
of the other axes. ``milestones`` gives, per group, the mean step at which each value was first reached and by how
many runs. Cells of the grid without an ``ok`` result are listed by name and state, never averaged. Plots: each curve metric against ``curve_x`` with a
±std band per arm, one PNG per group of the remaining axes; E / E_max at step 0 against alpha when runs logged
``emergence_normalised`` (vision ``--measure_emergence``); active fraction per layer when ``all_results`` holds a
list ``active_fraction_per_layer``. ``curve_groups`` splits a crowded curves figure into one PNG per named group
(``curves_<values>_<group>.png``: the baseline, in black, and the arms matching the group's globs; arms no group
matches are drawn in ``other``). ``labels`` names arms in tables and plots (the report lists each label's
arm and arguments). ``contrasts`` pairs two arms against each other the same way (e.g. emergence against its
per-layer-LR control), in a table of their own. A report folder's README is rewritten, except its ``## Reading...`` sections (written by hand),
which are kept at its end.
"""

from __future__ import annotations

import argparse
import fnmatch
import itertools
import json
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]


def _load_atomic_write():
    """The library's one atomic-write helper, loaded from its file: importing the ``hf_emergence`` package would
    import torch, and the runner (several workers per device command) should start in well under a second."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_hf_emergence_atomic", ROOT / "hf_emergence" / "atomic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.atomic_write


atomic_write = _load_atomic_write()

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paired import paired_difference  # noqa: E402
RESULT = "study_result.json"
LOG = "study_log.txt"
INVOCATIONS = "study_invocations.jsonl"
DONE = ("ok", "diverged")
NAME_RX = re.compile(r"^[A-Za-z0-9._+-]+$")
EXIT_DIVERGED = 3


class GridError(Exception):
    """A bad grid file: reported as one line naming the file and what was expected."""


# ------------------------------------------------------------------------------------------------- grids
@dataclass
class Cell:
    name: str
    values: dict[str, str]                 # axis -> value name
    args: list[str]                        # script arguments, without --output_dir


@dataclass
class Grid:
    path: Path
    name: str
    script: str
    description: str = ""
    common_args: list[str] = field(default_factory=list)
    axes: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    exclude: list[dict[str, str]] = field(default_factory=list)
    vars: dict[str, str] = field(default_factory=dict)
    requires: list[str] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    value_vars: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)   # axis -> value -> {name: value}

    def cells(self) -> list[Cell]:
        names = list(self.axes)
        out = []
        for combo in itertools.product(*(list(self.axes[a].items()) for a in names)):
            values = {a: v for a, (v, _) in zip(names, combo)}
            if any(all(fnmatch.fnmatchcase(values.get(k, ""), str(p)) for k, p in rule.items()) for rule in self.exclude):
                continue
            cell_vars = {k: x for a, v in values.items() for k, x in self.value_vars.get(a, {}).get(v, {}).items()}
            args = [_fill_cell_vars(x, cell_vars) for x in list(self.common_args) + [x for _, a in combo for x in a]]
            out.append(Cell("__".join(f"{a}-{v}" for a, v in values.items()), values, args))
        return out


_CELL_VAR = "\x00{}\x00"   # a variable set by an axis value, held in the arguments until the cell is known
_CELL_VAR_RX = re.compile("\x00([^\x00]*)\x00")


def _fill_cell_vars(arg: str, cell_vars: dict[str, str]) -> str:
    return _CELL_VAR_RX.sub(lambda m: cell_vars.get(m.group(1), m.group(0)), arg)


def shown_args(args: Sequence[str]) -> str:
    """``args`` as a shell line, a variable still to be set by the cell's axis values shown as ``{name}``."""
    return _CELL_VAR_RX.sub(r"{\1}", shlex.join(args))


def report_axis(report: dict[str, Any], key: str, axes: Sequence[str]) -> Optional[str]:
    """``report["seed_axis"]`` / ``report["arm_axis"]`` as given, else the axis named ``seed`` / ``arm`` if there is one."""
    name = key.removesuffix("_axis")
    return report.get(key, name if name in axes else None)


def load_grid(path: str | os.PathLike, overrides: Optional[dict[str, str]] = None) -> Grid:
    """Read and validate a grid file; any problem is a GridError naming the file and what was expected."""
    p = Path(path)
    where = str(p)

    def fail(msg: str) -> GridError:
        return GridError(f"{where}: {msg}")

    try:
        raw = json.loads(p.read_text())
    except FileNotFoundError:
        raise fail("no such grid file (expected a JSON file such as benchmarks/grids/multi30k.json)") from None
    except json.JSONDecodeError as err:
        raise fail(f"not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    if not isinstance(raw, dict):
        raise fail(f"expected a JSON object with keys script, axes[, common_args, vars, ...], got {type(raw).__name__}")
    known = {"name", "description", "script", "vars", "requires", "common_args", "axes", "exclude", "report", "env"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise fail(f"unknown key(s) {', '.join(unknown)}; expected some of: {', '.join(sorted(known))}")
    if not isinstance(raw.get("script"), str) or not raw["script"]:
        raise fail('expected "script": a path such as "examples/translation/run.py"')
    variables = raw.get("vars", {})
    if not isinstance(variables, dict) or not all(isinstance(v, (str, int, float)) for v in variables.values()):
        raise fail('expected "vars" to map names to strings, e.g. {"data_root": "../shared/data"}')
    variables = {k: str(v) for k, v in variables.items()} | dict(overrides or {})
    value_vars = _value_vars(raw.get("axes"), variables, fail)
    deferred = {k for per_value in value_vars.values() for vv in per_value.values() for k in vv}

    def subst(s: Any, what: str, per_cell: bool = True) -> str:
        """``s`` with ``{name}`` filled from vars; a name an axis value sets is held for the cell (args only)."""
        if not isinstance(s, (str, int, float)) or isinstance(s, bool):
            raise fail(f"{what}: expected a string argument, got {json.dumps(s)}")
        s = str(s)
        try:
            return s.format_map(_Vars(variables, deferred if per_cell else set()))
        except KeyError as err:
            if err.args[0] in deferred:
                raise fail(f"{what}: {s!r} uses {{{err.args[0]}}}, which an axis value sets; {what} is the same for "
                           "every cell, so expected a name from vars (per-cell variables fill arguments only)") from None
            raise fail(f"{what}: {s!r} uses {{{err.args[0]}}}, which is not in vars ({', '.join(sorted(variables)) or 'none'}) "
                       "nor given with --set") from None
        except (ValueError, IndexError) as err:
            raise fail(f"{what}: {s!r} is not a valid {{name}} template ({err})") from None

    def arg_list(value: Any, what: str) -> list[str]:
        if not isinstance(value, list):
            raise fail(f"{what}: expected a list of argument strings, got {json.dumps(value)[:60]}")
        return [subst(x, what) for x in value]

    common_args = arg_list(raw.get("common_args", []), "common_args")
    axes_raw = raw.get("axes")
    if not isinstance(axes_raw, dict) or not axes_raw:
        raise fail('expected "axes": an object of axis name -> {value name: [args]} or [values], e.g. {"seed": [1, 2, 3]}')
    axes: dict[str, dict[str, list[str]]] = {}
    for axis, spec in axes_raw.items():
        if not NAME_RX.match(axis):
            raise fail(f"axis name {axis!r}: expected letters, digits, '.', '_', '+' or '-'")
        if isinstance(spec, list):
            if not spec or not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in spec):
                raise fail(f"axis {axis!r}: expected a non-empty list of values (numbers or strings)")
            values = {str(v): [f"--{axis}", subst(v, f"axis {axis!r}")] for v in spec}
        elif isinstance(spec, dict) and spec:
            values = {str(k): arg_list(v["args"] if isinstance(v, dict) else v, f"axis {axis!r} value {k!r}")
                      for k, v in spec.items()}
        else:
            raise fail(f"axis {axis!r}: expected a non-empty object {{value name: [args]}} or a list of values")
        for v in values:
            if not NAME_RX.match(v):
                raise fail(f"axis {axis!r} value {v!r}: expected letters, digits, '.', '_', '+' or '-' (it names a folder)")
        axes[axis] = values
    exclude = raw.get("exclude", [])
    if not isinstance(exclude, list) or not all(isinstance(r, dict) and r and set(r) <= set(axes) for r in exclude):
        raise fail(f'expected "exclude": a list of objects keyed by axis names ({", ".join(axes)}) with fnmatch patterns')
    requires = [subst(x, "requires", per_cell=False) for x in raw.get("requires", [])] if isinstance(raw.get("requires", []), list) else None
    if requires is None:
        raise fail('expected "requires": a list of paths')
    report = raw.get("report", {})
    if not isinstance(report, dict):
        raise fail('expected "report": an object (metrics, curve_metrics, seed_axis, ...)')
    for key in ("seed_axis", "arm_axis"):
        if key in report and report[key] not in axes:
            raise fail(f"report.{key} {report[key]!r} is not an axis ({', '.join(axes)})")
    for i, sel in enumerate(report.get("select", [])):
        globs = sel.get("arms") if isinstance(sel, dict) else None
        if not (isinstance(sel, dict) and {"name", "arms", "by"} <= set(sel) and sel.get("mode", "max") in ("max", "min")
                and (isinstance(globs, str) or (isinstance(globs, list) and globs and all(isinstance(x, str) for x in globs)))):
            raise fail(f'report.select[{i}]: expected {{"name": ..., "arms": "glob" or ["glob", ...], "by": "metric", '
                       '"mode": "max"|"min"}')
    lower = report.get("lower_is_better", [])
    if not (isinstance(lower, list) and all(isinstance(m, str) for m in lower)):
        raise fail('expected "report.lower_is_better": a list of metric names (e.g. ["fit_epoch"])')
    labels = report.get("labels", {})
    if not (isinstance(labels, dict) and all(isinstance(v, str) and v for v in labels.values())):
        raise fail('expected "report.labels": an object of arm value -> non-empty label')
    arm_axis = report_axis(report, "arm_axis", axes)
    contrasts = report.get("contrasts", [])
    if not (isinstance(contrasts, list) and all(isinstance(c, list) and len(c) == 2 and c[0] != c[1] for c in contrasts)):
        raise fail('expected "report.contrasts": a list of [arm, other arm] pairs')
    unknown = [k for k in list(labels) + [a for c in contrasts for a in c]
               if arm_axis is None or k not in axes[arm_axis]]
    if unknown:
        raise fail(f"report.labels / contrasts: {unknown[0]!r} is not a value of the arm axis {arm_axis!r}"
                   + (f" ({', '.join(axes[arm_axis])})" if arm_axis else ""))
    groups = report.get("curve_groups", {})
    if not (isinstance(groups, dict) and all(re.fullmatch(r"[A-Za-z0-9_.-]+", str(k)) and isinstance(v, list) and v
                                             and all(isinstance(g, str) for g in v) for k, v in groups.items())):
        raise fail('expected "report.curve_groups": an object of group name ([A-Za-z0-9_.-]) -> ["arm glob", ...]')
    idle = [g for v in groups.values() for g in v
            if arm_axis is None or not any(fnmatch.fnmatchcase(a, g) for a in axes[arm_axis])]
    if idle:
        raise fail(f"report.curve_groups: {idle[0]!r} matches no value of the arm axis {arm_axis!r}"
                   + (f" ({', '.join(axes[arm_axis])})" if arm_axis else ""))
    env = raw.get("env", {})
    if not isinstance(env, dict):
        raise fail('expected "env": an object of environment variables')
    grid = Grid(path=p, name=str(raw.get("name") or p.stem), script=subst(raw["script"], "script", per_cell=False),
                description=str(raw.get("description", "")), common_args=common_args, axes=axes, exclude=exclude,
                vars=variables, requires=requires, report=report, env={k: subst(v, f"env {k}", per_cell=False) for k, v in env.items()},
                value_vars=value_vars)
    cells = grid.cells()
    if not cells:
        raise fail("the exclude rules leave no cell to run")
    for cell in cells:
        unset = next((m.group(1) for a in cell.args for m in _CELL_VAR_RX.finditer(a)), None)
        if unset is not None:
            setters = [f"{a} {v}" for a, per_value in value_vars.items() for v, vv in per_value.items() if unset in vv]
            raise fail(f"cell {cell.name}: uses {{{unset}}}, which only {', '.join(setters)} set(s); expected every "
                       "cell that uses it to have one of those values (or an exclude rule)")
    return grid


def _value_vars(axes_raw: Any, variables: dict[str, str], fail) -> dict[str, dict[str, dict[str, str]]]:
    """The ``vars`` of axis values written as ``{"args": [...], "vars": {name: value}}``: per axis, per value."""
    out: dict[str, dict[str, dict[str, str]]] = {}
    for axis, spec in (axes_raw.items() if isinstance(axes_raw, dict) else ()):
        for value, v in (spec.items() if isinstance(spec, dict) else ()):
            if not isinstance(v, dict):
                continue
            vv = v.get("vars", {})
            if set(v) - {"args", "vars"} or "args" not in v or not (
                    isinstance(vv, dict) and all(isinstance(x, str) for x in vv.values())):
                raise fail(f'axis {axis!r} value {value!r}: expected [args] or {{"args": [args], "vars": '
                           '{"name": "value"}}')
            clash = sorted(set(vv) & set(variables))
            if clash:
                raise fail(f"axis {axis!r} value {value!r}: sets {{{clash[0]}}}, which vars (or --set) sets for every "
                           "cell; expected one place per variable")
            if vv:
                out.setdefault(axis, {})[str(value)] = dict(vv)
    return out


class _Vars(dict):
    """format_map mapping that keeps run-time placeholders ({out}, {run_dir}) and the variables set by axis values
    (``deferred``) for later."""

    def __init__(self, variables: dict[str, str], deferred: set[str] = frozenset()):
        super().__init__(variables)
        self.deferred = deferred

    def __missing__(self, key: str) -> str:
        if key in ("out", "run_dir"):
            return "{" + key + "}"
        if key in self.deferred:
            return _CELL_VAR.format(key)
        raise KeyError(key)


# ------------------------------------------------------------------------------------------------ running
def launcher_argv(launcher: str) -> list[str]:
    argv = shlex.split(launcher)
    if not argv:
        raise SystemExit("error: --launcher is empty (expected e.g. \"python\" or \"accelerate launch\")")
    if argv[0] in ("python", "python3"):
        argv[0] = sys.executable  # the interpreter running the study (its virtual environment)
    return argv


def run_command(grid: Grid, cell: Cell, out: Path, launcher: list[str]) -> list[str]:
    run_dir = out / cell.name
    args = [a.replace("{out}", str(out)).replace("{run_dir}", str(run_dir)) for a in cell.args]
    cmd = launcher + [grid.script] + args + ["--output_dir", str(run_dir)]
    if (run_dir / "checkpoints" / "latest").is_file():
        cmd += ["--resume_from_checkpoint", "latest"]
    return cmd


def read_result(run_dir: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads((run_dir / RESULT).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def is_finished(run_dir: Path) -> bool:
    res = read_result(run_dir)
    return res is not None and res.get("status") in DONE


def read_curve(path: Path) -> list[dict[str, Any]]:
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill
    return records


class Interrupted(Exception):
    pass


def _raise_interrupt(signum, frame):  # noqa: ARG001
    raise Interrupted(signal.Signals(signum).name)


def execute(grid: Grid, cell: Cell, out: Path, launcher: list[str], timeout: Optional[float]) -> dict[str, Any]:
    """Run one cell to completion and write its result atomically (not when interrupted)."""
    run_dir = out / cell.name
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = run_command(grid, cell, out, launcher)
    resumed = "--resume_from_checkpoint" in cmd[len(cmd) - 2:]
    env = dict(os.environ, PYTHONUNBUFFERED="1", **grid.env)
    started = datetime.now(timezone.utc)
    t0 = time.monotonic()
    status = None
    with open(run_dir / LOG, "a") as log:
        log.write(f"\n===== {started.isoformat(timespec='seconds')} cwd={ROOT}\n$ {shlex.join(cmd)}\n")
        log.flush()
        try:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        except OSError as err:
            raise GridError(f"cannot start {cmd[0]!r} ({err.strerror}): check --launcher") from None
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop(proc)
            code, status = proc.returncode, "timeout"
        except BaseException:
            _stop(proc)
            raise
    wall = time.monotonic() - t0
    try:
        all_results = json.loads((run_dir / "all_results.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        all_results = None
    if status is None:
        status = ("ok" if all_results is not None else "failed") if code == 0 else \
            "diverged" if code == EXIT_DIVERGED else "failed"
    tail = (run_dir / LOG).read_text(errors="replace").splitlines()[-20:]
    result = {
        "name": cell.name, "grid": grid.name, "grid_file": str(grid.path), "cell": cell.values, "axes": list(grid.axes),
        "axis_values": {a: list(v) for a, v in grid.axes.items()},
        "script": grid.script, "args": cell.args, "command": shlex.join(cmd), "argv": cmd, "cwd": str(ROOT),
        "resumed": resumed, "exit_code": code, "status": status, "wall_time_s": wall,
        "started_utc": started.isoformat(timespec="seconds"),
        "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "all_results": all_results, "curve": read_curve(run_dir / "metrics.jsonl"), "log_tail": tail,
        "code_version": code_version(),
    }
    atomic_write(run_dir / RESULT, json.dumps(result, indent=1))
    return result


def code_version() -> dict[str, Any]:
    """The git commit the run's code came from, and whether the working tree had uncommitted changes."""
    def git(*argv: str) -> Optional[str]:
        try:
            return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the run's process group, SIGKILL it after 30 s."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


LOCK = ".study_lock"
_HELD: dict[Path, int] = {}                # lock path -> the open, flock'ed descriptor of this process


def acquire(run_dir: Path) -> bool:
    """Claim a run for this process: an exclusive ``flock`` on ``run_dir/.study_lock`` (which also holds our pid, for
    people); False if another process holds it.

    Lets several ``study.py run`` workers share one study folder (even with the same --only): each run is done once.
    The kernel drops a dead worker's lock with its process, so a lock file left behind is simply locked again, and
    of several workers taking it at once exactly one wins. The lock is held until ``release`` (or the worker's end).
    """
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK
    if lock in _HELD:
        return True
    while True:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError as err:             # e.g. a network filesystem without locks
            os.close(fd)
            raise GridError(f"{lock}: cannot lock it ({err.strerror}); put the study folder on a local filesystem") from None
        try:
            current = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if not current:                    # its holder released and removed it after our open: lock the new file
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        _HELD[lock] = fd
        return True


def is_held(run_dir: Path) -> bool:
    """Whether some process holds the run's lock (a lock file of a dead worker is not held)."""
    import fcntl

    lock = run_dir / LOCK
    if lock in _HELD:
        return True
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def release(run_dir: Path) -> None:
    """Remove the run's lock file while still holding it (a worker that opened it meanwhile retries), then unlock."""
    lock = run_dir / LOCK
    fd = _HELD.pop(lock, None)
    if fd is None:
        return
    try:
        lock.unlink(missing_ok=True)
    finally:
        os.close(fd)


def cmd_run(args: argparse.Namespace) -> int:
    grid = load_grid(args.grid, var_overrides(args))
    out = Path(args.out).resolve()
    launcher = launcher_argv(args.launcher)
    cells = [c for c in grid.cells() if not args.only or re.search(args.only, c.name)]
    if not cells:
        raise GridError(f"{args.grid}: --only {args.only!r} matches none of the {len(grid.cells())} runs")
    pending = [c for c in cells if not is_finished(out / c.name)]
    finished = len(cells) - len(pending)
    seed_axis, arm_axis = report_axis(grid.report, "seed_axis", grid.axes), report_axis(grid.report, "arm_axis", grid.axes)
    if args.max_runs is not None and args.dry_run:
        pending = pending[: args.max_runs]
    if args.dry_run:
        print(f"# {grid.name}: {len(cells)} runs selected, {finished} finished, {len(pending)} to run; "
              f"working directory {ROOT}")
        for c in cells:
            if is_finished(out / c.name):
                print(f"# done: {c.name}")
        for c in pending:
            print(shlex.join(run_command(grid, c, out, launcher)))
        return 0
    missing = [r for r in grid.requires if not (Path(r) if os.path.isabs(r) else ROOT / r).exists()]
    if missing:
        raise GridError(f"{args.grid}: required path {missing[0]} does not exist (set --data_root, or prepare the data as "
                        "the grid's description says)")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / INVOCATIONS, "a") as f:
        f.write(json.dumps({"utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cwd": os.getcwd(),
                            "command": shlex.join([sys.executable, *sys.argv])}) + "\n")
    old = {s: signal.signal(s, _raise_interrupt) for s in (signal.SIGTERM,)}
    counts: dict[str, int] = {}
    try:
        for i, c in enumerate(pending, 1):
            if args.max_runs is not None and sum(counts.values()) >= args.max_runs:
                break
            timeout = args.timeout
            if args.stop_at is not None:
                left = args.stop_at - time.time()
                need = expected_wall_time(out, c, [seed_axis, arm_axis], args.expected_run_s)
                if left < need:
                    print(f"[{i}/{len(pending)}] {c.name}: {left:.0f} s left before --stop_at, expected {need:.0f} s; "
                          "not started", flush=True)
                    continue
                timeout = left if timeout is None else min(timeout, left)
            if not acquire(out / c.name):
                print(f"[{i}/{len(pending)}] {c.name}: running in another worker; skipped", flush=True)
                continue
            try:
                if is_finished(out / c.name):  # finished by another worker meanwhile
                    continue
                print(f"[{i}/{len(pending)}] {c.name} ...", flush=True)
                res = execute(grid, c, out, launcher, timeout)
            finally:
                release(out / c.name)
            counts[res["status"]] = counts.get(res["status"], 0) + 1
            summary = {k: v for k, v in (res["all_results"] or {}).items() if isinstance(v, (int, float))}
            print(f"[{i}/{len(pending)}] {c.name}: {res['status']} (exit {res['exit_code']}, {res['wall_time_s']:.0f} s) "
                  + " ".join(f"{k}={v:.4g}" for k, v in list(summary.items())[:6]), flush=True)
    except (KeyboardInterrupt, Interrupted) as err:
        print(f"interrupted ({err or 'SIGINT'}): finished runs are kept; run the same command to continue", file=sys.stderr)
        return 130
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    print(f"{grid.name}: " + (", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "nothing to run")
          + f"; results in {out}")
    return 0 if not counts.get("failed") and not counts.get("timeout") else 1


def expected_wall_time(out: Path, cell: Cell, ignore: Sequence[Optional[str]], default: float) -> float:
    """The longest wall time of a finished run of the same cell but for the seed (carried results included; a run
    cut off by a deadline counts as a lower bound), else of the same cell but for the seed and the arm, else
    ``default``: a deadline-bound worker starts a run only when this much time is left, so a cell longer than a
    whole chunk is not started again and again."""
    results = [r for r in load_results(out) if r.get("status") in ("ok", "timeout")]
    for k in range(1, len(ignore) + 1):
        skip = set(ignore[:k])
        same = {a: v for a, v in cell.values.items() if a not in skip}
        times = [r.get("wall_time_s") or 0.0 for r in results if {a: r["cell"].get(a) for a in same} == same]
        if times:
            return max(times)
    return default


def cmd_list(args: argparse.Namespace) -> int:
    grid = load_grid(args.grid, var_overrides(args))
    out = Path(args.out).resolve() if args.out else None
    for c in grid.cells():
        res = read_result(out / c.name) if out else None
        print(f"{(res or {}).get('status', '-'):9s} {c.name}")
    return 0


def var_overrides(args: argparse.Namespace) -> dict[str, str]:
    out = {}
    for item in args.set or []:
        if "=" not in item:
            raise GridError(f"--set {item!r}: expected NAME=VALUE")
        k, v = item.split("=", 1)
        out[k] = v
    if args.data_root:
        out["data_root"] = os.path.abspath(args.data_root)
    return out


# ------------------------------------------------------------------------------------------------ report
def numeric(d: Optional[dict]) -> dict[str, float]:
    return {k: float(v) for k, v in (d or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


def final_metrics(res: dict[str, Any]) -> dict[str, float]:
    """all_results.json merged over the final metrics.jsonl record (all_results wins)."""
    final = next((r for r in reversed(res.get("curve") or []) if r.get("final")), {})
    return {**numeric(final), **numeric(res.get("all_results"))}


def first_epoch_metrics(res: dict[str, Any], names: Sequence[str]) -> dict[str, float]:
    out = {}
    ar = numeric(res.get("all_results"))
    for m in names:
        if f"epoch1_{m}" in ar:
            out[m] = ar[f"epoch1_{m}"]
            continue
        short = m.replace("validation_", "")
        if f"epoch1_{short}" in ar:
            out[m] = ar[f"epoch1_{short}"]
            continue
        rec = next((r for r in res.get("curve") or [] if not r.get("final") and (r.get("epoch") or 0) >= 1
                    and isinstance(r.get(m), (int, float))), None)
        if rec is not None:
            out[m] = float(rec[m])
    return out


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; nan for fewer than 2 values)."""
    mean = statistics.fmean(values) if values else math.nan
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return mean, std


def load_results(folder: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted(folder.glob(f"*/{RESULT}")):
        try:
            out.append(json.loads(path.read_text()))
        except json.JSONDecodeError:
            print(f"warning: {path} is not valid JSON; skipped", file=sys.stderr)
    return out


def value_order(results: list[dict[str, Any]], axes: Sequence[str]) -> dict[str, list[str]]:
    """Each axis's values in grid order (as recorded with the runs), then any others in order of appearance."""
    out = {}
    for a in axes:
        recorded = [v for r in results for v in (r.get("axis_values") or {}).get(a, [])]
        out[a] = list(dict.fromkeys(recorded + [r["cell"].get(a, "") for r in results]))
    return out


def aggregate(results: list[dict[str, Any]], report: dict[str, Any]) -> dict[str, Any]:
    """Group runs by every axis but the seed axis; mean/std of final and first-epoch metrics per group."""
    if not results:
        raise GridError("no study_result.json found (run `study.py run` first)")
    axes = results[0]["axes"]
    seed_axis = report_axis(report, "seed_axis", axes)
    group_axes = [a for a in axes if a != seed_axis]
    finals = [final_metrics(r) for r in results]
    metrics = report.get("metrics") or sorted({k for r in results for k in numeric(r.get("all_results"))})
    first_names = report.get("first_epoch_metrics", [])
    groups: dict[tuple, dict[str, Any]] = {}
    for res, fin in zip(results, finals):
        key = tuple(res["cell"].get(a, "") for a in group_axes)
        g = groups.setdefault(key, {"cell": dict(zip(group_axes, key)), "runs": [], "status": {}, "values": {}, "first": {},
                                    "by_seed": {}, "first_by_seed": {}, "milestones": {}})
        g["runs"].append(res["name"])
        g["status"][res["status"]] = g["status"].get(res["status"], 0) + 1
        if res["status"] != "ok":
            continue
        seed = res["cell"].get(seed_axis, res["name"]) if seed_axis else res["name"]
        for m in metrics:
            if m in fin:
                g["values"].setdefault(m, []).append(fin[m])
                g["by_seed"].setdefault(m, {})[seed] = fin[m]
        for m, v in first_epoch_metrics(res, first_names).items():
            g["first"].setdefault(m, []).append(v)
            g["first_by_seed"].setdefault(m, {})[seed] = v
        for label, x in milestone_steps(res, report.get("milestones")).items():
            g["milestones"].setdefault(label, []).append(x)
    for g in groups.values():
        g["stats"] = {m: dict(zip(("mean", "std"), mean_std(v)), n=len(v)) for m, v in g["values"].items()}
        g["first_stats"] = {m: dict(zip(("mean", "std"), mean_std(v)), n=len(v)) for m, v in g["first"].items()}
    # order groups by the axes' value order in the grid (first appearance in the results)
    order = value_order(results, group_axes)
    rows = sorted(groups.values(), key=lambda g: tuple(order[a].index(g["cell"][a]) for a in group_axes))
    selected = []
    arm_axis = report_axis(report, "arm_axis", group_axes)
    for sel in report.get("select", []) if arm_axis else []:
        others = [a for a in group_axes if a != arm_axis]
        for key in dict.fromkeys(tuple(g["cell"][a] for a in others) for g in rows):
            cands = [g for g in rows if tuple(g["cell"][a] for a in others) == key
                     and any(fnmatch.fnmatchcase(g["cell"][arm_axis], glob) for glob in
                             ([sel["arms"]] if isinstance(sel["arms"], str) else sel["arms"]))
                     and sel["by"] in g["stats"]]
            most = max((g["stats"][sel["by"]]["n"] for g in cands), default=0)
            cands = [g for g in cands if g["stats"][sel["by"]]["n"] == most]   # never picked on fewer seeds
            if len(cands) < 2:                  # one finished candidate is no choice: no row claims it was tuned
                continue
            pick = (max if sel.get("mode", "max") == "max" else min)(cands, key=lambda g: g["stats"][sel["by"]]["mean"])
            selected.append({**pick, "cell": {**pick["cell"], arm_axis: f"{sel['name']} (= {pick['cell'][arm_axis]})"},
                             "selected_by": sel["by"], "select": sel["name"], "picked": pick["cell"][arm_axis]})
    # a selected row that picked the baseline itself pairs with itself (a difference of exactly 0): not listed
    chosen = [g for g in selected if g["picked"] != report.get("baseline")]
    lower = report.get("lower_is_better", [])
    paired = paired_rows(rows + chosen, arm_axis, report.get("baseline"), group_axes, lower)
    contrasts = [r for arm, other in report.get("contrasts", []) if arm_axis
                 for r in paired_rows([g for g in rows if g["cell"][arm_axis] in (arm, other)], arm_axis, other,
                                      group_axes, lower)]
    return {"group_axes": group_axes, "seed_axis": seed_axis, "arm_axis": arm_axis, "metrics": metrics,
            "first_epoch_metrics": first_names, "rows": rows, "selected": selected, "paired": paired,
            "contrasts": contrasts,
            "milestones": report.get("milestones"), "labels": report.get("labels", {}),
            "picks": {g["cell"][arm_axis]: (g["select"], g["picked"]) for g in selected}}


def shown(agg: dict[str, Any], axis: str, value: str) -> str:
    """How an axis value is shown in tables and plots: its ``report.labels`` entry for the arm axis (also inside a
    select row's ``name (= arm)``), else the value itself."""
    labels = agg.get("labels") or {}
    if axis != agg.get("arm_axis") or not labels:
        return value
    if value in agg.get("picks", {}):
        name, picked = agg["picks"][value]
        return f"{name} (= {labels.get(picked, picked)})"
    return labels.get(value, value)


def milestone_steps(res: dict[str, Any], spec: Optional[dict[str, Any]]) -> dict[str, Optional[float]]:
    """For ``{"metric": m, "values": [v1, ...], "x": "step", "mode": "max"}``: the first logged x at which the run's
    metric reached each value (None when it never did), keyed ``"m >= v"`` (``<=`` for mode "min")."""
    if not spec:
        return {}
    metric, x_key, higher = spec["metric"], spec.get("x", "step"), spec.get("mode", "max") == "max"
    curve = [r for r in res.get("curve") or [] if not r.get("final") and isinstance(r.get(metric), (int, float))
             and x_key in r]
    out = {}
    for v in spec["values"]:
        hit = next((r[x_key] for r in curve if (r[metric] >= v if higher else r[metric] <= v)), None)
        out[f"{metric} {'>=' if higher else '<='} {v:g}"] = hit
    return out


def paired_rows(rows: list[dict[str, Any]], arm_axis: Optional[str], baseline: Optional[str],
                group_axes: Sequence[str], lower_is_better: Sequence[str] = ()) -> list[dict[str, Any]]:
    """One row per (group, metric): the arm's paired difference against the baseline arm of the same other axes,
    over the seeds both finished (final metrics and first-epoch metrics). A metric reads "better" when it is lower
    if its name holds "loss" or it is listed in ``lower_is_better`` (e.g. ``fit_epoch``), else when it is higher."""
    if not (arm_axis and baseline):
        return []
    others = [a for a in group_axes if a != arm_axis]
    base = {tuple(g["cell"][a] for a in others): g for g in rows if g["cell"][arm_axis] == baseline}
    out = []
    for g in rows:
        ref = base.get(tuple(g["cell"][a] for a in others))
        if ref is None or ref is g:
            continue
        for kind, key in (("final", "by_seed"), ("epoch 1", "first_by_seed")):
            for m, values in g[key].items():
                diff = paired_difference(values, ref[key].get(m, {}), lower_is_better="loss" in m or m in lower_is_better)
                if diff is not None:
                    out.append({"cell": g["cell"], "baseline": baseline, "metric": m, "kind": kind, **diff.to_dict()})
    return out


def fmt_ms(stat: Optional[dict[str, float]], digits: int = 2) -> str:
    if not stat or stat["n"] == 0:
        return "–"
    if stat["n"] == 1 or math.isnan(stat["std"]):
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _digits(metric: str) -> int:
    return 4 if ("accuracy" in metric or "loss" in metric) else 2


def markdown_table(agg: dict[str, Any], baseline: Optional[str] = None) -> str:
    axes, metrics, first = agg["group_axes"], agg["metrics"], agg["first_epoch_metrics"]
    cols = axes + ["n"] + [f"epoch 1: {m}" for m in first] + list(metrics)
    primary = metrics[0] if metrics else None
    arm_axis = agg["arm_axis"]
    if baseline and primary and arm_axis:
        cols.append(f"Δ {primary} vs {shown(agg, arm_axis, baseline)}")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    base_means = {}
    if baseline and primary and arm_axis:
        for g in agg["rows"]:
            if g["cell"][arm_axis] == baseline and primary in g["stats"]:
                base_means[tuple(v for a, v in g["cell"].items() if a != arm_axis)] = g["stats"][primary]["mean"]
    for g in agg["rows"] + agg["selected"]:
        n_ok = g["status"].get("ok", 0)
        extra = [f"{c} {k}" for k, c in sorted(g["status"].items()) if k != "ok"]
        n = f"{n_ok}" + (f" ({', '.join(extra)})" if extra else "")
        cells = [shown(agg, a, g["cell"][a]) for a in axes] + [n]
        cells += [fmt_ms(g["first_stats"].get(m), _digits(m)) for m in first]
        cells += [fmt_ms(g["stats"].get(m), _digits(m)) for m in metrics]
        if baseline and primary and arm_axis:
            b = base_means.get(tuple(v for a, v in g["cell"].items() if a != arm_axis))
            s = g["stats"].get(primary)
            cells.append(f"{s['mean'] - b:+.{_digits(primary)}f}" if (b is not None and s and s["n"]) else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(agg: dict[str, Any], key: str = "paired") -> str:
    """Markdown: every arm's paired difference against the baseline (``key="contrasts"``: against the other arm of
    its contrast, named in the ``vs`` column), with its 95% interval and reading."""
    axes = agg["group_axes"]
    vs = ["vs"] if key == "contrasts" else []
    lines = ["| " + " | ".join(axes + vs + ["metric", "pairs", "Δ mean [95% CI]", "reading"]) + " |",
             "|" + "---|" * (len(axes) + len(vs) + 4)]
    for r in agg[key]:
        d = _digits(r["metric"])
        interval = (f"{r['mean']:+.{d}f} [{r['low']:+.{d}f}, {r['high']:+.{d}f}]" if r["n"] > 1
                    else f"{r['mean']:+.{d}f}")
        cells = [shown(agg, a, r["cell"][a]) for a in axes] + [shown(agg, agg["arm_axis"], r["baseline"])] * len(vs)
        cells += [f"{r['kind']}: {r['metric']}", str(r["n"]), interval, r["verdict"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def milestone_table(agg: dict[str, Any]) -> str:
    """Markdown: per group, the mean ± std of the step at which each milestone was first reached (and by how many)."""
    labels = list(dict.fromkeys(label for g in agg["rows"] for label in g["milestones"]))
    if not labels:
        return ""
    axes = agg["group_axes"]
    lines = ["| " + " | ".join(axes + labels) + " |", "|" + "---|" * (len(axes) + len(labels))]
    for g in agg["rows"]:
        cells = [shown(agg, a, g["cell"][a]) for a in axes]
        for label in labels:
            xs = g["milestones"].get(label, [])
            hit = [x for x in xs if x is not None]
            stat = {"n": len(hit), **dict(zip(("mean", "std"), mean_std(hit)))}
            cells.append(f"{fmt_ms(stat, 0)} ({len(hit)}/{len(xs)} reached)" if xs else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def forest_plots(agg: dict[str, Any], out: Path) -> list[str]:
    """One PNG per (group of the other axes, metric): each arm's paired difference with its 95% interval."""
    rows = [r for r in agg["paired"] if r["n"] > 1]
    if not rows:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arm_axis = agg["arm_axis"]
    others = [a for a in agg["group_axes"] if a != arm_axis]
    written = []
    for panel in dict.fromkeys(tuple(r["cell"][a] for a in others) for r in rows):
        mine = [r for r in rows if tuple(r["cell"][a] for a in others) == panel]
        series = list(dict.fromkeys(f"{r['kind']}: {r['metric']}" for r in mine))
        fig, axs = plt.subplots(1, len(series), figsize=(4.5 * len(series), 0.45 * max(4, len(mine) / len(series)) + 1.2),
                                squeeze=False)
        for ax, s in zip(axs[0], series):
            sel = [r for r in mine if f"{r['kind']}: {r['metric']}" == s]
            ys = list(range(len(sel)))[::-1]
            for y, r in zip(ys, sel):
                color = "tab:green" if r["verdict"] == "better" else "tab:red" if r["verdict"] == "worse" else "tab:gray"
                ax.errorbar([r["mean"]], [y], xerr=[[r["mean"] - r["low"]], [r["high"] - r["mean"]]], fmt="o",
                            color=color, capsize=3)
            ax.axvline(0.0, color="black", lw=0.8)
            ax.set_yticks(ys)
            ax.set_yticklabels([f"{shown(agg, arm_axis, r['cell'][arm_axis])} (n={r['n']})" for r in sel], fontsize=8)
            ax.set_xlabel(f"Δ {s} vs {shown(agg, arm_axis, sel[0].get('baseline', 'baseline'))}")
            ax.grid(axis="x", alpha=0.3)
        written.append(save_panel(fig, out, "forest", others, panel, "paired difference vs baseline, 95% CI"))
    return written


def save_panel(fig: Any, out: Path, prefix: str, axes: Sequence[str], panel: Sequence[str], what: str,
               axes_shown: Optional[int] = None) -> str:
    """Title a figure by its panel's axis values (the first ``axes_shown`` of them; the rest, e.g. a curve group, only
    name the file), save it as ``<prefix>_<values>.png`` under ``out``, close it."""
    import matplotlib.pyplot as plt

    title = ", ".join(f"{a}={v}" for a, v in zip(axes, panel[:axes_shown])) or "all runs"
    fig.suptitle(f"{title}: {what}")
    fig.tight_layout()
    name = f"{prefix}_" + ("_".join(panel) or "all") + ".png"
    fig.savefig(out / name, dpi=100)
    plt.close(fig)
    return name


def unfinished(grid: Optional["Grid"], results: list[dict[str, Any]], folder: Path) -> list[tuple[str, str]]:
    """(run name, state) of every grid cell without an ``ok`` result: missing, running, failed, timeout, diverged."""
    by_name = {r["name"]: r["status"] for r in results}
    names = [c.name for c in grid.cells()] if grid is not None else list(by_name)
    out = []
    for name in names:
        state = by_name.get(name)
        if state == "ok":
            continue
        if state is None:
            state = "running" if is_held(folder / name) else "not run"
        out.append((name, state))
    return out


def unfinished_table(missing: list[tuple[str, str]], seed_axis: Optional[str]) -> str:
    """Markdown: the unfinished runs, one row per cell but for the seed and per state, listing the seeds."""
    rows: dict[tuple[str, str], list[str]] = {}
    prefix = f"{seed_axis}-" if seed_axis else None
    for name, state in missing:
        parts = name.split("__")
        seed = next((p[len(prefix):] for p in parts if prefix and p.startswith(prefix)), None)
        cell = "__".join(p for p in parts if not (prefix and p.startswith(prefix))) or name
        rows.setdefault((cell, state), []).append(seed if seed is not None else "")
    lines = [f"| runs | state | {seed_axis or 'seed'} |", "|---|---|---|"]
    lines += [f"| `{cell}` | {state} | {', '.join(seeds)} |" for (cell, state), seeds in rows.items()]
    return "\n".join(lines)


def _alpha_of(args: Sequence[str]) -> Optional[float]:
    if "--init" in args and args[args.index("--init") + 1] in ("xavier", "kaiming"):
        return 1.0
    if "--alpha" in args and "--per_layer_lr_from_plan" not in args:
        try:
            return float(args[args.index("--alpha") + 1])
        except (IndexError, ValueError):
            return None
    return None


def mean_curve(series: list[dict[float, float]]) -> tuple[Any, Any, Any, Any]:
    """Runs' curves ({x: value}) on the union of their x: (x, mean, std, count), mean and std over the runs that
    have a point there (std 0 where only one has). Runs that stop early (trained until fit) leave the later means
    to the runs still going, which ``count`` says."""
    import numpy as np

    xs = np.array(sorted(set().union(*series)), dtype=float)
    vals = np.array([[s.get(x, np.nan) for x in xs] for s in series], dtype=float)
    count = (~np.isnan(vals)).sum(0)
    mean = np.nanmean(vals, 0)
    std = np.zeros_like(mean)
    many = count > 1
    std[many] = np.nanstd(vals[:, many], 0, ddof=1)
    return xs, mean, std, count


def arm_colors(arms: Sequence[str], baseline: Optional[str] = None) -> dict[str, Any]:
    """A figure's colours: the baseline black, the other arms tab10 in order, then tab20's lighter tones (20 distinct)."""
    import matplotlib

    tab20 = matplotlib.colormaps["tab20"].colors
    palette = list(tab20[0::2]) + list(tab20[1::2])
    others = [a for a in arms if a != baseline]
    colors = {arm: palette[i % len(palette)] for i, arm in enumerate(others)}
    return colors | ({baseline: "black"} if baseline in arms else {})


def curve_groups(arms: Sequence[str], groups: Optional[dict[str, list[str]]], baseline: Optional[str]) -> dict[str, list[str]]:
    """``report.curve_groups`` (name -> arm globs) applied to the arms present: each group's figure shows the baseline,
    then its matching arms in grid order; a group that adds no arm an earlier one showed is not drawn, and arms no group
    matches go in a last group ``other``. Without groups, one figure of all arms (name "")."""
    if not groups:
        return {"": list(arms)}
    out: dict[str, list[str]] = {}
    seen = {baseline}
    for name, globs in groups.items():
        mine = [a for a in arms if a == baseline or any(fnmatch.fnmatchcase(a, g) for g in globs)]
        if set(mine) - seen:
            out[name] = sorted(mine, key=lambda a: a != baseline)
            seen |= set(mine)
    rest = [a for a in arms if a not in seen]
    if rest:
        out["other"] = ([baseline] if baseline in arms else []) + rest
    return out


def curve_figure(runs: list[dict[str, Any]], arms: Sequence[str], metrics: Sequence[str], x_key: str,
                 agg: dict[str, Any], colors: dict[str, Any]) -> Any:
    """One axes per metric: each arm's mean over its runs against ``x_key`` with a ±std band (``mean_curve``)."""
    import matplotlib.pyplot as plt

    arm_axis = agg["arm_axis"]
    fig, axs = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axs[0], metrics):
        for arm in arms:
            series = []
            for r in runs:
                if (r["cell"].get(arm_axis, "all") if arm_axis else "all") != arm:
                    continue
                pts = {rec[x_key]: rec[metric] for rec in r.get("curve") or []
                       if not rec.get("final") and isinstance(rec.get(metric), (int, float)) and x_key in rec}
                if pts:
                    series.append(pts)
            if not series:
                continue
            xs, mean, std, count = mean_curve(series)
            every = count == len(series)                   # solid where every seed has a point, dotted where some do
            some = count >= min(2, len(series))
            label = f"{shown(agg, arm_axis, arm) if arm_axis else arm} (n={len(series)})"
            color = colors.get(arm)
            ax.plot(xs[every], mean[every], marker=".", label=label, color=color)
            ax.plot(xs[some], mean[some], ":", color=color, label=None if every.any() else label)
            ax.fill_between(xs[some], (mean - std)[some], (mean + std)[some], color=color, alpha=0.2)
        ax.set_xlabel(x_key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axs[0][0].legend(fontsize=7)
    return fig


def plots(results: list[dict[str, Any]], agg: dict[str, Any], report: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []
    x_key = report.get("curve_x", "step")
    curve_metrics = report.get("curve_metrics") or sorted(
        {k for r in results for rec in r.get("curve") or [] if not rec.get("final")
         for k in rec if k.startswith("validation_") and isinstance(rec[k], (int, float))})
    arm_axis, seed_axis = agg["arm_axis"], agg["seed_axis"]
    panel_axes = [a for a in agg["group_axes"] if a != arm_axis]
    ok = [r for r in results if r["status"] == "ok"]
    what = f"mean ± std over {seed_axis or 'runs'}; dotted: only the runs that got that far"
    for panel in dict.fromkeys(tuple(r["cell"].get(a, "") for a in panel_axes) for r in ok):
        if not curve_metrics:
            break
        runs = [r for r in ok if tuple(r["cell"].get(a, "") for a in panel_axes) == panel]
        present = {r["cell"].get(arm_axis, "all") if arm_axis else "all" for r in runs}
        arms = [a for a in (value_order(runs, [arm_axis])[arm_axis] if arm_axis else ["all"]) if a in present]
        groups = curve_groups(arms, report.get("curve_groups"), report.get("baseline")) if arm_axis else {"": arms}
        for group, shown_arms in groups.items():
            fig = curve_figure(runs, shown_arms, curve_metrics, x_key, agg, arm_colors(shown_arms, report.get("baseline")))
            written.append(save_panel(fig, out, "curves", panel_axes, (*panel, group) if group else panel,
                                      f"{group + ': ' if group else ''}{what}", axes_shown=len(panel_axes)))

    # E / E_max at initialisation against alpha (runs that logged emergence_normalised at step 0).
    pts = []
    for r in ok:
        rec = next((c for c in r.get("curve") or [] if isinstance(c.get("emergence_normalised"), (int, float))), None)
        alpha = _alpha_of(r["args"])
        if rec is not None and alpha is not None:
            pts.append((tuple(r["cell"].get(a, "") for a in panel_axes), alpha, rec["emergence_normalised"]))
    if pts:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for panel in dict.fromkeys(p for p, _, _ in pts):
            by_alpha: dict[float, list[float]] = {}
            for p, a, e in pts:
                if p == panel:
                    by_alpha.setdefault(a, []).append(e)
            alphas = sorted(by_alpha)
            ax.errorbar(alphas, [np.mean(by_alpha[a]) for a in alphas],
                        yerr=[np.std(by_alpha[a], ddof=1) if len(by_alpha[a]) > 1 else 0 for a in alphas],
                        marker="o", capsize=3, label=",".join(panel) or "all")
        ax.set_xlabel("alpha")
        ax.set_ylabel("E / E_max at initialisation")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "E_vs_alpha.png", dpi=100)
        plt.close(fig)
        written.append("E_vs_alpha.png")

    prof = [(r, r["all_results"]["active_fraction_per_layer"]) for r in ok
            if isinstance((r.get("all_results") or {}).get("active_fraction_per_layer"), list)]
    if prof:
        fig, ax = plt.subplots(figsize=(6, 4))
        by_alpha: dict[Any, list[list[float]]] = {}
        for r, fr in prof:
            by_alpha.setdefault(_alpha_of(r["args"]), []).append(fr)
        for a, rows in sorted(by_alpha.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
            width = min(len(x) for x in rows)
            ax.plot(range(width), np.mean([x[:width] for x in rows], 0), marker=".", label=f"alpha={a}")
        ax.set_xlabel("layer (plan order)")
        ax.set_ylabel("active fraction")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "active_fraction.png", dpi=100)
        plt.close(fig)
        written.append("active_fraction.png")
    return written


def find_grid_file(recorded: str, name: str) -> Optional[Path]:
    """The grid file the runs name: as recorded, relative to the repository root, or benchmarks/grids/<name>.json."""
    for cand in (Path(recorded), ROOT / recorded, ROOT / "benchmarks" / "grids" / f"{name}.json"):
        if cand.is_file():
            return cand
    return None


def hand_written_sections(readme: Path) -> list[str]:
    """The lines of every ``## Reading...`` section (up to the next ``#``/``##`` heading) of an existing report
    README: written by hand, so a rewritten report keeps them (appended after its generated sections)."""
    if not readme.is_file():
        return []
    kept, keep, fence = [], False, False
    for line in readme.read_text().splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence and (line.startswith("# ") or line.startswith("## ")):
            keep = line.startswith("## Reading")
        if keep:
            kept.append(line)
    while kept and not kept[-1].strip():
        kept.pop()
    return kept


def cmd_report(args: argparse.Namespace) -> int:
    folder = Path(args.dir)
    results = load_results(folder)
    if not results:
        raise GridError(f"{folder}: no */{RESULT} found (expected the --out folder of `study.py run`)")
    grid_file = find_grid_file(results[0]["grid_file"], results[0]["grid"]) if not args.grid else Path(args.grid)
    grid = load_grid(grid_file) if grid_file is not None else None
    report = grid.report if grid is not None else {}
    agg = aggregate(results, report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figures = plots(results, agg, report, out)
    invocations = [json.loads(l)["command"] for l in (folder / INVOCATIONS).read_text().splitlines() if l.strip()] \
        if (folder / INVOCATIONS).is_file() else []
    status = {}
    for r in results:
        status[r["status"]] = status.get(r["status"], 0) + 1
    total_h = sum(r.get("wall_time_s") or 0 for r in results) / 3600
    lines = [f"# Study: {results[0]['grid']}", ""]
    if report.get("title"):
        lines[0] = f"# {report['title']}"
    desc = grid.description if grid is not None else ""
    if desc:
        lines += [desc, ""]
    lines += [f"{len(results)} runs ({', '.join(f'{n} {k}' for k, n in sorted(status.items()))}), {total_h:.2f} h of "
              f"run time, script `{results[0]['script']}`. Cells are grouped by {', '.join(agg['group_axes'])}; "
              f"values are mean ± sample std (ddof=1) over `{agg['seed_axis']}` with n the number of finished runs. "
              "First-epoch values come from the script's `epoch1_*` results or, failing that, from the first "
              "evaluation logged with epoch >= 1.", ""]
    if agg["selected"]:
        lines += ["Rows named `<select> (= arm)` repeat the arm with the best mean "
                  + ", ".join(sorted({s['selected_by'] for s in agg['selected']})) + " among its candidates "
                  "(selected on validation data, so its test numbers are not optimistic by selection on test).", ""]
    if agg["labels"] and grid is not None:
        lines += ["Arms as shown: " + "; ".join(f"{label} = `{arm}` (`{shown_args(grid.axes[agg['arm_axis']][arm])}`)"
                                                for arm, label in agg["labels"].items()) + ".", ""]
    lines += [markdown_table(agg, report.get("baseline")), ""]
    if agg["paired"]:
        lines += [f"## Paired differences vs {shown(agg, agg['arm_axis'], report.get('baseline'))}", "",
                  "Each arm minus the baseline on the same seeds (only seeds both finished): mean and 95% Student-t "
                  "interval; \"no detectable effect\" when the interval covers 0.", "", paired_table(agg), ""]
        figures += forest_plots(agg, out)
    if agg["contrasts"]:
        lines += ["## Contrasts", "", "Arms against each other (`report.contrasts`), paired by seed in the same way: "
                  "the first arm minus the `vs` arm.", "", paired_table(agg, "contrasts"), ""]
    milestones = milestone_table(agg)
    if milestones:
        lines += ["## Steps to reach", "", milestones, ""]
    missing = unfinished(grid, results, folder)
    if missing:
        lines += [f"## Not finished ({len(missing)} runs, not averaged)", "", unfinished_table(missing, agg["seed_axis"]), ""]
    for f in figures:
        lines += [f"![{f}]({f})", ""]
    lines += ["## Commands", "", "Study (as invoked):", "", "```"] + (invocations or ["(not recorded)"]) + ["```", "",
              "Report:", "", "```", shlex.join(["python", *sys.argv]) if args.argv is None else args.argv, "```", "",
              "<details><summary>Exact command of every run (working directory: the repository root)</summary>", "", "```"]
    lines += [f"{r['command']}" for r in sorted(results, key=lambda r: r["name"])]
    lines += ["```", "", "</details>", ""]
    kept = hand_written_sections(out / "README.md")
    if kept:
        lines += kept + [""]
        print(f"kept the hand-written '## Reading' section(s) of {out / 'README.md'}: check them against the new numbers")
    atomic_write(out / "README.md", "\n".join(lines))
    summary = {"group_axes": agg["group_axes"], "seed_axis": agg["seed_axis"],
               "rows": [{k: g[k] for k in ("cell", "runs", "status", "stats", "first_stats", "values", "first")}
                        for g in agg["rows"]],
               "selected": [{k: g[k] for k in ("cell", "stats", "first_stats", "selected_by")} for g in agg["selected"]],
               "paired": agg["paired"], "contrasts": agg["contrasts"], "unfinished": [{"name": n, "state": s} for n, s in missing],
               "milestones": {"spec": agg["milestones"], "rows": [{"cell": g["cell"], "steps": g["milestones"]}
                                                                   for g in agg["rows"]]}}
    atomic_write(out / "summary.json", json.dumps(summary, indent=1))
    print(f"wrote {out / 'README.md'}, summary.json" + (", " + ", ".join(figures) if figures else ""))
    return 0


# ------------------------------------------------------------------------------------------------ CLI
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the grid's cells that have no finished result")
    r.add_argument("grid")
    r.add_argument("--out", required=True, help="study folder: one sub-folder per run")
    r.add_argument("--launcher", default="python", help='"python" (this interpreter) or e.g. "accelerate launch"')
    r.add_argument("--only", default=None, help="regular expression: run only cells whose name matches")
    r.add_argument("--max_runs", type=int, default=None, help="run at most N cells this time")
    r.add_argument("--timeout", type=float, default=None, help="seconds per run (the run is recorded as timeout)")
    r.add_argument("--dry_run", action="store_true", help="print the exact commands that would run, run nothing")
    r.add_argument("--stop_at", type=float, default=None,
                   help="Unix time: start no run expected to end later, and cut a started run off there")
    r.add_argument("--expected_run_s", type=float, default=0.0,
                   help="with --stop_at: expected seconds per run until a run of the same cell has finished")
    r.add_argument("--data_root", default=None, help="substituted for {data_root} in the grid")
    r.add_argument("--set", action="append", metavar="NAME=VALUE", help="other {NAME} substitutions")
    ls = sub.add_parser("list", help="the grid's cells and, with --out, their status")
    ls.add_argument("grid")
    ls.add_argument("--out", default=None)
    ls.add_argument("--data_root", default=None)
    ls.add_argument("--set", action="append", metavar="NAME=VALUE")
    rep = sub.add_parser("report", help="aggregate a study folder into markdown, summary.json and PNG plots")
    rep.add_argument("dir")
    rep.add_argument("--out", required=True, help="folder for README.md, summary.json and the plots")
    rep.add_argument("--grid", default=None, help="grid file for the report settings (default: the one the runs name)")
    args = p.parse_args(argv)
    args.argv = None if argv is None else shlex.join(["python", "benchmarks/study.py", *argv])
    if getattr(args, "max_runs", None) is not None and args.max_runs < 0:
        p.error("--max_runs must be >= 0")
    if getattr(args, "expected_run_s", 0.0) < 0:
        p.error(f"--expected_run_s must be >= 0, got {args.expected_run_s}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        return {"run": cmd_run, "list": cmd_list, "report": cmd_report}[args.command](args)
    except GridError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into e.g. `head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
