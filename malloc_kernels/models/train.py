"""CPU training of HSTU / SASRec (and their variants) with full-ranking leave-one-out evaluation.

Usage (the ML-1M acceptance run; MovieLens-1M is read from its folder, never copied)::

    python -m malloc_kernels.models.train --data ../shared/data/ml-1m --model hstu --max-len 200 --layers 4 \
        --full-softmax --windows all --schedule cosine-time --warmup-steps 100 --epochs 100 --time-budget-min 45 \
        --eval-every 4 --threads 2 --out benchmarks/results/hstu_ml1m.json

(``cosine-time`` ends the cosine decay when the 45 minutes run out, however fast the machine is; ``--epochs`` only
bounds it; ``--windows all`` trains on every item of the users longer than ``max_len``, not only their last
``max_len + 1``; see ``benchmarks/results/training_ml1m.md``). The full-softmax loss runs through
``malloc_kernels.loss``'s chunked fused linear cross-entropy, the attention forward and backward through the C++
training kernels (``malloc_kernels.ops.train_attention``).

Defaults train on the embedded MovieLens latest-small. Training is seeded (shuffling and negatives of epoch ``e``
use ``seed + e``), uses AdamW and a tqdm progress bar, and checkpoints after every epoch under
``$MALLOC_CACHE`` (default ``~/.cache/malloc_kernels``)``/checkpoints/<arch>-<key>.pt`` where ``key`` hashes the
model config, the training config and the dataset's fingerprint: rerunning the same command resumes from (or
reuses) the checkpoint; ``--retrain`` ignores it. Batches group users of similar length (``bucket``). A time
budget stops training mid-epoch; the checkpoint then records the completed epochs and the weights after the last step.

Metrics: see ``metrics.py`` (full ranking over all items, only padding excluded).

MSN memory (``--msn``, ``ModelConfig.msn``; MSN, arXiv 2602.07526): the memories' value tables get sparse COO
gradients (only the rows read in the step) and are optimised by ``torch.optim.SparseAdam`` (lazy Adam: moments of
untouched rows are not decayed, as for sparse embeddings); every other parameter by AdamW (``make_optimizer``).
Gradient clipping includes the sparse gradients' values. Each epoch's curve point records the memories' slot usage
over that epoch's training steps (``slot_usage``: fraction of slots hit, KL to uniform). The ML-1M comparison at
equal training budget is the acceptance command above run twice, with and without ``--msn`` (same
``--time-budget-min``): ``tools/msn_compare.py`` runs both and tabulates them.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from ..data import SequenceDataset, load_dataset, training_batches, training_windows
from ..data.dataset import WINDOW_MODES
from .config import ModelConfig
from .metrics import evaluate
from .factory import build_model
from .recommender import SequentialRecommender
from .uptrain import warm_start
from ..cli_args import Parser, guard

SCHEDULES = ("constant", "cosine", "cosine-time")
# what ``time_budget_min`` measures: "wall" the elapsed time, "cpu" this process's CPU time (all its threads), so
# runs sharing a machine each get the same compute and contention only stretches their wall time
BUDGET_CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


@dataclass
class TrainConfig:
    """Optimisation settings. ``request_len``: for seq_compress models the longest served suffix trained against
    the compressed history (each batch draws r uniformly in [1, request_len]); 0 = the model's
    ``train_request_len``. ``bucket``: length-bucketing window in batches (0 = plain shuffle).
    ``time_budget_min``: stop after this many minutes (0 = no limit). ``schedule``: ``"constant"`` learning rate,
    or ``"cosine"``: linear warm-up over ``warmup_steps`` then cosine decay to 0 at the end of epoch ``epochs`` (the
    epoch count then shapes the weights, so it joins the checkpoint key), or ``"cosine-time"``: the same decay driven
    by whichever is further along, the steps or the wall clock against ``time_budget_min``, so the decay ends inside
    the budget however fast the machine runs (the budget then joins the key; the weights depend on the machine's
    speed). ``eval_every``: validate every this many epochs (0 = only after the last). ``init_from``: name of the
    base checkpoint a variant is warm-started from (``uptrain.warm_start``; "" = from scratch); part of the
    checkpoint key.
    ``windows``: which items of long sequences are trained on (``data.training_windows``): ``"last"`` the most
    recent ``max_len + 1`` per user, ``"all"`` every item, in windows of ``max_len + 1``.
    ``budget_clock``: what ``time_budget_min`` and the ``cosine-time`` decay measure (``BUDGET_CLOCKS``): ``"wall"``
    elapsed time, or ``"cpu"`` this process's CPU seconds (on 1 thread: compute independent of contention); a CPU
    budget joins the checkpoint key (a run never resumes a wall-budgeted checkpoint as if its seconds were CPU's)."""

    epochs: int = 20
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.0
    num_negatives: int = 128
    full_softmax: bool = False
    seed: int = 0
    eval_every: int = 1
    eval_batch_size: int = 256
    time_budget_min: float = 0.0
    request_len: int = 0
    bucket: int = 8
    grad_clip: float = 1.0
    schedule: str = "constant"
    warmup_steps: int = 0
    init_from: str = ""
    windows: str = "last"
    budget_clock: str = "wall"

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.schedule == "cosine-time" and not self.time_budget_min > 0:
            raise ValueError(f"schedule 'cosine-time' needs time_budget_min > 0, got {self.time_budget_min}")
        for name in ("epochs", "batch_size", "num_negatives", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for name in ("weight_decay", "eval_every", "time_budget_min", "request_len", "bucket", "grad_clip",
                     "warmup_steps"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.windows not in WINDOW_MODES:
            raise ValueError(f"windows must be one of {WINDOW_MODES}, got {self.windows!r}")
        if self.budget_clock not in BUDGET_CLOCKS:
            raise ValueError(f"budget_clock must be one of {tuple(BUDGET_CLOCKS)}, got {self.budget_clock!r}")

    def key_fields(self) -> dict:
        """Fields that change the trained weights (what the checkpoint key hashes)."""
        d = dataclasses.asdict(self)
        for f in ("eval_every", "eval_batch_size") + (() if self.schedule == "cosine-time" else ("time_budget_min",)):
            d.pop(f)
        if self.schedule == "constant":  # keeps pre-schedule checkpoint keys; epochs only bound a constant run
            for f in ("epochs", "schedule", "warmup_steps"):
                d.pop(f)
        if not self.init_from:
            d.pop("init_from")
        if self.windows == "last":  # the original recipe keeps its checkpoint keys
            d.pop("windows")
        if self.budget_clock == "wall":  # likewise
            d.pop("budget_clock")
        return d

    def lr_at(self, step: int, total_steps: int, elapsed_seconds: float = 0.0) -> float:
        """Learning rate of optimiser step ``step`` (0-based) of ``total_steps``, ``elapsed_seconds`` into training."""
        if self.schedule == "constant":
            return self.lr
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        frac = (step - self.warmup_steps) / max(total_steps - self.warmup_steps, 1)
        if self.schedule == "cosine-time":
            frac = max(frac, elapsed_seconds / (60 * self.time_budget_min))
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * min(frac, 1.0)))


class _Optimizers:
    """AdamW over the dense parameters + SparseAdam over the sparse-gradient ones, driven as one optimiser."""

    def __init__(self, dense, sparse):
        self.dense, self.sparse = dense, sparse
        self.param_groups = dense.param_groups + sparse.param_groups

    def zero_grad(self, set_to_none: bool = True):
        self.dense.zero_grad(set_to_none=set_to_none)
        self.sparse.zero_grad(set_to_none=set_to_none)

    def step(self):
        self.dense.step()
        self.sparse.step()

    def state_dict(self) -> dict:
        return {"dense": self.dense.state_dict(), "sparse": self.sparse.state_dict()}

    def load_state_dict(self, state: dict):
        self.dense.load_state_dict(state["dense"])
        self.sparse.load_state_dict(state["sparse"])


def make_optimizer(model: SequentialRecommender, train_cfg: "TrainConfig"):
    """AdamW over all parameters; with sparse-gradient MSN value tables, SparseAdam over those and AdamW over the
    rest (AdamW rejects sparse gradients; weight decay does not apply to the value tables)."""
    sparse = [p for m in model.memories() for p in m.sparse_parameters()]
    if not sparse:
        return torch.optim.AdamW(model.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    ids = {id(p) for p in sparse}
    dense = [p for p in model.parameters() if id(p) not in ids]
    return _Optimizers(torch.optim.AdamW(dense, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay),
                       torch.optim.SparseAdam(sparse, lr=train_cfg.lr))


def clip_grad_norm(parameters, max_norm: float) -> float:
    """``torch.nn.utils.clip_grad_norm_`` that also accepts sparse COO gradients: the global L2 norm counts each
    sparse gradient's (coalesced) values; every gradient is scaled by ``min(1, max_norm / (norm + 1e-6))``."""
    parameters = list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    if not any(g.is_sparse for g in grads):  # dense only: exactly torch's clipping
        return float(torch.nn.utils.clip_grad_norm_(parameters, max_norm))
    sq = torch.zeros((), dtype=torch.float64)
    for g in grads:
        vals = g.coalesce().values() if g.is_sparse else g
        sq += vals.detach().double().pow(2).sum()
    norm = float(sq.sqrt())
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return norm


def cache_dir(path: Optional[str] = None) -> Path:
    """``path``, else ``$MALLOC_CACHE``, else ``~/.cache/malloc_kernels``."""
    return Path(path or os.environ.get("MALLOC_CACHE") or Path.home() / ".cache" / "malloc_kernels").expanduser()


def checkpoint_key(model_cfg: ModelConfig, train_cfg: TrainConfig, data_fingerprint: str) -> str:
    blob = json.dumps({"model": model_cfg.to_dict(), "train": train_cfg.key_fields(), "data": data_fingerprint},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def checkpoint_path(model_cfg: ModelConfig, train_cfg: TrainConfig, data_fingerprint: str,
                    cache: Optional[str] = None) -> Path:
    """Where ``train`` keeps (and reuses) the checkpoint of this model, recipe and data."""
    return cache_dir(cache) / "checkpoints" / \
        f"{model_cfg.arch}-{checkpoint_key(model_cfg, train_cfg, data_fingerprint)}.pt"


def train(dataset: SequenceDataset, model_cfg: ModelConfig, train_cfg: TrainConfig = TrainConfig(), *,
          cache: Optional[str] = None, use_cache: bool = True, progress: bool = True,
          log: Callable[[str], None] = print, init_model: Optional[SequentialRecommender] = None):
    """Train (or resume / reuse a cached checkpoint) and evaluate. Returns ``(model, report)``; ``report`` holds
    the config, the per-epoch curve (train loss, validation metrics, elapsed seconds) and the final test metrics.
    ``init_model``: a trained base model to warm-start from (``uptrain.warm_start``); then ``train_cfg.init_from``
    must name it (e.g. its checkpoint file name), which keys the variant's checkpoint."""
    if (init_model is None) != (not train_cfg.init_from):
        raise ValueError("init_model and train_cfg.init_from must be given together")
    if model_cfg.n_items != dataset.n_items:
        model_cfg = dataclasses.replace(model_cfg, n_items=dataset.n_items)
    split = dataset.split()
    ckpt_path = checkpoint_path(model_cfg, train_cfg, dataset.fingerprint(), cache)
    torch.manual_seed(train_cfg.seed)
    model = build_model(model_cfg)
    if init_model is not None:
        fresh = warm_start(model, init_model)
        log(f"warm start from {train_cfg.init_from}; fresh parameters: {', '.join(fresh) or 'none'}")
    opt = make_optimizer(model, train_cfg)
    curve, start_epoch, elapsed0 = [], 0, 0.0
    if use_cache and ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        curve, start_epoch, elapsed0 = state["curve"], state["epochs_done"], state["train_seconds"]
        log(f"resumed {ckpt_path} after {start_epoch} epochs ({elapsed0 / 60:.1f} min of training)")
    req_max = train_cfg.request_len or model_cfg.train_request_len
    clock = BUDGET_CLOCKS[train_cfg.budget_clock]
    t0, wall0, cpu0 = clock(), time.perf_counter(), time.process_time()
    wall_done = curve[-1].get("wall_seconds", 0.0) if curve else 0.0
    cpu_done = curve[-1].get("cpu_seconds", 0.0) if curve else 0.0
    steps = curve[-1].get("steps", 0) if curve else 0   # optimiser steps taken (all epochs)
    stopped = False
    n_train = len(training_windows(split.train_sequences, model_cfg.max_len, train_cfg.windows))
    n_batches = math.ceil(n_train / train_cfg.batch_size)
    total_steps = n_batches * train_cfg.epochs
    if train_cfg.time_budget_min and elapsed0 >= 60 * train_cfg.time_budget_min:
        start_epoch = train_cfg.epochs  # a checkpoint that used up the budget is reused as it is
    for epoch in range(start_epoch, train_cfg.epochs):
        model.train()
        model.memory_usage(reset=True)  # slot usage is reported per epoch of training steps
        gen = torch.Generator().manual_seed(train_cfg.seed * 1_000_003 + epoch)
        total, count = 0.0, 0
        bar = tqdm(training_batches(split.train_sequences, split.train_timestamps, train_cfg.batch_size,
                                    model_cfg.max_len, shuffle=True, seed=train_cfg.seed * 1_000_003 + epoch,
                                    bucket=train_cfg.bucket, windows=train_cfg.windows),
                   total=n_batches, desc=f"epoch {epoch + 1}/{train_cfg.epochs}", disable=not progress,
                   leave=False)
        for step_in_epoch, batch in enumerate(bar):
            for group in opt.param_groups:
                group["lr"] = train_cfg.lr_at(epoch * n_batches + step_in_epoch, total_steps,
                                              elapsed0 + clock() - t0)
            r = None
            if model_cfg.seq_compress is not None:
                r = int(torch.randint(1, req_max + 1, (1,), generator=gen))
            hidden = model(batch, request_len=r)
            loss = model.loss(hidden, batch.targets, num_negatives=train_cfg.num_negatives,
                              full_softmax=train_cfg.full_softmax, generator=gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if train_cfg.grad_clip:
                clip_grad_norm(list(model.parameters()), train_cfg.grad_clip)
            opt.step()
            steps += 1
            total += float(loss.detach()) * batch.batch_size
            count += batch.batch_size
            bar.set_postfix(loss=f"{total / max(count, 1):.4f}")
            if train_cfg.time_budget_min and elapsed0 + clock() - t0 > 60 * train_cfg.time_budget_min:
                stopped = True
                break
        point = {"epoch": epoch + 1 if not stopped else epoch + count / max(n_train, 1),
                 "train_loss": total / max(count, 1), "train_seconds": elapsed0 + clock() - t0,
                 "steps": steps,
                 "wall_seconds": wall_done + time.perf_counter() - wall0,
                 "cpu_seconds": cpu_done + time.process_time() - cpu0}
        if model.memories():
            point["slot_usage"] = model.memory_usage()
        scheduled = train_cfg.eval_every and (epoch + 1) % train_cfg.eval_every == 0
        if scheduled or stopped or epoch + 1 == train_cfg.epochs:
            point["valid"] = evaluate(model, split.valid, batch_size=train_cfg.eval_batch_size, progress=progress,
                                      desc="valid")
        curve.append(point)
        log(_fmt_point(point))
        _save(ckpt_path, model, opt, model_cfg, train_cfg, curve, epoch + (0 if stopped else 1),
              point["train_seconds"])
        if stopped:
            log(f"time budget of {train_cfg.time_budget_min} min ({train_cfg.budget_clock} clock) reached")
            break
    test = evaluate(model, split.test, batch_size=train_cfg.eval_batch_size, progress=progress, desc="test")
    log("test " + " ".join(f"{k}={v:.4f}" for k, v in test.items() if k != "users") + f" users={test['users']}")
    report = {"dataset": dataset.name, "source": dataset.source, "n_users": dataset.n_users,
              "n_items": dataset.n_items, "model": model_cfg.to_dict(), "train": dataclasses.asdict(train_cfg),
              "checkpoint": str(ckpt_path), "curve": curve, "test": test,
              "train_seconds": curve[-1]["train_seconds"] if curve else 0.0, "threads": torch.get_num_threads(),
              "budget_clock": train_cfg.budget_clock,
              "params": sum(p.numel() for p in model.parameters()),
              "memory_table_bytes": model.memory_table_bytes()}
    return model, report


def _save(path: Path, model, opt, model_cfg, train_cfg, curve, epochs_done, seconds):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "model_cfg": model_cfg.to_dict(),
                "train_cfg": dataclasses.asdict(train_cfg), "curve": curve, "epochs_done": epochs_done,
                "train_seconds": seconds}, tmp)
    os.replace(tmp, path)  # atomic: an interrupted save never leaves a corrupt checkpoint


def load_checkpoint(path) -> SequentialRecommender:
    """Rebuild a trained model from a checkpoint file written by ``train``."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    model = build_model(ModelConfig(**state["model_cfg"]))
    model.load_state_dict(state["model"])
    return model.eval()


def _fmt_point(p) -> str:
    s = f"epoch {p['epoch']:.2f} loss {p['train_loss']:.4f} time {p['train_seconds'] / 60:.1f} min"
    for li, u in enumerate(p.get("slot_usage", ())):
        s += f" | memory {li}: slots hit {u['fraction_hit']:.3f} KL-uniform {u['kl_to_uniform']:.3f}"
    if "valid" in p:
        v = p["valid"]
        s += f" | valid HR@10 {v['HR@10']:.4f} NDCG@10 {v['NDCG@10']:.4f} MRR {v['MRR']:.4f}"
    return s


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="python -m malloc_kernels.models.train", description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="ml-latest-small",
                    help="dataset name ('ml-latest-small', embedded) or a file/folder in any supported format")
    ap.add_argument("--model", choices=("hstu", "sasrec", "rwkv"), default="hstu")
    ap.add_argument("--heads", choices=("mha", "gqa", "mqa", "mla"), default="mha")
    ap.add_argument("--n-heads", type=int, default=2)
    ap.add_argument("--kv-heads", type=int, default=None, help="kv heads for --heads gqa")
    ap.add_argument("--latent-dim", type=int, default=16, help="MLA latent width")
    ap.add_argument("--seq-compress", choices=("none", "linformer", "beacon", "reformer"), default="none")
    ap.add_argument("--slots", type=int, default=32, help="Linformer slots")
    ap.add_argument("--beacon-chunk", type=int, default=8)
    ap.add_argument("--lsh-buckets", type=int, default=4, help="Reformer: LSH buckets per round (even, <= 256)")
    ap.add_argument("--lsh-hashes", type=int, default=1, help="Reformer: hash rounds")
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--max-len", type=int, default=200)
    ap.add_argument("--dropout", type=float, default=0.2)
    ap.add_argument("--temperature", type=float, default=0.05)
    ap.add_argument("--similarity", choices=("cosine", "dot"), default="cosine")
    ap.add_argument("--position-embedding", choices=("default", "on", "off"), default="default",
                    help="learned absolute position embedding in the input (default: SASRec on, HSTU off)")
    ap.add_argument("--msn", action="store_true",
                    help="add the MSN product-key memory (gated into the last layer unless --msn-layers)")
    ap.add_argument("--msn-slots", type=int, default=128 * 128, help="memory rows M (a perfect square)")
    ap.add_argument("--msn-heads", type=int, default=4)
    ap.add_argument("--msn-key-dim", type=int, default=32)
    ap.add_argument("--msn-topk", type=int, default=32, help="slots read per memory head")
    ap.add_argument("--msn-layers", type=int, nargs="+", default=None,
                    help="layers with a memory (0-based, negative from the end; default: the last)")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--schedule", choices=SCHEDULES, default="constant",
                    help="learning-rate schedule (cosine: warm-up then decay to 0 at the last epoch; cosine-time: "
                         "decay to 0 at the last epoch or the end of --time-budget-min, whichever comes first)")
    ap.add_argument("--warmup-steps", type=int, default=0)
    ap.add_argument("--init-from", default=None, metavar="CHECKPOINT",
                    help="warm-start a head/sequence variant from this trained base checkpoint (uptraining)")
    ap.add_argument("--negatives", type=int, default=128)
    ap.add_argument("--full-softmax", action="store_true", help="full softmax loss instead of sampled softmax")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--windows", choices=WINDOW_MODES, default="last",
                    help="train on each user's last max_len+1 items (last) or on every item in windows (all)")
    ap.add_argument("--bucket", type=int, default=8, help="length-bucketing window in batches (0 = off)")
    ap.add_argument("--eval-every", type=int, default=1, help="validate every N epochs (0 = after the last only)")
    ap.add_argument("--time-budget-min", type=float, default=0.0, help="stop training after this many minutes")
    ap.add_argument("--budget-clock", choices=tuple(BUDGET_CLOCKS), default="wall",
                    help="what --time-budget-min measures: wall time, or this process's CPU time (cpu: concurrent "
                         "runs on a shared machine each get the same compute)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", default=None,
                    help="checkpoint root (default $MALLOC_CACHE or ~/.cache/malloc_kernels)")
    ap.add_argument("--retrain", action="store_true", help="ignore an existing checkpoint")
    ap.add_argument("--out", default=None, help="write the report (config, curve, test metrics) as JSON here")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    ds = load_dataset(args.data)
    print(ds, file=sys.stderr)
    mcfg = ModelConfig(arch=args.model, n_items=ds.n_items, d_model=args.d_model, n_layers=args.layers,
                       n_heads=args.n_heads, heads=args.heads, n_kv_heads=args.kv_heads, latent_dim=args.latent_dim,
                       seq_compress=None if args.seq_compress == "none" else args.seq_compress, slots=args.slots,
                       beacon_chunk=args.beacon_chunk, lsh_buckets=args.lsh_buckets,
                       lsh_hashes=args.lsh_hashes, max_len=args.max_len, dropout=args.dropout,
                       temperature=args.temperature, similarity=args.similarity, msn=args.msn,
                       msn_slots=args.msn_slots, msn_heads=args.msn_heads, msn_key_dim=args.msn_key_dim,
                       msn_topk=args.msn_topk, msn_layers=args.msn_layers,
                       position_embedding={"default": None, "on": True, "off": False}[args.position_embedding])
    tcfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                       num_negatives=args.negatives, full_softmax=args.full_softmax, seed=args.seed,
                       eval_every=args.eval_every, time_budget_min=args.time_budget_min,
                       bucket=args.bucket, windows=args.windows, schedule=args.schedule,
                       warmup_steps=args.warmup_steps, budget_clock=args.budget_clock,
                       init_from=Path(args.init_from).stem if args.init_from else "")
    init_model = load_checkpoint(args.init_from) if args.init_from else None
    _, report = train(ds, mcfg, tcfg, cache=args.cache_dir, use_cache=not args.retrain,
                      progress=not args.no_progress, log=lambda s: print(s, file=sys.stderr, flush=True),
                      init_model=init_model)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({"test": report["test"], "train_seconds": report["train_seconds"]}))
    return report


if __name__ == "__main__":
    sys.exit(guard('python -m malloc_kernels.models.train', main))
