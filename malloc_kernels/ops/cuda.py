"""``backend="cuda"``: the CUDA C++ split-K decode attention and packer (``csrc/cuda/``), launched through the torch
ops ``malloc_kernels::cuda_decode_attention`` / ``cuda_quantize_pack`` that exist only in a CUDA build of
``malloc_kernels._C`` (torch built with CUDA and nvcc present at build time; see setup.py).

The kernel is flash-decoding (Dao, Haziza, Massa, Sizov 2023) over the library's compressed caches: every key and
value is read once, in its storage format (KIVI 4-bit/2-bit codes with channel-grouped keys, Liu et al. 2024,
arXiv 2402.02750; INT8; FP8 e4m3; NVFP4; fp16/bf16/fp32), dequantized once per block into shared memory as
tensor-core operands (the query dtype: fp16/bf16 ``mma.sync`` m16n8k16, or 3 x tf32 m16n8k8 for fp32 queries, fp32
accumulation), QK^T and P.V on tensor cores, and combined
with the residual segment and the request's own tokens; splits are merged by their log-sum-exp (softmax) or summed
(HSTU's pointwise attention, Zhai et al. 2024, arXiv 2402.17152, with the relative bias computed in-kernel from
the entries' original positions/timestamps).

``supports(call) -> (bool, reason)`` and ``run(call) -> AttentionResult`` follow the backend contract of
``malloc_kernels.core.validate.AttentionCall``. Inference only: no autograd, no attention statistics, no dropout,
no ``attn_mask``, head dims up to 256. Query, request keys/values and the residual are read as fp32; outputs are
returned in the query dtype. fp16 queries round keys, values and weights to fp16 on the way to the tensor cores
(as FlashAttention does): a dequantized value beyond 65504 becomes inf there and, by the non-finite rule, makes
its rows NaN; bf16 and fp32 queries have fp32's range.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

from ..core import extension, formats
from ..core.formats import FLOAT_FORMAT, FP8_FORMAT, INT_FORMATS
from ..core.gpu_policy import cuda_decode_preferred
from ..core.masks import request_visibility
from ..core.time_buckets import kernel_thresholds
from ..core.types import AttentionResult

MAX_HEAD_DIM = 256
H100_BANDWIDTH = 3.35e12  # bytes/s, H100 SXM HBM3 (NVIDIA datasheet)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _ops():
    """The CUDA ops namespace, or None when ``malloc_kernels._C`` lacks them (CPU build / not built)."""
    return torch.ops.malloc_kernels if extension.has_op("cuda_decode_attention")[0] else None


def is_available() -> Tuple[bool, str]:
    """Whether ``backend="cuda"`` can run here, and why not."""
    if _ops() is None:
        return False, ("malloc_kernels._C was built without CUDA kernels (needs a CUDA build of torch and nvcc at "
                       "build time; this torch is " + (f"CUDA {torch.version.cuda}" if torch.version.cuda
                                                        else "CPU-only") + ")")
    if not torch.cuda.is_available():
        return False, "no CUDA device is available"
    return True, ""


def supports(call) -> Tuple[bool, str]:
    """Whether this backend computes ``call`` (an ``AttentionCall``) exactly per the contract, and why not."""
    if call.device.type != "cuda":
        return False, f"cuda backend needs CUDA tensors, got {call.device}"
    ok, why = is_available()
    if not ok:
        return False, why
    if call.requires_grad:
        return False, "cuda kernels are inference-only (an input requires grad)"
    if call.return_stats:
        return False, "cuda decode kernel does not compute attention statistics"
    if call.attn_mask is not None:
        return False, "cuda decode kernel does not take attn_mask"
    if call.dropout_p:
        return False, "cuda decode kernel has no dropout"
    if call.head_dim > MAX_HEAD_DIM:
        return False, f"head_dim {call.head_dim} > {MAX_HEAD_DIM}"
    if call.dtype not in _FLOAT_DTYPES:
        return False, f"query dtype {call.dtype} (fp32/fp16/bf16 only; float64 runs on the reference)"
    c = call.cache
    if c is not None:
        for name, fmt, t in (("k", c.k_format, c.k), ("v", c.v_format, c.v)):
            if fmt == FLOAT_FORMAT and t.dtype not in _FLOAT_DTYPES:
                return False, f"cache.{name} dtype {t.dtype} is not fp32/fp16/bf16"
        if call.time_bias is not None and c.timestamp is None:
            return False, "time_bias needs cache timestamps"
    # (validation already requires the request's own keys with a bias: equal lengths per user; a dense call's
    # extents are its shape, a jagged call's are not compared, which would read them on the host)
    elif call.time_bias is not None and not call.jagged and call.max_k_len != call.max_q_len:
        return False, "time_bias without a cache needs Lk == Lq (key timestamps are the query timestamps)"
    if c is None and call.pos_bias is not None and not call.jagged and call.max_k_len != call.max_q_len:
        return False, "pos_bias without a cache needs Lk == Lq"
    return True, ""


def preferred(call) -> bool:
    """Whether ``backend="auto"`` picks this kernel over Triton: ``core/gpu_policy.cuda_decode_preferred`` (cache
    decode over a quantized cache at 64 < D <= 128 with one 16-row tile per kv head, where its SASS cost model is
    below Triton's even at its upper bound). A jagged call is judged by its ``max_seqlen_q``; without it the call
    stays with Triton (its row count would need a host read of the lengths here)."""
    c = call.cache
    if c is None or not call.extents_known:
        return False
    return cuda_decode_preferred(c.is_quantized, call.head_dim, call.group_size * call.max_q_len)


_THRESHOLDS = {}


def _thresholds(T: int, device) -> torch.Tensor:
    """The kernel's time-bucket thresholds on ``device``, copied from the host once per (T, device): a copy per
    call would be a host-to-device transfer in every (captured) serving step."""
    key = (T, torch.device(device))
    t = _THRESHOLDS.get(key)
    if t is None:
        t = _THRESHOLDS[key] = kernel_thresholds(T).to(device)
    return t


def _i32(t):
    return t.to(torch.int32).contiguous()


def _f32(t):
    return None if t is None else t.to(torch.float32).contiguous()


def _inv_norm(call, k_lengths) -> torch.Tensor:
    """HSTU's ``1 / n_i`` as float32 ``[B, Hkv, Lq]`` (1 where n_i == 0: those rows have no weight anyway)."""
    B, Hkv, Lq, dev = call.batch_size, call.num_kv_heads, call.max_q_len, call.device
    req = request_visibility(call.q_lengths, k_lengths, Lq, call.max_k_len, call.is_causal,
                             call.num_targets if call.targets_given else None).sum(-1).to(torch.float32)  # [B, Lq]
    valid = torch.arange(Lq, device=dev)[None, :] < call.q_lengths[:, None]
    if isinstance(call.hstu_norm, int):
        n = torch.full((B, Hkv, Lq), float(call.hstu_norm), device=dev)
    elif call.hstu_norm == "kept":
        n = req[:, None, :].expand(B, Hkv, Lq).clone()
        if call.cache is not None:
            stored = call.cache.length.to(torch.float32)
            if call.cache.residual is not None:
                stored = stored + call.cache.residual.length.to(torch.float32)
            n = n + torch.where(valid[:, None, :], stored[:, :, None], torch.zeros((), device=dev))
    else:
        n = req[:, None, :].expand(B, Hkv, Lq).clone()
        if call.cache is not None:
            orig = call.cache.original_length.to(torch.float32)[:, None, None]
            n = n + torch.where(valid[:, None, :], orig, torch.zeros((), device=dev))
    return (1.0 / torch.where(n > 0, n, torch.ones_like(n))).contiguous()


def _span(call) -> int:
    """Keys per split: enough splits to fill ~2 waves of blocks on a large GPU, never below one 32-key chunk."""
    longest = call.cache.capacity if call.cache is not None else call.max_k_len
    blocks_per_split = max(1, call.batch_size * call.num_kv_heads)
    want_splits = max(1, math.ceil(264 / blocks_per_split))
    return max(32, min(1024, 32 * math.ceil(longest / want_splits / 32)))


def _operands(call) -> str:
    """Tensor-core operand format of the kernel: the query dtype's (fp16/bf16: one m16n8k16 MMA per tile; fp32:
    three tf32 MMAs, hi/lo split, for fp32-level accuracy)."""
    return {torch.float16: "float16", torch.bfloat16: "bfloat16"}.get(call.dtype, "float32")


def run(call) -> AttentionResult:
    """Run the CUDA decode kernel on a supported call; returns ``AttentionResult(output, lse, None)``."""
    ok, why = supports(call)
    if not ok:
        raise ValueError(f"backend 'cuda' cannot run this call: {why}")
    return _launch(call, _ops())


def _launch(call, ops) -> AttentionResult:
    """Normalise ``call``'s tensors for the kernel and run ``ops.cuda_decode_attention`` (the device follows the
    tensors: tests pass a CPU emulation of the kernel through the same preparation)."""
    dense = call.to_padded()
    B, Hq, Lq, D = dense.query.shape
    q = dense.query.to(torch.float32).contiguous()
    k_req, v_req = _f32(dense.key), _f32(dense.value)
    k_lengths = _i32(dense.k_lengths)
    q_pos = k_pos = q_ts = k_ts = None
    if dense.pos_bias is not None:
        q_pos = dense.query_positions.to(torch.int64).contiguous()
        k_pos = q_pos if dense.max_k_len == Lq else \
            torch.arange(dense.max_k_len, device=q.device, dtype=torch.int64).expand(B, -1).contiguous()
    if dense.time_bias is not None:
        q_ts = k_ts = dense.query_timestamps.to(torch.int64).contiguous()
    time_th = None
    if dense.time_bias is not None:
        time_th = _thresholds(dense.time_bias.shape[1], q.device)
    c = dense.cache
    kw = dict(cache_k=None, cache_v=None, k_fmt=formats.FLOAT.code, v_fmt=formats.FLOAT.code, k_axis="token",
              group_size=1,
              k_scale=None, k_zero=None, v_scale=None, v_zero=None, cache_length=None, cache_pos=None,
              cache_ts=None, cache_count=None, res_k=None, res_v=None, res_length=None, res_pos=None, res_ts=None,
              res_count=None)
    if c is not None:
        kw.update(cache_k=c.k.contiguous(), cache_v=c.v.contiguous(), k_fmt=formats.code(c.k_format),
                  v_fmt=formats.code(c.v_format),
                  k_axis=c.k_axis, group_size=max(int(c.group_size), 1),
                  k_scale=None if c.k_scale is None else c.k_scale.contiguous(),
                  k_zero=None if c.k_zero is None else c.k_zero.contiguous(),
                  v_scale=None if c.v_scale is None else c.v_scale.contiguous(),
                  v_zero=None if c.v_zero is None else c.v_zero.contiguous(),
                  cache_length=_i32(c.length), cache_pos=_i32(c.position) if dense.pos_bias is not None else None,
                  cache_ts=c.timestamp.contiguous() if dense.time_bias is not None else None,
                  cache_count=_f32(c.count))
        r = c.residual
        if r is not None and r.capacity > 0:
            kw.update(res_k=_f32(r.k), res_v=_f32(r.v), res_length=_i32(r.length),
                      res_pos=_i32(r.position) if dense.pos_bias is not None else None,
                      res_ts=r.timestamp.contiguous() if dense.time_bias is not None else None,
                      res_count=_f32(r.count))
    inv_n = _inv_norm(dense, dense.k_lengths) if dense.kind == "hstu" else None
    out, lse = ops.cuda_decode_attention(
        q, _i32(dense.q_lengths), _i32(dense.num_targets), k_req, v_req, k_lengths, q_pos, q_ts, k_pos, k_ts,
        kw["cache_k"], kw["cache_v"], kw["k_fmt"], kw["v_fmt"], kw["k_axis"], kw["group_size"], kw["k_scale"],
        kw["k_zero"], kw["v_scale"], kw["v_zero"], kw["cache_length"], kw["cache_pos"], kw["cache_ts"],
        kw["cache_count"], kw["res_k"], kw["res_v"], kw["res_length"], kw["res_pos"], kw["res_ts"],
        kw["res_count"], _f32(dense.pos_bias), _f32(dense.time_bias), time_th, inv_n, float(dense.scale),
        dense.kind, bool(dense.is_causal), _span(dense), bool(dense.return_lse and dense.kind == "softmax"),
        _operands(call))
    out = out.to(call.dtype)
    lse_out = lse if (call.return_lse and call.kind == "softmax") else None
    out, lse_out, _ = call.from_padded_result(out, lse_out, None)
    return AttentionResult(out, lse_out, None)


def quantize_pack(x: torch.Tensor, length: torch.Tensor, fmt: str, group_size: int, axis: str = "token"):
    """GPU twin of ``malloc_kernels.ops.cpp_quant.quantize_pack`` (same layout, bit-exact: both use quant.h)."""
    ops = _ops()
    if ops is None:
        raise ValueError(is_available()[1])
    f = formats.get(fmt, "fmt")
    codes, scale, zero = ops.cuda_quantize_pack(x, length.to(torch.int32), f.code, group_size, axis)
    return codes, scale, (zero if f.has_zero else None)


def decode_bytes(batch: int, num_heads: int, num_kv_heads: int, capacity: int, head_dim: int, residual: int = 0,
                 fmt: str = "float16", group_size: int = 32, q_len: int = 1, with_positions: bool = False) -> int:
    """Bytes one decode call must move (the bandwidth model): cache payload + fp16 scales/zeros (KIVI layout:
    keys per channel over ``group_size`` entries, values per token over ``group_size`` channels) + int32 lengths
    (+ positions if the bias is used) + the fp32 residual + fp32 queries, request tokens and outputs."""
    B, Hq, Hkv, C, D = batch, num_heads, num_kv_heads, capacity, head_dim
    if fmt in ("float16", "bfloat16"):
        payload, scales = 2 * 2 * D * C, 0
    elif fmt == "float32":
        payload, scales = 2 * 4 * D * C, 0
    elif fmt in INT_FORMATS or fmt == FP8_FORMAT:
        bits = 8 if fmt == FP8_FORMAT else INT_FORMATS[fmt]
        per = 1 if fmt == FP8_FORMAT else 2                     # fp16 scale (+ zero) per group
        payload = 2 * math.ceil(D * bits / 8) * C
        k_groups = math.ceil(C / group_size) * D
        v_groups = C * max(D // group_size, 1)
        scales = 2 * per * (k_groups + v_groups)
    else:
        raise ValueError(f"fmt must be float16/bfloat16/float32/int8/int4/int2/fp8, got {fmt!r}")
    per_head = payload + scales + 4 + (4 * C if with_positions else 0) + 2 * 4 * D * (residual + q_len)
    return B * Hkv * per_head + B * Hq * q_len * D * 4 * 2
