"""PyTorch reference (the oracle) of the product-key memory search and of the sparse gather.

Product-key memory (Lample et al. 2019, "Large Memory Layers with Product Keys", arXiv 1907.05242; used by MSN,
arXiv 2602.07526). Per head h the memory has ``M = S * S`` slots whose key is the concatenation of two sub-keys,
``key(i1, i2) = [K[h, 0, i1], K[h, 1, i2]]``. A query ``q = [q1, q2]`` (two halves of width ``Dh = Dk / 2``) scores
slot ``i = i1 * S + i2`` as ``s(i) = s1(i1) + s2(i2)`` with ``s1 = <q1, K[h,0,:]>`` and ``s2 = <q2, K[h,1,:]>``.

Shapes: query ``[N, H, Dk]``; subkeys ``[H, 2, S, Dk/2]``; scores/indices ``[N, H, k]`` (indices int64 flat slot ids
``i1 * S + i2`` in ``[0, S*S)``); values ``[M, Dv]``; gather indices/weights ``[N, E]`` (``E = H * k`` after flattening
heads: the heads' weighted rows are summed, as in Lample et al.'s multi-head memory).

Ranking rule (the contract every backend reproduces exactly). Each half ranks its sub-keys by score descending, equal
scores by lower sub-key index; ``r1(i1)``/``r2(i2)`` are those ranks. Slots rank by ``fl(s1 + s2)`` descending, then
``r1`` ascending, then ``r2`` ascending. When the halves tie exactly this is "lower flat index wins"; the rank-based
tie break only differs when two different half-score pairs round to the same float sum, and it is what makes the
two-stage search exact in floating point:

  Claim: the top-k slots lie in ``C1 x C2``, ``C1``/``C2`` the top-k sub-keys of each half under the half order.
  Proof: take a slot ``(i1, i2)`` with ``i1 not in C1``. Each of the k members ``j1`` of ``C1`` has ``s1(j1) >= s1(i1)``
  and ``r1(j1) < r1(i1)``. Float rounding is monotone, so ``fl(s1(j1) + s2(i2)) >= fl(s1(i1) + s2(i2))`` and on
  equality the ``r1`` tie break ranks ``(j1, i2)`` first: k slots rank strictly before ``(i1, i2)``, so it is not in
  the top-k. The same argument with ``r1`` equal and ``r2`` deciding covers ``i2 not in C2``. QED.
  (With a flat-index tie break instead, a pair whose ``s1`` is larger but whose index is larger could round to the
  same sum and lose, and the argument fails.)

NaN scores are not supported (the order is undefined); ``k <= S`` is required.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = [
    "half_scores", "half_ranks", "pkm_topk_bruteforce", "pkm_topk", "pkm_gather", "pkm_gather_backward",
    "pkm_gather_naive", "slot_usage",
]


def _check_search_args(query: torch.Tensor, subkeys: torch.Tensor, k: int) -> Tuple[int, int, int, int, int]:
    if not isinstance(query, torch.Tensor):
        raise TypeError(f"query must be a tensor, got {type(query).__name__}")
    if not isinstance(subkeys, torch.Tensor):
        raise TypeError(f"subkeys must be a tensor, got {type(subkeys).__name__}")
    if query.dim() != 3:
        raise ValueError(f"query must be [N, H, Dk], got shape {tuple(query.shape)}")
    if subkeys.dim() != 4 or subkeys.shape[1] != 2:
        raise ValueError(f"subkeys must be [H, 2, S, Dk/2], got shape {tuple(subkeys.shape)}")
    n, h, dk = query.shape
    if dk % 2 != 0:
        raise ValueError(f"query's last dim Dk must be even (two halves), got {dk}")
    if subkeys.shape[0] != h or subkeys.shape[3] != dk // 2:
        raise ValueError(f"subkeys shape {tuple(subkeys.shape)} does not match query [N, H={h}, Dk={dk}]: "
                         f"expected [{h}, 2, S, {dk // 2}]")
    if not query.is_floating_point() or query.dtype != subkeys.dtype:
        raise TypeError(f"query and subkeys must share one floating dtype, got {query.dtype} and {subkeys.dtype}")
    s = subkeys.shape[2]
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= s:
        raise ValueError(f"k must be in [1, S={s}], got {k}")
    return n, h, dk, s, k


def half_scores(query: torch.Tensor, subkeys: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``s1 [N, H, S] = <q1, K[h,0]>`` and ``s2 [N, H, S] = <q2, K[h,1]>`` (differentiable)."""
    dh = query.shape[-1] // 2
    s1 = torch.einsum("nhd,hsd->nhs", query[..., :dh], subkeys[:, 0])
    s2 = torch.einsum("nhd,hsd->nhs", query[..., dh:], subkeys[:, 1])
    return s1, s2


