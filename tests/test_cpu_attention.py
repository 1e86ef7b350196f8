"""The C++ CPU attention backend (``ops/cpu.py``) against the float64 reference (``malloc_kernels.reference``).

What the backend-parametrized conformance suite (tests/test_attention_conformance.py) does not cover: policies'
caches (residual segments, merged / evicted entries), per-head lengths with zero counts, SDPA equivalence, strided
inputs, exact time-bucket edges, the decode code layout's group sizes, opcheck, gather_cache_entries.

Quantized caches are compared with the reference run on the SAME quantized cache (dequantized in float64 by the
cache's own rule), so only the kernel's own error is measured, by the one rule of tests/tolerance.py.
"""
import pytest
import torch

import malloc_kernels as mk
from attention_cases import to_float64 as _to64
from malloc_kernels.ops import cpu
from malloc_kernels.core.validate import validate_call
from malloc_kernels.reference import attention as ref_attention
from tolerance import torch_in_dtype, within_twice_torch_error

# every test here runs the C++ kernel: a missing extension fails (tests/conftest.py), each ISA variant runs
pytestmark = [pytest.mark.needs_ext("attention_cpu"), pytest.mark.usefixtures("cpu_isa")]


def _keys(k, cache):
    """Longest reduction of the call: head dim or keys per query (request + cache + residual)."""
    n = k.shape[-2] if k.dim() == 4 else k.shape[0]
    while cache is not None:
        n, cache = n + cache.capacity, cache.residual
    return max(k.shape[-1], n)


def _run_both(q, k, v, cache=None, **kw):
    """(cpu kernel, float64 oracle, (PyTorch in the inputs' dtype, longest reduction)) on the same call; compare
    with ``_close``."""
    got = mk.attention(q, k, v, cache=cache, backend="cpu", **kw)
    want = ref_attention(q.double(), k.double(), v.double(), cache=_to64(cache), **kw)
    with torch_in_dtype():
        yard = ref_attention(q, k, v, cache=cache, **kw)
    return got, want, (yard, _keys(k, cache))


def _close(got, want, yard_n):
    """FlashAttention's rule (tests/tolerance.py) on a tensor or on every field of an AttentionResult."""
    yard, n = yard_n
    if isinstance(got, torch.Tensor):
        within_twice_torch_error(got, want, yard, got.dtype, n=n)
        return
    within_twice_torch_error(got.output, want.output, yard.output, got.output.dtype, "output", n=n)
    if got.lse is not None:
        within_twice_torch_error(got.lse, want.lse, yard.lse, got.output.dtype, "lse", n=n)
    if got.stats is not None:
        for f in ("key_mass", "key_window_mass", "cache_mass", "cache_window_mass", "residual_mass",
                  "residual_window_mass"):
            a, b, y = getattr(got.stats, f), getattr(want.stats, f), getattr(yard.stats, f)
            assert (a is None) == (b is None), f
            if a is not None:
                within_twice_torch_error(a, b, y, got.output.dtype, f, n=n)


