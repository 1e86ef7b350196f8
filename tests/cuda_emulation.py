"""Builds the CUDA kernels' exact source as a CPU library through a small emulation of the CUDA programming model
(csrc/cuda/emu/cuda_emu.h: one std::thread per CUDA thread, std::barrier for __syncthreads and for each warp's
__shfl_xor_sync). The source is preprocessed only mechanically: ``k<<<grid, block, smem, stream>>>(args)`` becomes
an emulated launch and ``__shared__`` storage becomes block-shared static storage (blocks run one at a time). The
ops register under ``torch.ops.mk_emu``; built once per test session (the conftest fixture ``emu``).
"""
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"


def _split_top(s):
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch in "(<[":
            depth += 1
        elif ch in ")>]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    parts.append(cur.strip())
    return parts


def emulate_source(src: str) -> str:
    def launch(m):
        cfg = _split_top(m.group(2))
        return f"mk_emu_launch(dim3({cfg[0]}), dim3({cfg[1]}), [&] {{ {m.group(1)}({m.group(3)}); }});"

    src = re.sub(r"(\w+)<<<(.+?)>>>\((.*?)\);", launch, src, flags=re.S)
    src = src.replace("extern __shared__ float smem[];", "float* smem = mk_emu::dyn_smem().data();")
    src = re.sub(r"__shared__\s", "static ", src)
    src = src.replace('"../../cuda/', '"')
    src = src.replace("is_cuda()", "is_cpu()")
    src = src.replace("TORCH_LIBRARY_FRAGMENT(malloc_kernels, m)", "TORCH_LIBRARY(mk_emu, m)")
    src = src.replace("TORCH_LIBRARY_IMPL(malloc_kernels, CUDA, m)", "TORCH_LIBRARY_IMPL(mk_emu, CPU, m)")
    return src


def build(build_dir: Path):
    """Compile the emulated kernels into ``build_dir`` and load them; returns ``torch.ops.mk_emu``."""
    from torch.utils.cpp_extension import load

    sources = []
    for src in sorted(CUDA_DIR.glob("*.cu")) + [ROOT / "csrc" / "torch" / "cuda" / "ops.cpp"]:
        out = build_dir / (src.stem + "_emu.cpp")
        out.write_text(emulate_source(src.read_text()))
        sources.append(str(out))
    load(name="mk_emu", sources=sources, build_directory=str(build_dir), is_python_module=False,
         extra_cflags=["-std=c++20", "-O1", "-pthread", "-Wno-unused-function"], extra_ldflags=["-pthread"],
         extra_include_paths=[str(CUDA_DIR / "emu"), str(CUDA_DIR), str(ROOT / "csrc" / "include")])
    return torch.ops.mk_emu
