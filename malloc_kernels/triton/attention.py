"""Triton attention backend launcher: ``supports(call)`` / ``run(call)`` for ``malloc_kernels.attention``.

Receives the validated ``AttentionCall`` (``core/validate.py``) and runs the fused kernels over the compressed cache
(every format of ``core/kvcache.py``: float, int8, fp8, KIVI int4/int2 with keys on the "token" or "channel" axis,
per-head lengths, merge counts, residual segment), the request's own tokens, both kinds (softmax with lse, hstu
with in-kernel relative bias), causal / target / attn_mask masks, dense and jagged layouts:

* ``G * max_Lq <= DECODE_MAX_ROWS`` -> decode: ``attention_common.attention_forward_kernel`` split over the key
  axis (``SPLIT_K``, flash-decoding) + ``attention_decode.attention_merge_kernel``;
* otherwise -> append: the same forward kernel over query tiles;
* ``return_stats`` -> ``attention_stats`` afterwards (per-key mass from the stored lse / normaliser).

Grids, tiles and buffers are sized by host ints only (shapes, ``call.max_q_len`` / ``max_k_len``: a jagged call's
``max_seqlen_q`` / ``max_seqlen_k`` bounds when given), so a dense or bounded jagged call launches without reading
device data (CUDA-graph capturable; ``tests/test_triton_launch.py``).

Runs CUDA tensors on the GPU, and CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``, set before
Triton kernels are imported; how the numerics are tested on machines without a GPU). Inference only.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..core import formats
from ..core.types import AttentionResult, AttentionStats
from ..core.validate import AttentionCall
from ..core.time_buckets import time_bucket_thresholds
from .launch import device_guard

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
# Largest packed decode tile (G query heads x Lq queries of one kv head) before the append path takes over.
DECODE_MAX_ROWS = 64
# Programs a decode launch aims for: about two waves of an H100's 132 SMs.
TARGET_PROGRAMS = 264


def interpreting() -> bool:
    """Whether Triton runs in interpreter mode (decided by the environment at launch time, never at import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def is_available() -> Tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return False, f"triton is not installed ({e})"
    return True, ""


def supports(call: AttentionCall) -> Tuple[bool, str]:
    """(True, "") when the Triton kernels can run ``call`` here, else (False, why)."""
    ok, why = is_available()
    if not ok:
        return ok, why
    if call.dtype not in SUPPORTED_DTYPES:
        return False, f"triton kernels take float16/bfloat16/float32 inputs, got {call.dtype} (float64 is the oracle's)"
    if call.device.type == "cuda":
        pass
    elif call.device.type == "cpu":
        if not interpreting():
            return False, "CPU tensors run the Triton kernels only under TRITON_INTERPRET=1 (the interpreter)"
    else:
        return False, f"triton kernels need CUDA tensors (or CPU under TRITON_INTERPRET=1), got {call.device}"
    if call.dropout_p > 0:
        return False, "the triton kernels are inference-only: dropout_p must be 0"
    if call.requires_grad:
        return False, "the triton kernels are inference-only (an input requires grad; use the reference)"
    if call.head_dim > MAX_HEAD_DIM:
        return False, f"head_dim {call.head_dim} > {MAX_HEAD_DIM} is not supported by the triton kernels"
    return True, ""


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class LaunchConfig:
    """Tile and split choices of one call (all overridable for tests and the AOT report)."""

    path: str          # "decode" or "append"
    block_m: int
    block_n: int
    block_d: int
    split_size: int
    num_splits: int
    num_warps: int
    num_stages: int


def device_arch(device) -> int:
    """Compute capability ``10 * major + minor`` of a CUDA device; 90 (H100) for CPU tensors (the interpreter runs
    whatever tiles it is given; 90 keeps its tiles those of the GPU this code is tuned for)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def choose_config(call: AttentionCall, *, path: Optional[str] = None, block_m: Optional[int] = None,
                  block_n: Optional[int] = None, split_size: Optional[int] = None,
                  arch: Optional[int] = None) -> LaunchConfig:
    """Tiles: BLOCK_D = next power of two >= max(D, 16); BLOCK_N 64 (32 for D > 128) keeps K/V tiles within the
    register file; decode packs ``G * Lq`` rows into one M tile of at least 16 (the MMA minimum) and splits the key
    axis so that about ``TARGET_PROGRAMS`` programs run; append uses 64-row query tiles."""
    G = call.group_size
    D = call.head_dim
    block_d = max(16, _next_pow2(D))
    rows = G * max(call.max_q_len, 1)
    if path is None:
        path = "decode" if rows <= DECODE_MAX_ROWS else "append"
    if block_n is None:
        # K/V tiles live in registers between the load and the products: dequantizing a tile needs fp32 copies
        # plus per-element scale gathers, and fp32 inputs double every tile, so those take narrower key blocks
        # (measured with the AOT report: BLOCK_N 64 there runs out of registers / spills on sm_90).
        quantized = call.cache is not None and call.cache.is_quantized
        block_n = 64 if block_d <= 128 else 32
        if quantized or call.has_bias:
            block_n = min(block_n, 32)
        if quantized and call.has_bias:
            block_n = min(block_n, 16)
        if call.dtype == torch.float32:
            block_n = min(block_n, 16)
    total = call.max_k_len
    if call.cache is not None:
        total += call.cache.capacity
        if call.cache.residual is not None:
            total += call.cache.residual.capacity
    total = max(total, 1)
    if path == "decode":
        if block_m is None:
            block_m = max(16, _next_pow2(rows))
        if block_m < rows:
            raise ValueError(f"decode tile block_m={block_m} cannot hold G*Lq={rows} rows")
        if split_size is None:
            want = max(1, _cdiv(TARGET_PROGRAMS, max(1, call.batch_size * call.num_kv_heads)))
            splits = min(want, _cdiv(total, block_n))
            split_size = _cdiv(_cdiv(total, splits), block_n) * block_n
        num_splits = _cdiv(total, split_size)
        # Warps per program where the register file holds the tiles without spilling (the AOT report, per arch):
        # fp32 inputs (FMA products, no tensor cores) and 64-row tiles need 8 warps everywhere; 32-row tiles 8 on
        # sm_90 (4 spill there) but 4 on sm_80 (8 spill there); quantized + bias 16-row tiles the reverse.
        arch = device_arch(call.device) if arch is None else arch
        quantized = call.cache is not None and call.cache.is_quantized
        if call.dtype == torch.float32 or block_m >= 64:
            num_warps = 8
        elif block_m == 32:
            num_warps = 8 if arch >= 90 else 4
        elif quantized and call.has_bias:
            num_warps = 4 if arch >= 90 else 8
        else:
            num_warps = 4
    else:
        # FlashAttention-2 tiles where they fit the register file (checked per arch by the AOT report: 0 spills):
        # each warp owns 16 whole query rows (row max/sum stay within the warp, P stays in registers), 128 rows /
        # 8 warps, 3 stages of K/V loads in flight, 32-key blocks (64 keys spill on both archs: the 128 x 64 score
        # tile; 64 rows / 4 warps spill quantized tiles on sm_90). The dequantizing and bias paths need the
        # registers of 32-row tiles on sm_80 (and with the bias on sm_90 too), D = 256 everywhere; fp32 inputs
        # have no tensor-core product and keep 16-row tiles; masked 16-bit tiles on sm_80 keep 64 rows / 2 stages.
        arch = device_arch(call.device) if arch is None else arch
        quantized = call.cache is not None and call.cache.is_quantized
        masked_sm80 = call.attn_mask is not None and arch < 90
        if call.dtype == torch.float32 or call.has_bias or (quantized and arch < 90) or block_d > 128 or masked_sm80:
            fa2 = None
        else:
            fa2 = (128, 8, 3)
        split_size, num_splits = total, 1
        if fa2 is not None and block_m in (None, fa2[0]):
            return LaunchConfig(path, fa2[0], min(block_n, 32), block_d, split_size, num_splits, fa2[1], fa2[2])
        if block_m is None:
            block_m = 64 if (masked_sm80 and block_d <= 128) else 16 if call.dtype == torch.float32 else 32
        num_warps = 4 if block_d <= 64 else 8
    return LaunchConfig(path, block_m, block_n, block_d, split_size, num_splits, num_warps, 2)


def decode_grid(batch: int, num_kv_heads: int, num_splits: int):
    """Split-K forward grid ``(B * Hkv, num_splits)`` (the split count stays far below axis 1's limit)."""
    return (batch * num_kv_heads, num_splits)


def merge_grid(batch: int, rows_per_user: int, block_r: int):
    """Merge grid ``(B * cdiv(Lq * Hq, BLOCK_R),)`` and its row blocks per user (one axis: no 65,535 limit)."""
    blocks = _cdiv(rows_per_user, block_r)
    return (batch * blocks,), blocks


def append_grid(batch: int, num_kv_heads: int, rows_per_head: int, block_m: int):
    """Append grid ``(num_tiles * B * Hkv,)`` and ``num_tiles = cdiv(G * Lq, BLOCK_M)`` (one axis)."""
    tiles = _cdiv(rows_per_head, block_m)
    return (tiles * batch * num_kv_heads,), tiles


def stats_grid(batch: int, num_kv_heads: int, longest_segment: int, block_n: int):
    """Stats grid ``(key blocks * B * Hkv, 3)`` (axis 1: cache, residual, request) and the key blocks per head."""
    blocks = _cdiv(max(longest_segment, 1), block_n)
    return (blocks * batch * num_kv_heads, 3), blocks


_DUMMIES = {}
_THRESHOLDS = {}


def _dummy(device, dtype):
    """A placeholder pointer for an absent input, never dereferenced (constexpr flags turn its loads off): one
    cached tensor per (device, dtype), so a call allocates none (and a captured CUDA graph sees no new buffer)."""
    key = (torch.device(device), dtype)
    t = _DUMMIES.get(key)
    if t is None:
        t = _DUMMIES[key] = torch.zeros(1, dtype=dtype, device=device)
    return t


def _thresholds(T: int, device):
    """HSTU's time-bucket thresholds on ``device``, copied from the host once per (T, device), not per call."""
    key = (T, torch.device(device))
    t = _THRESHOLDS.get(key)
    if t is None:
        t = _THRESHOLDS[key] = time_bucket_thresholds(T).to(device)
    return t


def _nonempty(t, dtype=None):
    """Kernels never dereference empty tensors, but every pointer must be a real allocation."""
    if t is None or t.numel() == 0:
        return _dummy(t.device if t is not None else "cpu", dtype or (t.dtype if t is not None else torch.int32))
    return t.contiguous()


def kernel_args(call: AttentionCall, cfg: LaunchConfig, *, dot_lowp: Optional[bool] = None):
    """The runtime arguments and constexprs shared by the decode, append and stats kernels, as dicts.

    Returns ``(args, consts, buffers)``; ``buffers`` holds the output tensors (``out``, ``stat``). ``dot_lowp``:
    use 16-bit tensor-core operands for fp16/bf16 inputs (default: always for fp16, for bf16 only when not
    interpreting, since the interpreter cannot do bf16 arithmetic)."""
    dev = call.device
    q, k, v = call.query, call.key, call.value
    B, Hq, Hkv, D = call.batch_size, call.num_heads, call.num_kv_heads, call.head_dim
    i64 = torch.int64
    if call.jagged:
        sq = (0, q.stride(0), q.stride(1), q.stride(2))
        sk = (0, k.stride(0), k.stride(1), k.stride(2))
        sv = (0, v.stride(0), v.stride(1), v.stride(2))
        q_off = call.offsets[:-1].to(i64).contiguous()
        k_off = call.key_offsets[:-1].to(i64).contiguous()
        qrowb = krowb = 0
        tq, tk = q.shape[0], k.shape[0]
    else:
        sq = (q.stride(0), q.stride(2), q.stride(1), q.stride(3))
        sk = (k.stride(0), k.stride(2), k.stride(1), k.stride(3))
        sv = (v.stride(0), v.stride(2), v.stride(1), v.stride(3))
        q_off = torch.zeros(B, dtype=i64, device=dev)
        k_off = q_off
        qrowb, krowb = call.max_q_len, call.max_k_len
        tq, tk = B * call.max_q_len, B * call.max_k_len
    if call.has_bias and not call.jagged:
        krowb = qrowb  # request keys are the request tokens: their positions are the queries' (Lk == Lq)
    qpos = _nonempty(call.query_positions.to(i64), i64)
    qts = _nonempty(call.query_timestamps.to(i64), i64) if call.query_timestamps is not None else _dummy(dev, i64)

    if call.attn_mask is not None:
        m = call.attn_mask.expand(B, Hq, call.max_q_len, call.max_k_len)
        mask_bool = m.dtype == torch.bool
        if mask_bool:
            m = m.view(torch.uint8)
        mask, sm = m, tuple(m.stride())
    else:
        mask, sm, mask_bool = _dummy(dev, torch.float32), (0, 0, 0, 0), False

    c = call.cache
    f32, i32 = torch.float32, torch.int32
    if c is not None:
        ck, cv = _nonempty(c.k), _nonempty(c.v)
        cks = _nonempty(c.k_scale) if c.k_scale is not None else _dummy(dev, torch.float16)
        ckz = _nonempty(c.k_zero) if c.k_zero is not None else _dummy(dev, torch.float16)
        cvs = _nonempty(c.v_scale) if c.v_scale is not None else _dummy(dev, torch.float16)
        cvz = _nonempty(c.v_zero) if c.v_zero is not None else _dummy(dev, torch.float16)
        C = c.capacity
        clen, cpos, orig = _nonempty(c.length, i32), _nonempty(c.position, i32), _nonempty(c.original_length, i32)
        cts = _nonempty(c.timestamp, i64) if c.timestamp is not None else _dummy(dev, i64)
        ccnt = _nonempty(c.count, f32) if c.count is not None else _dummy(dev, f32)
        k_fmt, v_fmt = formats.code(c.k_format), formats.code(c.v_format)
        k_channel = c.k_axis == "channel" and k_fmt != 0
        gs = c.group_size if c.is_quantized else 1
        r = c.residual
    else:
        ck = cv = _dummy(dev, q.dtype)
        cks = ckz = cvs = cvz = _dummy(dev, torch.float16)
        C = 0
        clen = cpos = orig = _dummy(dev, i32)
        cts, ccnt = _dummy(dev, i64), _dummy(dev, f32)
        k_fmt = v_fmt = 0
        k_channel, gs, r = False, 1, None
    if r is not None:
        rk, rv, R = _nonempty(r.k), _nonempty(r.v), r.capacity
        rlen, rpos = _nonempty(r.length, i32), _nonempty(r.position, i32)
        rts = _nonempty(r.timestamp, i64) if r.timestamp is not None else _dummy(dev, i64)
        rcnt = _nonempty(r.count, f32) if r.count is not None else _dummy(dev, f32)
    else:
        rk = rv = _dummy(dev, q.dtype)
        R = 0
        rlen = rpos = _dummy(dev, i32)
        rts, rcnt = _dummy(dev, i64), _dummy(dev, f32)

    if call.pos_bias is not None:
        pb, P = call.pos_bias.to(f32).contiguous(), call.pos_bias.shape[1]
    else:
        pb, P = _dummy(dev, f32), 1
    if call.time_bias is not None:
        tb, T = call.time_bias.to(f32).contiguous(), call.time_bias.shape[1]
        th = _thresholds(T, dev) if T > 1 else _dummy(dev, i64)
    else:
        tb, T, th = _dummy(dev, f32), 1, _dummy(dev, i64)

    if isinstance(call.hstu_norm, int):
        norm, norm_const = 2, float(call.hstu_norm)
    else:
        norm, norm_const = (0 if call.hstu_norm == "original" else 1), 0.0
    # host part of the HSTU normaliser bound (attention_common._hstu_bound): every stored entry plus the longest
    # request for "kept", the longest request (plus the user's original length, in-kernel) for "original"
    hstu_hb = float(call.max_k_len + (C + R if norm == 1 else 0))
    if dot_lowp is None:
        dot_lowp = call.dtype == torch.float16 or (call.dtype == torch.bfloat16 and not interpreting())

    out = torch.empty(q.shape, dtype=q.dtype, device=dev)
    so = (0, out.stride(0), out.stride(1), out.stride(2)) if call.jagged else \
        (out.stride(0), out.stride(2), out.stride(1), out.stride(3))
    stat = torch.empty((max(tq, 1), Hq), dtype=f32, device=dev)

    args = dict(
        Q=q, sq_b=sq[0], sq_l=sq[1], sq_h=sq[2], sq_d=sq[3], Q_OFF=_nonempty(q_off, i64),
        Q_LEN=_nonempty(call.q_lengths.to(i64), i64), QROWB=qrowb, QPOS=qpos, QTS=qts,
        K=_nonempty(k) if k.numel() == 0 else k, sk_b=sk[0], sk_l=sk[1], sk_h=sk[2], sk_d=sk[3],
        V=_nonempty(v) if v.numel() == 0 else v, sv_b=sv[0], sv_l=sv[1], sv_h=sv[2], sv_d=sv[3],
        K_OFF=_nonempty(k_off, i64), K_LEN=_nonempty(call.k_lengths.to(i64), i64), KROWB=krowb,
        MASK=mask, sm_b=sm[0], sm_h=sm[1], sm_i=sm[2], sm_j=sm[3], NT=_nonempty(call.num_targets.to(i64), i64),
        CK=ck, CV=cv, CKS=cks, CKZ=ckz, CVS=cvs, CVZ=cvz, C=C, CLEN=clen, CPOS=cpos, CTS=cts, CCNT=ccnt, ORIG=orig,
        RK=rk, RV=rv, R=R, RLEN=rlen, RPOS=rpos, RTS=rts, RCNT=rcnt,
        PB=pb, P=P, TB=tb, T=T, TH=th, scale=float(call.scale), norm_const=norm_const, hstu_hb=hstu_hb,
    )
    consts = dict(
        G=call.group_size, HQ=Hq, HKV=Hkv, HEAD_DIM=D, BLOCK_D=cfg.block_d, BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, KIND=0 if call.kind == "softmax" else 1, NORM=norm, HAS_CACHE=c is not None,
        K_FMT=k_fmt, V_FMT=v_fmt, K_CHANNEL=k_channel, GS=gs,
        HAS_CCOUNT=c is not None and c.count is not None, HAS_RES=r is not None,
        HAS_RCOUNT=r is not None and r.count is not None, CAUSAL=call.is_causal, HAS_TARGETS=call.targets_given,
        HAS_MASK=call.attn_mask is not None, MASK_BOOL=mask_bool, HAS_POS=call.pos_bias is not None,
        HAS_TIME=call.time_bias is not None, DOT_F16=bool(dot_lowp and call.dtype == torch.float16),
        DOT_BF16=bool(dot_lowp and call.dtype == torch.bfloat16),
    )
    buffers = dict(out=out, stat=stat, so=so, tq=tq, tk=tk)
    return args, consts, buffers


def _pick(d, names):
    return {n: d[n] for n in names}


def _output_args(buffers):
    """The final output ``O`` (query layout, strides ``so_*``) and per-row statistic ``STAT`` arguments."""
    so = buffers["so"]
    return dict(O=buffers["out"], so_b=so[0], so_l=so[1], so_h=so[2], so_d=so[3], STAT=buffers["stat"])


def decode_kernel_args(call, cfg, args, consts, buffers):
    """Arguments of ``attention_forward_kernel`` with ``SPLIT_K`` and of ``attention_merge_kernel`` (partials
    allocated here)."""
    S, tq, Hq = cfg.num_splits, max(buffers["tq"], 1), call.num_heads
    dev = call.device
    acc = torch.empty((S, tq, Hq, cfg.block_d), dtype=torch.float32, device=dev)
    mp = torch.empty((S, tq, Hq), dtype=torch.float32, device=dev)
    lp = torch.empty((S, tq, Hq), dtype=torch.float32, device=dev)
    # The split kernel writes only the partials; O/STAT are passed because the forward kernel's signature is shared.
    dargs = dict(args, **_output_args(buffers), ACC=acc, MP=mp, LP=lp, TQ=tq, split_size=cfg.split_size,
                 num_tiles=1)
    dconsts = dict(consts, SPLIT_K=True)
    block_r = max(16, min(64, _next_pow2(Hq)))
    _, row_blocks = merge_grid(call.batch_size, call.max_q_len * Hq, block_r)
    margs = dict(ACC=acc, MP=mp, LP=lp, TQ=tq, num_splits=S, num_row_blocks=row_blocks, Q_OFF=args["Q_OFF"],
                 Q_LEN=args["Q_LEN"], QROWB=args["QROWB"], ORIG=args["ORIG"], norm_const=args["norm_const"],
                 hstu_hb=args["hstu_hb"], **_output_args(buffers))
    mconsts = dict(HQ=Hq, HEAD_DIM=consts["HEAD_DIM"], BLOCK_D=cfg.block_d, BLOCK_R=block_r, KIND=consts["KIND"],
                   NORM=consts["NORM"], HAS_CACHE=consts["HAS_CACHE"])
    return dargs, dconsts, margs, mconsts


def append_kernel_args(call, cfg, args, consts, buffers):
    """Arguments of ``attention_forward_kernel`` over query tiles (no ``SPLIT_K``): the split partial buffers of its
    shared signature are placeholders it never touches."""
    unused = _dummy(call.device, torch.float32)
    _, tiles = append_grid(call.batch_size, call.num_kv_heads, call.group_size * call.max_q_len, cfg.block_m)
    return dict(args, **_output_args(buffers), ACC=unused, MP=unused, LP=unused, TQ=1, split_size=1,
                num_tiles=tiles), dict(consts, SPLIT_K=False)


STATS_ARG_NAMES = ("Q", "sq_b", "sq_l", "sq_h", "sq_d", "Q_OFF", "Q_LEN", "QROWB", "QPOS", "QTS")
STATS_KEY_ARGS = ("K", "sk_b", "sk_l", "sk_h", "sk_d", "K_OFF", "K_LEN", "KROWB", "MASK", "sm_b", "sm_h", "sm_i",
                  "sm_j", "NT", "CK", "CKS", "CKZ", "C", "CLEN", "CPOS", "CTS", "CCNT", "RK", "R", "RLEN", "RPOS",
                  "RTS", "RCNT", "PB", "P", "TB", "T", "TH", "scale")
STATS_CONSTS = ("G", "HQ", "HKV", "HEAD_DIM", "BLOCK_D", "BLOCK_M", "BLOCK_N", "KIND", "HAS_CACHE", "K_FMT",
                "K_CHANNEL", "GS", "HAS_CCOUNT", "HAS_RES", "HAS_RCOUNT", "CAUSAL", "HAS_TARGETS", "HAS_MASK",
                "MASK_BOOL", "HAS_POS", "HAS_TIME", "DOT_F16", "DOT_BF16")


def stats_kernel_args(call, cfg, args, consts, buffers):
    """Arguments of ``attention_stats_kernel``; allocates the zero-initialised mass outputs."""
    dev, Hkv, B = call.device, call.num_kv_heads, call.batch_size
    f32 = torch.float32
    tk = max(buffers["tk"], 1)
    C, R = args["C"], args["R"]
    km, kwm = torch.zeros((tk, Hkv), dtype=f32, device=dev), torch.zeros((tk, Hkv), dtype=f32, device=dev)
    cm = torch.zeros((B, Hkv, max(C, 1)), dtype=f32, device=dev)
    cwm = torch.zeros_like(cm)
    rm = torch.zeros((B, Hkv, max(R, 1)), dtype=f32, device=dev)
    rwm = torch.zeros_like(rm)
    sargs = _pick(args, STATS_ARG_NAMES)
    sargs["STAT"] = buffers["stat"]
    sargs.update(_pick(args, STATS_KEY_ARGS))
    _, key_blocks = stats_grid(B, Hkv, max(call.max_k_len, C, R, 1), cfg.block_n)
    sargs.update(window=int(call.stats_window or 0), key_blocks=key_blocks, KM=km, KWM=kwm, CM=cm, CWM=cwm, RM=rm,
                 RWM=rwm)
    sconsts = _pick(consts, STATS_CONSTS)
    sconsts["BLOCK_M"] = max(16, min(64, _next_pow2(call.group_size * max(call.max_q_len, 1))))
    return sargs, sconsts


def run(call: AttentionCall, *, path: Optional[str] = None, block_m: Optional[int] = None,
        block_n: Optional[int] = None, split_size: Optional[int] = None) -> AttentionResult:
    """Execute a validated call with the Triton kernels; always returns ``AttentionResult`` (lse None for hstu,
    stats None unless requested). Keyword overrides pick the path / tiles / split size (tests use them to hit
    split boundaries)."""
    ok, why = supports(call)
    if not ok:
        raise ValueError(f"backend 'triton' cannot run this call: {why}")
    from .attention_common import attention_forward_kernel
    from .attention_decode import attention_merge_kernel
    from .attention_stats import attention_stats_kernel

    cfg = choose_config(call, path=path, block_m=block_m, block_n=block_n, split_size=split_size)
    args, consts, buffers = kernel_args(call, cfg)
    B, Hq, Hkv = call.batch_size, call.num_heads, call.num_kv_heads
    out, stat = buffers["out"], buffers["stat"]
    launch = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if B > 0 and call.max_q_len > 0 and Hkv > 0:
        with device_guard(call.query):
            if cfg.path == "decode":
                dargs, dconsts, margs, mconsts = decode_kernel_args(call, cfg, args, consts, buffers)
                attention_forward_kernel[decode_grid(B, Hkv, cfg.num_splits)](**dargs, **dconsts, **launch)
                grid, _ = merge_grid(B, call.max_q_len * Hq, mconsts["BLOCK_R"])
                attention_merge_kernel[grid](**margs, **mconsts, num_warps=4)
            else:
                aargs, aconsts = append_kernel_args(call, cfg, args, consts, buffers)
                grid, _ = append_grid(B, Hkv, call.group_size * call.max_q_len, cfg.block_m)
                attention_forward_kernel[grid](**aargs, **aconsts, **launch)

    lse = None
    if call.kind == "softmax" and call.return_lse:
        tq = buffers["tq"]
        lse = stat[:tq]
        lse = lse.contiguous() if call.jagged else lse.view(B, call.max_q_len, Hq).permute(0, 2, 1).contiguous()
    stats = None
    if call.return_stats:
        sargs, sconsts = stats_kernel_args(call, cfg, args, consts, buffers)
        if B > 0 and Hkv > 0:
            grid, _ = stats_grid(B, Hkv, max(call.max_k_len, args["C"], args["R"], 1), cfg.block_n)
            with device_guard(call.query):
                attention_stats_kernel[grid](**sargs, **sconsts, **launch)
        stats = _stats_result(call, sargs, buffers)
    return AttentionResult(out, lse, stats)


def _stats_result(call, sargs, buffers) -> AttentionStats:
    B, Hkv, Lk = call.batch_size, call.num_kv_heads, call.max_k_len
    tk = buffers["tk"]
    win = call.stats_window is not None

    def keys(t):
        t = t[:tk]
        return t.contiguous() if call.jagged else t.view(B, Lk, Hkv).permute(0, 2, 1).contiguous()

    c = call.cache
    cm = cwm = rm = rwm = None
    if c is not None:
        cm, cwm = sargs["CM"][..., :c.capacity], sargs["CWM"][..., :c.capacity]
        if c.residual is not None:
            R = c.residual.capacity
            rm, rwm = sargs["RM"][..., :R], sargs["RWM"][..., :R]
    return AttentionStats(key_mass=keys(sargs["KM"]), key_window_mass=keys(sargs["KWM"]) if win else None,
                          cache_mass=None if cm is None else cm.contiguous(),
                          cache_window_mass=None if (cwm is None or not win) else cwm.contiguous(),
                          residual_mass=None if rm is None else rm.contiguous(),
                          residual_window_mass=None if (rwm is None or not win) else rwm.contiguous(),
                          window=call.stats_window)


# ---- ahead-of-time specialisations (see aot.py for the convention) ----------------------------------------------
def _example_call(*, dtype=torch.float16, kind="softmax", Hq=8, Hkv=2, D=128, Lq=1, C=64, k_format="float",
                  v_format="float", k_axis="token", group_size=32, residual=False, counts=False, bias=False,
                  causal=True, targets=False, mask=None):
    """A tiny CPU call with the dtypes/flags of a real launch (only shapes' constexpr parts matter for codegen)."""
    from ..cache.types import KVCache
    from ..core.validate import validate_call
    B = 1
    q = torch.zeros(B, Hq, Lq, D, dtype=dtype)
    k = torch.zeros(B, Hkv, Lq, D, dtype=dtype)
    cache = None
    if C:
        def seg(n):
            return KVCache(k=torch.zeros(B, Hkv, n, D, dtype=dtype), v=torch.zeros(B, Hkv, n, D, dtype=dtype),
                           length=torch.full((B, Hkv), n, dtype=torch.int32),
                           position=torch.zeros(B, Hkv, n, dtype=torch.int32),
                           original_length=torch.full((B,), n, dtype=torch.int32), head_dim=D,
                           timestamp=torch.zeros(B, Hkv, n, dtype=torch.int64) if bias else None,
                           count=torch.ones(B, Hkv, n) if counts else None)
        cache = seg(C)
        if residual:
            cache = cache.replace(residual=seg(16))
        if k_format != "float" or v_format != "float":
            from ..cache.quant import quantize_cache
            cache = quantize_cache(cache, k_format, v_format, group_size, k_axis)
    extra = {}
    if bias:
        extra = dict(pos_bias=torch.zeros(Hq, 256), time_bias=torch.zeros(Hq, 64),
                     query_timestamps=torch.zeros(B, Lq, dtype=torch.int64))
    attn_mask = None
    if mask == "bool":
        attn_mask = torch.ones(Lq, Lq, dtype=torch.bool)
    elif mask == "float":
        attn_mask = torch.zeros(B, Hq, Lq, Lq, dtype=dtype)
    return validate_call(q, k, k, attn_mask, is_causal=causal, enable_gqa=True, cache=cache, kind=kind,
                         num_targets=1 if targets else None, **extra)


def aot_specs():
    """The decode (+ merge), append and stats specialisations the launcher uses, covering every cache format,
    both kinds, bias, counts, residual, masks and the three input dtypes (see ``aot.py``)."""
    from .aot import AotSpec
    from .attention_common import attention_forward_kernel
    from .attention_decode import attention_merge_kernel
    from .attention_stats import attention_stats_kernel

    kivi4 = dict(k_format="int4", v_format="int4", k_axis="channel", residual=True)
    kivi2 = dict(k_format="int2", v_format="int2", k_axis="channel", residual=True)
    decode = {
        "softmax_fp16": dict(),
        "softmax_bf16": dict(dtype=torch.bfloat16),
        "softmax_fp32": dict(dtype=torch.float32),
        "softmax_int8": dict(k_format="int8", v_format="int8", group_size=128),
        "softmax_fp8": dict(k_format="fp8", v_format="fp8", group_size=128),
        "softmax_nvfp4": dict(k_format="nvfp4", v_format="nvfp4", group_size=16),
        "softmax_kivi4_counts": dict(counts=True, **kivi4),
        "softmax_kivi2": dict(**kivi2),
        "softmax_int4_token_d64": dict(k_format="int4", v_format="int4", D=64),
        "hstu_kivi4_bias_targets": dict(kind="hstu", bias=True, targets=True, Lq=4, **kivi4),
        "hstu_fp16_bias_counts": dict(kind="hstu", bias=True, counts=True, Lq=4),
        "hstu_bf16_int8_bias": dict(kind="hstu", dtype=torch.bfloat16, bias=True, k_format="int8",
                                    v_format="int8", group_size=32),
        # the other tiles auto picks: D = 256 (BLOCK_N 32), 32- and 64-row decode tiles (G * Lq), quantized +
        # bias at 64 rows (BLOCK_N 16)
        "softmax_fp16_d256": dict(D=256),
        "softmax_kivi2_d256": dict(D=256, **kivi2),
        "softmax_fp16_m32": dict(Hq=16, Lq=4),
        "softmax_kivi4_m64": dict(Hq=16, Lq=8, **kivi4),
        "hstu_int8_bias_m64": dict(kind="hstu", Hq=16, Lq=8, bias=True, k_format="int8", v_format="int8",
                                   group_size=32),
    }
    append = {
        "softmax_fp16_prefill": dict(C=0, Lq=128),
        "softmax_fp16_boolmask": dict(C=0, Lq=128, causal=False, mask="bool"),
        "softmax_fp16_addmask_d64": dict(C=0, Lq=128, causal=False, mask="float", D=64),
        "softmax_fp32": dict(C=0, Lq=128, dtype=torch.float32),
        "softmax_fp16_d256": dict(C=0, Lq=128, D=256),
        "softmax_bf16_int8": dict(Lq=64, dtype=torch.bfloat16, k_format="int8", v_format="int8", group_size=32),
        "softmax_kivi4": dict(Lq=64, **kivi4),
        "hstu_fp16_bias_targets": dict(kind="hstu", C=0, Lq=128, bias=True, targets=True),
        "hstu_bf16_int8_bias": dict(kind="hstu", Lq=64, dtype=torch.bfloat16, bias=True, k_format="int8",
                                    v_format="int8", group_size=32),
    }
    stats = {
        "softmax_fp16": dict(Lq=16),
        "hstu_kivi4_bias": dict(kind="hstu", Lq=16, bias=True, **kivi4),
    }
    specs = []
    merged = set()
    for name, kw in decode.items():
        call = _example_call(**kw)
        cfgs = {arch: choose_config(call, path="decode", arch=arch) for arch in (80, 90)}
        same = cfgs[80] == cfgs[90]
        lowp = call.dtype != torch.float32
        for arch, cfg in cfgs.items():
            if same and arch == 90:
                break
            args, consts, buffers = kernel_args(call, cfg, dot_lowp=True)
            dargs, dconsts, margs, mconsts = decode_kernel_args(call, cfg, args, consts, buffers)
            spec = AotSpec.from_args(f"decode/{name}", attention_forward_kernel, dargs, dconsts,
                                     num_warps=cfg.num_warps, num_stages=cfg.num_stages, mma_expected=lowp,
                                     note=f"D={call.head_dim} G={call.group_size} Lq={call.max_q_len} "
                                          f"warps={cfg.num_warps}")
            spec.archs = None if same else (arch,)
            specs.append(spec)
        key = (mconsts["KIND"], mconsts["NORM"], mconsts["HAS_CACHE"], call.dtype, mconsts["BLOCK_D"])
        if key not in merged:
            merged.add(key)
            specs.append(AotSpec.from_args(f"merge/{call.kind}_{str(call.dtype)[6:]}_d{call.head_dim}",
                                           attention_merge_kernel, margs, mconsts, num_warps=4,
                                           mma_expected=False, note="split-K merge"))
    for name, kw in append.items():
        call = _example_call(**kw)
        cfgs = {arch: choose_config(call, path="append", arch=arch) for arch in (80, 90)}
        same = cfgs[80] == cfgs[90]
        for arch, cfg in cfgs.items():
            if same and arch == 90:
                break
            args, consts, buffers = kernel_args(call, cfg, dot_lowp=True)
            aargs, aconsts = append_kernel_args(call, cfg, args, consts, buffers)
            spec = AotSpec.from_args(f"append/{name}", attention_forward_kernel, aargs, aconsts,
                                     num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                                     mma_expected=call.dtype != torch.float32,
                                     note=f"D={call.head_dim} BLOCK_M={cfg.block_m} BLOCK_N={cfg.block_n} "
                                          f"stages={cfg.num_stages}")
            spec.archs = None if same else (arch,)
            specs.append(spec)
    for name, kw in stats.items():
        call = _example_call(**kw)
        call = call.replace(return_stats=True, stats_window=4)
        cfg = choose_config(call, path="append")
        args, consts, buffers = kernel_args(call, cfg, dot_lowp=True)
        sargs, sconsts = stats_kernel_args(call, cfg, args, consts, buffers)
        specs.append(AotSpec.from_args(f"stats/{name}", attention_stats_kernel, sargs, sconsts,
                                       num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                                       note="per-key mass"))
    return specs
