"""Triton device code shared by the attention kernels (decode, append, stats), and the forward kernel itself.

Device helpers: tile loads that dequantize every cache format in registers right after the load (the storage
contract of ``core/kvcache.py``), HSTU's relative bias evaluated exactly in-kernel, the mask rules of the request
segment, and the per-key-block scoring step that every kernel shares. ``attention_forward_kernel`` is the one
forward program both launch paths use: split-K over the key axis for decode (its partials are combined by
``attention_decode.attention_merge_kernel``) or query tiles over the whole key axis for append / prefill.

Numerics: every loaded value is upcast to fp32 immediately (the Triton interpreter silently corrupts bf16
arithmetic, and fp32 is what the softmax/SiLU math needs anyway). Only the two matrix products take lower-precision
operands, and only when ``DOT_F16``/``DOT_BF16`` is set by the launcher for 16-bit inputs on a GPU (tensor cores, as
FlashAttention does); fp32 inputs use IEEE fp32 products so the fp32 path matches the reference to ~1e-6.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..core import formats

# Payload format codes (constexpr ``*_FMT``): the format table's codes (core/formats.py); the launcher passes
# ``formats.code(KVCache.k_format)``.
FMT_FLOAT = tl.constexpr(formats.code("float"))
FMT_INT8 = tl.constexpr(formats.code("int8"))
FMT_INT4 = tl.constexpr(formats.code("int4"))
FMT_INT2 = tl.constexpr(formats.code("int2"))
FMT_FP8 = tl.constexpr(formats.code("fp8"))
FMT_NVFP4 = tl.constexpr(formats.code("nvfp4"))
NVFP4_GROUP = tl.constexpr(formats.NVFP4.group_size)

# HSTU normaliser modes (constexpr ``NORM``).
NORM_ORIGINAL = 0
NORM_KEPT = 1
NORM_CONST = 2

# Bucket divisor of HSTU's time bias (ARCHITECTURE.md, "Attention semantics").
BUCKET_DIVISOR = 0.301


@triton.jit
def _fp8_e4m3_to_f32(code):
    """e4m3fn bit pattern (int32 in [0, 255]) -> fp32, exactly: sign, 4-bit exponent (bias 7), 3-bit mantissa.

    Decoded with integer ops rather than a float8 cast so it compiles for sm_80 (no native e4m3) and runs in the
    interpreter. Subnormals (exponent 0) are mantissa * 2^-9; 0x7F/0xFF are NaN as in e4m3fn (never written by the
    packer, which saturates at 448)."""
    sign = tl.where((code & 0x80) != 0, -1.0, 1.0)
    e = (code >> 3) & 0xF
    m = (code & 0x7).to(tl.float32)
    normal = (8.0 + m) * tl.exp2((e - 10).to(tl.float32))
    sub = m * 0.001953125  # 2^-9
    mag = tl.where(e == 0, sub, normal)
    mag = tl.where((code & 0x7F) == 0x7F, float("nan"), mag)
    return sign * mag


@triton.jit
def _e2m1_to_f32(code):
    """NVFP4's e2m1 codes (int32 in [0, 15]: bits 0-2 the magnitude, bit 3 the sign) -> fp32 values
    ``+-{0, 0.5, 1, 1.5, 2, 3, 4, 6}``: exponent field e = bits 1-2, mantissa m = bit 0; ``m * 0.5`` for e = 0
    (subnormal), ``(1 + m / 2) * 2^(e - 1)`` otherwise. Integer ops and one exp2, exact."""
    e = (code >> 1) & 3
    m = (code & 1).to(tl.float32)
    mag = tl.where(e == 0, m * 0.5, (1.0 + 0.5 * m) * tl.exp2((e - 1).to(tl.float32)))
    return tl.where((code & 8) != 0, -mag, mag)


@triton.jit
def _token_groups(FMT: tl.constexpr, HEAD_DIM: tl.constexpr, GS: tl.constexpr):
    """Token-axis scales per row: ``ceil(D / GS)`` for NVFP4 (a partial last group), ``D / GS`` otherwise."""
    if FMT == FMT_NVFP4:
        return (HEAD_DIM + GS - 1) // GS
    return HEAD_DIM // GS


@triton.jit
def _load_codes(P, n, n_ok, row_stride, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, FMT: tl.constexpr):
    """Unpacked integer codes ``int32 [BLOCK_N, BLOCK_D]`` of rows ``n`` of a packed uint8 payload.

    4-bit: element 2i is the low nibble of byte i; 2-bit: element 4i+r sits in bits 2r..2r+1 of byte i. The packed
    bytes are loaded once as a contiguous ``[BLOCK_N, BLOCK_D / per]`` tile (vectorisable) and interleaved back with
    ``join`` + ``reshape`` instead of gathering each byte ``per`` times."""
    if FMT == FMT_INT4 or FMT == FMT_NVFP4:
        W: tl.constexpr = (HEAD_DIM + 1) // 2
        c = tl.arange(0, BLOCK_D // 2)
        by = tl.load(P + n[:, None] * row_stride + c[None, :], mask=n_ok[:, None] & (c[None, :] < W), other=0)
        by = by.to(tl.int32)
        codes = tl.reshape(tl.join(by & 0xF, (by >> 4) & 0xF), (n.shape[0], BLOCK_D))
    elif FMT == FMT_INT2:
        W: tl.constexpr = (HEAD_DIM + 3) // 4
        c = tl.arange(0, BLOCK_D // 4)
        by = tl.load(P + n[:, None] * row_stride + c[None, :], mask=n_ok[:, None] & (c[None, :] < W), other=0)
        by = by.to(tl.int32)
        # join(join(c0, c2), join(c1, c3)) flattens to c0, c1, c2, c3: element (i, o) of the [.., 2, 2] tail is c_{2i+o}
        codes = tl.reshape(tl.join(tl.join(by & 3, (by >> 4) & 3), tl.join((by >> 2) & 3, (by >> 6) & 3)),
                           (n.shape[0], BLOCK_D))
    else:
        d = tl.arange(0, BLOCK_D)
        codes = tl.load(P + n[:, None] * row_stride + d[None, :], mask=n_ok[:, None] & (d[None, :] < HEAD_DIM),
                        other=0).to(tl.int32)
    return codes


@triton.jit
def _load_tile(P, S, Z, n, n_ok, row_stride, col_stride,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, FMT: tl.constexpr, CHANNEL: tl.constexpr,
               GS: tl.constexpr, RAW: tl.constexpr):
    """Rows ``n`` of one segment's K or V payload, dequantized to fp32 ``[BLOCK_N, BLOCK_D]`` (0 where masked).

    ``P`` points at the (user, kv head) row 0; ``S``/``Z`` at that row's scales/zeros (float16; NVFP4: e4m3 bytes, no
    zeros). Token-axis groups: scale index ``n * NG + d / GS`` with ``NG = D / GS`` (NVFP4: ``ceil(D / 16)``);
    channel-axis groups (KIVI keys): ``(n / GS) * D + d``. Integer formats dequantize as ``code * scale + zero``, fp8
    as ``e4m3(code) * scale``, NVFP4 as ``e2m1(code) * e4m3(scale)``, all in fp32. ``RAW``: a float payload
    only feeds a 16-bit tensor-core product, so it stays in its storage dtype (no arithmetic happens on it, and an
    fp32 copy of a K/V tile would double its registers)."""
    d = tl.arange(0, BLOCK_D)
    ok = n_ok[:, None] & (d[None, :] < HEAD_DIM)
    if FMT == FMT_FLOAT:
        x = tl.load(P + n[:, None] * row_stride + d[None, :] * col_stride, mask=ok, other=0.0)
        if not RAW:
            x = x.to(tl.float32)
    else:
        codes = _load_codes(P, n, n_ok, row_stride, HEAD_DIM, BLOCK_D, FMT)
        if FMT == FMT_NVFP4:
            # one e4m3fn scale byte per 16 values (a partial last group when 16 does not divide D), no zero
            NG: tl.constexpr = _token_groups(FMT, HEAD_DIM, GS)
            sidx = n[:, None] * NG + (d // GS)[None, :]
            s = _fp8_e4m3_to_f32(tl.load(S + sidx, mask=ok, other=0).to(tl.int32))
            x = _e2m1_to_f32(codes) * s
        else:
            s, z = _group_params(S, Z, n, n_ok, d, ok, HEAD_DIM, BLOCK_D, FMT, CHANNEL, GS)
            if FMT == FMT_FP8:
                x = _fp8_e4m3_to_f32(codes) * s
            else:
                x = codes.to(tl.float32) * s + z
        x = tl.where(ok, x, 0.0)
    return x


@triton.jit
def _abs_diff_sat(a, b):
    """``min(|a - b|, 2**63 - 1)`` of int64 tensors without overflow: the unsigned difference of the ordered pair
    is exact (up to 2**64 - 1), then saturated (no bucket threshold lies above 2**63 - 1)."""
    hi = tl.maximum(a, b).to(tl.uint64, bitcast=True)
    lo = tl.minimum(a, b).to(tl.uint64, bitcast=True)
    m = hi - lo
    return tl.minimum(m, 0x7FFFFFFFFFFFFFFF).to(tl.int64, bitcast=True)


@triton.jit
def _group_params(S, Z, n, n_ok, d, ok, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, FMT: tl.constexpr,
                  CHANNEL: tl.constexpr, GS: tl.constexpr):
    """Scale and zero of every element of a ``[BLOCK_N, BLOCK_D]`` tile, loaded once per group, not per element.

    Channel axis (KIVI keys) with ``GS >= BLOCK_N``: the tile spans at most two entry groups, so two ``[BLOCK_D]``
    rows are loaded and selected per entry. Token axis with power-of-two ``GS`` and ``HEAD_DIM``: one
    ``[BLOCK_N, D / GS]`` tile, broadcast over each group's channels. Other shapes gather per element."""
    BLOCK_N: tl.constexpr = n.shape[0]
    dok = d < HEAD_DIM
    if CHANNEL and GS >= BLOCK_N:
        g = n // GS
        g0 = tl.min(g)
        # 1 if a live entry of the tile lies in group g0 + 1, else 0 (an int32 scalar). The second group's mask is the
        # single compare ``d < HEAD_DIM * has2`` (``dok`` or all-false), a boolean [BLOCK_D] tensor: ``dok & second``
        # with a scalar boolean ``second`` splats it, and the interpreter splats a scalar compare result as int32
        # data (its handle keeps the compared operands' dtype), which tl.load rejects ("mask has unsupported dtype").
        has2 = tl.max(tl.where(n_ok & (g != g0), 1, 0))
        dok2 = d < HEAD_DIM * has2
        first = g == g0
        s0 = tl.load(S + g0.to(tl.int64) * HEAD_DIM + d, mask=dok, other=0.0).to(tl.float32)
        s1 = tl.load(S + (g0 + 1).to(tl.int64) * HEAD_DIM + d, mask=dok2, other=0.0).to(tl.float32)
        s = tl.where(first[:, None], s0[None, :], s1[None, :])
        if FMT == FMT_FP8:
            z = s * 0.0
        else:
            z0 = tl.load(Z + g0.to(tl.int64) * HEAD_DIM + d, mask=dok, other=0.0).to(tl.float32)
            z1 = tl.load(Z + (g0 + 1).to(tl.int64) * HEAD_DIM + d, mask=dok2, other=0.0).to(tl.float32)
            z = tl.where(first[:, None], z0[None, :], z1[None, :])
    elif (not CHANNEL) and _is_pow2_split(GS, HEAD_DIM, BLOCK_D):
        NG: tl.constexpr = HEAD_DIM // GS
        gi = tl.arange(0, NG)
        gidx = n[:, None] * NG + gi[None, :]
        gok = n_ok[:, None] & (gi[None, :] < NG)
        sg = tl.load(S + gidx, mask=gok, other=0.0).to(tl.float32)
        s = tl.reshape(tl.broadcast_to(sg[:, :, None], (BLOCK_N, NG, GS)), (BLOCK_N, BLOCK_D))
        if FMT == FMT_FP8:
            z = s * 0.0
        else:
            zg = tl.load(Z + gidx, mask=gok, other=0.0).to(tl.float32)
            z = tl.reshape(tl.broadcast_to(zg[:, :, None], (BLOCK_N, NG, GS)), (BLOCK_N, BLOCK_D))
    else:
        if CHANNEL:
            sidx = (n // GS)[:, None] * HEAD_DIM + d[None, :]
        else:
            NG2: tl.constexpr = HEAD_DIM // GS
            sidx = n[:, None] * NG2 + (d // GS)[None, :]
        s = tl.load(S + sidx, mask=ok, other=0.0).to(tl.float32)
        if FMT == FMT_FP8:
            z = s * 0.0
        else:
            z = tl.load(Z + sidx, mask=ok, other=0.0).to(tl.float32)
    return s, z


@triton.constexpr_function
def _is_pow2_split(GS, HEAD_DIM, BLOCK_D):
    """Token-axis groups a reshape can broadcast: power-of-two group size, ``HEAD_DIM == BLOCK_D``, >= 2 groups
    (tl.arange needs a power-of-two length)."""
    return HEAD_DIM == BLOCK_D and GS > 0 and (GS & (GS - 1)) == 0 and HEAD_DIM // GS >= 2


@triton.jit
def _time_bucket(dt, TH, T):
    """Exact HSTU time bucket ``#{k : th[k] <= max(dt, 1)}`` of int64 time-difference MAGNITUDES ``dt >= 0``
    (``_abs_diff_sat``).

    A float log gives the bucket within +-1 (fp32 rounding near a boundary); one step up and one step down against
    the float64-exact integer thresholds ``TH[k-1] = th[k]`` (``reference.bias.time_bucket_thresholds``) make it
    exact. The estimate is clamped to [0, T-1] first, which is where ``min(., T-1)`` of the definition lives."""
    x = tl.maximum(dt, 1)
    est = (tl.log(x.to(tl.float32)) / 0.301).to(tl.int32)
    est = tl.minimum(tl.maximum(est, 0), T - 1)
    up = tl.load(TH + est, mask=est < T - 1, other=0)          # th[est + 1]
    est = tl.where((est < T - 1) & (up <= x), est + 1, est)
    down = tl.load(TH + tl.maximum(est - 1, 0), mask=est >= 1, other=0)  # th[est]
    est = tl.where((est >= 1) & (down > x), est - 1, est)
    return est


@triton.jit
def _rel_bias(p_i, p_j, t_i, t_j, h, PB, P, TB, T, TH, HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr):
    """HSTU relative bias ``[M, N]``: ``pos_bias[h, clamp(p_i - p_j, 0, P-1)] + time_bias[h, bucket(t_i - t_j)]``.

    Tables are float32 ``[Hq, P]`` / ``[Hq, T]`` (row stride P / T); gathered per element, never materialised."""
    bias = tl.zeros((p_i.shape[0], p_j.shape[0]), tl.float32)
    if HAS_POS:
        pi = p_i[:, None].to(tl.int64)
        pj = p_j[None, :].to(tl.int64)
        dp = tl.where(pi > pj, tl.minimum(_abs_diff_sat(pi, pj), P - 1), 0)
        bias += tl.load(PB + h[:, None] * P + dp)
    if HAS_TIME:
        bk = _time_bucket(_abs_diff_sat(t_i[:, None], t_j[None, :]), TH, T)
        bias += tl.load(TB + h[:, None] * T + bk)
    return bias


@triton.jit
def _block_scores(q, row_ok, i, h, p_i, t_i, n, n_ok, scale,
                  KP, KS, KZ, k_rs, k_cs, POSP, TSP, CNTP,
                  MASKP, m_row, m_j, nt_start,
                  PB, P, TB, T, TH,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, FMT: tl.constexpr, CHANNEL: tl.constexpr,
                  GS: tl.constexpr, HAS_COUNT: tl.constexpr, IS_REQ: tl.constexpr, CAUSAL: tl.constexpr,
                  HAS_TARGETS: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
                  HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr, DOT_F16: tl.constexpr, DOT_BF16: tl.constexpr):
    """Scores of query rows against one key block of one segment.

    Returns ``(s [M, N] fp32 = scale * <q_i, k_j> + bias_ij (+ additive mask), vis [M, N] bool, c [N] fp32 count)``.
    Request segment (``IS_REQ``): ``n`` is the key's index ``j`` within the user, ``i`` the query's; visible if
    ``j <= i`` under ``CAUSAL``; a target key (``j >= nt_start``) is visible to a target query only when ``j == i``;
    ``attn_mask`` (bool: may attend; float: added to the score) is read at ``m_row + j * m_j``. Cache/residual
    entries are visible to every valid row."""
    k = _load_tile(KP, KS, KZ, n, n_ok, k_rs, k_cs, HEAD_DIM, BLOCK_D, FMT, CHANNEL, GS, DOT_F16 or DOT_BF16)
    return _scores(q, k, row_ok, i, h, p_i, t_i, n, n_ok, scale, POSP, TSP, CNTP, MASKP, m_row, m_j, nt_start,
                   PB, P, TB, T, TH, HAS_COUNT, IS_REQ, CAUSAL, HAS_TARGETS, HAS_MASK, MASK_BOOL, HAS_POS,
                   HAS_TIME, DOT_F16, DOT_BF16)


@triton.jit
def _scores(q, k, row_ok, i, h, p_i, t_i, n, n_ok, scale, POSP, TSP, CNTP, MASKP, m_row, m_j, nt_start,
            PB, P, TB, T, TH, HAS_COUNT: tl.constexpr, IS_REQ: tl.constexpr, CAUSAL: tl.constexpr,
            HAS_TARGETS: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, HAS_POS: tl.constexpr,
            HAS_TIME: tl.constexpr, DOT_F16: tl.constexpr, DOT_BF16: tl.constexpr):
    """``_block_scores`` for an already loaded (dequantized) key tile ``k [BLOCK_N, BLOCK_D]``."""
    if DOT_F16:
        s = tl.dot(q, tl.trans(k.to(tl.float16)))
    elif DOT_BF16:
        s = tl.dot(q, tl.trans(k.to(tl.bfloat16)))
    else:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    s = s * scale
    if HAS_POS or HAS_TIME:
        if HAS_POS:
            p_j = tl.load(POSP + n, mask=n_ok, other=0).to(tl.int64)
        else:
            p_j = tl.zeros((n.shape[0],), tl.int64)
        if HAS_TIME:
            t_j = tl.load(TSP + n, mask=n_ok, other=0).to(tl.int64)
        else:
            t_j = tl.zeros((n.shape[0],), tl.int64)
        s += _rel_bias(p_i, p_j, t_i, t_j, h, PB, P, TB, T, TH, HAS_POS, HAS_TIME)
    vis = row_ok[:, None] & n_ok[None, :]
    if IS_REQ:
        if CAUSAL:
            vis = vis & (n[None, :] <= i[:, None])
        if HAS_TARGETS:
            both = (i[:, None] >= nt_start) & (n[None, :] >= nt_start) & (n[None, :] != i[:, None])
            vis = vis & (both == 0)
        if HAS_MASK:
            mv = tl.load(MASKP + m_row[:, None] + n[None, :] * m_j, mask=vis, other=0)
            if MASK_BOOL:
                vis = vis & (mv != 0)
            else:
                # additive: added to the score; a -inf entry gets weight 0 but still counts as visible for the
                # hstu normaliser (the reference's rule: only bool masks and the structural rules hide entries)
                s += tl.where(vis, mv.to(tl.float32), 0.0)
    if HAS_COUNT:
        c = tl.load(CNTP + n, mask=n_ok, other=0.0).to(tl.float32)
    else:
        c = tl.full((n.shape[0],), 1.0, tl.float32)
    return s, vis, c


@triton.jit
def _update(acc, m_i, l_i, nh, nr, s, vis, c, v, inv_bound, KIND: tl.constexpr, IS_REQ: tl.constexpr,
            DOT_F16: tl.constexpr, DOT_BF16: tl.constexpr):
    """One online step over a key block.

    softmax (``KIND == 0``, FlashAttention's online softmax, count folded in as ``+ log c_j``): running max
    ``m_i``, running denominator ``l_i``, ``acc = sum_j c_j e^{s_ij - m_i} v_j``.
    hstu (``KIND == 1``): ``acc += sum_j (c_j silu(s_ij) / bound) v_j``; ``nh``/``nr`` count the visible stored
    (cache + residual) and request entries, for the ``kept``/``original`` normalisers. The weights are divided by
    ``bound`` (``_hstu_bound``, at least the row's normaliser) in fp32 before the 16-bit cast of the tensor-core
    product: ``c_j silu(s_ij)`` alone passes fp16's 65504 with large merge counts.

    Non-finite rule (README): a visible NaN / +inf score (``log c`` included) or a non-finite element of a visible
    entry's value poisons the row: its accumulator becomes NaN (sticky through every later step, the split-K merge
    and ``_finalize``); an invisible entry's value is zeroed first, so it cannot reach the row through a 0 weight."""
    v_ok = (v == v) & (tl.abs(v) < float("inf"))
    v_bad = tl.max(tl.where(v_ok, 0, 1), 1)                                    # [BLOCK_N]
    v = tl.where(v_ok, v, 0.0)
    if KIND == 0:
        s = tl.where(vis, s + tl.log(c)[None, :], float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # rows that have seen nothing yet keep m = -inf; exponentiate against 0 there so no inf - inf = NaN arises
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_use)
        p = tl.exp(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        m_i = m_new
    else:
        s = tl.where(vis, s, float("-inf"))
        p = tl.where(vis & (s > float("-inf")), (c * inv_bound)[None, :] * (s / (1.0 + tl.exp(-s))), 0.0)
        cnt = tl.sum(vis.to(tl.float32), 1)
        if IS_REQ:
            nr += cnt
        else:
            nh += cnt
    if DOT_F16:
        acc += tl.dot(p.to(tl.float16), v.to(tl.float16))
    elif DOT_BF16:
        acc += tl.dot(p.to(tl.bfloat16), v.to(tl.bfloat16))
    else:
        acc += tl.dot(p, v, input_precision="ieee")
    poison = (tl.max(tl.where(vis & ~(s < float("inf")), 1, 0), 1) > 0) | \
        (tl.max(tl.where(vis & (v_bad[None, :] > 0), 1, 0), 1) > 0)
    acc = tl.where(poison[:, None], float("nan"), acc)
    if KIND == 0:
        l_i = tl.where(poison, float("nan"), l_i)
    return acc, m_i, l_i, nh, nr


@triton.jit
def _segment(acc, m_i, l_i, nh, nr, q, row_ok, i, h, p_i, t_i, lo, hi, scale, inv_bound,
             KP, KS, KZ, k_rs, k_cs, VP, VS, VZ, v_rs, v_cs, POSP, TSP, CNTP,
             MASKP, m_row, m_j, nt_start, PB, P, TB, T, TH,
             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
             K_FMT: tl.constexpr, V_FMT: tl.constexpr, CHANNEL: tl.constexpr, GS: tl.constexpr,
             HAS_COUNT: tl.constexpr, IS_REQ: tl.constexpr, CAUSAL: tl.constexpr, HAS_TARGETS: tl.constexpr,
             HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr,
             KIND: tl.constexpr, DOT_F16: tl.constexpr, DOT_BF16: tl.constexpr):
    """Online accumulation over entries ``[lo, hi)`` of one segment (cache, residual or request) in BLOCK_N steps."""
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < hi
        s, vis, c = _block_scores(q, row_ok, i, h, p_i, t_i, n, n_ok, scale, KP, KS, KZ, k_rs, k_cs, POSP, TSP,
                                  CNTP, MASKP, m_row, m_j, nt_start, PB, P, TB, T, TH, HEAD_DIM, BLOCK_D, K_FMT,
                                  CHANNEL, GS, HAS_COUNT, IS_REQ, CAUSAL, HAS_TARGETS, HAS_MASK, MASK_BOOL,
                                  HAS_POS, HAS_TIME, DOT_F16, DOT_BF16)
        v = _load_tile(VP, VS, VZ, n, n_ok, v_rs, v_cs, HEAD_DIM, BLOCK_D, V_FMT, False, GS, DOT_F16 or DOT_BF16)
        acc, m_i, l_i, nh, nr = _update(acc, m_i, l_i, nh, nr, s, vis, c, v, inv_bound, KIND, IS_REQ, DOT_F16,
                                        DOT_BF16)
    return acc, m_i, l_i, nh, nr


@triton.jit
def _rows(b, hkv, r, Q, sq_b, sq_l, sq_h, sq_d, Q_OFF, Q_LEN, QROWB, QPOS, QTS, G: tl.constexpr,
          HQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_POS: tl.constexpr,
          HAS_TIME: tl.constexpr, DOT_F16: tl.constexpr, DOT_BF16: tl.constexpr):
    """Query rows of a tile. Row ``r`` packs (query ``i = r // G``, head ``h = hkv * G + r % G``): the G query heads
    of one kv head share every K/V tile load (GQA without repeating K/V). Returns the Q tile in the dot dtype and
    the per-row index vectors."""
    qoff = tl.load(Q_OFF + b)
    qlen = tl.load(Q_LEN + b).to(tl.int32)  # lengths < 2^31: int32 loop and index arithmetic
    i = r // G
    h = hkv * G + r % G
    row_ok = i < qlen
    d = tl.arange(0, BLOCK_D)
    # int64 offsets: b * sq_b alone passes 2^31 once the tensor does (int32 products would wrap)
    qp = Q + b.to(tl.int64) * sq_b + (qoff + i)[:, None] * sq_l + h[:, None] * sq_h + d[None, :] * sq_d
    q = tl.load(qp, mask=row_ok[:, None] & (d[None, :] < HEAD_DIM), other=0.0).to(tl.float32)
    if DOT_F16:
        q = q.to(tl.float16)
    elif DOT_BF16:
        q = q.to(tl.bfloat16)
    flat = b * QROWB + qoff + i
    if HAS_POS:
        p_i = tl.load(QPOS + flat, mask=row_ok, other=0).to(tl.int64)
    else:
        p_i = tl.zeros((r.shape[0],), tl.int64)
    if HAS_TIME:
        t_i = tl.load(QTS + flat, mask=row_ok, other=0).to(tl.int64)
    else:
        t_i = tl.zeros((r.shape[0],), tl.int64)
    return q, i, h, row_ok, flat, qlen, p_i, t_i


@triton.constexpr_function
def _cache_row_width(FMT, HEAD_DIM):
    """Stored elements per cache entry (the row stride of the payload): ``HEAD_DIM`` values or 8-bit codes, or
    bytes holding two 4-bit (int4, nvfp4) or four 2-bit (int2) codes each."""
    if FMT == FMT_INT4 or FMT == FMT_NVFP4:
        return (HEAD_DIM + 1) // 2
    if FMT == FMT_INT2:
        return (HEAD_DIM + 3) // 4
    return HEAD_DIM


@triton.jit
def _scale_offset(bh, C, HEAD_DIM: tl.constexpr, FMT: tl.constexpr, CHANNEL: tl.constexpr, GS: tl.constexpr):
    """Offset of the first scale/zero of (user, kv head) ``bh`` in a ``[B, Hkv, ...]`` scale tensor of a cache with
    capacity ``C``: ``ceil(C / GS) * HEAD_DIM`` per head on the channel axis, ``C * (HEAD_DIM / GS)`` on the token
    axis; 0 for a float payload, which has no scales (the pointers are placeholders)."""
    if FMT != FMT_FLOAT:
        if CHANNEL:
            off = bh.to(tl.int64) * ((C + GS - 1) // GS) * HEAD_DIM
        else:
            off = bh.to(tl.int64) * C * _token_groups(FMT, HEAD_DIM, GS)
    else:
        off = 0
    return off


@triton.jit
def _attend(b, hkv, r, vlo, vhi, scale, inv_bound,
            Q, sq_b, sq_l, sq_h, sq_d, Q_OFF, Q_LEN, QROWB, QPOS, QTS,
            K, sk_b, sk_l, sk_h, sk_d, V, sv_b, sv_l, sv_h, sv_d, K_OFF, K_LEN, KROWB,
            MASK, sm_b, sm_h, sm_i, sm_j, NT,
            CK, CV, CKS, CKZ, CVS, CVZ, C, CLEN, CPOS, CTS, CCNT,
            RK, RV, R, RLEN, RPOS, RTS, RCNT,
            PB, P, TB, T, TH,
            G: tl.constexpr, HQ: tl.constexpr, HKV: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KIND: tl.constexpr,
            HAS_CACHE: tl.constexpr, K_FMT: tl.constexpr, V_FMT: tl.constexpr, K_CHANNEL: tl.constexpr,
            GS: tl.constexpr, HAS_CCOUNT: tl.constexpr, HAS_RES: tl.constexpr, HAS_RCOUNT: tl.constexpr,
            CAUSAL: tl.constexpr, HAS_TARGETS: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
            HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr, DOT_F16: tl.constexpr, DOT_BF16: tl.constexpr):
    """Attention state of the rows ``r`` of (user b, kv head hkv) over the virtual key range ``[vlo, vhi)``.

    The virtual key axis of a (user, kv head) concatenates its segments in time order: cache entries
    ``[0, clen)``, residual entries ``[clen, clen + rlen)``, request tokens ``[clen + rlen, + klen)``; a split-K
    program takes a slice of it, an append program all of it. Returns ``(acc, m, l, nh, nr, i, h, row_ok, flat)``."""
    q, i, h, row_ok, flat, qlen, p_i, t_i = _rows(b, hkv, r, Q, sq_b, sq_l, sq_h, sq_d, Q_OFF, Q_LEN, QROWB, QPOS,
                                                  QTS, G, HQ, HEAD_DIM, BLOCK_D, HAS_POS, HAS_TIME, DOT_F16,
                                                  DOT_BF16)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    nh = tl.zeros((BLOCK_M,), tl.float32)
    nr = tl.zeros((BLOCK_M,), tl.float32)
    bh = b * HKV + hkv
    vs = 0
    if HAS_CACHE:
        clen = tl.load(CLEN + bh)
        CKW: tl.constexpr = _cache_row_width(K_FMT, HEAD_DIM)
        CVW: tl.constexpr = _cache_row_width(V_FMT, HEAD_DIM)
        ks_off = _scale_offset(bh, C, HEAD_DIM, K_FMT, K_CHANNEL, GS)
        vs_off = _scale_offset(bh, C, HEAD_DIM, V_FMT, False, GS)
        row0 = bh.to(tl.int64) * C
        lo = tl.maximum(vlo, 0)
        hi = tl.minimum(vhi, clen)
        acc, m_i, l_i, nh, nr = _segment(
            acc, m_i, l_i, nh, nr, q, row_ok, i, h, p_i, t_i, lo, hi, scale, inv_bound,
            CK + row0 * CKW, CKS + ks_off, CKZ + ks_off, CKW, 1, CV + row0 * CVW, CVS + vs_off, CVZ + vs_off, CVW, 1,
            CPOS + row0, CTS + row0, CCNT + row0, MASK, sm_b, sm_j, 0, PB, P, TB, T, TH,
            HEAD_DIM, BLOCK_D, BLOCK_N, K_FMT, V_FMT, K_CHANNEL, GS, HAS_CCOUNT, False, CAUSAL, HAS_TARGETS,
            False, MASK_BOOL, HAS_POS, HAS_TIME, KIND, DOT_F16, DOT_BF16)
        vs = clen
    if HAS_RES:
        rlen = tl.load(RLEN + bh)
        row0 = bh.to(tl.int64) * R
        lo = tl.maximum(vlo - vs, 0)
        hi = tl.minimum(vhi - vs, rlen)
        acc, m_i, l_i, nh, nr = _segment(
            acc, m_i, l_i, nh, nr, q, row_ok, i, h, p_i, t_i, lo, hi, scale, inv_bound,
            RK + row0 * HEAD_DIM, RK, RK, HEAD_DIM, 1, RV + row0 * HEAD_DIM, RV, RV, HEAD_DIM, 1,
            RPOS + row0, RTS + row0, RCNT + row0, MASK, sm_b, sm_j, 0, PB, P, TB, T, TH,
            HEAD_DIM, BLOCK_D, BLOCK_N, 0, 0, False, 1, HAS_RCOUNT, False, CAUSAL, HAS_TARGETS,
            False, MASK_BOOL, HAS_POS, HAS_TIME, KIND, DOT_F16, DOT_BF16)
        vs += rlen
    koff = tl.load(K_OFF + b)
    klen = tl.load(K_LEN + b).to(tl.int32)
    lo = tl.maximum(vlo - vs, 0)
    hi = tl.minimum(vhi - vs, klen)
    if CAUSAL:
        # keys past the last query row of this tile are masked for every row: do not visit them
        hi = tl.minimum(hi, tl.max(tl.where(row_ok, i, -1)) + 1)
    nt_start = klen - tl.load(NT + b).to(tl.int32)
    m_row = b.to(tl.int64) * sm_b + h.to(tl.int64) * sm_h + i.to(tl.int64) * sm_i
    acc, m_i, l_i, nh, nr = _segment(
        acc, m_i, l_i, nh, nr, q, row_ok, i, h, p_i, t_i, lo, hi, scale, inv_bound,
        K + b.to(tl.int64) * sk_b + koff * sk_l + hkv * sk_h, K, K, sk_l, sk_d,
        V + b.to(tl.int64) * sv_b + koff * sv_l + hkv * sv_h, V, V, sv_l, sv_d,
        QPOS + b * KROWB + koff, QTS + b * KROWB + koff, K, MASK, m_row, sm_j, nt_start, PB, P, TB, T, TH,
        HEAD_DIM, BLOCK_D, BLOCK_N, 0, 0, False, 1, False, True, CAUSAL, HAS_TARGETS,
        HAS_MASK, MASK_BOOL, HAS_POS, HAS_TIME, KIND, DOT_F16, DOT_BF16)
    return acc, m_i, l_i, nh, nr, i, h, row_ok, flat


@triton.jit
def _hstu_bound(orig, norm_const, hstu_hb, NORM: tl.constexpr, HAS_CACHE: tl.constexpr):
    """An upper bound (>= 1) of every row's HSTU normaliser ``n``, the same in every program of a user: the
    constant, or ``hstu_hb`` (launcher: cache + residual capacity + longest request for ``kept``, the longest
    request for ``original``) plus the user's original length."""
    if NORM == 2:
        bound = norm_const + 0.0 * hstu_hb
    elif NORM == 0 and HAS_CACHE:
        bound = hstu_hb + orig.to(tl.float32)
    else:
        bound = hstu_hb + 0.0
    return tl.maximum(bound, 1.0)


@triton.jit
def _finalize(acc, m_i, l_i, nh, nr, orig, norm_const, bound, KIND: tl.constexpr, NORM: tl.constexpr,
              HAS_CACHE: tl.constexpr):
    """Output rows and the per-row statistic: softmax ``acc / l`` and ``lse = m + log l`` (-inf, output 0 when
    nothing is visible); hstu ``acc / n`` with ``n`` the chosen normaliser (output 0 when ``n == 0``), statistic
    ``n``; the hstu ``acc`` holds weights divided by ``bound`` (``_update``), so it is scaled by ``bound / n``."""
    if KIND == 0:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        stat = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        stat = tl.where(l_i == l_i, stat, float("nan"))                      # a poisoned row (l NaN)
    else:
        if NORM == 2:
            n = nr * 0.0 + norm_const
        elif NORM == 1:
            n = nh + nr
        else:
            if HAS_CACHE:
                n = nr + orig.to(tl.float32)
            else:
                n = nr
        out = acc * (bound / tl.where(n > 0, n, 1.0))[:, None]
        out = tl.where((n > 0)[:, None], out, 0.0)
        stat = n
    # non-finite rule: a row with any non-finite element is NaN as a whole
    row_bad = tl.max(tl.where((out == out) & (tl.abs(out) < float("inf")), 0, 1), 1) > 0
    out = tl.where(row_bad[:, None], float("nan"), out)
    if KIND == 0:
        stat = tl.where(row_bad, float("nan"), stat)
    return out, stat


# Virtual key range end used when a program covers the whole key axis.
WHOLE = tl.constexpr(1 << 30)

# Runtime ints that change from call to call while serving (request lengths, cache capacities, split and tile
# counts): never specialised, or every new value equal to 1 or divisible by 16 would compile a new kernel
# mid-serving. They only scale row indices whose alignment the constexpr row widths already give; strides stay
# specialised (their divisibility is what lets the K/V tile loads vectorise).
FORWARD_RUNTIME_INTS = ("QROWB", "KROWB", "C", "R", "P", "T", "TQ", "split_size", "num_tiles")


@triton.jit(do_not_specialize=FORWARD_RUNTIME_INTS)
def attention_forward_kernel(
        Q, sq_b, sq_l, sq_h, sq_d, Q_OFF, Q_LEN, QROWB, QPOS, QTS,
        K, sk_b, sk_l, sk_h, sk_d, V, sv_b, sv_l, sv_h, sv_d, K_OFF, K_LEN, KROWB,
        MASK, sm_b, sm_h, sm_i, sm_j, NT,
        CK, CV, CKS, CKZ, CVS, CVZ, C, CLEN, CPOS, CTS, CCNT, ORIG,
        RK, RV, R, RLEN, RPOS, RTS, RCNT,
        PB, P, TB, T, TH, scale, norm_const, hstu_hb,
        O, so_b, so_l, so_h, so_d, STAT, ACC, MP, LP, TQ, split_size, num_tiles,
        G: tl.constexpr, HQ: tl.constexpr, HKV: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KIND: tl.constexpr, NORM: tl.constexpr,
        HAS_CACHE: tl.constexpr, K_FMT: tl.constexpr, V_FMT: tl.constexpr, K_CHANNEL: tl.constexpr,
        GS: tl.constexpr, HAS_CCOUNT: tl.constexpr, HAS_RES: tl.constexpr, HAS_RCOUNT: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_TARGETS: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
        HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr, DOT_F16: tl.constexpr, DOT_BF16: tl.constexpr,
        SPLIT_K: tl.constexpr):
    """Forward attention of packed query rows (see ``_rows``) of one (user, kv head); see ``attention.py`` for the
    argument meanings.

    ``SPLIT_K`` (decode, flash-decoding): grid ``(B * Hkv, num_splits)``, needs ``G * max_Lq <= BLOCK_M``. Program
    ``(bh, s)`` takes all query rows of the kv head's group over the key slice ``[s * split_size, + split_size)``
    and writes un-normalised partials to ``ACC [S, TQ, Hq, D]`` (fp32) and ``MP``/``LP [S, TQ, Hq]`` (softmax
    running max and denominator; hstu visible stored and request entry counts); ``O``/``STAT`` are not used.

    Otherwise (append / prefill): grid ``(num_tiles * B * Hkv,)``, ``num_tiles = cdiv(G * max_Lq, BLOCK_M)``.
    Program ``bh * num_tiles + tile`` takes
    ``BLOCK_M`` rows over the whole key axis -- compressed cache, residual, then the request's own tokens, causal
    blocks past the tile's last query skipped -- with FlashAttention-2's online softmax (Dao, arXiv 2307.08691) or
    HSTU's pointwise SiLU sum (Zhai et al., arXiv 2402.17152), and writes the normalised output ``O`` and the
    per-row statistic ``STAT [TQ, Hq]`` (lse, or the hstu normaliser n); ``ACC``/``MP``/``LP`` are not used."""
    if SPLIT_K:
        bh = tl.program_id(0)
        split = tl.program_id(1)
    else:
        # one grid axis (limit 2^31 - 1; axis 1 stops at 65,535): tiles of one (user, kv head) are consecutive
        pid = tl.program_id(0)
        tile = pid % num_tiles
        bh = pid // num_tiles
    b = bh // HKV
    hkv = bh % HKV
    if SPLIT_K:
        # every query row of the group, over one slice of the key axis
        first_row = 0
        vlo = split * split_size
        vhi = vlo + split_size
        active = True
    else:
        # one tile of query rows over the whole key axis; tiles past the user's last row have nothing to do
        qlen = tl.load(Q_LEN + b).to(tl.int32)  # lengths < 2^31: int32 loop and index arithmetic
        first_row = tile * BLOCK_M
        vlo = 0
        vhi = WHOLE
        active = first_row < qlen * G
    if active:
        # the original length exists only with a cache (no placeholder is ever read)
        if HAS_CACHE:
            orig = tl.load(ORIG + b)
        else:
            orig = 0
        bound = _hstu_bound(orig, norm_const, hstu_hb, NORM, HAS_CACHE)
        r = first_row + tl.arange(0, BLOCK_M)
        acc, m_i, l_i, nh, nr, i, h, row_ok, flat = _attend(
            b, hkv, r, vlo, vhi, scale, 1.0 / bound,
            Q, sq_b, sq_l, sq_h, sq_d, Q_OFF, Q_LEN, QROWB, QPOS, QTS,
            K, sk_b, sk_l, sk_h, sk_d, V, sv_b, sv_l, sv_h, sv_d, K_OFF, K_LEN, KROWB,
            MASK, sm_b, sm_h, sm_i, sm_j, NT,
            CK, CV, CKS, CKZ, CVS, CVZ, C, CLEN, CPOS, CTS, CCNT,
            RK, RV, R, RLEN, RPOS, RTS, RCNT,
            PB, P, TB, T, TH,
            G, HQ, HKV, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, KIND, HAS_CACHE, K_FMT, V_FMT, K_CHANNEL, GS,
            HAS_CCOUNT, HAS_RES, HAS_RCOUNT, CAUSAL, HAS_TARGETS, HAS_MASK, MASK_BOOL, HAS_POS, HAS_TIME,
            DOT_F16, DOT_BF16)
        if SPLIT_K:
            base = (split.to(tl.int64) * TQ + flat) * HQ + h
            d = tl.arange(0, BLOCK_D)
            tl.store(ACC + base[:, None] * BLOCK_D + d[None, :], acc, mask=row_ok[:, None])
            if KIND == 0:
                tl.store(MP + base, m_i, mask=row_ok)
                tl.store(LP + base, l_i, mask=row_ok)
            else:
                tl.store(MP + base, nh, mask=row_ok)
                tl.store(LP + base, nr, mask=row_ok)
        else:
            out, stat = _finalize(acc, m_i, l_i, nh, nr, orig, norm_const, bound, KIND, NORM, HAS_CACHE)
            d = tl.arange(0, BLOCK_D)
            qoff = tl.load(Q_OFF + b)
            op = O + b.to(tl.int64) * so_b + (qoff + i)[:, None] * so_l + h[:, None] * so_h + d[None, :] * so_d
            tl.store(op, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (d[None, :] < HEAD_DIM))
            tl.store(STAT + flat * HQ + h, stat, mask=row_ok)
