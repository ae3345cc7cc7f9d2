"""The ``hf-emergence`` command line (also ``python -m hf_emergence``).

    hf-emergence init    --model_type marian --config_overrides "d_model=256,encoder_layers=6" \\
                         --auto_class AutoModelForSeq2SeqLM --alpha 1.2 --output_dir marian-emergence
    hf-emergence inspect --config marian-emergence/config.json --alpha 1.2 [--json]
    hf-emergence inspect --model marian-emergence [--json]
    hf-emergence measure --model marian-emergence [--inputs batch.safetensors] [--json]

``init`` builds a model from a model type or a local config with the init applied inside transformers'
construction (:func:`hf_emergence.from_config`), saves it with ``save_pretrained`` plus a model card,
and optionally pushes the folder to the Hub. ``inspect`` prints the plan and the measured weight std
of every layer before and after the scaling. ``measure`` reports the emergence E and the activation
profile of a saved checkpoint on a batch.

Bad arguments give one line ``error: ...`` on stderr and exit code 2; a failed Hub push exits with 4
(the model stays saved locally); anything unexpected exits with 1 (set ``HF_EMERGENCE_DEBUG=1`` for
the traceback). Nothing here downloads anything: every path is local.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import json
import math
import os
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch

from ._text import format_k, text_table
from .config_overrides import ConfigOverrideError, apply_config_overrides
from .emergence_init import METADATA_KEYS, SETTING_CHOICES, SETTING_NAMES, EmergenceInit

PROG = "hf-emergence"
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_HUB = 0, 1, 2, 4
#: Auto classes tried, in this order, to name the loader of a concrete class in the model card.
CARD_AUTO_CLASSES = ("AutoModelForSeq2SeqLM", "AutoModelForCausalLM", "AutoModelForImageClassification",
                     "AutoModelForSequenceClassification", "AutoModelForMaskedLM", "AutoModelForTokenClassification",
                     "AutoModelForQuestionAnswering", "AutoModelForSpeechSeq2Seq", "AutoModelForCTC", "AutoModel")
#: Tokenizer / processor files copied next to the model when ``init --config`` names a folder that holds them.
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "*.model", "*.spm", "*.tiktoken", "chat_template.jinja",
                   "preprocessor_config.json", "processor_config.json", "image_processor_config.json")
#: What a model constructor raises for config values it cannot build (bad sizes, ids out of range): exit code 2.
BUILD_ERRORS = (TypeError, ValueError, RuntimeError, AssertionError, IndexError, KeyError, AttributeError)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CLIError(Exception):
    """A bad argument or input: printed as one line ``error: ...``, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) that the caller turns into exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CLIError(f"{self.prog}: {message} (see {self.prog} --help)")


