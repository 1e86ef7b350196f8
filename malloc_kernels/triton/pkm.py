"""Triton kernels of the product-key memory (MSN, arXiv 2602.07526; Lample et al. 2019, arXiv 1907.05242).

Same ops and semantics as ``malloc_kernels.memory.reference`` (the oracle; ranking rule and exactness proof there):

- ``pkm_topk(query [N, H, Dk], subkeys [H, 2, S, Dk/2], k)`` -> ``(scores [N, H, k], indices [N, H, k] int64)``:
  stage 1a (``_pkm_scores_kernel``, one program per (tile of ``BLOCK_N`` queries, head, half)) scores the queries
  against the S sub-keys with ``tl.dot`` tile products, so each sub-key tile is read once per query tile rather
  than once per query (IEEE fp32: tf32 would change scores and so the exact top-k); the scores go to scratch rows.
  Then one program per (query, head) picks the top-k of each half by k rounds of "max, then the lowest position
  holding it" -- exactly the stable descending order. Stage 2 does the same over the ``k x k`` sums with the candidate
  position ``a * BLOCK_K + b`` as tie break, i.e. (half-1 rank, half-2 rank) lexicographic, the contract's order.
- ``pkm_gather(values [M, Dv], indices [N, E], weights [N, E]) -> [N, Dv]``: fused Sparse-Gather, one program per
  (query, Dv block), rows loaded ``BLOCK_E`` at a time and reduced in registers.
- ``pkm_gather_backward(grad_out, values, indices, weights) -> (grad_weights [N, E], rows [U], grad_rows [U, Dv])``:
  the entries are bucketed by touched row (sorted unique rows, stable order), then one program per (row, Dv block)
  sums its bucket -- no atomics, deterministic, and only the touched rows exist (sparse value gradient).

Numerics: loads are upcast right away to the accumulation type ``ACC`` (fp32; fp64 for fp64 inputs, so the fp64
path reproduces the reference's scores and therefore its exact top-k) -- the interpreter corrupts bf16 arithmetic.
Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests use tiny shapes).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import device_guard

__all__ = ["pkm_topk", "pkm_gather", "pkm_gather_backward", "aot_specs"]


@triton.jit
def _pkm_scores_kernel(Q, KEYS, SCR, N, H, S, DH, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
                       BLOCK_D: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr):
    """Stage 1a: the half scores of BLOCK_N queries of one head against all S sub-keys of one half, one
    [BLOCK_N, BLOCK_S] tile product at a time (``tl.dot``, IEEE fp32: every sub-key tile is read once per query tile
    instead of once per query), written to the scratch rows [(n * H + h) * 2 + half, S]."""
    pid_n = tl.program_id(0)
    hh = tl.program_id(1).to(tl.int64)            # h * 2 + half
    h = hh // 2
    half = hh % 2
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = rows < N
    dq = tl.arange(0, BLOCK_D)
    dm = dq < DH
    q = tl.load(Q + (rows[:, None] * H + h) * 2 * DH + half * DH + dq[None, :], mask=rm[:, None] & dm[None, :],
                other=0.0).to(ACC)
    kbase = KEYS + hh * S * DH
    for s0 in range(0, S, BLOCK_S):
        sj = s0 + tl.arange(0, BLOCK_S)
        sm = sj < S
        kt = tl.load(kbase + sj[:, None] * DH + dq[None, :], mask=sm[:, None] & dm[None, :], other=0.0).to(ACC)
        if DOT:
            sc = tl.dot(q, tl.trans(kt), input_precision="ieee")
        else:  # float64: no tensor-core path, one broadcast product per tile
            sc = tl.sum(q[:, None, :] * kt[None, :, :], axis=2)
        tl.store(SCR + ((rows[:, None] * H + h) * 2 + half) * S + sj[None, :], sc, mask=rm[:, None] & sm[None, :])


@triton.jit
def _pkm_topk_kernel(SCR, SCORES, INDICES, S,
                     K: tl.constexpr, BLOCK_SF: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    nh = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_SF)
    om = offs < S
    kr = tl.arange(0, BLOCK_K)
    s1 = tl.load(SCR + (nh * 2) * S + offs, mask=om, other=0.0)
    s2 = tl.load(SCR + (nh * 2 + 1) * S + offs, mask=om, other=0.0)
    # Stage 1b: top-k of each half, best first; among equal scores the lowest index (stable descending sort).
    v1 = tl.zeros([BLOCK_K], ACC)
    v2 = tl.zeros([BLOCK_K], ACC)
    c1 = tl.zeros([BLOCK_K], tl.int64)
    c2 = tl.zeros([BLOCK_K], tl.int64)
    alive1 = om
    alive2 = om
    for t in range(K):
        m1 = tl.max(tl.where(alive1, s1, float("-inf")), axis=0)
        j1 = tl.min(tl.where(alive1 & (s1 == m1), offs, BLOCK_SF), axis=0)
        alive1 = alive1 & (offs != j1)
        v1 = tl.where(kr == t, m1, v1)
        c1 = tl.where(kr == t, j1.to(tl.int64), c1)
        m2 = tl.max(tl.where(alive2, s2, float("-inf")), axis=0)
        j2 = tl.min(tl.where(alive2 & (s2 == m2), offs, BLOCK_SF), axis=0)
        alive2 = alive2 & (offs != j2)
        v2 = tl.where(kr == t, m2, v2)
        c2 = tl.where(kr == t, j2.to(tl.int64), c2)
    # Stage 2: top-k of the k x k sums; position a * BLOCK_K + b orders ties by (rank in half 1, rank in half 2).
    cand = v1[:, None] + v2[None, :]
    pos = kr[:, None] * BLOCK_K + kr[None, :]
    alive = (kr[:, None] < K) & (kr[None, :] < K)
    for t in range(K):
        m = tl.max(tl.max(tl.where(alive, cand, float("-inf")), axis=1), axis=0)
        p = tl.min(tl.min(tl.where(alive & (cand == m), pos, BLOCK_K * BLOCK_K), axis=1), axis=0)
        alive = alive & (pos != p)
        a = p // BLOCK_K
        b = p % BLOCK_K
        i1 = tl.sum(tl.where(kr == a, c1, 0), axis=0)
        i2 = tl.sum(tl.where(kr == b, c2, 0), axis=0)
        tl.store(SCORES + nh * K + t, m.to(SCORES.dtype.element_ty))
        tl.store(INDICES + nh * K + t, i1 * S + i2)


@triton.jit
def _pkm_gather_fwd_kernel(V, IDX, W, OUT, E, DV, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
                           ACC: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = d < DV
    acc = tl.zeros([BLOCK_D], ACC)
    for e0 in range(0, E, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        em = e < E
        idx = tl.load(IDX + n * E + e, mask=em, other=0).to(tl.int64)
        w = tl.load(W + n * E + e, mask=em, other=0.0).to(ACC)
        rows = tl.load(V + idx[:, None] * DV + d[None, :], mask=em[:, None] & dm[None, :], other=0.0).to(ACC)
        acc += tl.sum(w[:, None] * rows, axis=0)
    tl.store(OUT + n * DV + d, acc.to(OUT.dtype.element_ty), mask=dm)


@triton.jit
def _pkm_gather_bwd_weights_kernel(G, V, IDX, GW, E, DV, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
                                   ACC: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    em = e < E
    idx = tl.load(IDX + n * E + e, mask=em, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_E], ACC)
    for d0 in range(0, DV, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dm = d < DV
        g = tl.load(G + n * DV + d, mask=dm, other=0.0).to(ACC)
        rows = tl.load(V + idx[:, None] * DV + d[None, :], mask=em[:, None] & dm[None, :], other=0.0).to(ACC)
        acc += tl.sum(rows * g[None, :], axis=1)
    tl.store(GW + n * E + e, acc.to(GW.dtype.element_ty), mask=em)


@triton.jit
def _pkm_gather_bwd_rows_kernel(G, W, ORDER, START, GR, E, DV, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                                ACC: tl.constexpr):
    u = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = d < DV
    t_begin = tl.load(START + u)
    t_end = tl.load(START + u + 1)
    acc = tl.zeros([BLOCK_D], ACC)
    for t0 in range(t_begin, t_end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tm = t < t_end
        ent = tl.load(ORDER + t, mask=tm, other=0)
        w = tl.load(W + ent, mask=tm, other=0.0).to(ACC)
        row = ent // E
        g = tl.load(G + row[:, None] * DV + d[None, :], mask=tm[:, None] & dm[None, :], other=0.0).to(ACC)
        acc += tl.sum(w[:, None] * g, axis=0)
    tl.store(GR + u * DV + d, acc.to(GR.dtype.element_ty), mask=dm)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _p2(x: int) -> int:
    return triton.next_power_of_2(max(int(x), 1))


def pkm_topk(query: torch.Tensor, subkeys: torch.Tensor, k: int):
    """Exact product-key top-k (see module docstring). Inputs validated by ``memory.ops``."""
    q, keys = query.contiguous(), subkeys.contiguous()
    n, h, dk = q.shape
    s, dh = keys.shape[2], dk // 2
    scores = torch.empty(n, h, k, dtype=q.dtype, device=q.device)
    indices = torch.empty(n, h, k, dtype=torch.int64, device=q.device)
    if n == 0:
        return scores, indices
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scratch = torch.empty(n * h * 2, s, dtype=acc_dtype, device=q.device)
    block_n, block_s, block_d, dot = _score_tiles(n, s, dh, q.dtype)
    with device_guard(q):
        _pkm_scores_kernel[(triton.cdiv(n, block_n), h * 2)](q, keys, scratch, n, h, s, dh, BLOCK_N=block_n,
                                                             BLOCK_S=block_s, BLOCK_D=block_d, ACC=_acc(q.dtype),
                                                             DOT=dot)
        _pkm_topk_kernel[(n * h,)](scratch, scores, indices, s, K=k, BLOCK_SF=_p2(s), BLOCK_K=_p2(k),
                                   ACC=_acc(q.dtype))
    return scores, indices


def _score_tiles(n: int, s: int, dh: int, dtype: torch.dtype):
    """(BLOCK_N, BLOCK_S, BLOCK_D, DOT) of the score kernel: ``tl.dot`` tiles (every side >= 16) for fp32/half;
    float64 keeps a small broadcast product (no fp64 ``tl.dot`` path everywhere). 64 x 32 score tiles: the IEEE fp32
    product runs on FMAs from registers, and 64 x 64 spills on sm_80 and sm_90 (the AOT report)."""
    dot = dtype != torch.float64
    block_d = max(16, _p2(dh)) if dot else _p2(dh)
    block_n = max(16, min(64, _p2(n))) if dot else min(16, _p2(n))
    block_s = max(16, min(32, _p2(s))) if dot else min(16, _p2(s))
    return block_n, block_s, block_d, dot


def pkm_gather(values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Fused Sparse-Gather forward ``[N, Dv]``."""
    v, idx, w = values.contiguous(), indices.contiguous(), weights.contiguous()
    n, e = idx.shape
    dv = v.shape[1]
    out = torch.empty(n, dv, dtype=v.dtype, device=v.device)
    if n == 0:
        return out
    block_d = min(64, _p2(dv))
    with device_guard(v):
        _pkm_gather_fwd_kernel[(n, triton.cdiv(dv, block_d))](v, idx, w, out, e, dv, BLOCK_E=min(32, _p2(e)),
                                                               BLOCK_D=block_d, ACC=_acc(v.dtype))
    return out


