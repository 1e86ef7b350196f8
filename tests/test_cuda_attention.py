"""backend="cuda": the CUDA C++ split-K decode kernel and packer (csrc/cuda/).

GPU tests (marked ``gpu``) compare the kernel with the float64 reference over every cache format, both kinds,
GQA, residual segments, per-head lengths, merge counts, relative bias, targets and jagged batches; they skip here
(no GPU). The CPU tests check what runs without a GPU: the case builders against the reference, the backend's
availability/refusal reasons, the bandwidth model and the ptxas report parser (tools/cuda_report.py).
"""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import malloc_kernels
from malloc_kernels.cache import KVCache
from malloc_kernels.cache import quant as pyq
from malloc_kernels.ops import cuda as cuda_backend
from tolerance import torch_in_dtype, within_twice_torch_error

ROOT = Path(__file__).resolve().parents[1]

# (k_format, v_format, k_axis, group_size); "float" payloads use the dtype in the case.
FORMATS = [("float", "float", "token", 0), ("int8", "int8", "token", 16), ("fp8", "fp8", "token", 16),
           ("int4", "int4", "channel", 32), ("int2", "int2", "channel", 32), ("int4", "int4", "token", 8),
           ("nvfp4", "nvfp4", "token", 16)]


def _cache(B, Hkv, C, D, fmt, device, seed, residual=4, counts=True, timestamps=True, payload_dtype=torch.float16):
    """A ragged compressed cache: per-head lengths (one empty row), shuffled positions, counts, a residual."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, Hkv, C, D, generator=g)
    v = torch.randn(B, Hkv, C, D, generator=g)
    length = torch.randint(1, C + 1, (B, Hkv), generator=g, dtype=torch.int32)
    length[0, 0] = 0
    orig = length.max(dim=1).values.to(torch.int32) + 3
    position = torch.stack([torch.randperm(C, generator=g) for _ in range(B * Hkv)]).view(B, Hkv, C).to(torch.int32)
    ts = (position.to(torch.int64) * 37 + 1000) if timestamps else None
    count = (torch.randint(1, 4, (B, Hkv, C), generator=g).to(torch.float32)) if counts else None
    res = None
    if residual:
        rl = torch.randint(0, residual + 1, (B, Hkv), generator=g, dtype=torch.int32)
        rpos = (C + torch.arange(residual, dtype=torch.int32)).expand(B, Hkv, residual).contiguous()
        res = KVCache(torch.randn(B, Hkv, residual, D, generator=g).to(payload_dtype),
                      torch.randn(B, Hkv, residual, D, generator=g).to(payload_dtype),
                      rl, rpos, orig.clone(), D, timestamp=(rpos.to(torch.int64) * 37 + 1000) if timestamps else None)
    k_fmt, v_fmt, axis, G = fmt
    cache = KVCache(k.to(payload_dtype) if k_fmt == "float" else k, v.to(payload_dtype) if v_fmt == "float" else v,
                    length, position, orig, D, timestamp=ts, count=count, residual=res)
    if k_fmt != "float":
        cache = pyq.quantize_cache(cache, k_fmt, v_fmt, G, axis)
    return _to(cache, device)


def _to(cache, device, float_dtype=None):
    """Move a cache to ``device``; with ``float_dtype``, cast its floating payloads (main and residual) too."""
    import dataclasses

    changes = {}
    for f in KVCache._TENSOR_FIELDS:
        t = getattr(cache, f)
        if isinstance(t, KVCache):
            changes[f] = _to(t, device, float_dtype)
        elif t is not None:
            fmt = {"k": cache.k_format, "v": cache.v_format}.get(f)
            cast = float_dtype is not None and fmt == "float"
            changes[f] = t.to(device=device, dtype=float_dtype if cast else t.dtype)
    return dataclasses.replace(cache, **changes)


def _request(B, Hq, Hkv, L, D, dtype, device, seed):
    g = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(B, Hq, L, D, generator=g).to(dtype).to(device)
    k = torch.randn(B, Hkv, L, D, generator=g).to(dtype).to(device)
    v = torch.randn(B, Hkv, L, D, generator=g).to(dtype).to(device)
    return q, k, v


def _case(fmt, kind, device, *, B=3, Hq=8, Hkv=2, C=97, D=64, L=1, bias=False, causal=True, targets=None,
          dtype=torch.float32, seed=0):
    cache = _cache(B, Hkv, C, D, fmt, device, seed, payload_dtype=dtype)
    q, k, v = _request(B, Hq, Hkv, L, D, dtype, device, seed)
    kw = dict(cache=cache, kind=kind, is_causal=causal, return_lse=kind == "softmax")
    if bias:
        kw["pos_bias"] = torch.randn(Hq, 64, device=device) * 0.3
        kw["time_bias"] = torch.randn(Hq, 12, device=device) * 0.3
        kw["query_timestamps"] = (cache.original_length.to(torch.int64)[:, None] + torch.arange(L, device=device)) * 37 + 1000
    if targets is not None:
        kw["num_targets"] = targets
    return (q, k, v), kw


def _reference(args, kw):
    q, k, v = args
    kw64 = dict(kw)
    kw64["cache"] = _to(kw["cache"], q.device, torch.float64)
    return malloc_kernels.attention(q.double(), k.double(), v.double(), backend="reference", **kw64)


# ---- CPU-side checks -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", ["softmax", "hstu"])
def test_case_builders_run_on_the_reference(fmt, kind):
    """The GPU tests' inputs are valid calls (so a GPU failure is the kernel's, not the test's)."""
    args, kw = _case(fmt, kind, "cpu", bias=kind == "hstu", L=3, targets=torch.tensor([0, 1, 2]))
    res = _reference(args, kw)
    out = res.output if isinstance(res, tuple) else res
    assert out.shape == args[0].shape and bool(torch.isfinite(out).all())


