"""Layer discovery: every registered architecture and several fallback-only models resolve as expected."""

import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from hf_emergence import (EmergenceInit, EmergencePlan, Layout, list_architectures, register_architecture,
                          unregister_architecture)
from hf_emergence.architectures import discover
from hf_emergence.architectures._helpers import is_weight_module
from hf_emergence.layout import ATTN_K, ATTN_O, ATTN_Q, ATTN_QKV, ATTN_V, FFN, SHORTCUT, Block, Chain, Member, role_from_name
from tiny_models import EXAMPLE_INPUTS, EXPECTED, FACTORIES, FALLBACK, MLP, REGISTERED, hf_config


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


# ---- the table of tiny models discovery must handle (issues 16 and 11) ------------------------------------------------
from tiny_models import (_DECISION, _ENCODEC, _LXMERT, _MIXTRAL, _SIGLIP2, _SWIN, _XMOD, DECISION_BATCH,  # noqa: E402
                         HierarchicalTransformer, ItemGated, NonzeroRouted, RepVGG, StatefulNet, TimmStyleNet,
                         WeightNormedConvNet, bart_decoder, hf_model, marian_encoder)


def _runner(model, name):
    """The module whose call runs the planned tensor ``name`` (a weight's module, an MHA, a fused experts module)."""
    path = name.rsplit(".", 1)[0]
    for suffix in (".parametrizations.weight",):
        path = path[: -len(suffix)] if path.endswith(suffix) else path
    module = model.get_submodule(path)
    parent = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
    return parent if isinstance(parent, nn.MultiheadAttention) else module


def first_calls(model, names, inputs):
    """Position of the first call of each planned tensor's module in one real forward pass."""
    position, handles = {}, []

    def record(module, _args):
        position.setdefault(id(module), len(position))

    for name in names:
        handles.append(_runner(model, name).register_forward_pre_hook(record))
    args, kwargs = ((), inputs) if isinstance(inputs, dict) else ((inputs,) if torch.is_tensor(inputs) else inputs, {})
    with torch.no_grad():
        model.eval()
        model(*args, **kwargs)
    for h in handles:
        h.remove()
    return {name: position.get(id(_runner(model, name))) for name in names}


def check_plan(model, plan, inputs):
    """The plan against the model itself: layers in forward order, measured factors, every weight accounted for."""
    calls = first_calls(model, [e.name for e in plan], inputs)
    for chain in plan.chains:
        layers = {}
        for e in plan:
            if e.chain == chain and e.layer is not None and calls[e.name] is not None:
                layers[e.layer] = min(layers.get(e.layer, 1 << 30), calls[e.name])
        starts = [layers[i] for i in sorted(layers)]
        assert starts == sorted(starts), f"chain {chain}: layers do not run in plan order"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    EmergenceInit(**{**plan.settings, "base_init": "keep"}).apply(model, force=True)
    factors = plan.factors()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n] * factors.get(n, 1.0), rtol=1e-6, atol=0, msg=n)
    planned = {n for e in plan for n in (e.name, *e.aliases)}
    listed = {n for n, _ in plan.left_out}
    for n, p in model.named_parameters():
        if p.ndim >= 2:
            assert n in planned or n in listed, f"{n} is neither planned nor listed as left out"
    assert all(reason for _, reason in plan.left_out)


