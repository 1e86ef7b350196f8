"""The C++ CPU attention backend (``ops/cpu.py``) against the float64 reference (``malloc_kernels.reference``).

Quantized caches are compared with the reference run on the SAME quantized cache (dequantized in float64 by the
cache's own rule), so only the kernel's own error is measured. Tolerances: fp32 inputs ~1e-5; fp16/bf16 by
FlashAttention's rule (kernel error <= 2x the error of the reference computed in that dtype's compute path, plus a
tiny absolute slack).
"""
import dataclasses

import pytest
import torch

import malloc_kernels as mk
from malloc_kernels.ops import cpu
from malloc_kernels.core.validate import validate_call
from malloc_kernels.reference import attention as ref_attention

pytestmark = pytest.mark.skipif("cpu" not in mk.available_backends(),
                                reason="C++ extension with attention_cpu not built")

FORMATS = ["none", "int8", "fp8", "int4", "int2"]


def _to64(cache):
    if cache is None:
        return None
    ch = {}
    if cache.k_format == "float":
        ch["k"] = cache.k.double()
    if cache.v_format == "float":
        ch["v"] = cache.v.double()
    if cache.residual is not None:
        ch["residual"] = _to64(cache.residual)
    return cache.replace(**ch)


def _run_both(q, k, v, cache=None, **kw):
    got = mk.attention(q, k, v, cache=cache, backend="cpu", **kw)
    want = ref_attention(q.double(), k.double(), v.double(), cache=_to64(cache), **kw)
    return got, want


def _close(a, b, atol=2e-5, rtol=2e-5):
    assert a.shape == b.shape
    torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=rtol)


