"""Shared machinery of the token-level policies: the policy base class, the canonical per-row order, attention
statistics as per-entry scores, deterministic per-row top-k, gathering and cache assembly.

Every policy works per (user b, kv head h) "row". ``canonical_rows`` sorts each row's VALID entries by original
position (stable, ties by input index) and puts padding last, so "first"/"most recent" mean smallest/largest
original position whatever the input order, and nothing ever reads across a user's length. Kept entries are
emitted in that order (sorted by original position) with their original positions/timestamps; padding entries of
the output (``j >= length[b, h]``) are zero.
"""
from __future__ import annotations

import inspect
import numbers
from dataclasses import dataclass
from typing import Optional

import torch

from ..cache.types import KVCache
from ..core import extension
from ..core.layout import jagged_to_padded, padded_to_jagged
from ..ops import cpu
from ..ops.attention import attention
from .base import Policy
from .budget import Budget, parse_budget, token_budgets

# keyword arguments that describe the history rather than configure a method. ``compress`` routes its
# CONTEXT_KEYS (queries, kind, scale, layer, ...) straight to ``PolicyInput.extra``; the others arrive in a policy's
# constructor (``causal``, ``hstu_norm``, ``backend``) and are kept in ``self.extra``; ``context()`` merges both
EXTRA_KEYS = ("queries", "kind", "scale", "causal", "layer", "num_layers", "pos_bias", "time_bias", "hstu_norm",
              "query_timestamps", "backend")


class BasePolicy(Policy):
    """Common constructor logic of the scoring policies: budget parsing, seed and extras validation (ValueError
    naming the argument). Subclasses declare ``level`` ("pruning" | "merging" | "precision")."""

    needs_budget = True

    def __init__(self, budget=None, seed=0, **extra):
        self.budget: Optional[Budget] = parse_budget(budget, self.name)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ValueError(f"{self.name}: seed must be an int, got {seed!r}")
        self.seed = int(seed)
        unknown = sorted(set(extra) - set(EXTRA_KEYS))
        if unknown:
            params = [p for p in inspect.signature(type(self).__init__).parameters
                      if p not in ("self", "budget", "seed", "extra")]
            raise ValueError(f"{self.name}: unknown parameter(s) {unknown}; method parameters: {params}, "
                             f"history extras: {list(EXTRA_KEYS)}")
        self.extra = dict(extra)
        if self.needs_budget and self.budget is None:
            raise ValueError(f"{self.name}: needs a budget (ratio in (0, 1], tokens >= 1 or Budget(bytes=...))")

    @classmethod
    def param_names(cls):
        return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "budget", "seed", "extra")]


def check_int(x, name, method, lo=None, allow_none=False):
    if x is None and allow_none:
        return None
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise ValueError(f"{method}: {name} must be an int, got {x!r}")
    if lo is not None and int(x) < lo:
        raise ValueError(f"{method}: {name} must be >= {lo}, got {x}")
    return int(x)


def check_float(x, name, method, lo=None, hi=None):
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise ValueError(f"{method}: {name} must be a number, got {x!r}")
    x = float(x)
    if (lo is not None and x < lo) or (hi is not None and x > hi) or x != x:
        raise ValueError(f"{method}: {name} must be in [{lo}, {hi}], got {x}")
    return x


# ---- canonical rows ------------------------------------------------------------------------------------------------

@dataclass
class Rows:
    """Per-(user, kv head) rows sorted by original position, valid entries first.

    k, v ``[B, H, N, D]``; pos int32 / ts int64 / cnt float32 ``[B, H, N]`` (ts, cnt optional); n int64 ``[B, H]``
    valid entries per row; perm int64 ``[B, H, N]`` (canonical slot -> input index); original_length int32 ``[B]``.
    """

    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor
    ts: Optional[torch.Tensor]
    cnt: Optional[torch.Tensor]
    n: torch.Tensor
    perm: torch.Tensor
    original_length: torch.Tensor

    @property
    def shape(self):
        return self.k.shape

    def valid(self) -> torch.Tensor:
        N = self.k.shape[2]
        return torch.arange(N, device=self.k.device) < self.n[..., None]


