"""Condense ``malloc-eval`` results into one side-by-side table per dataset (the README's ML-1M summary).

    python tools/eval_summary.py benchmarks/results/ml1m_eval/results.json [more results.json ...]

One row per method x budget, the models side by side: cache bytes per user as a fraction of the native cache, then
for each model NDCG@10, its change vs the native cache (absolute points) and HR@10, then the request latency. Rows
from several results files (e.g. the MSN rows evaluated into their own directory) are merged; the full tables stay in
each directory's ``accuracy.md`` / ``resources.md``.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

LEVEL_ORDER = ("baseline", "precision", "pruning", "merging", "hybrid", "head", "sequence", "memory")


def _budget_key(budget: str) -> float:
    """Larger budgets first: '100%' > '50%' > ... and '8-bit' > '4-bit' > '2-bit'."""
    digits = budget.rstrip("%").split("-")[0]
    try:
        return -float(digits)
    except ValueError:
        return 0.0


def _cell(v: float, fmt: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def summarise(rows: list[dict]) -> str:
    models = sorted({r["model"] for r in rows})
    native = {r["model"]: r for r in rows if r["method"] == "native"}
    by_key: dict[tuple, dict] = {}
    for r in rows:
        by_key.setdefault((r["level"], r["method"], r["budget"]), {})[r["model"]] = r
    keys = sorted(by_key, key=lambda k: (LEVEL_ORDER.index(k[0]) if k[0] in LEVEL_ORDER else len(LEVEL_ORDER),
                                         _budget_key(k[2]), k[1]))
    head = ["level", "method", "budget"]
    for m in models:
        head += [f"{m} bytes ratio", f"{m} NDCG@10", f"{m} dNDCG@10", f"{m} HR@10", f"{m} latency ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in keys:
        cells = list(key)
        for m in models:
            r, base = by_key[key].get(m), native.get(m)
            if r is None:
                cells += ["-"] * 5
                continue
            ratio = r["bytes_per_user"] / base["bytes_per_user"] if base and base["bytes_per_user"] else None
            delta = r["NDCG@10"] - base["NDCG@10"] if base else None
            cells += [_cell(ratio, ".3f"), _cell(r["NDCG@10"], ".4f"), _cell(delta, "+.4f"), _cell(r["HR@10"], ".4f"),
                      _cell(r.get("latency_ms"), ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", nargs="+", help="results.json files written by malloc-eval")
    args = ap.parse_args(argv)
    rows, seen = [], set()
    for path in args.results:
        for r in json.loads(Path(path).read_text())["rows"]:
            key = (r["dataset"], r["model"], r["method"], r["budget"])
            if key not in seen:  # a later file never overrides a row (the native rows repeat across runs)
                seen.add(key)
                rows.append(r)
    out = []
    for ds in sorted({r["dataset"] for r in rows}):
        out.append(f"### {ds}\n\n" + summarise([r for r in rows if r["dataset"] == ds]))
    text = "\n".join(out)
    print(text)
    return text


if __name__ == "__main__":
    main()
