"""The CIFAR ResNet (hf_emergence.models): architecture, Auto-class registration, save/load, its
registered layout under both layerings (one k per conv, one k per residual block), and the CLI's inspect."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageClassification

from hf_emergence import EmergenceInit, from_config
from hf_emergence.models import CifarResNetConfig, CifarResNetForImageClassification

ROOT = Path(__file__).resolve().parents[1]


def _config(layout: str, **kwargs) -> CifarResNetConfig:
    return AutoConfig.for_model("cifar_resnet", layout=layout, num_labels=10, **kwargs)


def _meta_model(layout: str):
    with torch.device("meta"):
        return AutoModelForImageClassification.from_config(_config(layout))


# ------------------------------------------------------------------------------------------- architecture
@pytest.mark.parametrize("layout, depths, widths, params, convs", [
    ("resnet18", [2, 2, 2, 2], [64, 128, 256, 512], 11_173_962, 1 + 16 + 3),   # He et al.'s / kuangliu's 11.17M
    ("resnet20", [3, 3, 3], [16, 32, 64], 272_474, 1 + 18 + 2),                 # 0.27M (projection shortcuts)
])
def test_layouts_have_the_published_shape(layout, depths, widths, params, convs):
    config = _config(layout)
    assert (config.depths, config.hidden_sizes, config.layout) == (depths, widths, layout)
    model = _meta_model(layout)
    assert isinstance(model, CifarResNetForImageClassification)
    assert sum(p.numel() for p in model.parameters()) == params
    assert sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) == convs
    stem = model.resnet.stem.convolution
    assert (stem.kernel_size, stem.stride, stem.in_channels, stem.out_channels) == ((3, 3), (1, 1), 3, widths[0])
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())


def test_forward_keeps_32px_into_the_first_stage_and_halves_per_stage():
    torch.manual_seed(0)
    model = AutoModelForImageClassification.from_config(_config("resnet20")).eval()
    out = model(torch.randn(2, 3, 32, 32), labels=torch.tensor([1, 2]), output_hidden_states=True)
    assert out.logits.shape == (2, 10) and out.loss.ndim == 0
    assert [tuple(h.shape[1:]) for h in out.hidden_states] == [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8)]


def test_layout_setter_sets_both_lists_and_explicit_lists_read_as_custom():
    config = _config("resnet18")
    config.layout = "resnet20"
    assert (config.depths, config.hidden_sizes) == ([3, 3, 3], [16, 32, 64])
    custom = CifarResNetConfig(depths=[1, 1], hidden_sizes=[8, 16])
    assert custom.layout == "custom" and json.loads(custom.to_json_string())["layout"] == "custom"


@pytest.mark.parametrize("kwargs, message", [
    (dict(layout="resnet50"), "layout='resnet50' is not one of: resnet18, resnet20, custom"),
    (dict(depths=[2, 2], hidden_sizes=[8]), "need one entry per stage"),
    (dict(depths=[0, 2], hidden_sizes=[8, 16]), "must be >= 1"),
])
def test_bad_config_values_are_one_clear_error(kwargs, message):
    with pytest.raises(ValueError, match="^.*" + message.replace("[", r"\[").replace("(", r"\(")):
        CifarResNetConfig(**kwargs)


# ----------------------------------------------------------------------------------------- save and load
def test_save_pretrained_round_trips_through_the_auto_class(tmp_path):
    torch.manual_seed(3)
    model = from_config(AutoModelForImageClassification, _config("resnet20"), EmergenceInit(alpha=1.3)).eval()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "cifar_resnet" and saved["architectures"] == ["CifarResNetForImageClassification"]
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert type(loaded) is CifarResNetForImageClassification and loaded.config.layout == "resnet20"
    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)  # not re-initialised
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(model(x).logits, loaded(x).logits)
    assert loaded.config.emergence_init["alpha"] == 1.3


@pytest.mark.parametrize("imports", ["import hf_emergence, transformers as t", "import transformers as t, hf_emergence",
                                     "from transformers import AutoConfig; import hf_emergence, transformers as t"])
def test_a_saved_checkpoint_loads_in_a_fresh_process_whatever_the_import_order(tmp_path, imports):
    torch.manual_seed(0)
    AutoModelForImageClassification.from_config(_config("resnet20")).save_pretrained(tmp_path)
    code = f"{imports}; m = t.AutoModelForImageClassification.from_pretrained({str(tmp_path)!r}); print(type(m).__name__)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT), timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "CifarResNetForImageClassification", proc.stderr[-2000:]


def test_import_hf_emergence_stays_light_and_without_it_transformers_does_not_know_the_type(tmp_path):
    torch.manual_seed(0)
    AutoModelForImageClassification.from_config(_config("resnet20")).save_pretrained(tmp_path)
    light = subprocess.run([sys.executable, "-c", "import sys, hf_emergence; print('transformers' in sys.modules)"],
                           capture_output=True, text=True, cwd=str(ROOT), timeout=300)
    assert light.returncode == 0 and light.stdout.strip() == "False", light.stderr[-2000:]
    code = f"import transformers as t; t.AutoModelForImageClassification.from_pretrained({str(tmp_path)!r})"
    bare = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT), timeout=300)
    assert bare.returncode != 0 and "does not recognize this architecture" in bare.stderr   # the README's wording


# ---------------------------------------------------------------------------------------------- the plan
RESNET18_CONVS = ["resnet.stem.convolution"] + [f"resnet.stages.{s}.blocks.{b}.conv{c}.convolution"
                                                for s in range(4) for b in range(2) for c in (1, 2)] + ["classifier"]
RESNET20_CONVS = ["resnet.stem.convolution"] + [f"resnet.stages.{s}.blocks.{b}.conv{c}.convolution"
                                                for s in range(3) for b in range(3) for c in (1, 2)] + ["classifier"]


@pytest.mark.parametrize("layout, layer_unit, blocks, ks", [
    # one k per conv (the default): stem + 16 convs + classifier = 18 layers, even: -9..-1, +1..+9
    ("resnet18", "auto", RESNET18_CONVS, [*range(-9, 0), *range(1, 10)]),
    # stem + 18 convs + classifier = 20 layers: -10..-1, +1..+10
    ("resnet20", "auto", RESNET20_CONVS, [*range(-10, 0), *range(1, 11)]),
    # one k per residual block; stem and classifier are blocks of their own: 10 and 11 layers
    ("resnet18", "block", ["resnet.stem.convolution"] + [f"resnet.stages.{s}.blocks.{b}" for s in range(4) for b in range(2)]
     + ["classifier"], [*range(-5, 0), *range(1, 6)]),
    ("resnet20", "block", ["resnet.stem.convolution"] + [f"resnet.stages.{s}.blocks.{b}" for s in range(3) for b in range(3)]
     + ["classifier"], list(range(-5, 6))),
])
def test_planned_exponents_per_layer_under_both_layerings(layout, layer_unit, blocks, ks):
    plan = EmergenceInit(alpha=1.2, layer_unit=layer_unit).plan(_meta_model(layout))
    assert plan.source == "registry:cifar_resnet" and plan.base_init == "kaiming_normal"
    assert plan.layer_unit == ("matrix" if layer_unit == "auto" else "block")
    assert [(r["block"], r["k"]) for r in plan.layers()] == list(zip(blocks, ks))
    assert plan.left_out == []                      # every conv and the classifier is planned
    # the projection shortcuts (one per stage after the first) share the exponent of the block's last conv
    for s in range(1, len(_config(layout).depths)):
        short = plan[f"resnet.stages.{s}.blocks.0.shortcut.convolution.weight"]
        last = plan[f"resnet.stages.{s}.blocks.0.conv2.convolution.weight"]
        assert (short.role, short.k, short.layer) == ("shortcut", last.k, last.layer)


def test_block_unit_gives_every_tensor_of_a_residual_block_one_exponent():
    plan = EmergenceInit(alpha=1.2, layer_unit="block").plan(_meta_model("resnet20"))
    block = [e for e in plan if e.block == "resnet.stages.1.blocks.0"]
    assert [e.name.removeprefix("resnet.stages.1.blocks.0.") for e in block] == \
        ["conv1.convolution.weight", "conv2.convolution.weight", "shortcut.convolution.weight"]
    assert {e.k for e in block} == {-1}              # stem -5, stage 0 blocks -4..-2, then this one


@pytest.mark.parametrize("layer_unit", ["auto", "block"])
def test_measured_factors_equal_the_plan(layer_unit):
    """Same seed, alpha 1 (the Kaiming base init) vs alpha 1.3: every planned weight is the base weight times its
    planned factor, and nothing else (BN, biases) changes."""
    config = _config("resnet20")
    torch.manual_seed(11)
    base = from_config(AutoModelForImageClassification, config, EmergenceInit(alpha=1.0, layer_unit=layer_unit))
    torch.manual_seed(11)
    scaled = from_config(AutoModelForImageClassification, config, EmergenceInit(alpha=1.3, layer_unit=layer_unit))
    plan = scaled.emergence_plan
    before, after = dict(base.named_parameters()), dict(scaled.named_parameters())
    planned = {e.name: e.factor for e in plan}
    assert len(planned) == 20 + 2                   # 19 convs + classifier + 2 shortcuts
    for name, p in after.items():
        factor = planned.get(name, 1.0)
        assert torch.allclose(p, before[name] * factor, rtol=1e-6, atol=0), name
    # base init is Kaiming-normal (fan_in, ReLU gain): std sqrt(2 / fan_in) for the 9*64 fan-in convs of stage 3
    w = before["resnet.stages.2.blocks.2.conv2.convolution.weight"]
    assert float(w.detach().std()) == pytest.approx((2 / (9 * 64)) ** 0.5, rel=0.03)


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_inspect_plans_the_cifar_resnet_from_its_model_type():
    proc = subprocess.run([sys.executable, "-m", "hf_emergence", "inspect", "--model_type", "cifar_resnet",
                           "--config_overrides", "layout=resnet20", "--auto_class", "AutoModelForImageClassification",
                           "--alpha", "1.2", "--json"], capture_output=True, text=True, cwd=str(ROOT), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["model"] == "CifarResNetForImageClassification"
    assert [r["k"] for r in report["layers"]] == [*range(-10, 0), *range(1, 11)]
    for row in report["layers"]:
        assert row["std_ratio"] == pytest.approx(row["factor"], rel=1e-5)
