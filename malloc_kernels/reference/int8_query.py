"""The int8-query approximation of a quantized cache's scores (``attention(..., query_precision="int8")``).

The oracle of the CPU kernel's opt-in mode (``csrc/include/malloc_kernels/attention_cpu/int8_query.h``, which states
the same math): QServe's W4A8KV4 idea (Lin et al., arXiv 2405.04532) for the query of a decode. Per query row ``x``
(the query times the softmax scale, rounded to float32 as the kernels hold it) and key row ``j`` of the main cache
(codes ``c_jd``, ``k_jd = s * c_jd + z``):

    quantize(y): a = max_d |y_d|, sq = a / 127, qi_d = clamp(round_half_even(y_d * (127 / a)), -127, 127)
                 (float32 arithmetic; a < 2^-126 gives qi = 0, sq = 0; a non-finite y gives NaN scores)
    token-axis keys:    y = x,          score_j = sq * sum_d qi_d * s_jd * c_jd + sum_d x_d * z_jd
    channel-axis keys:  y = x * s_G,    score_j = sq * sum_d qi_d * c_jd        + sum_d x_d * z_Gd
                        (G = the token group of entry j: each group has its own quantized query)

Only the code term is approximated; with ``|y_d - sq qi_d| <= sq / 2`` the score error is at most
``score_error_bound`` (``(sq / 2) sum_d s_jd c_jd``, i.e. ``(sq / 2) sum_d |k_jd - z_jd|``). The quantization
itself runs in float32 exactly as the kernel does it, so both quantize every element identically; the remaining
arithmetic runs in the reference's compute dtype.
"""
from __future__ import annotations

from typing import Tuple

import torch

from ..cache.quant import _expand, unpack_codes
from ..core.formats import INT_FORMATS
from ..core.kvcache import KVCacheBase

_TINY = torch.finfo(torch.float32).tiny


def quantize_query(y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(qi, sq)``: ``y`` float32 ``[..., D]`` quantized per row (module docstring); ``qi`` float32 integers in
    [-127, 127], ``sq`` float32 ``[..., 1]`` (NaN for a row with a non-finite element)."""
    if y.dtype != torch.float32:
        raise TypeError(f"y must be float32 (the kernels quantize float32 rows), got {y.dtype}")
    a = y.abs().amax(-1, keepdim=True) if y.shape[-1] else y.new_zeros((*y.shape[:-1], 1))
    finite = torch.isfinite(y).all(-1, keepdim=True)
    tiny = a < _TINY
    inv = torch.where(tiny | ~finite, torch.ones_like(a), torch.tensor(127.0, dtype=torch.float32) / a)
    qi = torch.round(y * inv).clamp_(-127, 127)
    qi = torch.where(tiny, torch.zeros_like(qi), qi)
    sq = torch.where(tiny, torch.zeros_like(a), a / torch.tensor(127.0, dtype=torch.float32))
    nan = torch.full((), float("nan"), dtype=torch.float32, device=y.device)
    return torch.where(finite, qi, nan), torch.where(finite, sq, nan)


def _codes_scales(cache: KVCacheBase, cd: torch.dtype):
    """Key codes ``[B, H, C, D]`` and per-element scale / zero ``[B, H, C, D]`` of the main segment, in ``cd``."""
    D, C = cache.head_dim, cache.capacity
    codes = unpack_codes(cache.k, INT_FORMATS[cache.k_format], D).to(cd)
    s = _expand(cache.k_scale, cache.k_axis, cache.group_size, C).to(cd)
    z = _expand(cache.k_zero, cache.k_axis, cache.group_size, C).to(cd) if cache.k_zero is not None else \
        torch.zeros_like(s)
    return codes, s, z


def cache_scores(x: torch.Tensor, cache: KVCacheBase, cd: torch.dtype) -> torch.Tensor:
    """Approximate scores ``[B, Hkv, R, C]`` (in ``cd``) of query rows ``x`` float32 ``[B, Hkv, R, D]`` (already
    times the softmax scale) against the main cache's entries (module docstring). Padding entries are left to
    the caller's visibility mask."""
    codes, s, z = _codes_scales(cache, cd)
    zterm = torch.matmul(x.to(cd), z.transpose(-1, -2))                            # [B, H, R, C]
    if cache.k_axis != "channel":
        qi, sq = quantize_query(x)
        return sq.to(cd) * torch.matmul(qi.to(cd), (s * codes).transpose(-1, -2)) + zterm
    gs, C = cache.group_size, cache.capacity
    s_g = cache.k_scale.to(torch.float32)                                           # [B, H, ng, D]
    y = x[:, :, :, None, :] * s_g[:, :, None, :, :]                                 # [B, H, R, ng, D] float32
    qi, sq = quantize_query(y)
    g_of = torch.arange(C, device=x.device) // gs                                   # token group of each entry
    q_hat = (sq.to(cd) * qi.to(cd))[:, :, :, g_of, :]                               # [B, H, R, C, D]
    return (q_hat * codes[:, :, None]).sum(-1) + zterm


def score_error_bound(x: torch.Tensor, cache: KVCacheBase) -> torch.Tensor:
    """Upper bound ``[B, Hkv, R, C]`` (float64) of ``|cache_scores - exact scores|`` in exact arithmetic:
    ``(sq / 2) * sum_d s_jd c_jd`` for token-axis keys, ``(sq_G / 2) * sum_d c_jd`` for channel-axis keys (the
    scale is inside sq_G there)."""
    cd = torch.float64
    codes, s, _ = _codes_scales(cache, cd)
    if cache.k_axis != "channel":
        _, sq = quantize_query(x)
        return sq.to(cd) / 2 * (s * codes).sum(-1)[:, :, None, :]
    gs, C = cache.group_size, cache.capacity
    y = x[:, :, :, None, :] * cache.k_scale.to(torch.float32)[:, :, None, :, :]
    _, sq = quantize_query(y)                                                       # [B, H, R, ng, 1]
    g_of = torch.arange(C, device=x.device) // gs
    return sq[..., 0].to(cd)[:, :, :, g_of] / 2 * codes.sum(-1)[:, :, None, :]
