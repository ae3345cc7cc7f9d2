#!/usr/bin/env python
"""Train an encoder-decoder Transformer for translation, built from a config, with the emergence-promoting
initialisation or a baseline, and report detokenised sacreBLEU (and chrF, and the tokenised lowercased BLEU of
fairseq papers).

    accelerate launch examples/translation/run.py                                 # built-in de->en sample, offline
    accelerate launch examples/translation/run.py --init xavier                   # the paper's baseline, same budget
    accelerate launch examples/translation/run.py --train_file ../shared/data/multi30k/train \
        --validation_file ../shared/data/multi30k/val --test_file ../shared/data/multi30k/test_2016_flickr
    python examples/translation/prepare_iwslt14.py --source_dir iwslt14/de-en --output_dir data/iwslt14
    accelerate launch --mixed_precision bf16 examples/translation/run.py --model_preset iwslt --pretokenized \
        --train_file data/iwslt14/train --validation_file data/iwslt14/valid --test_file data/iwslt14/test

Data: parallel text (PREFIX.de / PREFIX.en, gzip allowed), .json/.jsonl/.parquet/.csv/.arrow files, or a Hub dataset
(or a local folder in the Hub layout) with a "translation" column or one column per language. The tokenizer (a
shared source/target BPE) is trained on the training data. ``--model_preset`` picks a model size and its recipe
(examples/translation/presets.py); every value can be overridden by its flag.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/common.py
sys.path.insert(0, str(Path(__file__).resolve().parent))      # data.py, presets.py
import common  # noqa: E402
import data  # noqa: E402
from common import UsageError  # noqa: E402
from data import collate, encode, load_splits, read_parallel_text, train_tokenizer  # noqa: E402,F401
from presets import PRESETS  # noqa: E402

logger = logging.getLogger("hf_emergence.examples.translation")
MODEL_TYPES = ("marian", "bart", "mbart", "m2m_100", "pegasus", "t5", "mt5")
SINUSOIDAL_POSITIONS = ("marian", "pegasus", "m2m_100")
DEFAULT_PRESET = "small"
RULES = {"num_beams": common.AT_LEAST_1, "validation_num_beams": common.AT_LEAST_1, "max_source_length": common.AT_LEAST_1,
         "max_target_length": common.AT_LEAST_1, "vocab_size": common.AT_LEAST_1, "average_last_checkpoints": common.AT_LEAST_1,
         "max_tokens_per_batch": common.AT_LEAST_0, "preprocessing_num_workers": common.AT_LEAST_1,
         "dropout": common.FRACTION, "attention_dropout": common.FRACTION, "label_smoothing": common.FRACTION,
         "stop_after_minutes": common.POSITIVE, "length_penalty": (math.isfinite, "a finite number")}


# ------------------------------------------------------------------------------------------- arguments
def _given(argv: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = common.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("data")
    g.add_argument("--dataset_name", default=None,
                   help="a Hub dataset (parquet/arrow, e.g. wmt/wmt14) or a local folder in the Hub layout")
    g.add_argument("--dataset_config_name", default=None, help="e.g. de-en")
    g.add_argument("--train_file", default=None, help="PREFIX of PREFIX.<lang>[.gz] files, or a .json/.jsonl/.parquet/.csv/.arrow file")
    g.add_argument("--validation_file", default=None)
    g.add_argument("--test_file", default=None, help="scored once at the end (the reported number)")
    g.add_argument("--source_lang", default="de")
    g.add_argument("--target_lang", default="en")
    g.add_argument("--max_source_length", type=int, default=128)
    g.add_argument("--max_target_length", type=int, default=128, help="truncation and generation length")
    g.add_argument("--max_train_samples", type=int, default=None)
    g.add_argument("--max_eval_samples", type=int, default=None)
    g.add_argument("--cache_dir", default=None, help="datasets cache folder (default: datasets' own)")
    g.add_argument("--preprocessing_num_workers", type=int, default=None, help="processes for tokenizing (datasets .map)")
    g.add_argument("--tokenizer_name", default=None, help="a local tokenizer folder (default: train one on the data)")
    g.add_argument("--vocab_size", type=int, help="size of the shared BPE vocabulary to train")
    g.add_argument("--pretokenized", action="store_true",
                   help="the text is already Moses-tokenised and lowercased (prepare_iwslt14.py): the tokenised BLEU "
                        "scores it as it is, as fairseq-generate does")
    common.add_model_args(parser, MODEL_TYPES, "marian")
    g = parser.add_argument_group("translation recipe (defaults from --model_preset)")
    g.add_argument("--model_preset", default=DEFAULT_PRESET, choices=sorted(PRESETS),
                   help="model size and recipe, see examples/translation/presets.py")
    g.add_argument("--max_tokens_per_batch", type=int,
                   help="batch by tokens (fairseq's --max-tokens: n pairs x the longest side, after padding); "
                        "0, or giving --per_device_train_batch_size, batches by sentence count")
    g.add_argument("--dropout", type=float)
    g.add_argument("--attention_dropout", type=float)
    g.add_argument("--label_smoothing", type=float)
    g.add_argument("--num_beams", type=int)
    g.add_argument("--length_penalty", type=float, help="beam score / length**penalty (fairseq's --lenpen)")
    g.add_argument("--validation_num_beams", type=int, default=1,
                   help="beam size of the evaluations during training (greedy: cheap); the final one uses --num_beams")
    g.add_argument("--average_last_checkpoints", type=int, default=1,
                   help="evaluate and save the average of the last N checkpoints (needs --checkpointing_steps)")
    g.add_argument("--stop_after_minutes", type=float, default=None,
                   help="end training at the first step after this much wall time (fairseq's --stop-time-hours), "
                        "then evaluate and save as usual")
    common.add_init_args(parser)
    common.add_training_args(parser, batch_size=64, learning_rate=1e-3, epochs=3, weight_decay=1e-4, warmup=200,
                             scheduler="inverse_sqrt")
    common.add_speed_args(parser, torch_compile=False)   # generation's changing shapes would recompile often
    common.add_diagnostics_args(parser)
    common.add_run_args(parser, default_output_dir="out/translation")
    preset_parser = argparse.ArgumentParser(add_help=False)
    preset_parser.add_argument("--model_preset", default=DEFAULT_PRESET)
    preset = PRESETS.get(preset_parser.parse_known_args(argv)[0].model_preset)
    if preset is not None:                                   # an unknown name is reported by the full parser
        parser.set_defaults(**preset.flag_defaults(), adam_beta2=0.98)
    args = parser.parse_args(argv)
    if _given(argv, "--per_device_train_batch_size"):
        if _given(argv, "--max_tokens_per_batch") and args.max_tokens_per_batch:
            raise UsageError("give either --max_tokens_per_batch or --per_device_train_batch_size, not both")
        args.max_tokens_per_batch = 0
    common.check_common_args(args)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """One line per bad value of the translation flags."""
    if args.source_lang == args.target_lang:
        raise UsageError(f"--source_lang and --target_lang are both {args.source_lang!r}")
    if sum(x is not None for x in (args.dataset_name, args.train_file)) > 1:
        raise UsageError("give either --dataset_name or --train_file, not both")
    common.check_ranges(args, RULES)
    if args.average_last_checkpoints > 1:
        if args.checkpointing_steps is None:
            raise UsageError(f"--average_last_checkpoints {args.average_last_checkpoints} needs --checkpointing_steps "
                             "(N or 'epoch'): it averages the last checkpoints written")
        if args.checkpoints_total_limit < args.average_last_checkpoints:
            raise UsageError(f"--average_last_checkpoints {args.average_last_checkpoints} needs --checkpoints_total_limit "
                             f">= {args.average_last_checkpoints}, got {args.checkpoints_total_limit}")


# ------------------------------------------------------------------------------------------- tokenizer
def get_tokenizer(args: argparse.Namespace, train_ds, accelerator, resuming: bool):
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
            train_tokenizer(train_ds, args.vocab_size).save_pretrained(saved)
    return AutoTokenizer.from_pretrained(saved)


# ----------------------------------------------------------------------------------------------- model
def build_config(args: argparse.Namespace, tokenizer):
    """The preset's size with fairseq's conventions: ReLU, eos starts the decoder, scaled embeddings, no LayerDrop."""
    from transformers import AutoConfig

    p = PRESETS[args.model_preset]
    t5 = args.model_type in ("t5", "mt5")
    ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
               decoder_start_token_id=tokenizer.pad_token_id if t5 else tokenizer.eos_token_id)
    if t5:
        size = dict(d_model=p.d_model, d_ff=p.ffn, num_layers=p.layers, num_decoder_layers=p.layers, num_heads=p.heads,
                    d_kv=p.d_model // p.heads, dropout_rate=args.dropout)
    else:
        size = dict(d_model=p.d_model, encoder_layers=p.layers, decoder_layers=p.layers, encoder_ffn_dim=p.ffn,
                    decoder_ffn_dim=p.ffn, encoder_attention_heads=p.heads, decoder_attention_heads=p.heads,
                    dropout=args.dropout, attention_dropout=args.attention_dropout, activation_dropout=0.0,
                    activation_function="relu", encoder_layerdrop=0.0, decoder_layerdrop=0.0,
                    max_position_embeddings=max(256, args.max_source_length, args.max_target_length),
                    bos_token_id=tokenizer.eos_token_id, forced_eos_token_id=tokenizer.eos_token_id)
        if args.model_type in SINUSOIDAL_POSITIONS:
            # fairseq's Transformer convention: token embeddings drawn N(0, d^-1/2), times sqrt(d_model), so tokens and
            # the fixed sinusoidal positions (amplitude 1) start at the same scale. transformers' init_std 0.02 starts
            # the tokens 3x smaller and training slower (docs/translation.md). The planned weight matrices are redrawn
            # by the --init base init either way; with --init default, init_std also sets the model's own Linear init.
            size.update(scale_embedding=True, init_std=p.d_model ** -0.5)
    config = AutoConfig.for_model(args.model_type, **ids, **size)
    config = common.apply_config_overrides(config, args.config_overrides)
    config._attn_implementation = "sdpa"          # PyTorch's fused attention, on CPU and GPU
    return config


def build_model(args: argparse.Namespace, tokenizer):
    """From --model_name_or_path (weights already initialised), else a fresh build with --init."""
    from transformers import AutoModelForSeq2SeqLM

    from hf_emergence import from_config

    if args.model_name_or_path:
        model = common.load_pretrained(args.model_name_or_path, AutoModelForSeq2SeqLM)
        if model.config.vocab_size != len(tokenizer):
            raise UsageError(f"--model_name_or_path has vocab_size {model.config.vocab_size} but the tokenizer has {len(tokenizer)}")
    else:
        config = build_config(args, tokenizer)
        init = common.emergence_settings(args)
        try:
            model = from_config(AutoModelForSeq2SeqLM, config, init) if init else AutoModelForSeq2SeqLM.from_config(config)
        except (TypeError, ValueError) as err:   # bad --config_overrides values, too few layers for the init
            raise UsageError(f"cannot build {args.model_type}: {str(err).splitlines()[0]}") from None
    gen = model.generation_config
    gen.num_beams, gen.max_length, gen.length_penalty = args.num_beams, args.max_target_length, args.length_penalty
    gen.decoder_start_token_id = model.config.decoder_start_token_id
    gen.pad_token_id, gen.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    gen.bos_token_id = gen.forced_eos_token_id = None
    return model


def decoder_inputs(labels: torch.Tensor, start_id: int, pad_id: int) -> torch.Tensor:
    """Teacher forcing: the labels shifted right behind the decoder start token, padding (-100) as pad."""
    shifted = labels.new_full(labels.shape, pad_id)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = start_id
    return shifted.masked_fill_(shifted == -100, pad_id)


def forward_logits(accelerator, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Teacher-forced logits (passing ``labels=`` would make the model compute, and us discard, a second loss)."""
    config = accelerator.unwrap_model(model).config
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 decoder_input_ids=decoder_inputs(batch["labels"], config.decoder_start_token_id,
                                                  config.pad_token_id)).logits


