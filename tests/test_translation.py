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
    pairs = run.read_parallel_text(str(DATA / "train"), "de", "en").select(range(200))
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
    """Also issue 14's hang: 200 pairs / 16 = 13 length-grouped batches (the short one mid-epoch). The sampler halves
    one batch so each process gets 7; the epoch closes at step 7 and training goes on into the next one."""
    out = tmp_path / "mp"
    n = 23
    with socket.socket() as s:          # a free port, so concurrent launches on this machine do not collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no", str(RUN_PY),
           "--model_preset", "tiny", "--max_train_samples", "200", "--max_eval_samples", str(n), "--vocab_size", "300",
           "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "5", "--num_beams", "1",
           "--max_target_length", "32", "--max_train_steps", "9", "--no_progress_bar", "--output_dir", str(out)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "translation: 2 process(es) on cpu" in proc.stderr
    records = _metrics(out)
    assert [(r["step"], r.get("epoch")) for r in records] == [(7, 1), (9, None)]   # epoch end (7 batches each), final
    final = records[-1]
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
    _write(not_pair, ['{"text": "Ein Hund."}'])
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
                                    [str(not_pair), '"translation"', 'columns "de" and "en"', "found columns: text"]),
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
        "tokens_and_sentences": (["--max_tokens_per_batch", "500", "--per_device_train_batch_size", "8", *out],
                                 ["either --max_tokens_per_batch or --per_device_train_batch_size"]),
        "negative_tokens": (["--max_tokens_per_batch", "-1", *out], ["--max_tokens_per_batch must be >= 0, got -1"]),
        "dropout_above_one": (["--dropout", "1.5", *out], ["--dropout must be in [0, 1), got 1.5"]),
        "label_smoothing_two": (["--label_smoothing", "2", *out], ["--label_smoothing must be in [0, 1), got 2.0"]),
        "nan_length_penalty": (["--length_penalty", "nan", *out], ["--length_penalty must be a finite number, got nan"]),
        "negative_train_samples": (["--max_train_samples", "-3", *out], ["--max_train_samples must be >= 1, got -3"]),
        "zero_source_length": (["--max_source_length", "0", *out], ["--max_source_length must be >= 1, got 0"]),
        "average_without_checkpoints": (["--average_last_checkpoints", "3", *out],
                                        ["--average_last_checkpoints 3 needs --checkpointing_steps"]),
        "average_beyond_the_kept": (["--average_last_checkpoints", "3", "--checkpointing_steps", "5", *out],
                                    ["needs --checkpoints_total_limit >= 3, got 2"]),
        "zero_minutes": (["--stop_after_minutes", "0", *out], ["--stop_after_minutes must be a positive number, got 0"]),
        "zero_validation_beams": (["--validation_num_beams", "0", *out], ["--validation_num_beams must be >= 1, got 0"]),
    }


BAD_INPUTS = ["missing_prefix", "missing_validation_file", "line_count_mismatch", "empty_training_file",
              "blank_validation_pairs", "broken_jsonl_line", "jsonl_missing_language", "jsonl_not_a_translation",
              "unknown_config_key", "bad_config_item", "vocab_too_small", "same_languages", "builtin_other_languages",
              "not_a_checkpoint", "negative_alpha", "nan_alpha", "lr_control_bad_alpha", "baseline_conflict",
              "zero_learning_rate", "zero_beams", "push_without_id", "missing_tokenizer_folder", "tokens_and_sentences",
              "negative_tokens", "dropout_above_one", "label_smoothing_two", "nan_length_penalty",
              "negative_train_samples", "zero_source_length", "average_without_checkpoints", "average_beyond_the_kept",
              "zero_minutes", "zero_validation_beams"]


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
    encoded = run.encode(run.load_splits(args), tokenizer, args)["validation"]
    batch = run.collate(list(encoded.select(range(min(64, len(encoded))))), tokenizer.pad_token_id)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "decoder_input_ids": model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])}
    score = emergence(model, inputs)
    assert records[-1]["emergence_log10_E"] == pytest.approx(score.log10_E, rel=1e-9)
    assert records[-1]["emergence_normalised"] == pytest.approx(score.normalised, rel=1e-9)


# ---------------------------------------------------------------------------------------- recipe features
def test_presets_set_the_recipe_and_flags_override_it():
    small = run.parse_args(["--model_preset", "small"])
    p = run.PRESETS["small"]
    assert (small.model_type, small.learning_rate, small.num_warmup_steps, small.max_tokens_per_batch, small.dropout,
            small.vocab_size) == (p.model_type, p.learning_rate, p.num_warmup_steps, p.max_tokens_per_batch, p.dropout,
                                  p.vocab_size)
    assert small.adam_beta2 == 0.98 and small.lr_scheduler_type == "inverse_sqrt" and small.label_smoothing == 0.1
    mine = run.parse_args(["--model_preset", "small", "--learning_rate", "3e-4", "--model_type", "marian", "--dropout", "0.2"])
    assert (mine.learning_rate, mine.model_type, mine.dropout) == (3e-4, "marian", 0.2)
    assert mine.max_tokens_per_batch == p.max_tokens_per_batch
    assert run.parse_args(["--per_device_train_batch_size", "32"]).max_tokens_per_batch == 0    # sentence batches


