"""Runs killed as a user's machine kills them, then resumed: the result is the uninterrupted run's, bit for bit.

* ``kill -9`` mid-epoch (translation, vision; dropout on in both), then ``--resume_from_checkpoint latest``;
  for translation the newest checkpoint is also truncated, so the resume falls back to the previous one.
* SIGTERM to ``accelerate launch`` with two processes: both stop at the same step with a checkpoint, no worker is
  left running, and resuming gives the uninterrupted two-process run. The workers wait at step 3 for the signal
  (``tests/stop_gate.py``), so a fast run cannot finish before the signal lands, however busy the machine; they log
  every 2 steps, and with several processes the stop request is agreed on only at logging steps, so both stop at 4.

The uninterrupted references run in-process; the killed runs are real subprocesses. One CPU thread everywhere.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"translation": ROOT / "examples" / "translation" / "run.py", "vision": ROOT / "examples" / "vision" / "run.py"}
TIMING = ("target_tokens_per_s", "tokens_per_s", "images_per_s", "data_wait_share", "elapsed_s")
# 200 pairs / 16 = 13 batches per epoch; a kill after the step-4 checkpoint lands inside the first epoch
TRANSLATION = ["--model_preset", "tiny", "--max_train_samples", "200", "--max_eval_samples", "16", "--vocab_size", "300",
               "--per_device_train_batch_size", "16", "--num_beams", "1", "--max_target_length", "24",
               "--config_overrides", "dropout=0.1,attention_dropout=0.1,activation_dropout=0.1",
               "--max_train_steps", "16", "--checkpointing_steps", "1", "--logging_steps", "1", "--no_progress_bar",
               "--num_threads", "1"]
VIT = ("hidden_size=16,num_hidden_layers=2,num_attention_heads=2,intermediate_size=32,patch_size=8,"
       "hidden_dropout_prob=0.1,attention_probs_dropout_prob=0.1")
# 96 images / 8 = 12 batches per epoch (one process)
VISION = ["--model_type", "vit", "--config_overrides", VIT, "--max_train_samples", "96", "--max_eval_samples", "24",
          "--per_device_train_batch_size", "8", "--max_train_steps", "16", "--checkpointing_steps", "1",
          "--logging_steps", "1", "--no_progress_bar", "--num_threads", "1"]
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("image_cache"))


def _flags(name: str, cache: str) -> list[str]:
    return TRANSLATION if name == "translation" else [*VISION, "--image_cache_dir", cache]


def _reference(name: str, argv: list[str]) -> None:
    threads = torch.get_num_threads()
    try:
        _load(f"{name}_kill_reference", SCRIPTS[name]).main(argv)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        torch.set_num_threads(threads)


def _latest_step(out: Path) -> int:
    try:
        return int((out / "checkpoints" / "latest").read_text().strip().split("_")[-1])
    except (FileNotFoundError, ValueError):
        return -1


def _kill_after(proc: subprocess.Popen, out: Path, step: int, sig: int = signal.SIGKILL, timeout: float = 240) -> int:
    """Send ``sig`` once the checkpoint of ``step`` (or a later one) is complete; returns the exit code."""
    deadline = time.monotonic() + timeout
    while _latest_step(out) < step:
        assert proc.poll() is None, f"the run ended (code {proc.returncode}) before step {step}"
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.005)
    proc.send_signal(sig)
    return proc.wait(timeout=120)


def _records(out: Path) -> list[dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def _assert_same_run(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    assert [k for k in wa if not torch.equal(wa[k], wb[k])] == []
    assert json.loads((a / "all_results.json").read_text()) == json.loads((b / "all_results.json").read_text())
    assert _records(a) == _records(b)           # every per-step loss, evaluation and the final record


@pytest.mark.slow
@pytest.mark.parametrize("name", ["translation", "vision"])
def test_kill_9_mid_epoch_then_resume_is_exact(name, tmp_path, cache):
    flags = _flags(name, cache)
    _reference(name, [*flags, "--output_dir", str(tmp_path / "reference")])
    out = tmp_path / "killed"
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen([sys.executable, str(SCRIPTS[name]), *flags, "--output_dir", str(out)], cwd=ROOT,
                                env=ENV, stdout=log, stderr=subprocess.STDOUT)
        assert _kill_after(proc, out, 4) == -signal.SIGKILL
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    killed_at = json.loads((latest / "train_state.json").read_text())
    assert killed_at["epoch"] == 0 and 0 < killed_at["batches_in_epoch"] < 12        # mid-epoch
    expected_from = latest
    if name == "translation":   # and the newest checkpoint is damaged: resume from the one before
        weights = latest / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        expected_from = sorted(p for p in (out / "checkpoints").glob("step_*") if not p.name.endswith(".tmp"))[-2]
    proc = subprocess.run([sys.executable, str(SCRIPTS[name]), *flags, "--output_dir", str(out),
                           "--resume_from_checkpoint", "latest"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {expected_from} at step {int(expected_from.name.split('_')[1])}" in proc.stderr
    if name == "translation":
        assert f"resuming from {expected_from} instead: {latest.name}: model.safetensors has" in proc.stderr
    _assert_same_run(tmp_path / "reference", out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(out: Path, cache: str, gate_at: Optional[int] = None) -> list[str]:
    """Vision on two CPU processes (gloo): 6 batches per process and epoch, 8 steps, logged every 2. With ``gate_at``,
    each worker holds at that step (its checkpoint written) until it is asked to stop (``tests/stop_gate.py``)."""
    script = [str(SCRIPTS["vision"])] if gate_at is None else [str(ROOT / "tests" / "stop_gate.py"), str(gate_at),
                                                               str(SCRIPTS["vision"])]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
            "1", "--main_process_port", str(_free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
            *script, *VISION, "--max_train_steps", "8", "--logging_steps", "2", "--image_cache_dir", cache, "--output_dir", str(out)]


def _workers_of(out: Path) -> list[int]:
    """Processes still running the script for ``out`` (a killed launcher can leave them behind)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(out) in (proc / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.slow
def test_sigterm_to_accelerate_launch_stops_every_process_cleanly(tmp_path, cache):
    reference = tmp_path / "reference"
    proc = subprocess.run(_two_processes(reference, cache), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "stopped"
    with open(tmp_path / "stopped.log", "w") as log:
        launcher = subprocess.Popen(_two_processes(out, cache, gate_at=3), cwd=ROOT, env=ENV, stdout=log,
                                    stderr=subprocess.STDOUT)
        code = _kill_after(launcher, out, 3, sig=signal.SIGTERM, timeout=600)   # the step-3 checkpoint: both wait there
    text = (tmp_path / "stopped.log").read_text()
    assert code == 128 + signal.SIGTERM, text[-3000:]
    stops = [line for line in text.splitlines() if line.startswith("stopped: SIGTERM at step ")]
    assert len(stops) == 2 and stops[0] == stops[1], text[-3000:]           # both processes, the same step
    assert stops[0].startswith("stopped: SIGTERM at step 4 (epoch 0); saved "), text[-3000:]  # the next logging step
    assert _latest_step(out) == 4 and _workers_of(out) == []
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000003", "step_00000004"]
    assert "Traceback" not in text
    proc = subprocess.run(_two_processes(out, cache) + ["--resume_from_checkpoint", "latest"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "other data" not in proc.stderr                         # same data and processes: no resume warning
    _assert_same_run(reference, out)
