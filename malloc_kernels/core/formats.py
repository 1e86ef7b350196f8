"""The cache payload formats: names, bits per stored element, packed row width.

Every layer that stores or reads a compressed cache takes these names from here (the storage rules themselves are
in ``core/kvcache.py``'s docstring and ``ARCHITECTURE.md``, "Cache storage").
"""
from __future__ import annotations

import math

import torch

FLOAT_FORMAT = "float"
INT_FORMATS = {"int8": 8, "int4": 4, "int2": 2}
FP8_FORMAT = "fp8"
FORMATS = (FLOAT_FORMAT, FP8_FORMAT, *INT_FORMATS)
K_AXES = ("token", "channel")
SCALE_DTYPE = torch.float16


def format_bits(fmt: str) -> int:
    """Bits per stored element of a payload format (float formats: 0, meaning 'the tensor's own dtype')."""
    if fmt == FLOAT_FORMAT:
        return 0
    if fmt == FP8_FORMAT:
        return 8
    if fmt in INT_FORMATS:
        return INT_FORMATS[fmt]
    raise ValueError(f"unknown cache format {fmt!r}; expected one of {FORMATS}")


def packed_width(head_dim: int, fmt: str) -> int:
    """Bytes per stored row of ``head_dim`` elements in a quantized format."""
    return math.ceil(head_dim * format_bits(fmt) / 8)
