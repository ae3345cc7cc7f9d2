"""Sentence pairs for examples/translation/run.py, read with `datasets`, and a shared BPE trained on them.

Every source ends as a ``datasets.Dataset`` with two string columns, ``source`` and ``target``:

- parallel text ``PREFIX.<src>`` / ``PREFIX.<tgt>`` (gzip allowed): ``load_dataset("text")`` per side, aligned by line;
- ``.json`` / ``.jsonl`` / ``.parquet`` / ``.csv`` / ``.arrow`` files: ``load_dataset("json" | "parquet" | "csv" |
  "arrow")``, with either a ``translation`` column of ``{src: ..., tgt: ...}`` records or one column per language;
- a Hub dataset, or a local folder in the Hub layout (``<config>/<split>-00000-of-00001.parquet``): ``load_dataset``.

Bad input is a :class:`common.UsageError` naming the file (and line) and what was expected.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path
from typing import Any, Iterator, Optional

import datasets
import torch

from common import UsageError
from common import first_line as _first_line
from common import quiet_datasets as _quiet_datasets

BUILTIN_DATA = Path(__file__).resolve().parent / "data" / "multi30k_sample"
SPECIALS = ("<pad>", "</s>", "<unk>")
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
# Hub datasets that are loading scripts: datasets >= 4 refuses them ("Dataset scripts are no longer supported").
SCRIPT_DATASETS = ("iwslt2017", "iwslt/iwslt2017", "ted_talks_iwslt", "iwslt2017-de-en")
SCRIPT_ALTERNATIVES = ("build IWSLT14 de-en as fairseq does with `python examples/translation/prepare_iwslt14.py "
                       "--source_dir <folder with the IWSLT 2014 de-en release files> --output_dir data/iwslt14` and pass "
                       "--train_file data/iwslt14/train --validation_file data/iwslt14/valid --test_file data/iwslt14/test "
                       "--pretokenized; or use a parquet dataset, e.g. --dataset_name wmt/wmt14 --dataset_config_name de-en "
                       "--max_train_samples N")


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def _is_blank(path: Path) -> bool:
    with _open_text(path) as f:
        return not any(line.strip() for line in f)


def _lang_file(prefix: str, lang: str) -> Path:
    for candidate in (Path(f"{prefix}.{lang}"), Path(f"{prefix}.{lang}.gz")):
        if candidate.is_file():
            return candidate
    raise UsageError(f"missing file {prefix}.{lang} (or {prefix}.{lang}.gz): expected one sentence per line in {lang!r}")


def _builder(path: str) -> Optional[str]:
    name = path[:-3] if path.endswith(".gz") else path
    return FILE_BUILDERS.get(Path(name).suffix)


# ------------------------------------------------------------------------------------------ local files
def read_parallel_text(prefix: str, src: str, tgt: str, cache_dir: Optional[str] = None) -> datasets.Dataset:
    """Aligned PREFIX.src / PREFIX.tgt files (one sentence per line); the line counts must match."""
    paths = {lang: _lang_file(prefix, lang) for lang in (src, tgt)}
    if all(_is_blank(p) for p in paths.values()):
        return datasets.Dataset.from_dict({"source": [], "target": []})
    sides = {}
    for lang, path in paths.items():
        with _quiet_datasets():
            sides[lang] = datasets.load_dataset("text", data_files=str(path), split="train", cache_dir=cache_dir)
    if len(sides[src]) != len(sides[tgt]):
        raise UsageError(f"{paths[src]} has {len(sides[src])} lines but {paths[tgt]} has {len(sides[tgt])}: "
                         "the files must be aligned line by line")
    return sides[src].rename_column("text", "source").add_column("target", sides[tgt]["text"])


def _first_bad_json_line(path: Path) -> str:
    """Where a JSON (lines) file stops parsing, for the error message: datasets only says 'row N'."""
    with _open_text(path) as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            json.loads(text)
        except json.JSONDecodeError as err:
            return f"{path}: not valid JSON ({err.msg} at line {err.lineno})"
        return f"{path}: not a list of translation records"
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as err:
                return f"{path}:{i}: not valid JSON ({err.msg})"
    return f"{path}: not valid JSON lines"


def _record_lines(path: Path) -> list[int]:
    """Line number of each record of a JSON lines file (blank lines are skipped by the reader)."""
    with _open_text(path) as f:
        text = f.read()
    if text.lstrip().startswith("["):
        return list(range(1, len(json.loads(text)) + 1))            # record numbers for a JSON list
    return [i for i, line in enumerate(text.splitlines(), 1) if line.strip()]


def read_table_file(path: str, src: str, tgt: str, cache_dir: Optional[str] = None) -> datasets.Dataset:
    """A .json/.jsonl/.parquet/.csv/.arrow file (gzip allowed for text formats) through its `datasets` builder."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"missing file {path}")
    builder = _builder(path)
    if builder in ("json", "csv") and _is_blank(p):
        return datasets.Dataset.from_dict({"source": [], "target": []})
    try:
        with _quiet_datasets():
            ds = datasets.load_dataset(builder, data_files=str(p), split="train", cache_dir=cache_dir)
    except Exception as err:  # pyarrow's parse errors arrive wrapped in DatasetGenerationError
        if builder == "json":
            raise UsageError(_first_bad_json_line(p)) from None
        raise UsageError(f"{path}: cannot read it as {builder} ({_first_line(err)})") from None
    where = (lambda row: f"{path}:{_record_lines(p)[row]}") if builder == "json" else (lambda row: f"{path}: row {row + 1}")
    return to_pairs(ds, src, tgt, str(path), where)


