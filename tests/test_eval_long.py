"""Long-history serving (``malloc_kernels.eval.long``): equal-bytes truncates, buckets, intervals, positions beyond
the training window, cached == recompute at N >= 2,000, and the CLI's one-line errors."""
import json
import math

import numpy as np
import pytest
import torch

from malloc_kernels.data.dataset import make_jagged
from malloc_kernels.data.synthetic import synthetic_dataset
from malloc_kernels.eval import stats as S
from malloc_kernels.eval.cli import main
from malloc_kernels.eval.long import (LongConfig, native_entry_bytes, run_long, select_users, serve_long,
                                      table_rows, truncate_counts)
from malloc_kernels.eval.long_report import long_markdown
from malloc_kernels.eval.methods import build_grid
from malloc_kernels.models import HSTU, SASRec
from malloc_kernels.models.recommender import SequentialRecommender
from malloc_kernels.models.train import TrainConfig
from malloc_kernels.policies import compress
from malloc_kernels.reference.bias import relative_bias


def _write_aligned(ds, folder):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "S_item_x.txt", "w") as f:
        for u, s in zip(ds.user_ids, ds.sequences):
            f.write(f"{u} " + " ".join(map(str, s)) + "\n")
    with open(folder / "S_time_x.txt", "w") as f:
        for u, t in zip(ds.user_ids, ds.timestamps):
            f.write(f"{u} " + " ".join(map(str, t)) + "\n")
    return folder


@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
    """A real (tiny) end-to-end run: synthetic users of 40-700 items in the aligned-file format, models trained one
    epoch with a 32-item window, whole histories served."""
    root = tmp_path_factory.mktemp("long")
    ds = synthetic_dataset(n_users=20, n_items=150, min_len=40, max_len=700, seed=5)
    data = _write_aligned(ds, root / "syn")
    cfg = LongConfig(data=str(data), train_max_len=32, max_len=1024, request_size=4, d_model=16,
                     methods=("int8", "kivi4", "snapkv", "h2o+kivi4"), bits=(8, 4), budgets=(0.25,),
                     buckets=(100, 400), train=TrainConfig(epochs=1), n_boot=200, out=str(root / "out"),
                     resources=(48, 96),
                     cache=str(root / "ckpt"), progress=False)
    result = run_long(cfg, log=lambda m: None)
    return cfg, root, result


def test_outputs_name_method_truncate_and_bucket(long_run):
    cfg, root, result = long_run
    out = root / "out"
    for name in ("long_accuracy.md", "long_accuracy.csv", "long_tradeoff.png", "results.json"):
        assert (out / name).stat().st_size > 0, name
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {r["bucket"] for r in rows} == {"all", "<100", "100-400", ">=400"}
    for model in ("hstu", "sasrec"):
        sel = [r for r in rows if r["model"] == model and r["bucket"] == "all"]
        methods = [r["method"] for r in sel]
        assert methods[:3] == ["native", "popularity", "truncate-32"]
        for m in ("int8", "kivi4", "snapkv", "h2o+kivi4"):
            row = next(r for r in sel if r["method"] == m)
            trunc = next(r for r in sel if r["truncate_of"] == f"{m}@{row['budget']}")
            assert trunc["method"] == "truncate" and trunc["bytes_per_user"] <= row["bytes_per_user"]
            assert not math.isnan(row["d_truncate"]) and row["d_truncate_lo"] <= row["d_truncate_hi"]


def test_resources_at_each_length(long_run):
    out = long_run[1] / "out"
    res = json.loads((out / "resources.json").read_text())
    assert (out / "resources.md").stat().st_size > 0 and (out / "resources.png").stat().st_size > 0
    for model in ("hstu", "sasrec"):
        rows = {(r["method"], r["N"]): r for r in res["model_rows"] if r["model"] == model}
        for n in (48, 96):
            assert rows[("truncate-32", n)]["bytes_per_user"] == rows[("truncate-32", 48)]["bytes_per_user"]
            assert rows[("kivi4", n)]["bytes_per_user"] < rows[("native", n)]["bytes_per_user"]
            assert all(r["request_ms"] > 0 for r in rows.values())
        # native bytes are exactly fixed + N * per-entry: 2 layers x (2 heads' int32 lengths + original length)
        b48, b96 = rows[("native", 48)]["bytes_per_user"], rows[("native", 96)]["bytes_per_user"]
        assert 2 * b48 - b96 == 2 * (4 * 2 + 4)
    if res["attention_rows"]:
        provs = {(r["provider"], r["format"]) for r in res["attention_rows"]}
        assert {("sdpa", "fp32"), ("fused-cpu", "int4"), ("dequant+sdpa", "int4")} <= provs


