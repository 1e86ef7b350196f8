"""Full-ranking accuracy metrics for leave-one-out next-item prediction (DESIGN.md section 6).

Every user has one held-out target item and a score for every item of the catalogue. Conventions (stated because
published numbers differ on them):

* Items are ranked among ALL catalogue items (ids ``1..n_items``; id 0 is padding and never ranked). Items the user
  has already interacted with are not removed (no "seen-item" filtering), as in MALLOC's full-ranking protocol.
* ``rank`` is the number of items scoring strictly higher than the target plus half the number of OTHER items tying
  with it, so ties neither reward nor punish a model (a constant scorer gets the expected rank of a random order).
* HR@K = [rank < K]; NDCG@K = 1 / log2(rank + 2) if rank < K else 0 (one relevant item, so IDCG = 1);
  MRR = 1 / (rank + 1); GAUC = per-user AUC of the target against every other item (the fraction of negatives
  scored below the target, ties counting half), averaged over users with equal weight (one positive per user).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Tie-aware 0-based rank of each user's target. scores: ``[U, n_items + 1]`` (column 0 = padding, ignored);
    targets: int ``[U]`` in ``1..n_items``. Returns float64 ``[U]``."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be [users, n_items + 1], got {tuple(scores.shape)}")
    if targets.shape != scores.shape[:1]:
        raise ValueError(f"targets must be [users]={scores.shape[0]}, got {tuple(targets.shape)}")
    if targets.numel() and (int(targets.min()) < 1 or int(targets.max()) >= scores.shape[1]):
        raise ValueError(f"targets must be item ids in 1..{scores.shape[1] - 1}")
    s = scores[:, 1:].to(torch.float64)
    t = s.gather(1, (targets.long() - 1)[:, None])
    higher = (s > t).sum(1).to(torch.float64)
    ties = (s == t).sum(1).to(torch.float64) - 1.0
    return higher + 0.5 * ties


@dataclass
class RankingMetrics:
    """Accumulates per-user ranks over batches and reports the averages."""

    k: int = 10
    ranks: list = field(default_factory=list)
    num_items: int = 0

    def update(self, scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        ranks = target_ranks(scores, targets)
        self.ranks.append(ranks.cpu())
        self.num_items = scores.shape[1] - 1
        return ranks

    def compute(self) -> dict:
        if not self.ranks:
            raise ValueError("no users were evaluated")
        r = torch.cat(self.ranks)
        return metrics_from_ranks(r, self.num_items, self.k)


def metrics_from_ranks(ranks: torch.Tensor, num_items: int, k: int = 10) -> dict:
    """HR@k, NDCG@k, MRR and GAUC (see module docstring) from tie-aware 0-based ranks among ``num_items`` items."""
    r = ranks.to(torch.float64)
    hit = r < k
    ndcg = torch.where(hit, 1.0 / torch.log2(r + 2.0), torch.zeros_like(r))
    negatives = max(num_items - 1, 1)
    return {
        f"HR@{k}": float(hit.double().mean()),
        f"NDCG@{k}": float(ndcg.mean()),
        "MRR": float((1.0 / (r + 1.0)).mean()),
        "GAUC": float((1.0 - r / negatives).mean()),
        "users": int(r.numel()),
    }
