"""EmergenceInit.apply: measured scale factors equal the plan, invariances hold, bad input is refused clearly."""

import copy
import json
import math
import warnings

import pytest
import torch
import torch.nn as nn

from hf_emergence import AlreadyAppliedError, EmergenceInit, EmergencePlan
from hf_emergence.base_init import base_init_, base_std
from tiny_models import EXAMPLE_INPUTS, FACTORIES, FALLBACK, MLP, REGISTERED, SINGLE_LAYER


def _build(name, seed=0):
    torch.manual_seed(seed)
    return FACTORIES[name]()


@pytest.mark.parametrize("alpha", [1.3, 0.8])
@pytest.mark.parametrize("name", REGISTERED + FALLBACK)
def test_measured_ratio_equals_planned_factor(name, alpha):
    reference = _build(name).state_dict()
    model = _build(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")              # alpha < 1 warns by design
        plan = EmergenceInit(alpha=alpha, base_init="keep").apply(model, example_inputs=EXAMPLE_INPUTS.get(name))
    factors = plan.factors()
    assert any(f < 1 for f in factors.values()) and any(f > 1 for f in factors.values())
    for key, value in model.state_dict().items():
        if key in factors:
            assert torch.equal(value, reference[key] * factors[key]), key
            if factors[key] != 1.0:
                ratio = (value.double() / reference[key].double())[reference[key] != 0]
                assert torch.allclose(ratio, torch.full_like(ratio, factors[key]), rtol=1e-6), key
        else:                                        # biases, norms, embeddings, buffers, unplanned weights
            assert torch.equal(value, reference[key]), key
    for e in plan:
        if e.k is not None:
            assert e.factor == pytest.approx(alpha ** e.k)


@pytest.mark.parametrize("name", ["marian", "bart", "t5"])
def test_tied_embeddings_stay_tied_and_untouched(name):
    model = _build(name)
    shared = model.get_input_embeddings().weight.detach().clone()
    EmergenceInit(alpha=1.5).apply(model)
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert torch.equal(model.get_input_embeddings().weight, shared)


def test_shared_parameter_is_scaled_exactly_once():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.middle, self.last = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
            self.again = self.first                  # same module (and Parameter) used twice

        def forward(self, x):
            return self.last(self.middle(self.again(self.first(x))))

    model = Shared()
    before = model.first.weight.detach().clone()
    plan = EmergenceInit(alpha=2.0, base_init="keep").apply(model)
    assert plan["first.weight"].aliases == ("again.weight",)
    assert torch.equal(model.first.weight, before * plan["first.weight"].factor)   # 2**-1 once, not twice


def test_bias_free_relu_chain_computes_the_same_function():
    """Symmetric schedule on a positively homogeneous net: same function, different weights, grads / alpha**k."""
    x = torch.randn(16, 12)
    torch.manual_seed(1)
    base = MLP(bias=False)
    scaled = copy.deepcopy(base)
    plan = EmergenceInit(alpha=1.3, base_init="keep").apply(scaled)
    assert plan.chains == {"model": 5}
    assert not torch.equal(base[0].weight, scaled[0].weight)
    torch.testing.assert_close(scaled(x), base(x), rtol=1e-5, atol=1e-6)
    base(x).square().sum().backward()
    scaled(x).square().sum().backward()
    grads = dict(base.named_parameters())
    for name, p in scaled.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad / plan[name].factor, rtol=1e-4, atol=1e-6)


def test_alpha_one_with_keep_is_bit_identical():
    reference = _build("marian").state_dict()
    model = _build("marian")
    EmergenceInit(alpha=1.0, base_init="keep").apply(model)
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("base_init", ["xavier_uniform", "xavier_normal", "kaiming_normal", "kaiming_uniform"])
def test_base_init_matches_torch_nn_init(base_init):
    layer = nn.Linear(64, 32)
    torch.manual_seed(3)
    getattr(torch.nn.init, base_init + "_")(layer.weight)
    expected = layer.weight.detach().clone()
    torch.manual_seed(3)
    base_init_(layer.weight, base_init, fan_in=64, fan_out=32)
    assert torch.equal(layer.weight, expected)


