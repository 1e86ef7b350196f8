"""Hand-checked examples: each policy keeps/merges exactly what its paper's rule says (issue 3 acceptance)."""
import math

import pytest
import torch

import malloc_kernels as mk
from malloc_kernels.core.layout import padded_to_jagged
from malloc_kernels.core.types import AttentionStats
from malloc_kernels.policies.budget import Budget
from malloc_kernels.policies.pruning import pyramid_budgets


def _kv(n=10, h=1, d=4, seed=0, b=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, n, d, generator=g, dtype=torch.float64),
            torch.randn(b, h, n, d, generator=g, dtype=torch.float64))


def _pos(cache, b=0, h=0, seg=None):
    seg = cache if seg is None else seg
    return seg.position[b, h, :int(seg.length[b, h])].tolist()


# ---- pruning -----------------------------------------------------------------------------------------------------

def test_recent_keeps_last_tokens():
    k, v = _kv()
    assert _pos(mk.compress(k, v, "recent", budget=3)) == [7, 8, 9]
    assert _pos(mk.compress(k, v, "recent", budget=0.5)) == [5, 6, 7, 8, 9]


@pytest.mark.parametrize("budget, sinks, want", [
    (6, 2, [0, 1, 6, 7, 8, 9]),
    (6, 4, [0, 1, 2, 3, 8, 9]),
    (3, 4, [0, 1, 2]),
    (5, 0, [5, 6, 7, 8, 9]),
])
def test_streaming_keeps_exactly_sinks_and_window(budget, sinks, want):
    k, v = _kv()
    assert _pos(mk.compress(k, v, "streaming", budget=budget, sinks=sinks)) == want


def test_h2o_keeps_top_accumulated_mass_plus_window():
    k, v = _kv(h=2)
    mass = torch.tensor([[[5, 0, 9, 1, 8, 0, 0, 2, 3, 4],
                          [0, 7, 0, 6, 0, 5, 1, 9, 3, 4]]], dtype=torch.float64)
    c = mk.compress(k, v, "h2o", budget=5, window=2, stats=AttentionStats(key_mass=mass))
    # window {8, 9}; heavy hitters: the 3 largest masses among 0..7
    assert _pos(c, h=0) == [0, 2, 4, 8, 9]
    assert _pos(c, h=1) == [1, 3, 7, 8, 9]        # per-head selection
    # default window = budget // 2 = 2, same answer; an int budget larger than n keeps everything
    assert _pos(mk.compress(k, v, "h2o", budget=5, stats=mass)) == [0, 2, 4, 8, 9]
    # kept entries carry their own keys/values unchanged
    c = mk.compress(k, v, "h2o", budget=5, stats=mass)
    assert torch.equal(c.k[0, 0, :5], k[0, 0, [0, 2, 4, 8, 9]])


def _snap_stats():
    n = 12
    m = torch.tensor([0.0, 0.1, 0.2, 0.3, 10.0, 0.5, 0.6, 0.7, 0.8, 100.0, 100.0, 100.0], dtype=torch.float64)
    return n, AttentionStats(key_mass=torch.zeros(1, 1, n, dtype=torch.float64), key_window_mass=m.view(1, 1, n),
                             window=3)


def test_snapkv_max_pooling_keeps_neighbours_of_a_spike():
    n, stats = _snap_stats()
    k, v = _kv(n=n)
    # prefix = slots 0..8 (window = last 3). max pool k=3 over the prefix only:
    # [0.1, 0.2, 0.3, 10, 10, 10, 0.6, 0.7, 0.8] (slot 8 does NOT see the window's 100s)
    assert _pos(mk.compress(k, v, "snapkv", budget=6, stats=stats, kernel_size=3)) == [3, 4, 5, 9, 10, 11]
    # next best: slots 7 and 8 tie at 0.8 -> the earlier one
    assert _pos(mk.compress(k, v, "snapkv", budget=7, stats=stats, kernel_size=3)) == [3, 4, 5, 7, 9, 10, 11]
    # no pooling: plain top-k of the window mass
    assert _pos(mk.compress(k, v, "snapkv", budget=6, stats=stats, kernel_size=1)) == [4, 7, 8, 9, 10, 11]


