"""PyTorch reference quantizers and packers for the compressed KV cache (ARCHITECTURE.md, "Cache storage").

This module writes and reads exactly the storage contract documented in ``core/kvcache.py``; the C++ packer
(``csrc/cpu/quantize_pack.cpp``) must be bit-exact with it, so every rounding step is spelled out here.

Asymmetric integer formats (``int8``/``int4``/``int2``, ``qmax = 2**bits - 1``), per quantisation group over the
group's VALID entries only (entries ``j < length[b, h]``)::

    mn    = min(x) + 0.0                        # fp32; "+ 0.0" turns -0.0 into +0.0, so the order in which a
    mx    = max(x) + 0.0                        #   reduction meets -0.0/+0.0 ties never shows in zero or scale
    zero  = f16_round_down(mn)                  # largest float16 <= mn
    scale = f16_round_up((mx - float(zero)) / qmax)   # fp32 subtract, fp32 true division, then smallest fp16 >= it
    code  = 0 if scale == 0 else clamp(round_half_even((x - float(zero)) / float(scale)), 0, qmax)   # all fp32
    x_hat = code * scale + zero

FP8 (``fp8``: e4m3fn codes, no zero)::

    scale = f16_round_up(absmax / 448)          # fp32 division
    code  = 0 if scale == 0 else e4m3fn(clamp(x / scale, -448, 448))   # fp32 division, e4m3fn round-to-nearest-even
    x_hat = float(code) * scale

NVFP4 (``nvfp4``: e2m1 codes, one e4m3fn scale per 16 consecutive values along D, keys and values alike, no zero;
the last group of a row holds the ``D % 16`` remaining values when 16 does not divide D)::

    scale = e4m3fn(amax / 6)                    # fp32 division, round to nearest even (torch's cast)
    code  = 0 if scale == 0 else e2m1(x / float(scale))   # fp32 division, then the rule below
    x_hat = e2m1_value(code) * float(scale)

``e2m1`` rounds ``|x / scale|`` to the nearest of ``{0, 0.5, 1, 1.5, 2, 3, 4, 6}``, ties to the even code (the
magnitude code is ``#`` of the thresholds passed: ``> 0.25, >= 0.75, > 1.25, >= 1.75, > 2.5, >= 3.5, > 5``; so
0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4), saturating at 6 (a scale rounded down can
put ``|x / scale|`` slightly above 6); bit 3 is the sign, set only for a negative value with a nonzero magnitude (so
no -0 code is ever written). Groups whose ``amax / 6`` exceeds 448 (the e4m3 maximum; ``amax > 2688``) raise
``ValueError``; a group whose ``amax / 6`` rounds to 0 in e4m3 (``amax <= 6 * 2**-10``) stores scale 0 and codes 0.
Error bound: ``|x - x_hat| <= scale`` (half the widest e2m1 step, 4 -> 6) plus the scale's own rounding.

(The clamp only matters when fp32 rounding makes ``|x / scale|`` exceed 448 by an ulp; torch's cast saturates
there too, so the result equals the plain ``e4m3fn(x / scale)`` cast.) Groups with no valid entry, and every
padding entry, store scale = zero = code = 0, so padding never depends on what the padding held. A group whose
``zero`` or ``scale`` is not a finite float16 (values beyond +-65504, or a range too wide), and any NaN/inf
among the valid values, raises ``ValueError``.

Error bound (why scale/zero are rounded outward): with ``zero <= mn`` and ``scale >= (mx - zero) / qmax`` every
valid ``x`` maps into ``[0, qmax]`` before the clamp, so ``|x - x_hat| <= scale / 2`` up to fp32 rounding of the
code computation. FP8 keeps e4m3's relative error (``2**-4`` of ``|x|`` for normal codes, ``2**-10 * scale``
absolutely in the subnormal range).

Packing (``uint8 [..., ceil(D * bits / 8)]``): 8-bit one code per byte; 4-bit element ``2i`` in the low nibble
of byte ``i``, ``2i + 1`` in the high nibble; 2-bit element ``4i + r`` in bits ``2r .. 2r + 1`` of byte ``i``.
The unused high bits of a partial last byte (odd ``D``) are zero.

Groups (KIVI, Liu et al. 2024, arXiv 2402.02750): ``"token"`` axis -- one (scale, zero) per (entry, group of
``group_size`` consecutive channels); ``"channel"`` axis -- one per (group of ``group_size`` consecutive entries,
channel). Keys may use either axis, values always use ``"token"``.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ..core import formats
from ..core.formats import FLOAT_FORMAT, FP8_FORMAT, FORMATS, INT_FORMATS, K_AXES, NVFP4_FORMAT, format_bits
from ..core.kvcache import KVCacheBase
from ..core.layout import device_assert

FP8_MAX = 448.0
_FP8_DTYPE = getattr(torch, "float8_e4m3fn", None)


def fp8_available() -> bool:
    """Whether this torch has ``float8_e4m3fn`` (needed for the ``"fp8"`` format)."""
    return _FP8_DTYPE is not None


# ---- float16 outward rounding ---------------------------------------------------------------------------------
def f16_round_down(x: torch.Tensor) -> torch.Tensor:
    """Largest float16 value ``<= x`` (elementwise), as a float16 tensor.

    ``x`` is taken in fp32. Values below -65504 give ``-inf``; NaN stays NaN (callers check finiteness).
    """
    x = x.float()
    h = x.to(torch.float16)                         # round-to-nearest-even, may land above x
    above = h.float() > x
    return torch.where(above, torch.nextafter(h, torch.full_like(h, -math.inf)), h)


def f16_round_up(x: torch.Tensor) -> torch.Tensor:
    """Smallest float16 value ``>= x`` (elementwise), as a float16 tensor.

    ``x`` is taken in fp32. Values above 65504 give ``+inf``; NaN stays NaN (callers check finiteness).
    """
    x = x.float()
    h = x.to(torch.float16)
    below = h.float() < x
    return torch.where(below, torch.nextafter(h, torch.full_like(h, math.inf)), h)


# ---- packing --------------------------------------------------------------------------------------------------
def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``uint8 [..., D]`` (each ``< 2**bits``) into ``uint8 [..., ceil(D * bits / 8)]``.

    Little-end first: element ``k * per + r`` of a byte sits in bits ``r * bits .. r * bits + bits - 1`` where
    ``per = 8 // bits``; a partial last byte has zero high bits.
    """
    if bits not in (2, 4, 8):
        raise ValueError(f"bits must be 2, 4 or 8, got {bits!r}")
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    if bits == 8:
        return codes.contiguous()
    per = 8 // bits
    D = codes.shape[-1]
    W = -(-D // per)
    if W * per != D:
        codes = torch.nn.functional.pad(codes, (0, W * per - D))
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
    grouped = codes.reshape(*codes.shape[:-1], W, per).to(torch.int32)
    # the shifted codes occupy disjoint bit ranges, so their sum is their bitwise OR
    return (grouped << shifts).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, head_dim: int) -> torch.Tensor:
    """Inverse of ``pack_codes``: ``uint8 [..., W]`` -> ``uint8 [..., head_dim]``."""
    if bits not in (2, 4, 8):
        raise ValueError(f"bits must be 2, 4 or 8, got {bits!r}")
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be uint8, got {packed.dtype}")
    per = 8 // bits
    if packed.shape[-1] != -(-head_dim // per):
        raise ValueError(f"packed last dim {packed.shape[-1]} does not match head_dim {head_dim} at {bits} bits")
    if bits == 8:
        return packed
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    codes = (packed.to(torch.int32)[..., None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per)[..., :head_dim].to(torch.uint8)


# ---- group views ----------------------------------------------------------------------------------------------
def _valid_entries(length: torch.Tensor, capacity: int) -> torch.Tensor:
    """bool ``[B, H, C]``: entry j of row (b, h) is valid iff ``j < length[b, h]``."""
    return torch.arange(capacity, device=length.device) < length.to(torch.int64)[..., None]


def _grouped(x: torch.Tensor, axis: str, group_size: int) -> torch.Tensor:
    """View ``[B, H, C, D]`` as groups with the reduced axis last-but-not-batch.

    token:   ``[B, H, C, D // G, G]``   (reduce dim -1)
    channel: ``[B, H, ceil(C / G), G, D]`` (reduce dim 3; the entry axis is zero-padded to a multiple of G)
    """
    B, H, C, D = x.shape
    if axis == "token":
        return x.reshape(B, H, C, D // group_size, group_size)
    ng = -(-C // group_size)
    if ng * group_size != C:
        x = torch.nn.functional.pad(x, (0, 0, 0, ng * group_size - C))
    return x.reshape(B, H, ng, group_size, D)


def _reduce_dim(axis: str) -> int:
    return -1 if axis == "token" else 3


def _group_valid(length: torch.Tensor, capacity: int, axis: str, group_size: int) -> torch.Tensor:
    """bool mask of the groups that cover at least one valid entry, shaped like the scale tensor."""
    if axis == "token":
        return _valid_entries(length, capacity)[..., None]                      # [B, H, C, 1]
    ng = -(-capacity // group_size)
    starts = torch.arange(ng, device=length.device) * group_size
    return (starts < length.to(torch.int64)[..., None])[..., None]            # [B, H, ng, 1]


def _expand(stat: torch.Tensor, axis: str, group_size: int, capacity: int) -> torch.Tensor:
    """Broadcast a per-group statistic (scale-shaped) back to ``[B, H, C, D]``."""
    if axis == "token":
        return stat.repeat_interleave(group_size, dim=-1)
    return stat.repeat_interleave(group_size, dim=2)[:, :, :capacity]


def _check_group_size(group_size, head_dim: int, axis: str, name: str = "group_size", fmt: str = "int8") -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"{name} must be a positive int, got {group_size!r}")
    if group_size <= 0:
        raise ValueError(f"{name} must be positive, got {group_size}")
    f = formats.get(fmt)
    if f.group_size is not None and group_size != f.group_size:
        raise ValueError(f"{name} must be {f.group_size} for format {fmt!r}, got {group_size}")
    if axis not in f.k_axes:
        raise ValueError(f"axis {axis!r} is not allowed for format {fmt!r} (allowed: {f.k_axes})")
    if axis == "token" and not f.partial_group and head_dim % group_size:
        raise ValueError(f"{name}={group_size} must divide the head dim {head_dim} for token-axis groups")
    return group_size


# ---- one tensor -----------------------------------------------------------------------------------------------
def check_quantize_args(x, fmt: str, group_size, axis: str, name: str = "x") -> None:
    """The argument checks every packer shares (the data checks -- finiteness, float16 range -- are each
    packer's own): ``x`` floating ``[B, H, C, D]``, a quantized format, a grouping axis, a valid group size."""
    quantized = tuple(f.name for f in formats.TABLE if f.quantized)
    if fmt not in quantized:
        raise ValueError(f"format for {name} must be one of {quantized}, got {fmt!r}")
    if axis not in K_AXES:
        raise ValueError(f"axis for {name} must be one of {K_AXES}, got {axis!r}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 4:
        raise TypeError(f"{name} must be a floating tensor [B, H, C, D]")
    _check_group_size(group_size, x.shape[-1], axis, fmt=fmt)
    if fmt in (FP8_FORMAT, NVFP4_FORMAT) and not fp8_available():
        raise ValueError(f"format {fmt!r} needs torch.float8_e4m3fn, which this torch build lacks")


def quantize_tensor(x: torch.Tensor, length: torch.Tensor, fmt: str, group_size: int, axis: str = "token",
                    name: str = "x") -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Quantize ``x [B, H, C, D]`` (any float dtype, computed in fp32) with per-row valid lengths ``length [B, H]``.

    Returns ``(packed uint8 [B, H, C, W], scale float16, zero float16 or None for fp8)`` with scale/zero shaped
    ``[B, H, C, D // G]`` (token axis) or ``[B, H, ceil(C / G), D]`` (channel axis). ``name`` names the tensor in
    error messages.
    """
    check_quantize_args(x, fmt, group_size, axis, name)
    B, H, C, D = x.shape
    x32 = x.float()
    valid = _valid_entries(length, C)                                           # [B, H, C]
    # device asserts (no host read): the in-place append quantizes inside a captured serving step
    device_assert((torch.isfinite(x32) | ~valid[..., None]).all(),
                  f"{name} has NaN or infinite values among its valid entries; they cannot be quantized")
    if fmt == NVFP4_FORMAT:
        return _quantize_nvfp4(x32, valid, name)
    gvalid = _group_valid(length, C, axis, group_size)
    xg = _grouped(x32, axis, group_size)
    vg = _grouped(valid[..., None].expand(B, H, C, D), axis, group_size)
    red = _reduce_dim(axis)
    ev = valid[..., None]

    if fmt == FP8_FORMAT:
        absmax = torch.where(vg, xg.abs(), torch.zeros((), device=x.device)).amax(dim=red)
        absmax = torch.where(gvalid, absmax, torch.zeros((), device=x.device))
        scale = f16_round_up(absmax / FP8_MAX)
        _check_fits(scale, None, gvalid, name)
        s = _expand(scale.float(), axis, group_size, C)
        q = (x32 / s).clamp(-FP8_MAX, FP8_MAX)
        codes = q.to(_FP8_DTYPE).view(torch.uint8)
        codes = torch.where((s > 0) & ev, codes, torch.zeros((), dtype=torch.uint8, device=x.device))
        return codes.contiguous(), scale, None

    bits = INT_FORMATS[fmt]
    qmax = float(2 ** bits - 1)
    mn = torch.where(vg, xg, torch.full((), math.inf, device=x.device)).amin(dim=red)
    mx = torch.where(vg, xg, torch.full((), -math.inf, device=x.device)).amax(dim=red)
    # + 0.0 maps -0.0 to +0.0 (IEEE round-to-nearest), making zero/scale independent of reduction order
    mn = torch.where(gvalid, mn, torch.zeros((), device=x.device)) + 0.0
    mx = torch.where(gvalid, mx, torch.zeros((), device=x.device)) + 0.0
    zero = f16_round_down(mn)
    scale = f16_round_up((mx - zero.float()) / qmax)
    _check_fits(scale, zero, gvalid, name)
    s = _expand(scale.float(), axis, group_size, C)
    z = _expand(zero.float(), axis, group_size, C)
    q = torch.round((x32 - z) / s).clamp(0.0, qmax)
    q = torch.where((s > 0) & ev, q, torch.zeros((), device=x.device))
    return pack_codes(q.to(torch.uint8), bits), scale, zero


# ---- NVFP4 -----------------------------------------------------------------------------------------------------
_E2M1 = torch.tensor(formats.E2M1_VALUES + tuple(-v for v in formats.E2M1_VALUES), dtype=torch.float64)


def e2m1_encode(q: torch.Tensor) -> torch.Tensor:
    """fp32 ``q`` -> e2m1 codes ``uint8`` (nearest of +-{0, .5, 1, 1.5, 2, 3, 4, 6}, ties to the even code,
    saturating at 6, sign bit 3 only on a nonzero magnitude); see the module docstring."""
    a = q.abs()
    mag = ((a > 0.25).to(torch.uint8) + (a >= 0.75).to(torch.uint8) + (a > 1.25).to(torch.uint8)
           + (a >= 1.75).to(torch.uint8) + (a > 2.5).to(torch.uint8) + (a >= 3.5).to(torch.uint8)
           + (a > 5.0).to(torch.uint8))
    sign = ((q < 0) & (mag > 0)).to(torch.uint8) << 3
    return mag | sign


def e2m1_decode(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """e2m1 codes (any integer tensor, values 0..15) -> their values in ``dtype`` (exact in every float dtype)."""
    return _E2M1.to(device=codes.device, dtype=dtype)[codes.to(torch.int64)]


def _nvfp4_scale_floats(scale: torch.Tensor, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """e4m3fn scale bytes ``[..., ceil(D / 16)]`` -> per-element scales ``[..., D]`` in ``dtype`` (exact)."""
    G = formats.NVFP4.group_size
    s = scale.contiguous().view(_FP8_DTYPE).float().to(dtype)
    return s.repeat_interleave(G, dim=-1)[..., :head_dim]


def _quantize_nvfp4(x32: torch.Tensor, valid: torch.Tensor, name: str):
    """NVFP4 codes and e4m3 scales of fp32 ``x [B, H, C, D]`` (module docstring); padding entries store 0."""
    B, H, C, D = x32.shape
    G = formats.NVFP4.group_size
    ng = -(-D // G)
    xg = torch.nn.functional.pad(x32, (0, ng * G - D)).reshape(B, H, C, ng, G)   # zero padding: amax unchanged
    amax = torch.where(valid[..., None], xg.abs().amax(dim=-1), torch.zeros((), device=x32.device)) + 0.0
    raw = amax / formats.E2M1_MAX
    if raw.numel():
        device_assert(~(raw > formats.E4M3_MAX).any(),
                      f"{name}: a 16-value group's absmax exceeds {formats.E2M1_MAX * formats.E4M3_MAX:g}, beyond "
                      f"what an e4m3 scale (max 448) covers for nvfp4; rescale the input or use another format")
    scale = raw.to(_FP8_DTYPE).view(torch.uint8)
    s = _nvfp4_scale_floats(scale, D, torch.float32)
    q = x32 / torch.where(s > 0, s, torch.ones((), device=x32.device))
    codes = torch.where((s > 0) & valid[..., None], e2m1_encode(q), torch.zeros((), dtype=torch.uint8,
                                                                                 device=x32.device))
    return pack_codes(codes, 4), scale.contiguous(), None


def _check_fits(scale, zero, gvalid, name):
    bad = ~torch.isfinite(scale.float())
    if zero is not None:
        bad |= ~torch.isfinite(zero.float())
    bad &= gvalid.expand_as(bad)
    if bad.numel():
        device_assert(~bad.any(), f"{name}: a quantisation group's range does not fit float16 scale/zero "
                      f"(integer formats need min >= -65504 and (max - zero) / qmax <= 65504, fp8 needs "
                      f"absmax / 448 <= 65504); rescale the input or use format 'float'")


def dequantize_tensor(packed: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], length: torch.Tensor,
                      fmt: str, group_size: int, axis: str, head_dim: int,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x_hat [B, H, C, head_dim]`` in ``dtype``: ``code * scale + zero`` (int) or ``float(code) * scale`` (fp8),
    evaluated in ``dtype``; padding entries (``j >= length``) are exactly 0."""
    B, H, C = packed.shape[:3]
    ev = _valid_entries(length, C)[..., None]
    if fmt == NVFP4_FORMAT:
        if not fp8_available():
            raise ValueError("format 'nvfp4' needs torch.float8_e4m3fn, which this torch build lacks")
        out = e2m1_decode(unpack_codes(packed, 4, head_dim), dtype) * _nvfp4_scale_floats(scale, head_dim, dtype)
    elif fmt == FP8_FORMAT:
        if not fp8_available():
            raise ValueError("format 'fp8' needs torch.float8_e4m3fn, which this torch build lacks")
        s = _expand(scale, axis, group_size, C).to(dtype)
        # e4m3 values are exact in fp32 (and in fp16/bf16/fp64), so the detour through fp32 is lossless
        codes = packed.contiguous().view(_FP8_DTYPE).float().to(dtype)
        out = codes * s
    else:
        s = _expand(scale, axis, group_size, C).to(dtype)
        codes = unpack_codes(packed, INT_FORMATS[fmt], head_dim).to(dtype)
        out = codes * s + _expand(zero, axis, group_size, C).to(dtype)
    return torch.where(ev, out, torch.zeros((), dtype=dtype, device=out.device))


# ---- whole caches ---------------------------------------------------------------------------------------------
def check_quantize_cache_args(cache: KVCacheBase, k_format: str, v_format: str, k_axis: str) -> None:
    """Argument checks shared by every ``quantize_cache`` backend: ``cache`` is a valid full-precision
    cache (``KVCache``), both formats are known and ``k_axis`` is a grouping axis (TypeError/ValueError naming the
    argument otherwise)."""
    if not isinstance(cache, KVCacheBase):
        raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}")
    if cache.is_quantized:
        raise ValueError(f"cache must be a full-precision cache, got formats k={cache.k_format!r}, "
                         f"v={cache.v_format!r}")
    for arg, fmt in (("k_format", k_format), ("v_format", v_format)):
        if fmt not in FORMATS:
            raise ValueError(f"{arg} must be one of {FORMATS}, got {fmt!r}")
    if k_axis not in K_AXES:
        raise ValueError(f"k_axis must be one of {K_AXES}, got {k_axis!r}")
    cache.check_contents()


def quantize_cache_sides(cache: KVCacheBase, k_format: str, v_format: str, group_size: int, k_axis: str,
                         quantize) -> KVCacheBase:
    """The cache with keys and values quantized by ``quantize`` (``quantize_tensor`` or a bit-exact twin with
    its signature) unless their format is ``"float"``; values always use the token axis. Returns a validated
    cache; arguments must already have passed ``check_quantize_cache_args``."""
    changes = dict(k_format=k_format, v_format=v_format, k_axis=k_axis, group_size=group_size)
    if k_format != FLOAT_FORMAT:
        k, ks, kz = quantize(cache.k, cache.length, k_format, group_size, k_axis, name="cache.k")
        changes.update(k=k, k_scale=ks, k_zero=kz)
    if v_format != FLOAT_FORMAT:
        v, vs, vz = quantize(cache.v, cache.length, v_format, group_size, "token", name="cache.v")
        changes.update(v=v, v_scale=vs, v_zero=vz)
    return cache.replace(**changes).validate()


def quantize_cache(cache: KVCacheBase, k_format: str, v_format: str, group_size: int,
                   k_axis: str = "token") -> KVCacheBase:
    """Quantize a full-precision cache into ``k_format`` / ``v_format`` (``"float"`` keeps that side as is).

    ``group_size``: channels per group on the token axis (must divide ``head_dim``), entries per group on the
    channel axis (KIVI keys). ``k_axis``: ``"token"`` or ``"channel"`` for keys; values always use the token axis.
    Lengths, positions, timestamps, counts, ``original_length``, the residual segment and ``meta`` are carried
    unchanged. Returns a validated cache of the input's class.
    """
    check_quantize_cache_args(cache, k_format, v_format, k_axis)
    D = cache.head_dim
    if k_format != FLOAT_FORMAT:
        _check_group_size(group_size, D, k_axis, fmt=k_format)
    if v_format != FLOAT_FORMAT:
        _check_group_size(group_size, D, "token", fmt=v_format)
    if k_format == FLOAT_FORMAT and v_format == FLOAT_FORMAT:
        return cache.replace(k_axis=k_axis, group_size=group_size).validate()
    return quantize_cache_sides(cache, k_format, v_format, group_size, k_axis, quantize_tensor)


def dequantize_cache(cache: KVCacheBase, dtype: Optional[torch.dtype] = None):
    """``(k, v)`` floating ``[B, Hkv, C, D]`` of the main segment (not the residual), zeros on padding.

    ``dtype=None``: float payloads keep their own dtype, quantized payloads come back as float32. Quantized
    payloads are dequantized in ``dtype`` (the oracle passes float64).
    """
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    out = []
    for name in ("k", "v"):
        fmt = getattr(cache, f"{name}_format")
        t = getattr(cache, name)
        if fmt == FLOAT_FORMAT:
            want = t.dtype if dtype is None else dtype
            ev = _valid_entries(cache.length, cache.capacity)[..., None]
            out.append(torch.where(ev, t.to(want), torch.zeros((), dtype=want, device=t.device)))
        else:
            axis = cache.k_axis if name == "k" else "token"
            out.append(dequantize_tensor(t, getattr(cache, f"{name}_scale"), getattr(cache, f"{name}_zero"),
                                         cache.length, fmt, cache.group_size, axis, cache.head_dim,
                                         torch.float32 if dtype is None else dtype))
    return out[0], out[1]


# ---- byte accounting ------------------------------------------------------------------------------------------
def _row_bytes(fmt: str, t: torch.Tensor, head_dim: int) -> int:
    """Bytes of one stored entry's payload row."""
    if fmt == FLOAT_FORMAT:
        return head_dim * t.element_size()
    return math.ceil(head_dim * format_bits(fmt) / 8)


def _scale_bytes(cache: KVCacheBase, which: str, L: torch.Tensor) -> torch.Tensor:
    """Bytes of the scales/zeros covering the first ``L [B, H]`` entries of each row for ``which`` in k/v."""
    fmt = getattr(cache, f"{which}_format")
    if fmt == FLOAT_FORMAT:
        return torch.zeros_like(L)
    f = formats.get(fmt)
    per_group = f.scale_bytes                                                   # scale (+ zero), table's dtype
    D, G = cache.head_dim, cache.group_size
    if which == "k" and cache.k_axis == "channel":
        return (L + G - 1) // G * D * per_group
    return L * f.token_groups(D, G) * per_group


def _segment_bytes(cache: KVCacheBase) -> torch.Tensor:
    """int64 ``[B]``: header fields (lengths, original_length) plus every per-entry byte of one segment."""
    L = cache.length.to(torch.int64)                                            # [B, H]
    H = cache.num_kv_heads
    per_entry = _row_bytes(cache.k_format, cache.k, cache.head_dim) + \
        _row_bytes(cache.v_format, cache.v, cache.head_dim) + 4                 # + int32 position
    if cache.timestamp is not None:
        per_entry += 8
    if cache.count is not None:
        per_entry += 4
    total = L * per_entry + _scale_bytes(cache, "k", L) + _scale_bytes(cache, "v", L)
    return total.sum(dim=1) + 4 * H + 4


def nbytes_per_user(cache: KVCacheBase) -> torch.Tensor:
    """Exact stored bytes per user, int64 ``[B]`` (see ``KVCache.nbytes_per_user`` for the formula)."""
    total = _segment_bytes(cache)
    if cache.residual is not None:
        total = total + _segment_bytes(cache.residual).to(total.device)
    return total


def nbytes_full_precision_per_user(cache: KVCacheBase, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """int64 ``[B]``: bytes of the same users' NATIVE cache (method "none") in ``dtype``.

    That cache keeps all ``original_length[b]`` history entries in every kv head, K and V at ``dtype``'s size,
    int32 positions, int64 timestamps if this cache carries timestamps, no counts, no residual, plus the same
    header fields (``4 * Hkv`` lengths + 4 ``original_length``). It is exactly ``nbytes_per_user()`` of the
    uncompressed cache, so the "ratio to the full-precision cache" of method "none" is 1.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    elem = torch.empty((), dtype=dtype).element_size()
    per_entry = 2 * cache.head_dim * elem + 4 + (8 if cache.timestamp is not None else 0)
    H = cache.num_kv_heads
    return cache.original_length.to(torch.int64) * (H * per_entry) + 4 * H + 4
