"""Real engines: FSDP2 ``fully_shard`` with 2 CPU processes over gloo (tests/fsdp_worker.py) and, opt-in,
DeepSpeed ZeRO-3 on CPU (tests/deepspeed_worker.py; ``HF_EMERGENCE_TEST_DEEPSPEED=1``, run by .ci/run as its own step).

Every route is compared with a single process that uses the same seeds, bit for bit.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
MODELS = ["marian", "mlp"]   # a registered Transformer and an unregistered MLP with uneven (9/8-row) shards


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(worker: str, out: Path, timeout: int, *, launcher: list[str] | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(TESTS / worker), str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = json.loads(out.read_text())["ranks"]
    assert len(ranks) == 2
    return ranks


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    return _launch("fsdp_worker.py", tmp_path_factory.mktemp("fsdp") / "out.json", timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_fsdp2_apply_before_sharding_is_bit_identical_and_trains(fsdp, name):
    for rank in fsdp:
        assert rank[f"{name}/sharded"] is True
        assert rank[f"{name}/apply_before_shard_differs"] == []
        assert rank[f"{name}/step_loss_finite"] is True and rank[f"{name}/step_changed"] is True


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_fsdp2_per_shard_route_is_bit_identical(fsdp, name):
    for rank in fsdp:
        handled, planned = rank[f"{name}/per_shard_handled"]
        assert handled == planned > 0
        assert rank[f"{name}/per_shard_differs"] == []


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_fsdp2_apply_after_sharding_redraws_like_one_process(fsdp, name):
    """Each rank keeps its slice of the full draw: the gathered weights equal a single-process re-draw."""
    for rank in fsdp:
        assert rank[f"{name}/apply_after_shard_redraw_differs"] == []
        assert rank[f"{name}/halves_differ"] is True
        assert rank[f"{name}/guard_after_shard"] is True


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_fsdp2_redraw_with_ranks_seeded_differently_is_refused(fsdp, name):
    for rank in fsdp:
        assert rank[f"{name}/different_seeds"].startswith("the ranks hold different RNG states")


DEEPSPEED = os.environ.get("HF_EMERGENCE_TEST_DEEPSPEED") == "1"


@pytest.fixture(scope="module")
def zero3(tmp_path_factory):
    if not DEEPSPEED:
        pytest.skip("opt-in: HF_EMERGENCE_TEST_DEEPSPEED=1 (.ci/run runs it as its own step, with deepspeed installed)")
    return _launch("deepspeed_worker.py", tmp_path_factory.mktemp("zero3") / "out.json", timeout=900)


@pytest.mark.slow
def test_zero3_accelerate_route_of_the_docs(zero3):
    """Initialise before the Accelerator exists; prepare partitions the initialised weights unchanged; a step runs."""
    for rank in zero3:
        assert rank["zero3_before_accelerator"] is False and rank["zero3_after_accelerator"] is True
        assert rank["engine"] == "DeepSpeedEngine" and rank["partitioned"] is True
        assert rank["prepare_differs"] == []
        assert rank["step_loss_finite"] is True and rank["step_changed"] is True


@pytest.mark.slow
@pytest.mark.parametrize("label", ["keep", "redraw"])
def test_zero3_apply_on_a_partitioned_model_equals_one_process(zero3, label):
    for rank in zero3:
        assert rank[f"{label}/built_partitioned"] is True
        assert rank[f"{label}/apply_differs"] == []
        assert rank[f"{label}/guard"] is True


@pytest.mark.slow
def test_zero3_from_config_applies_after_transformers_zero3_init(zero3):
    for rank in zero3:
        assert rank["from_config/applied"] is True
        low, high = rank["from_config/std_over_planned"]
        assert 0.8 < low <= high < 1.2                    # every planned tensor: base std x alpha**k
    assert zero3[0] == zero3[1]


@pytest.mark.slow
def test_zero3_direct_build_of_a_mixin_class_warns_instead_of_a_silent_no_op(zero3):
    for rank in zero3:
        assert rank["zero_init_direct/warned"] is True and rank["zero_init_direct/applied"] is False
