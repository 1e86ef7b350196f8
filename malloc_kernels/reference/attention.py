"""The reference attention: the full contract (ARCHITECTURE.md, "Attention semantics") in plain PyTorch.

It is the oracle every backend is tested against, and the autograd path the models train through, so it is written
for clarity first and for batched speed second: users are padded to a common length and everything is a masked
batched matmul over ``[B, Hkv, G, Lq, N]`` scores (G = query heads per kv head, N = cache + residual + request
entries). It materialises the score matrix; kernels do not.

Math (per user b, query head h, kv head h // G, query i, entry j over the cache, residual and request segments):

    s_ij = scale * <q_i, k_j> + bias_ij              (bias: HSTU relative bias, see ``bias.py``; + additive attn_mask)
    softmax: o_i = sum_j c_j e^{s_ij} v_j / sum_j c_j e^{s_ij},   lse_i = log sum_j c_j e^{s_ij}
    hstu:    o_i = (1 / n_i) sum_j c_j silu(s_ij) v_j            (HSTU, arXiv 2402.17152, eq. 2)

over visible j only; ``c_j`` is the merge count (ToMe's proportional attention, arXiv 2210.09461). A row that sees
nothing returns zeros (softmax lse = -inf). Non-finite rule (every backend): a visible score (with ``log c_j``) that
is NaN or +inf, a non-finite value of a visible entry, or a non-finite element of a row's result makes the whole row
NaN (lse NaN); a -inf score is weight 0, as a masked entry (``scaled_dot_product_attention``'s convention), and an
invisible entry never reaches the row. Arithmetic runs in float64 for float64 inputs and in float32 otherwise
(half inputs are upcast right after load, as the kernels do); the output is cast back to the query dtype.

Details fixed here for every backend: a boolean ``attn_mask`` (dense calls, over the request keys) removes entries
and so also reduces HSTU's visible counts n_i; an additive ``attn_mask`` is part of the score (an entry at -inf gets
weight 0 in both kinds, HSTU's n_i counts it as visible). Padding (cache entries past ``length``, rows/columns past a
user's length) is zeroed before any arithmetic, so even NaN padding never reaches a result. Dropout multiplies the
normalised weights (softmax) or the pointwise weights (hstu) by a Bernoulli(1-p)/(1-p) mask, as SDPA does.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..cache.quant import dequantize_cache
from ..core.kvcache import KVCacheBase
from ..core.types import AttentionResult, AttentionStats
from ..core.validate import AttentionCall, validate_call
from . import int8_query
from .bias import relative_bias
from ..core.masks import entry_valid, request_visibility, valid_rows, window_rows


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic dtype of the reference for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dequantized(cache: KVCacheBase, cd: torch.dtype):
    """(k, v) of a cache segment as ``cd`` tensors ``[B, Hkv, C, D]`` (quantized payloads by the cache's rule)."""
    if cache.is_quantized:
        k, v = dequantize_cache(cache, cd)
        return k.to(cd), v.to(cd)
    return cache.k.to(cd), cache.v.to(cd)


class _History:
    """The cache segments (main + residual) concatenated along the entry axis."""

    def __init__(self, cache: KVCacheBase, cd: torch.dtype, need_time: bool):
        segs = [cache] + ([cache.residual] if cache.residual is not None else [])
        ks, vs, valid, pos, ts, cnt = [], [], [], [], [], []
        for seg in segs:
            k, v = _dequantized(seg, cd)
            ok = entry_valid(seg.length, seg.capacity)
            # Padding may hold anything (even NaN); zero it so 0-weight * padding stays 0 in the matmul.
            zero = torch.zeros((), dtype=cd, device=k.device)
            ks.append(torch.where(ok[..., None], k, zero))
            vs.append(torch.where(ok[..., None], v, zero))
            valid.append(ok)
            pos.append(seg.position.to(torch.int64))
            if need_time:
                ts.append(seg.timestamp.to(torch.int64))
            cnt.append(seg.count.to(cd) if seg.count is not None else
                       torch.ones(seg.position.shape, dtype=cd, device=seg.position.device))
        self.sizes = [seg.capacity for seg in segs]
        self.k = torch.cat(ks, dim=2)
        self.v = torch.cat(vs, dim=2)
        self.valid = torch.cat(valid, dim=2)          # [B, Hkv, Nh]
        self.pos = torch.cat(pos, dim=2)              # [B, Hkv, Nh]
        self.ts = torch.cat(ts, dim=2) if need_time else None
        self.count = torch.cat(cnt, dim=2)            # [B, Hkv, Nh]
        self.has_counts = any(seg.count is not None for seg in segs)
        self.original_length = cache.original_length.to(torch.int64)


def attention_padded(call: AttentionCall):
    """Core of the reference on a dense (possibly padded, see ``AttentionCall.to_padded``) call.

    Returns ``(output [B, Hq, Lq, D] in the query dtype, lse [B, Hq, Lq] or None, stats or None)``.
    """
    if call.jagged:
        raise ValueError("attention_padded needs a dense call; use call.to_padded()")
    cd = compute_dtype(call.dtype)
    B, Hq, Lq, D = call.query.shape
    Hkv, Lk, G = call.num_kv_heads, call.max_k_len, call.group_size
    dev = call.device
    q = call.query.to(cd).reshape(B, Hkv, G * Lq, D)
    k_req = call.key.to(cd)
    v_req = call.value.to(cd)
    hist = _History(call.cache, cd, call.time_bias is not None) if call.cache is not None else None
    Nh = 0 if hist is None else hist.k.shape[2]

    # ---- scores [B, Hkv, G, Lq, N] ------------------------------------------------------------------------------
    keys = k_req if hist is None else torch.cat([hist.k, k_req], dim=2)
    vals = v_req if hist is None else torch.cat([hist.v, v_req], dim=2)
    N = keys.shape[2]
    s = torch.matmul(q * call.scale, keys.transpose(-1, -2))
    if call.query_precision == "int8":
        # the opt-in approximation of the main cache's scores (int8_query.py), exactly as the kernels compute it
        x = (call.query.to(torch.float32) * call.scale).reshape(B, Hkv, G * Lq, D)
        C = call.cache.capacity
        approx = torch.where(hist.valid[:, :, None, :C], int8_query.cache_scores(x, call.cache, cd),
                             torch.zeros((), dtype=cd, device=dev))
        s = torch.cat([approx, s[..., C:]], dim=-1)
    s = s.reshape(B, Hkv, G, Lq, N)
    if call.has_bias:
        s = s + _bias(call, hist, cd).reshape(B, Hkv, G, Lq, N)

    # ---- visibility [B, Hkv, Gm, Lq, N] (Gm = G when the mask is per head, else 1) ------------------------------
    req_vis = request_visibility(call.q_lengths, call.k_lengths, Lq, Lk, call.is_causal,
                                 call.num_targets if call.targets_given else None)[:, None, None]
    additive = None
    if call.attn_mask is not None:
        m = call.attn_mask
        m5 = m.reshape(m.shape[0], Hkv, G, Lq, Lk) if m.shape[1] == Hq else m[:, :, None]
        if m.dtype == torch.bool:
            req_vis = req_vis & m5
        else:
            additive = m5.to(cd)
    if hist is not None:
        rows = valid_rows(call.q_lengths, Lq)[:, None, None, :, None]          # [B, 1, 1, Lq, 1]
        hist_vis = hist.valid[:, :, None, None, :] & rows                    # [B, Hkv, 1, Lq, Nh]
        Gm = req_vis.shape[2]
        vis = torch.cat([hist_vis.expand(B, Hkv, Gm, Lq, Nh),
                         req_vis.expand(B, Hkv, Gm, Lq, Lk)], dim=-1)
    else:
        vis = req_vis
    if additive is not None:
        pad = torch.zeros((), dtype=cd, device=dev).expand(*additive.shape[:-1], Nh)
        s = s + (torch.cat([pad, additive], dim=-1) if Nh else additive)

    # ---- counts [B, Hkv, 1, 1, N] --------------------------------------------------------------------------------
    count = None
    if hist is not None and hist.has_counts:
        ones = torch.ones((B, Hkv, Lk), dtype=cd, device=dev)
        count = torch.cat([hist.count, ones], dim=-1)[:, :, None, None, :]

    lse = None
    if call.kind == "softmax":
        w, lse = _softmax_weights(s, vis, count, call.return_lse)
        row_scale = None
        logits = s if count is None else s + torch.log(count)
    else:
        w, row_scale = _hstu_weights(call, s, vis, count, hist, req_vis, Lq)
        logits = s
    # non-finite rule: a visible NaN / +inf score poisons the row (a -inf one is weight 0, as a masked entry)
    bad = (vis & ~(logits < float("inf"))).any(-1).expand(B, Hkv, G, Lq).reshape(B, Hkv, G * Lq, 1)

    # ... and so does a non-finite value of a VISIBLE entry; an invisible one (a causally masked request token) must
    # not reach the row through its 0 weight, so non-finite values are zeroed in the product and flagged here
    v_bad = ~torch.isfinite(vals).all(-1)                                                  # [B, Hkv, N]
    if bool(v_bad.any()):
        bad = bad | (vis & v_bad[:, :, None, None, :]).any(-1).expand(B, Hkv, G, Lq).reshape(B, Hkv, G * Lq, 1)
        vals = torch.where(torch.isfinite(vals), vals, torch.zeros((), dtype=vals.dtype, device=dev))
    w_out = F.dropout(w, call.dropout_p, training=True) if call.dropout_p > 0 else w
    out = torch.matmul(w_out.reshape(B, Hkv, G * Lq, N), vals)
    if row_scale is not None:
        # HSTU's 1/n_i is a per-row constant: applying it to the [.., D] output is cheaper than to [.., N].
        out = out * row_scale.expand(B, Hkv, G, Lq, 1).reshape(B, Hkv, G * Lq, 1)
    # ... and so does a non-finite element of the row's result (a non-finite count or an overflow)
    bad = bad | ~torch.isfinite(out).all(-1, keepdim=True)
    if bool(bad.any()):
        out = torch.where(bad, torch.full((), float("nan"), dtype=out.dtype, device=dev), out)
        if lse is not None:
            lse = torch.where(bad.reshape(lse.shape), torch.full((), float("nan"), dtype=lse.dtype, device=dev), lse)
    out = out.reshape(B, Hq, Lq, D).to(call.dtype)
    if lse is not None:
        lse = lse.reshape(B, Hq, Lq)
    stats = None
    if call.return_stats:
        stats = _stats(call, w if row_scale is None else w * row_scale, hist, Nh)
    return out, lse, stats


def _bias(call: AttentionCall, hist: Optional[_History], cd: torch.dtype) -> torch.Tensor:
    """Relative bias ``[B, Hq, Lq, N]`` from ORIGINAL positions: history entries use their stored positions and
    timestamps, request keys are the request tokens (same positions as the queries)."""
    qp, qt = call.query_positions, call.query_timestamps
    if hist is None:
        kp, kt = qp, qt
    else:
        B, Hkv = hist.pos.shape[:2]
        kp = torch.cat([hist.pos, qp[:, None, :].expand(B, Hkv, qp.shape[1])], dim=-1)
        kt = None if qt is None else torch.cat([hist.ts, qt[:, None, :].expand(B, Hkv, qt.shape[1])], dim=-1)
    return relative_bias(qp, kp, call.pos_bias, call.time_bias, qt, kt, num_heads=call.num_heads, dtype=cd)


def _softmax_weights(s, vis, count, want_lse):
    """Normalised probabilities ``c_j e^{s_ij} / sum_j c_j e^{s_ij}`` (0 where invisible) and lse (-inf if empty).

    ``torch.softmax`` is used for its fused forward/backward; rows with nothing visible (which softmax would turn
    into NaN) are given finite dummy logits and zeroed afterwards, so neither the output nor the gradient sees NaN.
    """
    logits = s if count is None else s + torch.log(count)
    logits = logits.masked_fill(~vis, float("-inf"))
    # A -inf logit is weight 0 like a masked entry (an additive -inf mask, a -inf score from -inf data, a zero count),
    # so a row whose visible logits are all -inf is empty too: zeros, as every kernel gives (SDPA would give NaN).
    row_has = (logits > float("-inf")).any(-1, keepdim=True)
    empty = None if bool(row_has.all()) else ~row_has
    if empty is not None:
        logits = logits.masked_fill(empty, 0.0)
    w = torch.softmax(logits, dim=-1)
    lse = torch.logsumexp(logits, dim=-1, keepdim=True) if want_lse else None
    if empty is not None:
        w = w.masked_fill(empty, 0.0)
        if lse is not None:
            lse = lse.masked_fill(empty, float("-inf"))
    return w, (None if lse is None else lse.squeeze(-1))


def _hstu_weights(call, s, vis, count, hist, req_vis, Lq):
    """Unnormalised pointwise weights ``c_j silu(s_ij)`` (0 where invisible) and the per-row ``1 / n_i``."""
    # silu(0) == 0, so filling invisible scores with 0 zeroes their weight in one pass. A -inf score (an additive
    # -inf mask entry, or -inf data) would give silu(-inf) = -inf * 0 = NaN; its weight is 0 (silu -> 0 at -inf).
    use = vis & (s > float("-inf"))
    w = F.silu(s.masked_fill(~use, 0.0))
    if count is not None:
        w = w * count.masked_fill(~use, 0.0)        # padding counts may be NaN; invisible weights stay exactly 0
    if isinstance(call.hstu_norm, int):
        n = torch.full((1, 1, 1, 1, 1), float(call.hstu_norm), dtype=s.dtype, device=s.device)
    elif call.hstu_norm == "kept":
        n = vis.sum(dim=-1, keepdim=True).to(s.dtype)                      # stored entries visible, per kv head
    else:
        n = req_vis.sum(dim=-1, keepdim=True).to(s.dtype)                  # [B, 1, 1|G, Lq, 1]
        if hist is not None:
            rows = valid_rows(call.q_lengths, Lq)[:, None, None, :, None]
            n = n + torch.where(rows, hist.original_length.to(s.dtype)[:, None, None, None, None],
                                torch.zeros((), dtype=s.dtype, device=s.device))
    return w, 1.0 / torch.where(n > 0, n, torch.ones_like(n))


def _stats(call: AttentionCall, w: torch.Tensor, hist: Optional[_History], Nh: int) -> AttentionStats:
    """Per-entry attention mass summed over valid queries and the G query heads of each kv head."""
    sd = torch.float64 if call.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        mass_w = w.detach().abs().to(sd)                                    # [B, Hkv, G, Lq, N]
        total = mass_w.sum(dim=(2, 3))                                      # [B, Hkv, N]
        window = None
        if call.stats_window is not None:
            rows = window_rows(call.q_lengths, call.max_q_len, call.stats_window)[:, None, None, :, None]
            window = (mass_w * rows).sum(dim=(2, 3))

        def split(t):
            if t is None:
                return None, None, None
            req = t[..., Nh:]
            if hist is None:
                return req, None, None
            parts = torch.split(t[..., :Nh], hist.sizes, dim=-1)
            return req, parts[0], (parts[1] if len(parts) > 1 else None)

        key_m, cache_m, res_m = split(total)
        key_w, cache_w, res_w = split(window)
    return AttentionStats(key_mass=key_m.contiguous(), key_window_mass=None if key_w is None else key_w.contiguous(),
                          cache_mass=cache_m, cache_window_mass=cache_w, residual_mass=res_m,
                          residual_window_mass=res_w, window=call.stats_window)


# The backend-launcher protocol (ops/backends.py): the reference runs every validated call, with autograd.
supports_autograd = True


#: ``query_precision`` values this backend computes (ops/backends.py asks every launcher).
query_precisions = ("exact", "int8")


def supports(call: AttentionCall) -> Tuple[bool, str]:
    return True, ""


def run(call: AttentionCall) -> AttentionResult:
    """Execute a validated call with the reference (the backend-launcher protocol: always an AttentionResult;
    lse is None for ``kind="hstu"``, stats None unless ``call.return_stats``)."""
    padded = call.to_padded()
    out, lse, stats = attention_padded(padded)
    out, lse, stats = call.from_padded_result(out, lse, stats)
    if stats is not None:
        stats = AttentionStats(**{f: (t.contiguous() if isinstance(t, torch.Tensor) else t)
                                  for f, t in vars(stats).items()})
    return AttentionResult(out, lse if call.kind == "softmax" else None, stats)


def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, *,
              cache=None, kind="softmax", offsets=None, key_offsets=None, num_targets=None, query_positions=None,
              query_timestamps=None, pos_bias=None, time_bias=None, hstu_norm="original", return_lse=False,
              return_stats=False, stats_window=None, query_precision="exact"):
    """Reference attention over (compressed cache +) request tokens; the oracle for every backend.

    Arguments and shapes are those of ``malloc_kernels.attention`` (ARCHITECTURE.md, "Attention semantics"): dense query
    ``[B, Hq, Lq, D]``, key/value ``[B, Hkv, Lk, D]``, or jagged ``[total, H, D]`` with ``offsets [B+1]``; ``cache`` a
    ``KVCache`` whose entries precede the request; ``kind`` "softmax" or "hstu"; relative bias from ``pos_bias [P] |
    [Hq, P]`` and ``time_bias [T] | [Hq, T]`` with ORIGINAL positions/timestamps. Supports autograd and ``dropout_p``
    (applied to the normalised weights, as SDPA does). Returns the output (query layout and dtype) or
    ``AttentionResult(output, lse, stats)`` when ``return_lse``/``return_stats``. ``query_precision="int8"``: the
    approximate scores of ``int8_query.py`` for the main cache's int8/int4/int2 keys.
    """
    call = validate_call(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, cache=cache,
                         kind=kind, offsets=offsets, key_offsets=key_offsets, num_targets=num_targets,
                         query_positions=query_positions, query_timestamps=query_timestamps, pos_bias=pos_bias,
                         time_bias=time_bias, hstu_norm=hstu_norm, return_lse=return_lse,
                         return_stats=return_stats, stats_window=stats_window, backend="reference",
                         query_precision=query_precision)
    res = run(call)
    return call.make_result(res.output, res.lse, res.stats)


__all__: List[str] = ["attention", "attention_padded", "run", "compute_dtype"]
