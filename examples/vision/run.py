#!/usr/bin/env python
"""Train an image classifier built from a config (ViT, DeiT, ResNet, the CIFAR ResNet, ConvNeXt, or the paper's plain MLP /
CNN with or without BatchNorm) with the emergence-promoting initialisation or a baseline, and report top-1 accuracy, including
the accuracy after the first epoch (the paper's headline metric).

    accelerate launch examples/vision/run.py                                       # built-in CIFAR-10 sample, offline
    accelerate launch examples/vision/run.py --init kaiming                        # the baseline, same budget
    accelerate launch examples/vision/run.py --model_type resnet --alpha 1.5 --train_dir cifar10/train --test_dir cifar10/test
    accelerate launch examples/vision/run.py --model_type cifar_resnet --config_overrides layout=resnet20   # or resnet18
    accelerate launch examples/vision/run.py --model_type cifar_resnet --mixed_precision bf16 --torch_compile   # GPU path
    accelerate launch examples/vision/run.py --dataset_name uoft-cs/cifar10 --model_type vit \
        --config_overrides hidden_size=192,num_hidden_layers=6

Data (``image_data.py``): image folders (``<dir>/<class name>/<image>``, read with datasets' ``imagefolder``), or a
Hub dataset (or a local folder in the Hub layout, e.g. parquet) with an image and a label column. Every choice
during training (evaluation, the first-epoch metric, anything tuned on it) reads the validation split, which is held
out from train (seeded by ``--data_seed``) unless given; the test split (``--test_dir`` or a Hub ``test`` split) is
read once, at the end, for the reported number. Data that fits (``--in_memory auto``: CIFAR) is decoded once into a
uint8 tensor, cached (``--image_cache_dir``) and, on a GPU, kept and augmented on the device; larger data is decoded
batch by batch in the DataLoader workers (``--dataloader_num_workers``). Augmentation (random crop with 4-pixel
padding, horizontal flip) runs on batched tensors, seeded by (seed, epoch, batch), so a resumed run sees the same
pixels on either path. Training accuracy is counted over each epoch's batches as trained (``train_accuracy``);
``--stop_at_train_accuracy`` ends training at the first epoch that fits the training set.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate.utils import set_seed
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/common.py
sys.path.insert(0, str(Path(__file__).resolve().parent))      # plain_models.py, image_data.py
import common  # noqa: E402
import image_data  # noqa: E402
import plain_models  # noqa: E402
from common import UsageError  # noqa: E402
from image_data import Batcher, ImageSet, channel_stats, load_splits, random_crop_flip  # noqa: E402,F401

logger = logging.getLogger("hf_emergence.examples.vision")
BUILTIN_DATA = image_data.BUILTIN_DATA
HF_MODEL_TYPES = ("vit", "deit", "resnet", "cifar_resnet", "convnext")
MODEL_TYPES = HF_MODEL_TYPES + plain_models.PLAIN_MODEL_TYPES
# CIFAR-sized defaults (32x32 inputs). ResNet keeps transformers' 7x7/stride-2 stem and max-pool (its checkpoints load in
# stock transformers); cifar_resnet is hf_emergence's CIFAR ResNet (3x3 stride-1 stem, no max-pool), ResNet-18 by
# default, ResNet-20 with --config_overrides layout=resnet20 (its checkpoints load after `import hf_emergence`).
HF_DEFAULTS = {
    "vit": dict(patch_size=4, hidden_size=192, num_hidden_layers=6, num_attention_heads=3, intermediate_size=384,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    "resnet": dict(embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[2, 2, 2, 2], layer_type="basic"),
    "cifar_resnet": dict(layout="resnet18"),
    "convnext": dict(patch_size=2, hidden_sizes=[48, 96, 192, 384], depths=[2, 2, 2, 2]),
}
HF_DEFAULTS["deit"] = HF_DEFAULTS["vit"]
PLAIN_DEFAULTS = {"mlp": dict(depth=4, width=512), "cnn": dict(depth=6, width=32)}
SGD_MODEL_TYPES = ("mlp", "cnn", "resnet", "cifar_resnet")
CONVNET_TYPES = ("cnn", "resnet", "cifar_resnet", "convnext")        # --channels_last applies to these
# Optimiser defaults: SGD for the ConvNets and MLP (the paper's setting), AdamW for the attention models.
OPTIMIZER_DEFAULTS = {"sgd": dict(learning_rate=0.05, weight_decay=5e-4), "adamw": dict(learning_rate=1e-3, weight_decay=0.05)}


# ------------------------------------------------------------------------------------------- arguments
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = common.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("data")
    g.add_argument("--dataset_name", default=None, help="a Hub dataset with image and label columns (needs a network)")
    g.add_argument("--dataset_config_name", default=None)
    g.add_argument("--train_dir", default=None, help="image folder: <dir>/<class name>/<image file>")
    g.add_argument("--validation_dir", default=None, help="same class folders as --train_dir")
    g.add_argument("--test_dir", default=None,
                   help="same class folders as --train_dir; scored once at the end (the reported number)")
    g.add_argument("--validation_split_percentage", type=float, default=10.0,
                   help="held out from the training data (seeded) when no validation data is given")
    g.add_argument("--image_column_name", default=None, help="Hub dataset image column (default: image or img)")
    g.add_argument("--label_column_name", default=None, help="Hub dataset label column (default: label or labels)")
    g.add_argument("--image_size", type=int, default=32, help="images are resized to this square size if needed")
    g.add_argument("--max_train_samples", type=int, default=None, help="a random subset (drawn with --data_seed)")
    g.add_argument("--max_eval_samples", type=int, default=None, help="a random subset (drawn with --data_seed)")
    g.add_argument("--data_seed", type=int, default=0,
                   help="seed of the held-out split and the subsets: fixed, so every --seed and arm sees the same data")
    g.add_argument("--skip_bad_images", action="store_true", help="skip and count unreadable images instead of stopping")
    g.add_argument("--check_images", default="header", choices=image_data.CHECKS,
                   help="streaming: how unreadable files are found before training: 'header' (open + verify: fast, "
                        "misses a truncated JPEG) or 'decode' (every image decoded once, as training will: one "
                        "decoding pass, cached like the header check)")
    g.add_argument("--image_cache_dir", default=os.environ.get("HF_EMERGENCE_IMAGE_CACHE",
                                                               str(Path.home() / ".cache" / "hf_emergence" / "images")),
                   help="decoded uint8 images (in memory) and the unreadable-file check (streaming) are cached here, "
                        "keyed by the file list or dataset fingerprint ('' disables)")
    g.add_argument("--cache_dir", default=None, help="datasets cache folder (default: datasets' own)")
    g.add_argument("--in_memory", default="auto", choices=("auto", "yes", "no"),
                   help="decode every image once into one uint8 tensor (on the GPU when there is one) or per batch; "
                        f"auto: in memory when the pixels fit in {image_data.IN_MEMORY_CAP_BYTES >> 30} GiB and a "
                        "quarter of the available RAM")
    g.add_argument("--channel_stats_samples", type=int, default=10000,
                   help="streaming: the normalisation mean/std come from this many training images drawn with "
                        "--data_seed (0: all); in memory: always all")
    g.add_argument("--no_augmentation", action="store_true")
    g.add_argument("--preprocessing_num_workers", type=int, default=None,
                   help="processes decoding (in memory) or checking (streaming) the images before training")
    g.add_argument("--stop_at_train_accuracy", type=float, default=None,
                   help="stop after the first epoch whose training accuracy (over that epoch's batches, as trained) "
                        "reaches this value, e.g. 0.995: train until the training set is fit")
    g.add_argument("--dataloader_num_workers", type=int, default=0,
                   help="processes serving batches (streaming: decoding them); in memory on a GPU: always 0")
    common.add_model_args(parser, MODEL_TYPES, "cnn")
    g = parser.add_argument_group("plain models (mlp, cnn)")
    g.add_argument("--depth", type=int, default=None, help="hidden layers (mlp) or conv layers (cnn); default 4 / 6")
    g.add_argument("--width", type=int, default=None, help="hidden units (mlp) or first-stage channels (cnn); default 512 / 32")
    g.add_argument("--batch_norm", action=argparse.BooleanOptionalAction, default=None,
                   help="BatchNorm after every hidden layer (default: on)")
    common.add_init_args(parser)
    common.add_training_args(parser, batch_size=128, learning_rate=None, epochs=3, weight_decay=None, warmup=0,
                             scheduler="cosine", optimizer=None)
    parser.add_argument("--label_smoothing", type=float, default=0.0,
                        help="training loss: cross-entropy against (1 - eps) one-hot + eps uniform (evaluation: plain)")
    common.add_speed_args(parser, channels_last=True)
    common.add_diagnostics_args(parser)
    common.add_run_args(parser, default_output_dir="out/vision")
    args = parser.parse_args(argv)

    if args.channels_last == "yes" and args.model_type not in CONVNET_TYPES:
        raise UsageError(f"--channels_last yes applies to the ConvNets ({', '.join(CONVNET_TYPES)}), not {args.model_type}")
    plain = args.model_type in plain_models.PLAIN_MODEL_TYPES
    if not plain and (args.depth is not None or args.width is not None or args.batch_norm is not None):
        raise UsageError(f"--depth/--width/--batch_norm apply to mlp and cnn; for {args.model_type} use --config_overrides")
    if plain:
        for key, value in PLAIN_DEFAULTS[args.model_type].items():
            if getattr(args, key) is None:
                setattr(args, key, value)
        args.batch_norm = True if args.batch_norm is None else args.batch_norm
        if args.depth < 1 or args.width < 1:
            raise UsageError(f"--depth and --width must be >= 1, got {args.depth} and {args.width}")
    if args.optimizer is None:
        args.optimizer = "sgd" if args.model_type in SGD_MODEL_TYPES else "adamw"
    for key, value in OPTIMIZER_DEFAULTS[args.optimizer].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    common.check_common_args(args)
    if args.dataset_name and (args.train_dir or args.validation_dir):
        raise UsageError("give either --dataset_name or --train_dir/--validation_dir, not both")
    if args.dataset_name and args.test_dir:
        raise UsageError("give either --dataset_name (its 'test' split is the test set) or --test_dir, not both")
    for flag in ("validation_dir", "test_dir"):
        if getattr(args, flag) and not (args.train_dir or args.dataset_name):
            raise UsageError(f"--{flag} needs --train_dir")
    if not 0 < args.validation_split_percentage < 100:
        raise UsageError(f"--validation_split_percentage must be in (0, 100), got {args.validation_split_percentage}")
    if args.stop_at_train_accuracy is not None and not 0 < args.stop_at_train_accuracy <= 1:
        raise UsageError(f"--stop_at_train_accuracy must be in (0, 1], got {args.stop_at_train_accuracy}")
    if args.image_size < 8:
        raise UsageError(f"--image_size must be >= 8, got {args.image_size}")
    common.check_ranges(args, {"dataloader_num_workers": common.AT_LEAST_0, "preprocessing_num_workers": common.AT_LEAST_0,
                               "channel_stats_samples": common.AT_LEAST_0, "label_smoothing": common.FRACTION})
    return args


# ----------------------------------------------------------------------------------------------- model
def build_hf_config(args: argparse.Namespace, classes: list[str]):
    from transformers import AutoConfig

    labels = dict(num_labels=len(classes), id2label=dict(enumerate(classes)), label2id={c: i for i, c in enumerate(classes)})
    size = dict(HF_DEFAULTS[args.model_type])
    if args.model_type in ("vit", "deit", "convnext"):
        size["image_size"] = args.image_size
    config = AutoConfig.for_model(args.model_type, **labels, **size)
    return common.apply_config_overrides(config, args.config_overrides)


def build_model(args: argparse.Namespace, classes: list[str], mean: list[float], std: list[float]) -> nn.Module:
    """From --model_name_or_path (weights already initialised), else a fresh build with --init."""
    from transformers import AutoModelForImageClassification

    from hf_emergence import from_config, resolve_model_class

    if args.model_name_or_path:
        try:
            if plain_models.is_plain_checkpoint(args.model_name_or_path):
                model = plain_models.load_plain(args.model_name_or_path)
            else:
                model = common.load_pretrained(args.model_name_or_path, AutoModelForImageClassification)
        except (OSError, ValueError, TypeError) as err:   # a plain checkpoint's config.json or weights
            raise UsageError(f"--model_name_or_path {args.model_name_or_path}: {str(err).splitlines()[0]}") from None
        if model.config.num_labels != len(classes):
            raise UsageError(f"--model_name_or_path has {model.config.num_labels} labels but the data has {len(classes)} classes")
        return model
    init = common.emergence_settings(args)
    try:
        if args.model_type in plain_models.PLAIN_MODEL_TYPES:
            if args.config_overrides:
                raise UsageError("--config_overrides applies to transformers models; use --depth/--width for mlp and cnn")
            config = plain_models.PlainConfig(architecture=args.model_type, depth=args.depth, width=args.width,
                                              batch_norm=args.batch_norm, num_labels=len(classes),
                                              image_size=args.image_size, id2label=dict(enumerate(classes)),
                                              image_mean=mean, image_std=std)
            model = plain_models.build_plain_model(config)
            if init is not None:
                init.apply(model, example_inputs=(torch.zeros(1, 3, args.image_size, args.image_size),))
            return model
        config = build_hf_config(args, classes)
        if init is not None:
            return from_config(AutoModelForImageClassification, config, init)
        return resolve_model_class(AutoModelForImageClassification, config)._from_config(config)
    except (TypeError, ValueError) as err:   # bad --config_overrides values, too few layers for the init
        raise UsageError(f"cannot build {args.model_type}: {str(err).splitlines()[0]}") from None


def image_processor(args: argparse.Namespace, mean: list[float], std: list[float]):
    """The preprocessing as a transformers image processor (saved next to HF checkpoints)."""
    try:
        from transformers import ViTImageProcessorPil as Processor
    except ImportError:
        from transformers import ViTImageProcessor as Processor
    return Processor(size={"height": args.image_size, "width": args.image_size}, image_mean=mean, image_std=std)


def logits_of(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


class EpochAccuracy:
    """Top-1 accuracy over the training batches of one epoch, as trained (train mode, augmented when augmentation is
    on): ``correct / seen`` summed over processes. Counts stay on the device (no sync per batch)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.counts = torch.zeros(2, dtype=torch.long, device=self.device)   # correct, seen

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.counts[0] += (logits.detach().argmax(-1) == labels).sum()
        self.counts[1] += labels.numel()

    def totals(self, accelerator) -> list[int]:
        """[correct, seen] so far in this epoch, summed over every process (a collective: call it on all)."""
        return (accelerator.reduce(self.counts.clone(), reduction="sum") if accelerator.num_processes > 1
                else self.counts).tolist()

    def value(self, accelerator) -> Optional[float]:
        """The epoch's accuracy so far over every process (None before any batch)."""
        correct, seen = self.totals(accelerator)
        return correct / seen if seen else None

    def restore(self, totals: list[int], accelerator) -> None:
        """Continue a resumed epoch: the saved totals count once, on the main process."""
        if accelerator.is_main_process:
            self.counts = torch.tensor(totals, dtype=torch.long, device=self.device)


