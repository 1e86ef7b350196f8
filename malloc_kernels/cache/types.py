"""``KVCache``: the public compressed cache of one layer (the storage contract is ``core/kvcache.py``'s).

``KVCacheBase`` (``core/``) holds the tensors and their invariants, which is all the attention backends read;
this class adds what one does with a cache: dequantise it (``quant.py``), count its bytes exactly (``quant.py``)
and serialise one user (``wire.py``; ``serialize.cache_from_bytes`` reads it back). It is a pytree, so caches
pass through ``torch.compile`` and ``torch.utils._pytree`` utilities as containers of tensors.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.utils._pytree as pytree

from ..core.formats import (FLOAT_FORMAT, FORMATS, FP8_FORMAT, INT_FORMATS, K_AXES, NVFP4_FORMAT,  # noqa: F401
                            format_bits, packed_width)
from ..core.kvcache import KVCacheBase
from . import capacity as _capacity, quant, wire


# The policy maintenance behind ``KVCache.append`` lives in the policies layer, above this one: it registers itself
# here (``policies/online.py``, imported with ``malloc_kernels``), so the cache layer never imports upward.
_APPEND_IMPL = {}


def register_append(fn, *, in_place: bool = False) -> None:
    """Install the implementation of ``KVCache.append`` (``policies/online.py``) or of its ``in_place=True`` form
    (``policies/online_inplace.py``); each is called once, when ``malloc_kernels`` is imported."""
    _APPEND_IMPL[bool(in_place)] = fn


class KVCache(KVCacheBase):
    """One layer's (compressed) key/value cache for B users; see ``core/kvcache.py`` for the storage contract.

    Construct quantized caches with ``malloc_kernels.compress`` rather than by hand; ``validate()`` checks every
    shape/dtype rule (the attention entry point calls it), ``check_contents()`` the rules that read the data.
    """

    # ---- dequantisation, byte accounting, serialisation (implemented in quant.py / wire.py) ------------
    def dequantize(self, dtype: Optional[torch.dtype] = None):
        """``(k, v)`` floating ``[B, Hkv, C, D]`` of the main segment (residual excluded), exactly 0 on padding.

        Quantized payloads follow the storage rule (``code * scale + zero``; fp8 ``float(code) * scale``)
        evaluated in ``dtype``; ``dtype=None`` keeps a float payload's own dtype and gives float32 for
        quantized ones.
        """
        return quant.dequantize_cache(self, dtype)

    def nbytes_per_user(self) -> torch.Tensor:
        """Exact bytes stored per user, int64 ``[B]``: what ``to_bytes(b)`` writes minus its fixed framing.

        With ``L = length[b, h]``, ``D = head_dim``, ``G = group_size``, per segment (main, then residual)::

            4 * Hkv + 4                                   # per-head lengths (int32) + original_length (int32)
          + sum_h L * (row(k) + row(v) + 4 + 8*[timestamp] + 4*[count])
          + sum_h groups_k(L) * s_k + groups_v(L) * s_v   # quantized payloads only

        ``row`` = ``D * element_size`` (float) or ``ceil(D * bits / 8)`` (int8/int4/int2/fp8);
        ``groups(L)`` = ``L * D / G`` (token axis) or ``ceil(L / G) * D`` (channel axis, keys);
        ``s`` = 4 bytes for integer formats (fp16 scale + fp16 zero), 2 for fp8 (scale only), 1 for nvfp4 (an
        e4m3 scale; its token groups are ``L * ceil(D / 16)``): ``CacheFormat.scale_bytes`` of the format table.
        ``len(to_bytes(b)) == nbytes_per_user()[b] + wire.FRAMING_BYTES``.
        """
        return quant.nbytes_per_user(self)

    def nbytes_full_precision_per_user(self, dtype: torch.dtype = torch.float16) -> torch.Tensor:
        """int64 ``[B]``: bytes of the same users' native (uncompressed) cache at ``dtype``; the denominator of
        the "ratio to the full-precision cache" (see ``quant.nbytes_full_precision_per_user``)."""
        return quant.nbytes_full_precision_per_user(self, dtype)

    def to_bytes(self, user_index: int) -> bytes:
        """Serialise user ``user_index``'s valid entries losslessly (``malloc_kernels.cache_from_bytes`` reads it)."""
        return wire.cache_to_bytes(self, user_index)

    # ---- online maintenance (implemented in policies/online.py) ---------------------------------------------
    def reserve(self, capacity: int, *, counts: bool = False) -> "KVCache":
        """The same cache with room for ``capacity`` entries per (user, kv head), for ``append(...,
        in_place=True)``.

        Every per-entry tensor (``k``, ``v``, ``position``, ``timestamp``, ``count``, ``mass``, token-axis scales
        and zeros; channel-axis key scales/zeros to ``ceil(capacity / group_size)`` groups) is zero-padded along
        the entry axis to ``capacity``: padding beyond ``length``, which the storage contract allows and no
        computation reads, so attention over the result equals attention over ``self``. The result owns all its
        buffers (``length`` and ``original_length`` included; the residual segment, if any, is copied as is), so
        growing it in place never changes ``self``. ``counts=True`` also stores merge counts (1 for every stored
        entry) when the cache has none, so that later in-place appends can take ``counts=``.
        ``capacity`` below the current capacity is a ValueError (reserve never drops entries); the contents are
        checked once here (``check_contents``), and each in-place append checks only what it writes.
        """
        return _capacity.reserve_cache(self, capacity, counts=counts)

    def append(self, key, value, positions=None, timestamps=None, *, lengths=None, offsets=None, counts=None,
               stats=None, in_place: bool = False) -> "KVCache":
        """The cache with new entries appended after every existing one, kept within its policy's budget.

        key, value: ``[B, Hkv, L, D]`` floating (``lengths [B]``: new entries per user, default ``L``) or jagged
        ``[total, Hkv, D]`` with ``offsets [B+1]``; positions: int ``[L]``/``[B, L]``/``[B, Hkv, L]`` (default: each
        user's ``original_length + arange``), strictly increasing and after every stored position; timestamps:
        int64 likewise, required exactly when the cache carries timestamps; counts: optional merge counts (> 0).
        stats: the ``AttentionStats`` of the serving call that produced these keys (``attention(...,
        cache=self, return_stats=True)``), required by the scoring policies. Returns a new checked cache;
        ``original_length`` grows by the number of appended entries. ``policies/online.py`` says, per policy,
        what equals ``compress`` of the whole history and what is an online invariant.

        ``in_place=True`` (the CUDA-graph capturable form, for a cache from ``reserve``): the new entries are
        written at each row's ``length`` into this cache's own buffers (device-side indices, no host read, no
        allocation sized by data), ``length`` and ``original_length`` are updated in place, and ``self`` is
        returned. The result is bit-identical, over valid entries, to the functional append. A row that would
        exceed ``capacity`` is a device assert (a ValueError naming ``key`` on CPU tensors). Supported: the
        uncompressed cache (policy None or ``"none"``) and the per-token precision policies (``int8``, ``fp8``,
        ``nvfp4``, ``int4``/``int2`` with ``k_axis="token"``: the new rows are quantized on their own and their
        codes and scales written in place). Policies whose append changes which entries survive (eviction and
        merging, hybrids, KIVI/IntactKV's residual flush, channel-axis key groups) raise ValueError: their kept
        set is recomputed from the whole grown history, so they have no in-place form; use the functional
        append. Counts can only be written into a cache that stores them (``reserve(..., counts=True)``).
        Jagged input (``offsets=``) reads its longest user on the host; a captured step passes dense
        ``[B, Hkv, L, D]`` entries with ``lengths=``.
        """
        if not isinstance(in_place, bool):
            raise TypeError(f"in_place must be a bool, got {type(in_place).__name__}")
        if in_place not in _APPEND_IMPL:
            raise RuntimeError("KVCache.append needs the policies layer: import malloc_kernels (it registers "
                               "policies.online.append_cache and policies.online_inplace.append_in_place here)")
        return _APPEND_IMPL[in_place](self, key, value, positions=positions, timestamps=timestamps,
                                      lengths=lengths, offsets=offsets, counts=counts, stats=stats)


def _flatten(cache: KVCache):
    children = [getattr(cache, f) for f in KVCache._TENSOR_FIELDS]
    static = tuple(getattr(cache, f) for f in KVCache._STATIC_FIELDS) + (tuple(sorted(cache.meta.items())),)
    return children, static


def _unflatten(children, static):
    kwargs = dict(zip(KVCache._TENSOR_FIELDS, children))
    kwargs.update(zip(KVCache._STATIC_FIELDS, static[:-1]))
    kwargs["meta"] = dict(static[-1])
    return KVCache(**kwargs)


def _flatten_with_keys(cache: KVCache):
    children, static = _flatten(cache)
    return [(pytree.GetAttrKey(f), c) for f, c in zip(KVCache._TENSOR_FIELDS, children)], static


def _register_pytree():
    pytree.register_pytree_node(KVCache, _flatten, _unflatten, serialized_type_name="malloc_kernels.KVCache",
                                flatten_with_keys_fn=_flatten_with_keys)


_register_pytree()