def _served(arch, n_users=3, length=(60, 300), train_max_len=24, seed=0):
    torch.manual_seed(seed)
    ds = synthetic_dataset(n_users=n_users, n_items=120, min_len=length[0], max_len=length[1], seed=seed)
    model = (HSTU if arch == "hstu" else SASRec)(120, d_model=16, max_len=train_max_len).eval()
    return ds, model


@pytest.mark.parametrize("arch", ["hstu", "sasrec"])
def test_truncate_bytes_match_the_method_within_one_entry(arch):
    ds, model = _served(arch)
    hist = make_jagged([s[:-4] for s in ds.sequences], [t[:-4] for t in ds.timestamps])
    with torch.no_grad():
        native, stats = model.encode_history(hist, return_stats=True, stats_window=4)
        fixed, per = native_entry_bytes(native)
        nbytes = sum(c.nbytes_per_user() for c in native)
        assert torch.equal(nbytes, fixed + per * hist.lengths)      # the affine model is exact
        for method, ratio in (("kivi4", None), ("int8", None), ("h2o+kivi4", 0.25), ("tome", 0.25)):
            caches = [compress(c.k, c.v, method, budget=ratio, positions=c.position,
                                                            timestamps=c.timestamp, lengths=c.length[:, 0],
                                                            stats=stats[i])
                      for i, c in enumerate(native)]
            budget = sum(c.nbytes_per_user() for c in caches)
            k = truncate_counts(budget, hist.lengths, fixed, per)
            keep = [s[len(s) - int(kk):] for s, kk in zip([s[:-4] for s in ds.sequences], k)]
            tk = [t[len(t) - int(kk):] for t, kk in zip([t[:-4] for t in ds.timestamps], k)]
            trunc = model.encode_history(make_jagged(keep, tk))
            tb = sum(c.nbytes_per_user() for c in trunc)
            assert bool((tb <= budget).all()), (method, tb, budget)
            full = k == hist.lengths
            assert bool(((budget - tb < per) | full).all()), (method, tb, budget, per)


@pytest.mark.parametrize("arch", ["hstu", "sasrec"])
def test_long_serving_equals_recompute_beyond_training_length(arch):
    """N >= 2,000 history tokens, 10x the model's 200-item training window: positions clamp, cache == recompute."""
    torch.manual_seed(0)
    ds = synthetic_dataset(n_users=2, n_items=300, min_len=2100, max_len=2400, seed=7)
    model = (HSTU if arch == "hstu" else SASRec)(300, d_model=16, max_len=200).eval()
    r = 5
    hist = make_jagged([s[:-r] for s in ds.sequences], [t[:-r] for t in ds.timestamps])
    req = make_jagged([s[-r:] for s in ds.sequences], [t[-r:] for t in ds.timestamps])
    full = make_jagged(ds.sequences, ds.timestamps)
    assert int(hist.lengths.min()) >= 2000
    with torch.no_grad():
        served = model.serve(req, caches=model.encode_history(hist))
        recomputed = model.last_hidden(full)
    assert torch.isfinite(served).all()
    torch.testing.assert_close(served, recomputed, rtol=1e-4, atol=1e-5)


def test_positions_beyond_training_are_clamped():
    model = SASRec(50, d_model=8, max_len=16, dropout=0.0).eval()
    items = torch.tensor([3, 3, 3])
    e = model.embed(items, torch.tensor([15, 400, 9000]))
    torch.testing.assert_close(e[0], e[1])
    torch.testing.assert_close(e[0], e[2])
    table = torch.randn(2, 16, dtype=torch.float64)
    far = relative_bias(torch.tensor([[5000]]), torch.tensor([[0, 4985]]), table)
    assert far[0, :, 0, 0].tolist() == table[:, 15].tolist()      # distance 5000 -> the last bucket
    assert far[0, :, 0, 1].tolist() == table[:, 15].tolist()      # distance 15 = P - 1


