"""Machinery shared by ``examples/translation/run.py`` and ``examples/vision/run.py``.

Plain functions and two small classes, no framework: each script keeps the accelerate order visible
in its ``main()`` (accelerator -> seed -> data -> model -> optimizer/scheduler -> prepare -> loop ->
eval -> save). What lives here: the argument groups both scripts share (transformers' flag names plus
every ``EmergenceInit`` setting) with their range checks and one-line errors, the init/baseline switch, the
per-layer-LR control, an epoch-seeded (and optionally length-grouped) batch sampler, data loaders that leave the
global RNG alone, atomic and verified checkpoints with exact resume, clean stops on SIGTERM / SIGINT, the metrics
log, the non-finite-loss guard, offline metrics, and saving/pushing the final model with its card.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn, Optional, Sequence

import torch
import torch.nn as nn
from accelerate import Accelerator, DataLoaderConfiguration
from torch.utils.data import DataLoader, Sampler

from hf_emergence import EmergenceInit, EmergencePlan
from hf_emergence.emergence_init import SETTING_CHOICES, SETTING_NAMES
from hf_emergence import config_overrides as _config_overrides
from hf_emergence import loading
from hf_emergence.atomic import atomic_write
from hf_emergence.card import model_card
from hf_emergence.hub import HubError, push_folder

logger = logging.getLogger("hf_emergence.examples")
METRICS_DIR = Path(__file__).resolve().parent / "metrics"
INIT_CHOICES = ("emergence", "xavier", "kaiming", "default")
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt")


# ---------------------------------------------------------------------------------------------- errors
class UsageError(Exception):
    """Bad input from the user: reported as one line (file, line or value and what was expected), exit code 2."""


class NonFiniteLoss(Exception):
    """Training diverged; the run stops and the last good checkpoint is kept. Exit code 3."""


class Stopped(Exception):
    """SIGTERM / SIGINT: the run saved a checkpoint at a step boundary and stopped. Exit code 128 + the signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def run_cli(main: Callable[[Optional[Sequence[str]]], Any], argv: Optional[Sequence[str]] = None) -> int:
    """Run ``main(argv)`` with SIGTERM / SIGINT stopping it cleanly (:func:`stop_if_asked`); print a
    :class:`UsageError` / :class:`NonFiniteLoss` / :class:`Stopped` as one line instead of a traceback.

    Under ``accelerate launch`` with several processes, an ``error:`` line that several processes of this machine
    raise alike (a bad argument, a finished run in ``--output_dir``) is printed once (:func:`_print_once`); a line
    that differs, as a rank-specific error does, is printed by the process that raised it. Each process still
    exits with the error's code. ``stopped:`` lines stay one per process (each says at which step it stopped).
    """
    try:
        with stop_on_signals():
            main(argv)
    except UsageError as err:
        return _print_once(f"error: {err}", 2)
    except NonFiniteLoss as err:
        return _print_once(f"error: {err}", 3)
    except HubError as err:
        return _print_once(f"error: {err}", 4)
    except Stopped as err:
        _write_line(f"stopped: {err}")
        return 128 + err.signum
    except KeyboardInterrupt:
        return _print_once("error: interrupted (a second signal); the newest complete checkpoint is intact", 130)
    return 0


def _print_once(line: str, code: int) -> int:
    """Print ``line`` on stderr unless another worker of the same launch on this machine already printed it; returns
    ``code``. The workers of one ``accelerate launch`` share a parent (torch elastic's agent): the first of them to
    create the file named by (parent pid, its start time, the line) prints the line, the others stay quiet. When
    that cannot be told (one process, no /proc, an unwritable temp folder), the line is printed.
    SIGTERM is held back meanwhile: the launcher stops every other worker once one exits, and the one that claimed
    the line must still print it."""
    blocked = hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread()
    if blocked:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        if _first_to_claim(line):
            _write_line(line)
    finally:
        if blocked:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    return code


