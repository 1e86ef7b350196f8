"""Long-history serving: does a compressed WHOLE history beat a truncated one at the same memory?

Per test user (leave-one-out target) the whole history before the target, up to ``max_len`` items (8,192 by
default), is split into a cached prefix and a request of the last ``request_size`` items; the prefix is encoded
once (per-layer native caches with ORIGINAL positions/timestamps), compressed by every method, and the request is
served over it (``models.recommender``: the models define positions beyond their training length by clamping).

For every compressed row the harness adds its equal-bytes baseline ``truncate``: per user, the most recent ``K``
entries of the history in native precision, ``K`` the largest count whose native cache (all layers, exact
``KVCache.nbytes_per_user``) fits in the bytes the method spent on that user (so it is at most one entry below).
Truncation means what a system that stores only recent items does: the last ``K`` items are encoded as the
history (positions 0..K-1, as in training), not evicted from the long cache (that is the ``recent`` method).
``truncate-200`` caches the last ``train_max_len - request_size`` items: the request + history window the models
were trained on. ``popularity`` ranks items by their training interaction counts.

Ranking protocol: ``"full"`` (every item; ``models.metrics``) or ``"sampled"`` (the target among ``negatives``
random items the user never interacted with, drawn once per user with the run's seed so every row ranks the same
candidates; the protocol of long-sequence papers on huge item spaces, e.g. Amazon). Every row reports the mean over
users overall and per history-length bucket, with the change vs the native cache (full history, uncompressed) and,
for a compressed row, vs its equal-bytes truncate, each with a paired bootstrap 95% interval (``stats``).

Trained variants (``variants``: keys of ``methods.VARIANTS``, e.g. RWKV or Reformer) join each base model's table:
the variant model serves the same whole histories over its own serving state (RWKV: the recurrent state, constant
in the history length; Reformer: every entry + its LSH bucket ids), next to the base model's truncate at the
variant's bytes. A variant overriding ``arch`` (RWKV) is one model whose row appears in every base model's table.
"""
from __future__ import annotations

import dataclasses
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import load_dataset
from ..data.dataset import EvalExamples, make_jagged, split_request
from ..models.config import ModelConfig
from ..models.metrics import target_ranks
from ..models.recommender import SequentialRecommender
from ..models.factory import build_model
from ..models.train import TrainConfig, checkpoint_path, load_checkpoint, train
from .methods import VARIANTS, MethodSpec, build_grid
from .runner import _compress_caches, _stored_entries
from . import stats as S

# The long tables' default grid: one precision method per bit width family, the main pruning / merging / hybrid
# methods at a quarter of the history; each gets its equal-bytes truncate baseline.
LONG_METHODS = ("int8", "kivi4", "kivi2", "recent", "streaming", "snapkv", "h2o", "tome", "h2o+kivi4")
PROTOCOLS = ("full", "sampled")
METRIC = "NDCG@10"


