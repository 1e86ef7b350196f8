"""The evaluation harness end to end on a tiny configuration: outputs, table shape and invariants."""
import csv
import dataclasses
from pathlib import Path
import json
import math

import numpy as np
import pytest

from malloc_kernels.eval import EvalConfig, build_grid, run
from malloc_kernels.eval.cli import build_parser, config_from_args, main
from malloc_kernels.eval.report import pareto_front


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    # A small real-format dataset (one user per line: `user item item ...`) keeps training to seconds; histories
    # are long enough (70-110) that KIVI's residual window (32) and group (32) leave a quantized part.
    rng = np.random.default_rng(0)
    lines = []
    for u in range(60):
        n = int(rng.integers(70, 111))
        start = int(rng.integers(1, 150))
        items = (start + np.cumsum(rng.integers(0, 4, n))) % 200 + 1
        lines.append(" ".join(map(str, [u + 1, *items.tolist()])))
    data = out / "sequences.txt"
    data.write_text("\n".join(lines) + "\n")
    cfg = EvalConfig(data=str(data), models=("hstu", "sasrec"),
                     methods=("int8", "kivi4", "kivi2", "int4", "nvfp4", "int2", "h2o", "tova", "recent", "chunk",
                              "h2o+kivi4", "mqa", "msn", "rwkv"),
                     budgets=(1.0, 0.5, 0.25), bits=(8, 4, 2), variants=("mqa", "msn", "rwkv"), max_len=100,
                     request_size=4,
                     users=40, batch_size=20, d_model=16, n_layers=2, n_heads=2, epochs=1, out=str(out),
                     cache=str(out / "ckpt"), progress=False)
    result = run(cfg, log=lambda m: None)
    return cfg, out, result["rows"]


def _row(rows, model, method, budget):
    hits = [r for r in rows if r["model"] == model and r["method"] == method and r["budget"] == budget]
    assert len(hits) == 1, (model, method, budget, hits)
    return hits[0]


def test_all_four_outputs_written(tiny_run):
    _, out, rows = tiny_run
    for name in ("accuracy.md", "accuracy.csv", "resources.md", "resources.csv", "pareto.png", "results.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    with open(out / "accuracy.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows)
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert meta["config"]["seed"] == 0 and "torch" in meta


def test_native_equals_no_cache(tiny_run):
    _, _, rows = tiny_run
    for model in ("hstu", "sasrec"):
        native, recompute = _row(rows, model, "native", "100%"), _row(rows, model, "no-cache", "100%")
        for m in ("HR@10", "NDCG@10", "MRR", "GAUC"):
            assert native[m] == pytest.approx(recompute[m], abs=1e-12), m


def test_full_budget_equals_native(tiny_run):
    _, _, rows = tiny_run
    for model in ("hstu", "sasrec"):
        native = _row(rows, model, "native", "100%")
        for method in ("h2o", "recent"):
            full = _row(rows, model, method, "100%")
            assert full["NDCG@10"] == pytest.approx(native["NDCG@10"], abs=1e-12)
            assert full["bytes_per_user"] == native["bytes_per_user"]


def test_bytes_decrease_with_budget_and_bits(tiny_run):
    _, _, rows = tiny_run
    for model in ("hstu", "sasrec"):
        for method in ("h2o", "recent", "chunk", "h2o+kivi4"):
            b = [_row(rows, model, method, f"{p}%")["bytes_per_user"] for p in (100, 50, 25)]
            assert b[0] > b[1] > b[2], (method, b)
        for fam in (("int8", "int4", "int2"),):
            b = [_row(rows, model, m, f"{bits}-bit")["bytes_per_user"] for m, bits in zip(fam, (8, 4, 2))]
            assert b[0] > b[1] > b[2], b
        assert _row(rows, model, "kivi4", "4-bit")["bytes_per_user"] > _row(rows, model, "kivi2", "2-bit")[
            "bytes_per_user"]
        native = _row(rows, model, "native", "100%")
        assert _row(rows, model, "int8", "8-bit")["ratio"] < 1.0 == native["ratio"]


