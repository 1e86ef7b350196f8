"""``CacheStore``: per-user serving states in a key-value store, with batched round trips and no lost updates.

One entry per user holds the user's whole serving state (one ``KVCache`` or a model's list of per-layer caches)
as the versioned, CRC-checked envelope of ``cache/envelope.py``. Every read verifies the CRC of every entry; an
entry that fails is never decoded into a cache (``CorruptEntryError``, or reported per user by ``get_entries``).

Writes carry a 63-bit random generation tag. ``append`` is optimistic: read the entries and their tags, append in
Python (the policy's maintenance, ``KVCache.append``), then compare-and-set each user (the write lands only if the
tag is still the one read); users whose tag moved are re-read and redone, with jittered exponential backoff and a
bounded number of rounds. Two processes appending to the same user therefore both land, in some order.

Backends implement four primitives over string keys: ``_read(keys) -> [(gen, envelope) | None]``,
``_write(keys, envelopes)`` (unconditional), ``_cas(keys, expected_gens, envelopes) -> [bool]`` (expected 0 =
the key must be absent), ``_delete(keys)``, plus ``_scan()`` (every user key) and ``close()``.
"""
from __future__ import annotations

import abc
import random
import secrets
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..cache.batch import stack_states, state_layers
from ..cache.envelope import state_from_bytes, state_to_bytes
from ..cache.types import KVCache

KEY_PREFIX = "mkv:"


class CorruptEntryError(ValueError):
    """A stored entry failed its CRC or format checks; ``users`` lists the affected users."""

    def __init__(self, users, reasons):
        self.users, self.reasons = list(users), list(reasons)
        super().__init__(f"{len(self.users)} stored serving state(s) failed verification: " +
                         "; ".join(f"user {u!r}: {r}" for u, r in zip(self.users[:5], self.reasons[:5])))


class StoreConflictError(RuntimeError):
    """``append`` gave up after its bounded number of compare-and-set rounds."""


def new_generation() -> int:
    return secrets.randbits(63) | 1


def _user_key(u) -> str:
    if isinstance(u, bool) or not isinstance(u, (int, str)):
        raise TypeError(f"user ids must be int or str, got {type(u).__name__}")
    return f"{KEY_PREFIX}{u}"


def _check_users(users) -> List:
    users = list(users)
    if len(set(users)) != len(users):
        raise ValueError("user ids in one call must be distinct")
    for u in users:
        _user_key(u)
    return users


