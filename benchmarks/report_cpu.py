"""CPU attention report: the C++ kernel over compressed caches vs torch SDPA vs dequantize-then-SDPA, side by side.

Shapes (issue 4): B=32 users, Hq=8, Hkv in {8, 2}, D=64, cached history N in {1024, 4096, 16384}, request Lq in
{1, 16, 64}. ``--quick`` (default) runs the acceptance shapes only; ``--full`` the whole grid. Everything runs in
ONE process with 2 threads, the roofline ceilings (benchmarks/roofline.py) measured in the same run.

Columns: ms (best of ``--rounds``), GB/s of the bytes the provider actually reads (compressed payload + scales +
zeros + queries/request tokens; SDPA: its fp32/bf16 K/V), GFLOP/s (4 * B * Hq * Lq * (N + Lq) * D), fraction of the
bandwidth roofline, and speedup vs SDPA on the fp32 cache. Writes benchmarks/results/cpu_attention.{csv,md}.
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
from malloc_kernels.ops.validate import validate_call  # noqa: E402
from roofline import best_seconds, roofline  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def best_ms(fn, rounds):
    return best_seconds(fn, rounds) * 1e3


def cache_bytes(c):
    n = c.k.nbytes + c.v.nbytes
    for t in (c.k_scale, c.k_zero, c.v_scale, c.v_zero, c.count):
        if t is not None:
            n += t.nbytes
    if c.residual is not None:
        n += cache_bytes(c.residual)
    return n


def run_config(B, Hq, Hkv, D, N, Lq, kind, rounds, providers, budget=None):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, Hq, Lq, D, generator=g)
    k = torch.randn(B, Hkv, Lq, D, generator=g)
    v = torch.randn(B, Hkv, Lq, D, generator=g)
    hk = torch.randn(B, Hkv, N, D, generator=g)
    hv = torch.randn(B, Hkv, N, D, generator=g)
    flops = 4.0 * B * Hq * Lq * (N + Lq) * D
    req_bytes = q.nbytes * 2 + k.nbytes + v.nbytes
    rows = []

    def add(provider, ms, nbytes):
        rows.append(dict(B=B, Hq=Hq, Hkv=Hkv, D=D, N=N, Lq=Lq, kind=kind, provider=provider, ms=ms,
                         gbs=nbytes / ms / 1e6, gflops=flops / ms / 1e6, mbytes=nbytes / 1e6))

    full_k, full_v = torch.cat([hk, k], 2), torch.cat([hv, v], 2)
    # causal request, cache fully visible: SDPA needs an explicit mask with the cache prefix.
    mask = torch.ones(Lq, N + Lq, dtype=torch.bool).tril(N)
    if "sdpa_fp32" in providers and kind == "softmax":
        add("sdpa_fp32", best_ms(lambda: F.scaled_dot_product_attention(q, full_k, full_v, attn_mask=mask,
                                                                       enable_gqa=True), rounds),
            full_k.nbytes + full_v.nbytes + req_bytes)
    if "sdpa_bf16" in providers and kind == "softmax":
        qb, kb, vb = q.bfloat16(), full_k.bfloat16(), full_v.bfloat16()
        add("sdpa_bf16", best_ms(lambda: F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, enable_gqa=True),
                                 rounds), kb.nbytes + vb.nbytes + req_bytes // 2)
    if kind == "hstu" and "reference" in providers:
        cache = mk.compress(hk, hv, "none")
        ref = importlib.import_module("malloc_kernels.reference.attention")
        add("reference_fp32", best_ms(lambda: ref.attention(q, k, v, cache=cache, kind="hstu", is_causal=True),
                                      max(1, rounds - 1)), cache_bytes(cache) + req_bytes)
    for method in [m for m in providers if m.startswith("cpu_")]:
        fmt = method[4:]
        meth = {"fp32": "none"}.get(fmt, fmt)
        if budget is not None:
            cache = mk.compress(hk, hv, "recent", budget=budget)
            if meth != "none":
                cache = mk.compress(hk, hv, "recent+" + meth, budget=budget)
        else:
            cache = mk.compress(hk, hv, meth)
        call = validate_call(q, k, v, cache=cache, kind=kind, is_causal=True)
        name = method + (f"@{budget:.0%}" if budget is not None else "")
        add(name, best_ms(lambda: cpu.run(call), rounds), cache_bytes(cache) + req_bytes)
        if f"dequant_sdpa_{fmt}" in providers and kind == "softmax":
            def deq():
                dk, dv = cache.dequantize(torch.float32)
                return F.scaled_dot_product_attention(q, torch.cat([dk, k], 2), torch.cat([dv, v], 2),
                                                      attn_mask=mask, enable_gqa=True)
            add(f"dequant_sdpa_{fmt}", best_ms(deq, rounds), cache_bytes(cache) + req_bytes)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="the whole grid (slow)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    roof = roofline(args.threads)
    print(f"roofline: {roof['bandwidth_gbs']:.1f} GB/s copy, {roof['gflops']:.1f} GFLOP/s fp32 matmul "
          f"({args.threads} threads)")
    base = ["sdpa_fp32", "sdpa_bf16", "cpu_fp32", "cpu_int8", "cpu_int4", "cpu_int2", "dequant_sdpa_int4"]
    configs = []
    if args.full:
        for Hkv in (8, 2):
            for N in (1024, 4096, 16384):
                for Lq in (1, 16, 64):
                    configs.append((Hkv, N, Lq, "softmax", base, None))
    else:
        configs = [(8, 4096, 1, "softmax", base, None), (2, 4096, 1, "softmax", base, None),
                   (8, 4096, 16, "softmax", base, None)]
    configs += [(8, 4096, 16, "hstu", ["reference", "cpu_fp32", "cpu_int4"], None),
                (8, 4096, 1, "softmax", ["cpu_fp32", "cpu_int4"], 0.25)]
    rows = []
    for Hkv, N, Lq, kind, prov, budget in configs:
        rs = run_config(32, 8, Hkv, 64, N, Lq, kind, args.rounds, prov, budget)
        rows += rs
        for r in rs:
            print(f"Hkv={Hkv} N={N} Lq={Lq} {kind:7s} {r['provider']:20s} {r['ms']:9.2f} ms {r['gbs']:7.2f} GB/s "
                  f"{r['gflops']:7.2f} GFLOP/s", flush=True)
    # speedups vs SDPA fp32 / reference / full cache of the same shape, roofline fractions
    for r in rows:
        same = [x for x in rows if (x["Hkv"], x["N"], x["Lq"], x["kind"]) == (r["Hkv"], r["N"], r["Lq"], r["kind"])]
        anchor = next((x for x in same if x["provider"] in ("sdpa_fp32", "reference_fp32")), None)
        r["speedup_vs_sdpa_fp32"] = anchor["ms"] / r["ms"] if anchor else float("nan")
        r["bw_fraction"] = r["gbs"] / roof["bandwidth_gbs"]
        r["flop_fraction"] = r["gflops"] / roof["gflops"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    keys = list(rows[0].keys())
    with open(RESULTS / "cpu_attention.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    lines = [f"# CPU attention (B=32, Hq=8, D=64, {args.threads} threads, best of {args.rounds})", "",
             f"Roofline measured in the same run: {roof['bandwidth_gbs']:.1f} GB/s (large copy), "
             f"{roof['gflops']:.1f} GFLOP/s (fp32 matmul). Speedup column: vs SDPA fp32 (softmax) or the reference's "
             "materialised computation (hstu) of the same shape.", "",
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
