"""The per-user serving state of the RWKV recommender (``models/rwkv.py``) and its wire format.

``RWKVLayerState`` (one per layer, ``B`` users): ``wkv [B, 3, C]`` = the WKV state ``(a, b, p)`` (numerator
``a e^p``, denominator ``b e^p``, running maximum ``p``; ``ops/wkv.py``), ``shift_att`` / ``shift_ffn [B, C]`` = the
last normalised inputs of the time- and channel-mixing token shifts, ``original_length int32 [B]`` = tokens folded in
so far. Its size does not depend on the history's length: ``nbytes_per_user = 4 + 5 C * itemsize`` per layer.

Rules of a valid state (``check_contents``; what any history produces): an empty user (length 0) is exactly
``(0, 0, -inf)`` with zero shifts; a user with tokens has finite ``a``, ``p`` and shifts and ``b >= 1`` (every
update keeps one of its two terms at weight ``e^0 = 1``), and every layer carries the same length.

Wire format, version 1, little-endian (one user, all layers)::

    header "<4sHBBIIQ" (24 bytes): magic b"MKRW", version (=1), dtype code (1 float32, 4 float64), reserved (=0),
                                   n_layers, channels C, total_size (the whole blob, CRC included)
    per layer: original_length int32, wkv [3, C], shift_att [C], shift_ffn [C] (the dtype's native bytes)
    crc32 uint32 over every preceding byte

so ``len(states_to_bytes(s, u)) == sum of the layers' nbytes_per_user + 28`` exactly. The reader
(``states_from_bytes``) treats the blob as hostile: it checks magic, version, bounds (``n_layers <= 4096``,
``C <= 65536``), that the size equals the one the header implies (nothing is allocated beyond the blob's own
size), the CRC, then the contents above, and raises ``ValueError`` naming the field otherwise.
"""
from __future__ import annotations

import struct
import sys
from dataclasses import dataclass, replace
from typing import List, Sequence

import torch

from ..core import framing

MAGIC = b"MKRW"
VERSION = 1
_HEADER = struct.Struct("<4sHBBIIQ")
FRAMING_BYTES = _HEADER.size + framing.CRC.size
MAX_LAYERS = 4096
MAX_CHANNELS = 1 << 16
_DTYPE_CODES = {torch.float32: 1, torch.float64: 4}
_DTYPES = {v: k for k, v in _DTYPE_CODES.items()}


