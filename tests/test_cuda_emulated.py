"""The CUDA kernels' exact source, run on the CPU through a small emulation of the CUDA programming model
(csrc/cuda/emu/cuda_emu.h: one cooperative fiber per CUDA thread, barriers for __syncthreads and for each warp's
__shfl_xor_sync; launch shapes a GPU would reject raise), compared with the float64 reference and with the C++ CPU packer.

This machine has no GPU; the emulation checks the kernels' indexing, masks, split-K merge, barriers and shuffle
partners -- everything but timing and the hardware's own float intrinsics (__expf runs as expf here). The source
is preprocessed only mechanically: ``k<<<grid, block, smem, stream>>>(args)`` becomes an emulated launch and
``__shared__`` storage becomes block-shared static storage (blocks run one at a time).
"""
import re
import sys
from pathlib import Path

import pytest
import torch

import malloc_kernels
from malloc_kernels.ops import cuda as cuda_backend
from malloc_kernels.core.validate import validate_call

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_cuda_attention import FORMATS, _case, _reference  # noqa: E402

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


def _emulate_source(src: str) -> str:
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


# Test-only op: the decode launcher's grid shapes for a given problem size, computed by the kernel file's own
# decode_plan / decode_launch_config (no launch, no memory: the segment pointers are never dereferenced).
_LAUNCH_DIMS_OP = r"""
#include <torch/library.h>
#include "decode_attention.h"
namespace mc = malloc_kernels::cuda;
static std::vector<int64_t> decode_launch_dims(int64_t B, int64_t Hq, int64_t Hkv, int64_t Lq, int64_t C,
                                               int64_t Lk, int64_t span) {
  static const char dummy = 0;
  mc::DecodeParams p;
  p.batch = int(B); p.num_heads = int(Hq); p.num_kv_heads = int(Hkv); p.max_q_len = int(Lq); p.head_dim = 64;
  p.span = int(span);
  if (C > 0) { p.seg[0].k = &dummy; p.seg[0].capacity = int(C); }
  p.seg[2].k = &dummy; p.seg[2].capacity = int(Lk);
  int64_t acc = 0, st = 0;
  mc::decode_plan(p, &acc, &st);
  const mc::DecodeLaunch l = mc::decode_launch_config(p);
  return {l.num_splits, l.num_tiles, l.split_blocks, l.combine_rows, int64_t(l.split_grid_x),
          int64_t(l.combine_grid_x)};
}
TORCH_LIBRARY(mk_emu_grid, m) { m.def("decode_launch_dims", &decode_launch_dims); }
"""


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    from torch.utils.cpp_extension import load

    build = tmp_path_factory.mktemp("cuda_emu")
    sources = []
    for src in sorted(CUDA_DIR.glob("*.cu")) + [ROOT / "csrc" / "torch" / "cuda" / "ops.cpp"]:
        out = build / (src.stem + "_emu.cpp")
        out.write_text(_emulate_source(src.read_text()))
        sources.append(str(out))
    (build / "launch_dims_emu.cpp").write_text(_LAUNCH_DIMS_OP)
    sources.append(str(build / "launch_dims_emu.cpp"))
    load(name="mk_emu", sources=sources, build_directory=str(build), is_python_module=False,
         extra_cflags=["-std=c++20", "-O1", "-Wno-unused-function", "-Wno-deprecated-declarations"],
         extra_include_paths=[str(CUDA_DIR / "emu"), str(CUDA_DIR), str(ROOT / "csrc" / "include")])
    return torch.ops.mk_emu