@pytest.mark.parametrize("model_type", ["m2m_100", "marian"])
def test_built_model_follows_fairseq_conventions(model_type):
    """Shared source/target/output embedding, scaled embeddings, ReLU, eos starts the decoder, no LayerDrop, SDPA; and
    m2m_100 is the pre-LN Transformer (a LayerNorm before each sub-layer and a final one), marian the post-LN one."""
    args, model = _tiny_model(["--model_type", model_type, "--dropout", "0.1", "--config_overrides", ""])
    cfg = model.config
    enc, dec = model.get_encoder(), model.get_decoder()
    assert enc.embed_tokens.weight.data_ptr() == dec.embed_tokens.weight.data_ptr() == \
        model.get_output_embeddings().weight.data_ptr()
    assert cfg.scale_embedding and cfg.activation_function == "relu" and cfg._attn_implementation == "sdpa"
    assert cfg.decoder_start_token_id == cfg.eos_token_id and cfg.encoder_layerdrop == cfg.decoder_layerdrop == 0
    assert cfg.dropout == 0.1 and cfg.attention_dropout == 0.0
    emb = enc.embed_tokens.weight[3:]                           # fairseq's N(0, d^-1/2) token embeddings
    assert cfg.init_std == cfg.d_model ** -0.5 and abs(float(emb.std()) / cfg.init_std - 1) < 0.1
    assert hasattr(enc, "layer_norm") == hasattr(dec, "layer_norm") == (model_type == "m2m_100")
    # pre-LN: with the final LayerNorm removed, a block's output is its input plus sub-layers of normalised inputs, so
    # scaling a block's input by c changes the residual stream linearly in the skip; check the defining order directly
    layer = enc.layers[0].eval()
    x = torch.randn(1, 5, cfg.d_model)
    with torch.no_grad():
        h = layer.self_attn_layer_norm(x) if model_type == "m2m_100" else x
        attn = layer.self_attn(hidden_states=h, attention_mask=None)[0]
        h = x + attn
        if model_type == "m2m_100":
            expected = h + layer.fc2(torch.relu(layer.fc1(layer.final_layer_norm(h))))
        else:
            h = layer.self_attn_layer_norm(h)
            expected = layer.final_layer_norm(h + layer.fc2(torch.relu(layer.fc1(h))))
        out = layer(x, attention_mask=None)
        out = out[0] if isinstance(out, tuple) else out
    assert torch.allclose(out, expected, atol=1e-5)
    ids = torch.tensor([[5, 6, 7]])
    labels = torch.tensor([[8, 9, cfg.eos_token_id]])
    start = run.decoder_inputs(labels, cfg.decoder_start_token_id, cfg.pad_token_id)
    assert start.tolist() == [[cfg.eos_token_id, 8, 9]]
    padded = run.decoder_inputs(torch.tensor([[8, -100, -100]]), cfg.decoder_start_token_id, cfg.pad_token_id)
    assert padded.tolist() == [[cfg.eos_token_id, 8, cfg.pad_token_id]]
    assert model(input_ids=ids, decoder_input_ids=start).logits.shape == (1, 3, cfg.vocab_size)


@pytest.mark.slow
def test_average_of_the_last_checkpoints_is_what_is_evaluated_and_saved(tmp_path):
    out = tmp_path / "avg"
    results = _main([*TINY, "--max_train_steps", "12", "--checkpointing_steps", "5", "--average_last_checkpoints", "3",
                     "--checkpoints_total_limit", "3", "--output_dir", out])
    names = ["step_00000005", "step_00000010", "step_00000012"]          # the final step is saved to be averaged
    assert results["averaged_checkpoints"] == names
    saved = [_tensors(out / "checkpoints" / n / "model.safetensors") for n in names]
    final = _tensors(out / "model.safetensors")
    assert any(not torch.equal(saved[0][k], saved[2][k]) for k in saved[0])
    assert final and set(final) <= set(saved[0])
    for key in final:
        mean = (saved[0][key].double() + saved[1][key].double() + saved[2][key].double()) / 3
        assert torch.allclose(final[key].double(), mean, rtol=0, atol=1e-6), key
    # what was evaluated is the averaged model: the logged loss is the saved model's own
    record = _metrics(out)[-1]
    assert record["final"] and record["validation_loss"] == pytest.approx(_independent_loss(out, "validation", N_EVAL),
                                                                         rel=1e-5)
