"""Resources at real history lengths: exact cache bytes per user and serving latency per request for every method
family at N = 1k, 4k, 16k, and the fused CPU attention kernels against torch SDPA at each N.

A trained model's layers encode one synthetic user (``data.synthetic``: topic-drift sequences with timestamps) of
``N`` history items; every method compresses those caches; one request of ``request_size`` items is served over
them (batch 1, the model's ``serve``: all layers, attention + dense work, item scoring excluded) and timed as the
best of ``repeats`` runs, all methods of every model at one N interleaved (``_interleaved_ms``). ``truncate-W`` is the native cache of the
last ``W`` items (constant in N). The attention rows time one layer's attention call alone (softmax, the model's heads and head width, the
request attending causally over history + itself): ``malloc_kernels.attention(backend="cpu")`` over the fp32 /
int8 / int4 / int2 cache against SDPA over the fp32 cache and against dequantize-then-SDPA.

Trained variants (``models_resources(variants=...)``, keys of ``methods.VARIANTS``) are measured in the same
interleaved timing as every base model's rows at each N: the variant model encodes the same synthetic user into what
IT caches and serves the same request through its own ``serve``. RWKV's per-layer recurrent states
(``RWKVLayerState.nbytes_per_user``: constant in N) and Reformer's ``LSHCache`` (the native entries + one bucket id
byte per entry, head and hash round; its request reads only the entries sharing its buckets) are counted exactly.
``entries_read_per_head``: the entries a request query reads per (layer, kv head), averaged (``runner._attended_entries``:
the stored entries for a KV cache, the bucket share for Reformer, 0 for a recurrent state).
"""
from __future__ import annotations

import platform
import time
from typing import Dict, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from ..core.machine import cpu_model
from ..data.dataset import make_jagged
from ..data.synthetic import synthetic_dataset
from .methods import VARIANTS, build_grid
from .runner import _attended_entries, _compress_caches, _stored_entries

RESOURCE_NS = (1024, 4096, 16384)
RESOURCE_METHODS = ("int8", "kivi4", "kivi2", "snapkv", "streaming", "tome", "h2o+kivi4")
FAMILY = {"baseline": "native", "truncate": "truncate", "precision": "precision", "pruning": "pruning",
          "merging": "merging", "hybrid": "hybrid", "head": "head", "sequence": "sequence", "memory": "memory",
          "architecture": "architecture"}
BASE_ARCHS = ("hstu", "sasrec")
# the C++ kernel families behind the rows: KV-cache attention (every base row), Reformer's LSH attention, RWKV's WKV
ISA_FAMILIES = ("attention", "lsh_attention", "wkv")


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


