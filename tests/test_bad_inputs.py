"""Every bad input of issue 14, as tables: (command, arguments) -> exit code and the one error line, and (Python call)
-> exception type and the one line of its message.

The example scripts run in-process through ``common.run_cli`` (what ``python run.py`` does, without paying a start-up
per row), the CLI through ``hf_emergence.cli.main``; a few rows also run as real commands, to show that an argparse
error is exactly one line on stderr (no usage dump). Rows that need a saved run share one tiny run per example.

Bad inputs tested where their feature is (not repeated here): ``EmergenceInit(...)`` settings (alpha 0 / -1.2 / nan /
inf, ``exclude=3``, unknown options), factors that overflow a dtype and models with no chain of 2 or more layers
(tests/test_emergence_init.py); ``apply_to_state_dict_`` with a wrong-shape tensor or a state dict missing planned
tensors or matching none (tests/test_checkpoint.py); the CLI's other argument errors (tests/test_cli.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from accelerate.state import AcceleratorState, GradientState

from hf_emergence import EmergenceInit, EmergencePlan, PlanError
from hf_emergence.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"translation": ROOT / "examples" / "translation" / "run.py", "vision": ROOT / "examples" / "vision" / "run.py"}


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RUNS = {name: _load(f"{name}_run_bad_inputs", path) for name, path in SCRIPTS.items()}
common = sys.modules["common"]

TRANSLATION = ["--model_preset", "tiny", "--max_train_samples", "40", "--max_eval_samples", "8", "--vocab_size", "300",
               "--per_device_train_batch_size", "16", "--num_beams", "1", "--max_target_length", "16",
               "--no_progress_bar", "--num_threads", "1"]
VISION = ["--max_train_samples", "32", "--max_eval_samples", "16", "--per_device_train_batch_size", "16",
          "--no_progress_bar", "--num_threads", "1", "--depth", "3", "--width", "8"]
ALBERT = "num_hidden_layers=3,hidden_size=16,embedding_size=8,num_attention_heads=2,intermediate_size=32,vocab_size=64"
RESNET = ["--model_type", "resnet", "--max_train_samples", "32", "--max_eval_samples", "16", "--no_progress_bar",
          "--num_threads", "1"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """Finished tiny runs with checkpoints (steps 2 and 3), an image folder of one class, a truncated CLI checkpoint,
    and a file where a folder is expected."""
    from PIL import Image
    from transformers import AutoConfig, AutoModelForImageClassification

    root = tmp_path_factory.mktemp("bad_inputs")
    cache = root / "image_cache"
    paths = {"root": root, "cache": cache, "file": root / "a_file.txt"}
    paths["file"].write_text("not a folder")
    for name, flags in (("translation", TRANSLATION), ("vision", [*VISION, "--image_cache_dir", str(cache)])):
        out = root / f"{name}_run"
        try:
            assert common.run_cli(RUNS[name].main, [*flags, "--max_train_steps", "3", "--checkpointing_steps", "1",
                                                    "--output_dir", str(out)]) == 0
        finally:
            _reset_accelerate()
        paths[name] = out
    broken = root / "broken_checkpoint"
    shutil.copytree(paths["translation"] / "checkpoints" / "step_00000003", broken)
    (broken / "optimizer.bin").write_bytes((broken / "optimizer.bin").read_bytes()[:100])
    paths["broken_checkpoint"] = broken
    broken_model = root / "broken_model"
    shutil.copytree(paths["translation"], broken_model, ignore=shutil.ignore_patterns("checkpoints"))
    (broken_model / "model.safetensors").write_bytes((broken_model / "model.safetensors").read_bytes()[:5000])
    paths["broken_model"] = broken_model
    one_class = root / "one_class" / "cat"
    one_class.mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (32, 32), (i * 50, 80, 160)).save(one_class / f"{i}.png")
    paths["one_class"] = one_class.parent
    vit = AutoModelForImageClassification.from_config(AutoConfig.for_model(
        "vit", image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, num_labels=3))
    vit.save_pretrained(root / "truncated_vit")
    weights = root / "truncated_vit" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    paths["truncated_vit"] = weights.parent
    return paths


def _reset_accelerate() -> None:
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _fresh(p: dict[str, Path], name: str) -> list[str]:
    return ["--output_dir", str(p["root"] / "fresh" / name)]


# (row name, command, argv(paths) -> list, exit code, what the one error line says)
CASES = [
    # -- translation --------------------------------------------------------------------------------------
    ("translation_output_dir_is_a_file", "translation", lambda p: [*TRANSLATION, "--output_dir", str(p["file"])],
     2, "a_file.txt is a file, not a folder"),
    ("translation_eval_batch_0", "translation", lambda p: [*TRANSLATION, "--per_device_eval_batch_size", "0"],
     2, "--per_device_eval_batch_size must be >= 1, got 0"),
    ("translation_logging_steps_0", "translation", lambda p: [*TRANSLATION, "--logging_steps", "0"],
     2, "--logging_steps must be >= 1, got 0"),
    ("translation_label_smoothing_2", "translation", lambda p: [*TRANSLATION, "--label_smoothing", "2"],
     2, "--label_smoothing must be in [0, 1), got 2.0"),
    ("translation_warmup_-5", "translation", lambda p: [*TRANSLATION, "--num_warmup_steps", "-5"],
     2, "--num_warmup_steps must be >= 0, got -5"),
    ("translation_epochs_-1", "translation", lambda p: [*TRANSLATION, "--num_train_epochs", "-1"],
     2, "--num_train_epochs must be a positive number, got -1.0"),
    ("translation_source_length_0", "translation", lambda p: [*TRANSLATION, "--max_source_length", "0"],
     2, "--max_source_length must be >= 1, got 0"),
    ("translation_max_train_samples_-7", "translation", lambda p: [*TRANSLATION, "--max_train_samples", "-7"],
     2, "--max_train_samples must be >= 1, got -7"),
    ("translation_max_eval_samples_-7", "translation", lambda p: [*TRANSLATION, "--max_eval_samples", "-7"],
     2, "--max_eval_samples must be >= 1, got -7"),
    ("translation_argparse_choice", "translation", lambda p: [*TRANSLATION, "--model_type", "gpt2"],
     2, "argument --model_type: invalid choice: 'gpt2'"),
    ("translation_rerun_a_finished_run", "translation", lambda p: [*TRANSLATION, "--output_dir", str(p["translation"])],
     2, "already holds a finished run (all_results.json): pass --resume_from_checkpoint latest to continue it, or "
        "--overwrite_output_dir"),
    ("translation_resume_other_model_size", "translation",
     lambda p: [*TRANSLATION, "--config_overrides", "d_model=64", "--output_dir", str(p["translation"]),
                "--resume_from_checkpoint", "latest"],
     2, "holds a different model: settings that differ (checkpoint -> this run): d_model 32 -> 64"),
    ("translation_resume_corrupt_checkpoint", "translation",
     lambda p: [*TRANSLATION, *_fresh(p, "t1"), "--resume_from_checkpoint", str(p["broken_checkpoint"])],
     2, "broken_checkpoint: optimizer.bin has 100 bytes"),
    ("translation_model_name_or_path_truncated", "translation",
     lambda p: [*TRANSLATION, "--model_name_or_path", str(p["broken_model"]), *_fresh(p, "t2")],
     2, "--model_name_or_path " + "{broken_model}: model.safetensors is truncated or not a safetensors file (5000 bytes, shorter than its "),
    # -- vision -------------------------------------------------------------------------------------------
    ("vision_output_dir_is_a_file", "vision", lambda p: [*VISION, "--output_dir", str(p["file"])],
     2, "a_file.txt is a file, not a folder"),
    ("vision_workers_-1", "vision", lambda p: [*VISION, "--dataloader_num_workers", "-1"],
     2, "--dataloader_num_workers must be >= 0, got -1"),
    ("vision_max_train_samples_-3", "vision", lambda p: [*VISION, "--max_train_samples", "-3"],
     2, "--max_train_samples must be >= 1, got -3"),
    ("vision_single_class", "vision",
     lambda p: [*VISION, "--train_dir", str(p["one_class"]), "--image_cache_dir", str(p["cache"]), *_fresh(p, "v1")],
     2, "one_class has a single class ('cat'): a classifier needs at least two"),
    ("vision_resnet_depths_1", "vision",
     lambda p: [*RESNET, "--config_overrides", "depths=[1]", "--image_cache_dir", str(p["cache"]), *_fresh(p, "v2")],
     2, "the resnet config's per-stage settings do not fit together: len(depths)=1, len(hidden_sizes)=4"),
    ("vision_resume_other_model_size", "vision",
     lambda p: [*VISION, "--width", "16", "--image_cache_dir", str(p["cache"]), "--output_dir", str(p["vision"]),
                "--resume_from_checkpoint", "latest"],
     2, "settings that differ (checkpoint -> this run): width 8 -> 16"),
    ("vision_model_name_or_path_truncated", "vision",
     lambda p: [*VISION, "--model_name_or_path", str(p["truncated_vit"]), "--image_cache_dir", str(p["cache"]),
                *_fresh(p, "v3")],
     2, "--model_name_or_path " + "{truncated_vit}: model.safetensors is truncated"),
    ("vision_argparse_type", "vision", lambda p: [*VISION, "--num_train_epochs", "three"],
     2, "argument --num_train_epochs: invalid float value: 'three'"),
    # -- hf-emergence ---------------------------------------------------------------------------------------
    ("cli_inspect_truncated_safetensors", "cli", lambda p: ["inspect", "--model", str(p["truncated_vit"])],
     2, "truncated_vit: model.safetensors is truncated"),
    ("cli_measure_truncated_safetensors", "cli", lambda p: ["measure", "--model", str(p["truncated_vit"])],
     2, "truncated_vit: model.safetensors is truncated"),
    ("cli_inspect_alpha_inf", "cli",
     lambda p: ["inspect", "--model_type", "vit", "--alpha", "inf", "--plan_only"],
     2, "alpha=inf is invalid: expected a finite number > 0"),
    ("cli_init_single_weight_layer", "cli",
     lambda p: ["init", "--model_type", "albert", "--config_overrides", ALBERT, "--output_dir", str(p["root"] / "fresh" / "c2")],
     2, "error: AlbertModel has 1 weight layer(s) to scale and no chain of 2 or more"),
    ("cli_init_resnet_depths_1", "cli",
     lambda p: ["init", "--model_type", "resnet", "--config_overrides", "depths=[1]", "--output_dir",
                str(p["root"] / "fresh" / "c1")],
     2, "the resnet config's per-stage settings do not fit together: len(depths)=1, len(hidden_sizes)=4"),
]


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("name, command, argv, code, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_its_exit_code_and_one_line(name, command, argv, code, message, saved, capsys):
    capsys.readouterr()
    args = argv(saved)
    try:
        got = cli_main(args) if command == "cli" else common.run_cli(RUNS[command].main, args)
    finally:
        _reset_accelerate()
    err = capsys.readouterr().err
    lines = _error_lines(err)
    message = message.format(**saved)
    assert got == code, err[-2000:]
    assert len(lines) == 1 and message in lines[0], (message, err[-2000:])
    assert "Traceback" not in err
    assert not (saved["root"] / "fresh").exists() or not any((saved["root"] / "fresh").rglob("*.safetensors"))


def test_the_saved_runs_are_untouched_by_the_bad_inputs(saved):
    """Rows above pointed at the finished runs (re-run, resume with another size): nothing of them changed."""
    for name in ("translation", "vision"):
        out = saved[name]
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert records[-1]["final"] is True and records[-1]["step"] == 3
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_00000002", "step_00000003"]
        assert all(common.checkpoint_problem(p) is None for p in (out / "checkpoints").glob("step_*"))


@pytest.mark.parametrize("command, argv, message", [
    ("translation", ["--label_smoothing", "2"], "--label_smoothing must be in [0, 1), got 2.0"),
    ("vision", ["--model_type", "vgg"], "argument --model_type: invalid choice: 'vgg'"),
    ("vision", ["--dataloader_num_workers", "-1"], "--dataloader_num_workers must be >= 0, got -1"),
])
def test_bad_arguments_are_exactly_one_line_from_the_command_line(command, argv, message, tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPTS[command]), *argv, "--output_dir", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("error: ")
    assert message in proc.stderr and "usage:" not in proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_a_bad_argument_under_a_two_process_launch_is_one_line(tmp_path):
    """Both workers raise the same error: it is printed once (the launcher adds its own failure report)."""
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPTS["vision"]),
                           "--dataloader_num_workers", "-1", "--output_dir", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode != 0
    assert _error_lines(proc.stderr) == ["error: --dataloader_num_workers must be >= 0, got -1"], proc.stderr[-3000:]
    assert proc.stderr.count("exitcode  : 2") >= 1 and not (tmp_path / "o").exists()


def test_the_cli_names_a_truncated_checkpoint_file_with_exit_2(saved):
    proc = subprocess.run([sys.executable, "-m", "hf_emergence", "measure", "--model", str(saved["truncated_vit"])],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: --model {saved['truncated_vit']}: model.safetensors is truncated "
        f"({(saved['truncated_vit'] / 'model.safetensors').stat().st_size} bytes, its header describes "
        f"{(saved['truncated_vit'] / 'model.safetensors').stat().st_size + 1000})"]


def test_overwrite_output_dir_replaces_a_finished_run(saved, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(saved["vision"], out)
    flags = [*VISION, "--image_cache_dir", str(saved["cache"]), "--max_train_steps", "1", "--output_dir", str(out)]
    try:
        assert common.run_cli(RUNS["vision"].main, [*flags, "--overwrite_output_dir"]) == 0
    finally:
        _reset_accelerate()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("final")) for r in records] == [(1, True)]               # a new log, a new run
    assert not any((out / "checkpoints").glob("step_*"))                                # the old checkpoints went


# ------------------------------------------------------------------------------------------------ the Python API
def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(8, 8, bias=False) for _ in range(5)])


def _plan() -> EmergencePlan:
    return EmergenceInit(alpha=1.2, base_init="keep").plan(_mlp())


def _plan_json(**entry0) -> str:
    d = _plan().to_dict()
    d["entries"][0].update(entry0)
    return json.dumps(d)


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    made = {"missing": tmp_path / "missing.json", "bad": tmp_path / "bad.json", "typed": tmp_path / "typed.json",
            "model": tmp_path / "model"}
    made["bad"].write_text('{"alpha": 1.2,}')
    made["typed"].write_text('{"alpha": "1.2"}')
    made["model"].mkdir()
    (made["model"] / "config.json").write_text('{"model_type": "vit", "hidden_size": 16}')
    return made


# (row name, call(files) -> Any, exception type, what its one line says)
API_CASES = [
    # -- EmergenceInit.from_json / from_dict: files, JSON, keys and value types ---------------------------------
    ("init_from_json_missing_file", lambda f: EmergenceInit.from_json(f["missing"]), ValueError,
     "EmergenceInit.from_json: {missing}: no such file"),
    ("init_from_json_invalid_json_file", lambda f: EmergenceInit.from_json(f["bad"]), ValueError,
     "EmergenceInit.from_json: {bad}: invalid JSON at line 1 column 15: Expecting property name enclosed in double quotes"),
    ("init_from_json_invalid_text", lambda f: EmergenceInit.from_json("{alpha: 1.2}"), ValueError,
     "EmergenceInit.from_json: invalid JSON at line 1 column 2: Expecting property name"),
    ("init_from_json_file_name_as_text", lambda f: EmergenceInit.from_json("settings.json"), ValueError,
     "'settings.json' looks like a file name: pass pathlib.Path('settings.json') to read the file"),
    ("init_from_json_neither_text_nor_path", lambda f: EmergenceInit.from_json(1.2), TypeError,
     "expected JSON text or a path, got float"),
    ("init_from_json_not_an_object", lambda f: EmergenceInit.from_json("[1.2]"), TypeError,
     "emergence_init settings must be a dict, got list"),
    ("init_from_json_alpha_a_string_in_a_file", lambda f: EmergenceInit.from_json(f["typed"]), TypeError,
     "{typed}: alpha must be a real number, got '1.2' (str)"),
    ("init_from_json_alpha_null", lambda f: EmergenceInit.from_json('{"alpha": null}'), TypeError,
     "alpha must be a real number, got None (NoneType)"),
    ("init_from_json_alpha_nan", lambda f: EmergenceInit.from_json('{"alpha": NaN}'), ValueError,
     "alpha=nan is invalid: expected a finite number > 0"),
    ("init_from_json_alpha_-infinity", lambda f: EmergenceInit.from_json('{"alpha": -Infinity}'), ValueError,
     "alpha=-inf is invalid: expected a finite number > 0"),
    ("init_from_json_exclude_a_number", lambda f: EmergenceInit.from_json('{"exclude": 3}'), TypeError,
     "exclude must be a regular expression or a list of them, got 3 (int)"),
    ("init_from_json_a_config_without_settings", lambda f: EmergenceInit.from_json(f["model"]), ValueError,
     "{model}/config.json is a model config with no emergence_init settings"),
    ("init_from_dict_only_a_typo", lambda f: EmergenceInit.from_dict({"alhpa": 1.2}), ValueError,
     "no emergence_init setting among the keys 'alhpa'; known settings: alpha, base_init"),
    ("init_from_json_a_plan_file", lambda f: EmergenceInit.from_json(_plan().to_json()), ValueError,
     "this is an EmergencePlan (EmergencePlan.from_dict / from_json read it), not settings; its settings are under "
     "'settings'"),
    ("init_from_dict_chain_a_number", lambda f: EmergenceInit.from_dict({"chain": 2}), ValueError,
     "chain=2 is not one of: separate, single, stage"),
    ("init_from_dict_pivot_a_string", lambda f: EmergenceInit.from_dict({"pivot": "2"}), TypeError,
     "pivot must be an integer layer index or None, got '2'"),
    # -- EmergencePlan.from_json --------------------------------------------------------------------------------
    ("plan_from_json_missing_file", lambda f: EmergencePlan.from_json(f["missing"]), ValueError,
     "not an EmergencePlan: {missing}: no such file"),
    ("plan_from_json_file_name_as_text", lambda f: EmergencePlan.from_json("plan.json"), ValueError,
     "not an EmergencePlan: invalid JSON at line 1 column 1: Expecting value ('plan.json' looks like a file name"),
    ("plan_from_json_infinite_factor", lambda f: EmergencePlan.from_json(_plan_json(factor=float("inf"))), ValueError,
     "not an EmergencePlan: entry 0: factor of '0.weight' is inf: expected a finite number > 0"),
    ("plan_from_json_negative_factor", lambda f: EmergencePlan.from_json(_plan_json(factor=-1.0)), ValueError,
     "factor of '0.weight' is -1.0: expected a finite number > 0"),
    # -- plan.apply_to_state_dict_ ------------------------------------------------------------------------------
    ("state_dict_is_the_model", lambda f: _plan().apply_to_state_dict_(_mlp()), TypeError,
     "state_dict must be a mapping of parameter names to tensors (e.g. model.state_dict()), got Sequential"),
    ("state_dict_value_not_a_tensor", lambda f: _plan().apply_to_state_dict_({"0.weight": [[0.5] * 8] * 8}, partial=True),
     TypeError, "'0.weight' is a list, expected a torch.Tensor"),
    ("state_dict_integer_tensor",
     lambda f: _plan().apply_to_state_dict_({"0.weight": torch.zeros(8, 8, dtype=torch.int8)}, partial=True),
     ValueError, "'0.weight' has dtype int8, expected a floating-point tensor"),
    # -- the single-layer rule ----------------------------------------------------------------------------------
    ("single_weight_layer", lambda f: EmergenceInit(alpha=1.2).apply(nn.Linear(4, 4)), PlanError,
     "Linear has 1 weight layer(s) to scale and no chain of 2 or more"),
]


@pytest.mark.parametrize("name, call, error, message", API_CASES, ids=[c[0] for c in API_CASES])
def test_bad_api_input_raises_one_line_naming_it(name, call, error, message, files):
    with pytest.raises(error) as info:
        call(files)
    text = str(info.value)
    assert "\n" not in text and message.format(**files) in text, text


def test_an_unknown_setting_is_one_warning_naming_it_and_the_known_ones():
    with pytest.warns(UserWarning) as record:
        assert EmergenceInit.from_json('{"alpha": 1.3, "alhpa": 2}') == EmergenceInit(alpha=1.3)
    assert [str(w.message) for w in record] == [
        "ignoring unknown emergence_init setting(s) alhpa (written by a newer hf_emergence?); known settings: alpha, "
        "base_init, scale_mode, even_depth, pivot, chain, attention, layer_unit, exclude, unscaled"]


def test_from_json_reads_text_a_file_and_a_saved_checkpoint(tmp_path):
    init = EmergenceInit(alpha=1.3, chain="single", exclude=["head"])
    (tmp_path / "settings.json").write_text(init.to_json())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit", "emergence_init": {**init.to_dict(), "applied": True}}))
    assert EmergenceInit.from_json(init.to_json()) == init
    assert EmergenceInit.from_json(tmp_path / "settings.json") == init
    assert EmergenceInit.from_json(tmp_path) == init                       # a checkpoint folder: its config.json
    plan = _plan()
    (tmp_path / "plan.json").write_text(plan.to_json())
    assert EmergencePlan.from_json(tmp_path / "plan.json") == plan


def test_a_state_dict_refused_for_a_factor_that_overflows_is_left_as_it_was():
    """alpha=300 in float16: alpha**2 = 9e4 overflows (inf) but the layers before it fit; none may change."""
    model = _mlp().half()
    with pytest.warns(UserWarning, match="alpha=300.0"):
        plan = EmergenceInit(alpha=300.0, base_init="keep").plan(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PlanError, match=r"^4\.weight \(chain 'model', layer 4\) would be multiplied by alpha\*\*2 = 9e\+04, "
                                        r"which is infinite in float16"):
        plan.apply_to_state_dict_(state, reinit=False)
    assert all(torch.equal(t, model.state_dict()[k]) for k, t in state.items())
