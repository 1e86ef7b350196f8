"""Validation and normalisation of one attention call (ARCHITECTURE.md, "Attention semantics").

``validate_call`` checks every argument of ``malloc_kernels.attention`` once and returns an ``AttentionCall``:
the normalised arguments every backend launcher (``ops/cpu.py``, ``ops/cuda.py``, ``triton/attention.py``) and the
reference receive. Bad input raises ``ValueError`` (wrong values/shapes) or ``TypeError`` (wrong types/dtypes),
always naming the argument, so that no backend ever computes a silently wrong answer.

Normalisation summary (``AttentionCall`` fields):

* layouts: dense query ``[B, Hq, Lq, D]``, key/value ``[B, Hkv, Lk, D]``; jagged query ``[total_q, Hq, D]``,
  key/value ``[total_k, Hkv, D]`` with int64 ``offsets`` / ``key_offsets`` ``[B+1]``. Tensors are passed through
  unchanged (no copies, strides preserved); backends needing contiguity make it themselves.
* ``q_lengths`` / ``k_lengths``: int64 ``[B]`` per-user query / key lengths (dense: all ``Lq`` / ``Lk``).
* ``scale``: python float (default ``1/sqrt(D)``).
* ``num_targets``: int64 ``[B]`` (zeros when not given), ``0 <= num_targets[b] <= q_lengths[b]``.
* ``query_positions``: int64, dense ``[B, Lq]`` / jagged ``[total_q]``, always filled (default
  ``cache.original_length[b] + arange(Lq_b)`` with a cache, ``arange(Lq_b)`` without).
  ``query_timestamps``: int64, same shape, or None (required when ``time_bias`` is given).
* ``pos_bias`` / ``time_bias``: float32 ``[Hq, P]`` / ``[Hq, T]`` (a ``[P]`` vector is shared by all heads) or None.
  Autograd flows through the normalisation (the models learn these tables).
* ``attn_mask``: dense calls only, a 4-D view broadcastable to ``[B, Hq, Lq, Lk]`` (bool: True = may attend;
  floating: added to the score), over the request keys.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Optional, Union

import torch

from . import registry
from .formats import FLOAT_FORMAT
from .kvcache import KVCacheBase
from .layout import check_offsets, eager, jagged_lengths, jagged_to_padded, padded_to_jagged
from .types import AttentionResult, AttentionStats

KINDS = ("softmax", "hstu")
HSTU_NORMS = ("original", "kept")
#: How the scores of a quantized cache's keys are computed: "exact" (default) or "int8" (the query quantized per row
#: and dotted with the int8/int4/int2 key codes in integers; approximate, opt-in; reference/int8_query.py).
QUERY_PRECISIONS = ("exact", "int8")
#: Key formats the int8-query mode reads (integer codes of an affine map).
INT8_QUERY_KEY_FORMATS = ("int8", "int4", "int2")


@dataclass
class AttentionCall:
    """The validated, normalised arguments of one attention call (see the module docstring for shapes).

    ``padded_from_jagged`` marks a dense call produced by ``to_padded()`` from a jagged one: its rows past
    ``q_lengths[b]`` / ``k_lengths[b]`` are padding, and ``from_padded_result`` maps a result back to jagged.
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    jagged: bool
    offsets: Optional[torch.Tensor]
    key_offsets: Optional[torch.Tensor]
    q_lengths: torch.Tensor
    k_lengths: torch.Tensor
    batch_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    _max_q_len: Optional[int]          # None: a jagged call's longest user, computed on first use (max_q_len)
    _max_k_len: Optional[int]
    cache: Optional[KVCacheBase]
    kind: str
    scale: float
    is_causal: bool
    num_targets: torch.Tensor
    targets_given: bool
    query_positions: torch.Tensor
    query_timestamps: Optional[torch.Tensor]
    pos_bias: Optional[torch.Tensor]
    time_bias: Optional[torch.Tensor]
    hstu_norm: Union[str, int]
    return_lse: bool
    return_stats: bool
    stats_window: Optional[int]
    attn_mask: Optional[torch.Tensor]
    dropout_p: float
    enable_gqa: bool
    backend: str
    query_precision: str = "exact"
    padded_from_jagged: bool = False

    # ---- convenience -----------------------------------------------------------------------------------------
    @property
    def max_q_len(self) -> int:
        """Longest request of the batch (dense: ``Lq``). For a jagged call this reads ``q_lengths`` once, on first
        use: the launchers that need a padded extent ask for it, the compiled CPU path never does."""
        if self._max_q_len is None:
            self._max_q_len = int(self.q_lengths.max()) if self.batch_size else 0
        return self._max_q_len

    @property
    def max_k_len(self) -> int:
        """Longest key sequence of the batch (dense: ``Lk``); see ``max_q_len``."""
        if self._max_k_len is None:
            self._max_k_len = int(self.k_lengths.max()) if self.batch_size else 0
        return self._max_k_len

    @property
    def dtype(self) -> torch.dtype:
        return self.query.dtype

    @property
    def device(self) -> torch.device:
        return self.query.device

    @property
    def group_size(self) -> int:
        """Query heads per kv head (GQA ratio); query head h reads kv head ``h // group_size``."""
        return self.num_heads // self.num_kv_heads

    @property
    def has_cache(self) -> bool:
        return self.cache is not None

    @property
    def has_bias(self) -> bool:
        return self.pos_bias is not None or self.time_bias is not None

    @property
    def has_targets(self) -> bool:
        return self.targets_given

    @property
    def requires_grad(self) -> bool:
        """True when autograd must flow through the call (kernels are inference-only; auto picks the reference)."""
        if not torch.is_grad_enabled():
            return False
        tensors = [self.query, self.key, self.value, self.pos_bias, self.time_bias, self.attn_mask]
        if self.cache is not None:
            c = self.cache
            tensors += [c.k, c.v, c.count]
            if c.residual is not None:
                tensors += [c.residual.k, c.residual.v, c.residual.count]
        return any(t is not None and t.requires_grad for t in tensors)

    @property
    def is_plain(self) -> bool:
        """SDPA-equivalent call: no cache, no bias, no targets, softmax."""
        return self.cache is None and not self.has_bias and not self.targets_given and self.kind == "softmax"

    def replace(self, **changes) -> "AttentionCall":
        return dataclasses.replace(self, **changes)

    # ---- layout conversion -----------------------------------------------------------------------------------
    def to_padded(self) -> "AttentionCall":
        """A dense call equivalent to this one (identity for dense calls).

        Jagged query/key/value become ``[B, H, L, D]`` padded with zeros past each user's length (``q_lengths`` /
        ``k_lengths`` keep the true lengths), positions/timestamps become ``[B, Lq]``. Padding is masked by every
        consumer, so it never changes a result. Map results back with ``from_padded_result``.
        """
        if not self.jagged:
            return self
        q, _ = jagged_to_padded(self.query, self.offsets)
        k, _ = jagged_to_padded(self.key, self.key_offsets)
        v, _ = jagged_to_padded(self.value, self.key_offsets)
        # A batch whose users all have zero tokens yields L=0; keep at least the 0-length padded axis.
        pos, _ = jagged_to_padded(self.query_positions, self.offsets, max_len=q.shape[2])
        ts = None
        if self.query_timestamps is not None:
            ts, _ = jagged_to_padded(self.query_timestamps, self.offsets, max_len=q.shape[2])
        return self.replace(query=q, key=k, value=v, jagged=False, query_positions=pos, query_timestamps=ts,
                            _max_q_len=q.shape[2], _max_k_len=k.shape[2], padded_from_jagged=True)

    def from_padded_result(self, output: torch.Tensor, lse: Optional[torch.Tensor],
                           stats: Optional[AttentionStats]):
        """Map a padded (dense) result of ``to_padded()`` back to this call's layout (identity for dense calls)."""
        if not self.jagged:
            return output, lse, stats
        out = padded_to_jagged(output, self.q_lengths)
        lse = None if lse is None else padded_to_jagged(lse, self.q_lengths)
        if stats is not None:
            stats = dataclasses.replace(
                stats, key_mass=padded_to_jagged(stats.key_mass, self.k_lengths),
                key_window_mass=None if stats.key_window_mass is None
                else padded_to_jagged(stats.key_window_mass, self.k_lengths))
        return out, lse, stats

    def make_result(self, output, lse=None, stats=None):
        """The public return value: the output tensor, or ``AttentionResult`` when lse/stats were requested."""
        if self.return_lse or self.return_stats:
            return AttentionResult(output, lse if (self.return_lse and self.kind == "softmax") else None,
                                   stats if self.return_stats else None)
        return output