def _positive_int(name: str, v, least: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < least:
        raise ValueError(f"{name} must be >= {least}, got {v}")
    return v


def _check_models(models: Mapping, variants: Optional[Mapping]) -> list:
    """``[(base arch, variant key, variant model)]`` after checking the arguments of ``models_resources``: base
    models are HSTU / SASRec without a variant; every variant key is in ``VARIANTS`` and its model has that
    variant's configuration and its base's item count."""
    from ..models.recommender import SequentialRecommender
    if not isinstance(models, Mapping) or not models:
        raise ValueError("models must be a non-empty dict {arch: model}")
    for arch, m in models.items():
        if not isinstance(m, SequentialRecommender):
            raise TypeError(f"models[{arch!r}] must be a SequentialRecommender, got {type(m).__name__}")
        if m.cfg.arch != arch or arch not in BASE_ARCHS:
            raise ValueError(f"models: keys must be the models' arch among {BASE_ARCHS}, got {arch!r} for a "
                             f"{m.cfg.arch!r} model")
        if m.cfg.seq_compress is not None or m.cfg.heads != "mha" or m.cfg.msn:
            raise ValueError(f"models[{arch!r}] must be a base model (mha heads, no seq_compress, no msn): its "
                             f"methods compress its native KV caches; pass variants via variants=")
    out = []
    if variants is None:
        return out
    if not isinstance(variants, Mapping):
        raise TypeError(f"variants must be a dict {{base arch: {{variant key: model}}}}, got "
                        f"{type(variants).__name__}")
    for arch, vs in variants.items():
        if arch not in models:
            raise ValueError(f"variants: base arch {arch!r} is not among models ({sorted(models)})")
        if not isinstance(vs, Mapping):
            raise TypeError(f"variants[{arch!r}] must be a dict {{variant key: model}}, got {type(vs).__name__}")
        for v, vm in vs.items():
            if v not in VARIANTS:
                raise ValueError(f"variants[{arch!r}]: unknown variant {v!r} (known: {sorted(VARIANTS)})")
            if not isinstance(vm, SequentialRecommender):
                raise TypeError(f"variants[{arch!r}][{v!r}] must be a SequentialRecommender, got "
                                f"{type(vm).__name__}")
            for field, want in VARIANTS[v][1].items():
                if getattr(vm.cfg, field) != want:
                    raise ValueError(f"variants[{arch!r}][{v!r}]: a {v} model has {field}={want!r}, this one "
                                     f"{getattr(vm.cfg, field)!r}")
            if "arch" not in VARIANTS[v][1] and vm.cfg.arch != arch:
                raise ValueError(f"variants[{arch!r}][{v!r}] is a {vm.cfg.arch!r} model: a {v} variant of {arch!r} "
                                 f"keeps its base's arch")
            if vm.cfg.n_items != models[arch].cfg.n_items:
                raise ValueError(f"variants[{arch!r}][{v!r}] scores {vm.cfg.n_items} items, its base "
                                 f"{models[arch].cfg.n_items}")
            out.append((arch, v, vm))
    return out


def _bytes(caches) -> int:
    return int(sum(int(c.nbytes_per_user()[0]) for c in caches))


def _read(caches) -> float:
    return float(_attended_entries(caches)[0])


@torch.no_grad()
def models_resources(models: Mapping, variants: Optional[Mapping] = None, ns: Sequence[int] = RESOURCE_NS,
                     methods: Sequence[str] = RESOURCE_METHODS, budget: float = 0.25, request_size: int = 8,
                     truncate_window: int = 200, repeats: int = 9, seed: int = 0, timestamps: bool = True) -> list:
    """Rows (model, N, family, method, budget, bytes_per_user, request_ms, stored / read entries per head) for
    every base model's methods and every trained variant at every N, all of one N timed in ONE interleaved round
    (``_interleaved_ms``), so each row's latency is comparable with every other's at that N.

    ``models``: {"hstu"/"sasrec": base model}. ``variants``: {base arch: {variant key: trained variant model}}.
    A variant keeping its base's arch (Reformer) is a row of that base (``model`` = the base arch); one overriding
    it (RWKV) is a row of its own arch, measured once however many bases list the same model object
    (``variant_of`` names them). ``timestamps``: give the synthetic users timestamps (as the models were trained:
    with or without)."""
    if not isinstance(ns, (list, tuple)):
        raise TypeError(f"ns must be a list of history lengths, got {type(ns).__name__}")
    if not ns:
        raise ValueError("ns must hold at least one history length")
    for n in ns:
        _positive_int("ns (each history length)", n)
    _positive_int("request_size", request_size)
    _positive_int("repeats", repeats)
    _positive_int("truncate_window", truncate_window, request_size + 1)
    vlist = _check_models(models, variants)
    for m in models.values():
        m.eval()
    served = {}   # id(variant model) -> [row model name, key, model, bases]
    for arch, v, vm in vlist:
        vm.eval()
        if id(vm) in served:
            served[id(vm)][3].append(arch)
            continue
        name = arch if vm.cfg.arch == arch else vm.cfg.arch
        if any(s[0] == name and s[1] == v for s in served.values()):
            name = f"{vm.cfg.arch}/{arch}"     # a second, different model of the same arch-overriding variant
        served[id(vm)] = [name, v, vm, [arch]]
    specs = [s for s in build_grid(methods, (budget,), (8, 4, 2), ()) if s.method != "none"]
    some = next(iter(models.values()))
    rows = []
    for n in ns:
        hist, req = _user(some.cfg.n_items, n, request_size, seed, timestamps)
        w = truncate_window - request_size
        short_hist = make_jagged([hist.items[-w:].numpy()], None if hist.timestamps is None
                                 else [hist.timestamps[-w:].numpy()])
        cases = []    # (row name, method, family, budget label, serving model, caches, extra fields)
        for arch, model in models.items():
            native, stats = model.encode_history(hist, return_stats=True, stats_window=request_size)
            cases.append((arch, "native", "native", "100%", model, native, {}))
            cases.append((arch, f"truncate-{truncate_window}", "truncate", f"{w} entries", model,
                          model.encode_history(short_hist), {}))
            cases += [(arch, s.label, FAMILY[s.level], s.budget_label, model,
                       _compress_caches(model, native, stats, s, seed), {}) for s in specs]
        for name, v, vm, bases in served.values():
            cases.append((name, v, FAMILY[VARIANTS[v][0]], "trained variant", vm, vm.encode_history(hist),
                          {"variant": v, "variant_of": list(bases)}))
        ms = _interleaved_ms({(c[0], c[1]): (lambda m=c[4], caches=c[5]: m.serve(req, caches=caches))
                              for c in cases}, repeats)
        for name, method, family, blabel, _, caches, extra in cases:
            rows.append(dict(model=name, N=n, family=family, method=method, budget=blabel,
                             bytes_per_user=_bytes(caches), request_ms=ms[(name, method)],
                             stored_entries_per_head=float(_stored_entries(caches)[0]),
                             entries_read_per_head=_read(caches), **extra))
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


def variant_comparison(model_rows: list) -> list:
    """Each trained variant's row at each N against the native cache of every base it stands for (same run, same
    N): bytes and latency ratios, the entries a request query reads per (layer, kv head)."""
    native = {(r["model"], r["N"]): r for r in model_rows if r["method"] == "native"}
    out = []
    for r in model_rows:
        for base in r.get("variant_of", ()):
            nat = native[(base, r["N"])]
            out.append(dict(variant=r["method"], model=r["model"], base=base, N=r["N"],
                            bytes_per_user=r["bytes_per_user"], native_bytes=nat["bytes_per_user"],
                            bytes_ratio=r["bytes_per_user"] / nat["bytes_per_user"], request_ms=r["request_ms"],
                            native_ms=nat["request_ms"], latency_ratio=r["request_ms"] / nat["request_ms"],
                            entries_read_per_head=r["entries_read_per_head"],
                            native_entries_per_head=nat["entries_read_per_head"]))
    return out


def _variant_markdown(model_rows: list) -> list:
    comp = variant_comparison(model_rows)
    if not comp:
        return []
    out = ["## Trained variants vs the native cache (same run, same user, timed in the same interleaved round)\n\n"
           "Ratios against the native cache of the base model each variant stands for (RWKV: one model beside "
           "both). Entries read per head: the mean entries one request query reads per (layer, kv head) -- "
           "Reformer's LSH buckets, none for a recurrent state; in parentheses the native cache's.\n\n"
           "| variant | vs native | N | bytes | native bytes | bytes ratio | ms | native ms | latency ratio | "
           "entries read per head (native) |\n|---|---|---|---|---|---|---|---|---|---|\n"]
    for c in comp:
        name = c["variant"] if c["model"] == c["variant"] else f"{c['model']} {c['variant']}"
        out.append(f"| {name} | {c['base']} | {c['N']} | {c['bytes_per_user']:,} | "
                   f"{c['native_bytes']:,} | {c['bytes_ratio']:.4f} | {c['request_ms']:.2f} | "
                   f"{c['native_ms']:.2f} | {c['latency_ratio']:.2f}x | {c['entries_read_per_head']:,.0f} "
                   f"({c['native_entries_per_head']:,.0f}) |\n")
    out.append("\n")
    return out


def resources_markdown(model_rows: list, attn_rows: list, meta: Dict) -> str:
    out = ["# Resources at real history lengths\n\n",
           f"{meta.get('processor') or meta.get('machine')}, {meta.get('threads')} thread(s), "
           f"torch {meta.get('torch')}, CPU ISA variants: {meta.get('isa', '?')}"
           + ("; kernels ran: " + ", ".join(f"{k} {v}" for k, v in meta["isa_ran"].items()) if meta.get("isa_ran")
              else "") + f". {meta.get('note', '')}\n\n",
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
    out += _variant_markdown(model_rows)
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
              "merging": "tab:green", "hybrid": "tab:purple", "sequence": "tab:orange", "architecture": "tab:brown",
              "head": "tab:olive", "memory": "tab:cyan"}
    styles = {"hstu": "-", "sasrec": "--"}
    for (arch, key), ax in [((a, k), ax) for k, ax in (("bytes_per_user", axes[0]), ("request_ms", axes[1]))
                            for a in sorted({r["model"] for r in model_rows})]:
        for m in dict.fromkeys(r["method"] for r in model_rows if r["model"] == arch):
            sel = sorted((r for r in model_rows if r["model"] == arch and r["method"] == m), key=lambda r: r["N"])
            variant = "variant" in sel[0]
            ax.plot([r["N"] for r in sel], [r[key] for r in sel], styles.get(arch, ":"),
                    marker="s" if variant else "o", ms=5 if variant else 3, color=colors[sel[0]["family"]],
                    label=f"{arch} {m}" if arch != m else m, lw=2 if variant else 1)
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
        # the variant each kernel family the rows run actually dispatches to (isa.h's family table)
        meta["isa_ran"] = {f: torch.ops.malloc_kernels.cpu_isa_variant(f) for f in ISA_FAMILIES}
    except (AttributeError, RuntimeError):
        meta["isa"] = "AVX2/FMA/F16C or portable, picked at run time"
    return meta

