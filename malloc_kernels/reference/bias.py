"""HSTU's relative attention bias from ORIGINAL positions and timestamps (ARCHITECTURE.md, "Attention semantics").

HSTU (Zhai et al., "Actions Speak Louder than Words", ICML 2024, arXiv 2402.17152) adds to every score a learned
position term and a learned time term::

    bias_ij = pos_bias[h, clamp(p_i - p_j, 0, P - 1)] + time_bias[h, bucket(t_i - t_j)]
    bucket(dt) = min(floor(ln(max(|dt|, 1)) / 0.301), T - 1)

The bucket is defined exactly, by integer thresholds, in ``core/time_buckets.py`` (shared with every backend);
this module builds the dense bias the reference adds to its scores.

Integer ranges: ``t_i - t_j`` and ``p_i - p_j`` are never formed in int64 arithmetic (they can overflow, e.g. a
timestamp of -2**63): every backend takes ``|t_i - t_j|`` exactly and saturates it at 2**63 - 1 (no bucket
threshold lies above), and ``clamp(p_i - p_j, 0, P - 1)`` from the operands' order (``core/time_buckets.py``), so
buckets and position indices are identical everywhere for every int64 input.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..core.time_buckets import abs_diff_sat, pos_index, time_bucket, time_bucket_thresholds  # noqa: F401


def _per_head_gather(table: torch.Tensor, index: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``table [Hq, P]`` gathered at ``index [B, Hk, Lq, N]`` -> ``[B, Hq, Lq, N]``; query head h uses key-head
    slice ``h // (Hq // Hk)`` of the index (positions of a kv head's entries). No [B, Hq, Lq, N] index is built:
    the table is broadcast (stride 0) instead, which keeps the int64 index Hq/Hk times smaller."""
    B, Hk, Lq, N = index.shape
    if num_heads % Hk:
        raise ValueError(f"number of bias heads {num_heads} must be a multiple of the position heads {Hk}")
    G = num_heads // Hk
    P = table.shape[-1]
    src = table.reshape(1, Hk, G, 1, P).expand(B, Hk, G, Lq, P)
    out = torch.gather(src, -1, index[:, :, None].expand(B, Hk, G, Lq, N))
    return out.reshape(B, num_heads, Lq, N)


def _as_bias_table(bias: torch.Tensor, name: str, num_heads: Optional[int]) -> torch.Tensor:
    if bias.dim() == 1:
        return bias[None].expand(num_heads or 1, bias.shape[0])
    if bias.dim() != 2 or (num_heads is not None and bias.shape[0] != num_heads):
        raise ValueError(f"{name} must be [P] or [Hq, P], got {tuple(bias.shape)}")
    return bias


def relative_bias(query_positions: torch.Tensor, key_positions: torch.Tensor, pos_bias: Optional[torch.Tensor],
                  time_bias: Optional[torch.Tensor] = None, query_timestamps: Optional[torch.Tensor] = None,
                  key_timestamps: Optional[torch.Tensor] = None, num_heads: Optional[int] = None,
                  dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Dense relative bias ``[B, Hq, Lq, N]`` between queries and keys, in ``dtype`` (default: the tables' dtype;
    the two terms are added in ``dtype``, so float64 gives the exact sum of the table entries).

    query_positions/query_timestamps: int ``[B, Lq]``; key_positions/key_timestamps: int ``[B, N]`` (shared by all
    heads) or ``[B, Hk, N]`` (per kv head, e.g. a per-head evicted cache; query head h uses ``h // (Hq // Hk)``).
    pos_bias ``[P]`` or ``[Hq, P]``, time_bias ``[T]`` or ``[Hq, T]`` (either may be None, not both).
    ``num_heads`` (Hq) is needed only when both tables are 1-D and the key positions are per head.
    """
    if pos_bias is None and time_bias is None:
        raise ValueError("relative_bias needs pos_bias or time_bias")
    kp = key_positions if key_positions.dim() == 3 else key_positions[:, None]
    if num_heads is None:
        two_d = [t.shape[0] for t in (pos_bias, time_bias) if t is not None and t.dim() == 2]
        num_heads = two_d[0] if two_d else kp.shape[1]
    out = None
    if pos_bias is not None:
        table = _as_bias_table(pos_bias, "pos_bias", num_heads)
        P = table.shape[-1]
        rel = pos_index(query_positions[:, None, :, None], kp[:, :, None, :], P)
        out = _per_head_gather(table, rel, num_heads)
        out = out if dtype is None else out.to(dtype)
    if time_bias is not None:
        if query_timestamps is None or key_timestamps is None:
            raise ValueError("time_bias needs query_timestamps and key_timestamps")
        table = _as_bias_table(time_bias, "time_bias", num_heads)
        kt = key_timestamps if key_timestamps.dim() == 3 else key_timestamps[:, None]
        mag = abs_diff_sat(query_timestamps[:, None, :, None], kt[:, :, None, :])
        tb = _per_head_gather(table, time_bucket(mag, table.shape[-1]), num_heads)
        tb = tb if dtype is None else tb.to(dtype)
        out = tb if out is None else out + tb.to(out.dtype)
    return out