@pytest.mark.parametrize("base_init", ["xavier_uniform", "kaiming_normal"])
def test_base_init_then_scale_gives_planned_std(base_init):
    torch.manual_seed(0)
    model = MLP(widths=(256, 256, 256, 256, 256, 256))
    biases = {i: m.bias.detach().clone() for i, m in enumerate(model) if isinstance(m, nn.Linear)}
    plan = EmergenceInit(alpha=1.5, base_init=base_init).apply(model)
    params = dict(model.named_parameters())
    for e in plan:
        expected = base_std(base_init, e.fan_in, e.fan_out) * e.factor
        assert params[e.name].std().item() == pytest.approx(expected, rel=0.02)
    assert all(torch.equal(m.bias, biases[i]) for i, m in enumerate(model) if isinstance(m, nn.Linear))


def test_apply_touches_only_planned_tensors_under_base_init():
    reference = _build("vit").state_dict()
    model = _build("vit")
    plan = EmergenceInit(alpha=1.2, base_init="xavier_uniform").apply(model)
    planned = set(plan.factors())
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference[key]) == (key not in planned), key


def test_attention_settings():
    model = _build("marian")
    roles = lambda plan: {e.role for e in plan if e.scaled}
    assert roles(EmergenceInit(alpha=1.5, attention="vo").plan(model)) == {"attn_v", "attn_o", "ffn"}
    assert roles(EmergenceInit(alpha=1.5, attention="none").plan(model)) == {"ffn"}
    assert roles(EmergenceInit(alpha=1.5, attention="all").plan(model)) == {"attn_q", "attn_k", "attn_v", "attn_o", "ffn"}


def test_chain_and_unit_settings():
    model = _build("marian")
    single = EmergenceInit(chain="single").plan(model)
    assert single.chains == {"encoder+decoder": 7}
    assert [r["k"] for r in single.layers()] == [-3, -2, -1, 0, 1, 2, 3]
    matrix = EmergenceInit(layer_unit="matrix").plan(model)
    assert matrix.chains == {"encoder": 3 * 4, "decoder": 4 * 6}   # V, O, fc1, fc2 (+ cross V, O) per block
    variance = EmergenceInit(alpha=1.44, scale_mode="variance").plan(model)
    assert variance["model.decoder.layers.3.fc2.weight"].factor == pytest.approx(1.44)   # k=2 -> 1.44**(2/2)


def test_exclude_drops_matching_tensors():
    plan = EmergenceInit(exclude=[r"\.fc2\."]).plan(_build("marian"))
    assert not any(".fc2." in e.name for e in plan)


def test_unscaled_tensors_keep_their_base_draw_and_the_others_their_exponents():
    """``unscaled``: the head is re-drawn by the base init but not scaled, bit for bit the alpha=1 draw, while every
    other tensor gets exactly what it gets with the head scaled (the numbering counts the head)."""
    def model():
        torch.manual_seed(0)
        return nn.Sequential(*[m for i in range(4) for m in (nn.Linear(12, 12), nn.ReLU())], nn.Linear(12, 3))

    def applied(init):
        m = model()
        torch.manual_seed(1)                       # the base init's draws
        return m, init.apply(m)

    (plain, full), (held, plan), (base, _) = (applied(EmergenceInit(alpha=1.5)),
                                              applied(EmergenceInit(alpha=1.5, unscaled=[r"^8\."])),
                                              applied(EmergenceInit(alpha=1.0)))
    assert [r["k"] for r in plan.layers()] == [r["k"] for r in full.layers()][:-1] == [-2, -1, 0, 1]
    assert plan["8.weight"].factor == 1.0 and plan["8.weight"].k is None and full["8.weight"].k == 2
    assert "note: 1 tensor(s) matching unscaled= re-drawn at factor 1, counted in the numbering: 8.weight (k=2)" in str(plan)
    assert "3 tensors (432 params) scaled across 4 layers in 1 chain(s); 1 held at factor 1 by unscaled=" in str(plan)
    for name, p in held.named_parameters():
        reference = dict(base.named_parameters() if name.startswith("8.") else plain.named_parameters())[name]
        assert torch.equal(p, reference), name
    with pytest.warns(UserWarning, match=r"^unscaled pattern\(s\) 'head' match no planned tensor of Sequential"):
        EmergenceInit(alpha=1.5, unscaled=["head"]).plan(model())