def _data(B, Hq, Hkv, L, N, D, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return r(B, Hq, L, D), r(B, Hkv, L, D), r(B, Hkv, L, D), r(B, Hkv, N, D), r(B, Hkv, N, D)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", ["softmax", "hstu"])
@pytest.mark.parametrize("mask", ["causal", "full", "targets"])
@pytest.mark.parametrize("hkv", [4, 1])
def test_cache_formats_kinds_masks(fmt, kind, mask, hkv):
    q, k, v, hk, hv = _data(2, 4, hkv, 17, 97, 32, seed=hash((fmt, kind, mask, hkv)) % 1000)
    lengths = torch.tensor([97, 40])
    cache = mk.compress(hk, hv, fmt, lengths=lengths)
    kw = dict(is_causal=mask != "full", kind=kind, return_stats=True, stats_window=3)
    if kind == "softmax":
        kw["return_lse"] = True
    if mask == "targets":
        kw["num_targets"] = torch.tensor([5, 2])
    got, want = _run_both(q, k, v, cache, **kw)
    _close(got.output, want.output)
    if kind == "softmax":
        _close(got.lse, want.lse)
    for f in ("key_mass", "key_window_mass", "cache_mass", "cache_window_mass"):
        _close(getattr(got.stats, f), getattr(want.stats, f))


@pytest.mark.parametrize("method", ["kivi4", "kivi2", "intactkv4"])
def test_residual_segment(method):
    q, k, v, hk, hv = _data(2, 4, 2, 5, 97, 16, seed=3)
    # IntactKV picks its pivot tokens by attention mass, so it needs the history's queries.
    extra = {"queries": torch.randn(2, 4, 97, 16, generator=torch.Generator().manual_seed(5))} \
        if method.startswith("intactkv") else {}
    cache = mk.compress(hk, hv, method, **extra)
    assert cache.residual is not None
    for kind in ("softmax", "hstu"):
        got, want = _run_both(q, k, v, cache, is_causal=True, kind=kind, return_stats=True)
        _close(got.output, want.output)
        _close(got.stats.residual_mass, want.stats.residual_mass)


@pytest.mark.parametrize("method,budget", [("tome", 0.5), ("chunk", 0.25), ("random", 0.25), ("recent", 0.5)])
def test_merged_and_evicted(method, budget):
    q, k, v, hk, hv = _data(2, 8, 2, 3, 97, 16, seed=4)
    try:
        cache = mk.compress(hk, hv, method, budget=budget)
    except (ValueError, TypeError) as e:
        pytest.skip(f"{method} not constructible without extra inputs: {e}")
    for kind in ("softmax", "hstu"):
        for norm in ("original", "kept", 50):
            got, want = _run_both(q, k, v, cache, kind=kind, hstu_norm=norm, return_stats=True)
            _close(got.output, want.output)
            _close(got.stats.cache_mass, want.stats.cache_mass)


def test_per_head_lengths_counts_and_empty_rows():
    q, k, v, hk, hv = _data(3, 4, 2, 4, 33, 8, seed=5)
    cache = mk.compress(hk, hv, "none")
    length = torch.tensor([[33, 0], [7, 20], [0, 0]], dtype=torch.int32)
    count = torch.rand(3, 2, 33, generator=torch.Generator().manual_seed(1)) * 3
    count[0, 0, :5] = 0.0
    cache = cache.replace(length=length, count=count)
    got, want = _run_both(q, k, v, cache, is_causal=True, return_lse=True, return_stats=True)
    _close(got.output, want.output)
    _close(got.lse, want.lse)
    _close(got.stats.cache_mass, want.stats.cache_mass)
    # no request keys visible and an empty cache -> zeros and lse = -inf, never NaN
    q0, k0, v0 = q[:, :, :1], k[:, :, :0], v[:, :, :0]
    res = mk.attention(q0, k0, v0, backend="cpu", return_lse=True)
    assert torch.all(res.output == 0) and torch.all(res.lse == float("-inf"))


@pytest.mark.parametrize("D", [1, 7, 17, 64])
@pytest.mark.parametrize("L,N", [(1, 1), (17, 97)])
def test_odd_sizes(D, L, N):
    q, k, v, hk, hv = _data(2, 6, 3, L, N, D, seed=D + L)
    for fmt in ("none", "int8", "int4"):
        cache = mk.compress(hk, hv, fmt)
        got, want = _run_both(q, k, v, cache, is_causal=True)
        _close(got, want)


def test_no_cache_matches_sdpa_and_gqa():
    q, k, v, _, _ = _data(2, 8, 2, 33, 1, 24, seed=6)
    k2, v2 = torch.randn(2, 2, 45, 24), torch.randn(2, 2, 45, 24)
    for causal in (False, True):
        got = mk.attention(q, k2, v2, is_causal=causal, enable_gqa=True, backend="cpu")
        want = torch.nn.functional.scaled_dot_product_attention(q.double(), k2.double(), v2.double(),
                                                                 is_causal=causal, enable_gqa=True)
        _close(got, want)


def test_non_contiguous_inputs():
    q, k, v, hk, hv = _data(2, 4, 2, 9, 40, 16, seed=7)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)          # [B, H, L, D] view with odd strides
    cache = mk.compress(hk, hv, "int4")
    got, want = _run_both(qt, k, v, cache, is_causal=True)
    _close(got, want)