def resolve_channels_last(args: argparse.Namespace, device: torch.device) -> bool:
    """--channels_last: yes / no, or auto: yes for a ConvNet on a GPU (cuDNN's fastest layout, above all under bf16)."""
    if args.channels_last == "auto":
        return args.model_type in CONVNET_TYPES and device.type == "cuda"
    return args.channels_last == "yes"


def pixel_input(batch: dict[str, torch.Tensor], channels_last: bool) -> torch.Tensor:
    """The batch's pixels in the model's memory format (NHWC strides under channels_last; same values)."""
    pixels = batch["pixel_values"]
    return pixels.contiguous(memory_format=torch.channels_last) if channels_last else pixels


# ------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate(accelerator, model, dataloader, args: argparse.Namespace, split: str = "validation",
             channels_last: bool = False) -> dict[str, Any]:
    """Top-1 accuracy and mean cross-entropy over the whole split, each image counted exactly once
    (gather_for_metrics drops the samples duplicated to even out the last batch across processes). Predictions stay
    on the device until the split is done: one host read, not one per batch."""
    was_training = model.training
    model.eval()
    predictions, references = [], []
    loss_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    for batch in tqdm(dataloader, desc=f"eval {split}", disable=args.no_progress_bar or not accelerator.is_local_main_process,
                      leave=False):
        logits = logits_of(model(pixel_input(batch, channels_last))).float()
        losses = F.cross_entropy(logits, batch["labels"], reduction="none")
        preds, labels, losses = accelerator.gather_for_metrics((logits.argmax(-1), batch["labels"], losses))
        predictions.append(preds)
        references.append(labels)
        loss_sum += losses.double().sum()
    model.train(was_training)
    metric = common.load_metric("accuracy_offline").compute(predictions=torch.cat(predictions).tolist(),
                                                            references=torch.cat(references).tolist())
    return {f"{split}_accuracy": metric["accuracy"], f"{split}_loss": float(loss_sum) / max(1, metric["total"]),
            f"{split}_samples": metric["total"]}


