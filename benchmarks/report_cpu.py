"""CPU attention report: the C++ kernel over compressed caches vs torch SDPA vs dequantize-then-SDPA, side by side.

Shapes (issue 4): B=32 users, Hq=8, Hkv in {8, 2}, D=64, cached history N in {1024, 4096, 16384}, request Lq in
{1, 16, 64}. ``--quick`` (default) runs the acceptance shapes only; ``--full`` the whole grid. Everything runs in
ONE process with 2 threads, the roofline ceilings (benchmarks/roofline.py) measured in the same run.

Columns: ms (best of ``--rounds``), GB/s of the bytes the provider actually reads (compressed payload + scales +
zeros + queries/request tokens; SDPA: its fp32/bf16 K/V), GFLOP/s (4 * B * Hq * Lq * (N + Lq) * D), fraction of the
read-bandwidth ceiling, and speedup vs SDPA on the fp32 cache. Providers of one shape are timed interleaved
round-robin, so outside load hits all of them alike. Writes benchmarks/results/cpu_attention.{csv,md}.
"""
from __future__ import annotations

import argparse
import csv
import importlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import malloc_kernels as mk  # noqa: E402
from malloc_kernels.ops import cpu  # noqa: E402
from malloc_kernels.core.validate import validate_call  # noqa: E402
from roofline import interleaved_best_seconds, roofline  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def cache_bytes(c):
    n = c.k.nbytes + c.v.nbytes
    for t in (c.k_scale, c.k_zero, c.v_scale, c.v_zero, c.count):
        if t is not None:
            n += t.nbytes
    if c.residual is not None:
        n += cache_bytes(c.residual)
    return n


