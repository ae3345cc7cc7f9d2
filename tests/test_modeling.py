"""The from_config hook and the mixin: the init runs inside transformers' construction and travels with the checkpoint."""

import copy
import json
import os

import pytest
import torch
from transformers import AutoConfig, MarianConfig, MarianMTModel, PreTrainedModel

from hf_emergence.base_init import base_std
from hf_emergence import AlreadyAppliedError, EmergenceInit, EmergenceInitMixin, already_applied, from_config
from tiny_models import CONFIGS, MLP, REGISTERED, hf_class, hf_config

HF_ROWS = REGISTERED + ["gpt2", "bert"]


def _explicit(name, init, seed=0):
    torch.manual_seed(seed)
    model = hf_class(name)._from_config(hf_config(name))
    init.apply(model)
    return model


@pytest.mark.parametrize("name", HF_ROWS)
def test_hook_with_keep_equals_explicit_apply_and_returns_the_stock_class(name):
    init = EmergenceInit(alpha=1.3, base_init="keep")
    torch.manual_seed(0)
    hooked = from_config(CONFIGS[name][2], hf_config(name), init)
    assert type(hooked) is hf_class(name)                      # stock class, not a subclass
    explicit = _explicit(name, init)
    assert hooked.emergence_plan == explicit.emergence_plan
    for (k, a), (_, b) in zip(hooked.state_dict().items(), explicit.state_dict().items()):
        assert torch.equal(a, b), k


def _transformers_draws(monkeypatch):
    """Ids of the tensors that transformers' init functions really write (the guarded ones skip flagged tensors)."""
    from transformers import initialization

    written = set()
    for fn_name, fn in list(initialization.TORCH_INIT_FUNCTIONS.items()):
        def spy(tensor, *args, _fn=fn, **kwargs):
            written.add(id(tensor))
            return _fn(tensor, *args, **kwargs)
        monkeypatch.setitem(initialization.TORCH_INIT_FUNCTIONS, fn_name, spy)
    return written


@pytest.mark.parametrize("name", HF_ROWS)
def test_hook_with_a_redraw_draws_each_planned_tensor_once(name, monkeypatch):
    """transformers' init skips the tensors the plan re-draws and initialises every other one as a stock build does."""
    init = EmergenceInit(alpha=1.3)
    written = _transformers_draws(monkeypatch)
    torch.manual_seed(0)
    hooked = from_config(CONFIGS[name][2], hf_config(name), init)
    plan = hooked.emergence_plan
    assert type(hooked) is hf_class(name) and plan == _explicit(name, init).emergence_plan
    params = dict(hooked.named_parameters())
    redrawn = {id(params[e.name]) for e in plan} if plan.base_init != "keep" else set()
    assert not redrawn & written                               # drawn once: by the base init only
    written.clear()
    torch.manual_seed(0)
    stock = hf_class(name)._from_config(hf_config(name))
    stock_params = dict(stock.named_parameters())
    assert {id(stock_params[e.name]) for e in plan} <= written or not redrawn   # the spy sees transformers' draws
    torch.manual_seed(1)
    other_seed = hf_class(name)._from_config(hf_config(name)).state_dict()
    planned = set(plan.factors())
    for key, value in hooked.state_dict().items():
        reference = stock.state_dict()[key]
        if key in planned:
            if plan.base_init != "keep":
                entry = plan[key]
                expected = base_std(plan.base_init, entry.fan_in, entry.fan_out) * entry.factor
                assert float(value.double().std()) == pytest.approx(expected, rel=0.35), key
        elif torch.equal(reference, other_seed[key]):          # a deterministic init (ones, zeros, sinusoids)
            assert torch.equal(value, reference), key
        elif reference.numel() > 1:                            # a random one: the same distribution as stock
            assert float(value.double().std()) == pytest.approx(float(reference.double().std()), rel=0.35), key
    torch.manual_seed(0)
    again = from_config(CONFIGS[name][2], hf_config(name), init)
    assert all(torch.equal(a, b) for a, b in zip(hooked.state_dict().values(), again.state_dict().values()))


