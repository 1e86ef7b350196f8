"""One user's whole serving state as bytes: every layer's cache, its policy and its online score state.

A store keeps one entry per user (DESIGN.md section 8). The entry wraps the per-layer cache bytes of
``KVCache.to_bytes`` (format version 1, each with its own CRC) in a versioned, CRC-checked envelope that adds
what ``to_bytes`` leaves out: the ``PolicySpec`` (JSON) that ``append`` maintains the cache with, and the per-entry
``mass`` of the scoring policies. Wire format, version 1, little-endian::

    header "<4sHHHHQ": magic b"MKUS", version (=1), flags (bit0: the state is one KVCache, not a list),
                       n_layers, reserved (=0), total_size (the whole envelope, CRC included)
    per layer:  spec_len uint32, spec JSON (UTF-8; 0 bytes = no policy),
                blob_len uint64, the layer's ``to_bytes`` blob,
                mass_flags uint8 (bit0 main mass, bit1 residual mass),
                float32 mass of the main segment's valid entries (head after head, the first length[h] of each),
                then the residual's, when flagged
    crc32 uint32 over every preceding byte

``state_from_bytes`` verifies the magic, version, sizes and CRC before reading anything else and refuses any
inconsistency with ``ValueError``; a blob that passes is rebuilt bit for bit.
"""
from __future__ import annotations

import struct
from typing import List, Sequence, Union

import torch

from .batch import user_slice
from .serialize import cache_from_bytes
from ..core import framing
from ..core.policy_spec import PolicySpec
from .types import KVCache

MAGIC = b"MKUS"
VERSION = 1
_HEADER = struct.Struct("<4sHHHHQ")
_U32, _U64, _U8 = struct.Struct("<I"), struct.Struct("<Q"), struct.Struct("<B")
FLAG_SINGLE = 1
MAX_LAYERS = 4096

State = Union[KVCache, Sequence[KVCache]]


def _layers(state: State):
    if isinstance(state, KVCache):
        return [state], True
    layers = list(state)
    if not layers or not all(isinstance(c, KVCache) for c in layers):
        raise TypeError("a serving state is one KVCache or a non-empty list of per-layer KVCaches")
    B = layers[0].batch_size
    if any(c.batch_size != B for c in layers):
        raise ValueError(f"every layer must hold the same users, got batch sizes {[c.batch_size for c in layers]}")
    if len(layers) > MAX_LAYERS:
        raise ValueError(f"at most {MAX_LAYERS} layers per state, got {len(layers)}")
    return layers, False


def _mass_bytes(seg: KVCache, u: int) -> bytes:
    L = seg.length[u].to(torch.int64).cpu()
    valid = torch.arange(seg.capacity) < L[:, None]
    return seg.mass[u].detach().cpu().to(torch.float32)[valid].contiguous().numpy().tobytes()


def state_to_bytes(state: State, user: int) -> bytes:
    """Serialise user ``user`` of a state (one KVCache or a list of per-layer KVCaches, B users each)."""
    layers, single = _layers(state)
    if isinstance(user, bool) or not isinstance(user, int) or not 0 <= user < layers[0].batch_size:
        raise ValueError(f"user must be an int in [0, {layers[0].batch_size}), got {user!r}")
    parts = []
    for c in layers:
        c = user_slice(c, user)
        spec = b"" if c.policy is None else c.policy.to_json().encode()
        blob = c.to_bytes(0)
        flags = (1 if c.mass is not None else 0) | (2 if c.residual is not None and c.residual.mass is not None
                                                    else 0)
        parts += [_U32.pack(len(spec)), spec, _U64.pack(len(blob)), blob, _U8.pack(flags)]
        if flags & 1:
            parts.append(_mass_bytes(c, 0))
        if flags & 2:
            parts.append(_mass_bytes(c.residual, 0))
    body = b"".join(parts)
    total = _HEADER.size + len(body) + 4
    head = _HEADER.pack(MAGIC, VERSION, FLAG_SINGLE if single else 0, len(layers), 0, total)
    out = head + body
    return framing.seal(out)


def check_state_bytes(b) -> bytes:
    """The verified bytes of an envelope: magic, version, size and CRC (ValueError otherwise)."""
    b = framing.as_blob(b, "state bytes")
    _, _, flags, n_layers, reserved, total = framing.open_frame(b, _HEADER, MAGIC, VERSION,
                                                                "malloc_kernels serving state")
    framing.check_size_and_crc(b, total, "malloc_kernels serving state")
    if reserved != 0 or flags & ~FLAG_SINGLE or not 1 <= n_layers <= MAX_LAYERS:
        raise ValueError("serving state is inconsistent: invalid header fields")
    return b


class _Cursor:
    def __init__(self, b: bytes, pos: int, end: int):
        self.b, self.pos, self.end = b, pos, end

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise ValueError(f"serving state is inconsistent: {what} runs past the end")
        out = self.b[self.pos:self.pos + n]
        self.pos += n
        return out


def _read_mass(cur: _Cursor, seg: KVCache) -> torch.Tensor:
    L = seg.length[0].to(torch.int64)
    n = int(L.sum())
    flat = torch.frombuffer(bytearray(cur.take(4 * n, "mass")), dtype=torch.float32) if n else \
        torch.zeros(0, dtype=torch.float32)
    out = torch.zeros(1, seg.num_kv_heads, seg.capacity, dtype=torch.float32)
    out[0][torch.arange(seg.capacity) < L[:, None]] = flat
    return out.to(seg.device)


def state_from_bytes(b, device=None) -> State:
    """Rebuild a one-user state (B = 1): a KVCache, or the list of per-layer KVCaches that was stored."""
    b = check_state_bytes(b)
    _, _, flags, n_layers, _, total = _HEADER.unpack_from(b, 0)
    cur = _Cursor(b, _HEADER.size, total - 4)
    layers: List[KVCache] = []
    for li in range(n_layers):
        (spec_len,) = _U32.unpack(cur.take(4, f"layer {li} spec length"))
        spec_txt = cur.take(spec_len, f"layer {li} spec")
        (blob_len,) = _U64.unpack(cur.take(8, f"layer {li} blob length"))
        c = cache_from_bytes(cur.take(blob_len, f"layer {li} cache"), device=device)
        if spec_len:
            try:
                c = c.replace(policy=PolicySpec.from_json(spec_txt.decode()))
            except UnicodeDecodeError:
                raise ValueError(f"serving state is inconsistent: layer {li} spec is not UTF-8") from None
        (mflags,) = _U8.unpack(cur.take(1, f"layer {li} mass flags"))
        if mflags & ~3 or (mflags & 2 and c.residual is None):
            raise ValueError(f"serving state is inconsistent: layer {li} mass flags {mflags}")
        if mflags & 1:
            c = c.replace(mass=_read_mass(cur, c))
        if mflags & 2:
            c = c.replace(residual=c.residual.replace(mass=_read_mass(cur, c.residual)))
        layers.append(c.validate())
    if cur.pos != cur.end:
        raise ValueError(f"serving state is inconsistent: {cur.end - cur.pos} unread bytes")
    return layers[0] if flags & FLAG_SINGLE else layers
