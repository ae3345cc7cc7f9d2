"""The vision example's GPU path, checked on CPU: the CIFAR ResNet trains and reloads through the Auto class,
channels_last and bf16 change no result beyond rounding, --torch_compile really compiles, the training loop reads
nothing back from the device between logging steps, the non-finite guard still stops the run, and each new flag's bad
value is one line."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run = _load("vision_run_speed", ROOT / "examples" / "vision" / "run.py")
common = sys.modules["common"]
TINY_RESNET = ["--model_type", "cifar_resnet", "--config_overrides", "hidden_sizes=[8,16],depths=[1,1]"]


def _fresh_state() -> None:
    """Each run builds its own Accelerator (mixed precision differs between runs)."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    _fresh_state()
    yield
    _fresh_state()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("image_cache"))


def _args(out: Path, cache: str, *extra: str) -> list[str]:
    return ["--output_dir", str(out), "--image_cache_dir", cache, "--no_progress_bar", "--max_train_samples", "64",
            "--max_eval_samples", "32", "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "32",
            "--num_threads", "1", *TINY_RESNET, *extra]


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_cifar_resnet_trains_saves_and_reloads_through_the_auto_class(tmp_path, cache_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForImageClassification

    out = tmp_path / "run"
    results = run.main(_args(out, cache_dir, "--max_train_steps", "2", "--logging_steps", "1"))
    assert results["step"] == 2 and results["validation_samples"] == 32
    model = AutoModelForImageClassification.from_pretrained(out)
    assert type(model).__name__ == "CifarResNetForImageClassification" and model.config.emergence_init["applied"]
    saved = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


def test_the_cifar_resnet_defaults_to_sgd_like_the_other_convnets(tmp_path):
    args = run.parse_args(["--model_type", "cifar_resnet", "--output_dir", str(tmp_path)])
    assert (args.optimizer, args.learning_rate, args.weight_decay) == ("sgd", 0.05, 5e-4)


def test_gpu_recipe_flags_reach_the_optimizer_and_the_loss(tmp_path, cache_dir):
    args = run.parse_args(TINY_RESNET + ["--nesterov", "--output_dir", str(tmp_path)])
    model = torch.nn.Linear(3, 2)
    optimizer = common.make_optimizer(model, args)
    assert optimizer.defaults["nesterov"] is True and optimizer.defaults["fused"] is True
    flags = ("--max_train_steps", "1", "--logging_steps", "1", "--seed", "3", "--no_augmentation")
    run.main(_args(tmp_path / "plain", cache_dir, *flags))
    _fresh_state()
    run.main(_args(tmp_path / "smooth", cache_dir, *flags, "--label_smoothing", "0.5"))
    # same weights and batch at step 1: only the loss differs, by eps * (mean over classes of -log p - CE)
    assert _losses(tmp_path / "smooth")[0] != pytest.approx(_losses(tmp_path / "plain")[0], rel=1e-6)


def test_channels_last_gives_the_losses_of_contiguous_memory(tmp_path, cache_dir):
    flags = ("--max_train_steps", "4", "--logging_steps", "1", "--seed", "3")
    contiguous = run.main(_args(tmp_path / "nchw", cache_dir, *flags, "--channels_last", "no"))
    nhwc = run.main(_args(tmp_path / "nhwc", cache_dir, *flags, "--channels_last", "yes"))
    assert _losses(tmp_path / "nhwc") == pytest.approx(_losses(tmp_path / "nchw"), rel=1e-4)
    assert nhwc["validation_loss"] == pytest.approx(contiguous["validation_loss"], rel=1e-4)
    assert len(_losses(tmp_path / "nchw")) == 4


def test_channels_last_auto_is_on_for_convnets_on_a_gpu_only():
    args = run.parse_args(TINY_RESNET + ["--output_dir", "/tmp/unused"])
    assert run.resolve_channels_last(args, torch.device("cuda")) is True
    assert run.resolve_channels_last(args, torch.device("cpu")) is False
    mlp = run.parse_args(["--model_type", "mlp", "--output_dir", "/tmp/unused"])
    assert run.resolve_channels_last(mlp, torch.device("cuda")) is False


def test_bf16_autocast_trains_close_to_fp32(tmp_path, cache_dir):
    flags = ("--max_train_steps", "3", "--logging_steps", "1", "--seed", "5")
    run.main(_args(tmp_path / "fp32", cache_dir, *flags, "--mixed_precision", "no"))
    _fresh_state()
    run.main(_args(tmp_path / "bf16", cache_dir, *flags, "--mixed_precision", "bf16"))
    fp32, bf16 = _losses(tmp_path / "fp32"), _losses(tmp_path / "bf16")
    assert bf16 != fp32                                    # autocast really ran in bf16 ...
    assert bf16 == pytest.approx(fp32, rel=0.02)           # ... and bf16's 8-bit mantissa moves the loss by < 2%


def test_torch_compile_compiles_the_forward_and_keeps_the_losses(tmp_path, cache_dir):
    """Needs a C++ compiler for inductor's CPU kernels (gcc here); a box without one fails here, naming it."""
    from torch._dynamo.utils import counters

    flags = ("--max_train_steps", "2", "--logging_steps", "1", "--seed", "7", "--no_augmentation")
    plain = run.main(_args(tmp_path / "eager", cache_dir, *flags))
    counters.clear()
    compiled = run.main(_args(tmp_path / "compiled", cache_dir, *flags, "--torch_compile"))
    assert counters["frames"]["ok"] >= 1 and counters["stats"]["unique_graphs"] >= 1, dict(counters["frames"])
    assert _losses(tmp_path / "compiled") == pytest.approx(_losses(tmp_path / "eager"), rel=1e-4)
    assert compiled["validation_accuracy"] == plain["validation_accuracy"]
    from safetensors.torch import load_file

    assert not any(k.startswith("_orig_mod") for k in load_file(str(tmp_path / "compiled" / "model.safetensors")))


def test_the_training_loop_reads_nothing_from_the_device_between_logging_steps(tmp_path, cache_dir, monkeypatch):
    """Every host read of a tensor (item, tolist, float, int, bool) is counted: a run of 8 steps makes exactly as many
    as a run of 4 with the same logging and evaluation points, so a step makes none."""
    reads = {"n": 0}
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, **k):
            reads["n"] += 1
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    per_run = []
    for steps in (4, 8):
        reads["n"] = 0
        run.main(_args(tmp_path / f"s{steps}", cache_dir, "--max_train_steps", str(steps), "--logging_steps", "100",
                       "--init", "kaiming", "--max_train_samples", "256", "--no_augmentation"))
        per_run.append(reads["n"])
    assert per_run[0] == per_run[1], per_run