def test_nvfp4_row(tiny_run):
    # the harness row of the NVFP4 format: 4.5 bits per value when 16 divides the head dim, keys and values alike
    _, _, rows = tiny_run
    for model in ("hstu", "sasrec"):
        row = _row(rows, model, "nvfp4", "4-bit")
        assert row["level"] == "precision" and 0 < row["NDCG@10"] <= 1
        assert row["bytes_per_user"] < _row(rows, model, "int8", "8-bit")["bytes_per_user"]
        # head dim 8 here: one partial 8-value group per row (4 code bytes + 1 scale byte) vs int4's fp16 scale+zero
        assert row["bytes_per_user"] < _row(rows, model, "int4", "4-bit")["bytes_per_user"]


def test_hybrid_is_cheaper_than_its_parts(tiny_run):
    _, _, rows = tiny_run
    for model in ("hstu", "sasrec"):
        assert _row(rows, model, "h2o+kivi4", "50%")["bytes_per_user"] < _row(rows, model, "h2o", "50%")[
            "bytes_per_user"]


def test_rwkv_architecture_row(tiny_run):
    # MALLOC's architecture level: RWKV-4 served from its recurrent state, whose bytes per user are the state's
    # (2 layers x (length int32 + 5 x 16 float32)), constant in the history length, far below the native cache
    _, _, rows = tiny_run
    for model in ("hstu", "sasrec"):
        native, rwkv = _row(rows, model, "native", "100%"), _row(rows, model, "rwkv", "100%")
        assert rwkv["level"] == "architecture" and 0 < rwkv["NDCG@10"] <= 1
        assert rwkv["bytes_per_user"] == 2 * (4 + 5 * 16 * 4)
        assert rwkv["ratio"] == pytest.approx(rwkv["bytes_per_user"] / native["bytes_per_user"]) and rwkv["ratio"] < 0.1
        assert rwkv["macs_per_request"] > 0 and rwkv["memory_table_bytes"] == 0
    # one architecture, one trained model: the row is the same under both tables
    assert _row(rows, "hstu", "rwkv", "100%")["NDCG@10"] == _row(rows, "sasrec", "rwkv", "100%")["NDCG@10"]


def test_mqa_variant_stores_one_kv_head(tiny_run):
    _, _, rows = tiny_run
    for model in ("hstu", "sasrec"):
        native, mqa = _row(rows, model, "native", "100%"), _row(rows, model, "mqa", "100%")
        assert mqa["level"] == "head"
        assert mqa["bytes_per_user"] < native["bytes_per_user"]


def test_msn_variant_row(tiny_run):
    _, out, rows = tiny_run
    for model in ("hstu", "sasrec"):
        native, msn = _row(rows, model, "native", "100%"), _row(rows, model, "msn", "100%")
        assert msn["level"] == "memory"
        assert msn["memory_table_bytes"] > 0 == native["memory_table_bytes"]
        assert msn["params"] > native["params"]
        # the memory is per token: the KV cache is the native one
        assert msn["bytes_per_user"] == native["bytes_per_user"]
        assert msn["latency_ms"] > 0 and 0.0 <= msn["NDCG@10"] <= msn["HR@10"] <= 1.0
    with open(out / "resources.csv") as f:
        header = next(csv.reader(f))
    assert "params" in header and "memory_table_bytes" in header


def test_rerun_resumes_without_recomputing(tiny_run, monkeypatch):
    cfg, _, rows = tiny_run
    import malloc_kernels.eval.runner as runner

    def boom(*a, **k):
        raise AssertionError("a finished row was evaluated again")
    monkeypatch.setattr(runner, "evaluate_specs", boom)
    again = run(cfg, log=lambda m: None)["rows"]
    assert [(r["model"], r["method"], r["budget"], r["NDCG@10"]) for r in again] == \
        [(r["model"], r["method"], r["budget"], r["NDCG@10"]) for r in rows]


def test_grid_covers_every_level():
    levels = {s.level for s in build_grid()}
    assert {"baseline", "precision", "pruning", "merging", "hybrid", "head", "sequence", "memory"} <= levels


