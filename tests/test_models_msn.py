"""MSN product-key memory inside HSTU / SASRec (arXiv 2602.07526): config, cached serving == full recompute,
sparse-gradient training (SparseAdam + AdamW), slot usage, parameter / memory-table accounting."""
import pytest
import torch

from malloc_kernels.data import synthetic_dataset
from malloc_kernels.memory import MemoryAugmented, ProductKeyMemory
from malloc_kernels.models import ModelConfig, SequentialRecommender
from malloc_kernels.models.train import (TrainConfig, build_parser, checkpoint_key, clip_grad_norm, load_checkpoint,
                                         make_optimizer, train)
from model_serving import forward_and_serve

N_ITEMS = 40
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
MSN = dict(msn=True, msn_slots=64, msn_heads=2, msn_key_dim=8, msn_topk=4)


def _model(arch, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    m = SequentialRecommender(ModelConfig(arch=arch, n_items=N_ITEMS, d_model=12, n_layers=2, n_heads=2,
                                          max_len=48, dropout=0.0, **{**MSN, **kw}))
    return m.to(dtype).eval()


def _ragged(seed, hist_lens, req_lens):
    g = torch.Generator().manual_seed(seed)
    B, N, R = len(hist_lens), max(hist_lens), max(req_lens)
    hist = torch.randint(1, N_ITEMS + 1, (B, N), generator=g)
    req = torch.randint(1, N_ITEMS + 1, (B, R), generator=g)
    ts_all = 1_600_000_000 + torch.cumsum(torch.randint(0, 10 ** 6, (B, N + R), generator=g), 1)
    full = torch.zeros(B, N + R, dtype=torch.int64)
    full_ts, hist_ts, req_ts = torch.zeros_like(full), torch.zeros(B, N, dtype=torch.int64), torch.zeros(
        B, R, dtype=torch.int64)
    for b, (n, r) in enumerate(zip(hist_lens, req_lens)):
        hist[b, n:], req[b, r:] = 0, 0
        full[b, :n], full[b, n:n + r] = hist[b, :n], req[b, :r]
        full_ts[b, :n + r] = ts_all[b, :n + r]
        hist_ts[b, :n], req_ts[b, :r] = ts_all[b, :n], ts_all[b, n:n + r]
    return (hist, hist_ts, torch.tensor(hist_lens), req, req_ts, torch.tensor(req_lens), full, full_ts,
            torch.tensor(hist_lens) + torch.tensor(req_lens))


def test_config_validation_and_defaults():
    cfg = ModelConfig(n_items=5, msn=True)
    assert cfg.msn_slots == 128 * 128 and cfg.memory_layers == (cfg.n_layers - 1,)
    assert ModelConfig(n_items=5, n_layers=3, msn=True, msn_layers=[-1, 0]).memory_layers == (0, 2)
    assert ModelConfig(n_items=5, msn_layers=[0]).memory_layers == ()  # msn off: no memory anywhere
    for kw, field in [(dict(msn_slots=1000), "msn_slots"), (dict(msn_slots=0), "msn_slots"),
                      (dict(msn_heads=0), "msn_heads"), (dict(msn_key_dim=7), "msn_key_dim"),
                      (dict(msn_topk=129), "msn_topk"), (dict(msn_layers=[2]), "msn_layers"),
                      (dict(msn_layers=[1, -1]), "msn_layers"), (dict(msn_layers=[]), "msn_layers"),
                      (dict(msn="yes"), "msn")]:
        with pytest.raises(ValueError, match=field):
            ModelConfig(n_items=5, **{"msn": True, **kw})
    # memory-free configs serialise (and hash to checkpoint keys) exactly as before the option existed
    plain = ModelConfig(n_items=5)
    assert not any(k.startswith("msn") for k in plain.to_dict())
    on = ModelConfig(n_items=5, msn=True, msn_layers=(1,))
    assert on.to_dict()["msn_layers"] == [1] and ModelConfig(**on.to_dict()) == on
    assert checkpoint_key(plain, TrainConfig(), "x") != checkpoint_key(on, TrainConfig(), "x")
    args = build_parser().parse_args(["--msn", "--msn-slots", "256", "--msn-topk", "8", "--msn-layers", "0", "1"])
    assert args.msn and args.msn_slots == 256 and args.msn_topk == 8 and args.msn_layers == [0, 1]


@pytest.mark.parametrize("arch", ["hstu", "sasrec"])
def test_memory_placement_and_accounting(arch):
    m = _model(arch, torch.float32, msn_layers=[1])
    base = SequentialRecommender(ModelConfig(arch=arch, n_items=N_ITEMS, d_model=12, n_layers=2, n_heads=2,
                                             max_len=48, dropout=0.0))
    mems = m.memories()
    assert len(mems) == 1 and isinstance(mems[0], ProductKeyMemory) and mems[0].num_slots == 64
    if arch == "sasrec":
        assert isinstance(m.layers[1].ffn, MemoryAugmented) and not isinstance(m.layers[0].ffn, MemoryAugmented)
    else:
        assert m.layers[1].memory is mems[0] and m.layers[0].memory is None
    mem = mems[0]
    expect = (mem.values.numel() + mem.subkeys.numel()) * 4
    assert m.memory_table_bytes() == expect == (64 * 12 + 2 * 2 * 8 * 4) * 4
    assert base.memory_table_bytes() == 0
    n_params = sum(p.numel() for p in m.parameters())
    n_mem = sum(p.numel() for p in mem.parameters()) + sum(
        p.numel() for name, p in m.named_parameters() if "memory_gate" in name or ".gate." in name)
    assert n_params == sum(p.numel() for p in base.parameters()) + n_mem
    # the memory read really changes the layer output
    items = torch.randint(1, N_ITEMS + 1, (3, 9))
    with torch.no_grad():
        h1 = m(items)
        mem.values.zero_()
        h0 = m(items)
    assert (h1 - h0).abs().max() > 1e-4


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layers", [None, [0, 1]])
@pytest.mark.parametrize("arch", ["hstu", "sasrec"])
def test_cached_serving_equals_full_recompute(arch, layers, dtype):
    m = _model(arch, dtype, msn_layers=layers)
    hist, hts, hl, req, rts, rl, full, fts, fl = _ragged(3, [17, 6, 0, 1], [3, 1, 4, 2])
    with torch.no_grad():
        ref = m.last_hidden(full, fts, fl)
        caches = m.encode_history(hist, hts, hl)
        out = m.serve(req, rts, caches, rl)
        all_req = m.serve(req, rts, caches, rl, return_all=True)
    err = (ref - out).abs().max().item()
    assert err <= TOL[dtype] * max(1.0, ref.abs().max().item()), err
    assert all_req.shape == (int(rl.sum()), 12)
    # the memory selected the same slots in both paths: the served request tokens' reads match the recompute's
    with torch.no_grad():
        full_all = m(full, fts, fl)
    keep = torch.cat([torch.arange(int(h), int(h) + int(r)) + int(o) for h, r, o in
                      zip(hl, rl, torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.int64), fl[:-1]]), 0))])
    assert (full_all[keep] - all_req).abs().max().item() <= TOL[dtype] * max(1.0, full_all.abs().max().item())


