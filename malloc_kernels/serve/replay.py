"""Serving replay: a dataset's interactions replayed in time order through a real store.

The most recent ``events`` interactions of the dataset (global time order) are replayed; everything before them is
history. A model is trained briefly on the history alone (users' interactions before their first replayed one),
each user's history is encoded once, compressed by the method and put in the store. Then N worker threads serve
the events: worker w owns the users hashed to it (so one user's events stay in order), takes up to ``batch``
consecutive events of distinct users, and per request runs

    store get (batched, CRC-checked) -> model.serve_step over the caches (attention over the compressed cache,
    the request's own entries appended by the cache's policy) -> rank every item -> store put (batched)

Event (user u, item i): the request token is u's previous interaction (item i-1, its timestamp), the target is
item i; the user's cache then holds items 0..i-1. Reported per (method, store, workers): requests/s, p50/p99
latency split into store / attention / rest, bytes held by the store vs the native cache's entry, online HR@10 /
NDCG@10 vs the same replay with native caches, and the split for requests whose history holds >= 1,000 entries.

Faults: store calls that fail with a connection error are retried with exponential backoff (bounded); a user whose
entry fails its CRC (or is missing) is rebuilt from its history by re-encoding it and reported, never served from
the corrupt bytes. After each run every stored entry is re-read: it must pass its CRC and hold exactly the
history the acknowledged requests appended (``original_length`` = items before the user's last request + 1).
"""
from __future__ import annotations

import dataclasses
import random
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..cache.batch import stack_states
from ..models.metrics import rank_metrics, target_ranks


