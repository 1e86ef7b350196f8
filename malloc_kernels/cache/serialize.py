"""``cache_from_bytes``: rebuild a one-user ``KVCache`` from the wire format of ``wire.py`` (which documents it and
holds the encoder, ``KVCache.to_bytes``)."""
from __future__ import annotations

import struct

import torch

from ..core import formats, framing
from ..core.formats import FLOAT_FORMAT, INT_FORMATS, packed_width
from .types import KVCache
from .wire import (_AXIS_NAMES, _DTYPE_NAMES, _FLAG_COUNT, _FLAG_RESIDUAL, _FLAG_RESIDUAL_COUNT, _FLAG_TIMESTAMP,  # noqa: F401
                   _FORMAT_NAMES, _HEADER, CRC_BYTES, FRAMING_BYTES, HEADER_BYTES, MAGIC, VERSION, _check_host,
                   cache_to_bytes)


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
                    units, padded, kind, per = self.n, H * self.C, "row", formats.get(fmt).token_groups(D, G)
                row = formats.get(fmt)                    # scales float16, or e4m3 bytes (nvfp4); zeros if any
                names = [f"{which}_scale"] + ([f"{which}_zero"] if row.has_zero else [])
                self.fields += [(f, per, row.scale_dtype, units, padded, kind) for f in names]
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
        if fmt == FLOAT_FORMAT or not token_axis:
            continue
        row = formats.get(fmt)
        if row.group_size and G != row.group_size:
            raise _bad("group_size", f"must be {row.group_size} for {fmt}, got {G}")
        if not row.partial_group and (G > D or D % G):
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
    b = framing.as_blob(b, "b")
    (_, _, flags, kf, vf, ax, kd, vd, rkd, rvd, reserved, H, D, G, total) = framing.open_frame(
        b, _HEADER, MAGIC, VERSION, "malloc_kernels cache")
    framing.check_size_and_crc(b, total, "malloc_kernels cache")
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
