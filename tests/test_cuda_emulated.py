"""The CUDA kernels' exact source run on the CPU through the emulation (tests/cuda_emulation.py; the session fixture
``emu``): what the backend-parametrized conformance suite (tests/test_attention_conformance.py, which runs the
emulated decode kernel over the shared case table) does not cover: the packer, bit-exact with the C++ CPU packer;
every head dim 1..256 for every payload format; the empty launch; the launch shapes for B*Hkv up to 10^6; the
non-finite rule for every poisoned cache field and request case, in all three tensor-core operand formats (fp32
queries: 3 x tf32, fp16, bf16).

This machine has no GPU; the emulation checks the kernels' indexing, masks, split-K merge, barriers, shuffle
partners and the MMA fragment layouts (csrc/cuda/emu/mma.cuh) -- everything but timing and the hardware's own float
intrinsics (__expf runs as expf here; an MMA's k-sum is rounded once).
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
@pytest.mark.parametrize("D", [64, 129, 256])
def test_decode_launch_shapes_within_grid_limits(emu, B, Hkv, Hq_per, Lq, C, Lk, D):
    splits, tiles, per_block, groups, blocks, rows, gx, cx, parts = torch.ops.mk_emu_grid.decode_launch_dims(
        B, Hkv * Hq_per, Hkv, Lq, C, Lk, 256, D)
    # above D = 128 two blocks share a span, each accumulating 128 output columns
    assert parts == (2 if D > 128 else 1)
    assert tiles == -(-Hq_per * Lq // 16)
    # a block holds all row tiles of its kv head up to 4 (K/V dequantized once for them), 1 or 2 when there are fewer
    assert per_block == (4 if tiles >= 3 else tiles) and groups == -(-tiles // per_block)
    assert splits == -(-C // 256) + -(-Lk // 256)
    assert blocks == splits * parts * groups * B * Hkv and rows == B * Hkv * Hq_per * Lq
    # one grid axis (x) only, within its 2^31 - 1 limit; every block index is covered by the grid-stride loops
    assert 0 <= gx <= 2**31 - 1 and 1 <= cx <= 2**31 - 1
    assert (gx == 0) == (blocks == 0) and gx == min(blocks, 2**31 - 1) and cx == min(rows, 2**31 - 1)


def test_report_smem_model_matches_the_kernel(emu):
    # tools/cuda_report.py computes decode_split's occupancy from a Python copy of the kernel's shared-memory layout
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "cuda_report.py"
    spec = importlib.util.spec_from_file_location("cuda_report", path)
    report = importlib.util.module_from_spec(spec)
    sys.modules["cuda_report"] = report
    spec.loader.exec_module(report)
    for code, mma in ((0, "tf32x3"), (1, "fp16"), (2, "bf16")):
        for D in (1, 17, 64, 100, 128, 129, 256):
            for tiles in (1, 2, 4):
                assert report.decode_split_smem(mma, D, tiles) == torch.ops.mk_emu_grid.decode_smem(D, code, tiles)


# ---- the non-finite rule (ARCHITECTURE.md) through the emulated tensor-core decode -------------------------------
# A NaN / Inf in a cached key, value, scale, zero, count or residual entry reaches some rows: exactly those rows are
# NaN (lse NaN), the others match the reference; an invisible entry (causally masked request token) never reaches a
# row through its zero weight in P V.
@pytest.mark.parametrize("kind", ["softmax", "hstu"])
@pytest.mark.parametrize("method, poison", __import__("test_hostile_inputs").POISONS)
def test_emulated_non_finite_cache_values(emu, method, poison, kind):
    from test_hostile_inputs import _hand_built, _same_rule, poisoned_cache_request

    if method == "fp8" and not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("no float8_e4m3fn")
    c = _hand_built(method, poison)
    q, k, v = poisoned_cache_request()
    kw = dict(cache=c, is_causal=True, kind=kind, return_lse=kind == "softmax")
    ref = malloc_kernels.attention(q, k, v, backend="reference", **kw)
    got = _run(emu, (q, k, v), kw)
    if kind == "softmax":
        _same_rule(ref.lse, got.lse, f"cuda_emu {kind} lse")
        ref, got = ref.output, got.output
    assert torch.isnan(ref).any(), "the poison must reach a row"
    _same_rule(ref, got, f"cuda_emu {kind}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["softmax", "hstu"])
@pytest.mark.parametrize("case", __import__("test_hostile_inputs").REQUEST_POISONS)
def test_emulated_non_finite_request(emu, case, kind, dtype):
    from test_hostile_inputs import poisoned_request

    q, k, v = poisoned_request(case)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    kw = dict(is_causal=True, kind=kind)
    ref = malloc_kernels.attention(q, k, v, backend="reference", **kw)
    got = _run(emu, (q, k, v), kw)
    assert torch.equal(torch.isnan(ref).any(-1), torch.isnan(ref).all(-1)), "rows are all-NaN or finite"
    assert torch.equal(torch.isnan(ref), torch.isnan(got)), f"{case}: NaN rows differ"
    fin = torch.isfinite(ref)
    assert torch.equal(fin, torch.isfinite(got))
    tol = {torch.float32: 2e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(got[fin].float(), ref[fin].float(), atol=tol, rtol=tol)
    if case == "masked_nan":
        assert torch.isfinite(ref[0, :, :4]).all() and torch.isnan(ref[0, :, 4]).all()
