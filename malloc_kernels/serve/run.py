"""The replay grid: methods x stores x worker counts, the long-history split, a fault run, and the report."""
from __future__ import annotations

import dataclasses
import platform
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from .replay import (Events, ReplayConfig, Replayer, encode_users, replay_events, store_bytes, summarize,
                     train_model, verify_store)


class StoreFarm:
    """Named stores for the replay: ``sqlite`` (a fresh file per run), ``redis`` (a local redis-server) and
    ``cluster`` (a local 3-node Redis Cluster), started on demand and stopped by ``close``; any other name is used
    as a store URL as is."""

    def __init__(self, root: Optional[str] = None):
        self.root = Path(root or tempfile.mkdtemp(prefix="mk-replay-"))
        self.servers: Dict[str, object] = {}

    def server(self, name):
        from ..store.servers import LocalRedisCluster, RedisServer
        if name not in self.servers:
            self.servers[name] = RedisServer().start() if name == "redis" else LocalRedisCluster(3).start()
        return self.servers[name]

    def fresh(self, name: str):
        """An empty store for one run: ``(store, server or None)``."""
        from ..store import open_store
        if name == "sqlite":
            return open_store(str(self.root / f"run-{uuid.uuid4().hex[:8]}")), None
        if name in ("redis", "cluster"):
            srv = self.server(name)
            st = open_store(srv.url)
            st.flush()
            return st, srv
        st = open_store(name)
        return st, None

    def close(self):
        for s in self.servers.values():
            s.close()
        self.servers = {}


def initial_states(model, ds, ev: Events, method: str, budget: float, chunk: int = 8):
    """Per-layer caches of every replayed user's history before their first request token, in ``sorted(users)``
    order (users encoded in chunks of similar length)."""
    from ..cache.batch import stack_states
    users = sorted(ev.first)
    upto = {u: ev.first[u] - 1 for u in users}
    order = sorted(users, key=lambda u: upto[u])
    parts = {}
    for i in range(0, len(order), chunk):
        us = order[i:i + chunk]
        caches = encode_users(model, ds, us, [upto[u] for u in us], method, budget)
        for b, u in enumerate(us):
            parts[u] = [_user(c, b) for c in caches]
    return users, stack_states([parts[u] for u in users])


def _user(c, b):
    from ..cache.envelope import state_from_bytes, state_to_bytes
    return state_from_bytes(state_to_bytes(c, b))


def replay_once(model, ds, ev: Events, store, method: str, cfg: ReplayConfig, workers: int, init,
                progress=None, during: Optional[Callable[[Replayer], None]] = None):
    """Put the initial states, replay the events with ``workers`` threads, verify the store; returns the row."""
    users, state = init
    store.put_many([str(u) for u in users], state)
    rep = Replayer(model, ds, ev, store, method, cfg, progress=progress)
    watcher = None
    if during is not None:
        watcher = threading.Thread(target=during, args=(rep,), daemon=True)
        watcher.start()
    seconds = rep.run(workers)
    if watcher is not None:
        watcher.join(timeout=120)
    row = summarize(rep.log, seconds, ds.n_items)
    row["verify"] = verify_store(store, ev, rep.last_index)
    row["bytes_held"] = store_bytes(store, ev)
    row["rebuilt"] = dict(list(rep.log.rebuilt.items())[:10])
    row["error_messages"] = rep.log.errors[:5]
    row["long_history"] = summarize(rep.log, seconds, ds.n_items, min_history=1000)
    return row, rep


def kill_and_restart(server, at_fraction: float, down_seconds: float, total: int):
    """A ``during`` hook: SIGKILL the redis-server once ``at_fraction`` of the events were served, restart it after
    ``down_seconds`` (same directory: the append-only file brings back every acknowledged write)."""
    info = {}

    def hook(rep: Replayer):
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            with rep.lock:
                served = sum(len(r) for r in rep.log.ranks)
            if served >= at_fraction * total:
                break
            time.sleep(0.005)
        info["killed_after_events"] = served
        t0 = time.monotonic()
        server.kill()
        time.sleep(down_seconds)
        server.start()
        info["down_seconds"] = time.monotonic() - t0
    return hook, info


def long_events(ev: Events, min_index: int = 1000) -> Events:
    keep = ev.index >= min_index + 1
    users, index = ev.users[keep], ev.index[keep]
    first: Dict[int, int] = {}
    for u, i in zip(users.tolist(), index.tolist()):
        first.setdefault(u, i)
    return Events(users, index, first)


