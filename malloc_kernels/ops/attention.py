"""``malloc_kernels.attention``: the drop-in replacement for ``torch.nn.functional.scaled_dot_product_attention``
that also attends over compressed KV caches (ARCHITECTURE.md, "Attention semantics" and "The path of one call").

Validates once (``core/validate.py``), picks a backend (``ops/backends.py``, the registry's rule) and runs it.
"""
from __future__ import annotations

from ..core.validate import validate_call
from .backends import select_backend


def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, *,
              cache=None, kind="softmax", offsets=None, key_offsets=None, num_targets=None, query_positions=None,
              query_timestamps=None, pos_bias=None, time_bias=None, hstu_norm="original", return_lse=False,
              return_stats=False, stats_window=None, backend="auto", query_precision="exact"):
    """Attention of request queries over (an optional compressed ``cache`` +) the request's keys/values.

    Layouts: dense query ``[B, Hq, Lq, D]``, key/value ``[B, Hkv, Lk, D]`` (SDPA's); or jagged query
    ``[total_q, Hq, D]``, key/value ``[total_k, Hkv, D]`` with int ``offsets [B+1]`` (``key_offsets`` defaults to
    ``offsets``). ``Hq % Hkv == 0``; query head h reads kv head ``h // (Hq // Hkv)`` (GQA/MQA; accepted whether or
    not ``enable_gqa`` is set, which is kept for SDPA signature compatibility).

    Without a cache and with default extras this equals ``scaled_dot_product_attention`` (``attn_mask`` bool or
    additive, ``is_causal`` top-left aligned, ``scale`` default ``1/sqrt(D)``, ``dropout_p``, ``enable_gqa``).

    With ``cache`` (``KVCache``, B users, Hkv heads) key/value are the request's own tokens (Lk == Lq per user);
    every query sees all valid cache and residual entries and the request tokens allowed by ``is_causal``; the last
    ``num_targets[b]`` request tokens (candidates) never see each other. Scores ``s_ij = scale <q_i, k_j> + bias_ij``
    with HSTU's relative bias (``pos_bias [P]|[Hq, P]``, ``time_bias [T]|[Hq, T]``) from ORIGINAL positions
    (``query_positions``) and timestamps (``query_timestamps``, int64).

    ``kind="softmax"``: ``o_i = sum_j c_j e^{s_ij} v_j / sum_j c_j e^{s_ij}`` (``c_j`` merge counts);
    ``kind="hstu"``: ``o_i = (1/n_i) sum_j c_j silu(s_ij) v_j`` (Zhai et al., arXiv 2402.17152) with ``n_i`` per
    ``hstu_norm`` ("original", "kept" or an int). Rows that see nothing return 0 (lse -inf).

    Returns the output (query's layout and dtype), or ``AttentionResult(output, lse, stats)`` when
    ``return_lse``/``return_stats`` (stats: ``AttentionStats`` with per-key attention mass, over each user's last
    ``stats_window`` queries for the window variants). ``backend``: "auto" | "reference" | "cpu" | "triton" |
    "cuda"; an explicit backend that cannot run the call raises ``ValueError`` saying why. Under autograd "auto"
    (and "cpu") run jagged self-attention without a cache (HSTU or softmax, the recommenders' training form) on CPU
    tensors with the C++ training kernels (``ops/train_attention.py``) and every other call on the reference.

    ``query_precision``: "exact" (default) or "int8", an opt-in APPROXIMATION for serving from an int8/int4/int2
    cache: each query row is quantized to int8 (absmax, one scale per row; per token group of a channel-axis key
    cache, after folding its scales into the query) and dotted with the stored key codes in integer arithmetic
    (AVX-512 VNNI / AVX2); values, the residual and the request tokens stay exact. Each cache score moves by at most
    ``(sq / 2) * sum_d |k_jd - z_jd|`` (``sq = max|q * scale| / 127``, ``z`` the key's zero point); see README,
    "Approximate int8-query decode". Backends "cpu" and "reference" (which computes the same approximation);
    a ValueError names the argument for anything else (no cache, other key formats, autograd, other backends).
    """
    call = validate_call(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, cache=cache,
                         kind=kind, offsets=offsets, key_offsets=key_offsets, num_targets=num_targets,
                         query_positions=query_positions, query_timestamps=query_timestamps, pos_bias=pos_bias,
                         time_bias=time_bias, hstu_norm=hstu_norm, return_lse=return_lse,
                         return_stats=return_stats, stats_window=stats_window, backend=backend,
                         query_precision=query_precision)
    _, launcher = select_backend(call)
    result = launcher.run(call)
    return call.make_result(result.output, result.lse, result.stats)
