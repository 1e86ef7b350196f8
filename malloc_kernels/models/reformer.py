"""Reformer's LSH attention (Kitaev et al. 2020, "Reformer: The Efficient Transformer", arXiv 2001.04451) as a
sequence-level variant of HSTU and SASRec (``ModelConfig(seq_compress="reformer")``).

Semantics (the same in training, history encoding, cached serving and the float64 oracle ``lsh_attention_dense``):

* Shared-QK: every head's keys are its normalised queries, ``k_i = q_i / ||q_i||`` (the layer's own key projection
  is not used). Values are the layer's ordinary values. Query head h reads key head h, so the variant needs
  ``heads="mha"`` (GQA/MQA/MLA would tie several query heads to one key head, which shared-QK cannot).
* Angular LSH: per (layer, head, hash round r) a seeded random Gaussian matrix ``R [D, n_buckets / 2]`` (buffer
  ``rotations``, drawn from ``lsh_seed``, saved with the model); ``bucket_r(x) = argmax([x R, -x R])``. Because the
  argmax is invariant to a positive scale, a query and its own key share every bucket.
* Query i attends to the tokens j it may see (causal: j <= i; a history entry always precedes the request) that
  share a bucket with it in at least one of the ``lsh_hashes`` rounds (the union over rounds, each key counted once).
  A query always sees itself. Unlike the paper, self-attention is kept (HSTU's pointwise attention has no reason
  to drop it, and the attention kernels have no "all but self" mask).
* HSTU's pointwise normalisation under bucketing: ``n_i`` = the number of original tokens query i may see in its
  buckets (itself included), i.e. ``o_i = (1/n_i) sum_{j in S_i} silu(s_ij) v_j`` with ``n_i = |S_i|``.
  SASRec's softmax runs over ``S_i``. HSTU's relative position/time bias uses the tokens' original positions.

Paths (all through ``malloc_kernels.attention``):

* one hash round, self-attention (training, history encoding, full recompute): the tokens of every (user, head,
  bucket) are gathered into one jagged segment in time order, so causal attention inside a segment IS the
  bucketed attention; the segments run as ``[S, 1, D]`` jagged self-attention (the C++ training kernels under
  autograd, the CPU inference kernel otherwise).
* several rounds, self-attention: the dense reference with a boolean bucket mask (``lsh_attention_dense``).
* cached serving, one round, CPU tensors without autograd: the C++ kernel of its own, ``lsh_attention_fused``
  (``torch.ops.malloc_kernels.lsh_attention_cpu``, ``csrc/cpu/lsh_attention.cpp``): each query tests the stored
  bucket ids and reads only its bucket's entries, no gather (faster than the gather paths and than the unbucketed
  kernel, ``benchmarks/results/reformer_serving.md``). Otherwise, one round: per (user, head, bucket) the cache
  entries in that bucket are gathered into a one-head pseudo-cache and the request tokens in that bucket attend to
  it and causally to each other: a gather + ``malloc_kernels.attention``. Several rounds: per (request token, head), the cache
  entries and earlier request tokens sharing any of its buckets are gathered into a pseudo-cache of that query.

The cache (``LSHCache``) is the ordinary full-precision ``KVCache`` of the history's (normalised key, value) entries
plus every entry's bucket ids (uint8 ``[B, H, C, lsh_hashes]``), counted in ``nbytes_per_user`` and written by
``to_bytes`` (read back by ``lsh_cache_from_bytes``). The variant keeps every entry: it saves attention work per
request (about ``1 / n_buckets`` of the entries per round), not bytes.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..cache.serialize import cache_from_bytes
from ..cache.types import KVCache
from ..core import extension
from ..core.layout import jagged_to_padded, padded_to_jagged
from ..core.time_buckets import kernel_thresholds
from ..ops.attention import attention

BUCKET_DTYPE = torch.uint8
MAX_BUCKETS = 256            # bucket ids are stored as uint8


def _offsets(lens: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(lens.numel() + 1, dtype=torch.int64, device=lens.device)
    torch.cumsum(lens.to(torch.int64), 0, out=out[1:])
    return out


def _user_of(offsets: torch.Tensor, total: int):
    lens = offsets[1:] - offsets[:-1]
    uid = torch.repeat_interleave(torch.arange(lens.numel(), device=offsets.device), lens, output_size=total)
    return uid, torch.arange(total, device=offsets.device) - offsets[uid]


def shared_keys(q: torch.Tensor) -> torch.Tensor:
    """Shared-QK keys: the queries normalised to unit length (a zero query gives a zero key)."""
    return F.normalize(q, dim=-1)


def lsh_buckets(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Angular LSH bucket ids of ``x [T, H, D]`` under ``rotations [H, R, D, n_buckets / 2]``: uint8 ``[T, H, R]``,
    ``argmax([x R, -x R])`` per (token, head, round) (ties to the lowest id). Computed in float64, so a token's
    bucket depends on its own vector only (not on the batch it was computed in, nor on padding)."""
    if x.dim() != 3 or rotations.dim() != 4 or x.shape[1] != rotations.shape[0] or x.shape[2] != rotations.shape[2]:
        raise ValueError(f"x [T, H, D] and rotations [H, R, D, n_buckets/2] disagree: {tuple(x.shape)} vs "
                         f"{tuple(rotations.shape)}")
    proj = torch.einsum("thd,hrdk->thrk", x.detach().double(), rotations.double())
    return torch.cat([proj, -proj], dim=-1).argmax(dim=-1).to(BUCKET_DTYPE)


