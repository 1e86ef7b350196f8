"""CPU attention report: the C++ kernel over compressed caches vs torch SDPA vs dequantize-then-SDPA, side by side.

Shapes (issue 4): B=32 users, Hq=8, Hkv in {8, 2}, D=64, cached history N in {1024, 4096, 16384}, request Lq in
{1, 16, 64}. Default: the acceptance shapes; ``--full`` the whole grid; ``--smoke`` tiny shapes, one round (CI).
Everything runs in ONE process with ``--threads`` threads (restored afterwards), the roofline ceilings
(benchmarks/roofline.py) measured in the same run.

Baselines are the best a user would write: SDPA on the fp32 / bf16 cache (no mask at Lq = 1, where the causal
request sees the whole cache; an explicit prefix mask otherwise, since SDPA's ``is_causal`` is top-left aligned);
dequantize-then-SDPA with our own C++ ``unpack_dequantize`` writing into a preallocated K/V buffer that already
holds the request tokens (no per-call ``torch.cat``); for HSTU one masked matmul over the fp32 cache
(benchmarks/torch_baselines.py) next to our padded reference. Every provider of a shape runs the same rounds,
interleaved round-robin, so outside load hits all of them alike.

Columns: ms (best of ``--rounds``), GB/s of the bytes the provider actually reads (compressed payload + scales +
zeros + queries/request tokens; SDPA: its fp32/bf16 K/V), GFLOP/s (4 * B * Hq * Lq * (N + Lq) * D), fraction of the
read-bandwidth ceiling, and speedup vs SDPA on the fp32 cache (softmax) / the torch masked matmul (hstu). Prints
the table; ``--save`` writes benchmarks/results/cpu_attention.{csv,md}, naming the CPU and the ISA variant of the
kernels (MALLOC_KERNELS_ISA=auto|portable|avx2|avx512; e.g. MALLOC_KERNELS_ISA=avx2 measures the AVX2 build on an
AVX-512 machine).
"""
from __future__ import annotations

import argparse
import csv
import importlib
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import malloc_kernels as mk  # noqa: E402
from machine import isa_variant, isa_variants, machine_label  # noqa: E402
from malloc_kernels.ops import cpp_quant, cpu  # noqa: E402
from malloc_kernels.core.validate import validate_call  # noqa: E402
from roofline import interleaved_best_seconds, roofline  # noqa: E402
from torch_baselines import hstu_masked_matmul  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def cache_bytes(c):
    n = c.k.nbytes + c.v.nbytes
    for t in (c.k_scale, c.k_zero, c.v_scale, c.v_zero, c.count):
        if t is not None:
            n += t.nbytes
    if c.residual is not None:
        n += cache_bytes(c.residual)
    return n


def with_isa(fn, isa):
    """``fn`` run under MALLOC_KERNELS_ISA=isa (read by the kernels per call), the previous value restored."""
    def run():
        old = os.environ.get("MALLOC_KERNELS_ISA")
        os.environ["MALLOC_KERNELS_ISA"] = isa
        try:
            return fn()
        finally:
            if old is None:
                os.environ.pop("MALLOC_KERNELS_ISA", None)
            else:
                os.environ["MALLOC_KERNELS_ISA"] = old
    return run


