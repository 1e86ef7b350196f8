"""RWKV-4 vs HSTU on the CPU: training throughput at the ML-1M batch and serving latency per request from the
recurrent state vs the native HSTU cache (MALLOC's architecture level; ``models/rwkv.py``, ``ops/wkv.py``).

* Training: one optimiser step (forward, full-softmax loss over the 3,706 ML-1M items, backward, AdamW) of the
  ML-1M recipe's model (d_model 64, 4 layers -- ``benchmarks/results/hstu_ml1m.json``'s config) on one batch of 32
  users with ragged lengths 20..200 (ML-1M's training window), both models' steps timed interleaved; tokens/s and
  the ratio. The WKV op's own forward + backward on that batch (C = 64 channels x 4 layers) is timed next to it with
  its memory floor (bytes it must move: fwd reads k, v and writes y + 2 aux, bwd reads k, v, y, 2 aux, dy and writes
  dk, dv: 13 x T x C x 4 bytes per layer, at the copy bandwidth measured in the same run).
* Serving: one user, a request of 8 items after a history of N = 200 and N = 2,000 items; HSTU serves over its
  native full-precision per-layer KV caches (``serve``), RWKV from its per-layer states; both encoded beforehand,
  the request timed alone (interleaved, best of ``4 x ROUNDS``), with each one's bytes per user. One thread, as a
  serving worker runs one user's request (with 2 threads on a loaded machine the OpenMP barriers of such small
  calls measured the scheduler, not the kernels).

Run ``python -m pytest -q benchmarks/test_bench_rwkv.py [--save] [--smoke]``; ``--save`` writes
``benchmarks/results/rwkv.md`` / ``rwkv.json``.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from malloc_kernels.data import make_jagged
from malloc_kernels.models import ModelConfig, build_model
from malloc_kernels.ops.wkv import wkv

from machine import machine_label  # benchmarks/ is on sys.path under pytest
from roofline import interleaved_best_seconds, measure_bandwidth

N_ITEMS = 3706                                  # ML-1M
TRAIN = dict(users=32, lo=20, hi=200, d=64, layers=4)
SMOKE_TRAIN = dict(users=3, lo=2, hi=9, d=16, layers=1)
SERVE_N = (200, 2000)
SMOKE_SERVE_N = (5, 20)
REQUEST = 8
ROUNDS = 5
RESULTS = Path(__file__).resolve().parent / "results"

pytestmark = pytest.mark.needs_ext("wkv", "wkv_backward")


def _model(arch, d, layers, seed=0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(arch=arch, n_items=N_ITEMS, d_model=d, n_layers=layers, n_heads=2, max_len=200))


def _batch(users, lo, hi, seed=0):
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(1, N_ITEMS + 1, size=int(rng.integers(lo, hi + 1)) + 1) for _ in range(users)]
    return make_jagged([s[:-1] for s in seqs], targets=[s[1:] for s in seqs])


def _train_step(model, opt, batch):
    hidden = model(batch)
    loss = model.loss(hidden, torch.as_tensor(batch.targets), full_softmax=True)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def _training(smoke):
    sh = SMOKE_TRAIN if smoke else TRAIN
    batch = _batch(sh["users"], sh["lo"], sh["hi"])
    T = int(batch.offsets[-1])
    steps = {}
    for arch in ("hstu", "rwkv"):
        m = _model(arch, sh["d"], sh["layers"]).train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        assert np.isfinite(_train_step(m, opt, batch))
        steps[arch] = (lambda m=m, opt=opt: _train_step(m, opt, batch))
    # the WKV op alone, at the model's shapes (one layer's call)
    g = torch.Generator().manual_seed(0)
    C = sh["d"]
    w = -torch.exp(torch.randn(C, generator=g)).requires_grad_()
    u, k, v = (torch.randn(*s, generator=g).requires_grad_() for s in ((C,), (T, C), (T, C)))
    dy = torch.randn(T, C, generator=g)

    def wkv_step():
        for t in (w, u, k, v):
            t.grad = None
        wkv(w, u, k, v, batch.offsets)[0].backward(dy)
    best = interleaved_best_seconds({**steps, "wkv": wkv_step}, 1 if smoke else ROUNDS)
    bw = measure_bandwidth(64 if smoke else 256, 2 if smoke else 5)
    floor = 13 * T * C * 4 / (bw * 1e9)
    return {"users": sh["users"], "tokens": T, "d_model": sh["d"], "layers": sh["layers"],
            "hstu_step_s": best["hstu"], "rwkv_step_s": best["rwkv"],
            "hstu_tokens_per_s": T / best["hstu"], "rwkv_tokens_per_s": T / best["rwkv"],
            "rwkv_vs_hstu_throughput": best["hstu"] / best["rwkv"],
            "wkv_fwd_bwd_s": best["wkv"], "wkv_layers_share_of_step": sh["layers"] * best["wkv"] / best["rwkv"],
            "wkv_floor_s": floor, "wkv_fraction_of_floor": floor / best["wkv"], "copy_bandwidth_gbs": bw}


@torch.no_grad()
def _serving(smoke):
    torch.set_num_threads(1)                       # restored by benchmarks/conftest.py
    sh = SMOKE_TRAIN if smoke else TRAIN
    rows = []
    models = {a: _model(a, sh["d"], sh["layers"]).eval() for a in ("hstu", "rwkv")}
    rng = np.random.default_rng(1)
    for n in (SMOKE_SERVE_N if smoke else SERVE_N):
        hist = make_jagged([rng.integers(1, N_ITEMS + 1, size=n)])
        req_seq = rng.integers(1, N_ITEMS + 1, size=REQUEST)
        req = make_jagged([req_seq])
        states = {a: m.encode_history(hist) for a, m in models.items()}
        outs = {a: models[a].serve(req, caches=states[a]) for a in models}
        # the served state answers like the whole history re-run (the model tests check this exactly)
        for a, m in models.items():
            torch.testing.assert_close(outs[a], m.last_hidden(make_jagged([np.concatenate([hist.items.numpy(),
                                                                                            req_seq])])),
                                       rtol=1e-4, atol=1e-4)
        fns = {a: (lambda a=a: models[a].serve(req, caches=states[a])) for a in models}
        best = interleaved_best_seconds(fns, 1 if smoke else ROUNDS * 4)
        nbytes = {a: int(sum(int(c.nbytes_per_user()[0]) for c in states[a])) for a in models}
        rows.append({"history": n, "request": REQUEST, "hstu_ms": 1e3 * best["hstu"], "rwkv_ms": 1e3 * best["rwkv"],
                     "hstu_over_rwkv_latency": best["hstu"] / best["rwkv"], "hstu_bytes": nbytes["hstu"],
                     "rwkv_bytes": nbytes["rwkv"], "bytes_ratio": nbytes["rwkv"] / nbytes["hstu"]})
    return rows


def test_bench_rwkv(benchmark, save_results, smoke):
    torch.set_num_threads(2)                       # restored by benchmarks/conftest.py
    res = {"threads": 2, "machine": machine_label(), "training": _training(smoke), "serving": _serving(smoke)}
    m = _model("rwkv", 16, 1).eval()
    b = _batch(2, 3, 5)
    benchmark.pedantic(lambda: m(b), rounds=1, iterations=1)
    print(json.dumps(res, indent=1))
    if save_results and not smoke:
        _write(res)


def _write(res):
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "rwkv.json").write_text(json.dumps(res, indent=1))
    t = res["training"]
    lines = [
        "# RWKV-4 vs HSTU on the CPU: training throughput and serving latency", "",
        "Generated by `python -m pytest -q benchmarks/test_bench_rwkv.py --save` on "
        f"{res['machine']}, {res['threads']} threads; providers timed interleaved in one process (best of "
        f"{ROUNDS}); the machine was shared, so read the ratios.", "",
        f"## Training step at the ML-1M batch ({t['users']} users, {t['tokens']:,} tokens, d_model {t['d_model']}, "
        f"{t['layers']} layers, full softmax over {N_ITEMS:,} items)", "",
        "| model | step (ms) | tokens/s |", "|---|---|---|",
        f"| HSTU | {1e3 * t['hstu_step_s']:.1f} | {t['hstu_tokens_per_s']:,.0f} |",
        f"| RWKV-4 | {1e3 * t['rwkv_step_s']:.1f} | {t['rwkv_tokens_per_s']:,.0f} |", "",
        f"RWKV / HSTU training throughput: **{t['rwkv_vs_hstu_throughput']:.2f}x**.", "",
        f"WKV op alone (one layer, forward + backward, {t['tokens']:,} x {t['d_model']}): "
        f"{1e3 * t['wkv_fwd_bwd_s']:.2f} ms; {100 * t['wkv_layers_share_of_step']:.1f}% of the RWKV step for its "
        f"{t['layers']} layers; memory floor {1e3 * t['wkv_floor_s']:.3f} ms (13 x T x C x 4 bytes at the "
        f"{t['copy_bandwidth_gbs']:.1f} GB/s copy bandwidth measured in the same run), fraction reached "
        f"{100 * t['wkv_fraction_of_floor']:.0f}%. A fraction above 100% means the copy bandwidth was measured "
        f"under outside load (the machine was shared): the floor is then not trustworthy, only that the op is a "
        f"negligible part of a training step.", "",
        f"## Serving one request of {REQUEST} items (1 user, 1 thread)", "",
        "| history N | HSTU native cache (ms) | RWKV state (ms) | HSTU / RWKV latency | HSTU bytes/user "
        "| RWKV bytes/user | bytes ratio |", "|---|---|---|---|---|---|---|"]
    for r in res["serving"]:
        lines.append(f"| {r['history']:,} | {r['hstu_ms']:.2f} | {r['rwkv_ms']:.2f} | "
                     f"**{r['hstu_over_rwkv_latency']:.2f}x** | {r['hstu_bytes']:,} | {r['rwkv_bytes']:,} | "
                     f"{r['bytes_ratio']:.4f} |")
    lines += ["", "RWKV's bytes per user and request latency do not depend on N (the state is the whole history); "
              "HSTU's cache and its attention over it grow linearly with N."]
    (RESULTS / "rwkv.md").write_text("\n".join(lines) + "\n")