# ---- helpers --------------------------------------------------------------------------------------------------
def _check_tensor(t, name):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _check_int_tensor(t, name):
    _check_tensor(t, name)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    return t


def _as_bool(x, name) -> bool:
    if isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a bool, got a tensor")
    if not isinstance(x, (bool, int)):
        raise TypeError(f"{name} must be a bool, got {type(x).__name__}")
    return bool(x)


def _resolve_scale(scale, D) -> float:
    if scale is None:
        return 1.0 / math.sqrt(D)
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"scale must be a scalar, got a tensor of shape {tuple(scale.shape)}")
        scale = float(scale)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return scale


def _normalise_bias(bias, name, Hq, device):
    if bias is None:
        return None
    _check_tensor(bias, name)
    if not bias.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor ([P] or [Hq, P]), got {bias.dtype}")
    if bias.device != device:
        raise ValueError(f"{name} is on {bias.device} but query is on {device}")
    if bias.dim() == 1:
        bias = bias[None, :].expand(Hq, bias.shape[0])
    elif bias.dim() != 2 or bias.shape[0] != Hq:
        raise ValueError(f"{name} must be [P] or [Hq={Hq}, P], got {tuple(bias.shape)}")
    if bias.shape[1] < 1:
        raise ValueError(f"{name} must have at least one bucket, got shape {tuple(bias.shape)}")
    return bias.to(torch.float32).contiguous()