def run_config(B, Hq, Hkv, D, N, Lq, kind, rounds, providers, isas=None):
    """Time ``providers`` on one shape, interleaved; ``cpu_<fmt>@<p>%`` = the kernel over a cache evicted to p%
    of its tokens (recency policy) and then stored as ``fmt``. ``isas`` (several MALLOC_KERNELS_ISA values): every
    ``cpu_*`` provider once per variant, named ``cpu_<fmt>[<isa>]``, timed interleaved with the rest."""
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
    # causal request, cache fully visible: at Lq = 1 that is every key (no mask); otherwise SDPA needs an explicit
    # mask with the cache prefix (its is_causal aligns the diagonal top-left)
    mask = None if Lq == 1 else torch.ones(Lq, N + Lq, dtype=torch.bool).tril(N)
    if "sdpa_fp32" in providers and kind == "softmax":
        timed["sdpa_fp32"] = (lambda: F.scaled_dot_product_attention(q, full_k, full_v, attn_mask=mask,
                                                                     enable_gqa=True),
                              full_k.nbytes + full_v.nbytes + req_bytes)
    if "sdpa_bf16" in providers and kind == "softmax":
        qb, kb, vb = q.bfloat16(), full_k.bfloat16(), full_v.bfloat16()
        timed["sdpa_bf16"] = (lambda: F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, enable_gqa=True),
                              kb.nbytes + vb.nbytes + req_bytes // 2)
    # the handicapped baselines of earlier reports, kept for a side-by-side "before" column: SDPA handed a redundant
    # all-True mask at Lq = 1, and dequantize-then-SDPA through the PyTorch dequantizer plus a torch.cat per call
    if "sdpa_fp32_masked" in providers and kind == "softmax":
        full_mask = torch.ones(Lq, N + Lq, dtype=torch.bool).tril(N)
        timed["sdpa_fp32_masked"] = (lambda: F.scaled_dot_product_attention(q, full_k, full_v, attn_mask=full_mask,
                                                                            enable_gqa=True),
                                     full_k.nbytes + full_v.nbytes + req_bytes)
    if kind == "hstu":
        hstu_mask = torch.ones(Lq, N + Lq, dtype=torch.bool).tril(N)
        n_vis = N + torch.arange(1, Lq + 1, dtype=torch.float32)       # "original" norm: history + visible request
        if "torch_hstu_fp32" in providers:
            timed["torch_hstu_fp32"] = (lambda: hstu_masked_matmul(q, full_k, full_v, hstu_mask, n_vis, D ** -0.5),
                                        full_k.nbytes + full_v.nbytes + req_bytes)
        if "reference" in providers:
            full = mk.compress(hk, hv, "none")
            ref = importlib.import_module("malloc_kernels.reference.attention")
            timed["reference_fp32"] = (lambda: ref.attention(q, k, v, cache=full, kind="hstu", is_causal=True),
                                       cache_bytes(full) + req_bytes)
    for name in [m for m in providers if m.startswith("cpu_")]:
        fmt, _, pct = name[4:].partition("@")
        budget = float(pct.rstrip("%")) / 100 if pct else None
        # cpu_<fmt>_q8: the opt-in approximate int8-query scores (query_precision="int8")
        qp = "int8" if fmt.endswith("_q8") else "exact"
        fmt = fmt.removesuffix("_q8")
        meth = {"fp32": "none"}.get(fmt, fmt)
        if budget is not None:
            cache = mk.compress(hk, hv, "recent", budget=budget)
            if meth != "none":
                cache = mk.compress(hk, hv, "recent+" + meth, budget=budget)
        else:
            cache = mk.compress(hk, hv, meth)
        call = validate_call(q, k, v, cache=cache, kind=kind, is_causal=True, query_precision=qp)
        if isas and len(isas) > 1:
            for isa in isas:
                timed[f"{name}[{isa}]"] = (with_isa(lambda call=call: cpu.run(call), isa), cache_bytes(cache) + req_bytes)
        else:
            timed[name] = (lambda call=call: cpu.run(call), cache_bytes(cache) + req_bytes)
        if f"dequant_sdpa_{fmt}" in providers and kind == "softmax" and budget is None and qp == "exact":
            # the request's K/V sit at the end of a preallocated buffer; each call dequantizes the cache into the
            # front with the C++ unpacker (one fp32 write of the cache) and runs SDPA over the whole buffer
            kbuf, vbuf = full_k.clone(), full_v.clone()

            def deq(cache=cache, kbuf=kbuf, vbuf=vbuf):
                for buf, codes, sc, zr, f, axis in (
                        (kbuf, cache.k, cache.k_scale, cache.k_zero, cache.k_format, cache.k_axis),
                        (vbuf, cache.v, cache.v_scale, cache.v_zero, cache.v_format, "token")):
                    buf[:, :, :N].copy_(cpp_quant.unpack_dequantize(codes, sc, zr, cache.length, f,
                                                                    cache.group_size, axis, D))
                return F.scaled_dot_product_attention(q, kbuf, vbuf, attn_mask=mask, enable_gqa=True)
            timed[f"dequant_sdpa_{fmt}"] = (deq, cache_bytes(cache) + req_bytes)
        if f"dequant_py_cat_sdpa_{fmt}" in providers and kind == "softmax" and budget is None and qp == "exact":
            def deq_py(cache=cache):
                dk, dv = cache.dequantize(torch.float32)
                return F.scaled_dot_product_attention(q, torch.cat([dk, k], 2), torch.cat([dv, v], 2),
                                                      attn_mask=mask, enable_gqa=True)
            timed[f"dequant_py_cat_sdpa_{fmt}"] = (deq_py, cache_bytes(cache) + req_bytes)
    check_same_math(timed, kind)
    best = interleaved_best_seconds({n: f for n, (f, _) in timed.items()}, rounds)
    rows = []
    for name, (_, nbytes) in timed.items():
        ms = best[name] * 1e3
        rows.append(dict(B=B, Hq=Hq, Hkv=Hkv, D=D, N=N, Lq=Lq, kind=kind, provider=name, ms=ms,
                         gbs=nbytes / ms / 1e6, gflops=flops / ms / 1e6, mbytes=nbytes / 1e6))
    return rows


