"""hf_emergence.measure: E by hand, units (features, channels, FFN neurons), activation profile, suggest_alpha."""

import copy
import itertools
import json
import math
import random

import pytest
import torch
import torch.nn as nn

from hf_emergence import EmergenceInit
from hf_emergence.measure import activation_profile, emergence, path_count, suggest_alpha
from tiny_models import FACTORIES, MLP


def _linear_net(*weights):
    """Bias-free Linear layers with the given weights, ReLU between them."""
    layers = []
    for i, w in enumerate(weights):
        w = torch.tensor(w, dtype=torch.float32)
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            lin.weight.copy_(w)
        layers += [lin, nn.ReLU()] if i < len(weights) - 1 else [lin]
    return nn.Sequential(*layers)


# Input x = [1, 1]; values after ReLU, active = value > 0.05.
W1 = [[1, 0], [0, 1], [-1, 0], [0.02, 0]]                 # -> [1, 1, 0, 0.02]        n1=4 a1=2
W2 = [[1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0], [-1, 0, 0, 0], [0, 0, 0, 1]]   # -> [1, 1, 2, 0, 0.02]  n2=5 a2=3
W3 = [[1, 0, 0, 0, 0], [0, 0, 0, 1, 0], [0, 0, 1, 0, 0]]  # -> [1, 0, 2]              n3=3 a3=2
W4 = [[1, 0, 0], [0, 0, 1]]                               # -> [1, 2]                 n4=2 a4=2
X = torch.ones(3, 2)


def test_emergence_by_hand_with_inactive_units_in_several_layers():
    score = emergence(_linear_net(W1, W2, W3, W4), X)
    assert [(r["n"], r["a"]) for r in score.per_layer] == [(4, 2), (5, 3), (3, 2), (2, 2)]
    assert [r["k"] for r in score.per_layer] == [-2, -1, 1, 2]
    # E = (4-2)*3*2*2 + (5-3)*2*2 + (3-2)*2 = 24 + 8 + 2 = 34
    assert score.E == 34 and isinstance(score.E, int)
    # E_max = 4*5*3*2 + 5*3*2 + 3*2 = 120 + 30 + 6 = 156; params = 8 + 20 + 15 + 6 = 49
    assert score.E_max == 156 and score.params == 49
    assert score.normalised == pytest.approx(34 / 156)
    assert score.relative == pytest.approx(34 / 49)
    assert score.log10_E == pytest.approx(math.log10(34))
    # threshold 0.01: the 0.02 units count, a1=3 and a2=4: E = (4-3)*4*2*2 + (5-4)*2*2 + (3-2)*2 = 16 + 4 + 2 = 22
    low = emergence(_linear_net(W1, W2, W3, W4), X, threshold=0.01)
    assert [r["a"] for r in low.per_layer] == [3, 4, 2, 2] and low.E == 22


def test_emergence_is_zero_when_the_last_layer_is_inactive():
    score = emergence(_linear_net(W1, W2, W3, [[0, 0, 0], [0, 0, -1]]), X)   # last layer -> [0, -2]: a4 = 0
    assert [r["a"] for r in score.per_layer] == [2, 3, 2, 0]
    assert score.E == 0 and score.log10_E == -math.inf and score.relative == 0.0 and score.normalised == 0.0
    d = json.loads(json.dumps(score.to_dict()))
    assert d["E"] == "0" and d["E_max"] == "156" and d["per_layer"][3] == {"chain": "model", "layer": 3,
                                                                           "block": "6", "k": 2, "n": 2, "a": 0}


def test_all_samples_rule_differs_from_the_batch_mean():
    eye = [[1, 0], [0, 1]]
    batch = torch.tensor([[0.2, 0.2], [0.0, 0.2]])   # unit 0: mean 0.1 > 0.05, but 0 on the second sample
    mean_rule = emergence(_linear_net(eye, eye, eye), batch)
    assert [r["a"] for r in mean_rule.per_layer] == [2, 2, 2] and mean_rule.E == 0      # no inactive unit
    strict = emergence(_linear_net(eye, eye, eye), batch, all_samples=True)
    assert [r["a"] for r in strict.per_layer] == [1, 1, 1] and strict.all_samples
    assert strict.E == (2 - 1) * 1 * 1 + (2 - 1) * 1                                   # = 2


