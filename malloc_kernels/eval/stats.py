"""Per-user ranking statistics of the harness: the popularity baseline, the sampled-negative protocol, length
buckets and paired bootstrap intervals.

Every accuracy figure of the harness is a mean over test users of a per-user value (``per_user_metrics``), so two
rows evaluated on the SAME users can be compared pairwise: ``paired_bootstrap`` resamples users with replacement
(seeded, so the interval is reproducible) and reports the 95% percentile interval of the mean difference; a change
is *significant* when that interval excludes 0 (Efron & Tibshirani 1993, ch. 13; the per-user pairing is what
recommender evaluations use to compare two models on one test set).

Ranks follow ``models.metrics``: 0-based, ties count against the target.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

DEFAULT_BUCKETS = (200, 1000)   # history-length bucket edges: < 200, 200-1k, >= 1k interactions


def per_user_metrics(ranks, k: int = 10) -> Dict[str, np.ndarray]:
    """float64 arrays over users: ``HR@k`` (target in the top k), ``NDCG@k`` and ``MRR`` of 0-based ``ranks``."""
    r = np.asarray(ranks, dtype=np.float64)
    hit = r < k
    return {f"HR@{k}": hit.astype(np.float64),
            f"NDCG@{k}": np.where(hit, 1.0 / np.log2(r + 2.0), 0.0),
            "MRR": 1.0 / (r + 1.0)}


def paired_bootstrap(base, other, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> Dict[str, float]:
    """Mean change ``other - base`` over paired per-user values and its bootstrap percentile interval.

    ``base``/``other``: per-user values of two rows on the same users in the same order. Returns ``delta``,
    ``lo``, ``hi`` (the ``level`` interval) and ``significant`` (the interval excludes 0). Deterministic given
    ``seed``. No users -> NaNs and not significant.
    """
    a, b = np.asarray(base, dtype=np.float64), np.asarray(other, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"base and other must be 1-D per-user arrays of one shape, got {a.shape} and {b.shape}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if a.size == 0:
        return {"delta": float("nan"), "lo": float("nan"), "hi": float("nan"), "significant": False}
    d = b - a
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot, dtype=np.float64)
    # chunks of resamples keep the index matrix small for thousands of users
    step = max(1, 2_000_000 // d.size)
    for s in range(0, n_boot, step):
        n = min(step, n_boot - s)
        means[s:s + n] = d[rng.integers(0, d.size, size=(n, d.size))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"delta": float(d.mean()), "lo": float(lo), "hi": float(hi), "significant": bool(lo > 0 or hi < 0)}


def bucket_labels(edges: Sequence[int] = DEFAULT_BUCKETS) -> List[str]:
    """Labels of the buckets cut at ``edges`` (increasing): ``["<200", "200-1k", ">=1k"]`` for (200, 1000)."""
    edges = list(edges)
    if any(e < 1 for e in edges) or edges != sorted(set(edges)):
        raise ValueError(f"bucket edges must be increasing positive ints, got {edges}")

    def fmt(x):
        return f"{x // 1000}k" if x >= 1000 and x % 1000 == 0 else str(x)
    if not edges:
        return ["all lengths"]
    out = [f"<{fmt(edges[0])}"]
    out += [f"{fmt(lo)}-{fmt(hi)}" for lo, hi in zip(edges[:-1], edges[1:])]
    out.append(f">={fmt(edges[-1])}")
    return out


def assign_buckets(lengths, edges: Sequence[int] = DEFAULT_BUCKETS) -> np.ndarray:
    """Bucket index of each history length (``bucket_labels(edges)[i]``)."""
    return np.searchsorted(np.asarray(list(edges), dtype=np.int64), np.asarray(lengths, dtype=np.int64),
                           side="right")


def item_popularity(train_sequences: Sequence[np.ndarray], n_items: int) -> torch.Tensor:
    """float64 ``[n_items + 1]`` interaction counts of every item over the training sequences (index 0 unused)."""
    counts = np.zeros(n_items + 1, dtype=np.float64)
    for s in train_sequences:
        np.add.at(counts, np.asarray(s, dtype=np.int64), 1.0)
    return torch.from_numpy(counts)


def popularity_scores(popularity: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Scores ``[B, n_items + 1]`` of the popularity ranking (same for every user; column 0 = padding, -inf)."""
    s = popularity.to(torch.float32).clone()
    s[0] = float("-inf")
    return s[None].expand(batch_size, -1)


def sample_negatives(n_items: int, targets, histories: Sequence[np.ndarray], num: int = 100,
                     seed: int = 0) -> torch.Tensor:
    """int64 ``[U, num]``: per user ``num`` distinct items drawn uniformly from the items the user never
    interacted with (not the target, not in the history): the sampled protocol of long-sequence papers
    ("rank the target among 100 random negatives"). Deterministic given ``seed``; raises if a user has fewer than
    ``num`` candidate items."""
    targets = np.asarray(targets, dtype=np.int64)
    rng = np.random.default_rng(seed)
    out = np.empty((len(targets), num), dtype=np.int64)
    for u, (t, h) in enumerate(zip(targets, histories)):
        seen = set(np.asarray(h, dtype=np.int64).tolist())
        seen.add(int(t))
        if n_items - len(seen) < num:
            raise ValueError(f"user {u}: only {n_items - len(seen)} unseen items for {num} sampled negatives")
        picked: list = []
        chosen = set()
        while len(picked) < num:
            for x in rng.integers(1, n_items + 1, size=2 * num).tolist():
                if x not in seen and x not in chosen:
                    chosen.add(x)
                    picked.append(x)
                    if len(picked) == num:
                        break
        out[u] = picked
    return torch.from_numpy(out)


def sampled_ranks(scores: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target among itself + its sampled ``negatives [B, num]`` (ties against the target)."""
    t = scores.gather(1, targets.to(torch.int64)[:, None])
    return (scores.gather(1, negatives.to(torch.int64)) >= t).sum(1)


def summarize(values: Dict[str, np.ndarray], idx: Optional[np.ndarray] = None) -> Dict[str, float]:
    """Means of per-user metric arrays over users ``idx`` (all when None); NaN for an empty selection."""
    out = {}
    for name, v in values.items():
        sel = v if idx is None else v[idx]
        out[name] = float(sel.mean()) if sel.size else float("nan")
    return out


def compare(base: Dict[str, np.ndarray], other: Dict[str, np.ndarray], idx: np.ndarray, metric: str,
            n_boot: int, seed: int) -> Tuple[float, float, float, bool]:
    """``paired_bootstrap`` of one metric over users ``idx``: (delta, lo, hi, significant)."""
    r = paired_bootstrap(base[metric][idx], other[metric][idx], n_boot=n_boot, seed=seed)
    return r["delta"], r["lo"], r["hi"], r["significant"]
