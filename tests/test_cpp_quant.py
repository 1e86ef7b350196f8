"""The C++ quantize/pack ops (csrc/cpu/quantize_pack.cpp, numerics in quant.h) are bit-exact with the PyTorch
packer (malloc_kernels/cache/quant.py): codes, scales and zeros, every format, both group axes, ragged lengths,
odd head dims, padding garbage, non-contiguous inputs; plus the quant.h primitives against torch's own
conversions, and torch.library.opcheck on every op."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from malloc_kernels.cache import quant as pyq
from malloc_kernels.core import formats
from malloc_kernels.ops import cpp_quant

FORMATS = ("int8", "int4", "int2", "fp8")


def _bits(t):
    """Tensor -> integer view with the same bits (so NaN/-0.0 compare exactly)."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _assert_same(cpp, ref):
    c_codes, c_scale, c_zero = cpp
    r_codes, r_scale, r_zero = ref
    assert c_codes.shape == r_codes.shape and c_codes.dtype == r_codes.dtype
    assert torch.equal(c_codes, r_codes)
    assert c_scale.dtype == r_scale.dtype == torch.float16 and c_scale.shape == r_scale.shape
    assert torch.equal(_bits(c_scale), _bits(r_scale))
    if r_zero is None:
        assert c_zero is None
    else:
        assert torch.equal(_bits(c_zero), _bits(r_zero))