def _normalise_per_query(t, name, jagged, B, Lq, total_q, device):
    """Positions/timestamps of the request tokens: dense ``[B, Lq]`` (``[Lq]`` broadcasts) / jagged ``[total_q]``."""
    _check_int_tensor(t, name)
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but query is on {device}")
    if jagged:
        if tuple(t.shape) != (total_q,):
            raise ValueError(f"{name} must be [total_q={total_q}] for a jagged query, got {tuple(t.shape)}")
    else:
        if t.dim() == 1 and t.shape[0] == Lq:
            t = t[None, :].expand(B, Lq)
        elif tuple(t.shape) != (B, Lq):
            raise ValueError(f"{name} must be [B, Lq]={(B, Lq)} (or [Lq]) for a dense query, got {tuple(t.shape)}")
    return t.to(torch.int64).contiguous()


def _check_cache(cache, B, Hkv, D, dtype, device):
    if not isinstance(cache, KVCacheBase):
        raise TypeError(f"cache must be a malloc_kernels.KVCache, got {type(cache).__name__}")
    try:
        cache.validate()
    except (ValueError, TypeError) as e:
        raise type(e)(f"cache: {e}") from None
    if cache.batch_size != B:
        raise ValueError(f"cache holds {cache.batch_size} users but the batch has B={B}")
    if cache.num_kv_heads != Hkv:
        raise ValueError(f"cache has {cache.num_kv_heads} kv heads but key has Hkv={Hkv}")
    if cache.head_dim != D:
        raise ValueError(f"cache.head_dim {cache.head_dim} != query head dim D={D}")
    if cache.device != device:
        raise ValueError(f"cache is on {cache.device} but query is on {device}")
    for name, part, fmt in (("cache.k", cache.k, cache.k_format), ("cache.v", cache.v, cache.v_format)):
        if fmt == FLOAT_FORMAT and part.dtype != dtype:
            raise TypeError(f"{name} dtype {part.dtype} != query dtype {dtype} (cast the cache or the query)")
    if cache.residual is not None:
        r = cache.residual
        if r.k.dtype != dtype or r.v.dtype != dtype:
            raise TypeError(f"cache.residual dtype {r.k.dtype} != query dtype {dtype}")


