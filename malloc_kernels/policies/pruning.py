"""Token pruning policies (MALLOC's "token: pruning" level): keep a subset of the history's entries.

Every policy here selects per (user, kv head) row, keeps exactly ``k_b = min(budget, n_b)`` entries of user b
(see ``budget.py``; PyramidKV: its layer's share), never selects padding, keeps each kept entry's key, value,
ORIGINAL position, timestamp and count unchanged, and stores the kept entries sorted by original position.
Ties in scores go to the earlier entry. A bytes budget keeps the largest ``k_b`` whose cache fits.

Scoring methods (H2O, SnapKV, TOVA, PyramidKV) read attention statistics (``stats=`` from
``malloc_kernels.attention(..., return_stats=True[, stats_window=W])`` over the history, or ``queries=`` [+ ``kind=``,
``scale=``, ``causal=True``] from which they run that call themselves); for ``kind="hstu"`` the mass of key j is
``sum_i |c_j silu(s_ij)| / n_i``, the magnitude of HSTU's pointwise weight, the natural analogue of the softmax
probability (HSTU weights are not normalised, so their magnitude is what says how much j contributes).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

from .budget import largest_fitting
from .registry import register_policy
from .selection import (BasePolicy, Rows, attention_mass, build_cache, canonical_rows, check_float, check_int,
                        first_tier, policy_tokens, recent_tier, select_top)


class PruningPolicy(BasePolicy):
    """Template: ``prepare`` computes scores once, ``select`` keeps ``k [B, H]`` entries per row."""

    level = "pruning"

    def prepare(self, inp, rows: Rows):
        return None

    def select(self, rows: Rows, ctx, k: torch.Tensor):
        raise RuntimeError(f"{self.name}: select() not implemented")  # every subclass overrides it

    def row_budgets(self, inp, rows: Rows, k: torch.Tensor) -> torch.Tensor:
        """Hook for layer-aware budgets (PyramidKV); default: the user's token budget on every head."""
        return k

    def compress(self, inp):
        rows = canonical_rows(inp)
        ctx = self.prepare(inp, rows)
        if self.budget is not None and self.budget.is_bytes:
            B, H = rows.n.shape
            n_user = rows.n.max(dim=1).values

            def run(kb):
                kb = torch.minimum(kb.to(rows.n.device)[:, None].expand(B, H), rows.n)
                return self.select(rows, ctx, kb)

            if self.bytes_over_layers():
                _, k_user = largest_fitting(run, n_user.clamp(max=1), n_user, self.budget.bytes, self.name,
                                            "kept tokens", affine=True)
                k = torch.minimum(k_user.to(rows.n.device)[:, None].expand(B, H), rows.n)
                return self.select(rows, ctx, self.row_budgets(inp, rows, k))
            cache, _ = largest_fitting(run, n_user.clamp(max=1), n_user, self.budget.bytes, self.name,
                                       "kept tokens", affine=True)
            return cache
        k = policy_tokens(self, inp, rows)
        return self.select(rows, ctx, self.row_budgets(inp, rows, k))

    def bytes_over_layers(self) -> bool:
        return False


@register_policy("recent")
class RecentPolicy(PruningPolicy):
    """Recent window: keeps exactly the ``k_b`` most recent entries (largest original positions) of each row.

    The sliding-window baseline of the KV-compression literature (e.g. Beltagy, Peters & Cohan 2020, "Longformer",
    arXiv 2004.05150; used as "Local"/"Window" baseline by StreamingLLM, arXiv 2309.17453).
    """

    name = "recent"

    def __init__(self, budget=None, seed=0, **extra):
        super().__init__(budget, seed, **extra)

    def select(self, rows, ctx, k):
        return build_cache(rows, select_top(rows, k, tier=recent_tier(rows, k)), k)


