"""Time-ordered per-user item sequences, leave-one-out splits and padding-free (jagged) batches.

Conventions (ARCHITECTURE.md, "Serving and evaluation")
---------------------------------
* Item ids are remapped to ``1..n_items`` (``0`` is padding) in increasing order of the original id, so a file whose
  ids are already compact (``1..n``) keeps them; ``SequenceDataset.item_ids[i]`` is the original id of item ``i``.
* Each user's interactions are in time order: loaders stable-sort by timestamp, so ties keep file order; formats
  without timestamps keep file order and have ``timestamps=None``.
* Users with no interactions (a sequence line holding only the user id) are dropped and counted in
  ``num_empty_users``; they have nothing to train on or predict.
* Leave-one-out: for a user with ``n >= 3`` interactions the last item is the test target (its input is the first
  ``n - 1`` items), the second-to-last the validation target (input: the first ``n - 2`` items) and the first
  ``n - 2`` items are the training sequence. Users with ``n < 3`` (single-item users included) have no
  validation/test example; their whole sequence is training data (a single item gives no next-item pair, so such
  a user contributes nothing to the loss but still counts in ``n_users``).
* Jagged batches hold ``values [total]`` and ``offsets [B+1]`` (int64), no padding token anywhere.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence

import numpy as np
import torch


@dataclass
class SequenceDataset:
    """Per-user interaction sequences of one dataset.

    sequences: list of int64 arrays, item ids in ``1..n_items``, time order (one per non-empty user);
    timestamps: None or a list of int64 arrays aligned with ``sequences`` (non-decreasing, seconds);
    user_ids: the original user id of each sequence; item_ids: int64 ``[n_items + 1]`` original id of each item
    (entry 0 is -1, the padding); num_empty_users: users present in the file without any interaction.
    """

    name: str
    sequences: List[np.ndarray]
    timestamps: Optional[List[np.ndarray]]
    n_items: int
    user_ids: list
    item_ids: np.ndarray
    num_empty_users: int = 0
    source: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def n_users(self) -> int:
        return len(self.sequences)

    @property
    def n_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))

    @property
    def has_timestamps(self) -> bool:
        return self.timestamps is not None

    def fingerprint(self) -> str:
        """sha256 over the remapped sequences (and timestamps): the data part of checkpoint cache keys."""
        h = hashlib.sha256()
        h.update(f"{self.n_items}:{self.n_users}:".encode())
        for i, s in enumerate(self.sequences):
            h.update(np.int64(len(s)).tobytes())
            h.update(np.ascontiguousarray(s, dtype=np.int64).tobytes())
            if self.timestamps is not None:
                h.update(np.ascontiguousarray(self.timestamps[i], dtype=np.int64).tobytes())
        return h.hexdigest()

    def split(self) -> "LeaveOneOutSplit":
        return leave_one_out(self)

    def __repr__(self) -> str:
        return (f"SequenceDataset({self.name!r}, users={self.n_users}, items={self.n_items}, "
                f"interactions={self.n_interactions}, timestamps={self.has_timestamps}, "
                f"empty_users={self.num_empty_users})")


@dataclass
class EvalExamples:
    """Next-item examples: ``histories[u]`` (time order) -> ``targets[u]``; ``users`` index the dataset."""

    users: np.ndarray
    histories: List[np.ndarray]
    history_timestamps: Optional[List[np.ndarray]]
    targets: np.ndarray
    target_timestamps: Optional[np.ndarray]

    def __len__(self) -> int:
        return len(self.histories)


@dataclass
class LeaveOneOutSplit:
    train_sequences: List[np.ndarray]
    train_timestamps: Optional[List[np.ndarray]]
    valid: EvalExamples
    test: EvalExamples
    n_items: int


def leave_one_out(ds: SequenceDataset) -> LeaveOneOutSplit:
    """Leave-one-out split in time order (module docstring): train = first n-2, valid -> n-2, test -> n-1."""
    train, train_ts = [], [] if ds.timestamps is not None else None
    cols = {name: ([], [], [], [], []) for name in ("valid", "test")}
    for u, s in enumerate(ds.sequences):
        ts = ds.timestamps[u] if ds.timestamps is not None else None
        n = len(s)
        if n < 3:
            train.append(s)
            if train_ts is not None:
                train_ts.append(ts)
            continue
        train.append(s[:-2])
        if train_ts is not None:
            train_ts.append(ts[:-2])
        for name, cut in (("valid", n - 2), ("test", n - 1)):
            users, hist, hist_ts, tgt, tgt_ts = cols[name]
            users.append(u)
            hist.append(s[:cut])
            tgt.append(s[cut])
            if ts is not None:
                hist_ts.append(ts[:cut])
                tgt_ts.append(ts[cut])

    def examples(name):
        users, hist, hist_ts, tgt, tgt_ts = cols[name]
        return EvalExamples(users=np.asarray(users, dtype=np.int64), histories=hist,
                            history_timestamps=hist_ts if ds.timestamps is not None else None,
                            targets=np.asarray(tgt, dtype=np.int64),
                            target_timestamps=np.asarray(tgt_ts, dtype=np.int64) if ds.timestamps is not None
                            else None)

    return LeaveOneOutSplit(train_sequences=train, train_timestamps=train_ts, valid=examples("valid"),
                            test=examples("test"), n_items=ds.n_items)


@dataclass
class JaggedBatch:
    """A padding-free batch of B sequences.

    items: int64 ``[total]``; offsets: int64 ``[B+1]`` (user b owns ``items[offsets[b]:offsets[b+1]]``);
    timestamps: int64 ``[total]`` or None; targets: int64 ``[total]`` next-item labels for training batches
    (aligned with ``items``) or ``[B]`` one label per user for evaluation batches, or None; users: int64 ``[B]``
    dataset indices.
    """

    items: torch.Tensor
    offsets: torch.Tensor
    timestamps: Optional[torch.Tensor] = None
    targets: Optional[torch.Tensor] = None
    users: Optional[torch.Tensor] = None

    @property
    def batch_size(self) -> int:
        return self.offsets.numel() - 1

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def to_padded(self, pad: int = 0):
        """Left-aligned ``[B, L]`` items (``pad`` past each length), timestamps (0 past length) and lengths."""
        lengths = self.lengths
        B, L = self.batch_size, int(lengths.max()) if self.batch_size else 0
        idx = torch.arange(L)
        valid = idx[None, :] < lengths[:, None]
        src = (self.offsets[:-1, None] + idx[None, :]).clamp(max=max(self.items.numel() - 1, 0))
        items = torch.where(valid, self.items[src], torch.full((B, L), pad, dtype=torch.int64)) if L else \
            torch.zeros(B, 0, dtype=torch.int64)
        ts = None
        if self.timestamps is not None:
            ts = torch.where(valid, self.timestamps[src], torch.zeros((), dtype=torch.int64)) if L else \
                torch.zeros(B, 0, dtype=torch.int64)
        return items, ts, lengths


def make_jagged(seqs: Sequence[np.ndarray], timestamps: Optional[Sequence[np.ndarray]] = None,
                targets=None, users=None) -> JaggedBatch:
    """Concatenate 1-D sequences into a ``JaggedBatch`` (empty sequences give empty rows)."""
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    cat = (lambda xs: torch.from_numpy(np.concatenate([np.asarray(x, dtype=np.int64) for x in xs]))
           if len(xs) else torch.zeros(0, dtype=torch.int64))
    return JaggedBatch(items=cat(seqs), offsets=torch.from_numpy(offsets),
                       timestamps=None if timestamps is None else cat(timestamps),
                       targets=None if targets is None else (cat(targets) if isinstance(targets, list)
                                                             else torch.as_tensor(targets, dtype=torch.int64)),
                       users=None if users is None else torch.as_tensor(users, dtype=torch.int64))


WINDOW_MODES = ("last", "all")


def training_windows(sequences: Sequence[np.ndarray], max_len: int, windows: str = "last") -> np.ndarray:
    """Training samples as ``[n, 2]`` int64 rows ``(user, end)``: the sample is ``s[max(end - max_len - 1, 0):end]``
    of user ``s`` (inputs = all but its last item, targets = all but its first).

    ``windows="last"``: one sample per user with >= 2 items, its most recent ``max_len + 1`` items (the usual SASRec /
    HSTU recipe; items older than that are never trained on). ``"all"``: longer sequences are tiled backwards from the
    end into windows of ``max_len + 1`` items sharing one boundary item, so every item after the first is a target
    exactly once per epoch (MovieLens-1M training split at max_len 200: 982k targets in 8,619 windows, against 648k
    in 6,040 for ``"last"``); windows with fewer than 2 items are dropped. Positions restart at 0 in every window,
    as in a truncated history at serving.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if windows not in WINDOW_MODES:
        raise ValueError(f"windows must be one of {WINDOW_MODES}, got {windows!r}")
    rows = []
    for u, s in enumerate(sequences):
        end = len(s)
        while end >= 2:
            rows.append((u, end))
            if windows == "last":
                break
            end -= max_len
    return np.array(rows, dtype=np.int64).reshape(-1, 2)


