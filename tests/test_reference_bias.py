"""HSTU relative bias of the reference: exact time buckets and per-head gathers (ARCHITECTURE.md, "Attention
semantics")."""
import math

import pytest
import torch

from malloc_kernels.reference import relative_bias, time_bucket, time_bucket_thresholds


def bucket_py(dt, T):
    return min(math.floor(math.log(max(abs(dt), 1)) / 0.301), T - 1)


@pytest.mark.parametrize("T", [1, 2, 3, 16, 64, 128])
def test_thresholds_are_the_smallest_integers_reaching_each_bucket(T):
    th = time_bucket_thresholds(T)
    assert th.dtype == torch.int64 and th.shape == (T - 1,)
    for k in range(1, min(T, 60)):
        x = int(th[k - 1])
        assert math.floor(math.log(x) / 0.301) >= k
        assert x == 1 or math.floor(math.log(x - 1) / 0.301) < k
    assert bool((th[1:] >= th[:-1]).all())


def test_thresholds_share_values_for_the_first_buckets():
    # ln(2)/0.301 = 2.30: x = 2 already reaches bucket 2, so th[1] == th[2] == 2 and bucket 1 is never taken.
    th = time_bucket_thresholds(5)
    assert th.tolist()[:3] == [2, 2, 3]
    assert time_bucket(torch.tensor([1, 2, 3]), 5).tolist() == [0, 2, 3]


@pytest.mark.parametrize("T", [1, 4, 32, 100])
def test_time_bucket_equals_the_float64_formula_on_boundaries_and_random_values(T):
    th = time_bucket_thresholds(max(T, 2))
    edges = set()
    for x in th.tolist():
        if x < 2 ** 62:
            edges.update({x - 1, x, x + 1, -x, -(x - 1)})
    gen = torch.Generator().manual_seed(0)
    rnd = torch.randint(-10 ** 15, 10 ** 15, (2000,), generator=gen).tolist()
    dts = sorted(edges) + rnd + [0, 1, -1, 2, -2, 2 ** 62, -(2 ** 62)]
    got = time_bucket(torch.tensor(dts, dtype=torch.int64), T)
    assert got.tolist() == [bucket_py(d, T) for d in dts]


def test_time_bucket_rejects_float_input_and_bad_T():
    with pytest.raises(TypeError, match="dt"):
        time_bucket(torch.tensor([1.0]), 4)
    with pytest.raises(ValueError, match="T"):
        time_bucket_thresholds(0)


def test_relative_bias_matches_an_explicit_loop_with_per_head_key_positions():
    gen = torch.Generator().manual_seed(1)
    B, Hq, Hk, Lq, N, P, T = 2, 4, 2, 3, 5, 6, 20
    qp = torch.randint(0, 30, (B, Lq), generator=gen)
    kp = torch.randint(0, 30, (B, Hk, N), generator=gen)
    qt = torch.randint(0, 10 ** 6, (B, Lq), generator=gen)
    kt = torch.randint(0, 10 ** 6, (B, Hk, N), generator=gen)
    pb = torch.randn(Hq, P, generator=gen)
    tb = torch.randn(Hq, T, generator=gen)
    got = relative_bias(qp, kp, pb, tb, qt, kt, dtype=torch.float64)
    assert got.shape == (B, Hq, Lq, N) and got.dtype == torch.float64
    for b in range(B):
        for h in range(Hq):
            g = h // (Hq // Hk)
            for i in range(Lq):
                for j in range(N):
                    want = float(pb[h, min(max(int(qp[b, i]) - int(kp[b, g, j]), 0), P - 1)]) + \
                        float(tb[h, bucket_py(int(qt[b, i]) - int(kt[b, g, j]), T)])
                    assert float(got[b, h, i, j]) == want
    # a 1-D table is shared by every head; shared key positions [B, N] broadcast over heads
    shared = relative_bias(qp, kp[:, 0], pb[0], None, num_heads=3)
    assert shared.shape == (B, 3, Lq, N)
    assert torch.equal(shared[:, 0], shared[:, 2])


def test_relative_bias_gradient_reaches_the_tables():
    pb = torch.zeros(2, 4, requires_grad=True)
    qp = torch.tensor([[3, 4]])
    kp = torch.tensor([[0, 3, 4]])
    relative_bias(qp, kp, pb).sum().backward()
    # rel = [[3,0,-1->0],[4->3,1,0]] for both heads
    assert pb.grad.tolist() == [[3.0, 1.0, 0.0, 2.0]] * 2
