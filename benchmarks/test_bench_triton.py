"""pytest-benchmark microbenchmarks of the Triton provider (GPU hosts only; skipped here with a reason).

Decode over compressed caches (the serving hot path) and the quantize-and-pack kernel. Each benchmark records the
compressed bytes actually read, so GB/s = bytes / time can be compared against the H100 roofline printed by
``python -m malloc_kernels.triton.report``. Few rounds: these are for GPU hosts, not CI."""
import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_gpu():
    """Skip at setup (never at import/collection) where there is no NVIDIA GPU."""
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU: none on this machine (CPU-only torch or no device)")


def _decode_inputs(fmt, B=32, Hq=32, Hkv=8, D=128, N=8192):
    from malloc_kernels import KVCache
    from malloc_kernels.triton.quantize_pack import quantize_cache
    dev = "cuda"
    cache = KVCache(k=torch.randn(B, Hkv, N, D, device=dev, dtype=torch.float16),
                    v=torch.randn(B, Hkv, N, D, device=dev, dtype=torch.float16),
                    length=torch.full((B, Hkv), N, dtype=torch.int32, device=dev),
                    position=torch.arange(N, dtype=torch.int32, device=dev).expand(B, Hkv, N).contiguous(),
                    original_length=torch.full((B,), N, dtype=torch.int32, device=dev), head_dim=D)
    if fmt != "float":
        cache = quantize_cache(cache, fmt, fmt, 32, "channel" if fmt in ("int4", "int2") else "token")
    q = torch.randn(B, Hq, 1, D, device=dev, dtype=torch.float16)
    k = torch.randn(B, Hkv, 1, D, device=dev, dtype=torch.float16)
    return q, k, cache


@pytest.mark.parametrize("fmt", ["float", "int8", "fp8", "int4", "int2"])
def test_bench_triton_decode(benchmark, fmt):
    import malloc_kernels
    q, k, cache = _decode_inputs(fmt)
    nbytes = sum(t.numel() * t.element_size() for t in (cache.k, cache.v, cache.k_scale, cache.k_zero,
                                                        cache.v_scale, cache.v_zero, cache.position)
                 if t is not None)

    def step():
        out = malloc_kernels.attention(q, k, k, cache=cache, is_causal=True, enable_gqa=True, backend="triton")
        torch.cuda.synchronize()
        return out

    benchmark.pedantic(step, rounds=10, warmup_rounds=2)
    benchmark.extra_info.update(provider="triton", format=fmt, bytes=nbytes,
                                gbps=nbytes / benchmark.stats["mean"] / 1e9)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_bench_triton_quantize_pack(benchmark, fmt):
    from malloc_kernels.triton.quantize_pack import quantize_pack
    x = torch.randn(32, 8, 8192, 128, device="cuda", dtype=torch.float16)
    length = torch.full((32, 8), 8192, dtype=torch.int32, device="cuda")

    def step():
        r = quantize_pack(x, length, fmt, 32, "token")
        torch.cuda.synchronize()
        return r

    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    benchmark.extra_info.update(provider="triton", format=fmt, bytes=x.numel() * 2)
