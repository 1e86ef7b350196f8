"""Builds the CUDA kernels' exact source as a CPU library through a small emulation of the CUDA programming model
(csrc/cuda/emu/cuda_emu.h: one cooperative fiber per CUDA thread, barriers for __syncthreads and for each warp's
__shfl_xor_sync; launch shapes a GPU would reject raise). The source is preprocessed only mechanically: ``k<<<grid, block, smem, stream>>>(args)`` becomes
an emulated launch and ``__shared__`` storage becomes block-shared static storage (blocks run one at a time). The
ops register under ``torch.ops.mk_emu`` (and the test-only ``torch.ops.mk_emu_grid.decode_launch_dims`` /
``decode_smem``); built once per test session (the conftest fixture ``emu``).
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
    src = src.replace('"../../cuda/', '"').replace('"../quant_spec_glue.h"', '"quant_spec_glue.h"')
    src = src.replace("is_cuda()", "is_cpu()")
    src = src.replace("TORCH_LIBRARY_FRAGMENT(malloc_kernels, m)", "TORCH_LIBRARY(mk_emu, m)")
    src = src.replace("TORCH_LIBRARY_IMPL(malloc_kernels, CUDA, m)", "TORCH_LIBRARY_IMPL(mk_emu, CPU, m)")
    return src


# Test-only op: the decode launcher's grid shapes for a given problem size, computed by the kernel file's own
# decode_plan / decode_launch_config (no launch, no memory: the segment pointers are never dereferenced).
_LAUNCH_DIMS_OP = r"""
#include <torch/library.h>
#include "decode_attention.h"
namespace mc = malloc_kernels::cuda;
static std::vector<int64_t> decode_launch_dims(int64_t B, int64_t Hq, int64_t Hkv, int64_t Lq, int64_t C,
                                               int64_t Lk, int64_t span, int64_t D) {
  static const char dummy = 0;
  mc::DecodeParams p;
  p.batch = int(B); p.num_heads = int(Hq); p.num_kv_heads = int(Hkv); p.max_q_len = int(Lq); p.head_dim = int(D);
  p.span = int(span);
  if (C > 0) { p.seg[0].k = &dummy; p.seg[0].capacity = int(C); }
  p.seg[2].k = &dummy; p.seg[2].capacity = int(Lk);
  int64_t acc = 0, st = 0;
  mc::decode_plan(p, &acc, &st);
  const mc::DecodeLaunch l = mc::decode_launch_config(p);
  return {l.num_splits, l.num_tiles, l.tiles_per_block, l.row_groups, l.split_blocks, l.combine_rows,
          int64_t(l.split_grid_x), int64_t(l.combine_grid_x), l.col_parts};
}
static int64_t decode_smem(int64_t D, int64_t mma, int64_t tiles) {
  return int64_t(mc::decode_smem_bytes(int(D), int(mma), int(tiles)));
}
TORCH_LIBRARY(mk_emu_grid, m) {
  m.def("decode_launch_dims", &decode_launch_dims);
  m.def("decode_smem", &decode_smem);
}
"""


def build(build_dir: Path):
    """Compile the emulated kernels into ``build_dir`` and load them; returns ``torch.ops.mk_emu``."""
    from torch.utils.cpp_extension import load

    sources = []
    for src in sorted(CUDA_DIR.glob("*.cu")) + [ROOT / "csrc" / "torch" / "cuda" / "ops.cpp"]:
        out = build_dir / (src.stem + "_emu.cpp")
        out.write_text(emulate_source(src.read_text()))
        sources.append(str(out))
    (build_dir / "launch_dims_emu.cpp").write_text(_LAUNCH_DIMS_OP)
    sources.append(str(build_dir / "launch_dims_emu.cpp"))
    load(name="mk_emu", sources=sources, build_directory=str(build_dir), is_python_module=False,
         extra_cflags=["-std=c++20", "-O1", "-Wno-unused-function", "-Wno-deprecated-declarations"],
         extra_include_paths=[str(CUDA_DIR / "emu"), str(CUDA_DIR), str(ROOT / "csrc" / "include"),
                             str(ROOT / "csrc" / "torch")])
    return torch.ops.mk_emu