def test_backend_refuses_cpu_tensors_with_a_reason():
    args, kw = _case(FORMATS[3], "softmax", "cpu")
    from malloc_kernels.core.validate import validate_call

    call = validate_call(*args, **kw)
    ok, why = cuda_backend.supports(call)
    assert not ok and "CUDA tensors" in why
    with pytest.raises(ValueError, match="cuda"):
        malloc_kernels.attention(*args, backend="cuda", **kw)


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-only build's message")
def test_is_available_explains_cpu_only_build():
    ok, why = cuda_backend.is_available()
    assert not ok and ("CPU-only" in why or "no CUDA device" in why)


def test_bandwidth_model():
    # 1 user, 1 kv head, 1 query head, C=32, D=64, fp16: K+V payload 2*2*64*32 + length 4 + q/out 2*4*64 (+ req kv)
    fp16 = cuda_backend.decode_bytes(1, 1, 1, 32, 64, residual=0, fmt="float16", q_len=1)
    assert fp16 == 2 * 2 * 64 * 32 + 4 + 2 * 4 * 64 * 1 + 1 * 1 * 64 * 4 * 2
    int4 = cuda_backend.decode_bytes(1, 1, 1, 32, 64, fmt="int4", group_size=32)
    scales = 2 * 2 * (1 * 64 + 32 * 2)  # keys: 1 group x 64 channels, values: 32 tokens x 2 groups; scale+zero
    assert int4 == 2 * 32 * 32 + scales + 4 + 2 * 4 * 64 + 64 * 4 * 2
    ratios = [cuda_backend.decode_bytes(64, 8, 8, 4096, 128, 32, fmt=f) for f in ("float16", "int8", "int4", "int2")]
    assert ratios == sorted(ratios, reverse=True)
    print("\nH100 decode time model (B=64, Hq=Hkv=8, C=4096, D=128, residual 32):")
    for f, nb in zip(("float16", "int8", "int4", "int2"), ratios):
        print(f"  {f:8s} {nb / 1e6:8.2f} MB  {nb / cuda_backend.H100_BANDWIDTH * 1e6:7.2f} us")