def smoothed_loss(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.view(-1), ignore_index=-100,
                           label_smoothing=smoothing)


def average_checkpoints(model, folders: list[Path]) -> None:
    """Load the element-wise mean of the weights saved in ``folders`` (fairseq's average_checkpoints.py)."""
    from safetensors.torch import load_file

    total: dict[str, torch.Tensor] = {}
    for folder in folders:
        for key, tensor in load_file(str(folder / "model.safetensors")).items():
            total[key] = total.get(key, 0) + tensor.double()
    own = model.state_dict()
    fixed = {k for k in total if k not in own and "embed_positions" in k}      # sinusoids, rebuilt by the model
    state = {k: (v / len(folders)).to(own[k].dtype) for k, v in total.items() if k in own}
    missing, unexpected = model.load_state_dict(state, strict=False)
    unexpected = sorted(set(unexpected) | (set(total) - set(own) - fixed))
    tied = {k for k in missing if k.endswith(("embed_tokens.weight", "lm_head.weight", "embed_positions.weight"))}
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"checkpoint weights do not match the model: missing {sorted(set(missing) - tied)}, "
                           f"unexpected {sorted(unexpected)}")


def last_checkpoints(checkpoints: common.Checkpoints, state: common.TrainState, n: int) -> list[Path]:
    """The newest ``n`` complete, verified checkpoints, the final step included (saved now if it was not)."""
    def intact() -> list[Path]:
        return [p for p in common.Checkpoints.complete_in(checkpoints.root) if common.checkpoint_problem(p) is None]

    if not intact() or intact()[-1].name != checkpoints.name(state):
        checkpoints.save(state)
    return intact()[-n:]