@dataclass
class LongConfig:
    """One long-history run. ``min_history``: evaluate the test users with at least this many interactions
    (history + target); ``users``: then a seeded sample of that many (None = all). ``train_max_len``: the models'
    training window (their ``ModelConfig.max_len``); ``max_len``: the longest history served. ``buckets``: edges
    of the history-length buckets. ``train``: the base models' recipe. ``max_tokens``: history tokens encoded per
    serving batch (users are batched by length). ``resources``: history lengths N at which to also measure bytes
    and request latency of every method with the trained models' layers (``long_resources``; () = skip)."""

    data: str
    models: Sequence[str] = ("hstu", "sasrec")
    methods: Sequence[str] = LONG_METHODS
    budgets: Sequence[float] = (0.25,)
    bits: Sequence[int] = (8, 4, 2)
    max_len: int = 8192
    train_max_len: int = 200
    request_size: int = 8
    min_history: int = 0
    users: Optional[int] = None
    protocol: str = "full"
    negatives: int = 100
    buckets: Sequence[int] = S.DEFAULT_BUCKETS
    n_boot: int = 1000
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    train: TrainConfig = field(default_factory=TrainConfig)
    variants: Sequence[str] = ()
    variant_train: Optional[TrainConfig] = None
    max_tokens: int = 16384
    resources: Sequence[int] = ()
    seed: int = 0
    out: str = "results_long"
    cache: Optional[str] = None
    progress: bool = True

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.request_size < 1:
            raise ValueError(f"request_size must be >= 1, got {self.request_size}")
        if self.train_max_len <= self.request_size:
            raise ValueError(f"train_max_len ({self.train_max_len}) must exceed request_size ({self.request_size})")
        if self.max_len < self.train_max_len:
            raise ValueError(f"max_len ({self.max_len}) must be >= the training length train_max_len "
                             f"({self.train_max_len})")
        if self.max_len > SequentialRecommender.MAX_SERVE_LEN:
            raise ValueError(f"max_len {self.max_len} exceeds the longest history the models serve "
                             f"({SequentialRecommender.MAX_SERVE_LEN})")
        if self.users is not None and self.users < 1:
            raise ValueError(f"users must be >= 1, got {self.users}")
        if self.min_history < 0 or self.negatives < 1 or self.n_boot < 1 or self.max_tokens < 1:
            raise ValueError("min_history must be >= 0 and negatives, n_boot, max_tokens >= 1")
        S.bucket_labels(self.buckets)   # validates the edges
        for m in self.models:
            if m not in ("hstu", "sasrec"):
                raise ValueError(f"models must be among ('hstu', 'sasrec'), got {m!r}")
        for v in self.variants:
            if v not in VARIANTS:
                raise ValueError(f"variants must be among {sorted(VARIANTS)}, got {v!r}")


def select_users(test: EvalExamples, cfg: LongConfig) -> EvalExamples:
    """The test users with ``>= min_history`` interactions (then a seeded sample of ``users``). A selection that
    leaves no user, or no user whose history is longer than the training window, is a ``ValueError``: the long
    tables would compare nothing."""
    n_inter = np.array([len(h) + 1 for h in test.histories], dtype=np.int64)
    keep = np.nonzero((n_inter >= max(cfg.min_history, 1)) & (n_inter - 1 > cfg.request_size))[0]
    if keep.size == 0:
        longest = int(n_inter.max()) if n_inter.size else 0
        raise ValueError(f"no test user has >= {max(cfg.min_history, cfg.request_size + 2)} interactions "
                         f"(the longest has {longest})")
    if int(n_inter[keep].max()) - 1 <= cfg.train_max_len:
        raise ValueError(f"every selected user's history is <= the training window {cfg.train_max_len} "
                         f"(longest {int(n_inter[keep].max()) - 1}): nothing longer than truncate-"
                         f"{cfg.train_max_len} to serve")
    if cfg.users is not None and cfg.users < keep.size:
        keep = np.sort(np.random.default_rng(cfg.seed).choice(keep, size=cfg.users, replace=False))
    pick = lambda xs: None if xs is None else [xs[i] for i in keep]  # noqa: E731
    return EvalExamples(users=test.users[keep], histories=pick(test.histories),
                        history_timestamps=pick(test.history_timestamps), targets=test.targets[keep],
                        target_timestamps=None if test.target_timestamps is None else test.target_timestamps[keep])


def native_entry_bytes(caches) -> tuple:
    """(fixed, per_entry) bytes of one user's native caches over all layers: ``nbytes = fixed + n * per_entry``
    for a history of ``n`` entries (per-head lengths + original length; k/v rows, position, timestamp)."""
    fixed = per = 0
    for c in caches:
        one = c.replace(length=torch.ones_like(c.length[:1]), original_length=c.original_length[:1],
                        k=c.k[:1, :, :1], v=c.v[:1, :, :1], position=c.position[:1, :, :1],
                        timestamp=None if c.timestamp is None else c.timestamp[:1, :, :1])
        zero = one.replace(length=torch.zeros_like(one.length))
        f = int(zero.nbytes_per_user()[0])
        fixed += f
        per += int(one.nbytes_per_user()[0]) - f
    return fixed, per