# ------------------------------------------------------------------------------------------- arguments
def _setting_help() -> dict[str, str]:
    """Per-setting help, read from the ``Args:`` section of ``EmergenceInit``'s docstring."""
    doc = EmergenceInit.__doc__ or ""
    helps: dict[str, str] = {}
    current = None
    for line in doc.split("Args:", 1)[-1].splitlines():
        m = re.match(r"^\s{8}(\w+): (.*)$", line)
        if m and m.group(1) in SETTING_NAMES:
            current = m.group(1)
            helps[current] = m.group(2).strip()
        elif current and line.strip():
            helps[current] += " " + line.strip()
        elif current and not line.strip():
            current = None
    return {k: v.replace("``", "").replace("%", "%%") for k, v in helps.items()}


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ``EmergenceInit`` field (derived from ``dataclasses.fields``, so they cannot drift).

    Every flag defaults to ``None`` = not given: the library default (or, for ``init --config`` of a
    saved checkpoint, the setting recorded in its config) is used.
    """
    helps = _setting_help()
    g = parser.add_argument_group("emergence init settings (unset: the library default, see EmergenceInit)")
    for f in dataclasses.fields(EmergenceInit):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        kwargs: dict[str, Any] = {"dest": f.name, "default": None,
                                  "help": f"{helps.get(f.name, '')} (default: {default})".strip()}
        annotation = str(f.type)
        if f.name in SETTING_CHOICES:
            kwargs["choices"] = SETTING_CHOICES[f.name]
        elif annotation.startswith("list"):
            kwargs.update(nargs="+", metavar="REGEX")
        elif annotation == "float":
            kwargs.update(type=float, metavar="X")
        elif annotation in ("int", "Optional[int]"):
            kwargs.update(type=int, metavar="N")
        elif annotation == "str":
            kwargs.update(type=str)
        else:  # pragma: no cover - a new EmergenceInit field with a type the CLI does not know yet
            raise TypeError(f"no command-line type for EmergenceInit.{f.name}: {annotation}")
        g.add_argument(f"--{f.name}", **kwargs)


def _add_source_args(parser: argparse.ArgumentParser, *, checkpoint: bool) -> None:
    g = parser.add_argument_group("model (local files only; nothing is downloaded)")
    source = g.add_mutually_exclusive_group(required=True)
    source.add_argument("--model_type", help="a transformers model type, built with AutoConfig.for_model (e.g. marian, vit)")
    source.add_argument("--config", help="a config.json, or a folder holding one (e.g. a saved checkpoint)")
    if checkpoint:
        source.add_argument("--model", help="a saved checkpoint folder (config.json + weights): its own weights")
    g.add_argument("--config_overrides", default=None,
                   help='comma-separated config changes, e.g. "d_model=256,encoder_layers=6" or "hidden_sizes=[32,64]"')
    g.add_argument("--auto_class", default=None,
                   help="transformers class to build/load: an Auto class (AutoModel, AutoModelForSeq2SeqLM, "
                        "AutoModelForImageClassification, AutoModelForCausalLM, ...) or a model class name; default: "
                        "the config's architectures[0] if set, else AutoModel")
    g.add_argument("--seed", type=int, default=42, help="seed for transformers' init and the base init draws (default: 42)")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog=PROG, description="Emergence-promoting initialisation (arXiv 2407.19044) for Hugging Face "
                     "models: make, inspect and measure initialised checkpoints.", formatter_class=fmt,
                     epilog="Run `hf-emergence <command> --help` for the options of each command. "
                            "Exit codes: 0 ok, 2 bad arguments, 4 Hub push failed (model kept locally), 1 unexpected error.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"hf-emergence {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{init,inspect,measure}", required=True, parser_class=_Parser)

    p = sub.add_parser("init", help="build a model with the init and save it (model card included), optionally push it",
                       description="Build a model from --model_type or --config with the emergence init applied inside "
                                   "transformers' construction, save_pretrained it to --output_dir with a model card "
                                   "(README.md), and optionally push the folder to the Hub. The checkpoint loads with "
                                   "stock transformers from_pretrained.", formatter_class=fmt)
    _add_source_args(p, checkpoint=False)
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
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("inspect", help="print the plan and the weight std of each layer before/after the scaling",
                       description="Print the plan (layer, k, factor, #params) for a model type, a config or a local "
                                   "checkpoint, with the weight std of every layer measured before and after the scaling "
                                   "(the model is built on CPU and each planned tensor is drawn and scaled on a copy; "
                                   "with the same --seed these are exactly the weights `init` saves). A checkpoint that "
                                   "already carries the init shows its recorded settings and its weights' std.",
                       formatter_class=fmt)
    _add_source_args(p, checkpoint=True)
    add_setting_flags(p)
    g = p.add_argument_group("output")
    g.add_argument("--plan_only", action="store_true",
                   help="build on the meta device and skip the std columns (no memory, any model size)")
    g.add_argument("--json", action="store_true", help="print JSON (plan.to_dict() plus per-layer and per-tensor stds)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("measure", help="emergence E and activation profile of a local checkpoint on a batch",
                       description="Load a local checkpoint and report the emergence E (hf_emergence.measure.emergence) "
                                   "and the per-layer activation profile (activation_profile) on one batch. The batch is "
                                   "--inputs FILE (a .safetensors or .pt dict of tensors, passed as keyword arguments to "
                                   "the model), or by default random inputs built from the config: pixel_values ~ N(0, 1) "
                                   "of shape (batch_size, num_channels, image_size, image_size) for vision models; "
                                   "input_ids uniform in [0, vocab_size) of shape (batch_size, seq_len) with an all-ones "
                                   "attention_mask (plus random decoder_input_ids for encoder-decoders) for text models; "
                                   "drawn from a generator seeded with --seed. --save_inputs keeps the batch used.",
                       formatter_class=fmt)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", required=True, help="a saved checkpoint folder (config.json + weights)")
    g.add_argument("--auto_class", default=None, help="class to load with (default: the config's architectures[0])")
    g.add_argument("--inputs", default=None, help="a .safetensors or .pt file holding a dict of input tensors")
    g.add_argument("--batch_size", type=int, default=8, help="random inputs: batch size (default: 8)")
    g.add_argument("--seq_len", type=int, default=None, help="random text inputs: length (default: min(16, max positions))")
    g.add_argument("--image_size", type=int, default=None, help="random image inputs: side (default: config.image_size, else 224)")
    g.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default: 0)")
    g.add_argument("--save_inputs", default=None, help="write the batch used to this .safetensors file")
    g = p.add_argument_group("measurement")
    g.add_argument("--threshold", type=float, default=0.05, help="a neuron is active above this mean activation (default: 0.05)")
    g.add_argument("--all_samples", action="store_true", help="active only if every sample exceeds the threshold")
    g.add_argument("--layers", default="recorded", choices=("recorded", "default"),
                   help="which layers are measured: 'recorded' (default) plans them with the settings recorded in the "
                        "checkpoint's config.emergence_init, as model.emergence_plan does right after the init; "
                        "'default' uses the library's default layering (what emergence(model, batch) does for a model "
                        "with no plan), e.g. to compare checkpoints initialised with different chain/layer_unit settings. "
                        "Identical unless the init used non-default chain, layer_unit, attention or exclude settings.")
    g.add_argument("--bn_stats", default="batch", choices=("batch", "running"), help="BatchNorm statistics while measuring")
    g.add_argument("--no_profile", action="store_true", help="only E (skips the forward+backward of the profile)")
    g.add_argument("--json", action="store_true", help="print JSON (emergence, profile, inputs)")
    p.set_defaults(func=cmd_measure)
    return parser


# ---------------------------------------------------------------------------------------------- entry
def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 unexpected error, 2 bad arguments, 4 Hub push failed)."""
    from .hub import HubError

    with _cli_environment():
        try:
            args = build_parser().parse_args(list(argv) if argv is not None else None)
            _quiet_transformers()
            args.func(args)
        except SystemExit as exc:  # --help / --version
            return int(exc.code or 0) if isinstance(exc.code, (int, type(None))) else EXIT_USAGE
        except CLIError as err:
            _error(str(err))
            return EXIT_USAGE
        except HubError as err:
            _error(str(err))
            return EXIT_HUB
        except KeyboardInterrupt:
            _error("interrupted")
            return 130
        except BrokenPipeError:  # `hf-emergence inspect ... | head`: the reader left; say nothing more
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_ERROR
        except Exception as err:
            if os.environ.get("HF_EMERGENCE_DEBUG"):
                raise
            _error(f"unexpected {type(err).__name__}: {_first_line(err)} (set HF_EMERGENCE_DEBUG=1 for the traceback)")
            return EXIT_ERROR
    return EXIT_OK


