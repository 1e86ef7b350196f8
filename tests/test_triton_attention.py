"""Triton attention kernels vs the float64 reference, under the Triton interpreter (TRITON_INTERPRET=1, set by
conftest before any kernel module is imported). Tiny shapes: the interpreter runs every program in numpy.

Coverage (each axis at least once, the important pairs together): every cache form (float / int8 / fp8 / KIVI
int4 and int2 with keys on the channel or token axis, residual segment, per-head lengths, merge counts) x both
kinds x decode (split-K) / append paths x dense / jagged; causal, targets, bool and additive masks; GQA and MQA;
relative position/time bias; the three hstu normalisers; per-key statistics; split-K boundaries (segment lengths
at and around the split size), empty users, empty cache rows and rows that see nothing; fp32 / fp16 / bf16 inputs.

Tolerances: fp32 inputs within 1e-5 of the float64 oracle. fp16/bf16 by FlashAttention's rule: the kernel's
max error against the float64 oracle is at most twice the error of the same computation done by PyTorch in that
dtype (the reference with its compute dtype set to fp16/bf16) plus a small absolute slack.
"""
import importlib
import os

import pytest
import torch

from malloc_kernels import KVCache
from malloc_kernels.cache.quant import quantize_cache
from malloc_kernels.core.validate import validate_call
from malloc_kernels.reference import run as ref_run

assert os.environ.get("TRITON_INTERPRET") == "1", "conftest must set TRITON_INTERPRET=1 before kernels import"
from malloc_kernels.triton import attention as TA  # noqa: E402

F64 = torch.float64
# the module (the package re-exports a function of the same name)
ref_attention_mod = importlib.import_module("malloc_kernels.reference.attention")


# ---- case builder ------------------------------------------------------------------------------------------------
def _seg(gen, B, H, C, D, *, lengths=None, pos_lo=0, ts_lo=0, counts=False, ts=True):
    length = lengths if lengths is not None else torch.randint(0, C + 1, (B, H), generator=gen, dtype=torch.int32)
    return KVCache(k=torch.randn(B, H, C, D, generator=gen, dtype=F64),
                   v=torch.randn(B, H, C, D, generator=gen, dtype=F64),
                   length=length.to(torch.int32),
                   position=torch.randint(pos_lo, pos_lo + 40, (B, H, C), generator=gen, dtype=torch.int32),
                   original_length=torch.full((B,), 45, dtype=torch.int32), head_dim=D,
                   timestamp=torch.randint(ts_lo, ts_lo + 10 ** 5, (B, H, C), generator=gen) if ts else None,
                   count=(torch.rand(B, H, C, generator=gen) * 3 + 0.25).float() if counts else None)


FORMS = {
    "none": None,
    "float": dict(),
    "int8": dict(k_format="int8", v_format="int8", gs=None),
    "fp8": dict(k_format="fp8", v_format="fp8", gs=4),
    "kivi4": dict(k_format="int4", v_format="int4", k_axis="channel", gs=4, residual=True),
    "int4_token": dict(k_format="int4", v_format="int4", k_axis="token", gs=2),
    "kivi2": dict(k_format="int2", v_format="int2", k_axis="channel", gs=6, residual=True),
    "int2_token_mixed": dict(k_format="int2", v_format="int8", k_axis="token", gs=12),
}


def make_case(*, form="float", B=2, Hq=4, Hkv=2, D=12, C=11, R=3, Lq=3, jagged=False, q_lengths=None,
              counts=True, bias=True, cache_lengths=None, seed=0):
    """Inputs in float64 (payload values exactly representable after the test's dtype cast is applied by
    ``materialise``). Returns a dict of attention kwargs plus the float64 cache."""
    gen = torch.Generator().manual_seed(seed)
    spec = FORMS[form]
    cache = None
    if spec is not None:
        cache = _seg(gen, B, Hkv, C, D, lengths=cache_lengths, counts=counts, ts=bias)
        if spec.get("residual"):
            cache = cache.replace(residual=_seg(gen, B, Hkv, R, D, pos_lo=40, ts_lo=10 ** 5, ts=bias))
    if jagged:
        ql = torch.tensor(q_lengths if q_lengths is not None else [Lq] * B, dtype=torch.int64)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), ql.cumsum(0)])
        T = int(offsets[-1])
        q = torch.randn(T, Hq, D, generator=gen, dtype=F64)
        k = torch.randn(T, Hkv, D, generator=gen, dtype=F64)
        v = torch.randn(T, Hkv, D, generator=gen, dtype=F64)
        qts = torch.randint(2 * 10 ** 5, 3 * 10 ** 5, (T,), generator=gen)
        kw = dict(offsets=offsets)
    else:
        q = torch.randn(B, Hq, Lq, D, generator=gen, dtype=F64)
        k = torch.randn(B, Hkv, Lq, D, generator=gen, dtype=F64)
        v = torch.randn(B, Hkv, Lq, D, generator=gen, dtype=F64)
        qts = torch.randint(2 * 10 ** 5, 3 * 10 ** 5, (B, Lq), generator=gen)
        kw = {}
    if bias:
        kw.update(pos_bias=torch.randn(Hq, 50, generator=gen) * 0.5, time_bias=torch.randn(Hq, 24, generator=gen) * 0.5,
                  query_timestamps=qts)
    return dict(query=q, key=k, value=v, cache=cache, form=form, **kw)


