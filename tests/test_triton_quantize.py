"""Triton quantize-and-pack kernel: bit-exact with the PyTorch reference packer (``cache/quant.py``), under the
Triton interpreter. Adversarial groups: ragged/empty rows, partial channel groups, -0.0 minima, all-zero groups,
values spanning five decades, group sizes that are not powers of two, odd head dims."""
import os

import pytest
import torch

from malloc_kernels import KVCache
from malloc_kernels.cache.quant import quantize_cache as ref_quantize_cache
from malloc_kernels.cache.quant import quantize_tensor

assert os.environ.get("TRITON_INTERPRET") == "1", "conftest must set TRITON_INTERPRET=1 before kernels import"
from malloc_kernels.triton.quantize_pack import quantize_cache, quantize_pack  # noqa: E402


def _bits(t):
    return None if t is None else t.view(torch.int16)


def _input(dtype, D=24, C=23, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 2, C, D, generator=gen) * torch.logspace(-3, 2, D)
    x[0, 0, 3, :5] = -0.0
    x[0, 1] = 0.0
    length = torch.tensor([[C, 0], [7, 16]], dtype=torch.int32)
    return x.to(dtype), length


@pytest.mark.parametrize("fmt,axis,gs,dtype", [
    ("int8", "token", 24, torch.float32),
    ("fp8", "token", 12, torch.float16),
    ("int4", "channel", 5, torch.bfloat16),
    ("int2", "channel", 16, torch.float32),
    ("int4", "token", 8, torch.float16),
    ("int2", "token", 3, torch.float32),
    ("fp8", "channel", 4, torch.bfloat16),
])
def test_bit_exact(fmt, axis, gs, dtype):
    x, length = _input(dtype)
    want = quantize_tensor(x, length, fmt, gs, axis)
    got = quantize_pack(x, length, fmt, gs, axis)
    assert torch.equal(got[0], want[0]), "packed codes differ"
    assert torch.equal(_bits(got[1]), _bits(want[1])), "scales differ (bitwise)"
    assert (got[2] is None) == (want[2] is None)
    if want[2] is not None:
        assert torch.equal(_bits(got[2]), _bits(want[2])), "zeros differ (bitwise)"


def test_odd_head_dim_and_cache_twin():
    """D = 9 (partial last byte for int4/int2: high bits zero) through the whole-cache entry point, KIVI layout."""
    gen = torch.Generator().manual_seed(3)
    B, H, C, D = 2, 1, 10, 9
    cache = KVCache(k=torch.randn(B, H, C, D, generator=gen), v=torch.randn(B, H, C, D, generator=gen),
                    length=torch.tensor([[10], [4]], dtype=torch.int32),
                    position=torch.arange(C, dtype=torch.int32).expand(B, H, C).contiguous(),
                    original_length=torch.tensor([10, 4], dtype=torch.int32), head_dim=D)
    want = ref_quantize_cache(cache, "int2", "int4", 3, "channel")
    got = quantize_cache(cache, "int2", "int4", 3, "channel")
    for f in ("k", "v"):
        assert torch.equal(getattr(got, f), getattr(want, f))
    for f in ("k_scale", "k_zero", "v_scale", "v_zero"):
        assert torch.equal(_bits(getattr(got, f)), _bits(getattr(want, f))), f


def test_errors_match_reference():
    x, length = _input(torch.float32)
    x[1, 0, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        quantize_pack(x, length, "int8", 24)
    x, length = _input(torch.float32)
    x[1, 0, 2, 0] = -1e6
    with pytest.raises(ValueError, match="float16"):
        quantize_pack(x, length, "int8", 24)
    with pytest.raises(ValueError, match="format"):
        quantize_pack(x, length, "int3", 24)
    with pytest.raises(ValueError, match="divide"):
        quantize_pack(x, length, "int4", 5, "token")
