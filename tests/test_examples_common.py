"""examples/common.py: the machinery both example scripts share (data order, init switch, optimiser groups,
checkpoints, metrics log, divergence guard, CLI error handling), tested directly on small inputs."""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import common  # noqa: E402
from common import Checkpoints, EpochBatchSampler, MetricsLog, TrainState, UsageError  # noqa: E402

from hf_emergence import EmergenceInit  # noqa: E402
from hf_emergence.hub import HubError  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    p = common.ArgumentParser(prog="run.py")
    common.add_model_args(p, ["marian", "bart"], "marian")
    common.add_init_args(p)
    common.add_training_args(p, batch_size=8, learning_rate=1e-3, epochs=2, weight_decay=0.01, warmup=3, scheduler="linear")
    common.add_run_args(p, default_output_dir="out")
    return p


def _args(*argv: str) -> argparse.Namespace:
    return _parser().parse_args(list(argv))


@pytest.fixture
def accelerator(tmp_path):
    acc = Accelerator(cpu=True, project_dir=str(tmp_path))
    yield acc
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


class _Mlp(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                         nn.Linear(8, 3), nn.LayerNorm(3))


# -------------------------------------------------------------------------------------------- run_cli
def test_run_cli_maps_errors_to_one_line_and_exit_codes(capsys):
    def fails_with(err):
        def main(argv):
            assert argv == ["--x"]
            raise err
        return main

    cases = [(UsageError("bad.txt:3: expected a pair"), 2), (common.NonFiniteLoss("nan at step 4"), 3),
             (HubError("no token"), 4)]
    for err, code in cases:
        assert common.run_cli(fails_with(err), ["--x"]) == code
        captured = capsys.readouterr()
        assert captured.err == f"error: {err}\n" and captured.out == ""
    seen = []
    assert common.run_cli(seen.append, ["--ok"]) == 0 and seen == [["--ok"]]
    with pytest.raises(KeyError):                   # a bug is not user input: it keeps its traceback
        common.run_cli(fails_with(KeyError("x")), ["--x"])


