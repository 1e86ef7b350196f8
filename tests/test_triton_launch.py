"""What a real GPU does differently from the Triton interpreter, checked without one: launch grids within CUDA's
limits, 64-bit address arithmetic (read off the kernels' Triton IR), launches on the tensors' device, no load
from a placeholder pointer, and HSTU's fp16 tensor-core operands kept in range with large merge counts."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import malloc_kernels
from malloc_kernels.cache import KVCache
from malloc_kernels.triton import attention as TA
from malloc_kernels.triton import launch
from malloc_kernels.core.validate import validate_call
from malloc_kernels.triton import quantize_pack as TQ

from host_sync_watch import Watch as _Watch

ROOT = Path(__file__).resolve().parents[1]
BIG = [(1, 1), (65535, 1), (65536, 1), (1, 65536), (1000, 1000), (10**6, 1), (1, 10**6)]


@pytest.mark.parametrize("B,Hkv", BIG)
def test_launch_grids_within_cuda_limits(B, Hkv):
    for rows, block_m in ((1, 16), (8 * 4096, 128), (64, 64)):
        grid, tiles = TA.append_grid(B, Hkv, rows, block_m)
        assert launch.grid_ok(grid) and grid[0] == tiles * B * Hkv and tiles == -(-rows // block_m)
    assert launch.grid_ok(TA.decode_grid(B, Hkv, 264))
    for rows_per_user, block_r in ((8, 16), (64 * 64, 64)):
        grid, blocks = TA.merge_grid(B, rows_per_user, block_r)
        assert launch.grid_ok(grid) and grid[0] == B * blocks
    for longest, block_n in ((1, 16), (4096, 32)):
        grid, blocks = TA.stats_grid(B, Hkv, longest, block_n)
        assert launch.grid_ok(grid) and grid == (blocks * B * Hkv, 3)
    for C, per in ((64, 16), (4096, 32)):
        grid, blocks = TQ.pack_grid(B, Hkv, C, per)
        assert launch.grid_ok(grid) and grid[0] == blocks * B * Hkv


def test_grid_ok_rejects_what_cuda_rejects():
    assert not launch.grid_ok((2 ** 31,))
    assert not launch.grid_ok((1, 65536))
    assert not launch.grid_ok((0,))
    assert launch.grid_ok((2 ** 31 - 1, 65535, 65535))


_IR_PROBE = r"""
import json, re
from malloc_kernels.triton.aot import collect_specs, ttir, runtime_arg_names
STRIDES = ("sq_b", "sk_b", "sv_b", "so_b", "sm_b", "sm_h", "sm_i", "sx_b", "sx_h", "sx_c")
names = ["append/softmax_fp16_addmask_d64", "append/hstu_fp16_bias_targets", "decode/softmax_kivi4_counts",
         "merge/softmax_float16_d128", "stats/softmax_fp16", "quantize_pack/int4_token",
         "quantize_pack/int4_channel"]
specs, _ = collect_specs(only=names)
out = {}
for spec in specs:
    if spec.name not in names:
        continue
    txt = ttir(spec)
    args = runtime_arg_names(spec)
    rec = {}
    for a in STRIDES:
        if a not in args:
            continue
        uses = [l.strip() for l in txt.splitlines() if re.search(rf"%{a}\b", l) and "tt.func" not in l]
        rec[a] = dict(uses=len(uses), i32_products=[l for l in uses if "arith.muli" in l and l.split(":")[-1]
                                                     .strip().startswith("i32")])
    raw = ttir(spec, optimize=False)
    orig_uses = [l.strip() for l in raw.splitlines() if re.search(r"%ORIG\b", l) and "tt.func" not in l]
    out[spec.name] = dict(strides=rec, orig_uses=len(orig_uses), has_cache="C=0" not in spec.note)
print("JSON" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def ir_facts():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _IR_PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("JSON", 1)[1])


def test_batch_and_row_offsets_are_64_bit(ir_facts):
    """``b * stride_b`` (and the mask's head/row products, the packer's head/entry products) are formed in int64:
    in int32 they wrap once a tensor passes 2^31 elements."""
    assert len(ir_facts) == 7, sorted(ir_facts)
    seen = set()
    for name, facts in ir_facts.items():
        for arg, rec in facts["strides"].items():
            assert not rec["i32_products"], (name, arg, rec["i32_products"])
            if rec["uses"]:
                seen.add(arg)
    assert {"sq_b", "sk_b", "sv_b", "so_b", "sm_b", "sm_h", "sm_i", "sx_b", "sx_h", "sx_c"} <= seen, seen


def test_no_load_from_the_original_length_placeholder(ir_facts):
    """Without a cache ``ORIG`` is a placeholder: the kernels must not even form its address."""
    for name in ("append/softmax_fp16_addmask_d64", "append/hstu_fp16_bias_targets"):
        assert ir_facts[name]["orig_uses"] == 0, name
    assert ir_facts["decode/softmax_kivi4_counts"]["orig_uses"] > 0  # with a cache it is read


class _OnGpu1:
    device = torch.device("cuda", 1)


