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
    substep: dict = None      # decode_split: own mix of its MMA loop (one sub-step of 32 keys), with --sass


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
                by_key[key].substep = substep_mix(text)
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
SUBSTEP_KEYS = 32  # keys of one QK^T / softmax / P.V sub-step of a decode_split warp (kSubST n8 tiles)


def substep_mix(sass_text: str):
    """decode_split's sub-step body: the instructions a warp issues per sub-step of 32 keys for one 16-row tile --
    the own instructions (nested loops excluded: the dequantizing pass) of the loop holding the most HMMA (QK^T,
    the masks/bias/softmax epilogue on the accumulators, P.V). A static count over every branch (softmax and HSTU,
    bias, request masks), so an upper bound of what one call issues."""
    from malloc_kernels.triton import sass as sass_mix  # noqa: E402
    loops = [lp for lp in sass_mix.loops(sass_text) if lp.own["mma"]]
    if not loops:
        return None
    return max(loops, key=lambda lp: (lp.own["mma"], lp.own["total"])).own


def dequant_insns(D: int, fmt: str) -> float:
    """Warp-instructions of the dequantizing pass per key (K and V rows, all four warps): per 4-byte payload word
    ~(3E + 8) thread instructions (unpack, scale FMA, convert, pack, store, loop), 32 words per warp-instruction."""
    E, _ = _UNIT[fmt]
    return 2 * (D / E) * (3 * E + 8) / 32


# The README's decode/append shapes (as in malloc_kernels/triton/report.py's SHAPES): label, B, Hq, Hkv, D, N, Lq,
# cache format.
README_SHAPES = [
    ("README decode, KIVI-4", 32, 8, 8, 64, 4096, 1, "int4"),
    ("README decode, KIVI-2", 32, 8, 8, 64, 4096, 1, "int2"),
    ("README append Lq=16, KIVI-4", 32, 8, 8, 64, 4096, 16, "int4"),
    ("GQA 4:1 decode, fp16 cache 8k", 32, 32, 8, 128, 8192, 1, "float16"),
    ("GQA 4:1 decode, KIVI-4 8k", 32, 32, 8, 128, 8192, 1, "int4"),
]


