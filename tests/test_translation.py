"""examples/translation/run.py end to end on tiny settings: BLEU is sacreBLEU's on the written predictions, the saved
folder is a stock transformers model, resume is exact, two processes score every sentence once, bad input is one
line with exit code 2 and a diverging run stops with exit code 3 leaving its checkpoints intact.

All runs are CPU-only and offline (built-in Multi30k sample, a BPE trained on the fly, a config-built model).
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import io
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import sacrebleu
import torch
import torch.nn.functional as F
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
RUN_PY = ROOT / "examples" / "translation" / "run.py"
DATA = ROOT / "examples" / "translation" / "data" / "multi30k_sample"


def _load_run():
    spec = importlib.util.spec_from_file_location("translation_run", RUN_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)      # puts examples/ on sys.path and imports common
    return module


run = _load_run()
common = run.common

N_EVAL = 24
TINY = ["--model_preset", "tiny", "--max_train_samples", "200", "--max_eval_samples", str(N_EVAL), "--vocab_size", "300",
        "--per_device_train_batch_size", "16", "--num_beams", "1", "--no_progress_bar", "--num_threads", "1",
        "--config_overrides", "dropout=0.1,attention_dropout=0.1,activation_dropout=0.1"]
# One thread: on a shared 2-core box, two spinning OpenMP threads per process are several times slower.
# Dropout is on, so the resume tests below check exactness where the RNG stream matters.
# 200 samples / 16 = 13 batches per epoch: 30 steps cross two epoch ends (with evaluation) and stop mid-epoch.
RUN_A = [*TINY, "--max_train_steps", "30", "--checkpointing_steps", "10"]


def _reset_accelerate() -> None:
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _main(argv):
    """run.main in-process, with accelerate's process-wide singletons reset afterwards."""
    try:
        return run.main([str(a) for a in argv])
    finally:
        _reset_accelerate()


def _cli(argv, capsys):
    """common.run_cli(run.main) in-process: (exit code, the stderr lines that run_cli printed)."""
    capsys.readouterr()
    try:
        code = common.run_cli(run.main, [str(a) for a in argv])
    finally:
        _reset_accelerate()
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, [line for line in err.splitlines() if line.startswith("error:")]


def _lines(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")
    return text[:-1].split("\n")


def _raw_sentences(split: str, lang: str, n: int) -> list[str]:
    with gzip.open(DATA / f"{split}.{lang}.gz", "rt", encoding="utf-8") as f:
        return [line.rstrip("\n").strip() for line in f][:n]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in _lines(out / "metrics.jsonl")]


def _independent_loss(out: Path, split: str, n: int, max_target_length: int = 128) -> float:
    """Token-averaged cross-entropy of the saved model, one sentence at a time (no padding, no batching)."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model = AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    total = tokens = 0.0
    with torch.no_grad():
        for src, tgt in zip(_raw_sentences(split, "de", n), _raw_sentences(split, "en", n)):
            x = tok([src], max_length=128, truncation=True, return_tensors="pt")
            y = tok(text_target=[tgt], max_length=max_target_length, truncation=True, return_tensors="pt").input_ids
            logits = model(**x, labels=y).logits
            total += F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), reduction="sum").item()
            tokens += y.numel()
    return total / tokens


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """run.main sets torch's thread count (--num_threads 1); restore it for the other test files."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    """One tiny training run shared by the tests below (30 steps, checkpoints every 10)."""
    out = tmp_path_factory.mktemp("run_a")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        results = _main([*RUN_A, "--output_dir", out])
    return SimpleNamespace(out=out, results=results, stdout=buf.getvalue())


def _copy_checkpoint(src_out: Path, dst_out: Path, step: int) -> Path:
    name = f"step_{step:08d}"
    shutil.copytree(src_out / "checkpoints" / name, dst_out / "checkpoints" / name)
    shutil.copytree(src_out / "tokenizer", dst_out / "tokenizer")
    return dst_out / "checkpoints" / name