def make_rotations(n_layers: int, n_heads: int, head_dim: int, n_buckets: int, n_hashes: int,
                   seed: int) -> torch.Tensor:
    """The seeded random rotations of every layer: float64 ``[L, H, R, D, n_buckets / 2]``."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(n_layers, n_heads, n_hashes, head_dim, n_buckets // 2, generator=g, dtype=torch.float64)


# ---- the cache --------------------------------------------------------------------------------------------------
_MAGIC = b"MKLSH"
_VERSION = 1
_HEADER = struct.Struct("<5sBHBI")   # magic, version, n_buckets, n_hashes, bytes of the KVCache blob
LSH_FRAMING_BYTES = _HEADER.size + 4  # + CRC32 of everything before it (the KVCache blob has its own framing)


@dataclass
class LSHCache:
    """One layer's Reformer cache: the full-precision ``KVCache`` ``kv`` of (normalised key, value) entries and the
    entries' bucket ids ``bucket`` (uint8 ``[B, H, C, n_hashes]``, 0 on padding) under ``n_buckets`` buckets.
    ``malloc_kernels.attention`` does not take it (it would ignore the buckets): the model serves it."""

    kv: KVCache
    bucket: torch.Tensor
    n_buckets: int

    def __post_init__(self):
        if not isinstance(self.kv, KVCache):
            raise TypeError(f"kv must be a KVCache, got {type(self.kv).__name__}")
        if not isinstance(self.bucket, torch.Tensor) or self.bucket.dtype != BUCKET_DTYPE:
            raise TypeError(f"bucket must be a uint8 tensor, got {getattr(self.bucket, 'dtype', type(self.bucket))}")
        B, H, C = self.kv.position.shape
        if self.bucket.dim() != 4 or tuple(self.bucket.shape[:3]) != (B, H, C) or self.bucket.shape[3] < 1:
            raise ValueError(f"bucket must be [B, H, C, n_hashes] with [B, H, C]={[B, H, C]}, got "
                             f"{tuple(self.bucket.shape)}")
        if isinstance(self.n_buckets, bool) or not isinstance(self.n_buckets, int) or \
                not 2 <= self.n_buckets <= MAX_BUCKETS or self.n_buckets % 2:
            raise ValueError(f"n_buckets must be an even int in [2, {MAX_BUCKETS}], got {self.n_buckets!r}")
        if self.kv.is_quantized or self.kv.residual is not None:
            raise ValueError("kv must be a full-precision cache without a residual segment")

    # the fields the models and the harness read off a cache
    @property
    def batch_size(self) -> int:
        return self.kv.batch_size

    @property
    def n_hashes(self) -> int:
        return self.bucket.shape[3]

    @property
    def length(self):
        return self.kv.length

    @property
    def residual(self):
        return None

    @property
    def timestamp(self):
        return self.kv.timestamp

    @property
    def original_length(self):
        return self.kv.original_length

    def nbytes_per_user(self) -> torch.Tensor:
        """int64 ``[B]``: the KVCache's bytes plus one byte per (valid entry, kv head, hash round) of bucket ids."""
        return self.kv.nbytes_per_user() + self.kv.length.to(torch.int64).sum(1) * self.n_hashes

    def to_bytes(self, user_index: int) -> bytes:
        """User ``user_index``'s entries and bucket ids, versioned and CRC-checked (``lsh_cache_from_bytes``);
        ``len(to_bytes(u)) == nbytes_per_user()[u] + wire framing + LSH_FRAMING_BYTES``."""
        if isinstance(user_index, bool) or not isinstance(user_index, int) or \
                not 0 <= user_index < self.batch_size:
            raise ValueError(f"user_index must be an int in [0, {self.batch_size}), got {user_index!r}")
        blob = self.kv.to_bytes(user_index)
        ids = b"".join(self.bucket[user_index, h, :int(n)].contiguous().cpu().numpy().tobytes()
                       for h, n in enumerate(self.kv.length[user_index].tolist()))
        body = _HEADER.pack(_MAGIC, _VERSION, self.n_buckets, self.n_hashes, len(blob)) + blob + ids
        return body + struct.pack("<I", zlib.crc32(body))


