"""Invariants every registered compression policy (and the hybrids) must satisfy (issue 3 acceptance).

Parametrised over ``available_methods()``: budgets respected exactly (per user, per head, per layer, bytes);
a budget at or above the history keeps everything and reproduces full attention exactly (float64 reference);
ragged batches equal per-user runs; determinism under a seed; original positions/timestamps preserved.
"""
import pytest
import torch

import malloc_kernels as mk
from malloc_kernels.policies import get_policy
from malloc_kernels.policies.budget import Budget
from malloc_kernels.policies.registry import policy_level

B, HKV, HQ, N, D = 3, 2, 4, 19, 8
LENGTHS = [19, 11, 1]
SCORING = {"h2o", "snapkv", "tova", "pyramidkv", "d2o", "intactkv", "intactkv2", "intactkv4", "intactkv8"}
HYBRIDS = ["h2o+kivi4", "snapkv+int8", "tome+int4", "chunk+fp8", "recent+intactkv2", "streaming+kivi2"]
METHODS = mk.available_methods()
TOKEN_METHODS = [m for m in METHODS if policy_level(get_policy(m)) in ("pruning", "merging")]
PRECISION = [m for m in METHODS if policy_level(get_policy(m)) == "precision"]
# quantize.py's plain quantizers and "none" keep the input entry order (the cache contract allows any order)
UNSORTED = {"none", "int8", "fp8", "int4", "int2"}
RESIDUAL_PRECISION = [m for m in PRECISION if m.startswith(("kivi", "intactkv"))]


def _history(seed=0, lengths=LENGTHS, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    n = max(lengths)
    k = torch.randn(b, HKV, n, D, generator=g, dtype=dtype)
    v = torch.randn(b, HKV, n, D, generator=g, dtype=dtype)
    q = torch.randn(b, HQ, n, D, generator=g, dtype=dtype)
    ts = torch.cumsum(torch.randint(1, 1000, (b, n), generator=g), 1)
    return k, v, q, torch.tensor(lengths, dtype=torch.int32), ts


def _kwargs(method, q):
    stage0 = method.split("+")[0]
    kw = {}
    if stage0 in SCORING or method.split("+")[-1] in SCORING:
        kw["queries"] = q
    if stage0 == "pyramidkv":
        kw.update(layer=1, num_layers=3)
    if any(p.startswith(("kivi", "intactkv", "int4", "int2")) for p in method.split("+")):
        kw["group_size"] = 4
    if any(p.startswith(("kivi", "intactkv")) for p in method.split("+")):
        kw["residual"] = 3
    if stage0 == "snapkv" or stage0 == "pyramidkv":
        kw["window"] = 3
    return kw


def _level(method):
    return "hybrid" if "+" in method else policy_level(get_policy(method))


def _user_entries(cache, b, h):
    """Valid (position, timestamp, count, k, v) of one (user, head), main and residual, sorted by position."""
    parts = []
    segs = [cache] + ([cache.residual] if cache.residual is not None else [])
    for seg in segs:
        L = int(seg.length[b, h])
        if seg.is_quantized:
            k, v = seg.dequantize(torch.float64)
        else:
            k, v = seg.k, seg.v
        cnt = seg.count[b, h, :L] if seg.count is not None else torch.ones(L)
        ts = seg.timestamp[b, h, :L] if seg.timestamp is not None else torch.zeros(L, dtype=torch.int64)
        parts.append((seg.position[b, h, :L].long(), ts, cnt.double(), k[b, h, :L].double(), v[b, h, :L].double()))
    cat = [torch.cat([p[i] for p in parts]) for i in range(5)]
    order = torch.argsort(cat[0], stable=True)
    return [t[order] for t in cat]


def _request(seed=1, b=B, lq=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, HQ, lq, D, generator=g, dtype=torch.float64),
            torch.randn(b, HKV, lq, D, generator=g, dtype=torch.float64),
            torch.randn(b, HKV, lq, D, generator=g, dtype=torch.float64))


def _attend(cache, kind="softmax"):
    q, k, v = _request(b=cache.batch_size)
    return mk.attention(q, k, v, cache=cache, is_causal=True, kind=kind, backend="reference")


