"""The C++ training self-attention (ops/train_attention.py, csrc/cpu/train_attention*.cpp), both kinds (HSTU pointwise,
softmax): output and every gradient (q, k, v, position and time bias tables) vs the float64 reference on ragged
batches (empty and one-token users, lengths across the kernel's 4-row / 8-key blocks), GQA/MQA, causal and not,
constant HSTU norm, odd head dims, non-contiguous inputs; float32 within 2x PyTorch's own float32 error
(FlashAttention's rule); gradcheck, opcheck, routing of ``backend="auto"``/``"cpu"`` under autograd, bad arguments,
and whole HSTU / SASRec training steps."""
import pytest
import torch

import malloc_kernels as mk
from malloc_kernels.core import extension
from malloc_kernels.ops import train_attention
from malloc_kernels.ops.backends import select_backend
from malloc_kernels.core.validate import validate_call

pytestmark = pytest.mark.skipif(not extension.has_op("self_attention_fwd")[0], reason="C++ extension not built")
F64 = torch.float64


def _batch(lens, Hq, Hkv, D, dtype, seed, time=True, pos_heads=True, P=7, NT=6):
    g = torch.Generator().manual_seed(seed)
    off = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int64)
    T = int(off[-1])
    q = torch.randn(T, Hq, D, generator=g, dtype=F64).to(dtype)
    k = torch.randn(T, Hkv, D, generator=g, dtype=F64).to(dtype)
    v = torch.randn(T, Hkv, D, generator=g, dtype=F64).to(dtype)
    pb = torch.randn(*((Hq, P) if pos_heads else (P,)), generator=g, dtype=F64)
    pos = torch.cat([torch.arange(n) * 2 + 1 for n in lens]).to(torch.int64) if T else torch.zeros(0, dtype=torch.int64)
    tb = ts = None
    if time:
        tb = torch.randn(NT, generator=g, dtype=F64)
        gaps = torch.randint(0, 5000, (T,), generator=g)
        ts = torch.cat([gaps[a:b].cumsum(0) for a, b in zip(off[:-1].tolist(), off[1:].tolist())]) if T else gaps
    return q, k, v, off, pos, pb, ts, tb


