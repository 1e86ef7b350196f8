"""Hybrid policies (MALLOC's "hybrid" level): a token stage followed by a precision stage, e.g. ``"h2o+kivi4"``.

``"a+b"``: ``a`` is a pruning or merging method, ``b`` a precision method (``int8``, ``fp8``, ``int4``,
``int2``, ``nvfp4``, ``kivi``/``kivi4``/``kivi2``, ``intactkv``...). ``a`` runs at the budget; ``b`` then re-encodes exactly
the entries ``a`` kept (per-head lengths, original positions/timestamps/counts and the pre-compression
``original_length`` carried through), so the result is identical to running ``b`` on a history made of ``a``'s
output, and its bytes are the sum of its parts: ``a``'s kept entries' metadata (positions, timestamps, counts,
headers) plus ``b``'s payload, scales and residual for those entries.

Parameters go to the stage whose constructor takes them (to both if both do); ``<method>__<param>`` (e.g.
``h2o__window=8``) targets one stage explicitly. History extras (``queries``, ``kind``, ``layer``...) go to ``a``.
A token budget is ``a``'s; ``Budget(bytes=X)`` keeps the largest number of ``a``-tokens whose final (quantized)
cache fits ``X`` bytes per user. With a KIVI/IntactKV second stage the bytes are not monotone in that count (one
more token can complete a key group and move ``group_size`` entries from the full-precision tail into the
quantized part), so the bisection guarantees a count that fits and whose successor does not, not necessarily the
global maximum. IntactKV as ``b`` takes its pivot scores from ``a``'s statistics, looked up by
original position (merged entries: their representative's mass).
"""
from __future__ import annotations

import inspect

import torch

from .budget import Budget, largest_fitting, parse_budget
from .base import Policy, PolicyInput
from .registry import get_policy, policy_level
from .selection import EXTRA_KEYS, attention_mass, canonical_rows


def _init_params(cls):
    return {p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "budget", "seed")} - \
        {"extra", "params"}


class HybridPolicy(Policy):
    """``"a+b"``: token stage ``a`` at the budget, then precision stage ``b`` on what ``a`` kept."""

    level = "hybrid"

    def __init__(self, method: str, budget=None, seed=0, **params):
        parts = method.split("+")
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"hybrid method must be 'a+b' (a pruning/merging method then a precision method), "
                             f"got {method!r}")
        self.name = method
        a_cls, b_cls = get_policy(parts[0]), get_policy(parts[1])
        if policy_level(a_cls) not in ("pruning", "merging"):
            raise ValueError(f"{method}: the first stage {parts[0]!r} must be a pruning or merging method")
        if policy_level(b_cls) != "precision":
            raise ValueError(f"{method}: the second stage {parts[1]!r} must be a precision method")
        self.budget = parse_budget(budget, method)
        extras = {k: params.pop(k) for k in list(params) if k in EXTRA_KEYS}
        a_params, b_params = {}, {}
        a_names, b_names = _init_params(a_cls), _init_params(b_cls)
        for key, val in params.items():
            if "__" in key:
                stage, p = key.split("__", 1)
                if stage == parts[0]:
                    a_params[p] = val
                elif stage == parts[1]:
                    b_params[p] = val
                else:
                    raise ValueError(f"{method}: parameter {key!r} names no stage ({parts[0]!r} or {parts[1]!r})")
                continue
            targets = [d for d, names in ((a_params, a_names), (b_params, b_names)) if key in names]
            if not targets:
                raise ValueError(f"{method}: unknown parameter {key!r}; {parts[0]} takes {sorted(a_names)}, "
                                 f"{parts[1]} takes {sorted(b_names)}")
            for d in targets:
                d[key] = val
        a_budget = self.budget
        if a_budget is not None and a_budget.is_bytes:
            a_budget = Budget(ratio=1.0)     # placeholder: the bytes search drives stage a's token counts
        self.first = a_cls(budget=a_budget, seed=seed, **a_params, **extras)
        self.second = b_cls(budget=None, seed=seed, **b_params)
        self.extra = extras

    def compress(self, inp: PolicyInput):
        rows = canonical_rows(inp)
        need_mass = getattr(self.second, "pivots", 0) > 0
        mass = attention_mass(self.first, inp, rows) if need_mass else None
        if self.budget is not None and self.budget.is_bytes:
            first = self.first
            ctx = first.prepare(inp, rows)
            B, H = rows.n.shape
            n_user = rows.n.max(dim=1).values

            def per_row(kb):
                return torch.minimum(kb.to(rows.n.device)[:, None].expand(B, H), rows.n)

            def run(kb):
                return self._second(first.select(rows, ctx, per_row(kb)), rows, mass)

            cache, k_user = largest_fitting(run, n_user.clamp(max=1), n_user, self.budget.bytes, self.name,
                                            f"{self.name.split('+')[0]} tokens", affine=True)
            if first.bytes_over_layers():
                cache = self._second(first.select(rows, ctx, first.row_budgets(inp, rows, per_row(k_user))),
                                     rows, mass)
            return cache
        return self._second(self.first.compress(inp), rows, mass)

    def _second(self, c1, rows, mass):
        """Run the precision stage on stage ``a``'s cache ``c1``."""
        stats = None
        if mass is not None:
            # look the (canonical) history mass up by original position: rows.pos is sorted on valid slots
            big = torch.iinfo(torch.int64).max
            key = torch.where(rows.valid(), rows.pos.to(torch.int64), torch.full_like(rows.pos, 0,
                                                                                    dtype=torch.int64) + big)
            slot = torch.searchsorted(key.contiguous(), c1.position.to(torch.int64).contiguous())
            stats = torch.gather(mass, 2, slot.clamp(max=mass.shape[-1] - 1))
        inp2 = PolicyInput(k=c1.k, v=c1.v, lengths=c1.length.max(dim=1).values if c1.length.shape[1] else
                           torch.zeros(c1.length.shape[0], dtype=torch.int32, device=c1.k.device),
                           positions=c1.position, timestamps=c1.timestamp, counts=c1.count, stats=stats,
                           extra={}, head_lengths=c1.length, original_lengths=c1.original_length)
        return self.second.compress(inp2).replace(original_length=c1.original_length)
