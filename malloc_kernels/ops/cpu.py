"""Launcher of the C++ CPU backend (``backend="cpu"``, and ``auto`` for CPU tensors).

The kernel (``csrc/cpu/attention*.cpp``, op ``torch.ops.malloc_kernels.attention_cpu``) computes the attention contract
(ARCHITECTURE.md, "Attention semantics") in one fused pass per (user, kv head, query block): every cache form (float
fp32/fp16/bf16 payloads; int8, fp8, int4, int2 codes with token- or channel-axis groups, nvfp4, dequantized block by block in
L1 and never written back), per-head lengths, merge counts, the residual segment and the request's own tokens, with
online softmax (FlashAttention-2, arXiv 2307.08691) or HSTU's pointwise SiLU (arXiv 2402.17152) and the relative
position/time bias computed from ORIGINAL positions/timestamps. All query heads of a kv head share each K/V block
(GQA/MQA without repeating K/V).

Protocol (``ops/backends.py``): ``supports(call) -> (bool, reason)``, ``run(call) ->
AttentionResult`` for a validated ``AttentionCall`` (``core/validate.py``). This kernel is inference only; under
autograd the backend selection sends jagged self-attention to the training kernels of ``ops/train_attention.py``.

Also exported for the pruning policies: ``gather_cache_entries(cache, index, length=None)`` (compaction of the
kept entries, see its docstring) and ``gather_rows(src, index)``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..core import extension, formats
from ..core.formats import FLOAT_FORMAT
from ..core.kvcache import KVCacheBase
from ..core.time_buckets import kernel_thresholds
from ..core.types import AttentionResult, AttentionStats

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: ``query_precision`` values the kernel computes (ops/backends.py asks every launcher); "int8" is the opt-in
#: approximate scoring of int8/int4/int2 key codes (csrc/include/malloc_kernels/attention_cpu/int8_query.h).
query_precisions = ("exact", "int8")


def supports(call) -> Tuple[bool, str]:
    """Whether the CPU kernel can run this validated call, and why not (the registry has checked that the
    ``attention_cpu`` op is built)."""
    if call.device.type != "cpu":
        return False, f"the cpu backend needs CPU tensors, got {call.device}"
    if call.dtype not in _KERNEL_DTYPES:
        return False, f"the cpu kernel computes in fp32 for float32/float16/bfloat16 inputs, got {call.dtype} " \
                      "(float64 runs on the reference)"
    if call.attn_mask is not None:
        return False, "attn_mask (arbitrary dense masks) is not supported by the cpu kernel; use is_causal/num_targets"
    if call.dropout_p > 0:
        return False, "dropout is not supported by the cpu kernel (inference only)"
    if call.requires_grad:
        return False, "the cpu kernel is inference-only; inputs require grad"
    c = call.cache
    if c is not None:
        for name, fmt, t in (("cache.k", c.k_format, c.k), ("cache.v", c.v_format, c.v)):
            if fmt == FLOAT_FORMAT and t.dtype not in _KERNEL_DTYPES:
                return False, f"{name} dtype {t.dtype} is not supported by the cpu kernel"
        if c.residual is not None and c.residual.k.dtype not in _KERNEL_DTYPES:
            return False, f"cache.residual dtype {c.residual.k.dtype} is not supported by the cpu kernel"
    return True, ""


def _c(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.contiguous()


def run(call) -> AttentionResult:
    """Execute a validated ``AttentionCall`` with the C++ kernel; returns an ``AttentionResult``."""
    c: Optional[KVCacheBase] = call.cache
    r = c.residual if c is not None else None
    jag = call.jagged
    q_off = call.offsets if jag else None
    k_off = call.key_offsets if jag else None
    need_pos = call.pos_bias is not None
    need_ts = call.time_bias is not None
    qpos = call.query_positions.contiguous() if need_pos else None
    qts = call.query_timestamps.contiguous() if need_ts else None
    if isinstance(call.hstu_norm, int):
        norm, norm_const = "const", int(call.hstu_norm)
    else:
        norm, norm_const = call.hstu_norm, 0
    time_bias = call.time_bias
    th = kernel_thresholds(int(time_bias.shape[-1])) if time_bias is not None else None
    outs = torch.ops.malloc_kernels.attention_cpu(
        call.query, call.key, call.value, _c(q_off), _c(k_off),
        _c(c.k) if c is not None else None, _c(c.v) if c is not None else None,
        _c(c.length) if c is not None else None, _c(c.position) if c is not None else None,
        _c(c.timestamp) if (c is not None and need_ts) else None, _c(c.count) if c is not None else None,
        _c(c.k_scale) if c is not None else None, _c(c.k_zero) if c is not None else None,
        _c(c.v_scale) if c is not None else None, _c(c.v_zero) if c is not None else None,
        _c(r.k) if r is not None else None, _c(r.v) if r is not None else None,
        _c(r.length) if r is not None else None, _c(r.position) if r is not None else None,
        _c(r.timestamp) if (r is not None and need_ts) else None, _c(r.count) if r is not None else None,
        _c(c.original_length) if c is not None else None,
        formats.code(c.k_format if c is not None else FLOAT_FORMAT),
        formats.code(c.v_format if c is not None else FLOAT_FORMAT),
        # key groups along entries exist only for quantized keys (a float payload has none, whatever k_axis says)
        bool(c is not None and c.k_axis == "channel" and c.k_format != FLOAT_FORMAT),
        int(c.group_size) if c is not None else 0,
        call.kind, bool(call.is_causal), call.num_targets.contiguous() if call.targets_given else None,
        float(call.scale), qpos, qpos, qts, qts, _c(call.pos_bias), _c(time_bias), th, norm, norm_const,
        bool(call.return_lse), bool(call.return_stats), int(call.stats_window or 0), call.query_precision)
    out, lse, km, kwm, cm, cwm, rm, rwm = outs
    stats = None
    if call.return_stats:
        w = call.stats_window is not None
        stats = AttentionStats(key_mass=km, key_window_mass=kwm if w else None,
                               cache_mass=cm if c is not None else None,
                               cache_window_mass=cwm if (w and c is not None) else None,
                               residual_mass=rm if r is not None else None,
                               residual_window_mass=rwm if (w and r is not None) else None,
                               window=call.stats_window)
    return AttentionResult(out, lse if (call.return_lse and call.kind == "softmax") else None, stats)


# ---- fake (meta) implementations so torch.compile / opcheck can trace the ops ----------------------------------
def _register_fakes():
    if not extension.has_op("attention_cpu")[0]:
        return

    @torch.library.register_fake("malloc_kernels::attention_cpu")
    def _attention_cpu_fake(query, key, value, q_offsets, k_offsets, cache_k, cache_v, cache_length,
                            cache_position, cache_timestamp, cache_count, k_scale, k_zero, v_scale, v_zero, res_k,
                            res_v, res_length, res_position, res_timestamp, res_count, original_length, k_format,
                            v_format, k_channel, group_size, kind, is_causal, num_targets, scale, query_positions,
                            key_positions, query_timestamps, key_timestamps, pos_bias, time_bias, time_thresholds,
                            hstu_norm, hstu_norm_const, return_lse, return_stats, stats_window,
                            query_precision="exact"):
        jagged = q_offsets is not None
        f32 = dict(dtype=torch.float32, device=query.device)
        def empty():  # distinct tensors: custom-op outputs must not alias each other
            return query.new_empty((0,), dtype=torch.float32)
        out = query.new_empty(query.shape, dtype=query.dtype)
        Hq = query.shape[1]
        Hkv = cache_k.shape[1] if cache_k is not None else key.shape[1]
        B = q_offsets.shape[0] - 1 if jagged else query.shape[0]
        lse = empty()
        if return_lse:
            lse = torch.empty((query.shape[0], Hq), **f32) if jagged else torch.empty((B, Hq, query.shape[2]), **f32)
        km, kwm, cm, cwm, rm, rwm = (empty() for _ in range(6))
        if return_stats:
            if jagged:
                kshape = (key.shape[0] if key is not None else 0, Hkv)
            else:
                kshape = (B, Hkv, key.shape[2] if key is not None else 0)
            km = torch.empty(kshape, **f32)
            if stats_window > 0:
                kwm = torch.empty(kshape, **f32)
            if cache_k is not None:
                cm = torch.empty((B, Hkv, cache_k.shape[2]), **f32)
                if stats_window > 0:
                    cwm = torch.empty((B, Hkv, cache_k.shape[2]), **f32)
            if res_k is not None:
                rm = torch.empty((B, Hkv, res_k.shape[2]), **f32)
                if stats_window > 0:
                    rwm = torch.empty((B, Hkv, res_k.shape[2]), **f32)
        return [out, lse, km, kwm, cm, cwm, rm, rwm]

    @torch.library.register_fake("malloc_kernels::gather_rows")
    def _gather_rows_fake(src, index):
        return src.new_empty((src.shape[0], src.shape[1], index.shape[2], *src.shape[3:]))


_register_fakes()


# ---- gather / compaction for pruning policies -------------------------------------------------------------------
def gather_rows(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``out[b, h, k, ...] = src[b, h, index[b, h, k], ...]`` for ``src [B, H, C, ...]`` (any dtype) and int64
    ``index [B, H, K]`` with entries in ``[0, C)``; one memcpy per kept row, OpenMP over (b, h)."""
    if not isinstance(src, torch.Tensor) or src.dim() < 3:
        raise ValueError(f"src must be a tensor [B, H, C, ...], got {getattr(src, 'shape', src)!r}")
    if not isinstance(index, torch.Tensor) or index.dim() != 3 or index.is_floating_point():
        raise ValueError(f"index must be an integer tensor [B, H, K], got {getattr(index, 'shape', index)!r}")
    if tuple(index.shape[:2]) != tuple(src.shape[:2]):
        raise ValueError(f"index [B, H]={tuple(index.shape[:2])} must match src's {tuple(src.shape[:2])}")
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= src.shape[2]):
        raise ValueError(f"index entries must be in [0, {src.shape[2]})")
    ok, why = extension.has_op("gather_rows")
    if not ok:
        raise ValueError(f"gather_rows needs the C++ extension: {why}")
    return torch.ops.malloc_kernels.gather_rows(src, index.to(torch.int64))