def truncate_counts(budget_bytes: torch.Tensor, prefix_lengths: torch.Tensor, fixed: int, per_entry: int):
    """Entries ``K`` per user of the equal-bytes truncate: the most whose native bytes ``fixed + K * per_entry``
    fit in ``budget_bytes`` (at most the user's history length)."""
    k = torch.div(budget_bytes.to(torch.int64) - fixed, per_entry, rounding_mode="floor").clamp(min=0)
    return torch.minimum(k, prefix_lengths.to(torch.int64))


def _tail(batch, keep: torch.Tensor):
    """The last ``keep[b]`` items (and timestamps) of each user of a jagged batch."""
    items, offs = batch.items.numpy(), batch.offsets.numpy()
    ts = None if batch.timestamps is None else batch.timestamps.numpy()
    seqs, tss = [], []
    for b in range(batch.batch_size):
        lo, hi = int(offs[b]), int(offs[b + 1])
        lo = max(lo, hi - int(keep[b]))
        seqs.append(items[lo:hi])
        if ts is not None:
            tss.append(ts[lo:hi])
    return make_jagged(seqs, tss if ts is not None else None)


class _Rows:
    """Per-user results of every row, in the order of the selected users."""

    def __init__(self, n: int):
        self.n = n
        self.ranks: Dict[str, np.ndarray] = {}
        self.bytes: Dict[str, np.ndarray] = {}
        self.entries: Dict[str, np.ndarray] = {}
        self.seconds: Dict[str, float] = {}
        self.info: Dict[str, dict] = {}

    def put(self, key, idx, ranks, nbytes, entries, seconds, **info):
        if key not in self.ranks:
            self.ranks[key] = np.full(self.n, -1, dtype=np.int64)
            self.bytes[key] = np.zeros(self.n, dtype=np.float64)
            self.entries[key] = np.zeros(self.n, dtype=np.float64)
            self.seconds[key] = 0.0
            self.info[key] = info
        self.ranks[key][idx] = ranks
        self.bytes[key][idx] = nbytes
        self.entries[key][idx] = entries
        self.seconds[key] += seconds


def _batches(lengths: np.ndarray, max_tokens: int):
    """User index batches in order of history length, each at most ``max_tokens`` history tokens (>= 1 user)."""
    order = np.argsort(lengths, kind="stable")
    cur, tokens = [], 0
    for i in order:
        n = int(lengths[i])
        if cur and (tokens + n > max_tokens):
            yield np.array(cur)
            cur, tokens = [], 0
        cur.append(i)
        tokens += n
    if cur:
        yield np.array(cur)


class _Ranker:
    """Ranks of the targets from last hidden states, with the item table normalised ONCE per run (not per row):
    ``"full"`` ranks among every item exactly as ``score_all_items`` + ``target_ranks``; ``"sampled"`` scores only
    each user's target and negatives (``S.sampled_ranks``' rule: ties count against the target), which on a
    166k-item catalogue is what keeps a row's scoring cheaper than its serving."""

    def __init__(self, model):
        self.model = model
        self.table = model._normed(model.item_emb.weight)   # [n_items + 1, d]

    def __call__(self, h: torch.Tensor, targets: torch.Tensor, negs: Optional[torch.Tensor]) -> torch.Tensor:
        hn, temp = self.model._normed(h), self.model.cfg.temperature
        if negs is None:
            scores = hn @ self.table.t() / temp
            scores[:, 0] = float("-inf")
            return target_ranks(scores, targets)
        cand = torch.cat([targets[:, None], negs.to(torch.int64)], 1)      # the target and its negatives, one op
        s = torch.einsum("bd,bnd->bn", hn, self.table[cand]) / temp
        return (s[:, 1:] >= s[:, :1]).sum(1)


