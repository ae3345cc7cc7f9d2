#!/usr/bin/env python
"""Train an image classifier built from a config (ViT, DeiT, ResNet, ConvNeXt, or the paper's plain MLP / CNN with or
without BatchNorm) with the emergence-promoting initialisation or a baseline, and report top-1 accuracy, including
the accuracy after the first epoch (the paper's headline metric).

    accelerate launch examples/vision/run.py                                       # built-in CIFAR-10 sample, offline
    accelerate launch examples/vision/run.py --init kaiming                        # the baseline, same budget
    accelerate launch examples/vision/run.py --model_type resnet --alpha 1.5 --train_dir cifar10/train --test_dir cifar10/test
    accelerate launch examples/vision/run.py --dataset_name uoft-cs/cifar10 --model_type vit \
        --config_overrides hidden_size=192,num_hidden_layers=6

Data: image folders (``<dir>/<class name>/<image>``), or a Hub dataset with an image and a label column. Every choice
during training (evaluation, the first-epoch metric, anything tuned on it) reads the validation split, which is held
out from train (seeded by ``--data_seed``) unless given; the test split (``--test_dir`` or a Hub ``test`` split) is
read once, at the end, for the reported number. Training accuracy is counted over each epoch's batches as trained
(``train_accuracy``); ``--stop_at_train_accuracy`` ends training at the first epoch that fits the training set. Every
image is decoded once and cached as uint8 (``--image_cache_dir``); augmentation (random crop with 4-pixel padding,
horizontal flip) runs on batched tensors, seeded by (seed, epoch, batch), so a resumed run sees the same pixels.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import zlib
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate.utils import set_seed
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/common.py
sys.path.insert(0, str(Path(__file__).resolve().parent))      # plain_models.py
import common  # noqa: E402
import plain_models  # noqa: E402
from common import UsageError  # noqa: E402

logger = logging.getLogger("hf_emergence.examples.vision")
BUILTIN_DATA = Path(__file__).resolve().parent / "data" / "cifar10_sample"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
HF_MODEL_TYPES = ("vit", "deit", "resnet", "convnext")
MODEL_TYPES = HF_MODEL_TYPES + plain_models.PLAIN_MODEL_TYPES
# CIFAR-sized defaults (32x32 inputs). ResNet keeps transformers' 7x7/stride-2 stem and max-pool: a 3x3 stem would
# change the architecture and the checkpoint would no longer load in stock transformers.
HF_DEFAULTS = {
    "vit": dict(patch_size=4, hidden_size=192, num_hidden_layers=6, num_attention_heads=3, intermediate_size=384,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    "resnet": dict(embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[2, 2, 2, 2], layer_type="basic"),
    "convnext": dict(patch_size=2, hidden_sizes=[48, 96, 192, 384], depths=[2, 2, 2, 2]),
}
HF_DEFAULTS["deit"] = HF_DEFAULTS["vit"]
PLAIN_DEFAULTS = {"mlp": dict(depth=4, width=512), "cnn": dict(depth=6, width=32)}
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
    g.add_argument("--image_cache_dir", default=os.environ.get("HF_EMERGENCE_IMAGE_CACHE",
                                                               str(Path.home() / ".cache" / "hf_emergence" / "images")),
                   help="decoded uint8 images are cached here, keyed by the file list ('' disables)")
    g.add_argument("--no_augmentation", action="store_true")
    g.add_argument("--dataloader_num_workers", type=int, default=0)
    g.add_argument("--stop_at_train_accuracy", type=float, default=None,
                   help="stop after the first epoch whose training accuracy (over that epoch's batches, as trained) "
                        "reaches this value, e.g. 0.995: train until the training set is fit")
    common.add_model_args(parser, MODEL_TYPES, "cnn")
    g = parser.add_argument_group("plain models (mlp, cnn)")
    g.add_argument("--depth", type=int, default=None, help="hidden layers (mlp) or conv layers (cnn); default 4 / 6")
    g.add_argument("--width", type=int, default=None, help="hidden units (mlp) or first-stage channels (cnn); default 512 / 32")
    g.add_argument("--batch_norm", action=argparse.BooleanOptionalAction, default=None,
                   help="BatchNorm after every hidden layer (default: on)")
    common.add_init_args(parser)
    common.add_training_args(parser, batch_size=128, learning_rate=None, epochs=3, weight_decay=None, warmup=0,
                             scheduler="cosine", optimizer=None)
    common.add_diagnostics_args(parser)
    common.add_run_args(parser, default_output_dir="out/vision")
    args = parser.parse_args(argv)

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
        args.optimizer = "sgd" if args.model_type in ("mlp", "cnn", "resnet") else "adamw"
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
    common.check_ranges(args, {"dataloader_num_workers": common.AT_LEAST_0})
    return args


# ------------------------------------------------------------------------------------------------ data
class ImageSet:
    """Decoded images as one uint8 tensor (N, 3, H, W), integer labels and the class names."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str], skipped: int = 0):
        self.images, self.labels, self.classes, self.skipped = images, labels, classes, skipped

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "ImageSet":
        return ImageSet(self.images[index], self.labels[index], self.classes, self.skipped)


