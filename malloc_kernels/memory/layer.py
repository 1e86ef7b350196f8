"""MSN's product-key memory layer and memory gate (arXiv 2602.07526, over Lample et al. 2019, arXiv 1907.05242).

``ProductKeyMemory``: ``x [..., input_dim] -> m [..., value_dim]``.

1. Query network: ``q = Norm(W_q x + b) in R^{H x Dk}`` (H heads, Dk even, halves of width Dh = Dk/2).
   ``query_norm="batchnorm"`` is Lample et al.'s BatchNorm over the ``H*Dk`` query features (it "spreads the queries"
   and raises key usage); ``"layernorm"`` (default) is MSN's choice: a LayerNorm over each head-half (no affine), so
   every sub-query has zero mean / unit RMS regardless of the input statistics or batch composition.
2. Sub-keys ``K [H, 2, S, Dh]`` (``M = S^2`` slots). MSN's stabilisers against retrieval collapse:
   - normalisation: the sub-keys are LayerNorm'd per row like the sub-queries (``key_norm=True``), so no key can
     win every query by growing its norm (the usual way a few slots capture all the traffic);
   - over-parameterised keys (``key_overparam=r``): ``K[h, b] = K_raw[h, b] @ P[h, b]`` with ``K_raw [S, r]`` and
     ``P [r, Dh]``, ``r > Dh``. Same function class as plain keys (the product can be folded into one ``[S, Dh]``
     table for serving, ``effective_subkeys()``), different training dynamics: with plain keys only the selected
     top-k sub-keys ever receive gradient, so keys that lose early are frozen forever; through the shared ``P`` every
     sub-key moves with every update, which keeps unselected keys in play. (Our reading of MSN's "over-parameterization
     technique"; the paper's text gives the purpose -- balanced memory use, no collapse -- not the exact form.)
3. Exact two-stage search per head (``ops.pkm_topk``): top-k of each half, top-k of the k x k sums.
4. Weights ``w = softmax(score_scale * scores)`` over each head's k slots (default scale ``1/sqrt(Dk)``: with
   normalised queries and keys a score has variance ~Dk).
5. Read ``m = sum_h sum_j w[h, j] * V[idx[h, j]]`` with the fused Sparse-Gather (``ops.pkm_gather``), values
   ``V [M, value_dim]`` initialised N(0, value_dim^-1/2) as in Lample et al.; sparse value gradient by default
   (``values.grad`` is a coalesced ``torch.sparse_coo`` tensor: optimise ``values`` with ``torch.optim.SparseAdam``
   or SGD, the rest with a dense optimiser -- ``sparse_parameters()`` / ``dense_parameters()``).

``MemoryGate``: ``y = g(x) * m + (1 - g(x)) * h`` with ``g(x) = sigmoid(W_g x + b_g)`` per feature (or one scalar),
the MSN memory gate into the host module (FFN / feature-interaction block) whose output is ``h``.
``MemoryAugmented(host, memory)``: ``y = gate(x, memory(x), host(x))`` -- a drop-in wrapper for an FFN.

Slot usage (``track_usage=True``): a ``[M]`` count of selections; ``usage_stats()`` gives the fraction of slots hit
and the KL divergence of the selection distribution to uniform (0 = balanced, ``log M`` = total collapse).
"""
from __future__ import annotations

import math
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .reference import slot_usage

__all__ = ["ProductKeyMemory", "MemoryGate", "MemoryAugmented"]

_QUERY_NORMS = ("layernorm", "batchnorm", "none")


def _positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < 1:
        raise ValueError(f"{name} must be >= 1, got {v}")
    return v


