"""Triton quantize-and-pack: builds quantized KV caches on the GPU, bit-exact with ``cache/quant.py``.

Implements the storage rule of ``core/kvcache.py`` (see ``cache/quant.py`` for the reference and its rationale):
integer formats (``int8``/``int4``/``int2``, ``qmax = 2**bits - 1``) per group over the group's VALID entries::

    zero  = f16_round_down(min + 0.0)
    scale = f16_round_up((max - zero) / qmax)                 # fp32 true (round-to-nearest) division
    code  = clamp(round_half_even((x - zero) / scale), 0, qmax), 0 where scale == 0

and fp8 (e4m3fn): ``scale = f16_round_up(absmax / 448)``, ``code = e4m3fn(clamp(x / scale, -448, 448))``. Codes are
packed little-end first (4-bit: element 2i in the low nibble; 2-bit: element 4i+r in bits 2r..2r+1). Groups:
``"token"`` (one scale per entry and ``group_size`` channels) or ``"channel"`` (one per ``group_size`` entries and
channel; KIVI keys, Liu et al. 2024, arXiv 2402.02750). Padding entries and groups without a valid entry store 0.

Bit-exactness on a GPU needs care that the interpreter does not show: divisions use ``tl.div_rn`` (Triton's ``/``
is an approximate division on NVIDIA), rounding to fp16 toward -inf/+inf and round-half-even are done with exact
integer/bit operations, and the e4m3 encoding is an integer round-to-nearest-even on the fp32 bit pattern (sm_80
has no fp8 conversion instruction).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..cache.quant import check_quantize_cache_args, quantize_cache_sides
from ..cache.types import FP8_FORMAT, INT_FORMATS, K_AXES, KVCache
from .launch import device_guard

_FMT = {"int8": 1, "int4": 2, "int2": 3, "fp8": 4}


@triton.jit
def _f16_round(x, UP: tl.constexpr):
    """Smallest fp16 >= x (UP) or largest fp16 <= x, returned as fp32: round to nearest, then step one ulp with
    the fp16 bit pattern when the rounding went the wrong way (as ``torch.nextafter`` in the reference)."""
    h = x.to(tl.float16)
    hf = h.to(tl.float32)
    bits = h.to(tl.int16, bitcast=True).to(tl.int32)
    neg = bits < 0
    if UP:
        wrong = hf < x
        step = tl.where(neg, bits - 1, bits + 1)
    else:
        wrong = hf > x
        step = tl.where(neg, bits + 1, bits - 1)
    bits = tl.where(wrong, step, bits)
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _round_half_even(v):
    fl = tl.floor(v)
    fr = v - fl
    odd = (fl.to(tl.int32) & 1) == 1
    return tl.where((fr > 0.5) | ((fr == 0.5) & odd), fl + 1.0, fl)


@triton.jit
def _e4m3_encode(y):
    """fp32 ``y`` with ``|y| <= 448`` -> e4m3fn bit pattern (int32), round to nearest even, sign of -0 kept."""
    bits = y.to(tl.int32, bitcast=True)
    sign = (bits >> 31) & 1
    a = tl.abs(y)
    # subnormal range of e4m3 (|y| < 2^-6): multiples of 2^-9; m == 8 is the smallest normal, code 0x08
    sub = _round_half_even(a * 512.0).to(tl.int32)
    e = ((bits >> 23) & 0xFF) - 127
    frac = bits & 0x7FFFFF
    q = frac >> 20
    rem = frac & 0xFFFFF
    up = (rem > 0x80000) | ((rem == 0x80000) & ((q & 1) == 1))
    q = q + up.to(tl.int32)
    e = tl.where(q == 8, e + 1, e)
    q = tl.where(q == 8, 0, q)
    normal = ((e + 7) << 3) | q
    mag = tl.where(a < 0.015625, sub, normal)
    return mag | (sign << 7)


@triton.jit
def _codes(x, s, z, FMT: tl.constexpr, QMAX: tl.constexpr):
    if FMT == 4:
        y = tl.div_rn(x, tl.where(s > 0, s, 1.0))
        y = tl.minimum(tl.maximum(y, -448.0), 448.0)
        c = _e4m3_encode(y)
    else:
        v = tl.div_rn(x - z, tl.where(s > 0, s, 1.0))
        c = tl.minimum(tl.maximum(_round_half_even(v), 0.0), QMAX).to(tl.int32)
    return tl.where(s > 0, c, 0)


@triton.jit
def _store_packed(OUT, n, n_ok, codes, W: tl.constexpr, BLOCK_D: tl.constexpr, FMT: tl.constexpr):
    """Pack int32 codes ``[BLOCK_N, BLOCK_D]`` (0 past the head dim) into bytes and store columns ``< W``."""
    if FMT == 2:
        lo, hi = tl.split(tl.reshape(codes, (n.shape[0], BLOCK_D // 2, 2)))
        by = lo | (hi << 4)
        c = tl.arange(0, BLOCK_D // 2)
    elif FMT == 3:
        a, b = tl.split(tl.reshape(codes, (n.shape[0], BLOCK_D // 4, 2, 2)))
        a0, a1 = tl.split(a)
        b0, b1 = tl.split(b)
        by = a0 | (b0 << 2) | (a1 << 4) | (b1 << 6)
        c = tl.arange(0, BLOCK_D // 4)
    else:
        by = codes
        c = tl.arange(0, BLOCK_D)
    tl.store(OUT + n[:, None] * W + c[None, :], by.to(tl.uint8), mask=n_ok[:, None] & (c[None, :] < W))


@triton.jit(do_not_specialize=("C", "num_blocks"))
def quantize_pack_token_kernel(X, sx_b, sx_h, sx_c, sx_d, LEN, C, num_blocks, OUT, SCALE, ZERO,
                               H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                               BLOCK_N: tl.constexpr, GS: tl.constexpr, FMT: tl.constexpr, QMAX: tl.constexpr,
                               W: tl.constexpr):
    """Token-axis groups. Grid ``(num_blocks * B * H,)``, ``num_blocks = cdiv(C, BLOCK_N)`` (one axis: no 65,535
    limit on B * H): BLOCK_N entries of one (user, head); each entry's ``HEAD_DIM / GS`` channel groups are reduced
    with masked row reductions (GS need not be a power of two)."""
    pid = tl.program_id(0)
    blk = pid % num_blocks
    bh = pid // num_blocks
    b = bh // H
    h = bh % H
    NG: tl.constexpr = HEAD_DIM // GS
    length = tl.load(LEN + bh)
    n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    in_c = n < C
    valid = n < length
    d = tl.arange(0, BLOCK_D)
    dok = d < HEAD_DIM
    ok = valid[:, None] & dok[None, :]
    # int64 offsets: the products pass 2^31 once the tensor does
    x = tl.load(X + b.to(tl.int64) * sx_b + h.to(tl.int64) * sx_h + n.to(tl.int64)[:, None] * sx_c
                + d[None, :] * sx_d, mask=ok, other=0.0)
    x = x.to(tl.float32)
    s_full = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    z_full = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    row = bh.to(tl.int64) * C + n
    for g in tl.static_range(NG):
        gm = (d >= g * GS) & (d < (g + 1) * GS)
        sel = ok & gm[None, :]
        if FMT == 4:
            amax = tl.max(tl.where(sel, tl.abs(x), 0.0), 1)
            s = _f16_round(tl.div_rn(amax, 448.0), True)
            s = tl.where(valid, s, 0.0)
            z = s * 0.0
        else:
            mn = tl.min(tl.where(sel, x, float("inf")), 1)
            mx = tl.max(tl.where(sel, x, float("-inf")), 1)
            mn = tl.where(valid, mn, 0.0)
            mn = tl.where(mn == 0.0, 0.0, mn)          # canonical +0: the reference's "min + 0.0"
            mx = tl.where(valid, mx, 0.0)
            mx = tl.where(mx == 0.0, 0.0, mx)          # +0 too: an all -0.0 group gets scale +0 as in quant.py
            z = _f16_round(mn, False)
            s = _f16_round(tl.div_rn(mx - z, QMAX), True)
            z = tl.where(valid, z, 0.0)
            s = tl.where(valid, s, 0.0)
            tl.store(ZERO + row * NG + g, z.to(tl.float16), mask=in_c)
        tl.store(SCALE + row * NG + g, s.to(tl.float16), mask=in_c)
        s_full = tl.where(gm[None, :], s[:, None], s_full)
        z_full = tl.where(gm[None, :], z[:, None], z_full)
    codes = _codes(x, s_full, z_full, FMT, QMAX)
    codes = tl.where(ok, codes, 0)
    _store_packed(OUT + bh.to(tl.int64) * C * W, n, in_c, codes, W, BLOCK_D, FMT)


@triton.jit(do_not_specialize=("C", "num_blocks"))
def quantize_pack_channel_kernel(X, sx_b, sx_h, sx_c, sx_d, LEN, C, num_blocks, OUT, SCALE, ZERO,
                                 H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                                 BLOCK_G: tl.constexpr, GS: tl.constexpr, FMT: tl.constexpr,
                                 QMAX: tl.constexpr, W: tl.constexpr):
    """Channel-axis groups (KIVI keys). Grid ``(num_blocks * B * H,)``, ``num_blocks = cdiv(C, GS)``: one group of
    GS entries x all channels; the statistics are column reductions over the group's valid entries."""
    pid = tl.program_id(0)
    g = pid % num_blocks
    bh = pid // num_blocks
    b = bh // H
    h = bh % H
    length = tl.load(LEN + bh)
    n = g * GS + tl.arange(0, BLOCK_G)
    in_c = (n < C) & (tl.arange(0, BLOCK_G) < GS)
    valid = in_c & (n < length)
    gvalid = g * GS < length
    d = tl.arange(0, BLOCK_D)
    dok = d < HEAD_DIM
    ok = valid[:, None] & dok[None, :]
    # int64 offsets: the products pass 2^31 once the tensor does
    x = tl.load(X + b.to(tl.int64) * sx_b + h.to(tl.int64) * sx_h + n.to(tl.int64)[:, None] * sx_c
                + d[None, :] * sx_d, mask=ok, other=0.0)
    x = x.to(tl.float32)
    NGR = (C + GS - 1) // GS
    srow = (bh.to(tl.int64) * NGR + g) * HEAD_DIM + d
    if FMT == 4:
        amax = tl.max(tl.where(ok, tl.abs(x), 0.0), 0)
        s = _f16_round(tl.div_rn(amax, 448.0), True)
        s = tl.where(gvalid, s, 0.0)
        z = s * 0.0
    else:
        mn = tl.min(tl.where(ok, x, float("inf")), 0)
        mx = tl.max(tl.where(ok, x, float("-inf")), 0)
        mn = tl.where(gvalid, mn, 0.0)
        mn = tl.where(mn == 0.0, 0.0, mn)
        mx = tl.where(gvalid, mx, 0.0)
        mx = tl.where(mx == 0.0, 0.0, mx)
        z = tl.where(gvalid, _f16_round(mn, False), 0.0)
        s = tl.where(gvalid, _f16_round(tl.div_rn(mx - z, QMAX), True), 0.0)
        tl.store(ZERO + srow, z.to(tl.float16), mask=dok)
    tl.store(SCALE + srow, s.to(tl.float16), mask=dok)
    codes = _codes(x, tl.broadcast_to(s[None, :], (BLOCK_G, BLOCK_D)), tl.broadcast_to(z[None, :], (BLOCK_G, BLOCK_D)),
                   FMT, QMAX)
    codes = tl.where(ok, codes, 0)
    _store_packed(OUT + bh.to(tl.int64) * C * W, n, in_c, codes, W, BLOCK_D, FMT)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _plan(x: torch.Tensor, length: torch.Tensor, fmt: str, group_size: int, axis: str, name: str):
    """Validate like ``cache.quant.quantize_tensor`` and return the launch arguments (no launch)."""
    from ..cache.quant import _check_group_size, fp8_available
    if fmt not in _FMT:
        raise ValueError(f"format for {name} must be one of {tuple(_FMT)}, got {fmt!r}")
    if axis not in K_AXES:
        raise ValueError(f"axis for {name} must be one of {K_AXES}, got {axis!r}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 4:
        raise TypeError(f"{name} must be a floating tensor [B, H, C, D]")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{name} must be float16/bfloat16/float32 for the triton packer, got {x.dtype}")
    B, H, C, D = x.shape
    _check_group_size(group_size, D, axis)
    if fmt == FP8_FORMAT and not fp8_available():
        raise ValueError("format 'fp8' needs torch.float8_e4m3fn, which this torch build lacks")
    if not isinstance(length, torch.Tensor) or tuple(length.shape) != (B, H) or length.is_floating_point():
        raise ValueError(f"length must be an integer tensor [B, H]={(B, H)}")
    bits = 8 if fmt == FP8_FORMAT else INT_FORMATS[fmt]
    W = math.ceil(D * bits / 8)
    dev = x.device
    out = torch.zeros((B, H, C, W), dtype=torch.uint8, device=dev)
    sshape = (B, H, C, D // group_size) if axis == "token" else (B, H, math.ceil(C / group_size), D)
    scale = torch.zeros(sshape, dtype=torch.float16, device=dev)
    zero = None if fmt == FP8_FORMAT else torch.zeros(sshape, dtype=torch.float16, device=dev)
    args = dict(X=x, sx_b=x.stride(0), sx_h=x.stride(1), sx_c=x.stride(2), sx_d=x.stride(3),
                LEN=length.to(device=dev, dtype=torch.int32).contiguous(), C=C, OUT=out, SCALE=scale,
                ZERO=zero if zero is not None else scale)
    consts = dict(H=H, HEAD_DIM=D, BLOCK_D=max(16, _next_pow2(D)), GS=group_size, FMT=_FMT[fmt],
                  QMAX=float(2 ** bits - 1), W=W)
    if axis == "token":
        consts["BLOCK_N"] = 16
    else:
        consts["BLOCK_G"] = max(16, _next_pow2(group_size))
    grid, args["num_blocks"] = pack_grid(B, H, C, 16 if axis == "token" else group_size)
    return args, consts, grid, (out, scale, zero)


def pack_grid(batch: int, heads: int, capacity: int, entries_per_program: int):
    """Packer grid ``(num_blocks * B * H,)`` and ``num_blocks``: one axis, whose limit is 2^31 - 1."""
    blocks = max(1, triton.cdiv(capacity, entries_per_program))
    return (blocks * batch * heads,), blocks


def quantize_pack(x: torch.Tensor, length: torch.Tensor, fmt: str, group_size: int, axis: str = "token",
                  name: str = "x") -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Triton twin of ``cache.quant.quantize_tensor``: quantize ``x [B, H, C, D]`` (fp16/bf16/fp32) with valid
    lengths ``length [B, H]`` into ``(packed uint8 [B, H, C, W], scale fp16, zero fp16 or None for fp8)``, scale/zero
    ``[B, H, C, D // G]`` (token axis) or ``[B, H, ceil(C / G), D]`` (channel axis). Bit-exact with the reference;
    raises ``ValueError`` exactly where it does (non-finite valid values, ranges that do not fit float16)."""
    args, consts, grid, (out, scale, zero) = _plan(x, length, fmt, group_size, axis, name)
    B, H, C, D = x.shape
    if x.numel():
        valid = torch.arange(C, device=x.device) < args["LEN"].to(torch.int64)[..., None]
        if not bool(torch.isfinite(x[valid].float()).all()):
            raise ValueError(f"{name} has NaN or infinite values among its valid entries; they cannot be quantized")
        kernel = quantize_pack_token_kernel if axis == "token" else quantize_pack_channel_kernel
        with device_guard(x):
            kernel[grid](**args, **consts, num_warps=4)
        bad = ~torch.isfinite(scale.float())
        if zero is not None:
            bad |= ~torch.isfinite(zero.float())
        if bool(bad.any()):
            raise ValueError(f"{name}: a quantisation group's range does not fit float16 scale/zero (values must lie "
                             f"within +-65504 and the group's range / qmax must be representable); rescale the "
                             f"input or use format 'float'")
    return out, scale, zero


def quantize_cache(cache: KVCache, k_format: str, v_format: str, group_size: int, k_axis: str = "token") -> KVCache:
    """Triton twin of ``cache.quant.quantize_cache`` (same arguments, same validated result, bit for bit)."""
    check_quantize_cache_args(cache, k_format, v_format, k_axis)
    return quantize_cache_sides(cache, k_format, v_format, group_size, k_axis, quantize_pack)


def aot_specs():
    """Token- and channel-axis packers for every format on fp16 input, D = 128 (see ``aot.py``)."""
    from .aot import AotSpec
    specs = []
    for fmt, axis, gs in (("int8", "token", 128), ("fp8", "token", 128), ("int4", "channel", 32),
                          ("int2", "channel", 32), ("int4", "token", 32), ("int2", "token", 32)):
        x = torch.zeros(1, 2, 64, 128, dtype=torch.float16)
        length = torch.full((1, 2), 64, dtype=torch.int32)
        args, consts, grid, _ = _plan(x, length, fmt, gs, axis, "x")
        kernel = quantize_pack_token_kernel if axis == "token" else quantize_pack_channel_kernel
        specs.append(AotSpec.from_args(f"quantize_pack/{fmt}_{axis}", kernel, args, consts, num_warps=4,
                                       mma_expected=False, note=f"group {gs}"))
    return specs
