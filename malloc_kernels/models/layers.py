"""Transformer layers of HSTU and SASRec, split so the model can run them with or without a KV cache.

Every layer exposes three steps, which lets one driver (``recommender.py``) run full training forwards, cached
serving, Linformer projections and beacon passes through ``malloc_kernels.attention``:

* ``project(x) -> Projection`` from the layer input ``x [T, d]`` (jagged tokens);
* ``explicit(p) -> (q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D])``: the training form;
* ``cached(p) -> (q_c, k_c, v_c)``: the serving form whose ``k_c``/``v_c`` are what the KV cache stores
  (``[T, cache_heads, cache_dim]``); identical to the explicit form except for MLA;
* ``finish(x, a, p, cached) -> x_next`` from the attention output (explicit or serving form).

Keys/values of a token depend only on that token's layer input, and layer inputs are causal, so the K/V of history
tokens never depend on later (request) tokens: encoding the history once and serving the request against the cache
reproduces the full causal recompute (up to summation order).

MLA (DeepSeek-V2, arXiv 2405.04434, without the decoupled RoPE part: positions enter only through HSTU's relative
bias or SASRec's input embedding): a shared latent ``c = W_dkv x`` of width ``r = latent_dim``; per query head
``k_h = W_uk[h] c`` and ``v_h = W_uv[h] c``. Training uses these explicit per-head keys/values. Serving absorbs the
up-projections: ``<q_h, W_uk[h] c> = <W_uk[h]^T q_h, c>`` and ``sum_j w_ij W_uv[h] c_j = W_uv[h] sum_j w_ij c_j``,
so the cache stores ``c`` ONCE PER SLOT in each of ``k`` and ``v`` as a single kv head of width ``r``
(``KVCache.k = KVCache.v = c``, ``Hkv = 1``; the cache contract has no shared-payload mode, so the latent is stored
twice: ``2 r`` numbers per token and layer versus ``2 H D`` for MHA), the query becomes ``W_uk[h]^T q_h`` (width r,
all heads read kv head 0, i.e. MQA over the latent), the scale stays ``1/sqrt(D)``, and ``W_uv[h]`` is applied to
the attention output. HSTU's pointwise weights are linear in ``v``, so the absorption is exact for both kinds. In
HSTU the SiLU of ``phi_1`` is applied to the latent (not to ``k``/``v``), which keeps ``k``/``v`` linear in ``c``.

MSN memory (``ModelConfig.msn``; MSN, arXiv 2602.07526: a product-key memory read gated into a host module with
``g(x) * m + (1 - g(x)) * h``): in the layers of ``cfg.memory_layers``

* SASRec: the host is the FFN, ``x'' = x' + Drop(g(z) * PKM(z) + (1 - g(z)) * FFN(z))`` with ``z = LN2(x')``
  (``memory.MemoryAugmented`` around the FFN);
* HSTU has no FFN; the host is the layer's output update ``h = f2(LayerNorm(A V) * U)``, and the memory reads the
  same normalised input the projections see: ``x' = x + Drop(g(z) * PKM(z) + (1 - g(z)) * h)``, ``z = LN(x)``.

Both reads depend only on the token's own layer input, so they are per-token like the FFN: cached serving (history
in the KV cache, memory evaluated for the request tokens only) still reproduces the full recompute.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..memory import MemoryAugmented, MemoryGate, ProductKeyMemory
from .config import ModelConfig


def make_memory(cfg: ModelConfig) -> ProductKeyMemory:
    """The MSN product-key memory of one layer, ``[..., d_model] -> [..., d_model]`` (ModelConfig ``msn_*``); slot
    usage is tracked so training can report collapse (``SequentialRecommender.memory_usage``)."""
    return ProductKeyMemory(cfg.d_model, cfg.d_model, num_subkeys=math.isqrt(cfg.msn_slots), heads=cfg.msn_heads,
                            key_dim=cfg.msn_key_dim, k=cfg.msn_topk, sparse_grad=cfg.msn_sparse_grad,
                            track_usage=True)


@dataclass
class Projection:
    q: torch.Tensor
    k: Optional[torch.Tensor]
    v: Optional[torch.Tensor]
    latent: Optional[torch.Tensor] = None
    u: Optional[torch.Tensor] = None


class _AttentionProjections(nn.Module):
    """Q/K/V (or Q + latent for MLA) projections shared by both layer types."""

    def __init__(self, cfg: ModelConfig, extra_u: bool, activation):
        super().__init__()
        self.cfg = cfg
        H, Hkv, D, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
        self.act = activation
        self.extra_u = extra_u
        self.mla = cfg.heads == "mla"
        n_u = H * D if extra_u else 0
        if self.mla:
            r = cfg.latent_dim
            self.proj = nn.Linear(d, n_u + H * D + r)
            self.w_uk = nn.Parameter(torch.randn(H, D, r) / math.sqrt(r))
            self.w_uv = nn.Parameter(torch.randn(H, D, r) / math.sqrt(r))
            self.sizes = (n_u, H * D, r)
        else:
            self.proj = nn.Linear(d, n_u + H * D + 2 * Hkv * D)
            self.sizes = (n_u, H * D, Hkv * D, Hkv * D)

    def project(self, h: torch.Tensor) -> Projection:
        cfg = self.cfg
        T = h.shape[0]
        z = self.proj(h)
        if self.act is not None:
            z = self.act(z)
        parts = torch.split(z, self.sizes, dim=-1)
        u = parts[0] if self.extra_u else None
        q = parts[1].reshape(T, cfg.n_heads, cfg.head_dim)
        if self.mla:
            return Projection(q=q, k=None, v=None, latent=parts[2], u=u)
        k = parts[2].reshape(T, cfg.n_kv_heads, cfg.head_dim)
        v = parts[3].reshape(T, cfg.n_kv_heads, cfg.head_dim)
        return Projection(q=q, k=k, v=v, u=u)

    def explicit(self, p: Projection):
        if self.mla:
            k = torch.einsum("tr,hdr->thd", p.latent, self.w_uk)
            v = torch.einsum("tr,hdr->thd", p.latent, self.w_uv)
            return p.q, k, v
        return p.q, p.k, p.v

    def cached(self, p: Projection):
        if self.mla:
            q = torch.einsum("thd,hdr->thr", p.q, self.w_uk)
            c = p.latent[:, None, :]
            return q, c, c
        return p.q, p.k, p.v

    def output(self, a: torch.Tensor, cached: bool) -> torch.Tensor:
        """Attention output ``[T, Hq, D or r]`` -> ``[T, Hq * D]`` (MLA serving applies ``W_uv`` here)."""
        if self.mla and cached:
            a = torch.einsum("thr,hdr->thd", a, self.w_uv)
        return a.flatten(1)


class HSTULayer(nn.Module):
    """One HSTU layer (Zhai et al. 2024, "Actions Speak Louder than Words", arXiv 2402.17152, eqs. 1-3):

    ``U, V, Q, K = split(SiLU(f1(LayerNorm(x))))``;
    ``A V = (1/n) sum_j SiLU(alpha <q_i, k_j> + rab_pos(p_i - p_j) + rab_time(bucket(t_i - t_j))) v_j`` (causal;
    computed by ``malloc_kernels.attention(kind="hstu")`` with ``pos_bias``/``time_bias`` tables, alpha =
    1/sqrt(D));
    ``x' = x + f2(LayerNorm(A V) * U)``.
    pos_bias ``[max_len]`` and time_bias ``[num_time_buckets]`` are learned per layer and shared by the heads.
    """

    kind = "hstu"

    def __init__(self, cfg: ModelConfig, memory: bool = False):
        super().__init__()
        self.cfg = cfg
        self.norm = nn.LayerNorm(cfg.d_model)
        self.qkv = _AttentionProjections(cfg, extra_u=True, activation=F.silu)
        self.attn_norm = nn.LayerNorm(cfg.n_heads * cfg.head_dim)
        self.out = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.pos_bias = nn.Parameter(torch.randn(cfg.max_len) * 0.02)
        self.time_bias = nn.Parameter(torch.randn(cfg.num_time_buckets) * 0.02)
        # MSN: memory read of LN(x) gated into the output update (module docstring)
        self.memory = make_memory(cfg) if memory else None
        self.memory_gate = MemoryGate(cfg.d_model, cfg.d_model) if memory else None

    def project(self, x):
        return self.qkv.project(self.norm(x))

    def explicit(self, p):
        return self.qkv.explicit(p)

    def cached(self, p):
        return self.qkv.cached(p)

    def finish(self, x, a, p, cached: bool):
        a = self.qkv.output(a, cached)
        h = self.out(self.attn_norm(a) * p.u)
        if self.memory is not None:
            z = self.norm(x)
            h = self.memory_gate(z, self.memory(z), h)
        return x + self.drop(h)


class SASRecLayer(nn.Module):
    """One SASRec block (Kang & McAuley 2018, arXiv 1808.09781) in pre-LayerNorm form:
    ``x' = x + W_o MHA(LN1(x))`` (causal softmax attention through ``malloc_kernels.attention``), then
    ``x'' = x' + FFN(LN2(x'))`` with a GELU feed-forward of width ``ffn_mult * d``."""

    kind = "softmax"
    pos_bias = None
    time_bias = None

    def __init__(self, cfg: ModelConfig, memory: bool = False):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.norm1 = nn.LayerNorm(d)
        self.qkv = _AttentionProjections(cfg, extra_u=False, activation=None)
        self.out = nn.Linear(cfg.n_heads * cfg.head_dim, d)
        self.norm2 = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_mult * d), nn.GELU(), nn.Dropout(cfg.dropout),
                                 nn.Linear(cfg.ffn_mult * d, d))
        if memory:  # MSN: gated memory read around the FFN (module docstring)
            self.ffn = MemoryAugmented(self.ffn, make_memory(cfg))
        self.drop = nn.Dropout(cfg.dropout)

    def project(self, x):
        return self.qkv.project(self.norm1(x))

    def explicit(self, p):
        return self.qkv.explicit(p)

    def cached(self, p):
        return self.qkv.cached(p)

    def finish(self, x, a, p, cached: bool):
        x = x + self.drop(self.out(self.qkv.output(a, cached)))
        return x + self.drop(self.ffn(self.norm2(x)))
