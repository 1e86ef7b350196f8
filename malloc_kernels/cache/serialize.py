"""Lossless per-user serialisation of a ``KVCache`` (DESIGN.md section 3: any key-value store can hold a cache).

Wire format, version 1, all integers little-endian::

    header (36 bytes, struct "<4sHHBBBBBBBBIIIQ")
        magic        b"MKKV"
        version      uint16 (= 1)
        flags        uint16  bit0 timestamp, bit1 count, bit2 residual, bit3 residual count
        k_format, v_format, k_axis            uint8 codes (_FORMAT_CODES, _AXIS_CODES)
        k_dtype, v_dtype, rk_dtype, rv_dtype  uint8 codes (_DTYPE_CODES; 0 = absent)
        reserved     uint8 (= 0)
        num_kv_heads, head_dim, group_size    uint32
        total_size   uint64  (the whole blob, CRC included)
    body: one segment (main), then the residual segment when flag bit2 is set; a segment is
        length int32 [Hkv], original_length int32 [1],
        k rows, k_scale, k_zero, v rows, v_scale, v_zero   (scales/zeros only for quantized payloads),
        position int32, timestamp int64 (if flagged), count float32 (if flagged)
      where every per-entry array holds, head after head, the first ``length[h]`` rows of that head, and
      channel-axis key scales hold the first ``ceil(length[h] / group_size)`` groups of each head;
    crc32 uint32 (zlib.crc32 of every preceding byte).

So ``len(to_bytes(b)) == cache.nbytes_per_user()[b] + FRAMING_BYTES`` (header + CRC = 40 bytes) exactly.
``meta`` (a host-side annotation dict) is not serialised. Tensor bytes are the tensors' own bit patterns, so the
round trip is bit-exact (NaN payloads included); the host must be little-endian, as torch's x86/ARM builds are.
"""
from __future__ import annotations

import struct
import sys
import zlib
from typing import List, Optional

import torch

from .types import FLOAT_FORMAT, FP8_FORMAT, KVCache, packed_width

MAGIC = b"MKKV"
VERSION = 1
_HEADER = struct.Struct("<4sHHBBBBBBBBIIIQ")
HEADER_BYTES = _HEADER.size
CRC_BYTES = 4
FRAMING_BYTES = HEADER_BYTES + CRC_BYTES

_FLAG_TIMESTAMP, _FLAG_COUNT, _FLAG_RESIDUAL, _FLAG_RESIDUAL_COUNT = 1, 2, 4, 8
# Explicit wire codes (never derived from tuple order elsewhere, so the format cannot drift silently).
_FORMAT_CODES = {"float": 0, "int8": 1, "int4": 2, "int2": 3, "fp8": 4}
_AXIS_CODES = {"token": 0, "channel": 1}
_DTYPE_CODES = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3, torch.float64: 4, torch.uint8: 5}
_FORMAT_NAMES = {v: k for k, v in _FORMAT_CODES.items()}
_AXIS_NAMES = {v: k for k, v in _AXIS_CODES.items()}
_DTYPE_NAMES = {v: k for k, v in _DTYPE_CODES.items()}


def _check_host():
    if sys.byteorder != "little":
        raise RuntimeError("cache serialisation stores tensors' native bytes and needs a little-endian host")


def _to_bytes(t: torch.Tensor) -> bytes:
    # a uint8 view of the contiguous tensor is its exact bit pattern (works for bf16 and fp8 too)
    if t.numel() == 0:
        return b""
    # contiguous_format also normalises the stride of size-1 dims (a 1-element slice of a strided tensor keeps
    # its stride through .contiguous(), and the uint8 view then refuses it)
    flat = t.detach().cpu().reshape(-1).clone(memory_format=torch.contiguous_format)
    return flat.view(torch.uint8).numpy().tobytes()


def _dtype_code(t: Optional[torch.Tensor]) -> int:
    if t is None:
        return 0
    if t.dtype not in _DTYPE_CODES:
        raise ValueError(f"cannot serialise cache tensors of dtype {t.dtype}")
    return _DTYPE_CODES[t.dtype]


def _segment_parts(seg: KVCache, u: int, quant: bool) -> List[bytes]:
    """The byte chunks of one segment of user ``u`` in wire order."""
    L = seg.length[u].to(torch.int64).cpu()                                     # [H]
    C = seg.capacity
    valid = torch.arange(C) < L[:, None]                                        # [H, C]

    def rows(t):
        return _to_bytes(t[u].detach().cpu()[valid])

    parts = [_to_bytes(seg.length[u].to(torch.int32)), _to_bytes(seg.original_length[u:u + 1].to(torch.int32))]
    for name in ("k", "v"):
        parts.append(rows(getattr(seg, name)))
        fmt = getattr(seg, f"{name}_format")
        if quant and fmt != FLOAT_FORMAT:
            if name == "k" and seg.k_axis == "channel":
                G = seg.group_size
                ng = seg.num_groups("k")
                gvalid = torch.arange(ng) * G < L[:, None]                      # [H, ng]

                def sel(t):
                    return _to_bytes(t[u].detach().cpu()[gvalid])
            else:
                sel = rows
            parts.append(sel(getattr(seg, f"{name}_scale")))
            if fmt != FP8_FORMAT:
                parts.append(sel(getattr(seg, f"{name}_zero")))
    parts.append(rows(seg.position))
    if seg.timestamp is not None:
        parts.append(rows(seg.timestamp))
    if seg.count is not None:
        parts.append(rows(seg.count))
    return parts


