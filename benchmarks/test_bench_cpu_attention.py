"""Quick side-by-side microbenchmark of the C++ CPU attention (the full grid with roofline fractions and every
baseline is ``python benchmarks/report_cpu.py [--full] [--save]``): the kernel over each cache format and torch
SDPA over the fp32 cache, timed interleaved with the same rounds, 2 threads (restored by benchmarks/conftest.py).
SDPA gets no mask at Lq = 1 (the causal request sees the whole cache) and the cache-prefix mask otherwise."""
import json

import pytest
import torch
import torch.nn.functional as F

import malloc_kernels as mk
from malloc_kernels.ops import cpu
from malloc_kernels.core.validate import validate_call

from machine import machine_label  # benchmarks/ is on sys.path under pytest
from roofline import interleaved_best_seconds

pytestmark = pytest.mark.needs_ext("attention_cpu")

B, HQ, D = 8, 8, 64
N, SMOKE_N = 1024, 32         # small enough for CI; report_cpu.py runs B=32, N up to 16384
ROUNDS = 5


def _inputs(Hkv, Lq, n):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return r(B, HQ, Lq, D), r(B, Hkv, Lq, D), r(B, Hkv, Lq, D), r(B, Hkv, n, D), r(B, Hkv, n, D)


@pytest.mark.parametrize("Hkv,Lq", [(8, 1), (2, 1), (8, 16)])
def test_bench_cpu_kernel_vs_sdpa(benchmark, smoke, Hkv, Lq):
    torch.set_num_threads(2)
    n = SMOKE_N if smoke else N
    q, k, v, hk, hv = _inputs(Hkv, Lq, n)
    fk, fv = torch.cat([hk, k], 2), torch.cat([hv, v], 2)
    mask = None if Lq == 1 else torch.ones(Lq, n + Lq, dtype=torch.bool).tril(n)
    fns = {"sdpa_fp32": lambda: F.scaled_dot_product_attention(q, fk, fv, attn_mask=mask, enable_gqa=True)}
    calls = {}
    for fmt in ("none", "int8", "int4", "int2"):
        calls[fmt] = validate_call(q, k, v, cache=mk.compress(hk, hv, fmt), is_causal=True)
        fns[f"cpu_{fmt}"] = lambda c=calls[fmt]: cpu.run(c)
    torch.testing.assert_close(fns["cpu_none"]().output, fns["sdpa_fp32"](), rtol=1e-4, atol=1e-4)
    best = interleaved_best_seconds(fns, 1 if smoke else ROUNDS)
    print(json.dumps({"machine": machine_label(), "Hkv": Hkv, "Lq": Lq, "N": n,
                      **{name: {"ms": 1e3 * t, "speedup_vs_sdpa": best["sdpa_fp32"] / t} for name, t in best.items()}},
                     indent=1))
    benchmark.pedantic(cpu.run, args=(calls["int4"],), rounds=1, warmup_rounds=0)


def test_bench_hstu_int4(benchmark, smoke):
    torch.set_num_threads(2)
    q, k, v, hk, hv = _inputs(8, 16, SMOKE_N if smoke else N)
    call = validate_call(q, k, v, cache=mk.compress(hk, hv, "int4"), is_causal=True, kind="hstu")
    benchmark.pedantic(cpu.run, args=(call,), rounds=1 if smoke else 3, warmup_rounds=1)