def _first_null(column) -> Optional[int]:
    """Row of the first null in a pyarrow (chunked) array, or None."""
    import pyarrow.compute as pc

    nulls = pc.is_null(column)
    return int(pc.index(nulls, True).as_py()) if pc.any(nulls).as_py() else None


def to_pairs(ds: datasets.Dataset, src: str, tgt: str, origin: str, where=None) -> datasets.Dataset:
    """``source`` / ``target`` string columns from a ``translation`` column or from one column per language."""
    import pyarrow.compute as pc

    where = where or (lambda row: f"{origin}: row {row + 1}")
    columns = ds.column_names
    if "translation" in columns and not isinstance(ds.features["translation"], dict):
        # records with different language sets arrive as free-form JSON (datasets' Json feature): check row by row
        for row, record in enumerate(ds["translation"]):
            if not isinstance(record, dict):
                raise UsageError(f'{where(row)}: expected {{"translation": {{"{src}": ..., "{tgt}": ...}}}}')
            for lang in (src, tgt):
                if not isinstance(record.get(lang), str):
                    present = ", ".join(sorted(k for k, v in record.items() if v is not None))
                    raise UsageError(f"{where(row)}: language {lang!r} not in this pair (found: {present})")
        return ds.map(lambda b: {"source": [t[src] for t in b["translation"]], "target": [t[tgt] for t in b["translation"]]},
                      batched=True, remove_columns=columns, features=datasets.Features(
                          {"source": datasets.Value("string"), "target": datasets.Value("string")}))
    if "translation" in columns:
        found = sorted(ds.features["translation"])
        missing = [lang for lang in (src, tgt) if lang not in found]
        if missing:
            raise UsageError(f"{origin}: language {missing[0]!r} not in the translation pairs (found: {', '.join(found)})")
        pairs = ds.data.column("translation")
        for lang in (src, tgt):                    # a record without this language reads as null
            row = _first_null(pc.struct_field(pairs, [found.index(lang)]))
            if row is not None:
                record = ds[row]["translation"]
                present = ", ".join(sorted(k for k, v in record.items() if v is not None))
                raise UsageError(f"{where(row)}: language {lang!r} not in this pair (found: {present})")
        return ds.map(lambda b: {"source": [t[src] for t in b["translation"]], "target": [t[tgt] for t in b["translation"]]},
                      batched=True, remove_columns=columns)
    if src in columns and tgt in columns:
        for lang in (src, tgt):
            row = _first_null(ds.data.column(lang))
            if row is not None:
                raise UsageError(f"{where(row)}: no {lang!r} text in this pair")
        return ds.select_columns([src, tgt]).rename_columns({src: "source", tgt: "target"})
    raise UsageError(f'{origin}: expected {{"translation": {{"{src}": ..., "{tgt}": ...}}}} records or columns '
                     f'"{src}" and "{tgt}" (found columns: {", ".join(columns)})')


def read_file(path: str, src: str, tgt: str, cache_dir: Optional[str] = None) -> datasets.Dataset:
    return read_table_file(path, src, tgt, cache_dir) if _builder(path) else read_parallel_text(path, src, tgt, cache_dir)


# ------------------------------------------------------------------------------------------ Hub datasets
def read_hub_dataset(args: argparse.Namespace) -> dict[str, datasets.Dataset]:
    """A Hub dataset (parquet/arrow, e.g. wmt/wmt14 de-en) or a local folder in the same layout."""
    name = args.dataset_name
    if name.lower().rstrip("/") in SCRIPT_DATASETS:
        raise UsageError(f"--dataset_name {name} is a dataset script, which datasets {datasets.__version__} cannot load "
                         f"(scripts were dropped in datasets 4). Instead: {SCRIPT_ALTERNATIVES}")
    try:
        with _quiet_datasets():
            raw = datasets.load_dataset(name, args.dataset_config_name, cache_dir=args.cache_dir)
    except Exception as err:  # not found / offline / bad config: one line, not a datasets traceback
        if "Dataset scripts are no longer supported" in str(err):
            raise UsageError(f"--dataset_name {name} is a dataset script, which datasets {datasets.__version__} cannot "
                             f"load. Instead: {SCRIPT_ALTERNATIVES}") from None
        raise UsageError(f"cannot load dataset {name!r} ({_first_line(err)})") from None
    return {split: to_pairs(ds, args.source_lang, args.target_lang, f"dataset {name!r} split {split!r}")
            for split, ds in raw.items()}


# ---------------------------------------------------------------------------------------------- splits
SPLIT_NAMES = {"validation": ("validation", "valid", "dev"), "test": ("test",)}


