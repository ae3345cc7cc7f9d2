"""The ``hf-emergence`` command line (also ``python -m hf_emergence``), one module per command.

    hf-emergence init    --model_type marian --config_overrides "d_model=256,encoder_layers=6" \\
                         --auto_class AutoModelForSeq2SeqLM --alpha 1.2 --output_dir marian-emergence
    hf-emergence inspect --config marian-emergence/config.json --alpha 1.2 [--json]
    hf-emergence inspect --model marian-emergence [--json]
    hf-emergence measure --model marian-emergence [--inputs batch.safetensors] [--json]

``init`` (:mod:`.init`) builds a model from a model type or a local config with the init applied inside
transformers' construction (:func:`hf_emergence.from_config`), saves it with ``save_pretrained`` plus a
model card, and optionally pushes the folder to the Hub. ``inspect`` (:mod:`.inspect`) prints the plan and
the measured weight std of every layer before and after the scaling. ``measure`` (:mod:`.measure`) reports
the emergence E and the activation profile of a saved checkpoint on a batch. What they share is in
:mod:`.shared`; configs and checkpoints are loaded by :mod:`hf_emergence.loading`, as in the example scripts.

Bad arguments give one line ``error: ...`` on stderr and exit code 2; a failed Hub push exits with 4
(the model stays saved locally); anything unexpected exits with 1 (set ``HF_EMERGENCE_DEBUG=1`` for
the traceback). Nothing here downloads anything: every path is local.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Optional, Sequence

from ..config_overrides import ConfigOverrideError
from ..emergence_init import SETTING_NAMES
from ..loading import LoadError, first_line
from . import init, inspect, measure
from .measure import random_inputs
from .shared import EXIT_ERROR, EXIT_HUB, EXIT_OK, EXIT_USAGE, PROG, CLIError, Parser, cli_environment, error, \
    quiet_transformers

__all__ = ["main", "build_parser", "random_inputs", "SETTING_NAMES"]
COMMANDS = (init, inspect, measure)


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = Parser(prog=PROG, description="Emergence-promoting initialisation (arXiv 2407.19044) for Hugging Face "
                    "models: make, inspect and measure initialised checkpoints.", formatter_class=fmt,
                    epilog="Run `hf-emergence <command> --help` for the options of each command. "
                           "Exit codes: 0 ok, 2 bad arguments, 4 Hub push failed (model kept locally), 1 unexpected error.")
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"hf-emergence {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{init,inspect,measure}", required=True, parser_class=Parser)
    for command in COMMANDS:
        command.add_parser(sub, fmt)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 unexpected error, 2 bad arguments, 4 Hub push failed)."""
    from ..hub import HubError

    with cli_environment():
        try:
            args = build_parser().parse_args(list(argv) if argv is not None else None)
            quiet_transformers()
            args.func(args)
        except SystemExit as exc:  # --help / --version
            return int(exc.code or 0) if isinstance(exc.code, (int, type(None))) else EXIT_USAGE
        except (CLIError, LoadError, ConfigOverrideError) as err:
            error(str(err))
            return EXIT_USAGE
        except HubError as err:
            error(str(err))
            return EXIT_HUB
        except KeyboardInterrupt:
            error("interrupted")
            return 130
        except BrokenPipeError:  # `hf-emergence inspect ... | head`: the reader left; say nothing more
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_ERROR
        except Exception as err:
            if os.environ.get("HF_EMERGENCE_DEBUG"):
                raise
            error(f"unexpected {type(err).__name__}: {first_line(err)} (set HF_EMERGENCE_DEBUG=1 for the traceback)")
            return EXIT_ERROR
    return EXIT_OK