TOKENS = {"input_ids": torch.arange(3, 11).reshape(1, 8)}
TABLE = {
    # name: (factory, inputs of the check's own forward, expected source, order route, chains, {left-out name: reason part})
    "moe": (lambda: hf_model("mixtral", _MIXTRAL), TOKENS, "traced", "model", {"layers": 3},
            {"embed_tokens.weight": "embedding"}),
    "item": (ItemGated, torch.randn(2, 6), "traced", "model", {"model": 4}, {}),
    "nonzero": (NonzeroRouted, torch.randn(3, 4), "traced", "model", {"model": 3}, {}),
    "weight_norm": (WeightNormedConvNet, torch.randn(2, 2, 16), "traced", "model", {"model": 4},
                    {"conv1.parametrizations.weight.original1": "weight-norm direction",
                     "conv3.weight_v": "weight-norm direction",
                     "odd.parametrizations.weight.original": "unknown parametrization"}),
    "encodec": (lambda: hf_model("encodec", _ENCODEC), torch.randn(1, 1, 200), "traced", "model", None,
                {"encoder.layers.0.conv.parametrizations.weight.original1": "weight-norm direction"}),
    "repvgg": (RepVGG, torch.randn(2, 3, 16, 16), "traced", "model", {"model": 6}, {}),
    "timm_style": (TimmStyleNet, torch.randn(2, 3, 16, 16), "traced", "model", {"model": 9}, {}),
    "hierarchical": (HierarchicalTransformer, torch.randn(2, 8, 4), "traced", "model", {"model": 8},
                     {"embed.weight": "outside the repeated blocks", "head.weight": "outside the repeated blocks"}),
    "swin": (lambda: hf_model("swin", _SWIN), {"pixel_values": torch.randn(1, 3, 32, 32)}, "traced", "model",
             {"encoder": 7}, {"embeddings.patch_embeddings.projection.weight": "outside the repeated blocks"}),
    # forward declares lang_ids / visual_feats / NaFlex patches optional but cannot run without them
    "xmod": (lambda: hf_model("xmod", _XMOD), {**TOKENS, "lang_ids": torch.tensor([1])}, "traced", "model",
             {"encoder": 3}, {}),
    "lxmert": (lambda: hf_model("lxmert", _LXMERT), {**TOKENS, "visual_feats": torch.randn(1, 3, 8),
                                                       "visual_pos": torch.rand(1, 3, 4)}, "traced", "model",
               {"encoder": 4}, {}),
    "siglip2": (lambda: hf_model("siglip2", _SIGLIP2),
                {**TOKENS, "pixel_values": torch.randn(1, 6, 48), "spatial_shapes": torch.tensor([[2, 3]]),
                 "pixel_attention_mask": torch.ones(1, 6, dtype=torch.long)}, "traced", "model",
                {"encoder": 2, "text_model.encoder.layers": 2}, {}),
    "bart_decoder": (bart_decoder, TOKENS, "registry:bart", "registry", {"decoder": 4}, {"embed_tokens.weight": "embedding"}),
    "marian_encoder": (marian_encoder, TOKENS, "registry:marian", "registry", {"encoder": 3}, {}),
}


@pytest.mark.parametrize("name", list(TABLE))
def test_plan_matches_a_forward_pass(name):
    factory, inputs, source, route, chains, left_out = TABLE[name]
    torch.manual_seed(0)
    model = factory()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the spectral-norm conv warns; checked in its own test
        layout = discover(model)
        plan = EmergenceInit(alpha=1.3).plan(model)
    assert (plan.source, layout.order) == (source, route)
    if chains is not None:
        assert plan.chains == chains
    reasons = dict(plan.left_out)
    for weight, reason in left_out.items():
        hits = [r for n, r in reasons.items() if n.startswith(weight)]
        assert hits and all(reason in r for r in hits), (weight, reasons)
    check_plan(model, plan, inputs)


def _plan(model, **settings):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return EmergenceInit(**{"alpha": 1.3, **settings}).plan(model)


def test_moe_experts_take_their_blocks_exponent_with_one_experts_fans_and_routers_keep_their_scale():
    plan = _plan(hf_model("mixtral", _MIXTRAL))
    for i in range(3):
        gate_up, down = plan[f"layers.{i}.mlp.experts.gate_up_proj"], plan[f"layers.{i}.mlp.experts.down_proj"]
        v_proj, router = plan[f"layers.{i}.self_attn.v_proj.weight"], plan[f"layers.{i}.mlp.gate.weight"]
        assert gate_up.shape == (4, 48, 16) and (gate_up.fan_in, gate_up.fan_out) == (16, 48)   # one expert: 16 -> 48
        assert down.shape == (4, 16, 24) and (down.fan_in, down.fan_out) == (24, 16)
        assert gate_up.k == down.k == v_proj.k == i - 1 and gate_up.factor == 1.3 ** (i - 1)
        assert (router.role, router.k, router.factor) == ("router", None, 1.0)


