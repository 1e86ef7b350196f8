#!/usr/bin/env python3
"""CUDA compile check and resource report for ``csrc/cuda/*.cu`` (no GPU needed).

Runs the CMake configure + build of the repository (``CMakeLists.txt``: the framework-free C++ library, its ctest,
and every ``.cu`` compiled for sm_80 and sm_90 with ``-Xptxas -v``) in the build directory given as argument, then

* parses ptxas' output per kernel and architecture: registers, spill stores/loads, stack frame, static shared
  memory, barriers; exits 1 if any kernel spills (zero spills: ARCHITECTURE.md, "Backends and the registry") or if
  the build fails;
* with ``--sass``, disassembles the objects with ``cuobjdump -sass`` and counts 128-bit global loads
  (``LDG.E.128``) per kernel -- the cache-streaming loops of the decode kernels must use them;
* with ``--markdown PATH``, writes the table (and the bandwidth model of ``--bandwidth``) as markdown.

Usage::

    python tools/cuda_report.py build/cmake --sass --markdown benchmarks/results/cuda_ptxas.md

Exit status: 0 ok, 1 build failure / spills / a kernel listed in ``--require-ldg128`` without 128-bit loads,
2 nvcc not found (the CUDA part was skipped; the CPU part was still built and tested).
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_ENTRY = re.compile(r"ptxas info\s*: Compiling entry function '([^']+)' for '(sm_\d+a?)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"ptxas info\s*: Used (\d+) registers(?:, used (\d+) barriers)?(?:, (\d+) bytes smem)?")


@dataclass
class Kernel:
    mangled: str
    arch: str
    name: str = ""
    registers: int = 0
    barriers: int = 0
    smem: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    ldg128: int = -1          # -1: not inspected
    ldg_other: dict = field(default_factory=dict)
    loop: object = None       # sass.LoopMix of the hottest loop (with --sass)


def run(cmd, cwd=None):
    print("+", " ".join(cmd), flush=True)
    p = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return p.returncode, p.stdout


def demangle(names):
    tool = shutil.which("c++filt") or shutil.which("cu++filt")
    if not tool or not names:
        return list(names)
    p = subprocess.run([tool], input="\n".join(names), stdout=subprocess.PIPE, text=True)
    out = p.stdout.splitlines()
    return out if len(out) == len(names) else list(names)


def short_name(demangled: str) -> str:
    """Kernel name with template arguments kept but namespaces / parameter list dropped, for the table."""
    s = re.sub(r"\(anonymous namespace\)::", "", demangled)
    s = re.sub(r"malloc_kernels::cuda::", "", s)
    depth, cut = 0, len(s)
    for i, ch in enumerate(s):  # drop the parameter list: the first '(' at template depth 0
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            cut = i
            break
    s = s[:cut]
    return re.sub(r"^void ", "", s)


def parse_ptxas(log: str):
    kernels, cur = [], None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = Kernel(m.group(1), m.group(2))
            kernels.append(cur)
            continue
        if cur is None:
            continue
        m = _PROPS.search(line)
        if m:
            cur.stack, cur.spill_stores, cur.spill_loads = map(int, m.groups())
            continue
        m = _USED.search(line)
        if m:
            cur.registers = int(m.group(1))
            cur.barriers = int(m.group(2) or 0)
            cur.smem = int(m.group(3) or 0)
    names = demangle([k.mangled for k in kernels])
    for k, n in zip(kernels, names):
        k.name = short_name(n)
    return kernels


def find_cuobjdump():
    """cuobjdump from PATH, CUDA_HOME, or the copy bundled with Triton (pip CUDA toolkits may lack it)."""
    cands = [shutil.which("cuobjdump"),
             os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump")]
    try:
        import triton

        cands.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in cands if c and os.path.exists(c)), None)


def inspect_sass(build_dir: str, kernels):
    """Count LDG.E.128 (and other global-load widths) per (kernel, arch) in the object files' SASS."""
    tool = find_cuobjdump()
    if tool is None:
        print("cuobjdump not found: skipping the SASS inspection")
        return False
    sys.path.insert(0, ROOT)
    from malloc_kernels.triton import sass as sass_mix  # noqa: E402  (pure Python, no Triton needed)
    objs = sorted(glob.glob(os.path.join(build_dir, "**", "mk_cuda.dir", "**", "*.o"), recursive=True))
    by_key = {(k.mangled, k.arch): k for k in kernels}
    for obj in objs:
        rc, out = run([tool, "-sass", obj])
        if rc:
            print(out)
            continue
        for key, text in sass_mix.split_functions(out).items():
            if key in by_key:
                by_key[key].loop = sass_mix.hottest_loop_mix(text)
        arch, func = None, None
        for line in out.splitlines():
            m = re.search(r"arch = (sm_\d+a?)", line)
            if m:
                arch = m.group(1)
            m = re.search(r"Function : (\S+)", line)
            if m:
                func = by_key.get((m.group(1), arch))
                if func is not None:
                    func.ldg128 = 0
                continue
            if func is None:
                continue
            m = re.search(r"\b(LDG\.E(?:\.[A-Z0-9_]+)*)", line)
            if m:
                op = m.group(1)
                if ".128" in op:
                    func.ldg128 += 1
                else:
                    func.ldg_other[op] = func.ldg_other.get(op, 0) + 1
    return True


