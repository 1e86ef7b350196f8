"""Budgets of the compression policies: a token ratio, an absolute token count, or bytes per user.

A budget is given to ``compress(..., budget=...)`` as

* a ``float`` in ``(0, 1]`` -- a token ratio: user b keeps ``k_b = max(1, floor(ratio * n_b))`` entries
  (``0`` when ``n_b == 0``), where ``n_b`` is the user's history length;
* an ``int >= 1`` -- absolute tokens: ``k_b = min(tokens, n_b)``;
* ``Budget(bytes=X)`` -- at most ``X`` bytes per user for this layer's cache, counted by
  ``KVCache.nbytes_per_user()`` (payload, scales, zeros, positions, timestamps, counts, residual). The policy
  picks the LARGEST configuration that fits (most kept tokens for pruning/merging, longest full-precision residual
  for precision methods), found per user by bisection over that configuration knob, which is valid because the
  byte count is non-decreasing in it. ``Budget(ratio=...)`` / ``Budget(tokens=...)`` are the explicit spellings of
  the first two forms.

Token budgets count stored entries (main + residual segment) per (user, kv head). A budget at or above the
history keeps everything.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from ..cache.types import KVCache


@dataclass(frozen=True)
class Budget:
    """Exactly one of ``ratio`` (float in (0, 1]), ``tokens`` (int >= 1) or ``bytes`` (int >= 1, per user)."""

    ratio: Optional[float] = None
    tokens: Optional[int] = None
    bytes: Optional[int] = None

    def __post_init__(self):
        given = [n for n in ("ratio", "tokens", "bytes") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(f"Budget takes exactly one of ratio=, tokens=, bytes=; got {given or 'none'}")
        if self.ratio is not None:
            r = self.ratio
            if isinstance(r, bool) or not isinstance(r, numbers.Real) or not (0.0 < float(r) <= 1.0) \
                    or math.isnan(float(r)):
                raise ValueError(f"budget ratio must be a float in (0, 1], got {r!r}")
            object.__setattr__(self, "ratio", float(r))
        for name in ("tokens", "bytes"):
            x = getattr(self, name)
            if x is None:
                continue
            if isinstance(x, bool) or not isinstance(x, numbers.Integral):
                raise ValueError(f"budget {name} must be an int >= 1, got {x!r}")
            if int(x) < 1:
                raise ValueError(f"budget {name} must be >= 1, got {x}")
            object.__setattr__(self, name, int(x))

    @property
    def is_bytes(self) -> bool:
        return self.bytes is not None

    def __str__(self):
        if self.ratio is not None:
            return f"ratio {self.ratio:g}"
        if self.tokens is not None:
            return f"{self.tokens} tokens"
        return f"{self.bytes} bytes/user"


def parse_budget(budget, method: str) -> Optional[Budget]:
    """``None`` | float ratio | int tokens | ``Budget`` -> ``Budget`` (or None); ValueError naming ``method``."""
    if budget is None or isinstance(budget, Budget):
        return budget
    if isinstance(budget, torch.Tensor) and budget.numel() == 1:
        budget = budget.item()
    if isinstance(budget, bool):
        raise ValueError(f"{method}: budget must be a ratio in (0, 1], an int >= 1 or a Budget, got {budget!r}")
    try:
        if isinstance(budget, numbers.Integral):
            return Budget(tokens=budget)
        if isinstance(budget, numbers.Real):
            return Budget(ratio=budget)
    except ValueError as e:
        raise ValueError(f"{method}: {e}") from None
    raise ValueError(f"{method}: budget must be a ratio in (0, 1], an int >= 1 or a Budget, got {budget!r}")


def token_budgets(budget: Budget, lengths: torch.Tensor) -> torch.Tensor:
    """Per-user kept-entry counts ``k_b`` (int64, same shape as ``lengths``) of a ratio/token budget."""
    n = lengths.to(torch.int64)
    if budget.ratio is not None:
        # the 1e-9 guards float products like 0.29 * 100 = 28.999999999999996 from losing a token
        k = torch.floor(n.to(torch.float64) * budget.ratio + 1e-9).to(torch.int64).clamp(min=1)
    elif budget.tokens is not None:
        k = torch.full_like(n, budget.tokens)
    else:
        raise ValueError("a bytes budget has no token count; use largest_fitting")
    return torch.minimum(k, n)


def nbytes_per_user(cache: KVCache) -> torch.Tensor:
    """Exact bytes per user of ``cache`` (int64 ``[B]``), from ``KVCache.nbytes_per_user`` (cache/quant.py)."""
    if not hasattr(cache, "nbytes_per_user"):
        raise RuntimeError("KVCache.nbytes_per_user is not available (cache/quant.py missing); "
                           "bytes budgets need it")
    return torch.as_tensor(cache.nbytes_per_user(), dtype=torch.int64).reshape(-1).cpu()


def largest_fitting(run: Callable[[torch.Tensor], KVCache], lo: torch.Tensor, hi: torch.Tensor, limit: int,
                    method: str, knob: str, affine: bool = False) -> Tuple[KVCache, torch.Tensor]:
    """Largest per-user integer ``knob`` in ``[lo_b, hi_b]`` whose cache ``run(knob)`` fits ``limit`` bytes.

    ``run`` maps an int64 ``[B]`` knob tensor to the policy's cache; bytes must be non-decreasing in the knob for
    each user (true for kept-token counts and residual lengths). Users are independent, so a user gets the same
    answer alone or in any batch. Raises ValueError when even ``lo`` does not fit for some user. ``affine=True``
    (bytes expected to be affine in the knob) narrows the search with a prediction; a wrong prediction only
    costs time, since the bisection still checks every candidate with ``run``.

    ``lo``/``hi`` stay on their device (the caches' device: no copy to the host). The search itself reads the
    host once per probe round (``while (lo < hi).any()``): the number of probes depends on the data, and each
    probe builds a cache sized by the knob, so a byte-budget policy has no fixed-shape (capturable) form; its
    append is the functional one (``append(..., in_place=True)`` refuses it).
    """
    lo = lo.to(torch.int64).clone()
    hi = torch.maximum(hi.to(device=lo.device, dtype=torch.int64), lo)
    if affine and bool((hi > lo).any()):
        # bytes are affine in the knob for token policies (every stored entry costs the same): two cheap probes
        # at the top of the range predict the answer; the bisection below then only confirms it (2 more runs)
        top = nbytes_per_user(run(hi))
        slope = (top - nbytes_per_user(run(torch.maximum(hi - 1, lo)))).clamp(min=1)
        over = (top - limit).clamp(min=0)
        pred = torch.maximum(hi - (over + slope - 1) // slope, lo)
        fits = nbytes_per_user(run(pred)) <= limit
        # monotone bytes: a fitting prediction is a lower bound, a failing one an upper bound
        hi = torch.where(fits, hi, torch.maximum(pred - 1, lo))
        lo = torch.where(fits, pred, lo)
        nxt = torch.minimum(lo + 1, hi)
        nfit = nbytes_per_user(run(nxt)) <= limit
        open_ = fits & (lo < hi)
        hi = torch.where(open_ & ~nfit, lo, hi)
        lo = torch.where(open_ & nfit, nxt, lo)
    cache = run(lo)
    need = nbytes_per_user(cache)
    bad = need > limit
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        raise ValueError(f"{method}: bytes budget {limit} per user is too small: user {b} needs at least "
                         f"{int(need[b])} bytes (smallest {knob} = {int(lo[b])})")
    best = cache
    while bool((lo < hi).any()):
        mid = (lo + hi + 1) // 2
        cache = run(mid)
        fit = nbytes_per_user(cache) <= limit
        lo = torch.where(fit, mid, lo)
        hi = torch.where(fit, hi, mid - 1)
        if bool(fit.all()) and bool((mid == lo).all()):
            best = cache
        else:
            best = None
    if best is None:
        best = run(lo)
    return best, lo
