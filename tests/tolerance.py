"""The one accuracy rule every kernel test uses (FlashAttention's, Dao et al. 2022, section 5), with one slack:

    max |kernel - exact| <= 2 * max |torch_same_dtype - exact|
                            + SLACK_ULPS * (u(dtype) + sqrt(n) * u(fp32)) * max(1, max |exact|)

``exact`` is the float64 computation of the same math on the same (dtype-rounded, same-codes) inputs;
``torch_same_dtype`` is the same math done by PyTorch in the kernel's input dtype (the reference with its
arithmetic dtype set to that dtype, see ``torch_in_dtype``); ``u`` is the unit roundoff (2^-11 fp16, 2^-8 bf16,
2^-24 fp32); ``n`` is the longest reduction in the computation (the head dim of a score, the number of keys of a
softmax denominator or a P V sum). Why a slack at all: the kernels accumulate in fp32 in their own order (blocked
online softmax, split-K merges, polynomial exp), PyTorch in another, so on a case where PyTorch happens to be
nearly exact the kernel may still differ by (a) the rounding of its final store in ``dtype`` (<= 1 u(dtype)) and
(b) a differently ordered fp32 sum of n terms, whose error is sqrt(n) u(fp32) with high probability (Higham &
Mary 2019, probabilistic rounding error analysis); SLACK_ULPS = 4 covers both with margin. For fp16/bf16 (a) is
what matters, for fp32 (b). No test picks its own slack.
"""
from __future__ import annotations

import contextlib
import importlib
import math

import torch

F64 = torch.float64
SLACK_ULPS = 4
UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8, torch.float32: 2.0 ** -24,
                 torch.float64: 2.0 ** -53}

_ref_attention = importlib.import_module("malloc_kernels.reference.attention")


@contextlib.contextmanager
def torch_in_dtype():
    """Within the block, the reference attention computes in its inputs' dtype (fp16/bf16/fp32) instead of
    upcasting: the 'PyTorch in that dtype' yardstick of the rule."""
    orig = _ref_attention.compute_dtype
    _ref_attention.compute_dtype = lambda dt: dt
    try:
        yield
    finally:
        _ref_attention.compute_dtype = orig


def _max_abs(t: torch.Tensor) -> float:
    return t.abs().max().item() if t.numel() else 0.0


def _match_neg_inf(got: torch.Tensor, exact: torch.Tensor, what: str):
    """-inf (a row that sees nothing: lse) must sit exactly where the exact result has it; compares the rest."""
    gi, ei = torch.isneginf(got), torch.isneginf(exact)
    assert torch.equal(gi, ei), f"{what}: -inf where the exact result has none, or the other way round"
    return got.masked_fill(gi, 0.0), exact.masked_fill(ei, 0.0)


def within_twice_torch_error(got: torch.Tensor, exact: torch.Tensor, torch_same_dtype: torch.Tensor,
                             dtype: torch.dtype, what: str = "output", *, n: int = 1) -> None:
    """Assert FlashAttention's rule for one tensor (see the module docstring). ``dtype``: the kernel's input dtype;
    ``n``: the longest reduction of the computation (max of head dim and keys per query)."""
    assert got.shape == exact.shape == torch_same_dtype.shape, (what, got.shape, exact.shape, torch_same_dtype.shape)
    g, e, t = got.to(F64), exact.to(F64), torch_same_dtype.to(F64)
    if g.is_floating_point():
        g, e = _match_neg_inf(g, e, what)
        t, _ = _match_neg_inf(t, exact.to(F64), what + " (PyTorch yardstick)")
    assert bool(torch.isfinite(g).all()), f"{what}: non-finite values"
    err, base = _max_abs(g - e), _max_abs(t - e)
    slack = SLACK_ULPS * (UNIT_ROUNDOFF[dtype] + math.sqrt(n) * UNIT_ROUNDOFF[torch.float32]) * \
        max(1.0, _max_abs(e))
    assert err <= 2 * base + slack, \
        f"{what}: kernel error {err:.3g} > 2 x PyTorch-in-{dtype} error {base:.3g} + slack {slack:.3g}"
