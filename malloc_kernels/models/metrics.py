"""Full-ranking evaluation (ARCHITECTURE.md, "Serving and evaluation").

Convention: every item ``1..n_items`` is a candidate, including items already in the user's history; only the
padding id 0 is excluded. The target's 0-based rank is the number of OTHER items whose score is >= the target's
(ties count against the target, so a constant model scores HR = 0, never a lucky 1). Per user:
``HR@K = [rank < K]``, ``NDCG@K = [rank < K] / log2(rank + 2)``, ``MRR = 1 / (rank + 1)`` (over the full list) and
``GAUC = 1 - rank / (n_items - 1)`` (AUC of the target against every other item); reported as means over users.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..data.dataset import EvalExamples, eval_batches, split_request


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based ranks of ``targets [B]`` in ``scores [B, n_items + 1]`` (column 0 = padding, ignored)."""
    s = scores[:, 1:]
    t = s.gather(1, (targets - 1)[:, None])
    return (s >= t).sum(1) - 1


def rank_metrics(ranks: torch.Tensor, n_items: int, ks: Sequence[int] = (10,)) -> Dict[str, float]:
    r = ranks.to(torch.float64)
    out = {}
    for k in ks:
        hit = r < k
        out[f"HR@{k}"] = float(hit.double().mean()) if r.numel() else 0.0
        out[f"NDCG@{k}"] = float(torch.where(hit, 1.0 / torch.log2(r + 2), torch.zeros_like(r)).mean()) \
            if r.numel() else 0.0
    out["MRR"] = float((1.0 / (r + 1)).mean()) if r.numel() else 0.0
    out["GAUC"] = float((1.0 - r / max(n_items - 1, 1)).mean()) if r.numel() else 0.0
    out["users"] = int(r.numel())
    return out


@torch.no_grad()
def evaluate(model, examples: EvalExamples, *, max_len: Optional[int] = None, batch_size: int = 256,
             request_len: Optional[int] = None, ks: Sequence[int] = (10,), progress: bool = True,
             desc: str = "eval") -> Dict[str, float]:
    """Full-ranking metrics of ``model`` on leave-one-out ``examples`` (module docstring for the convention).

    Histories are truncated to the most recent ``max_len`` (default: the model's) items. ``request_len=None``:
    full recompute (``last_hidden``); ``request_len = r``: the serving path, i.e. the history minus its last ``r``
    items is encoded into caches and the last ``r`` items are served over them (``r`` >= the history length
    means an empty cache).
    """
    was_training = model.training
    model.eval()
    max_len = max_len or model.cfg.max_len
    ranks = []
    n_batches = (len(examples) + batch_size - 1) // batch_size
    try:
        for batch in tqdm(eval_batches(examples, batch_size, max_len), total=n_batches, desc=desc,
                          disable=not progress, leave=False):
            if request_len is None:
                h = model.last_hidden(batch)
            else:
                h = _served_hidden(model, batch, request_len)
            ranks.append(target_ranks(model.score_all_items(h), batch.targets))
    finally:
        model.train(was_training)
    r = torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.int64)
    return rank_metrics(r, model.cfg.n_items, ks)


def _served_hidden(model, batch, request_len: int) -> torch.Tensor:
    hist, req = split_request(batch, request_len)
    return model.serve(req, caches=model.encode_history(hist))
