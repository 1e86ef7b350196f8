"""An independent scalar NumPy dequantizer of the compressed-cache storage contract (malloc_kernels/cache/quant.py
module docstring), written from the contract's text, element by element, sharing no code with the library:

* packing: 8-bit one code per byte; 4-bit element ``2i`` in the low nibble of byte ``i``, ``2i + 1`` in the high
  nibble; 2-bit element ``4i + r`` in bits ``2r .. 2r + 1`` of byte ``i``;
* groups: ``"token"`` axis -- (scale, zero) at ``[b, h, j, d // G]``; ``"channel"`` axis -- at ``[b, h, j // G, d]``;
* values: ``code * scale + zero`` (int formats), ``e4m3fn(code) * scale`` (fp8, decoded from its bits here),
  evaluated in float64; padding entries ``j >= length[b, h]`` are 0.

Tests compare the library's ``dequantize`` and the reference attention against it, so a bug shared by the library's
dequantizer and the helpers it uses (``_expand``, ``unpack_codes``) cannot hide.
"""
import math

import numpy as np

BITS = {"int8": 8, "int4": 4, "int2": 2, "fp8": 8}


def e4m3fn_value(byte: int) -> float:
    """The float an e4m3fn byte encodes: 1 sign, 4 exponent (bias 7), 3 mantissa bits; exponent 0 is subnormal;
    0x7f / 0xff are NaN (no infinities)."""
    sign = -1.0 if byte & 0x80 else 1.0
    exp, man = (byte >> 3) & 0xF, byte & 0x7
    if exp == 0xF and man == 0x7:
        return math.nan
    if exp == 0:
        return sign * (man / 8.0) * 2.0 ** -6
    return sign * (1.0 + man / 8.0) * 2.0 ** (exp - 7)


def code_at(row: np.ndarray, d: int, bits: int) -> int:
    """Code of element ``d`` in one packed row (uint8)."""
    per = 8 // bits
    byte = int(row[d // per])
    return (byte >> (bits * (d % per))) & ((1 << bits) - 1)


def dequantize(packed, scale, zero, length, fmt: str, group_size: int, axis: str, head_dim: int) -> np.ndarray:
    """float64 ``[B, H, C, head_dim]`` from torch or numpy tensors of one quantized side of a cache."""
    packed, scale, length = (np.asarray(t) for t in (packed, scale, length))
    zero = None if zero is None else np.asarray(zero)
    B, H, C = packed.shape[:3]
    out = np.zeros((B, H, C, head_dim), dtype=np.float64)
    bits = BITS[fmt]
    for b in range(B):
        for h in range(H):
            for j in range(int(length[b, h])):
                for d in range(head_dim):
                    g = (b, h, j, d // group_size) if axis == "token" else (b, h, j // group_size, d)
                    s = float(scale[g])
                    code = code_at(packed[b, h, j], d, bits)
                    if fmt == "fp8":
                        out[b, h, j, d] = e4m3fn_value(code) * s
                    else:
                        out[b, h, j, d] = code * s + float(zero[g])
    return out


def dequantize_cache(cache):
    """(k, v) float64 numpy arrays of a quantized ``KVCache`` (float sides are returned as they are)."""
    sides = []
    for name, fmt in (("k", cache.k_format), ("v", cache.v_format)):
        t = getattr(cache, name)
        if fmt == "float":
            sides.append(t.double().numpy())
            continue
        axis = cache.k_axis if name == "k" else "token"
        sc = getattr(cache, f"{name}_scale").float().numpy()
        zr = getattr(cache, f"{name}_zero")
        sides.append(dequantize(t.numpy(), sc, None if zr is None else zr.float().numpy(), cache.length.numpy(), fmt,
                                cache.group_size, axis, cache.head_dim))
    return sides