def lsh_cache_from_bytes(b, device=None) -> LSHCache:
    """Read ``LSHCache.to_bytes``; a truncated, corrupted or foreign buffer raises ValueError naming the field."""
    if not isinstance(b, (bytes, bytearray, memoryview)):
        raise TypeError(f"b must be bytes, got {type(b).__name__}")
    b = bytes(b)
    if len(b) < LSH_FRAMING_BYTES:
        raise ValueError(f"b: {len(b)} bytes is shorter than the LSH cache framing ({LSH_FRAMING_BYTES})")
    if struct.unpack("<I", b[-4:])[0] != zlib.crc32(b[:-4]):
        raise ValueError("b: CRC32 mismatch (corrupted LSH cache)")
    magic, version, n_buckets, n_hashes, nblob = _HEADER.unpack_from(b, 0)
    if magic != _MAGIC:
        raise ValueError(f"b: magic {magic!r} is not an LSH cache's {_MAGIC!r}")
    if version != _VERSION:
        raise ValueError(f"b: version {version} is not supported (expected {_VERSION})")
    start = _HEADER.size
    kv = cache_from_bytes(b[start:start + nblob], device=device)
    ids = b[start + nblob:-4]
    lens = kv.length[0].tolist()
    if len(ids) != sum(lens) * n_hashes:
        raise ValueError(f"b: {len(ids)} bytes of bucket ids, expected {sum(lens) * n_hashes}")
    H, C = kv.position.shape[1:]
    bucket = torch.zeros(1, H, C, n_hashes, dtype=BUCKET_DTYPE)
    flat = torch.tensor(list(ids), dtype=BUCKET_DTYPE)
    pos = 0
    for h, n in enumerate(lens):
        bucket[0, h, :n] = flat[pos:pos + n * n_hashes].reshape(n, n_hashes)
        pos += n * n_hashes
    if bucket.numel() and int(bucket.max()) >= n_buckets:
        raise ValueError(f"b: a bucket id >= n_buckets ({n_buckets})")
    return LSHCache(kv=kv, bucket=bucket.to(kv.k.device), n_buckets=n_buckets)