def materialise(case, dtype):
    """Cast the case's float inputs to ``dtype`` and quantize the cache; also return the float64 oracle inputs
    (the dtype-rounded values upcast, the same quantized codes)."""
    spec = FORMS[case["form"]]
    out = {}
    for name in ("query", "key", "value"):
        out[name] = case[name].to(dtype)
    cache = case["cache"]
    if cache is not None:
        def cast(seg, dt):
            return seg.replace(k=seg.k.to(dtype).to(dt), v=seg.v.to(dtype).to(dt))
        c_dt = cast(cache, dtype)
        if cache.residual is not None:
            c_dt = c_dt.replace(residual=cast(cache.residual, dtype))
        if spec.get("k_format"):
            gs = spec["gs"] or cache.head_dim
            c_dt = quantize_cache(c_dt, spec["k_format"], spec["v_format"], gs, spec.get("k_axis", "token"))
        # the oracle reads the same codes (dequantized in float64) and the dtype-rounded float payloads
        c64 = c_dt if c_dt.is_quantized else cast(c_dt, F64)
        if c_dt.residual is not None:
            c64 = c64.replace(residual=cast(c_dt.residual, F64))
    else:
        c_dt = c64 = None
    return out, c_dt, c64


def run_both(case, dtype, *, path=None, split_size=None, block_n=None, **call_kw):
    """Run the Triton kernels on ``dtype`` inputs, the float64 oracle and (for 16-bit) the PyTorch-in-dtype
    computation. Returns (triton result, oracle result, lowp result or None)."""
    tensors, c_dt, c64 = materialise(case, dtype)
    extra = {k: v for k, v in case.items() if k not in ("query", "key", "value", "cache", "form")}
    mask = call_kw.pop("attn_mask", None)
    call = validate_call(tensors["query"], tensors["key"], tensors["value"],
                         None if mask is None else (mask if mask.dtype == torch.bool else mask.to(dtype)),
                         cache=c_dt, enable_gqa=True, **extra, **call_kw)
    got = TA.run(call, path=path, split_size=split_size, block_n=block_n)
    call64 = validate_call(*(tensors[n].to(F64) for n in ("query", "key", "value")),
                           None if mask is None else (mask if mask.dtype == torch.bool else mask.to(dtype).to(F64)),
                           cache=c64, enable_gqa=True, **extra, **call_kw)
    want = ref_run(call64)
    lowp = None
    if dtype in (torch.float16, torch.bfloat16):
        orig = ref_attention_mod.compute_dtype
        ref_attention_mod.compute_dtype = lambda dt: dt
        try:
            lowp = ref_run(call)
        finally:
            ref_attention_mod.compute_dtype = orig
    return got, want, lowp


def _finite_equal_inf(a, b):
    """-inf positions must agree; returns finite-part tensors."""
    ia, ib = torch.isneginf(a), torch.isneginf(b)
    assert torch.equal(ia, ib), "rows with nothing visible must have lse = -inf exactly where the reference does"
    return torch.where(ia, torch.zeros_like(a), a), torch.where(ib, torch.zeros_like(b), b)


def check(got, want, lowp, dtype, what="output"):
    g = got.to(F64)
    w = want.to(F64)
    if g.dtype.is_floating_point and (torch.isneginf(g).any() or torch.isneginf(w).any()):
        g, w = _finite_equal_inf(g, w)
    assert torch.isfinite(g).all(), f"{what}: non-finite values"
    err = (g - w).abs().max().item() if g.numel() else 0.0
    if dtype == torch.float32 or lowp is None:
        scale = max(1.0, w.abs().max().item() if w.numel() else 0.0)
        assert err <= 2e-5 * scale, f"{what}: max error {err:.3g} vs float64 reference"
    else:
        lp = lowp.to(F64)
        if torch.isneginf(lp).any():
            lp, _ = _finite_equal_inf(lp, want.to(F64))
        pt_err = (lp - w).abs().max().item() if w.numel() else 0.0
        slack = 2e-3 if dtype == torch.float16 else 1.6e-2
        assert err <= 2 * pt_err + slack, \
            f"{what}: kernel error {err:.3g} > 2 x PyTorch-in-{dtype} error {pt_err:.3g} + {slack}"