def _write_line(line: str) -> None:
    """``line`` on stderr in one write, so lines of processes sharing the terminal or a log file never interleave
    (``print`` writes the text and the newline separately)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _first_to_claim(line: str) -> bool:
    """False only when another worker of this launch on this machine has claimed ``line`` (see :func:`_print_once`)."""
    try:
        if int(os.environ.get("LOCAL_WORLD_SIZE") or 1) < 2:
            return True
        parent = os.getppid()
        started = Path(f"/proc/{parent}/stat").read_text().rsplit(")", 1)[1].split()[19]   # field 22: start time
        key = hashlib.sha256(f"{parent} {started} {line}".encode()).hexdigest()[:32]
        folder = Path(tempfile.gettempdir()) / "hf_emergence_errors"
        folder.mkdir(exist_ok=True)
        os.close(os.open(folder / key, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        return False
    except (OSError, IndexError, ValueError):
        return True
    _sweep_claims(folder)
    return True


#: Claim files older than this are removed by the next claim (the workers of a launch print within seconds).
CLAIM_TTL_S = 3600.0


def _sweep_claims(folder: Path) -> None:
    """Remove the claim files of earlier launches, so the folder does not grow by one file per error."""
    cutoff = time.time() - CLAIM_TTL_S
    for claim in folder.iterdir():
        try:
            if claim.stat().st_mtime < cutoff:
                claim.unlink()
        except OSError:                                    # removed meanwhile by another worker, or not ours
            pass


# ----------------------------------------------------------------------------------------------- signals
_stop_request: dict[str, Any] = {"signum": None, "at": 0.0}
#: A signal this long after the first one stops at once (sooner, it is the launcher passing the first one on).
FORCE_AFTER_S = 2.0


def _request_stop(signum: int, frame: Any) -> None:  # noqa: ARG001
    if _stop_request["signum"] is None:
        _stop_request.update(signum=signum, at=time.monotonic())
        os.write(2, f"{signal.Signals(signum).name}: stopping after this step, with a checkpoint (send it again "
                    f"more than {FORCE_AFTER_S:g} s later to stop at once)\n".encode())   # no buffered I/O in a handler
    elif time.monotonic() - _stop_request["at"] > FORCE_AFTER_S:
        raise KeyboardInterrupt


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """While training, SIGTERM and SIGINT ask for a clean stop (see :func:`stop_if_asked`) instead of killing the
    process. ``accelerate launch`` passes both on to its workers (so a worker may see the same Ctrl-C twice);
    a second signal more than ``FORCE_AFTER_S`` seconds after the first stops at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.signal(s, _request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    _stop_request.update(signum=None, at=0.0)
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
        _stop_request.update(signum=None, at=0.0)


def stop_if_asked(accelerator: Accelerator, state: "TrainState", checkpoints: "Checkpoints",
                  checks: Optional["DeviceChecks"] = None, every: int = 1) -> None:
    """After an optimizer step: if any process got SIGTERM / SIGINT, every process saves a checkpoint of this step
    and stops (:class:`Stopped`). ``checks`` is read first: no checkpoint is saved after a step the non-finite
    guard skipped. With several processes the request is max-reduced across them, so all stop at the same step;
    that reduce is a device round trip, so it happens only at steps that are multiples of ``every`` (the loops pass
    --logging_steps, where they read the device anyway): the stop comes at most ``every - 1`` steps later."""
    signum = _stop_request["signum"] or 0
    if accelerator.num_processes > 1:
        if state.completed_steps % every:
            return
        signum = int(accelerator.reduce(torch.tensor(signum, device=accelerator.device), reduction="max"))
    if not signum:
        return
    if checks is not None:
        checks.check(state, checkpoints)
    latest = checkpoints.latest()
    path = latest if latest is not None and latest.name == checkpoints.name(state) else checkpoints.save(state)
    raise Stopped(f"{signal.Signals(signum).name} at step {state.completed_steps} (epoch {state.epoch}); saved {path}. "
                  "Continue with --resume_from_checkpoint latest", signum)


# ------------------------------------------------------------------------------------------- arguments
class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (a :class:`UsageError`, exit code 2 in :func:`run_cli`), no usage dump."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        raise UsageError(f"{message} (see {self.prog} --help)")


def steps_or_epoch(value: str) -> int | str:
    """argparse type for --checkpointing_steps / --eval_steps: a positive integer or "epoch"."""
    if value == "epoch":
        return value
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'epoch', got {value!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'epoch', got {value!r}")
    return n


def add_model_args(parser: argparse.ArgumentParser, model_types: Sequence[str], default_type: str) -> None:
    g = parser.add_argument_group("model (always built from a config; never downloads weights)")
    g.add_argument("--model_type", default=default_type, choices=list(model_types), help="architecture to build")
    g.add_argument("--config_overrides", default=None,
                   help='comma-separated config changes, e.g. "d_model=512,encoder_layers=6" or "hidden_sizes=[32,64]"')
    g.add_argument("--model_name_or_path", default=None,
                   help="continue from a saved (e.g. emergence-initialised) checkpoint folder or Hub id instead of a fresh build")


def add_init_args(parser: argparse.ArgumentParser) -> None:
    """``--init`` and every EmergenceInit setting; unset flags (None) keep the library defaults."""
    g = parser.add_argument_group("initialisation (hf_emergence)")
    g.add_argument("--init", default="emergence", choices=INIT_CHOICES,
                   help="emergence: base init then alpha**k; xavier / kaiming: the same tensors re-drawn from that base "
                        "init with no scaling (the paper's baselines); default: the model's own init")
    g.add_argument("--alpha", type=float, default=None, help="scale base alpha (library default 1.1)")
    g.add_argument("--base_init", default=None, choices=SETTING_CHOICES["base_init"], help="base init drawn before scaling (default: auto)")
    g.add_argument("--scale_mode", default=None, choices=SETTING_CHOICES["scale_mode"])
    g.add_argument("--even_depth", default=None, choices=SETTING_CHOICES["even_depth"])
    g.add_argument("--pivot", type=int, default=None, help="layer index that gets k=0 (default: the middle)")
    g.add_argument("--chain", default=None, choices=SETTING_CHOICES["chain"],
                   help="separate: encoder and decoder numbered each on its own; single: one chain, encoder first")
    g.add_argument("--attention", default=None, choices=SETTING_CHOICES["attention"])
    g.add_argument("--layer_unit", default=None, choices=SETTING_CHOICES["layer_unit"])
    g.add_argument("--exclude", nargs="*", default=None, help="regexes of parameter names to leave alone")
    g.add_argument("--unscaled", nargs="*", default=None,
                   help="regexes of parameter names re-drawn and counted in the numbering but kept at factor 1 (e.g. a "
                        "classifier head); with --per_layer_lr_from_plan they train at the base rate")
    g.add_argument("--per_layer_lr_from_plan", action="store_true",
                   help="control: give each planned tensor the learning rate the emergence plan implies, "
                        "lr*alpha**(-2k) for SGD and lr*alpha**(-k) for AdamW, whatever --init is")
    g.add_argument("--per_layer_weight_decay_from_plan", action="store_true",
                   help="with --per_layer_lr_from_plan: scale each planned tensor's weight decay the other way "
                        "(wd*alpha**(2k) for SGD, wd*alpha**k for AdamW; lr*wd unchanged), so that a scale-invariant "
                        "layer follows the emergence trajectory exactly under weight decay too")


def add_training_args(parser: argparse.ArgumentParser, *, batch_size: int, learning_rate: float, epochs: float,
                      weight_decay: float, warmup: int, scheduler: str, optimizer: str = "adamw") -> None:
    g = parser.add_argument_group("training")
    g.add_argument("--per_device_train_batch_size", type=int, default=batch_size)
    g.add_argument("--per_device_eval_batch_size", type=int, default=None, help="default: 2x the train batch size")
    g.add_argument("--learning_rate", type=float, default=learning_rate)
    g.add_argument("--weight_decay", type=float, default=weight_decay)
    g.add_argument("--num_train_epochs", type=float, default=epochs)
    g.add_argument("--max_train_steps", type=int, default=None, help="overrides --num_train_epochs")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--lr_scheduler_type", default=scheduler, choices=SCHEDULERS)
    g.add_argument("--num_warmup_steps", type=int, default=warmup)
    g.add_argument("--optimizer", default=optimizer, choices=("adamw", "sgd"))
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--nesterov", action="store_true", help="SGD with Nesterov momentum")
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping (0 disables)")


def add_run_args(parser: argparse.ArgumentParser, default_output_dir: str) -> None:
    g = parser.add_argument_group("run control")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--output_dir", default=default_output_dir)
    g.add_argument("--eval_steps", type=steps_or_epoch, default="epoch", help="evaluate every N steps or each epoch")
    g.add_argument("--checkpointing_steps", type=steps_or_epoch, default=None, help="save state every N steps or each epoch")
    g.add_argument("--checkpoints_total_limit", type=int, default=2, help="keep only the newest N checkpoints")
    g.add_argument("--resume_from_checkpoint", default=None,
                   help='a checkpoint folder, or "latest": the newest intact one in --output_dir (none yet: start)')
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="start afresh in an --output_dir that holds a finished run or checkpoints (they are replaced)")
    g.add_argument("--logging_steps", type=int, default=50)
    g.add_argument("--with_tracking", action="store_true", help="also log to Accelerate trackers (--report_to)")
    g.add_argument("--report_to", default="all")
    g.add_argument("--push_to_hub", action="store_true")
    g.add_argument("--hub_model_id", default=None)
    g.add_argument("--hub_token", default=None)
    g.add_argument("--private", action="store_true")
    g.add_argument("--num_threads", type=int, default=None,
                   help="CPU threads per process (default: the available cores divided by the local processes)")
    g.add_argument("--no_progress_bar", action="store_true")


def add_speed_args(parser: argparse.ArgumentParser, channels_last: bool = False, torch_compile: bool = True) -> None:
    """``--mixed_precision`` (Accelerate's autocast; fp16 is left out: its loss scaler skips overflowing steps, which the
    non-finite guard would report as divergence), ``--torch_compile`` and, for ConvNets, ``--channels_last``."""
    g = parser.add_argument_group("speed")
    g.add_argument("--mixed_precision", default=None, choices=("no", "bf16"),
                   help="bf16: forward and loss under Accelerate's bf16 autocast, weights and optimizer in fp32 "
                        "(default: what `accelerate launch` / `accelerate config` say, else no)")
    if torch_compile:
        g.add_argument("--torch_compile", action="store_true",
                       help="compile the model's forward with torch.compile (inductor; the first steps pay the compile "
                            "time, checkpoints keep the plain parameter names)")
    if channels_last:
        g.add_argument("--channels_last", default="auto", choices=("auto", "yes", "no"),
                       help="keep weights and input batches in channels_last memory format (NHWC); auto: yes for ConvNets "
                            "on a GPU, where cuDNN and bf16 run fastest in it")


def compile_forward(model: nn.Module) -> None:
    """``torch.compile`` the forward of the (prepared) model in place. Compiling the bound ``forward`` rather than
    wrapping the module (``torch.compile(model)``) keeps the parameter names (no ``_orig_mod.`` prefix), so checkpoints
    of compiled and plain runs load into each other; ``nn.Module.compile()`` is not used because torch 2.13's dynamo
    skips the ``_call_impl`` it wraps (nothing gets compiled)."""
    model.forward = torch.compile(model.forward)


def add_diagnostics_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("diagnostics")
    g.add_argument("--measure_emergence", action="store_true",
                   help="log the emergence E and print the activation profile on a fixed validation batch at init "
                        "and at every evaluation")


#: (test, what is expected) for the range checks of :func:`check_ranges`.
Rule = tuple[Callable[[Any], bool], str]
AT_LEAST_1: Rule = (lambda v: v >= 1, ">= 1")
AT_LEAST_0: Rule = (lambda v: v >= 0, ">= 0")
POSITIVE: Rule = (lambda v: math.isfinite(v) and v > 0, "a positive number")
NON_NEGATIVE: Rule = (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
FRACTION: Rule = (lambda v: 0 <= v < 1, "in [0, 1)")
#: The shared flags' ranges (and the data flags both scripts have); each script adds its own rows.
SHARED_RULES: dict[str, Rule] = {
    "per_device_train_batch_size": AT_LEAST_1, "per_device_eval_batch_size": AT_LEAST_1,
    "gradient_accumulation_steps": AT_LEAST_1, "learning_rate": POSITIVE, "max_train_steps": AT_LEAST_1,
    "num_train_epochs": POSITIVE, "num_warmup_steps": AT_LEAST_0, "weight_decay": NON_NEGATIVE,
    "momentum": FRACTION, "adam_beta2": FRACTION, "max_grad_norm": (lambda v: v >= 0, ">= 0 (0 disables clipping)"),
    "logging_steps": AT_LEAST_1, "checkpoints_total_limit": AT_LEAST_1, "num_threads": AT_LEAST_1,
    "seed": (lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
    "max_train_samples": AT_LEAST_1, "max_eval_samples": AT_LEAST_1,
}


def check_ranges(args: argparse.Namespace, rules: dict[str, Rule]) -> None:
    """``--name must be <expected>, got <value>`` for the first flag outside its range (flags left at None pass)."""
    for name, (ok, expected) in rules.items():
        value = getattr(args, name, None)
        if value is not None and not ok(value):
            raise UsageError(f"--{name} must be {expected}, got {value}")


def check_common_args(args: argparse.Namespace) -> None:
    """Combination checks for the shared flags (done at the end of each script's parse_args), including the
    output folder: everything is checked before anything is read or written."""
    check_ranges(args, SHARED_RULES)
    if getattr(args, "nesterov", False) and (args.optimizer != "sgd" or args.momentum == 0):
        raise UsageError(f"--nesterov needs --optimizer sgd with --momentum > 0, got --optimizer {args.optimizer} "
                         f"--momentum {args.momentum}")
    if args.per_layer_weight_decay_from_plan and not args.per_layer_lr_from_plan:
        raise UsageError("--per_layer_weight_decay_from_plan needs --per_layer_lr_from_plan")
    if args.push_to_hub and not args.hub_model_id:
        raise UsageError("--push_to_hub needs --hub_model_id (e.g. your-name/marian-emergence)")
    if args.per_device_eval_batch_size is None:
        args.per_device_eval_batch_size = 2 * args.per_device_train_batch_size
    emergence_settings(args)  # validates the init flags now, before any data is read
    check_output_dir(args)


def check_output_dir(args: argparse.Namespace) -> None:
    """``--output_dir`` must be a folder, or not exist yet. (Whether a fresh run may replace what the folder holds
    is decided by :meth:`Checkpoints.resolve`, first thing in ``main``.)"""
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output_dir {out} is a file, not a folder")


def previous_run(out: Path) -> Optional[str]:
    """What a fresh run in ``out`` would destroy: a finished run, or checkpoints; None when there is nothing to lose."""
    if (out / "all_results.json").is_file():
        return "a finished run (all_results.json)"
    steps = Checkpoints.complete_in(out / "checkpoints")
    if steps:
        return f"a run with checkpoints up to {steps[-1].name}"
    log = out / "metrics.jsonl"
    if log.is_file() and '"final": true' in log.read_text(errors="replace"):
        return "a finished run (metrics.jsonl has its final record)"
    return None


# ------------------------------------------------------------------------------------ config overrides
def parse_config_overrides(text: Optional[str]) -> dict[str, Any]:
    """``"a=1,b=[2,3],c=true,d=gelu"`` -> dict; :func:`hf_emergence.config_overrides.parse_config_overrides` as a UsageError."""
    try:
        return _config_overrides.parse_config_overrides(text)
    except _config_overrides.ConfigOverrideError as err:
        raise UsageError(str(err)) from None


def apply_config_overrides(config: Any, text: Optional[str]) -> Any:
    """Set each override on ``config`` (:func:`hf_emergence.loading.apply_overrides`, as the CLI does); an unknown key,
    a rejected value or per-stage lists that no longer fit together are a UsageError naming the model type and key."""
    try:
        return loading.apply_overrides(config, text)
    except loading.LoadError as err:
        raise UsageError(str(err)) from None


def load_pretrained(name_or_path: str, auto_class: Any) -> Any:
    """``--model_name_or_path``: a saved model folder (checked as the CLI checks it) or a Hub id, with ``auto_class``."""
    try:
        return loading.load_pretrained(name_or_path, auto_class, flag="--model_name_or_path", local_only=False)
    except loading.LoadError as err:
        raise UsageError(str(err)) from None


# ------------------------------------------------------------------------------------------------ init
def emergence_settings(args: argparse.Namespace) -> Optional[EmergenceInit]:
    """The EmergenceInit for ``--init`` (None for ``default``); baselines re-draw the same tensors with alpha=1."""
    if args.init == "default":
        return None
    given = {k: getattr(args, k) for k in SETTING_NAMES if getattr(args, k, None) is not None}
    if args.init in ("xavier", "kaiming"):
        default_base = "xavier_uniform" if args.init == "xavier" else "kaiming_normal"
        base = given.get("base_init")
        if base is not None and not base.startswith(args.init):
            raise UsageError(f"--init {args.init} conflicts with --base_init {base}")
        given.update(alpha=1.0, base_init=base or default_base)
    try:
        return EmergenceInit(**given)
    except (TypeError, ValueError) as err:
        raise UsageError(str(err)) from None


def lr_plan(args: argparse.Namespace, model: nn.Module, example_inputs: Any = None) -> Optional[EmergencePlan]:
    """For ``--per_layer_lr_from_plan``: the plan an emergence run with these flags would apply (never applied)."""
    if not args.per_layer_lr_from_plan:
        return None
    given = {k: getattr(args, k) for k in SETTING_NAMES if getattr(args, k, None) is not None}
    given.pop("base_init", None)
    try:  # --alpha etc. are only checked here when --init is a baseline or default
        return EmergenceInit(**given).plan(model, example_inputs=example_inputs)
    except (TypeError, ValueError) as err:
        raise UsageError(f"--per_layer_lr_from_plan: {str(err).splitlines()[0]}") from None


# ---------------------------------------------------------------------------------------- accelerator
def make_accelerator(args: argparse.Namespace, project_name: str) -> Accelerator:
    """An Accelerator that runs on CPU when no accelerator exists (so a multi-process launch uses gloo there),
    with as many CPU threads per process as cores allow (``accelerate launch`` alone pins OMP to 1 thread)."""
    has_device = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()) or \
        torch.backends.mps.is_available()
    # non_blocking: batches from pinned memory are copied to the GPU without making the host wait for the device
    accelerator = Accelerator(cpu=not has_device, gradient_accumulation_steps=args.gradient_accumulation_steps,
                              dataloader_config=DataLoaderConfiguration(non_blocking=True),
                              mixed_precision=getattr(args, "mixed_precision", None),   # None: accelerate launch's
                              log_with=args.report_to if args.with_tracking else None, project_dir=args.output_dir)
    if accelerator.mixed_precision == "fp16":
        raise UsageError("mixed precision fp16 (set by accelerate launch / accelerate config) is not supported: its loss "
                         "scaler skips overflowing steps, which the non-finite guard reads as divergence; use bf16 or no")
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO if accelerator.is_local_main_process else logging.ERROR)
    cache_accelerate_package_checks()
    if accelerator.device.type == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        torch.set_num_threads(args.num_threads or max(1, cores // local_processes))
    logger.info("%s: %d process(es) on %s, %d CPU thread(s) each", project_name, accelerator.num_processes,
                accelerator.device, torch.get_num_threads())
    if args.with_tracking:
        accelerator.init_trackers(project_name, {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                 for k, v in vars(args).items()})
    return accelerator


def cache_accelerate_package_checks() -> None:
    """accelerate's ``AcceleratedOptimizer.step`` asks ``is_lomo_available()`` twice per step, and each answer is an
    ``importlib`` spec lookup plus a metadata scan of ``sys.path`` (~3.5 ms each on CPU, profiled: 7 ms of a 50 ms
    step of a tiny model). Which packages are installed does not change during a run: answer once."""
    import accelerate.optimizer as accelerated

    check = accelerated.is_lomo_available
    if not getattr(check, "cache_info", None):
        accelerated.is_lomo_available = functools.cache(check)


# ------------------------------------------------------------------------------------------ data order
class EpochBatchSampler(Sampler[list[int]]):
    """Batches of indices whose order depends only on (seed, epoch), so a resumed run replays it exactly.

    Three ways to form batches:

    - ``batch_size`` items each, in random order (the last batch may be short);
    - with ``lengths``: ``batch_size`` items of similar length. The shuffled indices are cut into windows of
      ``window`` batches, each window is sorted by length and cut into batches, and the batches are shuffled;
    - with ``lengths`` and ``max_tokens`` (fairseq's ``--max-tokens``): the indices sorted by length (ties broken
      at random each epoch) are cut greedily into batches of n items with n * (longest length) <= max_tokens, and
      the batches are shuffled. The cut points depend only on the sorted lengths, so every epoch has the same
      number of batches of the same sizes, made of different items.

    With ``num_processes`` > 1, accelerate deals the batches out round robin (batch i to process i mod P). The
    number of batches is made a multiple of P by halving the largest batches, so every process gets the same
    number of batches and every index is used exactly once per epoch: nothing is dropped or repeated. The
    sampler says ``batch_size = None`` to accelerate, which then shards by count whatever the batch sizes are
    (with a number, it skips every round whose last batch is short, and processes fall out of step).

    The epoch is chosen with :meth:`use_epoch`, deliberately not ``set_epoch``: a prepared accelerate
    DataLoader calls ``set_epoch`` with its own iteration counter, which restarts at 0 after a resume.
    """

    batch_size = None   # read by accelerate's BatchSamplerShard: batch sizes vary, deal them out by count

    def __init__(self, num_items: int, batch_size: int, seed: int, *, shuffle: bool = True,
                 lengths: Optional[Sequence[int]] = None, max_tokens: Optional[int] = None, drop_last: bool = False,
                 window: int = 50, num_processes: int = 1):
        if num_items < 1:
            raise UsageError("the dataset is empty")
        if max_tokens is not None and lengths is None:
            raise ValueError("max_tokens needs the lengths of the items")
        self.num_items, self.items_per_batch, self.seed = num_items, batch_size, seed
        self.shuffle, self.lengths, self.max_tokens, self.drop_last = shuffle, lengths, max_tokens, drop_last
        self.window, self.num_processes = window, num_processes
        self.epoch = 0
        self._length_tensor = torch.tensor(lengths, dtype=torch.long) if lengths is not None else None
        self.sizes = self._even_out(self._token_sizes() if max_tokens is not None else self._fixed_sizes())

    def use_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _fixed_sizes(self) -> list[int]:
        full, rest = divmod(self.num_items, self.items_per_batch)
        return [self.items_per_batch] * full + ([rest] if rest and not self.drop_last else [])

    def _token_sizes(self) -> list[int]:
        """Greedy cut of the sorted lengths: a batch grows while (items + 1) * length <= max_tokens."""
        sizes, n = [], 0
        for length in torch.sort(self._length_tensor).values.tolist():
            if n and (n + 1) * length > self.max_tokens:
                sizes.append(n)
                n = 0
            n += 1
        return sizes + [n]

    def _cost(self, sizes: list[int]) -> list[int]:
        """Padded size of each batch: items x longest length (token mode), else items."""
        if self.max_tokens is None:
            return list(sizes)
        longest = torch.sort(self._length_tensor).values[torch.tensor(sizes).cumsum(0) - 1]
        return [n * m for n, m in zip(sizes, longest.tolist())]

    def _even_out(self, sizes: list[int]) -> list[int]:
        """Halve the largest batches (of >= 2 items) until the count is a multiple of num_processes."""
        while len(sizes) % self.num_processes:
            cost = self._cost(sizes)
            splittable = [j for j, n in enumerate(sizes) if n >= 2]
            if not splittable:
                raise UsageError(f"{self.num_items} training items cannot give {self.num_processes} processes the "
                                 "same number of batches: use fewer processes or more data")
            j = max(splittable, key=lambda k: (cost[k], -k))
            sizes[j: j + 1] = [sizes[j] // 2, sizes[j] - sizes[j] // 2]
        return sizes

    def _batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_items, generator=g).tolist() if self.shuffle else list(range(self.num_items))
        if self.max_tokens is not None:               # by length, ties in the random order above (stable sort)
            shuffled = torch.tensor(order)
            order = shuffled[torch.sort(self._length_tensor[shuffled], stable=True).indices].tolist()
        elif self.lengths is not None:
            span = self.items_per_batch * self.window
            order = [i for s in range(0, len(order), span)
                     for i in sorted(order[s:s + span], key=lambda j: -self.lengths[j])]
        batches, start = [], 0
        for n in self.sizes:
            batches.append(order[start:start + n])
            start += n
        if self.lengths is not None and self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self.sizes)


def data_loader(dataset: Any, **kwargs: Any) -> DataLoader:
    """A ``DataLoader`` with a ``torch.Generator`` of its own.

    Starting an iteration draws the workers' base seed from the loader's generator, or, without one, from the
    global torch RNG, which is also what dropout draws from and what a checkpoint saves. A run resumed mid-epoch
    starts one more iteration (``skip_first_batches``) than the uninterrupted run did by then, so every later
    dropout mask would be shifted by one draw; with its own generator, iterating never touches the global RNG.
    (accelerate's ``prepare`` and ``skip_first_batches`` keep the loader's generator.)
    """
    return DataLoader(dataset, generator=torch.Generator(device=torch.get_default_device()), **kwargs)


@contextlib.contextmanager
def quiet_datasets(progress: bool = True) -> Iterator[None]:
    """datasets logs its own ERROR line before raising; we report the failure as one line ourselves. With
    ``progress=False`` its progress bars (file resolution, split generation) are off too."""
    import datasets

    level = datasets.logging.get_verbosity()
    bars = datasets.utils.logging.is_progress_bar_enabled()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL + 1)
    if not progress:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)
        if bars:
            datasets.enable_progress_bars()


