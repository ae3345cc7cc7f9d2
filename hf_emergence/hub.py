"""Pushing a saved checkpoint folder (weights, config, tokenizer, our model card) to the Hugging Face Hub.

``PreTrainedModel.push_to_hub`` writes a generic card in place of ours, so the folder is uploaded as
it is with ``HfApi.upload_folder``. Nothing local is modified or deleted, whatever happens.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

#: Files a checkpoint folder shares; training state (optimizer, RNG, metrics) stays local.
UPLOAD_PATTERNS = ["*.safetensors", "*.json", "README.md", "*.model", "*.spm", "*.txt", "*.tiktoken", "*.jinja"]
IGNORE_PATTERNS = ["checkpoints/**", "optimizer*", "scheduler*", "random_states*", "metrics.jsonl", "*.tmp/**"]


class HubError(RuntimeError):
    """A push that could not happen, with one line saying why (no token, no network, no access)."""


def files_to_upload(folder: str | os.PathLike) -> list[str]:
    """Relative paths of the files :func:`push_folder` uploads from ``folder`` (sorted)."""
    from fnmatch import fnmatch

    root = Path(folder)
    out = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if any(fnmatch(rel, pat) for pat in IGNORE_PATTERNS):
            continue
        if "/" not in rel and any(fnmatch(rel, pat) for pat in UPLOAD_PATTERNS):
            out.append(rel)
    return out


def push_folder(folder: str | os.PathLike, repo_id: str, *, token: Optional[str] = None, private: bool = False,
                commit_message: str = "Upload emergence-initialised model", api: Optional[object] = None) -> str:
    """Create ``repo_id`` if needed and upload the checkpoint files of ``folder``; returns the commit URL.

    Raises :class:`HubError` with a one-line reason when there is no token, no network or no access.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise HubError(f"{folder} is not a saved model folder (no config.json); run save_pretrained first")
    if not repo_id or repo_id.count("/") > 1:
        raise HubError(f"invalid --hub_model_id {repo_id!r}: expected 'name' or 'user/name'")
    files = files_to_upload(folder)
    api = api or HfApi(token=token)
    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True, token=token)
        commit = api.upload_folder(folder_path=str(folder), repo_id=getattr(repo, "repo_id", repo_id), token=token,
                                   allow_patterns=files, commit_message=commit_message)
    except LocalTokenNotFoundError:
        raise HubError("no Hugging Face token: run `hf auth login` or pass --hub_token / set HF_TOKEN; "
                       f"the model is saved locally in {folder}") from None
    except HfHubHTTPError as err:
        raise HubError(f"the Hub refused the upload to {repo_id!r} ({str(err).splitlines()[0]}); "
                       f"the model is saved locally in {folder}") from None
    except Exception as err:  # network layer errors (ConnectError, timeouts) have no common base with OSError
        raise HubError(f"cannot push to {repo_id!r} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                       f"the model is saved locally in {folder}") from None
    return str(getattr(commit, "commit_url", commit))
