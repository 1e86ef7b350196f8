"""ProductKeyMemory / MemoryGate / MemoryAugmented: shapes, backends agree, MSN stabilisers, sparse training, usage."""
import math

import pytest
import torch

from malloc_kernels.memory import MemoryAugmented, MemoryGate, ProductKeyMemory, ops, reference as R

CPU = pytest.mark.needs_ext("pkm_topk", "pkm_gather")  # missing: a failure (tests/conftest.py)


def _layer(**kw):
    torch.manual_seed(0)
    args = dict(num_subkeys=9, heads=2, key_dim=6, k=4)
    args.update(kw)
    return ProductKeyMemory(12, 5, **args)


@pytest.mark.parametrize("query_norm", ["layernorm", "batchnorm", "none"])
@pytest.mark.parametrize("key_overparam", [None, 7])
def test_forward_matches_manual_reference(query_norm, key_overparam):
    layer = _layer(query_norm=query_norm, key_overparam=key_overparam, backend="reference").double()
    x = torch.randn(3, 4, 12, dtype=torch.float64)
    y = layer(x)
    assert y.shape == (3, 4, 5)
    # Manual: queries -> brute-force top-k -> softmax -> dense weighted sum.
    x2 = x.reshape(-1, 12)
    q = layer.queries(x2)
    scores, idx = R.pkm_topk_bruteforce(q, layer.effective_subkeys(), 4)
    w = torch.softmax(scores * layer.score_scale, -1)
    manual = torch.einsum("nhk,nhkd->nd", w, layer.values[idx])
    torch.testing.assert_close(y.reshape(-1, 5), manual, rtol=1e-12, atol=1e-12)


@CPU
def test_cpu_and_reference_backends_agree_with_gradients():
    x = torch.randn(20, 12, dtype=torch.float64)
    outs, grads = [], []
    for backend in ("reference", "cpu"):
        layer = _layer(backend=backend, key_overparam=5).double()
        y = layer(x)
        y.square().sum().backward()
        outs.append(y)
        grads.append({n: (p.grad.to_dense() if p.grad.is_sparse else p.grad) for n, p in layer.named_parameters()})
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-10)
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-9, atol=1e-10, msg=n)


def test_layernorm_stabilisers_normalise_queries_and_keys():
    layer = _layer(key_overparam=11)
    keys = layer.effective_subkeys()
    assert keys.shape == (2, 2, 9, 3)
    torch.testing.assert_close(keys.mean(-1), torch.zeros(2, 2, 9), atol=1e-5, rtol=0)
    q = layer.queries(100 * torch.randn(8, 12) + 5)
    halves = q.view(8, 2, 2, 3)
    torch.testing.assert_close(halves.mean(-1), torch.zeros(8, 2, 2), atol=1e-5, rtol=0)
    torch.testing.assert_close(halves.var(-1, unbiased=False), torch.ones(8, 2, 2), atol=1e-3, rtol=0)


def test_overparameterised_keys_move_unselected_keys():
    # One SGD step: with plain sub-keys only the selected rows change; through the shared projection every key does.
    # (Few queries so that most plain keys stay unselected; k = 4 so no half's selected sub-keys all coincide --
    # a sub-key shared by all k candidates shifts every score equally and gets no gradient through the softmax.)
    x = torch.randn(3, 12, dtype=torch.float64)
    for overparam, expect_all in ((None, False), (8, True)):
        layer = _layer(key_overparam=overparam, num_subkeys=16, k=4, backend="reference").double()
        before = layer.effective_subkeys().detach().clone()
        opt = torch.optim.SGD(list(layer.dense_parameters()), lr=0.1)
        layer(x).square().sum().backward()
        opt.step()
        moved = (layer.effective_subkeys().detach() - before).abs().sum(-1) > 0
        assert bool(moved.all()) == expect_all
        assert bool(moved.any())


