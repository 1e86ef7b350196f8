"""SASS instruction mix of a compiled GPU kernel's main loop -- what predicts its speed before any GPU runs it.

Used by ``python -m malloc_kernels.triton.report`` (Triton cubins) and ``tools/cuda_report.py`` (nvcc objects).
The disassembly (``nvdisasm -c`` of a cubin, or one function of ``cuobjdump -sass``) is split at its labels; every
backward branch closes a loop; the *main loop* is the one holding the most tensor-core instructions (ties: the
longest), i.e. the key-block loop of an attention kernel. Its static mix per iteration, divided by the keys one
iteration consumes, gives the per-key cost of each functional unit:

* ``mma``: HMMA (sm_80 mma.sync) / HGMMA (sm_90 wgmma) / IMMA; ``fp32``: FFMA/FMUL/FADD (the scalar pipe);
* ``lds`` / ``sts``: shared-memory loads (LDS, LDSM) / stores; ``ldg``: global loads (LDG, LDGSTS cp.async,
  UTMALDG TMA); ``mufu``: exp/log/rcp (MUFU); ``total``: every instruction of the loop.

Occupancy (``occupancy``) follows the CUDA occupancy rules: registers are allocated per warp in units of 256,
64K registers, 2048 threads and 32 blocks per SM, and the SM's shared memory (164 KB usable on A100, 228 KB on
H100). ``bounds`` turns a kernel's per-iteration mix and a problem shape into the two floors of its time: bytes
over HBM bandwidth, and warp-instructions over the SMs' issue rate (4 per SM per clock).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

CATEGORIES = {
    "mma": re.compile(r"^(HMMA|HGMMA|IMMA|QGMMA|WARPGROUP)"),
    "fp32": re.compile(r"^(FFMA|FMUL|FADD|FMNMX)"),
    "lds": re.compile(r"^(LDS|LDSM)"),
    "sts": re.compile(r"^STS"),
    "ldg": re.compile(r"^(LDG|LDGSTS|UTMALDG)"),
    "mufu": re.compile(r"^MUFU"),
}
_INSN = re.compile(r"/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")
_LABEL = re.compile(r"^\s*(\.L_x_\d+|\.L_\w+):")
_TARGET = re.compile(r"BRA\s+(?:`?\(?(\.L_\w+)\)?|(0x[0-9a-f]+))")  # nvdisasm labels / cuobjdump addresses

# (name, SMs, boost clock GHz, HBM bytes/s, usable shared memory per SM in bytes)
GPUS = {80: ("A100 SXM", 108, 1.41, 2.039e12, 167936), 90: ("H100 SXM", 132, 1.98, 3.35e12, 233472)}


def _tool(name: str) -> Optional[str]:
    cands = [shutil.which(name), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", name)]
    try:
        import triton

        cands.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name))
    except ImportError:
        pass
    return next((c for c in cands if c and os.path.exists(c)), None)


def disassemble_cubin(cubin: bytes) -> str:
    """``nvdisasm -c`` of a cubin (the copy bundled with Triton when the toolkit lacks it)."""
    tool = _tool("nvdisasm")
    if tool is None:
        raise RuntimeError("nvdisasm not found")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        proc = subprocess.run([tool, "-c", path], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-1000:])
    return proc.stdout


@dataclass
class LoopMix:
    """Static instruction counts of one loop iteration (``counts`` by category, ``total``) and all loops seen."""

    counts: Dict[str, int]
    total: int
    loops: int

    def per_key(self, keys: int) -> Dict[str, float]:
        return {k: v / keys for k, v in dict(self.counts, total=self.total).items()}


def main_loop_mix(sass: str) -> Optional[LoopMix]:
    """The mix of the main loop of one function's SASS (see module docstring); None when it has no loop."""
    return _loops(sass, key=lambda c, size: (c["mma"], size))


@dataclass
class Loop:
    """One loop of a function's SASS: instruction indices ``[start, end]`` (its backward branch at ``end``), the
    static mix of its whole body (nested loops included once) and of its own instructions (nested loops' bodies
    excluded)."""

    start: int
    end: int
    body: Dict[str, int]
    own: Dict[str, int]

    def contains(self, other: "Loop") -> bool:
        return self.start <= other.start and other.end <= self.end and (self.start, self.end) != (other.start,
                                                                                                   other.end)