# ------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_bleu_is_sacrebleu_of_the_written_predictions(run_a):
    out, results = run_a.out, run_a.results
    saved = json.loads((out / "all_results.json").read_text())
    assert saved["val_bleu"] == results["validation_bleu"] and saved["bleu"] == results["test_bleu"]
    assert saved["val_chrf"] == results["validation_chrf"] and saved["chrf"] == results["test_chrf"]
    for split, key in (("validation", "val_bleu"), ("test", "bleu")):
        predictions = _lines(out / f"{split}_predictions.txt")
        references = _raw_sentences(split, "en", N_EVAL)
        assert len(predictions) == len(references) == N_EVAL == results[f"{split}_sentences"]
        assert all(references) and any(predictions)
        expected = sacrebleu.corpus_bleu(predictions, [references])
        assert saved[key] == pytest.approx(expected.score, rel=1e-12, abs=1e-12)
        assert results[f"{split}_chrf"] == pytest.approx(sacrebleu.corpus_chrf(predictions, [references]).score, rel=1e-12)
        assert results["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp")
        printed = next(line for line in run_a.stdout.splitlines() if line.startswith(f"{split}: BLEU "))
        assert printed.startswith(f"{split}: BLEU {results[f'{split}_bleu']:.2f}  chrF {results[f'{split}_chrf']:.2f}")
        assert f"({N_EVAL} sentences)" in printed
    assert "sacreBLEU signature: nrefs:1|" in run_a.stdout


@pytest.mark.slow
def test_eval_loss_is_the_unpadded_per_token_loss(run_a):
    final = _metrics(run_a.out)[-1]
    assert final["final"] is True and final["step"] == 30
    assert final["validation_loss"] == pytest.approx(_independent_loss(run_a.out, "validation", N_EVAL), rel=1e-5)


@pytest.mark.slow
def test_run_logs_epoch_evaluations_and_keeps_two_checkpoints(run_a):
    records = _metrics(run_a.out)
    assert [r["step"] for r in records] == [13, 26, 30]          # epoch ends (13 batches each), then the final eval
    assert [r.get("epoch") for r in records[:2]] == [1, 2]
    ckpts = run_a.out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000020", "step_00000030"]
    assert (ckpts / "latest").read_text() == "step_00000030"
    state = json.loads((ckpts / "step_00000020" / "train_state.json").read_text())
    assert (state["completed_steps"], state["epoch"], state["batches_in_epoch"]) == (20, 1, 7)
    assert state["samples_seen"] == 200 + 7 * 16
    assert state["last_eval"] == {k: v for k, v in records[0].items() if k not in ("step", "epoch")}


@pytest.mark.slow
def test_saved_folder_is_a_stock_transformers_model(run_a):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    out = run_a.out
    model = AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    assert type(model).__name__ == "MarianMTModel" and type(model).__module__.startswith("transformers.")
    saved = _tensors(out / "model.safetensors")
    state = model.state_dict()
    assert saved and set(saved) <= set(state)
    for key, tensor in saved.items():
        assert torch.equal(state[key], tensor), key
    # weights not in the file are tied to one that is (shared embeddings / lm_head) or Marian's fixed sinusoids
    for key in set(state) - set(saved):
        assert key.endswith("embed_positions.weight") or any(state[key].data_ptr() == state[k].data_ptr() for k in saved), key

    spec = model.config.emergence_init
    assert spec["applied"] is True and spec["alpha"] == 1.1 and spec["base_init"] == "auto"
    assert model.config.scale_embedding is True        # the preset's fairseq convention survives the round trip
    card = (out / "README.md").read_text()
    assert "emergence-init" in card and "2407.19044" in card and "| `alpha` | `1.1` |" in card
    assert f"| val_bleu | {run_a.results['validation_bleu']:.4g} |" in card

    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == model.config.vocab_size == 300
    sentence = _raw_sentences("validation", "de", 1)[0]
    ids = tok(sentence).input_ids
    assert ids[-1] == tok.eos_token_id and tok.decode(ids, skip_special_tokens=True) == sentence
    generated = model.generate(**tok([sentence], return_tensors="pt"), max_length=12, num_beams=1)
    assert generated.shape[0] == 1 and 1 < generated.shape[1] <= 12
    assert isinstance(tok.decode(generated[0], skip_special_tokens=True), str)


