"""The reference attention (``malloc_kernels.reference``) against the attention contract (ARCHITECTURE.md,
"Attention semantics"), in float64.

Every expectation here comes from an independent computation: a per-row loop oracle (``naive``) that walks the
contract literally, SDPA over an explicitly built full sequence, or an explicitly materialised dense bias/mask.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import malloc_kernels as mk
from malloc_kernels import reference
from malloc_kernels.cache.types import KVCache

F64 = torch.float64


def close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ---- builders -------------------------------------------------------------------------------------------------
def make_cache(B, Hkv, C, D, *, lengths, orig, gen, dtype=F64, timestamps=None, counts=False, residual=0,
               pad_value=float("nan")):
    """A float cache with per-(user, head) ``lengths``, entries at distinct ORIGINAL positions < orig[b] in
    shuffled order, and garbage (NaN by default) in every padding slot."""
    k = torch.randn(B, Hkv, C, D, generator=gen, dtype=dtype)
    v = torch.randn(B, Hkv, C, D, generator=gen, dtype=dtype)
    pos = torch.zeros(B, Hkv, C, dtype=torch.int32)
    for b in range(B):
        for h in range(Hkv):
            L = int(lengths[b][h])
            assert L <= orig[b] - residual
            pos[b, h, :L] = torch.randperm(orig[b] - residual, generator=gen)[:L].to(torch.int32)
    length = torch.tensor(lengths, dtype=torch.int32)
    valid = torch.arange(C) < length[..., None].long()
    k = torch.where(valid[..., None], k, torch.full((), pad_value, dtype=dtype))
    v = torch.where(valid[..., None], v, torch.full((), pad_value, dtype=dtype))
    ts = None
    if timestamps is not None:
        ts = torch.stack([timestamps[b][pos[b].long()] for b in range(B)])
    cnt = None
    if counts:
        cnt = torch.randint(1, 5, (B, Hkv, C), generator=gen).float()
        cnt = torch.where(valid, cnt, torch.full((), float("nan")))
    res = None
    if residual:
        rk = torch.randn(B, Hkv, residual, D, generator=gen, dtype=dtype)
        rv = torch.randn(B, Hkv, residual, D, generator=gen, dtype=dtype)
        rpos = torch.stack([torch.arange(orig[b] - residual, orig[b]) for b in range(B)]).to(torch.int32)
        rpos = rpos[:, None].expand(B, Hkv, residual).contiguous()
        rts = None if timestamps is None else torch.stack([timestamps[b][rpos[b].long()] for b in range(B)])
        res = KVCache(k=rk, v=rv, length=torch.full((B, Hkv), residual, dtype=torch.int32), position=rpos,
                      original_length=torch.tensor(orig, dtype=torch.int32), head_dim=D, timestamp=rts)
    return KVCache(k=k, v=v, length=length, position=pos, original_length=torch.tensor(orig, dtype=torch.int32),
                   head_dim=D, timestamp=ts, count=cnt, residual=res)


def make_timestamps(B, n, gen):
    """Per-user increasing timestamps for original positions 0..n-1 (gaps span many log buckets)."""
    gaps = torch.randint(0, 4000, (B, n), generator=gen) * torch.randint(0, 3, (B, n), generator=gen) ** 3
    return torch.cumsum(gaps, dim=1)


# ---- the literal per-row oracle -------------------------------------------------------------------------------
def bucket_py(dt, T):
    return min(math.floor(math.log(max(abs(int(dt)), 1)) / 0.301), T - 1)


def naive(q, k, v, *, cache=None, kind="softmax", scale=None, is_causal=False, num_targets=None, qpos=None,
          qts=None, pos_bias=None, time_bias=None, hstu_norm="original", window=None, bool_mask=None):
    """One user at a time, one (head, query) row at a time, exactly as the contract reads.

    q [B, Hq, L, D], k/v [B, Hkv, L, D] (request's own tokens when a cache is given), float64.
    Returns out [B, Hq, L, D], lse [B, Hq, L], mass dict {segment: [B, Hkv, n]} and window-mass dict.
    """
    B, Hq, L, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = 1 / math.sqrt(D) if scale is None else scale
    out = torch.zeros(B, Hq, L, D, dtype=F64)
    lse = torch.full((B, Hq, L), float("-inf"), dtype=F64)
    sizes = {"key": Lk}
    if cache is not None:
        sizes["cache"] = cache.capacity
        if cache.residual is not None:
            sizes["residual"] = cache.residual.capacity
    mass = {s: torch.zeros(B, Hkv, n, dtype=F64) for s, n in sizes.items()}
    wmass = {s: torch.zeros(B, Hkv, n, dtype=F64) for s, n in sizes.items()}
    for b in range(B):
        nt = 0 if num_targets is None else int(num_targets[b])
        for h in range(Hq):
            g = h // G
            for i in range(L):
                ents = []   # (segment, index, k, v, pos, ts, count)
                if cache is not None:
                    for name, seg in (("cache", cache), ("residual", cache.residual)):
                        if seg is None:
                            continue
                        for j in range(int(seg.length[b, g])):
                            c = 1.0 if seg.count is None else float(seg.count[b, g, j])
                            ts = None if seg.timestamp is None else int(seg.timestamp[b, g, j])
                            ents.append((name, j, seg.k[b, g, j], seg.v[b, g, j], int(seg.position[b, g, j]), ts,
                                         c))
                n_req = 0
                for j in range(Lk):
                    if is_causal and j > i:
                        continue
                    if nt and i >= L - nt and j >= L - nt and j != i:
                        continue
                    if bool_mask is not None and not bool(bool_mask[b, h, i, j]):
                        continue
                    n_req += 1
                    pj = None if qpos is None else int(qpos[b, j])
                    tj = None if qts is None else int(qts[b, j])
                    ents.append(("key", j, k[b, g, j], v[b, g, j], pj, tj, 1.0))
                if not ents:
                    continue
                s = []
                for (_, _, kj, _, pj, tj, _) in ents:
                    x = scale * float(q[b, h, i] @ kj)
                    if pos_bias is not None:
                        P = pos_bias.shape[-1]
                        x += float(pos_bias[h, min(max(int(qpos[b, i]) - pj, 0), P - 1)])
                    if time_bias is not None:
                        x += float(time_bias[h, bucket_py(int(qts[b, i]) - tj, time_bias.shape[-1])])
                    s.append(x)
                s = torch.tensor(s, dtype=F64)
                c = torch.tensor([e[6] for e in ents], dtype=F64)
                vs = torch.stack([e[3] for e in ents])
                if kind == "softmax":
                    m = float(s.max())
                    p = c * torch.exp(s - m)
                    w = p / p.sum()
                    lse[b, h, i] = m + math.log(float(p.sum()))
                else:
                    if isinstance(hstu_norm, int):
                        n = hstu_norm
                    elif hstu_norm == "kept":
                        n = len(ents)
                    else:
                        n = n_req + (int(cache.original_length[b]) if cache is not None else 0)
                    w = c * F.silu(s) / n
                out[b, h, i] = w @ vs
                in_window = window is not None and i >= L - window
                for wt, (name, j, *_rest) in zip(w.abs(), ents):
                    mass[name][b, g, j] += wt
                    if in_window:
                        wmass[name][b, g, j] += wt
    return out, lse, mass, wmass


def random_call(gen, *, B=2, Hq=4, Hkv=2, L=5, D=6, C=7, R=2, kind="softmax", causal=True, targets=True,
                bias=True, counts=True, hstu_norm="original"):
    """A random cache + request call exercising everything at once."""
    orig = [int(torch.randint(C + R, C + R + 6, (1,), generator=gen)) for _ in range(B)]
    lengths = torch.randint(0, C + 1, (B, Hkv), generator=gen).tolist()
    ts_all = make_timestamps(B, max(orig) + L, gen)
    cache = make_cache(B, Hkv, C, D, lengths=lengths, orig=orig, gen=gen, timestamps=ts_all if bias else None,
                       counts=counts, residual=R)
    q = torch.randn(B, Hq, L, D, generator=gen, dtype=F64)
    k = torch.randn(B, Hkv, L, D, generator=gen, dtype=F64)
    v = torch.randn(B, Hkv, L, D, generator=gen, dtype=F64)
    kw = dict(cache=cache, kind=kind, is_causal=causal, hstu_norm=hstu_norm)
    if targets:
        kw["num_targets"] = torch.randint(0, L + 1, (B,), generator=gen)
    if bias:
        qpos = torch.tensor(orig)[:, None] + torch.arange(L)[None]
        kw["query_timestamps"] = torch.stack([ts_all[b, qpos[b]] for b in range(B)])
        kw["pos_bias"] = torch.randn(Hq, 9, generator=gen).float()
        kw["time_bias"] = torch.randn(Hq, 11, generator=gen).float()
    return q, k, v, kw


def naive_of(q, k, v, kw, window=None):
    qpos = None
    if kw.get("pos_bias") is not None or kw.get("time_bias") is not None:
        cache = kw.get("cache")
        base = cache.original_length.long() if cache is not None else torch.zeros(q.shape[0], dtype=torch.long)
        qpos = kw.get("query_positions", base[:, None] + torch.arange(q.shape[2])[None])
    return naive(q, k, v, cache=kw.get("cache"), kind=kw.get("kind", "softmax"), is_causal=kw.get("is_causal"),
                 num_targets=kw.get("num_targets"), qpos=qpos, qts=kw.get("query_timestamps"),
                 pos_bias=kw.get("pos_bias"), time_bias=kw.get("time_bias"),
                 hstu_norm=kw.get("hstu_norm", "original"), window=window)


# ---- the oracle itself ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,hstu_norm", [("softmax", "original"), ("hstu", "original"), ("hstu", "kept"),
                                             ("hstu", 7)])
@pytest.mark.parametrize("causal", [True, False])
def test_vectorised_reference_equals_per_row_loop_oracle(kind, causal, hstu_norm):
    gen = torch.Generator().manual_seed(1)
    q, k, v, kw = random_call(gen, kind=kind, causal=causal, hstu_norm=hstu_norm)
    res = reference.attention(q, k, v, return_lse=True, return_stats=True, stats_window=2, **kw)
    out, lse, mass, wmass = naive_of(q, k, v, kw, window=2)
    close(res.output, out)
    if kind == "softmax":
        close(res.lse, lse)
    else:
        assert res.lse is None
    close(res.stats.key_mass, mass["key"])
    close(res.stats.cache_mass, mass["cache"])
    close(res.stats.residual_mass, mass["residual"])
    close(res.stats.key_window_mass, wmass["key"])
    close(res.stats.cache_window_mass, wmass["cache"])
    close(res.stats.residual_window_mass, wmass["residual"])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2 ** 31 - 1), kind=st.sampled_from(["softmax", "hstu"]), causal=st.booleans(),
       targets=st.booleans(), bias=st.booleans(), counts=st.booleans(), ratio=st.sampled_from([1, 2, 3]),
       Hkv=st.integers(1, 2), L=st.integers(1, 6), D=st.integers(1, 9), C=st.integers(1, 6), R=st.integers(0, 2))
def test_randomized_reference_equals_loop_oracle(seed, kind, causal, targets, bias, counts, ratio, Hkv, L, D, C, R):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, kw = random_call(gen, B=2, Hq=Hkv * ratio, Hkv=Hkv, L=L, D=D, C=C, R=R, kind=kind, causal=causal,
                              targets=targets, bias=bias, counts=counts)
    res = reference.attention(q, k, v, return_lse=True, return_stats=True, stats_window=1, **kw)
    out, lse, mass, wmass = naive_of(q, k, v, kw, window=1)
    close(res.output, out)
    if kind == "softmax":
        close(res.lse, lse)
    close(res.stats.cache_mass, mass["cache"])
    close(res.stats.key_window_mass, wmass["key"])
    assert not torch.isnan(res.output).any()


# ---- acceptance properties ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["softmax", "hstu"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_merged_duplicated_entries_reproduce_unmerged_result_exactly(kind, with_bias):
    gen = torch.Generator().manual_seed(2)
    B, Hq, Hkv, D, M, L = 2, 4, 2, 8, 5, 4
    counts = torch.tensor([[[1, 3, 2, 1, 4], [2, 2, 1, 5, 1]], [[1, 1, 1, 1, 1], [6, 1, 2, 1, 3]]])
    k = torch.randn(B, Hkv, M, D, generator=gen, dtype=F64)
    v = torch.randn(B, Hkv, M, D, generator=gen, dtype=F64)
    pos = torch.stack([torch.randperm(20, generator=gen)[:M] for _ in range(B * Hkv)]).view(B, Hkv, M)
    ts = pos.long() * 997 + 13
    orig = torch.full((B,), 20, dtype=torch.int32)
    merged = KVCache(k=k, v=v, length=torch.full((B, Hkv), M, dtype=torch.int32), position=pos.int(),
                     original_length=orig, head_dim=D, timestamp=ts, count=counts.float())
    # The unmerged cache repeats entry j counts[j] times (same key, value, position and timestamp).
    N = int(counts.sum(-1).max())
    uk = torch.zeros(B, Hkv, N, D, dtype=F64)
    uv = torch.zeros(B, Hkv, N, D, dtype=F64)
    upos = torch.zeros(B, Hkv, N, dtype=torch.int32)
    uts = torch.zeros(B, Hkv, N, dtype=torch.int64)
    ulen = torch.zeros(B, Hkv, dtype=torch.int32)
    for b in range(B):
        for h in range(Hkv):
            idx = torch.repeat_interleave(torch.arange(M), counts[b, h])
            n = idx.numel()
            uk[b, h, :n], uv[b, h, :n], upos[b, h, :n], uts[b, h, :n] = k[b, h, idx], v[b, h, idx], \
                pos[b, h, idx].int(), ts[b, h, idx]
            ulen[b, h] = n
    unmerged = KVCache(k=uk, v=uv, length=ulen, position=upos, original_length=orig, head_dim=D, timestamp=uts)
    q = torch.randn(B, Hq, L, D, generator=gen, dtype=F64)
    rk = torch.randn(B, Hkv, L, D, generator=gen, dtype=F64)
    rv = torch.randn(B, Hkv, L, D, generator=gen, dtype=F64)
    extra = {}
    if with_bias:
        extra = dict(pos_bias=torch.randn(Hq, 30, generator=gen), time_bias=torch.randn(Hq, 40, generator=gen),
                     query_timestamps=(20 + torch.arange(L)).expand(B, L) * 997 + 13)
    a = reference.attention(q, rk, rv, cache=merged, kind=kind, is_causal=True, return_lse=True,
                            return_stats=True, **extra)
    b_ = reference.attention(q, rk, rv, cache=unmerged, kind=kind, is_causal=True, return_lse=True,
                             return_stats=True, **extra)
    close(a.output, b_.output, 1e-12)
    if kind == "softmax":
        close(a.lse, b_.lse, 1e-12)
    close(a.stats.key_mass, b_.stats.key_mass, 1e-12)


@pytest.mark.parametrize("ragged", [False, True])
def test_cache_keeping_everything_reproduces_full_attention_softmax(ragged):
    """compress(method='none') of the history + the request == SDPA over [history ; request], causal."""
    gen = torch.Generator().manual_seed(3)
    B, Hq, Hkv, D, N, L = 3, 4, 2, 16, 11, 5
    hk = torch.randn(B, Hkv, N, D, generator=gen, dtype=F64)
    hv = torch.randn(B, Hkv, N, D, generator=gen, dtype=F64)
    hlen = torch.tensor([11, 4, 0]) if ragged else torch.full((B,), N)
    cache = mk.compress(hk, hv, "none", lengths=hlen)
    q = torch.randn(B, Hq, L, D, generator=gen, dtype=F64)
    k = torch.randn(B, Hkv, L, D, generator=gen, dtype=F64)
    v = torch.randn(B, Hkv, L, D, generator=gen, dtype=F64)
    got = reference.attention(q, k, v, cache=cache, is_causal=True)
    for b in range(B):
        n = int(hlen[b])
        fk = torch.cat([hk[b:b + 1, :, :n], k[b:b + 1]], dim=2)
        fv = torch.cat([hv[b:b + 1, :, :n], v[b:b + 1]], dim=2)
        fq = torch.cat([torch.zeros(1, Hq, n, D, dtype=F64), q[b:b + 1]], dim=2)
        want = F.scaled_dot_product_attention(fq, fk, fv, is_causal=True, enable_gqa=True)[:, :, n:]
        close(got[b:b + 1], want)


@pytest.mark.parametrize("kind", ["softmax", "hstu"])
def test_cache_keeping_everything_reproduces_full_attention_with_bias(kind):
    """Full cache + request (default positions original_length + i) == no-cache causal attention over the
    concatenated sequence with positions 0..N+L-1, both kinds, relative bias included."""
    gen = torch.Generator().manual_seed(4)
    B, Hq, Hkv, D, N, L = 2, 2, 1, 8, 9, 4
    hk = torch.randn(B, Hkv, N, D, generator=gen, dtype=F64)
    hv = torch.randn(B, Hkv, N, D, generator=gen, dtype=F64)
    ts = make_timestamps(B, N + L, gen)
    cache = mk.compress(hk, hv, "none", timestamps=ts[:, :N])
    q = torch.randn(B, Hq, N + L, D, generator=gen, dtype=F64)
    k = torch.randn(B, Hkv, L, D, generator=gen, dtype=F64)
    v = torch.randn(B, Hkv, L, D, generator=gen, dtype=F64)
    pb, tb = torch.randn(Hq, 6, generator=gen), torch.randn(Hq, 25, generator=gen)
    got = reference.attention(q[:, :, N:], k, v, cache=cache, kind=kind, is_causal=True, pos_bias=pb,
                              time_bias=tb, query_timestamps=ts[:, N:], return_lse=True)
    full = reference.attention(q, torch.cat([hk, k], 2), torch.cat([hv, v], 2), kind=kind, is_causal=True,
                               pos_bias=pb, time_bias=tb, query_timestamps=ts, return_lse=True)
    close(got.output, full.output[:, :, N:])
    if kind == "softmax":
        close(got.lse, full.lse[:, :, N:])


def test_relative_bias_after_eviction_equals_dense_bias_on_surviving_entries():
    """Per-head eviction of a history; the in-kernel bias from the stored ORIGINAL positions/timestamps equals
    full-sequence attention with a densely materialised additive mask: -inf on evicted entries, the bias formula
    (written out with math.log) on survivors."""
    gen = torch.Generator().manual_seed(5)
    B, Hq, Hkv, D, N, L, P, T = 2, 4, 2, 8, 12, 3, 7, 30
    hk = torch.randn(B, Hkv, N, D, generator=gen, dtype=F64)
    hv = torch.randn(B, Hkv, N, D, generator=gen, dtype=F64)
    ts = make_timestamps(B, N + L, gen)
    keep = [[torch.randperm(N, generator=gen)[:n] for n in (5, 9)] for _ in range(B)]   # shuffled order
    C = 9
    ck = torch.full((B, Hkv, C, D), float("nan"), dtype=F64)
    cv = torch.full((B, Hkv, C, D), float("nan"), dtype=F64)
    cpos = torch.zeros(B, Hkv, C, dtype=torch.int32)
    cts = torch.zeros(B, Hkv, C, dtype=torch.int64)
    clen = torch.zeros(B, Hkv, dtype=torch.int32)
    for b in range(B):
        for h in range(Hkv):
            idx = keep[b][h]
            n = idx.numel()
            ck[b, h, :n], cv[b, h, :n], cpos[b, h, :n], cts[b, h, :n] = hk[b, h, idx], hv[b, h, idx], \
                idx.int(), ts[b, idx]
            clen[b, h] = n
    cache = KVCache(k=ck, v=cv, length=clen, position=cpos, original_length=torch.full((B,), N, dtype=torch.int32),
                    head_dim=D, timestamp=cts)
    q = torch.randn(B, Hq, L, D, generator=gen, dtype=F64)
    k = torch.randn(B, Hkv, L, D, generator=gen, dtype=F64)
    v = torch.randn(B, Hkv, L, D, generator=gen, dtype=F64)
    pb, tb = torch.randn(Hq, P, generator=gen), torch.randn(Hq, T, generator=gen)
    got = reference.attention(q, k, v, cache=cache, is_causal=True, pos_bias=pb, time_bias=tb,
                              query_timestamps=ts[:, N:])
    dense = torch.full((B, Hq, L, N + L), float("-inf"), dtype=F64)
    for b in range(B):
        for h in range(Hq):
            kept = set(keep[b][h // (Hq // Hkv)].tolist())
            for i in range(L):
                for j in range(N + L):
                    if (j < N and j not in kept) or (j >= N and j - N > i):
                        continue
                    dp = N + i - j
                    dt = int(ts[b, N + i]) - int(ts[b, j])
                    bucket = min(math.floor(math.log(max(abs(dt), 1)) / 0.301), T - 1)
                    dense[b, h, i, j] = float(pb[h, min(max(dp, 0), P - 1)]) + float(tb[h, bucket])
    want = F.scaled_dot_product_attention(q, torch.cat([hk, k], 2), torch.cat([hv, v], 2), attn_mask=dense,
                                          enable_gqa=True)
    close(got, want)


@pytest.mark.parametrize("kind", ["softmax", "hstu"])
def test_targets_see_history_and_non_targets_but_never_each_other(kind):
    gen = torch.Generator().manual_seed(6)
    q, k, v, kw = random_call(gen, B=2, L=6, kind=kind, causal=True, targets=False, bias=False)
    nt = torch.tensor([3, 2])
    base = reference.attention(q, k, v, num_targets=nt, **kw)
    out, *_ = naive_of(q, k, v, dict(kw, num_targets=nt))
    close(base, out)
    # Changing one target's key/value changes only that target's own row (and nothing of the non-targets).
    for b in range(2):
        t = 6 - int(nt[b])
        k2, v2 = k.clone(), v.clone()
        k2[b, :, t] += 1.0
        v2[b, :, t] -= 2.0
        moved = reference.attention(q, k2, v2, num_targets=nt, **kw)
        changed = (moved - base).abs().amax(dim=-1)[b]                      # [Hq, L]
        assert changed[:, t].min() > 0
        assert changed[:, :t].max() == 0 and changed[:, t + 1:].max() == 0
    # A non-causal request: targets still never see other targets; non-targets see everything.
    kw_nc = dict(kw, is_causal=False)
    close(reference.attention(q, k, v, num_targets=nt, **kw_nc), naive_of(q, k, v, dict(kw_nc, num_targets=nt))[0])


def test_num_targets_zero_and_int_forms_agree():
    gen = torch.Generator().manual_seed(7)
    q, k, v, kw = random_call(gen, targets=False)
    close(reference.attention(q, k, v, num_targets=0, **kw), reference.attention(q, k, v, **kw), 0)
    close(reference.attention(q, k, v, num_targets=2, **kw),
          reference.attention(q, k, v, num_targets=torch.tensor([2, 2]), **kw), 0)


@pytest.mark.parametrize("kind", ["softmax", "hstu"])
def test_empty_rows_give_zeros_minus_inf_lse_and_no_nan_gradients(kind):
    gen = torch.Generator().manual_seed(8)
    # Jagged, no cache: user 1 has queries but no keys at all; user 2 has nothing.
    q = torch.randn(7, 2, 4, dtype=F64, generator=gen, requires_grad=True)
    k = torch.randn(3, 2, 4, dtype=F64, generator=gen, requires_grad=True)
    v = torch.randn(3, 2, 4, dtype=F64, generator=gen, requires_grad=True)
    offsets, key_offsets = torch.tensor([0, 3, 7, 7]), torch.tensor([0, 3, 3, 3])
    res = reference.attention(q, k, v, offsets=offsets, key_offsets=key_offsets, kind=kind, return_lse=True)
    assert torch.equal(res.output[3:], torch.zeros(4, 2, 4, dtype=F64))
    if kind == "softmax":
        assert torch.isinf(res.lse[3:]).all() and (res.lse[3:] < 0).all()
        assert torch.isfinite(res.lse[:3]).all()
    res.output.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    # Dense: a fully-masked bool row and an empty cache with causal rows that still see themselves.
    qd = torch.randn(1, 2, 3, 4, dtype=F64, generator=gen)
    kd = torch.randn(1, 2, 3, 4, dtype=F64, generator=gen)
    mask = torch.ones(3, 3, dtype=torch.bool)
    mask[1] = False
    r = reference.attention(qd, kd, kd, attn_mask=mask, kind=kind, return_lse=True)
    assert torch.equal(r.output[:, :, 1], torch.zeros(1, 2, 4, dtype=F64))
    assert not torch.isnan(r.output).any()
    cache = make_cache(1, 2, 4, 4, lengths=[[0, 0]], orig=[0], gen=gen)
    r2 = reference.attention(qd, kd, kd, cache=cache, kind=kind, is_causal=True, return_lse=True)
    close(r2.output, reference.attention(qd, kd, kd, kind=kind, is_causal=True))


@pytest.mark.parametrize("kind", ["softmax", "hstu"])
def test_ragged_batches_padding_changes_nothing(kind):
    """Jagged call == per-user dense calls == dense padded call with the padding masked out."""
    gen = torch.Generator().manual_seed(9)
    lens = [5, 1, 0, 3]
    Hq, Hkv, D = 4, 2, 5
    off = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())
    q = torch.randn(int(off[-1]), Hq, D, dtype=F64, generator=gen)
    k = torch.randn(int(off[-1]), Hkv, D, dtype=F64, generator=gen)
    v = torch.randn(int(off[-1]), Hkv, D, dtype=F64, generator=gen)
    pb = torch.randn(Hq, 4, generator=gen)
    jag = reference.attention(q, k, v, offsets=off, kind=kind, is_causal=True, pos_bias=pb, return_lse=True,
                              return_stats=True, stats_window=2)
    Lmax = max(lens)
    qd = torch.full((len(lens), Hq, Lmax, D), 1e6, dtype=F64)     # loud padding
    kd = torch.full((len(lens), Hkv, Lmax, D), -1e6, dtype=F64)
    vd = torch.full((len(lens), Hkv, Lmax, D), 1e6, dtype=F64)
    keymask = torch.zeros(len(lens), 1, 1, Lmax, dtype=torch.bool)
    for b, n in enumerate(lens):
        sl = slice(int(off[b]), int(off[b + 1]))
        qd[b, :, :n], kd[b, :, :n], vd[b, :, :n] = q[sl].transpose(0, 1), k[sl].transpose(0, 1), v[sl].transpose(0, 1)
        keymask[b, ..., :n] = True
        if n:
            one = reference.attention(q[sl].transpose(0, 1)[None], k[sl].transpose(0, 1)[None],
                                      v[sl].transpose(0, 1)[None], kind=kind, is_causal=True, pos_bias=pb,
                                      return_lse=True, return_stats=True, stats_window=2)
            close(jag.output[sl], one.output[0].transpose(0, 1))
            close(jag.stats.key_mass[sl], one.stats.key_mass[0].transpose(0, 1))
            close(jag.stats.key_window_mass[sl], one.stats.key_window_mass[0].transpose(0, 1))
            if kind == "softmax":
                close(jag.lse[sl], one.lse[0].transpose(0, 1))
    causal = torch.ones(Lmax, Lmax, dtype=torch.bool).tril()
    dense = reference.attention(qd, kd, vd, attn_mask=keymask & causal, kind=kind, pos_bias=pb)
    for b, n in enumerate(lens):
        close(jag.output[int(off[b]):int(off[b + 1])], dense[b, :, :n].transpose(0, 1))


@pytest.mark.parametrize("kind", ["softmax", "hstu"])
def test_cache_padding_and_per_head_lengths_change_nothing(kind):
    """NaN/inf-filled padding slots and extra capacity leave the result equal to a tight cache's (up to the
    summation order of a longer matmul) and give the padding zero mass."""
    gen = torch.Generator().manual_seed(10)
    q, k, v, kw = random_call(gen, kind=kind)
    c = kw["cache"]
    C2 = c.capacity + 3
    pad = lambda t, val: torch.cat([t, torch.full(t.shape[:2] + (3,) + t.shape[3:], val, dtype=t.dtype)], 2)  # noqa
    wide = c.replace(k=pad(c.k, float("nan")), v=pad(c.v, float("inf")), position=pad(c.position, 10 ** 6),
                     timestamp=pad(c.timestamp, -(10 ** 12)), count=pad(c.count, float("nan")))
    assert wide.capacity == C2
    a = reference.attention(q, k, v, return_stats=True, **kw)
    b = reference.attention(q, k, v, return_stats=True, **dict(kw, cache=wide))
    close(a.output, b.output, 1e-13)
    close(a.stats.cache_mass, b.stats.cache_mass[..., :c.capacity], 1e-13)
    assert torch.equal(b.stats.cache_mass[..., c.capacity:], torch.zeros_like(b.stats.cache_mass[..., c.capacity:]))


@pytest.mark.parametrize("kind", ["softmax", "hstu"])
@pytest.mark.parametrize("Hq,Hkv", [(4, 2), (6, 1), (3, 3)])
def test_gqa_and_mqa_equal_attention_with_repeated_kv_heads(kind, Hq, Hkv):
    gen = torch.Generator().manual_seed(11)
    q, k, v, kw = random_call(gen, Hq=Hq, Hkv=Hkv, kind=kind, counts=False)
    G = Hq // Hkv
    c = kw["cache"]
    rep = lambda t: t.repeat_interleave(G, dim=1)  # noqa: E731
    res = c.residual.replace(k=rep(c.residual.k), v=rep(c.residual.v), length=rep(c.residual.length),
                             position=rep(c.residual.position), timestamp=rep(c.residual.timestamp))
    crep = c.replace(k=rep(c.k), v=rep(c.v), length=rep(c.length), position=rep(c.position),
                     timestamp=rep(c.timestamp), residual=res)
    a = reference.attention(q, k, v, return_stats=True, **kw)
    b = reference.attention(q, rep(k), rep(v), return_stats=True, **dict(kw, cache=crep))
    close(a.output, b.output)
    # mass of a kv head is the sum over the query heads sharing it
    close(a.stats.cache_mass, b.stats.cache_mass.view(2, Hkv, G, -1).sum(2))


def test_hstu_norm_variants():
    gen = torch.Generator().manual_seed(12)
    q, k, v, kw = random_call(gen, kind="hstu", counts=False, bias=False)
    orig = reference.attention(q, k, v, **kw)
    fixed = reference.attention(q, k, v, **dict(kw, hstu_norm=50))
    kept = reference.attention(q, k, v, **dict(kw, hstu_norm="kept"))
    # n_i scales the output: o_norm(n) * n is the same unnormalised sum for every choice of n.
    c = kw["cache"]
    L = q.shape[2]
    i = torch.arange(L)
    nt = kw["num_targets"]
    n_req = torch.stack([torch.where(i >= L - nt[b], L - nt[b] + 1, i + 1) for b in range(2)]).to(F64)   # causal
    n_orig = (c.original_length.to(F64)[:, None] + n_req)[:, None, :, None]
    close(orig * n_orig, fixed * 50)
    n_kept = (c.length + c.residual.length).to(F64).repeat_interleave(2, 1)[..., None, None] + n_req[:, None, :, None]
    close(kept * n_kept, fixed * 50)
    # Without compression (full cache, no counts), "kept" == "original".
    hk = torch.randn(2, 2, 6, 6, dtype=F64, generator=gen)
    full = mk.compress(hk, hk * 2, "none")
    close(reference.attention(q, k, v, cache=full, kind="hstu", hstu_norm="kept", is_causal=True),
          reference.attention(q, k, v, cache=full, kind="hstu", is_causal=True))


def test_stats_equal_mass_of_explicit_probability_matrix_plain():
    """No cache: key_mass == column sums (over queries and the heads of a kv group) of SDPA's probabilities."""
    gen = torch.Generator().manual_seed(13)
    B, Hq, Hkv, L, D = 2, 4, 2, 7, 5
    q = torch.randn(B, Hq, L, D, dtype=F64, generator=gen)
    k = torch.randn(B, Hkv, L, D, dtype=F64, generator=gen)
    res = reference.attention(q, k, k, is_causal=True, return_stats=True, stats_window=3)
    s = q @ k.repeat_interleave(2, 1).transpose(-1, -2) / math.sqrt(D)
    s = s.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
    p = torch.softmax(s, -1)                                               # [B, Hq, L, L]
    close(res.stats.key_mass, p.sum(2).view(B, Hkv, 2, L).sum(2))
    close(res.stats.key_window_mass, p[:, :, -3:].sum(2).view(B, Hkv, 2, L).sum(2))
    assert res.stats.cache_mass is None and res.stats.window == 3
    # each query row's softmax mass sums to 1: total mass = number of (query, head) rows
    close(res.stats.key_mass.sum(), torch.tensor(float(B * Hq * L), dtype=F64))