def half_ranks(s: torch.Tensor) -> torch.Tensor:
    """Rank of each sub-key within its half: score descending, equal scores by lower index (stable sort)."""
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(s.shape[-1], device=s.device).expand_as(order).contiguous())
    return ranks


def _lexsort_topk(keys, k: int) -> torch.Tensor:
    """Positions of the k smallest rows of ``keys`` (list of [..., L] tensors, most significant first)."""
    order = torch.arange(keys[0].shape[-1], device=keys[0].device).expand_as(keys[0])
    for key in reversed(keys):
        sorted_key = torch.gather(key, -1, order)
        perm = torch.sort(sorted_key, dim=-1, stable=True).indices
        order = torch.gather(order, -1, perm)
    return order[..., :k]


def pkm_topk_bruteforce(query: torch.Tensor, subkeys: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k over all ``M = S*S`` slots by materialising every score (O(N H S^2): tests only).

    Returns ``(scores [N, H, k], indices [N, H, k] int64)``, best first, under the module's ranking rule.
    """
    n, h, dk, s, k = _check_search_args(query, subkeys, k)
    s1, s2 = half_scores(query, subkeys)
    r1, r2 = half_ranks(s1), half_ranks(s2)
    full = (s1[..., :, None] + s2[..., None, :]).reshape(n, h, s * s)
    rr1 = r1[..., :, None].expand(n, h, s, s).reshape(n, h, s * s)
    rr2 = r2[..., None, :].expand(n, h, s, s).reshape(n, h, s * s)
    pos = _lexsort_topk([-full.detach(), rr1, rr2], k)
    return torch.gather(full, -1, pos), pos


def pkm_topk(query: torch.Tensor, subkeys: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Two-stage product-key search (exact, see the module docstring's proof); differentiable in the scores.

    Stage 1: top-k of each half (``C1``, ``C2``, ordered best first). Stage 2: the k x k sums ``s1[C1] + s2[C2]``,
    ranked by (sum desc, position in C1 asc, position in C2 asc) — the position in ``C`` is the half rank — top-k.
    Returns ``(scores [N, H, k], indices [N, H, k] int64 = i1 * S + i2)``, best first.
    """
    n, h, dk, s, k = _check_search_args(query, subkeys, k)
    s1, s2 = half_scores(query, subkeys)
    c1 = torch.sort(s1.detach(), dim=-1, descending=True, stable=True).indices[..., :k]
    c2 = torch.sort(s2.detach(), dim=-1, descending=True, stable=True).indices[..., :k]
    v1, v2 = torch.gather(s1, -1, c1), torch.gather(s2, -1, c2)
    cand = (v1[..., :, None] + v2[..., None, :]).reshape(n, h, k * k)
    # Flattened candidate position a * k + b is already the (r1, r2) lexicographic tie order.
    pos = torch.sort(cand.detach(), dim=-1, descending=True, stable=True).indices[..., :k]
    a, b = pos // k, pos % k
    idx = torch.gather(c1, -1, a) * s + torch.gather(c2, -1, b)
    return torch.gather(cand, -1, pos), idx


def _check_gather_args(values, indices, weights):
    if not isinstance(values, torch.Tensor) or values.dim() != 2:
        raise ValueError(f"values must be a [M, Dv] tensor, got {getattr(values, 'shape', type(values).__name__)}")
    if not isinstance(indices, torch.Tensor) or indices.dim() != 2:
        raise ValueError(f"indices must be a [N, E] tensor, got {getattr(indices, 'shape', type(indices).__name__)}")
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"indices must be int64 or int32, got {indices.dtype}")
    if not isinstance(weights, torch.Tensor) or weights.shape != indices.shape:
        raise ValueError(f"weights must have the indices' shape {tuple(indices.shape)}, "
                         f"got {getattr(weights, 'shape', type(weights).__name__)}")
    if not values.is_floating_point() or weights.dtype != values.dtype:
        raise TypeError(f"values and weights must share one floating dtype, got {values.dtype} and {weights.dtype}")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= values.shape[0]):
        raise ValueError(f"indices must lie in [0, M={values.shape[0]})")