def gather_cache_entries(cache: KVCacheBase, index: torch.Tensor,
                         length: Optional[torch.Tensor] = None) -> KVCacheBase:
    """Compact a cache to the entries a pruning policy keeps.

    index: int64 ``[B, Hkv, K]``, entry ids in ``[0, C)`` of each (user, kv head) row; only the first
    ``length[b, h]`` of them are valid in the result (``length`` int ``[B, Hkv]``, default ``K`` everywhere and
    never more than ``K``; indices past it are still gathered, so they must be in range, but no computation reads
    them). Every per-entry field moves with its entry: payload ``k``/``v`` (float or packed codes), token-axis
    ``scale``/``zero``, ``position``, ``timestamp``, ``count``. ``original_length``, the residual and the metadata
    are kept. Keys quantized per channel (KIVI, ``k_axis="channel"``) share a scale across a group of entries, so
    they cannot be compacted entry by entry: prune before quantizing (``"h2o+int4"``) instead (ValueError).

    Returns a new ``KVCache`` of capacity ``K`` (the input is not modified).
    """
    if not isinstance(cache, KVCacheBase):
        raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}")
    if not isinstance(index, torch.Tensor) or index.is_floating_point() or index.dim() != 3:
        raise ValueError(f"index must be an integer tensor [B, Hkv, K], got {getattr(index, 'shape', index)!r}")
    B, H, C = cache.k.shape[:3]
    if tuple(index.shape[:2]) != (B, H):
        raise ValueError(f"index [B, Hkv]={tuple(index.shape[:2])} must match the cache's {(B, H)}")
    if cache.k_format != FLOAT_FORMAT and cache.k_axis == "channel":
        raise ValueError("gather_cache_entries cannot compact keys quantized per channel (k_axis='channel'): their "
                         "scales are shared by groups of entries; prune before quantizing")
    K = index.shape[2]
    if length is None:
        new_len = torch.full((B, H), K, dtype=torch.int32, device=cache.k.device)
    else:
        if not isinstance(length, torch.Tensor) or tuple(length.shape) != (B, H) or length.is_floating_point():
            raise ValueError(f"length must be an integer tensor [B, Hkv]={(B, H)}")
        if length.numel() and (int(length.min()) < 0 or int(length.max()) > K):
            raise ValueError(f"length must be within [0, K={K}]")
        new_len = length.to(torch.int32).contiguous()
    idx = index.to(torch.int64).contiguous()

    def g(t):
        return None if t is None else gather_rows(t, idx)

    return cache.replace(k=g(cache.k), v=g(cache.v), length=new_len, position=g(cache.position),
                         timestamp=g(cache.timestamp), count=g(cache.count),
                         k_scale=g(cache.k_scale), k_zero=g(cache.k_zero),
                         v_scale=g(cache.v_scale), v_zero=g(cache.v_zero))