def test_device_guard_targets_the_tensors_device():
    g = launch.device_guard(_OnGpu1())
    assert isinstance(g, torch.cuda.device) and g.idx == 1
    assert not isinstance(launch.device_guard(torch.zeros(1)), torch.cuda.device)


def test_launchers_enter_the_device_guard(monkeypatch):
    seen = []

    def spy(t):
        seen.append(t.device)
        return launch.device_guard(t)

    monkeypatch.setattr(TA, "device_guard", spy)
    monkeypatch.setattr(TQ, "device_guard", spy)
    q = torch.randn(1, 2, 3, 16)
    malloc_kernels.attention(q, q[:, :1], q[:, :1], backend="triton", enable_gqa=True, is_causal=True)
    TQ.quantize_pack(torch.randn(1, 1, 4, 16), torch.full((1, 1), 4, dtype=torch.int32), "int8", 16)
    assert len(seen) == 2 and all(d == torch.device("cpu") for d in seen)


@pytest.mark.parametrize("path", ["decode", "append"])
def test_hstu_fp16_large_merge_counts_stay_finite(path):
    """Merged entries standing for thousands of originals: ``c * silu(s)`` passes fp16's 65504 although the
    normalised output (divided by n >= sum of counts) is small."""
    g = torch.Generator().manual_seed(0)
    B, H, C, D = 2, 2, 8, 16
    k = torch.randn(B, H, C, D, generator=g)
    v = torch.randn(B, H, C, D, generator=g)
    q = torch.randn(B, H, 1, D, generator=g) * 0 + k[:, :, :1] * 3   # large scores against key 0
    length = torch.full((B, H), C, dtype=torch.int32)
    pos = torch.arange(C, dtype=torch.int32).expand(B, H, C).contiguous()
    count = torch.full((B, H, C), 5000.0)
    orig = torch.full((B,), 5000 * C + 7, dtype=torch.int32)
    cache = KVCache(k.half(), v.half(), length, pos, orig, D, count=count)
    qr, kr = q.half(), torch.randn(B, H, 1, D, generator=g).half()
    call = validate_call(qr, kr, kr, cache=cache, kind="hstu", hstu_norm="original")
    got = TA.run(call, path=path).output
    c64 = KVCache(k.half().double(), v.half().double(), length, pos, orig, D, count=count)
    ref = malloc_kernels.attention(qr.double(), kr.double(), kr.double(), backend="reference", cache=c64,
                                   kind="hstu", hstu_norm="original")
    assert bool(torch.isfinite(got).all())
    scale = ref.abs().max()
    torch.testing.assert_close(got.double(), ref, rtol=2e-2, atol=float(2e-2 * scale))


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: records each launch (grid, arguments) without running it."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        def launch(**kw):
            self.launches.append((grid, kw))
        return launch


def _serving_case(kind, Lq, layout, g):
    """A serving step's arguments: a KIVI int4 cache (+ HSTU's bias), GQA 2:1, dense ``[B, H, Lq, D]`` or jagged
    with ragged lengths (one user empty for decode, ``Lq`` and ``Lq - 17`` for append) and target counts."""
    from malloc_kernels.cache.quant import quantize_cache

    B, Hq, Hkv, C, D = 2, 4, 2, 40, 32
    k, v = torch.randn(B, Hkv, C, D, generator=g), torch.randn(B, Hkv, C, D, generator=g)
    length = torch.full((B, Hkv), C, dtype=torch.int32)
    pos = torch.arange(C, dtype=torch.int32).expand(B, Hkv, C).contiguous()
    cache = KVCache(k, v, length, pos, length[:, 0].clone(), D, timestamp=pos.to(torch.int64) * 10)
    cache = quantize_cache(cache, "int4", "int4", 16, "channel")
    kw = dict(cache=cache, kind=kind, enable_gqa=True, is_causal=True)
    if layout == "dense":
        q = torch.randn(B, Hq, Lq, D, generator=g)
        kr = torch.randn(B, Hkv, Lq, D, generator=g)
        ts_shape = (B, Lq)
    else:
        lengths = [Lq, 0] if Lq == 1 else [Lq, Lq - 17]
        T = sum(lengths)
        offsets = torch.tensor([0, lengths[0], T])
        q = torch.randn(T, Hq, D, generator=g)
        kr = torch.randn(T, Hkv, D, generator=g)
        ts_shape = (T,)
        # a distinct key_offsets tensor and target counts: their checks must run on the device too
        kw.update(offsets=offsets, key_offsets=offsets.clone(), max_seqlen_q=Lq, max_seqlen_k=Lq,
                  num_targets=torch.tensor([1, 0]))
    if kind == "hstu":
        kw.update(pos_bias=torch.randn(Hq, 64, generator=g), time_bias=torch.randn(Hq, 8, generator=g),
                  query_timestamps=torch.full(ts_shape, 10 ** 4, dtype=torch.int64))
    return q, kr, kw