# ---- budgets ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("budget", [5, 0.5, 1])
@pytest.mark.parametrize("method", TOKEN_METHODS + HYBRIDS)
def test_token_budget_respected_exactly(method, budget):
    k, v, q, L, ts = _history()
    cache = mk.compress(k, v, method, budget=budget, lengths=L, timestamps=ts, **_kwargs(method, q))
    n = L.long()
    want = torch.minimum(torch.full_like(n, budget), n) if isinstance(budget, int) else \
        torch.clamp(torch.floor(n * budget + 1e-9).long(), min=1).minimum(n)
    stored = cache.length.long() + (cache.residual.length.long() if cache.residual is not None else 0)
    if method.split("+")[0] == "pyramidkv":
        total = sum(mk.compress(k, v, method, budget=budget, lengths=L, timestamps=ts,
                                **{**_kwargs(method, q), "layer": layer}).length.long() for layer in range(3))
        assert torch.equal(total, 3 * want[:, None].expand(B, HKV))
    else:
        assert torch.equal(stored, want[:, None].expand(B, HKV)), (stored, want)
    assert torch.equal(cache.original_length, L)


@pytest.mark.parametrize("method", PRECISION)
def test_precision_keeps_every_token(method):
    k, v, q, L, ts = _history()
    cache = mk.compress(k, v, method, lengths=L, timestamps=ts, **_kwargs(method, q))
    stored = cache.length.long() + (cache.residual.length.long() if cache.residual is not None else 0)
    assert torch.equal(stored, L.long()[:, None].expand(B, HKV))
    assert cache.is_quantized


@pytest.mark.parametrize("method", RESIDUAL_PRECISION)
def test_precision_rejects_dropping_token_budget(method):
    k, v, q, L, ts = _history()
    with pytest.raises(ValueError, match="keeps every token"):
        mk.compress(k, v, method, budget=0.5, lengths=L, **_kwargs(method, q))
    with pytest.raises(ValueError, match="keeps every token"):
        mk.compress(k, v, method, budget=4, lengths=L, **_kwargs(method, q))


@pytest.mark.parametrize("method", TOKEN_METHODS + RESIDUAL_PRECISION + HYBRIDS)
def test_bytes_budget_fits_and_is_largest(method):
    k, v, q, L, ts = _history()
    kw = _kwargs(method, q)
    full = mk.compress(k, v, "none", lengths=L, timestamps=ts).nbytes_per_user()
    limit = int(full[0]) * 7 // 10 if _level(method) == "precision" else int(full[0]) // 3
    cache = mk.compress(k, v, method, budget=Budget(bytes=limit), lengths=L, timestamps=ts, **kw)
    got = cache.nbytes_per_user()
    if method.split("+")[0] == "pyramidkv":
        per_layer = [mk.compress(k, v, method, budget=Budget(bytes=limit), lengths=L, timestamps=ts,
                                 **{**kw, "layer": layer}).nbytes_per_user() for layer in range(3)]
        assert bool((sum(per_layer) <= 3 * limit).all())
        return
    assert bool((got <= limit).all()), (got, limit)
    level = _level(method)
    if level == "precision":
        # one more full-precision residual token would not fit (or everything already is residual)
        R = cache.residual.length.long()
        bigger = mk.compress(k, v, method, lengths=L, timestamps=ts, **{**kw, "residual": int(R.max()) + 1})
        grown = bigger.residual.length.long() > R
        assert bool(((bigger.nbytes_per_user() > limit) | ~grown.any(1)).all()) or int(R.max()) >= max(LENGTHS)
    else:
        kept = cache.length.long() + (cache.residual.length.long() if cache.residual is not None else 0)
        for b in range(B):
            kb = int(kept[b].max())
            if kb >= LENGTHS[b]:
                continue
            one = mk.compress(k[b:b + 1], v[b:b + 1], method, budget=kb + 1, lengths=L[b:b + 1],
                              timestamps=ts[b:b + 1], **{**kw, **({"queries": q[b:b + 1]} if "queries" in kw else {})})
            assert int(one.nbytes_per_user()[0]) > limit, (method, b, kb)


def test_bytes_budget_too_small_raises():
    k, v, q, L, ts = _history()
    with pytest.raises(ValueError, match="too small"):
        mk.compress(k, v, "recent", budget=Budget(bytes=10), lengths=L)


# ---- budget >= history: everything kept, full attention reproduced exactly ----------------------------------------

