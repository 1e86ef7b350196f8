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


# ---- the shape classes a GPU runs differently from the interpreter (issue: grid limits, int64 offsets, devices,
# fp16 ranges, every head dim and tile configuration auto picks) ----------------------------------------------------
def _flash_check(q, k, v, kw, *, dev="cuda"):
    """Triton on ``dev`` vs the float64 reference: FlashAttention's rule (at most 2x PyTorch's own error in the
    input dtype, + slack), exact to 1e-5 for fp32."""
    got = malloc_kernels.attention(q, k, v, backend="triton", **kw)
    cache = kw.get("cache")
    c64 = None
    if cache is not None:
        c64 = cache if cache.is_quantized else cache.replace(k=cache.k.double(), v=cache.v.double())
    want = malloc_kernels.attention(q.double(), k.double(), v.double(), backend="reference", **dict(kw, cache=c64))
    got_o = got.output if isinstance(got, tuple) else got
    want_o = want.output if isinstance(want, tuple) else want
    if q.dtype == torch.float32:
        torch.testing.assert_close(got_o.double(), want_o, rtol=1e-5, atol=1e-5)
        return
    lowp = malloc_kernels.attention(q, k, v, backend="reference", **kw)
    lowp_o = lowp.output if isinstance(lowp, tuple) else lowp
    err = (got_o.double() - want_o).abs().max().item()
    pt_err = (lowp_o.double() - want_o).abs().max().item()
    assert err <= 2 * pt_err + 2e-3, (err, pt_err)


FORMS = [("float", "token", 0), ("int8", "token", 0), ("fp8", "token", 0), ("int4", "channel", 16),
         ("int2", "channel", 16), ("int4", "token", 0), ("int2", "token", 0)]


@pytest.mark.parametrize("form", FORMS, ids=lambda f: f"{f[0]}-{f[1]}")
@pytest.mark.parametrize("D", [16, 17, 61, 64, 128, 200, 256])
@pytest.mark.parametrize("kind,Lq,dtype", [("softmax", 1, torch.float16), ("softmax", 4, torch.bfloat16),
                                           ("hstu", 1, torch.float16), ("softmax", 130, torch.float16),
                                           ("hstu", 70, torch.bfloat16), ("softmax", 70, torch.float32)])
def test_every_form_head_dim_and_tile_class(form, D, kind, Lq, dtype, dev="cuda"):
    """Every cache format x head dims (odd, the int2 padding case 61, 256) x decode (G*Lq <= 64: 16/32/64-row
    tiles) and append (FlashAttention-2 tiles) x dtypes."""
    fmt, axis, gs = form
    gen = torch.Generator().manual_seed(D)
    B, Hq, Hkv, C = 2, 8, 2, 97
    cache = _cache(B, Hkv, C, D, dtype, dev, gen)
    if fmt != "float":
        # channel-axis keys: groups of up to `gs` entries; the values' token-axis groups must divide D
        group = max(x for x in range(1, gs + 1) if D % x == 0) if gs else D
        cache = quantize_cache(cache, fmt, fmt, group, axis)
    q = torch.randn(B, Hq, Lq, D, generator=gen).to(dev, dtype)
    k = torch.randn(B, Hkv, Lq, D, generator=gen).to(dev, dtype)
    _flash_check(q, k, k, dict(cache=cache, kind=kind, is_causal=True, enable_gqa=True), dev=dev)


@pytest.mark.parametrize("Lq", [1, 80])
def test_batch_times_heads_past_the_grid_y_limit(Lq, dev="cuda"):
    """B * Hkv = 70,000 > 65,535: the launchers keep the batch axis on grid axis 0."""
    gen = torch.Generator().manual_seed(3)
    B, H, C, D = 70000, 1, 4, 16
    cache = _cache(B, H, C, D, torch.float16, dev, gen)
    q = torch.randn(B, H, Lq, D, generator=gen).to(dev, torch.float16)
    _flash_check(q, q, q, dict(cache=cache, is_causal=True), dev=dev)
    from malloc_kernels.triton.quantize_pack import quantize_pack
    x = torch.randn(B, H, 8, D, generator=gen).to(dev, torch.float16)
    length = torch.full((B, H), 8, dtype=torch.int32, device=dev)
    from malloc_kernels.cache.quant import quantize_tensor
    assert torch.equal(quantize_pack(x, length, "int4", 16, "channel")[0],
                       quantize_tensor(x, length, "int4", 16, "channel")[0])


