"""HSTU and SASRec sequential recommenders on ``malloc_kernels.attention``, with cached serving.

Token layout: internally every sequence batch is jagged (``values [T, ...]`` + int64 ``offsets [B+1]``), so no
padding token is ever embedded or attended. Public entry points also take left-aligned padded ``[B, N]`` item
tensors (0 = padding) with optional ``lengths [B]`` (default: the number of non-zero items of each row), or a
``malloc_kernels.data.JaggedBatch``.

Positions are 0-based within a user's (truncated) sequence; a request served after a history of ``n`` original
tokens has positions ``n, n+1, ...`` (``cache.original_length``), exactly the positions it has in the full
sequence. Timestamps (int64 seconds) feed HSTU's time bias when given; without timestamps the time bias is off
(training and serving must agree on this).

Histories longer than training (``max_len``): both models define every position at any length, by CLAMPED
buckets, exactly as in training. SASRec's absolute position embedding has ``max_len`` rows; a position
``p >= max_len - 1`` uses the last row (so every token beyond the training window shares one "far" position, and
order among them comes from causality alone). HSTU's relative position bias clamps the distance ``p_i - p_j`` to
``max_len - 1`` (every key farther than the training window shares one bias) and its time bias buckets
``log |t_i - t_j|`` (defined for any gap); its ``1/n`` normaliser uses the original history length. The clamping
keeps a history token's keys/values independent of the request, so cached serving still equals the full
recompute at any length (tested beyond 2,000 tokens, 10x the training window). ``MAX_SERVE_LEN`` (32,768) is the
longest sequence (history + request) ``encode_history``/``last_hidden``/``serve`` accept: twice the longest the
harness serves (16,384-entry histories in the resource table), so a typo'd length fails fast.

Serving (ARCHITECTURE.md, "Serving and evaluation"): ``encode_history`` runs the causal model over the history once and
returns one full-precision ``KVCache`` per layer (positions/timestamps/original lengths filled; optionally compressed
with any ``malloc_kernels.compress`` method); ``serve`` runs the request tokens over those caches and returns the last
hidden state; ``score_all_items`` scores every item. With the uncompressed cache ``serve`` equals
``last_hidden`` on the concatenated sequence (full recompute) up to floating-point summation order.

Learned sequence-level compression (trained with the same split the serving uses, see ``forward``):

* ``linformer`` (Wang et al. 2020, arXiv 2006.04768, adapted to variable-length causal histories): per layer,
  slot m of a history of n > M tokens is ``sum_j E_mj (k_j, v_j)`` with ``E_m = softmax_j(w[l, m, recency_j])``
  over the user's valid tokens, recency ``n-1-j`` (clamped to max_len-1); slot positions/timestamps are the
  E-weighted means (rounded), counts ``n / M`` (so HSTU's sum and the softmax mass see the original token count).
  Histories with n <= M are stored verbatim (count 1).
* ``beacon`` (after Activation Beacon, Zhang et al. 2024, arXiv 2401.03462): the history is cut into chunks of
  ``beacon_chunk`` tokens; in every layer a beacon token (learned embedding) per chunk attends to its chunk's keys
  and values plus itself, and only the beacons' keys/values are cached (count = chunk size, position/timestamp =
  those of the chunk's last token). Beacon hidden states evolve layer by layer like ordinary tokens.
* ``reformer`` (Kitaev et al. 2020, arXiv 2001.04451; ``reformer.py``): shared-QK attention restricted to angular-LSH
  buckets, in training and serving alike; the history cache keeps every entry plus its bucket ids (``LSHCache``),
  and cached serving equals the full recompute, so it trains with the plain causal pass.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..cache.types import KVCache
from ..core.layout import device_assert, jagged_to_padded
from ..ops.attention import attention
from ..policies import compress
from ..loss import linear_cross_entropy
from ..memory import ProductKeyMemory
from .config import ModelConfig
from .layers import HSTULayer, SASRecLayer
from .reformer import LSHAttention


def _user_index(offsets: torch.Tensor, total: int):
    """Per jagged token (``total`` of them, the items' length): its user and its 0-based position within the user.
    ``total`` comes from a shape, not from ``offsets[-1]``, so the serving step traces without reading data."""
    lens = offsets[1:] - offsets[:-1]
    uid = torch.repeat_interleave(torch.arange(lens.numel(), device=offsets.device), lens, output_size=total)
    local = torch.arange(total, device=offsets.device) - offsets[uid]
    return uid, local


def _check_unshared(caches: Sequence[KVCache]) -> None:
    """In-place appends grow ``length`` / ``original_length`` of every layer: refuse caches that share those
    buffers (each layer would then add the request twice); ``reserve`` gives every cache its own."""
    seen = {}
    for li, c in enumerate(caches):
        for name in ("length", "original_length"):
            if not getattr(c, name).numel():
                continue
            ptr = getattr(c, name).untyped_storage().data_ptr()
            if ptr in seen and seen[ptr] != (li, name):
                raise ValueError(f"caches: layer {li}'s {name} shares its buffer with layer {seen[ptr][0]}'s "
                                 f"{seen[ptr][1]}; in_place=True needs caches that own their buffers "
                                 f"(cache.reserve(capacity))")
            seen[ptr] = (li, name)


def _offsets_from_lengths(lens: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(lens.numel() + 1, dtype=torch.int64, device=lens.device)
    torch.cumsum(lens.to(torch.int64), 0, out=out[1:])
    return out


def _as_jagged(items, timestamps=None, lengths=None, what="items"):
    """Accept a JaggedBatch or padded [B, N] items (+ timestamps [B, N], lengths [B]) -> (items, ts, offsets)."""
    if hasattr(items, "offsets") and hasattr(items, "items"):
        if timestamps is not None or lengths is not None:
            raise ValueError(f"{what}: pass timestamps/lengths inside the JaggedBatch, not separately")
        return items.items, items.timestamps, items.offsets.to(torch.int64)
    if not isinstance(items, torch.Tensor) or items.dim() != 2 or items.is_floating_point():
        raise ValueError(f"{what} must be an integer tensor [B, N] (0 = padding) or a JaggedBatch, got "
                         f"{getattr(items, 'shape', type(items).__name__)}")
    B, N = items.shape
    if lengths is None:
        lengths = (items != 0).sum(1)
    lengths = torch.as_tensor(lengths, dtype=torch.int64, device=items.device)
    if lengths.shape != (B,):
        raise ValueError(f"{what} lengths must be [B]={B} within [0, {N}], got shape {tuple(lengths.shape)}")
    if B:
        device_assert(((lengths >= 0) & (lengths <= N)).all(), f"{what} lengths must be [B]={B} within [0, {N}]")
    valid = torch.arange(N, device=items.device)[None, :] < lengths[:, None]
    flat = items[valid].to(torch.int64)
    ts = None
    if timestamps is not None:
        timestamps = torch.as_tensor(timestamps)
        if timestamps.shape != items.shape or timestamps.is_floating_point():
            raise ValueError(f"{what} timestamps must be an integer tensor shaped like the items {tuple(items.shape)},"
                             f" got {timestamps.dtype} {tuple(timestamps.shape)}")
        ts = timestamps[valid].to(torch.int64)
    return flat, ts, _offsets_from_lengths(lengths)


class SequentialRecommender(nn.Module):
    """HSTU or SASRec (``ModelConfig.arch``) with the configured head / sequence-level variant.

    Inputs are item ids in ``1..n_items``; the embedding table has ``n_items + 1`` rows (row 0 = padding, unused).
    HSTU input: ``sqrt(d) * e_item`` (positions enter through the relative bias; ``+ e_pos`` with
    ``ModelConfig.position_embedding``); SASRec input: ``sqrt(d) * e_item + e_pos``. Output: per-token hidden
    states ``[T, d]`` (SASRec: after a final LayerNorm).
    """

    # Longest sequence served (module docstring: positions beyond max_len are clamped).
    MAX_SERVE_LEN = 32768

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self._init_inputs(cfg)
        d = cfg.d_model
        layer_cls = HSTULayer if cfg.arch == "hstu" else SASRecLayer
        mem = set(cfg.memory_layers)
        self.layers = nn.ModuleList(layer_cls(cfg, memory=li in mem) for li in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(d) if cfg.arch == "sasrec" else nn.Identity()
        self.drop = nn.Dropout(cfg.dropout)
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        # ``malloc_kernels.attention`` backend for every call ("auto": kernels for inference, the C++ training
        # kernels under autograd); set e.g. ``model.backend = "reference"`` to pin one.
        self.backend = "auto"
        # ``query_precision`` of the calls over a cache ("exact"; "int8": the opt-in approximate scores against an
        # int8/int4/int2 cache's key codes, README "Approximate int8-query decode"); self-attention is always exact.
        self.query_precision = "exact"
        if cfg.seq_compress == "linformer":
            self.lin_logits = nn.Parameter(torch.randn(cfg.n_layers, cfg.slots, cfg.max_len) * 0.02)
        if cfg.seq_compress == "beacon":
            self.beacon_emb = nn.Parameter(torch.randn(d) * d ** -0.5)
        self.lsh = (LSHAttention(cfg.n_layers, cfg.n_heads, cfg.head_dim, cfg.lsh_buckets, cfg.lsh_hashes,
                                 cfg.lsh_seed) if cfg.seq_compress == "reformer" else None)

    def _init_inputs(self, cfg: ModelConfig):
        """The config and the input tables every architecture shares: the item embedding (row 0 = padding) and the
        optional absolute position embedding."""
        if cfg.n_items < 1:
            raise ValueError("ModelConfig.n_items must be set to the dataset's item count")
        self.cfg = cfg
        d = cfg.d_model
        self.item_emb = nn.Embedding(cfg.n_items + 1, d, padding_idx=0)
        nn.init.normal_(self.item_emb.weight, std=d ** -0.5)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        self.pos_emb = nn.Embedding(cfg.max_len, d) if cfg.uses_position_embedding else None

    # ---- MSN memory ---------------------------------------------------------------------------------------------
    def memories(self) -> List[ProductKeyMemory]:
        """The MSN product-key memories of the layers (``cfg.memory_layers``), in layer order."""
        return [m for m in self.layers.modules() if isinstance(m, ProductKeyMemory)]

    def memory_table_bytes(self) -> int:
        """Bytes of the memories' value tables ``[M, d]`` and (stored) sub-key tables; 0 without memory."""
        total = 0
        for m in self.memories():
            for t in (m.values, m.subkeys, m.subkeys_raw, m.key_proj):
                if t is not None:
                    total += t.numel() * t.element_size()
        return total

    def memory_usage(self, reset: bool = False) -> List[dict]:
        """Slot usage of each memory since its last reset (``ProductKeyMemory.usage_stats``: fraction of slots
        hit, KL of the selection distribution to uniform, queries, selections); ``reset`` zeroes the counts
        after reading them."""
        out = []
        for m in self.memories():
            out.append(m.usage_stats())
            if reset:
                m.reset_usage()
        return out

    # ---- building blocks ----------------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.item_emb.weight.dtype

    def embed(self, items: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # a device assert, not a host read: the cached serving step stays capturable (README, "CUDA graphs")
        if items.numel():
            device_assert(((items >= 1) & (items <= self.cfg.n_items)).all(),
                          f"item ids must be in 1..{self.cfg.n_items}")
        x = self.item_emb(items) * math.sqrt(self.cfg.d_model)
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions.clamp(max=self.cfg.max_len - 1))
        return self.drop(x)

    def _attend(self, layer_idx, q, k, v, offsets, positions, timestamps, cache=None, return_stats=False,
                stats_window=None, max_seqlen=None):
        layer = self.layers[layer_idx]
        kw = {}
        if layer.kind == "hstu":
            kw["pos_bias"] = layer.pos_bias
            if timestamps is not None:
                kw["time_bias"] = layer.time_bias
                kw["query_timestamps"] = timestamps
        if return_stats:
            kw.update(return_stats=True, stats_window=stats_window)
        if cache is not None and self.query_precision != "exact":
            kw["query_precision"] = self.query_precision
        return attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=q.shape[1] != k.shape[1],
                          cache=cache, kind=layer.kind, offsets=offsets, query_positions=positions,
                          backend=self.backend, max_seqlen_q=max_seqlen, **kw)

    def _run_native(self, x, offsets, positions, ts, collect=False, stats_window=None, return_stats=False):
        """Full causal pass over jagged tokens; optionally collect per-layer cache-form (k, v) and attention stats."""
        kvs, stats = [], []
        for li, layer in enumerate(self.layers):
            p = layer.project(x)
            q, k, v = layer.explicit(p)
            if self.lsh is not None:  # no attention statistics: the variant is not compressed further
                a, k = self.lsh.self_attention(self, li, q, v, offsets, positions, ts)
                stats.append(None)
                kvs.extend([(k, v)] if collect else [])
                x = layer.finish(x, a, p, cached=False)
                continue
            a = self._attend(li, q, k, v, offsets, positions, ts, return_stats=return_stats,
                             stats_window=stats_window)
            if return_stats:
                stats.append(a.stats)
                a = a.output
            if collect:
                _, kc, vc = layer.cached(p)
                kvs.append((kc, vc))
            x = layer.finish(x, a, p, cached=False)
        return self.final_norm(x), kvs, stats

    def _run_cached(self, x, offsets, positions, ts, caches: Sequence[KVCache], max_seqlen=None):
        for li, layer in enumerate(self.layers):
            p = layer.project(x)
            q, k, v = layer.cached(p)
            if self.lsh is not None:
                a = self.lsh.cached_attention(self, li, q, v, offsets, positions, ts, caches[li])
            else:
                a = self._attend(li, q, k, v, offsets, positions, ts, cache=caches[li], max_seqlen=max_seqlen)
            x = layer.finish(x, a, p, cached=True)
        return x

    # ---- caches -------------------------------------------------------------------------------------------------
    @staticmethod
    def _cache_from_jagged(k, v, offsets, positions, ts, counts=None, original_length=None,
                           max_len: Optional[int] = None) -> KVCache:
        """Full-precision KVCache ``[B, Hc, C, Dc]`` from jagged ``[T, Hc, Dc]`` entries (C = max length)."""
        kp, lens = jagged_to_padded(k, offsets, max_len=max_len)
        vp, _ = jagged_to_padded(v, offsets, max_len=max_len)
        B, H, C = kp.shape[:3]
        pos = jagged_to_padded(positions, offsets, max_len=C)[0].to(torch.int32)
        tsp = None if ts is None else jagged_to_padded(ts, offsets, max_len=C)[0].to(torch.int64)
        cnt = None if counts is None else jagged_to_padded(counts, offsets, max_len=C)[0].to(torch.float32)
        lens = lens.to(torch.int32)
        return KVCache(k=kp, v=vp, length=lens[:, None].expand(B, H).contiguous(),
                       position=pos[:, None].expand(B, H, C).contiguous(),
                       original_length=(lens if original_length is None else original_length.to(torch.int32)),
                       head_dim=kp.shape[-1],
                       timestamp=None if tsp is None else tsp[:, None].expand(B, H, C).contiguous(),
                       count=None if cnt is None else cnt[:, None].expand(B, H, C).contiguous())

    def _linformer_cache(self, li, k, v, offsets, positions, ts) -> KVCache:
        cfg = self.cfg
        M = cfg.slots
        kp, lens = jagged_to_padded(k, offsets)
        vp, _ = jagged_to_padded(v, offsets)
        B, H, N = kp.shape[:3]
        lens = lens.to(torch.int64)
        j = torch.arange(N, device=kp.device)
        valid = j[None, :] < lens[:, None]                                              # [B, N]
        recency = (lens[:, None] - 1 - j[None, :]).clamp(0, cfg.max_len - 1)           # [B, N]
        logits = self.lin_logits[li][:, recency].permute(1, 0, 2)                      # [B, M, N]
        logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
        raw = lens <= M                                                                 # stored verbatim
        # Users stored verbatim (or empty) would give all -inf rows: give them finite logits, then replace E.
        E = torch.softmax(torch.where(raw[:, None, None], torch.zeros_like(logits), logits), dim=-1)
        eye = ((torch.arange(M, device=kp.device)[:, None] == j[None, :])[None] & valid[:, None, :]).to(E.dtype)
        E = torch.where(raw[:, None, None], eye, E).to(kp.dtype)
        ks = torch.einsum("bmn,bhnd->bhmd", E, kp)
        vs = torch.einsum("bmn,bhnd->bhmd", E, vp)
        Ed = E.detach().to(torch.float64)
        pos_p = jagged_to_padded(positions, offsets, max_len=N)[0].to(torch.float64)
        pos_s = torch.floor(torch.einsum("bmn,bn->bm", Ed, pos_p) + 0.5).to(torch.int32)
        ts_s = None
        if ts is not None:
            ts_p = jagged_to_padded(ts, offsets, max_len=N)[0].to(torch.float64)
            ts_s = torch.floor(torch.einsum("bmn,bn->bm", Ed, ts_p) + 0.5).to(torch.int64)
        count = torch.where(raw[:, None], torch.ones(B, M, dtype=torch.float64, device=kp.device),
                            lens[:, None].to(torch.float64) / M).to(torch.float32)
        length = torch.minimum(lens, torch.full_like(lens, M)).to(torch.int32)
        return KVCache(k=ks, v=vs, length=length[:, None].expand(B, H).contiguous(),
                       position=pos_s[:, None].expand(B, H, M).contiguous(), original_length=lens.to(torch.int32),
                       head_dim=ks.shape[-1],
                       timestamp=None if ts_s is None else ts_s[:, None].expand(B, H, M).contiguous(),
                       count=count[:, None].expand(B, H, M).contiguous())

    def _beacon_caches(self, kvs, offsets, positions, ts) -> List[KVCache]:
        cfg = self.cfg
        w = cfg.beacon_chunk
        lens = offsets[1:] - offsets[:-1]
        n_chunks = (lens + w - 1) // w
        cuid = torch.repeat_interleave(torch.arange(lens.numel(), device=offsets.device), n_chunks)
        if cuid.numel() == 0:
            # No history at all: empty (capacity-0) caches; requests then attend only to themselves.
            return [self._cache_from_jagged(k, v, offsets, positions, ts, counts=torch.ones(0),
                                            original_length=lens) for k, v in kvs]
        beacon_offsets = _offsets_from_lengths(n_chunks)
        cidx = torch.arange(cuid.numel(), device=offsets.device) - beacon_offsets[cuid]
        starts = offsets[cuid] + cidx * w
        ends = torch.minimum(starts + w, offsets[cuid + 1])
        chunk_offsets = torch.cat([starts, offsets[-1:]]) if cuid.numel() else torch.zeros(1, dtype=torch.int64)
        clen = (ends - starts)
        last = ends - 1
        b_pos = positions[last]
        b_ts = None if ts is None else ts[last]
        q_offsets = torch.arange(cuid.numel() + 1, device=offsets.device)
        x = self.beacon_emb.to(self.dtype)[None].expand(cuid.numel(), -1)
        if self.pos_emb is not None:
            x = x + self.pos_emb(b_pos.clamp(max=cfg.max_len - 1))
        caches = []
        for li, layer in enumerate(self.layers):
            kc, vc = kvs[li]
            chunk_cache = self._cache_from_jagged(kc, vc, chunk_offsets, positions, ts, max_len=w)
            p = layer.project(x)
            q, k, v = layer.cached(p)
            a = self._attend(li, q, k, v, q_offsets, b_pos, b_ts, cache=chunk_cache)
            caches.append(self._cache_from_jagged(k, v, beacon_offsets, b_pos, b_ts, counts=clen,
                                                  original_length=lens))
            x = layer.finish(x, a, p, cached=True)
        return caches

    def _history_caches(self, kvs, offsets, positions, ts) -> List[KVCache]:
        """Per-layer full-precision caches of a history after the model's learned sequence compression."""
        if self.cfg.seq_compress == "linformer":
            return [self._linformer_cache(li, k, v, offsets, positions, ts) for li, (k, v) in enumerate(kvs)]
        if self.cfg.seq_compress == "beacon":
            return self._beacon_caches(kvs, offsets, positions, ts)
        if self.lsh is not None:
            return [self.lsh.make_cache(li, self._cache_from_jagged(k, v, offsets, positions, ts), k, offsets)
                    for li, (k, v) in enumerate(kvs)]
        return [self._cache_from_jagged(k, v, offsets, positions, ts) for k, v in kvs]

    # ---- public API -----------------------------------------------------------------------------------------------
    def forward(self, items, timestamps=None, lengths=None, *, request_len: Optional[int] = None) -> torch.Tensor:
        """Training forward: hidden states of every token, jagged ``[T, d]`` in the input's token order.

        Without ``request_len`` (or for models without sequence compression) this is the full causal pass. With
        ``request_len = r`` and ``seq_compress`` set, each user's last ``r`` tokens (all of them if shorter) are
        computed exactly as ``serve`` computes them, against the learned-compressed cache of the tokens before
        them, and the earlier tokens by the full causal pass: training sees what serving will do.
        """
        items, ts, offsets = _as_jagged(items, timestamps, lengths)
        uid, local = _user_index(offsets, items.numel())
        if request_len is None or self.cfg.seq_compress in (None, "reformer"):
            h, _, _ = self._run_native(self.embed(items, local), offsets, local, ts)
            return h
        if request_len < 1:
            raise ValueError(f"request_len must be >= 1, got {request_len}")
        lens = offsets[1:] - offsets[:-1]
        hist_len = (lens - request_len).clamp(min=0)
        is_hist = local < hist_len[uid]
        h_off, r_off = _offsets_from_lengths(hist_len), _offsets_from_lengths(lens - hist_len)
        h_items, h_pos = items[is_hist], local[is_hist]
        h_ts = None if ts is None else ts[is_hist]
        h_hist, kvs, _ = self._run_native(self.embed(h_items, h_pos), h_off, h_pos, h_ts, collect=True)
        caches = self._history_caches(kvs, h_off, h_pos, h_ts)
        r_items, r_pos = items[~is_hist], local[~is_hist]
        r_ts = None if ts is None else ts[~is_hist]
        h_req = self.final_norm(self._run_cached(self.embed(r_items, r_pos), r_off, r_pos, r_ts, caches))
        out = h_hist.new_zeros(items.numel(), h_hist.shape[-1])
        out = out.index_put((is_hist.nonzero().squeeze(1),), h_hist)
        return out.index_put(((~is_hist).nonzero().squeeze(1),), h_req)

    def last_hidden(self, items, timestamps=None, lengths=None) -> torch.Tensor:
        """Full recompute: hidden state of each user's last token, ``[B, d]`` (every user needs >= 1 token)."""
        items, ts, offsets = _as_jagged(items, timestamps, lengths)
        self._check_nonempty(offsets, "items: every user needs at least one token")
        self._check_serve_len(offsets, "items")
        uid, local = _user_index(offsets, items.numel())
        h, _, _ = self._run_native(self.embed(items, local), offsets, local, ts)
        return h[offsets[1:] - 1]

    def _check_serve_len(self, offsets, what: str, extra: Optional[torch.Tensor] = None):
        # a device assert (no host read): the serving step stays capturable
        lens = offsets[1:] - offsets[:-1]
        if extra is not None:
            lens = lens + extra
        if lens.numel():
            device_assert(lens.max() <= self.MAX_SERVE_LEN, f"{what}: a sequence exceeds the longest this model "
                          f"serves (MAX_SERVE_LEN = {self.MAX_SERVE_LEN})")

    @staticmethod
    def _check_nonempty(offsets, message: str = "request items: every user needs at least one request token"):
        """Every user has at least one token (a device assert, no host read)."""
        if offsets.numel() > 1:
            device_assert(((offsets[1:] - offsets[:-1]) >= 1).all(), message)

    @staticmethod
    def _request_bound(request_items, max_request_len: Optional[int]) -> Optional[int]:
        """The ``max_seqlen_q`` of the serving step's attention calls: ``max_request_len`` when given, else the
        padded input's width ``N`` (a static bound); a JaggedBatch without it has none (attention then reads the
        longest request on the host)."""
        if max_request_len is not None:
            if isinstance(max_request_len, bool) or not isinstance(max_request_len, int):
                raise TypeError(f"max_request_len must be an int, got {type(max_request_len).__name__}")
            if max_request_len < 1:
                raise ValueError(f"max_request_len must be >= 1, got {max_request_len}")
            return max_request_len
        if isinstance(request_items, torch.Tensor) and request_items.dim() == 2 and request_items.shape[1]:
            return int(request_items.shape[1])
        return None

    def encode_history(self, items, timestamps=None, lengths=None, *, method: str = "none", budget=None,
                       seed: int = 0, return_stats: bool = False, stats_window: Optional[int] = None,
                       capacity: Optional[int] = None, **params):
        """Encode each user's history once: one ``KVCache`` per layer (``[B, cache_heads, C, cache_dim]``).

        items/timestamps/lengths: padded ``[B, N]`` (or a JaggedBatch); empty histories give ``length 0``.
        The caches are full precision in the model's dtype with ORIGINAL positions (0-based), timestamps (when
        given), counts (learned sequence compression) and ``original_length`` = history length. ``method`` (with
        ``budget``, ``seed`` and method ``params``) further compresses every layer via ``malloc_kernels.compress``,
        keeping ``original_length``. ``return_stats`` also returns the per-layer ``AttentionStats`` of the
        history's own causal attention (for attention-scored policies), as ``(caches, stats)``. ``capacity``
        (an int): every layer's cache is ``reserve``d to that many entries per (user, head), for
        ``serve_step(..., in_place=True)``.
        """
        if capacity is not None and self.cfg.seq_compress is not None:
            raise ValueError(f"capacity: a {self.cfg.seq_compress} model's cache does not grow by append, so it "
                             f"has no reserved capacity")
        items, ts, offsets = _as_jagged(items, timestamps, lengths, what="history items")
        self._check_serve_len(offsets, "history items")
        _, local = _user_index(offsets, items.numel())
        # the attention-scored policies (H2O, SnapKV, PyramidKV, ...) take their scores from these statistics
        need_stats = return_stats or method != "none"
        _, kvs, stats = self._run_native(self.embed(items, local), offsets, local, ts, collect=True,
                                         return_stats=need_stats, stats_window=stats_window)
        caches = self._history_caches(kvs, offsets, local, ts)
        caches = self.compress_caches(caches, method, budget=budget, stats=stats, seed=seed, **params)
        if capacity is not None:
            caches = [c.reserve(capacity) for c in caches]
        return (caches, stats) if return_stats else caches

    def compress_caches(self, caches: Sequence[KVCache], method: str, *, budget=None, stats=None, seed: int = 0,
                        **params) -> List[KVCache]:
        """Compress each layer's cache with ``malloc_kernels.compress`` and the layer's context: ``layer``,
        ``num_layers`` (PyramidKV's per-layer budgets), the attention ``kind`` and ``scale``, and the layer's
        attention statistics ``stats[layer]`` when given. ``original_length`` (the history length) is kept.
        The one per-layer loop of the models and the evaluation harness."""
        if method == "none":
            return list(caches)
        if self.lsh is not None:
            raise ValueError(f"method: a reformer model's LSH caches are not compressed further, got {method!r}")
        kind = "hstu" if self.cfg.arch == "hstu" else "softmax"
        out = []
        for li, c in enumerate(caches):
            cc = compress(c.k, c.v, method, budget=budget, positions=c.position, timestamps=c.timestamp,
                          lengths=c.length[:, 0], counts=c.count, stats=stats[li] if stats else None, seed=seed,
                          layer=li, num_layers=len(caches), kind=kind, scale=self.scale, **params)
            out.append(cc.replace(original_length=c.original_length))
        return out

    def serve(self, request_items, request_timestamps=None, caches: Sequence[KVCache] = (), lengths=None, *,
              return_all: bool = False, max_request_len: Optional[int] = None) -> torch.Tensor:
        """Run the request tokens over per-layer caches; returns each user's last hidden state ``[B, d]``
        (``return_all``: every request token's, jagged ``[T, d]``). Request positions continue after
        ``cache.original_length``; every user needs at least one request token.

        ``max_request_len``: a python int at least every user's request length (1 for a decode step), passed to
        attention as ``max_seqlen_q``; padded ``[B, N]`` input defaults it to ``N``. With it (and a JaggedBatch
        input) the step reads no device data on the host: every check is a device assert (README, "CUDA
        graphs")."""
        if len(caches) != self.cfg.n_layers:
            raise ValueError(f"caches must hold one KVCache per layer ({self.cfg.n_layers}), got {len(caches)}")
        items, ts, offsets = _as_jagged(request_items, request_timestamps, lengths, what="request items")
        B = offsets.numel() - 1
        if caches[0].batch_size != B:
            raise ValueError(f"caches hold {caches[0].batch_size} users but the request has {B}")
        self._check_nonempty(offsets)
        if (ts is None) != (caches[0].timestamp is None) and self.cfg.arch == "hstu":
            raise ValueError("request timestamps must be given exactly when the caches carry timestamps")
        self._check_serve_len(offsets, "history + request", caches[0].original_length.to(torch.int64))
        uid, local = _user_index(offsets, items.numel())
        positions = caches[0].original_length.to(torch.int64)[uid] + local
        x = self._run_cached(self.embed(items, positions), offsets, positions, ts, caches,
                             max_seqlen=self._request_bound(request_items, max_request_len))
        h = self.final_norm(x)
        return h if return_all else h[offsets[1:] - 1]

    def serve_step(self, request_items, request_timestamps=None, caches: Sequence[KVCache] = (), lengths=None, *,
                   max_request_len: Optional[int] = None, in_place: bool = False):
        """One online request: serve the request tokens over per-layer caches and grow the caches by them.

        Returns ``(hidden [B, d], caches)``: each user's last hidden state (as ``serve``) and every layer's cache
        with the request's own keys/values appended (``KVCache.append``: original positions continue
        ``original_length``, the cache's policy keeps it within budget). Scoring policies get the statistics of
        this very attention call (``return_stats``, with the window their policy needs), so no extra pass runs.
        Models with learned sequence compression cache learned slots, not tokens, and cannot append.
        ``max_request_len`` as in ``serve``: the model's part of the step (checks, embedding, attention) then reads
        no device data on the host. ``in_place=True`` grows every layer's cache in place
        (``KVCache.append(..., in_place=True)``: caches with reserved capacity, ``encode_history(...,
        capacity=)`` or ``cache.reserve``; the uncompressed or a per-token precision policy) and returns the same
        cache objects: the whole step, attention and append, then reads nothing on the host and allocates nothing
        sized by data, so a CUDA graph can capture it (README, "Jagged calls and CUDA graphs"). It needs the
        static bound (``max_request_len``, or a padded ``[B, N]`` request). Without it each layer's functional
        append reads the grown capacity on the host and allocates new buffers.
        """
        from ..policies.online import serving_stats_request
        if self.cfg.seq_compress is not None:
            raise ValueError(f"serve_step: a {self.cfg.seq_compress} model's cache does not grow by append "
                             f"(learned slots, or LSH bucket ids); re-encode instead")
        if len(caches) != self.cfg.n_layers:
            raise ValueError(f"caches must hold one KVCache per layer ({self.cfg.n_layers}), got {len(caches)}")
        items, ts, offsets = _as_jagged(request_items, request_timestamps, lengths, what="request items")
        B = offsets.numel() - 1
        if caches[0].batch_size != B:
            raise ValueError(f"caches hold {caches[0].batch_size} users but the request has {B}")
        self._check_nonempty(offsets)
        self._check_serve_len(offsets, "history + request", caches[0].original_length.to(torch.int64))
        bound = self._request_bound(request_items, max_request_len)
        if not isinstance(in_place, bool):
            raise TypeError(f"in_place must be a bool, got {type(in_place).__name__}")
        if in_place:
            if bound is None:
                raise ValueError("in_place=True needs max_request_len (the static bound the new entries are padded "
                                 "to; without it the longest request is read on the host)")
            _check_unshared(caches)
        uid, local = _user_index(offsets, items.numel())
        positions = caches[0].original_length.to(torch.int64)[uid] + local
        x = self.embed(items, positions)

        def pad(t):  # jagged -> [B, L(, ...)] at the static bound: append then reads no offsets on the host
            return jagged_to_padded(t, offsets, max_len=bound, check=False)[0]
        n_new = (offsets[1:] - offsets[:-1]).to(torch.int64)
        grown = []
        for li, layer in enumerate(self.layers):
            p = layer.project(x)
            q, k, v = layer.cached(p)
            need, window = serving_stats_request(caches[li])
            a = self._attend(li, q, k, v, offsets, positions, ts, cache=caches[li], return_stats=need,
                             stats_window=window, max_seqlen=bound)
            stats = None
            if need:
                a, stats = a.output, a.stats
            grown.append(caches[li].append(pad(k), pad(v), positions=pad(positions),
                                           timestamps=None if ts is None else pad(ts), lengths=n_new, stats=stats,
                                           in_place=in_place))
            x = layer.finish(x, a, p, cached=True)
        h = self.final_norm(x)
        return h[offsets[1:] - 1], grown

    # ---- scoring and losses -----------------------------------------------------------------------------------
    def _normed(self, x):
        return F.normalize(x, dim=-1) if self.cfg.similarity == "cosine" else x

    def score_all_items(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores ``[B, n_items + 1]`` of every item for hidden states ``[B, d]``; column 0 (padding) is -inf."""
        s = self._normed(hidden) @ self._normed(self.item_emb.weight).t() / self.cfg.temperature
        s[:, 0] = float("-inf")
        return s

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor, *, num_negatives: int = 128,
             full_softmax: bool = False, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Next-item loss over tokens with a target (> 0).

        Sampled softmax: ``num_negatives`` items drawn uniformly from ``1..n_items`` and shared by the batch;
        logits ``sim(h, e) / temperature`` of [target, negatives], a negative equal to the target is masked out;
        cross-entropy with the target as class 0. ``full_softmax``: cross-entropy over all items.
        """
        valid = targets > 0
        h, t = hidden[valid], targets[valid]
        if h.shape[0] == 0:
            return hidden.sum() * 0.0
        if full_softmax:
            # temperature folded into the (small) item matrix and padding row 0 left out of it; the chunked fused
            # loss never materialises the [tokens, n_items] logits or their gradient (malloc_kernels.loss)
            items = self._normed(self.item_emb.weight[1:]) / self.cfg.temperature
            return linear_cross_entropy(self._normed(h), items, t - 1)
        negs = torch.randint(1, self.cfg.n_items + 1, (num_negatives,), generator=generator)
        hn = self._normed(h)
        pos = (hn * self._normed(self.item_emb(t))).sum(-1, keepdim=True)
        neg = hn @ self._normed(self.item_emb(negs)).t()
        neg = neg.masked_fill(negs[None, :] == t[:, None], float("-inf"))
        logits = torch.cat([pos, neg], 1) / self.cfg.temperature
        return F.cross_entropy(logits, torch.zeros(h.shape[0], dtype=torch.int64))


def HSTU(n_items: int, **kw) -> SequentialRecommender:
    """HSTU recommender (``ModelConfig(arch="hstu", ...)``)."""
    return SequentialRecommender(ModelConfig(arch="hstu", n_items=n_items, **kw))


def SASRec(n_items: int, **kw) -> SequentialRecommender:
    """SASRec recommender (``ModelConfig(arch="sasrec", ...)``)."""
    return SequentialRecommender(ModelConfig(arch="sasrec", n_items=n_items, **kw))
