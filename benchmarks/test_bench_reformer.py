"""Reformer serving benchmark: one layer's request attention over an LSH cache (``models/reformer.py``).

Providers, timed interleaved in one process (best of ``ROUNDS``; read the ratios):

* ``fused lsh``: the model's path for one hash round on CPU tensors, the C++ kernel of its own
  (``lsh_attention_fused``, ``csrc/cpu/lsh_attention.cpp``): each query tests the stored bucket ids and reads only
  its bucket's keys and values, no gather;
* ``segments+cpu``: the model's path when the fused kernel cannot run, ``lsh_attention_cached_segments`` -- per (user, head,
  bucket) the cache entries in the bucket are gathered into a one-head pseudo-cache, and the request tokens in the
  bucket attend to it (and causally to each other) in the existing fused C++ kernel
  (``malloc_kernels.attention(backend="cpu")``);
* ``per-query+cpu``: the several-rounds path used with one round -- per (request token, head) its own gathered
  pseudo-cache, the same kernel;
* ``torch-masked``: the plain-PyTorch formulation without a gather: request queries against every cache entry and
  request token, scores masked to the shared buckets (one batched matmul, mask, HSTU's SiLU / n or softmax);
* ``native cpu``: the same request over the whole cache WITHOUT bucketing (the unbucketed model's serving call):
  the work LSH is meant to save.

Shapes: the ML-1M serving batch (128 users, ragged histories 20..200 entries, 8 request tokens, H = 2, D = 32,
4 buckets, 1 round) and long histories (16 users of 2,000 entries, 32 buckets: about 64 entries per bucket, the
paper's chunk size). HSTU kind and softmax, no relative bias (the baselines would need it too). Floor: the bytes
that must be read -- every stored bucket id once, and the keys and values of the entries in some request token's
bucket once per (user, head) -- at the read bandwidth measured in the same run. Run:

    python -m pytest -q benchmarks/test_bench_reformer.py [--save] [--smoke]

``--save`` writes ``benchmarks/results/reformer_serving.{md,json}``.
"""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import malloc_kernels as mk
from malloc_kernels.cache.types import KVCache
from malloc_kernels.core.layout import jagged_to_padded
from malloc_kernels.models import reformer as R

from machine import machine_label  # benchmarks/ is on sys.path under pytest
from roofline import interleaved_best_seconds, measure_read_bandwidth

# (name, users, min history, max history, request, H, D, buckets)
SHAPES = [("ML-1M batch", 128, 20, 200, 8, 2, 32, 4), ("long", 16, 2000, 2000, 8, 2, 32, 32)]
SMOKE_SHAPES = [("smoke", 3, 1, 9, 3, 2, 8, 4)]
ROUNDS = 5
RESULTS = Path(__file__).resolve().parent / "results"

pytestmark = pytest.mark.needs_ext("attention_cpu", "lsh_attention_cpu")


def _problem(users, lo, hi, r, H, D, nb, seed):
    g = torch.Generator().manual_seed(seed)
    hist = torch.randint(lo, hi + 1, (users,), generator=g)
    C = int(hist.max())
    rot = R.make_rotations(1, H, D, nb, 1, seed)[0]
    k = R.shared_keys(torch.randn(users, H, C, D, generator=g))
    v = torch.randn(users, H, C, D, generator=g)
    bucket = R.lsh_buckets(k.transpose(1, 2).reshape(users * C, H, D), rot).reshape(users, C, H, 1)
    valid = torch.arange(C)[None, :] < hist[:, None]
    bucket = (bucket * valid[:, :, None, None]).transpose(1, 2).contiguous()
    pos = torch.arange(C, dtype=torch.int32)[None, None].expand(users, H, C).contiguous()
    kv = KVCache(k=k, v=v, length=hist.to(torch.int32)[:, None].expand(users, H).contiguous(), position=pos,
                 original_length=hist.to(torch.int32), head_dim=D)
    cache = R.LSHCache(kv=kv, bucket=bucket, n_buckets=nb)
    off = torch.arange(users + 1, dtype=torch.int64) * r
    q = torch.randn(users * r, H, D, generator=g)
    rk = R.shared_keys(q)
    rv = torch.randn(users * r, H, D, generator=g)
    qpos = (hist[:, None] + torch.arange(r)[None, :]).reshape(-1)
    return cache, q, rk, rv, R.lsh_buckets(rk, rot), off, qpos


