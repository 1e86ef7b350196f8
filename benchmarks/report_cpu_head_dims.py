"""Quantized vs native cache per head dim: the C++ kernel over none / int8 / int4 / int2 caches of the same call.

Issue-21 table: B=128 users, Hq = Hkv = 2, N=700 cached entries, request Lq in {8, 1}, kinds hstu and softmax, head
dims 32 / 64 / 128, ONE thread; ms = best of ``--rounds`` with all providers of a shape timed interleaved (and every
ISA variant named in ``--isa`` interleaved with them, through MALLOC_KERNELS_ISA), so outside load hits all alike.
The acceptance rule: a quantized cache is never slower than the native one for the same call (speedup >= 1).
Writes benchmarks/results/cpu_head_dims.{csv,md} (with ``--save``), naming the CPU and the ISA variants.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this tree's package, not an installed one
import malloc_kernels as mk  # noqa: E402
from machine import cpu_model, isa_variants  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FORMATS = ["none", "int8", "int4", "int2"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--isa", default="auto", help="comma-separated MALLOC_KERNELS_ISA values timed side by side")
    ap.add_argument("--dims", default="32,64,128")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--save", action="store_true", help="write benchmarks/results/cpu_head_dims.{csv,md}")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    isas = args.isa.split(",")
    old = os.environ.get("MALLOC_KERNELS_ISA")
    print(f"CPU: {cpu_model()}; ISA variants timed: {isas} (this CPU runs: {isa_variants().get('supported')})")
    B, H, N = 128, 2, 700
    rows = []
    for D in (int(d) for d in args.dims.split(",")):
        g = torch.Generator().manual_seed(D)
        hk, hv = torch.randn(B, H, N, D, generator=g), torch.randn(B, H, N, D, generator=g)
        caches = {f: mk.compress(hk, hv, f) for f in FORMATS}
        for kind, Lq in (("hstu", 8), ("softmax", 8), ("hstu", 1), ("softmax", 1)):
            q, k, v = (torch.randn(B, H, Lq, D, generator=g) for _ in range(3))
            best = {(i, f): float("inf") for i in isas for f in FORMATS}
            for _ in range(args.rounds):
                for key in best:
                    os.environ["MALLOC_KERNELS_ISA"] = key[0]
                    t = time.perf_counter()
                    mk.attention(q, k, v, cache=caches[key[1]], backend="cpu", is_causal=True, kind=kind)
                    best[key] = min(best[key], time.perf_counter() - t)
            for i in isas:
                os.environ["MALLOC_KERNELS_ISA"] = i
                variant = isa_variants().get("attention", "?")
                r = dict(D=D, kind=kind, Lq=Lq, isa=variant, **{f"ms_{f}": 1e3 * best[(i, f)] for f in FORMATS})
                r.update({f"speedup_{f}": best[(i, "none")] / best[(i, f)] for f in FORMATS[1:]})
                rows.append(r)
                print(f"D={D:3d} {kind:7s} Lq={Lq} isa={variant:8s} ms none/int8/int4/int2 = "
                      + " / ".join(f"{r['ms_' + f]:.2f}" for f in FORMATS) + "   quantized speedup vs none: "
                      + " ".join(f"{r['speedup_' + f]:.2f}x" for f in FORMATS[1:]), flush=True)
    if old is None:
        os.environ.pop("MALLOC_KERNELS_ISA", None)
    else:
        os.environ["MALLOC_KERNELS_ISA"] = old
    if args.save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        with open(RESULTS / "cpu_head_dims.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
            w.writeheader()
            w.writerows(rows)
        lines = [f"# Quantized vs native cache per head dim (B={B}, Hq=Hkv={H}, N={N}, 1 thread, best of "
                 f"{args.rounds}, interleaved)", "", f"CPU: {cpu_model()}", "",
                 "| D | kind | Lq | ISA | ms none | ms int8 | ms int4 | ms int2 | int8 vs none | int4 vs none | "
                 "int2 vs none |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['D']} | {r['kind']} | {r['Lq']} | {r['isa']} | "
                         + " | ".join(f"{r['ms_' + f]:.2f}" for f in FORMATS) + " | "
                         + " | ".join(f"{r['speedup_' + f]:.2f}x" for f in FORMATS[1:]) + " |")
        (RESULTS / "cpu_head_dims.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