# ------------------------------------------------------------------------------------------------ main
def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    accelerator = common.make_accelerator(args, "vision")
    checkpoints = common.Checkpoints(accelerator, args.output_dir, args.checkpoints_total_limit, args.overwrite_output_dir)
    resume_path = checkpoints.resolve(args.resume_from_checkpoint)
    set_seed(args.seed)

    # Data: in memory (decoded once: the main process fills the cache, the others read it) or streaming.
    with accelerator.main_process_first():
        splits = load_splits(args, accelerator.device)
    train, val, test = splits["train"], splits["validation"], splits.get("test")
    mean, std = channel_stats(train, 0 if train.in_memory else args.channel_stats_samples, args.data_seed)
    logger.info("data: %d train / %d validation%s images, %d classes, %dx%d", len(train), len(val),
                f" / {len(test)} test" if test else "", len(train.classes), args.image_size, args.image_size)

    # Model built from a config after seeding: the seed fixes the initialisation.
    model = build_model(args, train.classes, mean, std)
    plan = getattr(model, "emergence_plan", None)
    if plan is not None:
        logger.info("emergence init:\n%s", plan)
    channels_last = resolve_channels_last(args, accelerator.device)
    if channels_last:                 # conv weights in NHWC strides, before the optimizer sees them; same values
        model = model.to(memory_format=torch.channels_last)
    example = torch.zeros(1, 3, args.image_size, args.image_size)
    optimizer = common.make_optimizer(model, args, common.lr_plan(args, model, example_inputs=(example,)))

    train_batcher = Batcher(train, mean, std, augment=not args.no_augmentation, seed=args.seed)
    train_sampler = common.EpochBatchSampler(len(train), args.per_device_train_batch_size, args.seed,
                                             num_processes=accelerator.num_processes)
    on_device = train.in_memory and train.pixels.device.type != "cpu"       # batches are built where the pixels are
    workers = dict(num_workers=0 if on_device else args.dataloader_num_workers,
                   pin_memory=accelerator.device.type == "cuda" and not on_device)
    train_dl = common.data_loader(range(len(train)), batch_sampler=train_sampler, collate_fn=train_batcher, **workers)
    val_dl, test_dl = (None if data is None else common.data_loader(
        range(len(data)), batch_size=args.per_device_eval_batch_size,
        collate_fn=Batcher(data, mean, std, augment=False, seed=args.seed), **workers) for data in (val, test))
    max_steps, _ = common.training_length(args, math.ceil(len(train_sampler) / accelerator.num_processes))
    scheduler = common.make_scheduler(optimizer, args, max_steps, accelerator.num_processes)
    model, optimizer, train_dl, val_dl, scheduler = accelerator.prepare(model, optimizer, train_dl, val_dl, scheduler)
    test_dl = accelerator.prepare(test_dl) if test_dl is not None else None
    if args.torch_compile:            # after prepare: the compiled forward includes Accelerate's autocast
        common.compile_forward(accelerator.unwrap_model(model))
    max_steps, num_epochs = common.training_length(args, len(train_dl))
    probe = (Batcher(val, mean, std, augment=False, seed=args.seed)(list(range(min(256, len(val)))))
             if args.measure_emergence else None)                   # fixed batch for --measure_emergence

    state, log = common.start_run(accelerator, args, checkpoints, resume_path,
                                  data={"train_examples": len(train), "batches_per_epoch": len(train_dl)})
    if args.measure_emergence and not resume_path:
        log.log({"step": 0, "epoch": 0, **common.emergence_report(accelerator, model, probe["pixel_values"])})
    progress = tqdm(total=max_steps, initial=state.completed_steps, desc="train",
                    disable=args.no_progress_bar or not accelerator.is_local_main_process)
    timer = common.Timer()
    checks = common.DeviceChecks()    # the non-finite guard, read only at logging steps, evaluations and checkpoints
    train_fit = EpochAccuracy(accelerator.device)       # training accuracy of the current epoch, saved with checkpoints
    if "train_fit_counts" in state.recorded:
        train_fit.restore(state.recorded["train_fit_counts"], accelerator)

    def record_train_fit() -> None:     # before every checkpoint, so a resumed epoch counts on exactly
        state.recorded["train_fit_counts"] = train_fit.totals(accelerator)
    checkpoints.before_save = record_train_fit

    def evaluate_and_checkpoint(epoch_end: bool) -> None:
        first_epoch = epoch_end and state.epoch == 1          # the paper's metric: always measured
        if epoch_end:
            train_accuracy = train_fit.value(accelerator)
            train_fit.reset()
            if train_accuracy is not None:
                state.recorded["train_accuracy"] = train_accuracy
                log.log({"step": state.completed_steps, "epoch": state.epoch, "train_accuracy": train_accuracy})
                if args.stop_at_train_accuracy is not None and train_accuracy >= args.stop_at_train_accuracy:
                    state.recorded.setdefault("fit_epoch", state.epoch)   # saved with the checkpoint: a resume stops
                    logger.info("epoch %d: training accuracy %.4f >= %g: the training set is fit; stopping",
                                state.epoch, train_accuracy, args.stop_at_train_accuracy)
        evaluating = (common.is_due(args.eval_steps, state, epoch_end) or first_epoch
                      or (epoch_end and "fit_epoch" in state.recorded))
        if evaluating or common.is_due(args.checkpointing_steps, state, epoch_end):
            checks.check(state, checkpoints)
        if evaluating:
            result = evaluate(accelerator, model, val_dl, args, channels_last=channels_last)
            if args.measure_emergence:
                result.update(common.emergence_report(accelerator, model, probe["pixel_values"]))
            if first_epoch:
                state.recorded["epoch1_accuracy"] = result["validation_accuracy"]
            state.last_eval = {"step": state.completed_steps, **result}
            log.log({"step": state.completed_steps, "epoch": state.epoch, **result})
            logger.info("step %d (epoch %d): validation accuracy %.4f, loss %.4f", state.completed_steps, state.epoch,
                        result["validation_accuracy"], result["validation_loss"])
        if common.is_due(args.checkpointing_steps, state, epoch_end):
            checkpoints.save(state)

    model.train()
    while state.completed_steps < max_steps and state.epoch < num_epochs and "fit_epoch" not in state.recorded:
        train_sampler.use_epoch(state.epoch)
        train_batcher.epoch = state.epoch
        batches = accelerator.skip_first_batches(train_dl, state.batches_in_epoch) if state.batches_in_epoch else train_dl
        for batch in batches:
            timer.data_ready()
            with accelerator.accumulate(model):
                logits = logits_of(model(pixel_input(batch, channels_last))).float()
                loss = F.cross_entropy(logits, batch["labels"], label_smoothing=args.label_smoothing)
                train_fit.add(logits, batch["labels"])
                grad_norm = common.optimizer_step(accelerator, model, optimizer, scheduler, loss, args, state, checkpoints,
                                                  checks)
            timer.step_done(len(batch["labels"]))
            if not common.count_micro_batch(state, accelerator, len(batch["labels"])):
                continue
            progress.update(1)
            if state.completed_steps % args.logging_steps == 0:
                checks.check(state, checkpoints)
                record = common.log_training(log, state, accelerator, loss, grad_norm, scheduler, timer, "images")
                progress.set_postfix(loss=f"{record['loss']:.3f}")
            evaluate_and_checkpoint(epoch_end=False)
            common.stop_if_asked(accelerator, state, checkpoints, checks, every=args.logging_steps)
            timer.restart()
            if state.completed_steps >= max_steps:
                break
        if common.finish_epoch(state, len(train_dl)):
            evaluate_and_checkpoint(epoch_end=True)
            timer.restart()
    progress.close()
    checks.check(state, checkpoints)

    final = (state.last_eval if state.last_eval.get("step") == state.completed_steps
             else evaluate(accelerator, model, val_dl, args, channels_last=channels_last))
    if test_dl is not None:                                  # read once, here: never seen by any choice above
        final = {**final, **evaluate(accelerator, model, test_dl, args, "test", channels_last=channels_last)}
    results = {"step": state.completed_steps, "epochs": state.epoch, **final,
               "epoch1_accuracy": state.recorded.get("epoch1_accuracy"),
               "train_accuracy": state.recorded.get("train_accuracy"), "fit_epoch": state.recorded.get("fit_epoch"),
               "skipped_images": sum(data.skipped for data in (train, val, test) if data is not None)}
    if torch.cuda.is_available():
        results["gpu_max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    log.log({**results, "final": True})
    if accelerator.is_main_process:
        epoch1 = results["epoch1_accuracy"]
        print(f"validation: accuracy {results['validation_accuracy']:.4f}  loss {results['validation_loss']:.4f}  "
              f"({results['validation_samples']} images); after epoch 1: "
              + (f"{epoch1:.4f}" if epoch1 is not None else "n/a (stopped within the first epoch)"))
        if test_dl is not None:
            print(f"test: accuracy {results['test_accuracy']:.4f}  loss {results['test_loss']:.4f}  "
                  f"({results['test_samples']} images, read once at the end)")
    unwrapped = accelerator.unwrap_model(model)
    plain = isinstance(getattr(unwrapped, "config", None), plain_models.PlainConfig)
    metrics = {k: v for k, v in results.items() if isinstance(v, (int, float)) and v is not None}
    common.save_final(accelerator, model, args, processing_class=None if plain else image_processor(args, mean, std),
                      title=f"{args.model_type} image classifier ({args.init} init)", task="image-classification",
                      auto_class="AutoModelForImageClassification", example="vision",
                      datasets=(args.dataset_name or ("cifar10-sample" if not args.train_dir else "local"),),
                      metrics=metrics, extra_files={"config.json": unwrapped.config.to_json_string()} if plain else None,
                      usage=PLAIN_USAGE if plain else None)
    accelerator.end_training()
    return results


PLAIN_USAGE = """A plain PyTorch model (not a transformers class): rebuild it with the example's loader.

```python
import sys; sys.path.insert(0, "examples/vision")
from plain_models import load_plain
model = load_plain("<this folder>")
```"""


if __name__ == "__main__":
    sys.exit(common.run_cli(main))