def _check_int8_query(cache, query, key, value):
    """``query_precision="int8"`` approximates the scores against a quantized cache's integer key codes: it needs
    such a cache and is an inference mode (rounding has no useful gradient)."""
    if cache is None:
        raise ValueError("query_precision='int8' approximates the scores of a quantized cache's keys; this call has "
                         "no cache (use query_precision='exact')")
    if cache.k_format not in INT8_QUERY_KEY_FORMATS:
        raise ValueError(f"query_precision='int8' needs cache keys in {INT8_QUERY_KEY_FORMATS}, got "
                         f"cache.k_format={cache.k_format!r} (use query_precision='exact')")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        raise ValueError("query_precision='int8' is an inference mode (the query's rounding has no gradient); run "
                         "under torch.no_grad() or use query_precision='exact'")


def _normalise_mask(attn_mask, B, Hq, Lq, Lk, dtype, device):
    _check_tensor(attn_mask, "attn_mask")
    if attn_mask.device != device:
        raise ValueError(f"attn_mask is on {attn_mask.device} but query is on {device}")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(f"attn_mask must be bool or floating, got {attn_mask.dtype}")
    if attn_mask.is_floating_point() and attn_mask.dtype != dtype:
        raise TypeError(f"additive attn_mask dtype {attn_mask.dtype} != query dtype {dtype}")
    if attn_mask.dim() > 4 or attn_mask.dim() < 1:
        raise ValueError(f"attn_mask must have 1..4 dims broadcastable to [B, Hq, Lq, Lk]="
                         f"{(B, Hq, Lq, Lk)}, got {tuple(attn_mask.shape)}")
    m = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    for got, want, axis in zip(m.shape, (B, Hq, Lq, Lk), ("B", "Hq", "Lq", "Lk")):
        if got not in (1, want):
            raise ValueError(f"attn_mask shape {tuple(attn_mask.shape)} does not broadcast to [B, Hq, Lq, Lk]="
                             f"{(B, Hq, Lq, Lk)} (axis {axis})")
    return m