def loops(sass: str) -> List[Loop]:
    """Every loop of ``sass`` (one per distinct backward-branch target range), in address order."""
    insns, spans = _parse(sass)
    spans = sorted(set(spans))

    def count(idx):
        c = {k: 0 for k in CATEGORIES}
        for i in idx:
            for k, rx in CATEGORIES.items():
                if rx.match(insns[i]):
                    c[k] += 1
                    break
        c["total"] = len(idx)
        return c

    out = []
    for lo, hi in spans:
        inner = [(a, b) for a, b in spans if lo <= a and b <= hi and (a, b) != (lo, hi)]
        own = [i for i in range(lo, hi + 1) if not any(a <= i <= b for a, b in inner)]
        out.append(Loop(lo, hi, count(range(lo, hi + 1)), count(own)))
    return out


def _parse(sass: str) -> Tuple[List[str], List[Tuple[int, int]]]:
    """(opcodes in order, (target index, branch index) of every backward branch)."""
    insns: List[str] = []
    labels: Dict[str, int] = {}
    branches: List[Tuple[int, str]] = []
    for line in sass.splitlines():
        m = _LABEL.match(line)
        if m:
            labels[m.group(1)] = len(insns)
            continue
        m = _INSN.search(line)
        if not m:
            continue
        labels[hex(int(m.group(1), 16))] = len(insns)
        op = m.group(2)
        if op.startswith("BRA"):
            t = _TARGET.search(line)
            if t:
                branches.append((len(insns), t.group(1) or hex(int(t.group(2), 16))))
        insns.append(op)
    return insns, [(labels[t], pos) for pos, t in branches if t in labels and labels[t] <= pos]


def _loops(sass: str, key) -> Optional[LoopMix]:
    """The loop maximising ``key(counts, size)`` among the backward branches of ``sass``."""
    insns, loops = _parse(sass)
    if not loops:
        return None

    def count(lo, hi):
        c = {k: 0 for k in CATEGORIES}
        for op in insns[lo:hi + 1]:
            for k, rx in CATEGORIES.items():
                if rx.match(op):
                    c[k] += 1
                    break
        return c

    best = max(loops, key=lambda lp: key(count(*lp), lp[1] - lp[0]))
    return LoopMix(count(*best), best[1] - best[0] + 1, len(loops))


def hottest_loop_mix(sass: str) -> Optional[LoopMix]:
    """For kernels without tensor cores: the loop densest in FP32 FMAs + shared loads among those with an FP32
    instruction (the inner product loops of a scalar kernel, whose LDS : FFMA ratio is what bounds it)."""
    mix = main_loop_mix(sass)
    if mix is None or mix.counts["mma"]:
        return mix
    return _loops(sass, key=lambda c, size: (c["fp32"] > 0, (c["fp32"] + c["lds"]) / (size + 1), size))


def split_functions(cuobjdump_sass: str) -> Dict[Tuple[str, str], str]:
    """``cuobjdump -sass`` output -> {(mangled function name, arch): its SASS text}."""
    out: Dict[Tuple[str, str], List[str]] = {}
    arch, key = None, None
    for line in cuobjdump_sass.splitlines():
        m = re.search(r"arch = (sm_\d+a?)", line)
        if m:
            arch = m.group(1)
        m = re.search(r"Function : (\S+)", line)
        if m:
            key = (m.group(1), arch)
            out[key] = []
            continue
        if key is not None:
            out[key].append(line)
    return {k: "\n".join(v) for k, v in out.items()}


def occupancy(arch: int, registers: int, threads: int, smem: int) -> int:
    """Resident blocks per SM (0 if the block does not fit)."""
    smem_sm = GPUS[arch][4]
    warps = -(-threads // 32)
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = (65536 // regs_per_warp) // warps
    by_smem = smem_sm // smem if smem else 32
    return max(0, min(by_regs, by_smem, 2048 // threads, 32))


def bounds(arch: int, bytes_moved: float, iterations: float, insns_per_iteration: int, warps: int):
    """``(memory floor s, issue floor s)``: bytes / HBM bandwidth; warp-instructions / (SMs x 4 x clock)."""
    _, sms, ghz, bw, _ = GPUS[arch]
    return bytes_moved / bw, iterations * insns_per_iteration * warps / (sms * 4 * ghz * 1e9)