@pytest.mark.parametrize("kind", ["softmax", "hstu"])
@pytest.mark.parametrize("method", TOKEN_METHODS + RESIDUAL_PRECISION + HYBRIDS)
def test_full_budget_reproduces_full_attention(method, kind):
    k, v, q, L, ts = _history()
    kw = _kwargs(method, q)
    if _level(method) == "precision":
        kw["residual"] = N                       # everything in the full-precision residual
        budget = None
    elif "+" in method and method.split("+")[1].startswith(("kivi", "intactkv")):
        kw["residual"] = N
        budget = N
    else:
        budget = N + 5
    if "+" in method and not method.split("+")[1].startswith(("kivi", "intactkv")):
        pytest.skip("plain quantizers are lossy by design; the token stage is checked on its own")
    cache = mk.compress(k, v, method, budget=budget, lengths=L, timestamps=ts, **kw)
    full = mk.compress(k, v, "none", lengths=L, timestamps=ts)
    for b in range(B):
        for h in range(HKV):
            got = _user_entries(cache, b, h)
            ref = _user_entries(full, b, h)
            for x, y in zip(got, ref):
                assert torch.equal(x, y.to(x.dtype))
    torch.testing.assert_close(_attend(cache, kind), _attend(full, kind), rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", RESIDUAL_PRECISION)
def test_huge_bytes_budget_is_full_precision(method):
    k, v, q, L, ts = _history()
    cache = mk.compress(k, v, method, budget=Budget(bytes=10 ** 9), lengths=L, timestamps=ts, **_kwargs(method, q))
    assert int(cache.length.max()) == 0
    full = mk.compress(k, v, "none", lengths=L, timestamps=ts)
    torch.testing.assert_close(_attend(cache), _attend(full), rtol=0, atol=1e-12)


# ---- ragged batches == each user alone ---------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS + HYBRIDS)
def test_ragged_batch_matches_single_user(method):
    k, v, q, L, ts = _history(seed=3)
    kw = _kwargs(method, q)
    budget = 4 if _level(method) in ("pruning", "merging", "hybrid") else None
    if method == "chunk":
        budget = 4
    batch = mk.compress(k, v, method, budget=budget, lengths=L, timestamps=ts, **kw)
    out = _attend(batch)
    for b in range(B):
        n = LENGTHS[b]
        kw1 = {**kw, **({"queries": q[b:b + 1, :, :n]} if "queries" in kw else {})}
        one = mk.compress(k[b:b + 1, :, :n], v[b:b + 1, :, :n], method, budget=budget, lengths=L[b:b + 1],
                          timestamps=ts[b:b + 1, :n], **kw1)
        for h in range(HKV):
            for x, y in zip(_user_entries(batch, b, h), _user_entries(one, 0, h)):
                torch.testing.assert_close(x, y, rtol=0, atol=0)
        assert int(batch.nbytes_per_user()[b]) == int(one.nbytes_per_user()[0])
        q1, k1, v1 = _request(b=B)
        ref = mk.attention(q1[b:b + 1], k1[b:b + 1], v1[b:b + 1], cache=one, is_causal=True, backend="reference")
        torch.testing.assert_close(out[b:b + 1], ref, rtol=0, atol=1e-12)


def test_jagged_input_matches_padded():
    k, v, q, L, ts = _history()
    from malloc_kernels.core.layout import padded_to_jagged
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), L.long().cumsum(0)])
    kj, vj = padded_to_jagged(k, L), padded_to_jagged(v, L)
    tj = padded_to_jagged(ts, L)
    a = mk.compress(kj, vj, "h2o", budget=5, offsets=offsets, timestamps=tj, queries=padded_to_jagged(q, L))
    b = mk.compress(k, v, "h2o", budget=5, lengths=L, timestamps=ts, queries=q)
    assert torch.equal(a.position, b.position) and torch.equal(a.k, b.k) and torch.equal(a.timestamp, b.timestamp)


# ---- determinism, positions/timestamps --------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS + HYBRIDS)
def test_deterministic_under_seed(method):
    k, v, q, L, ts = _history(seed=5)
    kw = _kwargs(method, q)
    budget = 6 if _level(method) in ("pruning", "merging", "hybrid") else None
    a = mk.compress(k, v, method, budget=budget, lengths=L, timestamps=ts, seed=7, **kw)
    b = mk.compress(k, v, method, budget=budget, lengths=L, timestamps=ts, seed=7, **kw)
    for x, y in zip(torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)):
        assert (x is None and y is None) or torch.equal(x, y)


def test_random_depends_on_seed_and_head():
    k, v, q, L, ts = _history()
    a = mk.compress(k, v, "random", budget=6, lengths=L, seed=1)
    b = mk.compress(k, v, "random", budget=6, lengths=L, seed=2)
    assert not torch.equal(a.position, b.position)
    assert not torch.equal(a.position[0, 0], a.position[0, 1])


