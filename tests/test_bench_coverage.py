"""benchmarks/bench_coverage.py on two tiny model types: the rows it records and the report it writes."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_coverage", ROOT / "benchmarks" / "bench_coverage.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shrink_lowers_sizes_and_cuts_per_layer_lists():
    from transformers import AutoConfig

    bench = _bench()
    config = bench.shrink(AutoConfig.for_model("qwen2_moe"))
    assert (config.num_hidden_layers, config.hidden_size, config.num_experts, len(config.layer_types)) == (2, 32, 4, 2)
    swin = bench.shrink(AutoConfig.for_model("swin"))
    assert list(swin.depths) == [1, 1, 1, 1] and list(swin.num_heads) == [1, 1, 1, 1]


def test_measure_and_report(tmp_path):
    bench = _bench()
    rows = {t: bench.measure(t) for t in ("bert", "mixtral")}
    for row in rows.values():
        assert row["status"] == "ok" and row["source"] == "traced" and row["order"] == "model"
        assert row["factor_errors"] == 0 and row["unlisted"] == [] and row["meta_agrees"]
    assert rows["mixtral"]["meta_order"] == "fake" and rows["bert"]["left_out_reasons"]["embedding"] == 3
    rows["gone"] = {"model_type": "gone", "status": "unbuildable", "error": "ValueError: x"}
    summary = bench.write_report(tmp_path, rows, "python benchmarks/bench_coverage.py")
    assert summary["built"] == 2 and summary["share_registry_or_traced"] == 1.0 and summary["crashes"] == []
    assert json.loads((tmp_path / "coverage.json").read_text())["summary"] == summary
    assert "**100.0%**" in (tmp_path / "coverage.md").read_text()