def _make(B, H, N, D, dtype, seed, lengths=None, garbage=True, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    # Per-channel offsets and outliers, as real keys have (KIVI's motivation for channel groups).
    x = torch.randn(B, H, N, D, generator=g, dtype=torch.float64) * spread
    x += torch.randn(1, 1, 1, D, generator=g, dtype=torch.float64) * 4
    x[..., 0] *= 7
    if lengths is None:
        lengths = torch.randint(0, N + 1, (B, H), generator=g, dtype=torch.int32)
    x = x.to(dtype)
    if garbage:  # padding holds values that would break quantisation if read (NaN, huge)
        pad = torch.arange(N)[None, None, :] >= lengths[..., None]
        x = x.masked_fill(pad[..., None], float("nan"))
        x[..., 1:, :] = torch.where(pad[..., 1:, None], torch.full_like(x[..., 1:, :], 1e30 if dtype != torch.float16 else 6e4), x[..., 1:, :])
    return x, lengths


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("axis,D,G", [("token", 16, 16), ("token", 16, 4), ("token", 33, 11), ("token", 7, 7),
                                      ("token", 5, 1), ("channel", 16, 8), ("channel", 17, 4), ("channel", 3, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_bit_exact_with_pytorch(fmt, axis, D, G, dtype):
    g = torch.Generator().manual_seed(D + G)
    length = torch.randint(0, 38, (3, 2), generator=g, dtype=torch.int32)
    length[0, 0] = 0          # empty row
    length[1, 1] = 37         # full row
    length[2, 0] = 1          # single entry
    x, length = _make(3, 2, 37, D, dtype, seed=D * 31 + G, lengths=length)
    ref = pyq.quantize_tensor(x, length, fmt, G, axis)
    got = cpp_quant.quantize_pack(x, length, fmt, G, axis)
    _assert_same(got, ref)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("axis", ["token", "channel"])
def test_non_contiguous_and_padding_ignored(fmt, axis):
    base, length = _make(2, 3, 19, 24, torch.float32, seed=7)
    x = base.transpose(1, 2).contiguous().transpose(1, 2)[..., ::2]   # [2, 3, 19, 12], odd strides
    assert not x.is_contiguous()
    got = cpp_quant.quantize_pack(x, length, fmt, 4, axis)
    _assert_same(got, pyq.quantize_tensor(x.contiguous(), length, fmt, 4, axis))
    # Changing the padding does not change a single stored byte.
    pad = (torch.arange(19)[None, None, :] >= length[..., None])[..., None]
    other = torch.where(pad, torch.full_like(x, -3.5), x)
    again = cpp_quant.quantize_pack(other, length, fmt, 4, axis)
    for a, b in zip(got, again):
        if a is not None:
            assert torch.equal(_bits(a), _bits(b))


@pytest.mark.parametrize("fmt", FORMATS)
def test_edge_values(fmt):
    # Constant groups, exact fp16 values, signed zeros, subnormal-range scales, fp16 extremes.
    rows = [
        [0.0] * 8, [-0.0] * 8, [-0.0, 0.0] * 4, [1.0] * 8, [0.1] * 8, [65504.0, -65504.0] * 4,
        [1e-7, -1e-7, 3e-8, 0.0, 5e-6, -2e-6, 1e-5, 0.0], [-1e-9] * 8, [1e-9, 2e-9] * 4,
        [448.0, -448.0, 1.0, 2.0, 3.0, 0.5, 0.25, 100.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0],
        [70000.0, 80000.0] * 4,
    ]
    x = torch.tensor(rows, dtype=torch.float32).view(1, 1, len(rows), 8)
    length = torch.tensor([[len(rows)]], dtype=torch.int32)
    for axis, G in (("token", 8), ("token", 2), ("channel", 3)):
        try:
            ref = pyq.quantize_tensor(x, length, fmt, G, axis)
        except ValueError:
            with pytest.raises(ValueError):
                cpp_quant.quantize_pack(x, length, fmt, G, axis)
            continue
        _assert_same(cpp_quant.quantize_pack(x, length, fmt, G, axis), ref)


@pytest.mark.parametrize("fmt", FORMATS)
def test_unpack_dequantize_matches_pytorch(fmt):
    for axis, D, G in (("token", 12, 4), ("channel", 9, 5)):
        x, length = _make(2, 2, 23, D, torch.float32, seed=3)
        codes, scale, zero = cpp_quant.quantize_pack(x, length, fmt, G, axis)
        got = cpp_quant.unpack_dequantize(codes, scale, zero, length, fmt, G, axis, D)
        ref = pyq.dequantize_tensor(codes, scale, zero, length, fmt, G, axis, D, torch.float32)
        # x_hat = code * scale + zero in fp32; a compiler may fuse the multiply-add (one rounding instead of two)
        torch.testing.assert_close(got, ref, rtol=2.0 ** -22, atol=0.0)
        valid = (torch.arange(23)[None, None, :] < length[..., None])[..., None]
        assert bool((got.masked_select(~valid.expand_as(got)) == 0).all())
        # Round trip within half a step (int) / e4m3's relative precision (fp8), over valid entries.
        err = (got - torch.nan_to_num(x)).abs().masked_select(valid.expand_as(got))
        if fmt == "fp8":
            bound = (torch.nan_to_num(x).abs() * 2.0 ** -4).masked_select(valid.expand_as(got)) + 1e-3
        else:
            s = pyq._expand(scale.float(), axis, G, 23)
            bound = (s / 2 * (1 + 1e-5) + 1e-6).masked_select(valid.expand_as(got))
        assert bool((err <= bound).all())


def test_errors_name_the_argument():
    x = torch.randn(1, 2, 5, 8)
    length = torch.full((1, 2), 5, dtype=torch.int32)
    with pytest.raises(ValueError, match="fmt"):
        cpp_quant.quantize_pack(x, length, "int3", 8)
    with pytest.raises(ValueError, match="group_size"):
        cpp_quant.quantize_pack(x, length, "int4", 3)
    with pytest.raises(ValueError, match="axis"):
        cpp_quant.quantize_pack(x, length, "int4", 4, "row")
    with pytest.raises(TypeError, match="x"):
        cpp_quant.quantize_pack(x.to(torch.int32), length, "int4", 4)
    with pytest.raises(ValueError, match="length"):
        cpp_quant.quantize_pack(x, torch.full((1, 2), 6, dtype=torch.int32), "int4", 4)
    with pytest.raises(ValueError, match="length"):
        torch.ops.malloc_kernels.quantize_pack(x, torch.full((2, 1), 5, dtype=torch.int32), formats.code("int4"), 4,
                                               "token")
    bad = x.clone()
    bad[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        cpp_quant.quantize_pack(bad, length, "int8", 8)
    bad[0, 1, 2, 3] = float("inf")
    with pytest.raises(ValueError):
        cpp_quant.quantize_pack(bad, length, "fp8", 8)
    big = x.clone()
    big[0, 0, 0, 0] = -1e6
    with pytest.raises(ValueError, match="float16"):
        cpp_quant.quantize_pack(big, length, "int4", 8)
    with pytest.raises(ValueError, match="float16"):
        pyq.quantize_tensor(big, length, "int4", 8)


# ---- quant.h primitives against torch's own conversions ---------------------------------------------------------
def _random_f32(n, seed):
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(-2 ** 31, 2 ** 31 - 1, (n,), generator=g, dtype=torch.int64).to(torch.int32)
    return bits.view(torch.float32)


def _f16_range_f32(n, seed):
    """fp32 values concentrated where fp16 rounding is interesting: every exponent of fp16 and just beyond."""
    g = torch.Generator().manual_seed(seed)
    exp = torch.randint(102, 145, (n,), generator=g, dtype=torch.int32)       # 2^-25 .. 2^17
    mant = torch.randint(0, 1 << 23, (n,), generator=g, dtype=torch.int32)
    sign = torch.randint(0, 2, (n,), generator=g, dtype=torch.int32) << 31
    return (sign | (exp << 23) | mant).view(torch.float32)


def _f16_midpoints():
    """Exact midpoints (ties) between every pair of adjacent finite fp16 values, both signs."""
    h = torch.arange(0, 0x7bff, dtype=torch.int32).to(torch.int16).view(torch.float16).double()
    nxt = torch.arange(1, 0x7c00, dtype=torch.int32).to(torch.int16).view(torch.float16).double()
    mid = ((h + nxt) / 2).float()                                                 # exact in fp32
    return torch.cat([mid, -mid])


def test_f16_conversion_matches_torch():
    x = torch.cat([_random_f32(1 << 20, 1), _f16_range_f32(1 << 20, 2), _f16_midpoints(),
                   torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, -65520.0, float("inf"), -float("inf"),
                                 2.0 ** -24, 2.0 ** -25, 2.0 ** -25 * 1.0000001, 2.0 ** -14])])
    got = cpp_quant.quant_numerics(x, "f16_bits")
    ref = x.to(torch.float16).view(torch.int16)
    finite = ~torch.isnan(x)
    assert torch.equal(got[finite], ref[finite])
    assert bool(torch.isnan(got.view(torch.float16)[~finite]).all())


def test_f16_decode_all_patterns():
    h = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16)
    got = cpp_quant.quant_numerics(h, "f16_decode")
    ref = h.view(torch.float16).float()
    nan = torch.isnan(ref)
    assert torch.equal(_bits(got[~nan]), _bits(ref[~nan]))
    assert bool(torch.isnan(got[nan]).all())


def test_f16_outward_rounding_matches_pytorch_packer():
    x = torch.cat([_f16_range_f32(1 << 18, 3), _f16_midpoints()[::7],
                   torch.tensor([0.0, -0.0, 1e-9, -1e-9, 65504.0, 65505.0, 7e4, -7e4, 2.0 ** -24])])
    for fn, ref_fn in (("f16_round_down", pyq.f16_round_down), ("f16_round_up", pyq.f16_round_up)):
        got = cpp_quant.quant_numerics(x, fn)
        ref = ref_fn(x).float()
        assert torch.equal(_bits(got), _bits(ref)), fn
        h = got.to(torch.float16).float()
        assert torch.equal(_bits(h), _bits(got))         # results are fp16 values
        assert bool((got <= x).all() if fn == "f16_round_down" else (got >= x).all())


def test_round_half_even():
    x = torch.cat([torch.arange(-20, 20, dtype=torch.float32) + 0.5, _random_f32(1 << 16, 4)])
    x = x[torch.isfinite(x)]
    assert torch.equal(_bits(cpp_quant.quant_numerics(x, "round_half_even")), _bits(torch.round(x)))


@pytest.mark.skipif(not pyq.fp8_available(), reason="this torch has no float8_e4m3fn")
def test_e4m3fn_matches_torch():
    all8 = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    vals = all8.view(torch.float8_e4m3fn).float()
    fin = torch.isfinite(vals)
    dec = cpp_quant.quant_numerics(all8, "e4m3fn_decode")
    assert torch.equal(_bits(dec[fin]), _bits(vals[fin])) and bool(torch.isnan(dec[~fin]).all())
    v = vals[fin].double().sort().values.unique()
    mids = ((v[1:] + v[:-1]) / 2).float()                                          # every tie
    g = torch.Generator().manual_seed(5)
    near = torch.randn(1 << 18, generator=g) * torch.exp2(torch.randint(-12, 10, (1 << 18,), generator=g).float())
    x = torch.cat([mids, _random_f32(1 << 18, 6), near,
                   torch.tensor([447.9, 448.0, 463.9, 464.0, 464.1, 479.9, 480.0, 1e6, float("inf"),
                                 -float("inf"), 2.0 ** -10, 2.0 ** -10 * 1.0001, 0.0, -0.0])])
    got = cpp_quant.quant_numerics(x, "e4m3fn")
    ref = x.to(torch.float8_e4m3fn).view(torch.uint8)
    nan = torch.isnan(x)
    assert torch.equal(got[~nan], ref[~nan])
    assert bool(((got[nan] & 0x7F) == 0x7F).all())


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 3), H=st.integers(1, 3), N=st.integers(0, 40), D=st.integers(1, 20),
       G=st.integers(1, 12), fmt=st.sampled_from(FORMATS), axis=st.sampled_from(["token", "channel"]),
       seed=st.integers(0, 2 ** 16), spread=st.sampled_from([1e-6, 1.0, 300.0]))
