"""Training self-attention benchmark: forward + backward of jagged causal self-attention (what every training step
of the recommenders runs per layer: HSTU's pointwise kind with the relative position bias, SASRec's softmax kind)
through ``malloc_kernels.attention`` with ``backend="cpu"`` (the C++ kernels of ``ops/train_attention.py``) vs the
best plain-PyTorch formulation (benchmarks/torch_baselines.py: padded ``F.scaled_dot_product_attention`` for
softmax, one masked matmul for HSTU) and vs ``backend="reference"`` (our padded autograd oracle).

Shapes: the ML-1M training batch of the recommenders (32 users, ragged lengths 20..200, Hq = Hkv = 2, D = 32) for
both kinds, the same with GQA (Hq = 4, Hkv = 1), and longer sequences (8 users of 1,000 tokens, D = 64). FLOPs count
the visible (i, j) pairs only: forward <q, k> and a v (2 x 2 D per pair), backward recomputed <q, k>, <do, v>, dq,
dk, dv (5 x 2 D per pair); the floor is those FLOPs at the fp32 matmul rate measured in the same run. Run:

    python -m pytest -q benchmarks/test_bench_train_attention.py [--save] [--smoke]

Providers are timed interleaved in one process (best of ``ROUNDS``; read the ratios). ``--save`` writes
``benchmarks/results/train_attention.md`` and ``train_attention.json``; ``--smoke`` runs tiny shapes once.
"""
import json
from pathlib import Path

import pytest
import torch

import malloc_kernels as mk

from machine import machine_label  # benchmarks/ is on sys.path under pytest
from roofline import interleaved_best_seconds, measure_flops
from torch_baselines import Padder, train_hstu, train_softmax

# (kind, name, users, min length, max length, Hq, Hkv, D)
SHAPES = [("hstu", "ML-1M batch", 32, 20, 200, 2, 2, 32), ("softmax", "ML-1M batch", 32, 20, 200, 2, 2, 32),
          ("hstu", "ML-1M batch, GQA", 32, 20, 200, 4, 1, 32), ("hstu", "long", 8, 1000, 1000, 2, 2, 64),
          ("softmax", "long", 8, 1000, 1000, 2, 2, 64)]
SMOKE_SHAPES = [("hstu", "smoke", 3, 2, 9, 2, 2, 8), ("softmax", "smoke, GQA", 3, 2, 9, 4, 1, 8)]
ROUNDS = 5
RESULTS = Path(__file__).resolve().parent / "results"

pytestmark = pytest.mark.needs_ext("self_attention_fwd", "self_attention_bwd")


