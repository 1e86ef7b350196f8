"""``compress``: the public entry point of the policies. Normalises the history (dense or jagged, positions,
timestamps, counts) into a ``PolicyInput``, builds the policy (a registered name or ``"a+b"``), runs it and checks
the result's contents once (``KVCache.check_contents``).
"""
from __future__ import annotations

import torch

from ..cache.types import KVCache
from ..core.layout import broadcast_per_entry, jagged_to_padded
from .base import CONTEXT_KEYS, PolicyInput
from .hybrid import HybridPolicy
from .registry import get_policy


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
        t = broadcast_per_entry(t, name, B, H, N)
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
    if isinstance(method, str) and "+" in method:
        policy = HybridPolicy(method, budget=budget, seed=seed, **params)
    else:
        policy = get_policy(method)(budget=budget, seed=seed, **params)
    inp = PolicyInput(k=k, v=v, lengths=lengths, positions=positions, timestamps=timestamps, counts=counts,
                      stats=stats, extra=extra)
    cache = policy.compress(inp).check_contents()
    # the cache remembers its policy (and a scoring policy's per-entry mass) so that KVCache.append maintains it
    from .online import attach_policy
    return attach_policy(cache, method, budget, seed, params, extra, policy, inp).validate()
