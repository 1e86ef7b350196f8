"""The float64 oracle of the fused losses (one name per op in every layer: ``reference.<op>``,
``torch.ops.malloc_kernels.<op>`` (C++ CPU), ``ops.<op>``)."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F


def cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per row ``i``: ``loss[i] = logsumexp(z_i) - z_i[t_i]`` and the gradient ``softmax(z_i) - onehot(t_i)``,
    in float64 (what ``cross_entropy_rows_`` writes over its logits)."""
    z = logits.double()
    loss = torch.logsumexp(z, dim=1) - z.gather(1, targets[:, None]).squeeze(1)
    grad = torch.softmax(z, dim=1)
    grad[torch.arange(z.shape[0]), targets] -= 1.0
    return loss, grad


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         reduction: str = "mean", ignore_index: int = -100) -> torch.Tensor:
    """``F.cross_entropy(hidden @ weight.T, targets)`` in float64 (differentiable)."""
    return F.cross_entropy(hidden.double() @ weight.double().t(), targets, reduction=reduction,
                           ignore_index=ignore_index)