def test_sparse_clip_grad_norm_matches_dense():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(10, 3))
    b = torch.nn.Parameter(torch.randn(4))
    rows = torch.tensor([[1, 4, 7]])
    vals = torch.randn(3, 3) * 5
    a.grad = torch.sparse_coo_tensor(rows, vals, (10, 3), check_invariants=True).coalesce()
    b.grad = torch.randn(4) * 5
    dense_a = a.grad.to_dense()
    ref = torch.cat([dense_a.flatten(), b.grad]).norm().item()
    scale = 1.0 / (ref + 1e-6)
    expect_b = b.grad * scale
    norm = clip_grad_norm([a, b], 1.0)
    assert norm == pytest.approx(ref, rel=1e-6)
    assert torch.allclose(a.grad.to_dense(), dense_a * scale, atol=1e-6)
    assert torch.allclose(b.grad, expect_b, atol=1e-6)


@pytest.mark.parametrize("arch", ["hstu", "sasrec"])
def test_tiny_training_run_with_memory(tmp_path, arch):
    ds = synthetic_dataset(48, 60, min_len=12, max_len=40, n_topics=4, drift=0.0, seed=0)
    mcfg = ModelConfig(arch=arch, d_model=16, n_layers=1, n_heads=2, max_len=32, dropout=0.0, msn=True,
                       msn_slots=256, msn_heads=2, msn_key_dim=8, msn_topk=4)
    tcfg = TrainConfig(epochs=4, batch_size=16, lr=1e-2, num_negatives=16, seed=0)
    logs = []
    model, rep = train(ds, mcfg, tcfg, cache=str(tmp_path), progress=False, log=logs.append)
    losses = [p["train_loss"] for p in rep["curve"]]
    assert len(losses) == 4 and losses[-1] < losses[0] * 0.9, losses
    assert rep["test"]["HR@10"] > 0.3  # better than random (10/60)
    usage = [p["slot_usage"] for p in rep["curve"]]
    assert all(len(u) == 1 and 0.0 < u[0]["fraction_hit"] <= 1.0 and u[0]["kl_to_uniform"] >= 0.0
               and u[0]["selections"] == u[0]["queries"] * 2 * 4 for u in usage)
    assert any("slots hit" in s for s in logs)
    assert rep["memory_table_bytes"] == model.memory_table_bytes() > 0
    assert rep["params"] == sum(p.numel() for p in model.parameters())
    # the value table trained through SparseAdam: sparse gradient, and its rows moved
    opt = make_optimizer(model, tcfg)
    assert isinstance(opt.sparse, torch.optim.SparseAdam) and isinstance(opt.dense, torch.optim.AdamW)
    mem = model.memories()[0]
    model.train()
    split = ds.split()
    from malloc_kernels.data import training_batches
    batch = next(iter(training_batches(split.train_sequences, split.train_timestamps, 8, 32)))
    opt.zero_grad()
    model.loss(model(batch), batch.targets, num_negatives=8).backward()
    grad = mem.values.grad
    assert grad.is_sparse and 0 < grad._nnz() < 256
    before = mem.values.detach().clone()
    opt.step()
    moved = (mem.values.detach() != before).any(1).nonzero().view(-1)
    assert torch.equal(moved, grad.coalesce().indices()[0])  # SparseAdam touched exactly the rows read
    # checkpoint resume (two optimisers' state) and reload of the msn config
    model2, rep2 = train(ds, mcfg, tcfg, cache=str(tmp_path), progress=False, log=logs.append)
    assert any("resumed" in s for s in logs) and rep2["test"] == rep["test"]
    loaded = load_checkpoint(rep["checkpoint"])
    assert loaded.cfg.msn and loaded.cfg.memory_layers == (0,)
    from malloc_kernels.models import evaluate
    assert evaluate(loaded, split.test, progress=False) == rep["test"]
    served = evaluate(loaded, split.test, progress=False, request_len=3)
    assert served["HR@10"] == rep["test"]["HR@10"] and served["MRR"] == pytest.approx(rep["test"]["MRR"])


@pytest.mark.parametrize("variant", [dict(seq_compress="linformer", slots=4), dict(seq_compress="beacon",
                                                                                  beacon_chunk=3)])
@pytest.mark.parametrize("arch", ["hstu", "sasrec"])
def test_memory_with_sequence_compression_serves_as_trained(arch, variant):
    """Learned sequence compression + memory in every layer: the serving path equals the training forward."""
    m = _model(arch, msn_layers=[0, 1], **variant)
    _, h, out, _ = forward_and_serve(m, N_ITEMS)
    assert (h - out).abs().max().item() < 1e-10