def first_line(err: BaseException) -> str:
    """``Type: first line of the message`` (or of its cause's), for one-line reports of library errors."""
    cause = err.__cause__ or err.__context__
    text = str(err).strip() or (str(cause).strip() if cause else "") or type(err).__name__
    return f"{type(err).__name__}: {text.splitlines()[0]}"


# ---------------------------------------------------------------------------------------- optimisation
def make_optimizer(model: nn.Module, args: argparse.Namespace, plan: Optional[EmergencePlan] = None) -> torch.optim.Optimizer:
    """AdamW or SGD; no weight decay on 1-D tensors (biases, norms).

    With ``plan`` (the per-layer-LR control), a planned tensor with factor c = alpha**k gets lr / c**p, p = 2 under
    SGD and 1 under AdamW. If a layer is scale-invariant (L(cW) = L(W), e.g. followed by BatchNorm), the emergence
    init's cW under lr moves as c times the base init's W under lr / c**p: the gradient at cW is grad / c, and
    Adam's update does not depend on the gradient's scale. Weight decay keeps that identity only when it is scaled
    the other way, wd * c**p (``--per_layer_weight_decay_from_plan``): the decay step lr * wd * W is then the same.
    """
    factors = plan.factors() if plan is not None else {}
    power = 2 if args.optimizer == "sgd" else 1
    decay_follows = args.per_layer_weight_decay_from_plan
    groups: dict[tuple[bool, float], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((p.ndim >= 2, factors.get(name, 1.0) ** -power), []).append(p)
    param_groups = [{"params": ps, "lr": args.learning_rate * scale,
                     "weight_decay": (args.weight_decay / (scale if decay_follows else 1.0)) if decay else 0.0}
                    for (decay, scale), ps in sorted(groups.items())]
    # the fused kernels (one pass over each tensor) are several times faster than the default per-op AdamW on CPU and
    # GPU (docs/results/throughput_translation), same update rule; they also skip a step on the device when told that
    # the gradients are not finite (``found_inf``, see DeviceChecks), with no host sync
    fused = not torch.backends.mps.is_available()
    if args.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=args.learning_rate, momentum=args.momentum,
                               nesterov=getattr(args, "nesterov", False), fused=fused)
    return torch.optim.AdamW(param_groups, lr=args.learning_rate, betas=(0.9, args.adam_beta2), fused=fused)


