"""Data paths of examples/translation (all offline, on small files written here): local files through `datasets`
(text / json / parquet / csv / arrow), a local folder in the Hub layout with --max_train_samples, script datasets
refused with the alternatives, the IWSLT14 de-en build of prepare_iwslt14.py on synthetic release files, and both
BLEU numbers equal to sacreBLEU's own computation."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sacrebleu
from sacremoses import MosesTokenizer

ROOT = Path(__file__).resolve().parents[1]
TRANSLATION = ROOT / "examples" / "translation"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run = _load("translation_run_data", TRANSLATION / "run.py")
prep = _load("prepare_iwslt14", TRANSLATION / "prepare_iwslt14.py")
PAIRS = [("Ein Hund läuft.", "A dog runs."), ("Zwei Katzen schlafen.", "Two cats sleep."),
         ("Ein Mann liest.", "A man reads."), ("Kinder spielen Fußball.", "Children play football.")]


def _args(tmp_path, *argv):
    return run.parse_args([*argv, "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out")])


def _pairs(ds) -> list[tuple[str, str]]:
    return list(zip(ds["source"], ds["target"]))


def _write_parquet(path: Path, pairs, layout: str = "translation") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout == "translation":
        table = pa.table({"translation": [{"de": d, "en": e} for d, e in pairs]})
    else:
        table = pa.table({"de": [d for d, _ in pairs], "en": [e for _, e in pairs]})
    pq.write_table(table, path)


# ------------------------------------------------------------------------------------------ local files
def test_every_local_format_reads_the_same_pairs(tmp_path):
    (tmp_path / "p.de").write_text("".join(f" {d}\n" for d, _ in PAIRS) + "\n", encoding="utf-8")   # a blank pair
    with gzip.open(tmp_path / "p.en.gz", "wt", encoding="utf-8") as f:
        f.write("".join(f"{e}\n" for _, e in PAIRS) + "\n")
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"translation": {"de": d, "en": e}}) for d, e in PAIRS) + "\n\n")
    (tmp_path / "p.json").write_text(json.dumps([{"translation": {"de": d, "en": e, "fr": "x"}} for d, e in PAIRS]))
    (tmp_path / "p.csv").write_text("de,en\n" + "".join(f'"{d}","{e}"\n' for d, e in PAIRS), encoding="utf-8")
    _write_parquet(tmp_path / "p.parquet", PAIRS)
    _write_parquet(tmp_path / "flat.parquet", PAIRS, layout="columns")
    import datasets

    datasets.Dataset.from_dict({"de": [d for d, _ in PAIRS], "en": [e for _, e in PAIRS]}).to_parquet(str(tmp_path / "x.parquet"))
    for train in ("p", "p.jsonl", "p.json", "p.csv", "p.parquet", "flat.parquet", "x.parquet"):
        splits = run.load_splits(_args(tmp_path, "--train_file", str(tmp_path / train),
                                       "--validation_file", str(tmp_path / "p.jsonl")))
        assert _pairs(splits["train"]) == PAIRS, train                     # stripped, the blank pair dropped
        assert _pairs(splits["validation"]) == PAIRS


def test_encoding_is_cached_by_datasets(tmp_path):
    """The tokenized training split of a file-backed dataset is written to (and read back from) datasets' cache."""
    args = _args(tmp_path, "--train_file", str(ROOT / "examples/translation/data/multi30k_sample/validation"),
                 "--validation_file", str(ROOT / "examples/translation/data/multi30k_sample/validation"))
    splits = run.load_splits(args)
    tokenizer = run.train_tokenizer(splits["train"], 400)
    first = run.encode(splits, tokenizer, args)["train"]
    again = run.encode(run.load_splits(args), tokenizer, args)["train"]
    assert first.cache_files and first.cache_files == again.cache_files
    assert first["input_ids"] == again["input_ids"] and first["length"] == [max(len(a), len(b)) for a, b in
                                                                             zip(first["input_ids"], first["labels"])]


