#!/usr/bin/env python
"""Train an encoder-decoder Transformer for translation, built from a config, with the emergence-promoting
initialisation or a baseline, and report detokenised sacreBLEU (and chrF).

    accelerate launch examples/translation/run.py                                 # built-in de->en sample, offline
    accelerate launch examples/translation/run.py --init xavier                   # the paper's baseline, same budget
    accelerate launch examples/translation/run.py --dataset_name iwslt2017 --dataset_config_name iwslt2017-de-en \
        --model_preset iwslt --init emergence --alpha 1.2 --output_dir out/iwslt
    accelerate launch examples/translation/run.py --train_file ../shared/data/multi30k/train \
        --validation_file ../shared/data/multi30k/val --test_file ../shared/data/multi30k/test_2016_flickr

Data: parallel text (PREFIX.de / PREFIX.en, gzip allowed), JSON lines ({"translation": {"de": ..., "en": ...}}), or a
Hub dataset with a "translation" column. The tokenizer (shared source/target BPE) is trained on the training data.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/common.py
import common  # noqa: E402
from common import UsageError  # noqa: E402

logger = logging.getLogger("hf_emergence.examples.translation")
BUILTIN_DATA = Path(__file__).resolve().parent / "data" / "multi30k_sample"
MODEL_TYPES = ("marian", "bart", "mbart", "m2m_100", "pegasus", "t5", "mt5")
SPECIALS = ("<pad>", "</s>", "<unk>")
SINUSOIDAL_POSITIONS = ("marian", "pegasus", "m2m_100")
# Model sizes. "small" trains in minutes on 2 CPU cores; "iwslt" is fairseq's transformer_iwslt_de_en (the paper's
# IWSLT14 setting: 6+6 layers, d=512, FFN 1024, 4 heads) for GPU users. Keys use BART-family names; T5 maps them.
PRESETS = {
    "tiny": dict(d_model=32, layers=2, ffn=64, heads=2, dropout=0.0),
    "small": dict(d_model=256, layers=3, ffn=512, heads=4, dropout=0.1),
    "iwslt": dict(d_model=512, layers=6, ffn=1024, heads=4, dropout=0.3),
}


# ------------------------------------------------------------------------------------------- arguments
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = common.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("data")
    g.add_argument("--dataset_name", default=None, help="a Hub dataset with a 'translation' column (needs a network)")
    g.add_argument("--dataset_config_name", default=None)
    g.add_argument("--train_file", default=None, help="PREFIX of PREFIX.<lang>[.gz] files, or a .json/.jsonl file")
    g.add_argument("--validation_file", default=None)
    g.add_argument("--test_file", default=None, help="scored once at the end (the reported number)")
    g.add_argument("--source_lang", default="de")
    g.add_argument("--target_lang", default="en")
    g.add_argument("--max_source_length", type=int, default=128)
    g.add_argument("--max_target_length", type=int, default=128, help="truncation and generation length")
    g.add_argument("--max_train_samples", type=int, default=None)
    g.add_argument("--max_eval_samples", type=int, default=None)
    g.add_argument("--tokenizer_name", default=None, help="a local tokenizer folder (default: train one on the data)")
    g.add_argument("--vocab_size", type=int, default=8000, help="size of the shared BPE vocabulary to train")
    common.add_model_args(parser, MODEL_TYPES, "marian")
    g = parser.add_argument_group("translation")
    g.add_argument("--model_preset", default="small", choices=sorted(PRESETS))
    g.add_argument("--label_smoothing", type=float, default=0.1)
    g.add_argument("--num_beams", type=int, default=4)
    common.add_init_args(parser)
    common.add_training_args(parser, batch_size=64, learning_rate=1e-3, epochs=3, weight_decay=0.0001, warmup=200,
                             scheduler="inverse_sqrt")
    common.add_diagnostics_args(parser)
    common.add_run_args(parser, default_output_dir="out/translation")
    args = parser.parse_args(argv)
    common.check_common_args(args)
    if args.source_lang == args.target_lang:
        raise UsageError(f"--source_lang and --target_lang are both {args.source_lang!r}")
    if sum(x is not None for x in (args.dataset_name, args.train_file)) > 1:
        raise UsageError("give either --dataset_name or --train_file, not both")
    common.check_ranges(args, {"num_beams": common.AT_LEAST_1, "label_smoothing": common.FRACTION,
                               "max_source_length": common.AT_LEAST_1, "max_target_length": common.AT_LEAST_1,
                               "vocab_size": common.AT_LEAST_1})
    return args


# ------------------------------------------------------------------------------------------------ data
def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def _lang_file(prefix: str, lang: str) -> Path:
    for candidate in (Path(f"{prefix}.{lang}"), Path(f"{prefix}.{lang}.gz")):
        if candidate.is_file():
            return candidate
    raise UsageError(f"missing file {prefix}.{lang} (or {prefix}.{lang}.gz): expected one sentence per line in {lang!r}")


def read_parallel_text(prefix: str, src: str, tgt: str) -> list[tuple[str, str]]:
    """Aligned PREFIX.src / PREFIX.tgt files; line counts must match and no side may be empty."""
    src_path, tgt_path = _lang_file(prefix, src), _lang_file(prefix, tgt)
    with _open_text(src_path) as f:
        sources = [line.rstrip("\n") for line in f]
    with _open_text(tgt_path) as f:
        targets = [line.rstrip("\n") for line in f]
    if len(sources) != len(targets):
        raise UsageError(f"{src_path} has {len(sources)} lines but {tgt_path} has {len(targets)}: "
                         "the files must be aligned line by line")
    return list(zip(sources, targets))


def read_json_lines(path: str, src: str, tgt: str) -> list[tuple[str, str]]:
    """JSON lines (or a JSON list) of {"translation": {src: ..., tgt: ...}}."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"missing file {path}")
    with _open_text(p) as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            records = [(i + 1, r) for i, r in enumerate(json.loads(text))]
        except json.JSONDecodeError as err:
            raise UsageError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    else:
        records = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append((i, json.loads(line)))
                except json.JSONDecodeError as err:
                    raise UsageError(f"{path}:{i}: not valid JSON ({err.msg})") from None
    pairs = []
    for line, record in records:
        pair = record.get("translation") if isinstance(record, dict) else None
        if not isinstance(pair, dict):
            raise UsageError(f'{path}:{line}: expected {{"translation": {{"{src}": ..., "{tgt}": ...}}}}')
        for lang in (src, tgt):
            if not isinstance(pair.get(lang), str):
                raise UsageError(f"{path}:{line}: language {lang!r} not in this pair (found: {', '.join(sorted(pair))})")
        pairs.append((pair[src], pair[tgt]))
    return pairs


