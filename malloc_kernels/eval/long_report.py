"""Outputs of the long-history run: ``long_accuracy.md/.csv``, ``long_tradeoff.png`` (NDCG@10 vs bytes),
``long_by_length.png`` (change vs the equal-bytes truncate per history-length bucket) and ``results.json``.

One markdown table per (dataset, model, bucket); a ``*`` marks a change whose paired bootstrap 95% interval
excludes 0. ``results.json`` holds every row with its ``method``, ``truncate_of`` (the compressed row whose bytes a
``truncate`` row matches) and ``bucket``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from .report import write_csv

LONG_COLUMNS = ("dataset", "model", "protocol", "bucket", "users", "level", "method", "budget", "truncate_of",
                "bytes_per_user", "ratio", "entries_per_head", "HR@10", "NDCG@10", "MRR",
                "d_native", "d_native_lo", "d_native_hi", "d_native_sig",
                "d_truncate", "d_truncate_lo", "d_truncate_hi", "d_truncate_sig", "ms_per_user")

LEGEND = """- `bucket`: users by history length before the target (interactions); `all` = every selected user
- `truncate`: the most recent entries of the history, re-encoded, native precision, in at most the bytes the
  method above it spent on each user (within one entry); `truncate-200`: the training window (200 items incl. the
  request); `recent` instead evicts all but the most recent entries from the long history's cache
- `popularity`: items ranked by training interaction counts (no cache)
- budget `trained`: a trained variant (RWKV: its recurrent state; Reformer: every entry + LSH bucket ids) serving the
  same whole histories; the truncate below it is the base model's at the variant's bytes
- `bytes/user`: exact cache bytes of all layers per user (mean); `ratio`: / the native (whole-history) cache's
- `dNDCG vs native [95%]`: change of NDCG@10 vs the uncompressed whole-history cache, paired bootstrap interval over
  the same users; `vs truncate`: change vs the equal-bytes truncate row; `*` = the interval excludes 0