def decode_cost_model(kernels) -> str:
    """The floors of decode_split's time at the README's shapes, per architecture, from its fp16 variant's SASS:
    issue = keys x (row tiles x sub-step instructions / 32 keys + dequantizing pass per row group) / (SMs x 4 issue
    slots x clock), the sub-step at its static count (upper bound) and at its HMMA + shared loads + 20 epilogue
    instructions per 8 score elements of a lane (the part every call executes: lower estimate); memory = the bytes
    of ``ops.cuda.decode_bytes`` / HBM bandwidth."""
    sys.path.insert(0, ROOT)
    from malloc_kernels.ops.cuda import decode_bytes  # noqa: E402
    from malloc_kernels.triton import sass as sass_mix  # noqa: E402
    lines = ["| shape | B, Hq, Hkv, D, N, Lq | format | arch | row tiles (blocks of) | sub-step insns / key / tile "
             "(HMMA) | dequant insns / key | memory floor (us) | issue floor, upper (us) | issue floor, lower (us) |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|"]
    for label, B, Hq, Hkv, D, N, Lq, fmt in README_SHAPES:
        dmax = 64 if D <= 64 else 128 if D <= 128 else 256
        for arch in (80, 90):
            k = next((k for k in kernels if re.search(rf"decode_split<1, {dmax}>", k.name)
                      and k.arch == f"sm_{arch}" and k.substep), None)
            if k is None:
                continue
            _, sms, ghz, bw, _ = sass_mix.GPUS[arch]
            tiles = -(-(Hq // Hkv) * Lq // 16)
            per_block = 4 if tiles >= 3 else tiles
            groups = -(-tiles // per_block)
            sub = k.substep["total"] / SUBSTEP_KEYS
            lower = (k.substep["mma"] + k.substep["lds"]) / SUBSTEP_KEYS + 16 * 20 / 8 / SUBSTEP_KEYS
            deq = dequant_insns(D, fmt)
            keys = B * Hkv * N
            rate = sms * 4 * ghz * 1e9
            upper_us = keys * (tiles * sub + groups * deq) / rate * 1e6
            lower_us = keys * (tiles * lower + groups * deq) / rate * 1e6
            mem_us = decode_bytes(B, Hq, Hkv, N, D, 0, fmt=fmt, q_len=Lq) / bw * 1e6
            lines.append(f"| {label} | {B}, {Hq}, {Hkv}, {D}, {N}, {Lq} | {fmt} | sm_{arch} | {tiles} ({per_block}) | "
                         f"{sub:.1f} ({k.substep['mma'] / SUBSTEP_KEYS:.2f}) | {deq:.1f} | {mem_us:.1f} | "
                         f"{upper_us:.1f} | {lower_us:.1f} |")
    return "\n".join(lines)


def substep_table(kernels) -> str:
    """Per decode_split variant: the sub-step's static mix per key of one 16-row tile."""
    lines = ["| kernel | arch | HMMA / key | FP32 / key | LDS / key | LDG / key | STS / key | instructions / key |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for k in sorted(kernels, key=lambda k: (k.name, k.arch)):
        m = re.search(r"decode_split<(\d+), (\d+)>", k.name)
        if not m or not k.substep:
            continue
        c = {n: v / SUBSTEP_KEYS for n, v in k.substep.items()}
        lines.append(f"| `decode_split` {_MMA_OF.get(m.group(1), '?')} D<={m.group(2)} | {k.arch} | {c['mma']:.2f} | "
                     f"{c['fp32']:.1f} | {c['lds']:.2f} | {c['ldg']:.2f} | {c['sts']:.2f} | {c['total']:.1f} |")
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
        text += ["## What bounds the CUDA decode, and what `auto` picks", "",
                 "`decode_split` runs QK^T and P.V on tensor cores (`mma.sync` m16n8k16 fp16/bf16, or 3 x "
                 "m16n8k8 tf32 for fp32 queries), keeps q in registers (fp16/bf16, D <= 128), dequantizes each "
                 "K/V chunk once per block for up to four 16-row tiles into bank-conflict-free shared rows, bounds "
                 "its loops by the real key count, and (D > 128) splits the output columns over two blocks. Every "
                 "variant is spill-free at 192-238 registers: two 128-thread blocks (8 warps) per SM.", "",
                 decode_occupancy(kernels), "",
                 "Sub-step mix: the static SASS of the loop holding the MMAs (one warp, one 16-row tile, one "
                 "sub-step of 32 keys: QK^T, the masks/bias/softmax epilogue on the accumulator fragments, P.V), "
                 "per key. It counts every branch (softmax and HSTU, both biases, the request masks), so it is an "
                 "upper bound of what a call issues; the dequantizing pass (nested loops, per format) is modeled "
                 "instead (`dequant_insns`).", "",
                 substep_table(kernels), "",
                 "At the README's shapes (fp16 queries; fp32 queries issue 3x the MMAs): memory floor = bytes / HBM "
                 "bandwidth; issue floor = warp-instructions / (SMs x 4 x boost clock), with the sub-step at its "
                 "static count (upper) or at its MMAs + shared loads + ~20 epilogue instructions per lane's 8 "
                 "score elements (lower).", "",
                 decode_cost_model(kernels), "",
                 "**What `auto` picks for cache decode on a GPU** (`core/gpu_policy.py`, read by "
                 "`ops/cuda.py: preferred`): Triton's split-K decode at the same shapes "
                 "(`benchmarks/results/triton_report.md`, \"What `auto` runs\") is issue-bound too, with an exact "
                 "static count of a kernel specialised per kind/bias/format. Where even this kernel's upper issue "
                 "floor is below Triton's on both architectures -- quantized caches at 64 < D <= 128 with one "
                 "16-row tile per kv head (GQA 4:1 KIVI-4 8k above) -- `auto` runs this kernel: its block "
                 "dequantizes each key once for all warps. At D <= 64 (the README decode) the interval contains "
                 "Triton's floor, and float caches are at the memory floor in both: Triton stays the default "
                 "there. Neither kernel has run on a GPU; `benchmarks/test_bench_cuda.py` on an A100/H100 is "
                 "what should move this line.", ""]
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
