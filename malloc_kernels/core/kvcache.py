"""The compressed KV cache of one layer for a batch of B users: the storage contract (ARCHITECTURE.md, "Cache storage").

Storage contract (every backend reads exactly this; the packers in ``cache/quant.py`` and ``csrc/`` write it)
-------------------------------------------------------------------------------------------------------
Entries ``j < length[b, h]`` of row ``(b, h)`` are valid; entries at ``j >= length[b, h]`` are padding that no
computation may read into a result. Entry order is arbitrary: time lives in ``position`` / ``timestamp``.
Every cache entry precedes every request token in time.

Payload formats (``k_format`` / ``v_format``):

* ``"float"`` -- ``k``/``v`` are floating ``[B, Hkv, C, D]`` (fp32, fp16, bf16 or fp64), no scales.
* ``"int8"``, ``"int4"``, ``"int2"`` -- asymmetric integer codes, ``x_hat = code * scale + zero``, codes in
  ``[0, 2**bits - 1]``. Stored as ``uint8 [B, Hkv, C, ceil(D * bits / 8)]``: 8-bit one code per byte; 4-bit two
  codes per byte, element ``2i`` in the low nibble; 2-bit four codes per byte, element ``4i`` in bits 0-1,
  ``4i+1`` in bits 2-3 and so on (unused high bits of a partial last byte are zero).
* ``"fp8"`` -- e4m3fn codes (bit pattern stored as ``uint8 [B, Hkv, C, D]``), ``x_hat = float(code) * scale``,
  no zero.
* ``"nvfp4"`` -- e2m1 codes, two per byte (element ``2i`` in the low nibble; ``uint8 [B, Hkv, C, ceil(D / 2)]``),
  ``x_hat = e2m1(code) * e4m3(scale)``, no zero; ``group_size`` is 16 and both keys and values use the token axis;
  scales are e4m3fn bit patterns, ``uint8 [B, Hkv, C, ceil(D / 16)]`` (a partial last group when 16 does not
  divide D). Names, codes, bits and grouping of every format: the table in ``core/formats.py``.

Quantisation groups (``k_axis`` for keys, values are always ``"token"``):

* ``"token"``: one (scale, zero) per (entry, group of ``group_size`` consecutive channels): scale/zero shape
  ``[B, Hkv, C, D // group_size]``; ``group_size`` divides ``D``. (INT8/FP8 "per-token" is ``group_size == D``.)
* ``"channel"`` (KIVI keys): one (scale, zero) per (group of ``group_size`` consecutive entries, channel):
  shape ``[B, Hkv, ceil(C / group_size), D]``. Entry ``j`` uses group ``j // group_size``. Statistics are taken
  over VALID entries only, so a partial last group is fine and padding never changes a code.

Scale/zero are stored as float16 (as in KIVI) and chosen so that the stored (rounded) values still cover the
group's range, which keeps the round-trip error within half a step:
``zero = f16_round_down(min)``, ``scale = f16_round_up((max - zero) / (2**bits - 1))`` (fp32 arithmetic);
``code = clamp(round_half_even((x - zero) / scale), 0, 2**bits - 1)`` in fp32, ``code = 0`` where ``scale == 0``.
FP8: ``scale = f16_round_up(absmax / 448)``, ``code = e4m3fn(x / scale)`` (round to nearest even), 0 where
``scale == 0``. Values whose range does not fit float16 raise ``ValueError``.
Edge cases (``cache/quant.py`` is the bit-exact reference): ``min`` and ``max`` are canonicalised with ``+ 0.0``
(fp32) so -0.0/+0.0 ties never give a -0 zero or scale; FP8 clamps ``x / scale`` to ``[-448, 448]`` before the
cast (torch's cast saturates identically; a negative ``x`` that rounds to 0 keeps the -0 code 0x80, as the cast
does); groups with no valid entry and all padding entries store scale = zero = code = 0.

Other per-entry fields: ``position int32 [B, Hkv, C]`` (ORIGINAL positions, for the relative bias),
``timestamp int64 [B, Hkv, C]`` (optional), ``count float32 [B, Hkv, C]`` (optional merge counts; 1 when absent).
``original_length int32 [B]`` is the user's history length before compression (HSTU's 1/n normaliser).
``residual`` is an optional full-precision cache (KIVI's recent window, IntactKV's pivots) with its own
lengths/positions/timestamps/counts; it has no residual of its own.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import formats
from .formats import FLOAT_FORMAT, FP8_FORMAT, K_AXES, format_bits, packed_width
from .layout import device_assert
from .policy_spec import PolicySpec


def _require_where(ok: torch.Tensor, mask: torch.Tensor, message: str) -> None:
    """``ok`` holds wherever ``mask`` (its leading dims) is true: ``ok[mask].all()`` without boolean indexing (whose
    output size is data: a host synchronisation), as one ``device_assert``."""
    if ok.numel():
        ok = ok.reshape(*mask.shape, -1).all(-1) if ok.dim() > mask.dim() else ok
        device_assert((ok | ~mask).all(), message)


@dataclass
class KVCacheBase:
    """The stored tensors of one layer's (compressed) key/value cache for B users, and their invariants.

    ``validate()`` checks every shape/dtype/device rule without reading tensor data (the attention entry point
    calls it on every call, and it traces under ``torch.compile``); ``check_contents()`` adds the rules that need
    the data (lengths within the capacity, merge counts) and runs once where a cache is made (``compress``,
    ``cache_from_bytes``, ``append``). The public class, with dequantisation, byte accounting and serialisation,
    is ``malloc_kernels.KVCache`` (``cache/types.py``).
    """

    k: torch.Tensor
    v: torch.Tensor
    length: torch.Tensor
    position: torch.Tensor
    original_length: torch.Tensor
    head_dim: int
    timestamp: Optional[torch.Tensor] = None
    count: Optional[torch.Tensor] = None
    k_format: str = FLOAT_FORMAT
    v_format: str = FLOAT_FORMAT
    k_axis: str = "token"
    group_size: int = 0
    k_scale: Optional[torch.Tensor] = None
    k_zero: Optional[torch.Tensor] = None
    v_scale: Optional[torch.Tensor] = None
    v_zero: Optional[torch.Tensor] = None
    residual: Optional["KVCacheBase"] = None
    meta: dict = field(default_factory=dict)
    # the policy that built the cache (``compress`` sets it) and its per-entry online score state (float32
    # ``[B, Hkv, C]``: accumulated attention mass for h2o/d2o, the latest window mass for tova/snapkv/pyramidkv;
    # None for policies that do not score entries); ``KVCache.append`` maintains both (``policies/online.py``)
    policy: Optional[PolicySpec] = None
    mass: Optional[torch.Tensor] = None

    # ---- shape helpers -------------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.k.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def is_quantized(self) -> bool:
        return self.k_format != FLOAT_FORMAT or self.v_format != FLOAT_FORMAT

    def num_groups(self, which: str) -> int:
        """Number of (scale, zero) groups along the grouped axis for keys (``"k"``) or values (``"v"``)."""
        if which == "k" and self.k_axis == "channel":
            return math.ceil(self.capacity / self.group_size)
        return formats.get(getattr(self, f"{which}_format")).token_groups(self.head_dim, self.group_size)

    def replace(self, **changes) -> "KVCacheBase":
        return dataclasses.replace(self, **changes)

    # ---- validation -----------------------------------------------------------------------------------------
    def validate(self) -> "KVCacheBase":
        """Raise ``ValueError``/``TypeError`` naming the offending field if the cache breaks the contract."""
        if not isinstance(self.k, torch.Tensor) or not isinstance(self.v, torch.Tensor):
            raise TypeError("cache.k and cache.v must be tensors")
        if self.k.dim() != 4 or self.v.dim() != 4:
            raise ValueError(f"cache.k and cache.v must be 4-D [B, Hkv, C, *], got {tuple(self.k.shape)} "
                             f"and {tuple(self.v.shape)}")
        B, H, C = self.k.shape[:3]
        if self.v.shape[:3] != self.k.shape[:3]:
            raise ValueError(f"cache.v leading dims {tuple(self.v.shape[:3])} != cache.k's {tuple(self.k.shape[:3])}")
        if self.k_axis not in K_AXES:
            raise ValueError(f"cache.k_axis must be one of {K_AXES}, got {self.k_axis!r}")
        for name, fmt, t in (("k", self.k_format, self.k), ("v", self.v_format, self.v)):
            format_bits(fmt)
            if fmt == FLOAT_FORMAT:
                if not t.is_floating_point():
                    raise TypeError(f"cache.{name} must be floating point for format 'float', got {t.dtype}")
                if t.shape[3] != self.head_dim:
                    raise ValueError(f"cache.{name} last dim {t.shape[3]} != head_dim {self.head_dim}")
            else:
                if t.dtype != torch.uint8:
                    raise TypeError(f"cache.{name} must be uint8 codes for format {fmt!r}, got {t.dtype}")
                if t.shape[3] != packed_width(self.head_dim, fmt):
                    raise ValueError(f"cache.{name} last dim {t.shape[3]} != packed width "
                                     f"{packed_width(self.head_dim, fmt)} for head_dim {self.head_dim}, {fmt}")
                self._validate_scales(name, fmt)
        self._validate_int("length", self.length, (B, H), torch.int32)
        self._validate_int("position", self.position, (B, H, C), torch.int32)
        self._validate_int("original_length", self.original_length, (B,), torch.int32)
        if self.timestamp is not None:
            self._validate_int("timestamp", self.timestamp, (B, H, C), torch.int64)
        if self.count is not None:
            if self.count.shape != (B, H, C) or self.count.dtype != torch.float32:
                raise ValueError(f"cache.count must be float32 [B, Hkv, C]={(B, H, C)}, got "
                                 f"{self.count.dtype} {tuple(self.count.shape)}")
        if self.mass is not None and (self.mass.shape != (B, H, C) or self.mass.dtype != torch.float32):
            raise ValueError(f"cache.mass must be float32 [B, Hkv, C]={(B, H, C)}, got "
                             f"{self.mass.dtype} {tuple(self.mass.shape)}")
        if self.policy is not None and not isinstance(self.policy, PolicySpec):
            raise TypeError(f"cache.policy must be a PolicySpec or None, got {type(self.policy).__name__}")
        for name in ("length", "position", "original_length", "timestamp", "count", "k_scale", "k_zero",
                     "v_scale", "v_zero", "mass"):
            t = getattr(self, name)
            if t is not None and t.device != self.k.device:
                raise ValueError(f"cache.{name} is on {t.device} but cache.k is on {self.k.device}")
        if self.residual is not None:
            r = self.residual
            if r.is_quantized or r.residual is not None:
                raise ValueError("cache.residual must be a full-precision cache without a residual of its own")
            if r.k.shape[:2] != self.k.shape[:2] or r.head_dim != self.head_dim:
                raise ValueError(f"cache.residual shape {tuple(r.k.shape)} does not match the cache's "
                                 f"[B, Hkv]={(B, H)} / head_dim {self.head_dim}")
            if (self.timestamp is None) != (r.timestamp is None):
                raise ValueError("cache.timestamp and cache.residual.timestamp must be both present or both absent")
            r.validate()
        return self

    def check_contents(self) -> "KVCacheBase":
        """``validate()`` plus the rules that read the data, over VALID entries only (padding may hold anything and
        is never read): ``0 <= length <= capacity`` and ``original_length >= 0`` (the kernels index the payload by
        ``length``); float payloads finite; no fp8 NaN code (0x7F / 0xFF); scales and zeros finite, scales
        ``>= 0`` (as the quantizers write them); merge counts finite and ``> 0`` (an entry stands for at least a
        part of one token). Raises ``ValueError`` naming the field (CPU tensors). Run once where a cache is made
        (``compress``, ``cache_from_bytes``, ``append``), not per attention call (it reads every entry). Each rule
        is a ``device_assert``: no host read and no data-sized intermediate (so ``append`` in a serving step adds
        no synchronisation); on a GPU a failure is an asynchronous device assert. Attention itself never refuses
        data: a non-finite value that reaches a row makes that row NaN (README, "Non-finite values and integer
        ranges")."""
        self.validate()
        segments = (("cache", self),) if self.residual is None else (("cache", self), ("cache.residual", self.residual))
        for name, seg in segments:
            C = seg.capacity
            if seg.length.numel():
                device_assert(((seg.length >= 0) & (seg.length <= C)).all(),
                              f"{name}.length must be within [0, capacity={C}]")
            seg._check_values(name)
            if seg.mass is not None:
                device_assert(torch.isfinite(seg.mass).all(), f"{name}.mass must be finite")
        if self.original_length.numel():
            device_assert((self.original_length >= 0).all(), "cache.original_length must be >= 0")
        return self

    def _check_values(self, name: str) -> None:
        """check_contents' data rules for one segment (``name``: its name in messages), as device asserts."""
        C = self.capacity
        valid = torch.arange(C, device=self.length.device) < self.length.to(torch.int64)[..., None]   # [B, H, C]
        for which, fmt in (("k", self.k_format), ("v", self.v_format)):
            t = getattr(self, which)
            if fmt == FLOAT_FORMAT:
                _require_where(torch.isfinite(t), valid,
                               f"{name}.{which} holds a non-finite value (NaN or inf) in a valid entry")
                continue
            if fmt == FP8_FORMAT:
                _require_where((t & 0x7F) != 0x7F, valid,
                               f"{name}.{which} holds an fp8 NaN code (0x7F/0xFF) in a valid entry")
            gvalid = valid
            if which == "k" and self.k_axis == "channel":
                gvalid = (torch.arange(self.num_groups("k"), device=valid.device) * self.group_size
                          < self.length.to(torch.int64)[..., None])
            for part in ("scale", "zero"):
                sz = getattr(self, f"{which}_{part}")
                if sz is None:
                    continue
                if sz.dtype == torch.uint8:           # e4m3fn scale bytes (nvfp4): no NaN code, no sign bit
                    _require_where((sz & 0x7F) != 0x7F, gvalid,
                                   f"{name}.{which}_{part} holds an e4m3 NaN code (0x7F/0xFF) in a valid group")
                    _require_where((sz & 0x80) == 0, gvalid,
                                   f"{name}.{which}_scale holds a negative scale in a valid group")
                    continue
                _require_where(torch.isfinite(sz), gvalid,
                               f"{name}.{which}_{part} holds a non-finite value in a valid group")
                if part == "scale":
                    _require_where(sz >= 0, gvalid, f"{name}.{which}_scale holds a negative scale in a valid group")
        if self.count is not None:
            _require_where(torch.isfinite(self.count) & (self.count > 0), valid,
                           f"{name}.count must be finite and > 0 on valid entries (an entry stands for at least a "
                           "part of one token)")

    def _validate_int(self, name, t, shape, dtype):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"cache.{name} must be a tensor, got {type(t).__name__}")
        if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            raise ValueError(f"cache.{name} must be {dtype} {list(shape)}, got {t.dtype} {list(t.shape)}")

    def _validate_scales(self, name, fmt):
        f = formats.get(fmt)
        if self.group_size <= 0:
            raise ValueError(f"cache.group_size must be positive for quantized formats, got {self.group_size}")
        if f.group_size is not None and self.group_size != f.group_size:
            raise ValueError(f"cache.group_size must be {f.group_size} for format {fmt!r}, got {self.group_size}")
        axis = self.k_axis if name == "k" else "token"
        if axis not in f.k_axes:
            raise ValueError(f"cache.k_axis {axis!r} is not allowed for format {fmt!r} (allowed: {f.k_axes})")
        if axis == "token" and not f.partial_group and self.head_dim % self.group_size:
            raise ValueError(f"cache.group_size {self.group_size} must divide head_dim {self.head_dim}")
        B, H, C = self.k.shape[:3]
        want = (B, H, self.num_groups(name), self.head_dim) if axis == "channel" else \
            (B, H, C, f.token_groups(self.head_dim, self.group_size))
        sd = f.scale_dtype
        scale, zero = getattr(self, f"{name}_scale"), getattr(self, f"{name}_zero")
        if scale is None or tuple(scale.shape) != want or scale.dtype != sd:
            raise ValueError(f"cache.{name}_scale must be {sd} {list(want)}, got "
                             f"{None if scale is None else (scale.dtype, list(scale.shape))}")
        if not f.has_zero:
            if zero is not None:
                raise ValueError(f"cache.{name}_zero must be None for {fmt}")
        elif zero is None or tuple(zero.shape) != want or zero.dtype != sd:
            raise ValueError(f"cache.{name}_zero must be {sd} {list(want)}, got "
                             f"{None if zero is None else (zero.dtype, list(zero.shape))}")

    # ---- pytree registration helpers ------------------------------------------------------------------------
    _TENSOR_FIELDS = ("k", "v", "length", "position", "original_length", "timestamp", "count",
                      "k_scale", "k_zero", "v_scale", "v_zero", "residual", "mass")
    _STATIC_FIELDS = ("head_dim", "k_format", "v_format", "k_axis", "group_size", "policy")
