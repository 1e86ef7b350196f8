"""The CUDA kernels' exact source run on the CPU through the emulation (tests/cuda_emulation.py; the session fixture
``emu``): what the backend-parametrized conformance suite (tests/test_attention_conformance.py, which runs the
emulated decode kernel over the shared case table) does not cover -- the packer, bit-exact with the C++ CPU packer.

This machine has no GPU; the emulation checks the kernels' indexing, masks, split-K merge, barriers and shuffle
partners -- everything but timing and the hardware's own float intrinsics (__expf runs as expf here).
"""
import pytest
import torch


@pytest.mark.parametrize("fmt", ["int8", "int4", "int2", "fp8"])
@pytest.mark.parametrize("axis", ["token", "channel"])
def test_emulated_packer_bit_exact_with_cpu(emu, fmt, axis):
    from malloc_kernels.ops import cpp_quant

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 21, 12, generator=g) * 5
    length = torch.randint(0, 22, (2, 3), generator=g, dtype=torch.int32)
    pad = (torch.arange(21)[None, None, :] >= length[..., None])[..., None]
    x = x.masked_fill(pad, float("nan"))
    cpu = cpp_quant.quantize_pack(x, length, fmt, 4, axis)
    got = emu.cuda_quantize_pack(x, length, fmt, 4, axis)
    assert torch.equal(cpu[0], got[0])
    assert torch.equal(cpu[1].view(torch.int16), got[1].view(torch.int16))
    if fmt != "fp8":
        assert torch.equal(cpu[2].view(torch.int16), got[2].view(torch.int16))
