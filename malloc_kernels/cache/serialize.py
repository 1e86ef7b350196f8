"""``cache_from_bytes``: rebuild a one-user ``KVCache`` from the wire format of ``wire.py`` (which documents it and
holds the encoder, ``KVCache.to_bytes``)."""
from __future__ import annotations

import struct
import zlib

import torch

from ..core.formats import FLOAT_FORMAT, FP8_FORMAT, packed_width
from .types import KVCache
from .wire import (_AXIS_NAMES, _DTYPE_NAMES, _FLAG_COUNT, _FLAG_RESIDUAL, _FLAG_RESIDUAL_COUNT, _FLAG_TIMESTAMP,  # noqa: F401
                   _FORMAT_NAMES, _HEADER, CRC_BYTES, FRAMING_BYTES, HEADER_BYTES, MAGIC, VERSION, _check_host,
                   cache_to_bytes)


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
    return cache.check_contents()


def _to_device(cache: KVCache, device: torch.device) -> KVCache:
    changes = {}
    for f in KVCache._TENSOR_FIELDS:
        t = getattr(cache, f)
        if isinstance(t, torch.Tensor):
            changes[f] = t.to(device)
        elif isinstance(t, KVCache):
            changes[f] = _to_device(t, device)
    return cache.replace(**changes)