def cache_to_bytes(cache: KVCache, user_index: int) -> bytes:
    """Serialise user ``user_index`` of ``cache`` (valid entries only) to the version-1 wire format above."""
    _check_host()
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}")
    if isinstance(user_index, bool) or not isinstance(user_index, int):
        raise TypeError(f"user_index must be an int, got {type(user_index).__name__}")
    cache.validate()
    B = cache.batch_size
    if not 0 <= user_index < B:
        raise ValueError(f"user_index must be in [0, {B}), got {user_index}")
    r = cache.residual
    flags = ((_FLAG_TIMESTAMP if cache.timestamp is not None else 0) | (_FLAG_COUNT if cache.count is not None else 0)
             | (_FLAG_RESIDUAL if r is not None else 0)
             | (_FLAG_RESIDUAL_COUNT if (r is not None and r.count is not None) else 0))
    body = _segment_parts(cache, user_index, quant=True)
    if r is not None:
        body += _segment_parts(r, user_index, quant=False)
    total = FRAMING_BYTES + sum(len(p) for p in body)
    header = _HEADER.pack(MAGIC, VERSION, flags, _FORMAT_CODES[cache.k_format], _FORMAT_CODES[cache.v_format],
                          _AXIS_CODES[cache.k_axis], _dtype_code(cache.k), _dtype_code(cache.v),
                          _dtype_code(None if r is None else r.k), _dtype_code(None if r is None else r.v), 0,
                          cache.num_kv_heads, cache.head_dim, cache.group_size, total)
    blob = b"".join([header] + body)
    return blob + struct.pack("<I", zlib.crc32(blob) & 0xFFFFFFFF)


class _Reader:
    def __init__(self, data: bytes, start: int, end: int):
        self.data, self.pos, self.end = data, start, end

    def take(self, n_elems: int, dtype: torch.dtype, what: str) -> torch.Tensor:
        n = n_elems * torch.empty((), dtype=dtype).element_size()
        if self.pos + n > self.end:
            raise ValueError(f"cache bytes are inconsistent: {what} runs past the end of the payload")
        chunk = bytearray(self.data[self.pos:self.pos + n])
        self.pos += n
        if n == 0:
            return torch.empty(0, dtype=dtype)
        return torch.frombuffer(chunk, dtype=torch.uint8).view(dtype)


def _scatter(flat: torch.Tensor, mask: torch.Tensor, tail) -> torch.Tensor:
    """Place ``flat [mask.sum(), *tail]`` into zeros ``[1, *mask.shape, *tail]`` at ``mask``."""
    out = torch.zeros(tuple(mask.shape) + tuple(tail), dtype=flat.dtype)
    out[mask] = flat.reshape((-1,) + tuple(tail))
    return out[None]


