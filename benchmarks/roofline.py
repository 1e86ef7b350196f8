"""This machine's ceilings for the roofline fractions of the CPU benchmarks.

* memory bandwidth: a large (256 MiB, far beyond the L3) fp32 tensor copy, counted as read + write bytes, and a
  read-only sum over the same tensor (the ceiling for kernels that read a cache and write almost nothing);
* compute: a large fp32 matmul (``2 * n^3`` FLOP).

Both are measured with the current torch thread count (the benchmarks pin 2 threads), best of a few rounds, so the
fractions reported next to the kernels are relative to what torch itself reaches on this box in the same run.
Run ``python benchmarks/roofline.py`` to print them.
"""
from __future__ import annotations

import time

import torch


def best_seconds(fn, rounds: int) -> float:
    """Fastest of ``rounds`` timed calls of ``fn`` (after one untimed warm-up call), in seconds: the minimum is the
    run least disturbed by the rest of the machine."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure_bandwidth(mib: int = 256, rounds: int = 5) -> float:
    """Sustained memory bandwidth in GB/s (bytes read + bytes written by a large copy)."""
    n = mib * (1 << 20) // 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    t = best_seconds(lambda: dst.copy_(src), rounds)
    return 2 * n * 4 / t / 1e9


def measure_read_bandwidth(mib: int = 256, rounds: int = 5) -> float:
    """Sustained read-only bandwidth in GB/s (a sum over a large tensor: bytes read, nothing written)."""
    src = torch.ones(mib * (1 << 20) // 4, dtype=torch.float32)
    t = best_seconds(lambda: src.sum(), rounds)
    return src.nbytes / t / 1e9


def interleaved_best_seconds(fns: dict, rounds: int) -> dict:
    """Fastest of ``rounds`` timed calls of each callable in ``fns``, the calls interleaved round-robin (one warm-up
    each first), in seconds. On a shared machine a burst of outside load then hits every provider of a comparison
    alike instead of whichever one happened to be running: side-by-side ratios stay fair."""
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def measure_flops(n: int = 2048, rounds: int = 3) -> float:
    """fp32 matmul throughput in GFLOP/s."""
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    t = best_seconds(lambda: torch.mm(a, b), rounds)
    return 2 * n ** 3 / t / 1e9


def roofline(threads: int = 2) -> dict:
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return {"threads": threads, "bandwidth_gbs": measure_bandwidth(), "read_gbs": measure_read_bandwidth(),
                "gflops": measure_flops()}
    finally:
        torch.set_num_threads(prev)


if __name__ == "__main__":
    r = roofline()
    print(f"threads={r['threads']}  copy bandwidth {r['bandwidth_gbs']:.1f} GB/s  read bandwidth {r['read_gbs']:.1f} GB/s  "
          f"fp32 matmul {r['gflops']:.1f} GFLOP/s")

