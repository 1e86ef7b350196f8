"""The opt-in int8-query mode (``attention(..., query_precision="int8")``): the API's refusals, the reference's
approximation against its error bound, the CPU kernel (every ISA variant) against the reference of the SAME math, and
the kernel against the EXACT float64 reference within the derived bound on adversarial inputs (README, "Approximate
int8-query decode"; the math is ``reference/int8_query.py``'s and ``attention_cpu/int8_query.h``'s)."""
import math
import zlib

import pytest
import torch

import malloc_kernels as mk
from attention_cases import make_cache, to_float64
from malloc_kernels.core import registry
from malloc_kernels.ops.backends import backend_status
from malloc_kernels.reference import attention as ref_attention
from malloc_kernels.reference import int8_query
from malloc_kernels.cache import quant as pyq
from tolerance import torch_in_dtype, within_twice_torch_error

SILU_LIP = 1.0999  # max |silu'(x)| = 1.0998...


def _data(gen, B, Hq, Hkv, L, D, outlier=0.0):
    q = torch.randn(B, Hq, L, D, generator=gen)
    if outlier:
        # one channel per row far above the others: the row's int8 step sq grows with it, every other channel
        # keeps only a few levels (the adversarial case for per-row absmax)
        q[..., 3 % D] *= outlier
    k = torch.randn(B, Hkv, L, D, generator=gen)
    v = torch.randn(B, Hkv, L, D, generator=gen)
    return q, k, v


# ---- API -----------------------------------------------------------------------------------------------------
def test_rejections_name_the_argument():
    gen = torch.Generator().manual_seed(0)
    q, k, v = _data(gen, 2, 2, 2, 1, 16)
    with pytest.raises(ValueError, match="query_precision"):
        mk.attention(q, k, v, query_precision="int4")
    with pytest.raises(ValueError, match="query_precision"):
        mk.attention(q, k, v, query_precision="int8")                       # no cache
    for fmt in ("float", "fp8"):
        cache = make_cache(gen, 2, 2, 9, 16, fmt, counts=False)
        with pytest.raises(ValueError, match="query_precision"):
            mk.attention(q, k, v, cache=cache, query_precision="int8")
    cache = make_cache(gen, 2, 2, 9, 16, "int4_channel", counts=False)
    with pytest.raises(ValueError, match="query_precision"):
        mk.attention(q.requires_grad_(), k, v, cache=cache, query_precision="int8")
    q = q.detach()
    others = [n for n in registry.names("attention") if n not in ("cpu", "reference") and backend_status(n)[0]]
    for name in others:  # a backend this machine runs refuses the mode by name (triton runs CPU tensors if named)
        with pytest.raises(ValueError, match="query_precision"):
            mk.attention(q, k, v, cache=cache, query_precision="int8", backend=name)


@pytest.mark.needs_ext("attention_cpu")
def test_op_refuses_int8_without_integer_keys():
    q = torch.randn(1, 1, 1, 8)
    with pytest.raises(ValueError, match="query_precision"):
        torch.ops.malloc_kernels.attention_cpu(
            q, q, q, None, None, *([None] * 17), 0, 0, False, 0, "softmax", False, None, 1.0, None, None, None, None,
            None, None, None, "original", 0, False, False, 0, "int8")


def test_exact_is_the_default():
    gen = torch.Generator().manual_seed(1)
    q, k, v = _data(gen, 2, 2, 2, 1, 16)
    cache = make_cache(gen, 2, 2, 9, 16, "int4_channel", counts=False)
    a = mk.attention(q, k, v, cache=cache, backend="reference")
    b = mk.attention(q, k, v, cache=cache, backend="reference", query_precision="exact")
    c = mk.attention(q, k, v, cache=cache, backend="reference", query_precision="int8")
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # the approximation is a different computation


# ---- the quantizer ---------------------------------------------------------------------------------------------
def test_quantize_query_rows():
    gen = torch.Generator().manual_seed(2)
    y = torch.randn(64, 97, generator=gen) * torch.logspace(-30, 30, 64)[:, None]
    y[5, 7] = 1e4 * y[5].abs().max()
    qi, sq = int8_query.quantize_query(y)
    assert bool((qi.abs() <= 127).all()) and bool((qi == qi.round()).all())
    assert bool((qi.abs().amax(-1) == 127).all())          # absmax: every row uses the full range
    err = (y.double() - sq.double() * qi.double()).abs()
    assert bool((err <= sq.double() * (0.5 + 1e-5)).all())
    z, sz = int8_query.quantize_query(torch.zeros(3, 5))
    assert bool((z == 0).all()) and bool((sz == 0).all())
    t, st = int8_query.quantize_query(torch.full((2, 4), 1e-39))   # below 2^-126: quantized to zero
    assert bool((t == 0).all()) and bool((st == 0).all())
    bad = torch.ones(2, 4)
    bad[1, 2] = float("nan")
    qb, sb = int8_query.quantize_query(bad)
    assert not bool(torch.isnan(sb[0]).any()) and bool(torch.isnan(sb[1]).all())


