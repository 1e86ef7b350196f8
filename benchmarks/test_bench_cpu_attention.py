"""pytest-benchmark microbenchmarks of the C++ CPU attention (quick subset; the full grid and the side-by-side
table with roofline fractions are ``python benchmarks/report_cpu.py [--full]``)."""
import pytest
import torch
import torch.nn.functional as F

import malloc_kernels as mk
from malloc_kernels.ops import cpu
from malloc_kernels.core.validate import validate_call

pytestmark = pytest.mark.skipif("cpu" not in mk.available_backends(),
                                reason="C++ extension with attention_cpu not built")

B, HQ, D, N = 8, 8, 64, 1024     # small enough for CI; report_cpu.py runs B=32, N up to 16384


def _inputs(Hkv, Lq):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return r(B, HQ, Lq, D), r(B, Hkv, Lq, D), r(B, Hkv, Lq, D), r(B, Hkv, N, D), r(B, Hkv, N, D)


@pytest.mark.parametrize("fmt", ["none", "int8", "int4", "int2"])
@pytest.mark.parametrize("Hkv,Lq", [(8, 1), (2, 1), (8, 16)])
def test_bench_cpu_kernel(benchmark, fmt, Hkv, Lq):
    q, k, v, hk, hv = _inputs(Hkv, Lq)
    call = validate_call(q, k, v, cache=mk.compress(hk, hv, fmt), is_causal=True)
    torch.set_num_threads(2)
    benchmark.pedantic(cpu.run, args=(call,), rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("Hkv,Lq", [(8, 1), (8, 16)])
def test_bench_sdpa_fp32(benchmark, Hkv, Lq):
    q, k, v, hk, hv = _inputs(Hkv, Lq)
    fk, fv = torch.cat([hk, k], 2), torch.cat([hv, v], 2)
    mask = torch.ones(Lq, N + Lq, dtype=torch.bool).tril(N)
    torch.set_num_threads(2)
    benchmark.pedantic(F.scaled_dot_product_attention, args=(q, fk, fv), kwargs=dict(attn_mask=mask, enable_gqa=True),
                       rounds=3, warmup_rounds=1)


def test_bench_hstu_int4(benchmark):
    q, k, v, hk, hv = _inputs(8, 16)
    call = validate_call(q, k, v, cache=mk.compress(hk, hv, "int4"), is_causal=True, kind="hstu")
    torch.set_num_threads(2)
    benchmark.pedantic(cpu.run, args=(call,), rounds=3, warmup_rounds=1)
