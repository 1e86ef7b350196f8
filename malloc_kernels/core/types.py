"""Result types shared by every attention backend."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch


@dataclass
class AttentionStats:
    """Per-key attention statistics for the scoring policies (H2O, SnapKV, TOVA, PyramidKV, IntactKV, D2O).

    "Mass" of key j is ``sum_i w_ij`` over queries i and over the query heads that share j's kv head, with
    ``w_ij`` the normalised softmax probability (counts included) for ``kind="softmax"`` and the magnitude of the
    pointwise weight ``|c_j * silu(s_ij)| / n_i`` for ``kind="hstu"``. ``*_window_mass`` sums only over each
    user's last ``stats_window`` queries (SnapKV's observation window; TOVA uses a window of 1).

    Shapes (float32, float64 for float64 inputs): request keys ``key_mass`` dense ``[B, Hkv, Lk]`` or jagged
    ``[total_k, Hkv]``; cache entries ``cache_mass [B, Hkv, C]`` and residual entries ``residual_mass [B, Hkv, R]``
    (zero on padding; None without a cache / residual).
    """

    key_mass: torch.Tensor
    key_window_mass: Optional[torch.Tensor] = None
    cache_mass: Optional[torch.Tensor] = None
    cache_window_mass: Optional[torch.Tensor] = None
    residual_mass: Optional[torch.Tensor] = None
    residual_window_mass: Optional[torch.Tensor] = None
    window: Optional[int] = None


class AttentionResult(NamedTuple):
    """Returned by ``attention`` when ``return_lse`` or ``return_stats`` is set.

    output: same layout/dtype as the query; lse: float32 (float64 for float64 inputs) ``[B, Hq, Lq]`` dense or
    ``[total_q, Hq]`` jagged, ``-inf`` for rows with nothing to attend to, None for ``kind="hstu"`` or when not
    requested; stats: ``AttentionStats`` or None.
    """

    output: torch.Tensor
    lse: Optional[torch.Tensor]
    stats: Optional[AttentionStats]
