"""Autograd entry points of the product-key memory kernels, with backend dispatch.

Ops (one name in every layer: ``reference.pkm_*``, ``torch.ops.malloc_kernels.pkm_*`` (C++ CPU),
``malloc_kernels.triton.pkm.pkm_*``):

- ``pkm_topk(query [N, H, Dk], subkeys [H, 2, S, Dk/2], k) -> (scores [N, H, k], indices [N, H, k] int64)``: the
  exact two-stage product-key search (Lample et al. 2019, arXiv 1907.05242); ranking rule and proof in
  ``reference.py``. Differentiable in ``scores`` w.r.t. query and subkeys (indices are piecewise constant).
- ``pkm_gather(values [M, Dv], indices [N, E], weights [N, E]) -> [N, Dv]``: the fused Sparse-Gather of MSN
  (arXiv 2602.07526), ``out[n] = sum_e weights[n, e] * values[indices[n, e]]``, differentiable in values and weights.

Sparse value gradient (``sparse_grad=True``, the default): the gradient of ``values`` is a coalesced
``torch.sparse_coo`` tensor of shape ``[M, Dv]`` whose indices are the sorted unique touched rows and whose values are
the accumulated row gradients -- the same semantics as ``nn.Embedding(sparse=True)``: the parameter's ``.grad`` is
sparse, ``torch.optim.SparseAdam`` / ``torch.optim.SGD`` consume it directly, rows never touched are absent (not
zero-filled), and only ``U <= min(M, N*E)`` rows are ever materialised. ``sparse_grad=False`` returns a dense
``[M, Dv]`` gradient (zeros except the touched rows), e.g. for ``gradcheck`` or optimisers without sparse support.

Backends: ``"auto"`` (CPU float32/float64 tensors -> ``"cpu"`` when the extension is built, CUDA tensors ->
``"triton"``, else ``"reference"``), ``"cpu"``, ``"triton"`` (CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``), ``"reference"``. An unavailable explicit backend raises ValueError saying why.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Optional, Tuple

import torch

from ..core import extension, registry
from . import reference as _ref

__all__ = ["pkm_topk", "pkm_gather", "pkm_gather_backward", "cpu_available", "BACKENDS"]

_CPU_DTYPES = (torch.float32, torch.float64)

if extension.has_op("pkm_gather")[0]:
    # Fake (meta) implementations so torch.compile / opcheck can trace the ops without running them.
    @torch.library.register_fake("malloc_kernels::pkm_topk")
    def _pkm_topk_fake(query, subkeys, k):
        n, h = query.shape[0], query.shape[1]
        return query.new_empty((n, h, k)), query.new_empty((n, h, k), dtype=torch.int64)

    @torch.library.register_fake("malloc_kernels::pkm_topk_backward")
    def _pkm_topk_backward_fake(grad_scores, query, subkeys, indices):
        return torch.empty_like(query, memory_format=torch.contiguous_format), \
            torch.empty_like(subkeys, memory_format=torch.contiguous_format)

    @torch.library.register_fake("malloc_kernels::pkm_gather")
    def _pkm_gather_fake(values, indices, weights):
        return values.new_empty((indices.shape[0], values.shape[1]))

    @torch.library.register_fake("malloc_kernels::pkm_gather_backward")
    def _pkm_gather_backward_fake(grad_out, values, indices, weights):
        # The number of touched rows is data-dependent (an unbacked size).
        u = torch.library.get_ctx().new_dynamic_size()
        return (values.new_empty(indices.shape), values.new_empty((u,), dtype=torch.int64),
                values.new_empty((u, values.shape[1])))


def _topk_backward_torch(grad_scores, query, subkeys, indices):
    # Reference / triton: the gradient of a gathered sum of half dot products, by index_add on the small sub-key
    # tables (the search is the costly part, not this).
    s = subkeys.shape[2]
    dh = query.shape[-1] // 2
    h = query.shape[1]
    i1, i2 = indices // s, indices % s
    heads = torch.arange(h, device=query.device)[None, :, None]
    k1 = subkeys[:, 0][heads, i1]  # [N, H, k, Dh]
    k2 = subkeys[:, 1][heads, i2]
    g = grad_scores[..., None]
    grad_query = torch.cat([(g * k1).sum(2), (g * k2).sum(2)], dim=-1)
    grad_subkeys = torch.zeros(h * 2 * s, dh, dtype=subkeys.dtype, device=subkeys.device)
    for half, ii in ((0, i1), (1, i2)):
        flat = ((heads * 2 + half) * s + ii).reshape(-1)
        contrib = (g * query[:, :, None, half * dh:(half + 1) * dh]).reshape(-1, dh)
        grad_subkeys.index_add_(0, flat, contrib)
    return grad_query, grad_subkeys.view(subkeys.shape)


def _no_grad(fn):
    def run(*args):
        with torch.no_grad():
            return fn(*args)
    return run


def _cpu_supports(*tensors):
    if not all(x.device.type == "cpu" for x in tensors):
        return False, "the cpu backend needs CPU tensors"
    if not all(x.dtype in _CPU_DTYPES for x in tensors if x.is_floating_point()):
        return False, "the cpu backend needs CPU float32/float64 tensors"
    return True, ""


def _triton_launcher():
    # Imported on first use only (importing triton is slow and must follow TRITON_INTERPRET).
    from ..triton import pkm as tpkm
    return SimpleNamespace(topk=tpkm.pkm_topk, topk_backward=_topk_backward_torch, gather=tpkm.pkm_gather,
                           gather_backward=tpkm.pkm_gather_backward, supports=lambda *t: (True, ""))


# The pkm family (core/registry.py). Each launcher has the four ops; the autograd Functions below call them.
_REFERENCE = SimpleNamespace(topk=_no_grad(_ref.pkm_topk), topk_backward=_topk_backward_torch,
                             gather=_no_grad(_ref.pkm_gather), gather_backward=_ref.pkm_gather_backward,
                             supports=lambda *t: (True, ""))
_CPU = SimpleNamespace(
    topk=lambda q, sk, k: torch.ops.malloc_kernels.pkm_topk(q, sk, k),
    topk_backward=lambda g, q, sk, idx: torch.ops.malloc_kernels.pkm_topk_backward(g.contiguous(), q, sk, idx),
    gather=lambda v, idx, w: torch.ops.malloc_kernels.pkm_gather(v, idx, w),
    gather_backward=lambda g, v, idx, w: torch.ops.malloc_kernels.pkm_gather_backward(g.contiguous(), v, idx, w),
    supports=_cpu_supports)
registry.register_backend("pkm", "reference", devices=("*",), priority=0, load=lambda: _REFERENCE)
registry.register_backend("pkm", "cpu", devices=("cpu",), priority=10, load=lambda: _CPU,
                          ops=("pkm_topk", "pkm_topk_backward", "pkm_gather", "pkm_gather_backward"))
registry.register_backend("pkm", "triton", devices=("cuda",), priority=20, load=_triton_launcher, needs_triton=True)
BACKENDS = ("auto",) + registry.names("pkm")


def cpu_available() -> bool:
    """True when the C++ kernels (``torch.ops.malloc_kernels.pkm_*``) are loaded."""
    return registry.status("pkm", "cpu")[0]


def _select(backend: str, *tensors: torch.Tensor):
    """The launcher of ``backend`` (see the module docstring) for these tensors; ValueError if it cannot run them."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return registry.select("pkm", backend, tensors[0].device, check=lambda mod: mod.supports(*tensors))[1]