# ---- attention under bucketing ----------------------------------------------------------------------------------
def lsh_attention_dense(q, k, v, buckets, offsets, positions, timestamps=None, *, kind, scale, pos_bias=None,
                        time_bias=None, backend="reference"):
    """Bucketed causal self-attention of jagged ``q, k, v [T, H, D]`` (``buckets [T, H, R]``) as one dense call with
    a boolean mask "shares a bucket in some round" (the padded keys masked out too): the oracle of the module's
    semantics, and the model's path for several hash rounds. Returns ``[T, H, D]``."""
    if q.shape[0] == 0:
        return torch.zeros_like(q)
    qp, lens = jagged_to_padded(q, offsets)
    kp, _ = jagged_to_padded(k, offsets)
    vp, _ = jagged_to_padded(v, offsets)
    bp, _ = jagged_to_padded(buckets, offsets)                                   # [B, H, N, R]
    N = qp.shape[2]
    valid = torch.arange(N, device=q.device)[None, :] < lens.to(q.device)[:, None]        # [B, N]
    same = (bp[:, :, :, None, :] == bp[:, :, None, :, :]).any(-1)                # [B, H, N, N]
    mask = same & valid[:, None, None, :]
    pos = jagged_to_padded(positions, offsets)[0].to(torch.int64)
    kw = {}
    if pos_bias is not None:
        kw["pos_bias"] = pos_bias
    if time_bias is not None and timestamps is not None:
        kw.update(time_bias=time_bias, query_timestamps=jagged_to_padded(timestamps, offsets)[0].to(torch.int64))
    out = attention(qp, kp, vp, attn_mask=mask, is_causal=True, scale=scale, kind=kind, query_positions=pos,
                    hstu_norm="kept", backend=backend, **kw)
    return padded_to_jagged(out, lens)


def _segments(buckets, offsets, T: int, H: int):
    """The (user, head, bucket) segment order of the ``T * H`` rows ``t * H + h`` (one round): ``order`` (by segment,
    then by time), the segment keys ``uniq`` (``(user * H + head) * MAX_BUCKETS + bucket``) and their sizes."""
    uid, _ = _user_of(offsets, T)
    heads = torch.arange(H, device=buckets.device)
    seg = ((uid[:, None] * H + heads[None, :]) * MAX_BUCKETS + buckets[..., 0].long()).reshape(-1)
    order = torch.argsort(seg, stable=True)            # row t*H+h grows with t: stable keeps time order
    uniq, counts = torch.unique_consecutive(seg[order], return_counts=True)
    return order, uniq, counts


def _by_segment(x, order, T: int, H: int):
    """Rows ``[T, H, ...]`` -> one-head rows in segment order ``[T * H, 1, ...]`` (``[T]`` per-token values are
    repeated per head)."""
    if x.dim() == 1:
        return x.repeat_interleave(H)[order]
    return x.reshape(T * H, 1, *x.shape[2:])[order]


def _unsort(out, order, T: int, H: int):
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return out[inverse].reshape(T, H, out.shape[-1])


def lsh_attention_segments(attend, q, k, v, buckets, offsets, positions, timestamps=None):
    """One hash round: bucketed causal self-attention as jagged causal attention over (user, head, bucket)
    segments. ``attend(q, k, v, offsets, positions, timestamps)`` runs ``malloc_kernels.attention`` on one-head
    jagged tokens ``[S, 1, D]`` (causal, the layer's kind / scale / bias). Returns ``[T, H, D]``."""
    T, H, _ = q.shape
    if T == 0:
        return torch.zeros_like(q)
    order, _, counts = _segments(buckets, offsets, T, H)

    def rows(x):
        return None if x is None else _by_segment(x, order, T, H)
    out = attend(rows(q), rows(k), rows(v), _offsets(counts), rows(positions), rows(timestamps))   # [T*H, 1, D]
    return _unsort(out, order, T, H)


def _matching_slots(match: torch.Tensor):
    """For a boolean ``[S, N]``: per row the indices of its True entries in order, padded to the longest row
    (``[S, width]``, width >= 1; padding slots hold 0), and the counts ``[S]``. A cumsum + scatter, no sort."""
    n = match.sum(1)
    width = max(int(n.max()), 1) if n.numel() else 1
    rank = torch.cumsum(match, 1) - 1
    slot = torch.where(match, rank, torch.full_like(rank, width))        # non-matching entries -> a dropped column
    idx = torch.zeros(match.shape[0], width + 1, dtype=torch.int64, device=match.device)
    src = torch.arange(match.shape[1], device=match.device).expand_as(match)
    return idx.scatter_(1, slot, src)[:, :width], n


