"""Images for examples/vision/run.py, read with `datasets` and served as batches of uint8 pixels.

Every source ends as an :class:`ImageSet`: an arrow column of undecoded images (``datasets.Image(decode=False)``:
a path or the encoded bytes per row), integer labels and the class names.

- image folders ``<dir>/<class name>/<image>``: ``load_dataset("imagefolder", data_files=<the listed files>)``
  (the files this module lists and checks, in sorted class/file order);
- Hub datasets, or a local folder in the Hub layout (``data/train-00000-of-00001.parquet``, ...):
  ``load_dataset(name, config)``, any image column and label column (ClassLabel, ints or strings).

The pixels are held one of two ways (``--in_memory``):

- **streaming** (``no``): each batch is decoded in the DataLoader's collate (in ``--dataloader_num_workers``
  worker processes), so memory does not grow with the dataset. Unreadable files are found before training by a
  check over every row, cached like the pixels (``--check_images``): the header (``PIL.Image.open`` + ``verify``,
  fast, but a JPEG cut short after its header passes) or a full decode (what serving a batch does);
- **in memory** (``yes``): every image decoded once into one uint8 tensor (N, 3, S, S), cached under
  ``--image_cache_dir`` and memory-mapped when read back; on a GPU it is moved to the device and augmented there.
  ``auto`` takes this path when the uint8 pixels of all splits fit in ``min(IN_MEMORY_CAP_BYTES, a quarter of the
  available RAM)`` (per process).

Both paths decode with :func:`decode_image` and index the same rows, so they give bit-identical batches for the
same indices. Decoding (the in-memory pass and the header check) runs in ``--preprocessing_num_workers`` processes.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
import zlib
from tqdm.auto import tqdm

import common
from common import UsageError

logger = logging.getLogger("hf_emergence.examples.vision")
BUILTIN_DATA = Path(__file__).resolve().parent / "data" / "cifar10_sample"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
#: ``--in_memory auto`` holds the pixels in memory up to this many bytes (and a quarter of the available RAM).
IN_MEMORY_CAP_BYTES = 4 << 30
#: Rows decoded per chunk by the decoding / checking passes.
SCAN_CHUNK = 256
CACHE_VERSION = 2
#: ``--check_images``: what the streaming path's check before training reads of every image.
CHECKS = ("header", "decode")


class BadImageError(UsageError):
    """An image that cannot be decoded while batches are served. A DataLoader worker's exception is re-raised in
    the main process as ``type(err)(<its traceback as text>)``; this class keeps only the original line."""

    def __init__(self, message: str):
        lines = [line for line in str(message).splitlines() if line.strip()]
        last = lines[-1] if lines else ""
        super().__init__(last.split(f"{type(self).__name__}: ", 1)[-1] if "Original Traceback" in message else message)


# ------------------------------------------------------------------------------------------------ splits
@dataclass
class ImageSet:
    """One split: ``labels[i]`` and the image at position ``rows[i]`` of ``pixels`` (in memory: a uint8
    (N, 3, S, S) tensor) or of ``source`` (streaming: a ``datasets.Dataset`` with one undecoded ``image`` column).
    A subset only re-indexes ``rows``: the pixels are never copied."""

    labels: torch.Tensor
    classes: list[str]
    rows: torch.Tensor
    source: Any = None
    pixels: Optional[torch.Tensor] = None
    skipped: int = 0
    origin: str = ""
    image_size: int = 0

    @classmethod
    def from_pixels(cls, images: torch.Tensor, labels: torch.Tensor, classes: list[str], skipped: int = 0) -> "ImageSet":
        return cls(labels, classes, torch.arange(len(labels)), pixels=images, skipped=skipped, image_size=images.shape[-1])

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def in_memory(self) -> bool:
        return self.pixels is not None

    def subset(self, index: torch.Tensor) -> "ImageSet":
        index = index.to(self.rows.device)
        return replace(self, labels=self.labels[index], rows=self.rows[index])

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """uint8 (len(index), 3, S, S) of the split's items ``index``."""
        if self.pixels is not None:
            return self.pixels[self.rows[index.to(self.rows.device)]]
        rows = self.rows[index].tolist()
        return decode_rows(self.source, rows, self.image_size, self.origin)

    @property
    def images(self) -> torch.Tensor:
        """All the split's pixels as one uint8 tensor (a copy; for inspection and tests)."""
        return self.gather(torch.arange(len(self)))

    def to(self, device: torch.device) -> "ImageSet":
        if self.pixels is None:
            return self
        return replace(self, labels=self.labels.to(device), rows=self.rows.to(device), pixels=self.pixels.to(device))