def gather_entries(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[b, h, idx[b, h, c], ...]`` for ``x`` ``[B, H, N, *]`` and ``idx`` int64 ``[B, H, C]``.

    CPU tensors go through the C++ row gather ``ops.cpu.gather_rows`` (one memcpy per kept row, any dtype) when the
    extension has it, other devices (and tensors autograd must flow through) through ``torch.gather``; both give
    the same bits. Errors are not caught: an index out of range is a bug of the caller.
    """
    if x.device.type == "cpu" and not (x.requires_grad and torch.is_grad_enabled()) and \
            extension.has_op("gather_rows")[0]:
        return cpu.gather_rows(x, idx)
    if x.dim() == 3:
        return torch.gather(x, 2, idx)
    return torch.gather(x, 2, idx[..., None].expand(*idx.shape, *x.shape[3:]))


def canonical_rows(inp) -> Rows:
    """Sort each row of a ``PolicyInput`` by original position (valid first). No copy when already sorted."""
    B, H, N, _ = inp.k.shape
    dev = inp.k.device
    head_lengths = getattr(inp, "head_lengths", None)
    n = (head_lengths if head_lengths is not None else inp.lengths[:, None].expand(B, H)).to(torch.int64)
    orig = getattr(inp, "original_lengths", None)
    orig = (orig if orig is not None else inp.lengths).to(torch.int32)
    ar = torch.arange(N, device=dev)
    valid = ar < n[..., None]
    pos64 = inp.positions.to(torch.int64)
    key = torch.where(valid, pos64, torch.full_like(pos64, torch.iinfo(torch.int64).max))
    if N <= 1 or bool((key[..., 1:] >= key[..., :-1]).all()):
        perm = ar.expand(B, H, N)
        return Rows(inp.k, inp.v, inp.positions, inp.timestamps, inp.counts, n, perm, orig)
    perm = torch.sort(key, dim=-1, stable=True).indices
    g = lambda t: None if t is None else gather_entries(t, perm)  # noqa: E731
    return Rows(g(inp.k), g(inp.v), g(inp.positions), g(inp.timestamps), g(inp.counts), n, perm, orig)


def policy_tokens(policy, inp, rows: Rows) -> torch.Tensor:
    """Per-row token budgets int64 ``[B, H]`` of a ratio/token budget (None -> keep everything)."""
    if policy.budget is None:
        return rows.n.clone()
    if policy.budget.is_bytes:
        raise ValueError(f"{policy.name}: internal error, bytes budget reached token resolution")
    return token_budgets(policy.budget, rows.n)


# ---- deterministic per-row selection ---------------------------------------------------------------------------

def select_top(rows: Rows, k: torch.Tensor, score: Optional[torch.Tensor] = None,
               tier: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Indices (canonical slots) of the ``k[b, h]`` best valid entries of each row, ascending; ``[B, H, C]``.

    Order of preference: higher ``tier`` (int), then higher ``score``, then the EARLIER slot (stable sort), which
    makes ties deterministic. Padding entries are never chosen (``k <= n`` is required). Unused slots hold 0.
    """
    B, H, N = rows.pos.shape
    dev = rows.k.device
    if bool((k > rows.n).any()):
        raise ValueError("internal error: budget above the row length")
    valid = rows.valid()
    if score is None:
        score = torch.zeros(B, H, N, dtype=torch.float64, device=dev)
    score = torch.where(valid, score.to(torch.float64), torch.full_like(score, float("-inf"), dtype=torch.float64))
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    t = torch.zeros(B, H, N, dtype=torch.int64, device=dev) if tier is None else tier.to(torch.int64)
    t = torch.where(valid, t, torch.full_like(t, -(1 << 40)))
    t_sorted = torch.gather(t, 2, order)
    order = torch.gather(order, 2, torch.sort(t_sorted, dim=-1, descending=True, stable=True).indices)
    C = int(k.max()) if k.numel() else 0
    chosen = order[..., :C]
    used = torch.arange(C, device=dev) < k[..., None]
    chosen = torch.where(used, chosen, torch.full_like(chosen, N))
    chosen = torch.sort(chosen, dim=-1).values
    return torch.where(chosen >= N, torch.zeros_like(chosen), chosen)


def recent_tier(rows: Rows, w: torch.Tensor) -> torch.Tensor:
    """int64 ``[B, H, N]``: 1 on each row's ``w[b, h]`` most recent valid entries (largest positions), else 0."""
    N = rows.pos.shape[-1]
    ar = torch.arange(N, device=rows.k.device)
    return ((ar >= (rows.n - w)[..., None]) & (ar < rows.n[..., None])).to(torch.int64)


def first_tier(rows: Rows, s: torch.Tensor) -> torch.Tensor:
    """int64 ``[B, H, N]``: 1 on each row's ``s[b, h]`` earliest valid entries, else 0."""
    N = rows.pos.shape[-1]
    ar = torch.arange(N, device=rows.k.device)
    return ((ar < s[..., None]) & (ar < rows.n[..., None])).to(torch.int64)


def build_cache(rows: Rows, idx: torch.Tensor, length: torch.Tensor, k=None, v=None, pos=None, ts=None, cnt=None,
                with_counts: bool = False) -> KVCache:
    """Assemble a full-precision ``KVCache`` from canonical slots ``idx [B, H, C]`` (first ``length[b, h]`` valid).

    ``k``/``v``/``pos``/``ts``/``cnt`` override the canonical tensors (merging policies pass merged ones, indexed by
    the same slots). Counts are kept when the input had them or ``with_counts``; padding entries are zeroed.
    """
    B, H, C = idx.shape
    dev = rows.k.device
    used = torch.arange(C, device=dev) < length[..., None]
    src = lambda t, d: d if t is None else t  # noqa: E731
    kk = gather_entries(src(k, rows.k), idx)
    vv = gather_entries(src(v, rows.v), idx)
    zero4 = used[..., None]
    kk = torch.where(zero4, kk, torch.zeros((), dtype=kk.dtype, device=dev))
    vv = torch.where(zero4, vv, torch.zeros((), dtype=vv.dtype, device=dev))
    pp = torch.where(used, gather_entries(src(pos, rows.pos), idx), torch.zeros((), dtype=torch.int32, device=dev))
    t_src = src(ts, rows.ts)
    tt = None if t_src is None else torch.where(used, gather_entries(t_src, idx),
                                                 torch.zeros((), dtype=torch.int64, device=dev))
    c_src = src(cnt, rows.cnt)
    if c_src is None and with_counts:
        c_src = torch.ones(rows.pos.shape, dtype=torch.float32, device=dev)
    cc = None if c_src is None else torch.where(used, gather_entries(c_src.to(torch.float32), idx),
                                                 torch.zeros((), dtype=torch.float32, device=dev))
    return KVCache(k=kk.contiguous(), v=vv.contiguous(), length=length.to(torch.int32).contiguous(),
                   position=pp.to(torch.int32).contiguous(), original_length=rows.original_length.contiguous(),
                   head_dim=rows.k.shape[-1], timestamp=None if tt is None else tt.contiguous(),
                   count=None if cc is None else cc.contiguous())


# ---- attention statistics as per-entry scores ------------------------------------------------------------------

def _padded_mass(m: torch.Tensor, inp, name: str, method: str) -> torch.Tensor:
    B, H, N, _ = inp.k.shape
    if m.dim() == 2:                       # jagged [total_k, Hkv] in the history's own (input) order
        lens = inp.lengths.to(torch.int64)
        if m.shape[0] != int(lens.sum()) or m.shape[1] != H:
            raise ValueError(f"{method}: jagged {name} must be [sum(lengths)={int(lens.sum())}, Hkv={H}], "
                             f"got {tuple(m.shape)}")
        offsets = torch.cat([lens.new_zeros(1), lens.cumsum(0)])
        m, _ = jagged_to_padded(m, offsets.to(m.device))
    if m.dim() != 3 or m.shape[0] != B or m.shape[1] != H or m.shape[2] > N:
        raise ValueError(f"{method}: {name} must be [B, Hkv, N]={(B, H, N)} (or jagged [total, Hkv]), "
                         f"got {tuple(m.shape)}")
    if m.shape[2] < N:
        m = torch.nn.functional.pad(m, (0, N - m.shape[2]))
    return m.to(device=inp.k.device, dtype=torch.float64)


def attention_mass(policy, inp, rows: Rows, window: Optional[int] = None) -> torch.Tensor:
    """Per-entry attention mass (float64 ``[B, H, N]``, canonical order, 0 on padding).

    Source: ``inp.stats`` -- an ``AttentionStats`` from ``malloc_kernels.attention(..., return_stats=True)`` over
    the history (``key_mass``, or ``key_window_mass`` when ``window`` is given, which must then match
    ``stats.window``) or a plain per-entry score tensor ``[B, Hkv, N]`` -- else ``queries=`` in the extras, from
    which the statistics are computed with the attention kernel itself (no N x N matrix is built here). For
    ``kind="hstu"`` the kernel's mass is ``|c_j silu(s_ij)| / n_i`` (magnitude of the pointwise weight).
    """
    method = policy.name
    stats = inp.stats
    if stats is None:
        if context(policy, inp).get("queries") is None:
            raise ValueError(f"{method}: needs attention statistics: pass stats= (AttentionStats from "
                             f"attention(..., return_stats=True{', stats_window=%d' % window if window else ''}) "
                             f"over the history) or queries= (the history's queries)")
        stats = history_stats(policy, inp, window)
    if isinstance(stats, torch.Tensor):
        m = stats
        name = "stats"
    else:
        if window is None:
            m, name = stats.key_mass, "stats.key_mass"
        else:
            m, name = stats.key_window_mass, "stats.key_window_mass"
            if m is None:
                raise ValueError(f"{method}: stats has no window mass; compute it with "
                                 f"attention(..., return_stats=True, stats_window={window})")
            if stats.window is not None and int(stats.window) != int(window):
                raise ValueError(f"{method}: stats were computed with stats_window={stats.window} but the "
                                 f"method's window is {window}")
        if m is None:
            raise ValueError(f"{method}: {name} is missing")
    m = _padded_mass(m, inp, name, method)
    if not bool(torch.isfinite(m).all()):
        raise ValueError(f"{method}: {name} has non-finite values")
    m = gather_entries(m, rows.perm)
    return torch.where(rows.valid(), m, torch.zeros((), dtype=m.dtype, device=m.device))


def context(policy, inp) -> dict:
    """The call context: ``compress``'s context keywords (``inp.extra``) over the policy's constructor extras."""
    return {**getattr(policy, "extra", {}), **(inp.extra or {})}


def history_stats(policy, inp, window: Optional[int]):
    """Run the attention kernel over the history (queries from ``extra``) to get ``AttentionStats``."""
    method = policy.name
    extra = context(policy, inp)
    B, H, N, D = inp.k.shape
    if getattr(inp, "head_lengths", None) is not None and \
            bool((inp.head_lengths != inp.head_lengths[:, :1]).any()):
        raise ValueError(f"{method}: queries= needs the same history length on every kv head; pass stats=")
    q = extra["queries"]
    if not isinstance(q, torch.Tensor) or not q.is_floating_point():
        raise TypeError(f"{method}: queries must be a floating tensor")
    lens = inp.lengths.to(torch.int64)
    if q.dim() == 4:
        if q.shape[0] != B or q.shape[2] < (int(lens.max()) if lens.numel() else 0) or q.shape[3] != D:
            raise ValueError(f"{method}: dense queries must be [B={B}, Hq, N, D={D}], got {tuple(q.shape)}")
        q = padded_to_jagged(q[:, :, :N], lens)
    elif q.dim() != 3 or q.shape[0] != int(lens.sum()) or q.shape[2] != D:
        raise ValueError(f"{method}: queries must be dense [B, Hq, N, D] or jagged [sum(lengths), Hq, D], "
                         f"got {tuple(q.shape)}")
    kind = extra.get("kind", "softmax")
    offsets = torch.cat([lens.new_zeros(1), lens.cumsum(0)]).to(inp.k.device)
    kj = padded_to_jagged(inp.k, lens)
    vj = padded_to_jagged(inp.v, lens)
    kw = dict(kind=kind, scale=extra.get("scale"), offsets=offsets,
              is_causal=bool(extra.get("causal", True)), return_stats=True, stats_window=window,
              backend=extra.get("backend", "auto"))
    if extra.get("pos_bias") is not None or extra.get("time_bias") is not None:
        kw.update(pos_bias=extra.get("pos_bias"), time_bias=extra.get("time_bias"),
                  query_positions=padded_to_jagged(inp.positions[:, 0].to(torch.int64), lens))
        if inp.timestamps is not None:
            kw["query_timestamps"] = padded_to_jagged(inp.timestamps[:, 0], lens)
    if kind == "hstu" and extra.get("hstu_norm") is not None:
        kw["hstu_norm"] = extra["hstu_norm"]
    res = attention(q.to(inp.k.dtype), kj, vj, **kw)
    return res.stats