@pytest.mark.parametrize("argv, match", [
    (["--budgets", "0"], "argument --budgets: '0' is not in"),
    (["--budgets", "-0.5"], "argument --budgets"),
    (["--budgets", "1.5"], "argument --budgets"),
    (["--budgets", "nan"], "argument --budgets: 'nan' is not a finite number"),
    (["--budgets", ""], "argument --budgets: empty list"),
    (["--methods", ""], "argument --methods: empty list"),
    (["--methods", "nosuch"], "argument --methods: 'nosuch' is not one of"),
    (["--variants", ""], "argument --variants: empty list"),
    (["--variants", "foo"], "argument --variants: 'foo' is not one of"),
    (["--bits", "3"], "argument --bits: '3' is not one of"),
    (["--epochs", "-1"], "argument --epochs: must be >= 0, got '-1'"),
    (["--model", "gpt"], "argument --model"),
    (["--request-size", "0"], "argument --request-size"),
    (["--seed", str(2 ** 70)], "argument --seed"),
    (["--variants", "none,mqa"], "--variants: 'none' cannot be combined"),
    (["--max-len", "8", "--request-size", "8"], "max_len"),
    (["--data", "/nonexistent/ratings.dat"], "/nonexistent/ratings.dat"),
])
def test_bad_configuration_is_one_error_line(argv, match, tmp_path, capsys):
    """Bad input: exit code 2 and ONE stderr line 'malloc-eval: error: ...' naming the option or file."""
    try:
        rc = main(argv + ["--out", str(tmp_path), "--no-progress"])
    except SystemExit as e:                 # argparse's own exit (option types)
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("malloc-eval: error: "), err
    assert match in lines[0], lines[0]


@pytest.mark.parametrize("content, match", [
    (b"", "no users found"),
    (bytes(range(256)) * 4, "not UTF-8 text"),          # the loader names file:line and the byte
    (b"1::2\n", "4 fields"),
])
def test_bad_data_file_names_the_file(content, match, tmp_path, capsys):
    f = tmp_path / ("ratings.dat" if content.startswith(b"1::") else "data.txt")
    f.write_bytes(content)
    rc = main(["--data", str(f), "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and str(f) in err[0] and match in err[0], err


def test_debug_flag_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="neither an embedded dataset"):
        main(["--data", str(tmp_path / "missing"), "--out", str(tmp_path), "--debug"])


def test_cli_entry_point_has_no_traceback(tmp_path):
    """The real entry point (``python -m malloc_kernels.eval``) in a fresh process."""
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-m", "malloc_kernels.eval", "--budgets", "0.5,", "--out", str(tmp_path)],
                       capture_output=True, text=True, cwd=str(Path(__file__).resolve().parents[1]))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip() == "malloc-eval: error: argument --budgets: '0.5,' has an empty element: give token " \
                               "ratios in (0, 1], comma separated"


def test_pareto_front():
    pts = [(1.0, 0.1), (2.0, 0.3), (3.0, 0.2), (4.0, 0.4), (0.5, 0.05)]
    assert pareto_front(pts) == [4, 0, 1, 3]


def test_full_recipe_matches_the_acceptance_training_and_flags_override():
    full = config_from_args(build_parser().parse_args(["--full"]))
    assert (full.epochs, full.full_softmax, full.schedule, full.warmup_steps, full.uptrain_epochs) == \
        (24, True, "cosine", 100, 3)
    assert full.time_budget_min == 45.0 and full.users == 1000
    assert full.windows == "last" and full.train_batch_size == 32   # the 24-epoch ML-1M checkpoints keep their keys
    quick = config_from_args(build_parser().parse_args([]))
    assert (quick.epochs, quick.full_softmax, quick.schedule, quick.warmup_steps, quick.uptrain_epochs,
            quick.windows, quick.max_len, quick.train_batch_size) == (15, True, "cosine", 50, 2, "all", 200, 16)
    over = config_from_args(build_parser().parse_args(["--loss", "sampled", "--uptrain-epochs", "0"]))
    assert not over.full_softmax and over.uptrain_epochs == 0 and over.schedule == "cosine"


