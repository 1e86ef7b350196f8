"""Condense ``malloc-eval`` results into one side-by-side table per dataset (the README's ML-1M summary).

    python tools/eval_summary.py benchmarks/results/ml1m_eval/results.json [more results.json ...]

One row per method x budget, the models side by side: cache bytes per user as a fraction of the native cache (one
figure when it is the same for every model), each model's NDCG@10 with its change vs the native cache (absolute
points), HR@10, and the measured latency of a request batch. Rows
from several results files (e.g. the MSN rows evaluated into their own directory) are merged; the full tables stay in
each directory's ``accuracy.md`` / ``resources.md``.
"""
from __future__ import annotations

import sys
import json
import math
from pathlib import Path
from malloc_kernels.cli_args import Parser, guard

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
    head = ["level", "method", "budget", "bytes ratio"]
    head += [f"{m} NDCG@10 (change)" for m in models] + [f"{m} HR@10" for m in models]
    head += [f"{m} latency ms" for m in models]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in keys:
        ratios, ndcg, hr, lat = [], [], [], []
        for m in models:
            r, base = by_key[key].get(m), native.get(m)
            if r is None:
                ndcg.append("-"), hr.append("-"), lat.append("-")
                continue
            if base and base["bytes_per_user"]:
                ratios.append(_cell(r["bytes_per_user"] / base["bytes_per_user"], ".3f"))
            delta = _cell(r["NDCG@10"] - base["NDCG@10"], "+.4f") if base else "-"
            ndcg.append(f"{_cell(r['NDCG@10'], '.4f')} ({delta})")
            hr.append(_cell(r["HR@10"], ".4f"))
            lat.append(_cell(r.get("latency_ms"), ".1f"))
        ratio = " / ".join(dict.fromkeys(ratios)) or "-"  # one figure when every model's cache shrinks alike
        lines.append("| " + " | ".join(list(key) + [ratio] + ndcg + hr + lat) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> str:
    ap = Parser(description=__doc__.split("\n")[0])
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
    sys.exit(guard('tools/eval_summary.py', main))