def _load_report():
    spec = importlib.util.spec_from_file_location("cuda_report", ROOT / "tools" / "cuda_report.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["cuda_report"] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def test_cuda_report_parses_ptxas_output():
    report = _load_report()
    log = """ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_80'
ptxas info    : Function properties for _Z3fooPf
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 2048 bytes smem, 356 bytes cmem[0]
ptxas info    : Compiling entry function '_Z3barv' for 'sm_90'
ptxas info    : Function properties for _Z3barv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 12 registers, used 0 barriers
"""
    ks = report.parse_ptxas(log)
    assert [(k.arch, k.registers, k.spill_stores, k.spill_loads, k.smem, k.barriers) for k in ks] == \
        [("sm_80", 40, 4, 12, 2048, 1), ("sm_90", 12, 0, 0, 0, 0)]
    assert ks[0].name == "foo" and ks[1].name == "bar"
    assert "| `foo` | sm_80 | 40 | 4 / 12 |" in report.table(ks, sass=False)


# ---- GPU tests -----------------------------------------------------------------------------------------------
def _close(out, ref):
    """fp32 kernel vs float64 reference."""
    torch.testing.assert_close(out.double(), ref, rtol=2e-4, atol=2e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", ["softmax", "hstu"])
@pytest.mark.parametrize("L,causal", [(1, True), (5, True), (4, False)])
def test_decode_matches_reference(fmt, kind, L, causal):
    args, kw = _case(fmt, kind, "cuda", L=L, causal=causal, bias=kind == "hstu")
    ref = _reference(args, kw)
    got = malloc_kernels.attention(*args, backend="cuda", **kw)
    if kind == "softmax":
        _close(got.output, ref.output)
        torch.testing.assert_close(got.lse.double(), ref.lse, rtol=1e-4, atol=1e-5)
    else:
        _close(got, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [17, 64, 128, 256])
@pytest.mark.parametrize("Hq,Hkv", [(1, 1), (8, 1), (6, 3), (32, 8)])
def test_decode_shapes(D, Hq, Hkv):
    fmt = ("int4", "int4", "channel", 32) if D % 32 == 0 else ("int8", "int8", "token", D)
    args, kw = _case(fmt, "softmax", "cuda", D=D, Hq=Hq, Hkv=Hkv, C=1025 if D == 128 else 97, L=2)
    ref = _reference(args, kw)
    got = malloc_kernels.attention(*args, backend="cuda", **kw)
    _close(got.output, ref.output)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["softmax", "hstu"])
def test_decode_targets_and_bias(kind):
    args, kw = _case(FORMATS[3], kind, "cuda", L=6, bias=True, targets=torch.tensor([0, 2, 6], device="cuda"))
    ref = _reference(args, kw)
    got = malloc_kernels.attention(*args, backend="cuda", **kw)
    _close(got.output if kind == "softmax" else got, ref.output if kind == "softmax" else ref)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", ["softmax", "hstu"])
def test_decode_low_precision_flash_rule(dtype, fmt, kind):
    """fp16 / bf16 queries run the m16n8k16 tensor-core path in that format, over every cache format."""
    args, kw = _case(fmt, kind, "cuda", L=3, dtype=dtype, bias=kind == "hstu")
    out = (lambda r: r.output) if kind == "softmax" else (lambda r: r)
    ref = out(_reference(args, kw))
    got = out(malloc_kernels.attention(*args, backend="cuda", **kw))
    with torch_in_dtype():
        theirs = out(malloc_kernels.attention(*args, backend="reference", **kw))
    assert got.dtype == dtype
    within_twice_torch_error(got, ref, theirs, dtype, n=max(64, 97 + 4 + 3))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["softmax", "hstu"])
@pytest.mark.parametrize("method, poison", __import__("test_hostile_inputs").POISONS)
def test_decode_non_finite_rule(method, poison, kind, dtype):
    """ARCHITECTURE.md's non-finite rule on the GPU, every poisoned cache field, all three MMA operand formats."""
    from test_hostile_inputs import _hand_built, poisoned_cache_request

    if method == "fp8" and not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("no float8_e4m3fn")
    c = _hand_built(method, poison)
    q, k, v = poisoned_cache_request()
    kw = dict(is_causal=True, kind=kind)
    ref = malloc_kernels.attention(q, k, v, cache=c, backend="reference", **kw)
    got = malloc_kernels.attention(q.to("cuda", dtype), k.to("cuda", dtype), v.to("cuda", dtype),
                                   cache=_to(c, "cuda", dtype), backend="cuda", **kw)
    assert torch.isnan(ref).any()
    assert torch.equal(torch.isnan(ref), torch.isnan(got.cpu()))


@pytest.mark.gpu
def test_decode_jagged_and_hstu_norms():
    B, Hq, Hkv, D = 3, 4, 2, 32
    cache = _cache(B, Hkv, 50, D, FORMATS[4], "cuda", seed=5, payload_dtype=torch.float32)
    lens = torch.tensor([2, 0, 3])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]).cuda()
    total = int(lens.sum())
    g = torch.Generator().manual_seed(9)
    q = torch.randn(total, Hq, D, generator=g).cuda()
    k = torch.randn(total, Hkv, D, generator=g).cuda()
    v = torch.randn(total, Hkv, D, generator=g).cuda()
    for norm in ("original", "kept", 7):
        kw = dict(cache=cache, kind="hstu", offsets=offsets, is_causal=True, hstu_norm=norm)
        ref = malloc_kernels.attention(q.double(), k.double(), v.double(), backend="reference",
                                       **dict(kw, cache=_to(cache, "cuda", torch.float64)))
        got = malloc_kernels.attention(q, k, v, backend="cuda", **kw)
        _close(got, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "int4", "int2", "fp8"])