@torch.no_grad()
def serve_long(model, examples: EvalExamples, specs: Sequence[MethodSpec], cfg: LongConfig,
               negatives: Optional[torch.Tensor] = None, desc: str = "long",
               variants: Optional[Dict[str, SequentialRecommender]] = None) -> _Rows:
    """Serve every user's whole history (up to ``cfg.max_len``) natively, compressed by every spec and truncated
    at each spec's bytes; per-user ranks, bytes and entries of every row (module docstring).

    Work shared between rows is done once per batch of users: the whole history is encoded once (caches + the
    attention statistics the scored policies need), every method compresses that one native cache, and a truncate
    whose per-user entry counts equal an earlier row's (e.g. every 25% token-budget method spends the same bytes)
    reuses that row's serving instead of encoding the same tails again. ``variants``: {variant key: trained variant
    model}, each served over its own state of the same histories (row ``<key>``, level from ``VARIANTS``) and
    followed by ``model``'s truncate at its bytes."""
    model.eval()
    variants = dict(variants or {})
    for vm in variants.values():
        vm.eval()
    rows = _Rows(len(examples))
    rank = _Ranker(model)
    vrank = {v: _Ranker(vm) for v, vm in variants.items()}
    lengths = np.array([min(len(h), cfg.max_len) for h in examples.histories], dtype=np.int64)
    short = cfg.train_max_len - cfg.request_size
    batches = list(_batches(lengths, cfg.max_tokens))
    for idx in tqdm(batches, desc=desc, disable=not cfg.progress, leave=False):
        hist = [examples.histories[i][-cfg.max_len:] for i in idx]
        ts = None if examples.history_timestamps is None else \
            [examples.history_timestamps[i][-cfg.max_len:] for i in idx]
        targets = torch.as_tensor(examples.targets[idx], dtype=torch.int64)
        prefix, req = split_request(make_jagged(hist, ts), cfg.request_size)
        negs = None if negatives is None else negatives[torch.as_tensor(idx)]

        def serve(caches, server=model, ranker=rank):
            t0 = time.perf_counter()
            h = server.serve(req, caches=caches)
            dt = time.perf_counter() - t0
            nbytes = sum(c.nbytes_per_user().double() for c in caches)
            return ranker(h, targets, negs).numpy(), nbytes.numpy(), _stored_entries(caches).numpy(), dt

        served_tails = {}

        def truncated(keep):
            key = keep.to(torch.int64).numpy().tobytes()
            if key not in served_tails:
                served_tails[key] = serve(model.encode_history(_tail(prefix, keep)))
            return served_tails[key]

        native, hstats = model.encode_history(prefix, return_stats=True, stats_window=cfg.request_size)
        last_q = None
        fixed, per_entry = native_entry_bytes(native)
        plen = prefix.lengths
        rows.put("native", idx, *serve(native), method="native", level="baseline", budget="100%")
        rows.put(f"truncate-{cfg.train_max_len}", idx, *truncated(plen.clamp(max=short)),
                 method=f"truncate-{cfg.train_max_len}", level="truncate", budget=f"{short} entries")
        for spec in specs:
            st = hstats
            if spec.method.split("+")[0] == "tova":
                if last_q is None:
                    last_q = model.encode_history(prefix, return_stats=True, stats_window=1)[1]
                st = last_q
            caches = _compress_caches(model, native, st, spec, cfg.seed)
            r, nb, ent, dt = serve(caches)
            rows.put(spec.key, idx, r, nb, ent, dt, method=spec.label, level=spec.level, budget=spec.budget_label)
            keep = truncate_counts(torch.as_tensor(nb), plen, fixed, per_entry)
            rows.put(f"truncate@{spec.key}", idx, *truncated(keep), method="truncate", level="truncate",
                     budget=f"= {spec.label} {spec.budget_label}", truncate_of=spec.key)
        for v, vm in variants.items():
            r, nb, ent, dt = serve(vm.encode_history(prefix), vm, vrank[v])
            rows.put(v, idx, r, nb, ent, dt, method=v, level=VARIANTS[v][0], budget="trained")
            keep = truncate_counts(torch.as_tensor(nb), plen, fixed, per_entry)
            rows.put(f"truncate@{v}", idx, *truncated(keep), method="truncate", level="truncate",
                     budget=f"= {v} trained", truncate_of=v)
    return rows