def test_relative_bias_exact_buckets():
    B, Hq, Hkv, L, N, D = 2, 4, 2, 6, 50, 16
    q, k, v, hk, hv = _data(B, Hq, Hkv, L, N, D, seed=8)
    g = torch.Generator().manual_seed(2)
    ts = torch.randint(0, 10**9, (B, N), generator=g).sort(dim=1).values
    qts = ts[:, -1:] + torch.randint(0, 10**6, (B, L), generator=g).sort(dim=1).values
    cache = mk.compress(hk, hv, "int8", timestamps=ts)
    pos_bias = torch.randn(Hq, 64, generator=g)
    time_bias = torch.randn(Hq, 40, generator=g)
    for kind in ("softmax", "hstu"):
        got, want = _run_both(q, k, v, cache, kind=kind, is_causal=True, pos_bias=pos_bias, time_bias=time_bias,
                              query_timestamps=qts)
        _close(got, want)
    # a shared [T] table and dt exactly on bucket thresholds
    from malloc_kernels.core.time_buckets import time_bucket_thresholds
    th = time_bucket_thresholds(20)
    qts2 = torch.zeros(B, L, dtype=torch.int64)
    ts2 = -th[torch.arange(N) % th.numel()][None].expand(B, N).contiguous()
    ts2 = ts2 + (torch.arange(N) % 3 - 1)[None]
    cache2 = mk.compress(hk, hv, "none", timestamps=ts2)
    got, want = _run_both(q, k, v, cache2, kind="hstu", time_bias=torch.randn(20, generator=g),
                          query_timestamps=qts2)
    _close(got, want)


def test_jagged_matches_dense_reference():
    B, Hq, Hkv, D = 3, 4, 2, 16
    lens = torch.tensor([5, 0, 9])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)])
    T = int(offsets[-1])
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(T, H, D, generator=g) for H in (Hq, Hkv, Hkv))
    hk, hv = torch.randn(B, Hkv, 30, D, generator=g), torch.randn(B, Hkv, 30, D, generator=g)
    cache = mk.compress(hk, hv, "int4", lengths=torch.tensor([30, 11, 0]))
    for kind in ("softmax", "hstu"):
        kw = dict(offsets=offsets, is_causal=True, kind=kind, num_targets=torch.tensor([2, 0, 3]),
                  return_stats=True, stats_window=2, return_lse=kind == "softmax")
        got, want = _run_both(q, k, v, cache, **kw)
        _close(got.output, want.output)
        if kind == "softmax":
            _close(got.lse, want.lse)
        _close(got.stats.key_mass, want.stats.key_mass)
        _close(got.stats.key_window_mass, want.stats.key_window_mass)
        _close(got.stats.cache_mass, want.stats.cache_mass)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_flash_rule(dtype):
    q, k, v, hk, hv = _data(2, 4, 2, 8, 60, 32, seed=10, dtype=dtype)
    for fmt in ("none", "int4"):
        cache = mk.compress(hk, hv, fmt)
        got = mk.attention(q, k, v, cache=cache, is_causal=True, backend="cpu")
        low = ref_attention(q, k, v, cache=cache, is_causal=True)  # the same math done by PyTorch in this dtype
        exact = ref_attention(q.double(), k.double(), v.double(), cache=_to64(cache), is_causal=True)
        assert got.dtype == dtype
        err = (got.double() - exact).abs().max().item()
        base = (low.double() - exact).abs().max().item()
        assert err <= 2 * base + 1e-3, (err, base)


