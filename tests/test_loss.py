"""Fused linear cross-entropy (malloc_kernels.loss): the C++ row kernel and the torch row path vs the float64
reference, chunk boundaries, ignore_index, non-contiguous inputs, gradients (tolerance: at most 2x PyTorch's own
float32 error + a small floor), opcheck, bad arguments, and the recommenders' full-softmax loss."""
import pytest
import torch
import torch.nn.functional as F

from malloc_kernels.loss import cross_entropy_rows_, linear_cross_entropy, ops, reference as R

CPU = pytest.mark.skipif(not ops.cpu_available(), reason="C++ extension not built")
BACKENDS = [pytest.param("cpu", marks=CPU), "torch"]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _assert_within_torch_error(ours, torch_f32, exact, floor):
    """FlashAttention's rule: our error vs the float64 truth is at most twice torch's own float32 error (+ floor)."""
    ours_err = (ours.double() - exact).abs().max().item()
    torch_err = (torch_f32.double() - exact).abs().max().item()
    assert ours_err <= 2 * torch_err + floor, (ours_err, torch_err)


# ---- cross_entropy_rows_ -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("r,c", [(1, 1), (5, 7), (3, 8), (33, 9), (17, 3706), (2, 20000)])
def test_cross_entropy_rows_matches_reference(backend, dtype, r, c):
    g = _gen(r * 31 + c)
    z = (torch.randn(r, c, generator=g) * 4).to(dtype)
    t = torch.randint(0, c, (r,), generator=g)
    loss_ref, grad_ref = R.cross_entropy_rows(z, t)
    out = z.clone()
    loss = cross_entropy_rows_(out, t, backend=backend)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(loss.double(), loss_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(out.double(), grad_ref, rtol=tol, atol=tol)
    assert loss.dtype == dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_rows_extreme_logits_and_row_stride(backend):
    """Huge spreads (exp underflows to 0 for all but the max), a row stride wider than the row, untouched padding."""
    g = _gen(1)
    wide = torch.randn(6, 45, generator=g) * 1e4
    wide[2] = 0.0  # a constant row: uniform softmax
    z = wide[:, :37]
    t = torch.tensor([0, 36, 5, 17, 3, 9])
    loss_ref, grad_ref = R.cross_entropy_rows(z, t)
    pad_before = wide[:, 37:].clone()
    loss = cross_entropy_rows_(z, t, backend=backend)
    torch.testing.assert_close(loss.double(), loss_ref, rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(z.double(), grad_ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(wide[:, 37:], pad_before)
    assert torch.isfinite(loss).all()


@CPU
def test_cross_entropy_rows_bad_arguments():
    op = torch.ops.malloc_kernels.cross_entropy_rows_
    z, t = torch.randn(4, 5), torch.tensor([0, 1, 2, 4])
    with pytest.raises(TypeError, match="logits"):
        op(z.half(), t)
    with pytest.raises(TypeError, match="targets"):
        op(z, t.int())
    with pytest.raises(ValueError, match="targets"):
        op(z, torch.tensor([0, 1, 2, 5]))
    with pytest.raises(ValueError, match="targets"):
        op(z, torch.tensor([0, -1, 2, 3]))
    with pytest.raises(ValueError, match="targets"):
        op(z, t[:3])
    with pytest.raises(ValueError, match="logits"):
        op(torch.randn(5, 4).t(), t)  # columns not contiguous: the kernel writes rows in place
    with pytest.raises(ValueError, match="logits"):
        op(torch.randn(4), t)


@CPU
def test_cross_entropy_rows_opcheck():
    z = torch.randn(7, 13)
    t = torch.randint(0, 13, (7,))
    torch.library.opcheck(torch.ops.malloc_kernels.cross_entropy_rows_, (z, t))


# ---- linear_cross_entropy ----------------------------------------------------------------------------------------

def _problem(t_rows, d, c, seed, dtype=torch.float32):
    g = _gen(seed)
    h = torch.randn(t_rows, d, generator=g, dtype=dtype)
    w = torch.randn(c, d, generator=g, dtype=dtype) / d ** 0.5 * 3
    t = torch.randint(0, c, (t_rows,), generator=g)
    return h, w, t


def _grads(fn, h, w, t):
    h = h.detach().requires_grad_()
    w = w.detach().requires_grad_()
    loss = fn(h, w, t)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t_rows,d,c,chunk", [(1, 8, 3, None), (37, 16, 103, 7), (64, 64, 3706, None),
                                              (65, 64, 3706, 64), (300, 24, 501, 1), (9, 5, 11, 100)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_cross_entropy_matches_reference(backend, t_rows, d, c, chunk, reduction):
    h, w, t = _problem(t_rows, d, c, seed=t_rows + c)
    exact = _grads(lambda a, b, y: R.linear_cross_entropy(a, b, y, reduction=reduction), h, w, t)
    torch32 = _grads(lambda a, b, y: F.cross_entropy(a @ b.t(), y, reduction=reduction), h, w, t)
    ours = _grads(lambda a, b, y: linear_cross_entropy(a, b, y, reduction=reduction, chunk_size=chunk,
                                                       backend=backend), h, w, t)
    for o, p, e in zip(ours, torch32, exact):
        assert o.dtype == torch.float32 and o.shape == e.shape
        _assert_within_torch_error(o, p, e, floor=1e-6 * (1 + e.abs().max().item()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_cross_entropy_ignore_index_noncontiguous_and_partial_grads(backend):
    h_full, w_full, t = _problem(50, 12, 40, seed=3)
    h = h_full.t().contiguous().t()  # column-major view: non-contiguous
    w_big = torch.randn(41, 12, generator=_gen(4))
    t = t.clone()
    t[::7] = -100
    assert not h.is_contiguous()
    for need_h, need_w in [(True, True), (True, False), (False, True)]:
        hh = h.detach().requires_grad_(need_h)
        wb = w_big.detach().requires_grad_(need_w)
        hr = h.detach().double().requires_grad_(need_h)
        wr = w_big.detach().double().requires_grad_(need_w)
        loss = linear_cross_entropy(hh, wb[1:], t, backend=backend, chunk_size=8)  # a row-sliced weight
        ref = R.linear_cross_entropy(hr, wr[1:], t)
        loss.backward()
        ref.backward()
        torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-5)
        if need_h:
            torch.testing.assert_close(hh.grad.double(), hr.grad, rtol=1e-4, atol=1e-6)
            assert not hh.grad[::7].any()  # ignored rows get no gradient
        if need_w:
            torch.testing.assert_close(wb.grad.double(), wr.grad, rtol=1e-4, atol=1e-6)
            assert not wb.grad[0].any()


def test_linear_cross_entropy_no_grad_and_all_ignored():
    h, w, t = _problem(20, 8, 9, seed=5)
    with torch.no_grad():
        loss = linear_cross_entropy(h.requires_grad_(), w, t)
    assert not loss.requires_grad
    torch.testing.assert_close(loss.double(), R.linear_cross_entropy(h, w, t), rtol=1e-5, atol=1e-6)
    none = torch.full_like(t, -100)
    assert torch.isnan(linear_cross_entropy(h, w, none))  # torch's mean over no rows
    assert linear_cross_entropy(h, w, none, reduction="sum").item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_cross_entropy_gradcheck_float64(backend):
    h, w, t = _problem(6, 4, 5, seed=6, dtype=torch.float64)
    torch.autograd.gradcheck(lambda a, b: linear_cross_entropy(a, b, t, chunk_size=4, backend=backend),
                             (h.requires_grad_(), w.requires_grad_()))


def test_linear_cross_entropy_bad_arguments():
    h, w, t = _problem(4, 6, 5, seed=7)
    with pytest.raises(TypeError, match="hidden"):
        linear_cross_entropy(h.long(), w, t)
    with pytest.raises(ValueError, match="weight"):
        linear_cross_entropy(h, w[:, :5], t)
    with pytest.raises(TypeError, match="weight"):
        linear_cross_entropy(h, w.double(), t)
    with pytest.raises(TypeError, match="targets"):
        linear_cross_entropy(h, w, t.int())
    with pytest.raises(TypeError, match="targets"):
        linear_cross_entropy(h, w, t[:3])
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(h, w, torch.tensor([0, 1, 5, 2]))
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, t, reduction="none")
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(h, w, t, chunk_size=0)
    with pytest.raises(ValueError, match="backend"):
        linear_cross_entropy(h, w, t, backend="cuda")


# ---- the recommenders' full-softmax loss ---------------------------------------------------------------------------

def test_model_full_softmax_loss_equals_unfused_cross_entropy():
    from malloc_kernels.models import HSTU
    torch.manual_seed(0)
    model = HSTU(n_items=50, d_model=16, n_layers=1, n_heads=2, max_len=12, dropout=0.0)
    hidden = torch.randn(30, 16, requires_grad=True)
    targets = torch.randint(0, 51, (30,))  # 0 = padding: excluded
    loss = model.loss(hidden, targets, full_softmax=True)
    loss.backward()
    g_h, g_e = hidden.grad.clone(), model.item_emb.weight.grad.clone()
    hidden.grad = None
    model.zero_grad()
    valid = targets > 0
    items = F.normalize(model.item_emb.weight[1:], dim=-1) / model.cfg.temperature
    ref = F.cross_entropy(F.normalize(hidden[valid], dim=-1) @ items.t(), targets[valid] - 1)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_h, hidden.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(g_e, model.item_emb.weight.grad, rtol=1e-4, atol=1e-7)