def _data(B, Hq, Hkv, L, N, D, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return r(B, Hq, L, D), r(B, Hkv, L, D), r(B, Hkv, L, D), r(B, Hkv, N, D), r(B, Hkv, N, D)


@pytest.mark.parametrize("method", ["kivi4", "kivi2", "intactkv4"])
def test_residual_segment(method):
    q, k, v, hk, hv = _data(2, 4, 2, 5, 97, 16, seed=3)
    # IntactKV picks its pivot tokens by attention mass, so it needs the history's queries.
    extra = {"queries": torch.randn(2, 4, 97, 16, generator=torch.Generator().manual_seed(5))} \
        if method.startswith("intactkv") else {}
    cache = mk.compress(hk, hv, method, **extra)
    assert cache.residual is not None
    for kind in ("softmax", "hstu"):
        got, want, yard = _run_both(q, k, v, cache, is_causal=True, kind=kind, return_stats=True)
        _close(got, want, yard)


@pytest.mark.parametrize("method,budget", [("tome", 0.5), ("chunk", 0.25), ("random", 0.25), ("recent", 0.5)])
def test_merged_and_evicted(method, budget):
    q, k, v, hk, hv = _data(2, 8, 2, 3, 97, 16, seed=4)
    cache = mk.compress(hk, hv, method, budget=budget)
    for kind in ("softmax", "hstu"):
        for norm in ("original", "kept", 50):
            got, want, yard = _run_both(q, k, v, cache, kind=kind, hstu_norm=norm, return_stats=True)
            _close(got, want, yard)


def test_per_head_lengths_counts_and_empty_rows():
    q, k, v, hk, hv = _data(3, 4, 2, 4, 33, 8, seed=5)
    cache = mk.compress(hk, hv, "none")
    length = torch.tensor([[33, 0], [7, 20], [0, 0]], dtype=torch.int32)
    count = torch.rand(3, 2, 33, generator=torch.Generator().manual_seed(1)) * 3
    count[0, 0, :5] = 0.0
    cache = cache.replace(length=length, count=count)
    got, want, yard = _run_both(q, k, v, cache, is_causal=True, return_lse=True, return_stats=True)
    _close(got, want, yard)
    # no request keys visible and an empty cache -> zeros and lse = -inf, never NaN
    q0, k0, v0 = q[:, :, :1], k[:, :, :0], v[:, :, :0]
    res = mk.attention(q0, k0, v0, backend="cpu", return_lse=True)
    assert torch.all(res.output == 0) and torch.all(res.lse == float("-inf"))


def test_no_cache_matches_sdpa_and_gqa():
    q, k, v, _, _ = _data(2, 8, 2, 33, 1, 24, seed=6)
    k2, v2 = torch.randn(2, 2, 45, 24), torch.randn(2, 2, 45, 24)
    for causal in (False, True):
        got = mk.attention(q, k2, v2, is_causal=causal, enable_gqa=True, backend="cpu")
        sdpa = torch.nn.functional.scaled_dot_product_attention
        want = sdpa(q.double(), k2.double(), v2.double(), is_causal=causal, enable_gqa=True)
        _close(got, want, (sdpa(q, k2, v2, is_causal=causal, enable_gqa=True), _keys(k2, None)))


def test_non_contiguous_inputs():
    q, k, v, hk, hv = _data(2, 4, 2, 9, 40, 16, seed=7)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)          # [B, H, L, D] view with odd strides
    cache = mk.compress(hk, hv, "int4")
    got, want, yard = _run_both(qt, k, v, cache, is_causal=True)
    _close(got, want, yard)


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
        got, want, yard = _run_both(q, k, v, cache, kind=kind, is_causal=True, pos_bias=pos_bias, time_bias=time_bias,
                              query_timestamps=qts)
        _close(got, want, yard)
    # a shared [T] table and dt exactly on bucket thresholds
    from malloc_kernels.core.time_buckets import time_bucket_thresholds
    th = time_bucket_thresholds(20)
    qts2 = torch.zeros(B, L, dtype=torch.int64)
    ts2 = -th[torch.arange(N) % th.numel()][None].expand(B, N).contiguous()
    ts2 = ts2 + (torch.arange(N) % 3 - 1)[None]
    cache2 = mk.compress(hk, hv, "none", timestamps=ts2)
    got, want, yard = _run_both(q, k, v, cache2, kind="hstu", time_bias=torch.randn(20, generator=g),
                          query_timestamps=qts2)
    _close(got, want, yard)


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
    got, want, yard = _run_both(q, k, v, small, is_causal=True)
    _close(got, want, yard)
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
    got, want, yard = _run_both(q, k, v, cache, is_causal=True, return_lse=True, return_stats=True)
    _close(got, want, yard)


@pytest.mark.parametrize("D", [64, 128, 32])
@pytest.mark.parametrize("group,lq", [(2, 1), (2, 2), (2, 3), (3, 1), (3, 2), (4, 1), (5, 1), (7, 1), (8, 1)])
def test_decode_code_layout_row_groups(D, group, lq):
    # The several-row decode from the codes (R = group x Lq rows of one kv head, 2..7: code layout rows in groups
    # of up to four; 8: the register tiles), softmax and hstu, every code-layout format: token-axis keys (int8,
    # int4/int2 token), channel-axis keys (int4/int2, kivi), several value groups per row (group 16: int8's two
    # weight vectors per key). Ragged lengths: an empty row, 5 keys (below one 8-key step), odd lengths that end
    # mid-step / mid-block, a full odd capacity (131).
    hkv = 2
    q, k, v, hk, hv = _data(4, group * hkv, hkv, lq, 131, D, seed=1000 * group + 10 * lq + D)
    lengths = torch.tensor([131, 0, 5, 66])
    formats = [("int8", {}), ("int4", {}), ("int2", {}), ("kivi4", {}), ("kivi2", {}),
               ("int4", {"k_axis": "token", "group_size": D}), ("int8", {"group_size": 16}),
               ("int4", {"group_size": 16}), ("int2", {"k_axis": "token", "group_size": 16})]
    for fmt, params in formats:
        cache = mk.compress(hk, hv, fmt, lengths=lengths, **params)
        for kind in ("softmax", "hstu"):
            got, want, yard = _run_both(q, k, v, cache, is_causal=True, kind=kind, enable_gqa=True)
            _close(got, want, yard)