def test_serving_longer_than_supported_is_a_clear_error(monkeypatch):
    model = SASRec(50, d_model=8, max_len=16).eval()
    monkeypatch.setattr(SequentialRecommender, "MAX_SERVE_LEN", 32)
    with pytest.raises(ValueError, match="exceeds the longest this model serves"):
        model.encode_history(torch.randint(1, 50, (1, 40)))
    with pytest.raises(ValueError, match="exceeds the longest this model serves"):
        model.last_hidden(torch.randint(1, 50, (1, 33)))
    caches = model.encode_history(torch.randint(1, 50, (1, 30)))
    with pytest.raises(ValueError, match="exceeds the longest this model serves"):
        model.serve(torch.randint(1, 50, (1, 3)), caches=caches)


def test_bootstrap_is_reproducible_and_detects_a_shift():
    rng = np.random.default_rng(0)
    a = rng.random(300)
    b = a + 0.05 + 0.01 * rng.standard_normal(300)
    r1 = S.paired_bootstrap(a, b, n_boot=500, seed=3)
    assert r1 == S.paired_bootstrap(a, b, n_boot=500, seed=3)
    assert r1 != S.paired_bootstrap(a, b, n_boot=500, seed=4)
    assert r1["significant"] and r1["lo"] <= r1["delta"] <= r1["hi"] and r1["lo"] > 0
    same = S.paired_bootstrap(a, a + 0.01 * rng.standard_normal(300) * 0, n_boot=200, seed=0)
    assert same["delta"] == 0.0 and not same["significant"]
    noise = S.paired_bootstrap(a, rng.permutation(a), n_boot=500, seed=0)
    assert noise["lo"] < 0 < noise["hi"] and not noise["significant"]
    empty = S.paired_bootstrap([], [], seed=0)
    assert math.isnan(empty["delta"]) and not empty["significant"]
    with pytest.raises(ValueError, match="1-D per-user arrays"):
        S.paired_bootstrap([1.0, 2.0], [1.0])


def test_buckets_and_empty_bucket_rows():
    assert S.bucket_labels((200, 1000)) == ["<200", "200-1k", ">=1k"]
    assert S.assign_buckets([5, 199, 200, 999, 1000, 9000], (200, 1000)).tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="increasing"):
        S.bucket_labels((1000, 200))
    from malloc_kernels.eval.long import _Rows
    rows = _Rows(3)
    idx = np.arange(3)
    for key, info in (("native", dict(method="native", level="baseline", budget="100%")),
                      ("truncate-200", dict(method="truncate-200", level="truncate", budget="192 entries"))):
        rows.put(key, idx, np.array([0, 5, 50]), np.array([10.0, 20.0, 30.0]), np.ones(3), 0.1, **info)
    cfg = LongConfig(data="unused", buckets=(200, 1000), n_boot=50)
    out = table_rows("d", "hstu", rows, np.array([10, 50, 150]), np.array([1, 2, 3]), cfg)
    empty = [r for r in out if r["bucket"] in ("200-1k", ">=1k")]
    assert empty and all(r["users"] == 0 and math.isnan(r["NDCG@10"]) for r in empty)
    md = long_markdown(out)
    assert md.count("empty bucket") == 2


def test_sampled_protocol_negatives_are_unseen_and_seeded():
    hist = [np.array([1, 2, 3]), np.array([4, 5])]
    negs = S.sample_negatives(40, [7, 8], hist, num=20, seed=1)
    assert negs.shape == (2, 20)
    assert torch.equal(negs, S.sample_negatives(40, [7, 8], hist, num=20, seed=1))
    for u, (t, h) in enumerate(zip([7, 8], hist)):
        row = set(negs[u].tolist())
        assert len(row) == 20 and t not in row and not row & set(h.tolist())
    scores = torch.zeros(2, 41)
    scores[0, 7] = 1.0           # user 0: target on top; user 1: a tie with every negative counts against it
    assert S.sampled_ranks(scores, torch.tensor([7, 8]), negs).tolist() == [0, 20]
    with pytest.raises(ValueError, match="unseen items"):
        S.sample_negatives(10, [7], [np.arange(1, 7)], num=5)


