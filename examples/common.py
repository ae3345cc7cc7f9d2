"""Machinery shared by ``examples/translation/run.py`` and ``examples/vision/run.py``.

Plain functions and two small classes, no framework: each script keeps the accelerate order visible
in its ``main()`` (accelerator -> seed -> data -> model -> optimizer/scheduler -> prepare -> loop ->
eval -> save). What lives here: the argument groups both scripts share (transformers' flag names plus
every ``EmergenceInit`` setting), the init/baseline switch, the per-layer-LR control, an epoch-seeded
(and optionally length-grouped) batch sampler, atomic checkpoints with exact resume, the metrics log,
the non-finite-loss guard, offline metrics, and saving/pushing the final model with its card.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.nn as nn
from accelerate import Accelerator
from torch.utils.data import Sampler

from hf_emergence import EmergenceInit, EmergencePlan
from hf_emergence.emergence_init import SETTING_CHOICES, SETTING_NAMES
from hf_emergence import config_overrides as _config_overrides
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


def run_cli(main: Callable[[Optional[Sequence[str]]], Any], argv: Optional[Sequence[str]] = None) -> int:
    """Run ``main(argv)``; print a :class:`UsageError` / :class:`NonFiniteLoss` as one line instead of a traceback."""
    try:
        main(argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLoss as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except HubError as err:
        print(f"error: {err}", file=sys.stderr)
        return 4
    return 0


# ------------------------------------------------------------------------------------------- arguments
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
    g.add_argument("--per_layer_lr_from_plan", action="store_true",
                   help="control: give each planned tensor the learning rate the emergence plan implies, "
                        "lr*alpha**(-2k) for SGD and lr*alpha**(-k) for AdamW, whatever --init is")


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
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping (0 disables)")


def add_run_args(parser: argparse.ArgumentParser, default_output_dir: str) -> None:
    g = parser.add_argument_group("run control")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--output_dir", default=default_output_dir)
    g.add_argument("--eval_steps", type=steps_or_epoch, default="epoch", help="evaluate every N steps or each epoch")
    g.add_argument("--checkpointing_steps", type=steps_or_epoch, default=None, help="save state every N steps or each epoch")
    g.add_argument("--checkpoints_total_limit", type=int, default=2, help="keep only the newest N checkpoints")
    g.add_argument("--resume_from_checkpoint", default=None, help='a checkpoint folder, or "latest" in --output_dir')
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


def add_diagnostics_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("diagnostics")
    g.add_argument("--measure_emergence", action="store_true",
                   help="log the emergence E and print the activation profile on a fixed validation batch at init "
                        "and at every evaluation")


def check_common_args(args: argparse.Namespace) -> None:
    """Combination checks for the shared flags (done at the end of each script's parse_args)."""
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.learning_rate <= 0 or not math.isfinite(args.learning_rate):
        raise UsageError(f"--learning_rate must be a positive number, got {args.learning_rate}")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        raise UsageError(f"--max_train_steps must be >= 1, got {args.max_train_steps}")
    if args.push_to_hub and not args.hub_model_id:
        raise UsageError("--push_to_hub needs --hub_model_id (e.g. your-name/marian-emergence)")
    if args.per_device_eval_batch_size is None:
        args.per_device_eval_batch_size = 2 * args.per_device_train_batch_size
    emergence_settings(args)  # validates the init flags now, before any data is read


# ------------------------------------------------------------------------------------ config overrides
def parse_config_overrides(text: Optional[str]) -> dict[str, Any]:
    """``"a=1,b=[2,3],c=true,d=gelu"`` -> dict; :func:`hf_emergence.config_overrides.parse_config_overrides` as a UsageError."""
    try:
        return _config_overrides.parse_config_overrides(text)
    except _config_overrides.ConfigOverrideError as err:
        raise UsageError(str(err)) from None


def apply_config_overrides(config: Any, text: Optional[str]) -> Any:
    """Set each override on ``config``; an unknown key or rejected value is a UsageError naming the model type and key."""
    try:
        return _config_overrides.apply_config_overrides(config, text)
    except _config_overrides.ConfigOverrideError as err:
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
    accelerator = Accelerator(cpu=not has_device, gradient_accumulation_steps=args.gradient_accumulation_steps,
                              log_with=args.report_to if args.with_tracking else None, project_dir=args.output_dir)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO if accelerator.is_local_main_process else logging.ERROR)
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


