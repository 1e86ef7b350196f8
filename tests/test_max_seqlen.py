"""``max_seqlen_q`` / ``max_seqlen_k``: a jagged call's caller-supplied length bounds (FlashAttention's varlen
arguments), which make the serving step free of host reads (tests/test_triton_launch.py checks that on the real
dispatcher). Here: the arguments are validated (type, sign, a bound below the longest user is refused on every
backend, the data rules they move onto the device still hold), and a call gives the same result with them as
without, on every backend, over the ragged batches of the shared case table (empty users included).
"""
import os

import pytest
import torch

import malloc_kernels
from attention_cases import CASES, build
from malloc_kernels.core import layout
from malloc_kernels.core.validate import validate_call
from malloc_kernels.ops import cpu as cpu_backend
from malloc_kernels.ops import cuda as cuda_backend
from malloc_kernels.reference import run as ref_run

assert os.environ.get("TRITON_INTERPRET") == "1", "conftest must set TRITON_INTERPRET=1 before kernels import"
from malloc_kernels.triton import attention as triton_backend  # noqa: E402

BACKENDS = ("reference", "cpu", "triton")


def _jagged(g, lengths=(3, 0, 5), Hq=4, Hkv=2, D=16):
    T = sum(lengths)
    offsets = torch.tensor([0] + list(lengths)).cumsum(0)
    return torch.randn(T, Hq, D, generator=g), torch.randn(T, Hkv, D, generator=g), offsets


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["max_seqlen_q", "max_seqlen_k"])
def test_bad_bounds_are_refused_naming_them(backend, name):
    q, k, off = _jagged(torch.Generator().manual_seed(0))
    kw = dict(offsets=off, is_causal=True, enable_gqa=True, backend=backend)
    for bad, exc in ((True, TypeError), (2.0, TypeError), (torch.tensor(5), TypeError), ("5", TypeError),
                     (-1, ValueError), (4, ValueError), (0, ValueError)):
        with pytest.raises(exc, match=name):
            malloc_kernels.attention(q, k, k, **{name: bad}, **kw)
    dense = torch.randn(1, 2, 3, 16)
    with pytest.raises(ValueError, match=name):
        malloc_kernels.attention(dense, dense, dense, **{name: 3})


def test_bound_on_separate_key_offsets():
    """With distinct ``key_offsets`` the key bound is its own: ``max_seqlen_k`` below the longest key sequence is
    refused even when ``max_seqlen_q`` holds, and without ``max_seqlen_k`` it is read from the lengths."""
    g = torch.Generator().manual_seed(1)
    q, _, q_off = _jagged(g, (2, 1))
    _, k, k_off = _jagged(g, (6, 0))
    v = torch.randn(k.shape, generator=g)
    kw = dict(offsets=q_off, key_offsets=k_off, enable_gqa=True)
    with pytest.raises(ValueError, match="max_seqlen_k=5"):
        validate_call(q, k, v, max_seqlen_q=2, max_seqlen_k=5, **kw)
    call = validate_call(q, k, v, max_seqlen_q=2, **kw)
    assert (call.max_q_len, call.extents_known, call.max_k_len) == (2, False, 6)
    call = validate_call(q, k, v, max_seqlen_q=2, max_seqlen_k=9, **kw)
    assert (call.max_q_len, call.max_k_len, call.extents_known) == (2, 9, True)


def test_data_rules_hold_on_the_device_path(monkeypatch):
    """The checks that move onto the device with a bound (offsets, the bound, equal request lengths where a cache
    needs them, target counts) still refuse bad data, through ``torch._assert_async`` (on CPU tensors raised as a
    ValueError), and never by reading the data on the host."""
    g = torch.Generator().manual_seed(2)
    q, k, off = _jagged(g, (3, 2))
    asserts = []
    real = torch._assert_async
    monkeypatch.setattr(torch, "_assert_async", lambda t, msg: (asserts.append(msg), real(t, msg))[1])
    cases = {
        "offsets": dict(offsets=torch.tensor([1, 3, 5])),
        "non-decreasing": dict(offsets=torch.tensor([0, 4, 3, 5]), max_seqlen_q=5),
        "jagged length": dict(offsets=torch.tensor([0, 3, 4])),
        "key_offsets": dict(key_offsets=torch.tensor([0, 2, 5]), num_targets=1),
        "num_targets": dict(num_targets=torch.tensor([4, 0])),
    }
    for what, bad in cases.items():
        kw = dict(dict(offsets=off, max_seqlen_q=3, enable_gqa=True), **bad)
        asserts.clear()
        with pytest.raises(ValueError, match=what):
            validate_call(q, k, k, **kw)
        assert asserts, what
    asserts.clear()
    call = validate_call(q, k, k, offsets=off, key_offsets=off.clone(), num_targets=torch.tensor([1, 2]),
                         max_seqlen_q=3, enable_gqa=True)
    assert len(asserts) == 5 and call.max_q_len == 3       # offsets x2, the bound, equal lengths, targets
    asserts.clear()
    validate_call(q, k, k, offsets=off, num_targets=torch.tensor([1, 2]), enable_gqa=True)
    assert not asserts                                     # without a bound: host checks, as before