# ---------------------------------------------------------------------------------------------- decoding
def decode_image(item: Any, size: int) -> torch.Tensor:
    """A path, encoded bytes, a ``{"bytes", "path"}`` record (``datasets.Image(decode=False)``) or a PIL image
    -> uint8 (3, size, size), RGB, resized (bilinear) only when needed."""
    import numpy as np
    from PIL import Image

    image = _open(item)
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def _open(item: Any):
    from PIL import Image

    if isinstance(item, dict):
        item = item["bytes"] if item.get("bytes") is not None else item["path"]
    if isinstance(item, (bytes, bytearray)):
        return Image.open(io.BytesIO(item))
    if isinstance(item, (str, Path)):
        return Image.open(item)
    if item is None:
        raise ValueError("no image in this row")
    return item


def check_image(item: Any) -> None:
    """Raise if the file does not parse as an image (header, and the checksums of formats that have them)."""
    image = _open(item)
    if hasattr(image, "verify"):
        image.verify()


READ_ERRORS = (OSError, ValueError, SyntaxError, AttributeError, TypeError)   # PIL: UnidentifiedImageError is an OSError


def _where(item: Any, row: int, origin: str) -> str:
    path = item.get("path") if isinstance(item, dict) else (item if isinstance(item, (str, Path)) else None)
    return str(path) if path and (not isinstance(item, dict) or item.get("bytes") is None) else f"{origin} row {row}"


def _error(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def decode_rows(source: Any, rows: list[int], size: int, origin: str) -> torch.Tensor:
    """uint8 (len(rows), 3, size, size) of rows of an undecoded image column (the streaming collate)."""
    out = torch.empty((len(rows), 3, size, size), dtype=torch.uint8)
    for j, (row, item) in enumerate(zip(rows, source[rows]["image"] if rows else [])):
        try:
            out[j] = decode_image(item, size)
        except READ_ERRORS as err:
            raise BadImageError(f"{_where(item, row, origin)}: cannot read this image ({_error(err)}); it passed the "
                                "check before training, so --skip_bad_images cannot drop it: remove the file, or "
                                "find such files before training with --check_images decode") from None
    return out


class _Scan:
    """collate_fn of the decoding / checking passes: a chunk of rows -> (ok mask, pixels of the ok rows, errors).
    ``mode``: ``decode`` (keep the pixels), ``check-decode`` (decode, keep nothing) or ``check`` (the header)."""

    def __init__(self, source: Any, size: int, mode: str, origin: str):
        self.source, self.size, self.mode, self.origin = source, size, mode, origin

    def __call__(self, rows: list[int]) -> tuple[torch.Tensor, Optional[torch.Tensor], list[tuple[int, str]]]:
        ok = torch.zeros(len(rows), dtype=torch.bool)
        pixels, errors = [], []
        for j, (row, item) in enumerate(zip(rows, self.source[rows]["image"])):
            try:
                if self.mode == "decode":
                    pixels.append(decode_image(item, self.size))
                elif self.mode == "check-decode":
                    decode_image(item, self.size)          # the pixels are dropped: only that it decodes counts
                else:
                    check_image(item)
                ok[j] = True
            except READ_ERRORS as err:
                errors.append((row, f"{_where(item, row, self.origin)}: cannot read this image ({_error(err)})"))
        return ok, (torch.stack(pixels) if self.mode == "decode" and pixels else None), errors


def _cache_file(args: argparse.Namespace, identity: Any, mode: str) -> Optional[Path]:
    if not args.image_cache_dir:
        return None
    key = hashlib.sha1(json.dumps([CACHE_VERSION, mode, args.image_size, identity]).encode()).hexdigest()
    return Path(args.image_cache_dir) / f"{key}.{mode}.pt"


def scan(split: ImageSet, args: argparse.Namespace, identity: Any, decode: bool) -> ImageSet:
    """Check (streaming) or decode (in memory) every row of a freshly read split, cached under --image_cache_dir;
    unreadable rows stop the run (one line naming the first) or, with --skip_bad_images, are dropped and counted."""
    mode = "decode" if decode else ("check" if args.check_images == "header" else "check-decode")
    cache = _cache_file(args, identity, mode)
    size, n = args.image_size, len(split)
    if cache is not None and cache.is_file():
        saved = torch.load(cache, mmap=True)
        ok, pixels, errors = saved["ok"], saved.get("pixels"), saved["errors"]
    else:
        ok = torch.zeros(n, dtype=torch.bool)
        pixels = torch.empty((n, 3, size, size), dtype=torch.uint8) if decode else None   # filled in place: no stack
        errors: list[tuple[int, str]] = []
        workers = args.preprocessing_num_workers or 0
        loader = common.data_loader(split.rows.tolist(), batch_size=SCAN_CHUNK, num_workers=workers,   # own generator:
                                    collate_fn=_Scan(split.source, size, mode, split.origin))  # a cold cache draws nothing from the global RNG
        start = filled = 0
        for chunk_ok, chunk, chunk_errors in tqdm(loader, desc=f"{mode} {split.origin}", leave=False,
                                                  disable=args.no_progress_bar):
            ok[start:start + len(chunk_ok)] = chunk_ok
            start += len(chunk_ok)
            errors += chunk_errors
            if chunk is not None:
                pixels[filled:filled + len(chunk)] = chunk
                filled += len(chunk)
        if decode:
            pixels = pixels[:filled]
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f"{cache.name}.{os.getpid()}.partial")
            torch.save({"ok": ok, "pixels": pixels, "errors": errors}, tmp)
            os.replace(tmp, cache)
    if errors and not args.skip_bad_images:
        raise UsageError(f"{errors[0][1]}; pass --skip_bad_images to skip and count such files")
    if not bool(ok.any()):
        raise UsageError(f"{split.origin}: none of its {n} images could be read")
    if errors:
        logger.warning("%s: skipped %d unreadable image(s), e.g. %s", split.origin, len(errors), errors[0][1])
    kept = replace(split, labels=split.labels[ok], rows=split.rows[ok], skipped=len(errors))
    if decode:
        kept = replace(kept, rows=torch.arange(len(kept)), pixels=pixels, source=None)
    return kept


