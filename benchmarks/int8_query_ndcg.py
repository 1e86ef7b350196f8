"""NDCG@10 / HR@10 of models served from int4 / int2 caches with exact vs int8-query scores, paired per user.

The harness' serving simulation (``eval/runner.py``: leave-one-out test targets, the history's last
``--request-size`` interactions served over the cached rest) on MovieLens-1M: every test user's history is encoded
once, compressed by each precision method, and the same request served twice over the same cache, with
``model.query_precision = "exact"`` and ``"int8"`` (``attention(..., query_precision="int8")``, backend "auto" =
the C++ kernel). The difference int8 - exact is paired per user (same users, same caches): mean and paired
bootstrap 95% interval (``eval/stats.paired_bootstrap``), plus how many users' target rank changed at all.

The models are trained here with a short CPU-time budget (``--train-cpu-min``, one thread; the checkpoint is reused
from the cache on a second run), so their absolute accuracy is below the long recipes' (README, "Evaluation").

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/int8_query_ndcg.py --models hstu,sasrec [--save]

``--save`` writes ``benchmarks/results/int8_query_ndcg.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from malloc_kernels.data import load_dataset
from malloc_kernels.data.dataset import eval_batches, split_request
from malloc_kernels.eval.stats import paired_bootstrap, per_user_metrics
from malloc_kernels.models.config import ModelConfig
from malloc_kernels.models.metrics import target_ranks
from malloc_kernels.models.train import TrainConfig, train

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "ml-1m"
OUT = ROOT / "benchmarks" / "results" / "int8_query_ndcg"
METHODS = ("int4", "int2")
MODES = ("exact", "int8")


@torch.no_grad()
def serve_ranks(model, examples, methods, max_len, request_size, batch_size):
    """{(method, mode): 0-based target ranks per user (example order)}, plus the native cache's ranks."""
    model.eval()
    ranks = {(m, q): [] for m in methods for q in MODES}
    ranks[("none", "exact")] = []
    for batch in eval_batches(examples, batch_size, max_len):
        hist, req = split_request(batch, request_size)
        native = model.encode_history(hist)
        model.query_precision = "exact"
        ranks[("none", "exact")].append(target_ranks(model.score_all_items(model.serve(req, caches=native)),
                                                     batch.targets))
        for m in methods:
            caches = model.compress_caches(native, m)
            for q in MODES:
                model.query_precision = q
                h = model.serve(req, caches=caches)
                ranks[(m, q)].append(target_ranks(model.score_all_items(h), batch.targets))
    model.query_precision = "exact"
    return {k: torch.cat(v).numpy() for k, v in ranks.items()}


def summarize(ranks, methods, n_boot, seed):
    rows = []
    native = per_user_metrics(ranks[("none", "exact")])
    for m in methods:
        ex, q8 = per_user_metrics(ranks[(m, "exact")]), per_user_metrics(ranks[(m, "int8")])
        row = {"method": m, "users": int(len(ranks[(m, "exact")])),
               "rank_changed_users": int((ranks[(m, "exact")] != ranks[(m, "int8")]).sum())}
        for metric in ("NDCG@10", "HR@10"):
            row[f"native {metric}"] = float(native[metric].mean())
            row[f"exact {metric}"] = float(ex[metric].mean())
            row[f"int8 {metric}"] = float(q8[metric].mean())
            row[f"d{metric}"] = paired_bootstrap(ex[metric], q8[metric], n_boot=n_boot, seed=seed)
        rows.append(row)
    return rows


def markdown(result) -> str:
    lines = ["# int8-query decode: accuracy of int4 / int2 caches served with exact vs int8-query scores", "",
             f"MovieLens-1M, {result['users']} test users (leave-one-out, request of the last "
             f"{result['request_size']} interactions over the cached history, max_len {result['max_len']}). "
             "Paired per user: the same caches served twice; d = int8 - exact, paired bootstrap 95% interval "
             f"({result['n_boot']} resamples). Models trained {result['train_cpu_min']} CPU-minutes each "
             "(one thread).", "",
             "| model | cache | native NDCG@10 | exact NDCG@10 | int8 NDCG@10 | dNDCG@10 [95% CI] | exact HR@10 | "
             "int8 HR@10 | dHR@10 [95% CI] | users whose rank changed |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for arch, rows in result["models"].items():
        for r in rows["rows"]:
            dn, dh = r["dNDCG@10"], r["dHR@10"]
            lines.append(
                f"| {arch} | {r['method']} | {r['native NDCG@10']:.4f} | {r['exact NDCG@10']:.4f} | "
                f"{r['int8 NDCG@10']:.4f} | {dn['delta']:+.5f} [{dn['lo']:+.5f}, {dn['hi']:+.5f}] | "
                f"{r['exact HR@10']:.4f} | {r['int8 HR@10']:.4f} | "
                f"{dh['delta']:+.5f} [{dh['lo']:+.5f}, {dh['hi']:+.5f}] | "
                f"{r['rank_changed_users']} / {r['users']} |")
    lines += ["", f"Produced by `benchmarks/int8_query_ndcg.py` ({result['machine']}, torch {result['torch']})."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--models", default="hstu", help="comma list of hstu,sasrec")
    p.add_argument("--train-cpu-min", type=float, default=6.0, help="training budget per model, CPU minutes")
    p.add_argument("--max-len", type=int, default=200)
    p.add_argument("--request-size", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", action="store_true", help="write benchmarks/results/int8_query_ndcg.{json,md}")
    args = p.parse_args(argv)
    ds = load_dataset(args.data)
    examples = ds.split().test
    result = {"dataset": repr(ds), "users": len(examples), "max_len": args.max_len,
              "request_size": args.request_size, "n_boot": args.n_boot, "train_cpu_min": args.train_cpu_min,
              "machine": f"{platform.machine()} {platform.processor()}", "torch": torch.__version__, "models": {}}
    for arch in args.models.split(","):
        model_cfg = ModelConfig(arch=arch, n_items=ds.n_items, d_model=64, n_layers=2, n_heads=2,
                                max_len=args.max_len)
        train_cfg = TrainConfig(epochs=200, batch_size=32, seed=args.seed, time_budget_min=args.train_cpu_min,
                                full_softmax=True, schedule="cosine-time", warmup_steps=100, windows="last",
                                budget_clock="cpu", eval_every=0)
        model, report = train(ds, model_cfg, train_cfg, progress=False, log=lambda m: None)
        t0 = time.perf_counter()
        ranks = serve_ranks(model, examples, METHODS, args.max_len, args.request_size, args.batch_size)
        rows = summarize(ranks, METHODS, args.n_boot, args.seed)
        result["models"][arch] = {"head_dim": model_cfg.head_dim, "train_seconds": report["train_seconds"],
                                  "checkpoint": Path(report["checkpoint"]).name, "test": report["test"],
                                  "serve_seconds": time.perf_counter() - t0, "rows": rows}
        print(json.dumps({arch: rows}, indent=1))
    md = markdown(result)
    print(md)
    if args.save:
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        OUT.with_suffix(".md").write_text(md)


if __name__ == "__main__":
    main()
