"""Precision policies with a full-precision residual (MALLOC's "precision" level): ``kivi`` and ``intactkv``.

Both keep EVERY history entry. The main segment holds the quantized entries (keys per-channel over groups of
``group_size`` consecutive entries, values per-token over groups of ``group_size`` channels, asymmetric integer
codes with fp16 scale/zero, by ``ops.quantize.quantize_cache``: the C++ packer on CPU tensors); the residual segment holds the entries kept in
full precision. Both segments are sorted by original position and carry original positions/timestamps/counts.

Budgets: a token budget must keep everything (``None``, ratio 1.0 or tokens >= the history); to drop tokens
compose with a pruning/merging method (``"h2o+kivi4"``). ``Budget(bytes=X)`` picks the largest residual window
``residual`` (0 .. history length) whose cache fits ``X`` bytes per user, so a budget of at least the
full-precision size keeps everything in full precision and reproduces full attention exactly.

Aliases ``kivi4``/``kivi2``/``kivi8`` and ``intactkv4``/``intactkv2``/``intactkv8`` fix ``bits``.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..ops.quantize import quantize_cache
from .budget import largest_fitting
from .registry import register_policy
from .selection import (BasePolicy, Rows, attention_mass, build_cache, canonical_rows, check_int, first_tier,
                        select_top)

BITS = (2, 4, 8)


def default_group_size(head_dim: int, cap: int = 32) -> int:
    """KIVI's group size 32, clipped to the largest divisor of ``head_dim`` that is <= 32 (groups tile D)."""
    for g in range(min(head_dim, cap), 0, -1):
        if head_dim % g == 0:
            return g
    return 1


class ResidualQuantPolicy(BasePolicy):
    """Shared logic: split each row into (quantized main, full-precision residual) and quantize the main part."""

    level = "precision"
    needs_budget = False
    fixed_bits: Optional[int] = None

    def __init__(self, budget=None, seed=0, bits: Optional[int] = None, group_size: Optional[int] = None,
                 residual: int = 32, **extra):
        super().__init__(budget, seed, **extra)
        if bits is None:
            bits = self.fixed_bits if self.fixed_bits is not None else 4
        elif self.fixed_bits is not None and bits != self.fixed_bits:
            raise ValueError(f"{self.name}: bits is fixed to {self.fixed_bits} by the method name, got bits={bits}")
        if isinstance(bits, bool) or bits not in BITS:
            raise ValueError(f"{self.name}: bits must be one of {BITS}, got {bits!r}")
        self.bits = int(bits)
        self.group_size = check_int(group_size, "group_size", self.name, lo=1, allow_none=True)
        self.residual = check_int(residual, "residual", self.name, lo=0)
        b = self.budget
        if b is not None and not b.is_bytes and not (b.ratio == 1.0 or b.tokens is not None):
            raise ValueError(f"{self.name}: keeps every token, so a token budget must be None, 1.0 or >= the "
                             f"history length (compose with a pruning method, e.g. 'h2o+{self.name}', to drop "
                             f"tokens); got {b}")

    @property
    def fmt(self) -> str:
        return f"int{self.bits}"

    def resolve_group_size(self, head_dim: int) -> int:
        if self.group_size is None:
            return default_group_size(head_dim)
        if head_dim % self.group_size:
            raise ValueError(f"{self.name}: group_size={self.group_size} must divide head_dim {head_dim} "
                             f"(value groups tile the channels)")
        return self.group_size

    def compress(self, inp):
        rows = canonical_rows(inp)
        G = self.resolve_group_size(rows.k.shape[-1])
        B, H = rows.n.shape
        b = self.budget
        if b is not None and b.tokens is not None and bool((rows.n > b.tokens).any()):
            raise ValueError(f"{self.name}: keeps every token but the budget is {b.tokens} tokens < history "
                             f"length {int(rows.n.max())}; compose with a pruning method, e.g. 'h2o+{self.name}'")
        if b is not None and b.is_bytes:
            n_user = rows.n.max(dim=1).values
            ctx = self.prepare(inp, rows)

            def run(R):
                return self.split(rows, R.to(rows.n.device)[:, None].expand(B, H), G, ctx)

            cache, _ = largest_fitting(run, torch.zeros_like(n_user), n_user, b.bytes, self.name,
                                       "residual window")
            return cache
        R = torch.full_like(rows.n, self.residual)
        return self.split(rows, R, G, self.prepare(inp, rows))

    def prepare(self, inp, rows):
        return None

    def split(self, rows: Rows, R: torch.Tensor, G: int, ctx) -> "KVCache":  # noqa: F821
        N = rows.pos.shape[-1]
        valid = rows.valid()
        forced = self.forced_mask(rows, R, ctx)
        cand = valid & ~forced
        q = cand.sum(-1)
        M = torch.div((q - R).clamp(min=0), G, rounding_mode="floor") * G      # quantized entries: whole groups
        rank = torch.cumsum(cand.to(torch.int64), -1) - 1
        quant = cand & (rank < M[..., None])
        main = build_cache(rows, select_top(rows, M, tier=quant.to(torch.int64)), M)
        res_len = rows.n - M
        resid = build_cache(rows, select_top(rows, res_len, tier=(valid & ~quant).to(torch.int64)), res_len)
        if N and main.capacity == 0:
            # a zero-capacity main segment still needs valid (empty) payload tensors
            main = main.replace(k=rows.k.new_zeros(*rows.k.shape[:2], 0, rows.k.shape[-1]),
                                v=rows.v.new_zeros(*rows.v.shape[:2], 0, rows.v.shape[-1]))
        main = quantize_cache(main, self.fmt, self.fmt, G, "channel")
        return main.replace(residual=resid).validate()

    def forced_mask(self, rows, R, ctx):
        """bool ``[B, H, N]``: entries kept full precision besides KIVI's window and tail (IntactKV's pivots)."""
        return torch.zeros(rows.pos.shape, dtype=torch.bool, device=rows.k.device)


