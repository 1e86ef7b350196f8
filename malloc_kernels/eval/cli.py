"""``malloc-eval``: MALLOC's accuracy/resource tables for HSTU and SASRec over every compression method.

With no arguments: a quick run on the embedded MovieLens latest-small (minutes on 2 cores). ``--full``: the whole
grid on MovieLens-1M from ``../shared/data/ml-1m`` (or ``--data PATH``), sized to finish in about an hour.
``--long``: whole long histories served compressed vs truncated at equal bytes, on the MovieLens-1M long slice and
amazon-1000 (``long_cli.py``), about an hour.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..cli_args import Parser, comma_list, float_at_least, int_at_least, one_of, ratio, run_main
from .methods import BITS, VARIANTS, build_grid
from .runner import EvalConfig, run

FULL_DATA = Path("..") / "shared" / "data" / "ml-1m"
# The no-argument run trains 2 base models + these variants per architecture: one head-level, one sequence-level
# and the architecture-level (RWKV, trained once for both tables) row keep every MALLOC level in the quick tables
# while staying within minutes on 2 cores.
QUICK_VARIANTS = ("mqa", "linformer", "rwkv")
# Training recipes (flags override each field). The ML-1M recipe is the one of the models' acceptance runs
# (benchmarks/results/{hstu,sasrec}_ml1m.json), so --full reuses their checkpoints; its variants are uptrained from
# the base (GQA-paper style) because training each from scratch would take ~40 min apiece on 2 cores.
# The quick recipe is the ML-1M one scaled down (full softmax over all items, every training window of long users,
# warm-up + cosine decay to 0, variants uptrained from the base): with the former sampled softmax, last windows,
# constant lr and 15 epochs (~300 optimiser steps on 610 users) SASRec stayed below the popularity ranking.
# 16 windows per step: the full-softmax cost is per token, so halving the batch doubles the optimiser steps of an
# epoch at about the same time per epoch; at 32, SASRec's ~400 steps left it near the popularity ranking.
QUICK_TRAIN_BATCH = 16
QUICK_RECIPE = dict(epochs=15, time_budget_min=0.0, loss="full", schedule="cosine", warmup_steps=50,
                    uptrain_epochs=2, memory_epochs=None, windows="all", train_batch_size=QUICK_TRAIN_BATCH)
FULL_RECIPE = dict(epochs=24, time_budget_min=45.0, loss="full", schedule="cosine", warmup_steps=100,
                   uptrain_epochs=3, memory_epochs=None, windows="last", train_batch_size=32)


def _method_labels():
    """Every row label ``--methods`` may name (the full grid's)."""
    return sorted({s.label for s in build_grid(None, (0.5,), BITS, tuple(VARIANTS))})


def _method_label(s):
    return one_of(_method_labels())(s)


def build_parser():
    p = Parser(prog="malloc-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="dataset name or path (ratings.dat/.csv, sequences, aligned "
                   "item/time files; default: embedded ml-latest-small, or ml-1m with --full)")
    p.add_argument("--model", type=comma_list(one_of(("hstu", "sasrec")), "models (hstu, sasrec)"),
                   default=("hstu", "sasrec"), help="comma list of hstu,sasrec")
    p.add_argument("--methods", type=comma_list(_method_label, "method labels"), default=None,
                   help="comma list of method labels (default: all)")
    p.add_argument("--budgets", type=comma_list(ratio, "token ratios in (0, 1]"), default=None,
                   help="token ratios, e.g. 0.5,0.25 (default 0.5,0.25,0.125; 0.25 with --long)")
    p.add_argument("--bits", type=comma_list(one_of(BITS, int), f"bit widths ({sorted(BITS)})"),
                   default=(8, 4, 2), help="precision bit widths, e.g. 8,4,2")
    p.add_argument("--variants", type=comma_list(one_of(tuple(VARIANTS) + ("none",)), "variant names"),
                   default=None,
                   help=f"trained head/sequence variants (comma list of {','.join(VARIANTS)}; 'none' for none; "
                        f"default: {','.join(QUICK_VARIANTS)}, all with --full)")
    p.add_argument("--max-len", type=int_at_least(2), default=None,
                   help="training window (default 200); with --long the longest history served (default 8192)")
    p.add_argument("--request-size", type=int_at_least(1), default=8)
    p.add_argument("--users", type=int_at_least(1), default=None,
                   help="evaluate a seeded sample of N test users (default: all; 1000 with --full)")
    p.add_argument("--epochs", type=int_at_least(0), default=None, help="base-model epochs (15; 24 with --full)")
    p.add_argument("--time-budget-min", type=float_at_least(0.0), default=None,
                   help="training time cap per model in minutes (none; 45 with --full)")
    p.add_argument("--budget-clock", choices=("wall", "cpu"), default="wall",
                   help="what --time-budget-min measures: wall time or this process's CPU time (cpu: runs sharing "
                        "a machine each get the same compute; joins the checkpoint keys)")
    p.add_argument("--variant-budget-clock", choices=("wall", "cpu"), default=None,
                   help="--budget-clock of the trained variants only (default: --budget-clock); e.g. cpu to add "
                        "variants next to wall-clock bases whose checkpoints exist")
    p.add_argument("--loss", choices=("sampled", "full"), default=None,
                   help="sampled softmax (128 negatives) or full softmax (default: sampled; full with --full)")
    p.add_argument("--schedule", choices=("constant", "cosine"), default=None,
                   help="learning-rate schedule (constant; cosine with --full)")
    p.add_argument("--warmup-steps", type=int_at_least(0), default=None)
    p.add_argument("--memory-epochs", type=int_at_least(0), default=None,
                   help="epochs of the MSN memory variant (default: --epochs)")
    p.add_argument("--uptrain-epochs", type=int_at_least(0), default=None,
                   help="warm-start head/sequence variants from the base and fine-tune this many epochs "
                        "(0 = train from scratch; default 0, 3 with --full)")
    p.add_argument("--batch-size", type=int_at_least(1), default=128, help="users per serving batch")
    p.add_argument("--train-batch-size", type=int_at_least(1), default=None,
                   help=f"training windows per optimiser step ({QUICK_TRAIN_BATCH}; 32 with --full)")
    p.add_argument("--seed", type=int_at_least(0), default=0)
    p.add_argument("--out", default="results")
    p.add_argument("--cache", default=None, help="checkpoint cache dir (default $MALLOC_CACHE or ~/.cache)")
    p.add_argument("--full", action="store_true", help="the whole grid on MovieLens-1M")
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("long histories (--long)")
    g.add_argument("--long", action="store_true",
                   help="the long-history tables: ML-1M users with >= 500 interactions + amazon-1000 (or --data)")
    g.add_argument("--min-history", type=int_at_least(0), default=None,
                   help="evaluate users with at least this many interactions (preset: 500 on ML-1M)")
    g.add_argument("--protocol", choices=("full", "sampled"), default=None,
                   help="full ranking or the target among --negatives random unseen items (preset: sampled on "
                        "amazon-1000)")
    g.add_argument("--negatives", type=int_at_least(1), default=100)
    g.add_argument("--boot", type=int_at_least(1), default=1000, help="bootstrap resamples of the 95%% intervals")
    g.add_argument("--resources", action=argparse.BooleanOptionalAction, default=None,
                   help="also measure bytes/latency at N = 1k, 4k, 16k (preset: on for ML-1M)")
    g.add_argument("--resources-only", action="store_true",
                   help="only the resource table (resources.md/.json/.png) of the datasets that measure resources: "
                        "models and --variants from the checkpoints a full run caches (freshly initialised where "
                        "none is cached; the table says which), no training, no accuracy serving")
    return p


def _check_long_args(args) -> None:
    """One-line errors for values the long run cannot serve (before anything is trained)."""
    from ..models.recommender import SequentialRecommender
    limit = SequentialRecommender.MAX_SERVE_LEN
    if args.max_len is not None and args.max_len > limit:
        raise ValueError(f"--max-len {args.max_len} exceeds the longest history the models serve ({limit}; "
                         f"positions beyond training are clamped)")
    if args.max_len is not None and args.max_len < 2:
        raise ValueError(f"--max-len must be >= 2, got {args.max_len}")
    if args.resources_only and not args.long:
        raise ValueError("--resources-only needs --long (it measures the long harness's resource table)")
    for name in ("min_history", "negatives", "boot"):
        v = getattr(args, name)
        if v is not None and v < (0 if name == "min_history" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be >= {0 if name == 'min_history' else 1}, got {v}")


def config_from_args(args) -> EvalConfig:
    data = args.data or (str(FULL_DATA) if args.full else "ml-latest-small")
    budgets = args.budgets if args.budgets is not None else (0.5, 0.25, 0.125)
    max_len = args.max_len if args.max_len is not None else 200
    recipe = dict(FULL_RECIPE if args.full else QUICK_RECIPE)
    for name in recipe:
        if getattr(args, name, None) is not None:
            recipe[name] = getattr(args, name)
    variants = args.variants if args.variants is not None else (tuple(VARIANTS) if args.full else QUICK_VARIANTS)
    if "none" in variants:
        if len(variants) > 1:
            raise ValueError("--variants: 'none' cannot be combined with variant names")
        variants = ()
    if args.methods is not None:
        build_grid(args.methods, budgets, args.bits, variants)   # a label outside this grid: ValueError now
    return EvalConfig(data=data, models=args.model, methods=args.methods, budgets=budgets, bits=args.bits,
                      variants=variants, max_len=max_len, request_size=args.request_size,
                      users=args.users if args.users is not None else (1000 if args.full else None),
                      batch_size=args.batch_size, train_batch_size=recipe["train_batch_size"],
                      epochs=recipe["epochs"],
                      time_budget_min=recipe["time_budget_min"], full_softmax=recipe["loss"] == "full",
                      schedule=recipe["schedule"], warmup_steps=recipe["warmup_steps"],
                      uptrain_epochs=recipe["uptrain_epochs"], memory_epochs=recipe["memory_epochs"],
                      windows=recipe["windows"], budget_clock=args.budget_clock,
                      variant_budget_clock=args.variant_budget_clock or args.budget_clock,
                      seed=args.seed, out=args.out, cache=args.cache,
                      progress=not args.no_progress)


def _main(args) -> int:
    _check_long_args(args)
    if args.long:
        return _main_long(args)
    cfg = config_from_args(args)
    result = run(cfg)
    for name, path in result["paths"].items():
        print(f"{name}: {path}")
    print((Path(cfg.out) / "accuracy.md").read_text())
    return 0


def main(argv=None):
    """Entry point: bad input -> one line ``malloc-eval: error: ...`` and exit code 2 (``--debug``: traceback)."""
    return run_main(build_parser(), _main, argv)


def _main_long(args) -> int:
    from .long import run_long, run_long_resources
    from .long_cli import long_configs
    configs = long_configs(args)
    if args.resources_only:
        if args.resources is False:
            raise ValueError("--resources-only cannot be combined with --no-resources")
        configs = [(name, cfg) for name, cfg in configs if cfg.resources]
        if not configs:
            raise ValueError("--resources-only: no selected dataset measures resources (add --resources)")
    for name, cfg in configs:
        result = run_long_resources(cfg) if args.resources_only else run_long(cfg)
        for key, path in result["paths"].items():
            print(f"{name} {key}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
