"""Resources at real history lengths: exact cache bytes per user and serving latency per request for every method
family at N = 1k, 4k, 16k, and the fused CPU attention kernels against torch SDPA at each N.

A trained model's layers encode one synthetic user (``data.synthetic``: topic-drift sequences with timestamps) of
``N`` history items; every method compresses those caches; one request of ``request_size`` items is served over
them (batch 1, the model's ``serve``: all layers, attention + dense work, item scoring excluded) and timed as the
best of ``repeats`` runs, all methods interleaved (``_interleaved_ms``). ``truncate-W`` is the native cache of the
last ``W`` items (constant in N). The attention rows time one layer's attention call alone (softmax, the model's heads and head width, the
request attending causally over history + itself): ``malloc_kernels.attention(backend="cpu")`` over the fp32 /
int8 / int4 / int2 cache against SDPA over the fp32 cache and against dequantize-then-SDPA.
"""
from __future__ import annotations

import platform
import time
from typing import Dict, Sequence

import torch
import torch.nn.functional as F

from ..core.machine import cpu_model
from ..data.dataset import make_jagged
from ..data.synthetic import synthetic_dataset
from .methods import build_grid
from .runner import _compress_caches

RESOURCE_NS = (1024, 4096, 16384)
RESOURCE_METHODS = ("int8", "kivi4", "kivi2", "snapkv", "streaming", "tome", "h2o+kivi4")
FAMILY = {"baseline": "native", "truncate": "truncate", "precision": "precision", "pruning": "pruning",
          "merging": "merging", "hybrid": "hybrid"}


def _interleaved_ms(fns: dict, repeats: int) -> dict:
    """Best-of-``repeats`` wall time (ms) of each callable, the callables timed round-robin (after one warm-up
    each) so that a noisy shared machine slows all of them alike; the minimum is the least disturbed run."""
    for fn in fns.values():
        fn()
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return {k: 1e3 * v for k, v in best.items()}


def _user(n_items: int, n: int, request_size: int, seed: int, timestamps: bool = True):
    ds = synthetic_dataset(n_users=1, n_items=min(n_items, 4000), min_len=n + request_size,
                           max_len=n + request_size, n_topics=min(32, n_items), seed=seed)
    s, t = ds.sequences[0], ds.timestamps[0]
    if not timestamps:
        return make_jagged([s[:n]]), make_jagged([s[n:]])
    return make_jagged([s[:n]], [t[:n]]), make_jagged([s[n:]], [t[n:]])


@torch.no_grad()
def model_resources(model, arch: str, ns: Sequence[int] = RESOURCE_NS, methods: Sequence[str] = RESOURCE_METHODS,
                    budget: float = 0.25, request_size: int = 8, truncate_window: int = 200, repeats: int = 9,
                    seed: int = 0, timestamps: bool = True) -> list:
    """Rows (arch, N, family, method, budget, bytes_per_user, request_ms) for every method at every N.
    ``timestamps``: give the synthetic users timestamps (as the model was trained: with or without)."""
    model.eval()
    specs = [s for s in build_grid(methods, (budget,), (8, 4, 2), ()) if s.method != "none"]
    rows = []
    for n in ns:
        hist, req = _user(model.cfg.n_items, n, request_size, seed, timestamps)
        native, stats = model.encode_history(hist, return_stats=True, stats_window=request_size)
        w = truncate_window - request_size
        short = model.encode_history(make_jagged([hist.items[-w:].numpy()], None if hist.timestamps is None
                                                 else [hist.timestamps[-w:].numpy()]))
        cases = [("native", "baseline", "100%", native), (f"truncate-{truncate_window}", "truncate",
                                                           f"{w} entries", short)]
        cases += [(s.label, s.level, s.budget_label, _compress_caches(model, native, stats, s, seed)) for s in specs]
        ms = _interleaved_ms({c[0]: (lambda caches=c[3]: model.serve(req, caches=caches)) for c in cases}, repeats)
        for label, level, blabel, caches in cases:
            rows.append(dict(model=arch, N=n, family=FAMILY[level], method=label, budget=blabel,
                             bytes_per_user=int(sum(int(c.nbytes_per_user()[0]) for c in caches)),
                             request_ms=ms[label]))
    return rows


@torch.no_grad()
def attention_resources(n_heads: int = 2, head_dim: int = 32, ns: Sequence[int] = RESOURCE_NS,
                        batch_sizes: Sequence[int] = (1, 16), request_size: int = 8, repeats: int = 9,
                        seed: int = 0) -> list:
    """One layer's attention call: fused CPU kernel over each cache format vs SDPA (module docstring)."""
    import malloc_kernels as mk
    if "cpu" not in mk.available_backends():
        return []
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in ns:
        for B in batch_sizes:
            H, D, r = n_heads, head_dim, request_size
            hk, hv = torch.randn(B, H, n, D, generator=g), torch.randn(B, H, n, D, generator=g)
            q, k, v = (torch.randn(B, H, r, D, generator=g) for _ in range(3))
            mask = torch.ones(r, n + r, dtype=torch.bool)
            mask[:, n:] = torch.ones(r, r, dtype=torch.bool).tril()

            def sdpa(ck, cv):
                return F.scaled_dot_product_attention(q, torch.cat([ck, k], 2), torch.cat([cv, v], 2),
                                                      attn_mask=mask)

            def deq_sdpa(cache):
                dk, dv = cache.dequantize()
                return sdpa(dk, dv)
            fns = {("sdpa", "fp32"): lambda: sdpa(hk, hv)}
            for method, fmt in (("none", "fp32"), ("int8", "int8"), ("int4", "int4"), ("int2", "int2")):
                cache = mk.compress(hk, hv, method)
                fns[("fused-cpu", fmt)] = (lambda c=cache: mk.attention(q, k, v, is_causal=True, cache=c,
                                                                        backend="cpu"))
                if method != "none":
                    fns[("dequant+sdpa", fmt)] = lambda c=cache: deq_sdpa(c)
            ms = _interleaved_ms(fns, repeats)
            base = ms[("sdpa", "fp32")]
            for (prov, fmt), t in ms.items():
                rows.append(dict(N=n, B=B, provider=prov, format=fmt, ms_per_call=t, speedup_vs_sdpa=base / t))
    return rows


