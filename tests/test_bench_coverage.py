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
    rows["gone"] = {"model_type": "gone", "status": "unbuildable", "error": "ValueError: x",
                    "transformers": rows["bert"]["transformers"]}
    commands = bench.command_history(tmp_path, "python benchmarks/bench_coverage.py", 3)
    summary = bench.write_report(tmp_path, rows, commands)
    assert summary["built"] == 2 and summary["share_registry_or_traced"] == 1.0 and summary["crashes"] == []
    assert json.loads((tmp_path / "coverage.json").read_text())["summary"] == summary
    assert "**100.0%**" in (tmp_path / "coverage.md").read_text()
    report = (tmp_path / "coverage.md").read_text()
    assert f"transformers {rows['bert']['transformers']}," in report   # every row measured by this version
    # a later command that measures a type again is appended to the ones before, and the rows say their version
    rows["bert"]["transformers"] = "0.0.1"
    later = bench.command_history(tmp_path, "python benchmarks/bench_coverage.py --only bert --redo", 1)
    assert [c["command"] for c in later] == ["python benchmarks/bench_coverage.py",
                                             "python benchmarks/bench_coverage.py --only bert --redo"]
    summary = bench.write_report(tmp_path, rows, later)
    report = (tmp_path / "coverage.md").read_text()
    assert "--only bert --redo    #" in report and "0.0.1 (1 rows)" in report and summary["rows_by_transformers"]["0.0.1"] == 1
    assert bench.command_history(tmp_path, None, 0) == later                # --report alone adds none


def test_report_on_a_fresh_clone_keeps_the_committed_rows(tmp_path):
    """results.jsonl is a local log (gitignored): ``--report`` without it rewrites the committed rows, not none."""
    bench = _bench()
    rows = {"gone": {"model_type": "gone", "status": "unbuildable", "error": "ValueError: x", "transformers": "5.0.0"},
            "bert": bench.measure("bert")}
    committed = bench.write_report(tmp_path, rows, bench.command_history(tmp_path, "python benchmarks/bench_coverage.py", 2))
    before = json.loads((tmp_path / "coverage.json").read_text())
    assert not (tmp_path / "results.jsonl").exists()
    assert bench.main(["--report", "--out", str(tmp_path)]) == 0
    after = json.loads((tmp_path / "coverage.json").read_text())
    assert after["rows"] == before["rows"] and after["summary"] == committed and after["summary"]["built"] == 1
    assert after["meta"]["commands"] == before["meta"]["commands"]
    # a local log's later row for a type replaces the committed one
    (tmp_path / "results.jsonl").write_text(json.dumps({**rows["bert"], "status": "crash"}) + "\n")
    assert bench.load_results(tmp_path)["bert"]["status"] == "crash" and "gone" in bench.load_results(tmp_path)
