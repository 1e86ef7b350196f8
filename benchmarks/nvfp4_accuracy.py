"""Accuracy of attention over an NVFP4 cache next to the other 4-bit (and 8-bit) formats.

Relative error ``||o_q - o|| / ||o||`` of the attention output over the compressed cache (``o_q``) against the same
attention over the uncompressed cache (``o``), both computed by the float64 reference, for decode (one query per
head, GQA 4:2) with D = 64 and N = 1024 cached entries, two kinds of history: Gaussian keys/values, and keys with a
few outlier channels (x8 on 4 of 64 channels: what per-channel key quantization, KIVI, is designed for). Also the
stored bits per value (payload + scales/zeros, positions excluded).

    python benchmarks/nvfp4_accuracy.py            # print the table
    python benchmarks/nvfp4_accuracy.py --save     # also write benchmarks/results/nvfp4_accuracy.md
"""
import argparse
import platform
from pathlib import Path

import torch

import malloc_kernels as mk

METHODS = ("int8", "fp8", "nvfp4", "int4", "kivi4", "int2")


def _history(kind: str, B: int, H: int, N: int, D: int, g: torch.Generator):
    k = torch.randn(B, H, N, D, generator=g)
    v = torch.randn(B, H, N, D, generator=g)
    if kind == "outlier channels":
        k[..., :4] *= 8.0
    return k, v


def measure(B=4, H=2, Hq=4, N=1024, D=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for hist in ("gaussian", "outlier channels"):
        k, v = _history(hist, B, H, N, D, g)
        q = torch.randn(B, Hq, 1, D, generator=g, dtype=torch.float64)
        kr = torch.randn(B, H, 1, D, generator=g, dtype=torch.float64)
        vr = torch.randn(B, H, 1, D, generator=g, dtype=torch.float64)
        full_cache = mk.compress(k.double(), v.double(), "none")
        base_bytes = None
        for method in METHODS:
            c = mk.compress(k.double(), v.double(), method)      # codes are computed in fp32 either way
            # payload + scales/zeros only (positions and headers excluded); the fp32 residual of kivi4 counted
            # at 16 bits per value, as a serving system would store it in fp16
            pos_bytes = B * H * N * 4 + B * (4 * H + 4) + (B * (4 * H + 4) if c.residual is not None else 0)
            # (main + residual entries together are the N history entries, so N positions in all)
            res_vals = 0 if c.residual is None else 2 * int(c.residual.length.sum()) * D
            total = int(c.nbytes_per_user().sum()) - pos_bytes - res_vals * 8 + res_vals * 2
            bits = total * 8 / (2 * B * H * N * D)
            row = {"history": hist, "method": method, "bits/value": bits}
            for kind in ("softmax", "hstu"):
                ref = mk.attention(q, kr, vr, cache=full_cache, kind=kind, backend="reference", enable_gqa=True)
                out = mk.attention(q, kr, vr, cache=c, kind=kind, backend="reference", enable_gqa=True)
                row[kind] = float((out - ref).norm() / ref.norm())
            rows.append(row)
    return rows


def to_markdown(rows) -> str:
    lines = ["# NVFP4 accuracy next to the other cache formats", "",
             "Relative error of decode attention over the compressed cache vs over the uncompressed one (float64 "
             "reference for both; B=4, Hkv=2, Hq=4, D=64, N=1024; `python benchmarks/nvfp4_accuracy.py --save`, "
             f"{platform.machine()}, torch {torch.__version__}). `kivi4` keeps its default full-precision window "
             "(the 32 newest entries, in the bits column too); the others store every entry quantized. int4 is "
             "KIVI's layout without the window (keys per channel, values per token, groups of 32, fp16 "
             "scale + zero).", "",
             "| history | method | bits / value | softmax rel. error | hstu rel. error |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['history']} | {r['method']} | {r['bits/value']:.2f} | {r['softmax']:.4f} | "
                     f"{r['hstu']:.4f} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--save", action="store_true", help="write benchmarks/results/nvfp4_accuracy.md")
    args = ap.parse_args()
    md = to_markdown(measure())
    print(md)
    if args.save:
        out = Path(__file__).resolve().parent / "results" / "nvfp4_accuracy.md"
        out.write_text(md)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