def _run(backend, q, k, v, off, pos, pb, ts, tb, causal=True, norm="original", grad_seed=0, kind="hstu"):
    """Output and gradients of (q, k, v, pos_bias[, time_bias]) through malloc_kernels.attention."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, pb) + ((tb,) if tb is not None else ())]
    kw = dict(is_causal=causal, kind=kind, offsets=off, query_positions=pos, pos_bias=leaves[3],
              time_bias=leaves[4] if tb is not None else None, query_timestamps=ts if tb is not None else None,
              hstu_norm=norm, backend=backend)
    out = mk.attention(*leaves[:3], **kw)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=F64).to(out.dtype)
    grads = torch.autograd.grad(out, leaves, g)
    return [out.detach()] + list(grads)


LENS = [[5, 0, 1, 17, 9], [1], [4, 8, 3, 16, 33, 2], [0, 0, 40]]


@pytest.mark.parametrize("kind", ["hstu", "softmax"])
@pytest.mark.parametrize("lens", LENS)
@pytest.mark.parametrize("Hq,Hkv,D", [(2, 2, 8), (4, 2, 6), (3, 1, 12), (2, 1, 32)])
@pytest.mark.parametrize("causal", [True, False])
def test_float64_matches_reference(lens, Hq, Hkv, D, causal, kind):
    args = _batch(lens, Hq, Hkv, D, F64, seed=sum(lens) + Hq + D)
    ours = _run("cpu", *args, causal=causal, kind=kind)
    ref = _run("reference", *args, causal=causal, kind=kind)
    for name, a, b in zip(["out", "dq", "dk", "dv", "dpos_bias", "dtime_bias"], ours, ref):
        # the validated bias tables are float32 (core/validate.py): their gradients pass through float32 on both paths
        tol = 2e-6 if name.endswith("bias") else 1e-12
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * (1 + b.abs().max().item()), msg=name)


@pytest.mark.parametrize("kind", ["hstu", "softmax"])
@pytest.mark.parametrize("lens", LENS[:3])
@pytest.mark.parametrize("Hq,Hkv,D", [(2, 2, 32), (4, 1, 16)])
def test_float32_within_twice_torch_error(lens, Hq, Hkv, D, kind):
    args = _batch(lens, Hq, Hkv, D, torch.float32, seed=3 * sum(lens) + D)
    exact = _run("reference", *[a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args],
                 kind=kind)
    ours = _run("cpu", *args, kind=kind)
    torch32 = _run("reference", *args, kind=kind)
    for name, o, t, e in zip(["out", "dq", "dk", "dv", "dpos_bias", "dtime_bias"], ours, torch32, exact):
        ours_err = (o.double() - e.double()).abs().max().item()
        torch_err = (t.double() - e.double()).abs().max().item()
        assert ours_err <= 2 * torch_err + 1e-6 * (1 + e.abs().max().item()), (name, ours_err, torch_err)


@pytest.mark.parametrize("kind,norm", [("hstu", "original"), ("hstu", "kept"), ("hstu", 50), ("softmax", "original")])
def test_constant_norm_shared_bias_and_noncontiguous_inputs(kind, norm):
    q, k, v, off, pos, pb, ts, tb = _batch([6, 3, 11], 4, 2, 8, F64, seed=5, pos_heads=False)
    # non-contiguous views with the same values
    qn = torch.randn(q.shape[0], q.shape[1], 2 * q.shape[2], dtype=F64)[..., ::2].copy_(q)
    kn = k.transpose(0, 1).contiguous().transpose(0, 1)
    assert not qn.is_contiguous() and not kn.is_contiguous()
    ours = _run("cpu", qn, kn, v, off, pos, pb, ts, tb, norm=norm, kind=kind)
    ref = _run("reference", q, k, v, off, pos, pb, ts, tb, norm=norm, kind=kind)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("kind", ["hstu", "softmax"])
def test_direct_op_float64_tables_and_gradcheck(kind):
    """The op with float64 tables (1-D shared and per-head), exact to float64 against the reference (given the same
    float32-rounded tables the reference's validation makes), and gradcheck of the autograd Function."""
    q, k, v, off, pos, pb, ts, tb = _batch([3, 0, 5], 2, 1, 4, F64, seed=9, P=4, NT=5)
    for pos_bias in (pb, pb[0]):
        ref = mk.attention(q, k, v, is_causal=True, scale=0.7, kind=kind, offsets=off, query_positions=pos,
                           pos_bias=pos_bias, time_bias=tb, query_timestamps=ts, backend="reference")
        out = train_attention.self_attention(q, k, v, off, kind=kind, scale=0.7, positions=pos,
                                             pos_bias=pos_bias.float().double(), timestamps=ts,
                                             time_bias=tb.float().double())
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        assert out.dtype == F64

        def fn(a, b, c, d, e):
            return train_attention.self_attention(a, b, c, off, kind=kind, scale=0.7, positions=pos, pos_bias=d,
                                                  timestamps=ts, time_bias=e)
        ins = tuple(t.clone().requires_grad_() for t in (q, k, v, pos_bias, tb))
        assert torch.autograd.gradcheck(fn, ins, eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("kind", ["hstu", "softmax"])
def test_opcheck(kind):
    q, k, v, off, pos, pb, ts, tb = _batch([4, 1, 7], 2, 1, 8, torch.float32, seed=2)
    from malloc_kernels.core.time_buckets import kernel_thresholds
    th = kernel_thresholds(tb.numel())
    pbf, tbf = pb.float(), tb.float()
    ops = torch.ops.malloc_kernels
    out, lse = ops.self_attention_fwd(q, k, v, off, kind, 0.3, True, 0, pos, pbf, ts, tbf, th)
    assert lse.shape == ((q.shape[0], 2) if kind == "softmax" else (0, 2))
    torch.library.opcheck(ops.self_attention_fwd.default, (q, k, v, off, kind, 0.3, True, 0, pos, pbf, ts, tbf, th))
    torch.library.opcheck(ops.self_attention_bwd.default,
                          (torch.randn_like(q), out, lse, q, k, v, off, kind, 0.3, True, 0, pos, pbf, ts, tbf, th))
    torch.library.opcheck(ops.self_attention_fwd.default,
                          (q, k, v, off, kind, 0.3, False, 5, None, None, None, None, None))


def test_routing_under_autograd():
    q, k, v, off, pos, pb, ts, tb = _batch([3, 4], 2, 2, 8, torch.float32, seed=1)
    qg = q.clone().requires_grad_()
    for kind in ("hstu", "softmax"):
        call = validate_call(qg, k, v, is_causal=True, kind=kind, offsets=off, query_positions=pos,
                             pos_bias=pb.float())
        assert select_backend(call)[0] == "cpu"
    lse_call = validate_call(qg, k, v, is_causal=True, offsets=off, return_lse=True)
    assert select_backend(lse_call)[0] == "reference"      # the lse output carries no gradient here
    dense = qg.reshape(1, 7, 2, 8).transpose(1, 2)
    dcall = validate_call(dense, dense, dense, is_causal=True, kind="hstu")
    assert select_backend(dcall)[0] == "reference"          # dense layout: reference under autograd
    with pytest.raises(ValueError, match="inference-only.*jagged"):
        mk.attention(dense, dense, dense, is_causal=True, kind="hstu", backend="cpu")
    with pytest.raises(ValueError, match="inference-only.*dropout"):
        mk.attention(qg, k, v, is_causal=True, offsets=off, dropout_p=0.1, backend="cpu")


def test_bad_arguments_name_the_argument():
    q, k, v, off, pos, pb, ts, tb = _batch([4, 3], 2, 1, 8, torch.float32, seed=4)
    ops = torch.ops.malloc_kernels
    pbf = pb.float()

    def fwd(*a, kind="hstu"):
        return ops.self_attention_fwd(a[0], a[1], a[2], a[3], kind, 0.3, True, *a[4:])
    with pytest.raises(ValueError, match="offsets"):
        fwd(q, k, v, torch.tensor([0, 4, 6]), 0, None, None, None, None, None)
    with pytest.raises(ValueError, match="offsets"):
        fwd(q, k, v, torch.tensor([0, 5, 4, 7]), 0, None, None, None, None, None)
    with pytest.raises(TypeError, match="key"):
        fwd(q, k.double(), v, off, 0, None, None, None, None, None)
    with pytest.raises(TypeError, match="query"):
        fwd(q.half(), k.half(), v.half(), off, 0, None, None, None, None, None)
    with pytest.raises(ValueError, match="pos_bias"):
        fwd(q, k, v, off, 0, pos, torch.zeros(3, 5), None, None, None)
    with pytest.raises(ValueError, match="positions"):
        fwd(q, k, v, off, 0, None, pbf, None, None, None)
    with pytest.raises(ValueError, match="time_bias needs timestamps"):
        fwd(q, k, v, off, 0, pos, pbf, None, tb.float(), None)
    with pytest.raises(ValueError, match="kv heads"):
        fwd(q, torch.randn(7, 3, 8), torch.randn(7, 3, 8), off, 0, None, None, None, None, None)
    with pytest.raises(ValueError, match="norm_const"):
        fwd(q, k, v, off, -1, None, None, None, None, None)
    with pytest.raises(ValueError, match="kind"):
        fwd(q, k, v, off, 0, None, None, None, None, None, kind="linear")
    out, lse = fwd(q, k, v, off, 0, None, None, None, None, None, kind="softmax")
    with pytest.raises(ValueError, match="lse"):
        ops.self_attention_bwd(q, out, lse[:3], q, k, v, off, "softmax", 0.3, True, 0, None, None, None, None, None)


@pytest.mark.parametrize("arch", ["hstu", "sasrec"])
def test_training_step_gradients_match_the_reference(arch):
    """A whole forward + loss + backward of the model with the kernels ("auto") equals the reference path."""
    from malloc_kernels.models import HSTU, SASRec
    torch.manual_seed(0)
    m = (HSTU if arch == "hstu" else SASRec)(30, d_model=16, n_heads=2, n_layers=2, max_len=20, dropout=0.0)
    items = torch.randint(1, 31, (4, 12))
    items[1, 7:] = 0
    items[3, 1:] = 0
    targets = torch.randint(1, 31, (int((items > 0).sum()),))
    grads = {}
    for backend in ("auto", "reference"):
        m.zero_grad()
        m.backend = backend
        hidden = m(items)
        m.loss(hidden, targets, full_softmax=True).backward()
        grads[backend] = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    assert grads["auto"].keys() == grads["reference"].keys()
    assert arch == "sasrec" or "layers.0.pos_bias" in grads["auto"]
    for n in grads["auto"]:
        torch.testing.assert_close(grads["auto"][n], grads["reference"][n], rtol=1e-4, atol=1e-6, msg=n)
