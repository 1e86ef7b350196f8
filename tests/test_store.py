"""malloc_kernels.store on every backend: the embedded SQLite file, a real redis-server and a real 3-node Redis
Cluster (started by the session fixtures on 127.0.0.1). Round trips are bit-exact (through ``to_bytes``), every
read is CRC-checked, corrupt entries are reported and never decoded, concurrent appenders lose nothing, TTL expires
entries, and the embedded store survives a process restart (it is a file)."""
import struct
import subprocess
import sys
import time
import uuid

import pytest
import torch

import malloc_kernels as mk
from malloc_kernels.cache.envelope import state_from_bytes, state_to_bytes
from malloc_kernels.store import CorruptEntryError, open_store
from malloc_kernels.store.stress import run_concurrent_appends

H, D = 2, 16


@pytest.fixture(params=["sqlite", "redis", "cluster"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "store")
    if request.param == "redis":
        return request.getfixturevalue("redis_server").url
    return request.getfixturevalue("redis_cluster").url


def users_of(n):
    tag = uuid.uuid4().hex[:6]       # session-scoped servers: every test uses its own user ids
    return [f"{tag}-{i}" for i in range(n)]


def state(B, N=40, seed=0, methods=("kivi4", "h2o+int8")):
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(B, H, N, D, generator=g), torch.randn(B, H, N, D, generator=g)
    lengths = torch.randint(1, N + 1, (B,), generator=g)
    ts = torch.randint(0, 10 ** 9, (B, N), generator=g).sort(1).values
    out = []
    for m in methods:
        kw = dict(budget=12, stats=torch.rand(B, H, N, generator=g)) if m.startswith("h2o") else {}
        out.append(mk.compress(k, v, m, timestamps=ts, lengths=lengths, **kw))
    return out


def same_state(a, b, pairs):
    for la, lb in zip(a, b):
        for i, j in pairs:
            assert la.to_bytes(i) == lb.to_bytes(j)
            assert la.policy == lb.policy
            if la.mass is not None:
                L = int(la.length[i].max())
                assert torch.equal(la.mass[i, :, :L], lb.mass[j, :, :L])


def test_round_trip_put_get_many(store_url):
    users = users_of(37)
    s = state(37)
    with open_store(store_url) as st:
        written = st.put_many(users, s)
        assert written > 0
        got = st.get_many(users[::-1])
    same_state(s, got, [(i, 36 - i) for i in range(37)])


def test_single_cache_state_and_missing_users(store_url):
    users = users_of(3)
    c = state(3, methods=("int4",))[0]
    with open_store(store_url) as st:
        st.put_many(users, c)
        got = st.get_many(users)
        assert isinstance(got, mk.KVCache)
        same_state([c], [got], [(i, i) for i in range(3)])
        with pytest.raises(KeyError):
            st.get_many(users + ["nobody-" + uuid.uuid4().hex])


def test_corrupt_entry_is_reported_never_served(store_url):
    users = users_of(4)
    with open_store(store_url) as st:
        st.put_many(users, state(4))
        blob = bytearray(st.get_raw([users[2]])[0])
        blob[len(blob) // 2] ^= 0x10
        st.put_raw([users[2]], [bytes(blob)])
        st.put_raw([users[3]], [b"junk"])
        with pytest.raises(CorruptEntryError) as e:
            st.get_many(users)
        assert set(e.value.users) == {users[2], users[3]}
        states, corrupt = st.get_entries(users)
        assert states[2] is None and states[3] is None and states[0] is not None
        assert "CRC" in corrupt[users[2]]


def test_append_through_the_store_matches_append_in_memory(store_url):
    users = users_of(5)
    s = state(5, methods=("kivi4",))
    s.append(mk.compress(torch.randn(5, H, 40, D), torch.randn(5, H, 40, D), "recent", budget=10,
                       timestamps=torch.arange(40) * 100))
    k, v = torch.randn(5, H, 3, D), torch.randn(5, H, 3, D)
    t = torch.full((5, 3), 2 * 10 ** 9)
    with open_store(store_url) as st:
        st.put_many(users, s)
        out = st.append(users, [k, k], [v, v], timestamps=t)
        got = st.get_many(users)
    want = [c.append(k, v, timestamps=t) for c in s]
    same_state(want, got, [(i, i) for i in range(5)])
    same_state(want, out, [(i, i) for i in range(5)])


def test_ttl_expires_entries(store_url):
    users = users_of(2)
    with open_store(store_url, ttl=0.3) as st:
        st.put_many(users, state(2))
        assert st.get_entries(users)[0][0] is not None
        time.sleep(0.6)
        states, _ = st.get_entries(users)
        assert states == [None, None]


def test_concurrent_appender_processes_lose_nothing(tmp_path, redis_server, redis_cluster):
    urls = [str(tmp_path / "store"), redis_server.url, redis_cluster.url]
    info = run_concurrent_appends(urls, users_of(4), writers=3, appends=20)
    for url in urls:
        assert info[url]["lost"] == 0 and info[url]["acknowledged"] == 60


@pytest.mark.slow
def test_concurrent_appenders_8x1000_on_10_users(tmp_path, redis_server, redis_cluster):
    urls = [str(tmp_path / "store"), redis_server.url, redis_cluster.url]
    info = run_concurrent_appends(urls, users_of(10), writers=8, appends=1000, timeout=2400)
    print(info)
    for url in urls:
        assert info[url]["lost"] == 0 and info[url]["acknowledged"] == 8000


@pytest.mark.slow
def test_round_trip_10000_users(store_url):
    users = users_of(10000)
    s = state(10000, N=24, methods=("int8", "kivi4"))
    with open_store(store_url) as st:
        st.put_many(users, s)
        got = st.get_many(users)
    same_state(s, got, [(i, i) for i in range(0, 10000, 97)])
    assert all(torch.equal(a.original_length, b.original_length) for a, b in zip(s, got))


def test_embedded_store_survives_a_process_restart(tmp_path):
    path = str(tmp_path / "durable")
    users = users_of(3)
    s = state(3)
    with open_store(path) as st:
        st.put_many(users, s)
    code = ("import sys, malloc_kernels as mk; from malloc_kernels.store import open_store;"
            f"st = open_store({path!r}); got = st.get_many({users!r});"
            "sys.stdout.buffer.write(b''.join(g.to_bytes(i) for g in got for i in range(3)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120, check=True).stdout
    assert out == b"".join(c.to_bytes(i) for c in s for i in range(3))


def test_envelope_is_versioned_and_crc_checked():
    s = state(2)
    b = state_to_bytes(s, 1)
    back = state_from_bytes(b)
    same_state(s, back, [(1, 0)])
    with pytest.raises(ValueError, match="CRC"):
        state_from_bytes(b[:-1] + bytes([b[-1] ^ 1]))
    with pytest.raises(ValueError, match="version"):
        state_from_bytes(b[:4] + struct.pack("<H", 9) + b[6:])
    with pytest.raises(ValueError, match="size"):
        state_from_bytes(b + b"\0")
    with pytest.raises(ValueError, match="magic"):
        state_from_bytes(b"XXXX" + b[4:])


def test_open_store_rejects_unknown_urls(tmp_path):
    with pytest.raises(ValueError, match="unsupported store URL"):
        open_store("memcached://127.0.0.1:1")
    with pytest.raises(ValueError, match="ttl"):
        open_store(str(tmp_path / "x"), ttl=-1)
    with pytest.raises(TypeError):
        open_store(12)