def test_a_local_folder_in_the_hub_layout_with_max_train_samples(tmp_path):
    """A parquet folder laid out as Hub datasets are (wmt/wmt14: <config>/<split>-NNNNN-of-NNNNN.parquet + README
    configs) goes through the same load_dataset call as the Hub."""
    hub = tmp_path / "wmt14"
    many = PAIRS * 5
    for split, rows in (("train", many), ("validation", PAIRS[:2]), ("test", PAIRS[2:])):
        _write_parquet(hub / "de-en" / f"{split}-00000-of-00001.parquet", rows)
    (hub / "README.md").write_text("---\nconfigs:\n- config_name: de-en\n  data_files:\n" + "".join(
        f"  - split: {s}\n    path: de-en/{s}-*\n" for s in ("train", "validation", "test")) + "---\n")
    splits = run.load_splits(_args(tmp_path, "--dataset_name", str(hub), "--dataset_config_name", "de-en",
                                   "--max_train_samples", "7"))
    assert _pairs(splits["train"]) == many[:7]
    assert _pairs(splits["validation"]) == PAIRS[:2] and _pairs(splits["test"]) == PAIRS[2:]
    # a folder without a validation split: the last tenth of train (at most 1000 pairs) is held out
    flat = tmp_path / "flat"
    _write_parquet(flat / "data" / "train-00000-of-00001.parquet", many)
    splits = run.load_splits(_args(tmp_path, "--dataset_name", str(flat)))
    assert _pairs(splits["train"]) == many[:18] and _pairs(splits["validation"]) == many[18:]


@pytest.mark.slow
def test_training_from_a_hub_layout_folder(tmp_path):
    hub = tmp_path / "hub"
    sample = run.read_parallel_text(str(ROOT / "examples/translation/data/multi30k_sample/train"), "de", "en")
    rows = _pairs(sample.select(range(120)))
    _write_parquet(hub / "data" / "train-00000-of-00001.parquet", rows[:100])
    _write_parquet(hub / "data" / "validation-00000-of-00001.parquet", rows[100:])
    try:
        results = run.main(["--dataset_name", str(hub), "--model_preset", "tiny", "--vocab_size", "300",
                            "--max_train_steps", "3", "--no_progress_bar", "--num_threads", "1",
                            "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out")])
    finally:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    assert results["step"] == 3 and results["validation_sentences"] == 20
    assert (tmp_path / "out" / "validation_predictions.txt").read_text().count("\n") == 20