# -------------------------------------------------------------------------------------------- image folders
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
                      classes: Optional[list[str]] = None) -> tuple[ImageSet, Any]:
    """An image folder as an undecoded ImageSet (and its cache identity); with ``classes`` (the training
    classes) the class folders must match."""
    import datasets

    found, files = list_image_folder(root, what)
    if classes is not None and found != classes:
        missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
        detail = f"class folder {missing[0]!r} is missing" if missing else f"class folder {extra[0]!r} is not a training class"
        raise UsageError(f"{what} {root}: {detail} (training classes: {', '.join(classes)})")
    paths = [str(p.resolve()) for p, _ in files]
    with common.quiet_datasets(progress=not args.no_progress_bar):
        ds = datasets.load_dataset("imagefolder", data_files={"train": paths}, split="train", cache_dir=args.cache_dir)
    labels = torch.tensor([found.index(c) for _, c in files], dtype=torch.long)
    if "label" in ds.features:                 # imagefolder keeps the order of data_files (none for a single class)
        lookup = torch.tensor([found.index(name) for name in ds.features["label"].names], dtype=torch.long)
        if len(ds) != len(files) or not torch.equal(lookup[torch.tensor(ds["label"], dtype=torch.long)], labels):
            raise RuntimeError(f"imagefolder returned {root} in another order than listed")
    ds = ds.cast_column("image", datasets.Image(decode=False))
    identity = ["folder"] + [(p, f.stat().st_size, f.stat().st_mtime_ns) for p, (f, _) in zip(paths, files)]
    split = ImageSet(labels, found, torch.arange(len(ds)), source=ds.select_columns(["image"]),
                     origin=f"{what} {root}", image_size=args.image_size)
    return split, identity


# ------------------------------------------------------------------------------------------------ Hub
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