def make_scheduler(optimizer: torch.optim.Optimizer, args: argparse.Namespace, max_train_steps: int,
                   num_processes: int) -> Any:
    """transformers' schedule; prepared schedulers step once per process, hence the x num_processes."""
    from transformers import get_scheduler

    return get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.num_warmup_steps * num_processes,
                         num_training_steps=max_train_steps * num_processes)


def training_length(args: argparse.Namespace, batches_per_epoch: int) -> tuple[int, int]:
    """(max_train_steps, num_epochs) from --max_train_steps or --num_train_epochs (optimizer steps)."""
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / args.gradient_accumulation_steps))
    max_steps = args.max_train_steps or max(1, math.ceil(args.num_train_epochs * steps_per_epoch))
    return max_steps, math.ceil(max_steps / steps_per_epoch)


def clip_and_check(accelerator: Accelerator, model: nn.Module, args: argparse.Namespace, state: "TrainState",
                   checkpoints: "Checkpoints") -> float:
    """Clip gradients (if asked) and stop on a non-finite gradient norm, before the optimizer step.

    The norm is taken after the cross-process all-reduce, so every rank sees the same value and stops together;
    the weights still hold the last good step and the newest checkpoint is untouched.
    """
    norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm if args.max_grad_norm > 0 else float("inf"))
    norm = float(norm)
    if not math.isfinite(norm):
        last = checkpoints.latest()
        raise NonFiniteLoss(f"the loss/gradient became {norm} at step {state.completed_steps + 1} (epoch {state.epoch}); "
                            f"stopped without updating the weights. Last good checkpoint: {last or 'none written yet'}. "
                            "Try a lower --learning_rate or --alpha.")
    return norm


