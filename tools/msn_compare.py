"""HSTU (or SASRec) with and without the MSN product-key memory at equal training budget (issue 9 acceptance).

Runs ``python -m malloc_kernels.models.train`` twice with the same arguments and time budget, once with ``--msn``,
and prints / writes the test metrics next to each other with parameters, memory-table bytes, training time and the
memory's slot usage over its last training epoch. The ML-1M comparison::

    python tools/msn_compare.py --out benchmarks/results/msn_ml1m.json -- \\
        --data ../shared/data/ml-1m --model hstu --max-len 200 --epochs 200 --time-budget-min 45 --eval-every 2

Everything after ``--`` goes to both training runs (the run without memory reuses the baseline's checkpoint when
the arguments match the baseline command of ``malloc_kernels/models/train.py``). ``--msn-arg`` adds arguments to
the memory run only (e.g. ``--msn-arg=--msn-slots=65536``). A quick smoke run::

    python tools/msn_compare.py -- --data ml-latest-small --time-budget-min 1 --epochs 50 --no-progress
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from malloc_kernels.models.train import main as train_main
from malloc_kernels.cli_args import Parser, guard


def _summary(rep: dict) -> dict:
    # slot usage of the last whole epoch: a run stopped by its time budget ends with a sliver of an epoch whose
    # few batches hit only a fraction of the slots
    whole = [p for p, prev in zip(rep["curve"], [{"epoch": 0.0}] + rep["curve"])
             if "slot_usage" in p and p["epoch"] - prev["epoch"] >= 0.5]
    last_usage = whole[-1]["slot_usage"] if whole else None
    return {"test": rep["test"], "train_seconds": rep["train_seconds"],
            "epochs": rep["curve"][-1]["epoch"] if rep["curve"] else 0, "params": rep["params"],
            "memory_table_bytes": rep["memory_table_bytes"], "slot_usage": last_usage, "model": rep["model"],
            "valid_curve": [{"epoch": p["epoch"], "minutes": p["train_seconds"] / 60, **p["valid"]}
                            for p in rep["curve"] if "valid" in p]}


def _epoch_matched(base: dict, msn: dict) -> list[str]:
    """Validation NDCG@10 / HR@10 of both runs at the epochs both evaluated: the comparison free of wall-clock noise."""
    at = {round(p["epoch"], 2): p for p in base["valid_curve"]}
    lines = ["| epoch | baseline valid NDCG@10 | msn valid NDCG@10 | baseline valid HR@10 | msn valid HR@10 |",
             "|---|---|---|---|---|"]
    for p in msn["valid_curve"]:
        b = at.get(round(p["epoch"], 2))
        if b is not None:
            lines.append(f"| {p['epoch']:.0f} | {b['NDCG@10']:.4f} | {p['NDCG@10']:.4f} | {b['HR@10']:.4f} | "
                         f"{p['HR@10']:.4f} |")
    return lines


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    ap = Parser(prog="tools/msn_compare.py", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="write both reports' summaries as JSON here")
    ap.add_argument("--msn-arg", action="append", default=[], help="extra train.py argument for the msn run only")
    args = ap.parse_args(own)
    if "--msn" in train_args:
        raise ValueError("train arguments must not contain --msn (the tool adds it to the second run)")
    base = _summary(train_main(train_args))
    msn = _summary(train_main(train_args + ["--msn"] + args.msn_arg))
    result = {"train_args": train_args, "msn_args": args.msn_arg, "baseline": base, "msn": msn}
    metrics = [k for k in base["test"] if k != "users"]
    lines = ["| model | " + " | ".join(metrics) + " | params | memory table bytes | train s | epochs | slots hit |",
             "|" + "---|" * (len(metrics) + 6)]
    for name, r in (("baseline", base), ("msn", msn)):
        hit = "-" if not r["slot_usage"] else ", ".join(f"{u['fraction_hit']:.3f}" for u in r["slot_usage"])
        lines.append(f"| {name} | " + " | ".join(f"{r['test'][m]:.4f}" for m in metrics)
                     + f" | {r['params']:,} | {r['memory_table_bytes']:,} | {r['train_seconds']:.0f} | "
                       f"{r['epochs']:.2f} | {hit} |")
    lines += ["", "Validation at matched epochs:", ""] + _epoch_matched(base, msn)
    print("\n".join(lines))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        Path(args.out).with_suffix(".tables.md").write_text("\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    sys.exit(guard('tools/msn_compare.py', main))