class _PKMTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, subkeys, k, backend):
        scores, indices = backend.topk(query, subkeys, k)
        ctx.save_for_backward(query, subkeys, indices)
        ctx.backend = backend
        ctx.mark_non_differentiable(indices)
        return scores, indices

    @staticmethod
    def backward(ctx, grad_scores, _grad_indices):
        query, subkeys, indices = ctx.saved_tensors
        if grad_scores is None:
            return None, None, None, None
        gq, gk = ctx.backend.topk_backward(grad_scores, query, subkeys, indices)
        return (gq if ctx.needs_input_grad[0] else None), (gk if ctx.needs_input_grad[1] else None), None, None


def pkm_topk(query: torch.Tensor, subkeys: torch.Tensor, k: int, *,
             backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact product-key top-k. query ``[N, H, Dk]``, subkeys ``[H, 2, S, Dk/2]`` (same float dtype), ``1 <= k <= S``.

    Returns ``(scores [N, H, k], indices [N, H, k] int64)`` best first; ``indices = i1 * S + i2``;
    ``scores = <q[:Dk/2], subkeys[h,0,i1]> + <q[Dk/2:], subkeys[h,1,i2]>``. Ties: see ``reference.py``.
    """
    _ref._check_search_args(query, subkeys, k)
    return _PKMTopK.apply(query, subkeys, k, _select(backend, query, subkeys))


def pkm_gather_backward(grad_out: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                        *, backend: str = "auto"):
    """Sparse-Gather backward: ``(grad_weights [N, E], rows [U] int64 sorted unique, grad_rows [U, Dv])``."""
    _ref._check_gather_args(values, indices, weights)
    return _select(backend, values, weights, grad_out).gather_backward(grad_out, values, indices, weights)


class _PKMGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, indices, weights, sparse_grad, backend):
        out = backend.gather(values, indices, weights)
        ctx.save_for_backward(values, indices, weights)
        ctx.sparse_grad, ctx.backend = sparse_grad, backend
        return out

    @staticmethod
    def backward(ctx, grad_out):
        values, indices, weights = ctx.saved_tensors
        grad_weights, rows, grad_rows = ctx.backend.gather_backward(grad_out, values, indices, weights)
        grad_values = None
        if ctx.needs_input_grad[0]:
            if ctx.sparse_grad:
                grad_values = torch.sparse_coo_tensor(rows[None], grad_rows, values.shape, is_coalesced=True,
                                                      check_invariants=False)
            else:
                grad_values = torch.zeros_like(values).index_copy_(0, rows, grad_rows)
        return grad_values, None, (grad_weights if ctx.needs_input_grad[2] else None), None, None


def pkm_gather(values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, *, sparse_grad: bool = True,
               backend: str = "auto") -> torch.Tensor:
    """Fused Sparse-Gather: ``out[n] = sum_e weights[n, e] * values[indices[n, e]]``.

    values ``[M, Dv]`` float, indices ``[N, E]`` int64/int32 in ``[0, M)``, weights ``[N, E]`` (values' dtype).
    Returns ``[N, Dv]``. The values gradient is sparse COO when ``sparse_grad`` (module docstring).
    """
    _ref._check_gather_args(values, indices, weights)
    if not isinstance(sparse_grad, bool):
        raise TypeError(f"sparse_grad must be a bool, got {type(sparse_grad).__name__}")
    return _PKMGather.apply(values, indices, weights, sparse_grad, _select(backend, values, weights))


def pkm_lookup(query: torch.Tensor, subkeys: torch.Tensor, values: torch.Tensor, k: int, *,
               scale: Optional[float] = None, sparse_grad: bool = True, backend: str = "auto") -> torch.Tensor:
    """Full memory read: search, softmax over each head's k scores (times ``scale``, default 1), gather.

    Returns ``[N, Dv] = sum_h sum_j softmax_j(scale * scores[n, h, :])[j] * values[indices[n, h, j]]``.
    """
    scores, indices = pkm_topk(query, subkeys, k, backend=backend)
    w = torch.softmax(scores * (1.0 if scale is None else scale), dim=-1)
    n = query.shape[0]
    return pkm_gather(values, indices.reshape(n, -1), w.reshape(n, -1).to(values.dtype), sparse_grad=sparse_grad,
                      backend=backend)