class DeviceChecks:
    """The non-finite guard without a host sync per step: the gradient norm is checked on the device, a step whose norm
    is not finite is skipped there (the fused optimizer's ``found_inf``, as ``torch.amp.GradScaler`` does), and the first
    such step is remembered as a device tensor. :meth:`check` reads it (one sync) and raises :class:`NonFiniteLoss`; call
    it where the host reads anyway (logging steps) and before every evaluation and checkpoint, so that no checkpoint
    is written after a skipped step. Optimizers without ``found_inf`` support get the synchronous check
    (:func:`clip_and_check`)."""

    def __init__(self) -> None:
        self.first_bad: Optional[torch.Tensor] = None    # [step, epoch, norm] of the first non-finite norm; step -1: none

    @staticmethod
    def supported(optimizer: torch.optim.Optimizer) -> bool:
        inner = getattr(optimizer, "optimizer", optimizer)        # accelerate's AcceleratedOptimizer wraps it
        return bool(getattr(inner, "_step_supports_amp_scaling", False)) and getattr(optimizer, "scaler", None) is None

    def note(self, optimizer: torch.optim.Optimizer, norm: torch.Tensor, step: int, epoch: int) -> None:
        """Record this step's norm and make the coming ``optimizer.step()`` a no-op on the device if it is not finite."""
        norm = norm.detach().reshape(()).float()
        bad = ~torch.isfinite(norm)
        inner = getattr(optimizer, "optimizer", optimizer)
        inner.found_inf = bad.float()
        here = torch.stack([torch.where(bad, float(step), -1.0), torch.full_like(norm, float(epoch)), norm])
        self.first_bad = here if self.first_bad is None else torch.where(self.first_bad[0] >= 0, self.first_bad, here)

    def check(self, state: "TrainState", checkpoints: "Checkpoints") -> None:
        if self.first_bad is None:
            return
        step, epoch, norm = self.first_bad.tolist()
        if step < 0:
            return
        last = checkpoints.latest()
        raise NonFiniteLoss(f"the loss/gradient became {norm} at step {int(step)} (epoch {int(epoch)}); that step was skipped "
                            f"and the run stopped at step {state.completed_steps}, when the check was read (every "
                            f"--logging_steps and before evaluations and checkpoints). Last good checkpoint: "
                            f"{last or 'none written yet'}. Try a lower --learning_rate or --alpha.")