# -------------------------------------------------------------------------------- baselines and LR control
def _tiny_model(argv):
    args = run.parse_args([*TINY, *argv])
    pairs = run.read_parallel_text(str(DATA / "train"), "de", "en")[:200]
    tokenizer = run.train_tokenizer(pairs, 300)
    torch.manual_seed(0)
    return args, run.build_model(args, tokenizer)


def test_xavier_baseline_redraws_the_same_tensors_without_scaling():
    _, emergence = _tiny_model([])
    _, xavier = _tiny_model(["--init", "xavier", "--alpha", "1.3"])   # --alpha only matters for the LR control
    _, default = _tiny_model(["--init", "default"])
    spec = xavier.config.emergence_init
    assert spec["alpha"] == 1.0 and spec["base_init"] == "xavier_uniform" and spec["applied"] is True
    assert set(xavier.emergence_plan.factors().values()) == {1.0}
    assert getattr(default.config, "emergence_init", None) is None and getattr(default, "emergence_plan", None) is None
    factors = emergence.emergence_plan.factors()
    assert set(factors) == set(xavier.emergence_plan.factors()) and {0.9091, 1.0, 1.1} == {round(f, 4) for f in factors.values()}
    e, x, d = emergence.state_dict(), xavier.state_dict(), default.state_dict()
    for name, factor in factors.items():
        assert torch.equal(e[name], x[name] * factor), name         # same draws, scaled by alpha**k
        assert not torch.equal(x[name], d[name]), name               # the baseline re-drew it (xavier, not the model's own)
    untouched = [k for k in e if k not in factors]
    # both re-drawing arms skip transformers' draws of the planned tensors (drawn once), so they share every other
    # tensor; the default arm draws those too, so its other random tensors come from other stream positions
    assert untouched and all(torch.equal(e[k], x[k]) for k in untouched)


@pytest.mark.parametrize("optimizer, power", [("adamw", 1), ("sgd", 2)])
def test_per_layer_lr_from_plan(optimizer, power):
    args, model = _tiny_model(["--init", "xavier", "--alpha", "1.3", "--per_layer_lr_from_plan", "--optimizer", optimizer,
                               "--learning_rate", "0.002", "--weight_decay", "0.01"])
    plan = common.lr_plan(args, model)
    assert plan.settings["alpha"] == 1.3                          # the plan an emergence run would apply ...
    assert model.config.emergence_init["alpha"] == 1.0             # ... while the weights stay the baseline's
    opt = common.make_optimizer(model, args, plan)
    assert type(opt).__name__ == {"adamw": "AdamW", "sgd": "SGD"}[optimizer]
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}   # not Marian's fixed sinusoids
    assert len(params) < len(list(model.parameters()))
    assert len(group_of) == sum(len(g["params"]) for g in opt.param_groups) == len(params)
    factors = plan.factors()
    assert any(f > 1 for f in factors.values()) and any(f < 1 for f in factors.values())
    for name, p in params.items():
        group = group_of[id(p)]
        assert group["lr"] == pytest.approx(0.002 * factors.get(name, 1.0) ** -power, rel=1e-12), name
        assert group["weight_decay"] == (0.01 if p.ndim >= 2 else 0.0), name
    without = common.make_optimizer(model, run.parse_args([*TINY, "--learning_rate", "0.002"]), None)
    assert {g["lr"] for g in without.param_groups} == {0.002}
    assert common.lr_plan(run.parse_args(TINY), model) is None