def check_result(got, want, lowp, dtype, kind="softmax", stats=False):
    check(got.output, want.output, None if lowp is None else lowp.output, dtype)
    assert got.output.dtype == dtype and got.output.shape == want.output.shape
    if kind == "softmax" and want.lse is not None:
        check(got.lse, want.lse, None if lowp is None else lowp.lse, dtype, "lse")
    if stats:
        for f in ("key_mass", "key_window_mass", "cache_mass", "cache_window_mass", "residual_mass",
                  "residual_window_mass"):
            a, b = getattr(got.stats, f), getattr(want.stats, f)
            assert (a is None) == (b is None), f
            if a is not None:
                assert a.shape == b.shape, (f, a.shape, b.shape)
                check(a, b, None if lowp is None else getattr(lowp.stats, f), dtype, f)


# ---- every cache form x kind x path ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["softmax", "hstu"])
@pytest.mark.parametrize("form", list(FORMS))
def test_cache_forms(form, kind):
    """fp32, GQA 4/2, causal, 1 target, pos+time bias, counts, per-head lengths; jagged on half the forms; the
    path alternates so that every form runs both the split-K decode and the append kernel (one per kind)."""
    idx = list(FORMS).index(form)
    jagged = idx % 2 == 1
    path = ("decode", "append")[(idx + (kind == "hstu")) % 2]
    case = make_case(form=form, jagged=jagged, q_lengths=[3, 2] if jagged else None,
                     seed=list(FORMS).index(form) * 2 + (kind == "hstu"))
    got, want, lowp = run_both(case, torch.float32, path=path, kind=kind, is_causal=True, num_targets=1,
                               return_lse=True)
    check_result(got, want, lowp, torch.float32, kind)