- `ms/user`: serving wall time per user, batched (request over the caches; the history encode is not included)
"""


def _f(v, nd=4):
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{nd}f}"
    return str(v)


def _bytes(v):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:,.0f}"


def _ci(r, key):
    if key not in r or (isinstance(r[key], float) and math.isnan(r[key])):
        return ""
    star = "*" if r.get(f"{key}_sig") else ""
    return f"{r[key]:+.4f}{star} [{r[f'{key}_lo']:+.4f}, {r[f'{key}_hi']:+.4f}]"


def long_markdown(rows: list, protocol_note: str = "") -> str:
    out = []
    groups = []
    for r in rows:
        g = (r["dataset"], r["model"], r["bucket"])
        if g not in groups:
            groups.append(g)
    for ds, model, bucket in groups:
        sel = [r for r in rows if (r["dataset"], r["model"], r["bucket"]) == (ds, model, bucket)]
        n = sel[0]["users"]
        proto = ("full ranking" if sel[0]["protocol"] == "full"
                 else f"sampled: target vs {sel[0].get('negatives')} random negatives")
        out.append(f"### {model} on {ds}, bucket `{bucket}` ({n} users; {proto})\n")
        if n == 0:
            out.append("| (empty bucket: no user has a history of this length) |\n|---|\n")
            continue
        out.append("| method | budget | bytes/user | ratio | NDCG@10 | HR@10 | dNDCG vs native [95%] | "
                   "vs truncate at equal bytes [95%] | ms/user |\n|---|---|---|---|---|---|---|---|---|\n")
        for r in sel:
            out.append(f"| {r['method']} | {r['budget']} | {_bytes(r['bytes_per_user'])} | {_f(r['ratio'], 3)} | "
                       f"{_f(r['NDCG@10'])} | {_f(r['HR@10'])} | {_ci(r, 'd_native')} | {_ci(r, 'd_truncate')} | "
                       f"{_f(r['ms_per_user'], 2)} |\n")
        out.append("\n")
    return "".join(out)


def plot_tradeoff(rows: list, path: Path) -> None:
    """NDCG@10 vs bytes per user (bucket ``all``): each compressed row joined to its equal-bytes truncate."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["bucket"] == "all"]
    groups = sorted({(r["dataset"], r["model"]) for r in rows})
    fig, axes = plt.subplots(1, max(len(groups), 1), figsize=(7 * max(len(groups), 1), 5.5), squeeze=False)
    for ax, (ds, model) in zip(axes[0], groups):
        sel = [r for r in rows if (r["dataset"], r["model"]) == (ds, model)]
        by_key = {(r["method"], r["budget"]): r for r in sel}
        for r in sel:
            if r["level"] in ("truncate", "baseline"):
                continue
            t = next((x for x in sel if x["method"] == "truncate" and x["budget"] == f"= {r['method']} "
                      f"{r['budget']}"), None)
            x, y = r["bytes_per_user"], r["NDCG@10"]
            ax.scatter(x, y, color="tab:blue", s=26, zorder=3, marker="*" if r.get("d_truncate_sig") else "o")
            ax.annotate(f"{r['method']} {r['budget']}", (x, y), fontsize=6, xytext=(3, 2),
                        textcoords="offset points")
            if t is not None:
                ax.scatter(t["bytes_per_user"], t["NDCG@10"], color="tab:red", s=14, zorder=3)
                ax.plot([x, t["bytes_per_user"]], [y, t["NDCG@10"]], color="gray", lw=0.6, zorder=2)
        nat = by_key.get(("native", "100%"))
        if nat:
            ax.axhline(nat["NDCG@10"], color="black", ls=":", lw=0.8, label="native (whole history)")
        pop = next((r for r in sel if r["method"] == "popularity"), None)
        if pop:
            ax.axhline(pop["NDCG@10"], color="tab:olive", ls="--", lw=0.8, label="popularity")
        t200 = next((r for r in sel if r["method"].startswith("truncate-")), None)
        if t200:
            ax.scatter(t200["bytes_per_user"], t200["NDCG@10"], color="black", marker="s", s=24,
                       label=t200["method"])
        ax.scatter([], [], color="tab:blue", label="compressed whole history (* = differs from truncate, 95%)")
        ax.scatter([], [], color="tab:red", label="truncate at equal bytes")
        ax.set_xscale("log")
        ax.set_xlabel("cache bytes per user (all layers)")
        ax.set_ylabel("NDCG@10" + (f" (sampled, {sel[0].get('negatives')} negatives)"
                                   if sel[0]["protocol"] == "sampled" else " (full ranking)"))
        ax.set_title(f"{model} on {ds}: {sel[0]['users']} users")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_by_length(rows: list, path: Path) -> None:
    """Per (dataset, model): every compressed row's NDCG@10 change vs its equal-bytes truncate in each history-length
    bucket, with the paired bootstrap 95% interval (filled marker = the interval excludes 0): where along the
    history length a compressed whole history starts (or stops) paying against keeping only the recent part."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["dataset"], r["model"]) for r in rows})
    fig, axes = plt.subplots(1, max(len(groups), 1), figsize=(7 * max(len(groups), 1), 4.8), squeeze=False)
    for ax, (ds, model) in zip(axes[0], groups):
        sel = [r for r in rows if (r["dataset"], r["model"]) == (ds, model) and r["users"] > 0]
        buckets = []
        for r in sel:
            if r["bucket"] not in buckets:
                buckets.append(r["bucket"])
        comp = [r for r in sel if r["level"] not in ("baseline", "truncate")]   # compressed rows and variants
        methods = []
        for r in comp:
            if (r["method"], r["budget"]) not in methods:
                methods.append((r["method"], r["budget"]))
        width = 0.8 / max(len(methods), 1)
        for mi, (m, b) in enumerate(methods):
            xs, ys, lo, hi, sig = [], [], [], [], []
            for bi, bucket in enumerate(buckets):
                r = next((x for x in comp if (x["method"], x["budget"], x["bucket"]) == (m, b, bucket)), None)
                if r is None or "d_truncate" not in r:
                    continue
                xs.append(bi - 0.4 + width * (mi + 0.5))
                ys.append(r["d_truncate"])
                lo.append(r["d_truncate"] - r["d_truncate_lo"])
                hi.append(r["d_truncate_hi"] - r["d_truncate"])
                sig.append(bool(r["d_truncate_sig"]))
            color = plt.cm.tab10(mi % 10)
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt="none", ecolor=color, lw=0.8)
            ax.scatter(xs, ys, color=color, s=22, label=f"{m} {b}", zorder=3,
                       facecolors=[color if s else "white" for s in sig])
        ax.axhline(0.0, color="black", lw=0.8)
        n = {r["bucket"]: r["users"] for r in sel}
        ax.set_xticks(range(len(buckets)))
        ax.set_xticklabels([f"{bk}\n({n[bk]} users)" for bk in buckets], fontsize=7)
        ax.set_xlabel("history length (interactions)")
        ax.set_ylabel("NDCG@10: compressed whole history - truncate at equal bytes")
        ax.set_title(f"{model} on {ds}", fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def write_long_outputs(rows: list, out: Path, meta: dict) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"long_accuracy_md": out / "long_accuracy.md", "long_accuracy_csv": out / "long_accuracy.csv",
             "long_tradeoff_png": out / "long_tradeoff.png", "long_by_length_png": out / "long_by_length.png",
             "results_json": out / "results.json"}
    head = (f"# Long histories: compressed whole history vs truncated at equal bytes\n\n{meta.get('dataset', '')}, "
            f"{meta.get('users')} users, history lengths {meta.get('history_lengths')}\n\n")
    paths["long_accuracy_md"].write_text(head + long_markdown(rows) + "\n" + LEGEND)
    write_csv(paths["long_accuracy_csv"], rows, LONG_COLUMNS)
    plot_tradeoff(rows, paths["long_tradeoff_png"])
    plot_by_length(rows, paths["long_by_length_png"])
    with open(paths["results_json"], "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)
    return paths