def table(kernels, sass: bool) -> str:
    head = "| kernel | arch | registers | spill stores / loads (B) | stack (B) | static smem (B) | barriers |"
    sep = "|---|---|---:|---:|---:|---:|---:|"
    if sass:
        head += " LDG.E.128 | other global loads | hottest loop: MMA / FP32 / LDS / LDG / STS / total |"
        sep += "---:|---|---|"
    rows = [head, sep]
    for k in sorted(kernels, key=lambda k: (k.name, k.arch)):
        row = (f"| `{k.name}` | {k.arch} | {k.registers} | {k.spill_stores} / {k.spill_loads} | {k.stack} | "
               f"{k.smem} | {k.barriers} |")
        if sass:
            other = ", ".join(f"{op} x{n}" for op, n in sorted(k.ldg_other.items())) or "-"
            mix = "-" if k.loop is None else " / ".join(str(k.loop.counts[c]) for c in
                                                         ("mma", "fp32", "lds", "ldg", "sts")) + f" / {k.loop.total}"
            row += f" {k.ldg128 if k.ldg128 >= 0 else 'n/a'} | {other} | {mix} |"
        rows.append(row)
    return "\n".join(rows)


# Channels per 4-byte payload word (one dequantizing thread step of decode_split) and bytes per channel.
_UNIT = {"float16": (2, 2.0), "int8": (4, 1.0), "fp8": (4, 1.0), "int4": (8, 0.5), "int2": (16, 0.25)}


def decode_cost_model() -> str:
    """Per-key cost of decode_split from its code structure (the SASS main-loop mix above confirms the HMMA count),
    against the bytes each key costs in HBM: which unit bounds the kernel per format and architecture.

    Per key of one kv head and one 16-row tile (fp16/bf16 operands; fp32 queries issue 3x the MMAs, tf32 m16n8k8):
    QK^T D/128 HMMA.16816 + P.V D/128 HMMA.16816; fragment loads D/64 (K, LDS.32) + D/32 (V, 2 x LDS.U16 per
    register) warp-LDS; the dequantizing pass 2 payloads x D/E units of ~(3E + 8) thread instructions (load, unpack,
    scale FMA, convert, pack, store) and D/16 (fp16) 16-byte stores each; the score epilogue ~20 instructions per
    (row, key) over 16 rows. Issue floor: warp instructions / 4 per clock per SM; HBM floor: the key's bytes
    (payload + scales, ``decode_bytes``) / (bandwidth / SMs / clock)."""
    sys.path.insert(0, ROOT)
    from malloc_kernels.ops.cuda import decode_bytes  # noqa: E402
    from malloc_kernels.triton import sass as sass_mix  # noqa: E402
    lines = ["| D | format | bytes / key | arch | HBM floor (clk/key/SM) | warp-insns / key (HMMA, LDS) | "
             "issue floor (clk/key/SM) | bound |", "|---:|---|---:|---|---:|---:|---:|---|"]
    for D in (64, 128):
        for fmt, (E, per_ch) in _UNIT.items():
            C = 4096
            per_key = (decode_bytes(1, 1, 1, C, D, fmt=fmt) - decode_bytes(1, 1, 1, 0, D, fmt=fmt)) / C
            hmma = 2 * D / 128
            lds = D / 64 + D / 32
            dequant = 2 * (D / E) * (3 * E + 8) / 32
            epilogue = 16 * 20 / 32
            insns = hmma + lds + dequant + epilogue
            for arch in (80, 90):
                _, sms, ghz, bw, _ = sass_mix.GPUS[arch]
                mem_clk = per_key / (bw / sms / (ghz * 1e9))
                issue_clk = insns / 4
                bound = "HBM" if mem_clk >= issue_clk else f"issue ({issue_clk / mem_clk:.1f}x the HBM floor)"
                lines.append(f"| {D} | {fmt} | {per_key:.0f} | sm_{arch} | {mem_clk:.1f} | {insns:.0f} ({hmma:.1f}, "
                             f"{lds:.1f}) | {issue_clk:.1f} | {bound} |")
    return "\n".join(lines)