@dataclass(frozen=True)
class RWKVLayerState:
    """One layer's recurrent state for ``B`` users (module docstring)."""

    wkv: torch.Tensor
    shift_att: torch.Tensor
    shift_ffn: torch.Tensor
    original_length: torch.Tensor

    def __post_init__(self):
        w = self.wkv
        if not isinstance(w, torch.Tensor) or w.dim() != 3 or w.shape[1] != 3 or w.dtype not in _DTYPE_CODES:
            raise ValueError(f"wkv must be a float32/float64 tensor [B, 3, C], got "
                             f"{getattr(w, 'dtype', type(w).__name__)} {tuple(getattr(w, 'shape', ()))}")
        B, _, C = w.shape
        for name in ("shift_att", "shift_ffn"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.shape != (B, C) or t.dtype != w.dtype:
                raise ValueError(f"{name} must be a {w.dtype} tensor [B={B}, C={C}], got "
                                 f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        n = self.original_length
        if not isinstance(n, torch.Tensor) or n.shape != (B,) or n.dtype != torch.int32:
            raise ValueError(f"original_length must be an int32 tensor [B={B}], got "
                             f"{getattr(n, 'dtype', type(n).__name__)} {tuple(getattr(n, 'shape', ()))}")

    @property
    def batch_size(self) -> int:
        return self.wkv.shape[0]

    @property
    def channels(self) -> int:
        return self.wkv.shape[2]

    def nbytes_per_user(self) -> torch.Tensor:
        """Exact stored bytes per user (int64 ``[B]``, all equal): the length, the WKV state and the two shifts."""
        per = 4 + 5 * self.channels * self.wkv.element_size()
        return torch.full((self.batch_size,), per, dtype=torch.int64)

    def select(self, users) -> "RWKVLayerState":
        """The states of ``users`` (an index tensor or list)."""
        idx = torch.as_tensor(users, dtype=torch.int64)
        return RWKVLayerState(self.wkv[idx], self.shift_att[idx], self.shift_ffn[idx], self.original_length[idx])

    def to(self, dtype=None, device=None) -> "RWKVLayerState":
        return replace(self, wkv=self.wkv.to(device=device, dtype=dtype),
                       shift_att=self.shift_att.to(device=device, dtype=dtype),
                       shift_ffn=self.shift_ffn.to(device=device, dtype=dtype),
                       original_length=self.original_length.to(device=device))

    def check_contents(self) -> "RWKVLayerState":
        """The data rules of the module docstring (ValueError naming the field); returns self."""
        a, b, p = self.wkv[:, 0], self.wkv[:, 1], self.wkv[:, 2]
        n = self.original_length
        if bool((n < 0).any()):
            raise ValueError(f"original_length must be >= 0, got {n.tolist()}")
        empty = (n == 0)[:, None]
        shifts = torch.cat([self.shift_att, self.shift_ffn], 1)
        ok_empty = (a == 0) & (b == 0) & (p == float("-inf"))
        ok_full = torch.isfinite(a) & torch.isfinite(b) & torch.isfinite(p) & (b >= 1)
        if not bool(torch.where(empty, ok_empty, ok_full).all()):
            raise ValueError("wkv must be (0, 0, -inf) for an empty user and finite with b >= 1 otherwise")
        if not bool(torch.where(empty, shifts == 0, torch.isfinite(shifts)).all()):
            raise ValueError("shift_att/shift_ffn must be 0 for an empty user and finite otherwise")
        return self


def empty_states(n_layers: int, batch: int, channels: int, dtype=torch.float32, device=None) -> List[RWKVLayerState]:
    """Per-layer states of ``batch`` users with no history."""
    out = []
    for _ in range(n_layers):
        w = torch.zeros(batch, 3, channels, dtype=dtype, device=device)
        w[:, 2] = float("-inf")
        z = torch.zeros(batch, channels, dtype=dtype, device=device)
        out.append(RWKVLayerState(w, z, z.clone(), torch.zeros(batch, dtype=torch.int32, device=device)))
    return out


def _check_host():
    if sys.byteorder != "little":
        raise RuntimeError("RWKV state serialisation stores tensors' native bytes and needs a little-endian host")


def states_to_bytes(states: Sequence[RWKVLayerState], user: int) -> bytes:
    """Serialise user ``user`` of per-layer states (module docstring's format)."""
    _check_host()
    layers = list(states)
    if not layers or not all(isinstance(s, RWKVLayerState) for s in layers):
        raise TypeError("states must be a non-empty sequence of RWKVLayerState")
    if len(layers) > MAX_LAYERS:
        raise ValueError(f"at most {MAX_LAYERS} layers per state, got {len(layers)}")
    B, C, dt = layers[0].batch_size, layers[0].channels, layers[0].wkv.dtype
    if any(s.batch_size != B or s.channels != C or s.wkv.dtype != dt for s in layers):
        raise ValueError("every layer must hold the same users, channels and dtype")
    if isinstance(user, bool) or not isinstance(user, int) or not 0 <= user < B:
        raise ValueError(f"user must be an int in [0, {B}), got {user!r}")
    parts = []
    for s in layers:
        parts.append(s.original_length[user:user + 1].cpu().numpy().tobytes())
        for t in (s.wkv[user], s.shift_att[user], s.shift_ffn[user]):
            parts.append(t.detach().cpu().contiguous().numpy().tobytes())
    body = b"".join(parts)
    total = FRAMING_BYTES + len(body)
    out = _HEADER.pack(MAGIC, VERSION, _DTYPE_CODES[dt], 0, len(layers), C, total) + body
    return framing.seal(out)


def states_from_bytes(b, device=None) -> List[RWKVLayerState]:
    """Rebuild one user's per-layer states (B = 1) from ``states_to_bytes`` output; hostile input -> ValueError."""
    _check_host()
    b = framing.as_blob(b, "state bytes")
    _, _, code, reserved, n_layers, C, total = framing.open_frame(b, _HEADER, MAGIC, VERSION, "RWKV serving state")
    if reserved != 0 or code not in _DTYPES:
        raise ValueError(f"RWKV state is inconsistent: reserved {reserved}, dtype code {code}")
    if not 1 <= n_layers <= MAX_LAYERS or not 1 <= C <= MAX_CHANNELS:
        raise ValueError(f"RWKV state is inconsistent: n_layers {n_layers} (1..{MAX_LAYERS}), channels {C} "
                         f"(1..{MAX_CHANNELS})")
    dt = _DTYPES[code]
    item = torch.empty(0, dtype=dt).element_size()
    per = 4 + 5 * C * item
    if total != FRAMING_BYTES + n_layers * per:
        raise ValueError(f"RWKV state is inconsistent: {n_layers} layers of {C} channels need "
                         f"{FRAMING_BYTES + n_layers * per} bytes, the blob has {total}")
    framing.check_size_and_crc(b, total, "RWKV serving state")
    layers, pos = [], _HEADER.size
    for _ in range(n_layers):
        n = torch.frombuffer(bytearray(b[pos:pos + 4]), dtype=torch.int32).clone()
        vals = torch.frombuffer(bytearray(b[pos + 4:pos + per]), dtype=dt).clone()
        pos += per
        s = RWKVLayerState(vals[:3 * C].view(1, 3, C), vals[3 * C:4 * C].view(1, C), vals[4 * C:].view(1, C),
                           n.view(1))
        layers.append(s.check_contents().to(device=device))
    if len({int(s.original_length[0]) for s in layers}) != 1:
        raise ValueError("RWKV state is inconsistent: the layers' original_length differ")
    return layers