def test_bit_exact_hypothesis(B, H, N, D, G, fmt, axis, seed, spread):
    if axis == "token":
        G = math.gcd(G, D)
    x, length = _make(B, H, N, D, torch.float32, seed, spread=spread)
    _assert_same(cpp_quant.quantize_pack(x, length, fmt, G, axis), pyq.quantize_tensor(x, length, fmt, G, axis))


# ---- torch.library.opcheck --------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,axis,G", [("int4", "channel", 4), ("int2", "token", 4), ("fp8", "token", 4),
                                        ("int8", "channel", 4), ("nvfp4", "token", 16)])
def test_opcheck(fmt, axis, G):
    x, length = _make(2, 2, 9, 8, torch.float32, seed=11, garbage=False)
    code = formats.code(fmt)                    # the ops take the format table's code, never the name
    torch.library.opcheck(torch.ops.malloc_kernels.quantize_pack.default, (x, length, code, G, axis))
    codes, scale, zero = torch.ops.malloc_kernels.quantize_pack(x, length, code, G, axis)
    torch.library.opcheck(torch.ops.malloc_kernels.unpack_dequantize.default,
                          (codes, scale, zero, length, code, G, axis, 8))
    torch.library.opcheck(torch.ops.malloc_kernels.quant_numerics.default, (x.flatten(), "f16_round_up"))
    torch.library.opcheck(torch.ops.malloc_kernels.quant_numerics.default, (x.flatten(), "e4m3fn"))