def test_quantized_cache_equals_float_cache_of_its_dequantized_values():
    from malloc_kernels.cache.quant import quantize_cache
    gen = torch.Generator().manual_seed(14)
    q, k, v, kw = random_call(gen, counts=True, D=8, bias=False)
    c = kw["cache"]
    clean = c.replace(k=torch.nan_to_num(c.k), v=torch.nan_to_num(c.v))
    qc = quantize_cache(clean, "int4", "int2", group_size=4, k_axis="channel")
    dk, dv = qc.dequantize(F64)
    deq = qc.replace(k=dk, v=dv, k_format="float", v_format="float", k_scale=None, k_zero=None, v_scale=None,
                     v_zero=None, group_size=0)
    close(reference.attention(q, k, v, **dict(kw, cache=qc)), reference.attention(q, k, v, **dict(kw, cache=deq)),
          0)


def test_autograd_gradcheck_through_cache_counts_bias_and_targets():
    gen = torch.Generator().manual_seed(15)
    q, k, v, kw = random_call(gen, B=1, Hq=2, Hkv=1, L=3, D=3, C=3, R=1)
    q.requires_grad_(True)
    k.requires_grad_(True)
    pb = kw.pop("pos_bias").double().requires_grad_(True)
    tb = kw.pop("time_bias")

    def f(q, k, pb):
        # Bias tables are normalised to float32 (the kernels' table dtype), too coarse for gradcheck's finite
        # differences; gradcheck covers q/k in float64 and the table's gradient is checked to flow below.
        return reference.attention(q, k, v, pos_bias=pb.float(), time_bias=tb, **kw)

    assert torch.autograd.gradcheck(lambda q, k: f(q, k, pb.detach()), (q, k), eps=1e-6, atol=1e-6)
    out = f(q, k, pb)
    out.sum().backward()
    assert pb.grad is not None and torch.isfinite(pb.grad).all() and pb.grad.abs().sum() > 0