def _problem(users, lo, hi, Hq, Hkv, D, seed):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (users,), generator=g)
    off = torch.zeros(users + 1, dtype=torch.int64)
    off[1:] = lens.cumsum(0)
    T = int(off[-1])
    leaves = [torch.randn(T, h, D, generator=g).requires_grad_() for h in (Hq, Hkv, Hkv)]
    leaves.append((torch.randn(200, generator=g) * 0.1).requires_grad_())
    pos = torch.cat([torch.arange(int(n)) for n in lens])
    grad = torch.randn(T, Hq, D, generator=g)
    pairs = int((lens * (lens + 1) // 2).sum()) * Hq
    return leaves, off, pos, grad, pairs


def _forward(provider, kind, leaves, off, pos, padder):
    q, k, v, pb = leaves
    if provider == "torch":
        return train_hstu(q, k, v, off, pos, pb, padder) if kind == "hstu" else train_softmax(q, k, v, off, padder)
    bias = dict(query_positions=pos, pos_bias=pb) if kind == "hstu" else {}
    return mk.attention(q, k, v, is_causal=True, kind=kind, offsets=off, backend=provider, enable_gqa=True, **bias)


def _step(provider, kind, leaves, off, pos, grad, padder):
    for t in leaves:
        t.grad = None
    _forward(provider, kind, leaves, off, pos, padder).backward(grad)


def _same_math(kind, leaves, off, pos, padder):
    """Every provider computes the same output and gradients (vs the float64 reference; torch's float32 error)."""
    grads = {}
    for provider in ("reference", "cpu", "torch"):
        out = _forward(provider, kind, leaves, off, pos, padder)
        out.backward(torch.ones_like(out))
        grads[provider] = [out.detach()] + [t.grad.clone() for t in leaves[:3]]
        for t in leaves:
            t.grad = None
    for name, a, b in zip(("out", "dq", "dk", "dv"), grads["torch"], grads["cpu"]):
        torch.testing.assert_close(a, grads["reference"][("out", "dq", "dk", "dv").index(name)], rtol=1e-4,
                                   atol=1e-4, msg=f"torch baseline {name}")
        torch.testing.assert_close(b, grads["reference"][("out", "dq", "dk", "dv").index(name)], rtol=1e-4,
                                   atol=1e-4, msg=f"cpu kernels {name}")


def test_bench_train_attention(benchmark, save_results, smoke):
    torch.set_num_threads(2)                       # restored by benchmarks/conftest.py
    rounds = 1 if smoke else ROUNDS
    gflops = measure_flops(256 if smoke else 2048)
    rows = []
    for i, (kind, name, users, lo, hi, Hq, Hkv, D) in enumerate(SMOKE_SHAPES if smoke else SHAPES):
        leaves, off, pos, grad, pairs = _problem(users, lo, hi, Hq, Hkv, D, seed=i)
        padder = Padder(off)
        _same_math(kind, leaves, off, pos, padder)
        fns = {b: (lambda b=b: _step(b, kind, leaves, off, pos, grad, padder)) for b in ("reference", "torch", "cpu")}
        best = interleaved_best_seconds(fns, rounds)
        flop = 14 * pairs * D
        rows.append({"kind": kind, "shape": name, "users": users, "tokens": int(off[-1]), "Hq": Hq, "Hkv": Hkv,
                     "D": D, "pairs": pairs, "flop": flop, **{f"{k}_s": v for k, v in best.items()},
                     "speedup": best["reference"] / best["cpu"], "speedup_vs_torch": best["torch"] / best["cpu"],
                     "floor_s": flop / (gflops * 1e9)})
    leaves, off, pos, grad, _ = _problem(*(SMOKE_SHAPES if smoke else SHAPES)[0][2:], seed=0)
    padder = Padder(off)
    benchmark.pedantic(lambda: _step("cpu", "hstu", leaves, off, pos, grad, padder), rounds=1, iterations=1)
    res = {"threads": 2, "machine": machine_label(), "matmul_gflops": gflops, "rows": rows}
    print(json.dumps(res, indent=1))
    if save_results:
        _write(res)


def _write(res):
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_attention.json").write_text(json.dumps(res, indent=1))
    lines = [
        "# Training self-attention (CPU): forward + backward", "",
        "Generated by `python -m pytest -q benchmarks/test_bench_train_attention.py --save`: jagged causal",
        "self-attention (HSTU with the relative position bias; softmax), output and all gradients,",
        f"on {res['machine']}, {res['threads']} threads, providers interleaved",
        f"(best of {ROUNDS}); fp32 matmul ceiling measured in the same run: {res['matmul_gflops']:.0f} GFLOP/s.",
        "FLOPs = 14 D per visible (query, key) pair and head; floor = those FLOPs at that rate.",
        "",
        "Baselines: `torch` = the best plain-PyTorch formulation (padded `F.scaled_dot_product_attention` for",
        "softmax, one masked matmul for HSTU; benchmarks/torch_baselines.py), `reference` = our padded autograd",
        "oracle. The speedup a user sees is the one vs torch.",
        "",
        "| kind | shape | users | tokens | Hq / Hkv | D | torch (ms) | reference (ms) | cpu kernels (ms) "
        "| speedup vs torch | vs reference | floor (ms) | kernel GFLOP/s | fraction of matmul ceiling |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        rate = r["flop"] / r["cpu_s"] / 1e9
        lines.append(f"| {r['kind']} | {r['shape']} | {r['users']} | {r['tokens']:,} | {r['Hq']} / {r['Hkv']} "
                     f"| {r['D']} | {1e3 * r['torch_s']:.1f} | {1e3 * r['reference_s']:.1f} | {1e3 * r['cpu_s']:.1f} "
                     f"| **{r['speedup_vs_torch']:.1f}x** | {r['speedup']:.1f}x "
                     f"| {1e3 * r['floor_s']:.2f} | {rate:.0f} | {100 * rate / res['matmul_gflops']:.0f}% |")
    lines += ["", "The torch baselines pad the batch to `[B, H, L, L]` scores (SDPA fuses softmax and the mask; HSTU "
              "is a chain of autograd ops: scores, the gathered bias, SiLU, the mask, the normalisation) forward and "
              "again backward; the kernels recompute one 4-row block of scores at a time in L1 and never leave the "
              "`[D, L]` tiles of one user and kv head."]
    (RESULTS / "train_attention.md").write_text("\n".join(lines) + "\n")