# ------------------------------------------------------------------------------------------ evaluation
def generation_length(input_ids: torch.Tensor, args: argparse.Namespace) -> int:
    """Longest output for a batch: 1.5x its longest source + 10 tokens, at most --max_target_length.

    An untrained model rarely emits </s>, so a fixed 128-token limit makes early evaluations several times slower;
    evaluation batches are sorted by length, so the bound is tight per batch and far above real translations.
    """
    return min(args.max_target_length, int(1.5 * input_ids.shape[1]) + 10)


@torch.no_grad()
def evaluate(accelerator, model, dataloader, tokenizer, references: list[str], args: argparse.Namespace,
             split: str, num_beams: int) -> dict[str, Any]:
    """Beam-search generation, corpus BLEU/chrF against the reference text, and teacher-forced loss.

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
        with accelerator.autocast():
            logits = forward_logits(accelerator, model, batch)
            out = generator.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                     num_beams=num_beams, length_penalty=args.length_penalty,
                                     max_length=generation_length(batch["input_ids"], args))
        token_loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.view(-1), ignore_index=-100,
                                     reduction="none").view(labels.shape)
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
        scores = metric.compute(tokenized_bleu_lang=args.target_lang, pretokenized=args.pretokenized)
        result.update({f"{split}_bleu": scores["score"], f"{split}_chrf": scores["chrf"],
                       f"{split}_tok_bleu": scores["tokenized_bleu"], f"{split}_sentences": scores["num_sentences"],
                       "bleu_signature": scores["signature"], "tok_bleu_signature": scores["tokenized_signature"]})
        (Path(args.output_dir) / f"{split}_predictions.txt").write_text("".join(predictions[i] + "\n" for i in order))
    return result


def eval_loader(ds, args: argparse.Namespace, pad: int) -> DataLoader:
    """Sentences sorted by source length (little padding, tight generation bounds); ``index`` restores the order."""
    order = torch.argsort(torch.tensor(list(ds["length"])), stable=True).tolist()
    return common.data_loader(ds.select(order), batch_size=args.per_device_eval_batch_size,
                              collate_fn=lambda b: collate(b, pad))


# ------------------------------------------------------------------------------------------------ main
def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    accelerator = common.make_accelerator(args, "translation")
    if args.no_progress_bar:
        data.datasets.disable_progress_bars()
    checkpoints = common.Checkpoints(accelerator, args.output_dir, args.checkpoints_total_limit, args.overwrite_output_dir)
    resume_path = checkpoints.resolve(args.resume_from_checkpoint)
    set_seed(args.seed)

    # Data and tokenizer (the main process reads, tokenizes and caches first, then the others reuse its work).
    with accelerator.main_process_first():
        splits = load_splits(args)
    tokenizer = get_tokenizer(args, splits["train"], accelerator, resuming=resume_path is not None)
    with accelerator.main_process_first():
        encoded = encode(splits, tokenizer, args)
    references = {s: list(ds["target"]) for s, ds in splits.items() if s != "train"}
    logger.info("data: %s; vocabulary %d", {s: len(d) for s, d in encoded.items()}, len(tokenizer))

    # Model built from a config after seeding: the seed fixes the initialisation.
    model = build_model(args, tokenizer)
    plan = getattr(model, "emergence_plan", None)
    if plan is not None:
        logger.info("emergence init:\n%s", plan)
    logger.info("recipe: preset %s, %s (%s attention), %.1fM parameters, lr %g, warm-up %d, %s, dropout %g, label "
                "smoothing %g, beam %d, length penalty %g", args.model_preset, args.model_type,
                model.config._attn_implementation, sum(p.numel() for p in model.parameters()) / 1e6, args.learning_rate,
                args.num_warmup_steps, f"{args.max_tokens_per_batch} tokens per batch" if args.max_tokens_per_batch
                else f"{args.per_device_train_batch_size} pairs per batch", args.dropout, args.label_smoothing,
                args.num_beams, args.length_penalty)
    optimizer = common.make_optimizer(model, args, common.lr_plan(args, model))

    pad = tokenizer.pad_token_id
    train_ds = encoded["train"]
    lengths = list(train_ds["length"])
    if args.max_tokens_per_batch and max(lengths) > args.max_tokens_per_batch:
        raise UsageError(f"--max_tokens_per_batch {args.max_tokens_per_batch} is below the longest training pair "
                         f"({max(lengths)} tokens after truncation): raise it or lower --max_source_length/--max_target_length")
    train_sampler = common.EpochBatchSampler(len(train_ds), args.per_device_train_batch_size, args.seed, lengths=lengths,
                                             max_tokens=args.max_tokens_per_batch or None,
                                             num_processes=accelerator.num_processes)
    train_dl = common.data_loader(train_ds, batch_sampler=train_sampler, collate_fn=lambda b: collate(b, pad))
    eval_dls = {s: eval_loader(ds, args, pad) for s, ds in encoded.items() if s != "train"}
    max_steps, _ = common.training_length(args, len(train_sampler) // accelerator.num_processes)
    scheduler = common.make_scheduler(optimizer, args, max_steps, accelerator.num_processes)
    model, optimizer, train_dl, scheduler = accelerator.prepare(model, optimizer, train_dl, scheduler)
    eval_dls = {s: accelerator.prepare(dl) for s, dl in eval_dls.items()}
    max_steps, num_epochs = common.training_length(args, len(train_dl))

    probe = None                                               # fixed batch for --measure_emergence
    if args.measure_emergence:
        first = collate(encoded["validation"].select(range(min(64, len(encoded["validation"])))), pad)
        config = accelerator.unwrap_model(model).config
        probe = {"input_ids": first["input_ids"], "attention_mask": first["attention_mask"],
                 "decoder_input_ids": decoder_inputs(first["labels"], config.decoder_start_token_id, config.pad_token_id)}

    state, log = common.start_run(accelerator, args, checkpoints, resume_path,
                                  data={"train_examples": len(train_ds), "batches_per_epoch": len(train_dl)})
    if args.measure_emergence and not resume_path:
        log.log({"step": 0, "epoch": 0, **common.emergence_report(accelerator, model, probe)})
    progress = tqdm(total=max_steps, initial=state.completed_steps, desc="train",
                    disable=args.no_progress_bar or not accelerator.is_local_main_process)
    timer = common.Timer()
    checks = common.DeviceChecks()    # the non-finite guard, read only at logging steps, evaluations and checkpoints
    deadline = time.monotonic() + 60 * args.stop_after_minutes if args.stop_after_minutes else math.inf

    def past_deadline() -> bool:
        """Whether --stop_after_minutes has passed, agreed by every process (so they stop at the same step)."""
        if deadline == math.inf:
            return False
        late = torch.tensor(float(time.monotonic() > deadline), device=accelerator.device)
        return bool(accelerator.reduce(late, reduction="sum") > 0) if accelerator.num_processes > 1 else bool(late)

    def evaluate_and_checkpoint(epoch_end: bool) -> None:
        evaluating = common.is_due(args.eval_steps, state, epoch_end)
        if evaluating or common.is_due(args.checkpointing_steps, state, epoch_end):
            checks.check(state, checkpoints)
        if evaluating:
            result = evaluate(accelerator, model, eval_dls["validation"], tokenizer, references["validation"], args,
                              "validation", args.validation_num_beams)
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
                grad_norm = common.optimizer_step(accelerator, model, optimizer, scheduler, loss, args, state, checkpoints,
                                                  checks)
            timer.step_done(int((batch["labels"] != -100).sum()))
            if not common.count_micro_batch(state, accelerator, len(batch["input_ids"])):
                continue
            progress.update(1)
            if state.completed_steps % args.logging_steps == 0:
                checks.check(state, checkpoints)
                record = common.log_training(log, state, accelerator, loss, grad_norm, scheduler, timer, "target_tokens")
                progress.set_postfix(loss=f"{record['loss']:.3f}")
            evaluate_and_checkpoint(epoch_end=False)
            common.stop_if_asked(accelerator, state, checkpoints, checks, every=args.logging_steps)
            timer.restart()
            if state.completed_steps >= max_steps or past_deadline():
                break
        if common.finish_epoch(state, len(train_dl)):
            evaluate_and_checkpoint(epoch_end=True)
            timer.restart()
        if past_deadline():
            logger.info("--stop_after_minutes %g reached at step %d", args.stop_after_minutes, state.completed_steps)
            break
    progress.close()
    checks.check(state, checkpoints)

    results: dict[str, Any] = {"step": state.completed_steps}
    if args.average_last_checkpoints > 1:
        folders = last_checkpoints(checkpoints, state, args.average_last_checkpoints)
        average_checkpoints(accelerator.unwrap_model(model), folders)
        results["averaged_checkpoints"] = [p.name for p in folders]
        logger.info("evaluating the average of %d checkpoints: %s", len(folders), ", ".join(p.name for p in folders))
    for split, dl in eval_dls.items():
        results.update(evaluate(accelerator, model, dl, tokenizer, references[split], args, split, args.num_beams))
    if accelerator.device.type == "cuda":
        results["gpu_max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    log.log({**results, "final": True})
    if accelerator.is_main_process:
        for split in eval_dls:
            print(f"{split}: BLEU {results[f'{split}_bleu']:.2f}  chrF {results[f'{split}_chrf']:.2f}  "
                  f"tokenised lowercased BLEU {results[f'{split}_tok_bleu']:.2f}  ({results[f'{split}_sentences']} sentences)")
        print(f"sacreBLEU signature: {results['bleu_signature']}")
        print(f"tokenised BLEU: {results['tok_bleu_signature']}")
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
