"""The report tools in ``tools/``: the README's ML-1M summary table (``eval_summary.py``) and the MSN comparison's
epoch matching and slot-usage selection (``msn_compare.py``)."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(model, level, method, budget, ndcg, nbytes, hr=0.2, latency=1.0):
    return {"dataset": "toy", "model": model, "level": level, "method": method, "budget": budget, "NDCG@10": ndcg,
            "HR@10": hr, "bytes_per_user": nbytes, "latency_ms": latency}


def _table_rows(text):
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")]


def test_eval_summary_side_by_side(tmp_path):
    summary = _tool("eval_summary")
    rows = [_row("hstu", "baseline", "native", "100%", 0.10, 1000), _row("sasrec", "baseline", "native", "100%", 0.08, 2000),
            _row("hstu", "pruning", "h2o", "25%", 0.09, 250), _row("sasrec", "pruning", "h2o", "25%", 0.085, 500),
            _row("hstu", "pruning", "h2o", "50%", 0.095, 500), _row("sasrec", "pruning", "h2o", "50%", 0.07, 1000),
            _row("hstu", "precision", "int4", "4-bit", 0.1, 200), _row("sasrec", "precision", "int4", "4-bit", 0.08, 500),
            _row("hstu", "memory", "msn", "100%", 0.11, 1000)]
    table = _table_rows(summary.summarise(rows))
    head, body = table[0], table[1:]
    assert head[:4] == ["level", "method", "budget", "bytes ratio"]
    assert [r[:3] for r in body] == [["baseline", "native", "100%"], ["precision", "int4", "4-bit"],
                                     ["pruning", "h2o", "50%"], ["pruning", "h2o", "25%"], ["memory", "msn", "100%"]]
    by = {tuple(r[1:3]): dict(zip(head, r)) for r in body}
    assert by[("h2o", "25%")]["bytes ratio"] == "0.250"            # the same for both models: one figure
    assert by[("int4", "4-bit")]["bytes ratio"] == "0.200 / 0.250"  # differs: both, in model order
    assert by[("h2o", "50%")]["sasrec NDCG@10 (change)"] == "0.0700 (-0.0100)"
    assert by[("msn", "100%")]["sasrec NDCG@10 (change)"] == "-"   # a model without the row
    # several results files: the first file's row wins, later files only add rows
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"rows": rows[:2]}))
    b.write_text(json.dumps({"rows": [_row("hstu", "baseline", "native", "100%", 0.5, 1000), rows[-1]]}))
    merged = _table_rows(summary.main([str(a), str(b)]))
    assert [r[1] for r in merged[1:]] == ["native", "msn"]
    assert merged[1][4] == "0.1000 (+0.0000)" and merged[2][4] == "0.1100 (+0.0100)"


def _report(curve):
    return {"curve": curve, "test": {"NDCG@10": 0.1}, "train_seconds": curve[-1]["train_seconds"], "params": 1,
            "memory_table_bytes": 0, "model": {}}


def test_msn_compare_whole_epoch_slot_usage_and_matching():
    tool = _tool("msn_compare")
    usage = lambda hit: [{"fraction_hit": hit}]  # noqa: E731
    curve = [{"epoch": 1.0, "train_seconds": 60, "slot_usage": usage(0.9)},
             {"epoch": 2.0, "train_seconds": 120, "slot_usage": usage(0.8),
              "valid": {"NDCG@10": 0.05, "HR@10": 0.1}},
             {"epoch": 2.01, "train_seconds": 121, "slot_usage": usage(0.1),
              "valid": {"NDCG@10": 0.06, "HR@10": 0.11}}]
    msn = tool._summary(_report(curve))
    assert msn["slot_usage"] == usage(0.8)  # the sliver of an epoch a time budget leaves is not "the last epoch"
    assert [p["epoch"] for p in msn["valid_curve"]] == [2.0, 2.01]
    base = tool._summary(_report([{"epoch": 2.0, "train_seconds": 100, "valid": {"NDCG@10": 0.04, "HR@10": 0.09}}]))
    assert base["slot_usage"] is None
    lines = tool._epoch_matched(base, msn)
    assert lines[2:] == ["| 2 | 0.0400 | 0.0500 | 0.0900 | 0.1000 |"]


def test_msn_compare_rejects_msn_in_shared_arguments():
    with pytest.raises(ValueError, match="--msn"):
        _tool("msn_compare").main(["--", "--msn"])
