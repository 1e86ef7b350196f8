"""Chunked linear cross-entropy with the gradient computed in the forward pass.

``linear_cross_entropy(hidden [T, d], weight [C, d], targets [T]) == F.cross_entropy(hidden @ weight.T, targets)``.

Why: with T tokens and C classes (the recommenders' full softmax: T ~ 6,400 tokens per batch, C = 3,706 items) the
unfused loss writes the ``[T, C]`` logits, reads them for log-softmax, writes log-probabilities, zero-fills and
scatters a gradient of the same size, and reads both again in the backward: ~6 passes over 95 MB that do not fit in
cache. Here the rows are processed in chunks of ``chunk_size`` rows sized so a chunk of logits (~2 MB) stays in
cache: ``Z = H_c W^T`` (GEMM), then one fused row pass (``cross_entropy_rows_``: max, exp-and-sum, scale) turns
``Z`` into the per-row loss and its gradient ``G = softmax(Z) - onehot`` in place, then ``grad_H_c = G W`` and
``grad_W += G^T H_c`` (two GEMMs) while ``G`` is still cached. Only ``grad_H`` (``[T, d]``) and ``grad_W``
(``[C, d]``) are kept for the backward, which just scales them by the incoming gradient (Liger-Kernel's fused linear
cross-entropy, Hsu et al. 2024, arXiv 2410.10989, with a CPU cache-sized chunk). The GEMMs stay torch's (oneDNN /
MKL); the row pass is the C++ kernel ``torch.ops.malloc_kernels.cross_entropy_rows_`` (AVX2 exp) on CPU float32 /
float64 tensors and the same math in torch ops elsewhere (``backend="torch"``, e.g. CUDA tensors).

Not twice differentiable (the gradient is a saved tensor).
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch

from ..core import extension, registry

__all__ = ["linear_cross_entropy", "cross_entropy_rows_", "BACKENDS", "cpu_available"]

_CHUNK_BYTES = 2 << 20  # logits bytes per chunk: stays in L2+L3 (measured on 2 cores: 128-256 rows of 3,706 best)
_CPU_DTYPES = (torch.float32, torch.float64)


def _rows_torch(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    lse = torch.logsumexp(logits, dim=1)
    loss = lse - logits.gather(1, targets[:, None]).squeeze(1)
    logits.sub_(lse[:, None]).exp_()
    logits.scatter_add_(1, targets[:, None], logits.new_full((targets.numel(), 1), -1.0))
    return loss


def _cpu_supports(logits: torch.Tensor):
    if logits.device.type != "cpu" or logits.dtype not in _CPU_DTYPES:
        return False, f"it takes CPU float32/float64 tensors, got {logits.dtype} on {logits.device}"
    return True, ""


# The loss family (core/registry.py): the C++ row kernel on CPU float32/float64, the same math in torch ops anywhere.
_TORCH = SimpleNamespace(cross_entropy_rows_=_rows_torch, supports=lambda logits: (True, ""))
_CPU = SimpleNamespace(cross_entropy_rows_=lambda logits, targets: torch.ops.malloc_kernels.cross_entropy_rows_(
    logits, targets), supports=_cpu_supports)
registry.register_backend("loss", "torch", devices=("*",), priority=0, load=lambda: _TORCH)
registry.register_backend("loss", "cpu", devices=("cpu",), priority=10, load=lambda: _CPU,
                          ops=("cross_entropy_rows_",))
BACKENDS = ("auto",) + registry.names("loss")

if extension.has_op("cross_entropy_rows_")[0]:
    @torch.library.register_fake("malloc_kernels::cross_entropy_rows_")
    def _cross_entropy_rows_fake(logits, targets):
        return logits.new_empty((logits.shape[0],))


def cpu_available() -> bool:
    """True when the C++ row kernel is built."""
    return registry.status("loss", "cpu")[0]


def _select(logits: torch.Tensor, backend: str):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return registry.select("loss", backend, logits.device, check=lambda mod: mod.supports(logits))[1]


def cross_entropy_rows_(logits: torch.Tensor, targets: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Per row ``i`` of ``logits [R, C]``: returns ``loss[i] = logsumexp(z_i) - z_i[t_i]`` and overwrites ``z_i``
    with ``softmax(z_i) - onehot(t_i)``. ``targets``: int64 ``[R]`` in ``[0, C)``."""
    return _select(logits, backend).cross_entropy_rows_(logits, targets)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, backend, need_h, need_w):
        T, C = hidden.shape[0], weight.shape[0]
        total = hidden.new_zeros((), dtype=torch.float64)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        w_t = weight.t()
        for s in range(0, T, chunk):
            h_c = hidden[s:s + chunk]
            z = h_c @ w_t
            total += cross_entropy_rows_(z, targets[s:s + chunk], backend=backend).sum(dtype=torch.float64)
            if need_h:
                torch.mm(z, weight, out=grad_h[s:s + chunk])
            if need_w:
                grad_w.addmm_(z.t(), h_c)
        ctx.save_for_backward(grad_h, grad_w)
        return total.to(hidden.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_loss if grad_h is not None else None,
                grad_w * grad_loss if grad_w is not None else None, None, None, None, None, None)