# ---- the entry point ------------------------------------------------------------------------------------------
def validate_call(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                  enable_gqa=False, *, cache=None, kind="softmax", offsets=None, key_offsets=None,
                  num_targets=None, query_positions=None, query_timestamps=None, pos_bias=None, time_bias=None,
                  hstu_norm="original", return_lse=False, return_stats=False, stats_window=None,
                  backend="auto", query_precision="exact") -> AttentionCall:
    """Validate the arguments of ``malloc_kernels.attention`` and return the normalised ``AttentionCall``."""
    # -- simple enums/flags first: they are cheap and their errors are the clearest.
    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not isinstance(backend, str) or (backend != "auto" and backend not in registry.names("attention")):
        raise ValueError(f"backend must be one of {('auto',) + registry.names('attention')}, got {backend!r}")
    if not isinstance(query_precision, str) or query_precision not in QUERY_PRECISIONS:
        raise ValueError(f"query_precision must be one of {QUERY_PRECISIONS}, got {query_precision!r}")
    is_causal = _as_bool(is_causal, "is_causal")
    enable_gqa = _as_bool(enable_gqa, "enable_gqa")
    return_lse = _as_bool(return_lse, "return_lse")
    return_stats = _as_bool(return_stats, "return_stats")
    if isinstance(hstu_norm, bool) or not (
            (isinstance(hstu_norm, str) and hstu_norm in HSTU_NORMS) or isinstance(hstu_norm, numbers.Integral)):
        raise ValueError(f"hstu_norm must be 'original', 'kept' or a positive int, got {hstu_norm!r}")
    if isinstance(hstu_norm, numbers.Integral):
        if int(hstu_norm) <= 0:
            raise ValueError(f"hstu_norm must be a positive int when an int, got {hstu_norm}")
        hstu_norm = int(hstu_norm)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if stats_window is not None:
        if isinstance(stats_window, bool) or not isinstance(stats_window, numbers.Integral):
            raise TypeError(f"stats_window must be a positive int or None, got {type(stats_window).__name__}")
        if int(stats_window) < 1:
            raise ValueError(f"stats_window must be >= 1, got {stats_window}")
        stats_window = int(stats_window)

    # -- tensors: types, dtypes, devices.
    for name, t in (("query", query), ("key", key), ("value", value)):
        _check_tensor(t, name)
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if key.dtype != query.dtype:
        raise TypeError(f"key dtype {key.dtype} != query dtype {query.dtype}")
    if value.dtype != query.dtype:
        raise TypeError(f"value dtype {value.dtype} != query dtype {query.dtype}")
    if key.device != query.device:
        raise ValueError(f"key is on {key.device} but query is on {query.device}")
    if value.device != query.device:
        raise ValueError(f"value is on {value.device} but query is on {query.device}")
    device, dtype = query.device, query.dtype

    # -- layout and shapes.
    jagged = offsets is not None
    if not jagged and key_offsets is not None:
        raise ValueError("key_offsets needs offsets (the jagged layout); dense calls take neither")
    if jagged:
        if query.dim() != 3:
            raise ValueError(f"query must be jagged [total_q, Hq, D] when offsets is given, got {tuple(query.shape)}")
        if key.dim() != 3:
            raise ValueError(f"key must be jagged [total_k, Hkv, D] when offsets is given, got {tuple(key.shape)}")
        if value.dim() != 3:
            raise ValueError(f"value must be jagged [total_k, Hkv, D] when offsets is given, got "
                             f"{tuple(value.shape)}")
        total_q, Hq, D = query.shape
        total_k, Hkv = key.shape[:2]
        _check_int_tensor(offsets, "offsets")
        if offsets.device != device:
            raise ValueError(f"offsets is on {offsets.device} but query is on {device}")
        offsets = check_offsets(offsets, total_q, "offsets")
        if key_offsets is None:
            key_offsets = offsets
            if total_k != total_q:
                raise ValueError(f"key has {total_k} tokens but offsets ends at {total_q}; pass key_offsets")
        else:
            _check_int_tensor(key_offsets, "key_offsets")
            if key_offsets.device != device:
                raise ValueError(f"key_offsets is on {key_offsets.device} but query is on {device}")
            key_offsets = check_offsets(key_offsets, total_k, "key_offsets")
            if key_offsets.shape != offsets.shape:
                raise ValueError(f"key_offsets has {key_offsets.numel() - 1} users but offsets has "
                                 f"{offsets.numel() - 1}")
        B = offsets.numel() - 1
        q_lengths = jagged_lengths(offsets)
        k_lengths = jagged_lengths(key_offsets)
        Lq = Lk = None          # computed on demand (AttentionCall.max_q_len): they read the offsets
    else:
        if query.dim() != 4:
            raise ValueError(f"query must be dense [B, Hq, Lq, D] (or jagged with offsets=), got "
                             f"{tuple(query.shape)}")
        if key.dim() != 4:
            raise ValueError(f"key must be dense [B, Hkv, Lk, D], got {tuple(key.shape)}")
        if value.dim() != 4:
            raise ValueError(f"value must be dense [B, Hkv, Lk, D], got {tuple(value.shape)}")
        B, Hq, Lq, D = query.shape
        Hkv, Lk = key.shape[1], key.shape[2]
        if key.shape[0] != B:
            raise ValueError(f"key batch {key.shape[0]} != query batch {B}")
        q_lengths = torch.full((B,), Lq, dtype=torch.int64, device=device)
        k_lengths = torch.full((B,), Lk, dtype=torch.int64, device=device)
    if key.shape[-1] != D:
        raise ValueError(f"key head dim {key.shape[-1]} != query head dim {D}")
    if value.shape != key.shape:
        raise ValueError(f"value shape {tuple(value.shape)} != key shape {tuple(key.shape)}")
    if D < 1:
        raise ValueError(f"query head dim must be >= 1, got {D}")
    if Hq < 1 or Hkv < 1:
        raise ValueError(f"query and key need at least one head, got Hq={Hq}, Hkv={Hkv}")
    if Hq % Hkv:
        raise ValueError(f"query heads Hq={Hq} must be a multiple of key heads Hkv={Hkv}")
    scale = _resolve_scale(scale, D)

    def request_only(what):
        """``what`` needs key/value to be the request's own tokens: Lk == Lq per user."""
        if not jagged:
            same = Lk == Lq
        elif key_offsets is offsets:
            same = True
        elif not eager():
            raise ValueError(f"{what}: under torch.compile pass key_offsets=None (the keys are the request's own "
                             "tokens), the per-user lengths cannot be compared while tracing")
        else:
            same = torch.equal(k_lengths, q_lengths)
        if not same:
            raise ValueError(f"{what} needs key/value to be the request's own tokens: key length must equal query "
                             f"length per user, got Lk={k_lengths.tolist()} vs Lq={q_lengths.tolist()}")

    # -- cache.
    if cache is not None:
        _check_cache(cache, B, Hkv, D, dtype, device)
        request_only("a cache")

    if query_precision != "exact":
        _check_int8_query(cache, query, key, value)

    # -- targets.
    targets_given = num_targets is not None
    if num_targets is None:
        nt = torch.zeros(B, dtype=torch.int64, device=device)
    elif isinstance(num_targets, torch.Tensor):
        _check_int_tensor(num_targets, "num_targets")
        if num_targets.dim() == 0:
            nt = num_targets.to(device=device, dtype=torch.int64).expand(B).contiguous()
        elif tuple(num_targets.shape) == (B,):
            nt = num_targets.to(device=device, dtype=torch.int64)
        else:
            raise ValueError(f"num_targets must be an int or an int tensor [B={B}], got {tuple(num_targets.shape)}")
    elif isinstance(num_targets, numbers.Integral) and not isinstance(num_targets, bool):
        nt = torch.full((B,), int(num_targets), dtype=torch.int64, device=device)
    else:
        raise TypeError(f"num_targets must be an int or an int tensor [B], got {type(num_targets).__name__}")
    if targets_given:
        if eager() and nt.numel() and int(nt.min()) < 0:
            raise ValueError(f"num_targets must be >= 0, got {nt.tolist()}")
        if eager() and nt.numel() and bool((nt > q_lengths).any()):
            raise ValueError(f"num_targets {nt.tolist()} exceeds the request length {q_lengths.tolist()}")
        request_only("num_targets")

    # -- relative bias inputs.
    total_q = query.shape[0] if jagged else B * Lq
    pos_bias = _normalise_bias(pos_bias, "pos_bias", Hq, device)
    time_bias = _normalise_bias(time_bias, "time_bias", Hq, device)
    if pos_bias is not None or time_bias is not None:
        request_only("pos_bias/time_bias")
    if query_positions is not None:
        query_positions = _normalise_per_query(query_positions, "query_positions", jagged, B, Lq, total_q, device)
    else:
        base = cache.original_length.to(torch.int64) if cache is not None else \
            torch.zeros(B, dtype=torch.int64, device=device)
        if jagged:
            idx = torch.arange(total_q, device=device)
            user = torch.repeat_interleave(torch.arange(B, device=device), q_lengths, output_size=total_q)
            query_positions = base[user] + idx - offsets[:-1][user]
        else:
            query_positions = base[:, None] + torch.arange(Lq, device=device)[None, :]
        query_positions = query_positions.contiguous()
    if query_timestamps is not None:
        query_timestamps = _normalise_per_query(query_timestamps, "query_timestamps", jagged, B, Lq, total_q,
                                                device)
    if time_bias is not None:
        if query_timestamps is None:
            raise ValueError("time_bias needs query_timestamps (int64, same shape as query_positions)")
        if cache is not None and cache.timestamp is None:
            raise ValueError("time_bias needs cache.timestamp (the cache was built without timestamps)")

    # -- mask.
    if attn_mask is not None:
        if jagged:
            raise ValueError("attn_mask is only supported for the dense layout; use offsets/num_targets/is_causal "
                             "for jagged calls")
        attn_mask = _normalise_mask(attn_mask, B, Hq, Lq, Lk, dtype, device)

    return AttentionCall(
        query=query, key=key, value=value, jagged=jagged, offsets=offsets if jagged else None,
        key_offsets=key_offsets if jagged else None, q_lengths=q_lengths, k_lengths=k_lengths, batch_size=B,
        num_heads=Hq, num_kv_heads=Hkv, head_dim=D, _max_q_len=Lq, _max_k_len=Lk, cache=cache, kind=kind,
        scale=scale, is_causal=is_causal, num_targets=nt, targets_given=targets_given,
        query_positions=query_positions, query_timestamps=query_timestamps, pos_bias=pos_bias,
        time_bias=time_bias, hstu_norm=hstu_norm, return_lse=return_lse, return_stats=return_stats,
        stats_window=stats_window, attn_mask=attn_mask, dropout_p=dropout_p, enable_gqa=enable_gqa,
        backend=backend, query_precision=query_precision)
