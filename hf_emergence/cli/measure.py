"""``hf-emergence measure``: the emergence E and the activation profile of a saved checkpoint on one batch."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Optional

import torch

from ..emergence_init import EmergenceInit
from ..loading import first_line, load_pretrained, recorded_settings
from .shared import CLIError, add_command, plan_for, print_json


HELP = "emergence E and activation profile of a local checkpoint on a batch"
DESCRIPTION = """\
Load a local checkpoint and report the emergence E (hf_emergence.measure.emergence) and the per-layer activation
profile (activation_profile) on one batch. The batch is --inputs FILE (a .safetensors or .pt dict of tensors,
passed as keyword arguments to the model), or by default random inputs built from the config:
pixel_values ~ N(0, 1) of shape (batch_size, num_channels, image_size, image_size) for vision models;
input_ids uniform in [0, vocab_size) of shape (batch_size, seq_len) with an all-ones attention_mask (plus random
decoder_input_ids for encoder-decoders) for text models; drawn from a generator seeded with --seed.
--save_inputs keeps the batch used.
"""


def add_parser(sub: Any, formatter_class: type) -> None:
    p = add_command(sub, "measure", run, help=HELP, description=DESCRIPTION, formatter_class=formatter_class)
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


def run(args: argparse.Namespace) -> None:
    from ..measure import activation_profile, emergence

    if args.batch_size < 1:
        raise CLIError(f"--batch_size must be >= 1, got {args.batch_size}")
    if not (math.isfinite(args.threshold)):
        raise CLIError(f"--threshold must be a finite number, got {args.threshold}")
    if args.inputs and (args.seq_len is not None or args.image_size is not None):
        raise CLIError("--seq_len / --image_size shape random inputs; they cannot be combined with --inputs")
    if args.save_inputs and not args.save_inputs.endswith(".safetensors"):
        raise CLIError(f"--save_inputs {args.save_inputs}: expected a .safetensors file name")
    model = load_pretrained(args.model, args.auto_class).eval()
    config = model.config
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
    plan = plan_for(EmergenceInit.from_dict(recorded), model, batch) if recorded and args.layers == "recorded" else None
    try:
        score = emergence(model, batch, threshold=args.threshold, all_samples=args.all_samples, plan=plan,
                          bn_stats=args.bn_stats)
        profile = None if args.no_profile else activation_profile(model, batch, plan=plan, threshold=args.threshold,
                                                                 bn_stats=args.bn_stats)
    except (TypeError, ValueError, RuntimeError, IndexError) as err:
        raise CLIError(f"the forward pass of {type(model).__name__} on {described} failed: "
                       f"{type(err).__name__}: {first_line(err, 200)}") from None
    if args.json:
        print_json({"model": type(model).__name__, "checkpoint": args.model, "already_applied": recorded is not None,
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
        raise CLIError(f"--inputs {path_arg}: cannot read it ({type(err).__name__}: {first_line(err, 200)})") from None
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
