"""Applying a plan to state dicts and saved checkpoints: once per tensor, under the checkpoint's key names, never silently."""

import copy
import json

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hf_emergence import AlreadyAppliedError, EmergenceInit, already_applied
from hf_emergence.checkpoint import apply_to_checkpoint, checkpoint_key_map
from tiny_models import CONFIGS, FACTORIES


class Shared(nn.Module):
    """A planned weight used by two modules: ``state_dict()`` lists it under two names, over one storage."""

    def __init__(self):
        super().__init__()
        self.first, self.middle, self.last = (nn.Linear(4, 4, bias=False) for _ in range(3))
        self.again = self.first

    def forward(self, x):
        return self.last(self.middle(self.again(self.first(x))))


def _build(name, seed=0):
    torch.manual_seed(seed)
    return FACTORIES[name]()


def test_a_weight_listed_under_two_names_is_scaled_once():
    model = Shared()
    plan = EmergenceInit(alpha=2.0, base_init="keep").plan(model)
    before = model.first.weight.detach().clone()
    state = model.state_dict()
    assert state["first.weight"] is not state["again.weight"]            # two tensor objects, one storage
    done = plan.apply_to_state_dict_(state, reinit=False)
    assert done == ["first.weight", "middle.weight", "last.weight"]
    torch.testing.assert_close(model.first.weight, before * 0.5, rtol=0, atol=0)   # 2**-1 once, not 0.25


def test_two_separate_copies_of_one_planned_weight_are_each_scaled():
    model = Shared()
    plan = EmergenceInit(alpha=2.0, base_init="keep").plan(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}     # e.g. a file that stores both names
    plan.apply_to_state_dict_(state, reinit=False)
    assert torch.equal(state["first.weight"], model.first.weight.detach() * 0.5)
    assert torch.equal(state["again.weight"], model.first.weight.detach() * 0.5)


def test_shards_are_accepted_and_wrong_shapes_refused():
    model = _build("bart")
    plan = EmergenceInit(alpha=1.3, base_init="keep").plan(model)
    state = {n: t.clone() for n, t in model.state_dict().items() if n in plan}
    name = plan.entries[0].name
    rows = {n: t[: t.shape[0] // 2] for n, t in state.items()}          # dim-0 shards (FSDP2)
    flat = {n: t.view(-1)[: t.numel() // 3] for n, t in state.items()}  # flat shards
    assert len(plan.apply_to_state_dict_(rows, reinit=False)) == len(plan)
    assert len(plan.apply_to_state_dict_(flat, reinit=False)) == len(plan)
    bad = dict(state, **{name: torch.zeros(3, 5)})
    untouched = {n: t.clone() for n, t in bad.items()}
    with pytest.raises(ValueError, match=rf"^'{name}' has shape \[3, 5\], but the plan's '{name}' is \[16, 16\]"):
        plan.apply_to_state_dict_(bad, reinit=False)
    assert all(torch.equal(t, untouched[n]) for n, t in bad.items())     # refused before any change
    with pytest.raises(ValueError, match=r"has shape \[512\]"):
        plan.apply_to_state_dict_(dict(state, **{name: torch.zeros(512)}), reinit=False)


def test_a_state_dict_missing_planned_tensors_is_an_error_naming_them():
    model = _build("marian")
    plan = EmergenceInit(alpha=1.3, base_init="keep").plan(model)
    state = {n: t for n, t in model.state_dict().items() if ".decoder." not in n}
    before = {n: t.clone() for n, t in state.items()}
    with pytest.raises(ValueError, match=r"^the state dict matched 18 of the plan's 58 tensors; missing: "
                                         r"model\.decoder\.layers\.0\.self_attn\.q_proj\.weight, .* \(\+35 more\)"):
        plan.apply_to_state_dict_(state, reinit=False)
    assert all(torch.equal(t, before[n]) for n, t in state.items())
    assert len(plan.apply_to_state_dict_(state, reinit=False, partial=True)) == 18   # one file of several
    with pytest.raises(ValueError, match="matched 0 of the plan's 58"):
        plan.apply_to_state_dict_({"unrelated.weight": torch.zeros(2, 2)}, reinit=False)


@pytest.mark.parametrize("name", ["vit", "marian", "gpt2"])
def test_a_saved_checkpoint_scaled_file_by_file_equals_apply_on_the_loaded_model(name, tmp_path):
    """ViT is saved under its 4.x key names: the plan's names are mapped with transformers' own conversion."""
    model = _build(name)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) > 1
    init = EmergenceInit(alpha=1.2, base_init="keep")
    plan = apply_to_checkpoint(tmp_path, init)
    expected = copy.deepcopy(model)
    assert init.apply(expected) == plan
    loader = CONFIGS[name][2]
    loaded = loader.from_pretrained(tmp_path)
    reference = expected.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in loaded.state_dict().items())
    record = json.loads((tmp_path / "config.json").read_text())["emergence_init"]
    assert record["applied"] is True and EmergenceInit.from_dict(record) == init
    assert "weights are the ones it produced" in already_applied(loaded)
    with pytest.raises(AlreadyAppliedError, match="already carries the emergence init"):
        apply_to_checkpoint(tmp_path, init)


def test_checkpoint_key_map_uses_transformers_conversion_for_vit(tmp_path):
    model = _build("vit")
    model.save_pretrained(tmp_path)
    keys = list(safe_open(str(tmp_path / "model.safetensors"), framework="pt").keys())
    mapping = checkpoint_key_map(model, keys)
    assert mapping["vit.encoder.layer.0.attention.attention.value.weight"] == "vit.layers.0.attention.v_proj.weight"
    assert mapping["vit.encoder.layer.4.output.dense.weight"] == "vit.layers.4.mlp.fc2.weight"
    plan = EmergenceInit(alpha=1.2, base_init="keep").plan(model)
    state = load_file(str(tmp_path / "model.safetensors"))
    assert len(plan.apply_to_state_dict_(state, reinit=False, key_map=mapping)) == len(plan)


def test_a_checkpoint_missing_a_planned_tensor_is_refused_before_any_file_changes(tmp_path):
    model = _build("marian")
    model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    state = load_file(str(path))
    del state["model.decoder.layers.3.fc2.weight"]
    save_file(state, str(path), metadata={"format": "pt"})
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"matched 57 of the plan's 58 tensors; missing: model\.decoder\.layers\.3\.fc2\.weight"):
        apply_to_checkpoint(tmp_path, EmergenceInit(alpha=1.2, base_init="keep"))
    assert path.read_bytes() == before
    assert "emergence_init" not in json.loads((tmp_path / "config.json").read_text())