def _read_segment(rd: _Reader, H: int, D: int, G: int, k_fmt: str, v_fmt: str, k_axis: str,
                  k_dtype, v_dtype, has_ts: bool, has_count: bool, name: str) -> KVCache:
    length = rd.take(H, torch.int32, f"{name} length").clone()
    if length.numel() and int(length.min()) < 0:
        raise ValueError(f"cache bytes are inconsistent: negative {name} length {length.tolist()}")
    original_length = rd.take(1, torch.int32, f"{name} original_length").clone()
    L = length.to(torch.int64)
    C = int(L.max()) if H else 0
    valid = torch.arange(C) < L[:, None]
    n = int(L.sum())
    fields = {}
    for which, fmt, dtype in (("k", k_fmt, k_dtype), ("v", v_fmt, v_dtype)):
        width = D if fmt == FLOAT_FORMAT else packed_width(D, fmt)
        fields[which] = _scatter(rd.take(n * width, dtype, f"{name} {which}"), valid, (width,))
        if fmt != FLOAT_FORMAT:
            if which == "k" and k_axis == "channel":
                ng = -(-C // G)
                mask = torch.arange(ng) * G < L[:, None]
                tail = (D,)
            else:
                mask, tail = valid, (D // G,)
            m = int(mask.sum()) * tail[0]
            fields[f"{which}_scale"] = _scatter(rd.take(m, torch.float16, f"{name} {which}_scale"), mask, tail)
            if fmt != FP8_FORMAT:
                fields[f"{which}_zero"] = _scatter(rd.take(m, torch.float16, f"{name} {which}_zero"), mask, tail)
    fields["position"] = _scatter(rd.take(n, torch.int32, f"{name} position"), valid, ())
    if has_ts:
        fields["timestamp"] = _scatter(rd.take(n, torch.int64, f"{name} timestamp"), valid, ())
    if has_count:
        fields["count"] = _scatter(rd.take(n, torch.float32, f"{name} count"), valid, ())
    return KVCache(length=length[None].contiguous(), original_length=original_length, head_dim=D,
                   k_format=k_fmt, v_format=v_fmt, k_axis=k_axis, group_size=G, **fields)


def cache_from_bytes(b, device=None) -> KVCache:
    """Rebuild a one-user ``KVCache`` (B = 1) from ``KVCache.to_bytes`` output.

    The capacity is the user's largest per-head length (the residual's likewise); padding is rebuilt as zeros.
    Raises ``ValueError`` for truncated, corrupt (CRC mismatch), foreign (wrong magic) or unsupported-version
    input. ``device``: where to place the tensors (default CPU).
    """
    _check_host()
    if isinstance(b, (bytearray, memoryview)):
        b = bytes(b)
    if not isinstance(b, bytes):
        raise TypeError(f"b must be bytes, got {type(b).__name__}")
    if len(b) < FRAMING_BYTES:
        raise ValueError(f"cache bytes truncated: {len(b)} bytes, a cache needs at least {FRAMING_BYTES}")
    (magic, version, flags, kf, vf, ax, kd, vd, rkd, rvd, reserved, H, D, G, total) = _HEADER.unpack_from(b, 0)
    if magic != MAGIC:
        raise ValueError(f"not a malloc_kernels cache: magic {magic!r} != {MAGIC!r}")
    if version != VERSION:
        raise ValueError(f"unsupported cache serialisation version {version} (this build reads version {VERSION})")
    if len(b) < total:
        raise ValueError(f"cache bytes truncated: got {len(b)} bytes, header says {total}")
    if len(b) > total:
        raise ValueError(f"cache bytes have {len(b) - total} trailing bytes after the {total}-byte cache")
    crc = struct.unpack_from("<I", b, total - CRC_BYTES)[0]
    if zlib.crc32(b[:total - CRC_BYTES]) & 0xFFFFFFFF != crc:
        raise ValueError("cache bytes are corrupt: CRC32 mismatch")
    if (kf not in _FORMAT_NAMES or vf not in _FORMAT_NAMES or ax not in _AXIS_NAMES or reserved != 0
            or flags >= 16 or D <= 0):
        raise ValueError("cache bytes are inconsistent: invalid header fields")
    k_fmt, v_fmt, k_axis = _FORMAT_NAMES[kf], _FORMAT_NAMES[vf], _AXIS_NAMES[ax]
    quantized = k_fmt != FLOAT_FORMAT or v_fmt != FLOAT_FORMAT
    if quantized and G <= 0:
        raise ValueError("cache bytes are inconsistent: quantized payload with group_size 0")
    try:
        k_dtype, v_dtype = _DTYPE_NAMES[kd], _DTYPE_NAMES[vd]
        has_res = bool(flags & _FLAG_RESIDUAL)
        rk_dtype = _DTYPE_NAMES[rkd] if has_res else None
        rv_dtype = _DTYPE_NAMES[rvd] if has_res else None
    except KeyError:
        raise ValueError("cache bytes are inconsistent: unknown dtype code") from None
    for fmt, dt, side in ((k_fmt, k_dtype, "k"), (v_fmt, v_dtype, "v"), (FLOAT_FORMAT, rk_dtype, "residual k"),
                          (FLOAT_FORMAT, rv_dtype, "residual v")):
        if dt is not None and (dt == torch.uint8) != (fmt != FLOAT_FORMAT):
            raise ValueError(f"cache bytes are inconsistent: {side} dtype {dt} does not match format {fmt!r}")
    has_ts = bool(flags & _FLAG_TIMESTAMP)
    rd = _Reader(b, HEADER_BYTES, total - CRC_BYTES)
    cache = _read_segment(rd, H, D, G, k_fmt, v_fmt, k_axis, k_dtype, v_dtype, has_ts, bool(flags & _FLAG_COUNT),
                          "cache")
    if has_res:
        res = _read_segment(rd, H, D, 0, FLOAT_FORMAT, FLOAT_FORMAT, "token", rk_dtype, rv_dtype, has_ts,
                            bool(flags & _FLAG_RESIDUAL_COUNT), "residual")
        cache = cache.replace(residual=res)
    if rd.pos != rd.end:
        raise ValueError(f"cache bytes are inconsistent: {rd.end - rd.pos} unread payload bytes")
    if device is not None:
        cache = _to_device(cache, torch.device(device))
    return cache.validate()


def _to_device(cache: KVCache, device: torch.device) -> KVCache:
    changes = {}
    for f in KVCache._TENSOR_FIELDS:
        t = getattr(cache, f)
        if isinstance(t, torch.Tensor):
            changes[f] = t.to(device)
        elif isinstance(t, KVCache):
            changes[f] = _to_device(t, device)
    return cache.replace(**changes)
