"""Hostile serialised caches: seed blobs, field-by-field mutations and the oracle every probe must satisfy.

Shared by the hypothesis fuzz test (``test_hostile_inputs.py``) and the coverage-guided atheris run
(``fuzz_cache_bytes.py``, bounded, in ``.ci/run``). The oracle for one blob:

* ``cache_from_bytes`` either raises ``ValueError``/``TypeError`` or returns a cache; nothing else (no crash, no
  other exception);
* an accepted cache is consistent (``validate``/``check_contents``), takes at most ``MAX_EXPANSION`` times the blob
  in tensor storage, and serialises back to exactly the same bytes;
* served by every available backend (B = 1, two request tokens, softmax and HSTU with a position/time bias when it
  carries timestamps), each agrees with the reference: same NaN rows, finite values within tolerance.
"""
from __future__ import annotations

import math
import struct
import zlib
from typing import Dict, List, Tuple

import torch

import malloc_kernels as mk
from malloc_kernels.cache.serialize import CRC_BYTES, HEADER_BYTES, MAX_EXPANSION

# byte offset and struct code of each header field ("<4sHHBBBBBBBBIIIQ")
HEADER_FIELDS: Dict[str, Tuple[int, str]] = {
    "version": (4, "<H"), "flags": (6, "<H"), "k_format": (8, "<B"), "v_format": (9, "<B"), "k_axis": (10, "<B"),
    "k_dtype": (11, "<B"), "v_dtype": (12, "<B"), "rk_dtype": (13, "<B"), "rv_dtype": (14, "<B"),
    "reserved": (15, "<B"), "num_kv_heads": (16, "<I"), "head_dim": (20, "<I"), "group_size": (24, "<I"),
    "total_size": (28, "<Q"),
}
EDGE_VALUES = (0, 1, 2, 3, 7, 8, 15, 16, 255, 2 ** 15, 2 ** 16 - 1, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, 10_000)
SERVE_MAX_HEAD_DIM = 512
SERVE_MAX_ENTRIES = 4096


def seed_caches() -> List[mk.KVCache]:
    """A spread of cache forms: float with timestamps/counts, int8/fp8/int4/int2 (token and channel axis), KIVI with
    a residual, a merged hybrid, ragged per-head lengths, odd head dims."""
    g = torch.Generator().manual_seed(0)
    out = []
    for method, D, kw in (("none", 8, {}), ("int8", 16, {}), ("fp8", 8, {}), ("int4", 6, {}), ("int2", 5, {}),
                          ("kivi4", 16, {}), ("kivi2", 8, {}), ("h2o+int4", 8, {"budget": 0.5}),
                          ("tome", 8, {"budget": 0.5}), ("snapkv", 16, {"budget": 0.5})):
        if method == "fp8" and not hasattr(torch, "float8_e4m3fn"):
            continue
        B, H, N = 2, 2, (23 if not method.startswith("kivi") else 75)    # KIVI: past its full-precision window
        k, v = torch.randn(B, H, N, D, generator=g), torch.randn(B, H, N, D, generator=g)
        if method.startswith(("h2o", "snapkv")):
            kw = dict(kw, queries=torch.randn(B, H, N, D, generator=g))             # their attention statistics
        ts = torch.cumsum(torch.randint(1, 10 ** 6, (B, N), generator=g), 1)
        out.append(mk.compress(k, v, method, timestamps=ts, lengths=torch.tensor([N, N - 6]), **kw))
    # ragged per-head lengths, an empty head included (per-head pruning produces them)
    out.append(out[0].replace(length=torch.tensor([[23, 0], [7, 17]], dtype=torch.int32)).validate())
    return out


def seed_blobs() -> List[bytes]:
    return [c.to_bytes(u) for c in seed_caches() for u in range(c.batch_size)]


def with_crc(body: bytes) -> bytes:
    """``body`` (everything before the CRC) + its CRC32: a mutation that a checksum alone cannot catch."""
    return body + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)


def set_field(blob: bytes, field: str, value: int) -> bytes:
    """Blob with header ``field`` set to ``value`` (masked to the field's width) and the CRC recomputed."""
    off, fmt = HEADER_FIELDS[field]
    width = struct.calcsize(fmt)
    b = bytearray(blob[:-CRC_BYTES])
    struct.pack_into(fmt, b, off, value & ((1 << (8 * width)) - 1))
    return with_crc(bytes(b))


def set_body_int32(blob: bytes, index: int, value: int) -> bytes:
    """Blob with the ``index``-th int32 of the body (the per-head lengths come first) set, CRC recomputed."""
    b = bytearray(blob[:-CRC_BYTES])
    off = HEADER_BYTES + 4 * index
    if off + 4 > len(b):
        return blob
    struct.pack_into("<i", b, off, ((value + 2 ** 31) % 2 ** 32) - 2 ** 31)
    return with_crc(bytes(b))


