"""Decode / small-Lq attention: split-K flash-decoding, the merge of its partials.

A decode request has few query rows (often 1 per head) over a long compressed cache: one program per (user, kv
head) would leave most of a GPU idle. Following flash-decoding (Dao et al., "Flash-Decoding for long-context
inference", 2023), the key axis of every (user, kv head) -- cache, residual and request segments in time order --
is cut into ``num_splits`` slices of ``split_size`` entries; ``attention_common.attention_forward_kernel`` with
``SPLIT_K`` runs program ``(user * Hkv + kv head, split)``, which packs all ``G * Lq`` query rows of the kv head's
group into its M tile (so every dequantized K/V tile is reused by all query heads that read it, GQA/MQA without
replication) and writes an un-normalised partial result. The merge kernel here combines the partials: for softmax
by the log-sum-exp merge ``o = sum_s e^{m_s - M} acc_s / sum_s e^{m_s - M} l_s``, for hstu by plain addition of the
partial sums and visible-entry counts (pointwise attention has no normaliser to reconcile; ARCHITECTURE.md,
"Attention semantics").
"""
from __future__ import annotations

import triton
import triton.language as tl

from .attention_common import _finalize, _hstu_bound


@triton.jit(do_not_specialize=("TQ", "num_splits", "num_row_blocks", "QROWB"))
def attention_merge_kernel(
        ACC, MP, LP, TQ, num_splits, num_row_blocks, Q_OFF, Q_LEN, QROWB, ORIG, norm_const, hstu_hb,
        O, so_b, so_l, so_h, so_d, STAT,
        HQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
        KIND: tl.constexpr, NORM: tl.constexpr, HAS_CACHE: tl.constexpr):
    """Grid ``(B * num_row_blocks,)``, ``num_row_blocks = cdiv(max_Lq * Hq, BLOCK_R)`` (one axis, no 65,535
    limit): merges the split partials of ``BLOCK_R`` (query, head) rows of one user and writes the normalised
    output (query layout) and the per-row statistic ``STAT [TQ, Hq]``."""
    pid = tl.program_id(0)
    b = pid // num_row_blocks
    blk = pid % num_row_blocks
    qoff = tl.load(Q_OFF + b)
    qlen = tl.load(Q_LEN + b).to(tl.int32)  # lengths < 2^31: int32 loop and index arithmetic
    rr = blk * BLOCK_R + tl.arange(0, BLOCK_R)
    i = rr // HQ
    h = rr % HQ
    ok = i < qlen
    flat = b * QROWB + qoff + i
    d = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    m_i = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_R,), tl.float32)
    nh = tl.zeros((BLOCK_R,), tl.float32)
    nr = tl.zeros((BLOCK_R,), tl.float32)
    for s in range(0, num_splits):
        base = (s * TQ + flat) * HQ + h
        a = tl.load(ACC + base[:, None] * BLOCK_D + d[None, :], mask=ok[:, None], other=0.0)
        ms = tl.load(MP + base, mask=ok, other=0.0)
        ls = tl.load(LP + base, mask=ok, other=0.0)
        if KIND == 0:
            m_new = tl.maximum(m_i, ms)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            a_old = tl.exp(m_i - m_use)
            a_new = tl.exp(ms - m_use)
            acc = acc * a_old[:, None] + a * a_new[:, None]
            l_i = l_i * a_old + ls * a_new
            m_i = m_new
        else:
            acc += a
            nh += ms
            nr += ls
    if HAS_CACHE:
        orig = tl.load(ORIG + b)
    else:
        orig = 0
    bound = _hstu_bound(orig, norm_const, hstu_hb, NORM, HAS_CACHE)
    out, stat = _finalize(acc, m_i, l_i, nh, nr, orig, norm_const, bound, KIND, NORM, HAS_CACHE)
    op = O + b.to(tl.int64) * so_b + (qoff + i)[:, None] * so_l + h[:, None] * so_h + d[None, :] * so_d
    tl.store(op, out.to(O.dtype.element_ty), mask=ok[:, None] & (d[None, :] < HEAD_DIM))
    tl.store(STAT + flat * HQ + h, stat, mask=ok)