def test_user_selection_errors(tmp_path):
    ds = synthetic_dataset(n_users=4, n_items=50, min_len=20, max_len=60, seed=0)
    test = ds.split().test
    with pytest.raises(ValueError, match="no test user has >= 500 interactions"):
        select_users(test, LongConfig(data="x", min_history=500))
    with pytest.raises(ValueError, match="<= the training window 200"):
        select_users(test, LongConfig(data="x"))
    sel = select_users(test, LongConfig(data="x", train_max_len=16, max_len=64, users=2))
    assert len(sel) == 2


@pytest.mark.parametrize("argv, match", [
    (["--long", "--max-len", "40000"], "--max-len 40000 exceeds the longest history"),
    (["--max-len", "40000"], "--max-len 40000 exceeds the longest history"),
    (["--long", "--data", "ml-latest-small", "--min-history", "5000"], "no test user has >= 5000 interactions"),
    (["--long", "--negatives", "0"], "argument --negatives: must be >= 1"),
    (["--resources-only"], "--resources-only needs --long"),
    (["--long", "--resources-only", "--no-resources"], "--resources-only cannot be combined with --no-resources"),
])
def test_cli_bad_long_input_is_one_line(argv, match, capsys, tmp_path):
    try:                                        # refused by the parser (exit 2) or by the run (returns 2)
        rc = main(argv + ["--out", str(tmp_path), "--no-progress"])
    except SystemExit as e:
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert match in err and "\n" not in err and "Traceback" not in err


def test_serve_long_rows_cover_every_user_once():
    ds, model = _served("hstu", n_users=5, length=(30, 120), train_max_len=16)
    from malloc_kernels.data.dataset import EvalExamples
    ex = EvalExamples(users=np.arange(5), histories=[s[:-1] for s in ds.sequences],
                      history_timestamps=[t[:-1] for t in ds.timestamps],
                      targets=np.array([s[-1] for s in ds.sequences]), target_timestamps=None)
    cfg = LongConfig(data="x", train_max_len=16, max_len=256, request_size=3, max_tokens=150, progress=False)
    specs = [s for s in build_grid(("kivi4", "snapkv"), (0.25,), (4,), ()) if s.method != "none"]
    rows = serve_long(model, ex, specs, cfg)
    assert set(rows.ranks) == {"native", "truncate-16", "kivi4@4-bit", "truncate@kivi4@4-bit", "snapkv@25%",
                               "truncate@snapkv@25%"}
    for key, r in rows.ranks.items():
        assert (r >= 0).all(), key            # every user served in some batch
    assert (rows.entries["truncate-16"] <= 13).all()


def test_ranker_matches_scoring_every_item():
    """The run's ranker (item table normalised once; sampled rows score only their candidates) gives the ranks of
    ``score_all_items`` + ``target_ranks`` / ``S.sampled_ranks``."""
    from malloc_kernels.eval.long import _Ranker
    from malloc_kernels.models.metrics import target_ranks
    torch.manual_seed(3)
    for arch in ("hstu", "sasrec"):
        model = (HSTU if arch == "hstu" else SASRec)(200, d_model=16, max_len=16).eval()
        h = torch.randn(6, 16)
        targets = torch.randint(1, 201, (6,))
        negs = torch.randint(1, 201, (6, 30))
        rank = _Ranker(model)
        with torch.no_grad():
            scores = model.score_all_items(h)
            assert torch.equal(rank(h, targets, None), target_ranks(scores, targets))
            assert torch.equal(rank(h, targets, negs), S.sampled_ranks(scores, targets, negs))