def set_body_byte(blob: bytes, offset: int, value: int) -> bytes:
    b = bytearray(blob[:-CRC_BYTES])
    if HEADER_BYTES <= offset < len(b):
        b[offset] = value & 0xFF
    return with_crc(bytes(b))


def resize_body(blob: bytes, new_len: int) -> bytes:
    """Truncate or zero-extend the body to ``new_len`` bytes, fixing total_size and the CRC (a consistent frame
    around inconsistent contents)."""
    body = bytearray(blob[:-CRC_BYTES][:max(new_len, HEADER_BYTES)])
    body += bytes(max(0, new_len - len(body)))
    struct.pack_into("<Q", body, 28, len(body) + CRC_BYTES)
    return with_crc(bytes(body))


def storage_bytes(cache: mk.KVCache) -> int:
    total = 0
    for f in mk.KVCache._TENSOR_FIELDS:
        t = getattr(cache, f)
        if isinstance(t, torch.Tensor):
            total += t.untyped_storage().nbytes()
        elif isinstance(t, mk.KVCache):
            total += storage_bytes(t)
    return total


# float32's largest finite value is 3.4e38; 1e30 leaves room for a head dim of 256 and |q| ~ 10 before overflow.
FP32_EDGE = 1e30


GPU_BACKENDS = ("cuda", "triton")


def device_of(backend: str) -> torch.device:
    """Where ``backend`` takes its inputs: the GPU backends on the GPU when there is one (Triton without a GPU runs
    CPU tensors through its interpreter; the cuda backend is then unavailable)."""
    return torch.device("cuda" if backend in GPU_BACKENDS and torch.cuda.is_available() else "cpu")


def cache_to(cache, device):
    """The cache (and its residual) with every tensor on ``device``; None stays None."""
    if cache is None:
        return None
    import dataclasses

    changes = {}
    for f in mk.KVCache._TENSOR_FIELDS:
        t = getattr(cache, f)
        if t is not None:
            changes[f] = cache_to(t, device) if isinstance(t, mk.KVCache) else t.to(device)
    return dataclasses.replace(cache, **changes)


def result_to(res, device):
    """An ``AttentionResult`` with output and lse on ``device`` (stats are not compared here)."""
    return res._replace(output=res.output.to(device), lse=None if res.lse is None else res.lse.to(device))


def attention_on(backend: str, q, k, v, cache=None, **kw):
    """``mk.attention`` on ``backend`` with every tensor input on that backend's device, the result on the CPU."""
    dev = device_of(backend)
    kw = {n: (x.to(dev) if isinstance(x, torch.Tensor) else x) for n, x in kw.items()}
    out = mk.attention(q.to(dev), k.to(dev), v.to(dev), cache=cache_to(cache, dev), backend=backend, **kw)
    return out.to("cpu") if isinstance(out, torch.Tensor) else result_to(out, "cpu")


def _score_rounding(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    cache: mk.KVCache) -> Tuple[float, float, float]:
    """``(e, v_max, mass)``: a bound ``e`` on the float32 rounding error of any one attention score of the call,
    the largest |value| an output row can weight, and the sum of the valid entries' counts (merged entries count
    as many; the request's two keys count 1 each). A D-term dot product in any order errs by at most (D + 1) u
    sum_d |q_d k_d| (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., section 3.1), bounded by
    max |q| times the largest L1 norm of a key (request keys and the cache's, dequantized, 0 on padding)."""
    k_l1, v_max, mass = k.double().abs().sum(-1).max().item(), v.double().abs().max().item(), 2.0
    for seg in (cache, cache.residual):
        if seg is not None and seg.capacity:
            sk, sv = seg.dequantize(torch.float64)
            k_l1, v_max = max(k_l1, sk.abs().sum(-1).max().item()), max(v_max, sv.abs().max().item())
            valid = torch.arange(seg.capacity)[None, None, :] < seg.length[..., None].long()
            counts = seg.count.double() if seg.count is not None else torch.ones(valid.shape, dtype=torch.float64)
            mass += counts.where(valid, 0.0).sum(-1).max().item()
    D = q.shape[-1]
    return (D + 1) * 2.0 ** -24 * D ** -0.5 * q.double().abs().max().item() * k_l1, v_max, mass


def rounding_allowance(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: mk.KVCache,
                       hstu: bool) -> Dict[str, float]:
    """How far float32 score rounding may move each compared result of one side (``_serve``'s docstring)."""
    e, v_max, mass = _score_rounding(q, k, v, cache)
    n = max(1, int(cache.original_length[0]))
    return {"output": (1.1 * e * mass / n if hstu else math.expm1(min(2 * e, 700.0))) * v_max, "lse": e}


