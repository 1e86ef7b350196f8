"""Quantize/dequantize and pack/unpack of the cache storage contract (core/kvcache.py, cache/quant.py).

The bit-exactness checks compare against an independent scalar NumPy re-derivation of the contract (fp16 rounding
by NumPy, e4m3 by nearest-value search), so a bug shared by the vectorised code and its own helpers is caught.
"""
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from malloc_kernels.cache import KVCache
from malloc_kernels.cache.quant import (dequantize_tensor, f16_round_down, f16_round_up, pack_codes, quantize_cache,
                                        quantize_tensor, unpack_codes, _expand)

INT_BITS = {"int8": 8, "int4": 4, "int2": 2}


def make_cache(B=2, H=3, C=23, D=8, lengths=None, seed=0, dtype=torch.float32, with_ts=True, with_count=True,
               spread=3.0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, H, C, D, generator=g) * spread
    v = torch.randn(B, H, C, D, generator=g) * spread
    # channel-dependent offsets, as real keys have (KIVI's motivation for per-channel key groups)
    k = k + torch.linspace(-4, 4, D)
    if lengths is None:
        lengths = torch.randint(0, C + 1, (B, H), generator=g, dtype=torch.int32)
    pos = torch.randint(0, 1000, (B, H, C), generator=g, dtype=torch.int32)
    ts = torch.randint(0, 2 ** 40, (B, H, C), generator=g, dtype=torch.int64) if with_ts else None
    cnt = torch.rand(B, H, C, generator=g) * 4 + 1 if with_count else None
    return KVCache(k=k.to(dtype), v=v.to(dtype), length=lengths.to(torch.int32), position=pos,
                   original_length=lengths.max(dim=1).values.to(torch.int32) + 5, head_dim=D, timestamp=ts,
                   count=cnt).validate()


# ---- independent scalar reference ----------------------------------------------------------------------------
def np_round_down16(x):
    with np.errstate(over="ignore"):
        h = np.float16(np.float32(x))
    if np.float32(h) > np.float32(x):
        h = np.nextafter(h, np.float16(-np.inf))
    return h


def np_round_up16(x):
    with np.errstate(over="ignore"):
        h = np.float16(np.float32(x))
    if np.float32(h) < np.float32(x):
        with np.errstate(over="ignore"):
            h = np.nextafter(h, np.float16(np.inf))
    return h


def _e4m3_table():
    vals = []
    for c in range(256):
        e, m, s = (c >> 3) & 15, c & 7, -1.0 if c & 0x80 else 1.0
        if e == 15 and m == 7:
            continue                                          # NaN patterns
        v = m * 2.0 ** -9 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
        vals.append((s * v, c))
    return vals


E4M3 = _e4m3_table()


def np_e4m3(q):
    """Nearest e4m3fn value, ties to the code with even mantissa (round-half-even); a result of magnitude 0 keeps
    the input's sign (IEEE: -0.0 and tiny negatives give the -0 code 0x80)."""
    q = float(np.float32(q))
    best = min(E4M3, key=lambda vc: (abs(vc[0] - q), vc[1] & 1, vc[1] & 0x80))[1]
    if best & 0x7F == 0:
        return 0x80 if np.signbit(q) else 0
    return best


def np_quantize_group(xs, fmt):
    """(codes, scale fp16, zero fp16|None) for one group of valid fp32 values, by the contract's words."""
    xs = np.asarray(xs, dtype=np.float32)
    if fmt == "fp8":
        absmax = np.float32(np.abs(xs).max())
        scale = np_round_up16(np.float32(absmax / np.float32(448)))
        if scale == 0:
            return [0] * len(xs), scale, None
        s = np.float32(scale)
        return [np_e4m3(np.clip(np.float32(x / s), -448, 448)) for x in xs], scale, None
    qmax = 2 ** INT_BITS[fmt] - 1
    mn = np.float32(xs.min()) + np.float32(0.0)
    mx = np.float32(xs.max()) + np.float32(0.0)
    zero = np_round_down16(mn)
    scale = np_round_up16(np.float32(np.float32(mx - np.float32(zero)) / np.float32(qmax)))
    if scale == 0:
        return [0] * len(xs), scale, zero
    s, z = np.float32(scale), np.float32(zero)
    codes = [int(np.clip(np.round(np.float32(np.float32(x - z) / s)), 0, qmax)) for x in xs]
    return codes, scale, zero


