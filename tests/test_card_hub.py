"""Model cards and pushing a saved folder to the Hub, offline: the Hub API object is a recording fake."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub.errors import LocalTokenNotFoundError
from huggingface_hub.utils import filter_repo_objects
from transformers import AutoConfig, AutoModelForSeq2SeqLM

from hf_emergence import from_config
from hf_emergence.card import model_card
from hf_emergence.cli import main
from hf_emergence.hub import HubError, files_to_upload, push_folder

MARIAN = dict(d_model=16, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
              encoder_attention_heads=2, decoder_attention_heads=2, vocab_size=64, decoder_vocab_size=64,
              max_position_embeddings=64, pad_token_id=1, eos_token_id=2, bos_token_id=0, decoder_start_token_id=1)
SHARED = ["README.md", "all_results.json", "config.json", "generation_config.json", "model.safetensors",
          "source.spm", "special_tokens_map.json", "target.spm", "tokenizer_config.json", "vocab.json"]
LOCAL_ONLY = ["checkpoints/latest", "checkpoints/step_00000010/optimizer.bin", "checkpoints/step_00000010/train_state.json",
              "checkpoints/step_00000010/model.safetensors", "metrics.jsonl", "optimizer.pt", "scheduler.pt",
              "random_states_0.pkl", "train.log"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return from_config(AutoModelForSeq2SeqLM, AutoConfig.for_model("marian", **MARIAN), alpha=1.25)


def _card(model, **kwargs):
    defaults = dict(title="marian de->en (emergence init)", model_class=type(model).__name__,
                    settings=model.config.emergence_init, plan=model.emergence_plan, auto_class="AutoModelForSeq2SeqLM")
    return model_card(**{**defaults, **kwargs})


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


# ------------------------------------------------------------------------------------------------ card
def test_card_metadata_settings_plan_usage_and_citation(model):
    card = _card(model, task="translation", datasets=("multi30k",), metrics={"bleu": 31.2, "chrf": 55.0, "loss": 2.1},
                 training={"learning_rate": 0.001, "seed": 42, "max_train_steps": None}, example="translation")
    meta = _front_matter(card)
    assert meta["library_name"] == "transformers" and meta["license"] == "apache-2.0"
    assert "emergence-init" in meta["tags"] and "hf-emergence" in meta["tags"]
    assert meta["pipeline_tag"] == "translation" and meta["datasets"] == ["multi30k"]
    assert sorted(meta["metrics"]) == ["chrf", "sacrebleu"]
    for key, value in model.config.emergence_init.items():          # every setting, in a table
        assert (f"| `{key}` | `{value}` |" in card) == (key != "fingerprint"), key
    rows = [l for l in card.splitlines() if l.startswith("| encoder |") or l.startswith("| decoder |")]
    assert len(rows) == len(model.emergence_plan.layers()) == 4
    assert "| encoder | 0 | `model.encoder.layers.0` | -1 | 0.8000 |" in card
    assert "| bleu | 31.2 |" in card and "| `learning_rate` | `0.001` |" in card and "max_train_steps" not in card
    assert "arXiv 2407.19044" in card and "journal = {arXiv preprint arXiv:2407.19044}" in card
    assert 'AutoModelForSeq2SeqLM.from_pretrained("<this repo or folder>")' in card
    assert "accelerate launch examples/translation/run.py --model_name_or_path" in card


def test_card_usage_snippet_loads_the_saved_folder_with_stock_transformers(model, tmp_path):
    model.save_pretrained(tmp_path)
    card = _card(model)
    code = card.split("```python\n")[1].split("```")[0].replace("<this repo or folder>", str(tmp_path))
    namespace: dict = {}
    exec(code, namespace)
    loaded = namespace["model"]
    assert type(loaded) is type(model)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_baseline_card_has_no_emergence_tag_or_settings(model):
    card = model_card(title="baseline", model_class="MarianMTModel", settings=None, auto_class="AutoModelForSeq2SeqLM")
    meta = _front_matter(card)
    assert "emergence-init" not in meta["tags"] and "baseline-init" in meta["tags"]
    assert "## Initialisation" not in card and "standard initialisation" in card and "arXiv:2407.19044" in card


# -------------------------------------------------------------------------------------------- the push
def _checkpoint_folder(model, root: Path) -> Path:
    """A folder as the example scripts leave it: the shareable files plus local training state."""
    folder = root / "run"
    model.save_pretrained(folder)
    (folder / "README.md").write_text(_card(model))
    for name in ("tokenizer_config.json", "special_tokens_map.json", "vocab.json", "all_results.json"):
        (folder / name).write_text(json.dumps({"name": name}))
    for name in ("source.spm", "target.spm"):
        (folder / name).write_bytes(b"\x00sentencepiece")
    for rel in LOCAL_ONLY:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(rel.encode())
    return folder


def _hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


class FakeApi:
    """Records create_repo / upload_folder and resolves what upload_folder would send, as huggingface_hub does."""

    def __init__(self, fail_on=None, error=None):
        self.calls, self.uploaded, self.fail_on, self.error = [], {}, fail_on, error

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        if self.fail_on == "create_repo":
            raise self.error
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, *, folder_path, repo_id, allow_patterns=None, ignore_patterns=None, **kwargs):
        self.calls.append(("upload_folder", repo_id, dict(kwargs, allow_patterns=allow_patterns)))
        if self.fail_on == "upload_folder":
            raise self.error
        root = Path(folder_path)
        files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
        for rel in filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            self.uploaded[rel] = (root / rel).read_bytes()
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()


def test_push_uploads_exactly_the_shareable_files_and_our_card(model, tmp_path):
    folder = _checkpoint_folder(model, tmp_path)
    before = _hashes(folder)
    api = FakeApi()
    url = push_folder(folder, "me/marian-emergence", token="hf_x", private=True, api=api)
    assert url == "https://huggingface.co/me/marian-emergence/commit/abc"
    assert api.calls[0] == ("create_repo", "me/marian-emergence", {"private": True, "exist_ok": True, "token": "hf_x"})
    assert sorted(api.uploaded) == SHARED == files_to_upload(folder)
    assert not any(rel in api.uploaded for rel in LOCAL_ONLY)
    assert api.uploaded["README.md"].decode() == _card(model)          # our card, not transformers' generic one
    config = json.loads(api.uploaded["config.json"])
    assert config["emergence_init"] == model.config.emergence_init and config["emergence_init"]["applied"] is True
    assert api.uploaded["model.safetensors"] == (folder / "model.safetensors").read_bytes()
    assert _hashes(folder) == before


@pytest.mark.parametrize("fail_on,error,message", [
    ("create_repo", LocalTokenNotFoundError("Token is required (`token=True`), but no token found."),
     "no Hugging Face token: run `hf auth login` or pass --hub_token / set HF_TOKEN"),
    ("upload_folder", ConnectionError("Failed to resolve 'huggingface.co'\n([Errno -3] Temporary failure)"),
     "cannot push to 'me/m' (ConnectionError: Failed to resolve 'huggingface.co')"),
])
def test_push_failures_are_one_line_and_leave_local_files_unchanged(model, tmp_path, fail_on, error, message):
    folder = _checkpoint_folder(model, tmp_path)
    before = _hashes(folder)
    with pytest.raises(HubError) as info:
        push_folder(folder, "me/m", api=FakeApi(fail_on=fail_on, error=error))
    text = str(info.value)
    assert "\n" not in text and message in text and f"the model is saved locally in {folder}" in text
    assert _hashes(folder) == before


def test_push_refuses_a_folder_without_a_model_and_a_bad_repo_id(tmp_path, model):
    with pytest.raises(HubError, match="is not a saved model folder"):
        push_folder(tmp_path, "me/m", api=FakeApi())
    folder = _checkpoint_folder(model, tmp_path)
    with pytest.raises(HubError, match="invalid --hub_model_id"):
        push_folder(folder, "a/b/c", api=FakeApi())


def test_cli_init_push_to_hub_uploads_the_card_and_keeps_the_model_on_failure(tmp_path, capsys, monkeypatch):
    import huggingface_hub

    api = FakeApi()
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: api)
    overrides = ",".join(f"{k}={v}" for k, v in MARIAN.items())
    argv = ["init", "--model_type", "marian", "--config_overrides", overrides, "--auto_class", "AutoModelForSeq2SeqLM",
            "--alpha", "1.2", "--push_to_hub", "--hub_model_id", "me/marian-emergence", "--private"]
    assert main([*argv, "--output_dir", str(tmp_path / "ok")]) == 0, capsys.readouterr().err
    assert "pushed to the Hub: https://huggingface.co/me/marian-emergence/commit/abc" in capsys.readouterr().out
    assert sorted(api.uploaded) == ["README.md", "config.json", "generation_config.json", "model.safetensors"]
    assert api.uploaded["README.md"] == (tmp_path / "ok" / "README.md").read_bytes()
    assert json.loads(api.uploaded["config.json"])["emergence_init"]["alpha"] == 1.2

    api.fail_on, api.error = "create_repo", LocalTokenNotFoundError("no token")
    assert main([*argv, "--output_dir", str(tmp_path / "no_token")]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no Hugging Face token")
    assert (tmp_path / "no_token" / "model.safetensors").is_file() and (tmp_path / "no_token" / "README.md").is_file()
