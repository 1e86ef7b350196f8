"""Launch helpers shared by every Triton launcher of the package (attention, packer, product-key memory).

* ``device_guard(t)``: launches go to the current CUDA device, so a launcher whose tensors live on another GPU must
  make that device current for the launch (``torch.cuda.device``), or the kernel faults or reads another device's
  memory. CPU tensors (the interpreter) need no guard.
* ``MAX_GRID``: the CUDA grid limits. Axis 0 takes up to 2^31 - 1 programs, axes 1 and 2 only 65,535, so every
  launcher puts its batch-sized axis (B * heads, which reaches 10^6 in serving) on axis 0.
"""
from __future__ import annotations

import contextlib

import torch

MAX_GRID = (2 ** 31 - 1, 65535, 65535)


def device_guard(t: torch.Tensor):
    """Context manager making ``t``'s GPU the current device (a no-op for CPU tensors)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def grid_ok(grid) -> bool:
    """Whether a launch grid (1 to 3 axes) is within ``MAX_GRID``."""
    return all(1 <= g <= m for g, m in zip(grid, MAX_GRID))
