"""EpochBatchSampler (examples/common.py) across processes and by token budget: every process gets the same number
of batches, every index is used exactly once per epoch, and skipping the first batches (a resume) continues the epoch
exactly. The two-process case runs under ``accelerate launch --multi_gpu --num_processes 2`` (gloo on CPU)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from common import EpochBatchSampler, UsageError  # noqa: E402

# (name, sampler keyword arguments): the length-grouped ones put the short batch mid-epoch, where accelerate's
# batch-sampler sharding used to drop a whole round on one process (issue 14).
N = 203
LENGTHS = [(i * 37) % 61 + 1 for i in range(N)]
CASES = {
    "random_order": dict(batch_size=8),
    "by_length": dict(batch_size=8, lengths=LENGTHS, window=3),
    "by_length_drop_last": dict(batch_size=8, lengths=LENGTHS, window=3, drop_last=True),
    "by_tokens": dict(batch_size=1, lengths=LENGTHS, max_tokens=300),
}


def _check_epoch(batches: list[list[int]], drop_last: bool = False) -> None:
    flat = [i for b in batches for i in b]
    assert len(flat) == len(set(flat))                                      # no index twice
    if not drop_last:
        assert sorted(flat) == list(range(N))                               # every index once


@pytest.mark.parametrize("num_processes", [1, 2, 3, 4])
@pytest.mark.parametrize("case", sorted(CASES))
def test_batch_count_is_a_multiple_of_the_processes_and_every_index_is_used_once(case, num_processes):
    kw = CASES[case]
    s = EpochBatchSampler(N, seed=1, num_processes=num_processes, **kw)
    assert len(s) % num_processes == 0 and s.batch_size is None
    single = EpochBatchSampler(N, seed=1, **kw)
    assert len(s) - len(single) < num_processes                             # at most P-1 batches were halved
    for epoch in range(3):
        s.use_epoch(epoch)
        batches = list(s)
        assert len(batches) == len(s)
        _check_epoch(batches, drop_last=kw.get("drop_last", False))
        if "max_tokens" in kw:
            assert all(len(b) * max(LENGTHS[i] for i in b) <= kw["max_tokens"] for b in batches)


def test_token_batches_keep_their_sizes_but_change_their_items_each_epoch():
    s = EpochBatchSampler(N, 1, seed=3, lengths=LENGTHS, max_tokens=300)
    epochs = []
    for epoch in range(2):
        s.use_epoch(epoch)
        epochs.append(list(s))
    assert sorted(map(len, epochs[0])) == sorted(map(len, epochs[1]))
    assert sorted(map(sorted, epochs[0])) != sorted(map(sorted, epochs[1]))
    # the greedy cut of the sorted lengths: batches cover consecutive length ranges, each one is as full as the budget
    # allows (one more item, of the next batch's shortest length, would not fit)
    ranges = sorted((min(LENGTHS[i] for i in b), max(LENGTHS[i] for i in b), len(b)) for b in epochs[0])
    for (_, high, n), (low_next, _, _) in zip(ranges, ranges[1:]):
        assert high <= low_next and (n + 1) * low_next > 300
    assert sum(len(b) for b in epochs[0]) == N


def test_too_few_items_for_the_processes_is_a_usage_error():
    with pytest.raises(UsageError, match="3 training items cannot give 4 processes the same number of batches"):
        EpochBatchSampler(3, 8, seed=0, num_processes=4)
    with pytest.raises(ValueError, match="max_tokens needs the lengths"):
        EpochBatchSampler(3, 8, seed=0, max_tokens=10)


WORKER = textwrap.dedent("""
    import json, sys
    import torch
    from accelerate import Accelerator
    from torch.utils.data import DataLoader
    sys.path.insert(0, {examples!r})
    sys.path.insert(0, {tests!r})
    from common import EpochBatchSampler
    from test_batch_sampler import CASES, N

    acc = Accelerator(cpu=True)
    out = {{}}
    for name, kw in CASES.items():
        sampler = EpochBatchSampler(N, seed=5, num_processes=acc.num_processes, **kw)
        dl = acc.prepare(DataLoader(list(range(N)), batch_sampler=sampler))
        rows = []
        for epoch in range(3):
            sampler.use_epoch(epoch)
            seen = [b.tolist() for b in dl]
            resumed = [b.tolist() for b in acc.skip_first_batches(dl, 2)]
            rows.append({{"len": len(dl), "seen": seen, "resumed": resumed, "all": list(sampler)}})
        out[name] = rows
    gathered = [None] * acc.num_processes
    torch.distributed.all_gather_object(gathered, out)
    if acc.is_main_process:
        with open(sys.argv[1], "w") as f:
            json.dump(gathered, f)
    # end like the examples: without the barrier and teardown, a rank that exits while gloo's threads still run
    # aborts ("terminate called without an active exception") and fails the launch
    acc.wait_for_everyone()
    acc.end_training()
""")


@pytest.mark.slow
def test_two_processes_see_the_same_number_of_batches_and_every_index_once(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(examples=str(ROOT / "examples"), tests=str(ROOT / "tests")))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = tmp_path / "seen.json"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no", str(script),
           str(result)]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = json.loads(result.read_text())
    assert len(ranks) == 2
    for name, kw in CASES.items():
        for epoch in range(3):
            rows = [rank[name][epoch] for rank in ranks]
            planned = rows[0]["all"]
            assert rows[1]["all"] == planned and len(planned) % 2 == 0
            unequal = len({len(b) for b in planned}) > 1
            assert unequal, name                                            # the uneven case is exercised
            for r, row in enumerate(rows):
                assert len(row["seen"]) == row["len"] == len(planned) // 2   # what the loop's epoch bookkeeping expects
                assert row["seen"] == planned[r::2]                          # round robin, nothing dropped or repeated
                assert row["resumed"] == row["seen"][2:]                     # a mid-epoch resume continues exactly
            _check_epoch(rows[0]["seen"] + rows[1]["seen"], drop_last=kw.get("drop_last", False))