def test_snapkv_avg_pooling_matches_hand_computation():
    n, stats = _snap_stats()
    k, v = _kv(n=n)
    m = stats.key_window_mass[0, 0, :9].tolist()
    pooled = [(m[j - 1] if j else 0) + m[j] + (m[j + 1] if j < 8 else 0) for j in range(9)]
    assert pooled.index(max(pooled)) == 5
    # avg pool k=3 (zero padding counted): [0.1, 0.3, 0.6, 10.5, 10.8, 11.1, 1.8, 2.1, 1.5] / 3
    c = mk.compress(k, v, "snapkv", budget=7, stats=stats, kernel_size=3, pooling="avg")
    assert _pos(c) == [3, 4, 5, 7, 9, 10, 11]


def test_snapkv_budget_below_window_keeps_most_recent():
    n, stats = _snap_stats()
    k, v = _kv(n=n)
    assert _pos(mk.compress(k, v, "snapkv", budget=2, stats=stats)) == [10, 11]


def test_tova_keeps_top_last_query_mass():
    k, v = _kv()
    last = torch.tensor([0.3, 0.0, 0.1, 0.9, 0.2, 0.8, 0.0, 0.05, 0.4, 0.25], dtype=torch.float64).view(1, 1, 10)
    stats = AttentionStats(key_mass=torch.zeros_like(last), key_window_mass=last, window=1)
    assert _pos(mk.compress(k, v, "tova", budget=4, stats=stats)) == [0, 3, 5, 8]


def test_pyramid_budgets_hand_example_and_total():
    # a = 10 - 2 = 8; linear 15.6 -> 0.4 over 4 layers = [15.6, 10.53, 5.47, 0.4]; cumulative rounding
    assert pyramid_budgets(10, 50, 4, 2) == [17, 13, 7, 3]
    for k_avg, n, m, w in [(50, 200, 8, 8), (150, 200, 8, 8), (7, 9, 5, 3), (3, 100, 6, 4), (20, 20, 3, 2)]:
        b = pyramid_budgets(k_avg, n, m, w)
        assert sum(b) == m * k_avg
        assert all(x <= n for x in b)
        assert all(b[i] >= b[i + 1] for i in range(m - 1))


def test_pyramidkv_layer_equals_snapkv_at_layer_budget():
    n, stats = _snap_stats()
    k, v = _kv(n=n)
    budgets = pyramid_budgets(6, n, 3, 3)
    assert sum(budgets) == 18
    for layer in range(3):
        c = mk.compress(k, v, "pyramidkv", budget=6, stats=stats, layer=layer, num_layers=3)
        s = mk.compress(k, v, "snapkv", budget=budgets[layer], stats=stats)
        assert int(c.length[0, 0]) == budgets[layer]
        assert _pos(c) == _pos(s)


def test_random_is_a_seeded_uniform_subset():
    k, v = _kv(n=200)
    c = mk.compress(k, v, "random", budget=100, seed=3)
    p = _pos(c)
    assert len(set(p)) == 100 and p == sorted(p)
    assert 20 < sum(x < 100 for x in p) < 80          # not a window
    assert p == _pos(mk.compress(k, v, "random", budget=100, seed=3))


# ---- statistics come from the attention kernel -----------------------------------------------------------------

