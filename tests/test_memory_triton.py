"""Triton product-key memory kernels under the interpreter (tiny shapes) vs the reference."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit import (tests/conftest.py also sets it)

import pytest  # noqa: E402
import torch  # noqa: E402

from malloc_kernels.memory import ops, reference as R  # noqa: E402

pytest.importorskip("triton")
from malloc_kernels.triton import pkm as T  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="CPU tests of Triton kernels need TRITON_INTERPRET=1")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,h,dk,s,k", [(2, 2, 10, 13, 3), (1, 1, 2, 1, 1), (3, 1, 6, 5, 5)])
def test_triton_topk_matches_bruteforce(dtype, n, h, dk, s, k):
    q = torch.randn(n, h, dk, generator=_gen(n + s), dtype=dtype)
    keys = torch.randn(h, 2, s, dk // 2, generator=_gen(s), dtype=dtype)
    sc, ix = T.pkm_topk(q, keys, k)
    sb, ib = R.pkm_topk_bruteforce(q, keys, k)
    assert torch.equal(ix, ib)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(sc, sb, rtol=tol, atol=tol)


def test_triton_topk_exact_ties():
    g = _gen(3)
    q = torch.randint(-1, 2, (4, 2, 4), generator=g).float()
    keys = torch.randint(-1, 2, (2, 2, 6, 2), generator=g).float()
    assert torch.equal(T.pkm_topk(q, keys, 4)[1], R.pkm_topk_bruteforce(q, keys, 4)[1])
    assert T.pkm_topk(torch.zeros(1, 1, 4), keys[:1], 3)[1].tolist() == [[[0, 1, 2]]]
    # Rounding ties (see tests/test_memory.py): ranked by half-1 rank, not flat index.
    rq = torch.ones(1, 1, 2)
    rk = torch.tensor([[[[0.0], [0.25], [0.5], [0.75]], [[2.0 ** 24], [0.0], [0.0], [0.0]]]])
    assert T.pkm_topk(rq, rk, 2)[1].tolist() == [[[12, 8]]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m,dv,n,e", [(50, 37, 3, 9), (7, 1, 2, 40), (1, 3, 1, 1)])
def test_triton_gather_forward_backward(dtype, m, dv, n, e):
    g = _gen(m)
    values = torch.randn(m, dv, generator=g, dtype=dtype)
    idx = torch.randint(0, m, (n, e), generator=g)
    w = torch.randn(n, e, generator=g, dtype=dtype)
    go = torch.randn(n, dv, generator=g, dtype=dtype)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(T.pkm_gather(values, idx, w), R.pkm_gather(values, idx, w), rtol=tol, atol=tol)
    gw, rows, grows = T.pkm_gather_backward(go, values, idx, w)
    rgw, rrows, rgrows = R.pkm_gather_backward(go, values, idx, w)
    assert torch.equal(rows, rrows)
    torch.testing.assert_close(gw, rgw, rtol=tol, atol=tol)
    torch.testing.assert_close(grows, rgrows, rtol=tol, atol=tol)


def test_triton_backend_through_autograd():
    g = _gen(5)
    q = torch.randn(2, 2, 6, generator=g, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(2, 2, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    values = torch.randn(25, 4, generator=g, dtype=torch.float64, requires_grad=True)
    out = ops.pkm_lookup(q, keys, values, 3, backend="triton")
    out.square().sum().backward()
    grads = [q.grad.clone(), keys.grad.clone(), values.grad.to_dense()]
    for t in (q, keys, values):
        t.grad = None
    ref = ops.pkm_lookup(q, keys, values, 3, backend="reference")
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, [q.grad, keys.grad, values.grad.to_dense()]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_aot_specs_match_kernel_signatures():
    # The AOT report (malloc_kernels.triton.report) compiles these; here only that they build and are complete.
    specs = T.aot_specs()
    assert [s.name for s in specs] == ["pkm_topk_scores", "pkm_topk", "pkm_gather_fwd", "pkm_gather_bwd_weights",
                                       "pkm_gather_bwd_rows"]
    for s in specs:
        assert set(s.signature) == set(s.fn.arg_names)
        assert not s.mma_expected
