#!/usr/bin/env python
"""Build IWSLT14 German-English the way fairseq's ``examples/translation/prepare-iwslt14.sh`` does (the split the
papers report: ~160k train / ~7k valid / 6,750 test pairs), from the IWSLT 2014 release files you have.

    python examples/translation/prepare_iwslt14.py --source_dir de-en --output_dir data/iwslt14     # or de-en.tgz
    accelerate launch examples/translation/run.py --model_preset iwslt --pretokenized \
        --train_file data/iwslt14/train --validation_file data/iwslt14/valid --test_file data/iwslt14/test

``--source_dir`` is the extracted ``de-en`` folder of the IWSLT 2014 evaluation campaign's release (or its
``.tgz``), holding ``train.tags.de-en.{de,en}`` and the ``IWSLT14.TED*.de-en.{de,en}.xml`` dev/test sets. The steps,
as in prepare-iwslt14.sh:

1. train: drop the lines with ``<url>``, ``<talkid>`` or ``<keywords>``; remove ``<title>``, ``</title>``,
   ``<description>``, ``</description>``; Moses-tokenise (tokenizer.perl -l LANG, default escaping; sacremoses here);
   clean as clean-corpus-n.perl -ratio 1.5 ... 1 175 (whitespace squeezed, pairs dropped if a side is empty, has
   more than 175 tokens or a word over 1000 characters, or the token ratio exceeds 1.5 either way); lowercase.
2. dev/test (every ``IWSLT14.TED*.<lang>.xml``): the text of each ``<seg id="N">`` line, ’ replaced by ', tokenised,
   lowercased.
3. valid = every 23rd line of the cleaned train (lines 23, 46, ...); train = the others;
   test = dev2010 + TEDX dev2012 + tst2010 + tst2011 + tst2012, in that order.

fairseq then learns a joint BPE with 10,000 merges; ``run.py`` trains its own shared BPE on ``train`` instead
(``--vocab_size``, 10,000 in the ``iwslt`` preset). Output: ``<output_dir>/{train,valid,test}.{de,en}`` plus
``prepare_iwslt14.json`` (line counts and the settings). Bad input stops with one line naming the file (exit 2).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tarfile
import tempfile
from multiprocessing import Pool
from pathlib import Path
from typing import Optional, Sequence

SRC, TGT = "de", "en"
TRAIN = "train.tags.de-en.{lang}"
TEST_SETS = ("IWSLT14.TED.dev2010", "IWSLT14.TEDX.dev2012", "IWSLT14.TED.tst2010", "IWSLT14.TED.tst2011",
             "IWSLT14.TED.tst2012")
DROP_TAGS = ("<url>", "<talkid>", "<keywords>")
STRIP_TAGS = ("<title>", "</title>", "<description>", "</description>")
SEG = re.compile(r'<seg id="[0-9]*">\s*')
SEG_END = re.compile(r"\s*</seg>\s*")
RATIO, MIN_TOKENS, MAX_TOKENS, MAX_WORD_LENGTH = 1.5, 1, 175, 1000
VALID_EVERY = 23


class PrepareError(Exception):
    """Bad or missing input: printed as one line, exit code 2."""


# --------------------------------------------------------------------------------------------- steps
def _read_lines(path: Path) -> list[str]:
    """Lines split on newline only, as grep and sed see them (str.splitlines would also split on U+2028 etc.)."""
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    return lines[:-1] if text.endswith("\n") else lines


def train_lines(path: Path) -> list[str]:
    """train.tags: drop metadata lines, strip title/description tags (grep -v / sed of prepare-iwslt14.sh)."""
    out = []
    for line in _read_lines(path):
        if any(tag in line for tag in DROP_TAGS):
            continue
        for tag in STRIP_TAGS:
            line = line.replace(tag, "")
        out.append(line)
    return out


def segment_lines(path: Path) -> list[str]:
    """The text of each ``<seg id="N">`` line of an IWSLT .xml file (grep '<seg id' / sed)."""
    out = []
    for line in _read_lines(path):
        if "<seg id" in line:
            out.append(SEG_END.sub("", SEG.sub("", line)).replace("\u2019", "'"))
    return out


_TOKENIZERS: dict = {}


def _tokenize_one(item: tuple[str, str]) -> str:
    lang, text = item
    if lang not in _TOKENIZERS:
        from sacremoses import MosesTokenizer

        _TOKENIZERS[lang] = MosesTokenizer(lang=lang)
    return _TOKENIZERS[lang].tokenize(text, return_str=True, escape=True)


def tokenize(lines: list[str], lang: str, workers: int) -> list[str]:
    """tokenizer.perl -l LANG (default escaping), through sacremoses."""
    items = [(lang, line) for line in lines]
    if workers <= 1:
        return [_tokenize_one(i) for i in items]
    with Pool(workers) as pool:
        return pool.map(_tokenize_one, items, chunksize=2000)


def clean(src: list[str], tgt: list[str]) -> tuple[list[str], list[str]]:
    """clean-corpus-n.perl -ratio 1.5 CORPUS de en OUT 1 175 on tokenised lines."""
    kept_src, kept_tgt = [], []
    for s, t in zip(src, tgt):
        s, t = " ".join(s.split()), " ".join(t.split())
        if not s or not t:
            continue
        ns, nt = len(s.split(" ")), len(t.split(" "))
        if not (MIN_TOKENS <= ns <= MAX_TOKENS and MIN_TOKENS <= nt <= MAX_TOKENS):
            continue
        if ns / nt > RATIO or nt / ns > RATIO:
            continue
        if max(len(w) for w in s.split(" ") + t.split(" ")) > MAX_WORD_LENGTH:
            continue
        kept_src.append(s)
        kept_tgt.append(t)
    return kept_src, kept_tgt


def _lowercase(lines: list[str]) -> list[str]:
    return [line.lower() for line in lines]


# ---------------------------------------------------------------------------------------------- main
def find_release(source: Path, tmp: Path) -> Path:
    """The folder holding train.tags.de-en.de: ``source`` itself, a ``de-en`` folder inside it, or an extracted .tgz."""
    if source.is_file() and tarfile.is_tarfile(source):
        with tarfile.open(source) as tar:
            tar.extractall(tmp, filter="data")
        source = tmp
    if not source.exists():
        raise PrepareError(f"--source_dir {source}: no such file or folder")
    for folder in (source, source / "de-en", *sorted(p for p in source.rglob("de-en") if p.is_dir())):
        if (folder / TRAIN.format(lang=SRC)).is_file():
            return folder
    raise PrepareError(f"--source_dir {source}: no {TRAIN.format(lang=SRC)} found (expected the extracted de-en folder "
                       "of the IWSLT 2014 release, or its .tgz)")


def prepare(source: Path, output: Path, workers: int = 1) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        release = find_release(source, Path(tmp))
        needed = [release / TRAIN.format(lang=lang) for lang in (SRC, TGT)]
        needed += [release / f"{name}.de-en.{lang}.xml" for name in TEST_SETS for lang in (SRC, TGT)]
        missing = [p.name for p in needed if not p.is_file()]
        if missing:
            raise PrepareError(f"{release}: missing {', '.join(missing)} (the IWSLT14 de-en split needs "
                               f"{TRAIN.format(lang='{de,en}')} and {', '.join(TEST_SETS)} .de-en.{{de,en}}.xml)")
        raw = {lang: train_lines(release / TRAIN.format(lang=lang)) for lang in (SRC, TGT)}
        if len(raw[SRC]) != len(raw[TGT]):
            raise PrepareError(f"{release / TRAIN.format(lang=SRC)} has {len(raw[SRC])} text lines but "
                               f"{release / TRAIN.format(lang=TGT)} has {len(raw[TGT])}: they must be aligned")
        src, tgt = clean(tokenize(raw[SRC], SRC, workers), tokenize(raw[TGT], TGT, workers))
        src, tgt = _lowercase(src), _lowercase(tgt)
        test = {SRC: [], TGT: []}
        for name in TEST_SETS:
            segments = {lang: segment_lines(release / f"{name}.de-en.{lang}.xml") for lang in (SRC, TGT)}
            if len(segments[SRC]) != len(segments[TGT]):
                raise PrepareError(f"{release / f'{name}.de-en.{SRC}.xml'} has {len(segments[SRC])} segments but "
                                   f"the .{TGT}.xml has {len(segments[TGT])}: they must be aligned")
            for lang in (SRC, TGT):
                test[lang] += _lowercase(tokenize(segments[lang], lang, workers))
    splits = {"train": {}, "valid": {}, "test": test}
    for lang, lines in ((SRC, src), (TGT, tgt)):
        splits["valid"][lang] = [l for i, l in enumerate(lines, 1) if i % VALID_EVERY == 0]
        splits["train"][lang] = [l for i, l in enumerate(lines, 1) if i % VALID_EVERY != 0]
    output.mkdir(parents=True, exist_ok=True)
    for split, sides in splits.items():
        for lang, lines in sides.items():
            (output / f"{split}.{lang}").write_text("".join(l + "\n" for l in lines), encoding="utf-8")
    summary = {"lines": {split: len(sides[SRC]) for split, sides in splits.items()},
               "source": str(source), "test_sets": list(TEST_SETS), "valid_every": VALID_EVERY,
               "clean": {"ratio": RATIO, "min_tokens": MIN_TOKENS, "max_tokens": MAX_TOKENS},
               "tokenizer": "sacremoses MosesTokenizer (escape=True), then lowercase"}
    (output / "prepare_iwslt14.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source_dir", required=True, help="the extracted IWSLT 2014 de-en folder, or its .tgz")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--workers", type=int, default=1, help="processes for the Moses tokenizer")
    args = parser.parse_args(argv)
    try:
        if args.workers < 1:
            raise PrepareError(f"--workers must be >= 1, got {args.workers}")
        summary = prepare(Path(args.source_dir), Path(args.output_dir), args.workers)
    except PrepareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.output_dir}: " + ", ".join(f"{k} {v}" for k, v in summary["lines"].items()) + " pairs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
