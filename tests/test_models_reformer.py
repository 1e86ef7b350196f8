"""Reformer's LSH attention variant (models/reformer.py): bucketing, the three attention paths against the float64
oracle and a naive loop, cached serving == recompute, the LSH cache's bytes and wire format, argument checks."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from malloc_kernels.core.layout import jagged_to_padded
from malloc_kernels.data import make_jagged
from malloc_kernels.models import ModelConfig, SequentialRecommender
from malloc_kernels.models import reformer as R
from malloc_kernels.models.uptrain import warm_start
from malloc_kernels.ops.attention import attention
from malloc_kernels.eval.methods import build_grid
from model_serving import forward_and_serve
from tolerance import torch_in_dtype, within_twice_torch_error

N_ITEMS = 40
F64 = torch.float64
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _model(arch, dtype=F64, **kw):
    torch.manual_seed(0)
    kw.setdefault("lsh_buckets", 4)
    m = SequentialRecommender(ModelConfig(arch=arch, n_items=N_ITEMS, d_model=12, n_layers=2, n_heads=2, max_len=48,
                                          dropout=0.0, seq_compress="reformer", **kw))
    return m.to(dtype).eval()


def _tokens(lens, H=2, D=8, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lens)
    off = R._offsets(lens)
    T = int(lens.sum())
    _, local = R._user_of(off, T)
    q = torch.randn(T, H, D, generator=g, dtype=dtype)
    v = torch.randn(T, H, D, generator=g, dtype=dtype)
    ts = 1_600_000_000 + torch.cumsum(torch.randint(0, 10 ** 6, (T,), generator=g), 0)
    return q, v, off, local, ts


def _naive(q, k, v, buckets, off, pos, kind, scale, pos_bias):
    """Per (user, head, query) loops over the visible keys: the module docstring's definition, term by term."""
    out = torch.zeros_like(q)
    P = pos_bias.numel()
    for b in range(off.numel() - 1):
        s0, s1 = int(off[b]), int(off[b + 1])
        for h in range(q.shape[1]):
            for i in range(s0, s1):
                S = [j for j in range(s0, i + 1) if bool((buckets[j, h] == buckets[i, h]).any())]
                assert i in S
                s = torch.stack([scale * (q[i, h] @ k[j, h]) + pos_bias[min(max(int(pos[i] - pos[j]), 0), P - 1)]
                                 for j in S])
                vs = torch.stack([v[j, h] for j in S])
                if kind == "hstu":
                    out[i, h] = (F.silu(s)[:, None] * vs).sum(0) / len(S)     # n_i = |S_i|
                else:
                    out[i, h] = (torch.softmax(s, 0)[:, None] * vs).sum(0)
    return out


# ---- bucketing ---------------------------------------------------------------------------------------------------
def test_buckets_are_the_argmax_of_the_rotations_deterministic_under_seed_and_scale_invariant():
    x = torch.randn(50, 2, 8, dtype=F64)
    rot = R.make_rotations(1, 2, 8, 6, 3, seed=7)[0]                          # [H, R, D, 3]
    b = R.lsh_buckets(x, rot)
    assert b.dtype == torch.uint8 and b.shape == (50, 2, 3)
    for t, h, r in [(0, 0, 0), (13, 1, 2), (49, 1, 1)]:
        proj = x[t, h] @ rot[h, r]
        assert int(b[t, h, r]) == int(torch.cat([proj, -proj]).argmax())
    assert torch.equal(R.make_rotations(2, 2, 8, 6, 3, seed=7), R.make_rotations(2, 2, 8, 6, 3, seed=7))
    assert not torch.equal(R.make_rotations(2, 2, 8, 6, 3, seed=7), R.make_rotations(2, 2, 8, 6, 3, seed=8))
    # a query and its shared key (the normalised query) fall in the same buckets
    assert torch.equal(R.lsh_buckets(R.shared_keys(x), rot), b)
    assert torch.equal(R.lsh_buckets(3.5 * x, rot), b)
    assert set(b.unique().tolist()) <= set(range(6)) and len(b.unique()) > 3


