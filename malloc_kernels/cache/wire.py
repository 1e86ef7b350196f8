"""The per-user wire format of a ``KVCache`` and its encoder (any key-value store can hold a cache;
ARCHITECTURE.md, "Cache storage"). The decoder, ``cache_from_bytes``, is ``serialize.py``.

Wire format, version 1, all integers little-endian::

    header (36 bytes, struct "<4sHHBBBBBBBBIIIQ")
        magic        b"MKKV"
        version      uint16 (= 1)
        flags        uint16  bit0 timestamp, bit1 count, bit2 residual, bit3 residual count
        k_format, v_format, k_axis            uint8 codes (the format table's codes, _AXIS_CODES)
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
from typing import List, Optional

import torch

from ..core import formats, framing
from ..core.formats import FLOAT_FORMAT
from ..core.kvcache import KVCacheBase

MAGIC = b"MKKV"
VERSION = 1
_HEADER = struct.Struct("<4sHHBBBBBBBBIIIQ")
HEADER_BYTES = _HEADER.size
CRC_BYTES = 4
FRAMING_BYTES = HEADER_BYTES + CRC_BYTES

_FLAG_TIMESTAMP, _FLAG_COUNT, _FLAG_RESIDUAL, _FLAG_RESIDUAL_COUNT = 1, 2, 4, 8
# Wire codes of the payload formats: the format table's codes (core/formats.py), which are append-only, so blobs
# written before a format was added read back unchanged (tests/fixtures holds blobs from before the table).
_FORMAT_CODES = {f.name: f.code for f in formats.TABLE}
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


def _segment_parts(seg: KVCacheBase, u: int, quant: bool) -> List[bytes]:
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
            if formats.get(fmt).has_zero:
                parts.append(sel(getattr(seg, f"{name}_zero")))
    parts.append(rows(seg.position))
    if seg.timestamp is not None:
        parts.append(rows(seg.timestamp))
    if seg.count is not None:
        parts.append(rows(seg.count))
    return parts


def cache_to_bytes(cache: KVCacheBase, user_index: int) -> bytes:
    """Serialise user ``user_index`` of ``cache`` (valid entries only) to the version-1 wire format above."""
    _check_host()
    if not isinstance(cache, KVCacheBase):
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
    return framing.seal(blob)