def pkm_gather_backward(grad_out: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor):
    """``(grad_weights [N, E], rows [U] sorted unique, grad_rows [U, Dv])`` (see module docstring)."""
    g, v, idx, w = grad_out.contiguous(), values.contiguous(), indices.long().contiguous(), weights.contiguous()
    n, e = idx.shape
    dv = v.shape[1]
    grad_weights = torch.empty(n, e, dtype=v.dtype, device=v.device)
    flat = idx.reshape(-1)
    rows, inverse, counts = torch.unique(flat, sorted=True, return_inverse=True, return_counts=True)
    u = rows.numel()
    grad_rows = torch.empty(u, dv, dtype=v.dtype, device=v.device)
    if n == 0 or e == 0:
        return grad_weights, rows, grad_rows
    order = torch.sort(inverse, stable=True).indices
    start = torch.zeros(u + 1, dtype=torch.int64, device=v.device)
    torch.cumsum(counts, 0, out=start[1:])
    block_d = min(64, _p2(dv))
    block_e = min(32, _p2(e))
    with device_guard(v):
        _pkm_gather_bwd_weights_kernel[(n, triton.cdiv(e, block_e))](g, v, idx, grad_weights, e, dv,
                                                                     BLOCK_E=block_e, BLOCK_D=block_d,
                                                                     ACC=_acc(v.dtype))
        _pkm_gather_bwd_rows_kernel[(u, triton.cdiv(dv, block_d))](g, w, order, start, grad_rows, e, dv, BLOCK_T=16,
                                                                   BLOCK_D=block_d, ACC=_acc(v.dtype))
    return grad_weights, rows, grad_rows