def test_batch_offsets_past_2_31_elements():
    """A query view whose batch stride times the batch index passes 2^31 elements (needs ~4.3 GB)."""
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2 ** 30:
        pytest.skip("needs a GPU with >= 24 GB")
    B, H, L, D = 3, 1, 1, 64
    big = torch.zeros(B * 2 ** 30 // 64 + 1, 64, dtype=torch.float16, device="cuda")  # 2^31 + elements
    q = big.view(-1)[: (B - 1) * 2 ** 30 + D].as_strided((B, H, L, D), (2 ** 30, D, D, 1))
    q.copy_(torch.randn(B, H, L, D, device="cuda").half())
    k = torch.randn(B, H, 5, D, device="cuda").half()
    _flash_check(q, k, k, dict(is_causal=False))


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_launch_on_the_tensors_device():
    """Tensors on cuda:1 while cuda:0 is current: the launch follows the tensors."""
    gen = torch.Generator().manual_seed(4)
    torch.cuda.set_device(0)
    cache = _cache(2, 2, 33, 64, torch.float16, "cuda:1", gen)
    q = torch.randn(2, 4, 1, 64, generator=gen).to("cuda:1", torch.float16)
    _flash_check(q, q[:, :2], q[:, :2], dict(cache=cache, enable_gqa=True), dev="cuda:1")


def test_hstu_fp16_large_merge_counts():
    """Merge counts in the thousands: c * silu(s) passes fp16's range before the 1/n normalisation."""
    gen = torch.Generator().manual_seed(5)
    B, H, C, D = 2, 2, 64, 64
    cache = _cache(B, H, C, D, torch.float16, "cuda", gen)
    cache = cache.replace(count=torch.full((B, H, C), 5000.0, device="cuda"),
                          original_length=torch.full((B,), 5000 * C, dtype=torch.int32, device="cuda"))
    q = (cache.k[:, :, :1] * 3).contiguous()
    for Lq in (1, 80):
        qq = q.expand(B, H, Lq, D).contiguous()
        got = malloc_kernels.attention(qq, qq, qq, backend="triton", cache=cache, kind="hstu")
        assert bool(torch.isfinite(got).all())
        _flash_check(qq, qq, qq, dict(cache=cache, kind="hstu"))


def test_no_keys_at_all():
    q = torch.randn(2, 4, 1, 32, device="cuda").half()
    k = torch.zeros(2, 2, 0, 32, device="cuda").half()
    got = malloc_kernels.attention(q, k, k, backend="triton", enable_gqa=True, return_lse=True)
    assert bool((got.output == 0).all()) and bool(torch.isneginf(got.lse).all())


# ---- the jagged serving step in a CUDA graph (max_seqlen_q: no host read, no data-sized allocation) --------------
@pytest.mark.parametrize("backend", ["triton", "auto"])
@pytest.mark.parametrize("kind,Lq", [("softmax", 1), ("hstu", 1), ("softmax", 80), ("hstu", 80)])
def test_jagged_serving_step_replays_in_a_cuda_graph(backend, kind, Lq):
    """Capture one jagged call (KIVI int4 cache, HSTU's bias, targets) given ``max_seqlen_q``, then replay it over
    new contents of the same buffers, a different ragged split (empty users included): each replay equals the
    eager call without the bound."""
    import malloc_kernels as mk
    dev = "cuda"
    gen = torch.Generator().manual_seed(6)
    B, Hq, Hkv, D, C = 4, 8, 2, 64, 257
    cache = quantize_cache(_cache(B, Hkv, C, D, torch.float16, dev, gen), "int4", "int4", 32, "channel")
    cache = cache.replace(timestamp=(cache.position.to(torch.int64) * 60))
    splits = ([Lq, 0, Lq // 2, Lq - Lq // 2], [Lq // 2, Lq - Lq // 2, Lq, 0])
    T = 2 * Lq
    q = torch.empty(T, Hq, D, device=dev, dtype=torch.float16)
    k, v = (torch.empty(T, Hkv, D, device=dev, dtype=torch.float16) for _ in range(2))
    off = torch.empty(B + 1, dtype=torch.int64, device=dev)
    ts = torch.empty(T, dtype=torch.int64, device=dev)
    nt = torch.empty(B, dtype=torch.int64, device=dev)
    extra = dict(pos_bias=torch.randn(Hq, 64, generator=gen).to(dev),
                 time_bias=torch.randn(Hq, 16, generator=gen).to(dev)) if kind == "hstu" else {}
    kw = dict(offsets=off, cache=cache, kind=kind, is_causal=True, enable_gqa=True, num_targets=nt,
              query_timestamps=ts, backend=backend, **extra)

    def fill(lengths):
        q.copy_(torch.randn(q.shape, generator=gen).half())
        k.copy_(torch.randn(k.shape, generator=gen).half())
        v.copy_(torch.randn(v.shape, generator=gen).half())
        off.copy_(torch.tensor([0] + lengths).cumsum(0))
        ts.copy_(torch.randint(10 ** 4, 10 ** 5, (T,), generator=gen))
        nt.copy_(torch.tensor([min(1, n) for n in lengths]))

    def step():
        return mk.attention(q, k, v, max_seqlen_q=Lq, **kw)

    fill(splits[0])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):          # warm up: compile the kernels, fill the launchers' one-time caches
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for lengths in splits:
        fill(lengths)
        graph.replay()
        want = mk.attention(q, k, v, **kw)
        torch.testing.assert_close(out, want, rtol=0, atol=0)


_TOO_SMALL_BOUND = r"""
import torch, malloc_kernels as mk
q = torch.randn(5, 2, 16, device="cuda", dtype=torch.float16)
mk.attention(q, q, q, offsets=torch.tensor([0, 3, 5], device="cuda"), max_seqlen_q=2, backend="triton")
torch.cuda.synchronize()
print("NO ERROR")
"""


def test_jagged_bound_below_the_longest_user_is_a_device_assert():
    """On CUDA tensors a bound below the longest user fails the asynchronous device assert (it kills the CUDA
    context, so in a child process), never a silently truncated result."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", _TOO_SMALL_BOUND], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode != 0 and "NO ERROR" not in proc.stdout
    assert "assert" in proc.stderr.lower(), proc.stderr[-2000:]