def optimizer_step(accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                   loss: torch.Tensor, args: argparse.Namespace, state: "TrainState", checkpoints: "Checkpoints",
                   checks: Optional[DeviceChecks] = None) -> Optional[float | torch.Tensor]:
    """Backward, then (on the micro-batch that completes an accumulation) clip/check the gradient norm and step.

    Call inside ``accelerator.accumulate(model)``: the prepared optimizer and scheduler skip the other micro-batches.
    Returns the gradient norm (a float; with ``checks``, a device tensor that is not read here), or None when no step
    was taken.
    """
    accelerator.backward(loss)
    grad_norm = None
    if accelerator.sync_gradients:
        if checks is not None and DeviceChecks.supported(optimizer):
            grad_norm = accelerator.clip_grad_norm_(model.parameters(),
                                                    args.max_grad_norm if args.max_grad_norm > 0 else float("inf"))
            checks.note(optimizer, grad_norm, state.completed_steps + 1, state.epoch)
        else:
            grad_norm = clip_and_check(accelerator, model, args, state, checkpoints)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return grad_norm


def count_micro_batch(state: "TrainState", accelerator: Accelerator, samples: int) -> bool:
    """Advance the counters after a micro-batch of ``samples`` per process; True if it completed an optimizer step."""
    state.batches_in_epoch += 1
    state.samples_seen += samples * accelerator.num_processes
    if not accelerator.sync_gradients:
        return False
    state.completed_steps += 1
    return True


def finish_epoch(state: "TrainState", batches_per_epoch: int) -> bool:
    """Close the epoch if its last micro-batch ran (also when the step budget ends exactly with it)."""
    if state.batches_in_epoch < batches_per_epoch:
        return False
    state.epoch += 1
    state.batches_in_epoch = 0
    return True


def log_training(log: "MetricsLog", state: "TrainState", accelerator: Accelerator, loss: torch.Tensor,
                 grad_norm: Optional[float | torch.Tensor], scheduler: Any, timer: "Timer", unit: str) -> dict[str, Any]:
    """One training record: loss, gradient norm, learning rate, ``<unit>_per_s`` over all processes, data wait share.
    Reading the loss is the host's one sync with the device in a logging interval; the timer is read after it, so the
    throughput counts the work queued on an asynchronous device as done."""
    loss_value = float(loss.detach())
    norm = float(grad_norm) if grad_norm is not None else None
    timer.step_done(0)                # the wait for the device up to here belongs to this interval's steps
    speed = timer.summary()
    record = {"step": state.completed_steps, "epoch": state.epoch, "loss": loss_value, "grad_norm": norm,
              "lr": scheduler.get_last_lr()[0], f"{unit}_per_s": speed["items_per_s"] * accelerator.num_processes,
              "data_wait_share": speed["data_wait_share"], "elapsed_s": time.perf_counter() - timer.started}
    log.log(record)
    return record


def emergence_report(accelerator: Accelerator, model: nn.Module, inputs: Any) -> dict[str, Any]:
    """E (log10 and normalised) on a fixed batch, with the activation profile table in the log.

    ``inputs`` is what the model is called with: a tensor, or a dict of keyword tensors (moved to the device).
    """
    from hf_emergence import activation_profile, emergence

    target = accelerator.unwrap_model(model)
    if isinstance(inputs, dict):
        inputs = {k: v.to(accelerator.device) for k, v in inputs.items()}
    else:
        inputs = inputs.to(accelerator.device)
    score = emergence(target, inputs)
    if accelerator.is_main_process:
        logger.info("activation profile:\n%s", activation_profile(target, inputs))
    return {"emergence_log10_E": score.log10_E, "emergence_normalised": score.normalised}


# ------------------------------------------------------------------------------------- state/checkpoints
@dataclass
class TrainState:
    """Training progress, saved inside every checkpoint (counters never parsed from folder names)."""

    completed_steps: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0      # micro-batches of the current epoch already consumed
    samples_seen: int = 0
    best_metric: Optional[float] = None
    last_eval: dict[str, Any] = field(default_factory=dict)
    recorded: dict[str, Any] = field(default_factory=dict)   # values measured once, e.g. accuracy after epoch 1
    data: dict[str, Any] = field(default_factory=dict)       # what the batches are drawn from (compared on resume)


TRAIN_STATE, MANIFEST, MODEL_CONFIG = "train_state.json", "manifest.json", "model_config.json"
#: Config keys that differ between runs of the same model and are not compared on resume.
VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype")