def aot_specs():
    """AOT specialisations (``malloc_kernels.triton.aot`` convention) at the issue-9 benchmark setting: M = 1024^2
    rows, value dim 64, 4 heads, k = 32 (E = 128 rows per query), query dim 128 (Dh = 64), float32.
    Built from the launchers' own tile choices; nothing is launched. No MMA is expected: the score tiles are IEEE
    fp32 ``tl.dot`` (FMA, exact ranking), the rest gathers, reductions and selections."""
    from .aot import AotSpec

    n, h, s, dh, k, dv, e = 4096, 4, 1024, 64, 32, 64, 4 * 32
    f32 = torch.float32
    q = torch.empty(16, dtype=f32)
    keys = torch.empty(16, dtype=f32)
    scratch = torch.empty(16, dtype=f32)
    scores = torch.empty(16, dtype=f32)
    idx = torch.empty(16, dtype=torch.int64)
    values = torch.empty(16, dtype=f32)
    w = torch.empty(16, dtype=f32)
    out = torch.empty(16, dtype=f32)
    note = "M=1024^2, Dv=64, H=4, k=32, Dk=128, fp32"
    block_d, block_e = min(64, _p2(dv)), min(32, _p2(e))
    bn, bs, bd, dot = _score_tiles(n, s, dh, f32)
    return [
        AotSpec.from_args("pkm_topk_scores", _pkm_scores_kernel,
                          dict(Q=q, KEYS=keys, SCR=scratch, N=n, H=h, S=s, DH=dh),
                          dict(BLOCK_N=bn, BLOCK_S=bs, BLOCK_D=bd, ACC=tl.float32, DOT=dot),
                          num_warps=4, note=note, mma_expected=False),
        AotSpec.from_args("pkm_topk", _pkm_topk_kernel,
                          dict(SCR=scratch, SCORES=scores, INDICES=idx, S=s),
                          dict(K=k, BLOCK_SF=_p2(s), BLOCK_K=_p2(k), ACC=tl.float32),
                          num_warps=4, note=note, mma_expected=False),
        AotSpec.from_args("pkm_gather_fwd", _pkm_gather_fwd_kernel,
                          dict(V=values, IDX=idx, W=w, OUT=out, E=e, DV=dv),
                          dict(BLOCK_E=block_e, BLOCK_D=block_d, ACC=tl.float32),
                          num_warps=4, note=note, mma_expected=False),
        AotSpec.from_args("pkm_gather_bwd_weights", _pkm_gather_bwd_weights_kernel,
                          dict(G=out, V=values, IDX=idx, GW=w, E=e, DV=dv),
                          dict(BLOCK_E=block_e, BLOCK_D=block_d, ACC=tl.float32),
                          num_warps=4, note=note, mma_expected=False),
        AotSpec.from_args("pkm_gather_bwd_rows", _pkm_gather_bwd_rows_kernel,
                          dict(G=out, W=w, ORDER=idx, START=idx, GR=values, E=e, DV=dv),
                          dict(BLOCK_T=16, BLOCK_D=block_d, ACC=tl.float32),
                          num_warps=4, note=note, mma_expected=False),
    ]