def test_model_rotations_come_from_the_seed_and_travel_with_the_state_dict():
    a, b = _model("hstu", lsh_seed=3), _model("hstu", lsh_seed=3)
    c = _model("hstu", lsh_seed=4)
    assert torch.equal(a.lsh.rotations, b.lsh.rotations) and not torch.equal(a.lsh.rotations, c.lsh.rotations)
    assert "lsh.rotations" in a.state_dict()
    assert a.lsh.rotations.shape == (2, 2, 1, 6, 2)


def test_bucketing_is_invariant_to_padding_and_batch_composition():
    m = _model("hstu")
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, N_ITEMS + 1, size=n) for n in (17, 1, 30, 0, 5)]
    with torch.no_grad():
        together = m.encode_history(make_jagged(seqs))
        for u, s in enumerate(seqs):
            alone = m.encode_history(make_jagged([s]))
            padded = torch.zeros(1, 40, dtype=torch.int64)                    # much more padding than needed
            padded[0, :len(s)] = torch.as_tensor(s)
            alone_padded = m.encode_history(padded, lengths=torch.tensor([len(s)]))
            for li in range(2):
                n = len(s)
                ref = together[li].bucket[u, :, :n]
                assert torch.equal(alone[li].bucket[0, :, :n], ref)
                assert torch.equal(alone_padded[li].bucket[0, :, :n], ref)
                assert not together[li].bucket[u, :, n:].any()                 # padding holds 0


# ---- the attention paths against the oracle ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["hstu", "softmax"])
def test_dense_oracle_matches_the_naive_definition(kind):
    q, v, off, pos, _ = _tokens([9, 0, 1, 6], D=4)
    k = R.shared_keys(q)
    b = R.lsh_buckets(k, R.make_rotations(1, 2, 4, 4, 2, seed=1)[0])
    pb = torch.randn(16).to(F64)                    # bias tables are float32 by the attention contract
    got = R.lsh_attention_dense(q, k, v, b, off, pos, kind=kind, scale=0.5, pos_bias=pb)
    torch.testing.assert_close(got, _naive(q, k, v, b, off, pos, kind, 0.5, pb), rtol=0, atol=1e-12)


def _check(got, exact_fn, q, k, v, dtype, n):
    """float64: equal to the oracle up to summation order; float32 (the CPU kernel): FlashAttention's rule against
    the oracle in float64, with PyTorch's own float32 error as the yardstick."""
    exact = exact_fn(q.double(), k.double(), v.double())
    if dtype == F64:
        torch.testing.assert_close(got, exact, rtol=0, atol=1e-12)
        return
    with torch_in_dtype():
        same = exact_fn(q, k, v)
    within_twice_torch_error(got, exact, same, dtype, n=n)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("kind", ["hstu", "softmax"])
def test_segment_path_equals_the_oracle(kind, dtype):
    """One hash round through jagged (user, head, bucket) segments (the CPU kernel in float32, the reference in
    float64) against the dense oracle; odd lengths, an empty user, position and time bias."""
    q, v, off, pos, ts = _tokens([17, 0, 97, 1], dtype=dtype)
    k = R.shared_keys(q)
    b = R.lsh_buckets(k, R.make_rotations(1, 2, 8, 4, 1, seed=0)[0])
    pb, tb = torch.randn(64), torch.randn(16)
    backend = "cpu" if dtype == torch.float32 else "auto"

    def attend(qs, ks, vs, o, p, t):
        return attention(qs, ks, vs, is_causal=True, kind=kind, offsets=o, query_positions=p, query_timestamps=t,
                         pos_bias=pb, time_bias=tb, backend=backend)
    got = R.lsh_attention_segments(attend, q, k, v, b, off, pos, ts)
    _check(got, lambda q_, k_, v_: R.lsh_attention_dense(q_, k_, v_, b, off, pos, ts, kind=kind, scale=8 ** -0.5,
                                                         pos_bias=pb, time_bias=tb), q, k, v, dtype, n=97)