def _error(message: str) -> None:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)


def _first_line(err: BaseException, limit: int = 300) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def _cli_environment() -> Iterator[None]:
    """Warnings as one line ``warning: ...`` on stderr; transformers' verbosity restored afterwards."""
    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        print(f"warning: {' '.join(str(message).split())}", file=sys.stderr)

    saved_show = warnings.showwarning
    saved_verbosity = saved_bars = None
    warnings.showwarning = show
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            if "transformers" in sys.modules:
                tf_logging = sys.modules["transformers"].logging
                saved_verbosity, saved_bars = tf_logging.get_verbosity(), tf_logging.is_progress_bar_enabled()
            yield
    finally:
        warnings.showwarning = saved_show
        if "transformers" in sys.modules:
            tf_logging = sys.modules["transformers"].logging
            tf_logging.set_verbosity(saved_verbosity if saved_verbosity is not None else tf_logging.WARNING)
            if saved_bars is None or saved_bars:
                tf_logging.enable_progress_bar()


def _quiet_transformers() -> None:
    """No info logs or progress bars on stderr from transformers (our own output is the report)."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


# ------------------------------------------------------------------------------------- shared helpers
def settings_from_args(args: argparse.Namespace, recorded: Optional[dict[str, Any]] = None) -> EmergenceInit:
    """The flags given on the command line over ``recorded`` settings (a saved config's) over the defaults."""
    merged = {k: v for k, v in (recorded or {}).items() if k in SETTING_NAMES}
    merged.update({k: getattr(args, k) for k in SETTING_NAMES if getattr(args, k, None) is not None})
    try:
        return EmergenceInit(**merged)
    except (TypeError, ValueError) as err:
        raise CLIError(_first_line(err)) from None


def _given_settings(args: argparse.Namespace) -> list[str]:
    return [k for k in SETTING_NAMES if getattr(args, k, None) is not None]


def load_config(args: argparse.Namespace) -> Any:
    """The config of ``--model_type`` or ``--config``, with ``--config_overrides`` applied."""
    from transformers import AutoConfig

    if getattr(args, "model_type", None):
        from transformers import CONFIG_MAPPING

        if args.model_type not in CONFIG_MAPPING:
            close = difflib.get_close_matches(args.model_type, list(CONFIG_MAPPING.keys()), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else " (see transformers.CONFIG_MAPPING)"
            raise CLIError(f"--model_type {args.model_type!r} is not a transformers model type{hint}")
        config = AutoConfig.for_model(args.model_type)
    else:
        path = Path(args.config)
        if not path.exists():
            raise CLIError(f"--config {args.config}: no such file or folder")
        if path.is_dir() and not (path / "config.json").is_file():
            raise CLIError(f"--config {args.config}: the folder holds no config.json")
        try:
            config = AutoConfig.from_pretrained(str(path))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CLIError(f"--config {args.config}: not a transformers config ({_first_line(err, 200)})") from None
    try:
        return apply_config_overrides(config, args.config_overrides)
    except ConfigOverrideError as err:
        raise CLIError(str(err)) from None


def model_class(name: Optional[str], config: Any, flag: str = "--auto_class") -> type:
    """The concrete ``PreTrainedModel`` class for ``name`` (an Auto class or a model class) and ``config``."""
    import transformers
    from transformers import PreTrainedModel

    from .modeling import resolve_model_class

    if name is None:
        for arch in getattr(config, "architectures", None) or ():
            cls = getattr(transformers, arch, None)
            if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
                return cls
        name = "AutoModel"
    obj = getattr(transformers, name, None) if re.fullmatch(r"[A-Za-z_]\w*", name) else None
    is_auto = obj is not None and hasattr(obj, "_model_mapping")
    is_model = isinstance(obj, type) and issubclass(obj, PreTrainedModel)
    if not (is_auto or is_model):
        known = [n for n in dir(transformers) if n.startswith("AutoModel")]
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else " (e.g. AutoModel, AutoModelForSeq2SeqLM)"
        raise CLIError(f"{flag} {name!r} is not a transformers Auto class or model class{hint}")
    if is_model:
        expected = getattr(obj, "config_class", None)
        if isinstance(expected, type) and not isinstance(config, expected):
            raise CLIError(f"{flag} {name} expects a {expected.__name__}, but the config is a {type(config).__name__}")
        return obj
    try:
        return resolve_model_class(obj, config)
    except (TypeError, ValueError) as err:
        raise CLIError(f"{flag}: {_first_line(err)}") from None


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


def _example_for(concrete: type, config: Any) -> Optional[str]:
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


def _seed(seed: int) -> None:
    from transformers import set_seed

    set_seed(seed)


def load_checkpoint(path_arg: str, auto_class: Optional[str], flag: str = "--model") -> tuple[Any, Any]:
    """(model, config) of a local checkpoint folder, loaded with stock ``from_pretrained`` on CPU."""
    from transformers import AutoConfig

    path = Path(path_arg)
    if not path.exists():
        raise CLIError(f"{flag} {path_arg}: no such folder")
    if not path.is_dir():
        raise CLIError(f"{flag} {path_arg}: expected a checkpoint folder (config.json + model.safetensors), got a file")
    if not (path / "config.json").is_file():
        raise CLIError(f"{flag} {path_arg}: the folder holds no config.json (not a saved model)")
    if not any(path.glob("*.safetensors")) and not any(path.glob("pytorch_model*.bin")):
        raise CLIError(f"{flag} {path_arg}: the folder holds no weights (*.safetensors)")
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CLIError(f"{flag} {path_arg}: config.json is not a transformers config ({_first_line(err, 200)})") from None
    cls = model_class(auto_class, config)
    try:
        model, info = cls.from_pretrained(str(path), output_loading_info=True)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise CLIError(f"{flag} {path_arg}: cannot load it as {cls.__name__} ({_first_line(err, 200)})") from None
    missing = list(info.get("missing_keys", ()))
    if missing:
        warnings.warn(f"{len(missing)} weight(s) missing from {path_arg} were freshly initialised by {cls.__name__} "
                      f"(e.g. {missing[0]}); is --auto_class right?")
    model.eval()
    return model, model.config


def _meta_from_checkpoint(path_arg: str, auto_class: Optional[str]) -> tuple[Any, Any]:
    """(model on the meta device, config) of a checkpoint folder, from its config.json alone."""
    from transformers import AutoConfig

    path = Path(path_arg)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise CLIError(f"--model {path_arg}: not a checkpoint folder with a config.json")
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CLIError(f"--model {path_arg}: config.json is not a transformers config ({_first_line(err, 200)})") from None
    cls = model_class(auto_class, config)
    with torch.device("meta"):
        return cls._from_config(config), config


def recorded_settings(config: Any) -> Optional[dict[str, Any]]:
    """``config.emergence_init`` if it records an applied init, else ``None``."""
    spec = getattr(config, "emergence_init", None)
    return dict(spec) if isinstance(spec, dict) and spec.get("applied") else None


def _plan(init: EmergenceInit, model: Any, example_inputs: Any = None) -> Any:
    try:
        return init.plan(model, example_inputs=example_inputs)
    except (TypeError, ValueError) as err:
        raise CLIError(_first_line(err)) from None


def _jsonable(obj: Any) -> Any:
    """Strict JSON: NaN / inf become null, tuples lists, tensors lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    return obj


def _print_json(obj: Any) -> None:
    print(json.dumps(_jsonable(obj), indent=2, allow_nan=False))


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


# ----------------------------------------------------------------------------------------------- init
def cmd_init(args: argparse.Namespace) -> None:
    from .card import model_card
    from .hub import push_folder
    from .modeling import from_config

    settings_from_args(args)                          # bad setting values fail before anything is loaded
    out = Path(args.output_dir)
    _check_output_dir(out, args.overwrite)
    if args.push_to_hub:
        if not args.hub_model_id:
            raise CLIError("--push_to_hub needs --hub_model_id (e.g. your-name/marian-emergence)")
        if not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", args.hub_model_id):
            raise CLIError(f"--hub_model_id {args.hub_model_id!r} is not a repo id ('name' or 'user/name')")
    elif args.hub_model_id or args.private or args.hub_token:
        raise CLIError("--hub_model_id / --private / --hub_token only make sense with --push_to_hub")
    config = load_config(args)
    concrete = model_class(args.auto_class, config)
    spec = getattr(config, "emergence_init", None)   # a saved checkpoint's config: its settings are the template
    init = settings_from_args(args, recorded=spec if isinstance(spec, dict) else None)
    _seed(args.seed)
    kwargs = {"dtype": DTYPES[args.dtype]} if args.dtype else {}
    try:
        model = from_config(concrete, config, init, **kwargs)
    except BUILD_ERRORS as err:
        raise CLIError(f"cannot build {concrete.__name__} from this config: {type(err).__name__}: {_first_line(err)}") from None
    plan = model.emergence_plan

    replacing = (out / "config.json").is_file()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    copied = _copy_processor_files(Path(args.config), out) if getattr(args, "config", None) else []
    loader = loader_name(concrete, model.config)
    settings = model.config.emergence_init
    title = f"{getattr(model.config, 'model_type', concrete.__name__)} with the emergence init (alpha={settings['alpha']})"
    card = model_card(title=title, model_class=concrete.__name__, settings=settings, plan=plan, auto_class=loader,
                      example=_example_for(concrete, model.config))
    (out / "README.md").write_text(card, encoding="utf-8")

    print(plan)
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    print(f"{'replaced the model in' if replacing else 'saved to'} {out}: {', '.join(files)}"
          + (f" (tokenizer/processor files copied from {args.config}: {', '.join(copied)})" if copied else ""))
    print(f"load it with: from transformers import {loader}; {loader}.from_pretrained({str(out)!r})")
    if args.push_to_hub:
        url = push_folder(out, args.hub_model_id, token=args.hub_token, private=args.private)
        print(f"pushed to the Hub: {url}")


def _check_output_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise CLIError(f"--output_dir {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file() and not overwrite:
        raise CLIError(f"--output_dir {out} is not empty and holds no model (config.json); "
                       "pass --overwrite to write into it anyway")


def _copy_processor_files(source: Path, out: Path) -> list[str]:
    """Copy tokenizer / processor files from a ``--config`` folder, so the saved model is usable as it is."""
    import fnmatch

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


# -------------------------------------------------------------------------------------------- inspect
def cmd_inspect(args: argparse.Namespace) -> None:
    settings_from_args(args)                          # bad setting values fail before anything is loaded
    recorded = None
    if args.model:
        if args.config_overrides:
            raise CLIError("--config_overrides cannot change a saved checkpoint (--model); use --config instead")
        if args.plan_only:  # names and shapes are enough: build from its config on the meta device
            model, config = _meta_from_checkpoint(args.model, args.auto_class)
        else:
            model, config = load_checkpoint(args.model, args.auto_class)
        recorded = recorded_settings(config)
        source = f"checkpoint {args.model}"
    else:
        config = load_config(args)
        concrete = model_class(args.auto_class, config)
        _seed(args.seed)
        try:
            if args.plan_only:
                with torch.device("meta"):
                    model = concrete._from_config(config)
            else:
                model = concrete._from_config(config)
        except BUILD_ERRORS as err:
            raise CLIError(f"cannot build {concrete.__name__} from this config: {type(err).__name__}: {_first_line(err)}") from None
        source = f"model_type {config.model_type}" if args.model_type else f"config {args.config}"
    notes = []
    if recorded is not None:
        init = EmergenceInit.from_dict(recorded)
        if _given_settings(args):
            notes.append(f"ignored --{', --'.join(_given_settings(args))}: the plan shown is the one recorded in the checkpoint")
    else:  # like `init`: flags over the settings a --config may carry (a checkpoint's, as a template)
        spec = getattr(config, "emergence_init", None)
        init = settings_from_args(args, recorded=spec if isinstance(spec, dict) else None)
    plan = _plan(init, model)

    rows = [dict(r) for r in plan.layers()]
    tensors: list[dict[str, Any]] = []
    if args.plan_only:
        pass
    elif recorded is not None:
        tensors, per_layer = _stds_now(model, plan)
        for r in rows:
            r["std"] = per_layer.get((r["chain"], r["layer"]))
    else:
        if args.model and plan.base_init != "keep":
            notes.append(f"base_init={plan.base_init} re-draws these weights before scaling them; "
                         "--base_init keep scales the checkpoint's own weights")
        built = not args.model and plan.base_init != "keep"
        _seed(args.seed)                              # the draws of a non-keep base init
        if built:  # from_config draws each planned tensor once, after transformers' init: build exactly as `init` does
            from .modeling import from_config

            model = from_config(concrete, config, init)
        tensors, per_layer = _stds_before_after(model, plan, built=built)
        for r in rows:
            before, after = per_layer.get((r["chain"], r["layer"]), (None, None))
            r["std_before"], r["std_after"] = before, after
            r["std_ratio"] = after / before if before else None

    if args.json:
        _print_json({"model": type(model).__name__, "source": source, "seed": args.seed,
                     "already_applied": recorded is not None, "recorded_settings": recorded,
                     "plan": plan.to_dict(), "layers": rows, "tensors": tensors, "notes": notes})
        return
    if recorded is not None:
        meta = {k: recorded[k] for k in METADATA_KEYS if k in recorded}
        print(f"{args.model} already carries the emergence init (recorded in config.emergence_init"
              f"{', hf_emergence ' + str(meta['hf_emergence_version']) if 'hf_emergence_version' in meta else ''}); "
              "its settings:")
        for k in SETTING_NAMES:
            print(f"  {k} = {recorded.get(k)!r}")
    text = str(plan).splitlines()
    head, tail = text[0], text[2 + len(rows):]
    print(f"{head} [{source}]")
    cols = ["chain", "layer", "block", "k", "factor", "tensors", "params"]
    extra = [] if args.plan_only else (["std"] if recorded is not None else ["std_before", "std_after", "std_ratio"])
    print(text_table(cols + extra, [[_fmt(r[c]) if c != "k" else format_k(r[c]) for c in cols + extra] for r in rows]))
    for line in tail:
        print(line)
    for note in notes:
        print(f"note: {note}")
    if not args.plan_only and recorded is None:
        print(f"std_before: weight std after the base init ({plan.base_init}), std_after: after the scaling "
              f"(measured on copies, seed {args.seed}); std over each layer's scaled tensors")


class _Moments:
    """Running count / sum / sum of squares in float64, for the std of several tensors together."""

    def __init__(self) -> None:
        self.n, self.s, self.ss = 0, 0.0, 0.0

    def add(self, t: torch.Tensor) -> None:
        t = t.detach().double()
        self.n += t.numel()
        self.s += float(t.sum())
        self.ss += float((t * t).sum())

    def std(self) -> Optional[float]:
        if self.n < 2:
            return None
        return math.sqrt(max(0.0, (self.ss - self.s * self.s / self.n) / (self.n - 1)))


def _tensor_std(t: torch.Tensor) -> Optional[float]:
    return float(t.detach().double().std()) if t.numel() > 1 else None


@torch.no_grad()
def _stds_before_after(model: Any, plan: Any, built: bool = False) -> tuple[list[dict[str, Any]], dict[tuple[str, int], tuple]]:
    """Draw and scale every planned tensor on a copy, in plan order, exactly as ``EmergenceInit.apply`` does
    (``built``: ``model`` already carries the init; its weights divided by the factors are the base draws)."""
    params = dict(model.named_parameters())
    tensors, layers = [], {}
    for entry in plan:
        t = params[entry.name].detach().clone()
        if built:
            t.div_(entry.factor)                                                    # back to the base draw
        else:
            plan.apply_entry_(dataclasses.replace(entry, factor=1.0), t, reinit=True)   # the base init only
        before = _tensor_std(t)
        if entry.layer is not None:
            layers.setdefault((entry.chain, entry.layer), (_Moments(), _Moments()))[0].add(t)
        plan.apply_entry_(entry, t, reinit=False)                                   # the scaling only
        after = _tensor_std(t)
        if entry.layer is not None:
            layers[(entry.chain, entry.layer)][1].add(t)
        tensors.append({"name": entry.name, "chain": entry.chain, "layer": entry.layer, "role": entry.role,
                        "k": entry.k, "factor": entry.factor, "std_before": before, "std_after": after})
    return tensors, {key: (b.std(), a.std()) for key, (b, a) in layers.items()}


@torch.no_grad()
def _stds_now(model: Any, plan: Any) -> tuple[list[dict[str, Any]], dict[tuple[str, int], Optional[float]]]:
    params = dict(model.named_parameters())
    tensors, layers = [], {}
    for entry in plan:
        t = params[entry.name]
        if entry.layer is not None:
            layers.setdefault((entry.chain, entry.layer), _Moments()).add(t)
        tensors.append({"name": entry.name, "chain": entry.chain, "layer": entry.layer, "role": entry.role,
                        "k": entry.k, "factor": entry.factor, "std": _tensor_std(t)})
    return tensors, {key: m.std() for key, m in layers.items()}


# -------------------------------------------------------------------------------------------- measure
def cmd_measure(args: argparse.Namespace) -> None:
    from .measure import activation_profile, emergence

    if args.batch_size < 1:
        raise CLIError(f"--batch_size must be >= 1, got {args.batch_size}")
    if not (math.isfinite(args.threshold)):
        raise CLIError(f"--threshold must be a finite number, got {args.threshold}")
    if args.inputs and (args.seq_len is not None or args.image_size is not None):
        raise CLIError("--seq_len / --image_size shape random inputs; they cannot be combined with --inputs")
    if args.save_inputs and not args.save_inputs.endswith(".safetensors"):
        raise CLIError(f"--save_inputs {args.save_inputs}: expected a .safetensors file name")
    model, config = load_checkpoint(args.model, args.auto_class)
    if args.inputs:
        batch = load_inputs(args.inputs, model)
        described = f"inputs from {args.inputs}"
    else:
        batch = random_inputs(model, config, batch_size=args.batch_size, seq_len=args.seq_len,
                              image_size=args.image_size, seed=args.seed)
        described = f"random inputs (seed {args.seed})"
    shapes = {k: list(v.shape) for k, v in batch.items()}
    if args.save_inputs:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in batch.items()}, args.save_inputs)
    recorded = recorded_settings(config)
    plan = _plan(EmergenceInit.from_dict(recorded), model, batch) if recorded and args.layers == "recorded" else None
    try:
        score = emergence(model, batch, threshold=args.threshold, all_samples=args.all_samples, plan=plan,
                          bn_stats=args.bn_stats)
        profile = None if args.no_profile else activation_profile(model, batch, plan=plan, threshold=args.threshold,
                                                                 bn_stats=args.bn_stats)
    except (TypeError, ValueError, RuntimeError, IndexError) as err:
        raise CLIError(f"the forward pass of {type(model).__name__} on {described} failed: "
                       f"{type(err).__name__}: {_first_line(err, 200)}") from None
    if args.json:
        _print_json({"model": type(model).__name__, "checkpoint": args.model, "already_applied": recorded is not None,
                     "layers": "recorded" if plan is not None else "default",
                     "inputs": {"source": args.inputs or "random", "seed": None if args.inputs else args.seed,
                                "shapes": shapes},
                     "emergence": score.to_dict(), "profile": profile.rows if profile is not None else None})
        return
    print(f"{type(model).__name__} from {args.model} "
          f"({'carries the emergence init, alpha=' + str(recorded['alpha']) if recorded else 'no emergence init recorded'}); "
          f"{described}: " + ", ".join(f"{k} {tuple(v)}" for k, v in shapes.items()))
    print(score)
    if profile is not None:
        print()
        print("activation profile:")
        print(profile)


def load_inputs(path_arg: str, model: Any) -> dict[str, torch.Tensor]:
    """A dict of tensors from a .safetensors or .pt file (a bare tensor is the model's main input)."""
    path = Path(path_arg)
    if not path.is_file():
        raise CLIError(f"--inputs {path_arg}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path))
        elif path.suffix in (".pt", ".pth", ".bin"):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        else:
            raise CLIError(f"--inputs {path_arg}: expected a .safetensors or .pt file")
    except CLIError:
        raise
    except Exception as err:  # corrupt or foreign files: safetensors, pickle and zip errors share no base class
        raise CLIError(f"--inputs {path_arg}: cannot read it ({type(err).__name__}: {_first_line(err, 200)})") from None
    if isinstance(obj, torch.Tensor):
        obj = {getattr(model, "main_input_name", "input_ids"): obj}
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                        for k, v in obj.items()):
        raise CLIError(f"--inputs {path_arg}: expected a dict of named tensors (e.g. input_ids, pixel_values)")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in obj.items()}


def random_inputs(model: Any, config: Any, *, batch_size: int, seq_len: Optional[int], image_size: Optional[int],
                  seed: int) -> dict[str, torch.Tensor]:
    """The default batch of ``measure`` (see its --help): N(0, 1) pixels or uniform token ids, seeded."""
    g = torch.Generator().manual_seed(seed)
    main = getattr(model, "main_input_name", None)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if main == "pixel_values":
        size = image_size or getattr(config, "image_size", None) or 224
        h, w = (size, size) if isinstance(size, int) else tuple(size)[:2]
        channels = getattr(config, "num_channels", None) or 3
        return {"pixel_values": torch.randn(batch_size, channels, h, w, generator=g).to(dtype)}
    if main == "input_ids":
        vocab = getattr(config, "vocab_size", None)
        if not vocab:
            raise CLIError(f"{type(model).__name__}: the config has no vocab_size to draw random token ids from; pass --inputs")
        limit = next((getattr(config, k) for k in ("max_position_embeddings", "n_positions", "max_seq_length")
                      if isinstance(getattr(config, k, None), int) and getattr(config, k) > 0), None)
        length = seq_len if seq_len is not None else min(16, limit or 16)
        if length < 1 or (limit is not None and length > limit):
            raise CLIError(f"--seq_len {length} is outside 1..{limit} (the model's maximum positions)")
        ids = torch.randint(0, vocab, (batch_size, length), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if getattr(config, "is_encoder_decoder", False):
            batch["decoder_input_ids"] = torch.randint(0, vocab, (batch_size, length), generator=g)
        return batch
    raise CLIError(f"{type(model).__name__} takes {main!r} inputs, for which no random batch is built; pass --inputs FILE")