# ---- low precision -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["decode", "append"])
@pytest.mark.parametrize("form", ["float", "kivi4"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(dtype, form, path):
    kind = "softmax" if form == "float" else "hstu"
    case = make_case(form=form, D=16, seed=7)
    got, want, lowp = run_both(case, dtype, path=path, kind=kind, is_causal=True, return_lse=True)
    check_result(got, want, lowp, dtype, kind)


# ---- masks, SDPA equivalence, GQA/MQA ----------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["decode", "append"])
def test_plain_matches_sdpa(path):
    """No cache, no extras: equals torch SDPA (causal top-left with Lq != Lk, MQA)."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 3, 5, 9, generator=gen)
    k = torch.randn(2, 1, 7, 9, generator=gen)
    v = torch.randn(2, 1, 7, 9, generator=gen)
    call = validate_call(q, k, v, is_causal=True, enable_gqa=True)
    got = TA.run(call, path=path).output
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,mask_kind,path", [("softmax", "bool", "decode"), ("softmax", "float", "append"),
                                                 ("hstu", "bool", "append"), ("hstu", "float", "decode")])
def test_attn_mask(kind, mask_kind, path):
    """bool (with a fully masked row -> zeros, lse -inf) and additive (with -inf entries) masks, over a cache."""
    case = make_case(form="float", Lq=4, seed=11, bias=False)
    gen = torch.Generator().manual_seed(5)
    if mask_kind == "bool":
        mask = torch.rand(2, 4, 4, 4, generator=gen) > 0.4
        mask[1, 2, 1, :] = False
    else:
        mask = torch.randn(1, 4, 4, 4, generator=gen, dtype=F64)
        mask[0, 1, 2, :2] = float("-inf")
    got, want, lowp = run_both(case, torch.float32, path=path, kind=kind, attn_mask=mask, return_lse=True,
                               hstu_norm="kept" if kind == "hstu" else "original")
    check_result(got, want, lowp, torch.float32, kind)


@pytest.mark.parametrize("kind", ["softmax", "hstu"])
def test_no_cache_targets_noncausal(kind):
    """Non-causal request with targets: a target never sees another target; hstu 'original' counts visible keys."""
    case = make_case(form="none", Lq=6, Hq=3, Hkv=3, D=8, seed=2)
    got, want, lowp = run_both(case, torch.float32, kind=kind, is_causal=False, num_targets=torch.tensor([2, 3]),
                               return_lse=True)
    check_result(got, want, lowp, torch.float32, kind)


@pytest.mark.parametrize("norm", ["kept", 37])
def test_hstu_norms(norm):
    case = make_case(form="kivi4", Lq=3, seed=4)
    got, want, lowp = run_both(case, torch.float32, path="decode", kind="hstu", is_causal=True, hstu_norm=norm)
    check_result(got, want, lowp, torch.float32, "hstu")


# ---- split-K boundaries and empty things -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["softmax", "hstu"])
def test_split_boundaries(kind):
    """split size 8 with BLOCK_N 8: cache lengths 7, 8, 9, 16 (at/around split and block edges), an empty cache
    row, residual + request segments straddling split edges; one user without queries (jagged)."""
    lengths = torch.tensor([[7, 8], [9, 16], [0, 1]], dtype=torch.int32)
    case = make_case(form="kivi4", B=3, C=16, R=3, jagged=True, q_lengths=[2, 1, 0], cache_lengths=lengths,
                     seed=9)
    got, want, lowp = run_both(case, torch.float32, path="decode", split_size=8, block_n=8, kind=kind,
                               is_causal=True, return_lse=True)
    check_result(got, want, lowp, torch.float32, kind)


def test_empty_batch_rows_and_nothing_visible():
    """Users with zero request tokens and an empty cache: outputs for the rest, lse -inf nowhere spurious; a
    request-only user whose bool mask hides everything gets zeros and lse -inf."""
    case = make_case(form="none", B=2, Lq=3, seed=1, bias=False)
    mask = torch.ones(2, 1, 3, 3, dtype=torch.bool)
    mask[1] = False
    got, want, lowp = run_both(case, torch.float32, path="append", attn_mask=mask, return_lse=True)
    check_result(got, want, lowp, torch.float32)
    assert torch.equal(got.output[1], torch.zeros_like(got.output[1]))
    assert torch.isneginf(got.lse[1]).all()


# ---- statistics ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,path,jagged", [("softmax", "decode", False), ("hstu", "append", True)])
def test_stats(kind, path, jagged):
    case = make_case(form="kivi4", Lq=3, jagged=jagged, q_lengths=[3, 1] if jagged else None, seed=12)
    got, want, lowp = run_both(case, torch.float32, path=path, kind=kind, is_causal=True, num_targets=1,
                               return_lse=True, return_stats=True, stats_window=2)
    check_result(got, want, lowp, torch.float32, kind, stats=True)


def test_stats_low_precision():
    case = make_case(form="float", D=16, seed=13)
    got, want, lowp = run_both(case, torch.float16, kind="softmax", is_causal=True, return_lse=True,
                               return_stats=True)
    check_result(got, want, lowp, torch.float16, "softmax", stats=True)


# ---- layouts, API, support -----------------------------------------------------------------------------------------
def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(8)
    q = torch.randn(2, 5, 4, 10, generator=gen).transpose(1, 2)      # [B, Hq=4, L=5, D] with odd strides
    k = torch.randn(2, 5, 2, 10, generator=gen).transpose(1, 2)
    v = torch.randn(2, 10, 2, 5, generator=gen).permute(0, 2, 3, 1)
    call = validate_call(q, k, v, is_causal=True, enable_gqa=True)
    got = TA.run(call).output
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_public_api_backend_triton():
    import malloc_kernels
    case = make_case(form="int8", seed=21, bias=False)
    tensors, c_dt, c64 = materialise(case, torch.float32)
    out = malloc_kernels.attention(tensors["query"], tensors["key"], tensors["value"], cache=c_dt,
                                   enable_gqa=True, is_causal=True, backend="triton")
    want = malloc_kernels.attention(*(tensors[n].double() for n in ("query", "key", "value")), cache=c64,
                                    enable_gqa=True, is_causal=True, backend="reference")
    torch.testing.assert_close(out.double(), want, rtol=2e-5, atol=2e-5)


def test_supports_reasons():
    q = torch.randn(1, 2, 3, 8, dtype=F64)
    ok, why = TA.supports(validate_call(q, q, q))
    assert not ok and "float64" in why
    q = torch.randn(1, 2, 3, 8)
    ok, why = TA.supports(validate_call(q, q, q, dropout_p=0.1))
    assert not ok and "dropout" in why
    qg = q.clone().requires_grad_()
    ok, why = TA.supports(validate_call(qg, q, q))
    assert not ok and "grad" in why
    assert TA.supports(validate_call(q, q, q)) == (True, "")
    with pytest.raises(ValueError, match="triton"):
        TA.run(validate_call(q, q, q, dropout_p=0.1))