# ------------------------------------------------------------------------------------------- bad input
def _error(tmp_path, capsys, *argv) -> str:
    capsys.readouterr()
    code = run.common.run_cli(run.main, [*argv, "--cache_dir", str(tmp_path / "cache"), "--output_dir",
                                         str(tmp_path / "out"), "--model_preset", "tiny", "--no_progress_bar"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def test_script_datasets_are_refused_with_the_alternatives(tmp_path, capsys):
    line = _error(tmp_path, capsys, "--dataset_name", "iwslt2017", "--dataset_config_name", "iwslt2017-de-en")
    assert "--dataset_name iwslt2017 is a dataset script" in line
    assert "prepare_iwslt14.py" in line and "wmt/wmt14" in line
    script = tmp_path / "my_script_dataset"
    script.mkdir()
    (script / "my_script_dataset.py").write_text("import datasets\n")
    line = _error(tmp_path, capsys, "--dataset_name", str(script))
    assert f"--dataset_name {script} is a dataset script" in line and "prepare_iwslt14.py" in line


def test_bad_data_files_are_one_line(tmp_path, capsys):
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps({"translation": {"de": d, "en": e}}) for d, e in PAIRS) + "\n")
    columns = tmp_path / "columns.parquet"
    pq.write_table(pa.table({"a": ["x"], "b": ["y"]}), columns)
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not a parquet file at all")
    hole = tmp_path / "hole.csv"
    hole.write_text('de,en\n"Ein Hund.","A dog."\n"Eine Katze.",\n')
    nolang = tmp_path / "nolang.parquet"
    _write_parquet(nolang, PAIRS)
    hub = tmp_path / "hub"
    _write_parquet(hub / "de-en" / "train-00000-of-00001.parquet", PAIRS)
    (hub / "README.md").write_text("---\nconfigs:\n- config_name: de-en\n  data_files:\n  - split: train\n"
                                   "    path: de-en/train-*\n---\n")
    cases = [
        (["--train_file", str(columns), "--validation_file", str(good)], [str(columns), "found columns: a, b"]),
        (["--train_file", str(garbage), "--validation_file", str(good)], [str(garbage), "cannot read it as parquet"]),
        (["--train_file", str(hole), "--validation_file", str(good)], [f"{hole}: row 2", "no 'en' text"]),
        (["--train_file", str(nolang), "--validation_file", str(good), "--target_lang", "fr"],
         [str(nolang), "language 'fr' not in the translation pairs", "found: de, en"]),
        (["--dataset_name", str(hub), "--dataset_config_name", "fr-en"], ["cannot load dataset", "fr-en"]),
        (["--train_file", str(good), "--validation_file", str(good), "--max_tokens_per_batch", "3"],
         ["--max_tokens_per_batch 3 is below the longest training pair", "tokens after truncation"]),
    ]
    for argv, parts in cases:
        line = _error(tmp_path, capsys, *argv)
        assert all(p in line for p in parts), (argv, line)
    assert not (tmp_path / "out" / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------- IWSLT14
def _release(folder: Path, n_train: int = 60) -> dict:
    """Synthetic IWSLT 2014 de-en release files in the real layout, with lines each step must drop or keep."""
    folder.mkdir(parents=True)
    de, en = [], []
    for i in range(n_train):
        de.append(f"Das ist Satz Nummer {i}, sagte sie.")
        en.append(f"This is sentence number {i}, she said.")
    meta = {"de": ["<url>http://www.ted.com/talks/x</url>", "<keywords>talks, science</keywords>",
                   "<talkid>1</talkid>", "<title>Ein Vortrag</title>", "<description>TED-Vortrag</description>"],
            "en": ["<url>http://www.ted.com/talks/x</url>", "<keywords>talks, science</keywords>",
                   "<talkid>1</talkid>", "<title>A talk</title>", "<description>TED talk</description>"]}
    extra = [("", "Empty on one side."), ("Kurz.", "This English side is far too long for it."),
             (" ".join(["Wort"] * 176), " ".join(["word"] * 176)), ("Don’t panic.", "Don’t panic.")]
    lines = {"de": meta["de"] + de + [a for a, _ in extra], "en": meta["en"] + en + [b for _, b in extra]}
    for lang in ("de", "en"):
        (folder / f"train.tags.de-en.{lang}").write_text("\n".join(lines[lang]) + "\n", encoding="utf-8")
    for k, name in enumerate(prep.TEST_SETS):
        for lang, text in (("de", "Test {k}.{j}: Er ist’s."), ("en", "Test {k}.{j}: It’s him.")):
            segs = "".join(f'<seg id="{j + 1}"> {text.format(k=k, j=j)} </seg>\n' for j in range(k + 1))
            (folder / f"{name}.de-en.{lang}.xml").write_text(
                f'<?xml version="1.0" encoding="UTF-8"?>\n<mteval>\n<srcset setid="{name}" srclang="{lang}">\n'
                f'<doc docid="1">\n<talkid>1</talkid>\n{segs}</doc>\n</srcset>\n</mteval>\n', encoding="utf-8")
    return lines


def test_prepare_iwslt14_builds_the_fairseq_split(tmp_path):
    _release(tmp_path / "release" / "de-en")
    out = tmp_path / "iwslt14"
    assert prep.main(["--source_dir", str(tmp_path / "release"), "--output_dir", str(out)]) == 0
    read = {f"{s}.{l}": (out / f"{s}.{l}").read_text(encoding="utf-8").splitlines()
            for s in ("train", "valid", "test") for l in ("de", "en")}
    tok = {lang: MosesTokenizer(lang=lang) for lang in ("de", "en")}
    # <url>/<keywords>/<talkid> lines dropped; the title kept without its tags; the description pair ("TED-Vortrag",
    # one token, against "TED talk") dropped by the 1.5 length ratio, like the empty, the 1:9 and the 176-token pairs
    cleaned = {lang: [] for lang in ("de", "en")}
    raw_de = ["Ein Vortrag"] + [f"Das ist Satz Nummer {i}, sagte sie." for i in range(60)] + ["Don’t panic."]
    raw_en = ["A talk"] + [f"This is sentence number {i}, she said." for i in range(60)] + ["Don’t panic."]
    for lang, raw in (("de", raw_de), ("en", raw_en)):
        cleaned[lang] = [tok[lang].tokenize(t, return_str=True, escape=True).lower() for t in raw]
    # 62 pairs survive cleaning; every 23rd goes to valid
    assert read["valid.de"] == [cleaned["de"][22], cleaned["de"][45]] and read["valid.en"] == [cleaned["en"][22], cleaned["en"][45]]
    assert read["train.de"] == [l for i, l in enumerate(cleaned["de"], 1) if i % 23] and len(read["train.en"]) == 60
    assert "sagte sie ." in read["train.de"][5] and read["train.de"][0] == "ein vortrag"
    # test: dev2010, TEDX dev2012, tst2010, tst2011, tst2012 (1, 2, 3, 4, 5 segments), ’ -> ' before tokenising
    assert len(read["test.en"]) == len(read["test.de"]) == 15
    assert read["test.en"][0] == tok["en"].tokenize("Test 0.0: It's him.", return_str=True, escape=True).lower()
    assert read["test.en"][1].startswith("test 1.0") and read["test.en"][3].startswith("test 2.0")
    assert "&apos;" in read["test.en"][0]
    summary = json.loads((out / "prepare_iwslt14.json").read_text())
    assert summary["lines"] == {"train": 60, "valid": 2, "test": 15}
    # the output is what run.py reads with --pretokenized
    splits = run.load_splits(run.parse_args(["--train_file", str(out / "train"), "--validation_file", str(out / "valid"),
                                             "--test_file", str(out / "test"), "--pretokenized",
                                             "--cache_dir", str(tmp_path / "cache")]))
    assert {s: len(d) for s, d in splits.items()} == {"train": 60, "validation": 2, "test": 15}


def test_prepare_iwslt14_bad_input_is_one_line(tmp_path):
    lines = _release(tmp_path / "de-en")
    (tmp_path / "de-en" / "IWSLT14.TED.tst2012.de-en.en.xml").unlink()
    for argv, parts in (
        (["--source_dir", str(tmp_path / "nowhere")], ["no such file or folder"]),
        (["--source_dir", str(tmp_path / "de-en")], ["missing IWSLT14.TED.tst2012.de-en.en.xml"]),
    ):
        proc = subprocess.run([sys.executable, str(TRANSLATION / "prepare_iwslt14.py"), *argv, "--output_dir",
                               str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and all(p in proc.stderr for p in parts), proc.stderr
    (tmp_path / "de-en" / "train.tags.de-en.en").write_text("\n".join(lines["en"][:-1]) + "\n")
    _release(tmp_path / "x" / "de-en")
    (tmp_path / "x" / "de-en" / "train.tags.de-en.en").write_text("\n".join(lines["en"][:-1]) + "\n")
    proc = subprocess.run([sys.executable, str(TRANSLATION / "prepare_iwslt14.py"), "--source_dir", str(tmp_path / "x"),
                           "--output_dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "must be aligned" in proc.stderr and proc.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------- BLEU
def test_both_bleu_numbers_equal_sacrebleus_own():
    metric = run.common.load_metric("sacrebleu_offline")
    hyps = ["A dog's running on the grass.", "Two men, \"smiling\", sit.", "A woman rides a bike."]
    refs = ["A dog is running on the grass.", "Two men are sitting and \"smiling\".", "A woman rides her bike."]
    scores = metric.compute(predictions=hyps, references=refs, tokenized_bleu_lang="en")
    assert scores["score"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score, abs=1e-12)
    moses = MosesTokenizer(lang="en")
    tok = lambda xs: [moses.tokenize(x, return_str=True, escape=True) for x in xs]      # noqa: E731
    expected = sacrebleu.corpus_bleu(tok(hyps), [tok(refs)], tokenize="none", lowercase=True, force=True).score
    assert scores["tokenized_bleu"] == pytest.approx(expected, abs=1e-12)
    assert scores["tokenized_bleu"] != pytest.approx(scores["score"])               # a different number, labelled
    assert "tok:none" in scores["tokenized_signature"] and "case:lc" in scores["tokenized_signature"]
    assert "input:moses-en" in scores["tokenized_signature"] and "tok:13a" in scores["signature"]
    pre = metric.compute(predictions=tok(hyps), references=tok(refs), tokenized_bleu_lang="en", pretokenized=True)
    assert pre["tokenized_bleu"] == pytest.approx(expected, abs=1e-12) and "input:pretokenized" in pre["tokenized_signature"]


# ------------------------------------------------------------------------------------------- GPU script
@pytest.mark.slow
def test_gpu_script_runs_end_to_end_on_cpu_with_a_tiny_budget(tmp_path):
    """benchmarks/gpu_multi30k.sh on the built-in sample laid out as Multi30k, a tiny model and a few seconds of
    training: the stop-after-minutes budget, epoch checkpoints, averaging, beam search and the summary JSON."""
    data = tmp_path / "multi30k"
    data.mkdir()
    sample = ROOT / "examples/translation/data/multi30k_sample"
    for ours, theirs in (("train", "train"), ("validation", "val"), ("test", "test_2016_flickr")):
        for lang in ("de", "en"):
            (data / f"{theirs}.{lang}.gz").write_bytes((sample / f"{ours}.{lang}.gz").read_bytes())
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "EXTRA_ARGS": "--model_preset tiny --max_train_samples 300 --max_eval_samples 20 --max_tokens_per_batch 400 "
                         "--num_beams 2 --num_threads 1 --cache_dir " + str(tmp_path / "cache")}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_multi30k.sh"), str(data), "0.05"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((out / "gpu_multi30k.json").read_text())
    assert summary["exit_code"] == 0 and summary["device"] == "cpu" and summary["mixed_precision"] == "no"
    final = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert summary["test_bleu"] == final["test_bleu"] and summary["test_tok_bleu"] == final["test_tok_bleu"]
    assert 1 <= len(summary["averaged_checkpoints"]) <= 5 and summary["steps"] == final["step"]
    assert (out / "test_predictions.txt").read_text().count("\n") == 20
    bad = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_multi30k.sh"), str(tmp_path / "nowhere")],
                         env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "nowhere/train.{de,en}.gz not found" in bad.stderr