def test_plan_is_json_serialisable_deterministic_and_printable():
    plan = EmergenceInit(alpha=1.2).plan(_build("t5"))
    again = EmergenceInit(alpha=1.2).plan(_build("t5", seed=5))
    assert plan.to_json() == again.to_json()       # data never enters the plan
    restored = EmergencePlan.from_json(plan.to_json())
    assert restored == plan and json.loads(plan.to_json())["entries"][0]["name"] == plan.entries[0].name
    text = str(plan)
    assert "encoder.block.0" in text and "factor" in text and "alpha=1.2" in text


@pytest.mark.parametrize("name", ["marian", "vit", "resnet", "gpt2"])
def test_meta_device_plan_equals_real_plan(name):
    from accelerate import init_empty_weights

    real = EmergenceInit(alpha=1.2).plan(_build(name))
    with torch.device("meta"):
        meta_model = FACTORIES[name]()
    assert all(p.is_meta for p in meta_model.parameters())
    assert EmergenceInit(alpha=1.2).plan(meta_model) == real
    with init_empty_weights():
        empty = FACTORIES[name]()
    assert EmergenceInit(alpha=1.2).plan(empty) == real


def test_plan_applied_shard_by_shard_equals_whole_model_apply():
    whole = _build("bart")
    plan = EmergenceInit(alpha=1.3, base_init="keep").apply(whole)
    sharded = _build("bart")
    state = sharded.state_dict()
    # two "ranks", each owning half of every planned tensor (row views, as FSDP flat shards would)
    for rank in range(2):
        shard = {n: t.view(-1).chunk(2)[rank] for n, t in state.items() if n in plan}
        plan.apply_to_state_dict_(shard, reinit=False)
    assert all(torch.equal(v, whole.state_dict()[k]) for k, v in sharded.state_dict().items())


def test_second_apply_is_refused_unless_forced():
    model = _build("marian")
    init = EmergenceInit(alpha=1.2, base_init="keep")
    init.apply(model)
    once = model.model.decoder.layers[3].fc2.weight.detach().clone()
    with pytest.raises(AlreadyAppliedError, match="already carries the emergence init.*force=True"):
        init.apply(model)
    init.apply(model, force=True)
    assert torch.allclose(model.model.decoder.layers[3].fc2.weight, once * 1.2 ** 2)


def test_apply_records_settings_on_model_and_config():
    model = _build("vit")
    plan = EmergenceInit(alpha=1.25).apply(model)
    assert model.emergence_plan is plan
    assert model.config.emergence_init["alpha"] == 1.25 and model.config.emergence_init["applied"] is True
    assert EmergenceInit.from_dict(model.config.emergence_init) == EmergenceInit(alpha=1.25)


def test_to_dict_from_dict_round_trip_and_unknown_keys():
    init = EmergenceInit(alpha=1.3, base_init="xavier_normal", scale_mode="variance", even_depth="half", pivot=2,
                         chain="single", attention="all", layer_unit="matrix", exclude=["lm_head"])
    assert EmergenceInit.from_dict(json.loads(json.dumps(init.to_dict()))) == init
    with pytest.warns(UserWarning, match="ignoring unknown emergence_init setting\\(s\\) future_knob"):
        assert EmergenceInit.from_dict({"alpha": 1.3, "future_knob": 1}) == EmergenceInit(alpha=1.3)