def test_parallel_branches_share_an_exponent_per_block_and_per_conv():
    model = RepVGG()
    block = _plan(model)
    assert block.layer_unit == "block" and block.base_init == "kaiming_normal"
    for unit in ("stem", "stage1.0", "stage2.1"):
        dense, one = block[f"{unit}.dense.0.weight"], block[f"{unit}.one_by_one.0.weight"]
        assert dense.layer == one.layer and dense.k == one.k
    matrix = _plan(model, layer_unit="matrix")                # per conv: the summed 1x1 branch still shares its k
    assert matrix.chains == block.chains == {"model": 6}
    assert matrix["stage1.0.one_by_one.0.weight"].k == matrix["stage1.0.dense.0.weight"].k
    assert len({e.k for e in matrix}) == 6


def test_the_papers_plain_cnn_keeps_one_exponent_per_conv():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "vision"))
    from plain_models import PlainConfig, build_plain_model

    plan = _plan(build_plain_model(PlainConfig(architecture="cnn", depth=6, width=8)))
    assert plan.layer_unit == "matrix" and plan.chains == {"model": 7}
    assert [e.k for e in plan] == [-3, -2, -1, 0, 1, 2, 3]


def test_a_main_path_downsample_is_its_own_layer_and_a_projection_shortcut_shares_the_last_conv():
    plan = _plan(TimmStyleNet(), layer_unit="matrix")
    down = plan["stages.1.downsample.weight"]                 # timm-style stage downsample: main path
    assert down.role == "conv" and down.layer not in {e.layer for e in plan if e.name != down.name}
    shortcut, conv2 = plan["stages.0.0.downsample.0.weight"], plan["stages.0.0.conv2.weight"]
    assert shortcut.role == "shortcut" and (shortcut.layer, shortcut.k) == (conv2.layer, conv2.k)
    stages = _plan(TimmStyleNet(), chain="stage")
    assert stages.chains == {"stages.0": 3, "stages.1": 2, "stages.2": 4}  # stem joins stage 0, the head stage 2


def test_hierarchical_stages_form_one_chain_with_the_merges_between_them():
    plan = _plan(HierarchicalTransformer())
    assert (plan.layer_unit, plan.base_init) == ("block", "xavier_uniform")   # mixed block classes: Transformer
    blocks = [row["block"] for row in plan.layers()]
    assert blocks == ["stages.0.blocks.0", "stages.0.blocks.1", "stages.0.downsample", "stages.1.blocks.0",
                      "stages.1.downsample", "stages.2.blocks.0", "stages.2.blocks.1", "stages.2.blocks.2"]
    assert plan["stages.0.downsample.reduction.weight"].role == "ffn"     # patch merging: not a shortcut
    per_stage = _plan(HierarchicalTransformer(), chain="stage")
    assert per_stage.chains == {"stages.0": 3, "stages.1": 2, "stages.2": 3}
    swin = _plan(hf_model("swin", _SWIN), chain="stage")
    assert swin.chains == {"encoder.layers.0": 3, "encoder.layers.1": 2, "encoder.layers.2": 2}
    assert _plan(hf_model("swin", _SWIN), chain="single").chains == {"encoder": 7}


