"""The RWKV-4 WKV recurrence in plain PyTorch: the oracle of ``malloc_kernels.ops.wkv`` (and its ``reference``
backend).

Peng et al. 2023, "RWKV: Reinventing RNNs for the Transformer Era" (arXiv 2305.13048). Per user and channel, with
log decay ``w`` (< 0 decays), bonus ``u``, keys ``k_t`` and values ``v_t``::

    wkv_t = (A_t + e^{u + k_t} v_t) / (B_t + e^{u + k_t})
    A_{t+1} = e^w A_t + e^{k_t} v_t,   B_{t+1} = e^w B_t + e^{k_t}

carried as ``(a, b, p)`` with ``A = a e^p``, ``B = b e^p`` (RWKV-4's running maximum, so no exponent is ever
positive); the empty state is ``(0, 0, -inf)``. This module runs that recurrence token by token, one user at a time,
in float64 whatever the input dtype (``compute_dtype`` changes that: the tests' "PyTorch in the kernel's dtype"
yardstick): slow and obviously right. Differentiable by torch's autograd (the oracle of the
kernel's backward too).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def empty_state(batch: int, channels: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """The state of users with no history: ``[B, 3, C]`` holding ``(a, b, p) = (0, 0, -inf)``."""
    s = torch.zeros(batch, 3, channels, dtype=dtype, device=device)
    s[:, 2] = float("-inf")
    return s


def wkv(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor,
        state: Optional[torch.Tensor] = None, *, compute_dtype=torch.float64) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(y [T, C], state_out [B, 3, C])`` in ``compute_dtype`` for jagged ``k, v [T, C]`` (users split by int64
    ``offsets [B+1]``), ``w, u [C]`` and the users' carried ``state [B, 3, C]`` (None = empty)."""
    w, u, k, v = (t.to(compute_dtype) for t in (w, u, k, v))
    B = offsets.numel() - 1
    C = k.shape[1]
    state = empty_state(B, C, compute_dtype, k.device) if state is None else state.to(compute_dtype)
    ys, outs = [], []
    for b in range(B):
        a, bb, p = state[b, 0], state[b, 1], state[b, 2]
        for t in range(int(offsets[b]), int(offsets[b + 1])):
            kt, vt = k[t], v[t]
            uk = u + kt
            q = torch.maximum(p, uk)
            e1, e2 = torch.exp(p - q), torch.exp(uk - q)
            ys.append((e1 * a + e2 * vt) / (e1 * bb + e2))
            pw = p + w
            p2 = torch.maximum(pw, kt)
            f1, f2 = torch.exp(pw - p2), torch.exp(kt - p2)
            a, bb, p = f1 * a + f2 * vt, f1 * bb + f2, p2
        outs.append(torch.stack([a, bb, p]))
    y = torch.stack(ys) if ys else k.new_zeros(0, C)
    out = torch.stack(outs) if outs else k.new_zeros(0, 3, C)
    return y, out
