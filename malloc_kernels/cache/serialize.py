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

from .types import FLOAT_FORMAT, FP8_FORMAT, INT_FORMATS, KVCache, packed_width

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
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()


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


# Bounds of the reader (a blob comes from a store other processes write, so every size in it is hostile until
# checked): the rebuilt padded cache may take at most MAX_EXPANSION times the blob's own bytes (per-head lengths
# more unequal than that are refused before anything is allocated; any cache with at most 32 kv heads fits), and
# the head dim is at most MAX_HEAD_DIM.
MAX_EXPANSION = 32
MAX_HEAD_DIM = 1 << 16
_ELEM_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2, torch.float64: 8, torch.uint8: 1,
               torch.int32: 4, torch.int64: 8}


def _bad(field: str, why: str) -> ValueError:
    return ValueError(f"cache bytes are inconsistent: {field} {why}")


class _Segment:
    """The layout of one segment computed from its lengths alone (plain ints: nothing allocated yet)."""

    def __init__(self, data: bytes, pos: int, end: int, H: int, D: int, G: int, k_fmt: str, v_fmt: str,
                 k_axis: str, k_dtype, v_dtype, has_ts: bool, has_count: bool, name: str):
        self.name, self.start = name, pos
        if pos + 4 * H + 4 > end:
            raise _bad(f"{name} length", f"needs {4 * H + 4} bytes for {H} heads, {max(end - pos, 0)} remain")
        self.length = list(struct.unpack_from(f"<{H}i", data, pos))
        self.original_length = struct.unpack_from("<i", data, pos + 4 * H)[0]
        if min(self.length) < 0:
            raise _bad(f"{name} length", f"has a negative entry {min(self.length)}")
        if self.original_length < 0:
            raise _bad(f"{name} original_length", f"is negative ({self.original_length})")
        self.n = sum(self.length)
        self.C = max(self.length)
        self.fields = []                                   # (field name, elements per unit, dtype, units, padded units)
        for which, fmt, dtype in (("k", k_fmt, k_dtype), ("v", v_fmt, v_dtype)):
            width = D if fmt == FLOAT_FORMAT else packed_width(D, fmt)
            self.fields.append((which, width, dtype, self.n, H * self.C, "row"))
            if fmt != FLOAT_FORMAT:
                if which == "k" and k_axis == "channel":
                    units = sum(-(-L // G) for L in self.length)
                    padded, kind, per = H * -(-self.C // G), "group", D
                else:
                    units, padded, kind, per = self.n, H * self.C, "row", D // G
                names = [f"{which}_scale"] + ([f"{which}_zero"] if fmt != FP8_FORMAT else [])
                self.fields += [(f, per, torch.float16, units, padded, kind) for f in names]
        self.fields.append(("position", 1, torch.int32, self.n, H * self.C, "row"))
        if has_ts:
            self.fields.append(("timestamp", 1, torch.int64, self.n, H * self.C, "row"))
        if has_count:
            self.fields.append(("count", 1, torch.float32, self.n, H * self.C, "row"))
        self.nbytes = 4 * H + 4 + sum(per * units * _ELEM_BYTES[dt] for _, per, dt, units, _, _ in self.fields)
        self.padded_bytes = sum(per * padded * _ELEM_BYTES[dt] for _, per, dt, _, padded, _ in self.fields)
        if pos + self.nbytes > end:
            raise _bad(f"{name} length", f"claims {self.n} entries ({self.nbytes} bytes), only {end - pos} "
                       f"bytes remain")

    def read(self, data: bytes, H: int, D: int, G: int, k_fmt: str, v_fmt: str, k_axis: str) -> KVCache:
        L = torch.tensor(self.length, dtype=torch.int64)
        valid = torch.arange(self.C) < L[:, None]                                       # [H, C]
        pos = self.start + 4 * H + 4
        out = {}
        for f, per, dtype, units, _, kind in self.fields:
            nb = per * units * _ELEM_BYTES[dtype]
            if kind == "group":
                mask = torch.arange(-(-self.C // G)) * G < L[:, None]                    # [H, ceil(C / G)]
            else:
                mask = valid
            tail = (per,) if f not in ("position", "timestamp", "count") else ()
            flat = torch.frombuffer(bytearray(data[pos:pos + nb]), dtype=torch.uint8).view(dtype) if nb else \
                torch.empty(0, dtype=dtype)
            padded = torch.zeros(tuple(mask.shape) + tail, dtype=dtype)
            padded[mask] = flat.reshape((-1,) + tail)
            out[f] = padded[None]
            pos += nb
        _check_unused_bits(out, k_fmt, v_fmt, D, self.name)
        return KVCache(length=torch.tensor([self.length], dtype=torch.int32),
                       original_length=torch.tensor([self.original_length], dtype=torch.int32), head_dim=D,
                       k_format=k_fmt, v_format=v_fmt, k_axis=k_axis, group_size=G, **out)


def _check_unused_bits(fields, k_fmt, v_fmt, D, name):
    """Packed 4-/2-bit rows of odd length leave the high bits of their last byte zero (the storage contract)."""
    for which, fmt in (("k", k_fmt), ("v", v_fmt)):
        bits = INT_FORMATS.get(fmt)
        if bits is None or (D * bits) % 8 == 0:
            continue
        used = (D * bits) % 8
        if bool((fields[which][..., -1] >> used).any()):
            raise _bad(f"{name} {which}", f"has non-zero unused high bits in the last byte of a {fmt} row")


def _check_header(flags, kf, vf, ax, kd, vd, rkd, rvd, reserved, H, D, G):
    """Every header field against the format and the others; returns the decoded names and dtypes."""
    if reserved != 0:
        raise _bad("reserved", f"must be 0, got {reserved}")
    if flags >= 16:
        raise _bad("flags", f"has unknown bits set ({flags:#x})")
    has_res = bool(flags & _FLAG_RESIDUAL)
    if flags & _FLAG_RESIDUAL_COUNT and not has_res:
        raise _bad("flags", "set the residual count bit without a residual")
    for field, code, table in (("k_format", kf, _FORMAT_NAMES), ("v_format", vf, _FORMAT_NAMES),
                               ("k_axis", ax, _AXIS_NAMES)):
        if code not in table:
            raise _bad(field, f"has unknown code {code}")
    k_fmt, v_fmt, k_axis = _FORMAT_NAMES[kf], _FORMAT_NAMES[vf], _AXIS_NAMES[ax]
    if H < 1:
        raise _bad("num_kv_heads", f"must be >= 1, got {H}")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise _bad("head_dim", f"must be in [1, {MAX_HEAD_DIM}], got {D}")
    quantized = k_fmt != FLOAT_FORMAT or v_fmt != FLOAT_FORMAT
    if not quantized and G != 0:
        raise _bad("group_size", f"must be 0 for a float cache, got {G}")
    if quantized and G < 1:
        raise _bad("group_size", f"must be >= 1 for a quantized cache, got {G}")
    for which, fmt in (("k", k_fmt), ("v", v_fmt)):
        token_axis = which == "v" or k_axis == "token"
        if fmt != FLOAT_FORMAT and token_axis and (G > D or D % G):
            raise _bad("group_size", f"{G} must divide head_dim {D} ({which} is grouped along channels)")
    dtypes = []
    for field, code, fmt, present in (("k_dtype", kd, k_fmt, True), ("v_dtype", vd, v_fmt, True),
                                      ("residual k_dtype", rkd, FLOAT_FORMAT, has_res),
                                      ("residual v_dtype", rvd, FLOAT_FORMAT, has_res)):
        if not present:
            if code != 0:
                raise _bad(field, f"must be 0 without a residual, got {code}")
            dtypes.append(None)
            continue
        if code not in _DTYPE_NAMES:
            raise _bad(field, f"has unknown code {code}")
        dt = _DTYPE_NAMES[code]
        if (dt == torch.uint8) != (fmt != FLOAT_FORMAT):
            raise _bad(field, f"{dt} does not match format {fmt!r}")
        dtypes.append(dt)
    return k_fmt, v_fmt, k_axis, has_res, dtypes


def cache_from_bytes(b, device=None) -> KVCache:
    """Rebuild a one-user ``KVCache`` (B = 1) from ``KVCache.to_bytes`` output.

    The capacity is the user's largest per-head length (the residual's likewise); padding is rebuilt as zeros.
    The blob is untrusted: every header field is checked against the format and the others, and every size is
    bounded by the blob's own length before anything is allocated (the rebuilt cache takes at most
    ``MAX_EXPANSION`` times the blob). Then ``KVCache.check_contents`` refuses non-finite payloads, scales, zeros
    or counts. Raises ``ValueError`` naming the field for truncated, corrupt (CRC mismatch), foreign (wrong magic),
    unsupported-version or inconsistent input. ``device``: where to place the tensors (default CPU).
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
    if zlib.crc32(memoryview(b)[:total - CRC_BYTES]) & 0xFFFFFFFF != crc:
        raise ValueError("cache bytes are corrupt: CRC32 mismatch")
    k_fmt, v_fmt, k_axis, has_res, (k_dtype, v_dtype, rk_dtype, rv_dtype) = _check_header(
        flags, kf, vf, ax, kd, vd, rkd, rvd, reserved, H, D, G)
    has_ts = bool(flags & _FLAG_TIMESTAMP)
    end = total - CRC_BYTES
    main = _Segment(b, HEADER_BYTES, end, H, D, G, k_fmt, v_fmt, k_axis, k_dtype, v_dtype, has_ts,
                    bool(flags & _FLAG_COUNT), "cache")
    pos = HEADER_BYTES + main.nbytes
    res = None
    if has_res:
        res = _Segment(b, pos, end, H, D, 0, FLOAT_FORMAT, FLOAT_FORMAT, "token", rk_dtype, rv_dtype, has_ts,
                       bool(flags & _FLAG_RESIDUAL_COUNT), "residual")
        pos += res.nbytes
    if pos != end:
        raise _bad("total_size", f"leaves {end - pos} unread payload bytes")
    padded = main.padded_bytes + (res.padded_bytes if res is not None else 0)
    if padded > MAX_EXPANSION * len(b):
        raise _bad("length", f"per-head lengths (max {main.C}, total {main.n} over {H} heads) would rebuild a "
                   f"{padded}-byte padded cache from a {len(b)}-byte blob (more than {MAX_EXPANSION}x)")
    cache = main.read(b, H, D, G, k_fmt, v_fmt, k_axis)
    if res is not None:
        cache = cache.replace(residual=res.read(b, H, D, 0, FLOAT_FORMAT, FLOAT_FORMAT, "token"))
    if device is not None:
        cache = _to_device(cache, torch.device(device))
    return cache.validate().check_contents()


def _to_device(cache: KVCache, device: torch.device) -> KVCache:
    changes = {}
    for f in KVCache._TENSOR_FIELDS:
        t = getattr(cache, f)
        if isinstance(t, torch.Tensor):
            changes[f] = t.to(device)
        elif isinstance(t, KVCache):
            changes[f] = _to_device(t, device)
    return cache.replace(**changes)