# ---- the reference's approximation within its bound ---------------------------------------------------------------
def _row_bounds(q, cache, scale):
    """(eps [B, Hq, Lq] = max over visible cache entries of the score bound, eps_j [B, Hq, Lq, C])."""
    B, Hq, Lq, D = q.shape
    Hkv = cache.num_kv_heads
    G = Hq // Hkv
    x = (q.to(torch.float32) * scale).reshape(B, Hkv, G * Lq, D)
    bnd = int8_query.score_error_bound(x, cache)                                     # [B, Hkv, G*Lq, C]
    valid = torch.arange(cache.capacity)[None, None, :] < cache.length[..., None].long()
    bnd = torch.where(valid[:, :, None, :], bnd, torch.zeros((), dtype=bnd.dtype))
    bnd = bnd.reshape(B, Hkv, G, Lq, -1).reshape(B, Hq, Lq, -1)
    return bnd.amax(-1) if bnd.shape[-1] else bnd.sum(-1), bnd


@pytest.mark.parametrize("fmt", ["int8", "int4_channel", "int4_token", "int2_channel", "int2_token_int8v"])
@pytest.mark.parametrize("D,outlier", [(16, 0.0), (64, 50.0), (256, 1000.0)])
def test_reference_scores_within_bound(fmt, D, outlier):
    gen = torch.Generator().manual_seed(3)
    q, _, _ = _data(gen, 2, 4, 2, 3, D, outlier)
    cache = make_cache(gen, 2, 2, 70, D, fmt, counts=False)
    scale = 1 / math.sqrt(D)
    B, Hq, Lq, _ = q.shape
    x = (q.to(torch.float32) * scale).reshape(B, 2, 2 * Lq, D)
    approx = int8_query.cache_scores(x, cache, torch.float64)
    kx, _ = pyq.dequantize_cache(cache, torch.float64)
    exact = torch.matmul(x.double(), kx.transpose(-1, -2))
    bound = int8_query.score_error_bound(x, cache)
    valid = (torch.arange(cache.capacity)[None, None, :] < cache.length[..., None].long())[:, :, None, :]
    err = torch.where(valid, (approx - exact).abs(), torch.zeros((), dtype=torch.float64))  # padding: masked later
    slack = 1e-9 * (1 + exact.abs())
    assert bool((err <= bound * (1 + 1e-4) + slack).all()), float((err - bound).max())
    assert float(err.max()) > 0  # the approximation is not the exact score


# ---- the CPU kernel against the reference of the same math -----------------------------------------------------------
CASES = [  # (fmt, kind, B, Hq, Hkv, Lq, C, D, R)
    ("int8", "softmax", 3, 4, 2, 1, 97, 64, 0),
    ("int8", "hstu", 2, 2, 2, 3, 17, 17, 5),
    ("int4_channel", "softmax", 3, 8, 8, 1, 97, 64, 0),
    ("int4_channel", "hstu", 3, 4, 1, 2, 70, 32, 4),
    ("int4_channel", "softmax", 2, 2, 2, 1, 33, 128, 0),
    ("int4_channel", "softmax", 2, 4, 2, 1, 40, 40, 3),
    ("int4_token", "softmax", 2, 2, 1, 1, 45, 64, 0),
    ("int4_token", "hstu", 2, 2, 2, 2, 19, 24, 0),
    ("int2_channel", "softmax", 3, 8, 8, 1, 97, 64, 2),
    ("int2_channel", "hstu", 2, 6, 2, 1, 64, 96, 0),
    ("int2_channel", "softmax", 2, 4, 2, 1, 37, 32, 0),         # 8-byte rows: 4 / 8 keys per register
    ("int4_channel", "softmax", 2, 2, 2, 1, 45, 16, 0),
    ("int2_token_int8v", "softmax", 2, 2, 2, 3, 50, 64, 0),
]