@CPU
def test_sparse_training_step_with_sparse_adam_reduces_loss():
    torch.manual_seed(0)
    layer = ProductKeyMemory(8, 3, num_subkeys=16, heads=2, key_dim=8, k=4, track_usage=True)
    x = torch.randn(64, 8)
    target = torch.randn(64, 3)
    opt_sparse = torch.optim.SparseAdam(list(layer.sparse_parameters()), lr=0.05)
    opt_dense = torch.optim.Adam(list(layer.dense_parameters()), lr=0.01)
    losses = []
    for _ in range(30):
        opt_sparse.zero_grad()
        opt_dense.zero_grad()
        loss = (layer(x) - target).square().mean()
        loss.backward()
        assert layer.values.grad.is_sparse
        opt_sparse.step()
        opt_dense.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    stats = layer.usage_stats()
    assert stats["queries"] == 30 * 64 and stats["selections"] == 30 * 64 * 2 * 4
    assert 0 < stats["fraction_hit"] <= 1 and 0 <= stats["kl_to_uniform"] <= math.log(256) + 1e-9
    layer.reset_usage()
    assert layer.usage_stats()["selections"] == 0


def test_usage_stats_need_tracking_and_detect_collapse():
    layer = _layer()
    with pytest.raises(ValueError, match="track_usage"):
        layer.usage_stats()
    layer = _layer(track_usage=True, backend="reference")
    with torch.no_grad():
        layer(torch.randn(1, 12).expand(50, 12))  # the same query 50 times: only k slots per head
    st = layer.usage_stats()
    assert st["fraction_hit"] <= 2 * 4 / 81
    assert st["kl_to_uniform"] >= math.log(81 / 8) - 1e-9


def test_dense_grad_option_and_empty_input():
    layer = _layer(sparse_grad=False)
    layer(torch.randn(5, 12)).sum().backward()
    assert not layer.values.grad.is_sparse
    assert list(layer.sparse_parameters()) == []
    assert layer(torch.randn(0, 12)).shape == (0, 5)


def test_memory_gate_math_and_wrapper():
    torch.manual_seed(0)
    gate = MemoryGate(6, 4)
    x, m, h = torch.randn(3, 6), torch.randn(3, 4), torch.randn(3, 4)
    g = torch.sigmoid(gate.proj(x))
    torch.testing.assert_close(gate(x, m, h), g * m + (1 - g) * h)
    scalar = MemoryGate(6, 4, per_feature=False)
    assert scalar.gate(x).shape == (3, 1)
    host = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.GELU(), torch.nn.Linear(20, 5))
    block = MemoryAugmented(host, _layer())
    x = torch.randn(2, 7, 12)
    y = block(x)
    assert y.shape == (2, 7, 5)
    gx = torch.sigmoid(block.gate.proj(x))
    torch.testing.assert_close(y, gx * block.memory(x) + (1 - gx) * host(x))
    with pytest.raises(ValueError, match="m and h"):
        gate(torch.randn(3, 6), torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="input_dim"):
        gate(torch.randn(3, 5), m, h)
    with pytest.raises(TypeError, match="memory must be"):
        MemoryAugmented(host, host)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(key_dim=5), ValueError, "key_dim must be even"),
    (dict(k=10), ValueError, "k must be <= num_subkeys"),
    (dict(k=0), ValueError, "k must be >= 1"),
    (dict(heads=2.0), TypeError, "heads must be an int"),
    (dict(query_norm="rms"), ValueError, "query_norm"),
    (dict(backend="gpu"), ValueError, "backend"),
    (dict(key_overparam=0), ValueError, "key_overparam"),
])
def test_bad_constructor_arguments(kw, exc, match):
    with pytest.raises(exc, match=match):
        _layer(**kw)


def test_bad_forward_input():
    layer = _layer()
    with pytest.raises(ValueError, match="input_dim=12"):
        layer(torch.randn(3, 11))
    with pytest.raises(TypeError, match="x must be a tensor"):
        layer([1.0] * 12)
