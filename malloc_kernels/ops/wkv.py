"""``wkv``: RWKV-4's WKV recurrence over jagged per-user sequences, with an initial and a final per-user state.

``wkv(w, u, k, v, offsets, state=None) -> (y, state_out)``: the math is ``malloc_kernels.reference.wkv``'s (the
oracle; Peng et al. 2023, arXiv 2305.13048), in the RWKV-4 numerically stable running-maximum form. ``k, v``:
``[T, C]`` float32/float64, users concatenated (int64 ``offsets [B+1]``); ``w`` (log decay per step, the model passes
``-exp(decay)``) and ``u`` (bonus of the current token): ``[C]``; ``state``: ``[B, 3, C]`` = ``(a, b, p)`` with the
numerator ``a e^p`` and denominator ``b e^p`` of every user's history so far (None = empty histories). ``y``: ``[T,
C]``; ``state_out``: the state after each user's tokens, so ``wkv`` over a history and then over a request from the
returned state equals ``wkv`` over both at once -- the serving path of ``models/rwkv.py``.

Backends (the ``wkv`` family of ``core/registry.py``): ``cpu``, the C++ kernels ``torch.ops.malloc_kernels.wkv`` /
``wkv_backward`` (``csrc/cpu/wkv.cpp``: OpenMP over users x channel blocks, vectorised over channels, AVX2 /
AVX-512 chosen at run time) with this module's ``autograd.Function``; ``reference``, the plain float64 loop (any
device). Gradients flow into ``w, u, k, v``; a carried ``state`` is a constant (serving never differentiates it).
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Optional, Tuple

import torch

from ..core import extension, registry
from ..core.layout import device_assert
from ..reference import wkv as reference_wkv
from ..reference.wkv import empty_state

__all__ = ["wkv", "empty_state", "BACKENDS", "cpu_available"]

_DTYPES = (torch.float32, torch.float64)


def _validate(w, u, k, v, offsets, state):
    for name, t in (("w", w), ("u", u), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} must be float32 or float64, got {t.dtype}")
        if t.dtype != k.dtype:
            raise TypeError(f"{name} must have k's dtype {k.dtype}, got {t.dtype}")
    if k.dim() != 2 or k.shape[1] < 1:
        raise ValueError(f"k must be [T, C] with C >= 1, got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    C = k.shape[1]
    for name, t in (("w", w), ("u", u)):
        if t.shape != (C,):
            raise ValueError(f"{name} must be [C={C}], got {tuple(t.shape)}")
    if not isinstance(offsets, torch.Tensor) or offsets.dtype != torch.int64 or offsets.dim() != 1 \
            or offsets.numel() < 1:
        raise ValueError(f"offsets must be an int64 tensor [B+1], got {getattr(offsets, 'dtype', type(offsets))} "
                         f"{tuple(getattr(offsets, 'shape', ()))}")
    B = offsets.numel() - 1
    # a device assert, not a host read: RWKV's serving step stays capturable
    device_assert((offsets[0] == 0) & (offsets[-1] == k.shape[0]) & (offsets[1:] >= offsets[:-1]).all(),
                  f"offsets must start at 0, be non-decreasing and end at T={k.shape[0]}")
    if state is not None:
        if not isinstance(state, torch.Tensor) or state.dtype != k.dtype or state.shape != (B, 3, C):
            raise ValueError(f"state must be a {k.dtype} tensor [B={B}, 3, C={C}], got "
                             f"{getattr(state, 'dtype', type(state).__name__)} {tuple(getattr(state, 'shape', ()))}")
        if state.requires_grad and torch.is_grad_enabled():
            raise ValueError("state: gradients into a carried state are not supported; pass state.detach()")


class _WKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, u, k, v, offsets, state):
        need = any(ctx.needs_input_grad[:4])
        y, aux, out = torch.ops.malloc_kernels.wkv(w, u, k, v, offsets, state, need)
        if need:
            ctx.save_for_backward(w, u, k, v, offsets, state, y, aux)
        ctx.mark_non_differentiable(out)
        return y, out

    @staticmethod
    def backward(ctx, grad_y, grad_state):
        w, u, k, v, offsets, state, y, aux = ctx.saved_tensors
        if grad_y is None:
            grad_y = torch.zeros_like(y)
        gw, gu, gk, gv = torch.ops.malloc_kernels.wkv_backward(w, u, k, v, offsets, state, y, aux, grad_y)
        return gw, gu, gk, gv, None, None


def _cpu_wkv(w, u, k, v, offsets, state):
    return _WKV.apply(w, u, k, v, offsets, state)


def _ref_wkv(w, u, k, v, offsets, state):
    y, out = reference_wkv.wkv(w, u, k, v, offsets, state)
    return y.to(k.dtype), out.to(k.dtype)


def _cpu_supports(k):
    if k.device.type != "cpu":
        return False, f"it takes CPU tensors, got {k.device}"
    return True, ""


registry.register_backend("wkv", "reference", devices=("*",), priority=0,
                          load=lambda: SimpleNamespace(wkv=_ref_wkv, supports=lambda k: (True, "")))
registry.register_backend("wkv", "cpu", devices=("cpu",), priority=10,
                          load=lambda: SimpleNamespace(wkv=_cpu_wkv, supports=_cpu_supports),
                          ops=("wkv", "wkv_backward"))
BACKENDS = ("auto",) + registry.names("wkv")

if extension.has_op("wkv")[0]:
    @torch.library.register_fake("malloc_kernels::wkv")
    def _wkv_fake(w, u, k, v, offsets, state, need_aux):
        T, C = k.shape
        return k.new_empty((T, C)), k.new_empty((2 if need_aux else 0, T, C)), k.new_empty(state.shape)

    @torch.library.register_fake("malloc_kernels::wkv_backward")
    def _wkv_backward_fake(w, u, k, v, offsets, state, y, aux, grad_y):
        return w.new_empty(w.shape), u.new_empty(u.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def cpu_available() -> bool:
    """True when the C++ WKV kernels are built."""
    return registry.status("wkv", "cpu")[0]


def wkv(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor,
        state: Optional[torch.Tensor] = None, *, backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """``(y [T, C], state_out [B, 3, C])`` (module docstring). ``backend``: ``"auto"``, ``"cpu"`` or
    ``"reference"``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _validate(w, u, k, v, offsets, state)
    if state is None:
        state = empty_state(offsets.numel() - 1, k.shape[1], dtype=k.dtype, device=k.device)
    mod = registry.select("wkv", backend, k.device, check=lambda m: m.supports(k))[1]
    return mod.wkv(w, u, k, v, offsets, state)
