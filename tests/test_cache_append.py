"""KVCache.append per policy family: bit-exact equality with ``compress`` of the whole history where the online
form equals the offline one (compared through ``to_bytes``, which covers every stored byte), invariants where the
policy is inherently online (budget held, original positions kept, counts sum to the tokens seen, newest kept),
serving stats feeding the scoring policies, and validation of what is appended."""
import pytest
import torch

import malloc_kernels as mk
from malloc_kernels.core.policy_spec import PolicySpec
from malloc_kernels.policies.online import stats_window_for

B, H, HQ, D = 2, 2, 4, 16


def history(N, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, H, N, D, generator=g, dtype=dtype)
    v = torch.randn(B, H, N, D, generator=g, dtype=dtype)
    ts = (torch.arange(N) * 7 + 1000)[None].expand(B, N).contiguous()
    return k, v, ts


def same_bytes(a, b):
    return all(a.to_bytes(u) == b.to_bytes(u) for u in range(a.batch_size))


def grow(method, n0, steps, N=120, **kw):
    """(cache built by compress(first n0) then appended in ``steps``, compress of the whole prefix)."""
    k, v, ts = history(N)
    c = mk.compress(k[:, :, :n0], v[:, :, :n0], method, timestamps=ts[:, :n0], **kw)
    a = n0
    for m in steps:
        c = c.append(k[:, :, a:a + m], v[:, :, a:a + m], timestamps=ts[:, a:a + m])
        a += m
    return c, mk.compress(k[:, :, :a], v[:, :, :a], method, timestamps=ts[:, :a], **kw)


# ---- exact families ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,kw,n0,steps", [
    ("none", {}, 9, [1, 17, 5]),
    ("int8", {}, 9, [1, 17, 5]),
    ("fp8", {}, 9, [1, 17, 5]),
    ("int4", dict(k_axis="token", group_size=8), 9, [1, 17, 5]),
    ("int4", {}, 32, [8, 16, 8]),            # channel-axis key groups: exact at a group boundary
    ("int2", {}, 16, [16, 1, 15, 32]),
    ("kivi4", {}, 10, [1, 5, 7, 30, 40]),
    ("kivi2", dict(residual=8, group_size=8), 3, [1, 17, 2, 33]),
    ("recent", dict(budget=16), 10, [1, 5, 7, 30]),
    ("streaming", dict(budget=16, sinks=3), 10, [1, 5, 7, 30]),
    ("random", dict(budget=16, seed=3), 10, [1, 5, 7, 30]),
    ("chunk", dict(chunk=4), 8, [4, 8, 16]),
])
def test_append_equals_compress_of_the_whole_history(method, kw, n0, steps):
    c, full = grow(method, n0, steps, **kw)
    assert same_bytes(c, full), method
    assert c.original_length.tolist() == [n0 + sum(steps)] * B
    assert c.policy == full.policy and c.policy.method == method


def test_plain_int4_between_group_boundaries_keeps_the_partial_group_full_precision():
    c, full = grow("int4", 32, [8])            # 40 entries: 32 quantized, 8 in the residual
    assert c.length.tolist() == [[32, 32]] * B and c.residual.length.tolist() == [[8, 8]] * B
    k, v, _ = history(120)
    ck, cv = c.residual.k[..., :8, :], c.residual.v[..., :8, :]
    assert torch.equal(ck, k[:, :, 32:40]) and torch.equal(cv, v[:, :, 32:40])
    # a compress()-built partial group moves back to the residual as its dequantized values, then flushes
    c2, _ = grow("int4", 40, [24])
    assert c2.length.tolist() == [[64, 64]] * B and c2.residual is None
    dk, _ = c2.dequantize(torch.float64)
    assert (dk[:, :, :64] - k[:, :, :64].double()).abs().max() < 0.5


# ---- scoring policies, fed by the serving attention call -----------------------------------------------------------
def serve_steps(method, n0, steps, N=160, kind="softmax", **kw):
    """Compress with stats, then serve each step's tokens over the cache and append them with the call's stats."""
    k, v, ts = history(N, seed=1)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(B, HQ, N, D, generator=g)
    first = method.split("+")[0]
    window = 1 if first == "tova" else kw.get("window", 8) if first in ("snapkv", "pyramidkv") else 8
    st = mk.attention(q[:, :, :n0], k[:, :, :n0], v[:, :, :n0], is_causal=True, return_stats=True,
                      stats_window=window).stats
    c = mk.compress(k[:, :, :n0], v[:, :, :n0], method, timestamps=ts[:, :n0], stats=st, **kw)
    a = n0
    history_len = [n0]
    for m in steps:
        w = stats_window_for(c)
        res = mk.attention(q[:, :, a:a + m], k[:, :, a:a + m], v[:, :, a:a + m], cache=c, is_causal=True,
                           kind=kind, return_stats=True, stats_window=w)
        c = c.append(k[:, :, a:a + m], v[:, :, a:a + m], timestamps=ts[:, a:a + m], stats=res.stats)
        a += m
        history_len.append(a)
        yield c, a, k, v


