"""Batching users: one ``KVCache`` of B users from caches of fewer users (what a store's ``get_many`` returns).

Users are independent in every cache field, so stacking is a concatenation along the batch axis after padding the
entry (or key-group) axis to the largest capacity; padding is zero, which the storage contract requires.
"""
from __future__ import annotations

from typing import List, Sequence

import torch

from .types import KVCache


def _pad_to(t: torch.Tensor, size: int) -> torch.Tensor:
    if t.shape[2] == size:
        return t
    pad = [0, 0] * (t.dim() - 3) + [0, size - t.shape[2]]
    return torch.nn.functional.pad(t, pad)


def stack_users(caches: Sequence[KVCache]) -> KVCache:
    """One cache holding the users of ``caches`` in order; every cache must share formats, head_dim, group
    size, key axis, policy, dtypes and which optional fields exist (ValueError naming the first mismatch)."""
    caches = list(caches)
    if not caches:
        raise ValueError("stack_users needs at least one cache")
    if len(caches) == 1:
        return caches[0]
    ref = caches[0]
    for i, c in enumerate(caches[1:], 1):
        for f in KVCache._STATIC_FIELDS:
            if getattr(c, f) != getattr(ref, f):
                raise ValueError(f"cannot stack caches: {f} of cache {i} ({getattr(c, f)!r}) differs from cache 0's "
                                 f"({getattr(ref, f)!r})")
    has_res = [c.residual is not None for c in caches]
    if any(has_res) and not all(has_res):
        caches = [c if c.residual is not None else c.replace(residual=_empty_like(next(
            x.residual for x in caches if x.residual is not None), c)) for c in caches]
    out = {}
    for f in KVCache._TENSOR_FIELDS:
        vals = [getattr(c, f) for c in caches]
        present = [v is not None for v in vals]
        if not any(present):
            out[f] = None
            continue
        if not all(present):
            raise ValueError(f"cannot stack caches: field {f} is present in some and absent in others")
        if f == "residual":
            out[f] = stack_users(vals)
            continue
        dtypes = {v.dtype for v in vals}
        if len(dtypes) != 1:
            raise ValueError(f"cannot stack caches: field {f} has dtypes {sorted(map(str, dtypes))}")
        if vals[0].dim() >= 3:
            size = max(v.shape[2] for v in vals)
            vals = [_pad_to(v, size) for v in vals]
        out[f] = torch.cat(vals, 0).contiguous()
    return ref.replace(**out).validate()


def _empty_like(res: KVCache, owner: KVCache) -> KVCache:
    """A zero-entry residual shaped for ``owner``'s users, with ``res``'s dtypes and optional fields."""
    B, H = owner.length.shape
    D = res.head_dim
    z = lambda t, shape, dt=None: None if t is None else torch.zeros(shape, dtype=dt or t.dtype,  # noqa: E731
                                                                     device=owner.device)
    return res.replace(k=z(res.k, (B, H, 0, D)), v=z(res.v, (B, H, 0, D)),
                       length=torch.zeros(B, H, dtype=torch.int32, device=owner.device),
                       position=z(res.position, (B, H, 0)), original_length=owner.original_length.clone(),
                       timestamp=z(res.timestamp, (B, H, 0)), count=z(res.count, (B, H, 0)),
                       mass=z(res.mass, (B, H, 0)))


def stack_states(states: Sequence) -> object:
    """Stack one-user serving states (KVCache or per-layer lists) into one batched state of the same form."""
    states = list(states)
    if not states:
        raise ValueError("stack_states needs at least one state")
    if isinstance(states[0], KVCache):
        return stack_users(states)
    n = len(states[0])
    if any(isinstance(s, KVCache) or len(s) != n for s in states):
        raise ValueError("cannot stack serving states with different layer counts")
    return [stack_users([s[li] for s in states]) for li in range(n)]


def user_slice(cache: KVCache, u: int) -> KVCache:
    """User ``u`` of a batched cache as a one-user cache of views (no copy); serialising a user from the slice
    validates one user instead of the whole batch."""
    ch = {}
    for f in KVCache._TENSOR_FIELDS:
        t = getattr(cache, f)
        if isinstance(t, KVCache):
            ch[f] = user_slice(t, u)
        elif t is not None:
            ch[f] = t[u:u + 1]
    return cache.replace(**ch)


def state_layers(state) -> List[KVCache]:
    return [state] if isinstance(state, KVCache) else list(state)