def np_pack(codes, bits):
    per = 8 // bits
    out = []
    for i in range(0, len(codes), per):
        byte = 0
        for r, c in enumerate(codes[i:i + per]):
            byte |= c << (r * bits)
        out.append(byte)
    return out


def np_reference(x, length, fmt, G, axis):
    """Scalar loops over (b, h, group): packed codes, scale, zero as numpy arrays (padding zero)."""
    x = x.float().numpy()
    B, H, C, D = x.shape
    bits = 8 if fmt == "fp8" else INT_BITS[fmt]
    W = math.ceil(D * bits / 8)
    packed = np.zeros((B, H, C, W), np.uint8)
    codes = np.zeros((B, H, C, D), np.int64)
    sshape = (B, H, C, D // G) if axis == "token" else (B, H, math.ceil(C / G), D)
    scale = np.zeros(sshape, np.float16)
    zero = np.zeros(sshape, np.float16)
    for b in range(B):
        for h in range(H):
            L = int(length[b, h])
            if axis == "token":
                for j in range(L):
                    for g in range(D // G):
                        cs, s, z = np_quantize_group(x[b, h, j, g * G:(g + 1) * G], fmt)
                        codes[b, h, j, g * G:(g + 1) * G] = cs
                        scale[b, h, j, g] = s
                        zero[b, h, j, g] = 0 if z is None else z
            else:
                for g in range(math.ceil(L / G)):
                    for d in range(D):
                        rows = range(g * G, min((g + 1) * G, L))
                        cs, s, z = np_quantize_group([x[b, h, j, d] for j in rows], fmt)
                        for j, c in zip(rows, cs):
                            codes[b, h, j, d] = c
                        scale[b, h, g, d] = s
                        zero[b, h, g, d] = 0 if z is None else z
            for j in range(L):
                packed[b, h, j] = np_pack(list(codes[b, h, j]), bits) if bits < 8 else codes[b, h, j]
    return packed, scale, zero


# ---- fp16 outward rounding -------------------------------------------------------------------------------------
def test_f16_round_down_up_bracket_the_value():
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(4000, generator=g) * 10 ** torch.randint(-9, 5, (4000,), generator=g).float(),
                   torch.tensor([0.0, -0.0, 1.0, -1.0, 65504.0, -65504.0, 65519.0, 2 ** -24, 2 ** -25, 3e-8,
                                 -3e-8, 1e-3, 0.1, -0.1, 1 / 3])])
    lo, hi = f16_round_down(x), f16_round_up(x)
    assert lo.dtype == hi.dtype == torch.float16
    assert bool((lo.float() <= x).all()) and bool((hi.float() >= x).all())
    # tight: the next float16 past each result is on the other side of x
    assert bool((torch.nextafter(lo, torch.full_like(lo, math.inf)).float() > x).all())
    assert bool((torch.nextafter(hi, torch.full_like(hi, -math.inf)).float() < x).all())
    exact = x.to(torch.float16).float() == x
    assert bool((lo.float()[exact] == x[exact]).all()) and bool((hi.float()[exact] == x[exact]).all())
    for xi in x[::97].tolist() + [65519.0, 3e-8, -3e-8]:
        assert f16_round_down(torch.tensor([xi])).item() == float(np_round_down16(xi))
        assert f16_round_up(torch.tensor([xi])).item() == float(np_round_up16(xi))


def test_f16_round_overflow_gives_inf():
    assert f16_round_up(torch.tensor([65505.0])).item() == math.inf
    assert f16_round_down(torch.tensor([70000.0])).item() == 65504.0
    assert f16_round_down(torch.tensor([-65505.0])).item() == -math.inf
    assert f16_round_up(torch.tensor([-70000.0])).item() == -65504.0