def decode_image(source: Any, size: int) -> torch.Tensor:
    """A path or PIL image -> uint8 (3, size, size), RGB, resized (bilinear) only when needed."""
    import numpy as np
    from PIL import Image

    image = Image.open(source) if isinstance(source, (str, Path)) else source
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def list_image_folder(root: str | Path, what: str) -> tuple[list[str], list[tuple[Path, str]]]:
    """(sorted class names, [(file, class)]) of an image folder; a UsageError when it is missing or empty."""
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"{what} {root}: no such folder (expected <folder>/<class name>/<image files>)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UsageError(f"{what} {root}: no class folders inside (expected <folder>/<class name>/<image files>)")
    files = [(p, c) for c in classes for p in sorted((root / c).iterdir())
             if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise UsageError(f"{what} {root}: no image files ({', '.join(IMAGE_SUFFIXES)}) in its class folders")
    empty = [c for c in classes if not any(cls == c for _, cls in files)]
    if empty:
        raise UsageError(f"{what} {root}: class folder {empty[0]!r} holds no images")
    return classes, files


def read_image_folder(root: str | Path, what: str, args: argparse.Namespace,
                      classes: Optional[list[str]] = None) -> ImageSet:
    """Decode an image folder once (cached); with ``classes`` (the training classes) the folders must match."""
    found, files = list_image_folder(root, what)
    if classes is not None and found != classes:
        missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
        detail = f"class folder {missing[0]!r} is missing" if missing else f"class folder {extra[0]!r} is not a training class"
        raise UsageError(f"{what} {root}: {detail} (training classes: {', '.join(classes)})")
    classes = found
    key = hashlib.sha1(json.dumps([args.image_size, args.skip_bad_images] + [
        (str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p, _ in files]).encode()).hexdigest()
    cache = Path(args.image_cache_dir) / f"{key}.pt" if args.image_cache_dir else None
    if cache is not None and cache.is_file():
        saved = torch.load(cache)
        return ImageSet(saved["images"], saved["labels"], classes, saved["skipped"])
    images, labels, bad = [], [], []
    index = {c: i for i, c in enumerate(classes)}
    for path, cls in tqdm(files, desc=f"decode {Path(root).name}", disable=args.no_progress_bar, leave=False):
        try:
            images.append(decode_image(path, args.image_size))
        except (OSError, ValueError, SyntaxError) as err:   # PIL: UnidentifiedImageError is an OSError
            if not args.skip_bad_images:
                raise UsageError(f"{path}: cannot read this image ({type(err).__name__}: {str(err).splitlines()[0]}); "
                                 "pass --skip_bad_images to skip and count such files") from None
            bad.append(path)
            continue
        labels.append(index[cls])
    if not images:
        raise UsageError(f"{what} {root}: none of its {len(files)} images could be read")
    if bad:
        logger.warning("%s %s: skipped %d unreadable image(s), e.g. %s", what, root, len(bad), bad[0])
    result = ImageSet(torch.stack(images), torch.tensor(labels, dtype=torch.long), classes, len(bad))
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.partial")
        torch.save({"images": result.images, "labels": result.labels, "skipped": result.skipped}, tmp)
        os.replace(tmp, cache)
    return result


def _pick_column(columns: list[str], given: Optional[str], candidates: tuple[str, ...], what: str, dataset: str) -> str:
    if given is not None:
        if given not in columns:
            raise UsageError(f"dataset {dataset!r} has no column {given!r} (columns: {', '.join(columns)})")
        return given
    for name in candidates:
        if name in columns:
            return name
    raise UsageError(f"dataset {dataset!r} has no {what} column (looked for {', '.join(candidates)}; columns: "
                     f"{', '.join(columns)}): pass --{what}_column_name")


def read_hub_dataset(args: argparse.Namespace) -> dict[str, ImageSet]:
    import datasets

    try:
        raw = datasets.load_dataset(args.dataset_name, args.dataset_config_name)
    except Exception as err:  # not found / offline / bad config: one line, not a datasets traceback
        raise UsageError(f"cannot load dataset {args.dataset_name!r} ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    first = next(iter(raw.values()))
    image_col = _pick_column(first.column_names, args.image_column_name, ("image", "img"), "image", args.dataset_name)
    label_col = _pick_column(first.column_names, args.label_column_name, ("label", "labels", "fine_label"), "label",
                             args.dataset_name)
    feature, values = first.features[label_col], first[label_col]
    if hasattr(feature, "names"):                                  # ClassLabel: its names, in order
        classes = list(feature.names)
    elif all(isinstance(v, int) for v in values):                  # bare ints: classes 0..max of the first split
        classes = [str(i) for i in range(max(values) + 1)]
    else:                                                          # strings: sorted names
        classes = sorted({str(v) for v in values})
    out = {}
    for split, ds in raw.items():
        images, labels, bad = [], [], 0
        for i, row in enumerate(tqdm(ds, desc=f"decode {split}", disable=args.no_progress_bar, leave=False)):
            label = row[label_col]
            if not isinstance(label, int):
                if str(label) not in classes:
                    raise UsageError(f"dataset {args.dataset_name!r} split {split!r} row {i}: label {label!r} is not a "
                                     f"class of the {first.split} split ({', '.join(classes[:10])})")
                label = classes.index(str(label))
            if not 0 <= label < len(classes):
                raise UsageError(f"dataset {args.dataset_name!r} split {split!r} row {i}: label {label} is out of range "
                                 f"[0, {len(classes)})")
            try:
                images.append(decode_image(row[image_col], args.image_size))
            except (OSError, ValueError, AttributeError) as err:
                if not args.skip_bad_images:
                    raise UsageError(f"dataset {args.dataset_name!r} split {split!r} row {i}: cannot read the image "
                                     f"({type(err).__name__}); pass --skip_bad_images to skip such rows") from None
                bad += 1
                continue
            labels.append(label)
        out[split] = ImageSet(torch.stack(images), torch.tensor(labels), classes, bad)
    return out


def load_splits(args: argparse.Namespace) -> dict[str, ImageSet]:
    """{"train", "validation"[, "test"]} ImageSets; validation is carved from train (seeded) when none is given,
    never taken from the test split."""
    if args.dataset_name:
        splits = read_hub_dataset(args)
        if "train" not in splits:
            raise UsageError(f"dataset {args.dataset_name!r} has no 'train' split (splits: {', '.join(splits)})")
    elif args.train_dir:
        splits = {"train": read_image_folder(args.train_dir, "--train_dir", args)}
        if args.validation_dir:
            splits["validation"] = read_image_folder(args.validation_dir, "--validation_dir", args, splits["train"].classes)
        if args.test_dir:
            splits["test"] = read_image_folder(args.test_dir, "--test_dir", args, splits["train"].classes)
    else:
        splits = {"train": read_image_folder(BUILTIN_DATA / "train", "built-in train data", args)}
        splits["validation"] = read_image_folder(BUILTIN_DATA / "validation", "built-in validation data", args,
                                                 splits["train"].classes)
    if len(splits["train"].classes) < 2:
        source = f"--train_dir {args.train_dir}" if args.train_dir else f"dataset {args.dataset_name!r}"
        raise UsageError(f"{source} has a single class ({splits['train'].classes[0]!r}): a classifier needs at least "
                         "two (one folder per class)")
    if "validation" not in splits:
        train = splits["train"]
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.data_seed))
        held = max(1, round(len(train) * args.validation_split_percentage / 100))
        if held >= len(train):
            raise UsageError(f"--validation_split_percentage {args.validation_split_percentage} leaves no training images")
        splits.update(train=train.subset(order[held:]), validation=train.subset(order[:held]))
        splits["validation"].skipped = 0                 # unreadable files are counted once, with train
        logger.info("no validation data given: held out %d of %d training images (--data_seed %d)", held, len(train),
                    args.data_seed)
    for split, limit in (("train", args.max_train_samples), ("validation", args.max_eval_samples),
                         ("test", args.max_eval_samples)):
        if split in splits and limit and limit < len(splits[split]):   # folders are sorted by class: take a random subset, not the first N
            order = torch.randperm(len(splits[split]), generator=torch.Generator().manual_seed(args.data_seed))
            splits[split] = splits[split].subset(order[:limit].sort().values)
    return splits


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images, in [0, 1] units (std at least 1/255: a constant channel stays finite)."""
    x = images.to(torch.float64).div_(255).transpose(0, 1).flatten(1)
    return x.mean(1).tolist(), x.std(1).clamp(min=1 / 255).tolist()


class Batcher:
    """collate_fn over dataset indices: gather uint8 images, augment (train), normalise to float.

    The augmentation of a batch depends only on (seed, epoch, the batch's indices), so it is the same in
    every process layout and after a resume. Random crop: zero-pad 4 pixels, crop back to the input size.
    """

    def __init__(self, data: ImageSet, mean: list[float], std: list[float], augment: bool, seed: int):
        self.data, self.augment, self.seed, self.epoch = data, augment, seed, 0
        self.mean = torch.tensor(mean).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std).view(1, -1, 1, 1) * 255

    def __call__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        index = torch.tensor(indices, dtype=torch.long)
        images = self.data.images[index]
        if self.augment:
            key = zlib.crc32(index.numpy().tobytes(), zlib.crc32(f"{self.seed}/{self.epoch}".encode()))
            images = random_crop_flip(images, torch.Generator().manual_seed(key))
        pixels = (images.float() - self.mean) / self.std
        return {"pixel_values": pixels, "labels": self.data.labels[index], "index": index}


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

    def value(self, accelerator) -> Optional[float]:
        """The epoch's accuracy so far over every process (None before any batch)."""
        correct, seen = (accelerator.reduce(self.counts, reduction="sum") if accelerator.num_processes > 1
                         else self.counts).tolist()
        return correct / seen if seen else None


def random_crop_flip(images: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Per-image random crop (after zero padding) and horizontal flip of a uint8 batch (N, C, H, W), vectorised."""
    n, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    rows = (dy[:, None] + torch.arange(h)[None])                                  # (n, h)
    cols = dx[:, None] + torch.arange(w)[None]                                    # (n, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(n)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (n, h, w, c)
    return out.permute(0, 3, 1, 2).contiguous()


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


# ------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate(accelerator, model, dataloader, args: argparse.Namespace, split: str = "validation") -> dict[str, Any]:
    """Top-1 accuracy and mean cross-entropy over the whole split, each image counted exactly once
    (gather_for_metrics drops the samples duplicated to even out the last batch across processes)."""
    was_training = model.training
    model.eval()
    predictions, references = [], []
    loss_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    for batch in tqdm(dataloader, desc=f"eval {split}", disable=args.no_progress_bar or not accelerator.is_local_main_process,
                      leave=False):
        logits = logits_of(model(batch["pixel_values"])).float()
        losses = F.cross_entropy(logits, batch["labels"], reduction="none")
        preds, labels, losses = accelerator.gather_for_metrics((logits.argmax(-1), batch["labels"], losses))
        predictions += preds.tolist()
        references += labels.tolist()
        loss_sum += losses.double().sum()
    model.train(was_training)
    metric = common.load_metric("accuracy_offline").compute(predictions=predictions, references=references)
    return {f"{split}_accuracy": metric["accuracy"], f"{split}_loss": float(loss_sum) / max(1, metric["total"]),
            f"{split}_samples": metric["total"]}


# ------------------------------------------------------------------------------------------------ main
def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    accelerator = common.make_accelerator(args, "vision")
    checkpoints = common.Checkpoints(accelerator, args.output_dir, args.checkpoints_total_limit, args.overwrite_output_dir)
    resume_path = checkpoints.resolve(args.resume_from_checkpoint)
    set_seed(args.seed)

    # Data: decoded once (the main process fills the cache, the others read it).
    with accelerator.main_process_first():
        splits = load_splits(args)
    train, val, test = splits["train"], splits["validation"], splits.get("test")
    mean, std = channel_stats(train.images)
    logger.info("data: %d train / %d validation%s images, %d classes, %dx%d", len(train), len(val),
                f" / {len(test)} test" if test else "", len(train.classes), args.image_size, args.image_size)

    # Model built from a config after seeding: the seed fixes the initialisation.
    model = build_model(args, train.classes, mean, std)
    plan = getattr(model, "emergence_plan", None)
    if plan is not None:
        logger.info("emergence init:\n%s", plan)
    example = torch.zeros(1, 3, args.image_size, args.image_size)
    optimizer = common.make_optimizer(model, args, common.lr_plan(args, model, example_inputs=(example,)))

    train_batcher = Batcher(train, mean, std, augment=not args.no_augmentation, seed=args.seed)
    train_sampler = common.EpochBatchSampler(len(train), args.per_device_train_batch_size, args.seed,
                                             num_processes=accelerator.num_processes)
    workers = dict(num_workers=args.dataloader_num_workers, pin_memory=accelerator.device.type == "cuda")
    train_dl = common.data_loader(range(len(train)), batch_sampler=train_sampler, collate_fn=train_batcher, **workers)
    val_dl, test_dl = (None if data is None else common.data_loader(
        range(len(data)), batch_size=args.per_device_eval_batch_size,
        collate_fn=Batcher(data, mean, std, augment=False, seed=args.seed), **workers) for data in (val, test))
    max_steps, _ = common.training_length(args, math.ceil(len(train_sampler) / accelerator.num_processes))
    scheduler = common.make_scheduler(optimizer, args, max_steps, accelerator.num_processes)
    model, optimizer, train_dl, val_dl, scheduler = accelerator.prepare(model, optimizer, train_dl, val_dl, scheduler)
    test_dl = accelerator.prepare(test_dl) if test_dl is not None else None
    max_steps, num_epochs = common.training_length(args, len(train_dl))
    probe = (Batcher(val, mean, std, augment=False, seed=args.seed)(list(range(min(256, len(val)))))
             if args.measure_emergence else None)                   # fixed batch for --measure_emergence

    state, log = common.start_run(accelerator, args, checkpoints, resume_path)
    if args.measure_emergence and not resume_path:
        log.log({"step": 0, "epoch": 0, **common.emergence_report(accelerator, model, probe["pixel_values"])})
    progress = tqdm(total=max_steps, initial=state.completed_steps, desc="train",
                    disable=args.no_progress_bar or not accelerator.is_local_main_process)
    timer = common.Timer()
    train_fit = EpochAccuracy(accelerator.device)       # training accuracy of the current epoch (resumes count anew)

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
        if common.is_due(args.eval_steps, state, epoch_end) or first_epoch or \
                (epoch_end and "fit_epoch" in state.recorded):
            result = evaluate(accelerator, model, val_dl, args)
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
                logits = logits_of(model(batch["pixel_values"])).float()
                loss = F.cross_entropy(logits, batch["labels"])
                train_fit.add(logits, batch["labels"])
                grad_norm = common.optimizer_step(accelerator, model, optimizer, scheduler, loss, args, state, checkpoints)
            timer.step_done(len(batch["labels"]))
            if not common.count_micro_batch(state, accelerator, len(batch["labels"])):
                continue
            progress.update(1)
            if state.completed_steps % args.logging_steps == 0:
                record = common.log_training(log, state, accelerator, loss, grad_norm, scheduler, timer, "images")
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

    final = state.last_eval if state.last_eval.get("step") == state.completed_steps else evaluate(accelerator, model, val_dl, args)
    if test_dl is not None:                                  # read once, here: never seen by any choice above
        final = {**final, **evaluate(accelerator, model, test_dl, args, "test")}
    results = {"step": state.completed_steps, "epochs": state.epoch, **final,
               "epoch1_accuracy": state.recorded.get("epoch1_accuracy"),
               "train_accuracy": state.recorded.get("train_accuracy"), "fit_epoch": state.recorded.get("fit_epoch"),
               "skipped_images": sum(data.skipped for data in (train, val, test) if data is not None)}
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