class KIVIPolicy(ResidualQuantPolicy):
    """KIVI (Liu, Yuan, Jin, Zhong, Xu, Braverman, Chen & Hu 2024, "KIVI: A Tuning-Free Asymmetric 2bit
    Quantization for KV Cache", arXiv 2402.02750).

    Per row of n entries (position order): the ``M = floor(max(n - residual, 0) / group_size) * group_size`` OLDEST
    entries are quantized to ``bits`` (4 or 2; 8 also accepted) -- keys per-channel over groups of ``group_size``
    consecutive entries, values per-token over groups of ``group_size`` channels; the other ``n - M`` entries (the
    ``residual`` most recent plus the tail that does not fill a whole key group, both full precision in KIVI) form
    the full-precision residual. Defaults: ``residual=32``, ``group_size`` = 32 clipped to a divisor of head_dim.
    """

    name = "kivi"


register_policy("kivi")(KIVIPolicy)
for _bits in BITS:
    register_policy(f"kivi{_bits}")(type(f"KIVI{_bits}Policy", (KIVIPolicy,),
                                         {"name": f"kivi{_bits}", "fixed_bits": _bits,
                                          "__doc__": f"``kivi`` with bits={_bits}.\n\n" + KIVIPolicy.__doc__}))


class IntactKVPolicy(ResidualQuantPolicy):
    """IntactKV (Liu, Chen, Hou, Xu, Yuan, Wang & Hou 2024, "IntactKV: Improving Large Language Model Quantization
    by Keeping Pivot Tokens Intact", arXiv 2403.01241) on top of KIVI quantization.

    Per row: the pivot tokens -- the ``sinks`` earliest entries (default 1, the first token) plus the ``pivots``
    (default 4) entries with the largest accumulated attention mass (``stats.key_mass`` / ``queries=``, as for
    ``h2o``; ties: earlier) among the entries older than the ``residual`` most recent -- are kept intact in full
    precision in the residual segment. The remaining entries are treated exactly as KIVI treats a row: the oldest
    whole groups of ``group_size`` are quantized, the ``residual`` most recent and the group tail stay full precision.
    ``pivots=0`` needs no statistics.
    """

    name = "intactkv"

    def __init__(self, budget=None, seed=0, bits: Optional[int] = None, group_size: Optional[int] = None,
                 residual: int = 32, sinks: int = 1, pivots: int = 4, **extra):
        super().__init__(budget, seed, bits=bits, group_size=group_size, residual=residual, **extra)
        self.sinks = check_int(sinks, "sinks", self.name, lo=0)
        self.pivots = check_int(pivots, "pivots", self.name, lo=0)

    def prepare(self, inp, rows):
        return attention_mass(self, inp, rows) if self.pivots else None

    def forced_mask(self, rows, R, mass):
        N = rows.pos.shape[-1]
        older = torch.arange(N, device=rows.k.device) < (rows.n - R)[..., None]
        s = torch.minimum(torch.full_like(rows.n, self.sinks), (rows.n - R).clamp(min=0))
        sink = first_tier(rows, s).bool() & older
        if not self.pivots:
            return sink
        pool = older & ~sink
        p = torch.minimum(torch.full_like(rows.n, self.pivots), pool.sum(-1))
        score = torch.where(pool, mass, torch.full_like(mass, float("-inf")))
        idx = select_top(rows, p, score=score, tier=pool.to(torch.int64))
        piv = torch.zeros(*rows.pos.shape[:2], N + 1, dtype=torch.bool, device=rows.k.device)
        used = torch.arange(idx.shape[-1], device=rows.k.device) < p[..., None]
        piv.scatter_(2, torch.where(used, idx, torch.full_like(idx, N)), True)
        return sink | piv[..., :N]


register_policy("intactkv")(IntactKVPolicy)
for _bits in BITS:
    register_policy(f"intactkv{_bits}")(type(f"IntactKV{_bits}Policy", (IntactKVPolicy,),
                                             {"name": f"intactkv{_bits}", "fixed_bits": _bits,
                                              "__doc__": f"``intactkv`` with bits={_bits}.\n\n" +
                                              IntactKVPolicy.__doc__}))
