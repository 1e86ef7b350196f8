"""Seeded synthetic long-sequence generator for scale and speed tests.

Structure (so that models and compression methods have something real to learn and lose):
items are split into ``n_topics`` topics with Zipf popularity inside each topic; every user has a sparse interest
mixture over topics that drifts: at each step, with probability ``drift`` the user moves mass from one interest to a
new (random) topic, so old interests fade and new ones arrive (long-range and short-range structure both matter);
consecutive items of one session tend to stay on the same topic (``stickiness``). Timestamps are increasing unix
seconds: within a session gaps are exponential (mean ``session_gap`` seconds), sessions are separated by
exponential gaps of mean ``between_sessions`` seconds. Lengths are log-uniform in ``[min_len, max_len]``
(``max_len`` up to 16384 and beyond).
"""
from __future__ import annotations

import numpy as np

from .dataset import SequenceDataset


def synthetic_dataset(n_users: int = 64, n_items: int = 2000, *, min_len: int = 16, max_len: int = 16384,
                      n_topics: int = 32, drift: float = 0.01, stickiness: float = 0.8, session_len: int = 20,
                      session_gap: float = 60.0, between_sessions: float = 86400.0, zipf: float = 1.1,
                      start_time: int = 1_500_000_000, seed: int = 0, name: str = "synthetic") -> SequenceDataset:
    """Generate ``n_users`` time-ordered sequences over items ``1..n_items`` (see module docstring)."""
    for arg, val in (("n_users", n_users), ("n_items", n_items), ("min_len", min_len), ("n_topics", n_topics)):
        if not isinstance(val, int) or val < 1:
            raise ValueError(f"{arg} must be a positive int, got {val!r}")
    if max_len < min_len:
        raise ValueError(f"max_len {max_len} must be >= min_len {min_len}")
    if n_topics > n_items:
        raise ValueError(f"n_topics {n_topics} must be <= n_items {n_items}")
    for arg, val in (("drift", drift), ("stickiness", stickiness)):
        if not 0.0 <= val <= 1.0:
            raise ValueError(f"{arg} must be in [0, 1], got {val}")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n_items) + 1
    topics = np.array_split(perm, n_topics)
    # Zipf popularity inside a topic: rank r has weight r^-zipf.
    topic_p = []
    for t in topics:
        w = 1.0 / np.arange(1, len(t) + 1) ** zipf
        topic_p.append(np.cumsum(w / w.sum()))
    lengths = np.exp(rng.uniform(np.log(min_len), np.log(max_len + 1), size=n_users)).astype(np.int64)
    lengths = np.clip(lengths, min_len, max_len)
    seqs, tss = [], []
    for u in range(n_users):
        L = int(lengths[u])
        k = min(int(rng.integers(2, 5)), n_topics)   # 2-4 interests, never more than there are topics
        interests = rng.choice(n_topics, size=k, replace=False)
        weights = rng.dirichlet(np.ones(k))
        items = np.empty(L, dtype=np.int64)
        cur = int(interests[0])
        # Random numbers drawn in bulk (the per-step loop only indexes them) keep 16k-long users fast.
        u_drift, u_stick, u_item = rng.random(L), rng.random(L), rng.random(L)
        new_topics = rng.integers(0, n_topics, size=L)
        slot_pick = rng.integers(0, k, size=L)
        for i in range(L):
            if u_drift[i] < drift:
                interests[slot_pick[i]] = new_topics[i]
                weights = 0.7 * weights
                weights[slot_pick[i]] += 0.3
            if i == 0 or u_stick[i] >= stickiness:
                cur = int(interests[rng.choice(k, p=weights / weights.sum())])
            items[i] = topics[cur][min(int(np.searchsorted(topic_p[cur], u_item[i])), len(topics[cur]) - 1)]
        n_sessions = max(1, L // session_len)
        breaks = np.sort(rng.choice(np.arange(1, L), size=min(n_sessions - 1, L - 1), replace=False)) if L > 1 \
            else np.zeros(0, dtype=np.int64)
        gaps = rng.exponential(session_gap, size=L)
        gaps[breaks] = rng.exponential(between_sessions, size=len(breaks))
        gaps[0] = 0.0
        ts = start_time + int(rng.integers(0, 10 ** 7)) + np.cumsum(np.ceil(gaps)).astype(np.int64)
        seqs.append(items)
        tss.append(ts)
    return SequenceDataset(name=name, sequences=seqs, timestamps=tss, n_items=n_items,
                           user_ids=list(range(1, n_users + 1)),
                           item_ids=np.concatenate([[-1], np.arange(1, n_items + 1)]).astype(np.int64),
                           source=f"synthetic(seed={seed})",
                           meta=dict(n_topics=n_topics, drift=drift, stickiness=stickiness, seed=seed))
