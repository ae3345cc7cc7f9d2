"""Layer discovery: every registered architecture and several fallback-only models resolve as expected."""

import warnings

import pytest
import torch
import torch.nn as nn

from hf_emergence import EmergenceInit, Layout, list_architectures, register_architecture, unregister_architecture
from hf_emergence.architectures import discover
from hf_emergence.architectures._helpers import is_weight_module
from hf_emergence.layout import ATTN_K, ATTN_O, ATTN_Q, ATTN_QKV, ATTN_V, FFN, SHORTCUT, Block, Chain, Member, role_from_name
from tiny_models import EXAMPLE_INPUTS, EXPECTED, FACTORIES, FALLBACK, REGISTERED


def test_every_registered_architecture_has_a_test_row():
    assert sorted(list_architectures()) == sorted(REGISTERED)


@pytest.mark.parametrize("name", REGISTERED + FALLBACK)
def test_layout_resolution(name):
    torch.manual_seed(0)
    model = FACTORIES[name]()
    plan = EmergenceInit(alpha=1.2).plan(model, example_inputs=EXAMPLE_INPUTS.get(name))
    source, chains, first, last = EXPECTED[name]
    assert (plan.source, plan.chains, plan.entries[0].name, plan.entries[-1].name) == (source, chains, first, last)
    params = dict(model.named_parameters())
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for e in plan:                                   # only weights of Linear / Conv layers, never biases/norms/embeddings
        owner = model.get_submodule(e.name.rsplit(".", 1)[0])
        assert is_weight_module(owner) or isinstance(owner, nn.MultiheadAttention), e.name
        assert params[e.name].ndim >= 2 and id(params[e.name]) not in embedding_weights
    ks = [e.k for e in plan if e.k is not None]
    assert min(ks) < 0 < max(ks)


@pytest.mark.parametrize("rel, role", [
    ("self_attn.q_proj", ATTN_Q), ("self_attn.k_proj", ATTN_K), ("self_attn.v_proj", ATTN_V), ("self_attn.out_proj", ATTN_O),
    ("layer.0.SelfAttention.o", ATTN_O), ("attention.self.query", ATTN_Q), ("attention.output.dense", ATTN_O),
    ("attn.c_attn", ATTN_QKV), ("attn.c_proj", ATTN_O), ("mlp.c_proj", FFN), ("fc1", FFN),
    ("layer.1.DenseReluDense.wo", FFN), ("shortcut.convolution", SHORTCUT), ("downsample.0", SHORTCUT),
])
def test_role_from_name(rel, role):
    assert role_from_name(rel) == role


def test_resnet_shortcut_shares_the_exponent_of_its_blocks_last_conv():
    plan = EmergenceInit(alpha=1.5).plan(FACTORIES["resnet"]())
    shortcut = plan["resnet.encoder.stages.1.layers.0.shortcut.convolution.weight"]
    last_conv = plan["resnet.encoder.stages.1.layers.0.layer.1.convolution.weight"]
    assert (shortcut.layer, shortcut.k, shortcut.factor) == (last_conv.layer, last_conv.k, last_conv.factor)


def test_resnet_block_unit_gives_one_exponent_per_residual_block():
    plan = EmergenceInit(alpha=1.5, layer_unit="block").plan(FACTORIES["resnet"]())
    assert plan.chains == {"model": 5}               # stem, 3 residual blocks, classifier
    block = [e for e in plan if e.block == "resnet.encoder.stages.1.layers.0"]
    assert len(block) == 3 and len({e.k for e in block}) == 1


def test_gpt2_conv1d_fans_are_read_transposed():
    plan = EmergenceInit().plan(FACTORIES["gpt2"]())
    c_fc = plan["transformer.h.0.mlp.c_fc.weight"]     # Conv1D(nx=16 -> nf=64), weight stored (16, 64)
    assert c_fc.shape == (16, 64) and (c_fc.fan_in, c_fc.fan_out) == (16, 64)


def test_forward_order_beats_registration_order():
    plan = EmergenceInit().plan(FACTORIES["cnn"]())  # CNN registers its head before its convs
    assert [e.name for e in plan] == ["features.0.weight", "features.3.weight", "features.6.weight", "head.weight"]


def test_untraceable_model_falls_back_to_registration_order_with_warning():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.b, self.a = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x, y):
            return self.b(self.a(x) + y)

    model = TwoInputs()
    with pytest.warns(UserWarning, match="registration order"):
        plan = EmergenceInit().plan(model)
    assert plan.source == "registration-order" and [e.name for e in plan] == ["b.weight", "a.weight"]
    traced = EmergenceInit().plan(model, example_inputs=(torch.zeros(1, 4), torch.zeros(1, 4)))
    assert traced.source == "traced" and [e.name for e in traced] == ["a.weight", "b.weight"]


def test_unregistered_hf_model_type_uses_the_fallback():
    torch.manual_seed(0)
    plan = EmergenceInit().plan(FACTORIES["bert"]())
    assert plan.source == "traced" and plan.layer_unit == "block" and plan.base_init == "xavier_uniform"
    assert not any("classifier" in e.name or "pooler" in e.name for e in plan)


def test_register_architecture_decorator_duplicate_and_overwrite():
    @register_architecture("tiny_custom_type")
    def layout(model):
        linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        members = [Member(f"{n}.weight", FFN, m.in_features, m.out_features) for n, m in linears]
        return Layout([Chain("model", [Block(m.param, [m]) for m in members])], "matrix", "keep", "registry:tiny_custom_type")

    try:
        assert "tiny_custom_type" in list_architectures()
        with pytest.raises(ValueError, match="already registered"):
            register_architecture("tiny_custom_type", lambda m: None)
        register_architecture("tiny_custom_type", layout, overwrite=True)

        class WithConfig(nn.Sequential):
            config = type("Cfg", (), {"model_type": "tiny_custom_type"})()

        model = WithConfig(nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3))
        assert discover(model).source == "registry:tiny_custom_type"
    finally:
        unregister_architecture("tiny_custom_type")
    assert "tiny_custom_type" not in list_architectures()


def test_registry_mismatch_falls_back_with_warning():
    model = FACTORIES["vit"]()
    model.config.num_hidden_layers = 7               # config now disagrees with the 5 blocks present
    with pytest.warns(UserWarning, match="found 5 encoder blocks but the config says 7"):
        plan = EmergenceInit().plan(model)
    assert plan.source == "traced" and plan.chains == {"vit.layers": 5}