def _serve(cache: mk.KVCache, seed: int, backends) -> None:
    """Every backend of ``backends`` (default: every available one) against the reference on this cache (softmax,
    and HSTU with a position/time bias at extreme timestamps when the cache has timestamps).

    Which rows are NaN or non-finite must match the float32 reference exactly; finite values must agree with the
    float32 reference within 2e-3 of the result's scale plus what float32 rounding of the scores may move on each
    side: a fuzzed blob may hold keys of magnitude 1e5 that nearly tie, where any float32 score (the
    reference's, PyTorch's, every kernel's) is off by O(1) and the softmax weights by tens of percent. A score
    error e moves each softmax weight by a factor within exp(+-2e), so an output by at most (exp(2e) - 1) max |v|,
    and an lse by e; HSTU's SiLU has slope below 1.1, so its output (sum_j c_j silu(s_j) v_j / n) moves by at
    most 1.1 e max |v| sum_j c_j / n."""
    H, D = cache.num_kv_heads, cache.head_dim
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, H, 2, D, generator=g) for _ in range(3))
    calls = [dict(kind="softmax", return_lse=True)]
    if cache.timestamp is not None:
        orig = int(cache.original_length[0])
        calls.append(dict(kind="hstu", pos_bias=torch.randn(H, 16, generator=g),
                          time_bias=torch.randn(H, 12, generator=g),
                          query_positions=torch.tensor([[orig, orig + 1]]),
                          query_timestamps=torch.tensor([[2 ** 62, 2 ** 63 - 1]])))
    # Float payloads within ~1e8 of float32's range (|x| > FP32_EDGE) make a float32 dot product or weighted sum
    # overflow in an order-dependent way: the reference and a kernel may then legitimately disagree on which rows
    # become inf/NaN. There the oracle checks only that every backend serves without crashing or reading out of
    # bounds; below the edge, results must agree as above.
    edge = any(t.is_floating_point() and t.numel() and t.float().abs().max().item() > FP32_EDGE
               for seg in (cache, cache.residual) if seg is not None for t in (seg.k, seg.v))
    for kw in calls:
        if edge:
            for be in (mk.available_backends() if backends is None else backends):
                if be not in ("reference", "auto"):
                    try:
                        attention_on(be, q, k, v, cache, is_causal=True, **kw)
                    except NotImplementedError:
                        pass
            continue
        ref = mk.attention(q, k, v, cache=cache, is_causal=True, backend="reference", **kw)
        hstu = kw["kind"] == "hstu"
        moved = rounding_allowance(q, k, v, cache, hstu)
        for be in (mk.available_backends() if backends is None else backends):
            if be in ("reference", "auto"):
                continue
            try:
                got = attention_on(be, q, k, v, cache, is_causal=True, **kw)
            except NotImplementedError:
                continue
            pairs = [("output", ref if hstu else ref.output, got if hstu else got.output)]
            if not hstu:
                pairs.append(("lse", ref.lse, got.lse))
            for name, a, b in pairs:
                assert torch.equal(torch.isnan(a), torch.isnan(b)), f"{be} {kw['kind']} {name}: NaN rows differ"
                fin = torch.isfinite(a)
                assert torch.equal(fin, torch.isfinite(b)), f"{be} {kw['kind']} {name}: finite entries differ"
                if fin.any():
                    err = (a[fin].double() - b[fin].double()).abs().max().item()
                    scale = 1.0 + a[fin].double().abs().max().item()
                    tol = 2e-3 * scale + 2 * moved[name]
                    assert err <= tol, f"{be} {kw['kind']} {name}: max error {err:.3g} > {tol:.3g} " \
                        f"(scale {scale:.3g}, float32 rounding allowance {moved[name]:.3g})"


def check_blob(blob: bytes, seed: int = 0, serve: bool = True, backends=None) -> str:
    """Run the oracle (module docstring) on one blob; returns "accepted" or "rejected", raises AssertionError on a
    violation (any other exception is a violation too and propagates). ``backends``: those to serve with (default
    every available one; the Triton interpreter is slow, so the long fuzz runs pass the compiled ones)."""
    try:
        cache = mk.cache_from_bytes(blob)
    except (ValueError, TypeError):
        return "rejected"
    cache.validate()
    cache.check_contents()
    assert storage_bytes(cache) <= MAX_EXPANSION * len(blob), \
        f"{storage_bytes(cache)} bytes of tensors from a {len(blob)}-byte blob"
    assert cache.to_bytes(0) == blob, "an accepted blob does not serialise back to the same bytes"
    if serve and cache.head_dim <= SERVE_MAX_HEAD_DIM and cache.capacity <= SERVE_MAX_ENTRIES:
        _serve(cache, seed, backends)
    return "accepted"