def test_device_assert_leaves_device_failures_to_the_device():
    """``device_assert`` converts the CPU's immediate failure into ``ValueError``; a passing check is silent."""
    layout.device_assert(torch.tensor(True), "never raised")
    with pytest.raises(ValueError, match="the message"):
        layout.device_assert(torch.tensor(False), "the message")


def _jagged_cases():
    return [c for c in CASES if c.q_lengths is not None]


JAGGED = _jagged_cases()
# the interpreter and the emulation cost seconds per case: ragged batches with empty users, both kinds, targets,
# the split-K boundaries, statistics, bias over a quantized cache, a constant normaliser
TRITON_JAGGED = [c for c in JAGGED if c.tag in ("split8", "empty") or c.fmt is None or c.hstu_norm == 37
                 or (c.fmt == "int4_channel" and c.bias)]
CUDA_JAGGED = [c for c in TRITON_JAGGED if not c.stats]


def _same(a, b, exact):
    check = (lambda x, y: torch.equal(x, y)) if exact else \
        (lambda x, y: torch.allclose(x, y, rtol=1e-5, atol=1e-6, equal_nan=True))
    assert (a is None) == (b is None)
    if a is not None:
        assert a.shape == b.shape and check(a, b), (a - b).abs().max()


def _compare(run, low):
    """``run`` without a bound, with the exact bound (bit-identical: the same launch) and with a loose one (the
    same rows; only padding and summation order may differ)."""
    longest = int((low["offsets"][1:] - low["offsets"][:-1]).max())
    base = run(validate_call(**low))
    for bound, exact in ((longest, True), (longest + 5, False)):
        got = run(validate_call(**low, max_seqlen_q=bound))
        _same(got.output, base.output, exact)
        _same(got.lse, base.lse, exact)
        if base.stats is not None:
            for f in ("key_mass", "key_window_mass", "cache_mass", "cache_window_mass", "residual_mass",
                      "residual_window_mass"):
                _same(getattr(got.stats, f), getattr(base.stats, f), exact)


@pytest.mark.parametrize("case", JAGGED, ids=[c.name for c in JAGGED])
def test_reference_same_with_and_without_bound(case):
    _compare(ref_run, build(case)[0])


@pytest.mark.needs_ext("attention_cpu")
@pytest.mark.parametrize("case", JAGGED, ids=[c.name for c in JAGGED])
def test_cpu_same_with_and_without_bound(case):
    _compare(cpu_backend.run, build(case)[0])


@pytest.mark.parametrize("case", TRITON_JAGGED, ids=[c.name for c in TRITON_JAGGED])
def test_triton_same_with_and_without_bound(case):
    knobs = dict(case.triton)
    _compare(lambda call: triton_backend.run(call, **knobs), build(case)[0])


@pytest.mark.parametrize("case", CUDA_JAGGED, ids=[c.name for c in CUDA_JAGGED])
def test_cuda_emulation_same_with_and_without_bound(case, emu):
    _compare(lambda call: cuda_backend._launch(call, emu), build(case)[0])


def test_subsets_cover_empty_users_both_kinds_and_targets():
    for cases in (TRITON_JAGGED, CUDA_JAGGED):
        assert any(0 in c.q_lengths for c in cases)
        assert {c.kind for c in cases} == {"softmax", "hstu"}
        assert any(c.mask == "targets" for c in cases) and any(c.fmt is None for c in cases)