@pytest.mark.parametrize("kind", ["hstu", "softmax"])
def test_segment_path_gradients_through_the_training_kernels(kind):
    """Under autograd the segments run on the C++ training kernels (float64): output and every gradient vs the
    dense reference."""
    q, v, off, pos, ts = _tokens([17, 0, 97, 1])
    q.requires_grad_(True)
    v.requires_grad_(True)
    k = R.shared_keys(q)
    b = R.lsh_buckets(k, R.make_rotations(1, 2, 8, 4, 1, seed=0)[0])
    pb = torch.randn(64, dtype=F64, requires_grad=True)
    tb = torch.randn(16, dtype=F64, requires_grad=True)

    def attend(qs, ks, vs, o, p, t):
        return attention(qs, ks, vs, is_causal=True, kind=kind, offsets=o, query_positions=p, query_timestamps=t,
                         pos_bias=pb, time_bias=tb, backend="cpu")
    exact = R.lsh_attention_dense(q, k, v, b, off, pos, ts, kind=kind, scale=8 ** -0.5, pos_bias=pb, time_bias=tb)
    got = R.lsh_attention_segments(attend, q, k, v, b, off, pos, ts)
    torch.testing.assert_close(got, exact, rtol=0, atol=1e-12)
    g = torch.randn_like(got)
    grads = torch.autograd.grad((got * g).sum(), (q, v, pb, tb), retain_graph=True)
    ref = torch.autograd.grad((exact * g).sum(), (q, v, pb, tb))
    for name, a, e in zip(("q", "v", "pos_bias", "time_bias"), grads, ref):
        # the bias-table gradients are sums over every score, accumulated in float32 by the training kernel
        tol = 1e-12 if name in ("q", "v") else 1e-6 * max(1.0, e.abs().max().item())
        assert (a - e).abs().max().item() <= tol, name


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("n_hashes", [1, 2])
@pytest.mark.parametrize("kind", ["hstu", "softmax"])
def test_cached_gather_path_equals_the_oracle_over_the_whole_sequence(kind, n_hashes, dtype):
    """Requests over an LSHCache of their histories (one empty, one request of a single token) vs the dense oracle
    over history + request: the request rows must agree, including HSTU's n_i over cache + request. float32 runs
    the gathered pseudo-caches through the CPU kernel."""
    hist_lens, req_lens = [17, 0, 96, 4], [3, 5, 1, 7]
    H, D = 2, 8
    seqs = [h + r for h, r in zip(hist_lens, req_lens)]
    q, v, off, pos, ts = _tokens(seqs, H, D, seed=2, dtype=dtype)
    k = R.shared_keys(q)
    b = R.lsh_buckets(k, R.make_rotations(1, H, D, 6, n_hashes, seed=5)[0])
    pb, tb = torch.randn(64), torch.randn(16)
    is_hist = pos < torch.tensor(hist_lens).repeat_interleave(torch.tensor(seqs))
    h_off, r_off = R._offsets(torch.tensor(hist_lens)), R._offsets(torch.tensor(req_lens))
    kv = SequentialRecommender._cache_from_jagged(k[is_hist], v[is_hist], h_off, pos[is_hist], ts[is_hist])
    bp, _ = jagged_to_padded(b[is_hist], h_off, max_len=kv.position.shape[2])
    cache = R.LSHCache(kv=kv, bucket=bp.contiguous(), n_buckets=6)
    backend = "cpu" if dtype == torch.float32 else "auto"

    def attend(qs, ks, vs, o, p, t, pseudo):
        return attention(qs, ks, vs, is_causal=True, kind=kind, scale=0.3, offsets=o, query_positions=p,
                         query_timestamps=t, pos_bias=pb, time_bias=tb, cache=pseudo, backend=backend)
    r = ~is_hist
    got = R.lsh_attention_cached(attend, q[r], k[r], v[r], b[r], r_off, pos[r], ts[r], cache)
    _check(got, lambda q_, k_, v_: R.lsh_attention_dense(q_, k_, v_, b, off, pos, ts, kind=kind, scale=0.3,
                                                         pos_bias=pb, time_bias=tb)[r], q, k, v, dtype, n=103)