def test_hook_with_alpha_one_and_keep_equals_stock_from_config():
    """The throw-away mixin subclass keeps transformers' init RNG path (T5 differs for custom code)."""
    torch.manual_seed(0)
    stock = hf_class("t5")._from_config(hf_config("t5"))
    torch.manual_seed(0)
    hooked = from_config(CONFIGS["t5"][2], hf_config("t5"), alpha=1.0, base_init="keep")
    assert all(torch.equal(a, b) for a, b in zip(stock.state_dict().values(), hooked.state_dict().values()))


@pytest.mark.parametrize("name", ["marian", "t5", "vit", "deit", "resnet", "convnext", "gpt2"])
def test_save_and_load_with_stock_transformers_is_bit_identical(name, tmp_path):
    torch.manual_seed(0)
    model = from_config(CONFIGS[name][2], hf_config(name), alpha=1.4)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["emergence_init"]["alpha"] == 1.4 and saved["emergence_init"]["applied"] is True
    assert saved["architectures"] == [hf_class(name).__name__]
    loaded = CONFIGS[name][2].from_pretrained(tmp_path) if name != "deit" else hf_class(name).from_pretrained(tmp_path)
    assert type(loaded) is hf_class(name)
    assert loaded.config.emergence_init == model.config.emergence_init
    reference = model.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, reference[k]), k
    with pytest.raises(AlreadyAppliedError, match="already carries the emergence init"):
        EmergenceInit(alpha=1.4).apply(loaded)


def test_config_settings_round_trip_and_rebuild_from_saved_config(tmp_path):
    torch.manual_seed(0)
    model = from_config(CONFIGS["vit"][2], hf_config("vit"), alpha=1.3, attention="all", layer_unit="matrix")
    model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert EmergenceInit.from_dict(config.emergence_init) == EmergenceInit(alpha=1.3, attention="all", layer_unit="matrix")
    torch.manual_seed(0)
    rebuilt = from_config(CONFIGS["vit"][2], config)          # no settings given: those in the config are used
    assert rebuilt.emergence_plan == model.emergence_plan
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), model.state_dict().values()))


class TinyMarian(EmergenceInitMixin, MarianMTModel):
    """A user's own PreTrainedModel subclass that opts into the init through its config."""


def test_mixin_applies_when_built_from_config_and_never_on_load(tmp_path):
    config = hf_config("marian")
    config.emergence_init = EmergenceInit(alpha=1.5, base_init="keep").to_dict()
    torch.manual_seed(0)
    reference = type("Plain", (MarianMTModel,), {})(hf_config("marian")).state_dict()   # same (custom-code) init path
    torch.manual_seed(0)
    model = TinyMarian(config)
    factors = model.emergence_plan.factors()
    assert len(factors) > 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, reference[k] * factors.get(k, 1.0)), k
    model.save_pretrained(tmp_path)
    for loader in (TinyMarian, MarianMTModel):
        loaded = loader.from_pretrained(tmp_path)
        assert getattr(loaded, "emergence_plan", None) is None        # the mixin did not run on meta
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


@pytest.mark.parametrize("base_init", ["keep", "auto"])
@pytest.mark.parametrize("call", ["init_weights", "post_init"])
def test_mixin_leaves_loaded_weights_alone_when_init_weights_runs_again(base_init, call, tmp_path):
    """A loaded checkpoint that carries the init is neither rescaled (alpha**k twice) nor re-drawn by a later
    ``init_weights()`` / ``post_init()``, while a fresh build from its saved config still gets the init."""
    config = hf_config("marian")
    config.emergence_init = EmergenceInit(alpha=1.5, base_init=base_init).to_dict()
    torch.manual_seed(0)
    TinyMarian(config).save_pretrained(tmp_path)
    loaded = TinyMarian.from_pretrained(tmp_path)
    saved = {k: v.clone() for k, v in loaded.state_dict().items()}
    getattr(loaded, call)()
    assert getattr(loaded, "emergence_plan", None) is None
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, saved[k]), k
    torch.manual_seed(1)
    fresh = TinyMarian(AutoConfig.from_pretrained(tmp_path))
    assert fresh.emergence_plan is not None and not torch.equal(fresh.state_dict()[k], saved[k])