def test_path_count_equals_brute_force_enumeration():
    """The closed form counts paths inactive unit in layer l -> active units in l+1..N (fully connected)."""
    rng = random.Random(0)
    for _ in range(20):
        widths = [rng.randint(1, 4) for _ in range(rng.randint(2, 5))]
        active = [[rng.random() < 0.6 for _ in range(w)] for w in widths]
        brute = 0
        for l in range(len(widths) - 1):
            later = [sum(act) for act in active[l + 1:]]
            for unit in range(widths[l]):
                if not active[l][unit]:
                    brute += sum(1 for _ in itertools.product(*[range(a) for a in later]))
        assert path_count(widths, [sum(a) for a in active]) == brute


def test_big_net_is_exact_and_does_not_overflow():
    torch.manual_seed(0)
    width, depth = 512, 40
    layers = [nn.Linear(width, width, bias=False) for _ in range(depth)]
    with torch.no_grad():
        layers[0].weight.copy_(torch.diag(torch.tensor([1.0] * 256 + [0.0] * 256)))   # half of layer 1 is 0
        layers[1].weight.fill_(1 / 256)                                              # then every unit is 1
        for lin in layers[2:]:
            lin.weight.fill_(1 / width)
    score = emergence(nn.Sequential(*layers), torch.ones(2, width))
    assert [r["a"] for r in score.per_layer] == [256] + [width] * (depth - 1)
    # E = (512 - 256) * 512**39 = 2**8 * 2**351 = 2**359; E_max = sum_{l=1}^{39} 512 * 512**(40-l)
    assert score.E == 2 ** 359 and isinstance(score.E, int)
    assert score.log10_E == pytest.approx(math.log10(score.E)) == pytest.approx(359 * math.log10(2))
    assert score.E_max == sum(width ** (depth - l + 1) for l in range(1, depth))
    assert score.normalised == pytest.approx(2 ** 359 / score.E_max)
    assert score.params == depth * width * width and score.relative == pytest.approx(2 ** 359 / score.params)
    assert int(score.to_dict()["E"]) == score.E and "e108" in str(score)
    json.dumps(score.to_dict())


def test_conv_units_are_channels():
    conv1, conv2 = nn.Conv2d(1, 3, 1, bias=False), nn.Conv2d(3, 2, 1, bias=False)
    with torch.no_grad():
        conv1.weight.copy_(torch.tensor([1.0, -1.0, 0.08]).view(3, 1, 1, 1))
        conv2.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 0, 1.0]]).view(2, 3, 1, 1))
    x = torch.zeros(2, 1, 4, 4)
    x[:, :, :, :2] = 1.0                 # half the positions are 1: channel means 0.5, 0, 0.04 (peak 0.08)
    score = emergence(nn.Sequential(conv1, nn.ReLU(), conv2), x)
    # layer 1: 3 channels, only channel 0 active; layer 2: [x, 0.08 x] -> means 0.5, 0.04: 1 of 2 active
    assert [(r["n"], r["a"]) for r in score.per_layer] == [(3, 1), (2, 1)]
    assert score.E == (3 - 1) * 1                                                        # = 2
    x[1] = 0                             # second sample all zero: channel 0 is active on average only
    strict = emergence(nn.Sequential(conv1, nn.ReLU(), conv2), x, all_samples=True)
    assert [r["a"] for r in strict.per_layer] == [0, 0] and strict.E == 0


def test_transformer_block_units_are_the_ffn_hidden_neurons():
    torch.manual_seed(0)
    ids = torch.randint(3, 64, (2, 7))
    bert = FACTORIES["bert"]()
    score = emergence(bert, {"input_ids": ids})
    assert [(r["layer"], r["n"]) for r in score.per_layer] == [(0, 32), (1, 32), (2, 32)]   # intermediate_size
    rows = activation_profile(bert, {"input_ids": ids}).rows
    assert [r["probe"] for r in rows] == [f"bert.encoder.layer.{i}.intermediate.dense" for i in range(3)]

    marian = FACTORIES["marian"]()
    score = emergence(marian, {"input_ids": ids, "decoder_input_ids": ids})
    assert [(r["chain"], r["n"]) for r in score.per_layer] == [("encoder", 32)] * 3 + [("decoder", 32)] * 4
    per_chain = {c: path_count([r["n"] for r in score.per_layer if r["chain"] == c],
                               [r["a"] for r in score.per_layer if r["chain"] == c]) for c in ("encoder", "decoder")}
    assert score.per_chain == per_chain and score.E == per_chain["encoder"] + per_chain["decoder"]


