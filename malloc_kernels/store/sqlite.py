"""The embedded default store: SQLite from the standard library (no server, one file, durable).

Chosen over LMDB by measurement (``benchmarks/store_roundtrip.py``, ``benchmarks/results/store_roundtrip.md``):
LMDB's engine alone is several times faster, but a round trip is dominated by the envelope codec (the CRC-checked
per-layer encoding), where the engine is a small fraction with either; SQLite needs no extra package and its
write transactions give the compare-and-set directly.

One table ``kv(key, gen, expires, blob)``. WAL journal (readers never block the writer), ``synchronous=NORMAL``
(a committed write survives any crash of the process; ``sync="full"`` in the URL query also survives power loss),
a busy timeout so concurrent writers queue instead of failing. Compare-and-set is one ``UPDATE ... WHERE gen = ?``
(or an insert for an absent key) per user inside one ``BEGIN IMMEDIATE`` transaction per batch. A connection per
thread (sqlite3 connections are not shared across threads); each process opens its own.
"""
from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import List, Optional, Tuple

from .base import CacheStore, new_generation

DEFAULT_FILE = "malloc_store.sqlite3"
_CHUNK = 500          # keys per IN (...) query, under SQLite's bound-parameter limit


class SQLiteStore(CacheStore):
    def __init__(self, path, ttl: Optional[float] = None, max_rounds: int = 200, sync: str = "normal",
                 timeout: float = 60.0):
        super().__init__(ttl=ttl, max_rounds=max_rounds)
        p = Path(path).expanduser()
        if p.is_dir() or str(path).endswith(os.sep):
            p.mkdir(parents=True, exist_ok=True)
            p = p / DEFAULT_FILE
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
        if sync not in ("normal", "full"):
            raise ValueError(f"sync must be 'normal' or 'full', got {sync!r}")
        self.path, self.sync, self.timeout = str(p), sync, timeout
        self.url = self.path
        self._local = threading.local()
        self._conn()

    def _conn(self) -> sqlite3.Connection:
        c = getattr(self._local, "conn", None)
        if c is None:
            c = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
            c.execute("PRAGMA journal_mode=WAL")
            c.execute(f"PRAGMA synchronous={self.sync.upper()}")
            c.execute("CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, gen INTEGER NOT NULL, expires REAL, "
                      "blob BLOB NOT NULL) WITHOUT ROWID")
            self._local.conn = c
        return c

    def close(self) -> None:
        c = getattr(self._local, "conn", None)
        if c is not None:
            c.close()
            self._local.conn = None

    def _expires(self):
        return None if self.ttl is None else time.time() + self.ttl

    def _read(self, keys: List[str]) -> List[Optional[Tuple[int, bytes]]]:
        c = self._conn()
        found = {}
        now = time.time()
        for i in range(0, len(keys), _CHUNK):
            part = keys[i:i + _CHUNK]
            q = f"SELECT key, gen, expires, blob FROM kv WHERE key IN ({','.join('?' * len(part))})"
            for k, gen, exp, blob in c.execute(q, part):
                if exp is None or exp > now:
                    found[k] = (int(gen), bytes(blob))
        return [found.get(k) for k in keys]

    def _transaction(self, fn):
        c = self._conn()
        c.execute("BEGIN IMMEDIATE")
        try:
            out = fn(c)
        except BaseException:
            c.execute("ROLLBACK")
            raise
        c.execute("COMMIT")
        return out

    def _write(self, keys, blobs) -> None:
        exp = self._expires()
        rows = [(k, new_generation(), exp, sqlite3.Binary(b)) for k, b in zip(keys, blobs)]
        self._transaction(lambda c: c.executemany(
            "INSERT OR REPLACE INTO kv (key, gen, expires, blob) VALUES (?, ?, ?, ?)", rows))

    def _cas(self, keys, expected, blobs) -> List[bool]:
        exp = self._expires()

        def run(c):
            now = time.time()
            ok = []
            for k, want, b in zip(keys, expected, blobs):
                gen = new_generation()
                if want == 0:        # absent, or present but expired
                    cur = c.execute("INSERT INTO kv (key, gen, expires, blob) VALUES (?, ?, ?, ?) ON CONFLICT(key) "
                                    "DO UPDATE SET gen=excluded.gen, expires=excluded.expires, blob=excluded.blob "
                                    "WHERE kv.expires IS NOT NULL AND kv.expires <= ?",
                                    (k, gen, exp, sqlite3.Binary(b), now))
                else:
                    cur = c.execute("UPDATE kv SET gen=?, expires=?, blob=? WHERE key=? AND gen=? AND "
                                    "(expires IS NULL OR expires > ?)", (gen, exp, sqlite3.Binary(b), k, want, now))
                ok.append(cur.rowcount == 1)
            return ok
        return self._transaction(run)

    def _delete(self, keys) -> None:
        self._transaction(lambda c: c.executemany("DELETE FROM kv WHERE key = ?", [(k,) for k in keys]))

    def _scan(self) -> List[str]:
        now = time.time()
        return [k for k, exp in self._conn().execute("SELECT key, expires FROM kv") if exp is None or exp > now]