def popularity_ranks(examples: EvalExamples, popularity: torch.Tensor,
                     negatives: Optional[torch.Tensor]) -> np.ndarray:
    scores = S.popularity_scores(popularity, len(examples))
    targets = torch.as_tensor(examples.targets, dtype=torch.int64)
    r = target_ranks(scores, targets) if negatives is None else S.sampled_ranks(scores, targets, negatives)
    return r.numpy()


def table_rows(dataset: str, model: str, rows: _Rows, lengths: np.ndarray, pop_ranks: np.ndarray,
               cfg: LongConfig) -> list:
    """One dict per (row, bucket): means over the bucket's users, changes vs native / vs the equal-bytes truncate
    with bootstrap intervals. An empty bucket gives rows with ``users = 0`` and NaN metrics."""
    labels = S.bucket_labels(cfg.buckets)
    which = S.assign_buckets(lengths, cfg.buckets)
    groups = [("all", np.arange(len(lengths)))] + [(lab, np.nonzero(which == i)[0]) for i, lab in enumerate(labels)]
    metrics = {k: S.per_user_metrics(v) for k, v in rows.ranks.items()}
    metrics["popularity"] = S.per_user_metrics(pop_ranks)
    info = dict(rows.info, popularity=dict(method="popularity", level="baseline", budget="-"))
    order = ["native", "popularity"] + [k for k in rows.ranks if k != "native"]
    native_bytes = rows.bytes["native"]
    out = []
    for bucket, idx in groups:
        nb = float(native_bytes[idx].mean()) if idx.size else float("nan")
        for key in order:
            m, inf = metrics[key], info[key]
            r = dict(dataset=dataset, model=model, protocol=cfg.protocol,
                     negatives=cfg.negatives if cfg.protocol == "sampled" else None, bucket=bucket, users=int(idx.size),
                     method=inf["method"], level=inf["level"], budget=inf["budget"],
                     truncate_of=inf.get("truncate_of", ""), **S.summarize(m, idx))
            if key in rows.bytes:
                b = float(rows.bytes[key][idx].mean()) if idx.size else float("nan")
                r.update(bytes_per_user=b, ratio=b / nb if idx.size and nb else float("nan"),
                         entries_per_head=float(rows.entries[key][idx].mean()) if idx.size else float("nan"),
                         ms_per_user=1e3 * rows.seconds[key] / max(rows.n, 1))
            else:
                r.update(bytes_per_user=0.0, ratio=0.0, entries_per_head=0.0, ms_per_user=float("nan"))
            d, lo, hi, sig = S.compare(metrics["native"], m, idx, METRIC, cfg.n_boot, cfg.seed)
            r.update(d_native=d, d_native_lo=lo, d_native_hi=hi, d_native_sig=sig)
            partner = f"truncate@{key}"
            if partner in metrics:
                d, lo, hi, sig = S.compare(metrics[partner], m, idx, METRIC, cfg.n_boot, cfg.seed)
                r.update(d_truncate=d, d_truncate_lo=lo, d_truncate_hi=hi, d_truncate_sig=sig)
            out.append(r)
    return out