class CacheStore(abc.ABC):
    """Abstract store; ``open_store(url)`` returns a concrete one. ``ttl`` (seconds, None = never) applies to every
    write. ``max_rounds`` bounds the compare-and-set retries of ``append``."""

    url = ""

    def __init__(self, ttl: Optional[float] = None, max_rounds: int = 200):
        if ttl is not None and not ttl > 0:
            raise ValueError(f"ttl must be > 0 seconds or None, got {ttl!r}")
        if isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or max_rounds < 1:
            raise ValueError(f"max_rounds must be an int >= 1, got {max_rounds!r}")
        self.ttl = ttl
        self.max_rounds = max_rounds
        self.stats = {"conflicts": 0, "rounds": 0}

    # ---- backend primitives -------------------------------------------------------------------------------------
    @abc.abstractmethod
    def _read(self, keys: List[str]) -> List[Optional[Tuple[int, bytes]]]:
        """(version, blob) per key, None where absent."""

    @abc.abstractmethod
    def _write(self, keys: List[str], blobs: List[bytes]) -> None:
        """Unconditional batched write."""

    @abc.abstractmethod
    def _cas(self, keys: List[str], expected: List[int], blobs: List[bytes]) -> List[bool]:
        """Per key: write only if its stored version is still ``expected``; whether it did."""

    @abc.abstractmethod
    def _delete(self, keys: List[str]) -> None:
        """Remove the keys."""

    @abc.abstractmethod
    def _scan(self) -> List[str]:
        """Every key the store holds."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- reads --------------------------------------------------------------------------------------------------
    def get_raw(self, users) -> List[Optional[bytes]]:
        """The stored envelopes (unverified) of ``users``; None where absent. For inspection and repair tools."""
        got = self._read([_user_key(u) for u in _check_users(users)])
        return [None if g is None else g[1] for g in got]

    def get_entries(self, users, device=None):
        """Per user: its serving state (B = 1), or None when absent or corrupt; plus ``{user: reason}`` of the
        corrupt ones. Every entry's envelope and per-layer CRCs are verified before anything is decoded."""
        users = _check_users(users)
        got = self._read([_user_key(u) for u in users])
        states, corrupt = [], {}
        for u, g in zip(users, got):
            if g is None:
                states.append(None)
                continue
            try:
                states.append(state_from_bytes(g[1], device=device))
            except ValueError as e:
                corrupt[u] = str(e)
                states.append(None)
        return states, corrupt

    def get_many(self, users, device=None):
        """The serving state of ``users`` batched in their order (one KVCache of B users, or the per-layer list).

        Raises ``KeyError`` naming absent users and ``CorruptEntryError`` naming users whose entry fails its checks.
        """
        users = _check_users(users)
        if not users:
            raise ValueError("get_many needs at least one user")
        states, corrupt = self.get_entries(users, device=device)
        if corrupt:
            raise CorruptEntryError(list(corrupt), list(corrupt.values()))
        missing = [u for u, s in zip(users, states) if s is None]
        if missing:
            raise KeyError(f"no stored serving state for user(s) {missing[:10]}")
        return stack_states(states)

    def users(self) -> List[str]:
        """Every stored user id (as a string)."""
        return sorted(k[len(KEY_PREFIX):] for k in self._scan())

    # ---- writes -------------------------------------------------------------------------------------------------
    def put_many(self, users, state) -> int:
        """Store user i of ``state`` (a B-user KVCache or per-layer list) under ``users[i]``; returns bytes written."""
        users = _check_users(users)
        layers = state_layers(state)
        if layers[0].batch_size != len(users):
            raise ValueError(f"state holds {layers[0].batch_size} users but {len(users)} user ids were given")
        blobs = [state_to_bytes(state, i) for i in range(len(users))]
        self._write([_user_key(u) for u in users], blobs)
        return sum(map(len, blobs))

    def put_raw(self, users, blobs) -> None:
        """Store arbitrary bytes as users' entries, unverified (repair tools and fault-injection tests)."""
        users = _check_users(users)
        self._write([_user_key(u) for u in users], [bytes(b) for b in blobs])

    def delete_many(self, users) -> None:
        self._delete([_user_key(u) for u in _check_users(users)])

    def append(self, users, key, value, positions=None, timestamps=None, *, lengths=None, stats=None,
               device=None):
        """Append new entries to stored users without losing concurrent updates; returns the new batched state.

        key/value ``[B, Hkv, L, D]`` (positions/timestamps ``[B, L]`` or ``[B, Hkv, L]``, lengths ``[B]``: batch-first,
        as in ``KVCache.append``) for a one-KVCache state, or lists of per-layer key/value (and ``stats``, dense
        ``AttentionStats``, None entries allowed) for a per-layer state.
        Users must exist (``KeyError``). Raises ``StoreConflictError`` after ``max_rounds`` lost races.
        """
        users = _check_users(users)
        keys = [_user_key(u) for u in users]
        todo = list(range(len(users)))
        result: Dict[int, object] = {}
        for rnd in range(self.max_rounds):
            self.stats["rounds"] += 1
            got = self._read([keys[i] for i in todo])
            states, gens = [], []
            for i, g in zip(todo, got):
                if g is None:
                    raise KeyError(f"no stored serving state for user {users[i]!r}")
                try:
                    states.append(state_from_bytes(g[1], device=device))
                except ValueError as e:
                    raise CorruptEntryError([users[i]], [str(e)]) from None
                gens.append(g[0])
            sub = torch.tensor(todo, dtype=torch.int64)
            grown = _append_state(stack_states(states), sub, key, value, positions, timestamps, lengths, stats)
            blobs = [state_to_bytes(grown, j) for j in range(len(todo))]
            ok = self._cas([keys[i] for i in todo], gens, blobs)
            if rnd == 0 and all(ok):
                return grown
            left = []
            for j, (i, done) in enumerate(zip(todo, ok)):
                if done:
                    result[i] = _select_user(grown, j)
                else:
                    left.append(i)
            if not left:
                return stack_states([result[i] for i in range(len(users))])
            self.stats["conflicts"] += len(left)
            todo = left
            time.sleep(min(0.05, 0.0005 * (2 ** min(rnd, 7))) * random.random())
        raise StoreConflictError(f"append gave up after {self.max_rounds} compare-and-set rounds for "
                                 f"{len(todo)} user(s)")


def _rows(x, sub):
    """Rows ``sub`` (a batch subset) of a batch-first per-user tensor argument (None passes through)."""
    if x is None:
        return None
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise TypeError(f"store.append takes batch-first tensors ([B, ...]), got {type(x).__name__}")
    return x[sub.to(x.device)]


def _append_state(state, sub, key, value, positions, timestamps, lengths, stats):
    layers = state_layers(state)
    single = isinstance(state, KVCache)
    keys = [key] if single else list(key)
    values = [value] if single else list(value)
    stats_l = [stats] if single else (list(stats) if stats is not None else [None] * len(layers))
    if len(keys) != len(layers) or len(values) != len(layers) or len(stats_l) != len(layers):
        raise ValueError(f"append needs one key/value (and stats) per layer: {len(layers)} layers, got "
                         f"{len(keys)} keys, {len(values)} values, {len(stats_l)} stats")
    out = []
    for c, k, v, st in zip(layers, keys, values, stats_l):
        out.append(c.append(_rows(k, sub), _rows(v, sub), _rows(positions, sub), _rows(timestamps, sub),
                            lengths=_rows(lengths, sub), stats=_stats_rows(st, sub)))
    return out[0] if single else out


def _stats_rows(st, sub):
    if st is None:
        return None
    import dataclasses
    ch = {}
    for f in dataclasses.fields(st):
        t = getattr(st, f.name)
        if isinstance(t, torch.Tensor):
            if t.dim() != 3:
                raise ValueError(f"store.append needs dense per-user stats ([B, Hkv, N]); stats.{f.name} is "
                                 f"{tuple(t.shape)}")
            ch[f.name] = t[sub.to(t.device)]
    return dataclasses.replace(st, **ch)


def _select_user(state, j: int):
    from ..cache.envelope import state_from_bytes as _fb
    return _fb(state_to_bytes(state, j))


def user_keys(users: Sequence) -> List[str]:
    return [_user_key(u) for u in users]
