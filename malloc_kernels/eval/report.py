"""Write the harness' outputs: MALLOC-style accuracy and resource tables (markdown + CSV), the Pareto plot, JSON.

Rows are plain dicts (one per dataset x model x method x budget) with the keys of ``ACCURACY_COLUMNS`` and
``RESOURCE_COLUMNS``; the "native" row of each (dataset, model) is the uncompressed cache every delta refers to.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

ACCURACY_METRICS = ("HR@10", "NDCG@10", "MRR", "GAUC")
KEY_COLUMNS = ("dataset", "model", "level", "method", "budget")
ACCURACY_COLUMNS = (KEY_COLUMNS + ACCURACY_METRICS + tuple(f"d{m}" for m in ACCURACY_METRICS)
                    + ("dNDCG@10_lo", "dNDCG@10_hi", "significant"))
# the markdown shows the NDCG@10 interval in one cell instead of the raw _lo/_hi/significant columns
ACCURACY_MD_COLUMNS = KEY_COLUMNS + ACCURACY_METRICS + tuple(f"d{m}" for m in ACCURACY_METRICS) + ("dNDCG@10 95% CI",)
RESOURCE_COLUMNS = KEY_COLUMNS + ("bytes_per_user", "ratio", "macs_per_request", "latency_ms",
                                  "requests_per_s", "params", "memory_table_bytes")

COLUMN_HELP = {
    "level": "MALLOC level: precision / pruning / merging / hybrid / head / sequence / baseline; memory = MSN; "
             "architecture = RWKV (a recurrent state per user instead of a cache)",
    "budget": "tokens kept (fraction of the cached history) or bits per stored number",
    "HR@10": "hit rate: target among the top 10 of all items",
    "NDCG@10": "normalised discounted cumulative gain of the target in the top 10",
    "MRR": "mean reciprocal rank of the target among all items",
    "GAUC": "per-user AUC of the target against every other item, averaged over users",
    "dX": "change of metric X vs the native (uncompressed) cache of the same model, in absolute points",
    "popularity": "method row ranking items by their training interaction counts (no model, no cache)",
    "dNDCG@10 95% CI": "paired bootstrap 95% interval of dNDCG@10 over the same users (1000 resamples, seeded); "
                       "* = significant (the interval excludes 0)",
    "bytes_per_user": "exact bytes of all layers' caches for one user (payload, scales, zeros, positions, counts)",
    "ratio": "bytes_per_user / the native cache's bytes_per_user",
    "macs_per_request": "analytic multiply-accumulates to serve one request over the cache (all layers)",
    "latency_ms": "measured wall time to serve one request batch (--batch-size users) on this machine",
    "requests_per_s": "measured throughput of requests on this machine",
    "params": "trainable parameters of the served model (embeddings, layers, MSN memory tables)",
    "memory_table_bytes": "bytes of the MSN product-key memories' value and sub-key tables (0 without memory)",
}


def add_deltas(rows: list[dict]) -> list[dict]:
    """Fill ``dHR@10`` etc. relative to the native row of the same (dataset, model)."""
    native = {(r["dataset"], r["model"]): r for r in rows if r["method"] == "native"}
    for r in rows:
        base = native.get((r["dataset"], r["model"]))
        for m in ACCURACY_METRICS:
            r[f"d{m}"] = (r[m] - base[m]) if base is not None and m in r and m in base else float("nan")
        if base is not None and base.get("bytes_per_user"):
            r["ratio"] = r["bytes_per_user"] / base["bytes_per_user"] if r.get("bytes_per_user") else float("nan")
    return rows


def _fmt(v):
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.4f}"
    if isinstance(v, int) and abs(v) >= 10000:
        return f"{v:,}"
    return str(v)


def markdown_table(rows: list[dict], columns) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: list[dict], columns) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in columns})


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated when fewer bytes (x) and higher NDCG (y) are better, sorted by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def plot_pareto(rows: list[dict], path: Path) -> None:
    """Bytes per user (log x) vs NDCG@10, one labelled point per method x budget, Pareto front drawn, a panel per
    (dataset, model)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["dataset"], r["model"]) for r in rows})
    fig, axes = plt.subplots(1, max(len(groups), 1), figsize=(7.5 * max(len(groups), 1), 6), squeeze=False)
    colors = {"baseline": "black", "precision": "tab:blue", "pruning": "tab:red", "merging": "tab:green",
              "hybrid": "tab:purple", "head": "tab:orange", "sequence": "tab:brown", "memory": "tab:pink"}
    for ax, (ds, model) in zip(axes[0], groups):
        pts = [r for r in rows if (r["dataset"], r["model"]) == (ds, model) and r.get("bytes_per_user")]
        xy = [(float(r["bytes_per_user"]), float(r["NDCG@10"])) for r in pts]
        for r, (x, y) in zip(pts, xy):
            ax.scatter(x, y, color=colors.get(r["level"], "gray"), s=28, zorder=3,
                       edgecolors="black" if r.get("significant") else "none", linewidths=1.2)
            ax.annotate(f"{r['method']} {r['budget']}", (x, y), fontsize=6, xytext=(3, 2),
                        textcoords="offset points")
        native = next((r for r in pts if r["method"] == "native"), None)
        if native is not None:
            ax.axhline(float(native["NDCG@10"]), color="black", lw=0.8, ls=":", zorder=1, label="native NDCG@10")
        pop = next((r for r in rows if (r["dataset"], r["model"], r["method"]) == (ds, model, "popularity")), None)
        if pop is not None:
            ax.axhline(float(pop["NDCG@10"]), color="tab:olive", lw=0.8, ls="--", zorder=1, label="popularity")
        ax.scatter([], [], color="white", edgecolors="black", label="change vs native significant (95%)")
        front = pareto_front(xy)
        if front:
            ax.plot([xy[i][0] for i in front], [xy[i][1] for i in front], "--", color="gray", zorder=2,
                    label="Pareto front")
        for level, c in colors.items():
            if any(r["level"] == level for r in pts):
                ax.scatter([], [], color=c, label=level)
        ax.set_xscale("log")
        ax.set_xlabel("cache bytes per user (all layers)")
        ax.set_ylabel("NDCG@10")
        ax.set_title(f"{model} on {ds}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def write_outputs(rows: list[dict], out_dir: Path, meta: dict) -> dict:
    """Write accuracy.md/.csv, resources.md/.csv, pareto.png and results.json; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = add_deltas(rows)
    for r in rows:
        if "dNDCG@10_lo" in r:
            r["dNDCG@10 95% CI"] = (f"[{r['dNDCG@10_lo']:+.4f}, {r['dNDCG@10_hi']:+.4f}]"
                                    f"{'*' if r.get('significant') else ''}")
    legend = "\n".join(f"- `{k}`: {v}" for k, v in COLUMN_HELP.items())
    acc_md = "# Accuracy (MALLOC Table-2 style)\n\n" + markdown_table(rows, ACCURACY_MD_COLUMNS) + "\n" + legend + "\n"
    res_md = "# Resources (MALLOC Table-3 style)\n\n" + markdown_table(rows, RESOURCE_COLUMNS) + "\n" + legend + "\n"
    paths = {
        "accuracy_md": out_dir / "accuracy.md", "accuracy_csv": out_dir / "accuracy.csv",
        "resources_md": out_dir / "resources.md", "resources_csv": out_dir / "resources.csv",
        "pareto_png": out_dir / "pareto.png", "results_json": out_dir / "results.json",
    }
    paths["accuracy_md"].write_text(acc_md)
    paths["resources_md"].write_text(res_md)
    write_csv(paths["accuracy_csv"], rows, ACCURACY_COLUMNS)
    write_csv(paths["resources_csv"], rows, RESOURCE_COLUMNS)
    plot_pareto(rows, paths["pareto_png"])
    with open(paths["results_json"], "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)
    return paths