def read_file(path: str, src: str, tgt: str) -> list[tuple[str, str]]:
    name = path[:-3] if path.endswith(".gz") else path
    return read_json_lines(path, src, tgt) if name.endswith((".json", ".jsonl")) else read_parallel_text(path, src, tgt)


def read_hub_dataset(args: argparse.Namespace) -> dict[str, list[tuple[str, str]]]:
    import datasets

    try:
        raw = datasets.load_dataset(args.dataset_name, args.dataset_config_name)
    except Exception as err:  # not found / offline / bad config: one line, not a datasets traceback
        raise UsageError(f"cannot load dataset {args.dataset_name!r} ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    out = {}
    for split, ds in raw.items():
        if "translation" not in ds.column_names:
            raise UsageError(f"dataset {args.dataset_name!r} split {split!r} has no 'translation' column (columns: {ds.column_names})")
        first = ds[0]["translation"] if len(ds) else {}
        for lang in (args.source_lang, args.target_lang):
            if len(ds) and lang not in first:
                raise UsageError(f"language {lang!r} not in dataset {args.dataset_name!r} (found: {', '.join(sorted(first))})")
        out[split] = [(t[args.source_lang], t[args.target_lang]) for t in ds["translation"]]
    return out


def load_splits(args: argparse.Namespace) -> dict[str, list[tuple[str, str]]]:
    """{"train", "validation"[, "test"]} -> list of (source, target) sentence pairs."""
    src, tgt = args.source_lang, args.target_lang
    if args.dataset_name:
        splits = read_hub_dataset(args)
        if "validation" not in splits and "train" in splits:
            splits["validation"] = splits["train"][-1000:]
            splits["train"] = splits["train"][:-1000]
    elif args.train_file:
        splits = {"train": read_file(args.train_file, src, tgt)}
        if args.validation_file:
            splits["validation"] = read_file(args.validation_file, src, tgt)
        if args.test_file:
            splits["test"] = read_file(args.test_file, src, tgt)
    else:
        if (src, tgt) not in (("de", "en"), ("en", "de")):
            raise UsageError(f"the built-in sample is German-English; languages {src!r}->{tgt!r} need --train_file")
        splits = {s: read_parallel_text(str(BUILTIN_DATA / s), src, tgt) for s in ("train", "validation", "test")}
    if "train" not in splits:
        raise UsageError("no training split found")
    if "validation" not in splits:
        raise UsageError("no validation data: pass --validation_file")
    if args.max_train_samples:
        splits["train"] = splits["train"][: args.max_train_samples]
    if args.max_eval_samples:
        for s in ("validation", "test"):
            if s in splits:
                splits[s] = splits[s][: args.max_eval_samples]
    for split, pairs in splits.items():
        kept = [(a.strip(), b.strip()) for a, b in pairs if a.strip() and b.strip()]
        if not kept:
            origin = {"train": args.train_file, "validation": args.validation_file, "test": args.test_file}[split] \
                if args.train_file else None   # name the file the user gave
            raise UsageError(f"the {split} data{f' ({origin})' if origin else ''} is empty "
                             "(no line pair with text on both sides)")
        splits[split] = kept
    return splits


# ------------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(pairs: list[tuple[str, str]], vocab_size: int):
    """A shared source/target BPE (Metaspace, so decoding restores the detokenised text) wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [s for pair in pairs for s in pair]
    alphabet = {ch for t in texts for ch in t} | {"▁"}
    if vocab_size < len(alphabet) + len(SPECIALS):
        raise UsageError(f"--vocab_size {vocab_size} is too small: the training data alone has {len(alphabet)} distinct "
                         f"characters plus {len(SPECIALS)} special tokens")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                                       min_frequency=2, show_progress=False))
    eos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A $B </s>", special_tokens=[("</s>", eos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def get_tokenizer(args: argparse.Namespace, train_pairs: list[tuple[str, str]], accelerator, resuming: bool):
    """--tokenizer_name, else the tokenizer saved with a run being resumed, else a new one (trained by the main process)."""
    from transformers import AutoTokenizer

    saved = Path(args.output_dir) / "tokenizer"
    if args.tokenizer_name:
        if not Path(args.tokenizer_name).is_dir():
            raise UsageError(f"--tokenizer_name {args.tokenizer_name}: not a local tokenizer folder")
        return AutoTokenizer.from_pretrained(args.tokenizer_name)
    if args.model_name_or_path and Path(args.model_name_or_path, "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(args.model_name_or_path)
    with accelerator.main_process_first():
        if accelerator.is_main_process and not (resuming and (saved / "tokenizer.json").is_file()):
            train_tokenizer(train_pairs, args.vocab_size).save_pretrained(saved)
    return AutoTokenizer.from_pretrained(saved)


def encode(pairs: list[tuple[str, str]], tokenizer, args: argparse.Namespace) -> list[dict[str, Any]]:
    sources = tokenizer([s for s, _ in pairs], max_length=args.max_source_length, truncation=True)["input_ids"]
    targets = tokenizer(text_target=[t for _, t in pairs], max_length=args.max_target_length, truncation=True)["input_ids"]
    return [{"input_ids": src, "labels": tgt, "index": i} for i, (src, tgt) in enumerate(zip(sources, targets))]


def collate(features: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest in the batch; padded labels are -100 (ignored by the loss)."""
    def pad(rows: list[list[int]], value: int) -> torch.Tensor:
        width = max(len(r) for r in rows)
        return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)

    input_ids = pad([f["input_ids"] for f in features], pad_id)
    return {"input_ids": input_ids, "attention_mask": (input_ids != pad_id).long(),
            "labels": pad([f["labels"] for f in features], -100),
            "index": torch.tensor([f["index"] for f in features], dtype=torch.long)}