# ---- packing -------------------------------------------------------------------------------------------------------
def test_pack_layout_hand_written():
    c = torch.tensor([[1, 2, 3]], dtype=torch.uint8)
    assert pack_codes(c, 4).tolist() == [[0x21, 0x03]]                    # element 0 low nibble, odd D: high nibble 0
    c = torch.tensor([[1, 2, 3, 0, 3]], dtype=torch.uint8)
    assert pack_codes(c, 2).tolist() == [[0b00111001, 0b00000011]]         # element 4i in bits 0-1
    c = torch.tensor([[0xF, 0x0, 0xA, 0x5]], dtype=torch.uint8)
    assert pack_codes(c, 4).tolist() == [[0x0F, 0x5A]]
    c = torch.tensor([[200, 7, 0]], dtype=torch.uint8)
    assert pack_codes(c, 8).tolist() == [[200, 7, 0]]
    assert unpack_codes(torch.tensor([[0x21, 0x03]], dtype=torch.uint8), 4, 3).tolist() == [[1, 2, 3]]
    assert unpack_codes(torch.tensor([[0b11100100]], dtype=torch.uint8), 2, 4).tolist() == [[0, 1, 2, 3]]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("D", [1, 3, 5, 8, 17])
def test_pack_unpack_round_trip(bits, D):
    g = torch.Generator().manual_seed(D * bits)
    codes = torch.randint(0, 2 ** bits, (3, 2, D), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape[-1] == math.ceil(D * bits / 8)
    assert torch.equal(unpack_codes(packed, bits, D), codes)
    used = D * bits - 8 * (packed.shape[-1] - 1)                          # bits used in the last byte
    assert bool((packed[..., -1].to(torch.int32) >> used == 0).all())    # unused high bits are zero
    assert packed[0, 0].tolist() == np_pack(codes[0, 0].tolist(), bits)


def test_quantize_hand_written_int2():
    x = torch.tensor([0.0, 1.0, 2.0, 3.0]).view(1, 1, 1, 4)
    packed, s, z = quantize_tensor(x, torch.tensor([[1]]), "int2", 4)
    assert s.item() == 1.0 and z.item() == 0.0
    assert packed.tolist() == [[[[0b11100100]]]]


def test_signed_zero_ties_give_positive_zero_and_scale():
    for row in ([-0.0, 0.0, 1.0, 2.0], [-0.0, 0.0, -1.0, -2.0], [-0.0, 0.0, -0.0, 0.0]):
        x = torch.tensor(row).view(1, 1, 1, 4)
        for order in (x, x.flip(-1)):
            _, s, z = quantize_tensor(order, torch.tensor([[1]]), "int8", 4)
            neg_zero = torch.tensor(-0.0, dtype=torch.float16).view(torch.int16)
            assert z.view(torch.int16).item() != neg_zero and s.view(torch.int16).item() != neg_zero


# ---- bit-exact against the scalar reference ---------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["int8", "int4", "int2", "fp8"])
@pytest.mark.parametrize("axis,G,D", [("token", 4, 8), ("token", 5, 5), ("token", 3, 9), ("channel", 4, 7),
                                      ("channel", 5, 3)])
def test_bit_exact_vs_scalar_reference(fmt, axis, G, D):
    lengths = torch.tensor([[0, 1, 9], [13, 4, 5]], dtype=torch.int32)
    c = make_cache(B=2, H=3, C=13, D=D, lengths=lengths, seed=G * D)
    x = c.k.clone()
    x[0, 1, 0, 0] = 0.0                                                  # a few exact ties / constants
    x[1, 0, :4, 0] = 0.5
    packed, s, z = quantize_tensor(x, c.length, fmt, G, axis)
    rp, rs, rz = np_reference(x, c.length, fmt, G, axis)
    assert np.array_equal(packed.numpy(), rp)
    assert np.array_equal(s.numpy().view(np.uint16), rs.view(np.uint16))
    if fmt == "fp8":
        assert z is None
    else:
        assert np.array_equal(z.numpy().view(np.uint16), rz.view(np.uint16))


# ---- error bounds ----------------------------------------------------------------------------------------------------
def _err_bound(fmt, x, scale_e):
    if fmt == "fp8":
        # e4m3: half an ulp is 2^-4 of |x| for normal codes, 2^-10 * scale in the subnormal range
        return (2.0 ** -4 * x.abs() + 2.0 ** -10 * scale_e) * (1 + 2.0 ** -10)
    qmax = 2 ** INT_BITS[fmt] - 1
    # half a step, plus the fp32 rounding of (x - zero) / scale (a few ulps of a quotient <= qmax)
    return scale_e * (0.5 + qmax * 2.0 ** -21)


@pytest.mark.parametrize("fmt", ["int8", "int4", "int2", "fp8"])
@pytest.mark.parametrize("axis,G", [("token", 8), ("token", 2), ("channel", 4), ("channel", 32)])
@pytest.mark.parametrize("spread", [1e-3, 3.0, 300.0])
def test_round_trip_within_analytic_bound(fmt, axis, G, spread):
    c = make_cache(B=3, H=2, C=41, D=8, seed=7, spread=spread)
    packed, s, z = quantize_tensor(c.k, c.length, fmt, G, axis)
    xh = dequantize_tensor(packed, s, z, c.length, fmt, G, axis, 8, torch.float64)
    valid = (torch.arange(41) < c.length[..., None].long())[..., None].expand_as(xh)
    x = c.k.double()
    se = _expand(s.double(), axis, G, 41)
    err = (x - xh).abs()
    assert bool((err[valid] <= _err_bound(fmt, x, se)[valid]).all()), float((err - _err_bound(fmt, x, se)).max())
    assert bool((xh[~valid] == 0).all())
    if fmt != "fp8":                                                   # codes stay in range
        codes = unpack_codes(packed, INT_BITS[fmt], 8)
        assert int(codes.max()) <= 2 ** INT_BITS[fmt] - 1


def test_constant_group_is_exact():
    # integer formats: zero = the constant (exact in fp16), scale = 0, codes 0 -> x_hat == x exactly
    x = torch.full((1, 1, 5, 4), 0.75)
    for fmt in ("int8", "int4", "int2"):
        for axis in ("token", "channel"):
            p, s, z = quantize_tensor(x, torch.tensor([[5]]), fmt, 4, axis)
            xh = dequantize_tensor(p, s, z, torch.tensor([[5]]), fmt, 4, axis, 4, torch.float64)
            assert torch.equal(xh, x.double()), (fmt, axis)


@pytest.mark.parametrize("in_dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_input_dtypes(in_dtype):
    c = make_cache(D=8, seed=3, dtype=in_dtype)
    q = quantize_cache(c, "int4", "int8", 4, "channel")
    kh, vh = q.dequantize(torch.float64)
    for x, xh, fmt, axis, s in ((c.k, kh, "int4", "channel", q.k_scale), (c.v, vh, "int8", "token", q.v_scale)):
        valid = (torch.arange(c.capacity) < c.length[..., None].long())[..., None].expand_as(xh)
        se = _expand(s.double(), axis, 4, c.capacity)
        # fp64 input is rounded to fp32 first (the contract computes in fp32)
        bound = _err_bound(fmt, x.double(), se) + x.double().abs() * 2.0 ** -23
        assert bool(((x.double() - xh).abs()[valid] <= bound[valid]).all())


# ---- padding, raggedness, batch isolation ------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["int8", "int4", "int2", "fp8"])
@pytest.mark.parametrize("axis", ["token", "channel"])
def test_padding_never_changes_codes(fmt, axis):
    c = make_cache(B=2, H=3, C=19, D=6, seed=11)
    garbage = torch.full((2, 3, 9, 6), 1e30)
    garbage[0, 0, 0, 0] = float("nan")
    padded_k = torch.cat([c.k, garbage], dim=2)
    # also overwrite the existing padding slots with garbage
    invalid = ~(torch.arange(28) < c.length[..., None].long())
    padded_k = torch.where(invalid[..., None], torch.full_like(padded_k, -7e29), padded_k)
    a = quantize_tensor(c.k, c.length, fmt, 3, axis)
    b = quantize_tensor(padded_k, c.length, fmt, 3, axis)
    valid = ~invalid[:, :, :19]
    assert torch.equal(a[0][valid], b[0][:, :, :19][valid])
    assert bool((b[0][invalid] == 0).all())
    if axis == "token":
        sv = valid
        assert torch.equal(a[1][sv], b[1][:, :, :19][sv])
        assert bool((b[1][invalid] == 0).all())
    else:
        ng = math.ceil(19 / 3)
        gv = torch.arange(ng) * 3 < c.length[..., None].long()
        assert torch.equal(a[1][gv], b[1][:, :, :ng][gv])
        gv2 = torch.arange(math.ceil(28 / 3)) * 3 < c.length[..., None].long()
        assert bool((b[1][~gv2] == 0).all())
        if fmt != "fp8":
            assert torch.equal(a[2][gv], b[2][:, :, :ng][gv])


@pytest.mark.parametrize("axis", ["token", "channel"])
def test_ragged_heads_and_users_match_quantizing_each_alone(axis):
    G = 4
    lengths = torch.tensor([[0, 1, 3, 4], [5, 17, 8, 16]], dtype=torch.int32)
    c = make_cache(B=2, H=4, C=17, D=8, lengths=lengths, seed=5)
    q = quantize_cache(c, "int4", "int2", G, axis)
    kh, vh = q.dequantize(torch.float64)
    for b in range(2):
        for h in range(4):
            L = int(lengths[b, h])
            one = KVCache(k=c.k[b:b + 1, h:h + 1, :L], v=c.v[b:b + 1, h:h + 1, :L],
                          length=torch.tensor([[L]], dtype=torch.int32), position=c.position[b:b + 1, h:h + 1, :L],
                          original_length=c.original_length[b:b + 1], head_dim=8)
            q1 = quantize_cache(one, "int4", "int2", G, axis)
            k1, v1 = q1.dequantize(torch.float64)
            assert torch.equal(k1[0, 0], kh[b, h, :L]) and torch.equal(v1[0, 0], vh[b, h, :L])
            assert torch.equal(q1.k[0, 0], q.k[b, h, :L])
            assert bool((kh[b, h, L:] == 0).all()) and bool((vh[b, h, L:] == 0).all())


# ---- quantize_cache / dequantize -------------------------------------------------------------------------------
def test_quantize_cache_carries_metadata_and_residual():
    c = make_cache(seed=2)
    res = make_cache(B=2, H=3, C=4, D=8, seed=9, with_count=False)
    c = c.replace(residual=res, meta={"layer": 3})
    q = quantize_cache(c, "int8", "fp8", 8)
    assert q.k_format == "int8" and q.v_format == "fp8" and q.v_zero is None and q.k_zero is not None
    for f in ("length", "position", "original_length", "timestamp", "count"):
        assert getattr(q, f) is getattr(c, f)
    assert q.residual is res and q.meta == {"layer": 3}
    assert q.k_scale.shape == (2, 3, 23, 1)


def test_mixed_float_and_quantized_sides():
    c = make_cache(D=8, seed=4, dtype=torch.float16)
    q = quantize_cache(c, "float", "int4", 4)
    assert q.k is c.k and q.k_scale is None
    kh, vh = q.dequantize()
    assert kh.dtype == torch.float16 and vh.dtype == torch.float32
    valid = (torch.arange(c.capacity) < c.length[..., None].long())[..., None]
    assert torch.equal(kh, torch.where(valid, c.k, torch.zeros((), dtype=torch.float16)))
    q2 = quantize_cache(c, "int2", "float", 5, "channel")                # channel-axis group need not divide D
    assert q2.k_scale.shape == (2, 3, 5, 8)
    k64, v64 = q2.dequantize(torch.float64)
    assert k64.dtype == v64.dtype == torch.float64


def test_float_cache_dequantize_zeroes_padding():
    c = make_cache(seed=8)
    k, v = c.dequantize()
    assert k.dtype == torch.float32
    valid = (torch.arange(c.capacity) < c.length[..., None].long())[..., None]
    assert torch.equal(k, torch.where(valid, c.k, 0.0)) and torch.equal(v, torch.where(valid, c.v, 0.0))


def test_pytree_round_trip_of_quantized_cache():
    import torch.utils._pytree as pytree
    c = make_cache(seed=6)
    c = quantize_cache(c.replace(residual=make_cache(C=3, seed=1, with_count=False)), "int4", "int8", 4, "channel")
    leaves, spec = pytree.tree_flatten(c)
    # absent optional fields flatten to None leaves (torch's pytree treats None as a leaf)
    assert all(t is None or isinstance(t, torch.Tensor) for t in leaves)
    assert sum(isinstance(t, torch.Tensor) for t in leaves) == 17   # 11 of the main segment + 6 of the residual
    back = pytree.tree_unflatten(leaves, spec)
    for f in KVCache._TENSOR_FIELDS + KVCache._STATIC_FIELDS:
        a, b = getattr(c, f), getattr(back, f)
        if isinstance(a, torch.Tensor):
            assert a is b
        elif f != "residual":
            assert a == b
    assert back.residual.k is c.residual.k
    pytree.tree_map(lambda t: None if t is None else t.clone(), c).validate()


# ---- bad input ---------------------------------------------------------------------------------------------------
def test_bad_arguments_name_the_argument():
    c = make_cache(D=8, seed=0)
    with pytest.raises(ValueError, match="group_size"):
        quantize_cache(c, "int8", "int8", 3)
    with pytest.raises(ValueError, match="group_size"):
        quantize_cache(c, "int8", "int4", 0)
    with pytest.raises(TypeError, match="group_size"):
        quantize_cache(c, "int8", "int4", 2.0)
    with pytest.raises(ValueError, match="group_size"):
        quantize_cache(c, "int8", "int4", 3, "channel")                  # values still need divisibility
    with pytest.raises(ValueError, match="k_format"):
        quantize_cache(c, "int3", "int8", 8)
    with pytest.raises(ValueError, match="v_format"):
        quantize_cache(c, "int8", "nf4", 8)
    with pytest.raises(ValueError, match="k_axis"):
        quantize_cache(c, "int8", "int8", 8, "row")
    with pytest.raises(TypeError, match="cache"):
        quantize_cache(c.k, "int8", "int8", 8)
    q = quantize_cache(c, "int8", "int8", 8)
    with pytest.raises(ValueError, match="full-precision"):
        quantize_cache(q, "int4", "int4", 8)
    with pytest.raises(TypeError, match="dtype"):
        c.dequantize(torch.int32)


def test_range_beyond_float16_raises():
    c = make_cache(D=4, seed=0, lengths=torch.full((2, 3), 23, dtype=torch.int32))
    k = c.k.clone()
    k[1, 2, 5, 1] = -70000.0
    with pytest.raises(ValueError, match="cache.k.*float16"):
        quantize_cache(c.replace(k=k), "int8", "int8", 4)
    v = c.v.clone()
    v[0, 0, 0, 0] = 3e7
    with pytest.raises(ValueError, match="cache.v.*float16"):
        quantize_cache(c.replace(v=v), "int8", "fp8", 4)
    k = c.k.clone()
    k[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="cache.k.*NaN"):
        quantize_cache(c.replace(k=k), "int4", "int4", 4, "channel")
    # the same NaN in a padding slot is fine
    lengths = c.length.clone()
    lengths[0, 1] = 2
    quantize_cache(c.replace(k=k, length=lengths), "int4", "int4", 4, "channel")


# ---- long tail -------------------------------------------------------------------------------------------------------


@st.composite
def _quant_problem(draw):
    fmt = draw(st.sampled_from(["int8", "int4", "int2", "fp8"]))
    axis = draw(st.sampled_from(["token", "channel"]))
    D = draw(st.integers(1, 9))
    G = draw(st.sampled_from([d for d in range(1, D + 1) if D % d == 0])) if axis == "token" else \
        draw(st.integers(1, 6))
    B, H, C = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(0, 9))
    lengths = torch.tensor(draw(st.lists(st.integers(0, C), min_size=B * H, max_size=B * H)),
                           dtype=torch.int32).view(B, H)
    seed = draw(st.integers(0, 2 ** 16))
    mag = draw(st.sampled_from([1e-6, 1e-2, 1.0, 1e2, 1e4]))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, H, C, D, generator=g) * mag
    if draw(st.booleans()):                                              # coarse values: many exact ties
        x = torch.round(x * 4 / mag) / 4
    if draw(st.booleans()):                                              # non-contiguous input
        x = x.transpose(2, 3).contiguous().transpose(2, 3)
    return fmt, axis, G, x, lengths


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_quant_problem())
def test_hypothesis_bit_exact_and_bounded(problem):
    fmt, axis, G, x, lengths = problem
    packed, s, z = quantize_tensor(x, lengths, fmt, G, axis)
    rp, rs, rz = np_reference(x, lengths, fmt, G, axis)
    assert np.array_equal(packed.numpy(), rp)
    assert np.array_equal(s.numpy().view(np.uint16), rs.view(np.uint16))
    if z is not None:
        assert np.array_equal(z.numpy().view(np.uint16), rz.view(np.uint16))
    C, D = x.shape[2], x.shape[3]
    xh = dequantize_tensor(packed, s, z, lengths, fmt, G, axis, D, torch.float64)
    valid = (torch.arange(C) < lengths[..., None].long())[..., None].expand_as(xh)
    se = _expand(s.double(), axis, G, C)
    err = (x.double() - xh).abs()
    assert bool((err[valid] <= _err_bound(fmt, x.double(), se)[valid]).all())
    assert bool((xh[~valid] == 0).all())