def training_batches(sequences: Sequence[np.ndarray], timestamps: Optional[Sequence[np.ndarray]], batch_size: int,
                     max_len: int, *, shuffle: bool = True, seed: int = 0, bucket: int = 0,
                     windows: str = "last") -> Iterator[JaggedBatch]:
    """Next-item training batches over the samples of ``training_windows(sequences, max_len, windows)``: each
    sample's items give inputs ``w[:-1]`` and targets ``w[1:]`` (so every input token has a label); ``users`` of a
    batch holds each sample's user (repeated for a user's several windows). Deterministic given ``seed``.
    ``bucket = k > 0``: the shuffled samples are cut into runs of ``k`` batches, each run is sorted by length before
    batching and the batch order is shuffled again, so a batch holds samples of similar length (less padding inside
    dense attention kernels) while every epoch still sees a random order."""
    if batch_size < 1 or max_len < 1:
        raise ValueError(f"batch_size and max_len must be >= 1, got {batch_size}, {max_len}")
    if bucket < 0:
        raise ValueError(f"bucket must be >= 0, got {bucket}")
    samples = training_windows(sequences, max_len, windows)
    order = np.arange(len(samples), dtype=np.int64)
    rng = np.random.default_rng(seed)
    if shuffle:
        rng.shuffle(order)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if bucket:
        eff = np.minimum(samples[order, 1], max_len + 1)
        batches = []
        win = bucket * batch_size
        for w0 in range(0, len(order), win):
            idx = w0 + np.argsort(eff[w0:w0 + win], kind="stable")
            batches += [order[idx[i:i + batch_size]] for i in range(0, len(idx), batch_size)]
        if shuffle:
            rng.shuffle(batches)
    for rows in batches:
        users, ends = samples[rows, 0], samples[rows, 1]
        cuts = [slice(max(int(e) - max_len - 1, 0), int(e)) for e in ends]
        seqs = [sequences[u][c] for u, c in zip(users, cuts)]
        ts = None if timestamps is None else [timestamps[u][c] for u, c in zip(users, cuts)]
        yield make_jagged([s[:-1] for s in seqs], None if ts is None else [t[:-1] for t in ts],
                          targets=[s[1:] for s in seqs], users=users)