# ----------------------------------------------------------------------------------------------- model
def build_config(args: argparse.Namespace, tokenizer):
    from transformers import AutoConfig

    p = PRESETS[args.model_preset]
    ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
               decoder_start_token_id=tokenizer.pad_token_id)
    if args.model_type in ("t5", "mt5"):
        size = dict(d_model=p["d_model"], d_ff=p["ffn"], num_layers=p["layers"], num_decoder_layers=p["layers"],
                    num_heads=p["heads"], d_kv=p["d_model"] // p["heads"], dropout_rate=p["dropout"])
    else:
        size = dict(d_model=p["d_model"], encoder_layers=p["layers"], decoder_layers=p["layers"], encoder_ffn_dim=p["ffn"],
                    decoder_ffn_dim=p["ffn"], encoder_attention_heads=p["heads"], decoder_attention_heads=p["heads"],
                    dropout=p["dropout"], max_position_embeddings=max(256, args.max_source_length, args.max_target_length),
                    bos_token_id=tokenizer.pad_token_id)
        if args.model_type in SINUSOIDAL_POSITIONS:
            # fairseq's Transformer convention: token embeddings (std 0.02 here) times sqrt(d_model); unscaled, they are
            # drowned by the fixed sinusoidal positions (amplitude 1) and training starts slowly. Override with
            # --config_overrides scale_embedding=false.
            size["scale_embedding"] = True
    config = AutoConfig.for_model(args.model_type, **ids, **size)
    return common.apply_config_overrides(config, args.config_overrides)


def build_model(args: argparse.Namespace, tokenizer):
    """From --model_name_or_path (weights already initialised), else a fresh build with --init."""
    from transformers import AutoModelForSeq2SeqLM

    from hf_emergence import from_config

    if args.model_name_or_path:
        model = common.load_pretrained(args.model_name_or_path, AutoModelForSeq2SeqLM)
        if model.config.vocab_size != len(tokenizer):
            raise UsageError(f"--model_name_or_path has vocab_size {model.config.vocab_size} but the tokenizer has {len(tokenizer)}")
        return model
    config = build_config(args, tokenizer)
    init = common.emergence_settings(args)
    try:
        model = from_config(AutoModelForSeq2SeqLM, config, init) if init else AutoModelForSeq2SeqLM.from_config(config)
    except (TypeError, ValueError) as err:   # bad --config_overrides values, too few layers for the init
        raise UsageError(f"cannot build {args.model_type}: {str(err).splitlines()[0]}") from None
    gen = model.generation_config
    gen.num_beams, gen.max_length = args.num_beams, args.max_target_length
    gen.decoder_start_token_id, gen.pad_token_id, gen.eos_token_id = (config.decoder_start_token_id, tokenizer.pad_token_id,
                                                                     tokenizer.eos_token_id)
    return model


def forward_logits(accelerator, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Teacher-forced logits. The decoder inputs are the labels shifted right, made by the model's own
    ``prepare_decoder_input_ids_from_labels``; passing ``labels=`` instead would make the model compute (and the
    script discard) a second, unsmoothed cross-entropy over the whole vocabulary."""
    decoder_input_ids = accelerator.unwrap_model(model).prepare_decoder_input_ids_from_labels(labels=batch["labels"])
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 decoder_input_ids=decoder_input_ids).logits


def smoothed_loss(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.view(-1), ignore_index=-100,
                           label_smoothing=smoothing)


# ------------------------------------------------------------------------------------------ evaluation
def generation_length(input_ids: torch.Tensor, args: argparse.Namespace) -> int:
    """Longest output for a batch: 1.5x its longest source + 10 tokens, at most --max_target_length.

    An untrained model rarely emits </s>, so a fixed 128-token limit makes early evaluations several times slower;
    evaluation batches are sorted by length, so the bound is tight per batch and far above real translations.
    """
    return min(args.max_target_length, int(1.5 * input_ids.shape[1]) + 10)



@torch.no_grad()
def evaluate(accelerator, model, dataloader, tokenizer, references: list[str], args: argparse.Namespace,
             split: str) -> dict[str, Any]:
    """Beam-search generation, corpus BLEU/chrF against the raw reference text, and teacher-forced loss.

    Generations are padded across processes and gathered with their dataset indices by gather_for_metrics,
    which drops the samples duplicated to even out the last batch: every sentence is scored exactly once.
    Predictions are written to ``<output_dir>/<split>_predictions.txt`` in the data's original order.
    """
    model.eval()
    generator = accelerator.unwrap_model(model)
    predictions: dict[int, str] = {}
    loss_sum, loss_tokens = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device)
    for batch in tqdm(dataloader, desc=f"eval {split}", disable=args.no_progress_bar or not accelerator.is_local_main_process,
                      leave=False):
        labels = batch["labels"]
        logits = forward_logits(accelerator, model, batch)
        token_loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.view(-1), ignore_index=-100,
                                     reduction="none").view(labels.shape)
        out = generator.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 num_beams=args.num_beams, max_length=generation_length(batch["input_ids"], args))
        out = accelerator.pad_across_processes(out, dim=1, pad_index=tokenizer.pad_token_id)
        # per-sentence loss sums go through gather_for_metrics too, so the duplicated samples are not counted
        out, index, sentence_loss, sentence_tokens = accelerator.gather_for_metrics(
            (out, batch["index"], token_loss.sum(1), (labels != -100).sum(1)))
        loss_sum += sentence_loss.sum()
        loss_tokens += sentence_tokens.sum()
        for i, text in zip(index.tolist(), tokenizer.batch_decode(out, skip_special_tokens=True)):
            predictions[i] = text.strip()
    model.train()
    loss = float(loss_sum / loss_tokens.clamp(min=1))
    result: dict[str, Any] = {f"{split}_loss": loss}
    if accelerator.is_main_process:
        order = sorted(predictions)
        metric = common.load_metric("sacrebleu_offline")
        metric.add_batch(predictions=[predictions[i] for i in order], references=[references[i] for i in order])
        scores = metric.compute()
        result.update({f"{split}_bleu": scores["score"], f"{split}_chrf": scores["chrf"],
                       f"{split}_sentences": scores["num_sentences"], "bleu_signature": scores["signature"]})
        (Path(args.output_dir) / f"{split}_predictions.txt").write_text("".join(predictions[i] + "\n" for i in order))
    return result


# ------------------------------------------------------------------------------------------------ main
def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    accelerator = common.make_accelerator(args, "translation")
    checkpoints = common.Checkpoints(accelerator, args.output_dir, args.checkpoints_total_limit, args.overwrite_output_dir)
    resume_path = checkpoints.resolve(args.resume_from_checkpoint)
    set_seed(args.seed)

    # Data and tokenizer (the main process trains and saves the tokenizer, the others load it).
    with accelerator.main_process_first():
        splits = load_splits(args)
    tokenizer = get_tokenizer(args, splits["train"], accelerator, resuming=resume_path is not None)
    data = {s: encode(pairs, tokenizer, args) for s, pairs in splits.items()}
    references = {s: [t for _, t in pairs] for s, pairs in splits.items()}
    logger.info("data: %s; vocabulary %d", {s: len(d) for s, d in data.items()}, len(tokenizer))

    # Model built from a config after seeding: the seed fixes the initialisation.
    model = build_model(args, tokenizer)
    plan = getattr(model, "emergence_plan", None)
    if plan is not None:
        logger.info("emergence init:\n%s", plan)
    optimizer = common.make_optimizer(model, args, common.lr_plan(args, model))

    pad = tokenizer.pad_token_id
    train_sampler = common.EpochBatchSampler(len(data["train"]), args.per_device_train_batch_size, args.seed,
                                             lengths=[len(f["input_ids"]) + len(f["labels"]) for f in data["train"]])
    train_dl = common.data_loader(data["train"], batch_sampler=train_sampler, collate_fn=lambda b: collate(b, pad))
    eval_dls = {s: common.data_loader(sorted(d, key=lambda f: len(f["input_ids"])), batch_size=args.per_device_eval_batch_size,
                              collate_fn=lambda b: collate(b, pad)) for s, d in data.items() if s != "train"}
    max_steps, _ = common.training_length(args, math.ceil(len(train_sampler) / accelerator.num_processes))
    scheduler = common.make_scheduler(optimizer, args, max_steps, accelerator.num_processes)
    model, optimizer, train_dl, scheduler = accelerator.prepare(model, optimizer, train_dl, scheduler)
    eval_dls = {s: accelerator.prepare(dl) for s, dl in eval_dls.items()}
    max_steps, num_epochs = common.training_length(args, len(train_dl))

    probe = None                                               # fixed batch for --measure_emergence
    if args.measure_emergence:
        first = collate(data["validation"][:64], pad)
        probe = {"input_ids": first["input_ids"], "attention_mask": first["attention_mask"],
                 "decoder_input_ids": accelerator.unwrap_model(model).prepare_decoder_input_ids_from_labels(
                     labels=first["labels"])}

    state, log = common.start_run(accelerator, args, checkpoints, resume_path)
    if args.measure_emergence and not resume_path:
        log.log({"step": 0, "epoch": 0, **common.emergence_report(accelerator, model, probe)})
    progress = tqdm(total=max_steps, initial=state.completed_steps, desc="train",
                    disable=args.no_progress_bar or not accelerator.is_local_main_process)
    timer = common.Timer()

    def evaluate_and_checkpoint(epoch_end: bool) -> None:
        if common.is_due(args.eval_steps, state, epoch_end):
            result = evaluate(accelerator, model, eval_dls["validation"], tokenizer, references["validation"], args, "validation")
            if args.measure_emergence:
                result.update(common.emergence_report(accelerator, model, probe))
            state.last_eval = result
            log.log({"step": state.completed_steps, "epoch": state.epoch, **result})
            if accelerator.is_main_process:
                logger.info("step %d: validation BLEU %.2f, loss %.3f", state.completed_steps,
                            result["validation_bleu"], result["validation_loss"])
        if common.is_due(args.checkpointing_steps, state, epoch_end):
            checkpoints.save(state)

    model.train()
    while state.completed_steps < max_steps and state.epoch < num_epochs:
        train_sampler.use_epoch(state.epoch)
        batches = accelerator.skip_first_batches(train_dl, state.batches_in_epoch) if state.batches_in_epoch else train_dl
        for batch in batches:
            timer.data_ready()
            with accelerator.accumulate(model):
                logits = forward_logits(accelerator, model, batch)
                loss = smoothed_loss(logits, batch["labels"], args.label_smoothing)
                grad_norm = common.optimizer_step(accelerator, model, optimizer, scheduler, loss, args, state, checkpoints)
            timer.step_done(int(batch["attention_mask"].sum() + (batch["labels"] != -100).sum()))
            if not common.count_micro_batch(state, accelerator, len(batch["input_ids"])):
                continue
            progress.update(1)
            if state.completed_steps % args.logging_steps == 0:
                record = common.log_training(log, state, accelerator, loss, grad_norm, scheduler, timer, "tokens")
                progress.set_postfix(loss=f"{record['loss']:.3f}")
            evaluate_and_checkpoint(epoch_end=False)
            common.stop_if_asked(accelerator, state, checkpoints)
            timer.restart()
            if state.completed_steps >= max_steps:
                break
        if common.finish_epoch(state, len(train_dl)):
            evaluate_and_checkpoint(epoch_end=True)
            timer.restart()
    progress.close()

    results = {"step": state.completed_steps}
    for split, dl in eval_dls.items():
        results.update(evaluate(accelerator, model, dl, tokenizer, references[split], args, split))
    log.log({**results, "final": True})
    if accelerator.is_main_process:
        for split in eval_dls:
            print(f"{split}: BLEU {results[f'{split}_bleu']:.2f}  chrF {results[f'{split}_chrf']:.2f}  "
                  f"({results[f'{split}_sentences']} sentences)")
        print(f"sacreBLEU signature: {results['bleu_signature']}")
    metrics = {k.replace("test_", "").replace("validation_", "val_"): v for k, v in results.items()
               if isinstance(v, float) and (k.endswith(("_bleu", "_chrf")))}
    common.save_final(accelerator, model, args, processing_class=tokenizer,
                      title=f"{args.model_type} {args.source_lang}->{args.target_lang} ({args.init} init)",
                      task="translation", auto_class="AutoModelForSeq2SeqLM", example="translation",
                      datasets=(args.dataset_name or ("multi30k" if not args.train_file else "local"),),
                      metrics=metrics)
    accelerator.end_training()
    return results


if __name__ == "__main__":
    sys.exit(common.run_cli(main))
