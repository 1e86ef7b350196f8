"""HSTU / SASRec on malloc_kernels.attention: cached serving == full recompute, variants, cache bytes, training."""
import math

import numpy as np
import pytest
import torch

import malloc_kernels
from malloc_kernels.data import make_jagged, synthetic_dataset
from malloc_kernels.models import HSTU, ModelConfig, SASRec, SequentialRecommender, evaluate, rank_metrics
from malloc_kernels.models.metrics import target_ranks
from malloc_kernels.models.train import TrainConfig, checkpoint_key, load_checkpoint, train
from model_serving import forward_and_serve

N_ITEMS = 40
HEADS = {
    "mha": dict(n_heads=2),
    "gqa": dict(heads="gqa", n_heads=4, n_kv_heads=2, head_dim=6),
    "mqa": dict(heads="mqa", n_heads=4, head_dim=6),
    "mla": dict(heads="mla", n_heads=2, latent_dim=10),
}
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _model(arch, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    kw.setdefault("n_heads", 2)
    m = SequentialRecommender(ModelConfig(arch=arch, n_items=N_ITEMS, d_model=12, n_layers=2, max_len=48,
                                          dropout=0.0, **kw))
    return m.to(dtype).eval()


def _ragged(seed, hist_lens, req_lens, with_time=True):
    """Histories (one may be empty), requests, and the concatenated full sequences, padded [B, N]."""
    g = torch.Generator().manual_seed(seed)
    B = len(hist_lens)
    N, R = max(hist_lens), max(req_lens)
    hist = torch.randint(1, N_ITEMS + 1, (B, N), generator=g)
    req = torch.randint(1, N_ITEMS + 1, (B, R), generator=g)
    gaps = torch.randint(0, 10 ** 6, (B, N + R), generator=g)
    ts_all = 1_600_000_000 + torch.cumsum(gaps, 1)
    full = torch.zeros(B, N + R, dtype=torch.int64)
    full_ts = torch.zeros_like(full)
    hist_ts, req_ts = torch.zeros(B, N, dtype=torch.int64), torch.zeros(B, R, dtype=torch.int64)
    for b, (n, r) in enumerate(zip(hist_lens, req_lens)):
        hist[b, n:] = 0
        req[b, r:] = 0
        full[b, :n], full[b, n:n + r] = hist[b, :n], req[b, :r]
        full_ts[b, :n + r] = ts_all[b, :n + r]
        hist_ts[b, :n], req_ts[b, :r] = ts_all[b, :n], ts_all[b, n:n + r]
    t = (lambda x: x) if with_time else (lambda x: None)
    return (hist, t(hist_ts), torch.tensor(hist_lens), req, t(req_ts), torch.tensor(req_lens), full, t(full_ts),
            torch.tensor(hist_lens) + torch.tensor(req_lens))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("arch", ["hstu", "sasrec"])
def test_cached_serving_equals_full_recompute(arch, heads, dtype):
    m = _model(arch, dtype, **HEADS[heads])
    hist, hts, hl, req, rts, rl, full, fts, fl = _ragged(1, [17, 6, 0, 1], [3, 1, 4, 2])
    with torch.no_grad():
        ref = m.last_hidden(full, fts, fl)
        caches = m.encode_history(hist, hts, hl)
        out = m.serve(req, rts, caches, rl)
        scores_ref, scores = m.score_all_items(ref), m.score_all_items(out)
    assert len(caches) == 2 and all(isinstance(c, malloc_kernels.KVCache) for c in caches)
    c = caches[0]
    cfg = m.cfg
    assert c.k.shape == (4, cfg.cache_heads, 17, cfg.cache_dim) and c.k.dtype == dtype
    assert c.length[:, 0].tolist() == [17, 6, 0, 1] and c.original_length.tolist() == [17, 6, 0, 1]
    assert c.position[0, 0].tolist() == list(range(17))
    assert torch.equal(c.timestamp[1, 0, :6], hts[1, :6])
    err = (ref - out).abs().max().item()
    assert err <= TOL[dtype] * max(1.0, ref.abs().max().item()), err
    fin = torch.isfinite(scores_ref)
    assert torch.equal(fin, torch.isfinite(scores)) and not fin[:, 0].any()
    assert (scores_ref[fin] - scores[fin]).abs().max().item() <= TOL[dtype] / cfg.temperature * 10


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_hstu_with_position_embedding_serves_as_recompute(dtype):
    m = _model("hstu", dtype, position_embedding=True)
    assert m.pos_emb is not None and m.pos_emb.weight.shape == (48, 12)
    hist, hts, hl, req, rts, rl, full, fts, fl = _ragged(4, [30, 5, 0], [2, 3, 1])
    with torch.no_grad():
        ref = m.last_hidden(full, fts, fl)
        out = m.serve(req, rts, m.encode_history(hist, hts, hl), rl)
        plain = _model("hstu", dtype).last_hidden(full, fts, fl)
    assert (ref - out).abs().max().item() <= TOL[dtype] * max(1.0, ref.abs().max().item())
    assert (ref - plain).abs().max().item() > 1e-3  # the embedding changes the model


def test_position_embedding_option_and_config_keys():
    assert ModelConfig(arch="sasrec", n_items=5).uses_position_embedding
    assert not ModelConfig(arch="hstu", n_items=5).uses_position_embedding
    assert not ModelConfig(arch="sasrec", n_items=5, position_embedding=False).uses_position_embedding
    assert SequentialRecommender(ModelConfig(arch="sasrec", n_items=5, position_embedding=False)).pos_emb is None
    # the default is left out of the config dict, so checkpoints keyed by older configs keep their keys
    assert "position_embedding" not in ModelConfig(arch="hstu", n_items=5).to_dict()
    assert ModelConfig(arch="hstu", n_items=5, position_embedding=True).to_dict()["position_embedding"] is True
    with pytest.raises(ValueError, match="position_embedding"):
        ModelConfig(arch="hstu", n_items=5, position_embedding="yes")


def test_training_windows_option_keys_checkpoints_and_validates():
    assert "windows" not in TrainConfig().key_fields()          # the original recipe keeps its checkpoint keys
    assert TrainConfig(windows="all").key_fields()["windows"] == "all"
    with pytest.raises(ValueError, match="windows"):
        TrainConfig(windows="some")


def test_hstu_without_timestamps_and_request_of_many_tokens():
    m = _model("hstu")
    hist, _, hl, req, _, rl, full, _, fl = _ragged(2, [9, 4], [5, 5], with_time=False)
    with torch.no_grad():
        caches = m.encode_history(hist, None, hl)
        assert caches[0].timestamp is None
        out = m.serve(req, None, caches, rl, return_all=True)
        ref = m(full, None, fl)
    # every request token (not only the last) matches the full pass
    idx = torch.cat([torch.arange(n, n + r) + b * 0 for b, (n, r) in enumerate(zip(hl.tolist(), rl.tolist()))])
    starts = torch.tensor([0, 14])
    ref_req = torch.cat([ref[starts[b] + hl[b]: starts[b] + hl[b] + rl[b]] for b in range(2)])
    assert idx.numel() == out.shape[0]
    assert (ref_req - out).abs().max().item() < 1e-10


def test_time_and_position_bias_matter():
    m = _model("hstu")
    with torch.no_grad():
        for layer in m.layers:
            layer.time_bias.copy_(torch.linspace(-2, 2, layer.time_bias.numel()))
            layer.pos_bias.copy_(torch.linspace(1, -1, layer.pos_bias.numel()))
    hist, hts, hl, *_ = _ragged(3, [8], [1])
    with torch.no_grad():
        a = m.last_hidden(hist, hts, hl)
        b = m.last_hidden(hist, hts * 7, hl)
    assert (a - b).abs().max() > 1e-6


@pytest.mark.parametrize("arch", ["hstu", "sasrec"])
@pytest.mark.parametrize("variant", [dict(seq_compress="linformer", slots=4),
                                     dict(seq_compress="beacon", beacon_chunk=3),
                                     dict(seq_compress="beacon", beacon_chunk=5, heads="mla", latent_dim=6),
                                     dict(seq_compress="linformer", slots=3, heads="mqa", n_heads=2)])
def test_sequence_compression_serving_matches_training_forward(arch, variant):
    m = _model(arch, **variant)
    full, h, out, caches = forward_and_serve(m, N_ITEMS)
    assert (h - out).abs().max().item() < 1e-10
    c = caches[0]
    assert c.original_length.tolist() == [17, 3, 0, 0]
    if variant["seq_compress"] == "linformer":
        M = variant["slots"]
        assert c.capacity == M and c.length[:, 0].tolist() == [min(n, M) for n in [17, 3, 0, 0]]
        assert c.count[0, 0, 0].item() == pytest.approx(17 / M)
    else:
        w = variant["beacon_chunk"]
        assert c.length[:, 0].tolist() == [math.ceil(n / w) for n in [17, 3, 0, 0]]
        assert c.count[0, 0, :c.length[0, 0]].sum().item() == 17
        assert c.position[0, 0, 0].item() == w - 1
    # compressed training forward differs from the native model (it really uses the compressed cache)
    with torch.no_grad():
        assert (m(full)[full.offsets[1:] - 1] - h).abs().max() > 1e-6


@pytest.mark.parametrize("variant", [dict(seq_compress="linformer", slots=3), dict(seq_compress="beacon",
                                                                                  beacon_chunk=3)])
def test_sequence_compression_with_no_history_at_all(variant):
    m = _model("hstu", **variant)
    full = make_jagged([np.array([1, 2]), np.array([3])])
    with torch.no_grad():
        h = m(full, request_len=5)[full.offsets[1:] - 1]
        assert (h - m.last_hidden(full)).abs().max().item() < 1e-12


def _bytes(caches):
    return sum(c.nbytes_per_user() for c in caches)


def test_cache_bytes_of_head_variants():
    hist, hts, hl, *_ = _ragged(4, [11, 5], [1, 1])
    H, D = 4, 6
    caches = {}
    for name, kw in [("mha", dict(n_heads=H, head_dim=D)), ("gqa", dict(heads="gqa", n_heads=H, n_kv_heads=2,
                                                                          head_dim=D)),
                     ("mqa", dict(heads="mqa", n_heads=H, head_dim=D)),
                     ("mla", dict(heads="mla", n_heads=H, head_dim=D, latent_dim=8))]:
        m = _model("hstu", torch.float32, **kw)
        with torch.no_grad():
            caches[name] = m.encode_history(hist, hts, hl)
    payload = {k: sum(c.k.numel() * c.k.element_size() + c.v.numel() * c.v.element_size() for c in v)
               for k, v in caches.items()}
    assert payload["mqa"] * H == payload["mha"]
    assert payload["gqa"] * 2 == payload["mha"]
    assert payload["mla"] * H * D == payload["mha"] * 8          # one latent "head" of width r=8
    # exact bytes per user (cache contract formula): per layer 4*Hkv + 4 + Hkv*L*(2*D*4 + 4 positions + 8 time)
    for name, (hkv, d) in {"mha": (H, D), "gqa": (2, D), "mqa": (1, D), "mla": (1, 8)}.items():
        want = torch.tensor([2 * (4 * hkv + 4 + hkv * n * (2 * d * 4 + 4 + 8)) for n in (11, 5)])
        assert torch.equal(_bytes(caches[name]), want), name
    mha_kv = _bytes(caches["mha"]) - 2 * (4 * H + 4)
    mqa_kv = _bytes(caches["mqa"]) - 2 * (4 * 1 + 4)
    assert torch.equal(mqa_kv * H, mha_kv)                   # per-entry bytes: MQA = 1/H of MHA


def test_cache_bytes_of_sequence_variants():
    hist, hts, hl, *_ = _ragged(5, [40, 9], [1, 1])
    m = _model("sasrec", torch.float32, seq_compress="linformer", slots=8)
    with torch.no_grad():
        lin = m.encode_history(hist, hts, hl)
        native = _model("sasrec", torch.float32).encode_history(hist, hts, hl)
    # stored entries: 8 slots (+ merge count) vs 40 tokens; the 9-token history is longer than 8 -> 8 slots
    assert lin[0].length[:, 0].tolist() == [8, 8] and native[0].length[:, 0].tolist() == [40, 9]
    per_entry = 2 * 6 * 4 + 4 + 8                            # k + v rows (fp32, D=6), position, timestamp
    assert torch.equal(_bytes(lin), torch.tensor([2 * (4 * 2 + 4 + 2 * 8 * (per_entry + 4))] * 2))
    m = _model("hstu", torch.float32, seq_compress="beacon", beacon_chunk=4)
    with torch.no_grad():
        bea = m.encode_history(hist, hts, hl)
    assert bea[0].length[:, 0].tolist() == [10, 3]


def test_encode_history_with_a_compression_method():
    m = _model("hstu")
    hist, hts, hl, req, rts, rl, *_ = _ragged(6, [12, 7], [2, 2])
    with torch.no_grad():
        same = m.serve(req, rts, m.encode_history(hist, hts, hl, method="none"), rl)
        ref = m.serve(req, rts, m.encode_history(hist, hts, hl), rl)
    assert torch.equal(same, ref)
    with torch.no_grad():
        q = m.encode_history(hist, hts, hl, method="int8")
        out = m.serve(req, rts, q, rl)
        # the same layers served over float caches holding the int8 caches' own dequantized values
        deq = []
        for c in q:
            dk, dv = c.dequantize(torch.float64)
            deq.append(c.replace(k=dk, v=dv, k_format="float", v_format="float", k_scale=None, k_zero=None,
                                 v_scale=None, v_zero=None, group_size=0))
        out_deq = m.serve(req, rts, deq, rl)
    assert q[0].k_format == "int8" and q[0].original_length.tolist() == [12, 7]
    # serving reads exactly the codes' values (float64 model: equal up to summation order)
    torch.testing.assert_close(out, out_deq, rtol=1e-12, atol=1e-12)
    # int8 absmax rounding moves every cached value by at most half a step, 1/254 of its group's max; the served
    # output (convex mixes of values, scores smooth in the keys) stays within one such step of the largest output
    # (measured: ~1/1100 here)
    assert (out - ref).abs().max() <= ref.abs().max() / 254
    assert (_bytes(q) < _bytes(m.encode_history(hist, hts, hl))).all()


def test_input_validation():
    m = _model("sasrec")
    with pytest.raises(ValueError, match="item ids"):
        m.last_hidden(torch.tensor([[1, N_ITEMS + 1]]))
    with pytest.raises(ValueError, match="items must be an integer tensor"):
        m.last_hidden(torch.ones(2, 3))
    hist, hts, hl, req, rts, rl, *_ = _ragged(7, [3], [1])
    caches = m.encode_history(hist, hts, hl)
    with pytest.raises(ValueError, match="one KVCache per layer"):
        m.serve(req, rts, caches[:1], rl)
    with pytest.raises(ValueError, match="at least one request token"):
        m.serve(req, rts, caches, torch.tensor([0]))
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelConfig(n_items=5, heads="gqa", n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="arch"):
        ModelConfig(n_items=5, arch="bert")
    assert isinstance(HSTU(5, d_model=8), SequentialRecommender) and SASRec(5, d_model=8).cfg.arch == "sasrec"


def test_metrics_convention():
    scores = torch.tensor([[float("-inf"), 3.0, 1.0, 3.0, 0.5], [float("-inf"), 0.1, 0.2, 0.3, 0.4]])
    r = target_ranks(scores, torch.tensor([1, 4]))
    assert r.tolist() == [1, 0]                                 # a tie counts against the target
    m = rank_metrics(torch.tensor([0, 1, 10]), n_items=21)
    assert m["HR@10"] == pytest.approx(2 / 3)
    assert m["NDCG@10"] == pytest.approx((1 + 1 / math.log2(3)) / 3)
    assert m["MRR"] == pytest.approx((1 + 1 / 2 + 1 / 11) / 3)
    assert m["GAUC"] == pytest.approx(1 - (0 + 1 + 10) / 20 / 3)


def test_metrics_cutoff_edges_several_k_and_empty():
    # rank K-1 is the last hit, rank K the first miss, for every K
    ranks = torch.tensor([0, 4, 5, 9, 10, 19, 20])
    m = rank_metrics(ranks, n_items=50, ks=(1, 5, 10, 20))
    assert m["HR@1"] == pytest.approx(1 / 7)
    assert m["HR@5"] == pytest.approx(2 / 7)                    # ranks 0 and 4 (= K - 1)
    assert m["HR@10"] == pytest.approx(4 / 7)                   # + 5 and 9 (= K - 1)
    assert m["HR@20"] == pytest.approx(6 / 7)                   # + 10 and 19 (= K - 1); 20 misses
    assert m["NDCG@5"] == pytest.approx((1 + 1 / math.log2(6)) / 7)
    assert m["NDCG@20"] == pytest.approx(sum(1 / math.log2(r + 2) for r in (0, 4, 5, 9, 10, 19)) / 7)
    assert m["MRR"] == pytest.approx(sum(1 / (r + 1) for r in ranks.tolist()) / 7)
    assert m["GAUC"] == pytest.approx(sum(1 - r / 49 for r in ranks.tolist()) / 7)
    assert m["users"] == 7
    empty = rank_metrics(torch.zeros(0, dtype=torch.int64), n_items=50, ks=(5, 10))
    assert empty == {"HR@5": 0.0, "NDCG@5": 0.0, "HR@10": 0.0, "NDCG@10": 0.0, "MRR": 0.0, "GAUC": 0.0, "users": 0}


def test_target_ranks_ignore_the_padding_column_even_at_inf():
    # padding column 0 scored +inf would outrank every target if it were ranked
    scores = torch.tensor([[float("inf"), 0.3, 0.9, 0.1], [float("inf"), 0.5, 0.5, 0.5], [float("nan"), 2.0, 1.0, 0.0]])
    r = target_ranks(scores, torch.tensor([2, 1, 1]))
    assert r.tolist() == [0, 2, 0]                              # user 1: two ties count against the target
    m = rank_metrics(r, n_items=3, ks=(1,))
    assert m["HR@1"] == pytest.approx(2 / 3)


def test_tiny_training_run_loss_decreases_and_checkpoint_is_reused(tmp_path):
    ds = synthetic_dataset(48, 60, min_len=12, max_len=40, n_topics=4, drift=0.0, seed=0)
    mcfg = ModelConfig(arch="hstu", d_model=16, n_layers=1, n_heads=2, max_len=32, dropout=0.0)
    tcfg = TrainConfig(epochs=4, batch_size=16, lr=1e-2, num_negatives=16, seed=0)
    logs = []
    model, rep = train(ds, mcfg, tcfg, cache=str(tmp_path), progress=False, log=logs.append)
    losses = [p["train_loss"] for p in rep["curve"]]
    assert len(losses) == 4 and losses[-1] < losses[0] * 0.9, losses
    assert rep["test"]["users"] == 48 and 0.0 <= rep["test"]["NDCG@10"] <= rep["test"]["HR@10"] <= 1.0
    # topic structure is learnable: far better than random ranking (HR@10 of random = 10/60)
    assert rep["test"]["HR@10"] > 0.3
    key = checkpoint_key(ModelConfig(**{**mcfg.to_dict(), "n_items": 60}), tcfg, ds.fingerprint())
    path = tmp_path / "checkpoints" / f"hstu-{key}.pt"
    assert path.is_file() and str(path) == rep["checkpoint"]
    model2, rep2 = train(ds, mcfg, tcfg, cache=str(tmp_path), progress=False, log=logs.append)
    assert any("resumed" in s for s in logs) and rep2["test"] == rep["test"]
    loaded = load_checkpoint(path)
    split = ds.split()
    assert evaluate(loaded, split.test, progress=False) == rep["test"]
    # the serving path (cache + 3-token request) ranks exactly like the full recompute
    served = evaluate(loaded, split.test, progress=False, request_len=3)
    assert served["HR@10"] == rep["test"]["HR@10"] and served["MRR"] == pytest.approx(rep["test"]["MRR"])


def test_tiny_training_run_on_all_windows(tmp_path):
    """windows='all' trains on every item of sequences longer than max_len: more steps per epoch, same interface."""
    ds = synthetic_dataset(24, 90, min_len=20, max_len=60, n_topics=3, drift=0.0, seed=2)
    mcfg = ModelConfig(arch="hstu", d_model=16, n_layers=1, n_heads=2, max_len=16, dropout=0.0)
    steps = {}
    for windows in ("last", "all"):
        tcfg = TrainConfig(epochs=2, batch_size=8, lr=1e-2, num_negatives=16, seed=0, windows=windows)
        counted = []
        _, rep = train(ds, mcfg, tcfg, cache=str(tmp_path), progress=False, log=counted.append)
        losses = [p["train_loss"] for p in rep["curve"]]
        assert losses[-1] < losses[0] and rep["test"]["users"] == 24, losses
        steps[windows] = rep["checkpoint"]
    assert steps["last"] != steps["all"]            # different recipes, different checkpoints


def test_tiny_training_run_of_a_beacon_model(tmp_path):
    ds = synthetic_dataset(24, 50, min_len=12, max_len=30, n_topics=4, seed=1)
    mcfg = ModelConfig(arch="sasrec", d_model=16, n_layers=1, n_heads=2, max_len=32, dropout=0.0,
                       seq_compress="beacon", beacon_chunk=4, train_request_len=4, heads="mqa")
    tcfg = TrainConfig(epochs=3, batch_size=8, lr=1e-2, num_negatives=16, seed=0)
    model, rep = train(ds, mcfg, tcfg, cache=str(tmp_path), progress=False, log=lambda s: None)
    losses = [p["train_loss"] for p in rep["curve"]]
    assert losses[-1] < losses[0], losses
    assert model.beacon_emb.grad is not None and model.beacon_emb.grad.abs().sum() > 0
    served = evaluate(model, ds.split().test, progress=False, request_len=2)
    assert served["users"] == 24


def test_train_cli_windows_and_position_embedding(tmp_path):
    from malloc_kernels.models.train import main
    out = tmp_path / "report.json"
    report = main(["--data", "ml-latest-small", "--model", "hstu", "--d-model", "8", "--layers", "1", "--n-heads", "1",
                   "--max-len", "16", "--epochs", "1", "--windows", "all", "--position-embedding", "on",
                   "--negatives", "8", "--threads", "1", "--cache-dir", str(tmp_path), "--no-progress",
                   "--out", str(out)])
    assert report["train"]["windows"] == "all" and report["model"]["position_embedding"] is True
    assert out.is_file() and report["test"]["users"] > 0