# ---- the model ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("n_hashes", [1, 2])
@pytest.mark.parametrize("arch", ["hstu", "sasrec"])
def test_cached_serving_equals_full_recompute(arch, n_hashes, dtype):
    m = _model(arch, dtype, lsh_hashes=n_hashes)
    full, forward, served, caches = forward_and_serve(m, N_ITEMS, request_len=3, lengths=(20, 6, 3, 1, 97))
    with torch.no_grad():
        ref = m.last_hidden(full)
    err = (ref - served).abs().max().item()
    assert err <= TOL[dtype] * max(1.0, ref.abs().max().item()), err
    assert (forward - ref).abs().max().item() <= TOL[dtype] * max(1.0, ref.abs().max().item())
    c = caches[0]
    assert isinstance(c, R.LSHCache) and c.bucket.shape == (5, 2, 94, n_hashes)
    assert c.original_length.tolist() == [17, 3, 0, 0, 94] and c.length[:, 0].tolist() == [17, 3, 0, 0, 94]
    # the keys stored are the normalised queries (shared-QK)
    norms = c.kv.k[0, :, :17].norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


def test_bucketing_changes_the_model_and_one_bucket_is_plain_causal_attention():
    """With 2 buckets (one hyperplane) some tokens lose keys; the bucketed model differs from the same weights
    attending to everything, which in turn equals what the all-in-one-bucket oracle computes."""
    m = _model("hstu", lsh_buckets=2)
    rng = np.random.default_rng(1)
    full = make_jagged([rng.integers(1, N_ITEMS + 1, size=n) for n in (30, 12)])
    with torch.no_grad():
        h = m.last_hidden(full)
        m.lsh.rotations.zero_()                     # every projection 0: argmax ties -> bucket 0 for all tokens
        h_one = m.last_hidden(full)
    assert (h - h_one).abs().max().item() > 1e-6
    q, v, off, pos, _ = _tokens([11, 3])
    k = R.shared_keys(q)
    b = torch.zeros(q.shape[0], 2, 1, dtype=torch.uint8)
    pb = torch.randn(16, dtype=F64)
    ref = attention(q, k, v, is_causal=True, kind="hstu", offsets=off, query_positions=pos, pos_bias=pb,
                    backend="reference")
    torch.testing.assert_close(R.lsh_attention_dense(q, k, v, b, off, pos, kind="hstu", scale=8 ** -0.5,
                                                     pos_bias=pb), ref, rtol=0, atol=1e-12)


def test_training_step_runs_through_the_bucketed_path_and_learns():
    m = _model("sasrec", torch.float32)
    m.train()
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, N_ITEMS + 1, size=n) for n in (25, 9, 1, 40)]
    batch = make_jagged([s[:-1] for s in seqs])
    targets = torch.as_tensor(np.concatenate([s[1:] for s in seqs]))
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = m.loss(m(batch), targets, full_softmax=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    assert m.layers[0].qkv.proj.weight.grad.abs().sum() > 0


def test_uptrain_from_a_plain_model_keeps_the_weights_and_draws_the_rotations():
    torch.manual_seed(0)
    base = SequentialRecommender(ModelConfig(arch="hstu", n_items=N_ITEMS, d_model=12, n_heads=2, max_len=48))
    var = _model("hstu", torch.float32)
    fresh = warm_start(var, base)
    assert fresh == ["lsh.rotations"]
    assert torch.equal(var.layers[1].qkv.proj.weight, base.layers[1].qkv.proj.weight)


# ---- the cache: bytes and wire format -----------------------------------------------------------------------------
def test_cache_bytes_count_the_bucket_ids_and_round_trip():
    m = _model("hstu", lsh_hashes=3)
    full, _, _, caches = forward_and_serve(m, N_ITEMS, request_len=2, lengths=(20, 6, 3, 1))
    c = caches[1]
    per_user = c.kv.nbytes_per_user() + c.kv.length.sum(1) * 3
    assert torch.equal(c.nbytes_per_user(), per_user)
    for u in range(4):
        blob = c.to_bytes(u)
        kv_blob = c.kv.to_bytes(u)
        assert len(blob) == len(kv_blob) + int(c.kv.length[u].sum()) * 3 + R.LSH_FRAMING_BYTES
        back = R.lsh_cache_from_bytes(blob)
        n = int(c.length[u, 0])
        assert back.n_buckets == 4 and back.n_hashes == 3
        assert torch.equal(back.bucket[0, :, :n], c.bucket[u, :, :n])
        assert torch.equal(back.kv.k[0, :, :n], c.kv.k[u, :, :n])
    blob = bytearray(c.to_bytes(0))
    blob[10] ^= 1
    with pytest.raises(ValueError, match="CRC32"):
        R.lsh_cache_from_bytes(bytes(blob))
    with pytest.raises(ValueError, match="b: .*shorter"):
        R.lsh_cache_from_bytes(b"MKLSH")
    with pytest.raises(TypeError, match="b must be bytes"):
        R.lsh_cache_from_bytes("MKLSH")
    with pytest.raises(ValueError, match="user_index"):
        c.to_bytes(4)


def test_the_harness_lists_the_variant_at_the_sequence_level():
    rows = [s for s in build_grid(["reformer"]) if s.label == "reformer"]
    assert len(rows) == 1 and rows[0].level == "sequence" and rows[0].variant == "reformer"


# ---- bad arguments ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,name", [(dict(heads="gqa", n_kv_heads=1), "heads"), (dict(heads="mqa"), "heads"),
                                     (dict(heads="mla"), "heads"), (dict(lsh_buckets=3), "lsh_buckets"),
                                     (dict(lsh_buckets=0), "lsh_buckets"), (dict(lsh_buckets=258), "lsh_buckets"),
                                     (dict(lsh_hashes=0), "lsh_hashes"), (dict(lsh_hashes=256), "lsh_hashes"),
                                     (dict(lsh_seed=-1), "lsh_seed"), (dict(lsh_buckets=True), "lsh_buckets")])
