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

from ..core.formats import FLOAT_FORMAT, FORMATS, FP8_FORMAT, INT_FORMATS, K_AXES, format_bits, packed_width  # noqa: F401
from ..core.kvcache import KVCacheBase
from . import quant, wire


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
        ``s`` = 4 bytes for integer formats (fp16 scale + fp16 zero), 2 for fp8 (scale only).
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
