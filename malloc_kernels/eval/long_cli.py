"""``malloc-eval --long``: the long-history preset (``long.py``) on the MovieLens-1M long slice and amazon-1000.

Preset (sized for <= 60 minutes on 2 idle cores: 2 x 14 + 2 x 4 training minutes, the rest serving and the
resource table): per dataset HSTU and SASRec (2 layers, d 64) trained on ALL users with the 200-item window the
short tables use (every window of long users, ``windows="all"``: the evaluated long users are a small share of the
users but most of the windows), the learning rate decaying to 0 with the clock (``cosine-time``), validation only
once at the end (``eval_every=0``: a validation pass over 6,040 users would take a fifth of every epoch's time);
then the whole histories (up to ``--max-len``, 8,192) of the evaluated users are served over every method's cache
and over their equal-bytes truncates.

* ``long_ml1m``: MovieLens-1M, users with >= 500 interactions (399, up to 2,314), full ranking over 3,706 items;
  full-softmax training, 14 minutes per model; resources at N = 1k/4k/16k with these models' layers; history
  buckets < 750 / 750-1k / >= 1k (257 / 99 / 40 users).
* ``long_amazon1000``: amazon-1000 (236 users, 1,004-8,514 interactions, 166k items), the sampled protocol of its
  source paper (target vs 100 random unseen items); sampled-softmax training (a full softmax over 166k items does
  not fit the budget), 4 minutes per model (~1,900 windows: tens of epochs); buckets < 1,500 / 1,500-3k / >= 3k.

``--variants rwkv,reformer`` adds trained variants' rows to every table (``long.LongConfig.variants``), trained with
the preset's recipe; ``--variant-budget-clock cpu`` measures their budget in CPU time (``TrainConfig.budget_clock``)
while the bases keep theirs (and their checkpoints' keys). With resources on, the variants' rows join the resource
table, timed interleaved with the base models' (``long_resources.models_resources``).

``--resources-only`` measures only the resource table (``long.run_long_resources``): the base models and variants
are loaded from the checkpoints a full run caches under the same keys (a freshly initialised model where none is
cached, named in the table's note); nothing is trained or served for accuracy, so it is a ~2-minute timing run.

``--data PATH`` runs one dataset with the given ``--min-history`` / ``--protocol`` instead of the preset pair.
Flags override the preset: ``--time-budget-min`` (per model), ``--users``, ``--epochs``, ``--max-len``, ...
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ..models.train import TrainConfig
from .long import LONG_METHODS, LongConfig
from .long_resources import RESOURCE_NS
from . import stats as S

SHARED = Path("..") / "shared" / "data"
LONG_PRESETS = {
    "long_ml1m": dict(data=str(SHARED / "ml-1m"), min_history=500, protocol="full", resources=RESOURCE_NS,
                      buckets=(750, 1000),
                      train=dict(full_softmax=True, windows="all", schedule="cosine-time", warmup_steps=100,
                                 epochs=100, time_budget_min=14.0, eval_every=0)),
    "long_amazon1000": dict(data=str(SHARED / "amazon-1000"), min_history=0, protocol="sampled", resources=(),
                            buckets=(1500, 3000),
                            train=dict(full_softmax=False, windows="all", schedule="cosine-time", warmup_steps=50,
                                       epochs=100, time_budget_min=4.0, eval_every=0)),
}
DEFAULT_LONG_MAX_LEN = 8192


def long_configs(args) -> list:
    """``[(name, LongConfig)]`` of a ``--long`` invocation (``cli.build_parser``'s namespace)."""
    if args.data:
        name = "long_" + Path(args.data).name.replace("-", "")
        presets = {name: dict(data=args.data, min_history=0, protocol="full", resources=(),
                              train=dict(LONG_PRESETS["long_ml1m"]["train"]))}
    else:
        presets = LONG_PRESETS
    out = []
    for name, p in presets.items():
        train = dict(p["train"])
        if args.epochs is not None:
            train["epochs"] = args.epochs
        if args.time_budget_min is not None:
            train["time_budget_min"] = args.time_budget_min
            if not args.time_budget_min > 0:
                train["schedule"] = "cosine"
        if args.loss is not None:
            train["full_softmax"] = args.loss == "full"
        if args.warmup_steps is not None:
            train["warmup_steps"] = args.warmup_steps
        train["budget_clock"] = args.budget_clock
        base = TrainConfig(seed=args.seed, **train)
        variants = () if args.variants is None or "none" in args.variants else tuple(args.variants)
        cfg = LongConfig(data=p["data"], models=args.model,
                         methods=args.methods if args.methods else LONG_METHODS,
                         budgets=args.budgets if args.budgets is not None else (0.25,), bits=args.bits,
                         max_len=args.max_len if args.max_len is not None else DEFAULT_LONG_MAX_LEN,
                         request_size=args.request_size,
                         min_history=args.min_history if args.min_history is not None else p["min_history"],
                         users=args.users, protocol=args.protocol or p["protocol"], negatives=args.negatives,
                         n_boot=args.boot, train=base, variants=variants,
                         variant_train=dataclasses.replace(base, budget_clock=args.variant_budget_clock or
                                                           args.budget_clock),
                         buckets=p.get("buckets", S.DEFAULT_BUCKETS),
                         resources=p["resources"] if args.resources is None else
                         (RESOURCE_NS if args.resources else ()),
                         seed=args.seed, out=str(Path(args.out) / name), cache=args.cache,
                         progress=not args.no_progress)
        out.append((name, cfg))
    return out


def describe(cfg: LongConfig) -> str:
    d = dataclasses.asdict(cfg)
    return ", ".join(f"{k}={d[k]}" for k in ("data", "min_history", "users", "protocol", "max_len"))
