"""``hf-emergence init``: build a model with the init inside transformers' construction, save it with a model card,
optionally push it to the Hub."""

from __future__ import annotations

import argparse
import fnmatch
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from ..loading import first_line, load_config, model_class
from ..plan import PlanError
from .shared import BUILD_ERRORS, CLIError, add_command, add_setting_flags, add_source_args, seed, settings_from_args

#: Auto classes tried, in this order, to name the loader of a concrete class in the model card.
CARD_AUTO_CLASSES = ("AutoModelForSeq2SeqLM", "AutoModelForCausalLM", "AutoModelForImageClassification",
                     "AutoModelForSequenceClassification", "AutoModelForMaskedLM", "AutoModelForTokenClassification",
                     "AutoModelForQuestionAnswering", "AutoModelForSpeechSeq2Seq", "AutoModelForCTC", "AutoModel")
#: Tokenizer / processor files copied next to the model when ``init --config`` names a folder that holds them.
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "*.model", "*.spm", "*.tiktoken", "chat_template.jinja",
                   "preprocessor_config.json", "processor_config.json", "image_processor_config.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


HELP = "build a model with the init and save it (model card included), optionally push it"
DESCRIPTION = """\
Build a model from --model_type or --config with the emergence init applied inside transformers' construction,
save_pretrained it to --output_dir with a model card (README.md), and optionally push the folder to the Hub. The
checkpoint loads with stock transformers from_pretrained.
"""


def add_parser(sub: Any, formatter_class: type) -> None:
    p = add_command(sub, "init", run, help=HELP, description=DESCRIPTION, formatter_class=formatter_class)
    add_source_args(p, checkpoint=False)
    add_setting_flags(p)
    g = p.add_argument_group("output")
    g.add_argument("--output_dir", required=True, help="folder to save to (created if missing)")
    g.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --output_dir that is not a model folder (its other files are kept)")
    g.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="parameter dtype (default: float32)")
    g.add_argument("--push_to_hub", action="store_true", help="upload the saved folder to the Hub (needs --hub_model_id)")
    g.add_argument("--hub_model_id", default=None, help="repo id, 'name' or 'user/name'")
    g.add_argument("--private", action="store_true", help="create the Hub repo as private")
    g.add_argument("--hub_token", default=None, help="Hub token (default: the saved login or HF_TOKEN)")


def run(args: argparse.Namespace) -> None:
    from ..card import model_card
    from ..hub import push_folder
    from ..modeling import from_config

    settings_from_args(args)                          # bad setting values fail before anything is loaded
    out = Path(args.output_dir)
    check_output_dir(out, args.overwrite)
    if args.push_to_hub:
        if not args.hub_model_id:
            raise CLIError("--push_to_hub needs --hub_model_id (e.g. your-name/marian-emergence)")
        if not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", args.hub_model_id):
            raise CLIError(f"--hub_model_id {args.hub_model_id!r} is not a repo id ('name' or 'user/name')")
    elif args.hub_model_id or args.private or args.hub_token:
        raise CLIError("--hub_model_id / --private / --hub_token only make sense with --push_to_hub")
    config = load_config(model_type=args.model_type, config=args.config, overrides=args.config_overrides)
    concrete = model_class(args.auto_class, config)
    spec = getattr(config, "emergence_init", None)   # a saved checkpoint's config: its settings are the template
    init = settings_from_args(args, recorded=spec if isinstance(spec, dict) else None)
    seed(args.seed)
    kwargs = {"dtype": DTYPES[args.dtype]} if args.dtype else {}
    try:
        model = from_config(concrete, config, init, **kwargs)
    except PlanError as err:          # the config builds; the init refuses it (e.g. no chain of 2 or more layers)
        raise CLIError(first_line(err)) from None
    except BUILD_ERRORS as err:
        raise CLIError(f"cannot build {concrete.__name__} from this config: {type(err).__name__}: {first_line(err)}") from None
    plan = model.emergence_plan

    replacing = (out / "config.json").is_file()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    copied = copy_processor_files(Path(args.config), out) if args.config else []
    loader = loader_name(concrete, model.config)
    settings = model.config.emergence_init
    title = f"{getattr(model.config, 'model_type', concrete.__name__)} with the emergence init (alpha={settings['alpha']})"
    card = model_card(title=title, model_class=concrete.__name__, settings=settings, plan=plan, auto_class=loader,
                      example=example_for(concrete, model.config))
    (out / "README.md").write_text(card, encoding="utf-8")

    print(plan)
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    print(f"{'replaced the model in' if replacing else 'saved to'} {out}: {', '.join(files)}"
          + (f" (tokenizer/processor files copied from {args.config}: {', '.join(copied)})" if copied else ""))
    print(f"load it with: from transformers import {loader}; {loader}.from_pretrained({str(out)!r})")
    if args.push_to_hub:
        url = push_folder(out, args.hub_model_id, token=args.hub_token, private=args.private)
        print(f"pushed to the Hub: {url}")


def check_output_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise CLIError(f"--output_dir {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file() and not overwrite:
        raise CLIError(f"--output_dir {out} is not empty and holds no model (config.json); "
                       "pass --overwrite to write into it anyway")


def copy_processor_files(source: Path, out: Path) -> list[str]:
    """Copy tokenizer / processor files from a ``--config`` folder, so the saved model is usable as it is."""
    folder = source if source.is_dir() else source.parent
    if not source.is_dir() and source.name != "config.json":
        return []
    if folder.resolve() == out.resolve():
        return []
    copied = []
    for path in sorted(folder.iterdir()):
        if path.is_file() and any(fnmatch.fnmatch(path.name, pat) for pat in PROCESSOR_FILES):
            shutil.copy2(path, out / path.name)
            copied.append(path.name)
    return copied


def loader_name(concrete: type, config: Any) -> str:
    """The class to name in ``X.from_pretrained(...)``: the first Auto class that maps ``config`` to ``concrete``."""
    import transformers

    for name in CARD_AUTO_CLASSES:
        auto = getattr(transformers, name, None)
        try:
            if auto is not None and auto._model_mapping[type(config)] is concrete:
                return name
        except (KeyError, AttributeError, ValueError):
            continue
    return concrete.__name__


def example_for(concrete: type, config: Any) -> Optional[str]:
    """The example script that continues training this class, if any."""
    import transformers

    for auto_name, example in (("AutoModelForSeq2SeqLM", "translation"), ("AutoModelForImageClassification", "vision")):
        try:
            found = getattr(transformers, auto_name)._model_mapping[type(config)]
        except (KeyError, AttributeError, ValueError):
            continue
        if concrete is found or (isinstance(found, (tuple, list)) and concrete in found):
            return example
    return None