def test_popularity_row_and_bootstrap_intervals(tiny_run):
    _, out, rows = tiny_run
    for model in ("hstu", "sasrec"):
        pop = _row(rows, model, "popularity", "-")
        native = _row(rows, model, "native", "100%")
        assert pop["users"] == native["users"] and pop["level"] == "baseline"
        assert pop["dNDCG@10_lo"] <= pop["dNDCG@10"] <= pop["dNDCG@10_hi"]
        assert native["dNDCG@10_lo"] == native["dNDCG@10_hi"] == 0.0 and not native["significant"]
        recompute = _row(rows, model, "no-cache", "100%")
        assert not recompute["significant"]
        for r in rows:
            if r["model"] == model and "dNDCG@10_lo" in r:
                assert r["dNDCG@10_lo"] <= r["dNDCG@10"] + 1e-12 and r["dNDCG@10"] <= r["dNDCG@10_hi"] + 1e-12
                assert r["significant"] == (r["dNDCG@10_lo"] > 0 or r["dNDCG@10_hi"] < 0)
    md = (out / "accuracy.md").read_text()
    assert "popularity" in md and "dNDCG@10 95% CI" in md


def test_uptrained_variant_starts_from_the_base(tiny_run, tmp_path):
    cfg, _, _ = tiny_run
    import dataclasses
    up = dataclasses.replace(cfg, methods=("mqa", "linformer"), variants=("mqa", "linformer"), models=("hstu",),
                             uptrain_epochs=1, out=str(tmp_path))
    result = run(up, log=lambda m: None)
    meta = json.loads((tmp_path / "results.json").read_text())["meta"]
    for variant in ("mqa", "linformer"):
        assert meta["training"][f"hstu/{variant}"]["init_from"].startswith("hstu-"), meta["training"]
        row = _row(result["rows"], "hstu", variant, "100%")
        # a hit at rank r < 10 scores 1 / log2(r + 2) in [1 / log2(11), 1]: NDCG@10 lies in [HR@10 / log2(11), HR@10]
        assert row["HR@10"] / math.log2(11) - 1e-12 <= row["NDCG@10"] <= row["HR@10"] + 1e-12, row
    assert meta["training"]["hstu/base"]["init_from"] == ""


def test_train_batch_size_keys_the_run_and_keeps_old_keys():
    from malloc_kernels.eval.runner import EvalConfig
    # the key of the committed quick-run results (benchmarks/results/quick_eval/results_hstu.json), made before
    # the field existed: a batch of 32 keeps it
    old = EvalConfig(models=("hstu",), epochs=15, full_softmax=True, schedule="cosine", warmup_steps=50,
                     uptrain_epochs=2, windows="all", train_batch_size=32)
    assert old.run_key() == "1e7108a82efd"
    assert dataclasses.replace(old, train_batch_size=16).run_key() != old.run_key()
    over = config_from_args(build_parser().parse_args(["--train-batch-size", "8"]))
    assert over.train_batch_size == 8


def test_attended_entries_count_only_the_query_buckets():
    """The MACs model of a Reformer row: a query reads the entries sharing one of its buckets, not the whole cache
    (one round: sum_b n_b^2 / n; several: the union over rounds, pairs counted once); other caches: every entry."""
    import torch
    from malloc_kernels.cache.types import KVCache
    from malloc_kernels.eval.runner import _attended_entries, _stored_entries
    from malloc_kernels.models.recommender import SequentialRecommender
    from malloc_kernels.models.reformer import LSHCache

    k = torch.randn(5, 1, 4)
    off = torch.tensor([0, 4, 5])            # user 0: 4 entries, user 1: 1 entry
    pos = torch.tensor([0, 1, 2, 3, 0])
    kv = SequentialRecommender._cache_from_jagged(k, k.clone(), off, pos, None)
    assert isinstance(kv, KVCache)
    one = torch.zeros(2, 1, 4, 1, dtype=torch.uint8)
    one[0, 0, :, 0] = torch.tensor([0, 0, 1, 2])
    got = _attended_entries([LSHCache(kv=kv, bucket=one, n_buckets=4)])
    assert got.tolist() == [(4 + 1 + 1) / 4, 1.0]
    two = torch.zeros(2, 1, 4, 2, dtype=torch.uint8)
    two[0, 0, :3] = torch.tensor([[0, 0], [0, 1], [1, 1]])   # 0~1 (round 0), 1~2 (round 1), 0 !~ 2
    two[0, 0, 3] = torch.tensor([3, 3])
    got = _attended_entries([LSHCache(kv=kv, bucket=two, n_buckets=4)])
    assert got.tolist() == [(4 + 2 + 2) / 4, 1.0]
    assert torch.equal(_attended_entries([kv]), _stored_entries([kv]))