def check_same_math(timed, kind):
    """Each baseline returns the attention our kernel computes on the same data (SDPA / the torch masked matmul /
    the reference vs the kernel on the fp32 cache; dequantize-then-SDPA vs the kernel on the same codes), so no
    speedup is against a baseline that computes something else."""
    outs = {}
    for name, (fn, _) in timed.items():
        out = fn()
        outs[name] = (out.output if hasattr(out, "output") else out).float()
    pairs = [(n, "cpu_fp32", 2e-2 if "bf16" in n else 1e-4)
             for n in ("sdpa_fp32", "sdpa_fp32_masked", "sdpa_bf16", "torch_hstu_fp32", "reference_fp32")]
    pairs += [(n, "cpu_" + n.rsplit("_", 1)[1], 1e-4) for n in outs if n.startswith("dequant_")]

    def resolve(name):  # with --isa the kernel's providers are cpu_<fmt>[<isa>]: compare with the first variant
        return name if name in outs else next((m for m in outs if m.startswith(name + "[")), name)
    pairs = [(base, resolve(ours), tol) for base, ours, tol in pairs]
    # every other ISA variant of a cache against the first one
    pairs += [(n, resolve(n.split("[")[0]), 1e-4) for n in outs if "[" in n and n != resolve(n.split("[")[0])]
    for base, ours, tol in pairs:
        if base in outs and ours in outs:
            torch.testing.assert_close(outs[base], outs[ours], rtol=tol, atol=tol, msg=f"{base} vs {ours} ({kind})")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="the whole grid (slow)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, one round: checks the report runs (CI)")
    ap.add_argument("--save", action="store_true", help="write benchmarks/results/cpu_attention.{csv,md}")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--isa", default=None,
                    help="comma-separated MALLOC_KERNELS_ISA values: each cpu_* provider timed once per variant, "
                         "interleaved (e.g. avx2,avx512); default: the current setting only")
    args = ap.parse_args(argv)
    prev = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        report(args)
    finally:
        torch.set_num_threads(prev)