def test_truncates_of_equal_bytes_are_served_once(monkeypatch):
    """Token-budget methods at one budget spend the same bytes, so their truncates share one encoding; the rows
    still exist for every method and hold the same ranks."""
    ds, model = _served("hstu", n_users=4, length=(60, 120), train_max_len=16)
    from malloc_kernels.data.dataset import EvalExamples
    ex = EvalExamples(users=np.arange(4), histories=[s[:-1] for s in ds.sequences],
                      history_timestamps=[t[:-1] for t in ds.timestamps],
                      targets=np.array([s[-1] for s in ds.sequences]), target_timestamps=None)
    cfg = LongConfig(data="x", train_max_len=16, max_len=256, request_size=3, progress=False)
    specs = [s for s in build_grid(("recent", "streaming", "snapkv"), (0.25,), (4,), ()) if s.method != "none"]
    calls = []
    encode = model.encode_history
    monkeypatch.setattr(model, "encode_history", lambda *a, **k: calls.append(1) or encode(*a, **k))
    rows = serve_long(model, ex, specs, cfg)
    assert len(calls) == 1 + 1 + 1        # native, truncate-16, one truncate shared by the three 25% rows
    for s in specs:
        assert np.array_equal(rows.ranks[f"truncate@{s.key}"], rows.ranks["truncate@recent@25%"])
        assert np.array_equal(rows.bytes[f"truncate@{s.key}"], rows.bytes[f"recent@25%"])


def test_trained_variants_serve_their_own_state_next_to_an_equal_bytes_truncate():
    """``serve_long(variants=...)``: the RWKV row serves every user from its recurrent state (the same bytes at any
    history length; its ranks are those of re-running the whole history) and the Reformer row from its bucketed
    cache (every entry + bucket ids: more bytes than native); each is followed by the base model's truncate at its
    bytes (within one entry, or the whole history when the variant spends more than native)."""
    from malloc_kernels.data.dataset import EvalExamples
    from malloc_kernels.models.config import ModelConfig
    from malloc_kernels.models.factory import build_model
    from malloc_kernels.models.metrics import target_ranks
    ds, model = _served("hstu", n_users=5, length=(30, 150), train_max_len=16)
    torch.manual_seed(1)
    rwkv = build_model(ModelConfig(arch="rwkv", n_items=120, d_model=16, n_layers=2, max_len=16)).eval()
    reformer = build_model(ModelConfig(arch="hstu", n_items=120, d_model=16, n_layers=2, max_len=16,
                                       seq_compress="reformer")).eval()
    ex = EvalExamples(users=np.arange(5), histories=[s[:-1] for s in ds.sequences],
                      history_timestamps=[t[:-1] for t in ds.timestamps],
                      targets=np.array([s[-1] for s in ds.sequences]), target_timestamps=None)
    cfg = LongConfig(data="x", train_max_len=16, max_len=256, request_size=3, max_tokens=200, progress=False)
    rows = serve_long(model, ex, [], cfg, variants={"rwkv": rwkv, "reformer": reformer})
    assert set(rows.ranks) == {"native", "truncate-16", "rwkv", "truncate@rwkv", "reformer", "truncate@reformer"}
    assert rows.info["rwkv"]["level"] == "architecture" and rows.info["reformer"]["level"] == "sequence"
    assert rows.info["truncate@rwkv"]["truncate_of"] == "rwkv"
    assert len(set(rows.bytes["rwkv"].tolist())) == 1 and (rows.entries["rwkv"] == 0).all()
    with torch.no_grad():
        full = make_jagged([list(h) for h in ex.histories], ex.history_timestamps)
        expect = target_ranks(rwkv.score_all_items(rwkv.last_hidden(full)), torch.as_tensor(ex.targets))
    assert np.array_equal(rows.ranks["rwkv"], expect.numpy())
    hist = make_jagged([h[:-3] for h in ex.histories], [t[:-3] for t in ex.history_timestamps])
    with torch.no_grad():
        fixed, per = native_entry_bytes(model.encode_history(hist))
    assert (rows.bytes["truncate@rwkv"] <= rows.bytes["rwkv"]).all()
    assert (rows.bytes["rwkv"] - rows.bytes["truncate@rwkv"] < per).all()
    assert (rows.bytes["reformer"] > rows.bytes["native"]).all()
    assert np.array_equal(rows.bytes["truncate@reformer"], rows.bytes["native"])   # the whole history fits


def test_long_config_rejects_unknown_variants():
    with pytest.raises(ValueError, match="variants"):
        LongConfig(data="x", variants=("lstm",))