class ProductKeyMemory(nn.Module):
    """Product-key memory read (see module docstring for the math).

    Args:
        input_dim: features of ``x``. value_dim: output features (default ``input_dim``).
        num_subkeys: S, sub-keys per half; the memory has ``S * S`` slots. heads: H. key_dim: Dk (even).
        k: slots read per head (``k <= S``). query_norm: "layernorm" (MSN) | "batchnorm" (Lample) | "none".
        key_norm: LayerNorm the sub-keys (MSN). key_overparam: None, or r: sub-keys as ``K_raw [S, r] @ P [r, Dh]``.
        score_scale: softmax temperature factor (default ``1/sqrt(Dk)``). sparse_grad: sparse COO value gradient.
        backend: "auto" | "cpu" | "triton" | "reference" (``ops``). track_usage: count slot selections.
    Shapes: ``x [..., input_dim]`` float -> ``[..., value_dim]``; parameters in the module's dtype.
    """

    def __init__(self, input_dim: int, value_dim: Optional[int] = None, *, num_subkeys: int = 128, heads: int = 4,
                 key_dim: int = 64, k: int = 32, query_norm: str = "layernorm", key_norm: bool = True,
                 key_overparam: Optional[int] = None, score_scale: Optional[float] = None, sparse_grad: bool = True,
                 backend: str = "auto", track_usage: bool = False):
        super().__init__()
        self.input_dim = _positive_int("input_dim", input_dim)
        self.value_dim = _positive_int("value_dim", value_dim if value_dim is not None else input_dim)
        self.num_subkeys = _positive_int("num_subkeys", num_subkeys)
        self.heads = _positive_int("heads", heads)
        self.key_dim = _positive_int("key_dim", key_dim)
        if key_dim % 2:
            raise ValueError(f"key_dim must be even (two halves), got {key_dim}")
        self.k = _positive_int("k", k)
        if k > num_subkeys:
            raise ValueError(f"k must be <= num_subkeys={num_subkeys}, got {k}")
        if query_norm not in _QUERY_NORMS:
            raise ValueError(f"query_norm must be one of {_QUERY_NORMS}, got {query_norm!r}")
        if key_overparam is not None:
            _positive_int("key_overparam", key_overparam)
        if backend not in ops.BACKENDS:
            raise ValueError(f"backend must be one of {ops.BACKENDS}, got {backend!r}")
        self.query_norm, self.key_norm, self.key_overparam = query_norm, bool(key_norm), key_overparam
        self.score_scale = (1.0 / math.sqrt(key_dim)) if score_scale is None else float(score_scale)
        self.sparse_grad, self.backend, self.track_usage = bool(sparse_grad), backend, bool(track_usage)
        self.num_slots = num_subkeys * num_subkeys
        dh = key_dim // 2

        self.query_proj = nn.Linear(input_dim, heads * key_dim)
        self.query_bn = nn.BatchNorm1d(heads * key_dim) if query_norm == "batchnorm" else None
        if key_overparam is None:
            bound = 1.0 / math.sqrt(dh)
            self.subkeys = nn.Parameter(torch.empty(heads, 2, num_subkeys, dh).uniform_(-bound, bound))
            self.subkeys_raw = self.key_proj = None
        else:
            self.subkeys = None
            self.subkeys_raw = nn.Parameter(torch.randn(heads, 2, num_subkeys, key_overparam))
            self.key_proj = nn.Parameter(torch.randn(heads, 2, key_overparam, dh) / math.sqrt(key_overparam))
        self.values = nn.Parameter(torch.randn(self.num_slots, self.value_dim) / math.sqrt(self.value_dim))
        self.register_buffer("usage_counts", torch.zeros(self.num_slots if track_usage else 0, dtype=torch.int64),
                             persistent=False)
        self.usage_queries = 0

    # ---- parameters ---------------------------------------------------------------------------------------------
    def effective_subkeys(self) -> torch.Tensor:
        """Sub-keys ``[H, 2, S, Dk/2]`` actually searched (over-parameterisation folded, normalisation applied)."""
        keys = self.subkeys if self.key_overparam is None else torch.matmul(self.subkeys_raw, self.key_proj)
        if self.key_norm:
            keys = F.layer_norm(keys, (keys.shape[-1],))
        return keys

    def sparse_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters with sparse gradients (the value table when ``sparse_grad``): give them to SparseAdam."""
        if self.sparse_grad:
            yield self.values

    def dense_parameters(self) -> Iterator[nn.Parameter]:
        """All other parameters (dense gradients)."""
        for p in self.parameters():
            if not (self.sparse_grad and p is self.values):
                yield p

    # ---- forward ------------------------------------------------------------------------------------------------
    def queries(self, x2d: torch.Tensor) -> torch.Tensor:
        """Normalised queries ``[N, H, Dk]`` for flattened inputs ``[N, input_dim]``."""
        q = self.query_proj(x2d)
        if self.query_bn is not None:
            q = self.query_bn(q)
        q = q.view(q.shape[0], self.heads, self.key_dim)
        if self.query_norm == "layernorm":
            dh = self.key_dim // 2
            q = F.layer_norm(q.view(q.shape[0], self.heads, 2, dh), (dh,)).view_as(q)
        return q

    def retrieve(self, x2d: torch.Tensor):
        """``(scores [N, H, k], indices [N, H, k] int64, weights [N, H, k])`` for inputs ``[N, input_dim]``."""
        q = self.queries(x2d)
        keys = self.effective_subkeys()
        scores, indices = ops.pkm_topk(q, keys.to(q.dtype), self.k, backend=self.backend)
        weights = torch.softmax(scores * self.score_scale, dim=-1)
        return scores, indices, weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.input_dim:
            raise ValueError(f"x must be [..., input_dim={self.input_dim}], got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.input_dim)
        if x2d.shape[0] == 0:
            return x.new_zeros(*lead, self.value_dim)
        _, indices, weights = self.retrieve(x2d)
        if self.track_usage:
            self._record(indices)
        n = x2d.shape[0]
        out = ops.pkm_gather(self.values, indices.view(n, -1), weights.reshape(n, -1).to(self.values.dtype),
                             sparse_grad=self.sparse_grad, backend=self.backend)
        return out.view(*lead, self.value_dim)

    # ---- slot usage ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _record(self, indices: torch.Tensor) -> None:
        if self.usage_counts.numel() != self.num_slots:
            self.usage_counts = torch.zeros(self.num_slots, dtype=torch.int64, device=indices.device)
        self.usage_counts += torch.bincount(indices.reshape(-1), minlength=self.num_slots)
        self.usage_queries += indices.shape[0]

    def reset_usage(self) -> None:
        """Zero the slot-selection counts."""
        self.usage_counts = torch.zeros(self.num_slots if self.track_usage else 0, dtype=torch.int64,
                                        device=self.values.device)
        self.usage_queries = 0

    def usage_stats(self) -> dict:
        """``{"fraction_hit", "kl_to_uniform", "queries", "selections"}`` since the last ``reset_usage()``.

        Needs ``track_usage=True`` (ValueError otherwise)."""
        if not self.track_usage:
            raise ValueError("usage_stats needs track_usage=True")
        counts = self.usage_counts if self.usage_counts.numel() else torch.zeros(self.num_slots, dtype=torch.int64)
        nz = counts.nonzero().view(-1)
        st = slot_usage(nz, self.num_slots, weights=counts[nz].to(torch.float64))
        return {"fraction_hit": st["fraction_hit"], "kl_to_uniform": st["kl_to_uniform"],
                "queries": self.usage_queries, "selections": int(counts.sum())}

    def extra_repr(self) -> str:
        return (f"input_dim={self.input_dim}, value_dim={self.value_dim}, slots={self.num_slots} "
                f"({self.num_subkeys}^2), heads={self.heads}, key_dim={self.key_dim}, k={self.k}, "
                f"query_norm={self.query_norm}, key_norm={self.key_norm}, key_overparam={self.key_overparam}, "
                f"sparse_grad={self.sparse_grad}, backend={self.backend}")


class MemoryGate(nn.Module):
    """MSN memory gate ``y = g(x) * m + (1 - g(x)) * h``, ``g(x) = sigmoid(W_g x + b_g)``.

    Args: input_dim (features of x), dim (features of m and h), per_feature: one gate per feature (``[..., dim]``)
    or one scalar gate per row (``[..., 1]``). ``b_g`` starts at 0 (g = 1/2).
    Shapes: x ``[..., input_dim]``, m/h ``[..., dim]`` -> ``[..., dim]``.
    """

    def __init__(self, input_dim: int, dim: Optional[int] = None, *, per_feature: bool = True):
        super().__init__()
        self.input_dim = _positive_int("input_dim", input_dim)
        self.dim = _positive_int("dim", dim if dim is not None else input_dim)
        self.proj = nn.Linear(input_dim, self.dim if per_feature else 1)
        nn.init.zeros_(self.proj.bias)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.proj(x))

    def forward(self, x: torch.Tensor, m: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.input_dim:
            raise ValueError(f"x must be [..., input_dim={self.input_dim}], got shape {tuple(x.shape)}")
        if m.shape != h.shape or m.shape[-1] != self.dim:
            raise ValueError(f"m and h must share a shape [..., dim={self.dim}], got {tuple(m.shape)} and "
                             f"{tuple(h.shape)}")
        g = self.gate(x)
        return g * m + (1 - g) * h


class MemoryAugmented(nn.Module):
    """Wrap a host module (e.g. a transformer FFN) with a gated memory read: ``gate(x, memory(x), host(x))``.

    ``host`` maps ``[..., d_in] -> [..., d_out]``; ``memory`` is a ``ProductKeyMemory(d_in, d_out, ...)``.
    """

    def __init__(self, host: nn.Module, memory: ProductKeyMemory, *, per_feature_gate: bool = True):
        super().__init__()
        if not isinstance(memory, ProductKeyMemory):
            raise TypeError(f"memory must be a ProductKeyMemory, got {type(memory).__name__}")
        self.host, self.memory = host, memory
        self.gate = MemoryGate(memory.input_dim, memory.value_dim, per_feature=per_feature_gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(x, self.memory(x), self.host(x))
