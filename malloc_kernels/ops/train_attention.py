"""Trainable C++ CPU kernels for jagged self-attention (``backend="cpu"`` / ``"auto"`` with autograd).

Every training step of the recommenders attends each user's tokens to themselves, without a cache (the attention
contract of ARCHITECTURE.md, "Attention semantics", with all counts 1): HSTU's pointwise ``o_i = (1/n_i) sum_j
silu(s_ij) v_j`` (Zhai et al., arXiv 2402.17152) or SASRec's softmax ``o_i = sum_j softmax_j(s_ij) v_j``, with ``s_ij =
scale <q_i, k_j> + rab_ij`` over the visible j.
The reference runs this on padded ``[B, H, L, L]`` tensors through autograd; the ops
``malloc_kernels::self_attention_fwd`` / ``_bwd`` (``csrc/cpu/train_attention*.cpp``, math in
``csrc/include/malloc_kernels/train_attention.h``) compute the output (and the softmax lse) and all gradients (q, k,
v, position and time bias tables) per (user, kv head), score rows recomputed in blocks in the backward
(FlashAttention-2's scheme), never materialising an ``[L, L]`` matrix.

Launcher protocol (``ops/backends.py``): ``supports(call)``, ``run(call)``. Calls outside the supported form (dense
layout, a cache, targets, masks, dropout, lse/stats, half precision) keep using the reference under autograd.
"""
from __future__ import annotations

from typing import Tuple

import torch

from ..core import extension
from ..core.time_buckets import kernel_thresholds
from ..core.types import AttentionResult

_DTYPES = (torch.float32, torch.float64)


def supports(call) -> Tuple[bool, str]:
    """Whether the training kernel computes this validated call (forward and backward), and why not."""
    ok, why = extension.has_op("self_attention_fwd")
    if not ok:
        return False, why
    checks = (
        (call.device.type == "cpu", f"needs CPU tensors, got {call.device}"),
        (call.jagged, "needs the jagged layout (offsets)"),
        (call.cache is None, "attends a user's own tokens only (no cache)"),
        (call.dtype in _DTYPES, f"computes in float32/float64, got {call.dtype}"),
        (call.attn_mask is None and not call.targets_given, "takes no attn_mask or num_targets"),
        (call.dropout_p == 0, "has no attention dropout"),
        (not call.return_lse and not call.return_stats, "returns no lse or stats"),
        (call.key_offsets is None or torch.equal(call.key_offsets, call.offsets),
         "needs key_offsets == offsets (self-attention)"),
    )
    for cond, reason in checks:
        if not cond:
            return False, f"the cpu training kernel {reason}"
    return True, ""


def _norm_const(call) -> int:
    # Without a cache "original" and "kept" both count the visible keys (0 tells the kernel so).
    return int(call.hstu_norm) if isinstance(call.hstu_norm, int) else 0


class SelfAttention(torch.autograd.Function):
    """Autograd wrapper of the two ops. Inputs: q, k, v, pos_bias, time_bias (tensors that may require grad), then
    the non-differentiable offsets, positions, timestamps, bucket thresholds, kind, scale, causal, norm_const."""

    @staticmethod
    def forward(ctx, q, k, v, pos_bias, time_bias, offsets, positions, timestamps, thresholds, kind, scale, causal,
                norm_const):
        scalars = (kind, float(scale), bool(causal), int(norm_const))
        out, lse = torch.ops.malloc_kernels.self_attention_fwd(q, k, v, offsets, *scalars, positions, pos_bias,
                                                              timestamps, time_bias, thresholds)
        ctx.save_for_backward(q, k, v, out, lse, pos_bias, time_bias, offsets, positions, timestamps, thresholds)
        ctx.scalars = scalars
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, pos_bias, time_bias, offsets, positions, timestamps, thresholds = ctx.saved_tensors
        dq, dk, dv, dpb, dtb = torch.ops.malloc_kernels.self_attention_bwd(
            grad_out, out, lse, q, k, v, offsets, *ctx.scalars, positions, pos_bias, timestamps, time_bias,
            thresholds)
        need = ctx.needs_input_grad
        return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None,
                dpb if pos_bias is not None and need[3] else None,
                dtb if time_bias is not None and need[4] else None,
                None, None, None, None, None, None, None, None)


def self_attention(q, k, v, offsets, *, kind, scale, causal=True, norm_const=0, positions=None, pos_bias=None,
                   timestamps=None, time_bias=None):
    """Differentiable jagged self-attention on the C++ kernels (``kind`` "hstu" or "softmax"; shapes as in
    ``malloc_kernels.attention``: q ``[total, Hq, D]``, k/v ``[total, Hkv, D]``, int64 ``offsets [B+1]``,
    ``positions``/``timestamps`` int64 ``[total]``, ``pos_bias [P]|[Hq, P]``, ``time_bias [T]|[Hq, T]``).
    ``norm_const`` (hstu) 0: n_i = visible keys."""
    thresholds = None
    if time_bias is not None:
        thresholds = kernel_thresholds(int(time_bias.shape[-1]))
    return SelfAttention.apply(q, k, v, pos_bias, time_bias, offsets, positions, timestamps, thresholds, kind, scale,
                               causal, norm_const)


def run(call) -> AttentionResult:
    """Execute a validated call that ``supports`` accepted; the output carries autograd. The validated bias tables
    are float32 ``[Hq, P]``; they are cast to the query's dtype here (autograd carries the gradient back)."""
    pos_bias = None if call.pos_bias is None else call.pos_bias.to(call.dtype)
    time_bias = None if call.time_bias is None else call.time_bias.to(call.dtype)
    out = self_attention(
        call.query, call.key, call.value, call.offsets.to(torch.int64), kind=call.kind, scale=call.scale,
        causal=call.is_causal,
        norm_const=_norm_const(call),
        positions=call.query_positions if pos_bias is not None else None, pos_bias=pos_bias,
        timestamps=call.query_timestamps if time_bias is not None else None, time_bias=time_bias)
    return AttentionResult(out, None, None)


def _register_fakes():
    if not extension.has_op("self_attention_fwd")[0]:
        return

    @torch.library.register_fake("malloc_kernels::self_attention_fwd")
    def _fwd(q, k, v, offsets, kind, scale, causal, norm_const, positions, pos_bias, timestamps, time_bias,
             thresholds):
        lse = q.new_empty((q.shape[0] if kind == "softmax" else 0, q.shape[1]))
        return q.new_empty(q.shape), lse

    @torch.library.register_fake("malloc_kernels::self_attention_bwd")
    def _bwd(grad_out, out, lse, q, k, v, offsets, kind, scale, causal, norm_const, positions, pos_bias, timestamps,
             time_bias, thresholds):
        dpb = pos_bias.new_empty(pos_bias.shape) if pos_bias is not None else q.new_empty((0,))
        dtb = time_bias.new_empty(time_bias.shape) if time_bias is not None else q.new_empty((0,))
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dpb, dtb


_register_fakes()