def report(args):
    if args.smoke:
        args.rounds = 1
    before = roofline(args.threads) if not args.smoke else dict(read_gbs=1.0, bandwidth_gbs=1.0, gflops=1.0)
    print(f"roofline: {before['read_gbs']:.1f} GB/s read, {before['bandwidth_gbs']:.1f} GB/s copy, "
          f"{before['gflops']:.1f} GFLOP/s fp32 matmul ({args.threads} threads)")
    base = ["sdpa_fp32", "sdpa_bf16", "cpu_fp32", "cpu_int8", "cpu_int4", "cpu_int2", "dequant_sdpa_int4"]
    evicted = ["cpu_fp32@25%", "cpu_int4@25%"]  # next to the full caches of the same run: time vs kept entries
    q8 = ["cpu_int8_q8", "cpu_int4_q8", "cpu_int2_q8"]  # the opt-in int8-query mode (approximate) next to exact
    legacy = ["sdpa_fp32_masked", "dequant_py_cat_sdpa_int4"]   # the earlier reports' baselines, side by side
    if args.full:
        configs = [(Hkv, N, Lq, "softmax", base) for Hkv in (8, 2) for N in (1024, 4096, 16384) for Lq in (1, 16, 64)]
        configs[configs.index((8, 4096, 1, "softmax", base))] = (8, 4096, 1, "softmax", base + evicted)
    else:
        configs = [(8, 4096, 1, "softmax", base + evicted + legacy + q8), (2, 4096, 1, "softmax", base + q8),
                   (8, 4096, 16, "softmax", base + legacy[1:])]
    configs += [(8, 4096, 16, "hstu", ["torch_hstu_fp32", "reference", "cpu_fp32", "cpu_int4"])]
    B = 32
    if args.smoke:
        B = 2
        configs = [(2, 64, Lq, kind, prov) for _, _, Lq, kind, prov in configs[1:] if Lq > 1 or kind == "softmax"]
        configs.insert(0, (8, 64, 1, "softmax", base + evicted + legacy + q8))
    isas = args.isa.split(",") if args.isa else None
    print(f"ISA variant of the C++ kernels: {isa_variant()}" + (f"; timed side by side: {isas}" if isas else ""))
    rows = []
    for Hkv, N, Lq, kind, prov in configs:
        rs = run_config(B, 8, Hkv, 64, N, Lq, kind, args.rounds, prov, isas)
        rows += rs
        for r in rs:
            p = r["provider"]
            r["isa"] = p.split("[")[1].rstrip("]") if "[" in p else isa_variants().get("attention", "none")
            print(f"Hkv={Hkv} N={N} Lq={Lq} {kind:7s} {p:24s} {r['ms']:9.2f} ms {r['gbs']:7.2f} GB/s "
                  f"{r['gflops']:7.2f} GFLOP/s  isa={r['isa'] if p.startswith('cpu_') else '-'}", flush=True)
    # ceilings: the better of the measurements before and after the kernels (outside load only ever lowers them)
    after = roofline(args.threads) if not args.smoke else before
    roof = {k: max(before[k], after[k]) for k in ("read_gbs", "bandwidth_gbs", "gflops")}
    # speedups vs SDPA fp32 / reference of the same shape, fraction of the read-bandwidth ceiling
    for r in rows:
        same = [x for x in rows if (x["Hkv"], x["N"], x["Lq"], x["kind"]) == (r["Hkv"], r["N"], r["Lq"], r["kind"])]
        anchor = next((x for x in same if x["provider"] in ("sdpa_fp32", "torch_hstu_fp32")), None)
        r["speedup_vs_sdpa_fp32"] = anchor["ms"] / r["ms"] if anchor else float("nan")
        r["bw_fraction"] = r["gbs"] / roof["read_gbs"]
        r["flop_fraction"] = r["gflops"] / roof["gflops"]
    lines = [f"# CPU attention (B={B}, Hq=8, D=64, {args.threads} threads, best of {args.rounds})", "",
             f"Machine: {machine_label()}. Generated by `python benchmarks/report_cpu.py --save`.", "",
             f"Ceilings measured in the same run (best of before and after the kernels): {roof['read_gbs']:.1f} GB/s "
             f"read-only stream (the `% BW roof` column), {roof['bandwidth_gbs']:.1f} GB/s copy, {roof['gflops']:.1f} "
             "GFLOP/s fp32 matmul. Providers of one shape are timed interleaved round-robin, the same rounds each "
             "(best of each). Speedup column: vs SDPA on the fp32 cache (softmax; no mask at Lq = 1) or vs the torch "
             "masked matmul over the fp32 cache (hstu) of the same shape. `dequant_sdpa_*`: our C++ "
             "`unpack_dequantize` into a preallocated K/V buffer, then SDPA. `cpu_<fmt>_q8`: the opt-in, "
             "APPROXIMATE int8-query mode (`query_precision=\"int8\"`) on the same cache.",
             "",
             "| Hkv | N | Lq | kind | provider | ms | MB read | GB/s | GFLOP/s | % BW roof | % FLOP roof | speedup |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['Hkv']} | {r['N']} | {r['Lq']} | {r['kind']} | {r['provider']} | {r['ms']:.2f} | "
                     f"{r['mbytes']:.0f} | {r['gbs']:.2f} | {r['gflops']:.2f} | {100 * r['bw_fraction']:.0f}% | "
                     f"{100 * r['flop_fraction']:.0f}% | {r['speedup_vs_sdpa_fp32']:.2f}x |")
    print("\n".join(lines))
    if args.save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        with open(RESULTS / "cpu_attention.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
            w.writeheader()
            w.writerows(rows)
        (RESULTS / "cpu_attention.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