@pytest.mark.needs_ext("attention_cpu")
@pytest.mark.usefixtures("cpu_isa")
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_kernel_matches_reference_of_same_math(case):
    fmt, kind, B, Hq, Hkv, Lq, C, D, R = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    q, k, v = _data(gen, B, Hq, Hkv, Lq, D, outlier=20.0)
    cache = make_cache(gen, B, Hkv, C, D, fmt, R=R, counts=True)
    kw = dict(cache=cache, kind=kind, is_causal=True, query_precision="int8", return_lse=kind == "softmax",
              return_stats=True)
    got = mk.attention(q, k, v, backend="cpu", **kw)
    kw64 = dict(kw, cache=to_float64(cache))
    want = ref_attention(q.double(), k.double(), v.double(), **kw64)
    with torch_in_dtype():
        yard = ref_attention(q, k, v, **kw)
    n = max(D, Lq + C + R)
    within_twice_torch_error(got.output, want.output, yard.output, torch.float32, "output", n=n)
    if got.lse is not None:
        within_twice_torch_error(got.lse, want.lse, yard.lse, torch.float32, "lse", n=n)
    within_twice_torch_error(got.stats.cache_mass, want.stats.cache_mass, yard.stats.cache_mass, torch.float32,
                             "cache_mass", n=n)
    # and it is the approximation, not the exact scores: those are much further from it than the kernel is
    exact = ref_attention(q.double(), k.double(), v.double(), **dict(kw64, query_precision="exact"))
    kernel_err = float((got.output.double() - want.output).abs().max())
    assert float((exact.output - want.output).abs().max()) > 100 * kernel_err


@pytest.mark.needs_ext("attention_cpu")
@pytest.mark.usefixtures("cpu_isa")
def test_kernel_nonfinite_query_row_is_nan():
    gen = torch.Generator().manual_seed(5)
    q, k, v = _data(gen, 2, 2, 2, 1, 64)
    q[1, 0, 0, 9] = float("nan")
    cache = make_cache(gen, 2, 2, 40, 64, "int4_channel", counts=False, lengths=[[40, 40], [40, 40]])
    got = mk.attention(q, k, v, cache=cache, backend="cpu", query_precision="int8")
    assert bool(torch.isnan(got[1, 0]).all())
    assert bool(torch.isfinite(got[0]).all()) and bool(torch.isfinite(got[1, 1]).all())


# ---- the kernel against the EXACT reference: the derived bound ------------------------------------------------------
@pytest.mark.needs_ext("attention_cpu")
@pytest.mark.usefixtures("cpu_isa")
@pytest.mark.parametrize("fmt", ["int8", "int4_channel", "int2_channel", "int4_token"])
@pytest.mark.parametrize("kind", ["softmax", "hstu"])
@pytest.mark.parametrize("D,outlier", [(64, 1.0), (64, 300.0), (256, 3000.0)])
def test_kernel_error_within_bound(fmt, kind, D, outlier):
    gen = torch.Generator().manual_seed(7)
    B, Hq, Hkv, Lq, C = 3, 4, 2, 1, 300
    q, k, v = _data(gen, B, Hq, Hkv, Lq, D, outlier)
    q = q * 3  # sharp softmax rows
    cache = make_cache(gen, B, Hkv, C, D, fmt, counts=False)
    scale = 1 / math.sqrt(D)
    got = mk.attention(q, k, v, cache=cache, kind=kind, backend="cpu", query_precision="int8", return_lse=True)
    exact = ref_attention(q.double(), k.double(), v.double(), cache=to_float64(cache), kind=kind, return_lse=True)
    eps, eps_j = _row_bounds(q, cache, scale)                                        # [B, Hq, Lq], [.., C]
    o, oe = got.output.double(), exact.output
    f32 = 1e-5 * (1 + oe.abs().amax())                                              # the kernel's own fp32 error
    if kind == "softmax":
        lse_err = (got.lse.double() - exact.lse).abs()
        fin = torch.isfinite(exact.lse)
        assert bool((lse_err[fin] <= eps[fin] + 1e-5 * (1 + exact.lse[fin].abs())).all())
        # every visible entry's value (cache + the request token); max_j |v_jd - o_d| per row
        kx, vx = pyq.dequantize_cache(cache, torch.float64)
        G = Hq // Hkv
        vals = torch.cat([vx, v.double()], dim=2)                                   # [B, Hkv, C + Lq, D]
        valid = torch.cat([torch.arange(C)[None, None] < cache.length[..., None].long(),
                           torch.ones(B, Hkv, Lq, dtype=torch.bool)], dim=2)
        vals = vals.repeat_interleave(G, dim=1)[:, :, None]                          # [B, Hq, 1, N, D]
        spread = torch.where(valid.repeat_interleave(G, dim=1)[:, :, None, :, None],
                             (vals - oe[:, :, :, None, :]).abs(), torch.zeros((), dtype=torch.float64)).amax(-2)
        bound = torch.expm1(2 * eps)[..., None] * spread
    else:
        _, vx = pyq.dequantize_cache(cache, torch.float64)
        G = Hq // Hkv
        n_i = (cache.original_length.double() + 1)[:, None, None, None]             # hstu_norm="original", Lq=1
        bound = SILU_LIP / n_i * torch.einsum("bhqc,bhcd->bhqd", eps_j, vx.abs().repeat_interleave(G, dim=1))
    err = (o - oe).abs()
    assert bool((err <= bound + f32).all()), float((err - bound).max())
    if outlier > 100:
        assert float(err.max()) > float(f32)  # the adversarial rows do move: the bound is what holds them
