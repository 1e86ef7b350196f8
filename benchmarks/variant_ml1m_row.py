"""Rows of trained variants (RWKV, Reformer) for the ML-1M tables, trained outside the table's run.

The tables in ``benchmarks/results/ml1m_eval`` come from ``malloc-eval --full`` (base models trained 45 wall-minutes
each; head/sequence variants uptrained 3 epochs from them). Their base checkpoints are not always at hand (retraining
them costs 90 minutes of a 2-core machine), and RWKV trains from scratch anyway. So a variant is trained on its own
with the table's recipe (d_model 64, 2 layers, full softmax, cosine schedule over 24 epochs with 100 warm-up steps,
last windows) on a CPU-time budget, which concurrent runs on a shared machine each get in full::

    python -m malloc_kernels.models.train --data ../shared/data/ml-1m --model rwkv --d-model 64 --layers 2 \\
        --max-len 200 --full-softmax --schedule cosine --warmup-steps 100 --epochs 24 --time-budget-min 45 \\
        --budget-clock cpu --eval-every 0 --threads 1 --out /tmp/rwkv.json
    (the same with --model hstu --seq-compress reformer, and --model sasrec --seq-compress reformer)

and evaluated here on the table's users (same sample, request size, batch size and serving path as the harness),
next to the table's native rows::

    python benchmarks/variant_ml1m_row.py --report /tmp/rwkv.json /tmp/hstu-reformer.json ... --save

``--report``: the training reports (``--out`` of the training run: checkpoint path, recipe, curve, threads). An RWKV
model is compared with every native row (one model serves both columns); a Reformer model with its base
architecture's. The table's rows carry no per-user ranks, so the changes are unpaired (the standard error of the
variant's own metric is given). ``--save`` writes ``benchmarks/results/ml1m_eval_variants/variant_rows.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from malloc_kernels.data import load_dataset
from malloc_kernels.eval.methods import VARIANTS, MethodSpec
from malloc_kernels.eval.runner import EvalConfig, _sample, evaluate_specs
from malloc_kernels.eval.stats import per_user_metrics
from malloc_kernels.models.train import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "ml1m_eval_variants"
METRICS = ("HR@10", "NDCG@10", "MRR", "GAUC")


def variant_of(model_cfg) -> str:
    """The ``VARIANTS`` key a trained model is a row of."""
    if model_cfg.arch == "rwkv":
        return "rwkv"
    if model_cfg.seq_compress == "reformer":
        return "reformer"
    raise ValueError(f"the checkpoint holds a {model_cfg.arch} model without a variant this script reports "
                     f"(rwkv, or seq_compress='reformer')")


def _training(report: dict) -> dict:
    last = report["curve"][-1] if report["curve"] else {}
    t = report["train"]
    return {"budget_clock": report.get("budget_clock", "wall"), "time_budget_min": t["time_budget_min"],
            "threads": report["threads"], "epochs_scheduled": t["epochs"], "epochs_done": last.get("epoch", 0),
            "steps": last.get("steps"), "cpu_seconds": last.get("cpu_seconds"),
            "wall_seconds": last.get("wall_seconds"), "train_seconds": report["train_seconds"],
            "schedule_complete": bool(last) and last.get("epoch", 0) >= t["epochs"],
            "test_all_users": report["test"], "checkpoint": Path(report["checkpoint"]).name, "train_cfg": t,
            "model_cfg": report["model"]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--report", nargs="+", required=True, help="training reports (--out of models.train)")
    ap.add_argument("--table", default=str(ROOT / "benchmarks" / "results" / "ml1m_eval"))
    ap.add_argument("--data", default=None, help="ML-1M folder (default: the table's, relative to the repo root)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--save", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    table = Path(args.table)
    meta = json.loads((table / "results.json").read_text())["meta"]
    conf = {k: v for k, v in meta["config"].items() if k in EvalConfig.__dataclass_fields__}
    cfg = EvalConfig(**{**conf, "progress": False})
    data = args.data or str((ROOT / cfg.data).resolve())
    ds = load_dataset(data)
    examples = _sample(ds.split().test, cfg.users, cfg.seed)
    table_rows = [json.loads(x) for x in (table / "rows.jsonl").read_text().splitlines() if x.strip()]
    table_rows = [r for r in table_rows if r["run_key"] == meta["run_key"]]
    natives = {r["model"]: r for r in table_rows if r["method"] == "native"}
    rows = []
    for path in args.report:
        report = json.loads(Path(path).read_text())
        model = load_checkpoint(report["checkpoint"])
        variant = variant_of(model.cfg)
        spec = MethodSpec(variant, VARIANTS[variant][0], variant=variant)
        row = evaluate_specs(model, examples, [spec], cfg, desc=variant)[spec.key]
        ndcg = per_user_metrics(np.asarray(row.pop("ranks")))["NDCG@10"]
        against = sorted(natives) if variant == "rwkv" else [model.cfg.arch]
        row.update(dataset=ds.name, model=model.cfg.arch, variant=variant, level=spec.level,
                   params=sum(p.numel() for p in model.parameters()),
                   ndcg_se=float(np.std(ndcg, ddof=1) / math.sqrt(len(ndcg))), training=_training(report))
        row["vs_native"] = {
            arch: {"native_bytes_per_user": natives[arch]["bytes_per_user"],
                   "ratio": row["bytes_per_user"] / natives[arch]["bytes_per_user"],
                   "native_macs_per_request": natives[arch]["macs_per_request"],
                   **{f"native_{m}": natives[arch][m] for m in METRICS},
                   **{f"d{m}": row[m] - natives[arch][m] for m in METRICS}}
            for arch in against}
        rows.append(row)
    others = [{k: r[k] for k in ("model", "level", "method", "bytes_per_user", "HR@10", "NDCG@10")}
              for r in table_rows if r["level"] in ("head", "sequence")]
    res = {"table": str(table.relative_to(ROOT)) if table.is_relative_to(ROOT) else str(table),
           "run_key": meta["run_key"], "users": len(examples), "request_size": cfg.request_size,
           "batch_size": cfg.batch_size, "max_len": cfg.max_len, "serving_threads": args.threads,
           "table_training": {"time_budget_min": meta["config"]["time_budget_min"], "budget_clock": "wall",
                              "epochs": meta["config"]["epochs"], "uptrain_epochs": meta["config"]["uptrain_epochs"]},
           "rows": rows, "table_variants": others}
    print(json.dumps(res, indent=1))
    if args.save:
        write(res)
    return res


def write(res: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "variant_rows.json").write_text(json.dumps(res, indent=1))
    tt = res["table_training"]
    lines = [
        "# ML-1M: the RWKV (architecture level) and Reformer (sequence level) rows", "",
        f"Generated by `python benchmarks/variant_ml1m_row.py --report ... --save` against `{res['table']}` (run key "
        f"{res['run_key']}: the same {res['users']:,} test users, request of {res['request_size']}, batch "
        f"{res['batch_size']}, max_len {res['max_len']}; served on {res['serving_threads']} thread).", "",
        "Training: each variant from scratch with the table's recipe (d_model 64, 2 layers, full softmax, cosine "
        "schedule over 24 epochs, 100 warm-up steps, last windows) on a budget of 45 **CPU** minutes on 1 thread "
        "(`--budget-clock cpu`: the runs shared a 2-core machine with each other and another engineer's jobs). The "
        f"table's base models had {tt['time_budget_min']:g} **wall** minutes on 1-2 threads (budget cap; "
        f"`benchmarks/results/{{hstu,sasrec}}_ml1m_24epochs.json`: HSTU completed the 24-epoch schedule, SASRec "
        f"stopped at 22 of 24 epochs) and its head/sequence variants were uptrained "
        f"{tt['uptrain_epochs']} epochs from those bases; here the Reformer trains from scratch.", "",
        "| model | variant | level | HR@10 | NDCG@10 (+-SE) | MRR | GAUC | bytes/user | MACs/request | "
        "epochs | steps | CPU s | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        t = r["training"]
        lines.append(f"| {r['model']} | {r['variant']} | {r['level']} | {r['HR@10']:.4f} | {r['NDCG@10']:.4f} "
                     f"(+-{r['ndcg_se']:.4f}) | {r['MRR']:.4f} | {r['GAUC']:.4f} | {r['bytes_per_user']:,.0f} | "
                     f"{r['macs_per_request']:,.0f} | {t['epochs_done']:g} / {t['epochs_scheduled']} | "
                     f"{t['steps']:,} | {t['cpu_seconds']:,.0f} | {t['wall_seconds']:,.0f} |")
    lines += ["", "Against the native rows of the table (unpaired: the table keeps no per-user ranks; the standard "
              "error of one NDCG@10 over 1,000 users is the +-SE above, that of a difference about 1.4x it):", "",
              "| variant | vs native | native bytes/user | bytes ratio | native NDCG@10 | dNDCG@10 | native HR@10 | "
              "dHR@10 | dMRR | dGAUC | MACs ratio |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        for arch, v in r["vs_native"].items():
            lines.append(f"| {r['model']}/{r['variant']} | {arch} | {v['native_bytes_per_user']:,.0f} | "
                         f"{v['ratio']:.4f} | {v['native_NDCG@10']:.4f} | {v['dNDCG@10']:+.4f} | "
                         f"{v['native_HR@10']:.4f} | {v['dHR@10']:+.4f} | {v['dMRR']:+.4f} | {v['dGAUC']:+.4f} | "
                         f"{r['macs_per_request'] / v['native_macs_per_request']:.3f} |")
    lines += ["", "MACs/request: the harness's analytic count (a Reformer query reads only the entries of its LSH "
              "buckets). Serving latency is not compared: the table's was measured in another run on another load."]
    (OUT / "variant_rows.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