# ------------------------------------------------------------------------------------------ data order
class EpochBatchSampler(Sampler[list[int]]):
    """Batches of indices whose order depends only on (seed, epoch), so a resumed run replays it exactly.

    With ``lengths``, indices are grouped by length: the shuffled indices are cut into windows of
    ``window`` batches, each window is sorted by length and cut into batches, then the batches are
    shuffled. Padding per batch is small while every epoch still sees a fresh order.

    The epoch is chosen with :meth:`use_epoch`, deliberately not ``set_epoch``: a prepared accelerate
    DataLoader calls ``set_epoch`` with its own iteration counter, which restarts at 0 after a resume.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, *, shuffle: bool = True,
                 lengths: Optional[Sequence[int]] = None, drop_last: bool = False, window: int = 50):
        if num_items < 1:
            raise UsageError("the dataset is empty")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.shuffle, self.lengths, self.drop_last, self.window = shuffle, lengths, drop_last, window
        self.epoch = 0

    def use_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_items, generator=g).tolist() if self.shuffle else list(range(self.num_items))
        if self.lengths is not None:
            span = self.batch_size * self.window
            order = [i for s in range(0, len(order), span)
                     for i in sorted(order[s:s + span], key=lambda j: -self.lengths[j])]
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.lengths is not None and self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        full, rest = divmod(self.num_items, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)


# ---------------------------------------------------------------------------------------- optimisation
def make_optimizer(model: nn.Module, args: argparse.Namespace, plan: Optional[EmergencePlan] = None) -> torch.optim.Optimizer:
    """AdamW or SGD; no weight decay on 1-D tensors (biases, norms). With ``plan`` (the per-layer-LR control),
    a planned tensor with factor c = alpha**k gets lr / c**2 under SGD and lr / c under AdamW, the learning
    rates under which the base init follows the emergence-init trajectory of a scale-invariant layer."""
    factors = plan.factors() if plan is not None else {}
    power = 2 if args.optimizer == "sgd" else 1
    groups: dict[tuple[bool, float], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = (p.ndim >= 2, factors.get(name, 1.0) ** -power)
        groups.setdefault(key, []).append(p)
    param_groups = [{"params": ps, "weight_decay": args.weight_decay if decay else 0.0, "lr": args.learning_rate * scale}
                    for (decay, scale), ps in sorted(groups.items())]
    if args.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=args.learning_rate, momentum=args.momentum)
    return torch.optim.AdamW(param_groups, lr=args.learning_rate, betas=(0.9, args.adam_beta2))


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


def optimizer_step(accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                   loss: torch.Tensor, args: argparse.Namespace, state: "TrainState", checkpoints: "Checkpoints"
                   ) -> Optional[float]:
    """Backward, then (on the micro-batch that completes an accumulation) clip/check the gradient norm and step.

    Call inside ``accelerator.accumulate(model)``: the prepared optimizer and scheduler skip the other micro-batches.
    Returns the gradient norm, or None when no step was taken.
    """
    accelerator.backward(loss)
    grad_norm = clip_and_check(accelerator, model, args, state, checkpoints) if accelerator.sync_gradients else None
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
                 grad_norm: Optional[float], scheduler: Any, timer: "Timer", unit: str) -> dict[str, Any]:
    """One training record: loss, gradient norm, learning rate, ``<unit>_per_s`` over all processes, data wait share."""
    speed = timer.summary()
    record = {"step": state.completed_steps, "epoch": state.epoch, "loss": float(loss.detach()), "grad_norm": grad_norm,
              "lr": scheduler.get_last_lr()[0], f"{unit}_per_s": speed["items_per_s"] * accelerator.num_processes,
              "data_wait_share": speed["data_wait_share"]}
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


class Checkpoints:
    """Atomic checkpoints under ``<output_dir>/checkpoints``.

    ``save`` writes ``step_N.tmp`` with ``accelerator.save_state`` plus ``train_state.json``, renames it to
    ``step_N`` only when complete, then atomically rewrites the ``latest`` pointer; a kill at any point
    leaves the previous checkpoint and pointer intact. Older checkpoints beyond ``total_limit`` are removed.
    """

    def __init__(self, accelerator: Accelerator, output_dir: str | os.PathLike, total_limit: int = 2):
        self.accelerator, self.root, self.total_limit = accelerator, Path(output_dir) / "checkpoints", total_limit

    def latest(self) -> Optional[Path]:
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        return path if (path / "train_state.json").is_file() else None

    def save(self, state: TrainState) -> Path:
        acc = self.accelerator
        final = self.root / f"step_{state.completed_steps:08d}"
        tmp = final.with_name(final.name + ".tmp")
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            atomic_write(tmp / "train_state.json", json.dumps(asdict(state), indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            atomic_write(self.root / "latest", final.name)
            self._prune(keep=final)
        acc.wait_for_everyone()
        return final

    def _prune(self, keep: Path) -> None:
        done = sorted(p for p in self.root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in done[: max(0, len(done) - max(1, self.total_limit))]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)

    def resolve(self, resume_from: Optional[str]) -> Optional[Path]:
        """The checkpoint to resume from: None, "latest" (None if there is none yet) or an explicit folder."""
        if resume_from is None:
            return None
        if resume_from == "latest":
            return self.latest()
        path = Path(resume_from)
        if not (path / "train_state.json").is_file():
            raise UsageError(f"--resume_from_checkpoint {resume_from}: not a checkpoint folder (no train_state.json)")
        return path

    def load(self, path: Path) -> TrainState:
        self.accelerator.load_state(str(path))
        return TrainState(**json.loads((path / "train_state.json").read_text()))


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
        self._mark = time.perf_counter()

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