@register_policy("streaming")
class StreamingPolicy(PruningPolicy):
    """StreamingLLM (Xiao, Tian, Chen, Han & Lewis 2023, "Efficient Streaming Language Models with Attention
    Sinks", arXiv 2309.17453): keeps exactly the ``s = min(sinks, k_b)`` EARLIEST entries (attention sinks) plus
    the ``k_b - s`` most recent entries of each row. ``sinks`` default 4 as in the paper.
    """

    name = "streaming"

    def __init__(self, budget=None, seed=0, sinks: int = 4, **extra):
        super().__init__(budget, seed, **extra)
        self.sinks = check_int(sinks, "sinks", self.name, lo=0)

    def select(self, rows, ctx, k):
        s = k.clamp(max=self.sinks)
        tier = first_tier(rows, s) | recent_tier(rows, k - s)
        return build_cache(rows, select_top(rows, k, tier=tier), k)


@register_policy("h2o")
class H2OPolicy(PruningPolicy):
    """H2O (Zhang, Sheng, Zhou, Chen, Zheng, Cai, Song, Tian, Re, Barrett, Wang & Chen 2023, "H2O: Heavy-Hitter
    Oracle for Efficient Generative Inference of Large Language Models", arXiv 2306.14048).

    Keeps, per row, the ``w`` most recent entries plus the ``k_b - w`` entries with the largest ACCUMULATED
    attention mass (``stats.key_mass``: sum over every history query -- causal -- and over the query heads of the
    kv head) among the rest. ``window`` = w (int >= 0, capped at ``k_b``); default ``k_b // 2``, i.e. H2O's equal
    split between heavy hitters (``ceil(k_b / 2)``) and recent tokens.
    """

    name = "h2o"

    def __init__(self, budget=None, seed=0, window: Optional[int] = None, **extra):
        super().__init__(budget, seed, **extra)
        self.window = check_int(window, "window", self.name, lo=0, allow_none=True)

    def prepare(self, inp, rows):
        return attention_mass(self, inp, rows)

    def select(self, rows, mass, k):
        w = k // 2 if self.window is None else k.clamp(max=self.window)
        return build_cache(rows, select_top(rows, k, score=mass, tier=recent_tier(rows, w)), k)


def _pool(mass: torch.Tensor, prefix: torch.Tensor, kernel_size: int, pooling: str) -> torch.Tensor:
    """SnapKV's 1-D pooling over key positions, per row, restricted to the prefix (non-window) entries.

    Entries outside the prefix (the observation window and padding) are zeroed first, so they act exactly like the
    zero padding of the original (``padding = kernel_size // 2``, stride 1; avg pooling divides by ``kernel_size``,
    i.e. ``count_include_pad=True`` as in SnapKV); masses are >= 0, so zero and -inf padding agree for max pooling.
    """
    B, H, N = mass.shape
    x = torch.where(prefix, mass, torch.zeros((), dtype=mass.dtype, device=mass.device)).reshape(B * H, 1, N)
    pad = kernel_size // 2
    if pooling == "max":
        y = F.max_pool1d(F.pad(x, (pad, pad)), kernel_size, stride=1)
    else:
        y = F.avg_pool1d(F.pad(x, (pad, pad)), kernel_size, stride=1)
    return torch.where(prefix, y.reshape(B, H, N), torch.zeros((), dtype=mass.dtype, device=mass.device))