def test_mixin_without_settings_is_a_plain_model():
    torch.manual_seed(0)
    plain = type("Plain", (MarianMTModel,), {})(hf_config("marian"))
    torch.manual_seed(0)
    model = TinyMarian(hf_config("marian"))
    assert getattr(model, "emergence_plan", None) is None
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), model.state_dict().values()))


def test_mixin_skips_meta_construction():
    config = hf_config("marian")
    config.emergence_init = EmergenceInit(alpha=1.5).to_dict()
    with torch.device("meta"):
        model = TinyMarian(config)
    assert getattr(model, "emergence_plan", None) is None


def test_from_config_argument_errors():
    with pytest.raises(TypeError, match="pass either init= or setting keywords \\(alpha\\), not both"):
        from_config(CONFIGS["vit"][2], hf_config("vit"), EmergenceInit(), alpha=1.2)
    with pytest.raises(ValueError, match="AutoModelForImageClassification has no model for MarianConfig"):
        from_config(CONFIGS["vit"][2], hf_config("marian"), alpha=1.2)
    with pytest.raises(TypeError, match="model_class must be an Auto class or a PreTrainedModel subclass"):
        from_config(dict, hf_config("vit"))
    with pytest.raises(ValueError, match="alpha=-1.0 is invalid"):
        from_config(CONFIGS["vit"][2], hf_config("vit"), alpha=-1)


def test_from_config_leaves_the_callers_config_alone_and_passes_model_kwargs():
    config = hf_config("vit")
    model = from_config(CONFIGS["vit"][2], config, alpha=1.2, attn_implementation="eager")
    assert not hasattr(config, "emergence_init")
    assert model.config._attn_implementation == "eager"


def _saved(tmp_path, name="vit"):
    torch.manual_seed(0)
    model = from_config(CONFIGS[name][2], hf_config(name), alpha=1.3)
    model.save_pretrained(tmp_path)
    return model


def _loader(model):
    return type(model)


def _load_state_into_fresh_build(model, tmp_path):
    """A stock build from the checkpoint's config (fresh weights, the record says applied), then its saved state dict."""
    torch.save(model.state_dict(), tmp_path / "state.pt")
    fresh = _loader(model)._from_config(AutoConfig.from_pretrained(tmp_path))
    fresh.load_state_dict(torch.load(tmp_path / "state.pt"))
    return fresh


GUARD_ROUTES = {
    "deepcopy": lambda model, path: copy.deepcopy(model),
    "half of a copy": lambda model, path: copy.deepcopy(model).half(),
    "bfloat16 copy of the loaded checkpoint": lambda model, path: _loader(model).from_pretrained(path).to(torch.bfloat16),
    "from_config + load_state_dict": _load_state_into_fresh_build,
    "from_pretrained": lambda model, path: _loader(model).from_pretrained(path),
    "deepcopy of from_pretrained": lambda model, path: copy.deepcopy(_loader(model).from_pretrained(path)),
}


@pytest.mark.parametrize("name", ["vit", "gpt2"])           # registered, and known only to the fallback
@pytest.mark.parametrize("route", list(GUARD_ROUTES))
def test_weights_that_carry_the_init_are_refused_on_every_route(route, name, tmp_path):
    model = _saved(tmp_path, name)
    again = GUARD_ROUTES[route](model, tmp_path)
    assert already_applied(again)
    before = {k: v.clone() for k, v in again.state_dict().items()}
    with pytest.raises(AlreadyAppliedError, match="already carries the emergence init.*force=True"):
        EmergenceInit(alpha=1.3).apply(again)
    assert all(torch.equal(v, before[k]) for k, v in again.state_dict().items())   # refused before any change