def test_config_refuses_bad_lsh_arguments(kw, name):
    with pytest.raises(ValueError, match=name):
        ModelConfig(arch="hstu", n_items=5, seq_compress="reformer", **kw)


def test_config_keys_of_other_models_are_unchanged():
    assert not any(k.startswith("lsh_") for k in ModelConfig(arch="hstu", n_items=5).to_dict())
    d = ModelConfig(arch="hstu", n_items=5, seq_compress="reformer", lsh_buckets=8).to_dict()
    assert d["lsh_buckets"] == 8 and ModelConfig(**d) == ModelConfig(**d)


def test_bad_caches_and_methods_are_refused():
    m = _model("hstu")
    full, _, _, caches = forward_and_serve(m, N_ITEMS, request_len=2, lengths=(6, 3))
    with pytest.raises(ValueError, match="method"):
        m.compress_caches(caches, "int8")
    with pytest.raises(ValueError, match="serve_step"):
        m.serve_step(make_jagged([np.array([1]), np.array([2])], [np.array([10 ** 8]), np.array([10 ** 8])]),
                     caches=caches)
    with pytest.raises(TypeError, match="LSHCache"):
        m.serve(make_jagged([np.array([1]), np.array([2])], [np.array([10 ** 8]), np.array([10 ** 8])]),
                caches=[c.kv for c in caches])
    kv = caches[0].kv
    with pytest.raises(TypeError, match="bucket"):
        R.LSHCache(kv=kv, bucket=caches[0].bucket.long(), n_buckets=4)
    with pytest.raises(ValueError, match="bucket"):
        R.LSHCache(kv=kv, bucket=caches[0].bucket[:, :, :1], n_buckets=4)
    with pytest.raises(ValueError, match="n_buckets"):
        R.LSHCache(kv=kv, bucket=caches[0].bucket, n_buckets=5)
    with pytest.raises(TypeError, match="kv"):
        R.LSHCache(kv=None, bucket=caches[0].bucket, n_buckets=4)
    with pytest.raises(ValueError, match="rotations"):
        R.lsh_buckets(torch.randn(3, 2, 5), torch.randn(2, 1, 4, 2))


