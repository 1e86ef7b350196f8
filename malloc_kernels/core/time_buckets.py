"""HSTU's time buckets, defined exactly so that every backend computes the same integer.

HSTU (Zhai et al., "Actions Speak Louder than Words", ICML 2024, arXiv 2402.17152) buckets a time difference as
``bucket(dt) = min(floor(ln(max(|dt|, 1)) / 0.301), T - 1)``. A float logarithm differs between libraries by an ulp,
which moves dt values near a boundary to the neighbouring bucket, so the contract fixes the boundaries as integers:
``time_bucket_thresholds(T)`` lists, for k = 1..T-1, the smallest integer x >= 1 with floor(ln(x) / 0.301) >= k
(evaluated with float64 ``math.log``), and ``bucket(dt) = #{k : th[k] <= max(|dt|, 1)}``. Kernels evaluate a float
log and correct it by +/-1 against these thresholds (ARCHITECTURE.md, "Attention semantics").

Integer ranges: ``t_i - t_j`` and ``p_i - p_j`` are never formed in int64 arithmetic (they overflow for e.g. a
timestamp of -2**63): ``abs_diff_sat`` takes ``|t_i - t_j|`` exactly and saturates it at 2**63 - 1 (no threshold
lies above, so the bucket is exact), ``pos_index`` clamps ``p_i - p_j`` from the operands' order; the kernels do
the same in unsigned arithmetic (``bias.h``, ``decode.h``, ``triton/attention_common.py``).
"""
from __future__ import annotations

import math

import torch

BUCKET_DIVISOR = 0.301
_INT64_MAX = 2 ** 63 - 1


def _reaches(x: int, k: int) -> bool:
    """floor(ln(x) / 0.301) >= k, evaluated in float64 exactly as the contract states."""
    return math.floor(math.log(x) / BUCKET_DIVISOR) >= k


# Caches are plain dicts rather than functools.lru_cache: torch.compile traces a dict lookup without a warning.
_TUPLES: dict = {}
_KERNEL_TABLES: dict = {}


def _thresholds(T: int) -> tuple:
    if T in _TUPLES:
        return _TUPLES[T]
    out = []
    for k in range(1, T):
        # exp(0.301 k) lands within a few integers of the answer; walk to the exact float64 boundary.
        guess = math.exp(BUCKET_DIVISOR * k)
        if guess >= _INT64_MAX / 2:
            # Unreachable by any int64 time difference: the bucket is never taken.
            out.append(_INT64_MAX)
            continue
        x = max(1, int(math.ceil(guess)))
        while x > 1 and _reaches(x - 1, k):
            x -= 1
        while not _reaches(x, k):
            x += 1
        out.append(min(x, _INT64_MAX))
    _TUPLES[T] = tuple(out)
    return _TUPLES[T]


def time_bucket_thresholds(T: int) -> torch.Tensor:
    """int64 ``[T-1]``: element ``k-1`` is th[k], the smallest integer x >= 1 with floor(ln(x)/0.301) >= k.

    Non-decreasing (small k can share a threshold, e.g. th[1] = th[2] = 2). ``T`` is the number of time buckets
    (``time_bias.shape[-1]``); ``T == 1`` gives an empty tensor (every dt falls in bucket 0).
    """
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"T must be a positive int, got {T!r}")
    return torch.tensor(_thresholds(T), dtype=torch.int64)


def time_bucket(dt: torch.Tensor, T: int) -> torch.Tensor:
    """Bucket index (int64, same shape as ``dt``) of integer time differences: min(floor(ln(max(|dt|,1))/0.301), T-1).

    Computed exactly as ``#{k : th[k] <= max(|dt|, 1)}`` with ``th = time_bucket_thresholds(T)``.
    """
    if not isinstance(dt, torch.Tensor) or dt.is_floating_point():
        raise TypeError("dt must be an integer tensor (time differences)")
    th = time_bucket_thresholds(T).to(dt.device)
    mag = abs_diff_sat(dt, torch.zeros((), dtype=torch.int64, device=dt.device)).clamp_min(1)   # |-2**63| fits
    return torch.searchsorted(th, mag.contiguous(), right=True)


def abs_diff_sat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``min(|a - b|, 2**63 - 1)`` of int64 tensors (broadcast), exact: the int64 difference may wrap (torch
    integer arithmetic is modular), so a wrapped result is detected from the operands' order and saturated.
    Saturation never changes a time bucket (every threshold is <= 2**63 - 1)."""
    a, b = a.to(torch.int64), b.to(torch.int64)
    d = a - b
    ge = a >= b
    # a >= b: the true difference is >= 0, so a negative d means it wrapped past 2**63 - 1.
    # a < b: the true difference is < 0; d >= 0 means it wrapped, d == -2**63 has no int64 magnitude.
    big = torch.where(ge, d < 0, (d >= 0) | (d == -_INT64_MAX - 1))
    return torch.where(big, torch.full_like(d, _INT64_MAX), torch.where(ge, d, -d))


def pos_index(qp: torch.Tensor, kp: torch.Tensor, P: int) -> torch.Tensor:
    """``clamp(p_i - p_j, 0, P - 1)`` of int64 tensors (broadcast) with the difference taken exactly."""
    qp, kp = qp.to(torch.int64), kp.to(torch.int64)
    return torch.where(qp <= kp, torch.zeros((), dtype=torch.int64, device=qp.device),
                       abs_diff_sat(qp, kp).clamp_max(P - 1))


def kernel_thresholds(T: int) -> torch.Tensor:
    """int64 ``[T]``: the table the C++ kernels take, ``th[k]`` at index ``k`` (k = 1..T-1), index 0 unused
    (so ``bucket = #{k >= 1 : th[k] <= max(|dt|, 1)}`` indexes it directly). Cached per ``T``; do not modify."""
    table = _KERNEL_TABLES.get(T)
    if table is None:
        table = torch.cat([torch.zeros(1, dtype=torch.int64), time_bucket_thresholds(T)])
        _KERNEL_TABLES[T] = table
    return table