def _gather_rows(table: torch.Tensor, bi: torch.Tensor, hi: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``table[bi, hi, idx]`` for a ``[B, H, N, ...]`` table, row indices ``bi, hi [S]`` and ``idx [S, W]``, as one
    ``index_select`` over the flattened rows (much faster than advanced indexing with three index tensors);
    returns ``[S, 1, W, ...]`` (a one-head pseudo-cache's layout)."""
    B, H, N = table.shape[:3]
    flat = ((bi * H + hi) * N)[:, None] + idx
    rows = table.reshape(B * H * N, *table.shape[3:]).index_select(0, flat.reshape(-1))
    return rows.reshape(idx.shape[0], 1, idx.shape[1], *table.shape[3:])


def _segment_cache(cache: LSHCache, seg_user, seg_head, seg_bucket) -> KVCache:
    """The one-head pseudo-cache of every (user, head, bucket) segment: the cache entries of that user and head in
    that bucket (round 0), gathered in time order; ``original_length`` = their number."""
    kv = cache.kv
    C, D = kv.position.shape[2], kv.k.shape[-1]
    j = torch.arange(C, device=kv.k.device)
    match = (cache.bucket[seg_user, seg_head, :, 0] == seg_bucket[:, None].to(BUCKET_DTYPE)) & \
        (j[None, :] < kv.length.to(torch.int64)[seg_user, seg_head][:, None])           # [S, C]
    idx, n = _matching_slots(match)

    def g(t):
        return _gather_rows(t, seg_user, seg_head, idx)
    return KVCache(k=g(kv.k), v=g(kv.v), length=n.to(torch.int32)[:, None].contiguous(), position=g(kv.position),
                   original_length=n.to(torch.int32), head_dim=D,
                   timestamp=None if kv.timestamp is None else g(kv.timestamp))


def lsh_attention_cached_segments(attend, q, k, v, buckets, offsets, positions, timestamps, cache: LSHCache):
    """One hash round: the request tokens of every (user, head, bucket) become one jagged causal request over the
    pseudo-cache of that segment's cache entries (``_segment_cache``), so every cache entry is gathered at most once
    per request batch. Same arguments and result as ``lsh_attention_cached``."""
    T, H, _ = q.shape
    if timestamps is not None and cache.kv.timestamp is None:
        raise ValueError("timestamps given but the cache carries none")
    order, uniq, counts = _segments(buckets, offsets, T, H)
    pseudo = _segment_cache(cache, uniq // (H * MAX_BUCKETS), (uniq // MAX_BUCKETS) % H, uniq % MAX_BUCKETS)

    def rows(x):
        return None if x is None else _by_segment(x, order, T, H)
    out = attend(rows(q), rows(k), rows(v), _offsets(counts), rows(positions), rows(timestamps), pseudo)
    return _unsort(out, order, T, H)


def lsh_attention_cached(attend, q, k, v, buckets, offsets, positions, timestamps, cache: LSHCache):
    """Request tokens ``q, k, v [T, H, D]`` (``buckets [T, H, R]``, jagged by ``offsets``) over an ``LSHCache``:
    with several hash rounds every (token, head) becomes a one-query "user" whose pseudo-cache holds the cache entries and the earlier
    request tokens of its user and head that share a bucket with it (gathered, in time order; ``original_length``
    = their number, so HSTU's ``n_i`` counts exactly the tokens it may see) and which attends to that plus itself.
    ``attend(q, k, v, offsets, positions, timestamps, cache)`` runs ``malloc_kernels.attention``. Returns
    ``[T, H, D]``. One round takes ``lsh_attention_cached_segments`` (fewer, larger gathers)."""
    T, H, D = q.shape
    if T == 0:
        return torch.zeros_like(q)
    kv = cache.kv
    B, Hc, C = kv.position.shape
    if Hc != H or buckets.shape[2] != cache.n_hashes:
        raise ValueError(f"cache has {Hc} heads x {cache.n_hashes} hash rounds, the request {H} x "
                         f"{buckets.shape[2]}")
    if cache.n_hashes == 1:
        return lsh_attention_cached_segments(attend, q, k, v, buckets, offsets, positions, timestamps, cache)
    uid, local = _user_of(offsets, T)
    rk, _ = jagged_to_padded(k, offsets)                                          # [B, H, Rm, D]
    Rm = rk.shape[2]
    rv, _ = jagged_to_padded(v, offsets)
    rb, _ = jagged_to_padded(buckets, offsets)                                    # [B, H, Rm, R]
    rpos = jagged_to_padded(positions, offsets)[0].to(torch.int32)[:, None].expand(B, H, Rm)
    all_k = torch.cat([kv.k.to(q.dtype), rk], 2)
    all_v = torch.cat([kv.v.to(q.dtype), rv], 2)
    all_b = torch.cat([cache.bucket, rb], 2)                                      # [B, H, C+Rm, R]
    all_pos = torch.cat([kv.position, rpos], 2)
    all_ts = None
    if timestamps is not None:
        if kv.timestamp is None:
            raise ValueError("timestamps given but the cache carries none")
        rts = jagged_to_padded(timestamps, offsets)[0].to(torch.int64)[:, None].expand(B, H, Rm)
        all_ts = torch.cat([kv.timestamp, rts], 2)
    # rows n = t * H + h: the user and head of every (token, head) query
    b_n = uid.repeat_interleave(H)
    h_n = torch.arange(H, device=q.device).repeat(T)
    j = torch.arange(C + Rm, device=q.device)
    lim = torch.where(j[None, :] < C, kv.length.to(torch.int64)[b_n, h_n][:, None],
                      C + local.repeat_interleave(H)[:, None])                   # cache: j < length; request: earlier
    visible = j[None, :] < lim
    same = (all_b[b_n, h_n] == buckets.reshape(T * H, 1, -1)).any(-1)            # [T*H, C+Rm]
    match = visible & same
    idx, n_vis = _matching_slots(match)                                          # matching entries, in order

    def g(t):
        return _gather_rows(t.contiguous(), b_n, h_n, idx)
    pseudo = KVCache(k=g(all_k), v=g(all_v), length=n_vis.to(torch.int32)[:, None].contiguous(),
                     position=g(all_pos), original_length=n_vis.to(torch.int32), head_dim=D,
                     timestamp=None if all_ts is None else g(all_ts))
    q_off = torch.arange(T * H + 1, device=q.device)
    pos = positions.repeat_interleave(H)
    ts = None if timestamps is None else timestamps.repeat_interleave(H)
    out = attend(q.reshape(T * H, 1, D), k.reshape(T * H, 1, D), v.reshape(T * H, 1, D), q_off, pos, ts, pseudo)
    return out.reshape(T, H, out.shape[-1])


def fused_available() -> bool:
    """Whether the compiled extension has the Reformer serving kernel."""
    return extension.has_op("lsh_attention_cpu")[0]


if fused_available():
    @torch.library.register_fake("malloc_kernels::lsh_attention_cpu")
    def _lsh_attention_cpu_fake(q, k, v, offsets, q_bucket, q_pos, q_ts, cache_k, cache_v, cache_len, cache_bucket,
                                cache_pos, cache_ts, pos_bias, time_bias, thresholds, hstu, scale):
        return q.new_empty(q.shape)


def lsh_attention_fused(q, k, v, buckets, offsets, positions, timestamps, cache: LSHCache, *, kind, scale,
                        pos_bias=None, time_bias=None):
    """One hash round of ``lsh_attention_cached`` in the C++ kernel (CPU, float32/float64, no autograd): the same
    arguments, plus the layer's ``kind``, ``scale`` and bias tables (``pos_bias [P]``; ``time_bias`` used when
    ``timestamps`` are given, as in the model's attention call)."""
    if cache.n_hashes != 1 or buckets.shape[2] != 1:
        raise ValueError(f"the fused kernel takes one hash round, got {cache.n_hashes}")
    if kind not in ("hstu", "softmax"):
        raise ValueError(f"kind must be 'hstu' or 'softmax', got {kind!r}")
    kv = cache.kv
    use_time = time_bias is not None and timestamps is not None
    if use_time and kv.timestamp is None:
        raise ValueError("timestamps given but the cache carries none")
    return torch.ops.malloc_kernels.lsh_attention_cpu(
        q, k, v, offsets.to(torch.int64), buckets[..., 0].contiguous(), positions.to(torch.int64),
        timestamps.to(torch.int64) if use_time else None, kv.k.to(q.dtype), kv.v.to(q.dtype), kv.length,
        cache.bucket[..., 0].contiguous(), kv.position, kv.timestamp if use_time else None,
        None if pos_bias is None else pos_bias.detach().to(torch.float32).reshape(-1),
        time_bias.detach().to(torch.float32).reshape(-1) if use_time else None,
        kernel_thresholds(int(time_bias.shape[-1])) if use_time else None, kind == "hstu", float(scale))


class LSHAttention(nn.Module):
    """The per-model Reformer state: the seeded rotations of every layer (buffer ``rotations``) and the three
    attention paths of the module docstring, wired to the model's ``malloc_kernels.attention`` call."""

    def __init__(self, n_layers: int, n_heads: int, head_dim: int, n_buckets: int, n_hashes: int, seed: int):
        super().__init__()
        self.n_buckets, self.n_hashes = n_buckets, n_hashes
        self.register_buffer("rotations", make_rotations(n_layers, n_heads, head_dim, n_buckets, n_hashes, seed)
                             .to(torch.get_default_dtype()))

    def buckets(self, layer: int, k: torch.Tensor) -> torch.Tensor:
        return lsh_buckets(k, self.rotations[layer])

    def self_attention(self, model, layer: int, q, v, offsets, positions, timestamps):
        """Bucketed causal self-attention of one layer; returns ``(output [T, H, D], shared keys [T, H, D])``."""
        k = shared_keys(q)
        b = self.buckets(layer, k)
        if self.n_hashes == 1:
            def attend(qs, ks, vs, off, pos, ts):
                return model._attend(layer, qs, ks, vs, off, pos, ts)
            return lsh_attention_segments(attend, q, k, v, b, offsets, positions, timestamps), k
        lay = model.layers[layer]
        out = lsh_attention_dense(q, k, v, b, offsets, positions, timestamps, kind=lay.kind, scale=model.scale,
                                  pos_bias=lay.pos_bias, time_bias=lay.time_bias)
        return out, k

    def cached_attention(self, model, layer: int, q, v, offsets, positions, timestamps, cache: LSHCache):
        if not isinstance(cache, LSHCache):
            raise TypeError(f"a reformer model serves LSHCache caches, got {type(cache).__name__}")
        k = shared_keys(q)
        b = self.buckets(layer, k)
        lay = model.layers[layer]
        grads = torch.is_grad_enabled() and (q.requires_grad or v.requires_grad)
        if self.n_hashes == 1 and model.backend in ("auto", "cpu") and q.device.type == "cpu" and not grads and \
                q.dtype in (torch.float32, torch.float64) and fused_available() and \
                (lay.pos_bias is None or lay.pos_bias.dim() == 1):
            return lsh_attention_fused(q, k, v, b, offsets, positions, timestamps, cache, kind=lay.kind,
                                       scale=model.scale, pos_bias=lay.pos_bias, time_bias=lay.time_bias)

        def attend(qs, ks, vs, off, pos, ts, pseudo):
            return model._attend(layer, qs, ks, vs, off, pos, ts, cache=pseudo)
        return lsh_attention_cached(attend, q, k, v, b, offsets, positions, timestamps, cache)

    def make_cache(self, layer: int, kv: KVCache, k_jagged: torch.Tensor, offsets) -> LSHCache:
        """Wrap a history's KVCache with its entries' bucket ids (from the jagged keys it was built from)."""
        b, _ = jagged_to_padded(self.buckets(layer, k_jagged), offsets, max_len=kv.position.shape[2])
        return LSHCache(kv=kv, bucket=b.contiguous(), n_buckets=self.n_buckets)