def test_settings_written_by_earlier_versions_still_load():
    """config.json files on disk say chain="stacks" (renamed "separate"): they load and report the current name."""
    saved = {"alpha": 1.2, "chain": "stacks", "applied": True, "hf_emergence_version": "0.1.0"}
    assert EmergenceInit.from_dict(saved) == EmergenceInit(alpha=1.2, chain="separate")


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(alpha=0), ValueError, r"alpha=0.0 is invalid: expected a finite number > 0"),
    (dict(alpha=-1.2), ValueError, r"alpha=-1.2 is invalid"),
    (dict(alpha=math.nan), ValueError, r"alpha=nan is invalid"),
    (dict(alpha=math.inf), ValueError, r"alpha=inf is invalid"),
    (dict(alpha="1.2"), TypeError, r"alpha must be a real number, got '1.2' \(str\)"),
    (dict(alpha=True), TypeError, r"alpha must be a real number"),
    (dict(base_init="he"), ValueError, r"base_init='he' is not one of: auto, keep, xavier_uniform"),
    (dict(scale_mode="std"), ValueError, r"scale_mode='std' is not one of: weight, variance"),
    (dict(even_depth="zero"), ValueError, r"even_depth='zero' is not one of: skip0, half, floor"),
    (dict(chain="both"), ValueError, r"chain='both' is not one of: separate, single"),
    (dict(attention="qk"), ValueError, r"attention='qk' is not one of: vo, none, all"),
    (dict(layer_unit="layer"), ValueError, r"layer_unit='layer' is not one of: auto, block, matrix"),
    (dict(pivot=1.5), TypeError, r"pivot must be an integer layer index or None, got 1.5"),
    (dict(exclude=["("]), ValueError, r"exclude pattern '\(' is not a valid regular expression"),
    (dict(unscaled=["("]), ValueError, r"unscaled pattern '\(' is not a valid regular expression"),
    (dict(unscaled=3), TypeError, r"unscaled must be a regular expression or a list of them, got 3 \(int\)"),
    (dict(alhpa=1.2), TypeError, r"unknown option\(s\) 'alhpa'; valid options: alpha, base_init"),
])
def test_bad_settings_are_refused_with_a_clear_message(kwargs, error, match):
    with pytest.raises(error, match=match):
        EmergenceInit(**kwargs)


def test_alpha_below_one_warns():
    with pytest.warns(UserWarning, match="alpha=0.9 < 1 reverses the schedule"):
        EmergenceInit(alpha=0.9)


def test_model_with_fewer_than_two_weight_layers_is_refused():
    with pytest.raises(ValueError, match=r"Linear has 1 weight layer\(s\) to scale and no chain of 2 or more.*needs at least 2"):
        EmergenceInit().apply(nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"has 0 weight layer\(s\)"):
        EmergenceInit().apply(nn.Sequential(nn.ReLU(), nn.LayerNorm(3)))