def read_hub_dataset(args: argparse.Namespace) -> dict[str, tuple[ImageSet, Any]]:
    """Every split of a Hub dataset (or a local folder in the Hub layout, e.g. parquet files) as undecoded
    ImageSets. Labels: a ClassLabel's names; bare ints are classes 0..max of the first split; strings sorted."""
    import datasets

    name = args.dataset_name
    try:
        with common.quiet_datasets(progress=not args.no_progress_bar):
            raw = datasets.load_dataset(name, args.dataset_config_name, cache_dir=args.cache_dir)
    except Exception as err:  # not found / offline / bad config: one line, not a datasets traceback
        raise UsageError(f"cannot load dataset {name!r} ({common.first_line(err)})") from None
    first = next(iter(raw.values()))
    image_col = _pick_column(first.column_names, args.image_column_name, ("image", "img"), "image", name)
    label_col = _pick_column(first.column_names, args.label_column_name, ("label", "labels", "fine_label"), "label", name)
    feature, values = first.features[label_col], first[label_col]
    if hasattr(feature, "names"):                                  # ClassLabel: its names, in order
        classes = list(feature.names)
    elif all(isinstance(v, int) for v in values):                  # bare ints: classes 0..max of the first split
        classes = [str(i) for i in range(max(values) + 1)]
    else:                                                          # strings: sorted names
        classes = sorted({str(v) for v in values})
    index = {c: i for i, c in enumerate(classes)}
    out = {}
    for split, ds in raw.items():
        labels = []
        for i, label in enumerate(ds[label_col]):
            if not isinstance(label, int):
                if str(label) not in index:
                    raise UsageError(f"dataset {name!r} split {split!r} row {i}: label {label!r} is not a "
                                     f"class of the {first.split} split ({', '.join(classes[:10])})")
                label = index[str(label)]
            if not 0 <= label < len(classes):
                raise UsageError(f"dataset {name!r} split {split!r} row {i}: label {label} is out of range "
                                 f"[0, {len(classes)})")
            labels.append(label)
        try:
            images = ds.select_columns([image_col]).cast_column(image_col, datasets.Image(decode=False))
        except (TypeError, ValueError) as err:
            raise UsageError(f"dataset {name!r} column {image_col!r} is not an image column ({_error(err)}): pass "
                             "--image_column_name") from None
        if image_col != "image":
            images = images.rename_column(image_col, "image")
        identity = ["hub", name, args.dataset_config_name, split, image_col, images._fingerprint, len(images)]
        out[split] = (ImageSet(torch.tensor(labels, dtype=torch.long), classes, torch.arange(len(images)), source=images,
                               origin=f"dataset {name!r} split {split!r}", image_size=args.image_size), identity)
    return out


# ----------------------------------------------------------------------------------------------- loading
def uint8_bytes(num_images: int, image_size: int) -> int:
    return num_images * 3 * image_size * image_size