def load_splits(args: argparse.Namespace) -> dict[str, datasets.Dataset]:
    """{"train", "validation"[, "test"]} -> Dataset of (source, target) strings, stripped, empty pairs dropped."""
    src, tgt = args.source_lang, args.target_lang
    origin: dict[str, Optional[str]] = {}
    if args.dataset_name:
        raw = read_hub_dataset(args)
        splits = {"train": raw["train"]} if "train" in raw else {}
        for split, names in SPLIT_NAMES.items():
            found = next((raw[n] for n in names if n in raw), None)
            if found is not None:
                splits[split] = found
        if "validation" not in splits and "train" in splits and len(splits["train"]) > 1:
            held_out = min(1000, len(splits["train"]) // 10 or 1)
            splits["validation"] = splits["train"].select(range(len(splits["train"]) - held_out, len(splits["train"])))
            splits["train"] = splits["train"].select(range(len(splits["train"]) - held_out))
        origin = {s: f"dataset {args.dataset_name!r} split {s!r}" for s in splits}
    elif args.train_file:
        given = {"train": args.train_file, "validation": args.validation_file, "test": args.test_file}
        splits = {s: read_file(path, src, tgt, args.cache_dir) for s, path in given.items() if path}
        origin = {s: path for s, path in given.items() if path}
    else:
        if (src, tgt) not in (("de", "en"), ("en", "de")):
            raise UsageError(f"the built-in sample is German-English; languages {src!r}->{tgt!r} need --train_file")
        splits = {s: read_parallel_text(str(BUILTIN_DATA / s), src, tgt, args.cache_dir)
                  for s in ("train", "validation", "test")}
    if "train" not in splits:
        raise UsageError(f"no training split found{f' in dataset {args.dataset_name!r}' if args.dataset_name else ''}")
    if "validation" not in splits:
        raise UsageError("no validation data: pass --validation_file")
    limits = {"train": args.max_train_samples, "validation": args.max_eval_samples, "test": args.max_eval_samples}
    for split, ds in splits.items():
        if limits[split] is not None and limits[split] < len(ds):
            ds = ds.select(range(limits[split]))
        ds = ds.map(lambda b: {"source": [s.strip() for s in b["source"]], "target": [t.strip() for t in b["target"]]},
                    batched=True).filter(lambda b: [bool(s and t) for s, t in zip(b["source"], b["target"])], batched=True)
        if not len(ds):
            where = f" ({origin[split]})" if origin.get(split) else ""
            raise UsageError(f"the {split} data{where} is empty (no line pair with text on both sides)")
        splits[split] = ds
    return splits


# ------------------------------------------------------------------------------------------- tokenizer
def _texts(ds: datasets.Dataset) -> Iterator[list[str]]:
    for batch in ds.iter(batch_size=2000):
        yield batch["source"] + batch["target"]


def train_tokenizer(ds: datasets.Dataset, vocab_size: int):
    """A shared source/target BPE (Metaspace, so decoding restores the text) wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(_texts(ds), trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                                            min_frequency=2, show_progress=False), length=len(ds))
    if tok.get_vocab_size() > vocab_size:     # the trainer keeps every character: the alphabet alone is larger
        raise UsageError(f"--vocab_size {vocab_size} is too small: the training data alone has "
                         f"{tok.get_vocab_size() - len(SPECIALS)} distinct characters plus {len(SPECIALS)} special tokens")
    eos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A $B </s>", special_tokens=[("</s>", eos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def encode(splits: dict[str, datasets.Dataset], tokenizer, args: argparse.Namespace) -> dict[str, datasets.Dataset]:
    """Token ids per split with ``.map(batched=True, num_proc=...)`` (cached by datasets for file-backed data);
    ``index`` is the row, so gathered predictions can be put back in order; ``length`` the longer side."""
    def tokenize(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        sources = tokenizer(batch["source"], max_length=args.max_source_length, truncation=True)["input_ids"]
        targets = tokenizer(text_target=batch["target"], max_length=args.max_target_length, truncation=True)["input_ids"]
        return {"input_ids": sources, "labels": targets, "index": indices,
                "length": [max(len(s), len(t)) for s, t in zip(sources, targets)]}   # fairseq's size of a pair

    num_proc = args.preprocessing_num_workers if args.preprocessing_num_workers and args.preprocessing_num_workers > 1 else None
    return {s: ds.map(tokenize, batched=True, with_indices=True, num_proc=num_proc, remove_columns=ds.column_names,
                      desc=f"tokenizing {s}") for s, ds in splits.items()}


def collate(features: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest in the batch; padded labels are -100 (ignored by the loss)."""
    def pad(rows: list[list[int]], value: int) -> torch.Tensor:
        width = max(len(r) for r in rows)
        return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)

    input_ids = pad([f["input_ids"] for f in features], pad_id)
    return {"input_ids": input_ids, "attention_mask": (input_ids != pad_id).long(),
            "labels": pad([f["labels"] for f in features], -100),
            "index": torch.tensor([f["index"] for f in features], dtype=torch.long)}
