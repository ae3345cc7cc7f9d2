"""The vision example end to end on tiny models: every family trains, saves and reloads bit-identically; reported
accuracy equals an independent recount; exact resume; two processes count each image once; bad input is one line."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "vision" / "run.py"
BUILTIN = ROOT / "examples" / "vision" / "data" / "cifar10_sample"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run = _load("vision_run", SCRIPT)
common = sys.modules["common"]
plain_models = sys.modules["plain_models"]

TINY = {
    "vit": ["--config_overrides", "hidden_size=16,num_hidden_layers=2,num_attention_heads=2,intermediate_size=32,patch_size=8"],
    "deit": ["--config_overrides", "hidden_size=16,num_hidden_layers=2,num_attention_heads=2,intermediate_size=32,patch_size=8"],
    "resnet": ["--config_overrides", "embedding_size=8,hidden_sizes=[8,8,16,16],depths=[1,1,1,1]"],
    "convnext": ["--config_overrides", "hidden_sizes=[8,8,16,16],depths=[1,1,1,1]"],
    "mlp": ["--depth", "3", "--width", "32"],
    "cnn": ["--depth", "3", "--width", "8"],
    "cnn_no_bn": ["--depth", "3", "--width", "8", "--no-batch_norm"],
}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("image_cache"))


def _args(out: Path, cache: str, *extra: str) -> list[str]:
    return ["--output_dir", str(out), "--image_cache_dir", cache, "--cache_dir", str(Path(cache) / "datasets"),
            "--no_progress_bar", "--max_train_samples", "64",
            "--max_eval_samples", "40", "--per_device_train_batch_size", "16", "--logging_steps", "1", *extra]


def _model_type(name: str) -> str:
    return name.split("_")[0]


@pytest.mark.parametrize("name", list(TINY))
def test_each_family_trains_saves_and_reloads(name, tmp_path, cache_dir):
    out = tmp_path / name
    results = run.main(_args(out, cache_dir, "--model_type", _model_type(name), "--max_train_steps", "2", *TINY[name]))
    assert results["step"] == 2 and results["validation_samples"] == 40
    assert 0.0 <= results["validation_accuracy"] <= 1.0
    saved = load_file(str(out / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())
    assert config["emergence_init"]["applied"] is True
    if _model_type(name) in plain_models.PLAIN_MODEL_TYPES:
        model = plain_models.load_plain(out)
        assert config["batch_norm"] is (name != "cnn_no_bn")
    else:
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        model = AutoModelForImageClassification.from_pretrained(out)      # stock transformers
        assert type(model).__name__.lower().startswith(_model_type(name))
        assert AutoImageProcessor.from_pretrained(out).size["height"] == 32
        # transformers 5 saves some modules under their legacy names: compare checkpoint to checkpoint
        model.save_pretrained(tmp_path / "again")
        state = load_file(str(tmp_path / "again" / "model.safetensors"))
    if _model_type(name) in plain_models.PLAIN_MODEL_TYPES:
        state = model.state_dict()
    assert state.keys() == saved.keys()
    for key, tensor in saved.items():
        assert torch.equal(state[key], tensor), key
    assert "emergence-init" in (out / "README.md").read_text()


def test_reported_accuracy_equals_an_independent_recount(tmp_path, cache_dir):
    """Reload the saved CNN, normalise the validation images with the saved statistics, count hits by hand."""
    out = tmp_path / "cnn"
    results = run.main(_args(out, cache_dir, "--num_train_epochs", "2", *TINY["cnn"]))
    assert results["epochs"] == 2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "validation_accuracy" in r and not r.get("final")]
    assert [r["epoch"] for r in evals] == [1, 2]
    assert results["epoch1_accuracy"] == evals[0]["validation_accuracy"]

    model = plain_models.load_plain(out).eval()
    config = model.config
    args = run.parse_args(["--max_eval_samples", "40", "--image_cache_dir", cache_dir, "--no_progress_bar",
                           "--cache_dir", str(Path(cache_dir) / "datasets")])
    val = run.load_splits(args)["validation"]
    mean = torch.tensor(config.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(config.image_std).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = model((val.images.float() / 255 - mean) / std)
    hits = int((logits.argmax(-1) == val.labels).sum())
    assert results["validation_accuracy"] == pytest.approx(hits / len(val), abs=1e-12)
    assert len(val) == 40 and len(set(val.labels.tolist())) > 1     # a random subset, not the first class folder


VIT_DROPOUT = ["--model_type", "vit", "--config_overrides",
               TINY["vit"][1] + ",hidden_dropout_prob=0.1,attention_probs_dropout_prob=0.1"]


def _run_then_resume_from_step_6(tmp_path: Path, cache: str, resume_cache: str, flags: list[str]) -> tuple[dict, dict]:
    """(results of a 10-step run, results of a copy resumed from its step-6 checkpoint); the saved weights of the
    two are asserted bit-identical."""
    expected = run.main(_args(tmp_path / "a", cache, *flags))
    resumed = tmp_path / "b"
    resumed.mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step_00000006", resumed / "checkpoints" / "step_00000006")
    results = run.main(_args(resumed, resume_cache, *flags, "--resume_from_checkpoint",
                             str(resumed / "checkpoints" / "step_00000006")))
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return expected, results


def test_exact_resume_with_augmentation_and_dropout_across_an_epoch_boundary(tmp_path, cache_dir):
    flags = ["--max_train_steps", "10", "--checkpointing_steps", "3", *VIT_DROPOUT]
    expected, results = _run_then_resume_from_step_6(tmp_path, cache_dir, cache_dir, flags)
    assert results == expected
    # 64 images in batches of 16: step 6 is inside the second epoch, so the resume skips batches of epoch 1


def test_random_crop_flip_matches_explicit_slicing():
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    out = run.random_crop_flip(images, torch.Generator().manual_seed(3), pad=2)
    g = torch.Generator().manual_seed(3)
    dy, dx = torch.randint(0, 5, (6,), generator=g), torch.randint(0, 5, (6,), generator=g)
    flip = torch.rand(6, generator=g) < 0.5
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for i in range(6):
        crop = padded[i, :, dy[i]:dy[i] + 8, dx[i]:dx[i] + 8]
        assert torch.equal(out[i], crop.flip(-1) if flip[i] else crop)
    assert flip.any() and not flip.all()


def test_batcher_augmentation_depends_on_seed_epoch_and_batch_only():
    data = run.ImageSet.from_pixels(torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8), torch.arange(10) % 3,
                                    ["a", "b", "c"])
    batcher = run.Batcher(data, [0.5] * 3, [0.25] * 3, augment=True, seed=1)
    first = batcher([0, 4, 7])["pixel_values"]
    assert torch.equal(first, batcher([0, 4, 7])["pixel_values"])
    batcher.epoch = 1
    assert not torch.equal(first, batcher([0, 4, 7])["pixel_values"])
    plain = run.Batcher(data, [0.5] * 3, [0.25] * 3, augment=False, seed=1)([2])["pixel_values"]
    assert torch.allclose(plain, (data.images[2:3].float() / 255 - 0.5) / 0.25)


@pytest.mark.parametrize("in_memory", ["yes", "no"])
def test_two_processes_count_each_validation_image_once(in_memory, tmp_path, cache_dir):
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", str(SCRIPT), *_args(out, cache_dir, "--max_train_steps", "2", *TINY["cnn"]),
           "--max_eval_samples", "37", "--per_device_eval_batch_size", "8", "--in_memory", in_memory]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stderr
    final = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"final"' in l][0]
    assert final["validation_samples"] == 37          # 37 = 2 x 8 x 2 + 5: the padded duplicates were dropped


# ---------------------------------------------------------------------------------------------- bad input
def _fails(capsys, argv: list[str]) -> str:
    assert common.run_cli(run.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def _folder(root: Path, classes: dict[str, int]) -> Path:
    from PIL import Image

    for cls, n in classes.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (32, 32), (i * 40 % 255, 80, 160)).save(root / cls / f"{i}.png")
    return root


def test_missing_and_empty_folders(tmp_path, capsys, cache_dir):
    err = _fails(capsys, _args(tmp_path / "o", cache_dir, "--train_dir", str(tmp_path / "nope")))
    assert "nope" in err and "no such folder" in err
    (tmp_path / "empty").mkdir()
    assert "no class folders" in _fails(capsys, _args(tmp_path / "o", cache_dir, "--train_dir", str(tmp_path / "empty")))
    (tmp_path / "noimg" / "cat").mkdir(parents=True)
    assert "no image files" in _fails(capsys, _args(tmp_path / "o", cache_dir, "--train_dir", str(tmp_path / "noimg")))


def test_corrupt_image_is_named_and_can_be_skipped(tmp_path, capsys, cache_dir):
    train = _folder(tmp_path / "train", {"a": 4, "b": 4})
    (train / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    argv = _args(tmp_path / "o", cache_dir, "--train_dir", str(train), "--max_train_steps", "1", *TINY["mlp"],
                 "--model_type", "mlp", "--validation_split_percentage", "25")
    err = _fails(capsys, argv)
    assert "broken.jpg" in err and "--skip_bad_images" in err
    results = run.main(argv + ["--skip_bad_images"])
    assert results["skipped_images"] == 1
    assert results["validation_samples"] == 2          # 25% of the 8 readable images, held out with --data_seed


def test_validation_class_folders_must_match(tmp_path, capsys, cache_dir):
    train = _folder(tmp_path / "train", {"a": 2, "b": 2})
    val = _folder(tmp_path / "val", {"a": 2})
    err = _fails(capsys, _args(tmp_path / "o", cache_dir, "--train_dir", str(train), "--validation_dir", str(val)))
    assert "'b' is missing" in err and str(val) in err
    _folder(tmp_path / "val", {"b": 1, "c": 1})
    assert "'c' is not a training class" in _fails(
        capsys, _args(tmp_path / "o", cache_dir, "--train_dir", str(train), "--validation_dir", str(val)))


@pytest.mark.parametrize("argv, message", [
    (["--model_type", "vit", "--config_overrides", "hiden_size=8"], "no key 'hiden_size'"),
    (["--model_type", "vit", "--batch_norm"], "apply to mlp and cnn"),
    (["--alpha", "-1"], "alpha"),
    (["--model_type", "cnn", "--depth", "2"], "depth must be >= 3"),
    (["--validation_split_percentage", "100"], "(0, 100)"),
])
def test_bad_arguments_are_one_line(argv, message, tmp_path, capsys, cache_dir):
    assert message in _fails(capsys, _args(tmp_path / "o", cache_dir, "--max_train_steps", "1", *argv))


def test_unknown_model_type_exits_2_from_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model_type", "vgg", "--output_dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "invalid choice: 'vgg'" in proc.stderr and "Traceback" not in proc.stderr


def test_hub_dataset_columns_and_label_range(tmp_path, capsys, cache_dir, monkeypatch):
    import datasets
    from PIL import Image

    image = Image.new("RGB", (32, 32), (10, 20, 30))

    def serve(**splits: dict) -> None:
        built = datasets.DatasetDict({k: datasets.Dataset.from_dict(v) for k, v in splits.items()})
        monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: built)

    argv = _args(tmp_path / "o", cache_dir, "--dataset_name", "someone/images", "--max_train_steps", "1",
                 "--model_type", "mlp", "--depth", "2", "--width", "8")
    serve(train={"pixels": [image], "label": [0]})
    err = _fails(capsys, argv)
    assert "no image column" in err and "pixels" in err and "--image_column_name" in err
    serve(train={"img": [image], "target": [0]})
    assert "no label column" in _fails(capsys, argv)
    serve(train={"img": [image] * 4, "label": [0, 1, 0, 1]}, test={"img": [image, image], "label": [1, 5]})
    err = _fails(capsys, argv)
    assert "split 'test' row 1: label 5 is out of range [0, 2)" in err
    serve(train={"img": [image] * 4, "label": [0, 1, 0, 1]}, test={"img": [image, image], "label": [1, 0]})
    results = run.main(argv)               # the test split stays the test set; validation is held out from train
    assert results["test_samples"] == 2 and results["validation_samples"] == 1


def test_test_split_is_read_once_at_the_end(tmp_path, capsys, cache_dir):
    """--test_dir is scored once, after training; every evaluation during training reads the held-out validation."""
    train = _folder(tmp_path / "train", {"a": 6, "b": 6})
    test = _folder(tmp_path / "test", {"a": 3, "b": 2})
    out = tmp_path / "o"
    results = run.main(_args(out, cache_dir, "--train_dir", str(train), "--test_dir", str(test), *TINY["mlp"],
                             "--model_type", "mlp", "--validation_split_percentage", "25", "--num_train_epochs", "2",
                             "--per_device_train_batch_size", "3"))
    assert results["test_samples"] == 5 and results["validation_samples"] == 3 and results["epoch1_accuracy"] is not None
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("validation_accuracy" in r and not r.get("final") for r in records)      # evaluated during training
    assert [r.get("final") for r in records if any(k.startswith("test_") for k in r)] == [True]
    assert "test: accuracy" in capsys.readouterr().out
    _folder(tmp_path / "test", {"c": 1})
    err = _fails(capsys, _args(tmp_path / "o2", cache_dir, "--train_dir", str(train), "--test_dir", str(test)))
    assert "--test_dir" in err and "'c' is not a training class" in err
    assert "not both" in _fails(capsys, _args(tmp_path / "o3", cache_dir, "--dataset_name", "x/y", "--test_dir", str(test)))


# ------------------------------------------------------------------------------------ streaming / in memory
image_data = sys.modules["image_data"]


def _noise_folder(root: Path, classes: dict[str, int], size: int = 12, seed: int = 0) -> Path:
    """Random-noise images of mixed sizes (some resized on decode), PNG and JPEG."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    for c, (cls, n) in enumerate(classes.items()):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            side = size if i % 3 else size + 5
            pixels = torch.randint(0, 256, (side, side, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(root / cls / f"{i:03d}.{'png' if i % 2 else 'jpg'}")
    return root


def _data_args(tmp_path: Path, *extra: str):
    return run.parse_args(["--output_dir", str(tmp_path / "o"), "--image_cache_dir", str(tmp_path / "pixels"),
                           "--cache_dir", str(tmp_path / "datasets"), "--no_progress_bar", "--image_size", "12", *extra])


def test_a_jpeg_cut_after_its_header_is_found_before_training_by_check_images_decode(tmp_path):
    """The header check passes a JPEG truncated after its header (serving it would stop the run mid-epoch, with
    one line naming it); --check_images decode finds it before training, names it, and --skip_bad_images drops it."""
    import io

    from PIL import Image

    train = _noise_folder(tmp_path / "train", {"a": 4, "b": 4})
    noise = torch.randint(0, 256, (64, 64, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8).numpy()
    encoded = io.BytesIO()
    Image.fromarray(noise).save(encoded, format="JPEG")
    cut = train / "b" / "cut.jpg"
    cut.write_bytes(encoded.getvalue()[: len(encoded.getvalue()) * 2 // 3])
    flags = ["--train_dir", str(train), "--in_memory", "no"]

    header = image_data.load_splits(_data_args(tmp_path, *flags))
    assert header["train"].skipped == 0 and len(header["train"]) + len(header["validation"]) == 9
    with pytest.raises(image_data.BadImageError, match=r"cut\.jpg: cannot read this image .*--check_images decode"):
        for split in ("train", "validation"):
            header[split].images
    with pytest.raises(common.UsageError, match=r"cut\.jpg: cannot read this image .*--skip_bad_images"):
        image_data.load_splits(_data_args(tmp_path, *flags, "--check_images", "decode"))
    decoded = image_data.load_splits(_data_args(tmp_path, *flags, "--check_images", "decode", "--skip_bad_images"))
    assert decoded["train"].skipped == 1 and len(decoded["train"]) + len(decoded["validation"]) == 8
    assert decoded["train"].images.shape == (len(decoded["train"]), 3, 12, 12)
    assert decoded["validation"].images.shape == (len(decoded["validation"]), 3, 12, 12)


def test_streaming_and_in_memory_batches_are_bit_identical(tmp_path):
    """Same rows, labels, statistics and augmented batches whichever way the pixels are held; a second in-memory
    run reads the decoded cache (no decoding)."""
    train = _noise_folder(tmp_path / "train", {"a": 9, "b": 7, "c": 8})
    (train / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    flags = ["--train_dir", str(train), "--max_train_samples", "15", "--skip_bad_images"]
    held = image_data.load_splits(_data_args(tmp_path, *flags, "--in_memory", "yes"))
    streamed = image_data.load_splits(_data_args(tmp_path, *flags, "--in_memory", "no"))
    assert held["train"].in_memory and not streamed["train"].in_memory
    assert held["train"].skipped == streamed["train"].skipped == 1
    for split in ("train", "validation"):
        a, b = held[split], streamed[split]
        assert torch.equal(a.labels, b.labels) and torch.equal(a.images, b.images)
    assert len(held["train"]) == 15 and len(held["validation"]) == 2      # 10% of 23 readable, then 15 of the rest
    stats = run.channel_stats(held["train"])
    assert stats == run.channel_stats(streamed["train"], sample=100)      # sample >= the split: every image
    for augment in (True, False):
        x = run.Batcher(held["train"], *stats, augment=augment, seed=3)
        y = run.Batcher(streamed["train"], *stats, augment=augment, seed=3)
        x.epoch = y.epoch = 2
        for indices in ([0, 5, 9, 14], [3], list(range(15))):
            bx, by = x(indices), y(indices)
            assert torch.equal(bx["pixel_values"], by["pixel_values"]) and torch.equal(bx["labels"], by["labels"])
    decoded = list((tmp_path / "pixels").glob("*.decode.pt"))
    assert len(decoded) == 1
    calls = []
    original = image_data.decode_image
    image_data.decode_image = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        again = image_data.load_splits(_data_args(tmp_path, *flags, "--in_memory", "yes"))
    finally:
        image_data.decode_image = original
    assert not calls and torch.equal(again["train"].images, held["train"].images)


def test_channel_stats_are_exact_and_sampled_by_seed():
    images = torch.randint(0, 256, (40, 3, 5, 5), dtype=torch.uint8)
    mean, std = run.channel_stats(images)
    x = images.double().div(255).transpose(0, 1).flatten(1)
    assert mean == pytest.approx(x.mean(1).tolist(), abs=1e-15) and std == pytest.approx(x.std(1).tolist(), abs=1e-15)
    data = run.ImageSet.from_pixels(images, torch.zeros(40, dtype=torch.long), ["a"])
    chosen = torch.randperm(40, generator=torch.Generator().manual_seed(7))[:10].sort().values
    assert run.channel_stats(data, sample=10, seed=7) == run.channel_stats(images[chosen])
    assert run.channel_stats(data, sample=10, seed=8) != run.channel_stats(data, sample=10, seed=7)


def test_in_memory_auto_chooses_by_the_uint8_size(tmp_path, monkeypatch):
    assert image_data.uint8_bytes(50000, 32) == 50000 * 3 * 32 * 32
    monkeypatch.setattr(image_data, "available_ram", lambda: 64 << 30)
    assert image_data.choose_in_memory("auto", 50000, 32)                   # CIFAR-10: 147 MiB
    assert not image_data.choose_in_memory("auto", 1_281_167, 224)          # ImageNet-1k at 224: 180 GiB
    assert image_data.choose_in_memory("yes", 1_281_167, 224) and not image_data.choose_in_memory("no", 10, 8)
    monkeypatch.setattr(image_data, "available_ram", lambda: 400 << 20)     # a quarter of the RAM: 100 MiB
    assert not image_data.choose_in_memory("auto", 50000, 32)
    train = _noise_folder(tmp_path / "train", {"a": 5, "b": 5})
    assert image_data.load_splits(_data_args(tmp_path, "--train_dir", str(train)))["train"].in_memory
    monkeypatch.setattr(image_data, "IN_MEMORY_CAP_BYTES", 10 * 3 * 12 * 12 - 1)   # one byte short
    assert not image_data.load_splits(_data_args(tmp_path, "--train_dir", str(train)))["train"].in_memory


def test_parquet_folder_in_the_hub_layout(tmp_path):
    """A local folder laid out like a Hub dataset (data/<split>-*.parquet, images as encoded bytes) trains
    streaming, with its test split scored at the end; both paths read the same pixels."""
    import datasets
    from PIL import Image

    g = torch.Generator().manual_seed(1)
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["x", "y"])})
    for split, n in (("train", 12), ("test", 5)):
        images = [Image.fromarray(torch.randint(0, 256, (12, 12, 3), generator=g, dtype=torch.uint8).numpy())
                  for _ in range(n)]
        (tmp_path / "hub" / "data").mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_dict({"img": images, "label": [i % 2 for i in range(n)]}, features=features).to_parquet(
            str(tmp_path / "hub" / "data" / f"{split}-00000-of-00001.parquet"))
    flags = ["--dataset_name", str(tmp_path / "hub")]
    streamed = image_data.load_splits(_data_args(tmp_path, *flags, "--in_memory", "no"))
    held = image_data.load_splits(_data_args(tmp_path, *flags, "--in_memory", "yes"))
    assert streamed["train"].classes == ["x", "y"] and len(streamed["test"]) == 5
    for split in ("train", "validation", "test"):
        assert torch.equal(streamed[split].images, held[split].images)
    results = run.main(["--output_dir", str(tmp_path / "o"), "--image_cache_dir", str(tmp_path / "pixels"),
                        "--cache_dir", str(tmp_path / "datasets"), "--no_progress_bar", "--image_size", "12", *flags,
                        "--in_memory", "no", "--max_train_steps", "2", "--per_device_train_batch_size", "4",
                        "--dataloader_num_workers", "1", *TINY["mlp"], "--model_type", "mlp"])
    assert results["step"] == 2 and results["test_samples"] == 5 and results["validation_samples"] == 1


def test_exact_resume_in_the_streaming_path_with_workers(tmp_path, cache_dir):
    """Also: a run with a cold image cache (the check pass runs) trains like one reading the cache."""
    flags = ["--max_train_steps", "10", "--checkpointing_steps", "3", "--in_memory", "no", "--dataloader_num_workers",
             "1", *TINY["cnn"]]
    expected, results = _run_then_resume_from_step_6(tmp_path, str(tmp_path / "cold_cache"), cache_dir, flags)
    assert results == expected
    held = run.main(_args(tmp_path / "c", cache_dir, "--max_train_steps", "10", "--in_memory", "yes", *TINY["cnn"]))
    assert held == expected                          # the in-memory path trains on the same pixels


def test_a_bad_image_found_in_a_worker_is_one_line():
    def collate(_):
        raise image_data.BadImageError("some/file.jpg: cannot read this image (OSError: truncated)")

    loader = torch.utils.data.DataLoader(range(2), batch_size=1, num_workers=1, collate_fn=collate)
    with pytest.raises(common.UsageError) as caught:
        next(iter(loader))
    assert str(caught.value) == "some/file.jpg: cannot read this image (OSError: truncated)"


@pytest.mark.parametrize("argv, message", [
    (["--in_memory", "maybe"], "invalid choice: 'maybe'"),
    (["--preprocessing_num_workers", "-1"], "--preprocessing_num_workers must be >= 0, got -1"),
    (["--channel_stats_samples", "-5"], "--channel_stats_samples must be >= 0, got -5"),
    (["--dataloader_num_workers", "-1"], "--dataloader_num_workers must be >= 0, got -1"),
])
def test_bad_data_flags_are_one_line(argv, message, tmp_path, capsys, cache_dir):
    assert message in _fails(capsys, _args(tmp_path / "o", cache_dir, "--max_train_steps", "1", *argv))


def _train_records(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "train_accuracy" in r and not r.get("final")]


def test_train_accuracy_counts_each_epochs_batches_as_trained(tmp_path, cache_dir):
    """With a learning rate too small to move a float32 weight, every epoch's training accuracy equals a recount of
    the saved model on the training split (a bias-free, BatchNorm-free MLP predicts the same in train and eval mode)."""
    out = tmp_path / "o"
    results = run.main(_args(out, cache_dir, "--model_type", "mlp", "--depth", "2", "--width", "16", "--no-batch_norm",
                             "--no_augmentation", "--learning_rate", "1e-30", "--num_train_epochs", "2"))
    model = plain_models.load_plain(out).eval()
    args = run.parse_args(["--max_train_samples", "64", "--max_eval_samples", "40", "--image_cache_dir", cache_dir,
                           "--no_progress_bar"])
    train = run.load_splits(args)["train"]
    mean = torch.tensor(model.config.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(model.config.image_std).view(1, 3, 1, 1)
    with torch.no_grad():
        hits = int((model((train.images.float() / 255 - mean) / std).argmax(-1) == train.labels).sum())
    records = _train_records(out)
    assert [r["epoch"] for r in records] == [1, 2] and len(train) == 64
    assert all(r["train_accuracy"] == pytest.approx(hits / 64, abs=1e-12) for r in records)
    assert results["train_accuracy"] == records[-1]["train_accuracy"] and results["fit_epoch"] is None


def test_stop_at_train_accuracy_ends_at_the_first_fit_epoch(tmp_path, cache_dir, capsys):
    out = tmp_path / "o"
    results = run.main(_args(out, cache_dir, "--model_type", "mlp", "--depth", "2", "--width", "64", "--no_augmentation",
                             "--num_train_epochs", "300", "--learning_rate", "0.1", "--stop_at_train_accuracy", "0.95"))
    records = _train_records(out)
    assert 1 < results["epochs"] < 300 and results["fit_epoch"] == results["epochs"] == records[-1]["epoch"]
    assert records[-1]["train_accuracy"] >= 0.95 > max(r["train_accuracy"] for r in records[:-1])
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if "validation_accuracy" in r and not r.get("final")]
    assert evals[-1]["step"] == results["step"]        # the fit epoch is evaluated, and that is the final number
    assert "(0, 1]" in _fails(capsys, _args(tmp_path / "o2", cache_dir, "--stop_at_train_accuracy", "1.5"))