@pytest.mark.parametrize("kind", ["softmax", "hstu"])
@pytest.mark.parametrize("method, window", [("h2o", None), ("snapkv", 4), ("tova", 1), ("d2o", None)])
def test_queries_path_equals_kernel_stats(method, window, kind):
    B, H, HQ, N, D = 2, 2, 4, 13, 8
    g = torch.Generator().manual_seed(0)
    k = torch.randn(B, H, N, D, generator=g, dtype=torch.float64)
    v = torch.randn_like(k)
    q = torch.randn(B, HQ, N, D, generator=g, dtype=torch.float64)
    L = torch.tensor([13, 8], dtype=torch.int32)
    lens = L.long()
    off = torch.cat([lens.new_zeros(1), lens.cumsum(0)])
    res = mk.attention(padded_to_jagged(q, lens), padded_to_jagged(k, lens), padded_to_jagged(v, lens), offsets=off,
                       is_causal=True, kind=kind, return_stats=True, stats_window=window, backend="reference")
    extra = {"window": window} if method == "snapkv" else {}
    a = mk.compress(k, v, method, budget=5, lengths=L, stats=res.stats, **extra)
    b = mk.compress(k, v, method, budget=5, lengths=L, queries=q, kind=kind, **extra)
    assert torch.equal(a.position, b.position) and torch.equal(a.k, b.k)
    if method == "h2o":
        # the hand rule on the kernel's mass: window {n-2, n-1} + top-3 mass among the rest
        for bb in range(B):
            for h in range(H):
                n = int(L[bb])
                m = res.stats.key_mass[int(off[bb]):int(off[bb + 1]), h]
                heavy = sorted(torch.argsort(m[:n - 2], descending=True, stable=True)[:3].tolist())
                assert _pos(b, bb, h) == heavy + [n - 2, n - 1]


# ---- merging -----------------------------------------------------------------------------------------------------

def test_chunk_fixed_size_counts_means_and_last_position():
    k, v = _kv()
    ts = torch.arange(10) * 7 + 100
    c = mk.compress(k, v, "chunk", chunk=3, timestamps=ts)
    assert int(c.length[0, 0]) == 4
    assert c.count[0, 0, :4].tolist() == [3.0, 3.0, 3.0, 1.0]
    assert _pos(c) == [2, 5, 8, 9]                         # most recent member of each chunk
    assert c.timestamp[0, 0, :4].tolist() == [114, 135, 156, 163]
    torch.testing.assert_close(c.k[0, 0, 1], k[0, 0, 3:6].mean(0), rtol=0, atol=1e-15)
    torch.testing.assert_close(c.v[0, 0, 3], v[0, 0, 9], rtol=0, atol=0)


@pytest.mark.parametrize("n, budget, counts, pos", [
    (10, 4, [3, 3, 3, 1], [2, 5, 8, 9]),                   # c = ceil(10/4) = 3, no raw tail needed
    (10, 6, [2, 2, 2, 2, 1, 1], [1, 3, 5, 7, 8, 9]),       # c = 2, t = 1 raw recent token
    (7, 4, [2, 2, 2, 1], [1, 3, 5, 6]),
    (5, 5, [1, 1, 1, 1, 1], [0, 1, 2, 3, 4]),
])
def test_chunk_budget_form_uses_budget_exactly(n, budget, counts, pos):
    k, v = _kv(n=n)
    c = mk.compress(k, v, "chunk", budget=budget)
    assert c.count[0, 0, :budget].tolist() == counts and _pos(c) == pos


def test_chunk_weights_by_input_counts():
    k, v = _kv(n=4)
    counts = torch.tensor([1.0, 3.0, 2.0, 2.0])
    c = mk.compress(k, v, "chunk", chunk=2, counts=counts)
    assert c.count[0, 0, :2].tolist() == [4.0, 4.0]
    torch.testing.assert_close(c.k[0, 0, 0], (k[0, 0, 0] + 3 * k[0, 0, 1]) / 4, rtol=0, atol=1e-15)