def stored_positions(c):
    out = []
    for seg in [c] + ([c.residual] if c.residual is not None else []):
        L = seg.length
        out.append([[seg.position[b, h, :int(L[b, h])].tolist() for h in range(H)] for b in range(B)])
    return [[sorted(sum((o[b][h] for o in out), [])) for h in range(H)] for b in range(B)]


def total_stored(c):
    n = c.length.to(torch.int64)
    return n + (c.residual.length.to(torch.int64) if c.residual is not None else 0)


@pytest.mark.parametrize("method,kw,budget", [
    ("h2o", {}, 24), ("h2o", dict(window=4), 24), ("tova", {}, 20), ("snapkv", dict(window=4), 20),
    ("pyramidkv", dict(window=4, layer=1, num_layers=3), 20), ("d2o", dict(proportional=True), 20),
    ("tome", {}, 20), ("chunk", {}, 20), ("h2o+kivi4", dict(group_size=8, residual=8), 40),
    ("tova+int8", {}, 20), ("tome+int4", dict(group_size=8), 24), ("snapkv+kivi2", dict(window=4, residual=4,
                                                                                          group_size=8), 36),
])
def test_online_policies_hold_budget_positions_and_counts(method, kw, budget):
    k_all = None
    for c, seen, k, v in serve_steps(method, 30, [1, 7, 3, 17, 1, 40], budget=budget, **kw):
        k_all = k
        n = total_stored(c)
        cap = budget
        if method.startswith("pyramidkv"):
            cap = budget * 3                           # a layer's pyramid budget is at most num_layers x the mean
        assert int(n.max()) <= cap, (method, n.tolist())
        assert c.original_length.tolist() == [seen] * B
        pos = stored_positions(c)
        for b in range(B):
            for h in range(H):
                p = pos[b][h]
                assert len(set(p)) == len(p) and all(0 <= x < seen for x in p)
                if not method.startswith("tova"):      # TOVA forces no window: the newest may be the one evicted
                    assert p[-1] == seen - 1, "the newest entry is always kept"
        if c.mass is not None:
            assert torch.isfinite(c.mass).all() and (c.mass >= 0).all()
        counts = c.count
        if method in ("tome", "chunk", "tome+int4") or method == "d2o":
            tot = counts.sum((-1,)) + (c.residual.count.sum(-1) if c.residual is not None and
                                       c.residual.count is not None else 0)
            if method == "d2o":
                assert (tot <= seen + 1e-3).all()
            else:
                assert torch.allclose(tot, torch.full_like(tot, float(seen))), (method, tot)
    assert c.policy.method == method and k_all is not None


def test_h2o_accumulates_the_serving_mass_and_evicts_the_lightest():
    gen = serve_steps("h2o", 20, [1, 1], budget=16, window=2)
    c1, _, k, v = next(gen)
    before = c1.mass.clone()
    # serve one more token by hand and check the accumulation rule before eviction
    q = torch.randn(B, HQ, 1, D, generator=torch.Generator().manual_seed(9))
    kn, vn = torch.randn(B, H, 1, D), torch.randn(B, H, 1, D)
    res = mk.attention(q, kn, vn, cache=c1, is_causal=True, return_stats=True)
    c2 = c1.append(kn, vn, timestamps=torch.full((B, 1), 10 ** 6), stats=res.stats)
    acc = before.double() + res.stats.cache_mass.double()
    for b in range(B):
        for h in range(H):
            kept = set(c2.position[b, h, :16].tolist())
            old = c1.position[b, h, :16].tolist()
            dropped = [i for i, p in enumerate(old) if p not in kept]
            assert len(dropped) == 1
            # the dropped entry is the lightest of the non-window candidates (window 2: the two newest are forced)
            cand = sorted(range(16), key=lambda i: old[i])[:-1]
            lightest = min(cand, key=lambda i: (acc[b, h, i].item(), old[i]))
            assert dropped[0] == lightest
            j = c2.position[b, h].tolist().index(old[cand[0]]) if old[cand[0]] in kept else None
            if j is not None:
                assert torch.isclose(c2.mass[b, h, j].double(), acc[b, h, cand[0]], rtol=1e-6)


def test_scoring_policy_without_stats_is_refused():
    c = next(serve_steps("h2o", 20, [1], budget=16))[0]
    with pytest.raises(ValueError, match="stats"):
        c.append(torch.randn(B, H, 1, D), torch.randn(B, H, 1, D), timestamps=torch.full((B, 1), 10 ** 6))


