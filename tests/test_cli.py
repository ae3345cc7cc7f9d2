"""The ``hf-emergence`` command line, run as a user would (subprocesses), plus in-process runs of ``main`` for the
many cheap cases (bad arguments, table layouts) that would otherwise each pay a Python + transformers start-up."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageClassification, AutoModelForSeq2SeqLM

from hf_emergence import EmergenceInit, EmergencePlan, activation_profile, emergence, from_config
from hf_emergence.cli import SETTING_NAMES, build_parser, main, random_inputs

ROOT = Path(__file__).resolve().parents[1]
MARIAN = dict(d_model=16, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
              encoder_attention_heads=2, decoder_attention_heads=2, vocab_size=64, decoder_vocab_size=64,
              max_position_embeddings=64, pad_token_id=1, eos_token_id=2, bos_token_id=0, decoder_start_token_id=1)
VIT = dict(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
           intermediate_size=32, num_labels=4)
# every setting off its default (pivot stays None: with chain=single and matrix units the layer count varies)
MARIAN_FLAGS = ["--alpha", "1.3", "--base_init", "xavier_normal", "--scale_mode", "variance", "--even_depth", "half",
                "--chain", "single", "--attention", "all", "--layer_unit", "matrix", "--exclude", r"decoder\.layers\.1\.fc2"]
MARIAN_INIT = EmergenceInit(alpha=1.3, base_init="xavier_normal", scale_mode="variance", even_depth="half", chain="single",
                            attention="all", layer_unit="matrix", exclude=[r"decoder\.layers\.1\.fc2"])


def _overrides(d: dict) -> str:
    return ",".join(f"{k}={json.dumps(v).replace(' ', '')}" for k, v in d.items())


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore::DeprecationWarning")
    env.pop("HF_EMERGENCE_DEBUG", None)
    return env


def _run(*args: str, script: bool = False) -> subprocess.CompletedProcess:
    """``python -m hf_emergence ...``; with ``script``, the installed ``hf-emergence`` console script where
    ``pip install -e .`` put one next to this interpreter (never a skip when it did not)."""
    exe = Path(sys.executable).with_name("hf-emergence")
    cmd = [str(exe) if script and exe.exists() else sys.executable, *([] if script and exe.exists() else ["-m", "hf_emergence"]), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=str(ROOT), timeout=300)


def _run_main(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _layer_std(model, plan, chain, layer) -> float:
    params = dict(model.named_parameters())
    flat = torch.cat([params[e.name].detach().double().flatten() for e in plan if e.chain == chain and e.layer == layer])
    return float(flat.std())


@pytest.fixture(scope="module")
def marian_dir(tmp_path_factory):
    """``hf-emergence init`` through the installed console script, every setting given as a flag."""
    out = tmp_path_factory.mktemp("cli") / "marian-emergence"
    proc = _run("init", "--model_type", "marian", "--config_overrides", _overrides(MARIAN),
                "--auto_class", "AutoModelForSeq2SeqLM", "--seed", "0", *MARIAN_FLAGS, "--output_dir", str(out), script=True)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return out, proc


# ------------------------------------------------------------------------------------------------ init
def test_init_saves_a_checkpoint_stock_transformers_loads_bit_identically(marian_dir):
    out, proc = marian_dir
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "generation_config.json", "model.safetensors"]
    assert "EmergencePlan for MarianMTModel: alpha=1.3" in proc.stdout and "AutoModelForSeq2SeqLM.from_pretrained" in proc.stdout
    saved = json.loads((out / "config.json").read_text())
    assert saved["architectures"] == ["MarianMTModel"]
    assert EmergenceInit.from_dict(saved["emergence_init"]) == MARIAN_INIT
    assert saved["emergence_init"]["applied"] is True
    loaded = AutoModelForSeq2SeqLM.from_pretrained(out)
    torch.manual_seed(0)
    reference = from_config(AutoModelForSeq2SeqLM, AutoConfig.for_model("marian", **MARIAN), MARIAN_INIT)
    ref = reference.state_dict()
    assert loaded.state_dict().keys() == ref.keys()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ref[k]), k
    card = (out / "README.md").read_text()
    assert "emergence-init" in card and "arXiv 2407.19044" in card and "| `alpha` | `1.3` |" in card


def test_init_from_a_saved_config_keeps_its_settings_and_copies_the_tokenizer(marian_dir, tmp_path, capsys):
    source = tmp_path / "src"
    shutil.copytree(marian_dir[0], source)
    (source / "tokenizer.json").write_text("{}")
    (source / "tokenizer_config.json").write_text("{}")
    out = tmp_path / "again"
    code, stdout, err = _run_main(capsys, "init", "--config", str(source), "--alpha", "1.5", "--seed", "3",
                                  "--output_dir", str(out))
    assert code == 0, err
    assert {"tokenizer.json", "tokenizer_config.json", "model.safetensors", "README.md"} <= {p.name for p in out.iterdir()}
    settings = json.loads((out / "config.json").read_text())["emergence_init"]
    assert EmergenceInit.from_dict(settings) == dataclasses.replace(MARIAN_INIT, alpha=1.5)  # flag over recorded settings
    assert "tokenizer files" not in err


# --------------------------------------------------------------------------------------------- inspect
def _vit():
    config = AutoConfig.for_model("vit", **VIT)
    torch.manual_seed(42)
    return AutoModelForImageClassification.from_config(config)


def test_inspect_json_matches_the_library_plan_and_measured_stds():
    proc = _run("inspect", "--model_type", "vit", "--config_overrides", _overrides(VIT),
                "--auto_class", "AutoModelForImageClassification", "--alpha", "1.4", "--layer_unit", "matrix", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    expected = EmergenceInit(alpha=1.4, layer_unit="matrix").plan(_vit())
    assert EmergencePlan.from_dict(report["plan"]) == expected
    assert report["already_applied"] is False and report["model"] == "ViTForImageClassification"
    assert [(r["chain"], r["layer"], r["k"], r["params"]) for r in report["layers"]] == \
        [(r["chain"], r["layer"], r["k"], r["params"]) for r in expected.layers()]
    for row in report["layers"]:
        assert row["std_ratio"] == pytest.approx(row["factor"], rel=1e-5)
        assert row["std_after"] == pytest.approx(row["std_before"] * row["factor"], rel=1e-5)
    assert len(report["tensors"]) == len(expected.entries)
    for t in report["tensors"]:
        assert t["std_after"] == pytest.approx(t["std_before"] * t["factor"], rel=1e-5)


def test_inspect_std_after_is_what_init_saves_with_the_same_seed(tmp_path, capsys):
    flags = ["--model_type", "vit", "--config_overrides", _overrides(VIT), "--auto_class", "AutoModelForImageClassification",
             "--alpha", "1.2", "--seed", "7"]
    code, out, err = _run_main(capsys, "inspect", *flags, "--json")
    assert code == 0, err
    report = json.loads(out)
    code, _, err = _run_main(capsys, "init", *flags, "--output_dir", str(tmp_path / "vit"))
    assert code == 0, err
    saved = AutoModelForImageClassification.from_pretrained(tmp_path / "vit")
    plan = EmergencePlan.from_dict(report["plan"])
    for row in report["layers"]:
        assert _layer_std(saved, plan, row["chain"], row["layer"]) == pytest.approx(row["std_after"], rel=1e-6)


def test_inspect_table_has_one_row_per_layer_with_std_columns(capsys):
    code, out, err = _run_main(capsys, "inspect", "--model_type", "vit", "--config_overrides", _overrides(VIT),
                               "--base_init", "keep", "--alpha", "1.5")
    assert code == 0, err
    lines = out.splitlines()
    header = next(i for i, l in enumerate(lines) if l.startswith("chain"))
    assert lines[header].split() == ["chain", "layer", "block", "k", "factor", "tensors", "params", "std_before",
                                     "std_after", "std_ratio"]
    rows = [l.split() for l in lines[header + 1: header + 4]]
    assert [r[3] for r in rows] == ["-1", "0", "1"]
    for r in rows:  # the measured ratio equals the factor to the printed precision
        assert r[9] == r[4]
    assert "ViTModel" in lines[0]  # default --auto_class: AutoModel


def test_inspect_a_checkpoint_that_carries_the_init_shows_its_recorded_settings(marian_dir, capsys):
    out = marian_dir[0]
    code, text, err = _run_main(capsys, "inspect", "--model", str(out), "--alpha", "2")
    assert code == 0, err
    assert "already carries the emergence init" in text and "alpha = 1.3" in text and "exclude = ['decoder\\\\.layers\\\\.1\\\\.fc2']" in text
    assert "note: ignored --alpha" in text
    code, text, err = _run_main(capsys, "inspect", "--model", str(out), "--json")
    report = json.loads(text)
    assert report["already_applied"] is True
    assert EmergenceInit.from_dict(report["recorded_settings"]) == MARIAN_INIT
    loaded = AutoModelForSeq2SeqLM.from_pretrained(out)
    plan = MARIAN_INIT.plan(loaded)
    assert EmergencePlan.from_dict(report["plan"]) == plan
    for row in report["layers"]:
        assert row["std"] == pytest.approx(_layer_std(loaded, plan, row["chain"], row["layer"]), rel=1e-6)


def test_inspect_a_checkpoint_without_the_init_previews_it_on_its_own_weights(tmp_path, capsys):
    model = _vit()
    model.save_pretrained(tmp_path / "baseline")
    code, out, err = _run_main(capsys, "inspect", "--model", str(tmp_path / "baseline"), "--base_init", "keep",
                               "--alpha", "1.3", "--json")
    assert code == 0, err
    report = json.loads(out)
    plan = EmergenceInit(alpha=1.3, base_init="keep").plan(model)
    assert report["already_applied"] is False and EmergencePlan.from_dict(report["plan"]) == plan
    for row in report["layers"]:    # keep: "before" is the checkpoint itself, "after" is it times the factor
        assert row["std_before"] == pytest.approx(_layer_std(model, plan, row["chain"], row["layer"]), rel=1e-6)
        assert row["std_ratio"] == pytest.approx(row["factor"], rel=1e-5)
    code, out, err = _run_main(capsys, "inspect", "--model", str(tmp_path / "baseline"))
    assert code == 0 and "note: base_init=xavier_uniform re-draws these weights" in out


def test_inspect_plan_only_builds_on_meta(capsys):
    code, out, err = _run_main(capsys, "inspect", "--model_type", "marian", "--config_overrides", _overrides(MARIAN),
                               "--plan_only", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["tensors"] == [] and "std_before" not in report["layers"][0]
    assert [r["k"] for r in report["layers"]] == [-1, 1, -1, 1]


# --------------------------------------------------------------------------------------------- measure
def test_measure_on_an_inputs_file_matches_the_library(marian_dir, tmp_path):
    out = marian_dir[0]
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(3, 64, (6, 10), generator=g), "decoder_input_ids": torch.randint(3, 64, (6, 7), generator=g)}
    torch.save(batch, tmp_path / "batch.pt")
    proc = _run("measure", "--model", str(out), "--inputs", str(tmp_path / "batch.pt"), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    model = AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    plan = MARIAN_INIT.plan(model)                 # the layers of the recorded settings (chain=single, matrix units)
    score = emergence(model, batch, plan=plan)
    assert report["layers"] == "recorded"
    assert int(report["emergence"]["E"]) == score.E and report["emergence"]["E_max"] == str(score.E_max)
    assert [(r["block"], r["n"], r["a"]) for r in report["emergence"]["per_layer"]] == \
        [(r["block"], r["n"], r["a"]) for r in score.per_layer]
    assert report["emergence"]["normalised"] == pytest.approx(score.normalised)
    profile = activation_profile(model, batch, plan=plan)
    assert len(report["profile"]) == len(profile.rows)
    for got, want in zip(report["profile"], profile.rows):
        assert got["block"] == want["block"] and got["k"] == want["k"] and got["n"] == want["n"]
        for stat in ("mean_abs", "in_abs", "active_fraction", "weight_std", "grad_norm"):
            assert got[stat] == pytest.approx(want[stat], rel=1e-5), stat
    assert report["inputs"]["shapes"] == {"input_ids": [6, 10], "decoder_input_ids": [6, 7]}


def test_measure_default_random_inputs_are_documented_and_saved(marian_dir, tmp_path, capsys):
    out = marian_dir[0]
    saved = tmp_path / "used.safetensors"
    code, text, err = _run_main(capsys, "measure", "--model", str(out), "--batch_size", "4", "--seed", "5",
                                "--save_inputs", str(saved), "--no_profile", "--json")
    assert code == 0, err
    report = json.loads(text)
    from safetensors.torch import load_file

    batch = load_file(str(saved))
    assert report["inputs"]["shapes"] == {"input_ids": [4, 16], "attention_mask": [4, 16], "decoder_input_ids": [4, 16]}
    model = AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    again = random_inputs(model, model.config, batch_size=4, seq_len=None, image_size=None, seed=5)
    assert all(torch.equal(batch[k], again[k]) for k in again)
    assert report["profile"] is None and report["layers"] == "recorded"
    assert int(report["emergence"]["E"]) == emergence(model, batch, plan=MARIAN_INIT.plan(model)).E
    code, text, err = _run_main(capsys, "measure", "--model", str(out), "--inputs", str(saved), "--layers", "default",
                                "--no_profile", "--json")
    assert code == 0, err
    assert int(json.loads(text)["emergence"]["E"]) == emergence(model, batch).E   # the plain call: default layering
    code, text, err = _run_main(capsys, "measure", "--model", str(out), "--batch_size", "4")
    assert code == 0 and "emergence E = " in text and "activation profile:" in text


def test_measure_random_pixels_for_a_vision_checkpoint(tmp_path):
    model = _vit()
    batch = random_inputs(model, model.config, batch_size=3, seq_len=None, image_size=None, seed=0)
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert torch.equal(batch["pixel_values"], torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)))


# ------------------------------------------------------------------------------------ help and errors
def test_help_everywhere(capsys):
    code, out, _ = _run_main(capsys, "--help")
    assert code == 0 and "init" in out and "measure" in out
    for command in ("init", "inspect", "measure"):
        code, out, _ = _run_main(capsys, command, "--help")
        assert code == 0 and f"usage: hf-emergence {command}" in out


def test_every_emergence_init_setting_is_a_flag():
    actions = {a.dest: a for p in build_parser()._subparsers._group_actions[0].choices.values() for a in p._actions}
    assert set(SETTING_NAMES) == {f.name for f in dataclasses.fields(EmergenceInit)}
    for name in SETTING_NAMES:
        assert name in actions and f"--{name}" in actions[name].option_strings and actions[name].default is None
        assert actions[name].help.split("(default:")[0].strip(), f"--{name} has no help (EmergenceInit docstring Args:)"


def test_config_overrides_are_checked_before_anything_is_set():
    from hf_emergence.config_overrides import ConfigOverrideError, apply_config_overrides, parse_config_overrides

    config = AutoConfig.for_model("vit", **VIT)
    with pytest.raises(ConfigOverrideError, match="the vit config has no key 'nope'"):
        apply_config_overrides(config, "hidden_size=8,nope=1")
    assert config.hidden_size == 16
    assert apply_config_overrides(config, {"hidden_size": 32}).hidden_size == 32
    assert parse_config_overrides('a=[1,2],b={"c": 3},d=gelu,e=True') == {"a": [1, 2], "b": {"c": 3}, "d": "gelu", "e": True}


def test_bad_arguments_in_a_subprocess_give_one_line_and_exit_2(tmp_path):
    proc = _run("init", "--model_type", "vit", "--alpha", "-1", "--output_dir", str(tmp_path / "x"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: alpha=-1.0 is invalid: expected a finite number > 0 (typically 1.01 to 2)"]
    assert "Traceback" not in proc.stderr and not (tmp_path / "x").exists()


def _bad_cases(tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    (tmp_path / "not_json.safetensors").write_text("garbage")
    (tmp_path / "list.pt").write_bytes(b"")
    torch.save([1, 2], tmp_path / "list.pt")
    (tmp_path / "bad_config.json").write_text("{not json")
    vit = ["--model_type", "vit", "--config_overrides", _overrides(VIT)]
    out = ["--output_dir", str(tmp_path / "out")]
    return [
        (["init", "--model_type", "vitt", *out], "'vitt' is not a transformers model type; did you mean vit"),
        (["init", "--config", str(tmp_path / "missing.json"), *out], "no such file or folder"),
        (["init", "--config", str(tmp_path / "bad_config.json"), *out], "not a transformers config"),
        (["init", "--config", str(junk), *out], "holds no config.json"),
        (["init", *vit, "--alpha", "abc", *out], "argument --alpha: invalid float value: 'abc'"),
        (["init", *vit, "--alpha", "nan", *out], "alpha=nan is invalid"),
        (["init", *vit, "--alpha", "0", *out], "alpha=0.0 is invalid"),
        (["init", *vit, "--attention", "qk", *out], "argument --attention: invalid choice: 'qk'"),
        (["init", "--model_type", "vit", "--config_overrides", "hiden_size=8", *out], "the vit config has no key 'hiden_size'"),
        (["init", "--model_type", "vit", "--config_overrides", "hidden_size=big", *out], "hidden_size='big' is invalid"),
        (["init", *vit, "--auto_class", "AutoModelForSeq2SeqLM", *out], "AutoModelForSeq2SeqLM has no model for ViTConfig"),
        (["init", *vit, "--auto_class", "AutoModelForImageClasification", *out], "did you mean AutoModelForImageClassification"),
        (["init", *vit, "--pivot", "9", *out], "pivot=9 is outside a chain of 3 layers"),
        (["init", *vit, "--output_dir", str(junk)], "is not empty and holds no model (config.json); pass --overwrite"),
        (["init", *vit, "--output_dir", str(tmp_path / "not_json.safetensors")], "is a file, not a folder"),
        (["init", *vit, *out, "--push_to_hub"], "--push_to_hub needs --hub_model_id"),
        (["init", *vit, *out, "--push_to_hub", "--hub_model_id", "a/b/c"], "is not a repo id"),
        (["init", *vit, *out, "--hub_model_id", "me/x"], "only make sense with --push_to_hub"),
        (["init", *vit], "the following arguments are required: --output_dir"),
        (["init", *vit, "--config", "x", *out], "not allowed with argument"),
        (["inspect", "--model", str(tmp_path / "nowhere")], "no such folder"),
        (["inspect", "--model", str(junk)], "holds no config.json"),
        (["inspect", *vit, "--layer_unit", "neuron"], "invalid choice: 'neuron'"),
        (["measure", "--model", str(tmp_path / "nowhere")], "no such folder"),
        ([], "the following arguments are required"),
        (["train"], "invalid choice: 'train'"),
        (["inspect", "--model_type", "vit", "--bogus"], "unrecognized arguments: --bogus"),
    ]


def test_bad_arguments_give_exit_2_and_one_error_line(tmp_path, capsys):
    for argv, message in _bad_cases(tmp_path):
        code, out, err = _run_main(capsys, *argv)
        lines = err.strip().splitlines()
        assert code == 2, (argv, err)
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (argv, err)
        assert "Traceback" not in err and not out.strip(), argv
    assert not (tmp_path / "out").exists()                       # nothing written on a bad argument
    assert [p.name for p in (tmp_path / "junk").iterdir()] == ["notes.txt"]


def test_bad_inputs_for_measure_and_overwrite(marian_dir, tmp_path, capsys):
    out = marian_dir[0]
    torch.save([1, 2], tmp_path / "list.pt")
    (tmp_path / "garbage.safetensors").write_text("garbage")
    torch.save({"pixel_values": torch.zeros(1, 3, 8, 8)}, tmp_path / "pixels.pt")
    cases = [
        (["--inputs", str(tmp_path / "missing.pt")], "no such file"),
        (["--inputs", str(tmp_path / "list.pt")], "expected a dict of named tensors"),
        (["--inputs", str(tmp_path / "garbage.safetensors")], "cannot read it"),
        (["--inputs", str(tmp_path / "pixels.pt")], "the forward pass of MarianMTModel on inputs from"),
        (["--seq_len", "500"], "--seq_len 500 is outside 1..64"),
        (["--save_inputs", str(tmp_path / "b.pt")], "expected a .safetensors file name"),
    ]
    for extra, message in cases:
        code, stdout, err = _run_main(capsys, "measure", "--model", str(out), *extra)
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, (extra, err)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    code, _, err = _run_main(capsys, "init", "--model_type", "vit", "--config_overrides", _overrides(VIT),
                             "--output_dir", str(junk), "--overwrite")
    assert code == 0, err
    assert (junk / "notes.txt").read_text() == "mine" and (junk / "model.safetensors").is_file()


def test_warnings_are_one_line(tmp_path, capsys):
    code, _, err = _run_main(capsys, "inspect", "--model_type", "vit", "--config_overrides", _overrides(VIT),
                             "--alpha", "0.9", "--plan_only")
    assert code == 0
    assert err.strip().splitlines() == ["warning: alpha=0.9 < 1 reverses the schedule: early layers grow and late layers shrink"]


def test_per_stage_config_check_accepts_every_default_config_and_catches_a_shortened_list():
    from transformers import CONFIG_MAPPING

    from hf_emergence.loading import LoadError, apply_overrides, check_config

    for model_type, config_class in CONFIG_MAPPING.items():
        try:
            config = config_class()
        except Exception:  # noqa: BLE001 - composite configs that need sub-configs
            continue
        assert check_config(config) is config, model_type
    for model_type, bad, good in [("resnet", "depths=[1]", "depths=[1,1],hidden_sizes=[8,16]"),
                                  ("convnext", "depths=[1,1],hidden_sizes=[8,16]", "depths=[1,1],hidden_sizes=[8,16],num_stages=2"),
                                  ("swin", "depths=[2,2]", "depths=[2,2],num_heads=[2,4]")]:
        with pytest.raises(LoadError, match=f"the {model_type} config's per-stage settings do not fit together"):
            apply_overrides(AutoConfig.for_model(model_type), bad)
        apply_overrides(AutoConfig.for_model(model_type), good)