@pytest.mark.parametrize("kind", ["softmax", "hstu"])
@pytest.mark.parametrize("method", ["chunk", "tome"])
def test_merging_duplicates_reproduces_unmerged_attention(method, kind):
    # every token appears twice in a row: merging pairs must give exactly the unmerged attention
    base_k, base_v = _kv(n=6, h=2, d=8, seed=4, b=2)
    k = base_k.repeat_interleave(2, dim=2)
    v = base_v.repeat_interleave(2, dim=2)
    extra = {"chunk": 2} if method == "chunk" else {"budget": 6}
    c = mk.compress(k, v, method, **extra)
    assert c.count[..., :6].eq(2).all()
    full = mk.compress(k, v, "none")
    g = torch.Generator().manual_seed(9)
    q = torch.randn(2, 4, 3, 8, generator=g, dtype=torch.float64)
    kr, vr = torch.randn(2, 2, 3, 8, generator=g, dtype=torch.float64), torch.randn(2, 2, 3, 8, generator=g,
                                                                                 dtype=torch.float64)
    a = mk.attention(q, kr, vr, cache=c, is_causal=True, kind=kind, backend="reference")
    b = mk.attention(q, kr, vr, cache=full, is_causal=True, kind=kind, backend="reference")
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def _tome_keys():
    k = torch.tensor([[1, 0, 0, 0], [1, 0.1, 0, 0], [0, 0, 1, 0], [0, 1, 0, 2], [0, 1, 0, 0], [0, 0, 1, 0.5]],
                     dtype=torch.float64).view(1, 1, 6, 4)
    v = torch.arange(24, dtype=torch.float64).view(1, 1, 6, 4)
    return k, v


def test_tome_bipartite_pairing():
    k, v = _tome_keys()
    # A = {0, 2, 4}, B = {1, 3, 5}; best edges: 0->1 (0.995), 2->5 (0.894), 4->3 (0.447)
    c = mk.compress(k, v, "tome", budget=4)                # r = 2: the two strongest edges
    assert _pos(c) == [1, 3, 4, 5]
    assert c.count[0, 0, :4].tolist() == [2.0, 1.0, 1.0, 2.0]
    torch.testing.assert_close(c.k[0, 0, 0], (k[0, 0, 0] + k[0, 0, 1]) / 2, rtol=0, atol=1e-15)
    torch.testing.assert_close(c.v[0, 0, 3], (v[0, 0, 2] + v[0, 0, 5]) / 2, rtol=0, atol=1e-15)
    c = mk.compress(k, v, "tome", budget=3)                # r = 3: every A token merges; 4 -> 3 keeps position 4
    assert _pos(c) == [1, 4, 5]
    assert c.count[0, 0, :3].tolist() == [2.0, 2.0, 2.0]


