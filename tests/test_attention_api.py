"""``malloc_kernels.attention``: drop-in equality with SDPA, argument validation, backend selection."""
import math
import zlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import malloc_kernels as mk
from malloc_kernels import AttentionResult, reference
from malloc_kernels.cache.types import KVCache
from malloc_kernels.ops.backends import backend_status, select_backend
from malloc_kernels.core.validate import validate_call

F64 = torch.float64
# Absolute slack of FlashAttention's rule (error <= 2x PyTorch's own error in that dtype + slack).
SLACK = {torch.float16: 1e-3, torch.bfloat16: 8e-3}


def rand(*shape, dtype=torch.float32, gen=None):
    return torch.randn(*shape, generator=gen, dtype=F64).to(dtype)


def noncontig(x):
    """Same values, non-contiguous: stored as [B, L, H, D] and viewed as [B, H, L, D]."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def make_mask(kind, B, Hq, Lq, Lk, gen):
    if kind is None:
        return None
    keep = torch.rand(B, Hq, Lq, Lk, generator=gen) > 0.4
    keep[..., torch.arange(Lq), torch.arange(Lq) % Lk] = True        # no fully masked row (SDPA gives NaN there)
    if kind == "bool":
        return keep
    return torch.where(keep, torch.randn(B, Hq, Lq, Lk, generator=gen, dtype=F64), torch.tensor(float("-inf")))


def check_against_sdpa(q, k, v, dtype, **kw):
    """attention(dtype) vs the float64 oracle, with SDPA's error in the same dtype as the yardstick."""
    exact = F.scaled_dot_product_attention(q.to(F64), k.to(F64), v.to(F64), enable_gqa=True,
                                           **{a: (b.to(F64) if isinstance(b, torch.Tensor) and b.is_floating_point()
                                                  else b) for a, b in kw.items()})
    qd, kd, vd = q.to(dtype), k.to(dtype), v.to(dtype)
    kwd = {a: (b.to(dtype) if isinstance(b, torch.Tensor) and b.is_floating_point() else b) for a, b in kw.items()}
    got = mk.attention(qd, kd, vd, enable_gqa=True, **kwd)
    assert got.dtype == dtype and got.shape == q.shape
    if dtype == F64:
        torch.testing.assert_close(got, exact, rtol=1e-10, atol=1e-10)
    elif dtype == torch.float32:
        torch.testing.assert_close(got.to(F64), exact, rtol=1e-5, atol=1e-5)
    else:
        theirs = F.scaled_dot_product_attention(qd, kd, vd, enable_gqa=True, **kwd)
        err = (got.to(F64) - exact).abs().max()
        ref_err = (theirs.to(F64) - exact).abs().max()
        assert err <= 2 * ref_err + SLACK[dtype], (float(err), float(ref_err))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, F64])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1, 1), (2, 4, 2, 17, 97, 7), (3, 6, 1, 5, 5, 64),
                                   (1, 3, 3, 33, 9, 16)])
@pytest.mark.parametrize("causal,mask", [(False, None), (True, None), (False, "bool"), (False, "additive")])
def test_plain_call_matches_sdpa(dtype, shape, causal, mask):
    B, Hq, Hkv, Lq, Lk, D = shape
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, causal, mask)).encode()))
    q, k, v = rand(B, Hq, Lq, D, gen=gen), rand(B, Hkv, Lk, D, gen=gen), rand(B, Hkv, Lk, D, gen=gen)
    m = make_mask(mask, B, Hq, Lq, Lk, gen)
    check_against_sdpa(q, k, v, dtype, attn_mask=m, is_causal=causal)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_non_contiguous_inputs_scale_and_broadcast_masks_match_sdpa(dtype):
    gen = torch.Generator().manual_seed(3)
    q, k, v = noncontig(rand(2, 4, 9, 5, gen=gen)), noncontig(rand(2, 2, 11, 5, gen=gen)), \
        rand(2, 2, 5, 11, gen=gen).transpose(-1, -2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    check_against_sdpa(q, k, v, dtype, scale=0.37)
    mask2d = torch.rand(9, 11, generator=gen) > 0.3
    mask2d[:, 0] = True
    check_against_sdpa(q, k, v, dtype, attn_mask=mask2d)
    add3d = rand(1, 9, 11, gen=gen)
    check_against_sdpa(q, k, v, dtype, attn_mask=add3d)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 3), Hkv=st.integers(1, 3), ratio=st.integers(1, 3), Lq=st.integers(1, 20),
       Lk=st.integers(1, 20), D=st.integers(1, 20), causal=st.booleans(), dtype=st.sampled_from([torch.float32, F64]),
       seed=st.integers(0, 2 ** 31 - 1))