def _check(hidden, weight, targets, reduction):
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point() or hidden.dim() != 2:
        raise TypeError(f"hidden must be a 2-D floating tensor [T, d], got "
                        f"{getattr(hidden, 'shape', type(hidden))} {getattr(hidden, 'dtype', '')}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be [C, d={hidden.shape[1]}], got {getattr(weight, 'shape', type(weight))}")
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise TypeError(f"weight must match hidden's dtype/device ({hidden.dtype}, {hidden.device}), got "
                        f"{weight.dtype}, {weight.device}")
    if weight.shape[0] < 1:
        raise ValueError("weight must have at least one class row")
    if not isinstance(targets, torch.Tensor) or targets.dtype != torch.int64 or targets.shape != hidden.shape[:1]:
        raise TypeError(f"targets must be an int64 tensor [T={hidden.shape[0]}], got "
                        f"{getattr(targets, 'shape', type(targets))} {getattr(targets, 'dtype', '')}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         reduction: str = "mean", ignore_index: int = -100, chunk_size: Optional[int] = None,
                         backend: str = "auto") -> torch.Tensor:
    """``F.cross_entropy(hidden @ weight.T, targets, reduction=..., ignore_index=...)`` without materialising the
    ``[T, C]`` logits or their gradient (module docstring). ``hidden [T, d]``, ``weight [C, d]`` (same floating
    dtype and device), ``targets`` int64 ``[T]`` in ``[0, C)`` or ``ignore_index`` (rows skipped; ``"mean"``
    divides by the rows kept, NaN when none is kept, as torch). ``chunk_size``: rows per chunk (default: ~2 MB of
    logits, at least 128 rows). ``backend``: ``"auto"`` (C++ row kernel on CPU float32/float64, torch ops
    otherwise), ``"cpu"``, ``"torch"``."""
    _check(hidden, weight, targets, reduction)
    _select(hidden, backend)      # refuse a bad or unusable backend before any work
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    keep = targets != ignore_index
    if not bool(keep.all()):
        hidden, targets = hidden[keep], targets[keep]
    C = weight.shape[0]
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= C):
        raise ValueError(f"targets must lie in [0, {C}) or equal ignore_index={ignore_index}, got values in "
                         f"[{int(targets.min())}, {int(targets.max())}]")
    # at least 128 rows: below that the GEMMs run inefficiently and every chunk rewrites the whole [C, d] grad_weight
    chunk = chunk_size or max(128, min(4096, _CHUNK_BYTES // (C * hidden.element_size())))
    need_grad = torch.is_grad_enabled()
    total = _LinearCrossEntropy.apply(hidden, weight, targets, chunk, backend,
                                      need_grad and hidden.requires_grad, need_grad and weight.requires_grad)
    return total / targets.numel() if reduction == "mean" else total
