"""The quantize family: every packer of the cache storage contract behind one ``quantize_cache``.

Backends (rows of ``core/registry.py``), all bit-exact with each other (codes, scales and zeros):

- ``torch``: ``cache.quant.quantize_tensor``, the PyTorch reference (any device, any float dtype);
- ``cpu``: the C++ packer ``torch.ops.malloc_kernels.quantize_pack`` (``ops/cpp_quant.py``; OpenMP over rows);
- ``triton``: ``triton/quantize_pack.py`` (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1`` by name);
- ``cuda``: the CUDA C++ packer ``cuda_quantize_pack`` (``ops/cuda.py``).

``compress`` packs through ``quantize_cache`` with ``backend="auto"``: the C++ packer for CPU tensors, Triton
then CUDA C++ for CUDA tensors, the reference otherwise. A launcher exposes
``quantize_tensor(x, length, fmt, group_size, axis, name) -> (codes, scale, zero | None)`` and
``supports(x) -> (ok, why)``.
"""
from __future__ import annotations

import importlib
from types import SimpleNamespace
from typing import Optional, Tuple

import torch

from ..cache import quant
from ..core import registry
from ..core.kvcache import KVCacheBase
from . import cpp_quant, cuda

FAMILY = "quantize"
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _named(pack):
    """Run a compiled packer with the reference's argument checks first, naming the tensor in its errors."""
    def quantize_tensor(x, length, fmt, group_size, axis="token", name="x"):
        quant.check_quantize_args(x, fmt, group_size, axis, name)
        try:
            return pack(x, length, fmt, group_size, axis)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    return quantize_tensor


def _supports_kernel_dtypes(x: torch.Tensor) -> Tuple[bool, str]:
    if x.dtype not in _KERNEL_DTYPES:
        return False, f"the compiled packers take float32/float16/bfloat16, got {x.dtype}"
    return True, ""


def _triton_launcher():
    # Imported on first use only (importing triton is slow and must follow TRITON_INTERPRET).
    mod = importlib.import_module("malloc_kernels.triton.quantize_pack")
    return SimpleNamespace(quantize_tensor=mod.quantize_pack, supports=_supports_kernel_dtypes)


_TORCH = SimpleNamespace(quantize_tensor=quant.quantize_tensor, supports=lambda x: (True, ""))
# The C++ packer widens any float dtype to fp32 exactly as the reference's .float() does.
_CPU = SimpleNamespace(quantize_tensor=_named(cpp_quant.quantize_pack), supports=lambda x: (True, ""))
_CUDA = SimpleNamespace(quantize_tensor=_named(cuda.quantize_pack), supports=_supports_kernel_dtypes)
registry.register_backend(FAMILY, "torch", devices=("*",), priority=0, load=lambda: _TORCH)
registry.register_backend(FAMILY, "cpu", devices=("cpu",), priority=10, load=lambda: _CPU, ops=("quantize_pack",))
registry.register_backend(FAMILY, "cuda", devices=("cuda",), priority=15, load=lambda: _CUDA,
                          ops=("cuda_quantize_pack",), needs_cuda=True)
registry.register_backend(FAMILY, "triton", devices=("cuda",), priority=20, load=_triton_launcher, needs_triton=True)
BACKENDS = ("auto",) + registry.names(FAMILY)


def select(x: torch.Tensor, backend: str = "auto") -> Tuple[str, object]:
    """(name, launcher) of the packer for ``x``; ``ValueError`` for an unknown or unusable explicit backend."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return registry.select(FAMILY, backend, x.device, check=lambda mod: mod.supports(x))


def quantize_tensor(x: torch.Tensor, length: torch.Tensor, fmt: str, group_size: int, axis: str = "token",
                    name: str = "x", backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor,
                                                                     Optional[torch.Tensor]]:
    """``cache.quant.quantize_tensor`` (same arguments and results, bit for bit) on the chosen packer."""
    return select(x, backend)[1].quantize_tensor(x, length, fmt, group_size, axis, name)


def quantize_cache(cache: KVCacheBase, k_format: str, v_format: str, group_size: int, k_axis: str = "token",
                   backend: str = "auto") -> KVCacheBase:
    """``cache.quant.quantize_cache`` (same arguments, same validated result, bit for bit) on the chosen packer."""
    quant.check_quantize_cache_args(cache, k_format, v_format, k_axis)
    pack = select(cache.k, backend)[1].quantize_tensor
    return quant.quantize_cache_sides(cache, k_format, v_format, group_size, k_axis, pack)