def test_randomized_plain_calls_match_sdpa(B, Hkv, ratio, Lq, Lk, D, causal, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = rand(B, Hkv * ratio, Lq, D, gen=gen), rand(B, Hkv, Lk, D, gen=gen), rand(B, Hkv, Lk, D, gen=gen)
    check_against_sdpa(q, k, v, dtype, is_causal=causal)


def test_autograd_through_auto_matches_sdpa_gradients():
    gen = torch.Generator().manual_seed(4)
    q, k, v = (rand(2, 4, 6, 8, gen=gen, dtype=F64).requires_grad_(True),
               rand(2, 2, 6, 8, gen=gen, dtype=F64).requires_grad_(True),
               rand(2, 2, 6, 8, gen=gen, dtype=F64).requires_grad_(True))
    call = validate_call(q, k, v, is_causal=True)
    assert select_backend(call)[0] == "reference"        # kernels are inference-only
    g = rand(2, 4, 6, 8, gen=gen, dtype=F64)
    ours = torch.autograd.grad(mk.attention(q, k, v, is_causal=True), (q, k, v), g)
    theirs = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                                 (q, k, v), g)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_return_lse_and_stats_give_an_attention_result():
    gen = torch.Generator().manual_seed(5)
    q, k = rand(1, 2, 4, 3, gen=gen, dtype=F64), rand(1, 2, 6, 3, gen=gen, dtype=F64)
    res = mk.attention(q, k, k, return_lse=True)
    assert isinstance(res, AttentionResult) and res.stats is None
    torch.testing.assert_close(res.lse, torch.logsumexp(q @ k.transpose(-1, -2) / math.sqrt(3), -1))
    res = mk.attention(q, k, k, return_stats=True)
    assert res.lse is None and res.stats.key_mass.shape == (1, 2, 6)
    hs = mk.attention(q, k, k, kind="hstu", return_lse=True)
    assert isinstance(hs, AttentionResult) and hs.lse is None


def test_jagged_api_equals_per_user_dense_calls():
    gen = torch.Generator().manual_seed(6)
    lens, klens = [3, 0, 5], [2, 4, 5]
    off = torch.tensor([0, 3, 3, 8])
    koff = torch.tensor([0, 2, 6, 11])
    q, k, v = rand(8, 4, 6, gen=gen), rand(11, 2, 6, gen=gen), rand(11, 2, 6, gen=gen)
    out = mk.attention(q, k, v, offsets=off, key_offsets=koff, is_causal=True)
    assert out.shape == q.shape
    for b in range(3):
        if lens[b] == 0:
            continue
        qs, ks = slice(int(off[b]), int(off[b + 1])), slice(int(koff[b]), int(koff[b + 1]))
        want = F.scaled_dot_product_attention(q[qs].transpose(0, 1)[None], k[ks].transpose(0, 1)[None],
                                              v[ks].transpose(0, 1)[None], is_causal=True, enable_gqa=True)
        torch.testing.assert_close(out[qs], want[0].transpose(0, 1), rtol=1e-5, atol=1e-5)


def test_dropout_runs_and_is_finite():
    q = rand(2, 2, 5, 4)
    out = mk.attention(q, q, q, dropout_p=0.2)
    assert torch.isfinite(out).all() and out.shape == q.shape


def test_available_backends_lists_reference_and_only_known_names():
    names = mk.available_backends()
    assert names[0] == "reference"
    assert set(names) <= {"reference", "cpu", "triton", "cuda"}
    for n in ("cpu", "triton", "cuda"):
        ok, why = backend_status(n)
        assert (n in names) == ok and (ok or why)


def test_explicit_unavailable_backend_raises_with_the_reason():
    q = rand(1, 1, 2, 4)
    for name in ("cpu", "triton", "cuda"):
        if name in mk.available_backends():
            continue
        with pytest.raises(ValueError, match=f"backend='{name}' cannot run this call: .+"):
            mk.attention(q, q, q, backend=name)
    # CUDA is never available on this project's machines
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="backend='cuda'"):
            mk.attention(q, q, q, backend="cuda")


