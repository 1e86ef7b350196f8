"""``malloc-eval``: MALLOC's accuracy/resource tables for HSTU and SASRec over every compression method.

With no arguments: a quick run on the embedded MovieLens latest-small (minutes on 2 cores). ``--full``: the whole
grid on MovieLens-1M from ``../shared/data/ml-1m`` (or ``--data PATH``), sized to finish in about an hour.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..cli_args import Parser, comma_list, float_at_least, int_at_least, one_of, ratio, run_main
from .methods import BITS, VARIANTS, build_grid
from .runner import EvalConfig, run

FULL_DATA = Path("..") / "shared" / "data" / "ml-1m"
# The no-argument run trains 2 base models + these variants per architecture: one head-level and one
# sequence-level row keep every MALLOC level in the quick tables while staying within minutes on 2 cores.
QUICK_VARIANTS = ("mqa", "linformer")
# Training recipes (flags override each field). The ML-1M recipe is the one of the models' acceptance runs
# (benchmarks/results/{hstu,sasrec}_ml1m.json), so --full reuses their checkpoints; its variants are uptrained from
# the base (GQA-paper style) because training each from scratch would take ~40 min apiece on 2 cores.
QUICK_RECIPE = dict(epochs=15, time_budget_min=0.0, loss="sampled", schedule="constant", warmup_steps=0,
                    uptrain_epochs=0, memory_epochs=None)
FULL_RECIPE = dict(epochs=24, time_budget_min=45.0, loss="full", schedule="cosine", warmup_steps=100,
                   uptrain_epochs=3, memory_epochs=None)


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
    p.add_argument("--budgets", type=comma_list(ratio, "token ratios in (0, 1]"), default=(0.5, 0.25, 0.125),
                   help="token ratios, e.g. 0.5,0.25")
    p.add_argument("--bits", type=comma_list(one_of(BITS, int), f"bit widths ({sorted(BITS)})"),
                   default=(8, 4, 2), help="precision bit widths, e.g. 8,4,2")
    p.add_argument("--variants", type=comma_list(one_of(tuple(VARIANTS) + ("none",)), "variant names"),
                   default=None,
                   help=f"trained head/sequence variants (comma list of {','.join(VARIANTS)}; 'none' for none; "
                        f"default: {','.join(QUICK_VARIANTS)}, all with --full)")
    p.add_argument("--max-len", type=int_at_least(2), default=200)
    p.add_argument("--request-size", type=int_at_least(1), default=8)
    p.add_argument("--users", type=int_at_least(1), default=None,
                   help="evaluate a seeded sample of N test users (default: all; 1000 with --full)")
    p.add_argument("--epochs", type=int_at_least(0), default=None, help="base-model epochs (15; 24 with --full)")
    p.add_argument("--time-budget-min", type=float_at_least(0.0), default=None,
                   help="training time cap per model in minutes (none; 45 with --full)")
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
    p.add_argument("--batch-size", type=int_at_least(1), default=128)
    p.add_argument("--seed", type=int_at_least(0), default=0)
    p.add_argument("--out", default="results")
    p.add_argument("--cache", default=None, help="checkpoint cache dir (default $MALLOC_CACHE or ~/.cache)")
    p.add_argument("--full", action="store_true", help="the whole grid on MovieLens-1M")
    p.add_argument("--no-progress", action="store_true")
    return p


def config_from_args(args) -> EvalConfig:
    data = args.data or (str(FULL_DATA) if args.full else "ml-latest-small")
    recipe = dict(FULL_RECIPE if args.full else QUICK_RECIPE)
    for name in recipe:
        if getattr(args, name) is not None:
            recipe[name] = getattr(args, name)
    variants = args.variants if args.variants is not None else (tuple(VARIANTS) if args.full else QUICK_VARIANTS)
    if "none" in variants:
        if len(variants) > 1:
            raise ValueError("--variants: 'none' cannot be combined with variant names")
        variants = ()
    if args.methods is not None:
        build_grid(args.methods, args.budgets, args.bits, variants)   # a label outside this grid: ValueError now
    return EvalConfig(data=data, models=args.model, methods=args.methods, budgets=args.budgets, bits=args.bits,
                      variants=variants, max_len=args.max_len, request_size=args.request_size,
                      users=args.users if args.users is not None else (1000 if args.full else None),
                      batch_size=args.batch_size, epochs=recipe["epochs"],
                      time_budget_min=recipe["time_budget_min"], full_softmax=recipe["loss"] == "full",
                      schedule=recipe["schedule"], warmup_steps=recipe["warmup_steps"],
                      uptrain_epochs=recipe["uptrain_epochs"], memory_epochs=recipe["memory_epochs"],
                      seed=args.seed, out=args.out, cache=args.cache,
                      progress=not args.no_progress)


def _main(args) -> int:
    cfg = config_from_args(args)
    result = run(cfg)
    for name, path in result["paths"].items():
        print(f"{name}: {path}")
    print((Path(cfg.out) / "accuracy.md").read_text())
    return 0


def main(argv=None):
    """Entry point: bad input -> one line ``malloc-eval: error: ...`` and exit code 2 (``--debug``: traceback)."""
    return run_main(build_parser(), _main, argv)


if __name__ == "__main__":
    sys.exit(main())