@dataclass
class ReplayConfig:
    data: str = "ml-latest-small"
    methods: Tuple[str, ...] = ("none", "int4", "h2o+kivi4")
    budget: float = 0.5               # token budget (ratio) of the token-level methods; precision methods keep all
    stores: Tuple[str, ...] = ("sqlite",)
    workers: Tuple[int, ...] = (1, 4)
    events: int = 3000
    batch: int = 4
    d_model: int = 32
    n_layers: int = 2
    n_heads: int = 2
    max_len: int = 200
    epochs: int = 4
    seed: int = 0
    progress: bool = True
    retry_seconds: float = 60.0       # give a failing store call up after this long
    cache: Optional[str] = None       # checkpoint cache directory (train's)

    def __post_init__(self):
        for name in ("events", "batch", "d_model", "n_layers", "n_heads", "max_len", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.workers or min(self.workers) < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if not 0 < self.budget <= 1:
            raise ValueError(f"budget must be a ratio in (0, 1], got {self.budget}")


# ---- data: events and the history before them ----------------------------------------------------------------------
@dataclass
class Events:
    users: np.ndarray        # dataset user index per event
    index: np.ndarray        # position of the target item in the user's sequence (>= 1)
    first: Dict[int, int]    # user -> index of their first replayed event


def replay_events(ds, n_events: int) -> Events:
    if ds.timestamps is None:
        raise ValueError(f"dataset {ds.name} has no timestamps; the replay needs time order")
    rows = [(int(t), u, i) for u, ts in enumerate(ds.timestamps) for i, t in enumerate(ts) if i >= 1]
    rows.sort()
    rows = rows[-n_events:]
    users = np.array([u for _, u, _ in rows], dtype=np.int64)
    index = np.array([i for _, _, i in rows], dtype=np.int64)
    first: Dict[int, int] = {}
    for u, i in zip(users.tolist(), index.tolist()):
        first.setdefault(u, i)
    return Events(users, index, first)


def history_dataset(ds, ev: Events):
    """The dataset cut before each replayed user's first replayed interaction (what the model may train on)."""
    seqs, tss = [], []
    for u, s in enumerate(ds.sequences):
        cut = ev.first.get(u, len(s))
        seqs.append(s[:cut])
        tss.append(ds.timestamps[u][:cut])
    keep = [u for u in range(len(seqs)) if len(seqs[u]) >= 1]
    return dataclasses.replace(ds, name=ds.name + "-replay-history", sequences=[seqs[u] for u in keep],
                               timestamps=[tss[u] for u in keep], user_ids=[ds.user_ids[u] for u in keep])


def train_model(ds, ev: Events, cfg: ReplayConfig, log=print):
    from ..models.config import ModelConfig
    from ..models.train import TrainConfig, train
    hist = history_dataset(ds, ev)
    mcfg = ModelConfig(arch="hstu", n_items=ds.n_items, d_model=cfg.d_model, n_layers=cfg.n_layers,
                       n_heads=cfg.n_heads, max_len=cfg.max_len)
    tcfg = TrainConfig(epochs=cfg.epochs, batch_size=64, lr=3e-3, full_softmax=True, seed=cfg.seed,
                       eval_every=0)
    model, report = train(hist, mcfg, tcfg, cache=cfg.cache, progress=cfg.progress, log=log)
    return model.eval(), report


# ---- the serving state of one user ------------------------------------------------------------------------------
def _method_kwargs(method: str, budget: float) -> dict:
    first = method.split("+")[0]
    from ..policies import get_policy
    from ..policies.registry import policy_level
    if method == "none" or policy_level(get_policy(first)) == "precision":
        return {}
    return {"budget": budget}


@torch.no_grad()
def encode_users(model, ds, users: Sequence[int], upto: Sequence[int], method: str, budget: float):
    """Per-layer caches (B = len(users)) of each user's items ``[:upto]`` compressed by ``method``."""
    B = len(users)
    N = max(1, max(upto))
    items = torch.zeros(B, N, dtype=torch.int64)
    ts = torch.zeros(B, N, dtype=torch.int64)
    for b, (u, n) in enumerate(zip(users, upto)):
        items[b, :n] = torch.as_tensor(ds.sequences[u][:n])
        ts[b, :n] = torch.as_tensor(ds.timestamps[u][:n])
    lengths = torch.as_tensor(list(upto), dtype=torch.int64)
    kw = _method_kwargs(method, budget)
    scored = method.split("+")[0] in ("h2o", "d2o", "tova", "snapkv", "pyramidkv")
    window = 1 if method.split("+")[0] == "tova" else None
    out = model.encode_history(items, ts, lengths, method=method, return_stats=scored, stats_window=window, **kw)
    return out[0] if scored else out


# ---- timing ---------------------------------------------------------------------------------------------------------
class _AttentionClock:
    """Wraps ``model._attend`` to add each call's wall time to the calling thread's counter."""

    def __init__(self, model):
        self.local = threading.local()
        inner = model._attend

        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                self.local.seconds = getattr(self.local, "seconds", 0.0) + time.perf_counter() - t0
        model._attend = timed
        self.model, self.inner = model, inner

    def take(self) -> float:
        s = getattr(self.local, "seconds", 0.0)
        self.local.seconds = 0.0
        return s

    def close(self):
        self.model._attend = self.inner


def _transient_errors():
    errs = [ConnectionError, TimeoutError, OSError]
    try:
        import redis
        errs += [redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.BusyLoadingError,
                 redis.exceptions.ClusterDownError if hasattr(redis.exceptions, "ClusterDownError") else
                 redis.exceptions.ConnectionError]
    except ImportError:
        pass
    import sqlite3
    errs.append(sqlite3.OperationalError)
    return tuple(errs)


@dataclass
class RunLog:
    latency: List[float] = field(default_factory=list)
    store: List[float] = field(default_factory=list)
    attention: List[float] = field(default_factory=list)
    hist_len: List[int] = field(default_factory=list)     # per request: its shortest user history
    ranks: List[torch.Tensor] = field(default_factory=list)
    failed_calls: int = 0
    failed_requests: int = 0
    stalled_seconds: float = 0.0
    rebuilt: Dict[str, str] = field(default_factory=dict)
    errors: List[str] = field(default_factory=list)


class Replayer:
    """One replay run of one method on one store with N workers."""

    def __init__(self, model, ds, ev: Events, store, method: str, cfg: ReplayConfig, progress=None):
        self.model, self.ds, self.ev, self.store, self.method, self.cfg = model, ds, ev, store, method, cfg
        self.transient = _transient_errors()
        self.log = RunLog()
        self.lock = threading.Lock()
        self.progress = progress
        self.last_index: Dict[int, int] = {}

    def retrying(self, what: str, fn):
        """``fn()`` retried on connection errors with exponential backoff (jittered, capped at 1 s) for at most
        ``retry_seconds``; returns (result, failed attempts)."""
        t0 = time.monotonic()
        delay, fails = 0.02, 0
        while True:
            try:
                return fn(), fails
            except self.transient as e:
                fails += 1
                if time.monotonic() - t0 > self.cfg.retry_seconds:
                    raise RuntimeError(f"{what}: store unavailable for {self.cfg.retry_seconds:.0f}s ({e})") from e
                time.sleep(delay * (0.5 + random.random()))
                delay = min(1.0, delay * 2)

    def _load(self, users: List[int], idx: List[int]):
        keys = [str(u) for u in users]
        (states, corrupt), fails = self.retrying("get", lambda: self.store.get_entries(keys))
        for b, s in enumerate(states):
            if s is None:
                # corrupt or missing: rebuild from the user's history (items before the request token), report it
                reason = corrupt.get(keys[b], "missing")
                with self.lock:
                    self.log.rebuilt[keys[b]] = reason
                states[b] = encode_users(self.model, self.ds, [users[b]], [idx[b] - 1], self.method,
                                         self.cfg.budget)
        return stack_states(states), fails

    def serve(self, users: List[int], idx: List[int]):
        t0 = time.perf_counter()
        state, f1 = self._load(users, idx)
        t_get = time.perf_counter() - t0
        req = torch.as_tensor([int(self.ds.sequences[u][i - 1]) for u, i in zip(users, idx)]).view(-1, 1)
        req_ts = torch.as_tensor([int(self.ds.timestamps[u][i - 1]) for u, i in zip(users, idx)]).view(-1, 1)
        tgt = torch.as_tensor([int(self.ds.sequences[u][i]) for u, i in zip(users, idx)])
        hist = min(int(state[0].original_length[b]) for b in range(len(users)))
        self.clock.take()
        with torch.no_grad():
            h, grown = self.model.serve_step(req, req_ts, state)
            ranks = target_ranks(self.model.score_all_items(h), tgt)
        t_att = self.clock.take()
        t1 = time.perf_counter()
        _, f2 = self.retrying("put", lambda: self.store.put_many([str(u) for u in users], grown))
        t_put = time.perf_counter() - t1
        total = time.perf_counter() - t0
        with self.lock:
            lg = self.log
            lg.latency.append(total)
            lg.store.append(t_get + t_put)
            lg.attention.append(t_att)
            lg.hist_len.append(hist)
            lg.ranks.append(ranks)
            lg.failed_calls += f1 + f2
            lg.failed_requests += int(f1 + f2 > 0)
            for u, i in zip(users, idx):
                self.last_index[u] = i
            if self.progress is not None:
                self.progress.update(len(users))

    def worker(self, w: int, n: int):
        mine = [(int(u), int(i)) for u, i in zip(self.ev.users, self.ev.index) if zlib.crc32(str(u).encode()) % n == w]
        pos = 0
        try:
            while pos < len(mine):
                batch, seen = [], set()
                while pos < len(mine) and len(batch) < self.cfg.batch and mine[pos][0] not in seen:
                    batch.append(mine[pos])
                    seen.add(mine[pos][0])
                    pos += 1
                self.serve([u for u, _ in batch], [i for _, i in batch])
        except Exception as e:  # reported in the run's results, never silently dropped
            with self.lock:
                self.log.errors.append(f"worker {w}: {type(e).__name__}: {e}")

    def run(self, workers: int) -> float:
        self.clock = _AttentionClock(self.model)
        try:
            threads = [threading.Thread(target=self.worker, args=(w, workers), daemon=True) for w in range(workers)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return time.perf_counter() - t0
        finally:
            self.clock.close()


def verify_store(store, ev: Events, last_index: Dict[int, int]) -> Dict[str, object]:
    """Re-read every replayed user's entry: it must pass its CRC and hold exactly the acknowledged history (after
    serving event i the cache holds items 0..i-1, so ``original_length`` = i of the user's last served event)."""
    users = sorted(ev.first)
    states, corrupt = store.get_entries([str(u) for u in users])
    bad_len, missing = [], []
    for u, s in zip(users, states):
        if s is None:
            if str(u) not in corrupt:
                missing.append(u)
            continue
        want = last_index.get(u, ev.first[u] - 1)
        got = int(s[0].original_length[0])
        if got != want:
            bad_len.append((u, got, want))
    return {"users": len(users), "corrupt": len(corrupt), "missing": len(missing), "wrong_length": len(bad_len),
            "examples": bad_len[:5]}


def store_bytes(store, ev: Events) -> int:
    blobs = store.get_raw([str(u) for u in sorted(ev.first)])
    return int(sum(len(b) for b in blobs if b is not None))


def summarize(log: RunLog, seconds: float, n_items: int, min_history: int = 0) -> Dict[str, float]:
    """Throughput, latency percentiles, the store / attention / rest split and online metrics of a run;
    ``min_history``: the split over requests whose every user has at least that many cached entries."""
    sel = np.array(log.hist_len) >= min_history
    lat = np.array(log.latency)[sel] * 1e3
    st = np.array(log.store)[sel] * 1e3
    at = np.array(log.attention)[sel] * 1e3
    if min_history:
        if not len(lat):
            return {"requests": 0}
        return {"requests": int(len(lat)), "p50_ms": float(np.percentile(lat, 50)),
                "p99_ms": float(np.percentile(lat, 99)), "store_share": float(st.sum() / lat.sum()),
                "attention_share": float(at.sum() / lat.sum()), "store_p50_ms": float(np.percentile(st, 50))}
    rest = lat - st - at
    ranks = torch.cat(log.ranks) if log.ranks else torch.zeros(0)
    m = rank_metrics(ranks, n_items) if len(ranks) else {}
    served = int(len(ranks))
    out = {"requests": len(lat), "events": served, "seconds": seconds, "events_per_s": served / seconds,
           "requests_per_s": len(lat) / seconds, "p50_ms": float(np.percentile(lat, 50)),
           "p99_ms": float(np.percentile(lat, 99)), "store_p50_ms": float(np.percentile(st, 50)),
           "attention_p50_ms": float(np.percentile(at, 50)), "rest_p50_ms": float(np.percentile(rest, 50)),
           "store_share": float(st.sum() / lat.sum()), "attention_share": float(at.sum() / lat.sum()),
           "failed_store_calls": log.failed_calls, "requests_with_retries": log.failed_requests,
           "rebuilt_users": len(log.rebuilt), "errors": len(log.errors)}
    out.update({k.lower(): float(v) for k, v in m.items() if isinstance(v, (int, float))})
    return out