# ---- the C++ serving kernel ----------------------------------------------------------------------------------------
def _fused_problem(dtype, seed=3, H=2, D=8):
    hist_lens, req_lens = [17, 0, 96, 4, 1], [3, 5, 1, 7, 1]
    seqs = [h + r for h, r in zip(hist_lens, req_lens)]
    q, v, off, pos, ts = _tokens(seqs, H, D, seed=seed, dtype=dtype)
    k = R.shared_keys(q)
    b = R.lsh_buckets(k, R.make_rotations(1, H, D, 4, 1, seed=seed)[0])
    is_hist = pos < torch.tensor(hist_lens).repeat_interleave(torch.tensor(seqs))
    h_off, r_off = R._offsets(torch.tensor(hist_lens)), R._offsets(torch.tensor(req_lens))
    kv = SequentialRecommender._cache_from_jagged(k[is_hist], v[is_hist], h_off, pos[is_hist], ts[is_hist])
    bp, _ = jagged_to_padded(b[is_hist], h_off, max_len=kv.position.shape[2])
    return q, k, v, b, off, pos, ts, ~is_hist, r_off, R.LSHCache(kv=kv, bucket=bp.contiguous(), n_buckets=4)


@pytest.mark.needs_ext("lsh_attention_cpu")
@pytest.mark.parametrize("with_time", [True, False])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("kind", ["hstu", "softmax"])
def test_fused_kernel_equals_the_oracle(kind, dtype, with_time):
    q, k, v, b, off, pos, ts, r, r_off, cache = _fused_problem(dtype)
    pb, tb = torch.randn(64), torch.randn(16)
    t = ts if with_time else None
    got = R.lsh_attention_fused(q[r], k[r], v[r], b[r], r_off, pos[r], None if t is None else t[r], cache,
                                kind=kind, scale=0.3, pos_bias=pb, time_bias=tb)
    _check(got, lambda q_, k_, v_: R.lsh_attention_dense(q_, k_, v_, b, off, pos, t, kind=kind, scale=0.3,
                                                         pos_bias=pb, time_bias=tb)[r], q, k, v, dtype, n=103)


@pytest.mark.needs_ext("lsh_attention_cpu")
@pytest.mark.parametrize("arch", ["hstu", "sasrec"])
def test_model_serving_fused_and_gather_paths_agree(arch):
    m = _model(arch)
    full, _, fused, caches = forward_and_serve(m, N_ITEMS, request_len=4, lengths=(30, 9, 4, 1))
    m.backend = "reference"                         # the gather path + the reference attention
    _, _, gathered, _ = forward_and_serve(m, N_ITEMS, request_len=4, lengths=(30, 9, 4, 1))
    assert (fused - gathered).abs().max().item() < 1e-12


@pytest.mark.needs_ext("lsh_attention_cpu")
def test_fused_kernel_refuses_bad_arguments():
    q, k, v, b, off, pos, ts, r, r_off, cache = _fused_problem(torch.float32)
    kv = cache.kv
    op = torch.ops.malloc_kernels.lsh_attention_cpu
    good = dict(q=q[r], k=k[r], v=v[r], offsets=r_off, q_bucket=b[r][..., 0].contiguous(), q_pos=pos[r], q_ts=None,
                cache_k=kv.k, cache_v=kv.v, cache_len=kv.length, cache_bucket=cache.bucket[..., 0].contiguous(),
                cache_pos=kv.position, cache_ts=None, pos_bias=None, time_bias=None, thresholds=None, hstu=True,
                scale=0.5)
    op(**good)
    bad = [(dict(q_bucket=good["q_bucket"].long()), TypeError, "q_bucket"),
           (dict(cache_len=kv.length + 200), ValueError, "cache_len"),
           (dict(offsets=r_off.flip(0)), ValueError, "offsets"),
           (dict(cache_k=kv.k.double()), TypeError, "cache_k"),
           (dict(k=k[r][:-1]), ValueError, "k must have shape"),
           (dict(time_bias=torch.randn(8)), ValueError, "time_bias"),
           (dict(q=q[r].half(), k=k[r].half(), v=v[r].half()), TypeError, "q must be")]
    for change, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            op(**{**good, **change})
    with pytest.raises(ValueError, match="one hash round"):
        R.lsh_attention_fused(q[r], k[r], v[r], b[r].expand(-1, -1, 2), r_off, pos[r], None, cache, kind="hstu",
                              scale=0.5)
