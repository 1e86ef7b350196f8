"""Real-GPU tests of the Triton backend: CUDA tensors vs the float64 reference. Marked ``gpu``; the conftest skips
them with a reason on machines without an NVIDIA GPU (all machines of this project)."""
import pytest
import torch

import malloc_kernels
from malloc_kernels.cache.quant import quantize_cache
from tolerance import torch_in_dtype, within_twice_torch_error

pytestmark = pytest.mark.gpu


def _cache(B, H, C, D, dtype, device, gen):
    from malloc_kernels import KVCache
    return KVCache(k=torch.randn(B, H, C, D, generator=gen).to(device, dtype),
                   v=torch.randn(B, H, C, D, generator=gen).to(device, dtype),
                   length=torch.randint(0, C + 1, (B, H), generator=gen, dtype=torch.int32).to(device),
                   position=torch.randint(0, C, (B, H, C), generator=gen, dtype=torch.int32).to(device),
                   original_length=torch.full((B,), C, dtype=torch.int32, device=device), head_dim=D,
                   count=(torch.rand(B, H, C, generator=gen) + 0.5).to(device))


@pytest.mark.parametrize("fmt", ["float", "int8", "fp8", "int4", "int2"])
@pytest.mark.parametrize("kind", ["softmax", "hstu"])
@pytest.mark.parametrize("Lq", [1, 97])
def test_triton_cuda_vs_reference(fmt, kind, Lq):
    dev = "cuda"
    gen = torch.Generator().manual_seed(0)
    B, Hq, Hkv, D, C = 3, 8, 2, 64, 1025
    cache = _cache(B, Hkv, C, D, torch.float16, dev, gen)
    if fmt != "float":
        cache = quantize_cache(cache, fmt, fmt, 32, "channel" if fmt in ("int4", "int2") else "token")
    q = torch.randn(B, Hq, Lq, D, generator=gen).to(dev, torch.float16)
    k = torch.randn(B, Hkv, Lq, D, generator=gen).to(dev, torch.float16)
    v = torch.randn(B, Hkv, Lq, D, generator=gen).to(dev, torch.float16)
    kw = dict(cache=cache, kind=kind, is_causal=True, enable_gqa=True, return_lse=True)
    got = malloc_kernels.attention(q, k, v, backend="triton", **kw)
    c64 = cache if cache.is_quantized else cache.replace(k=cache.k.double(), v=cache.v.double())
    want = malloc_kernels.attention(q.double(), k.double(), v.double(), backend="reference",
                                    **dict(kw, cache=c64))
    with torch_in_dtype():
        lowp = malloc_kernels.attention(q, k, v, backend="reference", **kw)
    within_twice_torch_error(got.output, want.output, lowp.output, torch.float16, n=max(D, cache.capacity + Lq))


def test_triton_quantize_pack_cuda_bit_exact():
    from malloc_kernels.cache.quant import quantize_tensor
    from malloc_kernels.triton.quantize_pack import quantize_pack
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 333, 128, generator=gen).cuda().half()
    length = torch.randint(0, 334, (2, 4), generator=gen, dtype=torch.int32).cuda()
    for fmt, axis in (("int8", "token"), ("fp8", "token"), ("int4", "channel"), ("int2", "token")):
        want = quantize_tensor(x, length, fmt, 32, axis)
        got = quantize_pack(x, length, fmt, 32, axis)
        assert torch.equal(got[0], want[0])
        assert torch.equal(got[1].view(torch.int16), want[1].view(torch.int16))
