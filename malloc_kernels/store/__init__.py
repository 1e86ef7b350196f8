"""Per-user serving states in a key-value store: ``open_store(url)`` -> ``CacheStore``.

``url``: a filesystem path (the embedded SQLite default, no server: a directory gets ``malloc_store.sqlite3``
inside it), ``redis://host:port`` (one Redis server) or ``redis+cluster://host:port`` (any node of a Redis
Cluster). Options: ``ttl`` seconds (None = never expire), ``max_rounds`` of compare-and-set retries for
``append``; ``sqlite:`` also takes ``sync="normal"|"full"``.

    store = open_store("serving_state/")             # or "redis://127.0.0.1:6379", "redis+cluster://127.0.0.1:7000"
    store.put_many(users, caches)                   # caches: one KVCache or a model's per-layer list, B users
    caches = store.get_many(users)                  # batched, CRC-checked, same form
    store.append(users, keys, values, timestamps=t, stats=stats)   # no lost updates across processes
"""
from __future__ import annotations

from .base import CacheStore, CorruptEntryError, StoreConflictError  # noqa: F401


def open_store(url, **options) -> CacheStore:
    """Open the store at ``url`` (see the module docstring)."""
    if not isinstance(url, (str, bytes)) and not hasattr(url, "__fspath__"):
        raise TypeError(f"url must be a path or a redis URL string, got {type(url).__name__}")
    text = str(url) if not isinstance(url, bytes) else url.decode()
    if text.startswith(("redis://", "redis+cluster://")):
        from .redis_store import RedisStore
        return RedisStore(text, **options)
    if "://" in text:
        raise ValueError(f"unsupported store URL {text!r}: use a filesystem path, redis://host:port or "
                         f"redis+cluster://host:port")
    if text.startswith("sqlite:"):
        text = text[len("sqlite:"):]
    if not text:
        raise ValueError("store path is empty")
    from .sqlite import SQLiteStore
    return SQLiteStore(text, **options)