def _gather(path, kind, cache, q, k, v, b, off, pos):
    def attend(qs, ks, vs, o, p, t, pseudo):
        return mk.attention(qs, ks, vs, is_causal=True, kind=kind, offsets=o, query_positions=p, cache=pseudo,
                            backend="cpu")
    if path == "segments":
        return R.lsh_attention_cached_segments(attend, q, k, v, b, off, pos, None, cache)
    # the several-rounds path, forced on a one-round cache by a second round that repeats the first
    two = R.LSHCache(kv=cache.kv, bucket=cache.bucket.expand(*cache.bucket.shape[:3], 2).contiguous(),
                     n_buckets=cache.n_buckets)
    return R.lsh_attention_cached(attend, q, k, v, b.expand(*b.shape[:2], 2), off, pos, None, two)


def _fused(kind, cache, q, k, v, b, off, pos):
    return R.lsh_attention_fused(q, k, v, b, off, pos, None, cache, kind=kind, scale=q.shape[-1] ** -0.5)


def _native(kind, cache, q, k, v, off, pos):
    return mk.attention(q, k, v, is_causal=True, kind=kind, offsets=off, query_positions=pos, cache=cache.kv,
                        backend="cpu")


def _torch_masked(kind, cache, q, k, v, b, off, r):
    """Request queries against all cache entries + request tokens, the scores masked to shared buckets."""
    kv = cache.kv
    B, H, C, D = kv.k.shape
    qp = jagged_to_padded(q, off)[0]                                                   # [B, H, r, D]
    keys = torch.cat([kv.k, jagged_to_padded(k, off)[0]], 2)
    vals = torch.cat([kv.v, jagged_to_padded(v, off)[0]], 2)
    qb = jagged_to_padded(b, off)[0][..., 0]                                           # [B, H, r]
    kb = torch.cat([cache.bucket[..., 0], qb], 2)                                      # [B, H, C + r]
    j = torch.arange(C + r)
    i = torch.arange(r)
    vis = torch.where(j[None, :] < C, j[None, None, :] < kv.length[:, :1, None].long(),
                      (j[None, :] - C <= i[:, None])[None])                            # [B, r, C + r]
    mask = vis[:, None] & (qb[..., :, None] == kb[..., None, :])
    s = torch.einsum("bhid,bhjd->bhij", qp, keys) * D ** -0.5
    if kind == "hstu":
        w = F.silu(s) * mask / mask.sum(-1, keepdim=True).clamp(min=1)
    else:
        w = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)
    return (w @ vals).permute(0, 2, 1, 3).reshape(B * r, H, D)