def eval_batches(examples: EvalExamples, batch_size: int, max_len: int) -> Iterator[JaggedBatch]:
    """Evaluation batches: histories truncated to their most recent ``max_len`` items, one target per user."""
    if batch_size < 1 or max_len < 1:
        raise ValueError(f"batch_size and max_len must be >= 1, got {batch_size}, {max_len}")
    for start in range(0, len(examples), batch_size):
        sl = slice(start, start + batch_size)
        hist = [h[-max_len:] for h in examples.histories[sl]]
        ts = None if examples.history_timestamps is None else [t[-max_len:] for t in examples.history_timestamps[sl]]
        yield make_jagged(hist, ts, targets=examples.targets[sl], users=examples.users[sl])


def split_request(batch: JaggedBatch, request_len: int):
    """Serving split of an evaluation batch: per user, (history prefix, request = the last ``request_len`` items).
    A user with at most ``request_len`` items gets an empty history. Returns two ``JaggedBatch`` (no targets)."""
    if request_len < 1:
        raise ValueError(f"request_len must be >= 1, got {request_len}")
    lens = batch.lengths.tolist()
    items = batch.items.numpy()
    ts = None if batch.timestamps is None else batch.timestamps.numpy()
    hist, req, hist_ts, req_ts = [], [], [], []
    for b, n in enumerate(lens):
        o = int(batch.offsets[b])
        cut = max(n - request_len, 0)
        hist.append(items[o:o + cut])
        req.append(items[o + cut:o + n])
        if ts is not None:
            hist_ts.append(ts[o:o + cut])
            req_ts.append(ts[o + cut:o + n])
    return (make_jagged(hist, hist_ts if ts is not None else None),
            make_jagged(req, req_ts if ts is not None else None))