def test_explicit_reference_backend_equals_reference_module():
    gen = torch.Generator().manual_seed(7)
    q, k = rand(2, 2, 3, 4, gen=gen), rand(2, 2, 3, 4, gen=gen)
    torch.testing.assert_close(mk.attention(q, k, k, backend="reference", kind="hstu"),
                               reference.attention(q, k, k, kind="hstu"), rtol=0, atol=0)


# ---- bad input -> ValueError/TypeError naming the argument ------------------------------------------------------
def _cache(B=2, H=2, C=4, D=8, dtype=torch.float32, **over):
    kw = dict(k=torch.zeros(B, H, C, D, dtype=dtype), v=torch.zeros(B, H, C, D, dtype=dtype),
              length=torch.full((B, H), 2, dtype=torch.int32), position=torch.zeros(B, H, C, dtype=torch.int32),
              original_length=torch.full((B,), 2, dtype=torch.int32), head_dim=D)
    kw.update(over)
    return KVCache(**kw)


Q = torch.zeros(2, 4, 5, 8)
K = torch.zeros(2, 2, 5, 8)
JQ = torch.zeros(7, 4, 8)
JK = torch.zeros(7, 2, 8)
OFF = torch.tensor([0, 3, 7])

BAD = [
    ("query rank", dict(query=torch.zeros(4, 5, 8)), ValueError, "query"),
    ("key rank", dict(key=torch.zeros(2, 5, 8)), ValueError, "key"),
    ("value shape", dict(value=torch.zeros(2, 2, 6, 8)), ValueError, "value"),
    ("heads do not divide", dict(query=torch.zeros(2, 3, 5, 8)), ValueError, "Hq=3"),
    ("head dim", dict(key=torch.zeros(2, 2, 5, 7), value=torch.zeros(2, 2, 5, 7)), ValueError, "head dim"),
    ("batch", dict(key=torch.zeros(3, 2, 5, 8), value=torch.zeros(3, 2, 5, 8)), ValueError, "batch"),
    ("int query", dict(query=torch.zeros(2, 4, 5, 8, dtype=torch.int32)), TypeError, "query"),
    ("not a tensor", dict(query=[1.0]), TypeError, "query"),
    ("dtype mismatch", dict(key=torch.zeros(2, 2, 5, 8, dtype=F64)), TypeError, "key dtype"),
    ("value dtype", dict(value=torch.zeros(2, 2, 5, 8, dtype=torch.float16)), TypeError, "value dtype"),
    ("device mismatch", dict(key=torch.zeros(2, 2, 5, 8, device="meta")), ValueError, "key is on meta"),
    ("unknown kind", dict(kind="linear"), ValueError, "kind"),
    ("unknown backend", dict(backend="gpu"), ValueError, "backend"),
    ("scale type", dict(scale="big"), TypeError, "scale"),
    ("scale inf", dict(scale=float("inf")), ValueError, "scale"),
    ("dropout range", dict(dropout_p=1.0), ValueError, "dropout_p"),
    ("dropout type", dict(dropout_p="0.1"), TypeError, "dropout_p"),
    ("is_causal type", dict(is_causal="yes"), TypeError, "is_causal"),
    ("hstu_norm value", dict(hstu_norm="max"), ValueError, "hstu_norm"),
    ("hstu_norm zero", dict(hstu_norm=0), ValueError, "hstu_norm"),
    ("stats_window", dict(stats_window=0), ValueError, "stats_window"),
    ("stats_window type", dict(stats_window=1.5), TypeError, "stats_window"),
    ("mask shape", dict(attn_mask=torch.ones(5, 6, dtype=torch.bool)), ValueError, "attn_mask"),
    ("mask dtype", dict(attn_mask=torch.ones(5, 5, dtype=torch.int64)), TypeError, "attn_mask"),
    ("mask float dtype", dict(attn_mask=torch.ones(5, 5, dtype=F64)), TypeError, "attn_mask"),
    ("num_targets negative", dict(num_targets=-1), ValueError, "num_targets"),
    ("num_targets too many", dict(num_targets=torch.tensor([1, 6])), ValueError, "num_targets"),
    ("num_targets float", dict(num_targets=torch.tensor([1.0, 2.0])), TypeError, "num_targets"),
    ("num_targets shape", dict(num_targets=torch.tensor([1, 2, 3])), ValueError, "num_targets"),
    ("num_targets cross", dict(key=torch.zeros(2, 2, 6, 8), value=torch.zeros(2, 2, 6, 8), num_targets=1),
     ValueError, "num_targets"),
    ("pos_bias heads", dict(pos_bias=torch.zeros(3, 5)), ValueError, "pos_bias"),
    ("pos_bias dtype", dict(pos_bias=torch.zeros(5, dtype=torch.int64)), TypeError, "pos_bias"),
    ("pos_bias empty", dict(pos_bias=torch.zeros(4, 0)), ValueError, "pos_bias"),
    ("time_bias without timestamps", dict(time_bias=torch.zeros(8)), ValueError, "query_timestamps"),
    ("query_positions shape", dict(pos_bias=torch.zeros(4), query_positions=torch.zeros(2, 4, dtype=torch.long)),
     ValueError, "query_positions"),
    ("query_positions float", dict(query_positions=torch.zeros(2, 5)), TypeError, "query_positions"),
    ("query_timestamps float", dict(query_timestamps=torch.zeros(2, 5)), TypeError, "query_timestamps"),
    ("key_offsets without offsets", dict(key_offsets=OFF), ValueError, "key_offsets"),
    ("cache type", dict(cache={"k": 1}), TypeError, "cache"),
    ("cache batch", dict(cache=_cache(B=3)), ValueError, "cache holds 3 users"),
    ("cache heads", dict(cache=_cache(H=1)), ValueError, "cache has 1 kv heads"),
    ("cache head_dim", dict(cache=_cache(D=4)), ValueError, "cache.head_dim"),
    ("cache dtype", dict(cache=_cache(dtype=F64)), TypeError, "cache.k dtype"),
    ("cache with Lk != Lq", dict(cache=_cache(), key=torch.zeros(2, 2, 6, 8), value=torch.zeros(2, 2, 6, 8)),
     ValueError, "key length"),
    ("time_bias with a cache without timestamps",
     dict(cache=_cache(), time_bias=torch.zeros(8), query_timestamps=torch.zeros(2, 5, dtype=torch.long)),
     ValueError, "cache.timestamp"),
]

