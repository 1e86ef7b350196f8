"""``python -m malloc_kernels.triton.report``: compile every Triton kernel specialisation for sm_80 and sm_90.

Prints (and writes to ``benchmarks/results/triton_report.md``) per specialisation: registers, spills, shared
memory, warps, resident blocks per SM, the tensor-core instructions in the PTX (``mma.sync`` on sm_80,
``wgmma``/``mma.sync`` on sm_90) and the SASS instruction mix of its main loop per key (``sass.py``: MMA, FP32,
shared and global loads). Then, for the decode and append shapes of the README (and larger ones), the kernel
``backend="auto"`` picks on a GPU and why, its tiles and splits, and the two floors of its time on A100 and H100:
bytes / HBM bandwidth and main-loop warp-instructions / issue rate -- whichever is larger is what bounds it.
Exits non-zero if any specialisation fails to compile or spills. Needs Triton in compile mode: run it without
``TRITON_INTERPRET=1``.

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


def _mix_cells(r) -> str:
    if r.mix is None or not r.keys_per_iteration:
        return "- | - | - | - | -"
    pk = r.mix.per_key(r.keys_per_iteration)
    return f"{pk['mma']:.2f} | {pk['fp32']:.1f} | {pk['lds']:.2f} | {pk['ldg']:.2f} | {pk['total']:.1f}"


# (label, users, query heads, kv heads, head dim, cached tokens, request tokens Lq, cache format, k axis)
# The first three are the README's CPU benchmark shapes (decode and 16-token append over a 4-/2-bit cache).
SHAPES = [
    ("README decode, KIVI-4", 32, 8, 8, 64, 4096, 1, "int4", "channel"),
    ("README decode, KIVI-2", 32, 8, 8, 64, 4096, 1, "int2", "channel"),
    ("README append Lq=16, KIVI-4", 32, 8, 8, 64, 4096, 16, "int4", "channel"),
    ("GQA 4:1 decode, fp16 cache 8k", 32, 32, 8, 128, 8192, 1, "float", "token"),
    ("GQA 4:1 decode, KIVI-4 8k", 32, 32, 8, 128, 8192, 1, "int4", "channel"),
    ("prefill 512 tokens, no cache", 32, 8, 8, 64, 0, 512, "float", "token"),
]


def _shape_call(B, Hq, Hkv, D, N, Lq, fmt):
    """The attributes ``choose_config`` reads, for a shape too large to allocate here."""
    from types import SimpleNamespace

    import torch
    cache = None if N == 0 else SimpleNamespace(is_quantized=fmt != "float", capacity=N, residual=None)
    return SimpleNamespace(group_size=Hq // Hkv, head_dim=D, max_q_len=Lq, max_k_len=Lq, cache=cache,
                           has_bias=False, dtype=torch.float16, batch_size=B, num_kv_heads=Hkv,
                           device=torch.device("cpu"), attn_mask=None)


def _shape_bytes(B, Hq, Hkv, D, N, Lq, fmt):
    bits = {"float": 16, "int8": 8, "fp8": 8, "int4": 4, "int2": 2}[fmt]
    cache = decode_bytes(B, Hkv, Hq, D, N, bits) if N else 0
    return cache + 2 * B * (Hq + 2 * Hkv) * Lq * D * 2    # + fp16 queries, request keys/values, outputs


def shape_lines(archs, compile_spec):
    """The README-shape section: auto's kernel and why, its launch, and per arch the floors of its time."""
    from ..core.gpu_policy import cuda_decode_preferred
    from .aot import AotSpec
    from .attention import (DECODE_MAX_ROWS, _example_call, append_kernel_args, choose_config,
                            decode_kernel_args, kernel_args)
    from .attention_common import attention_forward_kernel
    from . import sass
    lines = ["| shape | B, Hq, Hkv, D, N, Lq | auto picks (why) | tiles / splits | arch | regs | blocks/SM | "
             "MMA/key | instr/key | memory floor (us) | issue floor (us) | bound |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    failures = []
    for label, B, Hq, Hkv, D, N, Lq, fmt, axis in SHAPES:
        rows = (Hq // Hkv) * Lq
        path = "decode" if rows <= DECODE_MAX_ROWS else "append"
        if cuda_decode_preferred(fmt != "float" and N > 0, D, rows):
            picks = ("cuda decode (core/gpu_policy.py: its modeled issue floor, benchmarks/results/cuda_ptxas.md, "
                     "is below Triton's; the rest of this row is Triton's split-K decode, for comparison)")
        else:
            picks = (f"triton {path} (CUDA C++ decode not preferred: core/gpu_policy.py; G*Lq={rows} "
                     + ("<= 64: split-K decode)" if path == "decode" else "> 64: query tiles)"))
        kw = dict(Hq=Hq, Hkv=Hkv, D=D, Lq=Lq, C=64 if N else 0, causal=True)
        if fmt != "float":
            kw.update(k_format=fmt, v_format=fmt, k_axis=axis, group_size=32)
        example = _example_call(**kw)
        for arch in archs:
            cfg = choose_config(_shape_call(B, Hq, Hkv, D, N, Lq, fmt), path=path, arch=arch)
            ex_cfg = choose_config(example, path=path, block_m=cfg.block_m, block_n=cfg.block_n, arch=arch)
            args, consts, buffers = kernel_args(example, ex_cfg, dot_lowp=True)
            if path == "decode":
                kargs, kconsts, _, _ = decode_kernel_args(example, ex_cfg, args, consts, buffers)
                iterations = B * Hkv * -(-(N + Lq) // cfg.block_n)
                launch = f"BLOCK_M={cfg.block_m} BLOCK_N={cfg.block_n}, {cfg.num_splits} splits of {cfg.split_size}"
            else:
                kargs, kconsts = append_kernel_args(example, ex_cfg, args, consts, buffers)
                tiles = -(-rows // cfg.block_m)
                iterations = B * Hkv * tiles * -(-(N + Lq) // cfg.block_n)
                launch = f"BLOCK_M={cfg.block_m} BLOCK_N={cfg.block_n}, {tiles} tiles, {cfg.num_stages} stages"
            spec = AotSpec.from_args(f"shape/{label}", attention_forward_kernel, kargs, kconsts,
                                     num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            r = compile_spec(spec, arch)
            if not r.ok or r.mix is None:
                failures.append(f"shape {label} sm_{arch}: {r.error or 'no main loop found'}")
                continue
            blocks = sass.occupancy(arch, r.registers, 32 * cfg.num_warps, r.shared)
            mem, issue = sass.bounds(arch, _shape_bytes(B, Hq, Hkv, D, N, Lq, fmt), iterations, r.mix.total,
                                     cfg.num_warps)
            pk = r.mix.per_key(cfg.block_n)
            lines.append(f"| {label} | {B}, {Hq}, {Hkv}, {D}, {N}, {Lq} | {picks} | {launch} | "
                         f"sm_{arch} | {r.registers} | {blocks} | {pk['mma']:.2f} | {pk['total']:.1f} | "
                         f"{mem * 1e6:.1f} | {issue * 1e6:.1f} | {'memory' if mem >= issue else 'issue'} |")
            print(lines[-1], flush=True)
    return lines, failures


def main(argv=None) -> int:
    ap = Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--arch", nargs="*", type=int, default=[80, 90])
    ap.add_argument("--no-shapes", action="store_true", help="skip the README-shape section")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / "benchmarks" / "results" /
                                         "triton_report.md"))
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("the AOT report needs Triton in compile mode: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    from . import sass
    from .aot import collect_specs, compile_spec
    specs, notes = collect_specs(only=args.only)
    if not specs:
        print("no specialisations selected", file=sys.stderr)
        return 2
    rows = ["| kernel | arch | registers | spills (B st/ld) | smem (B) | warps | blocks/SM | MMA | "
            "MMA/key | FP32/key | LDS/key | LDG/key | instr/key | note |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    failures = []
    t0 = time.time()
    for spec in specs:
        for arch in args.arch:
            if spec.archs is not None and arch not in spec.archs:
                continue
            r = compile_spec(spec, arch)
            if not r.ok:
                failures.append(f"{spec.name} sm_{arch}: {r.error}")
                rows.append(f"| {spec.name} | sm_{arch} | FAILED | | | {spec.num_warps} | | | | | | | | {r.error} |")
            else:
                if r.spills:
                    failures.append(f"{spec.name} sm_{arch}: {r.spill_stores}/{r.spill_loads} bytes spilled")
                mma = (r.mma_kind if r.mma else "NO") if spec.mma_expected else ("n/a" if not r.mma else r.mma_kind)
                blocks = sass.occupancy(arch, r.registers, 32 * spec.num_warps, r.shared or 0)
                rows.append(f"| {spec.name} | sm_{arch} | {r.registers} | {r.spill_stores}/{r.spill_loads} | "
                            f"{r.shared} | {spec.num_warps} | {blocks} | {mma} | {_mix_cells(r)} | {spec.note} |")
            print(rows[-1], flush=True)
            if spec.mma_expected and r.ok and not r.mma:
                failures.append(f"{spec.name} sm_{arch}: intended tensor-core MMA missing from the PTX")
    shape_rows = []
    if not args.no_shapes and args.only is None:
        shape_rows, shape_failures = shape_lines(args.arch, compile_spec)
        failures += shape_failures
    text = ["# Triton AOT report", "",
            f"{len(specs)} specialisations x archs {args.arch}, compiled in {time.time() - t0:.0f} s with "
            "triton.compile(target=GPUTarget('cuda', cc, 32)); registers/spills from the bundled ptxas -v; "
            "blocks/SM from registers, shared memory and threads (A100: 164 KB, H100: 228 KB shared per SM); "
            "per-key columns: the static SASS mix of the main (key-block) loop divided by its BLOCK_N keys "
            "(nvdisasm; MMA = HMMA on sm_80, HGMMA on sm_90).", ""]
    text += rows
    if shape_rows:
        text += ["", "## What `auto` runs at the README's shapes, and what bounds it", "",
                 "On a GPU `backend=\"auto\"` sends these calls to Triton except where the CUDA C++ decode claims "
                 "them (`core/gpu_policy.py`: quantized caches at 64 < D <= 128 with G*Lq <= 16, from the cost "
                 "model in `benchmarks/results/cuda_ptxas.md`; those rows still show Triton's kernel for comparison). "
                 "Memory floor: bytes that must move (cache payload, fp16 scales/zeros, positions, fp16 "
                 "queries/request/outputs) / HBM bandwidth (A100 2.04 TB/s, H100 3.35 TB/s); issue floor: "
                 "main-loop iterations x instructions per iteration x warps / (SMs x 4 x boost clock) -- the "
                 "static loop body, so it ignores latency and stalls: a floor, not a prediction.", ""]
        text += shape_rows
    text += ["", "## Decode roofline (bytes that must move / H100 bandwidth)", ""] + roofline_lines()
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
