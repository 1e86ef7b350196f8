"""The WKV op (RWKV-4's recurrence, ``malloc_kernels.ops.wkv``): the C++ kernels (every ISA variant this CPU runs)
against the float64 reference loop, forward and backward, on odd lengths, empty users, ragged batches,
non-contiguous inputs and carried states; gradcheck in float64; the state-splitting identity serving relies on;
refusals naming the argument."""
import pytest
import torch

from malloc_kernels.ops import wkv as wkv_ops
from malloc_kernels.ops.wkv import empty_state, wkv
from malloc_kernels.reference import wkv as ref

from tolerance import within_twice_torch_error

needs_cpp = pytest.mark.needs_ext("wkv", "wkv_backward")


def _offsets(lengths):
    o = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    o[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0)
    return o


def _inputs(lengths, C, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    w = -torch.exp(torch.randn(C, generator=g, dtype=torch.float64)).to(dtype)
    u = torch.randn(C, generator=g, dtype=torch.float64).to(dtype)
    k = (scale * torch.randn(T, C, generator=g, dtype=torch.float64)).to(dtype)
    v = torch.randn(T, C, generator=g, dtype=torch.float64).to(dtype)
    return w, u, k, v, _offsets(lengths)


def _state(lengths, C, dtype, seed=1):
    """A realistic carried state: the reference run over random histories of these lengths."""
    w, u, k, v, off = _inputs(lengths, C, torch.float64, seed=seed)
    return ref.wkv(w, u, k, v, off)[1].to(dtype)


SHAPES = [([1], 1), ([17], 7), ([97, 1, 17], 33), ([0, 5, 0, 3], 64), ([2, 0], 32), ([0], 5), ([40, 13], 65)]


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lengths,C", SHAPES)
@pytest.mark.parametrize("carried", [False, True])
def test_forward_matches_reference(cpu_isa, dtype, lengths, C, carried):
    w, u, k, v, off = _inputs(lengths, C, dtype)
    st = _state([3 + i for i in range(len(lengths))], C, dtype) if carried else None
    y, out = wkv(w, u, k, v, off, st, backend="cpu")
    ey, eout = ref.wkv(w, u, k, v, off, st)
    ty, tout = ref.wkv(w, u, k, v, off, st, compute_dtype=dtype)
    assert y.dtype == out.dtype == dtype and y.shape == k.shape and out.shape == (len(lengths), 3, C)
    n = max(lengths) + 1
    if dtype == torch.float64:
        torch.testing.assert_close(y, ey, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out, eout, rtol=1e-12, atol=1e-12)
    else:
        within_twice_torch_error(y, ey, ty, dtype, "y", n=n)
        fin = torch.isfinite(eout)
        assert torch.equal(torch.isfinite(out), fin)   # -inf only where a user is still empty
        within_twice_torch_error(out[fin], eout[fin], tout[fin], dtype, "state", n=n)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lengths,C", SHAPES)
@pytest.mark.parametrize("carried", [False, True])
def test_backward_matches_reference(cpu_isa, dtype, lengths, C, carried):
    w, u, k, v, off = _inputs(lengths, C, dtype, seed=3)
    st = _state([2 + i for i in range(len(lengths))], C, dtype) if carried else None
    gy = torch.randn(k.shape, dtype=dtype, generator=torch.Generator().manual_seed(5))

    def grads(fn, dt):
        xs = [t.detach().to(dt).requires_grad_() for t in (w, u, k, v)]
        y = fn(*xs)
        if y.requires_grad:   # the reference's output for no tokens at all is a constant: every gradient is 0
            torch.autograd.backward(y, gy.to(dt))
        # a tensor y does not depend on (w with a single token and no state) has no grad: it is 0
        return [torch.zeros(x.shape, dtype=torch.float64) if x.grad is None else x.grad.to(torch.float64) for x in xs]

    got = grads(lambda *a: wkv(*a, off, st, backend="cpu")[0], dtype)
    exact = grads(lambda *a: ref.wkv(*a, off, None if st is None else st.double())[0], torch.float64)
    for name, g, e in zip("wukv", got, exact):
        if dtype == torch.float64:
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10, msg=f"grad {name}")
        else:
            same = grads(lambda *a: ref.wkv(*a, off, st, compute_dtype=dtype)[0], dtype)["wukv".index(name)]
            within_twice_torch_error(g, e, same, dtype, f"grad {name}", n=k.shape[0] + 1)


@needs_cpp
@pytest.mark.parametrize("carried", [False, True])
def test_gradcheck_float64(carried):
    w, u, k, v, off = _inputs([3, 0, 5, 1], 5, torch.float64, seed=7)
    st = _state([2, 0, 4, 1], 5, torch.float64) if carried else None
    xs = [t.clone().requires_grad_() for t in (w, u, k, v)]
    assert torch.autograd.gradcheck(lambda *a: wkv(*a, off, st, backend="cpu")[0], xs)