@pytest.mark.parametrize("axis", ["token", "channel"])
def test_cuda_packer_bit_exact_with_cpu(fmt, axis):
    from malloc_kernels.ops import cpp_quant

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 45, 24, generator=g) * 5
    length = torch.randint(0, 46, (2, 3), generator=g, dtype=torch.int32)
    cpu = cpp_quant.quantize_pack(x, length, fmt, 8, axis)
    gpu = cuda_backend.quantize_pack(x.cuda(), length.cuda(), fmt, 8, axis)
    for a, b in zip(cpu, gpu):
        if a is not None:
            assert torch.equal(a.view(torch.uint8) if a.dtype != torch.uint8 else a,
                               b.cpu().view(torch.uint8) if b.dtype != torch.uint8 else b.cpu())


def test_auto_picks_the_kernel_of_the_cost_model(monkeypatch):
    """``auto`` sends cache decode to the CUDA C++ kernel only where its modeled issue floor is below Triton's even at
    its upper bound (core/gpu_policy.py; benchmarks/results/cuda_ptxas.md): quantized caches, 64 < D <= 128, one
    16-row tile per kv head. Elsewhere Triton."""
    from malloc_kernels.core.validate import validate_call

    monkeypatch.setattr(cuda_backend, "supports", lambda call: (True, ""))

    def picks_cuda(fmt, D, Hq, L):
        args, kw = _case(fmt, "softmax", "cpu", Hq=Hq, Hkv=2, L=L, D=D)
        return cuda_backend.preferred(validate_call(*args, **kw))

    kivi4, fp16 = FORMATS[3], FORMATS[0]
    assert picks_cuda(kivi4, 128, 8, 1) and picks_cuda(kivi4, 96, 8, 4) and picks_cuda(FORMATS[1], 128, 2, 1)
    assert not picks_cuda(kivi4, 64, 8, 1)          # the README decode: no margin over Triton
    assert not picks_cuda(kivi4, 256, 8, 1)         # outside what the model compared
    assert not picks_cuda(kivi4, 128, 8, 8)         # 32 rows per kv head: two tiles
    assert not picks_cuda(fp16, 128, 8, 1)          # float caches: both at the memory floor
    args, kw = _case(kivi4, "softmax", "cpu", Hq=8, Hkv=2, L=1, D=128)
    kw.pop("cache")
    assert not cuda_backend.preferred(validate_call(*args, **kw))  # no cache: not a cache decode


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", [("float", "float", "token", 0), ("int8", "int8", "token", -1),
                                 ("fp8", "fp8", "token", -1), ("int4", "int4", "token", -1),
                                 ("int2", "int2", "token", -1), ("int4", "int4", "channel", 32),
                                 ("int2", "int2", "channel", 32)], ids=lambda f: f"{f[0]}-{f[2]}")
def test_decode_every_head_dim(fmt):
    """Every head dim 1..256 (the 16-byte dequant path's padding codes: int2 D = 61, 62, 125, ...)."""
    bad = []
    for D in range(1, 257):
        g = torch.Generator().manual_seed(D)
        full = torch.full((1, 1), 64, dtype=torch.int32)
        cache = KVCache(torch.randn(1, 1, 64, D, generator=g), torch.randn(1, 1, 64, D, generator=g), full,
                        torch.arange(64, dtype=torch.int32).view(1, 1, 64), full[:, 0].clone(), D)
        if fmt[0] != "float":
            gs = D if fmt[3] == -1 else max(x for x in range(1, 33) if D % x == 0)
            cache = pyq.quantize_cache(cache, fmt[0], fmt[1], gs, fmt[2])
        cache = _to(cache, "cuda")
        q, k, v = _request(1, 2, 1, 1, D, torch.float32, "cuda", seed=D)
        kw = dict(cache=cache, enable_gqa=True)
        got = malloc_kernels.attention(q, k, v, backend="cuda", **kw)
        ref = _reference((q, k, v), kw)
        if not torch.allclose(got.double(), ref, rtol=2e-4, atol=2e-5):
            bad.append(D)
    assert not bad, bad


@pytest.mark.gpu
def test_decode_batch_times_heads_past_grid_limits():
    """B * Hkv = 70,000 > 65,535 (the split grid is one x axis with a grid-stride loop)."""
    args, kw = _case(FORMATS[3], "softmax", "cuda", B=35000, Hq=4, Hkv=2, C=40, D=32)
    got = malloc_kernels.attention(*args, backend="cuda", **kw)
    torch.testing.assert_close(got.output.double(), _reference(args, kw).output, rtol=2e-4, atol=2e-5)


@pytest.mark.gpu
def test_decode_no_keys_at_all():
    q = torch.randn(2, 4, 1, 16, device="cuda")
    k = torch.zeros(2, 2, 0, 16, device="cuda")
    got = malloc_kernels.attention(q, k, k, backend="cuda", enable_gqa=True, return_lse=True)
    assert bool((got.output == 0).all()) and bool(torch.isneginf(got.lse).all())
