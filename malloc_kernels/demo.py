"""A one-minute tour: compress a batch of users' cached histories several ways and serve a request over each.

Prints, per method, the exact cache bytes per user, the compression ratio, the attention output's error against the
uncompressed cache and the backend that ran. ``python -m malloc_kernels.demo``.
"""
from __future__ import annotations

import sys
import time

import torch

import malloc_kernels as mk
from ..cli_args import Parser, guard

DEMO_METHODS = (
    ("none", {}),
    ("int8", {}),
    ("fp8", {}),
    ("int4", {}),
    ("nvfp4", {}),
    ("int2", {}),
    ("kivi", {"bits": 4, "residual": 32}),
    ("recent", {"budget": 0.25}),
    ("streaming", {"budget": 0.25}),
    ("h2o", {"budget": 0.25}),
    ("snapkv", {"budget": 0.25}),
    ("chunk", {"budget": 0.25}),
    ("h2o+kivi", {"budget": 0.25, "bits": 4}),
)


def run_demo(users=8, history=1024, request=4, heads=4, kv_heads=2, head_dim=64, seed=0, kind="softmax"):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(history // 2, history + 1, (users,), generator=g).to(torch.int32)
    hist_q = torch.randn(users, heads, history, head_dim, generator=g)
    hist_k = torch.randn(users, kv_heads, history, head_dim, generator=g)
    hist_v = torch.randn(users, kv_heads, history, head_dim, generator=g)
    q = torch.randn(users, heads, request, head_dim, generator=g)
    k = torch.randn(users, kv_heads, request, head_dim, generator=g)
    v = torch.randn(users, kv_heads, request, head_dim, generator=g)

    full = mk.compress(hist_k, hist_v, "none", lengths=lengths)
    exact = mk.attention(q, k, v, is_causal=True, cache=full, kind=kind, backend="reference")
    native_bytes = full.nbytes_per_user().double()
    available = set(mk.available_methods())
    rows = []
    for method, params in DEMO_METHODS:
        if any(part not in available for part in method.split("+")):
            continue
        params = dict(params)
        budget = params.pop("budget", None)
        cache = mk.compress(hist_k, hist_v, method, budget=budget, lengths=lengths, queries=hist_q, kind=kind,
                            **params) if method not in ("none",) else full
        t0 = time.perf_counter()
        out = mk.attention(q, k, v, is_causal=True, cache=cache, kind=kind)
        dt = time.perf_counter() - t0
        err = (out - exact).abs().max().item()
        ratio = (cache.nbytes_per_user().double() / native_bytes).mean().item()
        rows.append((method if budget is None else f"{method}@{budget}", cache.nbytes_per_user().double().mean().item(),
                     ratio, err, dt * 1e3))
    print(f"{users} users, history {history} (ragged), request {request}, Hq={heads}, Hkv={kv_heads}, D={head_dim}, "
          f"kind={kind}; backends here: {mk.available_backends()}")
    print(f"{'method':<18}{'bytes/user':>12}{'ratio':>8}{'max |err|':>12}{'ms':>9}")
    for name, nbytes, ratio, err, ms in rows:
        print(f"{name:<18}{nbytes:>12,.0f}{ratio:>8.3f}{err:>12.2e}{ms:>9.2f}")
    return rows


def main(argv=None):
    p = Parser(description=__doc__)
    p.add_argument("--kind", choices=("softmax", "hstu"), default="softmax")
    p.add_argument("--history", type=int, default=1024)
    args = p.parse_args(argv)
    run_demo(history=args.history, kind=args.kind)


if __name__ == "__main__":
    sys.exit(guard('python -m malloc_kernels.demo', main))