@pytest.mark.parametrize("layout", ["dense", "jagged"])
@pytest.mark.parametrize("kind,Lq", [("softmax", 1), ("hstu", 1), ("softmax", 40), ("hstu", 40)])
def test_launcher_has_no_host_sync_and_no_host_data(monkeypatch, kind, Lq, layout):
    """What CUDA-graph capture of the serving step needs from validation and the launcher: no
    ``.item()``/``bool()``/``.tolist()`` on device tensors (``_local_scalar_dense``), no tensor built from host data
    (a host-to-device copy), no output sized by data, for the decode and the append path, with a quantized cache
    and HSTU's bias; dense calls, and jagged calls given ``max_seqlen_q`` (their checks are device asserts)."""
    from malloc_kernels.triton import attention_common, attention_decode

    fwd, merge = _Recorder(), _Recorder()
    monkeypatch.setattr(attention_common, "attention_forward_kernel", fwd)
    monkeypatch.setattr(attention_decode, "attention_merge_kernel", merge)
    q, kr, kw = _serving_case(kind, Lq, layout, torch.Generator().manual_seed(0))
    kw["backend"] = "triton"
    malloc_kernels.attention(q, kr, kr, **kw)  # first call: one-time caches (placeholders, thresholds) fill here
    fwd.launches.clear()
    with _Watch() as w:                # the whole serving step: validation, backend choice, the launcher
        malloc_kernels.attention(q, kr, kr, **kw)
    assert not w.bad(), w.bad()
    assert fwd.launches and all(launch.grid_ok(grid) for grid, _ in fwd.launches + merge.launches)
    assert TA.choose_config(validate_call(q, kr, kr, **kw)).path == ("decode" if Lq == 1 else "append")
    if layout == "jagged":
        assert "_assert_async" in w.seen      # the data rules were checked, on the device
        # the control: without max_seqlen_q the same call reads the lengths on the host (documented, not capturable)
        kw = {k: v for k, v in kw.items() if k not in ("max_seqlen_q", "max_seqlen_k")}
        with _Watch() as w:
            malloc_kernels.attention(q, kr, kr, **kw)
        assert "_local_scalar_dense" in w.bad()


class _RecordingCudaOps:
    """Stands in for ``torch.ops.malloc_kernels`` of a CUDA build: records the decode launch, returns empty outputs
    of the kernel's shapes (``[B, Hq, Lq, D]`` float32 and ``[B, Hq, Lq]``)."""

    def __init__(self):
        self.calls = []

    def cuda_decode_attention(self, q, *args):
        self.calls.append((q.shape, args))
        return torch.zeros(q.shape), torch.zeros(q.shape[:3])


@pytest.mark.parametrize("kind,Lq", [("softmax", 1), ("hstu", 40)])
def test_cuda_glue_jagged_with_max_seqlen_has_no_host_sync(kind, Lq):
    """The CUDA decode glue (``ops/cuda._launch``: jagged -> padded, the kernel, padded -> jagged) given
    ``max_seqlen_q`` reads no device data, and ``auto`` may then prefer the CUDA decode for a jagged call: its row
    count is the bound's. Without the bound a jagged call stays with Triton and nothing is read to decide that."""
    from malloc_kernels.ops import cuda as cuda_backend

    q, kr, kw = _serving_case(kind, Lq, "jagged", torch.Generator().manual_seed(1))
    ops = _RecordingCudaOps()
    cuda_backend._launch(validate_call(q, kr, kr, **kw), ops)   # one-time caches (thresholds) fill here
    with _Watch() as w:
        call = validate_call(q, kr, kr, **kw)
        res = cuda_backend._launch(call, ops)
    assert not w.bad(), w.bad()
    assert ops.calls[-1][0] == (2, 4, Lq, 32) and res.output.shape == q.shape
    if kind == "hstu":   # the time-bucket thresholds: copied to the device once, not per call
        assert any(a is cuda_backend._thresholds(8, q.device) for a in ops.calls[-1][1])
    unbounded = validate_call(q, kr, kr, **{k: v for k, v in kw.items() if k not in ("max_seqlen_q",
                                                                                     "max_seqlen_k")})
    with _Watch() as w:
        assert not cuda_backend.preferred(unbounded)
    assert not w.bad()
    # D = 128 over a quantized cache with one 16-row tile per kv head: the cost model's case for the CUDA decode
    g = torch.Generator().manual_seed(2)
    from malloc_kernels.cache.quant import quantize_cache
    k = torch.randn(2, 2, 16, 128, generator=g)
    length = torch.full((2, 2), 16, dtype=torch.int32)
    cache = quantize_cache(KVCache(k, k, length, torch.arange(16, dtype=torch.int32).expand(2, 2, 16).contiguous(),
                                   length[:, 0].clone(), 128), "int4", "int4", 16, "channel")
    qd, kd = torch.randn(2, 4, 128, generator=g), torch.randn(2, 2, 128, generator=g)
    off = torch.tensor([0, 1, 2])
    assert cuda_backend.preferred(validate_call(qd, kd, kd, cache=cache, offsets=off, max_seqlen_q=1,
                                                enable_gqa=True))
    assert not cuda_backend.preferred(validate_call(qd, kd, kd, cache=cache, offsets=off, enable_gqa=True))