def _run(emu, args, kw):
    call = validate_call(*args, **kw)
    res = cuda_backend._launch(call, emu)
    return res if (call.return_lse or call.return_stats) else res.output


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", ["softmax", "hstu"])
def test_emulated_decode_matches_reference(emu, fmt, kind):
    args, kw = _case(fmt, kind, "cpu", B=2, Hq=4, Hkv=2, C=45, D=64, L=3, bias=kind == "hstu",
                     targets=torch.tensor([0, 2]))
    ref = _reference(args, kw)
    got = _run(emu, args, kw)
    if kind == "softmax":
        torch.testing.assert_close(got.output.double(), ref.output, rtol=2e-4, atol=2e-5)
        torch.testing.assert_close(got.lse.double(), ref.lse, rtol=1e-4, atol=1e-5)
    else:
        torch.testing.assert_close(got.double(), ref, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("D,fmt", [(17, ("int8", "int8", "token", 17)), (160, ("int4", "int4", "channel", 32)),
                                   (40, ("int2", "int2", "token", 20)), (24, ("float", "float", "token", 0))])
def test_emulated_odd_shapes_and_splits(emu, D, fmt):
    # D=17: byte-wise loads; D=160: two channels per thread; C=300 > one split; GQA 3:1; non-causal request.
    args, kw = _case(fmt, "softmax", "cpu", B=2, Hq=3, Hkv=1, C=300 if D == 160 else 70, D=D, L=2, causal=False)
    ref = _reference(args, kw)
    got = _run(emu, args, kw)
    torch.testing.assert_close(got.output.double(), ref.output, rtol=2e-4, atol=2e-5)


def test_emulated_jagged_hstu_norms(emu):
    from test_cuda_attention import _cache, _to

    B, Hq, Hkv, D = 3, 4, 2, 32
    cache = _cache(B, Hkv, 50, D, FORMATS[4], "cpu", seed=5, payload_dtype=torch.float32)
    lens = torch.tensor([2, 0, 3])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)])
    g = torch.Generator().manual_seed(9)
    q = torch.randn(int(lens.sum()), Hq, D, generator=g)
    k = torch.randn(int(lens.sum()), Hkv, D, generator=g)
    v = torch.randn(int(lens.sum()), Hkv, D, generator=g)
    for norm in ("original", "kept", 7):
        kw = dict(cache=cache, kind="hstu", offsets=offsets, is_causal=True, hstu_norm=norm)
        ref = malloc_kernels.attention(q.double(), k.double(), v.double(), backend="reference",
                                       **dict(kw, cache=_to(cache, "cpu", torch.float64)))
        got = _run(emu, (q, k, v), kw)
        torch.testing.assert_close(got.double(), ref, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("fmt", ["int8", "int4", "int2", "fp8"])
@pytest.mark.parametrize("axis", ["token", "channel"])
def test_emulated_packer_bit_exact_with_cpu(emu, fmt, axis):
    from malloc_kernels.ops import cpp_quant

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 21, 12, generator=g) * 5
    length = torch.randint(0, 22, (2, 3), generator=g, dtype=torch.int32)
    pad = (torch.arange(21)[None, None, :] >= length[..., None])[..., None]
    x = x.masked_fill(pad, float("nan"))
    cpu = cpp_quant.quantize_pack(x, length, fmt, 4, axis)
    got = emu.cuda_quantize_pack(x, length, fmt, 4, axis)
    assert torch.equal(cpu[0], got[0])
    assert torch.equal(cpu[1].view(torch.int16), got[1].view(torch.int16))
    if fmt != "fp8":
        assert torch.equal(cpu[2].view(torch.int16), got[2].view(torch.int16))


# Every head dim for every payload format: one full 32-key chunk (so a write past a row of the chunk's last key
# would land in the weights that follow the tile), GQA 2:1, one query. Token-axis groups span the whole row (any D
# is valid), channel-axis key groups the largest divisor of D up to 32 entries (KIVI keys; the values' token-axis
# groups use the same size, which must divide D).
EVERY_D_FORMATS = [("float", "float", "token", 0), ("int8", "int8", "token", -1), ("fp8", "fp8", "token", -1),
                   ("int4", "int4", "token", -1), ("int2", "int2", "token", -1), ("int4", "int4", "channel", 32),
                   ("int2", "int2", "channel", 32)]