def resources_markdown(model_rows: list, attn_rows: list, meta: Dict) -> str:
    out = ["# Resources at real history lengths\n\n",
           f"{meta.get('processor') or meta.get('machine')}, {meta.get('threads')} thread(s), "
           f"torch {meta.get('torch')}, CPU ISA variants: {meta.get('isa', '?')}. {meta.get('note', '')}\n\n",
           "## Bytes per user and serving latency per request (batch 1, all layers; item scoring excluded)\n\n"]
    ns = sorted({r["N"] for r in model_rows})
    for arch in sorted({r["model"] for r in model_rows}):
        out.append(f"### {arch}\n\n| family | method | budget | " +
                   " | ".join(f"bytes N={n}" for n in ns) + " | " +
                   " | ".join(f"ms N={n}" for n in ns) + " |\n|" + "---|" * (3 + 2 * len(ns)) + "\n")
        keys = []
        for r in model_rows:
            if r["model"] == arch and (r["family"], r["method"], r["budget"]) not in keys:
                keys.append((r["family"], r["method"], r["budget"]))
        for fam, m, b in keys:
            sel = {r["N"]: r for r in model_rows if r["model"] == arch and (r["family"], r["method"], r["budget"])
                   == (fam, m, b)}
            out.append(f"| {fam} | {m} | {b} | " +
                       " | ".join(f"{sel[n]['bytes_per_user']:,}" if n in sel else "-" for n in ns) + " | " +
                       " | ".join(f"{sel[n]['request_ms']:.2f}" if n in sel else "-" for n in ns) + " |\n")
        out.append("\n")
    if attn_rows:
        out.append("## One attention call: fused CPU kernel vs SDPA (softmax, request of 8 over N cached)\n\n"
                   "| N | B | provider | cache | ms/call | speed-up vs SDPA fp32 |\n|---|---|---|---|---|---|\n")
        for r in attn_rows:
            out.append(f"| {r['N']} | {r['B']} | {r['provider']} | {r['format']} | {r['ms_per_call']:.3f} | "
                       f"{r['speedup_vs_sdpa']:.2f}x |\n")
    return "".join(out)


def plot_resources(model_rows: list, attn_rows: list, path) -> None:
    """Cost vs N per method family: bytes (left), request latency (middle), attention call (right); log-log."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
    colors = {"native": "black", "truncate": "tab:gray", "precision": "tab:blue", "pruning": "tab:red",
              "merging": "tab:green", "hybrid": "tab:purple"}
    styles = {"hstu": "-", "sasrec": "--"}
    for (arch, key), ax in [((a, k), ax) for k, ax in (("bytes_per_user", axes[0]), ("request_ms", axes[1]))
                            for a in sorted({r["model"] for r in model_rows})]:
        for m in dict.fromkeys(r["method"] for r in model_rows if r["model"] == arch):
            sel = sorted((r for r in model_rows if r["model"] == arch and r["method"] == m), key=lambda r: r["N"])
            ax.plot([r["N"] for r in sel], [r[key] for r in sel], styles.get(arch, "-"), marker="o", ms=3,
                    color=colors[sel[0]["family"]], label=f"{arch} {m}", lw=1)
    for ax, lab in ((axes[0], "cache bytes per user"), (axes[1], "request latency (ms, batch 1)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("history length N")
        ax.set_ylabel(lab)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=5, ncol=2)
    for (prov, fmt, B) in dict.fromkeys((r["provider"], r["format"], r["B"]) for r in attn_rows):
        sel = sorted((r for r in attn_rows if (r["provider"], r["format"], r["B"]) == (prov, fmt, B)),
                     key=lambda r: r["N"])
        axes[2].plot([r["N"] for r in sel], [r["ms_per_call"] for r in sel],
                     "-" if prov == "fused-cpu" else (":" if prov == "sdpa" else "--"), marker="o", ms=3,
                     label=f"{prov} {fmt} B={B}", lw=1)
    axes[2].set_xscale("log", base=2)
    axes[2].set_yscale("log")
    axes[2].set_xlabel("history length N")
    axes[2].set_ylabel("one attention call (ms)")
    axes[2].set_title("fused CPU attention vs SDPA")
    axes[2].grid(True, alpha=0.3)
    axes[2].legend(fontsize=5, ncol=2)
    axes[0].set_title("bytes per user vs N")
    axes[1].set_title("serving latency per request vs N")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def resource_meta(note: str = "") -> dict:
    meta = {"torch": torch.__version__, "machine": platform.machine(), "processor": cpu_model(),
            "threads": torch.get_num_threads(), "note": note}
    try:
        meta["isa"] = ",".join(torch.ops.malloc_kernels.cpu_isa_supported())
    except (AttributeError, RuntimeError):
        meta["isa"] = "AVX2/FMA/F16C or portable, picked at run time"
    return meta

