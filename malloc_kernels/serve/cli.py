"""``malloc-serve replay``: the serving replay from the command line (see ``serve/replay.py``)."""
from __future__ import annotations

import argparse
import sys

from .replay import ReplayConfig


def _csv(text, cast=str):
    return tuple(cast(x) for x in text.split(",") if x)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="malloc-serve", description="Online serving over a cache store.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("replay", help="replay a dataset's interactions in time order through a store")
    r.add_argument("--data", default="ml-latest-small", help="embedded name or a dataset path with timestamps")
    r.add_argument("--methods", default="none,int4,h2o+kivi4", help="comma-separated compression methods")
    r.add_argument("--budget", type=float, default=0.5, help="token ratio for token-level methods")
    r.add_argument("--stores", default="sqlite",
                   help="comma-separated: sqlite, redis, cluster (started locally on 127.0.0.1) or store URLs")
    r.add_argument("--workers", default="1,4", help="comma-separated worker counts")
    r.add_argument("--events", type=int, default=3000, help="most recent events replayed")
    r.add_argument("--batch", type=int, default=4, help="users per request")
    r.add_argument("--epochs", type=int, default=4, help="training epochs of the (small) model")
    r.add_argument("--d-model", type=int, default=32)
    r.add_argument("--layers", type=int, default=2)
    r.add_argument("--fault", action="store_true",
                   help="also run the fault replay: redis-server killed mid-replay and restarted, entries corrupted")
    r.add_argument("--fault-only", action="store_true", help="run only the fault replay (written to fault.md/json)")
    r.add_argument("--out", default="benchmarks/results/serve_replay")
    r.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = ReplayConfig(data=args.data, methods=_csv(args.methods), budget=args.budget,
                           stores=_csv(args.stores), workers=_csv(args.workers, int), events=args.events,
                           batch=args.batch, epochs=args.epochs, d_model=args.d_model, n_layers=args.layers,
                           progress=not args.no_progress)
        from .run import run, run_fault_only
        if args.fault_only:
            run_fault_only(cfg, args.out)
        else:
            run(cfg, args.out, fault={} if args.fault else None)
    except (ValueError, RuntimeError) as e:
        print(f"malloc-serve: error: {e}", file=sys.stderr)
        return 2
    return 0
