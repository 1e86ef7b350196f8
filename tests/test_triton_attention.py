"""Triton attention kernels under the interpreter (TRITON_INTERPRET=1, set by conftest before any kernel module is
imported): what the backend-parametrized conformance suite (tests/test_attention_conformance.py, which runs the
Triton kernels over the shared case table against the float64 reference) does not cover -- equality with torch
SDPA without a cache (causal top-left with Lq != Lk, MQA), strided inputs, the public ``backend="triton"`` route
and the refusal reasons.
"""
import os

import pytest
import torch

from attention_cases import Case, build
from malloc_kernels.core.validate import validate_call

assert os.environ.get("TRITON_INTERPRET") == "1", "conftest must set TRITON_INTERPRET=1 before kernels import"
from malloc_kernels.triton import attention as TA  # noqa: E402

F64 = torch.float64


@pytest.mark.parametrize("path", ["decode", "append"])
def test_plain_matches_sdpa(path):
    """No cache, no extras: equals torch SDPA (causal top-left with Lq != Lk, MQA)."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 3, 5, 9, generator=gen)
    k = torch.randn(2, 1, 7, 9, generator=gen)
    v = torch.randn(2, 1, 7, 9, generator=gen)
    call = validate_call(q, k, v, is_causal=True, enable_gqa=True)
    got = TA.run(call, path=path).output
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---- layouts, API, support -----------------------------------------------------------------------------------------
def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(8)
    q = torch.randn(2, 5, 4, 10, generator=gen).transpose(1, 2)      # [B, Hq=4, L=5, D] with odd strides
    k = torch.randn(2, 5, 2, 10, generator=gen).transpose(1, 2)
    v = torch.randn(2, 10, 2, 5, generator=gen).permute(0, 2, 3, 1)
    call = validate_call(q, k, v, is_causal=True, enable_gqa=True)
    got = TA.run(call).output
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_public_api_backend_triton():
    import malloc_kernels
    low, exact = build(Case("int8", "softmax", "causal", tag="api"))
    out = malloc_kernels.attention(**dict(low, backend="triton"))
    want = malloc_kernels.attention(**dict(exact, backend="reference"))
    torch.testing.assert_close(out.output.double(), want.output, rtol=2e-5, atol=2e-5)


def test_supports_reasons():
    q = torch.randn(1, 2, 3, 8, dtype=F64)
    ok, why = TA.supports(validate_call(q, q, q))
    assert not ok and "float64" in why
    q = torch.randn(1, 2, 3, 8)
    ok, why = TA.supports(validate_call(q, q, q, dropout_p=0.1))
    assert not ok and "dropout" in why
    qg = q.clone().requires_grad_()
    ok, why = TA.supports(validate_call(qg, q, q))
    assert not ok and "grad" in why
    assert TA.supports(validate_call(q, q, q)) == (True, "")
    with pytest.raises(ValueError, match="triton"):
        TA.run(validate_call(q, q, q, dropout_p=0.1))