def run_long(cfg: LongConfig, log=print) -> dict:
    """Train (or load) the models, serve the long histories, write the tables into ``cfg.out``."""
    from .long_report import write_long_outputs
    torch.manual_seed(cfg.seed)
    ds = load_dataset(cfg.data)
    split = ds.split()
    examples = select_users(split.test, cfg)
    grid = [s for s in build_grid(cfg.methods, cfg.budgets, cfg.bits, ()) if s.method != "none"]
    negatives = None
    if cfg.protocol == "sampled":
        negatives = S.sample_negatives(ds.n_items, examples.targets, examples.histories, cfg.negatives, cfg.seed)
    popularity = S.item_popularity(split.train_sequences, ds.n_items)
    lengths = np.array([len(h) for h in examples.histories], dtype=np.int64)
    log(f"{ds!r}: {len(examples)} test users (history {int(lengths.min())}-{int(lengths.max())}, median "
        f"{int(np.median(lengths))}), {len(grid)} compressed rows + truncates per model, protocol {cfg.protocol}")
    pop = popularity_ranks(examples, popularity, negatives)
    out_rows, training, models, trained_variants, variant_models = [], {}, {}, {}, {}
    vtrain = cfg.variant_train or cfg.train
    for arch in cfg.models:
        mcfg = _model_config(cfg, arch, ds.n_items)
        t0 = time.perf_counter()
        model, report = train(ds, mcfg, cfg.train, cache=cfg.cache, progress=cfg.progress, log=lambda m: None)
        training[arch] = {"test_full_ranking_truncated": report["test"], "train_seconds": report["train_seconds"],
                          "checkpoint": Path(report["checkpoint"]).name}
        log(f"{arch}: trained/loaded in {time.perf_counter() - t0:.0f} s")
        models[arch] = model
        variants = {}
        for v in cfg.variants:
            vcfg = _variant_config(mcfg, v)
            vkey = vcfg.to_json()
            if vkey not in trained_variants:   # an arch-overriding variant (RWKV) is one model for every base
                tv = time.perf_counter()
                trained_variants[vkey] = train(ds, vcfg, vtrain, cache=cfg.cache, progress=cfg.progress,
                                               log=lambda m: None)
                rep = trained_variants[vkey][1]
                training[f"{vcfg.arch}/{v}" if vcfg.arch != v else v] = {
                    "test_full_ranking_truncated": rep["test"], "train_seconds": rep["train_seconds"],
                    "budget_clock": rep["budget_clock"], "epochs": rep["curve"][-1]["epoch"] if rep["curve"] else 0,
                    "steps": rep["curve"][-1].get("steps") if rep["curve"] else 0,
                    "cpu_seconds": rep["curve"][-1].get("cpu_seconds") if rep["curve"] else 0,
                    "wall_seconds": rep["curve"][-1].get("wall_seconds") if rep["curve"] else 0,
                    "checkpoint": Path(rep["checkpoint"]).name, "train": rep["train"]}
                log(f"{arch}/{v}: trained/loaded in {time.perf_counter() - tv:.0f} s")
            variants[v] = trained_variants[vkey][0]
        variant_models[arch] = variants
        t0 = time.perf_counter()
        rows = serve_long(model, examples, grid, cfg, negatives, desc=arch, variants=variants)
        training[arch]["serve_seconds"] = time.perf_counter() - t0
        out_rows += table_rows(ds.name, arch, rows, lengths, pop, cfg)
        log(f"{arch}: served in {training[arch]['serve_seconds']:.0f} s")
    cfg_d = dataclasses.asdict(cfg)
    meta = {"config": cfg_d, "dataset": repr(ds), "users": len(examples),
            "history_lengths": {"min": int(lengths.min()), "median": int(np.median(lengths)),
                                "max": int(lengths.max())},
            "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "threads": torch.get_num_threads(), "models": training}
    paths = write_long_outputs(out_rows, Path(cfg.out), meta)
    if cfg.resources:
        sources = {k: f"trained for this run or loaded from its cached checkpoint {v['checkpoint']}"
                   for k, v in training.items()}
        paths.update(write_resources(models, Path(cfg.out), cfg, log, timestamps=ds.has_timestamps,
                                     variants=variant_models, sources=sources))
    return {"paths": paths, "rows": out_rows}


def _model_config(cfg: LongConfig, arch: str, n_items: int) -> ModelConfig:
    return ModelConfig(arch=arch, n_items=n_items, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                       max_len=cfg.train_max_len)


def _variant_config(mcfg: ModelConfig, variant: str) -> ModelConfig:
    return dataclasses.replace(mcfg, **VARIANTS[variant][1])


def _cached_or_fresh(ds, mcfg: ModelConfig, tcfg: TrainConfig, cache: Optional[str], seed: int):
    """``(model, source)``: the checkpoint ``train`` would reuse for this config (its weights as trained), else a
    freshly initialised model (``torch.manual_seed(seed)``) -- nothing is trained."""
    path = checkpoint_path(mcfg, tcfg, ds.fingerprint(), cache)
    if path.is_file():
        return load_checkpoint(path), f"checkpoint {path.name}"
    torch.manual_seed(seed)
    return build_model(mcfg).eval(), "freshly initialised (no cached checkpoint)"


def run_long_resources(cfg: LongConfig, log=print) -> dict:
    """Only the resource table (``write_resources``) of ``cfg``: the base models and trained variants loaded from
    the checkpoints a full ``run_long`` of the same config caches (same keys), a freshly initialised model of the
    same configuration where none is cached (bytes and latency do not depend on the weights; the table's note says
    which model is which). Nothing is trained or served for accuracy: the timing part of the long harness alone."""
    if not cfg.resources:
        raise ValueError("resources: no history lengths to measure (LongConfig.resources is empty)")
    ds = load_dataset(cfg.data)
    vtrain = cfg.variant_train or cfg.train
    models, variant_models, sources, loaded = {}, {}, {}, {}
    for arch in cfg.models:
        mcfg = _model_config(cfg, arch, ds.n_items)
        models[arch], sources[arch] = _cached_or_fresh(ds, mcfg, cfg.train, cfg.cache, cfg.seed)
        variant_models[arch] = {}
        for v in cfg.variants:
            vcfg = _variant_config(mcfg, v)
            vkey = vcfg.to_json()
            if vkey not in loaded:       # an arch-overriding variant (RWKV) is one model for every base
                loaded[vkey] = _cached_or_fresh(ds, vcfg, vtrain, cfg.cache, cfg.seed)
                sources[f"{vcfg.arch}/{v}" if vcfg.arch != v else v] = loaded[vkey][1]
            variant_models[arch][v] = loaded[vkey][0]
    for name, src in sources.items():
        log(f"{name}: {src}")
    paths = write_resources(models, Path(cfg.out), cfg, log, timestamps=ds.has_timestamps, variants=variant_models,
                            sources=sources)
    return {"paths": paths}


def write_resources(models: dict, out: Path, cfg: LongConfig, log=print, timestamps: bool = True,
                    variants: Optional[Dict[str, dict]] = None, sources: Optional[Dict[str, str]] = None) -> dict:
    """``resources.md/.json`` and ``resources.png``: bytes and latency vs N of every base model's methods and of the
    trained ``variants`` ({base arch: {variant key: model}}), all timed interleaved per N (``long_resources``).
    ``sources``: {model name: where its weights come from}, written into the table's note and meta."""
    from . import long_resources as R
    t0 = time.perf_counter()
    model_rows = R.models_resources(models, variants, list(cfg.resources), request_size=cfg.request_size,
                                    truncate_window=cfg.train_max_len, seed=cfg.seed, timestamps=timestamps)
    log(f"{', '.join(models)} + variants {list(cfg.variants)}: resources at N={list(cfg.resources)} in "
        f"{time.perf_counter() - t0:.0f} s")
    some = next(iter(models.values()))
    attn_rows = R.attention_resources(some.cfg.n_heads, some.cfg.head_dim, cfg.resources,
                                      request_size=cfg.request_size, seed=cfg.seed)
    src = "; ".join(f"{k}: {v}" for k, v in (sources or {}).items())
    meta = R.resource_meta(f"Models ({Path(cfg.data).name}): {src or ', '.join(models)}. One synthetic user per "
                           f"N; bytes and latency do not depend on the trained weights.")
    meta["sources"] = dict(sources or {})
    paths = {"resources_md": out / "resources.md", "resources_png": out / "resources.png",
             "resources_json": out / "resources.json"}
    out.mkdir(parents=True, exist_ok=True)
    paths["resources_md"].write_text(R.resources_markdown(model_rows, attn_rows, meta))
    R.plot_resources(model_rows, attn_rows, paths["resources_png"])
    paths["resources_json"].write_text(json.dumps({"meta": meta, "model_rows": model_rows,
                                                   "variant_rows": R.variant_comparison(model_rows),
                                                   "attention_rows": attn_rows}, indent=1))
    return paths
