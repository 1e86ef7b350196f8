"""Token merging policies (MALLOC's "token: merging" level): fold history entries together.

A merged entry stores the (weighted) average key and value of its members and a ``count`` (float32, the summed
input counts of its members: how many original tokens it stands for), which attention uses as the multiplicity
``c_j`` (softmax: ``log c_j`` added to the score, ToMe's proportional attention; hstu: ``c_j silu(s_ij)``). With
identical members this reproduces the unmerged attention exactly.

Representative position/timestamp of a merged entry: those of its MOST RECENT member (largest original
position) for ``chunk`` and ``tome``. The relative bias of a merged entry then uses the distance from the query to
the closest (newest) token it summarises, entries stay strictly ordered in time without collisions, and it matches
where a beacon token sits in Activation Beacon (appended after its chunk, having seen all of it). ``d2o`` merges
evicted tokens into a KEPT token, which keeps its own position/timestamp (the conserved token is updated in place,
as in D2O).

All merges stay inside one (user, kv head) row; padding is never a member. Output entries are sorted by position.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .pruning import PruningPolicy
from .registry import register_policy
from .selection import (Rows, attention_mass, build_cache, canonical_rows, check_float, check_int, recent_tier,
                        select_top)


def merge_by_root(rows: Rows, root: torch.Tensor, weight: torch.Tensor, rep: str = "max") -> Rows:
    """Merge every valid slot j into slot ``root[b, h, j]`` (roots point to themselves; ``N`` = dropped).

    Keys/values become ``sum_j weight_j x_j / sum_j weight_j`` over each root's members (float64 accumulation,
    cast back), counts ``sum_j count_j``; position/timestamp are those of the member with the largest slot
    (``rep="max"``, i.e. most recent since rows are position-sorted) or of the root itself (``rep="root"``).
    Returns new canonical rows (valid first, sorted by representative position).
    """
    B, H, N, D = rows.k.shape
    dev = rows.k.device
    slot = torch.arange(N, device=dev).expand(B, H, N)
    valid = rows.valid() & (root < N)
    root = torch.where(valid, root, torch.full_like(root, N))
    cnt = rows.cnt if rows.cnt is not None else torch.ones(B, H, N, dtype=torch.float32, device=dev)
    is_root = valid & (root == slot)
    if rep == "max":
        rep_slot = torch.full((B, H, N + 1), -1, dtype=torch.int64, device=dev)
        rep_slot.scatter_reduce_(2, root, torch.where(valid, slot, torch.full_like(slot, -1)), "amax")
        rep_slot = rep_slot[..., :N]
    else:
        rep_slot = slot.clone()
    big = torch.iinfo(torch.int64).max
    rep_pos = gather(rows.pos.to(torch.int64), rep_slot.clamp(min=0))
    order_key = torch.where(is_root, rep_pos, torch.full_like(rep_pos, big))
    order = torch.sort(order_key, dim=-1, stable=True).indices          # group i -> root slot order[i]
    gid_of_root = torch.empty_like(order).scatter_(2, order, slot.contiguous())
    gid = torch.where(valid, gather(gid_of_root, root.clamp(max=N - 1)), torch.full_like(root, N))
    n_new = is_root.sum(-1)
    w = torch.where(valid, weight.to(torch.float64), torch.zeros((), dtype=torch.float64, device=dev))
    ksum = torch.zeros(B, H, N + 1, D, dtype=torch.float64, device=dev)
    vsum = torch.zeros_like(ksum)
    idx4 = gid[..., None].expand(B, H, N, D)
    ksum.scatter_add_(2, idx4, rows.k.to(torch.float64) * w[..., None])
    vsum.scatter_add_(2, idx4, rows.v.to(torch.float64) * w[..., None])
    wsum = torch.zeros(B, H, N + 1, dtype=torch.float64, device=dev).scatter_add_(2, gid, w)
    csum = torch.zeros(B, H, N + 1, dtype=torch.float32, device=dev).scatter_add_(
        2, gid, torch.where(valid, cnt, torch.zeros((), dtype=torch.float32, device=dev)))
    live = torch.arange(N, device=dev) < n_new[..., None]
    denom = torch.where(wsum[..., :N] > 0, wsum[..., :N], torch.ones((), dtype=torch.float64, device=dev))
    k = torch.where(live[..., None], ksum[..., :N, :] / denom[..., None], torch.zeros((), dtype=torch.float64,
                                                                                      device=dev))
    v = torch.where(live[..., None], vsum[..., :N, :] / denom[..., None], torch.zeros((), dtype=torch.float64,
                                                                                      device=dev))
    src = gather(rep_slot.clamp(min=0), order)                          # representative slot of each group
    # a group with a single member is that member, bit for bit (w * x / w need not round-trip)
    members = torch.zeros(B, H, N + 1, dtype=torch.int64, device=dev).scatter_add_(2, gid, valid.to(torch.int64))
    single = (members[..., :N] == 1)[..., None]
    k = torch.where(single, gather_rows(rows.k, src).to(torch.float64), k)
    v = torch.where(single, gather_rows(rows.v, src).to(torch.float64), v)
    z32 = torch.zeros((), dtype=torch.int32, device=dev)
    pos = torch.where(live, gather(rows.pos, src), z32)
    ts = None if rows.ts is None else torch.where(live, gather(rows.ts, src),
                                                  torch.zeros((), dtype=torch.int64, device=dev))
    c = torch.where(live, csum[..., :N], torch.zeros((), dtype=torch.float32, device=dev))
    return Rows(k.to(rows.k.dtype), v.to(rows.v.dtype), pos, ts, c, n_new.to(torch.int64),
                torch.arange(N, device=dev).expand(B, H, N), rows.original_length)


def gather(t, idx):
    return torch.gather(t, 2, idx)


def rows_to_cache(rows: Rows):
    """A ``KVCache`` of the first ``n[b, h]`` entries of each row (merging policies always carry counts)."""
    B, H, N = rows.pos.shape
    C = int(rows.n.max()) if rows.n.numel() else 0
    idx = torch.arange(C, device=rows.k.device).expand(B, H, C).contiguous()
    return build_cache(rows, idx, rows.n, with_counts=True)


class MergingPolicy(PruningPolicy):
    level = "merging"


@register_policy("chunk")
class ChunkPolicy(MergingPolicy):
    """Chunk pooling: the training-free form of Activation Beacon (Zhang, Liu, Xiao, Shao, Ye & Dou 2024, "Long
    Context Compression with Activation Beacon", arXiv 2401.03462), which condenses each chunk of consecutive
    tokens into beacon entries; here a chunk's entry is the count-weighted mean of its keys and values.

    ``chunk=c`` (no budget): every c consecutive valid entries of a row (by position, starting from the oldest;
    the last chunk may be shorter) become one entry of count = their summed counts (c for plain input).
    With a budget ``k_b`` instead: ``c = ceil(n_b / k_b)`` and the ``t`` most recent entries stay unpooled, ``t``
    the smallest number giving exactly ``k_b`` entries (``t + ceil((n_b - t) / c) = k_b``), so the budget is used
    exactly, like a beacon model's raw recent window. Position/timestamp: the chunk's most recent member.
    """

    name = "chunk"
    needs_budget = False

    def __init__(self, budget=None, seed=0, chunk: Optional[int] = None, **extra):
        super().__init__(budget, seed, **extra)
        self.chunk = check_int(chunk, "chunk", self.name, lo=1, allow_none=True)
        if (self.chunk is None) == (self.budget is None):
            raise ValueError(f"{self.name}: give exactly one of chunk= (tokens per chunk) or budget=")

    def compress(self, inp):
        if self.chunk is not None:
            rows = canonical_rows(inp)
            c = torch.full_like(rows.n, self.chunk)
            return rows_to_cache(self._pool(rows, c, torch.zeros_like(rows.n)))
        return super().compress(inp)

    def select(self, rows, ctx, k):
        n = rows.n
        kk = k.clamp(min=1)
        c = torch.where(n > 0, (n + kk - 1) // kk, torch.ones_like(n))
        # smallest t with t + ceil((n - t) / c) >= k: t (c - 1) > (k - 1) c - n
        t = torch.where(c > 1, torch.div((kk - 1) * c - n, (c - 1).clamp(min=1), rounding_mode="floor") + 1,
                        torch.zeros_like(n)).clamp(min=0)
        t = torch.minimum(t, n)
        return rows_to_cache(self._pool(rows, c, t))

    def _pool(self, rows, c, t):
        N = rows.pos.shape[-1]
        j = torch.arange(N, device=rows.k.device).expand_as(rows.pos)
        pooled_len = (rows.n - t)[..., None]
        cc = c[..., None]
        # root of a pooled slot = the LAST slot of its chunk (clipped to the pooled region); raw slots are roots
        last = torch.minimum((j // cc) * cc + cc - 1, pooled_len - 1)
        root = torch.where(j < pooled_len, last, j)
        weight = rows.cnt if rows.cnt is not None else torch.ones_like(rows.pos, dtype=torch.float32)
        return merge_by_root(rows, root, weight, rep="max")


def _dot_last(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum_d a[..., d] * b[..., d]`` accumulated in a fixed order d = 0, 1, ... (elementwise ops only).

    A matmul's reduction order depends on the matrix shapes, which depend on the batch's padded length; summing
    channel by channel makes every similarity bit-identical whether a user is compressed alone or in a batch.
    """
    out = a[..., 0] * b[..., 0]
    for d in range(1, a.shape[-1]):
        out = out + a[..., d] * b[..., d]
    return out


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` scaled to unit norm in float64 (zero rows stay zero)."""
    x = x.to(torch.float64)
    return x / torch.sqrt(_dot_last(x, x)).clamp(min=1e-12)[..., None]


def _best_match(a: torch.Tensor, b: torch.Tensor, b_ok: torch.Tensor):
    """For each row of ``a [B, H, Na, D]`` its most cosine-similar valid row of ``b [B, H, Nb, D]``.

    Returns ``(u, idx)``: similarity float64 ``[B, H, Na]`` (``-inf`` where no b is valid) and index int64
    (ties: the earliest b). The search uses a matmul; the returned similarity is recomputed for the chosen pair
    with ``_dot_last`` so that its value (which D2O turns into a weight) does not depend on the batch.
    """
    ua, ub = _unit(a), _unit(b)
    sim = ua @ ub.transpose(-1, -2)
    sim = torch.where(b_ok[:, :, None, :], sim, torch.full_like(sim, float("-inf")))
    idx = sim.argmax(dim=-1)
    u = _dot_last(ua, torch.gather(ub, 2, idx[..., None].expand(*idx.shape, ub.shape[-1])))
    u = torch.where(b_ok.any(-1, keepdim=True), u, torch.full_like(u, float("-inf")))
    return u, idx


@register_policy("tome")
class ToMePolicy(MergingPolicy):
    """ToMe bipartite soft matching (Bolya, Fu, Dai, Zhang, Feichtenhofer & Hoffman 2023, "Token Merging: Your ViT
    But Faster", ICLR 2023, arXiv 2210.09461), applied to a row's keys.

    One round on a row of m valid entries (position order): set A = entries 0, 2, 4, ..., set B = 1, 3, 5, ...
    (alternating split); each a in A draws an edge to its most similar b in B (cosine similarity of keys; ties:
    the earliest b); the ``r = min(m - k_b, floor(m / 2))`` edges of highest similarity (ties: earliest a) are
    merged: a folds into its b with a size-weighted average of keys and values (size = count), counts add.
    Rounds repeat until the row has exactly ``k_b`` entries. Position/timestamp: most recent member.
    """

    name = "tome"

    def __init__(self, budget=None, seed=0, **extra):
        super().__init__(budget, seed, **extra)

    def select(self, rows, ctx, k):
        k = torch.minimum(k, rows.n)
        if rows.cnt is None:
            rows = Rows(rows.k, rows.v, rows.pos, rows.ts, torch.ones_like(rows.pos, dtype=torch.float32), rows.n,
                        rows.perm, rows.original_length)
        while bool((rows.n > k).any()):
            rows = self._round(rows, k)
        return rows_to_cache(rows)

    @staticmethod
    def _round(rows: Rows, k):
        B, H, N, D = rows.k.shape
        dev = rows.k.device
        n = rows.n
        if N < 2:
            raise ValueError("internal error: a ToMe round needs two entries")
        r = torch.minimum(n - k, n // 2)                                 # merges this round, per row
        a_slot = torch.arange(0, N, 2, device=dev)
        b_slot = torch.arange(1, N, 2, device=dev)
        b_ok = b_slot < n[..., None]                                    # [B, H, Nb]
        node_max, node_idx = _best_match(rows.k[:, :, 0::2], rows.k[:, :, 1::2], b_ok)   # [B, H, Na]
        a_ok = a_slot < n[..., None]
        node_max = torch.where(a_ok, node_max, torch.full_like(node_max, float("-inf")))
        order = torch.sort(node_max, dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(2, order, torch.arange(order.shape[-1], device=dev).expand_as(order)
                                                .contiguous())
        merged_a = (rank < r[..., None]) & a_ok                          # [B, H, Na]
        root = torch.arange(N, device=dev).expand(B, H, N).clone()
        root[:, :, 0::2] = torch.where(merged_a, b_slot[node_idx], a_slot.expand_as(merged_a))
        return merge_by_root(rows, root, rows.cnt, rep="max")


@register_policy("d2o")
class D2OPolicy(MergingPolicy):
    """D2O token-level operation (Wan, Wu, Zhang, Xin, Tao, Zhu, Wang, Luo, Xiong, Wang & Zhang 2024, "D2O:
    Dynamic Discriminative Operations for Efficient Long-Context Inference of Large Language Models",
    arXiv 2406.13035).

    Per row: the kept set is H2O's (the ``window`` most recent (default ``k_b // 2``) plus the top accumulated
    attention mass; ``stats=``/``queries=`` as for ``h2o``). Every evicted entry e finds its most similar kept
    entry c (cosine similarity u_e of keys; ties: earliest c); if ``u_e >= threshold`` it is merged into c, else
    dropped. A kept entry c with merged set M_c becomes ``(e * x_c + sum_{e in M_c} exp(u_e) x_e) /
    (e + sum_{e in M_c} exp(u_e))`` for keys and values (D2O's weights: softmax over similarities with the
    conserved token's self-similarity 1). c keeps its own position/timestamp. ``proportional=True`` also adds the
    merged members' counts to c's count (ToMe-style multiplicity); the default keeps c's count, as in D2O, where
    the merged entry is attended as one token. The paper updates the threshold as an EMA of similarities over
    decoding steps; a history compressed at once is one step, so the threshold is the fixed ``threshold``
    parameter (default 0.5). The layer-level dynamic budget allocation of D2O is not part of this policy.
    """

    name = "d2o"

    def __init__(self, budget=None, seed=0, window: Optional[int] = None, threshold: float = 0.5,
                 proportional: bool = False, **extra):
        super().__init__(budget, seed, **extra)
        self.window = check_int(window, "window", self.name, lo=0, allow_none=True)
        self.threshold = check_float(threshold, "threshold", self.name, lo=-1.0, hi=1.0)
        if not isinstance(proportional, bool):
            raise ValueError(f"{self.name}: proportional must be a bool, got {proportional!r}")
        self.proportional = proportional

    def prepare(self, inp, rows):
        return attention_mass(self, inp, rows)

    def select(self, rows, mass, k):
        B, H, N, D = rows.k.shape
        dev = rows.k.device
        w = k // 2 if self.window is None else k.clamp(max=self.window)
        kept_idx = select_top(rows, k, score=mass, tier=recent_tier(rows, w))   # [B, H, C]
        C = kept_idx.shape[-1]
        kept_ok = torch.arange(C, device=dev) < k[..., None]
        kept_mask = torch.zeros(B, H, N + 1, dtype=torch.bool, device=dev)
        kept_mask.scatter_(2, torch.where(kept_ok, kept_idx, torch.full_like(kept_idx, N)), True)
        kept_mask = kept_mask[..., :N]
        u, j = _best_match(rows.k, gather_rows(rows.k, kept_idx), kept_ok)   # most similar kept entry
        target = torch.gather(kept_idx, 2, j.clamp(max=max(C - 1, 0))) if C else torch.zeros_like(u, dtype=torch.int64)
        valid = rows.valid()
        evicted = valid & ~kept_mask
        merge = evicted & (u >= self.threshold) & (k[..., None] > 0)
        slot = torch.arange(N, device=dev).expand(B, H, N)
        root = torch.where(kept_mask & valid, slot, torch.where(merge, target, torch.full_like(slot, N)))
        weight = torch.where(merge, torch.exp(u.clamp(min=-1.0)), torch.full_like(u, math.e))
        cnt = rows.cnt if rows.cnt is not None else torch.ones(B, H, N, dtype=torch.float32, device=dev)
        if not self.proportional:
            cnt = torch.where(merge, torch.zeros_like(cnt), cnt)
        merged = merge_by_root(Rows(rows.k, rows.v, rows.pos, rows.ts, cnt, rows.n, rows.perm,
                                    rows.original_length), root, weight, rep="root")
        return rows_to_cache(merged)


def gather_rows(x, idx):
    return torch.gather(x, 2, idx[..., None].expand(*idx.shape, x.shape[-1]))
