"""The serving-simulation benchmark (ARCHITECTURE.md, "Serving and evaluation"): MALLOC's accuracy and resource
tables on real data.

For every test user (leave-one-out), the history before the held-out target is truncated to the most recent
``max_len`` items and split into a cached prefix and a request of the last ``request_size`` interactions. The
prefix is encoded ONCE per batch (per-layer caches + the history's own attention statistics); every method then
compresses each layer's cache at its budget, the request is served over the compressed caches, and the last hidden
state ranks all items. The ``no-cache`` row recomputes history + request from scratch and must equal ``native``.

Resumable: every finished (model, method, budget) row is appended to ``<out>/rows.jsonl`` under a key of the
configuration; a rerun with the same configuration skips those rows. Trained models come from the checkpoint
cache of ``malloc_kernels.models.train`` (same config + data -> no retraining).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import load_dataset
from ..data.dataset import EvalExamples, eval_batches, split_request
from ..models.config import ModelConfig
from ..models.metrics import rank_metrics, target_ranks
from ..models.train import TrainConfig, train
from .methods import VARIANTS, MethodSpec, build_grid
from .report import write_outputs
from .stats import item_popularity, paired_bootstrap, per_user_metrics, popularity_scores


@dataclass
class EvalConfig:
    """One harness run. ``users``: evaluate a seeded sample of this many test users (None = all). ``batch_size``:
    users per serving batch; ``train_batch_size``: training windows per optimiser step.
    ``epochs``/``time_budget_min``/``full_softmax``/``schedule``/``warmup_steps``/``windows``: the training
    recipe of the base models (``models.train.TrainConfig``). ``uptrain_epochs``: > 0 warm-starts the head- and
    sequence-level variants from the trained base and fine-tunes them for this many epochs (``models.uptrain``,
    GQA-paper uptraining);
    0 trains them from scratch with the base recipe. The memory (MSN) variant always trains from scratch with the
    base recipe and time budget (``memory_epochs``: its own epoch count, so a cosine schedule ends within the same
    budget although its epochs are slower; None = ``epochs``), so its row compares the two at equal training
    budget. ``budget_clock``: what ``time_budget_min`` measures (``TrainConfig.budget_clock``: ``"wall"`` or
    ``"cpu"``); ``variant_budget_clock``: the same for the trained variants (None = ``budget_clock``)."""

    data: str = "ml-latest-small"
    models: Sequence[str] = ("hstu", "sasrec")
    methods: Optional[Sequence[str]] = None
    budgets: Sequence[float] = (0.5, 0.25, 0.125)
    bits: Sequence[int] = (8, 4, 2)
    variants: Sequence[str] = tuple(VARIANTS)
    max_len: int = 200
    request_size: int = 8
    users: Optional[int] = None
    batch_size: int = 128
    train_batch_size: int = 32
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    epochs: int = 20
    time_budget_min: float = 0.0
    full_softmax: bool = False
    schedule: str = "constant"
    warmup_steps: int = 0
    uptrain_epochs: int = 0
    memory_epochs: Optional[int] = None
    windows: str = "last"
    budget_clock: str = "wall"
    variant_budget_clock: Optional[str] = None
    n_boot: int = 1000
    seed: int = 0
    out: str = "results"
    cache: Optional[str] = None
    progress: bool = True

    def __post_init__(self):
        if self.request_size < 1:
            raise ValueError(f"request_size must be >= 1, got {self.request_size}")
        if self.max_len <= self.request_size:
            raise ValueError(f"max_len ({self.max_len}) must exceed request_size ({self.request_size})")
        if self.users is not None and self.users < 1:
            raise ValueError(f"users must be >= 1, got {self.users}")
        for m in self.models:
            if m not in ("hstu", "sasrec"):
                raise ValueError(f"models must be among ('hstu', 'sasrec'), got {m!r}")

    def run_key(self) -> str:
        d = dataclasses.asdict(self)
        for f in ("methods", "budgets", "bits", "variants", "out", "progress", "cache", "n_boot"):
            d.pop(f)
        if d["windows"] == "last":   # runs from before the option keep their key
            d.pop("windows")
        if d["train_batch_size"] == 32:   # likewise
            d.pop("train_batch_size")
        if d["budget_clock"] == "wall":   # likewise
            d.pop("budget_clock")
        if d["variant_budget_clock"] in (None, d.get("budget_clock", "wall")):
            d.pop("variant_budget_clock")
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


def dense_macs_per_token(model) -> int:
    """MACs of the per-token dense work of all layers (every 2-D weight of ``model.layers`` is used once a token),
    plus each MSN memory's sparse read: per head the sub-key scores (``2 * S * Dk/2``), the ``k x k`` candidate
    sums, and the weighted gather of ``k`` value rows (``k * Dv``); the value table itself is not a dense weight."""
    tables = {id(m.values) for m in model.memories()} if hasattr(model, "memories") else set()
    macs = sum(p.numel() for p in model.layers.parameters() if p.dim() == 2 and id(p) not in tables)
    for m in (model.memories() if hasattr(model, "memories") else ()):
        macs += m.heads * (m.num_subkeys * m.key_dim + m.k * m.k + m.k * m.value_dim)
    return int(macs)


def request_macs(model, entries_per_layer: float, request_size: float) -> float:
    """Analytic MACs to serve one request of ``request_size`` tokens over caches holding ``entries_per_layer`` stored
    entries (mean per kv head): dense projections/FFN, q.k and p.v over every visible entry (cache + causal request),
    and scoring every item with the last hidden state."""
    if hasattr(model, "request_macs"):   # a model without attention (RWKV) counts its own
        return model.request_macs(entries_per_layer, request_size)
    cfg = model.cfg
    width = cfg.latent_dim if cfg.heads == "mla" else cfg.head_dim
    visible = entries_per_layer + (request_size + 1) / 2.0
    attn = cfg.n_layers * request_size * cfg.n_heads * 2 * width * visible
    return dense_macs_per_token(model) * request_size + attn + cfg.d_model * cfg.n_items


class _Accumulator:
    def __init__(self):
        self.ranks, self.bytes, self.entries, self.seconds, self.users = [], [], [], 0.0, 0


def _compress_caches(model, native, stats, spec: MethodSpec, seed: int):
    return model.compress_caches(native, spec.method, budget=spec.budget, stats=stats, seed=seed,
                                 **dict(spec.params))


def _scored_by_last_query(spec: MethodSpec) -> bool:
    return spec.method.split("+")[0] == "tova"


def _stored_entries(caches) -> torch.Tensor:
    """Mean stored entries per (user, kv head), per layer, for the MACs model: [B]."""
    per_layer = []
    for c in caches:
        if not hasattr(c, "length"):   # a recurrent state (RWKV) stores no entries
            per_layer.append(torch.zeros(c.batch_size, dtype=torch.float64))
            continue
        n = c.length.double().mean(1)
        if c.residual is not None:
            n = n + c.residual.length.double().mean(1)
        per_layer.append(n)
    return torch.stack(per_layer).mean(0)


def _attended_entries(caches) -> torch.Tensor:
    """Mean entries per (user, kv head) a request query attends to, per layer, for the MACs model: [B]. The stored
    entries, except for a Reformer cache (its ``bucket`` ids): a query reads only the entries sharing one of its LSH
    buckets. With shared-QK the keys are the normalised queries, so the stored entries stand in for the queries:
    the count is the mean over stored entries i of |{j: i and j share a bucket in some round}| (one round:
    ``sum_b n_b^2 / n``)."""
    per_layer = []
    for c in caches:
        if not hasattr(c, "bucket"):
            per_layer.append(_stored_entries([c]))
            continue
        B, H = c.bucket.shape[:2]
        out = torch.zeros(B, H, dtype=torch.float64)
        for b in range(B):
            for h in range(H):
                n = int(c.length[b, h])
                if n == 0:
                    continue
                ids = c.bucket[b, h, :n].to(torch.int64)                       # [n, rounds]
                if ids.shape[1] == 1:
                    counts = torch.bincount(ids[:, 0], minlength=c.n_buckets).double()
                    out[b, h] = float((counts * counts).sum()) / n
                else:
                    share = (ids[:, None, :] == ids[None, :, :]).any(-1)      # [n, n]: union over rounds
                    out[b, h] = float(share.double().sum()) / n
        per_layer.append(out.mean(1))
    return torch.stack(per_layer).mean(0)


@torch.no_grad()
def evaluate_specs(model, examples: EvalExamples, specs: Sequence[MethodSpec], cfg: EvalConfig, desc: str):
    """Serve every test user under every spec; returns {spec.key: metrics/resources dict}."""
    model.eval()
    acc = {s.key: _Accumulator() for s in specs}
    attended = {s.key: [] for s in specs}
    n_batches = (len(examples) + cfg.batch_size - 1) // cfg.batch_size
    for batch in tqdm(eval_batches(examples, cfg.batch_size, cfg.max_len), total=n_batches, desc=desc,
                      disable=not cfg.progress, leave=False):
        hist, req = split_request(batch, cfg.request_size)
        native, stats = model.encode_history(hist, return_stats=True, stats_window=cfg.request_size)
        # TOVA scores by the LAST query alone, so it needs the history's statistics with a window of 1.
        last_query_stats = (model.encode_history(hist, return_stats=True, stats_window=1)[1]
                            if any(_scored_by_last_query(s) for s in specs) else None)
        for spec in specs:
            a = acc[spec.key]
            if spec.recompute:
                t0 = time.perf_counter()
                h = model.last_hidden(batch)
                a.seconds += time.perf_counter() - t0
                nbytes = torch.zeros(batch.batch_size, dtype=torch.float64)
                entries = torch.zeros(batch.batch_size, dtype=torch.float64)
            else:
                caches = _compress_caches(model, native, last_query_stats if _scored_by_last_query(spec) else stats,
                                          spec, cfg.seed)
                t0 = time.perf_counter()
                h = model.serve(req, caches=caches)
                a.seconds += time.perf_counter() - t0
                nbytes = sum(c.nbytes_per_user().double() for c in caches)
                entries = _stored_entries(caches)
                attended[spec.key].append(_attended_entries(caches))
            a.ranks.append(target_ranks(model.score_all_items(h), batch.targets))
            a.bytes.append(nbytes)
            a.entries.append(entries)
            a.users += batch.batch_size
    out = {}
    for spec in specs:
        a = acc[spec.key]
        ranks = torch.cat(a.ranks)
        row = rank_metrics(ranks, model.cfg.n_items)
        row["ranks"] = ranks.tolist()   # per user (in example order): the paired bootstrap intervals' input
        mean_entries = float(torch.cat(a.entries).mean())
        read = float(torch.cat(attended[spec.key]).mean()) if attended[spec.key] else mean_entries
        if spec.recompute:  # recompute attends over the whole truncated history again
            mean_entries = read = float(np.mean([min(len(h), cfg.max_len) for h in examples.histories]))
        row.update(bytes_per_user=float(torch.cat(a.bytes).mean()),
                   macs_per_request=request_macs(model, read, cfg.request_size),
                   latency_ms=1e3 * a.seconds / max(n_batches, 1),
                   requests_per_s=a.users / a.seconds if a.seconds > 0 else float("nan"),
                   mean_entries_per_head=mean_entries, attended_entries_per_head=read)
        out[spec.key] = row
    return out


def _sample(examples: EvalExamples, users: Optional[int], seed: int) -> EvalExamples:
    keep = [i for i, h in enumerate(examples.histories) if len(h) >= 1]
    if users is not None and users < len(keep):
        rng = np.random.default_rng(seed)
        keep = sorted(rng.choice(keep, size=users, replace=False).tolist())
    pick = lambda xs: None if xs is None else [xs[i] for i in keep]  # noqa: E731
    return EvalExamples(users=examples.users[keep], histories=pick(examples.histories),
                        history_timestamps=pick(examples.history_timestamps), targets=examples.targets[keep],
                        target_timestamps=None if examples.target_timestamps is None
                        else examples.target_timestamps[keep])


def _model_config(cfg: EvalConfig, arch: str, n_items: int, overrides: dict) -> ModelConfig:
    kw = dict(arch=arch, n_items=n_items, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
              max_len=cfg.max_len)
    return ModelConfig(**{**kw, **overrides})   # an architecture-level variant overrides arch itself


def _train_base(ds, cfg: EvalConfig, arch: str, train_cfg: TrainConfig, bases: dict):
    """``(model, report)`` of the base model of ``arch`` (trained once per run, or loaded from its checkpoint)."""
    if arch not in bases:
        bases[arch] = train(ds, _model_config(cfg, arch, ds.n_items, {}), train_cfg, cache=cfg.cache,
                            progress=cfg.progress, log=lambda m: None)
    return bases[arch]


def popularity_ranks(train_sequences, n_items: int, examples: EvalExamples) -> torch.Tensor:
    """Full-ranking 0-based ranks of the test targets under the popularity ranking (training counts)."""
    pop = item_popularity(train_sequences, n_items)
    return target_ranks(popularity_scores(pop, len(examples)), torch.as_tensor(examples.targets, dtype=torch.int64))


def add_intervals(rows: list, n_boot: int = 1000, seed: int = 0) -> list:
    """Give every row with per-user ``ranks`` the paired bootstrap 95% interval of its NDCG@10 / HR@10 change vs
    the native row of the same (dataset, model): ``dNDCG@10_lo/_hi``, ``dHR@10_lo/_hi`` and ``significant``
    (the NDCG@10 interval excludes 0); the ranks are then dropped from the row."""
    per_user = {id(r): per_user_metrics(r.pop("ranks")) for r in rows if r.get("ranks") is not None}
    native = {(r["dataset"], r["model"]): r for r in rows if r["method"] == "native"}
    for r in rows:
        base = native.get((r["dataset"], r["model"]))
        if base is None or id(r) not in per_user or id(base) not in per_user:
            continue
        b, o = per_user[id(base)], per_user[id(r)]
        if len(b["NDCG@10"]) != len(o["NDCG@10"]):
            continue
        for m in ("NDCG@10", "HR@10"):
            ci = paired_bootstrap(b[m], o[m], n_boot=n_boot, seed=seed)
            r[f"d{m}_lo"], r[f"d{m}_hi"] = ci["lo"], ci["hi"]
            if m == "NDCG@10":
                r["significant"] = ci["significant"]
    return rows


def _load_done(path: Path, run_key: str) -> dict:
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                if r.get("run_key") == run_key:
                    done[(r["model"], r["method"], r["budget"])] = r
    return done


def run(cfg: EvalConfig, log=print) -> dict:
    """Run the grid; write the four outputs into ``cfg.out``; return their paths and the rows."""
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ds = load_dataset(cfg.data)
    split = ds.split()
    examples = _sample(split.test, cfg.users, cfg.seed)
    grid = build_grid(cfg.methods, cfg.budgets, cfg.bits, cfg.variants)
    run_key = cfg.run_key()
    partial = out / "rows.jsonl"
    done = _load_done(partial, run_key)
    train_cfg = TrainConfig(epochs=cfg.epochs, batch_size=cfg.train_batch_size, seed=cfg.seed,
                            time_budget_min=cfg.time_budget_min,
                            full_softmax=cfg.full_softmax, schedule=cfg.schedule, warmup_steps=cfg.warmup_steps,
                            windows=cfg.windows, budget_clock=cfg.budget_clock)
    variant_cfg = dataclasses.replace(train_cfg, budget_clock=cfg.variant_budget_clock or cfg.budget_clock)
    trained, bases = {}, {}
    log(f"{ds!r}: {len(examples)} test users, {len(grid)} rows per model, results in {out}")

    groups = [(arch, None, [s for s in grid if s.variant is None]) for arch in cfg.models]
    groups += [(arch, s.variant, [s]) for arch in cfg.models for s in grid if s.variant is not None]
    for arch, variant, specs in groups:
        todo = [s for s in specs if (arch, s.label, s.budget_label) not in done]
        if not todo:
            continue
        overrides = {} if variant is None else VARIANTS[variant][1]
        model_cfg = _model_config(cfg, arch, ds.n_items, overrides)
        if variant is not None and cfg.uptrain_epochs and VARIANTS[variant][0] in ("head", "sequence"):
            base_model, base_report = _train_base(ds, cfg, arch, train_cfg, bases)
            up_cfg = dataclasses.replace(variant_cfg, epochs=cfg.uptrain_epochs,
                                         init_from=Path(base_report["checkpoint"]).stem)
            model, report = train(ds, model_cfg, up_cfg, cache=cfg.cache, progress=cfg.progress,
                                  log=lambda m: None, init_model=base_model)
        elif variant is None:
            model, report = _train_base(ds, cfg, arch, train_cfg, bases)
        else:
            own_cfg = variant_cfg
            if VARIANTS[variant][0] == "memory" and cfg.memory_epochs:
                own_cfg = dataclasses.replace(variant_cfg, epochs=cfg.memory_epochs)
            model, report = train(ds, model_cfg, own_cfg, cache=cfg.cache, progress=cfg.progress,
                                  log=lambda m: None)
        trained[(arch, variant)] = report
        if variant is not None:  # a trained variant is served over its own native cache
            todo = [dataclasses.replace(s, method="none") for s in todo]
        results = evaluate_specs(model, examples, todo, cfg, desc=f"{arch}{'/' + variant if variant else ''}")
        with open(partial, "a") as f:
            for s in todo:
                row = {"run_key": run_key, "dataset": ds.name, "model": arch, "level": s.level, "method": s.label,
                       "budget": s.budget_label, **results[s.key],
                       "params": sum(p.numel() for p in model.parameters()),
                       "memory_table_bytes": model.memory_table_bytes()}
                done[(arch, s.label, s.budget_label)] = row
                f.write(json.dumps(row) + "\n")
        log(f"{arch}{'/' + variant if variant else ''}: {len(todo)} rows done")

    order = {(s.label, s.budget_label): i for i, s in enumerate(grid)}
    order[("popularity", "-")] = 0.5   # right after native
    pop_ranks = popularity_ranks(split.train_sequences, ds.n_items, examples)
    for arch in cfg.models:
        row = rank_metrics(pop_ranks, ds.n_items)
        done[(arch, "popularity", "-")] = {
            "run_key": run_key, "dataset": ds.name, "model": arch, "level": "baseline", "method": "popularity",
            "budget": "-", **row, "ranks": pop_ranks.tolist(), "bytes_per_user": 0.0, "params": 0,
            "memory_table_bytes": 0}
    rows = sorted((r for (arch, m, b), r in done.items() if arch in cfg.models and (m, b) in order),
                  key=lambda r: (cfg.models.index(r["model"]), order[(r["method"], r["budget"])]))
    add_intervals(rows, n_boot=cfg.n_boot, seed=cfg.seed)
    meta = {"config": dataclasses.asdict(cfg), "run_key": run_key, "dataset": repr(ds),
            "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "processor": platform.processor(), "threads": torch.get_num_threads(),
            "training": {f"{a}/{v or 'base'}": {"test": r["test"], "train_seconds": r["train_seconds"],
                                                 "budget_clock": r["budget_clock"],
                                                 "init_from": r["train"].get("init_from", "")}
                         for (a, v), r in trained.items()}}
    paths = write_outputs(rows, out, meta)
    return {"paths": paths, "rows": rows}