@register_policy("snapkv")
class SnapKVPolicy(PruningPolicy):
    """SnapKV (Li, Huang, Yang, Venkitesh, Locatelli, Ye, Cai, Lewis & Chen 2024, "SnapKV: LLM Knows What You are
    Looking for Before Generation", arXiv 2404.14469).

    Observation window = the last ``window`` history tokens (default 32, or ``stats.window`` when stats are
    passed). Per row: the ``w = min(window, k_b)`` most recent entries are kept; every earlier ("prefix") entry j
    is scored by the attention mass it receives from the window's queries (``stats.key_window_mass``), pooled over
    neighbouring key positions with a 1-D ``pooling`` ("max" (default) or "avg") of odd ``kernel_size`` (default 7,
    padding ``kernel_size // 2``, stride 1, over prefix entries only); the ``k_b - w`` best-scored prefix entries
    are kept (ties: earlier).
    """

    name = "snapkv"

    def __init__(self, budget=None, seed=0, window: Optional[int] = None, kernel_size: int = 7, pooling: str = "max",
                 **extra):
        super().__init__(budget, seed, **extra)
        self.window = check_int(window, "window", self.name, lo=1, allow_none=True)
        self.kernel_size = check_int(kernel_size, "kernel_size", self.name, lo=1)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"{self.name}: kernel_size must be odd (same-length pooling), got {kernel_size}")
        if pooling not in ("max", "avg"):
            raise ValueError(f"{self.name}: pooling must be 'max' or 'avg', got {pooling!r}")
        self.pooling = pooling

    def obs_window(self, inp) -> int:
        if self.window is not None:
            return self.window
        w = getattr(inp.stats, "window", None)
        return int(w) if w is not None else 32

    def prepare(self, inp, rows):
        W = self.obs_window(inp)
        mass = attention_mass(self, inp, rows, window=W)
        N = rows.pos.shape[-1]
        prefix = torch.arange(N, device=rows.k.device) < (rows.n - W)[..., None]
        return W, _pool(mass, prefix, self.kernel_size, self.pooling)

    def select(self, rows, ctx, k):
        W, score = ctx
        w = k.clamp(max=W)
        return build_cache(rows, select_top(rows, k, score=score, tier=recent_tier(rows, w)), k)


@register_policy("tova")
class TOVAPolicy(PruningPolicy):
    """TOVA (Oren, Hassid, Yarden, Adi & Schwartz 2024, "Transformers are Multi-State RNNs", arXiv 2401.06104).

    Token Omission Via Attention: evicts the entries that the LAST query attends to least. Applied to a whole
    history at once this keeps, per row, the ``k_b`` entries with the largest attention mass from the last history
    query (``stats.key_window_mass`` with ``stats_window=1``; summed over the query heads of the kv head, as the
    paper's head-averaged variant does per layer). No window is forced.
    """

    name = "tova"

    def __init__(self, budget=None, seed=0, **extra):
        super().__init__(budget, seed, **extra)

    def prepare(self, inp, rows):
        return attention_mass(self, inp, rows, window=1)

    def select(self, rows, mass, k):
        return build_cache(rows, select_top(rows, k, score=mass), k)


def pyramid_budgets(k_avg: int, n: int, num_layers: int, window: int, beta: float = 20.0) -> List[int]:
    """PyramidKV's per-layer token budgets for one user (window included), summing to ``num_layers * k_avg``.

    As in PyramidKV: the prefix budget ``a = k_avg - window`` is spread over layers in an arithmetic sequence from
    ``2a - a/beta`` (layer 0) down to ``a/beta`` (last layer), whose mean is exactly ``a``; real values are turned
    into integers by rounding the cumulative sums (so the total is preserved exactly), capped at the prefix length
    ``n - window`` with any excess handed to the shallowest layers that have room; each layer then adds the
    window. With ``k_avg <= window`` or one layer every layer keeps ``k_avg``.
    """
    if num_layers == 1 or k_avg <= window:
        return [k_avg] * num_layers
    a = k_avg - window
    lo = a / beta
    hi = 2 * a - lo
    real = [hi - (hi - lo) * l / (num_layers - 1) for l in range(num_layers)]
    cum, acc = [0], 0.0
    for r in real:
        acc += r
        cum.append(int(acc + 1e-9))
    cum[-1] = a * num_layers
    b = [cum[i + 1] - cum[i] for i in range(num_layers)]
    cap = n - window
    excess = sum(max(0, x - cap) for x in b)
    b = [min(x, cap) for x in b]
    for i in range(num_layers):
        give = min(excess, cap - b[i])
        b[i] += give
        excess -= give
    return [x + window for x in b]