def test_device_checks_skip_a_non_finite_step_and_raise_when_read(tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    args = run.parse_args(TINY_RESNET + ["--output_dir", str(tmp_path)])
    optimizer = accelerator.prepare(common.make_optimizer(model, args))
    checks, state = common.DeviceChecks(), common.TrainState(completed_steps=4, epoch=1)
    checkpoints = common.Checkpoints(accelerator, tmp_path)
    assert common.DeviceChecks.supported(optimizer)      # fused SGD: found_inf support
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    checks.note(optimizer, torch.tensor(float("nan")), 5, 1)
    optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))      # skipped on the device
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    checks.note(optimizer, torch.tensor(2.0), 6, 1)
    optimizer.step()
    assert not torch.equal(model.weight, before[0])                               # finite steps go on
    state.completed_steps = 6
    with pytest.raises(common.NonFiniteLoss) as info:
        checks.check(state, checkpoints)
    message = str(info.value)
    assert message.startswith("the loss/gradient became nan at step 5 (epoch 1); that step was skipped and the run stopped "
                              "at step 6") and "none written yet" in message and "\n" not in message
    fine = common.DeviceChecks()
    fine.note(optimizer, torch.tensor(1.0), 1, 0)
    fine.check(state, checkpoints)                                                # nothing to report


def test_a_diverging_run_stops_with_exit_code_3_and_writes_no_checkpoint_after_it(tmp_path, cache_dir, capsys):
    out = tmp_path / "diverge"
    code = common.run_cli(run.main, _args(out, cache_dir, "--max_train_steps", "6", "--logging_steps", "3",
                                          "--learning_rate", "1e30", "--max_grad_norm", "0", "--checkpointing_steps", "1"))
    err = capsys.readouterr().err
    assert code == 3 and "the loss/gradient became" in err and "that step was skipped" in err
    step = int(err.split(" at step ")[1].split(" ")[0])
    written = sorted(int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*"))
    assert all(s < step for s in written)


@pytest.mark.parametrize("flags, message", [
    (["--mixed_precision", "fp16"], "argument --mixed_precision: invalid choice: 'fp16' (choose from 'no', 'bf16')"),
    (["--channels_last", "maybe"], "argument --channels_last: invalid choice: 'maybe' (choose from 'auto', 'yes', 'no')"),
    (["--torch_compile=yes"], "argument --torch_compile: ignored explicit argument 'yes'"),
    (["--nesterov", "--optimizer", "adamw"], "--nesterov needs --optimizer sgd with --momentum > 0, got --optimizer adamw"),
    (["--label_smoothing", "1.5"], "--label_smoothing must be in [0, 1), got 1.5"),
    (["--model_type", "vit", "--channels_last", "yes"],
     "--channels_last yes applies to the ConvNets (cnn, resnet, cifar_resnet, convnext), not vit"),
])
def test_a_bad_value_of_each_new_flag_is_one_line(flags, message, tmp_path):
    with pytest.raises(common.UsageError) as info:
        run.parse_args([*flags, "--output_dir", str(tmp_path)])
    text = str(info.value).replace("'", "")          # whether argparse quotes the choices depends on the Python version
    assert text.startswith(message.replace("'", "")) and "\n" not in text