class Checkpoints:
    """Atomic, verified checkpoints under ``<output_dir>/checkpoints``.

    ``save`` writes ``step_N.tmp`` with ``accelerator.save_state`` plus ``train_state.json``, the model's config and
    a ``manifest.json`` (size and SHA-256 of every file), renames it to ``step_N`` only when complete, then
    atomically rewrites the ``latest`` pointer; a kill at any point leaves the previous checkpoint and pointer
    intact. Older checkpoints beyond ``total_limit`` are removed (only ones older than the step just saved).

    ``resolve("latest")`` takes the checkpoint the pointer names, else the newest complete one, and verifies it
    against its manifest before use: a missing, truncated or altered file makes it fall back to the previous
    complete checkpoint with a warning naming the file. A run asked to resume never starts from step 0 while a
    checkpoint or a finished run is there (unless ``overwrite``), and nothing of it is deleted.

    ``before_save`` (set by a script, called on every process at the start of every ``save``) puts running totals
    into the training state, so each save route (scheduled, or the clean stop on a signal) carries them.
    """

    def __init__(self, accelerator: Accelerator, output_dir: str | os.PathLike, total_limit: int = 2,
                 overwrite: bool = False):
        self.accelerator, self.root, self.total_limit = accelerator, Path(output_dir) / "checkpoints", total_limit
        self.overwrite = overwrite
        self.before_save: Optional[Callable[[], None]] = None

    @staticmethod
    def name(state: TrainState) -> str:
        return f"step_{state.completed_steps:08d}"

    @staticmethod
    def complete_in(root: Path) -> list[Path]:
        """The complete (renamed) checkpoint folders under ``root``, oldest first (names sort by step)."""
        if not root.is_dir():
            return []
        return sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))

    def latest(self) -> Optional[Path]:
        """The checkpoint the ``latest`` pointer names, if that folder holds a training state (not verified)."""
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        return path if (path / TRAIN_STATE).is_file() else None

    def save(self, state: TrainState) -> Path:
        if self.before_save is not None:
            self.before_save()
        acc = self.accelerator
        final = self.root / self.name(state)
        tmp = final.with_name(final.name + ".tmp")
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            atomic_write(tmp / TRAIN_STATE, json.dumps(asdict(state), indent=1))
            config = self._model_config()
            if config is not None:
                atomic_write(tmp / MODEL_CONFIG, json.dumps(config, indent=1, sort_keys=True))
            atomic_write(tmp / MANIFEST, json.dumps(manifest(tmp), indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            atomic_write(self.root / "latest", final.name)
            self._prune(keep=final)
        acc.wait_for_everyone()
        return final

    def _prune(self, keep: Path) -> None:
        """Remove complete checkpoints older than the newest ``total_limit`` up to ``keep``, and unfinished saves.
        Newer ones (left by a run that resumed from an earlier step) stay until this run overwrites them."""
        done = [p for p in self.complete_in(self.root) if p.name <= keep.name]
        for old in done[: max(0, len(done) - max(1, self.total_limit))]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)

    def clear(self) -> None:
        """A fresh start: remove the checkpoints of the run being replaced (``--overwrite_output_dir``)."""
        if self.accelerator.is_main_process and self.root.is_dir():
            for path in self.root.glob("step_*"):
                shutil.rmtree(path, ignore_errors=True)
            (self.root / "latest").unlink(missing_ok=True)
        self.accelerator.wait_for_everyone()

    # ---- choosing and verifying ---------------------------------------------------------------------
    def resolve(self, resume_from: Optional[str]) -> Optional[Path]:
        """The checkpoint to resume from: None (a fresh start), "latest" (the newest intact one, None if there is
        none yet) or an explicit folder (verified; a bad file is a UsageError naming it)."""
        if resume_from is None:
            return self._on_main(self._fresh_start)
        return self._on_main(lambda: self._newest_intact() if resume_from == "latest" else self._explicit(resume_from))

    def _fresh_start(self) -> None:
        held = previous_run(self.root.parent)
        if held and not self.overwrite:
            raise UsageError(f"--output_dir {self.root.parent} already holds {held}: pass --resume_from_checkpoint latest "
                             "to continue it, or --overwrite_output_dir to start again (replacing its checkpoints and "
                             "metrics.jsonl)")

    def _explicit(self, resume_from: str) -> Path:
        path = Path(resume_from)
        if not (path / TRAIN_STATE).is_file():
            raise UsageError(f"--resume_from_checkpoint {resume_from}: not a checkpoint folder (no {TRAIN_STATE})")
        problem = checkpoint_problem(path)
        if problem:
            raise UsageError(f"--resume_from_checkpoint {resume_from}: {problem}")
        return path

    def _newest_intact(self) -> Optional[Path]:
        pointer = self.root / "latest"
        named = self.root / pointer.read_text().strip() if pointer.is_file() else None
        candidates = ([named] if named is not None else []) + \
            [p for p in reversed(self.complete_in(self.root)) if p != named]
        passed = []
        for path in candidates:
            problem = f"{path.name} is missing" if not path.is_dir() else checkpoint_problem(path)
            if problem is None:
                if passed:
                    logger.warning("resuming from %s instead: %s", path, "; ".join(passed))
                return path
            passed.append(problem if problem.startswith(path.name) else f"{path.name}: {problem}")
        held = previous_run(self.root.parent)
        if not passed and held is None:
            return None                                              # nothing yet: the first start
        found = f"no intact checkpoint in {self.root.parent} ({'; '.join(passed)})" if passed else \
            f"{self.root.parent} holds {held} but no checkpoint"
        if self.overwrite:
            logger.warning("--resume_from_checkpoint latest: %s; starting again (--overwrite_output_dir)", found)
            return None
        raise UsageError(f"--resume_from_checkpoint latest: {found}; nothing was changed. "
                         "Pass --overwrite_output_dir to start again")

    def _on_main(self, decide: Callable[[], Any]) -> Any:
        """Run ``decide`` on the main process only (it reads every file) and give its result, or its UsageError,
        to every process."""
        acc = self.accelerator
        outcome: Any = None
        if acc.is_main_process:
            try:
                outcome = ("ok", decide())
            except UsageError as err:
                outcome = ("error", str(err))
        if acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            outcome = broadcast_object_list([outcome])[0]
        if outcome[0] == "error":
            raise UsageError(outcome[1])
        return outcome[1]

    # ---- loading ---------------------------------------------------------------------------------------
    def load(self, path: Path) -> TrainState:
        """Restore model, optimizer, scheduler and RNG states; a checkpoint of another model is a UsageError
        saying which config settings differ."""
        self._on_main(lambda: self._check_model(path))
        try:
            self.accelerator.load_state(str(path))
        except Exception as err:  # noqa: BLE001 - torch, safetensors and pickle errors share no base class
            raise UsageError(f"cannot load checkpoint {path}: {type(err).__name__}: {loading.first_line(err, 200)}") from None
        return TrainState(**json.loads((path / TRAIN_STATE).read_text()))

    def _model(self) -> Optional[nn.Module]:
        models = getattr(self.accelerator, "_models", [])
        return self.accelerator.unwrap_model(models[0]) if models else None

    def _model_config(self) -> Optional[dict[str, Any]]:
        """The model's config as JSON values (saved in each checkpoint, compared on resume)."""
        config = getattr(self._model(), "config", None)
        if config is None or not hasattr(config, "to_dict"):
            return None
        return json.loads(json.dumps(config.to_dict(), default=str))

    def _check_model(self, path: Path) -> None:
        model, weights = self._model(), path / "model.safetensors"
        if model is None:
            return
        saved_config = json.loads((path / MODEL_CONFIG).read_text()) if (path / MODEL_CONFIG).is_file() else None
        differ = config_differences(saved_config, self._model_config()) if saved_config is not None else []
        mismatch = None
        sharded = getattr(self.accelerator.state, "fsdp_plugin", None) or getattr(self.accelerator.state, "deepspeed_plugin", None)
        if weights.is_file() and not sharded:           # FSDP / ZeRO hold other shapes locally: load_state checks
            here = {k: tuple(v.shape) for k, v in model.state_dict().items()}
            for key, shape in loading.safetensors_shapes(weights).items():
                if key not in here:
                    mismatch = f"{key} is in the checkpoint, not in this model"
                    break
                if here[key] != shape:
                    mismatch = f"{key} is {list(shape)} there and {list(here[key])} here"
                    break
        if mismatch:
            settings = f"settings that differ (checkpoint -> this run): {', '.join(differ)}; " if differ else ""
            raise UsageError(f"--resume_from_checkpoint {path} holds a different model: {settings}{mismatch}. "
                             "Resume with the model settings it was saved with")
        if differ:
            logger.warning("resuming %s with settings that differ from the checkpoint's (checkpoint -> this run): %s",
                           path, ", ".join(differ))


def config_differences(saved: dict[str, Any], current: Optional[dict[str, Any]], limit: int = 6) -> list[str]:
    """``key saved -> current`` for the config values that differ (the emergence settings compared as settings)."""
    if current is None:
        return []

    def comparable(config: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in config.items() if k not in VOLATILE_CONFIG_KEYS}
        if isinstance(out.get("emergence_init"), dict):
            out["emergence_init"] = {k: v for k, v in out["emergence_init"].items() if k in SETTING_NAMES}
        return out

    a, b = comparable(saved), comparable(current)
    differ = [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return differ[:limit] + ([f"and {len(differ) - limit} more"] if len(differ) > limit else [])


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def manifest(folder: Path) -> dict[str, Any]:
    """Size and SHA-256 of every file under ``folder`` (except the manifest itself), by relative path."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    return {"files": {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": sha256(p)} for p in files}}


def checkpoint_problem(path: Path) -> Optional[str]:
    """Why the checkpoint folder ``path`` cannot be resumed from, naming the bad file; None if it is intact.

    Checked: ``train_state.json`` is a training state; every file the ``manifest.json`` written at save time lists
    exists with its size and SHA-256. Checkpoints from before manifests are checked for their structure instead:
    safetensors headers against file sizes, and torch-saved files (``*.bin``, ``*.pkl``) as zip archives with
    their CRCs.
    """
    state_file = path / TRAIN_STATE
    if not state_file.is_file():
        return f"{TRAIN_STATE} is missing"
    try:
        state = json.loads(state_file.read_text())
        TrainState(**state)
        if not all(isinstance(state.get(k), int) and state[k] >= 0
                   for k in ("completed_steps", "epoch", "batches_in_epoch", "samples_seen")):
            raise TypeError("counters must be integers >= 0")
    except (ValueError, TypeError, UnicodeDecodeError) as err:
        return f"{TRAIN_STATE} is not a training state ({loading.first_line(err, 120)})"
    if (path / MANIFEST).is_file():
        try:
            listed = json.loads((path / MANIFEST).read_text())["files"]
        except (ValueError, KeyError, TypeError):
            return f"{MANIFEST} is unreadable"
        for rel, expected in listed.items():
            file = path / rel
            if not file.is_file():
                return f"{rel} is missing"
            size = file.stat().st_size
            if size != expected["size"]:
                return f"{rel} has {size} bytes, {expected['size']} when saved"
            if sha256(file) != expected["sha256"]:
                return f"{rel} was changed after it was saved (SHA-256 differs)"
        return None
    return _structure_problem(path)


def _structure_problem(path: Path) -> Optional[str]:
    """The checks for a checkpoint written without a manifest."""
    if not any(path.glob("model*.safetensors")) and not any(path.glob("pytorch_model*")):
        return "the model weights (model.safetensors) are missing"
    for file in sorted(path.glob("*.safetensors")):
        problem = loading.safetensors_problem(file)
        if problem:
            return problem
    for file in sorted([*path.glob("*.bin"), *path.glob("*.pkl")]):
        try:
            with zipfile.ZipFile(file) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError):
            return f"{file.name} is truncated or not a torch-saved file"
        if bad is not None:
            return f"{file.name} is corrupt (member {bad} fails its CRC)"
    return None


def start_run(accelerator: Accelerator, args: argparse.Namespace, checkpoints: Checkpoints,
              resume_path: Optional[Path], data: Optional[dict[str, Any]] = None) -> tuple[TrainState, "MetricsLog"]:
    """The training state and the metrics log: a checkpoint's (the log keeps its records up to that step), or
    step 0 (the checkpoints of a run that ``--overwrite_output_dir`` replaces are removed now, not earlier).

    ``data`` describes what the batches are drawn from (e.g. training examples, batches per epoch and process); with
    the process count added, it is saved with every checkpoint and compared on resume. The batch order is a function
    of these and the seed, so a difference is a warning naming each value: the run goes on from the checkpoint, but
    its batches from there on are not those of an uninterrupted run (a dropped unreadable file, another data folder)."""
    data = {**data, "processes": accelerator.num_processes} if data else {}
    if resume_path is not None:
        state = checkpoints.load(resume_path)
        logger.info("resumed from %s at step %d (epoch %d)", resume_path, state.completed_steps, state.epoch)
        changed = [f"{k} {state.data[k]} -> {v}" for k, v in data.items() if k in state.data and state.data[k] != v]
        if changed:
            logger.warning("%s was saved while training on other data (checkpoint -> this run): %s; training goes "
                           "on, but its batches from here on are not those of an uninterrupted run",
                           resume_path, "; ".join(changed))
        state.data = data
    else:
        state = TrainState(data=data)
        checkpoints.clear()
    log = MetricsLog(accelerator, args.output_dir, args.with_tracking, state.completed_steps if resume_path else None)
    return state, log


def is_due(every: int | str | None, state: TrainState, epoch_end: bool) -> bool:
    """Whether a periodic action (eval, checkpoint) is due now: every N optimizer steps, or at epoch ends."""
    if every is None:
        return False
    if every == "epoch":
        return epoch_end
    return not epoch_end and state.completed_steps % int(every) == 0


# ------------------------------------------------------------------------------------------------ logs
class MetricsLog:
    """``<output_dir>/metrics.jsonl``, one JSON record per line, written by the main process.

    On resume, records after the checkpoint's step are dropped so the file reads as one uninterrupted run.
    """

    def __init__(self, accelerator: Accelerator, output_dir: str | os.PathLike, with_tracking: bool,
                 resume_step: Optional[int] = None):
        self.accelerator, self.with_tracking = accelerator, with_tracking
        self.path = Path(output_dir) / "metrics.jsonl"
        if accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            kept = []
            if resume_step is not None and self.path.exists():
                records = [l for l in self.path.read_text().splitlines() if l]
                kept = [l for l in records               # a resumed run writes its own final record
                        if json.loads(l).get("step", 0) <= resume_step and not json.loads(l).get("final")]
            atomic_write(self.path, "".join(l + "\n" for l in kept))

    def log(self, record: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.with_tracking:
            self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record.get("step"))


class Timer:
    """Wall time split into waiting for data and computing, for the throughput lines of the log."""

    def __init__(self) -> None:
        self.data = self.total = 0.0
        self.items = 0
        self._mark = self.started = time.perf_counter()

    def data_ready(self) -> None:
        now = time.perf_counter()
        self.data += now - self._mark
        self.total += now - self._mark
        self._mark = now

    def step_done(self, items: int) -> None:
        now = time.perf_counter()
        self.total += now - self._mark
        self._mark = now
        self.items += items

    def restart(self) -> None:
        """Start the next interval now: time spent since the last step (evaluation, checkpointing) is not counted."""
        self._mark = time.perf_counter()

    def summary(self) -> dict[str, float]:
        out = {"items_per_s": self.items / self.total if self.total else 0.0,
               "data_wait_share": self.data / self.total if self.total else 0.0}
        self.data = self.total = 0.0
        self.items = 0
        return out


# ---------------------------------------------------------------------------------------------- metrics
def load_metric(name: str) -> Any:
    """An offline `evaluate` metric from ``examples/metrics/<name>`` (sacrebleu_offline, accuracy_offline)."""
    import evaluate

    return evaluate.load(str(METRICS_DIR / name))


# ------------------------------------------------------------------------------------------ final save
def save_final(accelerator: Accelerator, model: nn.Module, args: argparse.Namespace, *, processing_class: Any = None,
               title: str, task: str, auto_class: str, example: str, datasets: tuple[str, ...] = (),
               metrics: Optional[dict[str, float]] = None, extra_files: Optional[dict[str, str]] = None,
               usage: Optional[str] = None) -> None:
    """``save_pretrained`` (HF models) or ``model.safetensors`` + ``config.json`` (plain modules) plus the
    processing class, a model card and ``all_results.json``; then ``--push_to_hub``."""
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    out = Path(args.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if hasattr(unwrapped, "save_pretrained"):
            unwrapped.save_pretrained(out)
        else:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in unwrapped.state_dict().items()}, str(out / "model.safetensors"))
        if processing_class is not None:
            processing_class.save_pretrained(out)
        for name, text in (extra_files or {}).items():
            atomic_write(out / name, text)
        config = getattr(unwrapped, "config", None)
        settings = getattr(config, "emergence_init", None) if config is not None else None
        training = {k: getattr(args, k) for k in ("init", "learning_rate", "optimizer", "per_device_train_batch_size",
                                                  "max_train_steps", "num_train_epochs", "num_warmup_steps", "seed")}
        card = model_card(title=title, model_class=type(unwrapped).__name__, settings=settings,
                          plan=getattr(unwrapped, "emergence_plan", None), task=task, datasets=datasets,
                          metrics=metrics, auto_class=auto_class, training=training, example=example, usage=usage)
        atomic_write(out / "README.md", card)
        atomic_write(out / "all_results.json", json.dumps(metrics or {}, indent=2))
        logger.info("saved model, card and results to %s", out)
    accelerator.wait_for_everyone()
    if args.push_to_hub and accelerator.is_main_process:
        url = push_folder(out, args.hub_model_id, token=args.hub_token, private=args.private)
        logger.info("pushed to %s", url)