def run_config(B, Hq, Hkv, D, N, Lq, kind, rounds, providers):
    """Time ``providers`` on one shape, interleaved; ``cpu_<fmt>@<p>%`` = the kernel over a cache evicted to p%
    of its tokens (recency policy) and then stored as ``fmt``."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, Hq, Lq, D, generator=g)
    k = torch.randn(B, Hkv, Lq, D, generator=g)
    v = torch.randn(B, Hkv, Lq, D, generator=g)
    hk = torch.randn(B, Hkv, N, D, generator=g)
    hv = torch.randn(B, Hkv, N, D, generator=g)
    flops = 4.0 * B * Hq * Lq * (N + Lq) * D
    req_bytes = q.nbytes * 2 + k.nbytes + v.nbytes
    timed = {}  # provider -> (callable, bytes it reads); timed together below, interleaved

    full_k, full_v = torch.cat([hk, k], 2), torch.cat([hv, v], 2)
    # causal request, cache fully visible: SDPA needs an explicit mask with the cache prefix.
    mask = torch.ones(Lq, N + Lq, dtype=torch.bool).tril(N)
    if "sdpa_fp32" in providers and kind == "softmax":
        timed["sdpa_fp32"] = (lambda: F.scaled_dot_product_attention(q, full_k, full_v, attn_mask=mask,
                                                                     enable_gqa=True),
                              full_k.nbytes + full_v.nbytes + req_bytes)
    if "sdpa_bf16" in providers and kind == "softmax":
        qb, kb, vb = q.bfloat16(), full_k.bfloat16(), full_v.bfloat16()
        timed["sdpa_bf16"] = (lambda: F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, enable_gqa=True),
                              kb.nbytes + vb.nbytes + req_bytes // 2)
    if kind == "hstu" and "reference" in providers:
        full = mk.compress(hk, hv, "none")
        ref = importlib.import_module("malloc_kernels.reference.attention")
        timed["reference_fp32"] = (lambda: ref.attention(q, k, v, cache=full, kind="hstu", is_causal=True),
                                   cache_bytes(full) + req_bytes)
    for name in [m for m in providers if m.startswith("cpu_")]:
        fmt, _, pct = name[4:].partition("@")
        budget = float(pct.rstrip("%")) / 100 if pct else None
        meth = {"fp32": "none"}.get(fmt, fmt)
        if budget is not None:
            cache = mk.compress(hk, hv, "recent", budget=budget)
            if meth != "none":
                cache = mk.compress(hk, hv, "recent+" + meth, budget=budget)
        else:
            cache = mk.compress(hk, hv, meth)
        call = validate_call(q, k, v, cache=cache, kind=kind, is_causal=True)
        timed[name] = (lambda call=call: cpu.run(call), cache_bytes(cache) + req_bytes)
        if f"dequant_sdpa_{fmt}" in providers and kind == "softmax" and budget is None:
            def deq(cache=cache):
                dk, dv = cache.dequantize(torch.float32)
                return F.scaled_dot_product_attention(q, torch.cat([dk, k], 2), torch.cat([dv, v], 2),
                                                      attn_mask=mask, enable_gqa=True)
            timed[f"dequant_sdpa_{fmt}"] = (deq, cache_bytes(cache) + req_bytes)
    # the slow baselines (materialised reference, dequantize-then-SDPA: seconds per call) get fewer rounds
    slow = {n for n in timed if n.startswith(("dequant_", "reference"))}
    best = interleaved_best_seconds({n: f for n, (f, _) in timed.items() if n not in slow}, rounds)
    best.update(interleaved_best_seconds({n: f for n, (f, _) in timed.items() if n in slow}, max(1, rounds // 3)))
    rows = []
    for name, (_, nbytes) in timed.items():
        ms = best[name] * 1e3
        rows.append(dict(B=B, Hq=Hq, Hkv=Hkv, D=D, N=N, Lq=Lq, kind=kind, provider=name, ms=ms,
                         gbs=nbytes / ms / 1e6, gflops=flops / ms / 1e6, mbytes=nbytes / 1e6))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="the whole grid (slow)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    before = roofline(args.threads)
    print(f"roofline: {before['read_gbs']:.1f} GB/s read, {before['bandwidth_gbs']:.1f} GB/s copy, "
          f"{before['gflops']:.1f} GFLOP/s fp32 matmul ({args.threads} threads)")
    base = ["sdpa_fp32", "sdpa_bf16", "cpu_fp32", "cpu_int8", "cpu_int4", "cpu_int2", "dequant_sdpa_int4"]
    evicted = ["cpu_fp32@25%", "cpu_int4@25%"]  # next to the full caches of the same run: time vs kept entries
    if args.full:
        configs = [(Hkv, N, Lq, "softmax", base) for Hkv in (8, 2) for N in (1024, 4096, 16384) for Lq in (1, 16, 64)]
        configs[configs.index((8, 4096, 1, "softmax", base))] = (8, 4096, 1, "softmax", base + evicted)
    else:
        configs = [(8, 4096, 1, "softmax", base + evicted), (2, 4096, 1, "softmax", base),
                   (8, 4096, 16, "softmax", base)]
    configs += [(8, 4096, 16, "hstu", ["reference", "cpu_fp32", "cpu_int4"])]
    rows = []
    for Hkv, N, Lq, kind, prov in configs:
        rs = run_config(32, 8, Hkv, 64, N, Lq, kind, args.rounds, prov)
        rows += rs
        for r in rs:
            print(f"Hkv={Hkv} N={N} Lq={Lq} {kind:7s} {r['provider']:20s} {r['ms']:9.2f} ms {r['gbs']:7.2f} GB/s "
                  f"{r['gflops']:7.2f} GFLOP/s", flush=True)
    # ceilings: the better of the measurements before and after the kernels (outside load only ever lowers them)
    after = roofline(args.threads)
    roof = {k: max(before[k], after[k]) for k in ("read_gbs", "bandwidth_gbs", "gflops")}
    # speedups vs SDPA fp32 / reference of the same shape, fraction of the read-bandwidth ceiling
    for r in rows:
        same = [x for x in rows if (x["Hkv"], x["N"], x["Lq"], x["kind"]) == (r["Hkv"], r["N"], r["Lq"], r["kind"])]
        anchor = next((x for x in same if x["provider"] in ("sdpa_fp32", "reference_fp32")), None)
        r["speedup_vs_sdpa_fp32"] = anchor["ms"] / r["ms"] if anchor else float("nan")
        r["bw_fraction"] = r["gbs"] / roof["read_gbs"]
        r["flop_fraction"] = r["gflops"] / roof["gflops"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    keys = list(rows[0].keys())
    with open(RESULTS / "cpu_attention.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    lines = [f"# CPU attention (B=32, Hq=8, D=64, {args.threads} threads, best of {args.rounds})", "",
             f"Ceilings measured in the same run (best of before and after the kernels): {roof['read_gbs']:.1f} GB/s "
             f"read-only stream (the `% BW roof` column), {roof['bandwidth_gbs']:.1f} GB/s copy, {roof['gflops']:.1f} "
             "GFLOP/s fp32 matmul. Providers of one shape are timed interleaved round-robin (best of each). Speedup "
             "column: vs SDPA fp32 (softmax) or the reference's materialised computation (hstu) of the same shape.",
             "",
             "| Hkv | N | Lq | kind | provider | ms | MB read | GB/s | GFLOP/s | % BW roof | speedup |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['Hkv']} | {r['N']} | {r['Lq']} | {r['kind']} | {r['provider']} | {r['ms']:.2f} | "
                     f"{r['mbytes']:.0f} | {r['gbs']:.2f} | {r['gflops']:.2f} | {100 * r['bw_fraction']:.0f}% | "
                     f"{r['speedup_vs_sdpa_fp32']:.2f}x |")
    (RESULTS / "cpu_attention.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