@pytest.mark.parametrize("name", list(SINGLE_LAYER))
def test_one_rule_for_single_layers_refuses_and_records_nothing(name):
    """One weight layer, or one layer in every chain (ALBERT's shared layer): nothing would be scaled, so it is refused."""
    torch.manual_seed(0)
    model = SINGLE_LAYER[name]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"no chain of 2 or more.*nothing would be scaled.*shared across depth"):
        EmergenceInit(alpha=1.3).apply(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert getattr(getattr(model, "config", model), "emergence_init", None) is None
    assert getattr(model, "emergence_plan", None) is None


def test_a_single_layer_chain_beside_longer_ones_is_noted_and_left_alone():
    class TwoChains(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.ModuleList([nn.Linear(8, 8, bias=False) for _ in range(3)])
            self.head = nn.ModuleList([nn.Linear(8, 8, bias=False)])

    from hf_emergence import Block, Chain, Layout, register_architecture, unregister_architecture
    from hf_emergence.layout import member_for

    model = TwoChains()
    model.config = type("Cfg", (), {"model_type": "two_chains_test", "to_dict": lambda self: {}})()
    layout = Layout([Chain(c, [Block(f"{c}.{i}", [member_for(f"{c}.{i}", m)]) for i, m in enumerate(getattr(model, c))])
                     for c in ("encoder", "head")], layer_unit="block", base_init="keep", source="registry:two_chains_test")
    register_architecture("two_chains_test")(lambda m: layout)
    try:
        with pytest.warns(UserWarning, match="chain 'head' of TwoChains has a single layer"):
            plan = EmergenceInit(alpha=1.3, base_init="keep").apply(model)
    finally:
        unregister_architecture("two_chains_test")
    assert plan.chains == {"encoder": 3, "head": 1} and plan["head.0.weight"].factor == 1.0
    assert any("single layer" in n and "shared across depth" in n for n in plan.notes)


@pytest.mark.parametrize("alpha, dtype, what", [(1e30, torch.float32, "zero"), (1e200, torch.float32, "zero"),
                                                 (300.0, torch.float16, "infinite"), (1e-30, torch.float32, "infinite")])
def test_factors_that_overflow_in_the_dtype_are_refused_by_name(alpha, dtype, what):
    torch.manual_seed(0)
    model = MLP().to(dtype)
    before = [p.clone() for p in model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")              # alpha < 1 warns by design
        init = EmergenceInit(alpha=alpha, base_init="keep")
    with pytest.raises(ValueError, match=rf"^\S+\.weight \(chain 'model', layer \d\) would be multiplied by alpha\*\*-?\d = .*which is {what} in {str(dtype)[6:]}: choose an alpha closer to 1$"):
        init.apply(model)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))   # nothing changed


def test_the_cli_refuses_an_alpha_whose_factors_overflow(tmp_path, capsys):
    from hf_emergence.cli import main

    out = tmp_path / "vit"
    code = main(["init", "--model_type", "vit", "--config_overrides", "num_hidden_layers=3,hidden_size=16,"
                 "num_attention_heads=2,intermediate_size=32,image_size=16,patch_size=4", "--alpha", "1e200",
                 "--output_dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and not out.exists()
    assert "layers.0.attention.v_proj.weight (chain 'encoder', layer 0) would be multiplied by alpha**-1 = 1e-200, " \
           "which is zero in float32" in err[0]


def test_bad_plan_text_is_one_clear_error():
    good = EmergenceInit(alpha=1.2).plan(_build("marian")).to_json()
    for text, match in [("{not json", r"^not an EmergencePlan: invalid JSON at line 1 column 2"),
                        ("[1, 2]", r"^not an EmergencePlan: expected a JSON object, got list$"),
                        ('{"model": "M"}', r"^not an EmergencePlan: missing key\(s\) settings, base_init"),
                        (good.replace('"shape": [', '"shape": ["x", ', 1), r"^not an EmergencePlan: entry 0: bad name or shape"),
                        (good.replace('"fan_in"', '"fan_inn"', 1), r"^not an EmergencePlan: entry 0: .*fan_inn"),
                        (None, r"^not an EmergencePlan: expected JSON text or a path, got NoneType$")]:
        with pytest.raises(ValueError, match=match):
            EmergencePlan.from_json(text)


def test_exclude_of_the_wrong_type_is_a_clear_type_error():
    with pytest.raises(TypeError, match=r"^exclude must be a regular expression or a list of them, got 3 \(int\)$"):
        EmergenceInit(exclude=3)
    with pytest.raises(TypeError, match=r"got \['a', 3\] \(list\)"):
        EmergenceInit(exclude=["a", 3])


def test_pivot_outside_a_chain_is_refused():
    with pytest.raises(ValueError, match=r"cannot plan MarianMTModel: pivot=3 is outside a chain of 3 layers"):
        EmergenceInit(pivot=3).plan(_build("marian"))


def test_apply_refuses_meta_tensors():
    with torch.device("meta"):
        model = FACTORIES["vit"]()
    with pytest.raises(ValueError, match=r"apply\(\) needs real weights, but \d+ parameter\(s\) of ViTForImageClassification are on the meta device"):
        EmergenceInit().apply(model)


@pytest.mark.parametrize("name", REGISTERED)
def test_plan_of_a_zero3_partitioned_model_equals_the_full_one(name):
    """DeepSpeed ZeRO-3 leaves each parameter's data empty and its real shape in ``ds_shape``: the plan must not change."""
    torch.manual_seed(0)
    model = FACTORIES[name]()
    expected = EmergenceInit(alpha=1.3).plan(model).to_json()
    for param in {id(p): p for p in model.parameters()}.values():      # what zero.Init does to every parameter
        param.ds_shape = param.shape
        param.data = torch.empty(0, dtype=param.dtype)
    assert EmergenceInit(alpha=1.3).plan(model).to_json() == expected