# ------------------------------------------------------------------------------------------------ resume
@pytest.mark.slow
def test_resume_from_a_checkpoint_is_exact(run_a, tmp_path):
    b = tmp_path / "b"
    ckpt = _copy_checkpoint(run_a.out, b, 20)
    results = _main([*RUN_A, "--output_dir", b, "--resume_from_checkpoint", ckpt])
    _assert_same_tensors(run_a.out / "model.safetensors", b / "model.safetensors")
    assert (b / "validation_predictions.txt").read_text() == (run_a.out / "validation_predictions.txt").read_text()
    assert results == run_a.results
    # the resumed run logs the same later records as the uninterrupted one
    assert _metrics(b) == [r for r in _metrics(run_a.out) if r["step"] > 20]


@pytest.mark.slow
def test_non_finite_loss_stops_with_code_3_and_latest_resume_is_exact(run_a, tmp_path, capsys, monkeypatch):
    c = tmp_path / "c"
    ckpt = _copy_checkpoint(run_a.out, c, 20)
    calls = []
    real_loss = run.smoothed_loss

    def diverging_loss(logits, labels, smoothing):
        calls.append(1)
        loss = real_loss(logits, labels, smoothing)
        return loss * float("nan") if len(calls) == 3 else loss      # the 3rd step after the resume: step 23

    monkeypatch.setattr(run, "smoothed_loss", diverging_loss)
    code, errors = _cli([*TINY, "--max_train_steps", 30, "--checkpointing_steps", 1, "--output_dir", c,
                         "--resume_from_checkpoint", ckpt], capsys)
    assert code == 3 and len(errors) == 1
    assert "nan at step 23" in errors[0] and "step_00000022" in errors[0] and "--learning_rate" in errors[0]
    ckpts = c / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000021", "step_00000022"]   # no .tmp left
    assert (ckpts / "latest").read_text() == "step_00000022"
    assert json.loads((ckpts / "step_00000022" / "train_state.json").read_text())["completed_steps"] == 22
    assert not (c / "model.safetensors").exists()
    monkeypatch.undo()

    # the checkpoint written before the failure is intact: resuming from it reproduces the uninterrupted run
    results = _main([*RUN_A, "--output_dir", c, "--resume_from_checkpoint", "latest"])
    _assert_same_tensors(run_a.out / "model.safetensors", c / "model.safetensors")
    assert results == run_a.results


# ------------------------------------------------------------------------------------------ two processes
@pytest.mark.slow
def test_two_processes_score_every_sentence_once(tmp_path):
    out = tmp_path / "mp"
    n = 23
    with socket.socket() as s:          # a free port, so concurrent launches on this machine do not collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no", str(RUN_PY),
           "--model_preset", "tiny", "--max_train_samples", "200", "--max_eval_samples", str(n), "--vocab_size", "300",
           "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "5", "--num_beams", "1",
           "--max_target_length", "32", "--max_train_steps", "3", "--no_progress_bar", "--output_dir", str(out)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "translation: 2 process(es) on cpu" in proc.stderr
    final = _metrics(out)[-1]
    for split in ("validation", "test"):
        assert final[f"{split}_sentences"] == n
        predictions = _lines(out / f"{split}_predictions.txt")
        references = _raw_sentences(split, "en", n)
        assert len(predictions) == n
        assert final[f"{split}_bleu"] == pytest.approx(sacrebleu.corpus_bleu(predictions, [references]).score, rel=1e-12)
        # the 10-sentence steps repeat some sentences to even out the last batch; the loss must not count them
        assert final[f"{split}_loss"] == pytest.approx(_independent_loss(out, split, n, max_target_length=32), rel=1e-5)
    assert proc.stdout.count("validation: BLEU") == 1                 # printed by the main process only