def run(cfg: ReplayConfig, out: str, log=print, fault: Optional[dict] = None) -> dict:
    """The whole grid (see the package docstring); writes the report into ``out`` and returns the results."""
    from ..data import load_dataset
    from tqdm.auto import tqdm
    torch.set_num_threads(1)
    ds = load_dataset(cfg.data)
    ev = replay_events(ds, cfg.events)
    log(f"replay: {len(ev.users)} events of {len(ev.first)} users from {ds.name}; training on their history")
    model, train_report = train_model(ds, ev, cfg, log=log)
    lev = long_events(ev)
    farm = StoreFarm()
    rows: List[dict] = []
    try:
        for method in cfg.methods:
            t0 = time.perf_counter()
            init = initial_states(model, ds, ev, method, cfg.budget)
            linit = initial_states(model, ds, lev, method, cfg.budget) if len(lev.users) else None
            log(f"{method}: initial states of {len(init[0])} users in {time.perf_counter() - t0:.1f}s")
            for store_name in cfg.stores:
                for workers in cfg.workers:
                    store, _ = farm.fresh(store_name)
                    with tqdm(total=len(ev.users), desc=f"{method} {store_name} x{workers}",
                              disable=not cfg.progress, leave=False) as bar:
                        row, _ = replay_once(model, ds, ev, store, method, cfg, workers, init, progress=bar)
                    row.update(method=method, store=store_name, workers=workers, batch=cfg.batch)
                    if linit is not None and workers == 1:
                        lcfg = dataclasses.replace(cfg, batch=1)
                        lstore, _ = farm.fresh(store_name)
                        lrow, _ = replay_once(model, ds, lev, lstore, method, lcfg, 1, linit)
                        row["long_history_batch1"] = {k: lrow[k] for k in ("requests", "p50_ms", "p99_ms",
                                                                          "store_share", "attention_share",
                                                                          "store_p50_ms", "attention_p50_ms")}
                        lstore.close()
                    store.close()
                    rows.append(row)
                    _save(cfg, rows, None, train_report, out)       # a crash later keeps every finished row
                    log(f"  {method:>10} {store_name:>8} x{workers}: {row['events_per_s']:.1f} events/s, "
                        f"p99 {row['p99_ms']:.1f} ms, store {100 * row['store_share']:.0f}%, "
                        f"NDCG@10 {row.get('ndcg@10', float('nan')):.4f}, verify {row['verify']}")
        fault_row = None
        if fault is not None:
            log("fault run: redis-server killed mid-replay and restarted, entries corrupted before it")
            fault_row = run_fault(model, ds, ev, farm, cfg, **fault)
            log(f"fault run: {fault_row}")
    finally:
        farm.close()
    return _save(cfg, rows, fault_row, train_report, out)


def _save(cfg, rows, fault_row, train_report, out) -> dict:
    import os
    from .report import write_report
    result = {"config": dataclasses.asdict(cfg), "rows": rows, "fault": fault_row,
              "train": {k: train_report.get(k) for k in ("test", "seconds", "epochs_done") if k in train_report},
              "machine": {"cpu": platform.processor() or platform.machine(), "torch_threads": 1,
                          "python": platform.python_version(), "load_average": os.getloadavg()[0]}}
    add_native_ratios(rows)
    write_report(result, Path(out))
    return result


def run_fault_only(cfg: ReplayConfig, out: str, log=print, **fault) -> dict:
    """The fault replay alone (same data, events and model as ``run``); writes ``fault.json`` / ``fault.md``."""
    import json
    import os
    from ..data import load_dataset
    from .report import fault_lines
    torch.set_num_threads(1)
    ds = load_dataset(cfg.data)
    ev = replay_events(ds, cfg.events)
    model, _ = train_model(ds, ev, cfg, log=log)
    farm = StoreFarm()
    try:
        row = run_fault(model, ds, ev, farm, cfg, **fault)
    finally:
        farm.close()
    row["load_average"] = os.getloadavg()[0]
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    (path / "fault.json").write_text(json.dumps(row, indent=1, default=str))
    (path / "fault.md").write_text("\n".join(fault_lines(row, cfg)) + "\n")
    log("\n".join(fault_lines(row, cfg)))
    return row


def add_native_ratios(rows: List[dict]) -> None:
    native = {(r["store"], r["workers"]): r for r in rows if r["method"] == "none"}
    for r in rows:
        n = native.get((r["store"], r["workers"]))
        if n is None:
            continue
        r["bytes_vs_native"] = r["bytes_held"] / max(n["bytes_held"], 1)
        for m in ("hr@10", "ndcg@10"):
            if m in r and m in n:
                r[f"{m}_change"] = r[m] - n[m]


def run_fault(model, ds, ev: Events, farm: StoreFarm, cfg: ReplayConfig, method: str = "int4", workers: int = 2,
              at_fraction: float = 0.3, down_seconds: float = 2.0, corrupt_users: int = 2) -> dict:
    """Replay on a local redis-server that is SIGKILLed mid-replay and restarted; ``corrupt_users`` entries are
    corrupted before the replay starts. Returns the row with the fault's timing."""
    store, server = farm.fresh("redis")
    init = initial_states(model, ds, ev, method, cfg.budget)
    users = [str(u) for u in init[0]]
    hook, info = kill_and_restart(server, at_fraction, down_seconds, len(ev.users))
    orig_put = store.put_many
    corrupted = users[:corrupt_users]

    def put_then_corrupt(us, state):
        n = orig_put(us, state)
        if us == users:
            for u in corrupted:
                blob = bytearray(store.get_raw([u])[0])
                blob[len(blob) // 3] ^= 0x01
                store.put_raw([u], [bytes(blob)])
        return n

    store.put_many = put_then_corrupt
    row, _ = replay_once(model, ds, ev, store, method, cfg, workers, init, during=hook)
    store.close()
    row.update(method=method, store="redis", workers=workers, fault=info, corrupted=corrupted)
    return row