def test_dropout_in_reference_is_sdpa_like():
    gen = torch.Generator().manual_seed(16)
    q = torch.randn(2, 2, 6, 4, dtype=F64, generator=gen)
    k = torch.randn(2, 2, 6, 4, dtype=F64, generator=gen)
    base = reference.attention(q, k, k)
    torch.manual_seed(0)
    d1 = reference.attention(q, k, k, dropout_p=0.5)
    torch.manual_seed(0)
    d2 = reference.attention(q, k, k, dropout_p=0.5)
    assert torch.equal(d1, d2) and not torch.allclose(d1, base)
    # Dropout acts on the normalised weights with 1/(1-p) rescaling (as SDPA): redraw the same mask and compare.
    torch.manual_seed(0)
    keep = F.dropout(torch.ones(2, 2, 1, 6, 6, dtype=F64), 0.5, training=True)[:, :, 0]
    w = torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1)
    close(d1, (w * keep) @ k)


def _user_slice(cache, b):
    """User b's part of a cache, as a one-user cache."""
    fields = ("k", "v", "length", "position", "original_length", "timestamp", "count")
    sl = {f: getattr(cache, f)[b:b + 1] for f in fields if getattr(cache, f) is not None}
    if cache.residual is not None:
        sl["residual"] = _user_slice(cache.residual, b)
    return cache.replace(**sl)