# ------------------------------------------------------------------------------------------- bad input
def _write(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _parallel(tmp_path: Path, name: str, de: list[str], en: list[str]) -> str:
    _write(tmp_path / f"{name}.de", de)
    _write(tmp_path / f"{name}.en", en)
    return str(tmp_path / name)


def _bad_input_cases(tmp_path: Path) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (argv, substrings the one error line must contain)."""
    good = _parallel(tmp_path, "good", ["Ein Hund läuft.", "Zwei Katzen."], ["A dog runs.", "Two cats."])
    mismatch = _parallel(tmp_path, "mismatch", ["Ein Hund.", "Eine Katze.", "Ein Vogel."], ["A dog.", "A cat."])
    empty = _parallel(tmp_path, "empty", [], [])
    blank = _parallel(tmp_path, "blank", ["  ", "Ein Hund."], ["A cat.", ""])
    broken = tmp_path / "broken.jsonl"
    _write(broken, ['{"translation": {"de": "Ein Hund.", "en": "A dog."}}', "",
                    '{"translation": {"de": "Eine Katze.", "en": "A cat."}', '{"translation": {"de": "x", "en": "y"}}'])
    no_lang = tmp_path / "nolang.jsonl"
    _write(no_lang, ['{"translation": {"de": "Ein Hund.", "en": "A dog."}}', '{"translation": {"de": "Katze", "fr": "chat"}}'])
    not_pair = tmp_path / "notpair.jsonl"
    _write(not_pair, ['{"de": "Ein Hund.", "en": "A dog."}'])
    not_ckpt = tmp_path / "not_a_checkpoint"
    not_ckpt.mkdir()
    out = ["--output_dir", str(tmp_path / "out")]
    return {
        "missing_prefix": (["--train_file", str(tmp_path / "nope"), *out], [f"{tmp_path / 'nope'}.de", "one sentence per line"]),
        "missing_validation_file": (["--train_file", good, "--validation_file", str(tmp_path / "nope.jsonl"), *out],
                                    ["missing file", "nope.jsonl"]),
        "line_count_mismatch": (["--train_file", mismatch, "--validation_file", good, *out],
                                ["mismatch.de has 3 lines", "mismatch.en has 2", "aligned"]),
        "empty_training_file": (["--train_file", empty, "--validation_file", good, *out], [f"the train data ({empty}) is empty"]),
        "blank_validation_pairs": (["--train_file", good, "--validation_file", blank, *out],
                                   [f"the validation data ({blank}) is empty"]),
        "broken_jsonl_line": (["--train_file", str(broken), "--validation_file", good, *out], [f"{broken}:3:", "not valid JSON"]),
        "jsonl_missing_language": (["--train_file", str(no_lang), "--validation_file", good, *out],
                                   [f"{no_lang}:2:", "'en'", "found: de, fr"]),
        "jsonl_not_a_translation": (["--train_file", str(not_pair), "--validation_file", good, *out],
                                    [f"{not_pair}:1:", '"translation"']),
        "unknown_config_key": ([*TINY, "--config_overrides", "d_model=16,no_such_key=3", *out], ["marian", "'no_such_key'"]),
        "bad_config_item": ([*TINY, "--config_overrides", "d_model", *out], ["'d_model' is not key=value"]),
        "vocab_too_small": (["--train_file", good, "--validation_file", good, "--vocab_size", "10", *out],
                            ["--vocab_size 10 is too small", "distinct characters"]),
        "same_languages": (["--source_lang", "de", "--target_lang", "de", *out], ["both 'de'"]),
        "builtin_other_languages": (["--source_lang", "fr", *out], ["German-English", "--train_file"]),
        "not_a_checkpoint": ([*TINY, "--resume_from_checkpoint", str(not_ckpt), *out],
                             [str(not_ckpt), "not a checkpoint folder"]),
        "negative_alpha": (["--alpha", "-1", *out], ["alpha=-1.0", "finite number > 0"]),
        "nan_alpha": (["--alpha", "nan", *out], ["alpha=nan", "finite number > 0"]),
        "lr_control_bad_alpha": ([*TINY, "--init", "xavier", "--alpha", "nan", "--per_layer_lr_from_plan", *out],
                                 ["--per_layer_lr_from_plan", "alpha=nan", "finite number > 0"]),
        "baseline_conflict": (["--init", "kaiming", "--base_init", "xavier_uniform", *out],
                              ["--init kaiming conflicts with --base_init xavier_uniform"]),
        "zero_learning_rate": (["--learning_rate", "0", *out], ["--learning_rate must be a positive number"]),
        "zero_beams": (["--num_beams", "0", *out], ["--num_beams must be >= 1, got 0"]),
        "push_without_id": (["--push_to_hub", *out], ["--push_to_hub needs --hub_model_id"]),
        "missing_tokenizer_folder": ([*TINY, "--tokenizer_name", str(tmp_path / "no_tok"), *out],
                                     ["not a local tokenizer folder"]),
    }


BAD_INPUTS = ["missing_prefix", "missing_validation_file", "line_count_mismatch", "empty_training_file",
              "blank_validation_pairs", "broken_jsonl_line", "jsonl_missing_language", "jsonl_not_a_translation",
              "unknown_config_key", "bad_config_item", "vocab_too_small", "same_languages", "builtin_other_languages",
              "not_a_checkpoint", "negative_alpha", "nan_alpha", "lr_control_bad_alpha", "baseline_conflict",
              "zero_learning_rate", "zero_beams", "push_without_id", "missing_tokenizer_folder"]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_with_exit_code_2(case, tmp_path, capsys):
    cases = _bad_input_cases(tmp_path)
    assert set(cases) == set(BAD_INPUTS)
    argv, expected = cases[case]
    code, errors = _cli(argv, capsys)
    assert code == 2 and len(errors) == 1, errors
    for part in expected:
        assert part in errors[0], (part, errors[0])
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("case", ["line_count_mismatch", "nan_alpha"])
def test_bad_input_from_the_command_line(case, tmp_path):
    argv, expected = _bad_input_cases(tmp_path)[case]
    proc = subprocess.run([sys.executable, str(RUN_PY), *argv], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and all(part in lines[-1] for part in expected), lines[-1]
    assert sum(line.startswith("error:") for line in lines) == 1 and proc.stdout == ""
    if case == "nan_alpha":                  # rejected while parsing, before anything else is logged
        assert len(lines) == 1


def test_generation_length_follows_the_batch_source_length():
    args = SimpleNamespace(max_target_length=128)
    assert run.generation_length(torch.zeros(4, 20, dtype=torch.long), args) == 40      # 1.5 * 20 + 10
    assert run.generation_length(torch.zeros(4, 200, dtype=torch.long), args) == 128    # capped
    args.max_target_length = 16
    assert run.generation_length(torch.zeros(1, 3, dtype=torch.long), args) == 14


def test_measure_emergence_logs_the_score_of_the_model_being_trained(tmp_path):
    """--measure_emergence: E at step 0 and at each evaluation; the last one equals the library's E on the saved model."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from hf_emergence import emergence

    out = tmp_path / "measured"
    _main([*TINY, "--max_train_steps", "13", "--measure_emergence", "--output_dir", out])
    records = [r for r in _metrics(out) if "emergence_log10_E" in r]
    assert [r["step"] for r in records] == [0, 13]
    model = AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    args = run.parse_args([*TINY, "--output_dir", str(out)])
    pairs = run.load_splits(args)["validation"]
    batch = run.collate(run.encode(pairs, tokenizer, args)[:64], tokenizer.pad_token_id)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "decoder_input_ids": model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])}
    score = emergence(model, inputs)
    assert records[-1]["emergence_log10_E"] == pytest.approx(score.log10_E, rel=1e-9)
    assert records[-1]["emergence_normalised"] == pytest.approx(score.normalised, rel=1e-9)
