"""Online serving: ``serve_step`` grows every layer's cache by the request (equal to a full recompute for the native
cache), and the replay survives a real redis-server being SIGKILLed mid-replay and restarted by the test itself,
plus corrupted entries: failed calls are retried and reported, corrupt users rebuilt from their history, and every
stored entry passes its CRC and holds every acknowledged append afterwards."""
import time

import pytest
import torch

from malloc_kernels.data import load_dataset
from malloc_kernels.models.recommender import HSTU, SASRec
from malloc_kernels.serve.replay import ReplayConfig, replay_events
from malloc_kernels.serve.run import StoreFarm, initial_states, replay_once, run_fault


@pytest.mark.parametrize("arch", [HSTU, SASRec])
def test_serve_step_equals_full_recompute_for_the_native_cache(arch):
    torch.manual_seed(0)
    m = arch(60, d_model=16, n_layers=2, n_heads=2, max_len=64).eval()
    B, N = 3, 14
    items = torch.randint(1, 61, (B, N))
    ts = torch.arange(N)[None].expand(B, N) * 60 + torch.arange(B)[:, None]
    with torch.no_grad():
        caches = m.encode_history(items[:, :5], ts[:, :5])
        for t in range(5, N):
            h, caches = m.serve_step(items[:, t:t + 1], ts[:, t:t + 1], caches)
            full = m.last_hidden(items[:, :t + 1], ts[:, :t + 1])
            torch.testing.assert_close(h, full, rtol=1e-5, atol=1e-5)
    assert caches[1].original_length.tolist() == [N] * B and caches[0].policy is None


def test_serve_step_keeps_a_scoring_policy_in_budget():
    torch.manual_seed(1)
    m = HSTU(60, d_model=16, n_layers=2, n_heads=2, max_len=64).eval()
    B, N = 2, 30
    items = torch.randint(1, 61, (B, N))
    with torch.no_grad():
        caches, _ = m.encode_history(items[:, :12], method="h2o+kivi4", budget=8, return_stats=True,
                                     group_size=4, residual=2)
        for t in range(12, N):
            _, caches = m.serve_step(items[:, t:t + 1], None, caches)
    for c in caches:
        n = c.length + c.residual.length
        assert int(n.max()) <= 8 and c.original_length.tolist() == [N] * B
        assert c.residual.position[0, 0, int(c.residual.length[0, 0]) - 1] == N - 1


@pytest.fixture(scope="module")
def small_replay():
    ds = load_dataset("ml-latest-small")
    ev = replay_events(ds, 160)
    torch.manual_seed(0)
    model = HSTU(ds.n_items, d_model=16, n_layers=1, n_heads=2, max_len=64).eval()   # untrained: speed
    return ds, ev, model


def test_replay_on_the_embedded_store_verifies_every_entry(small_replay, tmp_path):
    ds, ev, model = small_replay
    cfg = ReplayConfig(events=160, batch=3, progress=False)
    init = initial_states(model, ds, ev, "int4", cfg.budget)
    from malloc_kernels.store import open_store
    store = open_store(str(tmp_path / "s"))
    row, rep = replay_once(model, ds, ev, store, "int4", cfg, 2, init)
    assert row["errors"] == 0 and row["events"] == 160
    assert row["verify"] == {"users": len(ev.first), "corrupt": 0, "missing": 0, "wrong_length": 0,
                             "examples": []}
    assert 0 < row["store_share"] < 1 and row["bytes_held"] > 0


def test_fault_redis_killed_mid_replay_and_corrupt_entries(small_replay):
    ds, ev, model = small_replay
    cfg = ReplayConfig(events=160, batch=2, progress=False, retry_seconds=60)
    farm = StoreFarm()
    t0 = time.monotonic()
    try:
        row = run_fault(model, ds, ev, farm, cfg, method="int4", workers=2, at_fraction=0.3, down_seconds=1.0,
                        corrupt_users=2)
    finally:
        farm.close()
    assert time.monotonic() - t0 < 300
    assert row["fault"]["killed_after_events"] < 160, "the server was killed mid-replay"
    assert row["failed_store_calls"] > 0, "the outage was seen and retried"
    assert row["errors"] == 0 and row["events"] == 160, row["error_messages"]
    assert sorted(row["rebuilt"]) == sorted(row["corrupted"]), "corrupt users are rebuilt, and only they"
    assert all("CRC" in r for r in row["rebuilt"].values())
    v = row["verify"]
    assert v["corrupt"] == 0 and v["missing"] == 0 and v["wrong_length"] == 0, v