def _full_cache(D, fmt, seed):
    from malloc_kernels.cache import KVCache
    from malloc_kernels.cache import quant as pyq

    g = torch.Generator().manual_seed(seed)
    C = 32
    k, v = torch.randn(1, 1, C, D, generator=g), torch.randn(1, 1, C, D, generator=g)
    length = torch.full((1, 1), C, dtype=torch.int32)
    pos = torch.arange(C, dtype=torch.int32).view(1, 1, C)
    k_fmt, v_fmt, axis, gs = fmt
    if k_fmt == "float":
        dt = (torch.float32, torch.float16, torch.bfloat16)[D % 3]
        return KVCache(k.to(dt), v.to(dt), length, pos, length[:, 0].clone(), D)
    cache = KVCache(k, v, length, pos, length[:, 0].clone(), D)
    if gs == -1:
        gs = D
    else:
        gs = max(x for x in range(1, gs + 1) if D % x == 0)
    return pyq.quantize_cache(cache, k_fmt, v_fmt, gs, axis)


@pytest.mark.parametrize("fmt", EVERY_D_FORMATS, ids=lambda f: f"{f[0]}-{f[2]}")
def test_emulated_every_head_dim(emu, fmt):
    from test_cuda_attention import _to

    bad = []
    for D in range(1, 257):
        cache = _full_cache(D, fmt, seed=D)
        g = torch.Generator().manual_seed(1000 + D)
        dt = cache.k.dtype if fmt[0] == "float" else torch.float32
        q = torch.randn(1, 2, 1, D, generator=g).to(dt)
        k, v = torch.randn(1, 1, 1, D, generator=g).to(dt), torch.randn(1, 1, 1, D, generator=g).to(dt)
        kw = dict(cache=cache, enable_gqa=True)
        ref = malloc_kernels.attention(q.double(), k.double(), v.double(), backend="reference",
                                       **dict(kw, cache=_to(cache, "cpu", torch.float64)))
        got = _run(emu, (q, k, v), kw)
        tol = {torch.float32: 2e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dt]  # + the output's rounding
        if not torch.allclose(got.double(), ref, rtol=tol, atol=tol / 10):
            bad.append(D)
    assert not bad, f"head dims with wrong outputs: {bad}"


def test_emulated_no_keys_at_all(emu):
    # No cache and Lk = 0: no split block has anything to do; the rows are empty (output 0, lse -inf), and the
    # launch must not be a zero-block grid (cudaErrorInvalidConfiguration on a GPU, an exception here).
    q = torch.randn(2, 4, 1, 16)
    k = v = torch.zeros(2, 2, 0, 16)
    got = _run(emu, (q, k, v), dict(enable_gqa=True, return_lse=True))
    ref = malloc_kernels.attention(q.double(), k.double(), v.double(), backend="reference", enable_gqa=True,
                                   return_lse=True)
    torch.testing.assert_close(got.output.double(), ref.output)
    torch.testing.assert_close(got.lse.double(), ref.lse)


@pytest.mark.parametrize("B,Hkv", [(1, 1), (65535, 1), (65536, 1), (1000, 1000), (1, 10**6), (10**6, 1)])
@pytest.mark.parametrize("Hq_per,Lq,C,Lk", [(1, 1, 4096, 1), (8, 16, 300, 16), (4, 1, 0, 0)])
def test_decode_launch_shapes_within_grid_limits(emu, B, Hkv, Hq_per, Lq, C, Lk):
    splits, tiles, blocks, rows, gx, cx = torch.ops.mk_emu_grid.decode_launch_dims(B, Hkv * Hq_per, Hkv, Lq, C, Lk, 256)
    assert tiles == -(-Hq_per * Lq // 16)
    assert splits == -(-C // 256) + -(-Lk // 256)
    assert blocks == splits * tiles * B * Hkv and rows == B * Hkv * Hq_per * Lq
    # one grid axis (x) only, within its 2^31 - 1 limit; every block index is covered by the grid-stride loops
    assert 0 <= gx <= 2**31 - 1 and 1 <= cx <= 2**31 - 1
    assert (gx == 0) == (blocks == 0) and gx == min(blocks, 2**31 - 1) and cx == min(rows, 2**31 - 1)
