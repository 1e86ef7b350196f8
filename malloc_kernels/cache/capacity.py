"""Reserved capacity: ``KVCache.reserve`` gives a cache room to grow in place (``append(..., in_place=True)``).

The storage contract separates a cache's static ``capacity`` (the entry axis of every tensor) from each row's
``length``: entries ``j >= length[b, h]`` are padding no computation reads. A reserved cache is the same cache with
that padding widened to ``capacity`` (zeros, which is what every packer writes for padding: codes, scales and zeros
of groups without a valid entry are 0), in buffers it owns. An in-place append then writes the new entries at each
row's ``length`` into those buffers, so a serving step never reallocates and never reads a grown size on the host
(what a CUDA graph capture needs: ``policies/online.py``, "In place").
"""
from __future__ import annotations

import math

import torch

from ..core.kvcache import KVCacheBase


def _widen(t: torch.Tensor, size: int) -> torch.Tensor:
    """A fresh copy of ``t [B, H, C, *]`` with its entry axis zero-padded to ``size`` (``size >= C``)."""
    out = t.new_zeros((t.shape[0], t.shape[1], size) + tuple(t.shape[3:]))
    out[:, :, :t.shape[2]] = t
    return out


def reserve_cache(cache: KVCacheBase, capacity: int, counts: bool = False) -> KVCacheBase:
    """``cache`` with room for ``capacity`` entries per (user, kv head), in buffers it owns (nothing is shared with
    ``cache``, so growing the result in place never changes ``cache``); see ``KVCache.reserve``."""
    if not isinstance(cache, KVCacheBase):
        raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}")
    if isinstance(capacity, bool) or not isinstance(capacity, int):
        raise TypeError(f"capacity must be an int, got {type(capacity).__name__}")
    if capacity < cache.capacity:
        raise ValueError(f"capacity must be >= the cache's current capacity {cache.capacity} (reserve never drops "
                         f"stored entries), got {capacity}")
    if not isinstance(counts, bool):
        raise TypeError(f"counts must be a bool, got {type(counts).__name__}")
    cache.check_contents()
    B, H, C = cache.k.shape[:3]
    changes = {name: _widen(getattr(cache, name), capacity)
               for name in ("k", "v", "position", "timestamp", "count", "mass", "v_scale", "v_zero")
               if getattr(cache, name) is not None}
    for name in ("k_scale", "k_zero"):
        t = getattr(cache, name)
        if t is not None:
            groups = math.ceil(capacity / cache.group_size) if cache.k_axis == "channel" else capacity
            changes[name] = _widen(t, groups)
    if counts and cache.count is None:
        changes["count"] = torch.cat([torch.ones(B, H, C, dtype=torch.float32, device=cache.device),
                                      torch.zeros(B, H, capacity - C, dtype=torch.float32, device=cache.device)],
                                     dim=2)
    changes["length"] = cache.length.clone()
    changes["original_length"] = cache.original_length.clone()
    if cache.residual is not None:
        r = cache.residual
        changes["residual"] = r.replace(**{name: getattr(r, name).clone() for name in r._TENSOR_FIELDS
                                           if name != "residual" and getattr(r, name) is not None})
    return cache.replace(**changes).check_contents()
