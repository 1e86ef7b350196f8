"""CUDA decode benchmark: measured time vs. the bandwidth model (bytes the call must read / H100's 3.35 TB/s).

Without a GPU the timed benchmarks skip with a reason and only the model is printed (pytest -s), so GPU users
have the number to compare against: achieved GB/s = bytes / time, fraction of roofline = model time / time.
"""
import pytest
import torch

import malloc_kernels
from malloc_kernels.ops import cuda as cuda_backend

SHAPES = [  # (B, Hq, Hkv, C, D, residual)
    (1, 32, 8, 4096, 128, 32),
    (64, 8, 8, 2048, 64, 32),
    (256, 4, 1, 1000, 64, 16),
]
FORMATS = ["float16", "int8", "fp8", "int4", "int2"]


def test_bandwidth_model_table():
    print("\nshape (B, Hq, Hkv, C, D, residual) | format | MB read | H100 model (us)")
    for shape in SHAPES:
        B, Hq, Hkv, C, D, residual = shape
        # what every format moves besides the cache payload and its scales: lengths, the fp32 residual K/V, the
        # fp32 request K/V per kv head, and the fp32 queries and outputs
        fixed = B * Hkv * (4 + 2 * 4 * D * (residual + 1)) + B * Hq * D * 4 * 2
        sizes = []
        for fmt in FORMATS:
            nbytes = cuda_backend.decode_bytes(*shape, fmt=fmt)
            print(f"{shape} | {fmt:8s} | {nbytes / 1e6:9.2f} | {nbytes / cuda_backend.H100_BANDWIDTH * 1e6:8.2f}")
            sizes.append(nbytes)
        assert sizes[0] == fixed + B * Hkv * 2 * 2 * D * C                  # fp16 K and V, no scales
        # 16 > 8 = 8 > 4 > 2 bits per value; int8 stores a zero per group next to its scale, fp8 only the scale
        assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes), sizes


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES[:2])
@pytest.mark.parametrize("fmt", ["float16", "int8", "int4", "int2"])
def test_bench_cuda_decode(benchmark, shape, fmt):
    if not torch.cuda.is_available():  # queried at run time, never at import/collection
        pytest.skip("needs an NVIDIA GPU: none on this machine (CPU-only torch or no device)")
    from malloc_kernels.cache import KVCache
    from malloc_kernels.cache import quant as pyq

    B, Hq, Hkv, C, D, R = shape
    dev = "cuda"
    k = torch.randn(B, Hkv, C, D, device=dev)
    v = torch.randn(B, Hkv, C, D, device=dev)
    length = torch.full((B, Hkv), C, dtype=torch.int32, device=dev)
    pos = torch.arange(C, dtype=torch.int32, device=dev).expand(B, Hkv, C).contiguous()
    orig = torch.full((B,), C, dtype=torch.int32, device=dev)
    dtype = torch.float16 if fmt == "float16" else torch.float32
    cache = KVCache(k.to(dtype), v.to(dtype), length, pos, orig, D)
    if fmt != "float16":
        axis = "channel" if fmt in ("int4", "int2") else "token"
        cache = pyq.quantize_cache(cache, fmt, fmt, 32 if axis == "channel" else D, axis)
    q = torch.randn(B, Hq, 1, D, device=dev, dtype=dtype)
    kr = torch.randn(B, Hkv, 1, D, device=dev, dtype=dtype)
    vr = torch.randn(B, Hkv, 1, D, device=dev, dtype=dtype)

    def run():
        out = malloc_kernels.attention(q, kr, vr, cache=cache, is_causal=True, backend="cuda")
        torch.cuda.synchronize()
        return out

    benchmark.pedantic(run, rounds=20, warmup_rounds=3)
    nbytes = cuda_backend.decode_bytes(B, Hq, Hkv, C, D, 0, fmt=fmt)
    t = benchmark.stats.stats.mean
    benchmark.extra_info.update(bytes=nbytes, gbps=nbytes / t / 1e9,
                                roofline_fraction=nbytes / cuda_backend.H100_BANDWIDTH / t)
