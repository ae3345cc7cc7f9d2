"""What the ``hf-emergence`` commands share: the parser with one-line errors, the setting flags, the model source
flags, settings from flags, and output formatting. Loading configs and checkpoints lives in
:mod:`hf_emergence.loading` (the example scripts use it too)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import re
import sys
import warnings
from typing import Any, Callable, Iterator, Optional

import torch

from ..emergence_init import SETTING_CHOICES, SETTING_NAMES, EmergenceInit
from ..loading import first_line
from ..plan import PlanError

PROG = "hf-emergence"
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_HUB = 0, 1, 2, 4
#: What a model constructor raises for config values it cannot build (bad sizes, ids out of range): exit code 2.
BUILD_ERRORS = (TypeError, ValueError, RuntimeError, AssertionError, IndexError, KeyError, AttributeError)


class CLIError(Exception):
    """A bad argument or input: printed as one line ``error: ...``, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) that the caller turns into exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CLIError(f"{self.prog}: {message} (see {self.prog} --help)")


# ------------------------------------------------------------------------------------------- arguments
def add_command(sub: Any, name: str, run: Callable[[argparse.Namespace], None], *, help: str, description: str,
                formatter_class: type) -> argparse.ArgumentParser:
    """The sub-parser of one command (``hf-emergence <name>``), dispatching to ``run(args)``."""
    parser = sub.add_parser(name, help=help, description=description, formatter_class=formatter_class)
    parser.set_defaults(func=run)
    return parser


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


def add_source_args(parser: argparse.ArgumentParser, *, checkpoint: bool) -> None:
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


# -------------------------------------------------------------------------------------------- settings
def settings_from_args(args: argparse.Namespace, recorded: Optional[dict[str, Any]] = None) -> EmergenceInit:
    """The flags given on the command line over ``recorded`` settings (a saved config's) over the defaults."""
    merged = {k: v for k, v in (recorded or {}).items() if k in SETTING_NAMES}
    merged.update({k: getattr(args, k) for k in SETTING_NAMES if getattr(args, k, None) is not None})
    try:
        return EmergenceInit(**merged)
    except (TypeError, ValueError) as err:
        raise CLIError(first_line(err)) from None


def given_settings(args: argparse.Namespace) -> list[str]:
    return [k for k in SETTING_NAMES if getattr(args, k, None) is not None]


def plan_for(init: EmergenceInit, model: Any, example_inputs: Any = None) -> Any:
    try:
        return init.plan(model, example_inputs=example_inputs)
    except (TypeError, ValueError) as err:
        raise CLIError(first_line(err)) from None


def seed(value: int) -> None:
    from transformers import set_seed

    set_seed(value)


def build(concrete: type, config: Any, *, meta: bool = False, init: Optional[EmergenceInit] = None, **kwargs: Any) -> Any:
    """``concrete._from_config(config)`` (on the meta device when ``meta``; with ``init``, through
    :func:`hf_emergence.from_config`, as ``init`` builds); a config it cannot build is a CLIError."""
    try:
        if init is not None:
            from ..modeling import from_config

            return from_config(concrete, config, init, **kwargs)
        if meta:
            with torch.device("meta"):
                return concrete._from_config(config, **kwargs)
        return concrete._from_config(config, **kwargs)
    except PlanError as err:          # the config builds; the init refuses it
        raise CLIError(first_line(err)) from None
    except BUILD_ERRORS as err:
        raise CLIError(f"cannot build {concrete.__name__} from this config: {type(err).__name__}: {first_line(err)}") from None


# ---------------------------------------------------------------------------------------------- output
def jsonable(obj: Any) -> Any:
    """Strict JSON: NaN / inf become null, tuples lists, tensors lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.tolist())
    return obj


def print_json(obj: Any) -> None:
    print(json.dumps(jsonable(obj), indent=2, allow_nan=False))


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def error(message: str) -> None:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)


@contextlib.contextmanager
def cli_environment() -> Iterator[None]:
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


def quiet_transformers() -> None:
    """No info logs or progress bars on stderr from transformers (our own output is the report)."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
