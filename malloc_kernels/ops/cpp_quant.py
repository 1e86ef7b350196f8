"""C++ quantize/pack ops (``torch.ops.malloc_kernels.quantize_pack`` & co.) and their fake implementations.

The kernels live in ``csrc/cpu/quantize_pack.cpp`` (OpenMP over (user, kv head) rows) with the numerics in
``csrc/include/malloc_kernels/quant.h``, the header the CUDA packer and the attention kernels share. They write
exactly the storage contract of ``malloc_kernels/core/kvcache.py`` and are bit-exact with the PyTorch packer
``malloc_kernels.cache.quant.quantize_tensor`` (codes, scales and zeros):

    int:  zero = f16_round_down(min + 0), scale = f16_round_up((max - zero) / qmax),
          code = clamp(round_half_even((x - zero) / scale), 0, qmax)          (fp32; code 0 where scale == 0)
    fp8:  scale = f16_round_up(absmax / 448), code = e4m3fn(x / scale)         (RNE, saturating at 448)

with groups over the valid entries only (KIVI's layout, Liu et al. 2024, arXiv 2402.02750). Import this module
(or ``malloc_kernels._C``) before calling the ops; it registers the fake (meta) kernels so the ops trace under
``torch.compile`` and pass ``torch.library.opcheck``.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ..core import extension
from ..core.formats import FP8_FORMAT, INT_FORMATS, K_AXES, SCALE_DTYPE



def load() -> None:
    """Load ``malloc_kernels._C`` (registers the C++ ops); raises ImportError with the reason if it is missing."""
    ok, why = extension.load()
    if not ok:
        raise ImportError(why)


def _bits(fmt: str) -> int:
    if fmt == FP8_FORMAT:
        return 8
    if fmt in INT_FORMATS:
        return INT_FORMATS[fmt]
    raise ValueError(f"fmt must be one of {tuple(INT_FORMATS) + (FP8_FORMAT,)}, got {fmt!r}")


def _scale_shape(B: int, H: int, N: int, D: int, group_size: int, axis: str):
    if axis == "channel":
        return (B, H, -(-N // group_size), D)
    return (B, H, N, D // group_size)


def _check_args(fmt: str, group_size: int, axis: str, head_dim: int) -> None:
    _bits(fmt)
    if axis not in K_AXES:
        raise ValueError(f"axis must be one of {K_AXES}, got {axis!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be a positive int, got {group_size!r}")
    if group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    if axis == "token" and head_dim % group_size:
        raise ValueError(f"group_size={group_size} must divide head_dim {head_dim} on the token axis")


def quantize_pack(x: torch.Tensor, length: torch.Tensor, fmt: str, group_size: int,
                  axis: str = "token") -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Quantize and pack ``x`` (floating ``[B, H, N, D]``, any strides, CPU) in C++.

    ``length`` int ``[B, H]``: valid entries per row (padding gets code/scale/zero 0). Returns
    ``(codes uint8 [B, H, N, ceil(D*bits/8)], scale float16, zero float16 or None for fp8)``, scale/zero
    ``[B, H, N, D // G]`` (``axis="token"``) or ``[B, H, ceil(N / G), D]`` (``axis="channel"``).
    Raises ValueError for NaN/inf among valid values or ranges that do not fit float16.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise TypeError("x must be a floating tensor [B, H, N, D]")
    if not isinstance(length, torch.Tensor) or length.is_floating_point():
        raise TypeError("length must be an integer tensor [B, H]")
    _check_args(fmt, group_size, axis, x.shape[-1])
    load()
    codes, scale, zero = torch.ops.malloc_kernels.quantize_pack(x, length.to(torch.int32), fmt, group_size, axis)
    return codes, scale, (None if fmt == FP8_FORMAT else zero)


def unpack_dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], length: torch.Tensor,
                      fmt: str, group_size: int, axis: str, head_dim: int) -> torch.Tensor:
    """Inverse of ``quantize_pack``: float32 ``[B, H, N, head_dim]``, ``code * scale + zero`` (fp8:
    ``e4m3fn(code) * scale``), exactly 0 on padding entries."""
    _check_args(fmt, group_size, axis, head_dim)
    if fmt == FP8_FORMAT:
        zero = torch.empty(0, dtype=SCALE_DTYPE, device=codes.device)
    elif zero is None:
        raise ValueError(f"zero is required for format {fmt!r}")
    load()
    return torch.ops.malloc_kernels.unpack_dequantize(codes, scale, zero, length.to(torch.int32), fmt, group_size,
                                                      axis, head_dim)


NUMERICS = ("f16_bits", "f16_decode", "f16_round_down", "f16_round_up", "round_half_even", "e4m3fn",
            "e4m3fn_decode")


def quant_numerics(x: torch.Tensor, fn: str) -> torch.Tensor:
    """Apply one ``quant.h`` primitive elementwise (tests of the host/device-shared numerics).

    ``fn``: ``"f16_bits"`` (fp32 -> int16 fp16 bits, RNE), ``"f16_decode"`` (int16 bits -> fp32),
    ``"f16_round_down"`` / ``"f16_round_up"`` (fp32 -> fp32), ``"round_half_even"`` (fp32 -> fp32),
    ``"e4m3fn"`` (fp32 -> uint8 bits), ``"e4m3fn_decode"`` (uint8 bits -> fp32).
    """
    if fn not in NUMERICS:
        raise ValueError(f"fn must be one of {NUMERICS}, got {fn!r}")
    load()
    return torch.ops.malloc_kernels.quant_numerics(x, fn)


def _register_fakes() -> None:
    try:
        load()
    except ImportError:  # the extension is not built: nothing to register (the ops do not exist either)
        return

    @torch.library.register_fake("malloc_kernels::quantize_pack")
    def _quantize_pack_fake(x, length, fmt, group_size, axis):
        B, H, N, D = x.shape
        W = math.ceil(D * _bits(fmt) / 8)
        codes = x.new_empty((B, H, N, W), dtype=torch.uint8)
        scale = x.new_empty(_scale_shape(B, H, N, D, group_size, axis), dtype=SCALE_DTYPE)
        zero = x.new_empty((0,) if fmt == FP8_FORMAT else scale.shape, dtype=SCALE_DTYPE)
        return codes, scale, zero

    @torch.library.register_fake("malloc_kernels::unpack_dequantize")
    def _unpack_dequantize_fake(codes, scale, zero, length, fmt, group_size, axis, head_dim):
        B, H, N = codes.shape[:3]
        return codes.new_empty((B, H, N, head_dim), dtype=torch.float32)

    @torch.library.register_fake("malloc_kernels::quant_numerics")
    def _quant_numerics_fake(x, fn):
        dtype = {"f16_bits": torch.int16, "e4m3fn": torch.uint8}.get(fn, torch.float32)
        return x.new_empty(x.shape, dtype=dtype)


_register_fakes()