def decode_split_smem(mma: str, head_dim: int, tiles: int) -> int:
    """Dynamic shared memory of one decode_split block in bytes: ``layout()`` of csrc/cuda/decode_attention.cu
    (K and V chunks of 4 x k keys at row stride D padded to k plus 8 halves / 4 floats; q tiles unless q lives in
    registers; per-key metadata)."""
    tf32 = mma == "tf32x3"
    k, elem = (8, 4) if tf32 else (16, 2)
    chunk = 4 * k
    dp = -(-head_dim // k) * k
    sk = dp + (4 if tf32 else 8)
    q_bytes = 0 if (not tf32 and head_dim <= 128) else tiles * 16 * sk * elem
    meta_off = -(-(2 * chunk * sk * elem + q_bytes) // 16) * 16
    return meta_off + chunk * 28


_MMA_OF = {"1": "fp16", "2": "bf16", "0": "tf32x3"}


def decode_occupancy(kernels) -> str:
    """Blocks per SM of each decode_split instantiation (its registers, 128 threads, the dynamic shared memory at
    D = DMAX with one and with four row tiles per block)."""
    sys.path.insert(0, ROOT)
    from malloc_kernels.triton import sass as sass_mix  # noqa: E402
    lines = ["| kernel | arch | registers | smem, 1 tile (B) | blocks/SM | smem, 4 tiles (B) | blocks/SM | "
             "main loop HMMA |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for k in sorted(kernels, key=lambda k: (k.name, k.arch)):
        m = re.search(r"decode_split<(\d+), (\d+)>", k.name)
        if not m:
            continue
        mma, dmax = _MMA_OF.get(m.group(1), "?"), int(m.group(2))
        arch = int(k.arch[3:5])
        s1, s4 = decode_split_smem(mma, dmax, 1), decode_split_smem(mma, dmax, 4)
        hmma = "-" if k.loop is None else str(k.loop.counts["mma"])
        lines.append(f"| `decode_split` {mma} D<={dmax} | {k.arch} | {k.registers} | {s1} | "
                     f"{sass_mix.occupancy(arch, k.registers, 128, s1)} | {s4} | "
                     f"{sass_mix.occupancy(arch, k.registers, 128, s4)} | {hmma} |")
    return "\n".join(lines)


def bandwidth_model() -> str:
    """Bytes read per decode call over each cache format and the H100 time at 3.35 TB/s (a GPU user's yardstick)."""
    sys.path.insert(0, ROOT)
    from malloc_kernels.ops.cuda import decode_bytes  # noqa: E402  (imported lazily: needs torch)
    lines = ["| shape (B, Hq, Hkv, C, D, residual) | format | bytes read | H100 time at 3.35 TB/s (us) |",
             "|---|---|---:|---:|"]
    for shape in ((1, 32, 8, 4096, 128, 32), (64, 8, 8, 2048, 64, 32), (256, 4, 1, 1000, 64, 16)):
        for fmt in ("float16", "int8", "fp8", "int4", "int2"):
            nbytes = decode_bytes(*shape, fmt=fmt)
            lines.append(f"| {shape} | {fmt} | {nbytes:,} | {nbytes / 3.35e12 * 1e6:.2f} |")
    return "\n".join(lines)


def markdown(kernels, sass: bool, bandwidth: bool, how: str = "") -> str:
    """The markdown report (``--markdown``); ``how`` notes how the compile ran when not through this script."""
    text = ["# CUDA kernels: ptxas resources (sm_80, sm_90)", "",
            "Generated by `python tools/cuda_report.py <build dir> --sass --bandwidth --markdown <this file>` "
            "(nvcc " + nvcc_version() + ", `-O3 -Xptxas -v`, no GPU needed" + how + ").", "", table(kernels, sass), ""]
    if sass:
        text += ["## What bounds the CUDA decode", "",
                 "`decode_split` runs QK^T and P.V on tensor cores (`mma.sync` m16n8k16 fp16/bf16, or 3 x "
                 "m16n8k8 tf32 for fp32 queries; the MMA column of the main loop above), keeps q in registers "
                 "(fp16/bf16, D <= 128), dequantizes each K/V chunk once per block for up to four 16-row tiles "
                 "into bank-conflict-free shared rows, and bounds its loops by the real key count. What is left "
                 "per key is the dequantizing pass on the integer/FP32 pipes: the model below (per key of one kv "
                 "head, one row tile) puts the kernel at the HBM floor for fp16/int8/fp8 caches and within "
                 "~1-2x of it for 4-/2-bit codes, whose bytes per key are so few that unpacking them costs "
                 "about as many issue slots as streaming them. Measured numbers need a GPU "
                 "(`benchmarks/test_bench_cuda.py`).", "",
                 decode_occupancy(kernels), "",
                 decode_cost_model(), ""]
    if bandwidth:
        text += ["## Decode bandwidth model", "",
                 "Bytes each decode call must read (cache payload + fp16 scales/zeros + lengths + fp32 residual, "
                 "request tokens, queries and outputs) and the time an H100 SXM (3.35 TB/s HBM3) needs to "
                 "stream them: the "
                 "lower bound a GPU run of `benchmarks/test_bench_cuda.py` is compared against.", "",
                 bandwidth_model(), ""]
    return "\n".join(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("build_dir")
    ap.add_argument("--sass", action="store_true", help="inspect SASS with cuobjdump for 128-bit global loads")
    ap.add_argument("--markdown", help="write the report as markdown to this path")
    ap.add_argument("--bandwidth", action="store_true", help="append the decode bandwidth model")
    ap.add_argument("--require-ldg128", default="",
                    help="comma-separated kernel name substrings that must contain LDG.E.128 (with --sass)")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args(argv)

    build = os.path.abspath(args.build_dir)
    rc, out = run(["cmake", "-S", ROOT, "-B", build, "-DCMAKE_BUILD_TYPE=Release"])
    print(out)
    if rc:
        print("cmake configure failed")
        return 1
    # Rebuild the CUDA objects every time so ptxas' output is always present in this log.
    for obj in glob.glob(os.path.join(build, "**", "mk_cuda.dir", "**", "*.o"), recursive=True):
        os.remove(obj)
    rc, log = run(["cmake", "--build", build, "-j", str(args.jobs), "--", "VERBOSE=0"])
    print("\n".join(line for line in log.splitlines() if "ptxas info" not in line and "bytes stack" not in line))
    if rc:
        print("build failed")
        return 1
    rc, tout = run(["ctest", "--test-dir", build, "--output-on-failure"])
    print(tout)
    if rc:
        print("ctest failed")
        return 1
    if "mk_cuda" not in out and "mk_cuda" not in log:
        print("nvcc not found or no CUDA sources: CUDA compile check skipped")
        return 2
    kernels = parse_ptxas(log)
    if not kernels:
        print("no ptxas output parsed: is -Xptxas -v still passed?")
        return 1
    sass = inspect_sass(build, kernels) if args.sass else False
    report = table(kernels, sass)
    print(report)
    status = 0
    spilling = [k for k in kernels if k.spill_stores or k.spill_loads]
    if spilling:
        print("SPILLS in: " + ", ".join(f"{k.name} ({k.arch})" for k in spilling))
        status = 1
    if sass and args.require_ldg128:
        for want in filter(None, args.require_ldg128.split(",")):
            hits = [k for k in kernels if want in k.name]
            missing = [k for k in hits if k.ldg128 <= 0]
            if not hits or missing:
                print(f"no LDG.E.128 in kernels matching {want!r}: "
                      f"{[f'{k.name} ({k.arch})' for k in missing] or 'no such kernel'}")
                status = 1
    if args.markdown:
        text = markdown(kernels, sass, args.bandwidth).split("\n")
        os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
        with open(args.markdown, "w") as f:
            f.write("\n".join(text))
        print(f"wrote {args.markdown}")
    elif args.bandwidth:
        print(bandwidth_model())
    print("cuda_report: " + ("OK" if status == 0 else "FAILED"))
    return status


def nvcc_version() -> str:
    nvcc = shutil.which("nvcc")
    if not nvcc:
        return "?"
    out = subprocess.run([nvcc, "--version"], stdout=subprocess.PIPE, text=True).stdout
    m = re.search(r"release ([\d.]+)", out)
    return m.group(1) if m else "?"


if __name__ == "__main__":
    sys.exit(main())
