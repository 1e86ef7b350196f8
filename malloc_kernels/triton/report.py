"""``python -m malloc_kernels.triton.report``: compile every Triton kernel specialisation for sm_80 and sm_90.

Prints (and writes to ``benchmarks/results/triton_report.md``) a table of kernel, arch, registers, spills,
shared memory, warps and whether the intended tensor-core instructions are present (``mma.sync`` on sm_80,
``wgmma``/``mma.sync`` on sm_90), followed by a roofline estimate per decode shape: the bytes the decode kernel
must move (compressed cache + scales + positions/counts + queries/outputs) divided by the H100 SXM HBM3 bandwidth
(3.35 TB/s) -- the latency a GPU user should expect the kernel to approach. Exits non-zero if any specialisation
fails to compile or spills. Needs Triton in compile mode: run it without ``TRITON_INTERPRET=1``.

Options: ``--only SUBSTR ...`` compiles the specs whose names contain a substring; ``--arch 80 90``;
``--out PATH`` (``-`` for no file).
"""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from ..cli_args import Parser, guard

H100_BW = 3.35e12  # bytes/s, H100 SXM HBM3

# (label, users, kv heads, query heads, head dim, cached tokens, format bits or dtype bytes*8, k_axis group)
DECODE_SHAPES = [
    ("fp16 cache, 8k tokens", 32, 8, 32, 128, 8192, 16),
    ("int8 cache, 8k tokens", 32, 8, 32, 128, 8192, 8),
    ("fp8 cache, 8k tokens", 32, 8, 32, 128, 8192, 8),
    ("KIVI-4 cache, 8k tokens", 32, 8, 32, 128, 8192, 4),
    ("KIVI-2 cache, 8k tokens", 32, 8, 32, 128, 8192, 2),
    ("fp16 cache, 2k tokens (HSTU user)", 256, 2, 2, 64, 2048, 16),
    ("KIVI-4 cache, 2k tokens (HSTU user)", 256, 2, 2, 64, 2048, 4),
]


def decode_bytes(B, Hkv, Hq, D, N, bits, group=32):
    """Bytes one decode step must read/write: K and V payloads, fp16 scale+zero per group (KIVI: keys per
    ``group`` entries x channel, values per entry x ``group`` channels; int8/fp8: one per entry), int32 positions,
    fp16 queries and outputs."""
    payload = 2 * B * Hkv * N * math.ceil(D * bits / 8)
    if bits == 16:
        scales = 0
    elif bits == 8:
        scales = 2 * B * Hkv * N * 4
    else:
        scales = B * Hkv * (math.ceil(N / group) * D + N * (D // group)) * 4
    positions = B * Hkv * N * 4
    qo = 2 * B * Hq * D * 2
    return payload + scales + positions + qo


def roofline_lines():
    lines = ["| decode shape | B | Hkv | Hq | D | N | bytes moved | H100 roofline (3.35 TB/s) |",
             "|---|---|---|---|---|---|---|---|"]
    for label, B, Hkv, Hq, D, N, bits in DECODE_SHAPES:
        nb = decode_bytes(B, Hkv, Hq, D, N, bits)
        lines.append(f"| {label} | {B} | {Hkv} | {Hq} | {D} | {N} | {nb / 1e6:.1f} MB | {nb / H100_BW * 1e6:.1f} us |")
    return lines


def main(argv=None) -> int:
    ap = Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--arch", nargs="*", type=int, default=[80, 90])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / "benchmarks" / "results" /
                                         "triton_report.md"))
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("the AOT report needs Triton in compile mode: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    from .aot import collect_specs, compile_spec
    specs, notes = collect_specs(only=args.only)
    if not specs:
        print("no specialisations selected", file=sys.stderr)
        return 2
    rows = ["| kernel | arch | registers | spills (B st/ld) | smem (B) | warps | MMA | note |",
            "|---|---|---|---|---|---|---|---|"]
    failures = []
    t0 = time.time()
    for spec in specs:
        for arch in args.arch:
            r = compile_spec(spec, arch)
            if not r.ok:
                failures.append(f"{spec.name} sm_{arch}: {r.error}")
                rows.append(f"| {spec.name} | sm_{arch} | FAILED | | | {spec.num_warps} | | {r.error} |")
            else:
                if r.spills:
                    failures.append(f"{spec.name} sm_{arch}: {r.spill_stores}/{r.spill_loads} bytes spilled")
                mma = (r.mma_kind if r.mma else "NO") if spec.mma_expected else ("n/a" if not r.mma else r.mma_kind)
                rows.append(f"| {spec.name} | sm_{arch} | {r.registers} | {r.spill_stores}/{r.spill_loads} | "
                            f"{r.shared} | {spec.num_warps} | {mma} | {spec.note} |")
            print(rows[-1], flush=True)
            if spec.mma_expected and r.ok and not r.mma:
                failures.append(f"{spec.name} sm_{arch}: intended tensor-core MMA missing from the PTX")
    text = ["# Triton AOT report", "",
            f"{len(specs)} specialisations x archs {args.arch}, compiled in {time.time() - t0:.0f} s with "
            "triton.compile(target=GPUTarget('cuda', cc, 32)); registers/spills from the bundled ptxas -v.", ""]
    text += rows + ["", "## Decode roofline (bytes that must move / H100 bandwidth)", ""] + roofline_lines()
    if notes:
        text += ["", "Notes:"] + [f"- {n}" for n in notes]
    if failures:
        text += ["", "FAILURES:"] + [f"- {f}" for f in failures]
    print("\n".join(text[len(rows) + 4:]))
    if args.out != "-" and args.only is None:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(text) + "\n")
        print(f"wrote {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(guard('python -m malloc_kernels.triton.report', main))