def test_profile_shows_the_u_shape_and_inverse_gradient_scaling():
    torch.manual_seed(0)
    base = MLP(bias=False)
    scaled = copy.deepcopy(base)
    plan = EmergenceInit(alpha=1.3, base_init="keep").apply(scaled)
    x = torch.randn(32, 12)
    scaled[0].weight.grad = torch.full_like(scaled[0].weight, 7.0)     # a pre-existing grad must survive
    before = {k: v.clone() for k, v in scaled.state_dict().items()}
    scaled.train()
    prof, ref = activation_profile(scaled, x), activation_profile(base, x)

    assert [(r["chain"], r["layer"], r["k"], r["factor"]) for r in prof.rows] == \
        [(r["chain"], r["layer"], r["k"], r["factor"]) for r in plan.layers()]
    assert all(r["factor"] == 1.0 for r in ref.rows)                  # no plan on base: alpha = 1
    factors = [r["factor"] for r in prof.rows]
    cumulative = [math.prod(factors[:i + 1]) for i in range(len(factors))]   # 1.3**-2, 1.3**-3, 1.3**-3, 1.3**-2, 1
    for r, r0, f, c in zip(prof.rows, ref.rows, factors, cumulative):
        assert r["mean_abs"] / r0["mean_abs"] == pytest.approx(c, rel=1e-4)
        assert r["in_abs"] / r0["in_abs"] == pytest.approx(c / f, rel=1e-4)
        assert r["grad_norm"] / r0["grad_norm"] == pytest.approx(1 / f, rel=1e-4)
        assert r["weight_std"] / r0["weight_std"] == pytest.approx(f, rel=1e-5)
    assert min(cumulative) == pytest.approx(plan.min_activation_scale())

    # the model is left as it was: weights, grads (None stays None), training flags
    assert all(torch.equal(v, before[k]) for k, v in scaled.state_dict().items())
    assert torch.equal(scaled[0].weight.grad, torch.full_like(scaled[0].weight, 7.0))
    assert all(p.grad is None for n, p in scaled.named_parameters() if n != "0.weight")
    assert all(m.training for m in scaled.modules())

    text = str(prof)
    for col in ("chain", "layer", "block", "k", "factor", "mean_abs", "in_abs", "active_fraction", "weight_std", "grad_norm"):
        assert col in text.splitlines()[0]
    assert len(text.splitlines()) == 1 + len(plan.layers())
    records = prof.to_records(alpha=1.3)
    assert len(records) == 5 * len(prof.rows) and records[0]["alpha"] == 1.3 and records[0]["stat"] == "mean_abs"
    assert records[0]["value"] == prof.rows[0]["mean_abs"]
    # an explicit plan wins over model.emergence_plan
    assert all(r["factor"] == 1.0 for r in activation_profile(scaled, x, plan=EmergenceInit(alpha=1.0).plan(scaled)).rows)


def test_profile_loss_choices():
    torch.manual_seed(0)
    model, x = MLP(bias=False), torch.randn(8, 12)
    default = activation_profile(model, x).rows
    doubled = activation_profile(model, x, loss_fn=lambda y: (2 * y).pow(2).mean()).rows   # 4x the default loss
    assert [r["grad_norm"] for r in doubled] == pytest.approx([4 * r["grad_norm"] for r in default], rel=1e-5)

    bert = FACTORIES["bert"]()
    batch = {"input_ids": torch.randint(3, 64, (2, 7)), "labels": torch.tensor([0, 2])}
    rows = activation_profile(bert, batch).rows
    ref = copy.deepcopy(bert).eval()
    ref(**batch).loss.backward()                                       # output.loss is the HF model's loss
    assert rows[1]["grad_norm"] == pytest.approx(float(ref.bert.encoder.layer[1].intermediate.dense.weight.grad.norm()),
                                                 rel=1e-4)
    assert all(p.grad is None for p in bert.parameters())


