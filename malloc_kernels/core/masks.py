"""Visibility masks of the attention contract (ARCHITECTURE.md, "Attention semantics"), in the padded dense form.

All masks are boolean (True = query i may attend to entry j) and broadcast against scores laid out as
``[B, Hkv, G, Lq, N]`` (G = query heads per kv head). Padding rows/columns (past a user's length) are False, so
padding never reaches a result.
"""
from __future__ import annotations

from typing import Optional

import torch


def valid_rows(q_lengths: torch.Tensor, Lq: int) -> torch.Tensor:
    """``[B, Lq]``: query row i of user b is a real token (i < q_lengths[b])."""
    return torch.arange(Lq, device=q_lengths.device)[None, :] < q_lengths[:, None]


def entry_valid(length: torch.Tensor, capacity: int) -> torch.Tensor:
    """``[B, Hkv, C]``: cache entry j of (b, h) is stored (j < length[b, h])."""
    return torch.arange(capacity, device=length.device) < length.to(torch.int64)[..., None]


def request_visibility(q_lengths: torch.Tensor, k_lengths: torch.Tensor, Lq: int, Lk: int, is_causal: bool,
                       num_targets: Optional[torch.Tensor]) -> torch.Tensor:
    """``[B, Lq, Lk]``: which request keys each query row sees.

    Causal masks are top-left aligned as in SDPA (j <= i). Targets (the last ``num_targets[b]`` request tokens;
    they exist only when keys are the request's own tokens, Lk == Lq per user): a target query never sees another
    target; it sees the non-target tokens (causally if ``is_causal``, which for them is all of them) and itself.
    """
    dev = q_lengths.device
    i = torch.arange(Lq, device=dev)[None, :, None]
    j = torch.arange(Lk, device=dev)[None, None, :]
    vis = (i < q_lengths[:, None, None]) & (j < k_lengths[:, None, None])
    if is_causal:
        vis = vis & (j <= i)
    if num_targets is not None:
        first_target = (q_lengths - num_targets)[:, None, None]
        other_target = (j >= first_target) & (i >= first_target) & (j != i)
        vis = vis & ~other_target
    return vis


def window_rows(q_lengths: torch.Tensor, Lq: int, window: int) -> torch.Tensor:
    """``[B, Lq]``: query row i is among user b's last ``window`` real queries (SnapKV's observation window)."""
    i = torch.arange(Lq, device=q_lengths.device)[None, :]
    return (i < q_lengths[:, None]) & (i >= q_lengths[:, None] - window)