@register_policy("pyramidkv")
class PyramidKVPolicy(SnapKVPolicy):
    """PyramidKV (Cai, Zhang, Gao, Liu, Liu, Lu, Hu, Xiong, Wang & Xiao 2024, "PyramidKV: Dynamic KV Cache
    Compression based on Pyramidal Information Funneling", arXiv 2406.02069).

    SnapKV's selection (window + pooled window-attention top-k, same parameters) with per-layer budgets that
    shrink linearly with depth (``pyramid_budgets``, ``beta`` default 20 as in the paper): layer ``layer`` of
    ``num_layers`` (required extras) keeps ``pyramid_budgets(k_b, n_b, num_layers, window)[layer]`` entries, and the
    budgets of all layers of a user sum to exactly ``num_layers * k_b``. A bytes budget fixes ``k_b`` as the largest
    uniform count fitting the bytes; this layer may then use more or fewer bytes than the budget, but the sum over
    layers fits ``num_layers * bytes`` (per-entry bytes are the same in every layer).
    """

    name = "pyramidkv"

    def __init__(self, budget=None, seed=0, window: Optional[int] = None, kernel_size: int = 7, pooling: str = "max",
                 beta: float = 20.0, **extra):
        super().__init__(budget, seed, window=window, kernel_size=kernel_size, pooling=pooling, **extra)
        self.beta = check_float(beta, "beta", self.name, lo=1.0)
        if "layer" in self.extra or "num_layers" in self.extra:
            self.layer_of({})

    def layer_of(self, extra):
        """(layer, num_layers) from the call context (``compress(..., layer=, num_layers=)``), validated."""
        ctx = {**self.extra, **extra}
        if ctx.get("layer") is None or ctx.get("num_layers") is None:
            raise ValueError(f"{self.name}: needs layer= and num_layers= (per-layer budgets)")
        num_layers = check_int(ctx["num_layers"], "num_layers", self.name, lo=1)
        layer = check_int(ctx["layer"], "layer", self.name, lo=0)
        if layer >= num_layers:
            raise ValueError(f"{self.name}: layer must be < num_layers={num_layers}, got {layer}")
        return layer, num_layers

    def prepare(self, inp, rows):
        self.layer_of(inp.extra)
        return super().prepare(inp, rows)

    def bytes_over_layers(self) -> bool:
        return True

    def row_budgets(self, inp, rows, k):
        layer, num_layers = self.layer_of(inp.extra)
        W = self.obs_window(inp)
        out = k.clone()
        kc, nc = k.cpu(), rows.n.cpu()
        for b in range(k.shape[0]):
            for h in range(k.shape[1]):
                kb, nb = int(kc[b, h]), int(nc[b, h])
                out[b, h] = pyramid_budgets(kb, nb, num_layers, min(W, nb), self.beta)[layer]
        return out


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding values in [0, 2**32).

    Products may wrap the int64 range; only the low 32 bits are kept, which wrapping preserves.
    """
    m = 0xFFFFFFFF
    x = x & m
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & m
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & m
    return x ^ (x >> 16)


@register_policy("random")
class RandomPolicy(PruningPolicy):
    """Random eviction baseline (the "Random" row of MALLOC, arXiv 2601.20234): keeps ``k_b`` entries of each row
    chosen uniformly at random.

    The random rank of an entry is a counter-based hash of ``(seed, kv head, original position)``, so the choice is
    deterministic under ``seed``, differs per head, and does not depend on the batch a user is compressed in.
    """

    name = "random"

    def __init__(self, budget=None, seed=0, **extra):
        super().__init__(budget, seed, **extra)

    def prepare(self, inp, rows):
        B, H, N = rows.pos.shape
        h = _fmix32(torch.tensor(self.seed, dtype=torch.int64) & 0xFFFFFFFF)
        heads = torch.arange(H, dtype=torch.int64, device=rows.k.device)[None, :, None]
        x = _fmix32(h.to(rows.k.device) ^ _fmix32(heads + 0x9E3779B9))
        x = _fmix32(x ^ (rows.pos.to(torch.int64) & 0xFFFFFFFF))
        return x.to(torch.float64)

    def select(self, rows, score, k):
        return build_cache(rows, select_top(rows, k, score=score), k)