def test_bench_reformer_serving(benchmark, save_results, smoke):
    torch.set_num_threads(1)                      # the harness serves on one thread; restored by conftest.py
    rounds = 1 if smoke else ROUNDS
    bw = measure_read_bandwidth(32 if smoke else 256)
    rows = []
    for i, (name, users, lo, hi, r, H, D, nb) in enumerate(SMOKE_SHAPES if smoke else SHAPES):
        cache, q, k, v, b, off, pos = _problem(users, lo, hi, r, H, D, nb, seed=i)
        for kind in ("hstu", "softmax"):
            fns = {"fused lsh": lambda: _fused(kind, cache, q, k, v, b, off, pos),
                   "segments+cpu": lambda: _gather("segments", kind, cache, q, k, v, b, off, pos),
                   "per-query+cpu": lambda: _gather("per-query", kind, cache, q, k, v, b, off, pos),
                   "torch-masked": lambda: _torch_masked(kind, cache, q, k, v, b, off, r),
                   "native cpu": lambda: _native(kind, cache, q, k, v, off, pos)}
            ref = fns["torch-masked"]()
            torch.testing.assert_close(fns["fused lsh"](), ref, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(fns["segments+cpu"](), ref, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(fns["per-query+cpu"](), ref, rtol=1e-4, atol=1e-5)
            best = interleaved_best_seconds(fns, rounds)
            C = cache.kv.k.shape[2]
            qb = b[:, :, 0].reshape(users, r, H).transpose(1, 2)                          # [B, H, r]
            same = cache.bucket[..., 0][:, :, None, :] == qb[..., None]                # [B, H, r, C]
            valid = torch.arange(C)[None, None, None, :] < cache.kv.length[:, :, None, None]
            visible = int((same & valid).sum())                                          # (query, entry) pairs
            needed = int((same & valid).any(2).sum())                                    # entries read once
            floor_bytes = cache.bucket.numel() + needed * 2 * D * 4
            rows.append({"shape": name, "kind": kind, "users": users, "entries_per_head": float(
                cache.kv.length.double().mean()), "request": r, "H": H, "D": D, "buckets": nb,
                "visible_fraction": visible / max(1, int(cache.kv.length.sum()) * r),
                **{f"{p}_s": t for p, t in best.items()},
                "floor_s": floor_bytes / (bw * 1e9)})
    cache, q, k, v, b, off, pos = _problem(*(SMOKE_SHAPES if smoke else SHAPES)[0][1:], seed=0)
    benchmark.pedantic(lambda: _fused("hstu", cache, q, k, v, b, off, pos), rounds=1, iterations=1)
    res = {"threads": 1, "machine": machine_label(), "read_gbps": bw, "rows": rows}
    print(json.dumps(res, indent=1))
    if save_results:
        _write(res)


def _write(res):
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "reformer_serving.json").write_text(json.dumps(res, indent=1))
    lines = [
        "# Reformer serving: one layer's request attention over an LSH cache (CPU)", "",
        "Generated by `python -m pytest -q benchmarks/test_bench_reformer.py --save` on "
        f"{res['machine']} (a shared machine: read the ratios), providers interleaved, best of {ROUNDS}; read "
        f"bandwidth measured in the same run: {res['read_gbps']:.1f} GB/s. Floor = every bucket id once + the keys and "
        "values of the entries in some request token's bucket once per (user, head), at that bandwidth. `visible` = "
        "the fraction of the cache entries a query attends (about 1 / buckets). `native cpu, unbucketed` = the same "
        "request over the whole cache without LSH (the work bucketing is meant to save).", "",
        "| shape | kind | users | entries/head | buckets | visible | fused lsh (ms) | segments+cpu (ms) "
        "| per-query+cpu (ms) | torch-masked (ms) | native cpu, unbucketed (ms) | fused vs torch-masked "
        "| fused vs native | floor (ms) | fused: fraction of floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(f"| {r['shape']} | {r['kind']} | {r['users']} | {r['entries_per_head']:.0f} | {r['buckets']} "
                     f"| {r['visible_fraction']:.2f} | {1e3 * r['fused lsh_s']:.2f} | {1e3 * r['segments+cpu_s']:.2f} "
                     f"| {1e3 * r['per-query+cpu_s']:.2f} | {1e3 * r['torch-masked_s']:.2f} "
                     f"| {1e3 * r['native cpu_s']:.2f} | {r['torch-masked_s'] / r['fused lsh_s']:.2f}x "
                     f"| {r['native cpu_s'] / r['fused lsh_s']:.2f}x "
                     f"| {1e3 * r['floor_s']:.3f} | {100 * r['floor_s'] / r['fused lsh_s']:.1f}% |")
    (RESULTS / "reformer_serving.md").write_text("\n".join(lines) + "\n")