def test_ratio_budget_follows_the_grown_history():
    k, v, ts = history(100)
    c = mk.compress(k[:, :, :40], v[:, :, :40], "recent", budget=0.25, timestamps=ts[:, :40])
    assert c.length.tolist() == [[10, 10]] * B
    c = c.append(k[:, :, 40:100], v[:, :, 40:100], timestamps=ts[:, 40:100])
    assert c.length.tolist() == [[25, 25]] * B            # floor(0.25 * 100), all of them recent
    assert c.position[0, 0, :25].tolist() == list(range(75, 100))


def test_bytes_budget_is_held_online():
    k, v, ts = history(100)
    budget = mk.policies.Budget(bytes=2500)
    c = mk.compress(k[:, :, :30], v[:, :, :30], "recent", budget=budget, timestamps=ts[:, :30])
    for a in range(30, 100, 10):
        c = c.append(k[:, :, a:a + 10], v[:, :, a:a + 10], timestamps=ts[:, a:a + 10])
        assert int(c.nbytes_per_user().max()) <= 2500
    assert c.position[0, 0, int(c.length[0, 0]) - 1] == 99


def test_ragged_batched_append_and_jagged_form():
    k, v, ts = history(60)
    c0 = mk.compress(k[:, :, :20], v[:, :, :20], "kivi4", group_size=8, residual=8, timestamps=ts[:, :20])
    lengths = torch.tensor([3, 0])
    c = c0.append(k[:, :, 20:25], v[:, :, 20:25], timestamps=ts[:, 20:25], lengths=lengths)
    assert c.original_length.tolist() == [23, 20]
    alone = mk.compress(k[:1, :, :23], v[:1, :, :23], "kivi4", group_size=8, residual=8, timestamps=ts[:1, :23])
    assert c.to_bytes(0) == alone.to_bytes(0) and c.to_bytes(1) == c0.to_bytes(1)
    # the same append in jagged form
    offsets = torch.tensor([0, 3, 3])
    kj = k[0, :, 20:23].transpose(0, 1).contiguous()
    vj = v[0, :, 20:23].transpose(0, 1).contiguous()
    cj = c0.append(kj, vj, timestamps=ts[0, 20:23], offsets=offsets)
    assert same_bytes(c, cj)


def test_append_keeps_original_positions_and_explicit_positions_work():
    k, v, ts = history(40)
    pos = torch.tensor([0, 5, 9, 30])
    c = mk.compress(k[:, :, :4], v[:, :, :4], "none", positions=pos, timestamps=ts[:, :4])
    with pytest.raises(ValueError, match="after every stored"):    # the default would continue at 4 < 30
        c.append(k[:, :, 4:6], v[:, :, 4:6], timestamps=ts[:, 4:6])
    c = c.append(k[:, :, 4:6], v[:, :, 4:6], positions=torch.tensor([31, 40]), timestamps=ts[:, 4:6])
    assert c.position[0, 0].tolist() == [0, 5, 9, 30, 31, 40] and c.original_length.tolist() == [6, 6]
    assert c.timestamp[1, 1].tolist() == ts[1, :6].tolist()


def test_append_validation_names_the_argument():
    k, v, ts = history(40)
    c = mk.compress(k[:, :, :10], v[:, :, :10], "recent", budget=8, timestamps=ts[:, :10])
    kn, vn = k[:, :, 10:12], v[:, :, 10:12]
    t = ts[:, 10:12]
    with pytest.raises(ValueError, match="NaN or infinite"):
        c.append(torch.full_like(kn, float("nan")), vn, timestamps=t)
    with pytest.raises(ValueError, match="after every stored"):
        c.append(kn, vn, positions=torch.tensor([3, 4]), timestamps=t)
    with pytest.raises(ValueError, match="strictly increasing"):
        c.append(kn, vn, positions=torch.tensor([20, 20]), timestamps=t)
    with pytest.raises(ValueError, match="int32"):
        c.append(kn, vn, positions=torch.tensor([2 ** 31, 2 ** 31 + 1]), timestamps=t)
    with pytest.raises(ValueError, match="timestamps"):
        c.append(kn, vn)
    with pytest.raises(ValueError, match="Hkv"):
        c.append(kn[:, :1], vn[:, :1], timestamps=t)
    with pytest.raises(TypeError, match="floating"):
        c.append(kn.to(torch.int32), vn.to(torch.int32), timestamps=t)
    with pytest.raises(TypeError, match="integer"):
        c.append(kn, vn, timestamps=t.double())
    with pytest.raises(ValueError, match="int64"):
        c.append(kn, vn, timestamps=[[2 ** 70, 2 ** 70]] * B)
    with pytest.raises(ValueError, match="counts"):
        c.append(kn, vn, timestamps=t, counts=torch.full((B, 2), -1.0))
    with pytest.raises(ValueError, match="lengths"):
        c.append(kn, vn, timestamps=t, lengths=torch.tensor([3, 0]))
    q = mk.compress(k[:, :, :10], v[:, :, :10], "int8", timestamps=ts[:, :10]).replace(policy=None)
    with pytest.raises(ValueError, match="policy"):
        q.append(kn, vn, timestamps=t)