@pytest.mark.parametrize("kind", ["softmax", "hstu"])
def test_jagged_requests_over_a_cache_equal_per_user_dense_calls(kind):
    """Ragged requests (one of them empty) over a per-head evicted, merged cache with a residual, targets and
    relative bias: the jagged call equals running each user alone (default positions original_length[b] + i)."""
    gen = torch.Generator().manual_seed(17)
    lens = [4, 0, 1, 3]
    B, Hq, Hkv, D = len(lens), 4, 2, 6
    orig = [9, 12, 7, 10]
    ts_all = make_timestamps(B, 20, gen)
    cache = make_cache(B, Hkv, 6, D, lengths=[[3, 6], [0, 2], [5, 5], [1, 0]], orig=orig, gen=gen,
                       timestamps=ts_all, counts=True, residual=1)
    off = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())
    total = int(off[-1])
    q = torch.randn(total, Hq, D, dtype=F64, generator=gen)
    k = torch.randn(total, Hkv, D, dtype=F64, generator=gen)
    v = torch.randn(total, Hkv, D, dtype=F64, generator=gen)
    qts = torch.cat([ts_all[b, orig[b]:orig[b] + n] for b, n in enumerate(lens)])
    nt = torch.tensor([2, 0, 1, 1])
    pb, tb = torch.randn(Hq, 8, generator=gen), torch.randn(Hq, 24, generator=gen)
    jag = reference.attention(q, k, v, offsets=off, cache=cache, kind=kind, is_causal=True, num_targets=nt,
                              pos_bias=pb, time_bias=tb, query_timestamps=qts, return_lse=True,
                              return_stats=True, stats_window=2)
    assert jag.output.shape == q.shape and jag.stats.key_mass.shape == (total, Hkv)
    for b, n in enumerate(lens):
        sl = slice(int(off[b]), int(off[b + 1]))
        t = lambda x: x[sl].transpose(0, 1)[None]  # noqa: E731
        one = reference.attention(t(q), t(k), t(v), cache=_user_slice(cache, b), kind=kind, is_causal=True,
                                  num_targets=nt[b:b + 1], pos_bias=pb, time_bias=tb, query_timestamps=qts[None, sl],
                                  return_lse=True, return_stats=True, stats_window=2)
        close(jag.output[sl], one.output[0].transpose(0, 1))
        close(jag.stats.cache_mass[b:b + 1], one.stats.cache_mass)
        close(jag.stats.residual_window_mass[b:b + 1], one.stats.residual_window_mass)
        close(jag.stats.key_mass[sl], one.stats.key_mass[0].transpose(0, 1))
        if kind == "softmax":
            close(jag.lse[sl], one.lse[0].transpose(0, 1))
    # the empty user's cache entries get no mass at all
    assert float(jag.stats.cache_mass[1].abs().sum()) == 0.0
