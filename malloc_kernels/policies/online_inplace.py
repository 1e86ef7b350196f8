"""In place: ``KVCache.append(..., in_place=True)``, the append a CUDA graph can capture.

The functional append (``online.py``) builds a new cache whose capacity is the grown ``max(length + new)``: a host
read of device data and buffers one entry larger on every decode step. A cache from ``KVCache.reserve(capacity)``
has room beyond each row's ``length``; the in-place append writes the new entries there:

* entry ``j < n[b]`` of user ``b``'s new entries goes to slot ``length[b, h] + j`` of every per-entry buffer
  (``k``, ``v``, their token-axis scales/zeros, ``position``, ``timestamp``, ``count``), by a ``scatter_`` whose
  indices are computed on the device; then ``length += n`` and ``original_length += n``, in place.
* nothing is read on the host and nothing is sized by data: every check (``validate``'s static rules, the new
  entries' rules of ``check_new_entries``, ``length + n <= capacity``, ``original_length`` within int32) is a
  ``device_assert`` (a ValueError naming the argument on CPU tensors).
* bit-identical over valid entries to the functional append of the same cache: the uncompressed cache stores the
  entries (cast to the cache's dtype, as ``cat_segs`` casts them); the per-token precision formats quantize the new
  rows on their own (``quantize_tensor``, whose codes of an entry depend on that entry only) exactly as
  ``_append_token_axis`` does, and write codes and scales per entry.

Policies whose append recomputes the kept set from the whole grown history (eviction, merging, hybrids, KIVI /
IntactKV's residual flush, channel-axis key groups, byte budgets) have no in-place form and are refused with a
ValueError; never a silent fallback to the host-reading path.

The cache's contents were checked where it was made (``reserve`` runs ``check_contents``) and each in-place append
writes only entries it checked, so the step does not re-read the whole cache (the functional append does).
"""
from __future__ import annotations

import torch

from ..cache.types import FLOAT_FORMAT, KVCache, register_append
from ..core.layout import device_assert
from .online import INT32_MAX, check_new_entries, maintaining_spec, make_policy, quantized_entries, token_stage


def in_place_family(cache: KVCache) -> str:
    """``"none"`` or ``"token"`` (per-token precision): the family whose append runs in place; ValueError
    naming the policy otherwise."""
    spec = maintaining_spec(cache)
    if spec.method == "none":
        if cache.residual is not None:
            raise ValueError("append(in_place=True): a policy 'none' cache has no residual segment")
        return "none"
    policy = make_policy(spec)
    if token_stage(policy) is None and (cache.k_axis == "token" or cache.k_format == FLOAT_FORMAT):
        return "token"
    raise ValueError(f"append(in_place=True) supports the uncompressed cache and the per-token precision policies "
                     f"(int8, fp8, nvfp4, int4/int2 with k_axis='token'); cache.policy {spec.method!r} changes "
                     f"which entries survive (eviction, merging, a residual flush or channel-axis key groups) and "
                     f"has no in-place form: use append(..., in_place=False)")


def write_entries(buf: torch.Tensor, base: torch.Tensor, n: torch.Tensor, src: torch.Tensor) -> None:
    """``buf[b, h, base[b, h] + j] = src[b, h, j]`` for ``j < n[b, h]``, in place, with device-side indices.

    ``buf [B, H, C, *]``, ``src [B, H, L, *]``, ``base``/``n`` int64 ``[B, H]`` with ``base + n <= C`` (checked by
    the caller). Every one of the L source slots of a row writes (a fixed-shape scatter, no data-sized selection):
    slot ``j`` targets ``t = min(base + j, C - 1)`` and writes the value that slot must end with (``src[t - base]``
    when ``t`` receives a new entry, else ``buf[t]`` unchanged), so writers that share a target agree and the
    result does not depend on the scatter's order."""
    B, H, C = buf.shape[:3]
    L = src.shape[2]
    if C == 0 or L == 0:
        return
    j = torch.arange(L, device=buf.device)
    t = (base[..., None] + j).clamp(max=C - 1)                            # [B, H, L] target slot
    s = t - base[..., None]                                               # which new entry the slot ends with
    fresh = (s >= 0) & (s < n[..., None])
    trail = (1,) * (buf.dim() - 3)
    ti = t.view(B, H, L, *trail).expand(B, H, L, *buf.shape[3:])
    si = s.clamp(0, L - 1).view(B, H, L, *trail).expand(B, H, L, *buf.shape[3:])
    val = torch.where(fresh.view(B, H, L, *trail), torch.gather(src.to(buf.dtype), 2, si), torch.gather(buf, 2, ti))
    buf.scatter_(2, ti, val)


def append_in_place(cache: KVCache, key, value, positions=None, timestamps=None, lengths=None, offsets=None,
                    counts=None, stats=None) -> KVCache:
    """``KVCache.append(..., in_place=True)``: see the module docstring. Returns ``cache`` itself, grown."""
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}")
    family = in_place_family(cache)
    cache.validate()
    if cache.mass is not None:
        raise ValueError("append(in_place=True): cache.mass is set, but only a scoring policy keeps per-entry mass")
    C = cache.capacity
    if cache.length.numel():
        device_assert(((cache.length >= 0) & (cache.length <= C)).all(),
                      f"cache.length must be within [0, capacity={C}]")
    if counts is not None and cache.count is None:
        raise ValueError("counts: this cache stores no merge counts, so they cannot be written in place; reserve it "
                         "with cache.reserve(capacity, counts=True)")
    new = check_new_entries(cache, key, value, positions, timestamps, lengths, offsets, counts)
    B, H = cache.length.shape
    base = cache.length.to(torch.int64)
    n = new.n[:, None].expand(B, H)
    if B and H:
        device_assert((base + n <= C).all(), f"key: the new entries do not fit: length + appended entries exceeds "
                      f"the cache's capacity {C} for some user; reserve more room (cache.reserve(capacity))")
    orig = cache.original_length.to(torch.int64) + new.n
    if orig.numel():
        device_assert(orig.max() <= INT32_MAX, "original_length would overflow int32")
    if family == "none":
        fields = {"k": new.k, "v": new.v}
    else:
        fields = quantized_entries(cache, new.k, new.v, n.contiguous(), cache.group_size, "token")
    fields["position"] = new.pos
    if cache.timestamp is not None:
        fields["timestamp"] = new.ts
    if cache.count is not None:
        fields["count"] = new.cnt if new.cnt is not None else torch.ones(new.pos.shape, dtype=torch.float32,
                                                                          device=cache.device)
    for name, src in fields.items():
        write_entries(getattr(cache, name), base, n, src)
    cache.length.copy_((base + n).to(torch.int32))
    cache.original_length.copy_(orig.to(torch.int32))
    r = cache.residual
    if r is not None and r.original_length.data_ptr() != cache.original_length.data_ptr():
        r.original_length.copy_(orig.to(torch.int32))
    return cache


register_append(append_in_place, in_place=True)