def test_run_cli_prints_an_error_that_several_workers_raise_once(monkeypatch, tmp_path, capsys):
    """Workers of one launch (LOCAL_WORLD_SIZE > 1, one parent): the same line once, a different line always."""
    def fails_with(err):
        def main(argv):
            raise err
        return main

    monkeypatch.setattr(common.tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    for _ in range(2):                                              # rank 0, then rank 1: the same argument error
        assert common.run_cli(fails_with(UsageError("--logging_steps must be >= 1, got 0")), []) == 2
    assert common.run_cli(fails_with(UsageError("rank 1: data/train_1.txt:3: expected a pair")), []) == 2
    assert common.run_cli(fails_with(common.NonFiniteLoss("nan at step 4")), []) == 3
    assert common.run_cli(fails_with(common.NonFiniteLoss("nan at step 4")), []) == 3
    assert capsys.readouterr().err.splitlines() == ["error: --logging_steps must be >= 1, got 0",
                                                    "error: rank 1: data/train_1.txt:3: expected a pair",
                                                    "error: nan at step 4"]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")                     # one process: every error is printed
    for _ in range(2):
        assert common.run_cli(fails_with(UsageError("--logging_steps must be >= 1, got 0")), []) == 2
    assert capsys.readouterr().err.splitlines() == ["error: --logging_steps must be >= 1, got 0"] * 2


def test_claims_of_earlier_launches_are_swept(monkeypatch, tmp_path):
    """A claim older than CLAIM_TTL_S is removed by the next claim; a recent one (a launch still running) is kept."""
    monkeypatch.setattr(common.tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    folder = tmp_path / "hf_emergence_errors"
    folder.mkdir()
    old, recent = folder / "old", folder / "recent"
    old.touch()
    recent.touch()
    stale = time.time() - common.CLAIM_TTL_S - 60
    os.utime(old, (stale, stale))
    assert common._first_to_claim("error: x") and not common._first_to_claim("error: x")
    assert not old.exists()
    assert recent.exists() and len(list(folder.iterdir())) == 2     # "recent" and the claim just made


# ----------------------------------------------------------------------------------------- arguments
def test_steps_or_epoch():
    assert common.steps_or_epoch("epoch") == "epoch" and common.steps_or_epoch("25") == 25
    for bad in ("0", "-3", "1.5", "every"):
        with pytest.raises(argparse.ArgumentTypeError, match=repr(bad)):
            common.steps_or_epoch(bad)


def test_check_common_args_fills_eval_batch_and_rejects_bad_values():
    args = _args("--per_device_train_batch_size", "6")
    common.check_common_args(args)
    assert args.per_device_eval_batch_size == 12
    args = _args("--per_device_eval_batch_size", "5")
    common.check_common_args(args)
    assert args.per_device_eval_batch_size == 5
    for argv, message in [(["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be >= 1, got 0"),
                          (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be >= 1, got 0"),
                          (["--learning_rate", "nan"], "--learning_rate must be a positive number, got nan"),
                          (["--learning_rate=-1e-3"], "--learning_rate must be a positive number"),
                          (["--max_train_steps", "0"], "--max_train_steps must be >= 1, got 0"),
                          (["--push_to_hub"], "--push_to_hub needs --hub_model_id"),
                          (["--per_device_eval_batch_size", "0"], "--per_device_eval_batch_size must be >= 1, got 0"),
                          (["--logging_steps", "0"], "--logging_steps must be >= 1, got 0"),
                          (["--num_warmup_steps", "-5"], "--num_warmup_steps must be >= 0, got -5"),
                          (["--num_train_epochs", "-1"], "--num_train_epochs must be a positive number, got -1.0"),
                          (["--weight_decay", "inf"], "--weight_decay must be a finite number >= 0, got inf"),
                          (["--momentum", "1"], "--momentum must be in [0, 1), got 1.0"),
                          (["--max_grad_norm=-1"], "--max_grad_norm must be >= 0 (0 disables clipping), got -1.0"),
                          (["--checkpoints_total_limit", "0"], "--checkpoints_total_limit must be >= 1, got 0"),
                          (["--seed", "-1"], "--seed must be in [0, 2**32), got -1"),
                          (["--output_dir", __file__], f"--output_dir {__file__} is a file, not a folder"),
                          (["--alpha", "0"], "alpha=0.0 is invalid"),
                          (["--exclude", "("], "not a valid regular expression"),
                          (["--unscaled", "["], "unscaled pattern '[' is not a valid regular expression")]:
        with pytest.raises(UsageError) as info:
            common.check_common_args(_args(*argv))
        assert message in str(info.value) and "\n" not in str(info.value)


# ------------------------------------------------------------------------------------ config overrides
def test_parse_config_overrides_types():
    parsed = common.parse_config_overrides(
        ' d_model = 512,dropout=0.25,lr=1e-4,n=-3,hidden_sizes=[32, 64],flag=true,other=False,none=null,'
        'act=gelu,nested={"a": [1, 2], "b": 2},name="x y"')
    assert parsed == {"d_model": 512, "dropout": 0.25, "lr": 1e-4, "n": -3, "hidden_sizes": [32, 64], "flag": True,
                      "other": False, "none": None, "act": "gelu", "nested": {"a": [1, 2], "b": 2}, "name": "x y"}
    assert type(parsed["d_model"]) is int and type(parsed["dropout"]) is float and type(parsed["flag"]) is bool
    assert common.parse_config_overrides("") == {} and common.parse_config_overrides(None) == {}
    assert common.parse_config_overrides("a=[1,[2,3]],b=2") == {"a": [1, [2, 3]], "b": 2}
    assert common.parse_config_overrides('name="x,y",b=2') == {"name": "x,y", "b": 2}     # quoted commas stay
    assert common.parse_config_overrides(r'name="a\",b",c=[1]') == {"name": 'a",b', "c": [1]}
    for bad, message in [("d_model", "'d_model' is not key=value"), ("a=1,,b=2", "'' is not key=value"),
                         ("=3", "has no key"), ("a=[1,2", "'a=\\[1,2' has an unclosed bracket"),
                         ('n="x,y', "unclosed quote"), ("a=1],b=2", "'a=1\\]' closes a bracket that was never opened")]:
        with pytest.raises(UsageError, match=message):
            common.parse_config_overrides(bad)


def test_apply_config_overrides_sets_typed_values_and_rejects_unknown_keys():
    from transformers import MarianConfig, ResNetConfig

    config = MarianConfig(d_model=32, encoder_layers=2, decoder_layers=2)
    same = common.apply_config_overrides(config, "d_model=16,dropout=0.25,scale_embedding=false,activation_function=relu")
    assert same is config
    assert (config.d_model, config.dropout, config.scale_embedding, config.activation_function) == (16, 0.25, False, "relu")
    assert common.apply_config_overrides(config, None) is config and config.d_model == 16
    resnet = common.apply_config_overrides(ResNetConfig(), "hidden_sizes=[32,64],depths=[1,1]")
    assert resnet.hidden_sizes == [32, 64] and resnet.depths == [1, 1]
    with pytest.raises(UsageError) as info:
        common.apply_config_overrides(config, "d_model=8,no_such_key=3")
    assert str(info.value) == "--config_overrides: the marian config has no key 'no_such_key'"
    with pytest.raises(UsageError, match="no key 'to_dict'"):             # a method is not a setting
        common.apply_config_overrides(config, "to_dict=1")
    assert callable(config.to_dict)


# ------------------------------------------------------------------------------------------------ init
def test_emergence_settings_for_each_init_choice():
    default = common.emergence_settings(_args())
    assert default == EmergenceInit()                                   # --init emergence with library defaults
    tuned = common.emergence_settings(_args("--alpha", "1.3", "--base_init", "kaiming_normal", "--pivot", "1",
                                            "--exclude", "lm_head", "--attention", "all"))
    assert (tuned.alpha, tuned.base_init, tuned.pivot, tuned.exclude, tuned.attention) == \
        (1.3, "kaiming_normal", 1, ["lm_head"], "all")
    assert common.emergence_settings(_args("--init", "default", "--alpha", "1.3")) is None

    xavier = common.emergence_settings(_args("--init", "xavier", "--alpha", "1.3", "--pivot", "1"))
    assert (xavier.alpha, xavier.base_init, xavier.pivot) == (1.0, "xavier_uniform", 1)   # same tensors, no scaling
    assert common.emergence_settings(_args("--init", "xavier", "--base_init", "xavier_normal")).base_init == "xavier_normal"
    kaiming = common.emergence_settings(_args("--init", "kaiming"))
    assert (kaiming.alpha, kaiming.base_init) == (1.0, "kaiming_normal")
    assert common.emergence_settings(_args("--init", "kaiming", "--base_init", "kaiming_uniform")).base_init == "kaiming_uniform"

    for init, base in [("xavier", "kaiming_normal"), ("kaiming", "xavier_uniform"), ("xavier", "auto"), ("kaiming", "keep")]:
        with pytest.raises(UsageError, match=f"--init {init} conflicts with --base_init {base}"):
            common.emergence_settings(_args("--init", init, "--base_init", base))
    for bad in ("-1", "nan", "inf"):
        with pytest.raises(UsageError, match="expected a finite number > 0"):
            common.emergence_settings(_args("--alpha", bad))


def test_lr_plan_uses_the_flags_whatever_init_is():
    model = _Mlp()
    assert common.lr_plan(_args("--alpha", "1.5"), model) is None
    plan = common.lr_plan(_args("--init", "kaiming", "--alpha", "1.5", "--base_init", "kaiming_uniform",
                                "--per_layer_lr_from_plan"), model)
    assert plan.settings["alpha"] == 1.5 and getattr(model, "emergence_plan", None) is None   # planned, never applied
    assert sorted(round(f, 6) for f in plan.factors().values()) == sorted(round(1.5 ** k, 6) for k in (-2, -1, 1, 2))
    with pytest.raises(UsageError, match="--per_layer_lr_from_plan: alpha=nan is invalid"):
        common.lr_plan(_args("--init", "default", "--alpha", "nan", "--per_layer_lr_from_plan"), model)


# ---------------------------------------------------------------------------------------- optimisation
@pytest.mark.parametrize("optimizer, power", [("adamw", 1), ("sgd", 2)])
def test_make_optimizer_groups(optimizer, power):
    model = _Mlp()
    model[2].bias.requires_grad_(False)
    args = _args("--optimizer", optimizer, "--learning_rate", "0.01", "--weight_decay", "0.05", "--momentum", "0.8",
                 "--adam_beta2", "0.98")
    plan = EmergenceInit(alpha=1.5).plan(model)
    factors = plan.factors()
    assert {round(f, 6) for f in factors.values()} == {round(1.5 ** k, 6) for k in (-2, -1, 1, 2)}
    opt = common.make_optimizer(model, args, plan)
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(group_of) == sum(len(g["params"]) for g in opt.param_groups) == len(trainable) == 9
    for name, p in trainable.items():
        g = group_of[id(p)]
        assert g["lr"] == pytest.approx(0.01 * factors.get(name, 1.0) ** -power, rel=1e-12), name
        assert g["weight_decay"] == (0.05 if p.ndim >= 2 else 0.0), name
    if optimizer == "sgd":
        assert isinstance(opt, torch.optim.SGD) and all(g["momentum"] == 0.8 for g in opt.param_groups)
    else:
        assert isinstance(opt, torch.optim.AdamW) and all(g["betas"] == (0.9, 0.98) for g in opt.param_groups)
    plain = common.make_optimizer(model, args)
    assert {g["lr"] for g in plain.param_groups} == {0.01} and len(plain.param_groups) == 2


class _ScaleInvariantMlp(nn.Sequential):
    """Every planned Linear is followed by BatchNorm (eps ~ 0), so the loss does not change when its weight is scaled."""
    def __init__(self):
        super().__init__(*[m for i, o in [(6, 8), (8, 8), (8, 8), (8, 3)]
                           for m in (nn.Linear(i, o, bias=False), nn.BatchNorm1d(o, eps=1e-30), nn.ReLU())][:-1])


def _scaled(model: nn.Module, factors: dict[str, float]) -> nn.Module:
    """A copy of ``model`` with each planned weight multiplied by its factor: the emergence init on top of ``model``."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in out.named_parameters():
            p.mul_(factors.get(name, 1.0))
    return out


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 6) -> None:
    for group in opt.param_groups:
        if "eps" in group:       # Adam's eps is the one term that sees the gradient's scale (c * eps / sqrt(v)): ~0
            group["eps"] = 1e-16
    data = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(16, 6, generator=data, dtype=torch.float64), torch.randint(0, 3, (16,), generator=data)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_per_layer_lr_and_weight_decay_follow_the_emergence_trajectory(optimizer):
    """The control's claim, checked: on a scale-invariant net, the base init under the plan's per-layer lr and
    weight decay stays exactly 1/c times the emergence init's weights under the plain optimizer; with the plan's
    lr alone, weight decay makes the two trajectories part."""
    torch.manual_seed(0)
    base = _ScaleInvariantMlp().double()
    plan = EmergenceInit(alpha=1.5, base_init="keep").plan(base)
    factors = plan.factors()
    assert len(factors) == 4 and {round(f, 6) for f in factors.values()} == {round(1.5 ** k, 6) for k in (-2, -1, 1, 2)}
    emergence = _scaled(base, factors)
    flags = ["--optimizer", optimizer, "--learning_rate", "0.05", "--weight_decay", "0.1", "--momentum", "0.9"]
    _train(emergence, common.make_optimizer(emergence, _args(*flags)))
    for decay_follows in (True, False):
        control = copy.deepcopy(base)
        args = _args(*flags, "--per_layer_lr_from_plan", *(["--per_layer_weight_decay_from_plan"] * decay_follows))
        _train(control, common.make_optimizer(control, args, plan))
        got = dict(control.named_parameters())
        same = [torch.allclose(got[n] * factors.get(n, 1.0), p, rtol=1e-9, atol=0) for n, p in emergence.named_parameters()]
        assert all(same) if decay_follows else not all(same), (optimizer, decay_follows, same)
    with pytest.raises(UsageError, match="^--per_layer_weight_decay_from_plan needs --per_layer_lr_from_plan$"):
        common.check_common_args(_args("--per_layer_weight_decay_from_plan"))


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_with_the_head_unscaled_the_control_follows_emergence_on_a_net_with_a_plain_head(optimizer):
    """A classifier that no norm follows is the one layer a per-layer learning rate cannot stand in for: with it in
    the plan the two trajectories part; held at factor 1 (``unscaled``) it trains at the base rate in both, and the
    control follows the emergence init exactly again, while the other layers keep their exponents."""
    torch.manual_seed(0)
    base = nn.Sequential(*_ScaleInvariantMlp(), nn.ReLU(), nn.Linear(3, 3, bias=False)).double()
    flags = ["--optimizer", optimizer, "--learning_rate", "0.05", "--weight_decay", "0.1", "--momentum", "0.9"]
    control_flags = [*flags, "--per_layer_lr_from_plan", "--per_layer_weight_decay_from_plan"]
    for held in ([], [r"^12\."]):
        plan = EmergenceInit(alpha=1.5, base_init="keep", unscaled=held).plan(base)
        factors = plan.factors()
        assert [round(math.log(f, 1.5)) for f in factors.values()] == ([-2, -1, 0, 1, 2] if not held else [-2, -1, 0, 1, 0])
        emergence = _scaled(base, factors)
        _train(emergence, common.make_optimizer(emergence, _args(*flags)))
        control = copy.deepcopy(base)
        _train(control, common.make_optimizer(control, _args(*control_flags), plan))
        got = dict(control.named_parameters())
        same = [torch.allclose(got[n] * factors.get(n, 1.0), p, rtol=1e-9, atol=0) for n, p in emergence.named_parameters()]
        assert all(same) if held else not all(same), (optimizer, held, same)


def test_make_scheduler_counts_steps_of_every_process():
    def lrs(num_processes):
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = common.make_scheduler(opt, _args("--lr_scheduler_type", "linear", "--num_warmup_steps", "2"), 5, num_processes)
        out = []
        for _ in range(5 * num_processes):         # a prepared scheduler steps once per process per optimizer step
            opt.step()
            sched.step()
            out.append(sched.get_last_lr()[0])
        return out[num_processes - 1::num_processes]
    one, two = lrs(1), lrs(2)
    assert one == pytest.approx(two) and one[1] == pytest.approx(1.0) and one[-1] == 0.0


def test_training_length():
    def length(batches, *argv):
        return common.training_length(_args(*argv), batches)

    assert length(13, "--num_train_epochs", "3") == (39, 3)
    assert length(13, "--num_train_epochs", "0.5") == (7, 1)
    assert length(13, "--num_train_epochs", "3", "--max_train_steps", "30") == (30, 3)
    assert length(13, "--max_train_steps", "26") == (26, 2)
    assert length(13, "--num_train_epochs", "2", "--gradient_accumulation_steps", "4") == (8, 2)   # 4 steps/epoch
    assert length(13, "--max_train_steps", "9", "--gradient_accumulation_steps", "4") == (9, 3)
    assert length(0, "--num_train_epochs", "1") == (1, 1)


def test_is_due():
    state = TrainState(completed_steps=20)
    assert not common.is_due(None, state, epoch_end=False) and not common.is_due(None, state, epoch_end=True)
    assert common.is_due("epoch", state, epoch_end=True) and not common.is_due("epoch", state, epoch_end=False)
    assert common.is_due(10, state, epoch_end=False) and common.is_due(20, state, epoch_end=False)
    assert not common.is_due(10, state, epoch_end=True)      # done right after the step, not again at the epoch end
    assert not common.is_due(15, state, epoch_end=False) and not common.is_due(30, state, epoch_end=False)


# ------------------------------------------------------------------------------------------ data order
def _check_epoch(batches, n, batch_size, drop_last=False):
    flat = [i for b in batches for i in b]
    assert len(flat) == len(set(flat))                                        # no index twice
    if drop_last:
        assert all(len(b) == batch_size for b in batches) and len(flat) == n - n % batch_size
    else:
        assert sorted(flat) == list(range(n))                                 # every index exactly once
        assert sorted(len(b) for b in batches)[1:] == [batch_size] * (len(batches) - 1)


@pytest.mark.parametrize("grouped", [False, True])
def test_epoch_batch_sampler_order_depends_only_on_seed_and_epoch(grouped):
    n, bs = 203, 8
    lengths = [(i * 37) % 61 + 1 for i in range(n)] if grouped else None

    def batches(seed, epoch, **kw):
        s = EpochBatchSampler(n, bs, seed, lengths=lengths, window=3, **kw)
        s.use_epoch(epoch)
        out = list(s)
        assert len(out) == len(s)
        return out

    a = batches(1, 0)
    assert a == batches(1, 0) and len(a) == math.ceil(n / bs)
    assert a != batches(1, 1) and a != batches(2, 0)
    for epoch in range(3):
        _check_epoch(batches(1, epoch), n, bs)
        _check_epoch(batches(1, epoch, drop_last=True), n, bs, drop_last=True)
    assert len(EpochBatchSampler(n, bs, 1, drop_last=True)) == n // bs == len(batches(1, 0, drop_last=True))
    s = EpochBatchSampler(n, bs, 1, lengths=lengths)
    assert list(s) == list(s)                                                 # iterating does not advance the epoch
    assert not hasattr(s, "set_epoch")                                        # accelerate's own counter can't reorder it


def test_epoch_batch_sampler_without_shuffle_is_sequential():
    s = EpochBatchSampler(10, 4, seed=3, shuffle=False)
    s.use_epoch(5)
    assert list(s) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    with pytest.raises(UsageError, match="the dataset is empty"):
        EpochBatchSampler(0, 4, seed=3)


def test_length_grouping_reduces_padding():
    gen = torch.Generator().manual_seed(0)
    n, bs = 1000, 16
    lengths = torch.randint(1, 120, (n,), generator=gen).tolist()

    def padding(sampler):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in sampler)

    random_order = padding(EpochBatchSampler(n, bs, seed=0))
    grouped = padding(EpochBatchSampler(n, bs, seed=0, lengths=lengths))
    assert grouped < 0.25 * random_order
    # grouping is local: with a window of one batch there is nothing to group, and the padding is the random order's
    assert padding(EpochBatchSampler(n, bs, seed=0, lengths=lengths, window=1)) > 0.75 * random_order
    s = EpochBatchSampler(n, bs, seed=0, lengths=lengths)
    first = list(s)
    s.use_epoch(1)
    assert [sorted(b) for b in first] != [sorted(b) for b in s]              # fresh batches each epoch


def test_sampler_through_a_prepared_dataloader_and_skipping(accelerator):
    n, bs = 37, 5
    sampler = EpochBatchSampler(n, bs, seed=4, lengths=[i % 7 for i in range(n)], window=2)
    dl = accelerator.prepare(DataLoader(list(range(n)), batch_sampler=sampler))

    def seen(loader):
        return [b.tolist() for b in loader]

    sampler.use_epoch(2)
    expected = list(sampler)
    assert seen(dl) == expected and seen(dl) == expected          # the loader's own epoch counter changes nothing
    assert seen(accelerator.skip_first_batches(dl, 3)) == expected[3:]   # how a resumed run continues mid-epoch
    sampler.use_epoch(3)
    assert seen(dl) == list(sampler) != expected


# ------------------------------------------------------------------------------------------ checkpoints
def _prepared(accelerator):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return accelerator.prepare(model, opt)


def test_checkpoint_save_and_load_round_trip(accelerator, tmp_path):
    model, opt = _prepared(accelerator)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    ckpts = Checkpoints(accelerator, tmp_path, total_limit=2)
    state = TrainState(completed_steps=12, epoch=1, batches_in_epoch=5, samples_seen=96, best_metric=0.5,
                       last_eval={"validation_bleu": 1.5})
    path = ckpts.save(state)
    assert path == tmp_path / "checkpoints" / "step_00000012" and ckpts.latest() == path
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000012"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_00000012"]
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    opt.step()
    loaded = ckpts.load(path)
    assert loaded == state
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(opt.state[p]["momentum_buffer"], m) for p, m in zip(model.parameters(), momentum))


def test_checkpoints_prune_to_the_newest_and_ignore_unfinished_ones(accelerator, tmp_path):
    _prepared(accelerator)
    ckpts = Checkpoints(accelerator, tmp_path, total_limit=2)
    root = tmp_path / "checkpoints"
    assert ckpts.latest() is None and ckpts.resolve("latest") is None and ckpts.resolve(None) is None
    # a save killed before its rename: a newer step_N.tmp folder, even one holding a train_state.json
    stale = root / "step_00000500.tmp"
    stale.mkdir(parents=True)
    (stale / "train_state.json").write_text(json.dumps({"completed_steps": 500}))
    assert ckpts.latest() is None and ckpts.resolve("latest") is None
    for step in (9, 10, 100):                                  # names sort numerically (zero-padded)
        ckpts.save(TrainState(completed_steps=step))
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000010", "step_00000100"]
    assert ckpts.latest() == root / "step_00000100" == ckpts.resolve("latest")
    assert ckpts.load(ckpts.latest()).completed_steps == 100

    one = Checkpoints(accelerator, tmp_path / "one", total_limit=0)   # 0 still keeps the newest
    for step in (1, 2):
        one.save(TrainState(completed_steps=step))
    assert sorted(p.name for p in (tmp_path / "one" / "checkpoints").iterdir()) == ["latest", "step_00000002"]

    # a pointer to a folder without train_state.json (deleted by hand, half copied) is not a checkpoint
    (root / "latest").write_text("step_00000999")
    assert ckpts.latest() is None


def test_resolve_explicit_checkpoint(accelerator, tmp_path):
    _prepared(accelerator)
    ckpts = Checkpoints(accelerator, tmp_path / "run")
    path = Checkpoints(accelerator, tmp_path / "other").save(TrainState(completed_steps=3))
    assert ckpts.resolve(str(path)) == path
    empty = tmp_path / "empty"
    empty.mkdir()
    for bad in (empty, tmp_path / "missing"):
        with pytest.raises(UsageError) as info:
            ckpts.resolve(str(bad))
        assert str(info.value) == f"--resume_from_checkpoint {bad}: not a checkpoint folder (no train_state.json)"


def test_clip_and_check_stops_on_a_non_finite_norm(accelerator, tmp_path):
    model, _ = _prepared(accelerator)
    ckpts = Checkpoints(accelerator, tmp_path)
    state = TrainState(completed_steps=7, epoch=2)
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    expected = math.sqrt(9.0 * sum(p.numel() for p in model.parameters()))
    norm = common.clip_and_check(accelerator, model, _args("--max_grad_norm", "1.0"), state, ckpts)
    assert norm == pytest.approx(expected)                                  # the norm before clipping ...
    assert torch.cat([p.grad.flatten() for p in model.parameters()]).norm() == pytest.approx(1.0, rel=1e-4)   # ... clipped
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    assert common.clip_and_check(accelerator, model, _args("--max_grad_norm", "0"), state, ckpts) == pytest.approx(expected)
    assert all(torch.equal(p.grad, torch.full_like(p, 3.0)) for p in model.parameters())   # 0 disables clipping

    for bad, written in ((float("nan"), False), (float("inf"), True)):
        if written:
            ckpts.save(TrainState(completed_steps=5))
        weights = [p.detach().clone() for p in model.parameters()]
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        next(iter(model.parameters())).grad[0, 0] = bad
        with pytest.raises(common.NonFiniteLoss) as info:
            common.clip_and_check(accelerator, model, _args(), state, ckpts)
        message = str(info.value)
        assert f"became {bad} at step 8 (epoch 2)" in message and "\n" not in message
        assert (str(tmp_path / "checkpoints" / "step_00000005") if written else "none written yet") in message
        assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))


# ------------------------------------------------------------------------------------------------ logs
def test_metrics_log_truncates_to_the_resumed_step(accelerator, tmp_path):
    log = MetricsLog(accelerator, tmp_path, with_tracking=False)
    for step in (10, 20, 30, 40):
        log.log({"step": step, "loss": 1.0 / step})
    log.log({"step": 40, "final": True})
    path = tmp_path / "metrics.jsonl"

    def steps():
        return [json.loads(line)["step"] for line in path.read_text().splitlines()]

    assert steps() == [10, 20, 30, 40, 40]
    resumed = MetricsLog(accelerator, tmp_path, with_tracking=False, resume_step=20)
    assert steps() == [10, 20]
    resumed.log({"step": 30, "loss": 0.5})
    assert steps() == [10, 20, 30] and json.loads(path.read_text().splitlines()[-1]) == {"step": 30, "loss": 0.5}
    resumed.log({"step": 30, "final": True})
    MetricsLog(accelerator, tmp_path, with_tracking=False, resume_step=30)  # resuming a finished run: its final
    assert steps() == [10, 20, 30]                                          # record goes, the resumed run writes one
    MetricsLog(accelerator, tmp_path, with_tracking=False)                  # a fresh run starts a fresh log
    assert path.read_text() == ""
    MetricsLog(accelerator, tmp_path / "new", with_tracking=False, resume_step=5)   # resuming without a log is fine
    assert (tmp_path / "new" / "metrics.jsonl").read_text() == ""


def test_timer_summary_counts_items_and_resets():
    timer = common.Timer()
    timer.data_ready()
    timer.step_done(30)
    timer.data_ready()
    timer.step_done(12)
    assert timer.items == 42 and timer.data <= timer.total
    summary = timer.summary()
    assert set(summary) == {"items_per_s", "data_wait_share"} and 0.0 <= summary["data_wait_share"] <= 1.0
    assert summary["items_per_s"] > 0
    assert common.Timer().summary() == {"items_per_s": 0.0, "data_wait_share": 0.0}
    assert timer.items == 0 and timer.summary() == {"items_per_s": 0.0, "data_wait_share": 0.0}


# ---------------------------------------------------------------------------------------------- metrics
def test_offline_sacrebleu_metric_equals_sacrebleu():
    import sacrebleu

    predictions = ["A man rides a bike down the street.", "Two dogs play in the snow", "", "A woman , smiling ."]
    references = ["A man rides a bicycle down a street.", "Two dogs are playing in the snow.", "Children run.",
                  "A smiling woman."]
    metric = common.load_metric("sacrebleu_offline")
    metric.add_batch(predictions=predictions[:2], references=references[:2])
    metric.add_batch(predictions=predictions[2:], references=references[2:])
    scores = metric.compute()
    bleu = sacrebleu.corpus_bleu(predictions, [references])
    assert scores["score"] == pytest.approx(bleu.score, rel=1e-12) and 0 < scores["score"] < 100
    assert scores["chrf"] == pytest.approx(sacrebleu.corpus_chrf(predictions, [references]).score, rel=1e-12)
    assert scores["num_sentences"] == 4 and scores["counts"] == bleu.counts and scores["sys_len"] == bleu.sys_len
    assert scores["signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")


# ------------------------------------------------------------------------------------------ final save
def test_save_final_for_a_plain_module(accelerator, tmp_path):
    from safetensors.torch import load_file

    model = _Mlp()
    EmergenceInit(alpha=1.2).apply(model)
    args = _args("--output_dir", str(tmp_path / "out"), "--max_train_steps", "4")
    common.save_final(accelerator, accelerator.prepare(model), args, title="mlp (emergence init)", task="image-classification",
                      auto_class="AutoModel", example="vision", metrics={"accuracy": 0.25},
                      extra_files={"config.json": '{"widths": [6, 8]}'})
    out = tmp_path / "out"
    saved = load_file(str(out / "model.safetensors"))
    assert saved.keys() == model.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    assert json.loads((out / "all_results.json").read_text()) == {"accuracy": 0.25}
    assert json.loads((out / "config.json").read_text()) == {"widths": [6, 8]}
    card = (out / "README.md").read_text()
    assert "# mlp (emergence init)" in card and "| accuracy | 0.25 |" in card and "| `max_train_steps` | `4` |" in card


# ------------------------------------------------------------------------------------ argparse errors
def test_argparse_errors_are_one_usage_error_without_the_usage_dump(capsys):
    for argv, message in [(["--model_type", "gpt"], "argument --model_type: invalid choice: 'gpt'"),
                          (["--learning_rate", "fast"], "argument --learning_rate: invalid float value: 'fast'"),
                          (["--checkpointing_steps", "0"], "expected a positive integer or 'epoch', got '0'"),
                          (["--bogus"], "unrecognized arguments: --bogus")]:
        with pytest.raises(UsageError) as info:
            _parser().parse_args(argv)
        assert message in str(info.value) and str(info.value).endswith("(see run.py --help)"), argv
        assert "\n" not in str(info.value) and capsys.readouterr().err == ""        # nothing printed, no usage


# ------------------------------------------------------------------------------------------ data loaders
def test_data_loader_iteration_leaves_the_global_rng_alone(accelerator):
    """The root cause of inexact resumes with dropout: a DataLoader without a generator draws the workers' base
    seed from the global torch RNG each time an iteration starts, and a resume starts one extra iteration."""
    sampler = EpochBatchSampler(20, 4, seed=0)

    def draws(loader):
        before = torch.get_rng_state()
        batches = [b.tolist() for b in loader]
        return batches, not torch.equal(before, torch.get_rng_state())

    plain = accelerator.prepare(DataLoader(list(range(20)), batch_sampler=sampler))
    own = accelerator.prepare(common.data_loader(list(range(20)), batch_sampler=sampler))
    assert draws(plain)[1] is True                                    # what shifted every later dropout mask
    batches, moved = draws(own)
    assert not moved and batches == list(sampler)
    assert draws(accelerator.skip_first_batches(own, 2)) == (batches[2:], False)
    assert draws(accelerator.prepare(common.data_loader(list(range(7)), batch_size=3)))[1] is False


# ------------------------------------------------------------------------------------ verified checkpoints
def _saved(accelerator, tmp_path, steps=(1, 2), total_limit=3):
    _prepared(accelerator)
    ckpts = Checkpoints(accelerator, tmp_path, total_limit=total_limit)
    for step in steps:
        ckpts.save(TrainState(completed_steps=step, epoch=0, batches_in_epoch=step))
    return ckpts, tmp_path / "checkpoints"


def _truncate(path: Path, keep: int = 40) -> None:
    path.write_bytes(path.read_bytes()[:keep])


CORRUPTIONS = {   # name -> (damage to step 2, what the warning / error names)
    "truncated_weights": (lambda d: _truncate(d / "model.safetensors"), "model.safetensors has 40 bytes"),
    "truncated_optimizer": (lambda d: _truncate(d / "optimizer.bin"), "optimizer.bin has 40 bytes"),
    "missing_weights": (lambda d: (d / "model.safetensors").unlink(), "model.safetensors is missing"),
    "invalid_train_state": (lambda d: (d / "train_state.json").write_text('{"completed_steps": "two"'),
                            "train_state.json is not a training state"),
    "garbage_rng_state": (lambda d: (d / "random_states_0.pkl").write_bytes(
        b"\x00" * (d / "random_states_0.pkl").stat().st_size), "random_states_0.pkl was changed after it was saved"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(case, accelerator, tmp_path, caplog):
    ckpts, root = _saved(accelerator, tmp_path)
    damage, named = CORRUPTIONS[case]
    damage(root / "step_00000002")
    before = sorted(p.name for p in root.iterdir())
    with caplog.at_level("WARNING", logger="hf_emergence.examples"):
        assert ckpts.resolve("latest") == root / "step_00000001"
    assert f"resuming from {root / 'step_00000001'} instead: step_00000002" in caplog.text and named in caplog.text
    with pytest.raises(UsageError) as info:                      # named explicitly: stop with one line
        ckpts.resolve(str(root / "step_00000002"))
    assert named in str(info.value) and "\n" not in str(info.value)
    assert sorted(p.name for p in root.iterdir()) == before     # nothing deleted
    assert ckpts.load(root / "step_00000001").completed_steps == 1


def test_checkpoints_without_a_manifest_are_checked_for_their_structure(accelerator, tmp_path):
    ckpts, root = _saved(accelerator, tmp_path, steps=(1,))
    step = root / "step_00000001"
    (step / "manifest.json").unlink()                            # as written before manifests existed
    assert common.checkpoint_problem(step) is None
    for damage, named in [(lambda: _truncate(step / "random_states_0.pkl", 100), "random_states_0.pkl is truncated"),
                          (lambda: _truncate(step / "model.safetensors", 60), "model.safetensors is truncated"),
                          (lambda: (step / "model.safetensors").unlink(), "the model weights (model.safetensors) are missing")]:
        damage()
        assert named in common.checkpoint_problem(step)


def test_latest_names_a_missing_step_while_older_ones_exist(accelerator, tmp_path, caplog):
    ckpts, root = _saved(accelerator, tmp_path, steps=(1, 2))
    (root / "latest").write_text("step_00000009")
    with caplog.at_level("WARNING", logger="hf_emergence.examples"):
        assert ckpts.resolve("latest") == root / "step_00000002"
    assert "step_00000009 is missing" in caplog.text


def test_no_intact_checkpoint_stops_with_one_line_and_changes_nothing(accelerator, tmp_path):
    ckpts, root = _saved(accelerator, tmp_path, steps=(1, 2))
    (tmp_path / "metrics.jsonl").write_text('{"step": 2, "loss": 1.0}\n')
    for step in ("step_00000001", "step_00000002"):
        _truncate(root / step / "model.safetensors")
    with pytest.raises(UsageError) as info:
        ckpts.resolve("latest")
    message = str(info.value)
    assert message.startswith(f"--resume_from_checkpoint latest: no intact checkpoint in {tmp_path} (step_00000002: ")
    assert "step_00000001: model.safetensors has 40 bytes" in message and "--overwrite_output_dir" in message
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 2, "loss": 1.0}\n'
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001", "step_00000002"]
    # a finished run without checkpoints is not restarted either
    (tmp_path / "finished").mkdir()
    (tmp_path / "finished" / "all_results.json").write_text("{}")
    with pytest.raises(UsageError, match=r"finished holds a finished run \(all_results.json\) but no checkpoint; nothing"):
        Checkpoints(accelerator, tmp_path / "finished").resolve("latest")
    assert Checkpoints(accelerator, tmp_path / "finished", overwrite=True).resolve("latest") is None
    assert Checkpoints(accelerator, tmp_path / "new").resolve("latest") is None      # nothing yet: the first start


def test_a_fresh_run_never_replaces_a_finished_run_or_checkpoints(accelerator, tmp_path):
    ckpts, root = _saved(accelerator, tmp_path / "run", steps=(1,))
    with pytest.raises(UsageError) as info:
        ckpts.resolve(None)
    assert str(info.value).startswith(f"--output_dir {tmp_path / 'run'} already holds a run with checkpoints up to "
                                      "step_00000001: pass --resume_from_checkpoint latest")
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "metrics.jsonl").write_text('{"step": 3, "final": true}\n')
    with pytest.raises(UsageError, match="holds a finished run .metrics.jsonl has its final record"):
        Checkpoints(accelerator, finished).resolve(None)
    assert Checkpoints(accelerator, tmp_path / "empty").resolve(None) is None
    overwrite = Checkpoints(accelerator, tmp_path / "run", overwrite=True)
    assert overwrite.resolve(None) is None and root.is_dir()                       # nothing removed yet ...
    state, log = common.start_run(accelerator, _args("--output_dir", str(tmp_path / "run")), overwrite, None)
    assert state == TrainState() and list(root.iterdir()) == []                   # ... only when the new run starts


def test_prune_keeps_checkpoints_newer_than_the_resumed_step(accelerator, tmp_path):
    ckpts, root = _saved(accelerator, tmp_path, steps=(1, 2, 3), total_limit=2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002", "step_00000003"]
    _truncate(root / "step_00000003" / "optimizer.bin")
    assert ckpts.resolve("latest") == root / "step_00000002"   # the run goes on from step 2 ...
    ckpts.save(TrainState(completed_steps=3))                  # ... and replaces the corrupt step 3 when it gets there
    assert common.checkpoint_problem(root / "step_00000003") is None
    ckpts.load(root / "step_00000002")
    ckpts.save(TrainState(completed_steps=2))                  # resumed from an earlier step: 3 is left alone
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002", "step_00000003"]


def test_resuming_on_other_data_warns_naming_what_changed(accelerator, tmp_path, caplog):
    """The data description is saved with the checkpoint; on resume a changed value is one warning naming it (and
    the new description is what the next checkpoint saves); the same data resumes silently."""
    _prepared(accelerator)
    args = argparse.Namespace(output_dir=str(tmp_path), with_tracking=False)
    ckpts = Checkpoints(accelerator, tmp_path)
    counts = {"train_examples": 45000, "batches_per_epoch": 352}
    data = {**counts, "processes": 1}                                 # the process count is added: this accelerator's
    state, _ = common.start_run(accelerator, args, ckpts, None, data=counts)
    state.completed_steps = 3
    path = ckpts.save(state)
    assert json.loads((path / "train_state.json").read_text())["data"] == data
    with caplog.at_level("WARNING", logger="hf_emergence.examples"):
        common.start_run(accelerator, args, ckpts, path, data=counts)
    assert "other data" not in caplog.text
    changed = {**data, "train_examples": 44999}
    with caplog.at_level("WARNING", logger="hf_emergence.examples"):
        resumed, _ = common.start_run(accelerator, args, ckpts, path, data={**counts, "train_examples": 44999})
    assert resumed.completed_steps == 3 and resumed.data == changed
    assert "train_examples 45000 -> 44999;" in caplog.text and "batches_per_epoch" not in caplog.text


def test_resuming_a_different_model_says_which_setting_differs(tmp_path, caplog):
    from transformers import BertConfig, BertModel

    def save_with(hidden, dropout, out):
        acc = Accelerator(cpu=True)
        torch.manual_seed(0)
        model = BertModel(BertConfig(vocab_size=32, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16, hidden_dropout_prob=dropout))
        acc.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
        ckpts = Checkpoints(acc, out)
        return acc, ckpts

    try:
        _, ckpts = save_with(8, 0.1, tmp_path)
        path = ckpts.save(TrainState(completed_steps=1))
        assert json.loads((path / "model_config.json").read_text())["hidden_size"] == 8
        AcceleratorState._reset_state(reset_partial_state=True)
        _, other = save_with(12, 0.1, tmp_path)
        with pytest.raises(UsageError) as info:
            other.load(path)
        message = str(info.value)
        assert message.startswith(f"--resume_from_checkpoint {path} holds a different model: settings that differ "
                                  "(checkpoint -> this run): hidden_size 8 -> 12; ")
        assert "embeddings.LayerNorm.bias is [8] there and [12] here" in message and "\n" not in message
        AcceleratorState._reset_state(reset_partial_state=True)
        _, same_shapes = save_with(8, 0.3, tmp_path)
        with caplog.at_level("WARNING", logger="hf_emergence.examples"):
            assert same_shapes.load(path).completed_steps == 1      # shapes fit: resumed, with a warning
        assert "hidden_dropout_prob 0.1 -> 0.3" in caplog.text
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


# ---------------------------------------------------------------------------------------- clean stops
def test_sigterm_stops_at_a_step_boundary_with_a_checkpoint(accelerator, tmp_path, capsys):
    import os
    import signal

    _prepared(accelerator)
    ckpts = Checkpoints(accelerator, tmp_path)
    state = TrainState(completed_steps=4, epoch=1, batches_in_epoch=2)

    def main(argv):
        common.stop_if_asked(accelerator, state, ckpts)          # nothing asked yet: goes on
        os.kill(os.getpid(), signal.SIGTERM)                       # arrives mid-step: only recorded ...
        state.completed_steps += 1
        common.stop_if_asked(accelerator, state, ckpts)           # ... and acted on at the step boundary
        raise AssertionError("not stopped")

    assert common.run_cli(main, []) == 128 + signal.SIGTERM
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"stopped: SIGTERM at step 5 (epoch 1); saved {tmp_path / 'checkpoints' / 'step_00000005'}. "
                   "Continue with --resume_from_checkpoint latest")
    assert ckpts.resolve("latest") == tmp_path / "checkpoints" / "step_00000005"
    assert ckpts.load(ckpts.latest()) == state
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL                # handlers restored


def test_with_several_processes_the_stop_request_is_reduced_only_every_few_steps(monkeypatch):
    """The cross-process reduce is a device round trip: only at multiples of ``every``; all ranks stop there."""
    import signal
    import types

    reduced = []

    def reduce(tensor, reduction):
        reduced.append(state.completed_steps)
        return tensor

    accelerator = types.SimpleNamespace(num_processes=2, device=torch.device("cpu"), reduce=reduce)
    saved = []
    ckpts = types.SimpleNamespace(latest=lambda: None, name=lambda st: "x", save=lambda st: saved.append(st.completed_steps) or "ckpt")
    state = TrainState(completed_steps=0, epoch=0)
    monkeypatch.setitem(common._stop_request, "signum", None)
    for step in range(1, 9):
        state.completed_steps = step
        if step == 5:
            common._stop_request["signum"] = signal.SIGTERM
        try:
            common.stop_if_asked(accelerator, state, ckpts, every=4)
        except common.Stopped:
            break
    assert reduced == [4, 8] and saved == [8] and state.completed_steps == 8


def test_a_stop_request_after_a_skipped_step_saves_nothing(accelerator, tmp_path):
    """SIGTERM after a step the non-finite guard skipped: the guard is read first, so the run stops as diverged
    and no checkpoint holds the step after the skipped one."""
    import signal

    _, optimizer = _prepared(accelerator)
    ckpts = Checkpoints(accelerator, tmp_path)
    checks = common.DeviceChecks()
    checks.note(optimizer, torch.tensor(float("inf")), 5, 1)
    state = TrainState(completed_steps=6, epoch=1)
    common._stop_request["signum"] = signal.SIGTERM
    try:
        with pytest.raises(common.NonFiniteLoss, match="became inf at step 5"):
            common.stop_if_asked(accelerator, state, ckpts, checks)
    finally:
        common._stop_request["signum"] = None
    assert ckpts.latest() is None


def test_fp16_from_the_launcher_is_one_line(monkeypatch, tmp_path):
    """fp16's loss scaler skips overflowing steps, which the guard would report as divergence: refused up front."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    try:
        with pytest.raises(UsageError, match="^mixed precision fp16 .* use bf16 or no$"):
            common.make_accelerator(_args("--output_dir", str(tmp_path)), "test")
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_accelerate_package_check_is_answered_once(monkeypatch):
    """The optimizer wrapper's per-step is_lomo_available() is cached: same answer, the lookup runs once."""
    import accelerate.optimizer as accelerated

    calls = []
    monkeypatch.setattr(accelerated, "is_lomo_available", lambda: calls.append(1) or False)
    common.cache_accelerate_package_checks()
    common.cache_accelerate_package_checks()          # idempotent: not cached twice
    assert [accelerated.is_lomo_available() for _ in range(5)] == [False] * 5 and calls == [1]
