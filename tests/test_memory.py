"""Product-key memory kernels: exact two-stage search vs brute force (incl. ties), Sparse-Gather forward/backward vs
the reference, gradcheck in float64, sparse value gradient, C++ CPU kernels, opcheck, bad arguments."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from malloc_kernels.memory import ops, reference as R

# a missing extension fails (tests/conftest.py)
CPU = pytest.mark.needs_ext("pkm_topk", "pkm_topk_backward", "pkm_gather", "pkm_gather_backward")
BACKENDS = ["reference", pytest.param("cpu", marks=CPU)]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _search_inputs(n, h, dk, s, dtype, seed=0, integer=False):
    g = _gen(seed)
    if integer:
        # Small integers: every dot product and sum is exact in any order, so scores tie exactly and any two
        # backends must return identical indices.
        q = torch.randint(-1, 2, (n, h, dk), generator=g).to(dtype)
        k = torch.randint(-1, 2, (h, 2, s, dk // 2), generator=g).to(dtype)
    else:
        q = torch.randn(n, h, dk, generator=g, dtype=dtype)
        k = torch.randn(h, 2, s, dk // 2, generator=g, dtype=dtype)
    return q, k


# ---- reference: two-stage == brute force ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,h,dk,s,k", [(1, 1, 2, 1, 1), (17, 3, 14, 17, 5), (9, 2, 8, 13, 13), (33, 1, 6, 7, 1)])
def test_reference_two_stage_equals_bruteforce(dtype, n, h, dk, s, k):
    q, keys = _search_inputs(n, h, dk, s, dtype, seed=n + s)
    s2, i2 = R.pkm_topk(q, keys, k)
    sb, ib = R.pkm_topk_bruteforce(q, keys, k)
    assert torch.equal(i2, ib)
    assert torch.equal(s2, sb)


@pytest.mark.parametrize("seed", range(4))
def test_reference_ties_integer_data(seed):
    q, keys = _search_inputs(40, 2, 4, 9, torch.float64, seed=seed, integer=True)
    for k in (1, 4, 9):
        assert torch.equal(R.pkm_topk(q, keys, k)[1], R.pkm_topk_bruteforce(q, keys, k)[1])


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 9), h=st.integers(1, 3), dh=st.integers(1, 5), s=st.integers(1, 12), data=st.data(),
       seed=st.integers(0, 2 ** 31 - 1), levels=st.integers(1, 4))
def test_property_two_stage_exact_on_tie_heavy_data(n, h, dh, s, data, seed, levels):
    # Integer data with few levels: heavy exact ties in both halves and in the sums.
    k = data.draw(st.integers(1, s))
    g = _gen(seed)
    q = torch.randint(-levels, levels + 1, (n, h, 2 * dh), generator=g).double()
    keys = torch.randint(-levels, levels + 1, (h, 2, s, dh), generator=g).double()
    sb, ib = R.pkm_topk_bruteforce(q, keys, k)
    assert torch.equal(R.pkm_topk(q, keys, k)[1], ib)
    if ops.cpu_available():
        sc, ic = torch.ops.malloc_kernels.pkm_topk(q, keys, k)
        assert torch.equal(ic, ib) and torch.equal(sc, sb)


def test_all_equal_scores_lower_index_wins():
    q = torch.zeros(2, 1, 4)
    keys = torch.randn(1, 2, 5, 2)
    for fn in (R.pkm_topk, R.pkm_topk_bruteforce):
        assert fn(q, keys, 3)[1].tolist() == [[[0, 1, 2]]] * 2


def _rounding_tie_case():
    # Half 1 scores [0, .25, .5, .75], half 2 [2^24, 0, 0, 0]: in float32 2^24 + {0,.25,.5,.75} all round to 2^24,
    # so the four slots (i1, 0) tie after rounding while their s1 differ. The contract ranks them by half-1 rank
    # (3, 2, 1, 0), which keeps the two-stage search exact; "lower flat index" would pick (0,0), (1,0), which are
    # not among the top-2 sub-keys of half 1.
    q = torch.ones(1, 1, 2)
    keys = torch.tensor([[[[0.0], [0.25], [0.5], [0.75]], [[2.0 ** 24], [0.0], [0.0], [0.0]]]])
    return q, keys


def test_rounding_ties_keep_two_stage_exact():
    q, keys = _rounding_tie_case()
    assert R.pkm_topk_bruteforce(q, keys, 2)[1].tolist() == [[[12, 8]]]
    assert R.pkm_topk(q, keys, 2)[1].tolist() == [[[12, 8]]]


# ---- C++ CPU kernels --------------------------------------------------------------------------------------------

@CPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,h,dk,s,k", [(1, 1, 2, 1, 1), (17, 3, 14, 17, 5), (5, 2, 16, 70, 70), (97, 1, 130, 9, 4)])
def test_cpu_topk_matches_bruteforce(dtype, n, h, dk, s, k, cpu_isa):
    q, keys = _search_inputs(n, h, dk, s, dtype, seed=3 * n + s)
    sc, ic = torch.ops.malloc_kernels.pkm_topk(q, keys, k)
    sb, ib = R.pkm_topk_bruteforce(q, keys, k)
    assert torch.equal(ic, ib)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(sc, sb, rtol=tol, atol=tol)


@CPU
@pytest.mark.parametrize("seed", range(3))
def test_cpu_topk_ties_exact(seed, cpu_isa):
    q, keys = _search_inputs(60, 3, 6, 11, torch.float32, seed=seed, integer=True)
    for k in (1, 6, 11):
        sc, ic = torch.ops.malloc_kernels.pkm_topk(q, keys, k)
        sb, ib = R.pkm_topk_bruteforce(q, keys, k)
        assert torch.equal(ic, ib) and torch.equal(sc, sb)


@CPU
def test_cpu_topk_rounding_ties_and_all_equal():
    q, keys = _rounding_tie_case()
    assert torch.ops.malloc_kernels.pkm_topk(q, keys, 2)[1].tolist() == [[[12, 8]]]
    z = torch.zeros(3, 2, 4)
    assert torch.ops.malloc_kernels.pkm_topk(z, torch.randn(2, 2, 5, 2), 3)[1].tolist() == [[[0, 1, 2]] * 2] * 3


@CPU
def test_cpu_topk_noncontiguous_inputs():
    q, keys = _search_inputs(11, 3, 10, 13, torch.float64, seed=5)
    qt = q.transpose(0, 1).contiguous().transpose(0, 1)
    kt = keys.transpose(2, 3).contiguous().transpose(2, 3)
    assert not qt.is_contiguous() and not kt.is_contiguous()
    assert torch.equal(torch.ops.malloc_kernels.pkm_topk(qt, kt, 4)[1], R.pkm_topk_bruteforce(q, keys, 4)[1])


@CPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_topk_backward_matches_reference(dtype, cpu_isa):
    q, keys = _search_inputs(19, 3, 10, 9, dtype, seed=7)
    qr, kr = q.clone().requires_grad_(), keys.clone().requires_grad_()
    scores, idx = R.pkm_topk(qr, kr, 4)
    g = torch.randn(scores.shape, dtype=dtype, generator=_gen(1))
    scores.backward(g)
    gq, gk = torch.ops.malloc_kernels.pkm_topk_backward(g, q, keys, idx)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(gq, qr.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(gk, kr.grad, rtol=tol, atol=tol)


def _gather_inputs(m, dv, n, e, dtype, seed=0, idx_dtype=torch.int64):
    g = _gen(seed)
    values = torch.randn(m, dv, generator=g, dtype=dtype)
    idx = torch.randint(0, m, (n, e), generator=g).to(idx_dtype)
    w = torch.randn(n, e, generator=g, dtype=dtype)
    grad_out = torch.randn(n, dv, generator=g, dtype=dtype)
    return values, idx, w, grad_out


@CPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m,dv,n,e", [(1, 1, 1, 1), (50, 37, 17, 9), (300, 64, 33, 128), (97, 100, 5, 3)])
@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32])
def test_cpu_gather_forward_backward(dtype, m, dv, n, e, idx_dtype, cpu_isa):
    values, idx, w, go = _gather_inputs(m, dv, n, e, dtype, seed=m + e, idx_dtype=idx_dtype)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    out = torch.ops.malloc_kernels.pkm_gather(values, idx, w)
    torch.testing.assert_close(out, R.pkm_gather(values.double(), idx, w.double()).to(dtype), rtol=tol, atol=tol)
    gw, rows, grows = torch.ops.malloc_kernels.pkm_gather_backward(go, values, idx, w)
    rgw, rrows, rgrows = R.pkm_gather_backward(go.double(), values.double(), idx, w.double())
    assert torch.equal(rows, rrows)
    torch.testing.assert_close(gw, rgw.to(dtype), rtol=tol, atol=tol)
    torch.testing.assert_close(grows, rgrows.to(dtype), rtol=tol, atol=tol)


@CPU
@pytest.mark.parametrize("dv", [64, 130])
@pytest.mark.parametrize("skew", [False, True])
def test_cpu_gather_parallel_paths(dv, skew, cpu_isa):
    # Large enough for the OpenMP team (row-range partition of the counting sort, dynamic row chunks), with Dv = 64
    # (one full register block) and 130 (two full blocks + a masked tail). skew: half the entries hit 7 rows at both
    # ends of the table, so one thread's row range holds most entries and some rows have hundreds of them.
    m, n, e = 6000, 300, 40
    values, idx, w, go = _gather_inputs(m, dv, n, e, torch.float32, seed=dv + skew)
    if skew:
        hot = torch.tensor([0, 1, 2, m - 4, m - 3, m - 2, m - 1])
        idx[:, ::2] = hot[torch.randint(0, hot.numel(), (n, (e + 1) // 2), generator=_gen(5))]
    out = torch.ops.malloc_kernels.pkm_gather(values, idx, w)
    torch.testing.assert_close(out, R.pkm_gather(values.double(), idx, w.double()).float(), rtol=2e-5, atol=2e-5)
    gw, rows, grows = torch.ops.malloc_kernels.pkm_gather_backward(go, values, idx, w)
    rgw, rrows, rgrows = R.pkm_gather_backward(go.double(), values.double(), idx, w.double())
    assert torch.equal(rows, rrows)
    torch.testing.assert_close(gw, rgw.float(), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(grows, rgrows.float(), rtol=2e-5, atol=1e-4)


@CPU
def test_cpu_gather_backward_reused_output_block_is_overwritten():
    # grad_rows >= 8 MB comes from a huge-page block that is reused once freed: a block freed by one call and
    # reused by the next (different data, different number of touched rows) must hold only the new call's result.
    a = _gather_inputs(30000, 128, 500, 64, torch.float32, seed=21)
    b = _gather_inputs(30000, 128, 520, 64, torch.float32, seed=22)
    first = torch.ops.malloc_kernels.pkm_gather_backward(a[3], a[0], a[1], a[2])
    assert first[2].numel() * 4 >= 8 << 20
    kept = first[2].clone()
    del first
    gw, rows, grows = torch.ops.malloc_kernels.pkm_gather_backward(b[3], b[0], b[1], b[2])
    rgw, rrows, rgrows = R.pkm_gather_backward(b[3].double(), b[0].double(), b[1], b[2].double())
    assert torch.equal(rows, rrows)
    torch.testing.assert_close(grows, rgrows.float(), rtol=2e-5, atol=2e-5)
    again = torch.ops.malloc_kernels.pkm_gather_backward(a[3], a[0], a[1], a[2])[2]  # while b's block is alive
    assert torch.equal(again, kept)


@CPU
def test_cpu_gather_empty_and_noncontiguous():
    values, idx, w, go = _gather_inputs(20, 6, 0, 4, torch.float32)
    assert torch.ops.malloc_kernels.pkm_gather(values, idx, w).shape == (0, 6)
    gw, rows, grows = torch.ops.malloc_kernels.pkm_gather_backward(go, values, idx, w)
    assert gw.shape == (0, 4) and rows.numel() == 0 and grows.shape == (0, 6)
    values, idx, w, go = _gather_inputs(20, 6, 7, 4, torch.float64, seed=2)
    vt = values.t().contiguous().t()
    wt = w.t().contiguous().t()
    torch.testing.assert_close(torch.ops.malloc_kernels.pkm_gather(vt, idx, wt), R.pkm_gather(values, idx, w))


@CPU
def test_cpu_gather_backward_is_deterministic():
    values, idx, w, go = _gather_inputs(40, 33, 200, 16, torch.float32, seed=9)
    a = torch.ops.malloc_kernels.pkm_gather_backward(go, values, idx, w)
    b = torch.ops.malloc_kernels.pkm_gather_backward(go, values, idx, w)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# ---- autograd: gradcheck float64, sparse gradient ----------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_topk_scores(backend):
    q, keys = _search_inputs(5, 2, 6, 7, torch.float64, seed=11)
    q.requires_grad_()
    keys.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: ops.pkm_topk(a, b, 3, backend=backend)[0], (q, keys))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_gather(backend):
    values, idx, w, _ = _gather_inputs(25, 5, 4, 6, torch.float64, seed=12)
    values.requires_grad_()
    w.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda v, ww: ops.pkm_gather(v, idx, ww, sparse_grad=False, backend=backend), (values, w))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_full_lookup_queries_keys_values(backend):
    q, keys = _search_inputs(3, 2, 6, 5, torch.float64, seed=13)
    values = torch.randn(25, 2, dtype=torch.float64, generator=_gen(14))
    for t in (q, keys, values):
        t.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b, v: ops.pkm_lookup(a, b, v, 3, scale=0.7, sparse_grad=False, backend=backend), (q, keys, values),
        fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_value_grad_touches_only_selected_rows(backend):
    values, idx, w, go = _gather_inputs(200, 7, 9, 5, torch.float64, seed=15)
    values.requires_grad_()
    out = ops.pkm_gather(values, idx, w, backend=backend)
    (grad,) = torch.autograd.grad(out, values, go)
    assert grad.layout == torch.sparse_coo and grad.is_coalesced()
    assert torch.equal(grad.indices()[0], torch.unique(idx))
    dense = R.pkm_gather_naive(values.detach(), idx, w, go)[2]
    torch.testing.assert_close(grad.to_dense(), dense, rtol=1e-12, atol=1e-12)
    untouched = torch.ones(200, dtype=torch.bool)
    untouched[idx.reshape(-1)] = False
    assert (dense[untouched] == 0).all()


@CPU
def test_sparse_grad_with_sparse_adam_updates_only_selected_rows():
    values = torch.nn.Parameter(torch.randn(100, 4))
    idx = torch.randint(0, 100, (6, 3), generator=_gen(3))
    w = torch.rand(6, 3, generator=_gen(4))
    before = values.detach().clone()
    opt = torch.optim.SparseAdam([values], lr=0.1)
    ops.pkm_gather(values, idx, w, backend="cpu").square().sum().backward()
    assert values.grad.is_sparse
    opt.step()
    changed = (values.detach() != before).any(dim=1)
    touched = torch.zeros(100, dtype=torch.bool)
    touched[idx.reshape(-1)] = True
    assert torch.equal(changed, touched)


# ---- opcheck ------------------------------------------------------------------------------------------------------

@CPU
def test_opcheck_all_ops():
    q, keys = _search_inputs(6, 2, 8, 9, torch.float32, seed=21)
    torch.library.opcheck(torch.ops.malloc_kernels.pkm_topk, (q, keys, 4))
    scores, idx = torch.ops.malloc_kernels.pkm_topk(q, keys, 4)
    torch.library.opcheck(torch.ops.malloc_kernels.pkm_topk_backward, (torch.randn_like(scores), q, keys, idx))
    values, gidx, w, go = _gather_inputs(30, 5, 6, 4, torch.float32, seed=22)
    torch.library.opcheck(torch.ops.malloc_kernels.pkm_gather, (values, gidx, w))
    torch.library.opcheck(torch.ops.malloc_kernels.pkm_gather_backward, (go, values, gidx, w))


# ---- bad arguments --------------------------------------------------------------------------------------------------

def test_bad_search_arguments_name_the_argument():
    q, keys = _search_inputs(3, 2, 6, 5, torch.float32)
    with pytest.raises(ValueError, match="k must be"):
        ops.pkm_topk(q, keys, 6)
    with pytest.raises(ValueError, match="k must be"):
        ops.pkm_topk(q, keys, 0)
    with pytest.raises(TypeError, match="k must be an int"):
        ops.pkm_topk(q, keys, 2.0)
    with pytest.raises(ValueError, match="Dk must be even"):
        ops.pkm_topk(torch.randn(3, 2, 5), keys, 2)
    with pytest.raises(ValueError, match="subkeys"):
        ops.pkm_topk(q, keys[:, :, :, :2], 2)
    with pytest.raises(ValueError, match="query must be"):
        ops.pkm_topk(q[0], keys, 2)
    with pytest.raises(TypeError, match="dtype"):
        ops.pkm_topk(q.double(), keys, 2)
    with pytest.raises(ValueError, match="backend"):
        ops.pkm_topk(q, keys, 2, backend="gpu")


def test_bad_gather_arguments_name_the_argument():
    values, idx, w, _ = _gather_inputs(10, 3, 4, 2, torch.float32)
    with pytest.raises(ValueError, match="indices must lie"):
        ops.pkm_gather(values, idx + 10, w)
    with pytest.raises(ValueError, match="indices must lie"):
        ops.pkm_gather(values, idx - 11, w)
    with pytest.raises(ValueError, match="weights must"):
        ops.pkm_gather(values, idx, w[:, :1])
    with pytest.raises(TypeError, match="indices must be int"):
        ops.pkm_gather(values, idx.float(), w)
    with pytest.raises(TypeError, match="dtype"):
        ops.pkm_gather(values, idx, w.double())
    with pytest.raises(ValueError, match="values must be"):
        ops.pkm_gather(values[0], idx, w)
    with pytest.raises(TypeError, match="sparse_grad"):
        ops.pkm_gather(values, idx, w, sparse_grad=1)


@CPU
def test_cpu_ops_raise_value_and_type_errors():
    values, idx, w, go = _gather_inputs(10, 3, 4, 2, torch.float32)
    with pytest.raises(ValueError, match="indices must lie"):
        torch.ops.malloc_kernels.pkm_gather(values, idx + 10, w)
    with pytest.raises(TypeError, match="values must be float32 or float64"):
        torch.ops.malloc_kernels.pkm_gather(values.half(), idx, w.half())
    with pytest.raises(ValueError, match="grad_out must be"):
        torch.ops.malloc_kernels.pkm_gather_backward(go[:, :2], values, idx, w)
    q, keys = _search_inputs(3, 2, 6, 5, torch.float32)
    with pytest.raises(ValueError, match="k must be in"):
        torch.ops.malloc_kernels.pkm_topk(q, keys, 9)
    with pytest.raises(ValueError, match="subkeys shape"):
        torch.ops.malloc_kernels.pkm_topk(q, keys[:1], 2)
    with pytest.raises(ValueError, match="backend='cpu' cannot run this call: .*float32/float64"):
        ops.pkm_gather(values.half(), idx, w.half(), backend="cpu")


# ---- slot usage ----------------------------------------------------------------------------------------------------

def test_slot_usage_statistics():
    m = 16
    balanced = R.slot_usage(torch.arange(m).repeat(3), m)
    assert balanced["fraction_hit"] == 1.0 and abs(balanced["kl_to_uniform"]) < 1e-12
    collapsed = R.slot_usage(torch.full((50,), 3), m)
    assert collapsed["fraction_hit"] == 1 / m
    assert abs(collapsed["kl_to_uniform"] - torch.log(torch.tensor(16.0, dtype=torch.float64)).item()) < 1e-12
    half = R.slot_usage(torch.arange(8), m)
    assert half["fraction_hit"] == 0.5 and abs(half["kl_to_uniform"] - torch.log(torch.tensor(2.0)).item()) < 1e-6
    assert R.slot_usage(torch.arange(0), m)["kl_to_uniform"] == 0.0
    with pytest.raises(ValueError, match="num_slots"):
        R.slot_usage(torch.arange(3), 0)
    with pytest.raises(ValueError, match="indices must lie"):
        R.slot_usage(torch.arange(3), 2)