def test_tome_size_weighted_average_and_rounds():
    k, v = _tome_keys()
    counts = torch.tensor([3.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    c = mk.compress(k, v, "tome", budget=5, counts=counts)
    torch.testing.assert_close(c.k[0, 0, 0], (3 * k[0, 0, 0] + k[0, 0, 1]) / 4, rtol=0, atol=1e-15)
    assert c.count[0, 0, 0].item() == 4.0
    big_k, big_v = _kv(n=40, h=2, d=8)
    c = mk.compress(big_k, big_v, "tome", budget=3)        # needs several rounds (at most n/2 merges each)
    assert c.length.eq(3).all()
    assert c.count[..., :3].sum(-1).eq(40).all()


def test_d2o_merges_evicted_into_most_similar_kept_with_d2o_weights():
    k = torch.tensor([[1, 0, 0], [1, 0.2, 0], [0, 1, 1], [0, 0.1, 1], [0, 0, 1], [-1, 0, 0]],
                     dtype=torch.float64).view(1, 1, 6, 3)
    v = torch.arange(18, dtype=torch.float64).view(1, 1, 6, 3)
    mass = torch.tensor([9, 1, 0, 0, 8, 0], dtype=torch.float64).view(1, 1, 6)
    # H2O set (budget 3, window 1): {5} + top-2 mass among 0..4 = {0, 4}; evicted 1, 2, 3
    c = mk.compress(k, v, "d2o", budget=3, window=1, threshold=0.5, stats=mass)
    assert _pos(c) == [0, 4, 5]
    u1 = 1 / math.sqrt(1.04)                   # cos(k1, k0): merged into 0
    u3 = 1 / math.sqrt(1.01)                   # cos(k3, k4): merged into 4; k2 (cos 0.707 with k4) too
    u2 = 1 / math.sqrt(2)
    e = math.e
    want0 = (e * k[0, 0, 0] + math.exp(u1) * k[0, 0, 1]) / (e + math.exp(u1))
    want4 = (e * v[0, 0, 4] + math.exp(u3) * v[0, 0, 3] + math.exp(u2) * v[0, 0, 2]) / \
        (e + math.exp(u3) + math.exp(u2))
    torch.testing.assert_close(c.k[0, 0, 0], want0, rtol=0, atol=1e-14)
    torch.testing.assert_close(c.v[0, 0, 1], want4, rtol=0, atol=1e-13)
    torch.testing.assert_close(c.k[0, 0, 2], k[0, 0, 5], rtol=0, atol=0)
    assert c.count[0, 0, :3].tolist() == [1.0, 1.0, 1.0]
    # a stricter threshold drops k2 (0.707) instead of merging it
    c = mk.compress(k, v, "d2o", budget=3, window=1, threshold=0.8, stats=mass, proportional=True)
    want4 = (e * v[0, 0, 4] + math.exp(u3) * v[0, 0, 3]) / (e + math.exp(u3))
    torch.testing.assert_close(c.v[0, 0, 1], want4, rtol=0, atol=1e-13)
    assert c.count[0, 0, :3].tolist() == [2.0, 2.0, 1.0]


# ---- precision ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 2])
def test_kivi_split_and_error(bits):
    k, v = _kv(n=45, h=2, d=8)
    c = mk.compress(k, v, "kivi", bits=bits, group_size=4, residual=8)
    # quantized: floor((45 - 8) / 4) * 4 = 36 oldest; residual: the 8 recent + the 1-token group tail
    assert c.length.eq(36).all() and c.residual.length.eq(9).all()
    assert _pos(c.residual, seg=c.residual) == list(range(36, 45))
    assert c.k_format == f"int{bits}" and c.k_axis == "channel" and c.group_size == 4
    assert tuple(c.k_scale.shape) == (1, 2, 9, 8) and tuple(c.v_scale.shape) == (1, 2, 36, 2)
    assert torch.equal(c.residual.k[:, :, :9], k[:, :, 36:]) and torch.equal(c.residual.v[:, :, :9], v[:, :, 36:])
    kq, vq = c.dequantize(torch.float64)
    step_k = c.k_scale.double().repeat_interleave(4, dim=2)[:, :, :36]
    step_v = c.v_scale.double().repeat_interleave(4, dim=3)
    assert bool(((kq[:, :, :36] - k[:, :, :36]).abs() <= step_k / 2 + 1e-6).all())
    assert bool(((vq[:, :, :36] - v[:, :, :36]).abs() <= step_v / 2 + 1e-6).all())


def test_kivi_short_history_is_all_residual():
    k, v = _kv(n=10, d=8)
    c = mk.compress(k, v, "kivi4", group_size=4, residual=8)
    assert c.length.eq(0).all() and c.residual.length.eq(10).all()


def test_intactkv_pivots_stay_full_precision():
    k, v = _kv(n=30, d=8)
    mass = torch.zeros(1, 1, 30, dtype=torch.float64)
    mass[0, 0, [7, 13, 29]] = torch.tensor([5.0, 3.0, 9.0], dtype=torch.float64)
    c = mk.compress(k, v, "intactkv4", group_size=4, residual=4, sinks=1, pivots=2, stats=mass)
    # pivots: sink 0 + top-2 mass among entries older than the 4 recent (29 is recent already) = 7, 13;
    # remaining 23 candidates: 19 older than the window -> 16 quantized, tail of 3 (22, 23, 24) + window full precision
    res = _pos(c.residual, seg=c.residual)
    assert res == [0, 7, 13, 23, 24, 25, 26, 27, 28, 29]
    assert int(c.length[0, 0]) == 20
    assert 7 not in _pos(c) and 0 not in _pos(c)


def test_intactkv_without_pivots_needs_no_stats():
    k, v = _kv(n=30, d=8)
    c = mk.compress(k, v, "intactkv", group_size=4, residual=4, pivots=0)
    assert _pos(c.residual, seg=c.residual)[0] == 0


# ---- hybrids -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("hybrid", ["h2o+int8", "h2o+kivi4", "tome+int4", "chunk+fp8", "snapkv+intactkv2"])
def test_hybrid_equals_stages_and_bytes_are_sum_of_parts(hybrid):
    a, b = hybrid.split("+")
    k, v = _kv(n=40, h=2, d=8, b=2)
    k, v = k.float(), v.float()
    L = torch.tensor([40, 23], dtype=torch.int32)
    ts = torch.arange(40).repeat(2, 1) * 3
    stats = torch.rand(2, 2, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    qp = {"group_size": 4} if b != "int8" and b != "fp8" else {}
    if b.startswith(("kivi", "intactkv")):
        qp["residual"] = 4
    ap = {"window": 3} if a == "snapkv" else {}
    if a in ("snapkv",):
        stats = AttentionStats(key_mass=stats, key_window_mass=stats, window=3)
    hyb = mk.compress(k, v, hybrid, budget=0.5, lengths=L, timestamps=ts, stats=stats, **qp, **ap)
    first = mk.compress(k, v, a, budget=0.5, lengths=L, timestamps=ts, stats=stats, **ap)
    # stage b on a history made of exactly a's kept entries
    pivot_stats = None
    if b.startswith("intactkv"):
        pivot_stats = torch.gather(stats.key_mass, 2, first.position.long())
    second = mk.compress(first.k, first.v, b, lengths=first.length.max(1).values, positions=first.position,
                         timestamps=first.timestamp, counts=first.count, stats=pivot_stats, **qp)
    assert torch.equal(hyb.nbytes_per_user(), second.nbytes_per_user())
    assert torch.equal(hyb.original_length, L)
    # bytes = first stage's per-entry metadata + second stage's payload for the same entries
    kept = first.length.long().sum(1)
    meta = first.nbytes_per_user() - kept * (2 * 8 * 4)         # minus float32 K/V payload rows
    payload = second.nbytes_per_user() - kept * (4 + 8 + (4 if first.count is not None else 0))
    assert torch.equal(hyb.nbytes_per_user(), meta + payload - (4 * 2 + 4))


def test_hybrid_param_routing():
    k, v = _kv(n=20, d=8)
    mass = torch.arange(20, dtype=torch.float64).flip(0).view(1, 1, 20)
    c = mk.compress(k, v, "h2o+kivi4", budget=8, stats=mass, h2o__window=2, group_size=4, residual=0)
    assert _pos(c.residual, seg=c.residual) == [] and _pos(c) == [0, 1, 2, 3, 4, 5, 18, 19]
    with pytest.raises(ValueError, match="names no stage"):
        mk.compress(k, v, "h2o+kivi4", budget=8, stats=mass, tome__window=2)


def test_bytes_budget_picks_largest_token_count():
    k, v = _kv(n=30, h=2, d=8)
    per_entry = 2 * 8 * 8 + 4                                   # fp64 K and V rows + int32 position
    header = 4 * 2 + 4
    c = mk.compress(k, v, "recent", budget=Budget(bytes=header + 2 * 11 * per_entry + 5))
    assert c.length.eq(11).all() and _pos(c) == list(range(19, 30))
