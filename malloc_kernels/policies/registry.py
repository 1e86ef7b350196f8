"""Policy registry and the public ``compress`` entry point.

A policy turns a batch of full per-layer histories into a ``KVCache``. Every policy receives the same normalised
inputs (``PolicyInput``): padded dense ``[B, Hkv, N, D]`` keys/values, per-user history ``lengths``, ORIGINAL
positions/timestamps per (user, kv head, entry), and optional attention statistics. Nothing may mix two users.

Register a policy with ``@register_policy("name")`` on a class whose constructor takes ``budget``, ``seed`` and the
method's keyword parameters (validated there, with ``ValueError`` naming the parameter) and whose
``compress(inp: PolicyInput) -> KVCache`` does the work. ``"a+b"`` composes: ``a`` prunes/merges, then ``b``
re-encodes what was kept (see ``hybrid.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

from ..cache.types import KVCache

_POLICIES: Dict[str, Callable] = {}

# Keyword arguments of ``compress`` that describe the call's context rather than configure a method: every policy
# receives them in ``PolicyInput.extra`` and those that do not score by attention simply ignore them, so one call
# site (e.g. the evaluation harness) can pass the same context to every method.
CONTEXT_KEYS = ("queries", "kind", "scale", "layer", "num_layers", "pos_bias", "time_bias", "query_positions",
                "query_timestamps")


def register_policy(*names: str):
    def deco(cls):
        for name in names:
            if name in _POLICIES:
                raise RuntimeError(f"policy {name!r} registered twice")
            _POLICIES[name] = cls
        return cls
    return deco


def available_methods():
    """Names accepted by ``compress(method=...)`` (hybrids ``"a+b"`` compose any two of them)."""
    return sorted(_POLICIES)


def get_policy(method: str):
    if not isinstance(method, str):
        raise TypeError(f"method must be a string, got {type(method).__name__}")
    if method not in _POLICIES:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(available_methods())} "
                         f"(and 'a+b' compositions)")
    return _POLICIES[method]


@dataclass
class PolicyInput:
    """Normalised input every policy sees.

    k, v: ``[B, Hkv, N, D]`` floating, padded past ``lengths``; lengths: int32 ``[B]``;
    positions: int32 ``[B, Hkv, N]``; timestamps: optional int64 ``[B, Hkv, N]``;
    counts: optional float32 ``[B, Hkv, N]`` (the input may itself be merged); stats: optional statistics
    (``malloc_kernels.AttentionStats`` of the history's own attention, or whatever the policy documents);
    extra: the call-context keyword arguments of ``compress`` (``CONTEXT_KEYS``: ``queries``, ``kind``, ``layer``,
    ``num_layers``, ...), separated from the method's own parameters.
    """

    k: torch.Tensor
    v: torch.Tensor
    lengths: torch.Tensor
    positions: torch.Tensor
    timestamps: Optional[torch.Tensor]
    counts: Optional[torch.Tensor]
    stats: object
    extra: dict
    # optional (hybrids feed a stage's output cache to the next stage): per-(user, kv head) valid lengths
    # int32 [B, Hkv] (default: ``lengths`` on every head) and the pre-compression lengths int32 [B]
    # (default: ``lengths``), carried into the output cache's ``original_length``
    head_lengths: Optional[torch.Tensor] = None
    original_lengths: Optional[torch.Tensor] = None

    @property
    def shape(self):
        return self.k.shape

    def full_cache(self) -> KVCache:
        """The uncompressed cache holding every valid entry (lengths broadcast over kv heads)."""
        B, H = self.k.shape[:2]
        length = self.lengths.to(torch.int32)[:, None].expand(B, H) if self.head_lengths is None else \
            self.head_lengths.to(torch.int32)
        original = self.lengths if self.original_lengths is None else self.original_lengths
        return KVCache(k=self.k, v=self.v, length=length.contiguous(),
                       position=self.positions, original_length=original.to(torch.int32).contiguous(),
                       head_dim=self.k.shape[-1], timestamp=self.timestamps, count=self.counts)


def check_int_range(t: torch.Tensor, name: str, dtype: torch.dtype) -> None:
    """Refuse integer values that ``dtype`` (the stored type) cannot hold: they would wrap, never saturate."""
    info = torch.iinfo(dtype)
    if t.numel() and (torch.iinfo(t.dtype).bits > info.bits or t.dtype == torch.uint64):
        lo, hi = int(t.min()), int(t.max())
        if lo < info.min or hi > info.max:
            raise ValueError(f"{name} must fit {dtype} ([{info.min}, {info.max}]), got values in [{lo}, {hi}]")


def _normalise(key, value, positions, timestamps, lengths, offsets, counts):
    if not isinstance(key, torch.Tensor) or not isinstance(value, torch.Tensor):
        raise TypeError("key and value must be tensors")
    if not key.is_floating_point() or not value.is_floating_point():
        raise TypeError(f"key and value must be floating point, got {key.dtype} and {value.dtype}")
    if key.dtype != value.dtype:
        raise TypeError(f"key dtype {key.dtype} != value dtype {value.dtype}")
    if key.device != value.device:
        raise ValueError(f"key is on {key.device} but value is on {value.device}")
    if offsets is not None:
        if key.dim() != 3 or value.dim() != 3:
            raise ValueError(f"jagged key/value must be [total, Hkv, D], got {tuple(key.shape)}, {tuple(value.shape)}")
        from ..ops.layout import jagged_to_padded
        if lengths is not None:
            raise ValueError("pass either offsets (jagged) or lengths (padded dense), not both")
        key, lengths = jagged_to_padded(key, offsets)
        value, _ = jagged_to_padded(value, offsets)
        positions = None if positions is None else jagged_to_padded(positions, offsets)[0]
        timestamps = None if timestamps is None else jagged_to_padded(timestamps, offsets)[0]
        counts = None if counts is None else jagged_to_padded(counts, offsets)[0]
    if key.dim() != 4 or value.dim() != 4:
        raise ValueError(f"key/value must be [B, Hkv, N, D] (or jagged with offsets=), got {tuple(key.shape)}")
    if key.shape != value.shape:
        raise ValueError(f"key shape {tuple(key.shape)} != value shape {tuple(value.shape)}")
    B, H, N, D = key.shape
    dev = key.device
    if lengths is None:
        lengths = torch.full((B,), N, dtype=torch.int32, device=dev)
    else:
        if not isinstance(lengths, torch.Tensor) or lengths.shape != (B,) or lengths.is_floating_point():
            raise ValueError(f"lengths must be an integer tensor [B]={B}, got {lengths!r}")
        if lengths.numel() and (int(lengths.min()) < 0 or int(lengths.max()) > N):
            raise ValueError(f"lengths must be within [0, N={N}]")
        lengths = lengths.to(device=dev, dtype=torch.int32)

    def per_entry(t, name, dtype):
        if t is None:
            return None
        if not isinstance(t, torch.Tensor) or t.is_floating_point() != dtype.is_floating_point:
            raise TypeError(f"{name} must be a {'floating' if dtype.is_floating_point else 'integer'} tensor")
        if t.dim() == 1 and t.shape[0] == N:
            t = t[None, None].expand(B, H, N)
        elif t.dim() == 2 and t.shape == (B, N):
            t = t[:, None].expand(B, H, N)
        elif t.shape != (B, H, N):
            raise ValueError(f"{name} must be [N], [B, N] or [B, Hkv, N] = {(B, H, N)}, got {tuple(t.shape)}")
        if not dtype.is_floating_point:
            check_int_range(t, name, dtype)
        return t.to(device=dev, dtype=dtype).contiguous()

    if positions is None:
        positions = torch.arange(N, dtype=torch.int32, device=dev)
    positions = per_entry(positions, "positions", torch.int32)
    timestamps = per_entry(timestamps, "timestamps", torch.int64)
    counts = per_entry(counts, "counts", torch.float32)
    return key, value, lengths, positions, timestamps, counts


def compress(key, value, method: str = "none", *, budget=None, positions=None, timestamps=None, lengths=None,
             offsets=None, counts=None, stats=None, seed: int = 0, **params) -> KVCache:
    """Compress one layer's history keys/values into a ``KVCache``.

    key, value: ``[B, Hkv, N, D]`` (with optional ``lengths [B]`` for ragged histories, entries past a user's
    length are ignored) or jagged ``[total, Hkv, D]`` with ``offsets [B+1]``. positions/timestamps: ORIGINAL
    positions (int, default ``arange(N)``) and timestamps (int64), shaped ``[N]``, ``[B, N]``, ``[B, Hkv, N]`` or
    jagged like key. method: a registered policy name (``available_methods()``) or ``"a+b"``. budget: the
    policy's budget (token ratio in (0, 1], absolute token count >= 1, or a ``Budget``); seed: for randomised
    policies. Remaining keyword arguments are the method's parameters.
    """
    if not isinstance(method, str):
        raise TypeError(f"method must be a string naming a compression method (e.g. 'none', 'kivi4', 'h2o+int8'), "
                        f"got {type(method).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    k, v, lengths, positions, timestamps, counts = _normalise(key, value, positions, timestamps, lengths, offsets,
                                                             counts)
    extra = {name: params.pop(name) for name in CONTEXT_KEYS if name in params}
    if "+" in method:
        from .hybrid import HybridPolicy
        policy = HybridPolicy(method, budget=budget, seed=seed, **params)
    else:
        policy = get_policy(method)(budget=budget, seed=seed, **params)
    inp = PolicyInput(k=k, v=v, lengths=lengths, positions=positions, timestamps=timestamps, counts=counts,
                      stats=stats, extra=extra)
    return policy.compress(inp).validate().check_contents()


@register_policy("none")
class NoCompression:
    """The native cache: every entry kept at the input precision (the MALLOC 'native' row)."""

    def __init__(self, budget=None, seed=0, **params):
        if params:
            raise ValueError(f"method 'none' takes no parameters, got {sorted(params)}")

    def compress(self, inp: PolicyInput) -> KVCache:
        return inp.full_cache()
