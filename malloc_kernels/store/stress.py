"""Concurrent-append check: W writer PROCESSES append to the same users of one store at once; nothing may be lost.

Each writer appends ``appends`` single-entry appends, cycling over the users, with a value that encodes
(writer, sequence number), and reports which appends the store acknowledged. Afterwards every user's stored cache
(policy ``none``: every entry kept) must hold exactly the acknowledged entries, each once, in an order consistent
with each writer's own order. Used by the test suite (small) and ``.ci/run``'s slow step (8 x 1,000 on 10 users).
"""
from __future__ import annotations

import multiprocessing as mp
import time
from typing import Dict, List

import torch

H, D = 1, 4


def seed_users(url: str, users: List[str]) -> None:
    """Store an empty-history cache (policy ``none``, H=1, D=4) for every user."""
    from ..policies import compress
    from . import open_store
    B = len(users)
    empty = compress(torch.zeros(B, H, 0, D), torch.zeros(B, H, 0, D), "none")
    with open_store(url) as st:
        st.put_many(users, empty)


def _writer(urls: List[str], users: List[str], writer: int, appends: int, out) -> None:
    torch.set_num_threads(1)
    from . import open_store
    for url in urls:
        landed = []
        with open_store(url, max_rounds=10000) as st:
            for i in range(appends):
                u = users[(writer + i) % len(users)]
                k = torch.zeros(1, H, 1, D)
                v = torch.tensor([float(writer), float(i), 0.0, 0.0]).view(1, H, 1, D)
                st.append([u], k, v)
                landed.append((u, writer, i))
            out.put((url, writer, landed, st.stats["conflicts"]))


def run_concurrent_appends(urls, users: List[str], writers: int = 8, appends: int = 1000,
                           timeout: float = 600.0) -> Dict[str, Dict[str, object]]:
    """Run the writers (spawned processes; each does its appends on every store of ``urls`` in turn), then verify
    every store. Returns per-URL counts; raises AssertionError on any lost, duplicated or reordered append."""
    urls = [urls] if isinstance(urls, str) else list(urls)
    for url in urls:
        seed_users(url, users)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(urls, users, w, appends, q)) for w in range(writers)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    results = {u: [] for u in urls}
    conflicts = {u: 0 for u in urls}
    finished = {u: 0.0 for u in urls}
    deadline = time.monotonic() + timeout
    for _ in range(len(procs) * len(urls)):
        url, w, landed, c = q.get(timeout=max(1.0, deadline - time.monotonic()))
        results[url] += landed
        conflicts[url] += c
        finished[url] = time.perf_counter() - t0
    for p in procs:
        p.join(timeout=max(1.0, deadline - time.monotonic()))
        if p.exitcode != 0:
            raise AssertionError(f"writer process exited with {p.exitcode}")
    out = {}
    for url in urls:
        info = _verify(url, users, writers, results[url])
        info.update(writers=writers, appends_per_writer=appends, cas_conflicts_retried=conflicts[url],
                    finished_after_s=finished[url])
        out[url] = info
    return out


def _verify(url, users, writers, results) -> Dict[str, object]:
    from . import open_store
    with open_store(url) as st:
        state = st.get_many(users)
    expected: Dict[str, set] = {u: set() for u in users}
    for u, w, i in results:
        expected[u].add((w, i))
    lost = dup = 0
    for b, u in enumerate(users):
        n = int(state.length[b, 0])
        got = [(int(state.v[b, 0, j, 0]), int(state.v[b, 0, j, 1])) for j in range(n)]
        dup += len(got) - len(set(got))
        lost += len(expected[u] - set(got))
        extra = set(got) - expected[u]
        assert not extra, f"user {u}: entries no writer acknowledged: {sorted(extra)[:5]}"
        assert int(state.original_length[b]) == n == len(expected[u])
        for w in range(writers):              # each writer's appends to u land in its own order
            seq = [i for (ww, i) in got if ww == w]
            assert seq == sorted(seq), f"user {u}: writer {w}'s appends out of order"
    assert lost == 0 and dup == 0, f"lost {lost}, duplicated {dup} acknowledged appends"
    return {"users": len(users), "acknowledged": len(results), "lost": lost, "duplicated": dup}