def test_policy_spec_round_trips_as_json():
    c = mk.compress(*history(20)[:2], "h2o+kivi4", budget=mk.policies.Budget(bytes=9000),
                    stats=torch.rand(B, H, 20), window=3)
    spec = c.policy
    assert spec.method == "h2o+kivi4" and spec.budget == ("bytes", 9000) and dict(spec.params)["window"] == 3
    assert PolicySpec.from_json(spec.to_json()) == spec
    with pytest.raises(ValueError):
        PolicySpec.from_json('{"method": "h2o"}')


def test_intactkv_keeps_every_token_and_its_pivots_full_precision():
    k, v, ts = history(120)
    c = mk.compress(k[:, :, :70], v[:, :, :70], "intactkv4", group_size=8, residual=8, sinks=1, pivots=3,
                    stats=torch.rand(B, H, 70, generator=torch.Generator().manual_seed(5)), timestamps=ts[:, :70])
    # the pivots compress chose among the entries older than its newest quantized one stay full precision for
    # good (pivots in the unquantized tail are not told apart from the tail online: documented in online.py)
    newest_q = c.position[..., :int(c.length.max())].amax(-1)
    pivots0 = {(b, h): {p for p in c.residual.position[b, h, :int(c.residual.length[b, h])].tolist()
                        if p < int(newest_q[b, h])} for b in range(B) for h in range(H)}
    assert any(len(p) > 1 for p in pivots0.values())
    a = 70
    for m in (1, 9, 3, 20, 17):
        c = c.append(k[:, :, a:a + m], v[:, :, a:a + m], timestamps=ts[:, a:a + m])
        a += m
        assert (c.length % 8 == 0).all() and torch.equal(total_stored(c), torch.full((B, H), a))
        assert stored_positions(c) == [[list(range(a))] * H] * B          # keeps every token
        for (b, h), piv in pivots0.items():
            res = set(c.residual.position[b, h, :int(c.residual.length[b, h])].tolist())
            assert 0 in res and piv <= res, "sinks and pivots stay full precision"
        assert int((c.residual.length - 3 - 1).max()) < 8 + 8             # window + at most one partial group


def test_stats_shape_rules_are_device_asserts():
    """The scoring policies' stats checks that depend on the appended lengths compare against the static stats
    shape on the device (no host read of the lengths): a jagged ``key_mass`` equals the dense one, a wrong total,
    a too-short L or a non-finite mass is still a ValueError naming the field."""
    import dataclasses
    from host_sync_watch import Watch
    from malloc_kernels.policies.online import _stats_masses, check_new_entries
    c1 = next(serve_steps("h2o", 20, [1], budget=16, window=2))[0]
    q = torch.randn(B, HQ, 1, D, generator=torch.Generator().manual_seed(9))
    kn, vn = torch.randn(B, H, 1, D), torch.randn(B, H, 1, D)
    st = mk.attention(q, kn, vn, cache=c1, is_causal=True, return_stats=True).stats
    ts = torch.full((B, 1), 10 ** 6)
    jag = dataclasses.replace(st, key_mass=st.key_mass.movedim(1, 2).reshape(B, H))
    assert same_bytes(c1.append(kn, vn, timestamps=ts, stats=jag), c1.append(kn, vn, timestamps=ts, stats=st))
    new = check_new_entries(c1, kn, vn, timestamps=ts)
    with Watch() as w:
        _stats_masses(c1, new, jag, "total", None, "h2o")
    assert "_local_scalar_dense" not in w.seen and "_assert_async" in w.seen
    bad = [(dataclasses.replace(st, key_mass=st.key_mass.movedim(1, 2).reshape(B, H)[:1]),
            r"jagged stats\.key_mass must be \[total appended, Hkv=2\]"),
           (dataclasses.replace(st, key_mass=st.key_mass[..., :0]), r"L at least every user's appended count"),
           (dataclasses.replace(st, cache_mass=st.cache_mass * float("nan")), "non-finite")]
    for stats, msg in bad:
        with pytest.raises(ValueError, match=msg):
            c1.append(kn, vn, timestamps=ts, stats=stats)