def test_a_fresh_build_from_a_saved_config_does_not_count_as_applied(tmp_path):
    _saved(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.emergence_init["applied"] is True                  # the record travels with the config ...
    fresh = CONFIGS["vit"][2].from_config(config)
    assert already_applied(fresh) is None                            # ... but these are new weights
    plan = EmergenceInit(alpha=1.3).apply(fresh)
    assert fresh.config.emergence_init["fingerprint"] != AutoConfig.from_pretrained(tmp_path).emergence_init["fingerprint"]
    assert plan.chains == {"encoder": 5}


def test_a_checkpoint_trained_after_the_init_still_counts_as_applied(tmp_path):
    model = _saved(tmp_path)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)                                             # "training": the fingerprint no longer matches
    model.save_pretrained(tmp_path)
    loaded = CONFIGS["vit"][2].from_pretrained(tmp_path)
    assert "loaded from a checkpoint" in already_applied(loaded)


def test_records_of_version_0_1_without_fingerprint_still_guard_loaded_checkpoints(tmp_path):
    model = _saved(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["emergence_init"]["fingerprint"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert "loaded from a checkpoint" in already_applied(CONFIGS["vit"][2].from_pretrained(tmp_path))


@pytest.mark.parametrize("route", ["deepcopy", "half of a copy"])
def test_plain_modules_keep_the_guard_through_copies(route):
    torch.manual_seed(0)
    model = MLP()
    EmergenceInit(alpha=1.3).apply(model)
    again = GUARD_ROUTES[route](model, None)
    with pytest.raises(AlreadyAppliedError):
        EmergenceInit(alpha=1.3).apply(again)
    again.emergence_plan = None                                      # without the plan, the record's fingerprint decides
    assert "weights are the ones it produced" in already_applied(again)


def test_from_config_on_a_class_that_already_uses_the_mixin():
    torch.manual_seed(0)
    model = from_config(TinyMarian, hf_config("marian"), alpha=1.2, base_init="keep")
    assert type(model) is TinyMarian and model.emergence_plan.chains == {"encoder": 3, "decoder": 4}


@pytest.mark.parametrize("context", ["meta device", "init_empty_weights"])
def test_from_config_without_real_weights_warns_and_records_nothing(context):
    from accelerate import init_empty_weights

    from hf_emergence.card import model_card

    config = hf_config("vit")
    with pytest.warns(UserWarning, match="was built without real weights.*not applied.*records nothing new"):
        with torch.device("meta") if context == "meta device" else init_empty_weights():
            model = from_config(CONFIGS["vit"][2], config, alpha=1.3)
    assert getattr(model, "emergence_plan", None) is None
    assert getattr(model.config, "emergence_init", None) is None           # no claim the init was applied
    card = model_card(title="t", model_class="ViTForImageClassification", settings=getattr(model.config, "emergence_init", None))
    assert "baseline-init" in card and "emergence-init" not in card


def test_the_card_claims_the_init_only_when_the_record_says_applied():
    from hf_emergence.card import model_card

    requested = EmergenceInit(alpha=1.3).to_dict()                           # settings that were never applied
    card = model_card(title="t", model_class="ViTForImageClassification", settings=requested)
    assert "baseline-init" in card and "alpha" not in card
    torch.manual_seed(0)
    model = from_config(CONFIGS["vit"][2], hf_config("vit"), alpha=1.3)
    card = model_card(title="t", model_class="ViTForImageClassification", settings=model.config.emergence_init,
                      plan=model.emergence_plan)
    assert "emergence-init" in card and "| `alpha` | `1.3` |" in card and "fingerprint" not in card