def _bn_net(depth=7, width=16):
    layers = []
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width, bias=False), nn.BatchNorm1d(width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 4, bias=False))


def test_measurements_leave_batchnorm_buffers_and_modes_alone():
    torch.manual_seed(0)
    model = _bn_net()
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    activation_profile(model, torch.randn(16, 16))
    emergence(model, torch.randn(16, 16))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(m.training for m in model.modules())
    with pytest.raises(ValueError, match="bn_stats"):
        emergence(model, torch.randn(16, 16), bn_stats="train")


class _CountingMLP(MLP):
    calls = 0

    def forward(self, x):
        type(self).calls += 1
        return super().forward(x)


def test_suggest_alpha_bounds_the_middle_shrink_of_a_plain_deep_net():
    torch.manual_seed(0)
    model = _CountingMLP(widths=(16,) * 10, bias=False)                 # 9 layers, k = -4..4, no norm layers
    x = torch.randn(64, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _CountingMLP.calls = 0
    alpha = suggest_alpha(model, x, min_scale=0.1, tol=1e-3)
    assert alpha.bound == "input" and alpha.min_active is None            # no norm layers: the input bound alone
    assert _CountingMLP.calls <= 2 + math.ceil(math.log2(1 / 1e-3)) + 1   # alpha=1, alpha_max, bisection (+ trace)

    def shrink(a):
        return EmergenceInit(alpha=a, base_init="keep").plan(model).min_activation_scale()   # a**-10 here

    assert shrink(alpha) >= 0.1 * (1 - 1e-6) and shrink(alpha + 2e-3) < 0.1
    assert alpha == pytest.approx(10 ** 0.1, abs=2e-3)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert getattr(model, "emergence_plan", None) is None and model.training


def test_suggest_alpha_with_batchnorm_returns_alpha_max():
    torch.manual_seed(0)
    model, x = _bn_net(), torch.randn(32, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    alpha = suggest_alpha(model, x, min_scale=0.1, alpha_max=2.0)
    assert alpha == 2.0 and alpha.bound == "alpha_max" and alpha.min_active == 0.5   # a net with norm layers
    # with BatchNorm on fresh running stats (identity) the chain shrinks like a plain one: alpha**-6 >= 0.1
    alpha = suggest_alpha(model, x, min_scale=0.1, bn_stats="running", min_active=None)
    assert alpha == pytest.approx(10 ** (1 / 6), abs=2e-3) and alpha.bound == "input"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kwargs, message", [
    (dict(min_scale=0.0), "min_scale"), (dict(min_scale=1.5), "min_scale"), (dict(alpha_max=1.0), "alpha_max"),
    (dict(alpha_max=float("inf")), "alpha_max"), (dict(tol=0), "tol"), (dict(bn_stats="x"), "bn_stats"),
    (dict(min_active=0.0), "min_active"), (dict(min_active=2), "min_active")])
def test_suggest_alpha_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        suggest_alpha(MLP(bias=False), torch.randn(4, 12), **kwargs)


def test_suggest_alpha_refuses_a_model_that_carries_the_init():
    model = MLP(bias=False)
    EmergenceInit(alpha=1.2, base_init="keep").apply(model)
    with pytest.raises(ValueError, match="already carries the emergence init"):
        suggest_alpha(model, torch.randn(4, 12))


def test_a_layer_that_does_not_run_is_reported():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x, skip_last=False):
            x = self.b(self.a(x))
            return x if skip_last else self.c(x)

    model, x = Skip(), torch.randn(2, 4)
    plan = EmergenceInit(alpha=1.0).plan(model, example_inputs=x)
    with pytest.raises(ValueError, match="'c' did not run"):
        emergence(model, (x, True), plan=plan)


