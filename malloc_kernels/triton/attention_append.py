"""Append / prefill attention kernel: Q tiles over the request, one program per (query tile, user, kv head).

Used when the request is long enough that query tiles alone fill the GPU (``attention.py`` picks it for
``G * Lq`` larger than the decode tile). Each program holds ``BLOCK_M`` packed rows (query ``i``, head ``h`` of
the kv head's group, see ``attention_common._rows``) and streams the user's whole key axis -- compressed cache,
residual, then the request's own tokens, causal blocks past the tile's last query skipped -- with
FlashAttention-2's online softmax (Dao, arXiv 2307.08691) or HSTU's pointwise SiLU sum (Zhai et al., arXiv
2402.17152), then writes the normalised output and the per-row statistic (lse, or the hstu normaliser n).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .attention_common import _attend, _finalize

# Virtual key range end used when a program covers the whole key axis.
WHOLE = tl.constexpr(1 << 30)


@triton.jit
def attention_append_kernel(
        Q, sq_b, sq_l, sq_h, sq_d, Q_OFF, Q_LEN, QROWB, QPOS, QTS,
        K, sk_b, sk_l, sk_h, sk_d, V, sv_b, sv_l, sv_h, sv_d, K_OFF, K_LEN, KROWB,
        MASK, sm_b, sm_h, sm_i, sm_j, NT,
        CK, CV, CKS, CKZ, CVS, CVZ, C, CLEN, CPOS, CTS, CCNT, ORIG,
        RK, RV, R, RLEN, RPOS, RTS, RCNT,
        PB, P, TB, T, TH, scale, norm_const,
        O, so_b, so_l, so_h, so_d, STAT,
        G: tl.constexpr, HQ: tl.constexpr, HKV: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KIND: tl.constexpr, NORM: tl.constexpr,
        HAS_CACHE: tl.constexpr, K_FMT: tl.constexpr, V_FMT: tl.constexpr, K_CHANNEL: tl.constexpr,
        GS: tl.constexpr, HAS_CCOUNT: tl.constexpr, HAS_RES: tl.constexpr, HAS_RCOUNT: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_TARGETS: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
        HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr, DOT_F16: tl.constexpr, DOT_BF16: tl.constexpr):
    """Grid ``(cdiv(G * max_Lq, BLOCK_M), B * Hkv)``; see ``attention.py`` for the argument meanings."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HKV
    hkv = bh % HKV
    qlen = tl.load(Q_LEN + b)
    if tile * BLOCK_M < qlen * G:
        r = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        acc, m_i, l_i, nh, nr, i, h, row_ok, flat = _attend(
            b, hkv, r, 0, WHOLE, scale,
            Q, sq_b, sq_l, sq_h, sq_d, Q_OFF, Q_LEN, QROWB, QPOS, QTS,
            K, sk_b, sk_l, sk_h, sk_d, V, sv_b, sv_l, sv_h, sv_d, K_OFF, K_LEN, KROWB,
            MASK, sm_b, sm_h, sm_i, sm_j, NT,
            CK, CV, CKS, CKZ, CVS, CVZ, C, CLEN, CPOS, CTS, CCNT,
            RK, RV, R, RLEN, RPOS, RTS, RCNT,
            PB, P, TB, T, TH,
            G, HQ, HKV, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, KIND, HAS_CACHE, K_FMT, V_FMT, K_CHANNEL, GS,
            HAS_CCOUNT, HAS_RES, HAS_RCOUNT, CAUSAL, HAS_TARGETS, HAS_MASK, MASK_BOOL, HAS_POS, HAS_TIME,
            DOT_F16, DOT_BF16)
        out, stat = _finalize(acc, m_i, l_i, nh, nr, tl.load(ORIG + b), norm_const, KIND, NORM, HAS_CACHE)
        d = tl.arange(0, BLOCK_D)
        qoff = tl.load(Q_OFF + b)
        op = O + b * so_b + (qoff + i)[:, None] * so_l + h[:, None] * so_h + d[None, :] * so_d
        tl.store(op, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (d[None, :] < HEAD_DIM))
        tl.store(STAT + flat * HQ + h, stat, mask=row_ok)