BAD_JAGGED = [
    ("offsets end", dict(offsets=torch.tensor([0, 3, 6])), ValueError, "offsets"),
    ("offsets decreasing", dict(offsets=torch.tensor([0, 5, 3, 7])), ValueError, "offsets"),
    ("offsets start", dict(offsets=torch.tensor([1, 3, 7])), ValueError, "offsets"),
    ("offsets float", dict(offsets=torch.tensor([0.0, 3.0, 7.0])), TypeError, "offsets"),
    ("offsets 2-D", dict(offsets=torch.tensor([[0, 3, 7]])), ValueError, "offsets"),
    ("jagged query rank", dict(query=torch.zeros(2, 4, 5, 8)), ValueError, "query"),
    ("key tokens without key_offsets", dict(key=torch.zeros(6, 2, 8), value=torch.zeros(6, 2, 8)), ValueError,
     "key_offsets"),
    ("key_offsets users", dict(key_offsets=torch.tensor([0, 7])), ValueError, "key_offsets"),
    ("key_offsets end", dict(key_offsets=torch.tensor([0, 2, 5])), ValueError, "key_offsets"),
    ("mask with jagged", dict(attn_mask=torch.ones(7, 7, dtype=torch.bool)), ValueError, "attn_mask"),
    ("jagged positions shape", dict(query_positions=torch.zeros(2, 7, dtype=torch.long)), ValueError,
     "query_positions"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_dense_input_raises_naming_the_argument(case):
    _, over, exc, match = case
    kw = dict(query=Q, key=K, value=K)
    kw.update(over)
    with pytest.raises(exc, match=match):
        mk.attention(**kw)


def test_cache_length_beyond_capacity_is_refused_where_the_cache_is_made_and_by_the_cpu_op():
    """Data checks run once, where a cache is made (``check_contents``: compress, cache_from_bytes), not per
    attention call; the C++ op checks the lengths it indexes by itself, so even a call that bypasses the entry
    point's validation cannot read past the payload."""
    bad = _cache(length=torch.full((2, 2), 9, dtype=torch.int32))
    bad.validate()                                   # structurally fine: shapes and dtypes
    with pytest.raises(ValueError, match="cache.length"):
        bad.check_contents()
    if "cpu" in mk.available_backends():
        with pytest.raises(ValueError, match="length must be within"):
            mk.attention(Q, K, K, cache=bad, backend="cpu")


@pytest.mark.parametrize("case", BAD_JAGGED, ids=[c[0] for c in BAD_JAGGED])
def test_bad_jagged_input_raises_naming_the_argument(case):
    _, over, exc, match = case
    kw = dict(query=JQ, key=JK, value=JK, offsets=OFF)
    kw.update(over)
    with pytest.raises(exc, match=match):
        mk.attention(**kw)


# ---- dispatch rules, with a stand-in launcher module ---------------------------------------------------------------
@pytest.fixture
def fake_cpu(monkeypatch):
    """Replace the cpu launcher by a recording stand-in (the compiled extension check is bypassed too)."""
    import dataclasses
    import types

    from malloc_kernels.core import registry

    mod = types.ModuleType("fake_cpu_launcher")
    mod.ok, mod.why, mod.calls, mod.available = True, "", [], (True, "")
    mod.supports = lambda call: (mod.ok, mod.why)
    mod.is_available = lambda: mod.available

    def run(call):
        mod.calls.append(call)
        return AttentionResult(torch.full_like(call.query, 7.0), torch.zeros(call.query.shape[:-1]), None)

    mod.run = run
    row = dataclasses.replace(registry._ROWS["attention"]["cpu"], load=lambda: mod, ops=())
    monkeypatch.setitem(registry._ROWS["attention"], "cpu", row)
    monkeypatch.setattr(registry, "_STATUS", {})        # availability and launchers are cached per process
    monkeypatch.setattr(registry, "_LAUNCHERS", {})
    return mod


def test_auto_uses_a_supporting_kernel_and_returns_the_public_form(fake_cpu):
    q = rand(1, 2, 3, 4)
    out = mk.attention(q, q, q)
    assert isinstance(out, torch.Tensor) and torch.equal(out, torch.full_like(q, 7.0))
    assert len(fake_cpu.calls) == 1 and fake_cpu.calls[0].backend == "auto"
    res = mk.attention(q, q, q, return_lse=True)
    assert isinstance(res, AttentionResult) and res.lse.shape == (1, 2, 3)


def test_auto_falls_back_to_reference_when_the_kernel_declines(fake_cpu):
    fake_cpu.ok, fake_cpu.why = False, "no hstu with int norm"
    q = rand(1, 2, 3, 4)
    torch.testing.assert_close(mk.attention(q, q, q), reference.attention(q, q, q), rtol=0, atol=0)
    assert not fake_cpu.calls
    with pytest.raises(ValueError, match="backend='cpu' cannot run this call: .*no hstu with int norm"):
        mk.attention(q, q, q, backend="cpu")


def test_inputs_requiring_grad_go_to_the_reference_and_explicit_kernels_refuse(fake_cpu):
    q = rand(1, 2, 3, 4).requires_grad_(True)
    mk.attention(q, q, q).sum().backward()
    assert not fake_cpu.calls and q.grad is not None
    with pytest.raises(ValueError, match="inference-only"):
        mk.attention(q, q, q, backend="cpu")
    with torch.no_grad():
        mk.attention(q, q, q, backend="cpu")
    assert len(fake_cpu.calls) == 1


def test_machine_level_unavailability_is_reported(fake_cpu):
    fake_cpu.available = (False, "op not registered")
    assert "cpu" not in mk.available_backends()
    q = rand(1, 2, 3, 4)
    with pytest.raises(ValueError, match="op not registered"):
        mk.attention(q, q, q, backend="cpu")
    mk.attention(q, q, q)          # auto still works, via the reference
    assert not fake_cpu.calls


def test_a_missing_launcher_module_is_tolerated_by_auto(monkeypatch):
    import dataclasses
    import importlib

    from malloc_kernels.core import registry
    row = dataclasses.replace(registry._ROWS["attention"]["cpu"],
                              load=lambda: importlib.import_module("malloc_kernels.ops.no_such_launcher"))
    monkeypatch.setitem(registry._ROWS["attention"], "cpu", row)
    monkeypatch.setattr(registry, "_STATUS", {})
    monkeypatch.setattr(registry, "_LAUNCHERS", {})
    assert "cpu" not in mk.available_backends()
    q = rand(1, 2, 3, 4)
    torch.testing.assert_close(mk.attention(q, q, q), reference.attention(q, q, q), rtol=0, atol=0)
    with pytest.raises(ValueError, match="cannot be imported"):
        mk.attention(q, q, q, backend="cpu")