def test_opcheck():
    q, k, v, hk, hv = _data(2, 4, 2, 3, 20, 16, seed=11)
    cache = mk.compress(hk, hv, "int4")
    call = validate_call(q, k, v, cache=cache, is_causal=True, return_lse=True, return_stats=True, stats_window=2)
    captured = {}
    real = torch.ops.malloc_kernels.attention_cpu

    class Spy:
        def __call__(self, *args):
            captured["args"] = args
            return real(*args)

    try:
        cpu.torch.ops.malloc_kernels.attention_cpu  # noqa: B018
        orig = torch.ops.malloc_kernels.attention_cpu
        torch.ops.malloc_kernels.__dict__["attention_cpu"] = Spy()
        cpu.run(call)
    finally:
        torch.ops.malloc_kernels.__dict__["attention_cpu"] = orig
    torch.library.opcheck(torch.ops.malloc_kernels.attention_cpu.default, captured["args"],
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    idx = torch.randint(0, 20, (2, 2, 5))
    torch.library.opcheck(torch.ops.malloc_kernels.gather_rows.default, (hk, idx))


def test_gather_cache_entries():
    q, k, v, hk, hv = _data(2, 4, 2, 3, 40, 16, seed=12)
    cache = mk.compress(hk, hv, "int8")
    g = torch.Generator().manual_seed(3)
    idx = torch.stack([torch.stack([torch.randperm(40, generator=g)[:10] for _ in range(2)]) for _ in range(2)])
    length = torch.tensor([[10, 4], [7, 10]], dtype=torch.int32)
    small = cpu.gather_cache_entries(cache, idx, length)
    small.validate()
    assert small.capacity == 10 and torch.equal(small.length, length)
    assert torch.equal(small.k[0, 1, 3], cache.k[0, 1, idx[0, 1, 3]])
    assert torch.equal(small.position[1, 0], cache.position[1, 0][idx[1, 0]])
    got, want = _run_both(q, k, v, small, is_causal=True)
    _close(got, want)
    with pytest.raises(ValueError, match="index"):
        cpu.gather_cache_entries(cache, idx + 100)
    with pytest.raises(ValueError, match="channel"):
        cpu.gather_cache_entries(mk.compress(hk, hv, "int4"), idx)


def test_supports_reasons():
    q, k, v, _, _ = _data(1, 2, 2, 3, 1, 8, seed=13)
    ok, why = cpu.supports(validate_call(q.double(), k.double(), v.double()))
    assert not ok and "float64" in why
    ok, why = cpu.supports(validate_call(q, k, v, attn_mask=torch.ones(3, 3, dtype=torch.bool)))
    assert not ok and "attn_mask" in why


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("D,hq,hkv", [(64, 4, 4), (64, 4, 2), (32, 2, 2), (40, 2, 2)])
def test_decode_rows_from_codes(fmt, D, hq, hkv):
    # Lq = 1 with 1-2 query heads per kv head takes the decode path (scores and P V straight from the codes).
    q, k, v, hk, hv = _data(2, hq, hkv, 1, 97, D, seed=D + hq)
    cache = mk.compress(hk, hv, fmt, lengths=torch.tensor([97, 61]))
    for kind in ("softmax", "hstu"):
        kw = dict(is_causal=True, kind=kind, return_stats=True, return_lse=kind == "softmax")
        got, want = _run_both(q, k, v, cache, **kw)
        _close(got.output, want.output)
        if kind == "softmax":
            _close(got.lse, want.lse)
        _close(got.stats.cache_mass, want.stats.cache_mass)


@pytest.mark.parametrize("fmt,params", [
    ("int4", {}), ("int2", {}), ("int8", {}),
    ("int4", {"group_size": 8}), ("int2", {"group_size": 16}), ("int4", {"group_size": 64}),
    ("int8", {"group_size": 16, "k_axis": "channel"}), ("int8", {"group_size": 4, "k_axis": "channel"}),
    ("int8", {"group_size": 32}), ("int4", {"group_size": 32, "k_axis": "token"}),
])
@pytest.mark.parametrize("hq,hkv,L", [(4, 4, 1), (2, 1, 1), (8, 2, 1), (8, 1, 1), (4, 2, 5)])
def test_decode_code_layout_gqa_groups(fmt, params, hq, hkv, L):
    # D = 64 softmax over int8/int4/int2 caches runs the cache segment in the kernel's code layout (one query row
    # straight from the codes, several rows through one expanded tile): GQA, odd and ragged lengths, token groups
    # that end mid-block (group sizes 4..64) and the layouts that fall back to the generic path.
    q, k, v, hk, hv = _data(3, hq, hkv, L, 97, 64, seed=hq * 10 + hkv + L)
    cache = mk.compress(hk, hv, fmt, lengths=torch.tensor([97, 33, 1]), **params)
    got, want = _run_both(q, k, v, cache, is_causal=True, return_lse=True, return_stats=True)
    _close(got.output, want.output)
    _close(got.lse, want.lse)
    _close(got.stats.cache_mass, want.stats.cache_mass)