@pytest.mark.parametrize("method", METHODS + HYBRIDS)
def test_positions_and_timestamps_preserved(method):
    k, v, q, L, ts = _history(seed=9)
    # shuffle the input order: policies must use ORIGINAL positions, not input order
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(N, dtype=torch.int32)[perm]
    kp, vp = k[:, :, perm], v[:, :, perm]
    tsp, qp = ts[:, perm], q
    lengths = torch.full((B,), N, dtype=torch.int32)
    kw = _kwargs(method, qp)
    kw.pop("queries", None)
    stats = torch.rand(B, HKV, N, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    if method.split("+")[0] in ("snapkv", "pyramidkv", "tova") or method.split("+")[-1] in SCORING:
        kw["stats"] = stats
    elif method.split("+")[0] in SCORING:
        kw["stats"] = stats
    budget = 7 if _level(method) in ("pruning", "merging", "hybrid") else None
    cache = mk.compress(kp, vp, method, budget=budget, positions=pos, timestamps=tsp, lengths=lengths, **kw)
    ts_of_pos = torch.empty_like(ts)
    ts_of_pos[:, pos.long()] = tsp
    merged = cache.count is not None and _level(method.split("+")[0]) == "merging"
    for b in range(B):
        for h in range(HKV):
            p, t, c, kk, vv = _user_entries(cache, b, h)
            assert bool((p[1:] > p[:-1]).all()), "entries must be distinct and sorted by position"
            assert torch.equal(t, ts_of_pos[b, p])
            for seg in [cache] + ([cache.residual] if cache.residual is not None else []):
                if method in UNSORTED:
                    break
                L_ = int(seg.length[b, h])
                sp = seg.position[b, h, :L_].long()
                assert bool((sp[1:] > sp[:-1]).all()), "each segment is stored sorted by position"
            if not merged and not cache.is_quantized:
                src = torch.argsort(pos.long())[p]
                assert torch.equal(kk, kp[b, h, src]) and torch.equal(vv, vp[b, h, src])


# ---- bad configuration -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call, match", [
    (dict(method="nope", budget=4), "unknown method 'nope'"),
    (dict(method="h2o", budget=0), "budget tokens must be >= 1"),
    (dict(method="h2o", budget=-0.5), "ratio must be a float in"),
    (dict(method="recent", budget=1.5), "ratio must be a float in"),
    (dict(method="recent"), "needs a budget"),
    (dict(method="recent", budget=True), "budget must be"),
    (dict(method="kivi", bits=3), "bits must be one of"),
    (dict(method="kivi4", group_size=3), "group_size=3 must divide head_dim 8"),
    (dict(method="intactkv", bits=5), "bits must be one of"),
    (dict(method="kivi", residual=-1), "residual must be >= 0"),
    (dict(method="h2o", budget=4, windw=3), "unknown parameter"),
    (dict(method="snapkv", budget=4, kernel_size=4), "kernel_size must be odd"),
    (dict(method="snapkv", budget=4, pooling="median"), "pooling must be"),
    (dict(method="pyramidkv", budget=4), "needs layer= and num_layers="),
    (dict(method="pyramidkv", budget=4, layer=3, num_layers=3), "layer must be < num_layers"),
    (dict(method="chunk", budget=4, chunk=2), "exactly one of chunk"),
    (dict(method="chunk", chunk=0), "chunk must be >= 1"),
    (dict(method="d2o", budget=4, threshold=2.0), "threshold must be in"),
    (dict(method="kivi4+h2o", budget=4), "first stage 'kivi4' must be a pruning or merging"),
    (dict(method="h2o+tome", budget=4), "second stage 'tome' must be a precision"),
    (dict(method="h2o+kivi4+int8", budget=4), "hybrid method must be 'a\\+b'"),
    (dict(method="h2o+kivi4", budget=4, bogus=1), "unknown parameter 'bogus'"),
    (dict(method="h2o+kivi9", budget=4), "unknown method 'kivi9'"),
    (dict(method="h2o", budget=4), "needs attention statistics"),
    (dict(method="random", budget=4, seed=1.5), "seed must be an int"),
])
def test_bad_configuration_raises_value_error(call, match):
    k, v, q, L, ts = _history()
    with pytest.raises(ValueError, match=match):
        mk.compress(k, v, lengths=L, **call)


def test_budget_type_validation():
    with pytest.raises(ValueError, match="bytes must be >= 1"):
        Budget(bytes=0)
    with pytest.raises(ValueError, match="exactly one"):
        Budget(ratio=0.5, tokens=3)


def test_stats_window_mismatch_raises():
    k, v, q, L, ts = _history(lengths=[N, N, N])
    from malloc_kernels.core.layout import padded_to_jagged
    stats = mk.attention(q, k, v, is_causal=True, return_stats=True, stats_window=5, backend="reference").stats
    with pytest.raises(ValueError, match="stats_window=5"):
        mk.compress(k, v, "snapkv", budget=4, stats=stats, window=3)
    with pytest.raises(ValueError, match="stats_window=5"):
        mk.compress(k, v, "tova", budget=4, stats=stats)
    assert padded_to_jagged is not None