@needs_cpp
def test_non_contiguous_inputs():
    w, u, k, v, off = _inputs([17, 4], 6, torch.float64, seed=9)
    big_k = torch.zeros(k.shape[0], 2 * k.shape[1], dtype=torch.float64)
    big_k[:, ::2] = k
    vt = v.t().contiguous().t()                       # column-major
    wb = torch.stack([w, w], 1)[:, 0]                  # stride 2
    y, out = wkv(wb, u, big_k[:, ::2], vt, off, backend="cpu")
    ey, eout = ref.wkv(w, u, k, v, off)
    torch.testing.assert_close(y, ey, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, eout, rtol=1e-12, atol=1e-12)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_splitting_a_sequence_at_a_carried_state_is_exact(dtype):
    """wkv(history + request) == wkv(request, state=wkv(history).state) bit for bit: the serving identity."""
    lengths, C = [1000, 17, 1, 0], 40
    w, u, k, v, off = _inputs(lengths, C, dtype, seed=11)
    y, out = wkv(w, u, k, v, off, backend="cpu")
    cut = [600, 9, 0, 0]
    hi, ri = [], []
    for b, n in enumerate(lengths):
        s = int(off[b])
        hi += list(range(s, s + cut[b]))
        ri += list(range(s + cut[b], s + n))
    _, st = wkv(w, u, k[hi], v[hi], _offsets(cut), backend="cpu")
    y2, out2 = wkv(w, u, k[ri], v[ri], _offsets([n - c for n, c in zip(lengths, cut)]), st, backend="cpu")
    assert torch.equal(y2, y[ri]) and torch.equal(out2, out)


@needs_cpp
def test_users_are_isolated_and_long_sequences_stay_finite():
    w, u, k, v, off = _inputs([3000, 5], 8, torch.float32, seed=13, scale=30.0)   # exponents up to ~+-100
    y, out = wkv(w, u, k, v, off, backend="cpu")
    assert bool(torch.isfinite(y).all()) and bool(torch.isfinite(out).all())
    k2, v2 = k.clone(), v.clone()
    k2[:3000], v2[:3000] = 1e3, -7.0                     # another user's tokens never leak
    y2, out2 = wkv(w, u, k2, v2, off, backend="cpu")
    assert torch.equal(y2[3000:], y[3000:]) and torch.equal(out2[1], out[1])
    ey, _ = ref.wkv(w[None].double()[0], u.double(), k[3000:].double(), v[3000:].double(), _offsets([5]))
    torch.testing.assert_close(y[3000:].double(), ey, rtol=1e-5, atol=1e-5)


def test_reference_backend_and_auto_agree():
    w, u, k, v, off = _inputs([4, 0, 2], 3, torch.float64)
    y, out = wkv(w, u, k, v, off, backend="reference")
    y2, out2 = wkv(w, u, k, v, off)
    torch.testing.assert_close(y, y2, rtol=1e-12, atol=1e-12)
    assert torch.equal(torch.isinf(out), torch.isinf(out2))
    assert torch.equal(out[1], empty_state(1, 3)[0])      # an empty user keeps the empty state


def test_bad_arguments_raise_naming_them():
    w, u, k, v, off = _inputs([2, 3], 4, torch.float32)
    with pytest.raises(TypeError, match="v must have k's dtype"):
        wkv(w, u, k, v.double(), off)
    with pytest.raises(ValueError, match=r"w must be \[C=4\]"):
        wkv(w[:3], u, k, v, off)
    with pytest.raises(ValueError, match="v must have k's shape"):
        wkv(w, u, k, v[:4], off)
    with pytest.raises(ValueError, match="offsets must start at 0"):
        wkv(w, u, k, v, torch.tensor([0, 4, 3], dtype=torch.int64))
    with pytest.raises(ValueError, match="offsets must be an int64"):
        wkv(w, u, k, v, off.int())
    with pytest.raises(ValueError, match=r"state must be a torch.float32 tensor \[B=2, 3, C=4\]"):
        wkv(w, u, k, v, off, torch.zeros(2, 2, 4))
    with pytest.raises(ValueError, match="state: gradients"):
        wkv(w, u, k, v, off, empty_state(2, 4, torch.float32).requires_grad_())
    with pytest.raises(ValueError, match="backend must be one of"):
        wkv(w, u, k, v, off, backend="gpu")


@needs_cpp
def test_the_op_itself_checks_every_extent():
    w, u, k, v, off = _inputs([2, 3], 4, torch.float32)
    st = empty_state(2, 4, torch.float32)
    op = torch.ops.malloc_kernels.wkv
    with pytest.raises(ValueError, match="offsets\\[-1\\] must equal"):
        op(w, u, k, v, torch.tensor([0, 2, 9]), st, False)
    with pytest.raises(ValueError, match="non-decreasing"):
        op(w, u, k, v, torch.tensor([0, 6, 5]), st, False)
    with pytest.raises(ValueError, match="state must be"):
        op(w, u, k, v, off, st[:1], False)
    with pytest.raises(TypeError, match="u must have k's dtype"):
        op(w, u.double(), k, v, off, st, False)
    y, aux, out = op(w, u, k, v, off, st, True)
    with pytest.raises(ValueError, match="aux must be"):
        torch.ops.malloc_kernels.wkv_backward(w, u, k, v, off, st, y, aux[:1], y)
    with pytest.raises(ValueError, match="grad_y must have"):
        torch.ops.malloc_kernels.wkv_backward(w, u, k, v, off, st, y, aux, y[:2])


@needs_cpp
def test_opcheck():
    w, u, k, v, off = _inputs([3, 0, 2], 5, torch.float64)
    st = _state([1, 0, 2], 5, torch.float64)
    torch.library.opcheck(torch.ops.malloc_kernels.wkv.default, (w, u, k, v, off, st, True))
    y, aux, _ = torch.ops.malloc_kernels.wkv(w, u, k, v, off, st, True)
    torch.library.opcheck(torch.ops.malloc_kernels.wkv_backward.default, (w, u, k, v, off, st, y, aux, y.clone()))
    assert wkv_ops.cpu_available()