def test_weight_normed_layers_scale_their_magnitude_and_keep_their_own_init():
    torch.manual_seed(0)
    model = WeightNormedConvNet().eval()                      # eval: the spectral norm's power iteration stands still
    with pytest.warns(UserWarning, match="odd.weight is parametrized by _SpectralNorm"):
        plan = EmergenceInit(alpha=1.3).plan(model)
    assert [e.name for e in plan] == ["conv1.parametrizations.weight.original0", "conv2.parametrizations.weight.original0",
                                      "conv3.weight_g", "conv4.parametrizations.weight.original0"]
    assert all(e.init == "keep" for e in plan) and plan.base_init == "kaiming_normal"
    x = torch.randn(1, 2, 8)
    model(x)  # the hook version recomputes conv3.weight in a forward pre-hook
    before = {n: getattr(model, n).weight.detach().clone() for n in ("conv1", "conv2", "conv3", "odd", "conv4")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        applied = EmergenceInit(alpha=1.3).apply(model)           # default base init: weight-normed layers keep theirs
    model(x)
    for name, k in (("conv1", -2), ("conv2", -1), ("conv3", 1), ("conv4", 2)):
        torch.testing.assert_close(getattr(model, name).weight, before[name] * 1.3 ** k)
    torch.testing.assert_close(model.odd.weight, before["odd"])
    assert EmergencePlan.from_json(applied.to_json()).left_out == applied.left_out
    assert EmergencePlan.from_json(applied.to_json())["conv3.weight_g"].init == "keep"


def test_no_forward_at_all_is_said_in_the_source_and_the_notes():
    model = hf_model("decision_transformer", _DECISION)        # its main input, states, has no builder
    with pytest.warns(UserWarning, match="registration order"):
        plan = EmergenceInit(alpha=1.3).plan(model)
    assert plan.source == "registration-order"
    assert any("registration order" in n and "'states'" in n for n in plan.notes)
    traced = EmergenceInit(alpha=1.3).plan(model, example_inputs=DECISION_BATCH)
    assert traced.source == "traced" and discover(model, DECISION_BATCH).order == "model" and not traced.notes
    check_plan(model, traced, DECISION_BATCH)


def test_example_inputs_are_used_as_given_on_real_weights():
    model = ItemGated()                                       # no meta or fake pass can run .item()
    plan = EmergenceInit(alpha=1.3).plan(model, example_inputs=torch.randn(3, 6))
    assert [e.name for e in plan] == ["a.weight", "b.weight", "c.weight", "head.weight"]
    with torch.device("meta"):
        meta = ItemGated()
    with pytest.warns(UserWarning, match="registration order"):
        meta_plan = EmergenceInit(alpha=1.3).plan(meta)       # weightless and not rebuildable: nothing can run it
    assert meta_plan.source == "registration-order" and "data-dependent" in " ".join(meta_plan.notes)


@pytest.mark.parametrize("name, route", [("moe", "fake"), ("swin", "fake"), ("encodec", "rebuilt"),
                                         ("nonzero", "fake"), ("bart_decoder", "registry")])
def test_a_model_on_meta_gets_the_plan_of_the_real_one(name, route):
    factory = TABLE[name][0]
    torch.manual_seed(0)
    real = _plan(factory())
    with torch.device("meta"):
        meta_model = factory()
    assert discover(meta_model).order == route
    meta = _plan(meta_model)
    assert [(e.name, e.factor, e.fan_in, e.fan_out) for e in meta] == [(e.name, e.factor, e.fan_in, e.fan_out) for e in real]
    assert meta.left_out == real.left_out


def test_tracing_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = StatefulNet().train()
    model.norm.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    plan = EmergenceInit(alpha=1.3).plan(model)
    assert [e.name for e in plan] == ["a.weight", "b.weight"]   # forward order, not registration order
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and not model.norm.training
    assert not hasattr(model, "last_batch") and model.a.in_features == 4
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_an_unregistered_t5_like_model_gets_one_layer_per_block_not_per_sub_layer():
    model = FACTORIES["t5"]()
    unregister_architecture("t5")
    try:
        plan = _plan(model)
    finally:
        from hf_emergence.architectures import BUILTIN_ROWS

        register_architecture("t5", next(r for r in BUILTIN_ROWS if "t5" in r.model_types))
    assert plan.source == "traced" and plan.chains == {"encoder": 3, "decoder": 4}
    assert plan["decoder.block.3.layer.2.DenseReluDense.wo.weight"].k == plan["decoder.block.3.layer.0.SelfAttention.v.weight"].k


def test_adding_a_model_type_is_one_row():
    from hf_emergence.architectures import Blocks, Single, convnet_row

    class CifarResNet(TimmStyleNet):
        config = type("Cfg", (), {"model_type": "tiny_cifar_resnet", "depths": [2, 1, 2]})()

    row = convnet_row("tiny_cifar_resnet", stem=r"stem", classifier=r"head", between=(Single(r"stages\.\d+\.downsample"),),
                      blocks=Blocks(r"stages\.\d+(\.blocks)?\.\d+", ("conv1", "conv2", r"downsample\.0"),
                                    roles={r"downsample\.0": SHORTCUT}, count="depths", stage=r"stages\.\d+"),
                      description="A CIFAR ResNet: stem, stages of residual blocks, head.")
    register_architecture(row.model_types, row)
    try:
        plan = _plan(CifarResNet())
    finally:
        unregister_architecture("tiny_cifar_resnet")
    # stem + 2 blocks x 2 convs + downsample + 1 block + downsample + 2 blocks + head; the shortcut shares conv2's layer
    assert plan.source == "registry:tiny_cifar_resnet" and plan.chains == {"model": 14}
    assert plan["stages.0.0.downsample.0.weight"].k == plan["stages.0.0.conv2.weight"].k
    register_architecture(row.model_types, row)
    try:
        assert _plan(CifarResNet(), chain="stage").chains == {"stages.0": 5, "stages.1": 3, "stages.2": 6}
    finally:
        unregister_architecture("tiny_cifar_resnet")


def test_factors_outside_a_sane_range_warn_with_the_alpha_that_keeps_them():
    deep = MLP(widths=(4,) + (8,) * 30 + (2,))                # 31 layers: |k| up to 15
    with pytest.warns(UserWarning, match=r"\|k\|=15.*alpha <= 1\.359 keeps every factor within \[0.01, 100\]"):
        EmergenceInit(alpha=1.5).plan(deep)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        EmergenceInit(alpha=1.3).plan(deep)                   # 1.3**15 = 51: no warning


def test_a_weight_of_unknown_structure_is_left_out_with_a_warning_never_a_crash():
    model = MLP()
    del model[2].weight
    model[2].weight = torch.randn(24, 24)                    # a plain tensor, no Parameter behind it
    with pytest.warns(UserWarning, match="2.weight of Linear is not a Parameter"):
        plan = EmergenceInit(alpha=1.3).plan(model)
    assert "2.weight" not in plan and plan.chains == {"model": 4}


@pytest.mark.parametrize("model_type, cls", [("marian", "MarianDecoder"), ("mbart", "MBartDecoder"),
                                             ("pegasus", "PegasusDecoder"), ("m2m_100", "M2M100Encoder"),
                                             ("bart", "BartEncoder")])
def test_a_standalone_stack_of_a_registered_type_uses_its_row(model_type, cls):
    import importlib

    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    model = getattr(module, cls)(hf_config(model_type))
    plan = _plan(model)
    side = cls[-7:].lower()
    assert plan.source == f"registry:{model_type}" and plan.chains == {side: 4 if side == "decoder" else 3}
    assert plan.entries[0].name == "layers.0.self_attn.q_proj.weight"


def test_sharded_or_weightless_parameters_are_never_run_for_real(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from hf_emergence.tracing import has_real_weights

    model = MLP()
    assert has_real_weights(model)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model[2].weight = nn.Parameter(distribute_tensor(model[2].weight.data, init_device_mesh("cpu", (1,)), [Shard(0)]))
        assert not has_real_weights(model)                    # a pass on a DTensor shard would need every rank
    finally:
        dist.destroy_process_group()
    with torch.device("meta"):
        assert not has_real_weights(MLP())


def test_a_custom_linear_module_is_a_weight_layer():
    class QuantLinear(nn.Module):                             # I-BERT style: not an nn.Linear, same weight layout
        def __init__(self, n_in, n_out):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(n_out, n_in))

        def forward(self, x):
            return x @ self.weight.t()

    model = nn.Sequential(QuantLinear(4, 8), nn.ReLU(), QuantLinear(8, 8), nn.ReLU(), QuantLinear(8, 2))
    plan = _plan(model)
    assert [e.name for e in plan] == ["0.weight", "2.weight", "4.weight"] and (plan["0.weight"].fan_in, plan["0.weight"].fan_out) == (4, 8)
    assert discover(model).order == "model"
    check_plan(model, plan, torch.randn(3, 4))
