"""Per-key attention statistics (``return_stats``): the accumulated attention mass of every key.

The pruning policies (H2O, SnapKV, TOVA, PyramidKV, IntactKV, D2O) score entries by the attention they receive;
materialising the ``[Lq, N]`` weight matrix to get it would defeat the fused kernels. This kernel runs after the
forward pass, which stored one statistic per (query, head) row -- the softmax ``lse_i`` or the hstu normaliser
``n_i`` -- so each weight is recomputed exactly from its score: ``w_ij = c_j e^{s_ij - lse_i}`` (softmax) or
``|c_j silu(s_ij)| / n_i`` (hstu). One program owns a block of keys of one segment of one (user, kv head) and loops
over all the user's query rows and the G query heads of the kv head, so the sums need no atomics and are
deterministic. ``*_window`` sums only rows of the user's last ``window`` queries (SnapKV's observation window).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .attention_common import _cache_row_width, _load_tile, _rows, _scale_offset, _scores


@triton.jit
def _key_mass(b, hkv, n, n_ok, window, scale,
              Q, sq_b, sq_l, sq_h, sq_d, Q_OFF, Q_LEN, QROWB, QPOS, QTS, STAT,
              KP, KS, KZ, k_rs, k_cs, POSP, TSP, CNTP, MASK, sm_b, sm_h, sm_i, sm_j, nt_start,
              PB, P, TB, T, TH,
              G: tl.constexpr, HQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_M: tl.constexpr, KIND: tl.constexpr, K_FMT: tl.constexpr, CHANNEL: tl.constexpr,
              GS: tl.constexpr, HAS_COUNT: tl.constexpr, IS_REQ: tl.constexpr, CAUSAL: tl.constexpr,
              HAS_TARGETS: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
              HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr, DOT_F16: tl.constexpr, DOT_BF16: tl.constexpr):
    qlen = tl.load(Q_LEN + b).to(tl.int32)  # lengths < 2^31: int32 loop and index arithmetic
    # the key block is loaded and dequantized once, then scored against every query tile of the user
    k = _load_tile(KP, KS, KZ, n, n_ok, k_rs, k_cs, HEAD_DIM, BLOCK_D, K_FMT, CHANNEL, GS, DOT_F16 or DOT_BF16)
    mass = tl.zeros((n.shape[0],), tl.float32)
    wmass = tl.zeros((n.shape[0],), tl.float32)
    for start in range(0, qlen * G, BLOCK_M):
        r = start + tl.arange(0, BLOCK_M)
        q, i, h, row_ok, flat, qlen_, p_i, t_i = _rows(b, hkv, r, Q, sq_b, sq_l, sq_h, sq_d, Q_OFF, Q_LEN, QROWB,
                                                       QPOS, QTS, G, HQ, HEAD_DIM, BLOCK_D, HAS_POS, HAS_TIME,
                                                       DOT_F16, DOT_BF16)
        m_row = b.to(tl.int64) * sm_b + h.to(tl.int64) * sm_h + i.to(tl.int64) * sm_i
        s, vis, c = _scores(q, k, row_ok, i, h, p_i, t_i, n, n_ok, scale, POSP, TSP, CNTP, MASK, m_row, sm_j,
                            nt_start, PB, P, TB, T, TH, HAS_COUNT, IS_REQ, CAUSAL, HAS_TARGETS, HAS_MASK, MASK_BOOL,
                            HAS_POS, HAS_TIME, DOT_F16, DOT_BF16)
        stat = tl.load(STAT + flat * HQ + h, mask=row_ok, other=0.0)
        if KIND == 0:
            st = tl.where(stat == float("-inf"), 0.0, stat)
            w = tl.where(vis & (stat != float("-inf"))[:, None], c[None, :] * tl.exp(s - st[:, None]), 0.0)
        else:
            nn = tl.where(stat > 0, stat, 1.0)
            w = tl.where(vis & (s > float("-inf")), tl.abs(c[None, :] * (s / (1.0 + tl.exp(-s)))), 0.0)
            w = w / nn[:, None]
        mass += tl.sum(w, 0)
        inwin = row_ok & (i >= qlen - window)
        wmass += tl.sum(tl.where(inwin[:, None], w, 0.0), 0)
    return mass, wmass


@triton.jit(do_not_specialize=("QROWB", "KROWB", "C", "R", "P", "T", "window", "key_blocks"))
def attention_stats_kernel(
        Q, sq_b, sq_l, sq_h, sq_d, Q_OFF, Q_LEN, QROWB, QPOS, QTS, STAT,
        K, sk_b, sk_l, sk_h, sk_d, K_OFF, K_LEN, KROWB,
        MASK, sm_b, sm_h, sm_i, sm_j, NT,
        CK, CKS, CKZ, C, CLEN, CPOS, CTS, CCNT,
        RK, R, RLEN, RPOS, RTS, RCNT,
        PB, P, TB, T, TH, scale, window, key_blocks,
        KM, KWM, CM, CWM, RM, RWM,
        G: tl.constexpr, HQ: tl.constexpr, HKV: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KIND: tl.constexpr,
        HAS_CACHE: tl.constexpr, K_FMT: tl.constexpr, K_CHANNEL: tl.constexpr, GS: tl.constexpr,
        HAS_CCOUNT: tl.constexpr, HAS_RES: tl.constexpr, HAS_RCOUNT: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_TARGETS: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
        HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr, DOT_F16: tl.constexpr, DOT_BF16: tl.constexpr):
    """Grid ``(key_blocks * B * Hkv, 3)``, ``key_blocks = cdiv(max segment length, BLOCK_N)`` (the big axis on
    axis 0, whose limit is 2^31 - 1); axis 1 picks the segment (0 cache, 1 residual, 2 request). Writes
    ``CM/CWM [B, Hkv, C]``, ``RM/RWM [B, Hkv, R]`` and ``KM/KWM [TK, Hkv]`` (flat key rows)."""
    pid = tl.program_id(0)
    blk = pid % key_blocks
    bh = pid // key_blocks
    seg = tl.program_id(1)
    b = bh // HKV
    hkv = bh % HKV
    n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    if seg == 0:
        if HAS_CACHE:
            clen = tl.load(CLEN + bh)
            if blk * BLOCK_N < clen:
                CKW: tl.constexpr = _cache_row_width(K_FMT, HEAD_DIM)
                ks_off = _scale_offset(bh, C, HEAD_DIM, K_FMT, K_CHANNEL, GS)
                row0 = bh.to(tl.int64) * C
                n_ok = n < clen
                mass, wmass = _key_mass(
                    b, hkv, n, n_ok, window, scale, Q, sq_b, sq_l, sq_h, sq_d, Q_OFF, Q_LEN, QROWB, QPOS, QTS,
                    STAT, CK + row0 * CKW, CKS + ks_off, CKZ + ks_off, CKW, 1, CPOS + row0, CTS + row0, CCNT + row0,
                    MASK, sm_b, sm_h, sm_i, sm_j, 0, PB, P, TB, T, TH,
                    G, HQ, HEAD_DIM, BLOCK_D, BLOCK_M, KIND, K_FMT, K_CHANNEL, GS, HAS_CCOUNT, False, CAUSAL,
                    HAS_TARGETS, False, MASK_BOOL, HAS_POS, HAS_TIME, DOT_F16, DOT_BF16)
                tl.store(CM + row0 + n, mass, mask=n_ok)
                tl.store(CWM + row0 + n, wmass, mask=n_ok)
    elif seg == 1:
        if HAS_RES:
            rlen = tl.load(RLEN + bh)
            if blk * BLOCK_N < rlen:
                row0 = bh.to(tl.int64) * R
                n_ok = n < rlen
                mass, wmass = _key_mass(
                    b, hkv, n, n_ok, window, scale, Q, sq_b, sq_l, sq_h, sq_d, Q_OFF, Q_LEN, QROWB, QPOS, QTS,
                    STAT, RK + row0 * HEAD_DIM, RK, RK, HEAD_DIM, 1, RPOS + row0, RTS + row0, RCNT + row0,
                    MASK, sm_b, sm_h, sm_i, sm_j, 0, PB, P, TB, T, TH,
                    G, HQ, HEAD_DIM, BLOCK_D, BLOCK_M, KIND, 0, False, 1, HAS_RCOUNT, False, CAUSAL,
                    HAS_TARGETS, False, MASK_BOOL, HAS_POS, HAS_TIME, DOT_F16, DOT_BF16)
                tl.store(RM + row0 + n, mass, mask=n_ok)
                tl.store(RWM + row0 + n, wmass, mask=n_ok)
    else:
        klen = tl.load(K_LEN + b).to(tl.int32)
        if blk * BLOCK_N < klen:
            koff = tl.load(K_OFF + b)
            n_ok = n < klen
            mass, wmass = _key_mass(
                b, hkv, n, n_ok, window, scale, Q, sq_b, sq_l, sq_h, sq_d, Q_OFF, Q_LEN, QROWB, QPOS, QTS,
                STAT, K + b.to(tl.int64) * sk_b + koff * sk_l + hkv * sk_h, K, K, sk_l, sk_d,
                QPOS + b * KROWB + koff, QTS + b * KROWB + koff, K,
                MASK, sm_b, sm_h, sm_i, sm_j, klen - tl.load(NT + b).to(tl.int32), PB, P, TB, T, TH,
                G, HQ, HEAD_DIM, BLOCK_D, BLOCK_M, KIND, 0, False, 1, False, True, CAUSAL,
                HAS_TARGETS, HAS_MASK, MASK_BOOL, HAS_POS, HAS_TIME, DOT_F16, DOT_BF16)
            kr = (b * KROWB + koff + n) * HKV + hkv
            tl.store(KM + kr, mass, mask=n_ok)
            tl.store(KWM + kr, wmass, mask=n_ok)
