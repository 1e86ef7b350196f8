"""The CUDA kernels' exact source run on the CPU through the emulation (tests/cuda_emulation.py; the session fixture
``emu``): what the backend-parametrized conformance suite (tests/test_attention_conformance.py, which runs the
emulated decode kernel over the shared case table) does not cover: the packer, bit-exact with the C++ CPU packer;
every head dim 1..256 for every payload format; the empty launch; the launch shapes for B*Hkv up to 10^6.

This machine has no GPU; the emulation checks the kernels' indexing, masks, split-K merge, barriers and shuffle
partners -- everything but timing and the hardware's own float intrinsics (__expf runs as expf here).
"""
import pytest
import torch

import malloc_kernels
from malloc_kernels.core import formats
from malloc_kernels.core.validate import validate_call
from malloc_kernels.ops import cuda as cuda_backend


def _run(emu, args, kw):
    call = validate_call(*args, **kw)
    res = cuda_backend._launch(call, emu)
    return res if (call.return_lse or call.return_stats) else res.output


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
    got = emu.cuda_quantize_pack(x, length, formats.code(fmt), 4, axis)
    assert torch.equal(cpu[0], got[0])
    assert torch.equal(cpu[1].view(torch.int16), got[1].view(torch.int16))
    if fmt != "fp8":
        assert torch.equal(cpu[2].view(torch.int16), got[2].view(torch.int16))


# Every head dim for every payload format: one full 32-key chunk (so a write past a row of the chunk's last key
# would land in the weights that follow the tile), GQA 2:1, one query. Token-axis groups span the whole row (any D
# is valid), channel-axis key groups the largest divisor of D up to 32 entries (KIVI keys; the values' token-axis
# groups use the same size, which must divide D); NVFP4 always groups 16 values (the last group partial).
EVERY_D_FORMATS = [("float", "float", "token", 0), ("int8", "int8", "token", -1), ("fp8", "fp8", "token", -1),
                   ("int4", "int4", "token", -1), ("int2", "int2", "token", -1), ("int4", "int4", "channel", 32),
                   ("int2", "int2", "channel", 32), ("nvfp4", "nvfp4", "token", 16)]


def _full_cache(D, fmt, seed):
    from malloc_kernels.cache import KVCache
    from malloc_kernels.cache import quant as pyq

    g = torch.Generator().manual_seed(seed)
    C = 32
    k, v = torch.randn(1, 1, C, D, generator=g), torch.randn(1, 1, C, D, generator=g)
    length = torch.full((1, 1), C, dtype=torch.int32)
    pos = torch.arange(C, dtype=torch.int32).view(1, 1, C)
    k_fmt, v_fmt, axis, gs = fmt
    if k_fmt == "float":
        dt = (torch.float32, torch.float16, torch.bfloat16)[D % 3]
        return KVCache(k.to(dt), v.to(dt), length, pos, length[:, 0].clone(), D)
    cache = KVCache(k, v, length, pos, length[:, 0].clone(), D)
    if gs == -1:
        gs = D
    elif k_fmt == "nvfp4":
        pass  # fixed 16-value groups, the last one partial when 16 does not divide D
    else:
        gs = max(x for x in range(1, gs + 1) if D % x == 0)
    return pyq.quantize_cache(cache, k_fmt, v_fmt, gs, axis)


@pytest.mark.parametrize("fmt", EVERY_D_FORMATS, ids=lambda f: f"{f[0]}-{f[2]}")
def test_emulated_every_head_dim(emu, fmt):
    from test_cuda_attention import _to

    bad = []
    for D in range(1, 257):
        cache = _full_cache(D, fmt, seed=D)
        g = torch.Generator().manual_seed(1000 + D)
        dt = cache.k.dtype if fmt[0] == "float" else torch.float32
        q = torch.randn(1, 2, 1, D, generator=g).to(dt)
        k, v = torch.randn(1, 1, 1, D, generator=g).to(dt), torch.randn(1, 1, 1, D, generator=g).to(dt)
        kw = dict(cache=cache, enable_gqa=True)
        ref = malloc_kernels.attention(q.double(), k.double(), v.double(), backend="reference",
                                       **dict(kw, cache=_to(cache, "cpu", torch.float64)))
        got = _run(emu, (q, k, v), kw)
        tol = {torch.float32: 2e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dt]  # + the output's rounding
        if not torch.allclose(got.double(), ref, rtol=tol, atol=tol / 10):
            bad.append(D)
    assert not bad, f"head dims with wrong outputs: {bad}"


def test_emulated_no_keys_at_all(emu):
    # No cache and Lk = 0: no split block has anything to do; the rows are empty (output 0, lse -inf), and the
    # launch must not be a zero-block grid (cudaErrorInvalidConfiguration on a GPU, an exception here).
    q = torch.randn(2, 4, 1, 16)
    k = v = torch.zeros(2, 2, 0, 16)
    got = _run(emu, (q, k, v), dict(enable_gqa=True, return_lse=True))
    ref = malloc_kernels.attention(q.double(), k.double(), v.double(), backend="reference", enable_gqa=True,
                                   return_lse=True)
    torch.testing.assert_close(got.output.double(), ref.output)
    torch.testing.assert_close(got.lse.double(), ref.lse)


@pytest.mark.parametrize("B,Hkv", [(1, 1), (65535, 1), (65536, 1), (1000, 1000), (1, 10**6), (10**6, 1)])
@pytest.mark.parametrize("Hq_per,Lq,C,Lk", [(1, 1, 4096, 1), (8, 16, 300, 16), (4, 1, 0, 0)])
def test_decode_launch_shapes_within_grid_limits(emu, B, Hkv, Hq_per, Lq, C, Lk):
    splits, tiles, blocks, rows, gx, cx = torch.ops.mk_emu_grid.decode_launch_dims(B, Hkv * Hq_per, Hkv, Lq, C, Lk, 256)
    assert tiles == -(-Hq_per * Lq // 16)
    assert splits == -(-C // 256) + -(-Lk // 256)
    assert blocks == splits * tiles * B * Hkv and rows == B * Hkv * Hq_per * Lq
    # one grid axis (x) only, within its 2^31 - 1 limit; every block index is covered by the grid-stride loops
    assert 0 <= gx <= 2**31 - 1 and 1 <= cx <= 2**31 - 1
    assert (gx == 0) == (blocks == 0) and gx == min(blocks, 2**31 - 1) and cx == min(rows, 2**31 - 1)