def test_suggest_alpha_min_active_protects_a_pre_layernorm_transformer():
    """Pre-LN blocks see normalised inputs, so the input bound alone allows any alpha while the first FFN dies."""

    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=6, num_attention_heads=2,
                       intermediate_size=64, num_labels=10)
    model = ViTForImageClassification(config).eval()
    EmergenceInit(alpha=1.0, base_init="xavier_uniform").apply(model)     # the base the init would start from
    del model.emergence_plan
    model.config.emergence_init = None
    x = torch.randn(16, 3, 32, 32)
    assert suggest_alpha(model, x, alpha_max=4.0, tol=1e-2, min_active=None) == 4.0     # the input bound alone

    def active(alpha: float) -> list[int]:
        scaled = copy.deepcopy(model)
        EmergenceInit(alpha=alpha, base_init="keep").apply(scaled)
        return [row["a"] for row in emergence(scaled, x).per_layer]

    alpha = suggest_alpha(model, x, alpha_max=4.0, tol=1e-2)             # the default: min_active 0.5 with norm layers
    assert alpha.min_active == 0.5 and alpha.bound == "active"
    assert alpha == suggest_alpha(model, x, alpha_max=4.0, tol=1e-2, min_active=0.5)
    base, at_alpha = active(1.0), active(alpha)
    assert 1.0 < alpha < 4.0
    assert all(a >= 0.5 * b for a, b in zip(at_alpha, base))
    assert any(a < 0.5 * b for a, b in zip(active(4.0), base))           # what stopped it: the first FFN dies


def test_padding_is_left_out_of_neuron_activity():
    """The same two sentences, once exactly as long as the longest and once padded to 9 tokens, measure the same."""
    torch.manual_seed(0)
    bert = FACTORIES["bert"]().eval()
    ids = torch.randint(3, 64, (2, 5))
    ids[1, 3:] = 0                                              # sentence 2 has 3 real tokens
    tight = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    padded_ids = torch.cat([ids, torch.zeros(2, 4, dtype=torch.long)], 1)
    padded = {"input_ids": padded_ids, "attention_mask": (padded_ids != 0).long()}
    plan = EmergenceInit(alpha=1.0, base_init="keep").plan(bert)
    a, b = activation_profile(bert, tight, plan=plan).rows, activation_profile(bert, padded, plan=plan).rows
    for x, y in zip(a, b):
        assert y["mean_abs"] == pytest.approx(x["mean_abs"], rel=1e-4) and y["in_abs"] == pytest.approx(x["in_abs"], rel=1e-4)
        assert y["active_fraction"] == x["active_fraction"]
    assert [r["a"] for r in emergence(bert, padded, plan=plan).per_layer] == \
        [r["a"] for r in emergence(bert, tight, plan=plan).per_layer]
    unmasked = activation_profile(bert, {"input_ids": padded_ids}, plan=plan).rows     # no mask: padding counts
    assert any(u["mean_abs"] != pytest.approx(x["mean_abs"], rel=1e-4) for u, x in zip(unmasked, a))


def test_batchnorm_nets_are_measured_after_the_batchnorm_by_default():
    """What the next layer sees does not change with a layer's own scale; the layer's raw output does."""
    torch.manual_seed(0)
    for model, x in ((_bn_net(), torch.randn(32, 16)), (FACTORIES["cnn"](), torch.randn(8, 3, 16, 16))):
        scaled = copy.deepcopy(model)
        EmergenceInit(alpha=2.0, base_init="keep").apply(scaled, example_inputs=x)
        normalised = [r["a"] for r in emergence(model, x, plan=scaled.emergence_plan).per_layer]
        assert [r["a"] for r in emergence(scaled, x).per_layer][:-1] == normalised[:-1]   # the head has no BatchNorm
        raw = [r["a"] for r in emergence(scaled, x, neurons_at="output").per_layer]
        assert raw[:-1] != [r["a"] for r in emergence(model, x, plan=scaled.emergence_plan, neurons_at="output").per_layer][:-1]
        probe = activation_profile(model, x, plan=scaled.emergence_plan).rows[0]
        layer = model.get_submodule(probe["probe"])
        bn = next(m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
        bn_train = copy.deepcopy(bn).train()
        expected = torch.relu(bn_train(layer(x))).flatten(2).mean(2) if x.dim() == 4 else torch.relu(bn_train(layer(x)))
        assert probe["active_fraction"] == float((expected.double().mean(0) > 0.05).double().mean())
    with pytest.raises(ValueError, match=r"neurons_at='before' is not one of: after_batchnorm, output"):
        emergence(_bn_net(), torch.randn(4, 16), neurons_at="before")