def pkm_gather(values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sparse-Gather forward: ``out[n] = sum_e weights[n, e] * values[indices[n, e]]`` -> ``[N, Dv]``.

    Differentiable (dense gradients); accumulates in float64 for float64 inputs, else in the input dtype.
    """
    _check_gather_args(values, indices, weights)
    rows = values[indices.long()]  # [N, E, Dv]
    return torch.einsum("ne,ned->nd", weights, rows)


def pkm_gather_naive(values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                     grad_out: torch.Tensor):
    """The straightforward PyTorch forward+backward (gather + einsum + index_add), the benchmark baseline.

    Returns ``(out [N, Dv], grad_weights [N, E], grad_values [M, Dv] dense)``.
    """
    idx = indices.long()
    rows = values[idx]
    out = torch.einsum("ne,ned->nd", weights, rows)
    grad_weights = torch.einsum("nd,ned->ne", grad_out, rows)
    contrib = weights[..., None] * grad_out[:, None, :]
    grad_values = torch.zeros_like(values).index_add_(0, idx.reshape(-1), contrib.reshape(-1, values.shape[1]))
    return out, grad_weights, grad_values


def pkm_gather_backward(grad_out: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                        weights: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse-Gather backward with the sparse value gradient.

    ``grad_weights[n, e] = <grad_out[n], values[indices[n, e]]>``; value gradient only on the touched rows:
    ``rows`` = sorted unique ``indices`` (int64 ``[U]``), ``grad_rows[u] = sum_{(n,e): indices[n,e]=rows[u]}
    weights[n, e] * grad_out[n]`` (``[U, Dv]``). ``(rows, grad_rows)`` is a coalesced COO gradient of ``values``.
    """
    _check_gather_args(values, indices, weights)
    idx = indices.long()
    grad_weights = torch.einsum("nd,ned->ne", grad_out, values[idx])
    rows, inverse = torch.unique(idx.reshape(-1), sorted=True, return_inverse=True)
    contrib = (weights[..., None] * grad_out[:, None, :]).reshape(-1, values.shape[1])
    grad_rows = torch.zeros(rows.numel(), values.shape[1], dtype=values.dtype, device=values.device)
    grad_rows.index_add_(0, inverse, contrib)
    return grad_weights, rows, grad_rows


def slot_usage(indices: torch.Tensor, num_slots: int, weights: Optional[torch.Tensor] = None) -> dict:
    """Slot-usage statistics of a batch of retrievals (collapse diagnostics, MSN sec. on balanced memory use).

    ``counts[m]`` = number of times slot m was selected (or the summed weights when given);
    ``p = counts / counts.sum()``. Returns ``{"fraction_hit": #{m: counts[m] > 0} / M,
    "kl_to_uniform": sum_m p_m log(p_m M)`` (0 for perfectly balanced use, ``log M`` for total collapse onto one
    slot), ``"counts"``}. ``kl_to_uniform`` is computed in float64.
    """
    if not isinstance(num_slots, int) or isinstance(num_slots, bool) or num_slots < 1:
        raise ValueError(f"num_slots must be a positive int, got {num_slots!r}")
    idx = indices.reshape(-1).long()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num_slots):
        raise ValueError(f"indices must lie in [0, num_slots={num_slots})")
    w = None if weights is None else weights.reshape(-1).to(torch.float64)
    if w is not None and w.numel() != idx.numel():
        raise ValueError(f"weights must have the indices' number of elements {idx.numel()}, got {w.numel()}")
    counts = torch.bincount(idx, weights=w, minlength=num_slots).to(torch.float64)
    total = counts.sum()
    hit = float((counts > 0).sum()) / num_slots
    if total <= 0:
        return {"fraction_hit": hit, "kl_to_uniform": 0.0, "counts": counts}
    p = counts / total
    nz = p > 0
    kl = float((p[nz] * torch.log(p[nz] * num_slots)).sum())
    return {"fraction_hit": hit, "kl_to_uniform": kl, "counts": counts}
