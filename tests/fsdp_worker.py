"""FSDP2 (``fully_shard``) checks on CPU over gloo, run by tests/test_distributed.py with 2 processes:

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_worker.py OUT.json

Every rank computes the single-process reference itself (same seeds), shards a copy, runs one route of
docs/scaling.md and compares the gathered weights with the reference. Rank 0 writes {check: result} to OUT.json.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_emergence import EmergenceInit, already_applied  # noqa: E402
from tiny_models import MLP, hf_factory  # noqa: E402

ALPHA = 1.3


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return MLP(widths=(12, 17, 17, 17, 5)) if name == "mlp" else hf_factory(name)()   # 17 rows: uneven 9/8 shards


def shard(model: nn.Module, mesh) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            for block in module:
                fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def gathered(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in model.named_parameters()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names whose tensors differ (empty: bit-identical)."""
    return sorted(n for n in a if not torch.equal(a[n], b[n]))


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    warnings.simplefilter("ignore")
    results: dict[str, object] = {}
    keep = EmergenceInit(alpha=ALPHA, base_init="keep")
    redraw = EmergenceInit(alpha=ALPHA, base_init="xavier_uniform")
    for name in ("marian", "mlp"):
        reference = build(name)
        plan = keep.apply(reference)
        ref = gathered(reference)
        torch.manual_seed(1)
        redrawn_reference = build(name)
        torch.manual_seed(1)
        redraw.apply(redrawn_reference)
        ref_redraw = gathered(redrawn_reference)

        # 1. apply before sharding, then a training step
        model = build(name)
        keep.apply(model)
        shard(model, mesh)
        results[f"{name}/apply_before_shard_differs"] = same(gathered(model), ref)
        results[f"{name}/sharded"] = all(hasattr(p, "full_tensor") for p in model.parameters())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        batch = ({"input_ids": torch.tensor([[5, 6, 7, 2]]), "labels": torch.tensor([[8, 9, 2]])} if name == "marian"
                 else {"input": torch.randn(4, 12, generator=torch.Generator().manual_seed(rank))})
        output = model(**batch) if name == "marian" else model(batch["input"])
        loss = output.loss if name == "marian" else output.square().mean()
        loss.backward()
        optimizer.step()
        after = gathered(model)
        results[f"{name}/step_loss_finite"] = bool(torch.isfinite(loss))
        results[f"{name}/step_changed"] = sum(not torch.equal(after[n], ref[n]) for n in ref) > 0

        # 2. per shard: the plan made before sharding, applied to each rank's local shards
        model = build(name)
        plan_before = keep.plan(model)
        shard(model, mesh)
        local = {n: p.to_local() for n, p in model.named_parameters()}
        handled = plan_before.apply_to_state_dict_(local, reinit=False)
        results[f"{name}/per_shard_handled"] = [len(handled), len(plan_before)]
        results[f"{name}/per_shard_differs"] = same(gathered(model), ref)

        # 3. apply() after sharding with a base-init re-draw: each rank keeps its slice of the full draw
        model = shard(build(name), mesh)
        torch.manual_seed(1)
        redraw.apply(model)
        now = gathered(model)
        results[f"{name}/apply_after_shard_redraw_differs"] = same(now, ref_redraw)
        first = plan.entries[0].name
        halves = now[first].chunk(2)
        results[f"{name}/halves_differ"] = not torch.equal(halves[0][: len(halves[1])], halves[1])
        results[f"{name}/guard_after_shard"] = bool(already_applied(model))

        # 4. ranks seeded differently: the re-draw is refused on every rank
        model = shard(build(name), mesh)
        torch.manual_seed(100 + rank)
        try:
            redraw.apply(model)
            results[f"{name}/different_seeds"] = "accepted"
        except RuntimeError as err:
            results[f"{name}/different_seeds"] = str(err)
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, results)
    if rank == 0:
        Path(out).write_text(json.dumps({"ranks": every}, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
