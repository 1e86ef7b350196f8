"""Redis and Redis Cluster stores (the ``redis`` PyPI client).

Record = 8-byte generation tag (little-endian) + the serving-state envelope. Batched round trips: ``MGET`` for
reads (on a cluster ``mget_nonatomic``, which groups the keys by hash slot: the cluster, not this code, decides
where a user lives), one non-transactional pipeline of ``SET`` for writes, and one pipeline of a compare-and-set
Lua script for ``append`` (the script compares the stored tag with the one read and sets the new record only if
they match, atomically on the key's node; a single-key script runs on a cluster too). TTL: ``SET ... PX``.

Connection failures surface as ``redis.exceptions.ConnectionError`` / ``TimeoutError`` (both
``redis.exceptions.RedisError``); callers retry (the serving replay does, with backoff).
"""
from __future__ import annotations

import struct
from typing import List, Optional, Tuple
from urllib.parse import urlparse

from .base import CacheStore, KEY_PREFIX, new_generation

_GEN = struct.Struct("<Q")
# KEYS[1] user key; ARGV[1] expected tag (8 bytes, or "" = the key must be absent); ARGV[2] record; ARGV[3] ttl ms
_CAS_LUA = """
local cur = redis.call('GETRANGE', KEYS[1], 0, 7)
if cur ~= ARGV[1] then return 0 end
if tonumber(ARGV[3]) > 0 then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
else
  redis.call('SET', KEYS[1], ARGV[2])
end
return 1
"""


def parse_redis_url(url: str):
    u = urlparse(url)
    if u.scheme not in ("redis", "redis+cluster"):
        raise ValueError(f"not a redis URL: {url!r}")
    if not u.hostname or not u.port:
        raise ValueError(f"redis URL needs host:port, got {url!r}")
    return u.scheme == "redis+cluster", u.hostname, u.port


class RedisStore(CacheStore):
    def __init__(self, url: str, ttl: Optional[float] = None, max_rounds: int = 200, socket_timeout: float = 5.0):
        super().__init__(ttl=ttl, max_rounds=max_rounds)
        import redis
        self.cluster, host, port = parse_redis_url(url)
        self.url = url
        kw = dict(socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout)
        if self.cluster:
            from redis.cluster import RedisCluster
            self.r = RedisCluster(host=host, port=port, **kw)
        else:
            # no silent client-side retries: a failed call surfaces, so the caller retries it and reports it
            from redis.backoff import NoBackoff
            from redis.retry import Retry
            self.r = redis.Redis(host=host, port=port, retry=Retry(NoBackoff(), 0), **kw)
        self._cas_script = self.r.register_script(_CAS_LUA)

    def close(self) -> None:
        self.r.close()

    def _ttl_ms(self) -> int:
        return 0 if self.ttl is None else max(1, int(self.ttl * 1000))

    @staticmethod
    def _split(rec) -> Optional[Tuple[int, bytes]]:
        if rec is None:
            return None
        if len(rec) < 8:
            return (0, b"")                     # fails the envelope check: reported as corrupt, never decoded
        return _GEN.unpack_from(rec, 0)[0], bytes(rec[8:])

    def _read(self, keys: List[str]):
        if not keys:
            return []
        recs = self.r.mget_nonatomic(keys) if self.cluster else self.r.mget(keys)
        return [self._split(r) for r in recs]

    def _write(self, keys, blobs) -> None:
        ttl = self._ttl_ms()
        pipe = self.r.pipeline(transaction=False)
        for k, b in zip(keys, blobs):
            pipe.set(k, _GEN.pack(new_generation()) + b, px=ttl or None)
        pipe.execute()

    def _cas(self, keys, expected, blobs) -> List[bool]:
        ttl = self._ttl_ms()
        args = [[b"" if want == 0 else _GEN.pack(want), _GEN.pack(new_generation()) + b, ttl]
                for want, b in zip(expected, blobs)]
        if not self.cluster:
            pipe = self.r.pipeline(transaction=False)
            for k, a in zip(keys, args):
                self._cas_script(keys=[k], args=a, client=pipe)
            return [bool(x) for x in pipe.execute()]
        # a cluster pipeline refuses scripts: one plain pipeline per node, holding only keys whose slot that node
        # serves (the cluster's slot map, as the client knows it; a moved slot raises and the caller retries)
        by_node = {}
        for i, k in enumerate(keys):
            node = self.r.get_node_from_key(k)
            by_node.setdefault(node.name, (node, []))[1].append(i)
        ok = [False] * len(keys)
        for node, idx in by_node.values():
            conn = self.r.get_redis_connection(node)
            pipe = conn.pipeline(transaction=False)
            script = conn.register_script(_CAS_LUA)
            for i in idx:
                script(keys=[keys[i]], args=args[i], client=pipe)
            for i, x in zip(idx, pipe.execute()):
                ok[i] = bool(x)
        return ok

    def _delete(self, keys) -> None:
        pipe = self.r.pipeline(transaction=False)
        for k in keys:
            pipe.delete(k)
        pipe.execute()

    def _scan(self) -> List[str]:
        out = []
        for k in self.r.scan_iter(match=KEY_PREFIX + "*", count=1000):
            out.append(k.decode() if isinstance(k, bytes) else k)
        return out

    def flush(self) -> None:
        """Delete every user entry (tests and benchmarks)."""
        keys = self._scan()
        for i in range(0, len(keys), 1000):
            self._delete(keys[i:i + 1000])
