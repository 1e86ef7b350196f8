"""``malloc-eval``: MALLOC's accuracy/resource tables for HSTU and SASRec over every compression method.

With no arguments: a quick run on the embedded MovieLens latest-small (minutes on 2 cores). ``--full``: the whole
grid on MovieLens-1M from ``../shared/data/ml-1m`` (or ``--data PATH``), sized to finish in about an hour.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .methods import VARIANTS
from .runner import EvalConfig, run

FULL_DATA = Path("..") / "shared" / "data" / "ml-1m"
# The no-argument run trains 2 base models + these variants per architecture: one head-level and one
# sequence-level row keep every MALLOC level in the quick tables while staying within minutes on 2 cores.
QUICK_VARIANTS = ("mqa", "linformer")


def _floats(s):
    return tuple(float(x) for x in s.split(",") if x)


def _ints(s):
    return tuple(int(x) for x in s.split(",") if x)


def _names(s):
    return tuple(x.strip() for x in s.split(",") if x.strip())


def build_parser():
    p = argparse.ArgumentParser(prog="malloc-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="dataset name or path (ratings.dat/.csv, sequences, aligned "
                   "item/time files; default: embedded ml-latest-small, or ml-1m with --full)")
    p.add_argument("--model", type=_names, default=("hstu", "sasrec"), help="comma list of hstu,sasrec")
    p.add_argument("--methods", type=_names, default=None, help="comma list of method labels (default: all)")
    p.add_argument("--budgets", type=_floats, default=(0.5, 0.25, 0.125), help="token ratios, e.g. 0.5,0.25")
    p.add_argument("--bits", type=_ints, default=(8, 4, 2), help="precision bit widths, e.g. 8,4,2")
    p.add_argument("--variants", type=_names, default=None,
                   help=f"trained head/sequence variants (comma list of {','.join(VARIANTS)}; '' for none; "
                        f"default: {','.join(QUICK_VARIANTS)}, all with --full)")
    p.add_argument("--max-len", type=int, default=200)
    p.add_argument("--request-size", type=int, default=8)
    p.add_argument("--users", type=int, default=None,
                   help="evaluate a seeded sample of N test users (default: all; 1000 with --full)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--time-budget-min", type=float, default=0.0, help="training time cap per model (minutes)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results")
    p.add_argument("--cache", default=None, help="checkpoint cache dir (default $MALLOC_CACHE or ~/.cache)")
    p.add_argument("--full", action="store_true", help="the whole grid on MovieLens-1M")
    p.add_argument("--no-progress", action="store_true")
    return p


def config_from_args(args) -> EvalConfig:
    data = args.data or (str(FULL_DATA) if args.full else "ml-latest-small")
    epochs = args.epochs if args.epochs is not None else (30 if args.full else 15)
    variants = args.variants if args.variants is not None else (tuple(VARIANTS) if args.full else QUICK_VARIANTS)
    return EvalConfig(data=data, models=args.model, methods=args.methods, budgets=args.budgets, bits=args.bits,
                      variants=variants, max_len=args.max_len, request_size=args.request_size,
                      users=args.users if args.users is not None else (1000 if args.full else None),
                      batch_size=args.batch_size, epochs=epochs,
                      time_budget_min=args.time_budget_min, seed=args.seed, out=args.out, cache=args.cache,
                      progress=not args.no_progress)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        print(f"malloc-eval: {e}", file=sys.stderr)
        return 2
    result = run(cfg)
    for name, path in result["paths"].items():
        print(f"{name}: {path}")
    print((Path(cfg.out) / "accuracy.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
