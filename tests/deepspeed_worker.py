"""DeepSpeed ZeRO-3 checks on CPU over gloo, run by tests/test_distributed.py with 2 processes (opt-in):

    python -m torch.distributed.run --nproc_per_node 2 tests/deepspeed_worker.py OUT.json

1. The Accelerate + ZeRO-3 route of docs/scaling.md: the model is built and initialised before the
   ``Accelerator`` exists; ``prepare`` partitions it into a DeepSpeedEngine; the gathered weights equal the
   initialised ones bit for bit, and a training step runs.
2. ``apply`` on a ``zero.Init``-partitioned model (the ZeRO-3 config is registered by the Accelerator)
   equals a single-process ``apply`` on the same weights, with and without a base-init re-draw.
3. ``hf_emergence.from_config`` under ZeRO-3 applies the init after transformers' ``initialize_weights_zero3``.
4. A mixin class built directly inside ``deepspeed.zero.Init`` warns that the init was not applied.
Rank 0 writes {check: result} of every rank to OUT.json.
"""

from __future__ import annotations

import copy
import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import DeepSpeedPlugin  # noqa: E402
from transformers.initialization import no_init_weights  # noqa: E402
from transformers.integrations import is_deepspeed_zero3_enabled  # noqa: E402

from hf_emergence import EmergenceInit, EmergenceInitMixin, already_applied, from_config  # noqa: E402
from hf_emergence.base_init import base_std  # noqa: E402
from tiny_models import CONFIGS, hf_class, hf_config  # noqa: E402

ALPHA = 1.3
DS_CONFIG = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True,
             "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
BATCH = {"input_ids": torch.tensor([[5, 6, 7, 2]]), "labels": torch.tensor([[8, 9, 2]])}


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    params = list(model.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
        return {n: p.detach().clone() for n, p in params}


def differs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    return sorted(n for n in a if not torch.equal(a[n], b[n]))


def main(out: str) -> None:
    warnings.simplefilter("ignore")
    results: dict[str, object] = {}
    # 1. docs route: initialise the full model first, then Accelerator + prepare
    results["zero3_before_accelerator"] = is_deepspeed_zero3_enabled()
    torch.manual_seed(0)
    model = from_config(CONFIGS["marian"][2], hf_config("marian"), alpha=ALPHA)
    initialised = {n: p.detach().clone() for n, p in model.named_parameters()}
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=copy.deepcopy(DS_CONFIG)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, optimizer = accelerator.prepare(model, optimizer)
    results["engine"] = type(engine).__name__
    results["partitioned"] = all(hasattr(p, "ds_id") for p in engine.module.parameters())
    results["prepare_differs"] = differs(full_state(engine.module), initialised)
    loss = engine(**BATCH).loss
    accelerator.backward(loss)
    optimizer.step()
    results["step_loss_finite"] = bool(torch.isfinite(loss.detach()))
    results["step_changed"] = len(differs(full_state(engine.module), initialised)) > 0
    results["zero3_after_accelerator"] = is_deepspeed_zero3_enabled()

    # 2. apply on a zero.Init-partitioned model == a single-process apply on the same weights
    cls = hf_class("marian")
    for label, init in (("keep", EmergenceInit(alpha=ALPHA, base_init="keep")),
                        ("redraw", EmergenceInit(alpha=ALPHA, base_init="xavier_uniform"))):
        torch.manual_seed(0)
        partitioned = cls._from_config(hf_config("marian"))      # built inside deepspeed.zero.Init
        results[f"{label}/built_partitioned"] = all(p.numel() == 0 for p in partitioned.parameters())
        single = cls(hf_config("marian"))                         # a plain model holding the same weights
        single.load_state_dict(full_state(partitioned), strict=False)
        torch.manual_seed(1)
        plan = init.apply(partitioned)
        torch.manual_seed(1)
        assert init.apply(single) == plan
        results[f"{label}/apply_differs"] = differs(full_state(partitioned), dict(single.named_parameters()))
        results[f"{label}/guard"] = bool(already_applied(partitioned))

    # 3. from_config under ZeRO-3: applied after initialize_weights_zero3
    torch.manual_seed(0)
    hooked = from_config(CONFIGS["marian"][2], hf_config("marian"), alpha=ALPHA)
    plan = hooked.emergence_plan
    results["from_config/applied"] = plan is not None and hooked.config.emergence_init.get("applied") is True
    state = full_state(hooked)
    ratios = []
    for entry in plan:
        expected = base_std(plan.base_init, entry.fan_in, entry.fan_out) * entry.factor
        ratios.append(float(state[entry.name].double().std()) / expected)
    results["from_config/std_over_planned"] = [min(ratios), max(ratios)]

    # 4. a mixin class built directly inside deepspeed.zero.Init: not applied during construction, and it says so
    class Mixed(EmergenceInitMixin, cls):
        pass

    config = hf_config("marian")
    config.emergence_init = EmergenceInit(alpha=ALPHA).to_dict()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=copy.deepcopy(DS_CONFIG)):   # as transformers does
            direct = Mixed(config)
    results["zero_init_direct/warned"] = any("built inside deepspeed.zero.Init" in str(w.message) for w in caught)
    results["zero_init_direct/applied"] = getattr(direct, "emergence_plan", None) is not None
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, results)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps({"ranks": every}, indent=1))
    dist.barrier()                  # no rank exits while another's comm threads run (an abort fails the launch)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