def choose_in_memory(choice: str, num_images: int, image_size: int) -> bool:
    """``--in_memory``: yes / no, or auto: in memory iff the uint8 pixels fit in min(IN_MEMORY_CAP_BYTES, a quarter
    of the available RAM)."""
    if choice != "auto":
        return choice == "yes"
    return uint8_bytes(num_images, image_size) <= min(IN_MEMORY_CAP_BYTES, available_ram() // 4)


def available_ram() -> int:
    """Bytes of RAM available to new allocations (MemAvailable on Linux, else the physical RAM)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def load_splits(args: argparse.Namespace, device: Optional[torch.device] = None,
                builtin: Path = BUILTIN_DATA) -> dict[str, ImageSet]:
    """{"train", "validation"[, "test"]} ImageSets (in memory or streaming, see the module doc); validation is
    carved from train (seeded by --data_seed) when none is given, never taken from the test split;
    --max_train_samples / --max_eval_samples take random subsets (--data_seed). In memory, the pixels are moved to
    ``device``."""
    if args.dataset_name:
        raw = read_hub_dataset(args)
        if "train" not in raw:
            raise UsageError(f"dataset {args.dataset_name!r} has no 'train' split (splits: {', '.join(raw)})")
        raw = {k: v for k, v in raw.items() if k in ("train", "validation", "test")}
    elif args.train_dir:
        raw = {"train": read_image_folder(args.train_dir, "--train_dir", args)}
        classes = raw["train"][0].classes
        if args.validation_dir:
            raw["validation"] = read_image_folder(args.validation_dir, "--validation_dir", args, classes)
        if args.test_dir:
            raw["test"] = read_image_folder(args.test_dir, "--test_dir", args, classes)
    else:
        raw = {"train": read_image_folder(builtin / "train", "built-in train data", args)}
        raw["validation"] = read_image_folder(builtin / "validation", "built-in validation data", args,
                                              raw["train"][0].classes)
    train = raw["train"][0]
    if len(train.classes) < 2:
        source = f"--train_dir {args.train_dir}" if args.train_dir else f"dataset {args.dataset_name!r}"
        raise UsageError(f"{source} has a single class ({train.classes[0]!r}): a classifier needs at least "
                         "two (one folder per class)")
    in_memory = choose_in_memory(args.in_memory, sum(len(s) for s, _ in raw.values()), args.image_size)
    logger.info("images %s (--in_memory %s)", "decoded into memory" if in_memory else "decoded per batch", args.in_memory)
    splits = {name: scan(split, args, identity, decode=in_memory) for name, (split, identity) in raw.items()}
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
    if in_memory and device is not None:
        splits = _share_to(splits, device)
    return splits


def _share_to(splits: dict[str, ImageSet], device: torch.device) -> dict[str, ImageSet]:
    """Move the pixels to ``device`` once per underlying tensor (train and a carved validation share one)."""
    moved: dict[int, torch.Tensor] = {}
    out = {}
    for name, split in splits.items():
        key = id(split.pixels)
        if key not in moved:
            moved[key] = split.pixels.to(device)
        out[name] = replace(split, pixels=moved[key], rows=split.rows.to(device), labels=split.labels.to(device))
    return out


# ------------------------------------------------------------------------------------------------ statistics
def channel_stats(data: ImageSet | torch.Tensor, sample: int = 0, seed: int = 0) -> tuple[list[float], list[float]]:
    """Per-channel mean and (unbiased) std of uint8 images, in [0, 1] units (std at least 1/255: a constant
    channel stays finite), from exact integer sums over chunks (no float copy of the data).

    Over every image, or with ``sample`` > 0 and a split larger than that, over ``sample`` images drawn with
    ``seed`` (the streaming path: a fixed seeded sample instead of decoding the whole split for two numbers)."""
    if isinstance(data, torch.Tensor):
        data = ImageSet.from_pixels(data, torch.zeros(len(data), dtype=torch.long), [])
    index = torch.arange(len(data))
    if 0 < sample < len(data):
        index = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:sample].sort().values
    s1 = s2 = None
    count = 0
    chunk = max(1, (1 << 23) // (3 * data.image_size ** 2 or 1))        # ~64 MiB of int64 per chunk
    for start in range(0, len(index), chunk):
        x = data.gather(index[start:start + chunk]).to(torch.int64).transpose(0, 1).flatten(1)
        a, b = x.sum(1), (x * x).sum(1)
        s1, s2 = (a, b) if s1 is None else (s1 + a, s2 + b)
        count += x.shape[1]
    mean, std = [], []
    for c1, c2 in zip(s1.tolist(), s2.tolist()):
        mean.append(float(Fraction(c1, count * 255)))
        var = Fraction(count * c2 - c1 * c1, count * max(1, count - 1) * 255 * 255)
        std.append(max(float(var) ** 0.5, 1 / 255))
    return mean, std


# ------------------------------------------------------------------------------------------------ batches
class Batcher:
    """collate_fn over dataset indices: gather (in memory) or decode (streaming) the uint8 images, augment (train),
    normalise to float; on the pixels' device.

    The augmentation of a batch depends only on (seed, epoch, the batch's indices), so it is the same in
    every process layout, in both data paths and after a resume. Random crop: zero-pad 4 pixels, crop back to the
    input size.
    """

    def __init__(self, data: ImageSet, mean: list[float], std: list[float], augment: bool, seed: int):
        self.data, self.augment, self.seed, self.epoch = data, augment, seed, 0
        self.device = data.pixels.device if data.pixels is not None else torch.device("cpu")
        self.mean = (torch.tensor(mean).view(1, -1, 1, 1) * 255).to(self.device)
        self.std = (torch.tensor(std).view(1, -1, 1, 1) * 255).to(self.device)

    def __call__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        index = torch.tensor(indices, dtype=torch.long)
        images = self.data.gather(index)
        if self.augment:
            key = zlib.crc32(index.numpy().tobytes(), zlib.crc32(f"{self.seed}/{self.epoch}".encode()))
            images = random_crop_flip(images, torch.Generator(device=images.device).manual_seed(key))
        pixels = (images.float() - self.mean) / self.std
        return {"pixel_values": pixels, "labels": self.data.labels[index.to(self.data.labels.device)], "index": index}


def random_crop_flip(images: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Per-image random crop (after zero padding) and horizontal flip of a uint8 batch (N, C, H, W), vectorised,
    on the batch's device (``generator`` lives there too)."""
    n, _, h, w = images.shape
    device = images.device
    padded = F.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=device)
    flip = torch.rand(n, generator=generator, device=device) < 0.5
    rows = (dy[:, None] + torch.arange(h, device=device)[None])                   # (n, h)
    cols = dx[:, None] + torch.arange(w, device=device)[None]                     # (n, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (n, h, w, c)
    return out.permute(0, 3, 1, 2).contiguous()
