"""The hot path traces: ``torch.compile(fullgraph=True)`` over ``malloc_kernels.attention`` with and without every
cache form, and over the HSTU and SASRec cached serving step, with zero graph breaks (``torch._dynamo.explain``)
and outputs equal to eager. Data-dependent checks run where a cache is made (``KVCache.check_contents``), not per
call, and the C++ op checks its own bounds, so nothing in the call path reads tensor data while tracing.

The matrix compiles with ``aot_eager`` (Dynamo + AOTAutograd over the ops' fake kernels: the whole tracing
contract); one attention form and both models also run through the default Inductor backend.
"""
import pytest
import torch

import malloc_kernels as mk
from malloc_kernels.data.dataset import JaggedBatch
from malloc_kernels.models import HSTU, SASRec

pytestmark = pytest.mark.skipif("cpu" not in mk.available_backends(), reason="C++ extension not built")

B, HQ, HKV, N, D = 2, 4, 2, 40, 16


def _history():
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(B, HKV, N, D, generator=g), torch.randn(B, HKV, N, D, generator=g)
    lengths = torch.tensor([N, 29])
    queries = torch.randn(B, HQ, N, D, generator=g)
    return k, v, lengths, queries


def _caches():
    k, v, lengths, queries = _history()
    pos = torch.arange(N, dtype=torch.int32)
    ts = (torch.arange(N) * 60)[None].expand(B, N)
    return {
        "none": None,
        "float": mk.compress(k, v, "none", lengths=lengths, positions=pos, timestamps=ts),
        "int8": mk.compress(k, v, "int8", lengths=lengths, timestamps=ts),
        "int4": mk.compress(k, v, "int4", lengths=lengths, timestamps=ts),
        "int2": mk.compress(k, v, "int2", lengths=lengths, timestamps=ts),
        "fp8": mk.compress(k, v, "fp8", lengths=lengths, timestamps=ts),
        "kivi4-residual": mk.compress(k, v, "kivi4", lengths=lengths, timestamps=ts),
        # H2O's kept entries, then per-(user, head) lengths that differ (AdaKV-style per-head budgets)
        "evicted-per-head": mk.compress(k, v, "h2o", budget=0.4, lengths=lengths, timestamps=ts, queries=queries)
        .replace(length=torch.tensor([[16, 9], [11, 4]], dtype=torch.int32)).check_contents(),
        "merged-counts": mk.compress(k, v, "tome", budget=0.5, lengths=lengths, timestamps=ts),
    }


CACHES = _caches()


def _request(seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, HQ, 3, D, generator=g), torch.randn(B, HKV, 3, D, generator=g),
            torch.randn(B, HKV, 3, D, generator=g))


def _step(q, k, v, cache):
    return mk.attention(q, k, v, is_causal=True, cache=cache)


def _hstu_step(q, k, v, cache, pos_bias, time_bias, qts):
    return mk.attention(q, k, v, is_causal=True, cache=cache, kind="hstu", pos_bias=pos_bias, time_bias=time_bias,
                        query_timestamps=qts)


def _no_breaks(fn, *args):
    torch._dynamo.reset()
    ex = torch._dynamo.explain(fn)(*args)
    reasons = [str(b.reason)[:300] for b in ex.break_reasons]
    assert ex.graph_break_count == 0 and ex.graph_count == 1, reasons


@pytest.mark.parametrize("form", list(CACHES))
def test_attention_over_every_cache_form_compiles_without_graph_breaks(form):
    q, k, v = _request()
    cache = CACHES[form]
    _no_breaks(_step, q, k, v, cache)
    torch._dynamo.reset()
    compiled = torch.compile(_step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v, cache), _step(q, k, v, cache), rtol=0, atol=0)


def test_hstu_attention_with_bias_and_jagged_layout_compiles_without_graph_breaks():
    q, k, v = _request(2)
    cache = CACHES["int4"]
    g = torch.Generator().manual_seed(3)
    pb, tb = torch.randn(HQ, 16, generator=g), torch.randn(HQ, 8, generator=g)
    qts = (N * 60 + torch.arange(3) * 7)[None].expand(B, 3).contiguous()
    _no_breaks(_hstu_step, q, k, v, cache, pb, tb, qts)
    torch._dynamo.reset()
    compiled = torch.compile(_hstu_step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v, cache, pb, tb, qts), _hstu_step(q, k, v, cache, pb, tb, qts),
                               rtol=0, atol=0)

    def jagged(q, k, v, offsets):
        return mk.attention(q, k, v, offsets=offsets, is_causal=True, kind="hstu")
    qj, kj, vj = q[0].transpose(0, 1).contiguous(), k[0].transpose(0, 1).contiguous(), v[0].transpose(0, 1).contiguous()
    off = torch.tensor([0, 1, 3])
    _no_breaks(jagged, qj, kj, vj, off)


def test_inductor_compiles_the_decode_over_a_quantized_cache():
    q, k, v = _request(4)
    cache = CACHES["kivi4-residual"]
    torch._dynamo.reset()
    compiled = torch.compile(_step, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, cache), _step(q, k, v, cache), rtol=0, atol=0)


@pytest.mark.parametrize("ctor", [HSTU, SASRec], ids=["hstu", "sasrec"])
@pytest.mark.parametrize("method", ["none", "kivi2"])
def test_cached_serving_step_of_the_models_compiles_without_graph_breaks(ctor, method):
    torch.manual_seed(0)
    model = ctor(50, d_model=16, n_layers=2, n_heads=2).eval()
    g = torch.Generator().manual_seed(5)
    hist = torch.randint(1, 51, (3, 12), generator=g)
    ts = torch.arange(36).view(3, 12) * 100
    with torch.no_grad():
        caches = model.encode_history(hist, ts, torch.tensor([12, 7, 9]), method=method)
    items = torch.randint(1, 51, (6,), generator=g)
    rts = ts[:, -1:].repeat_interleave(2, 1).reshape(-1) + torch.tensor([5, 9] * 3)
    offsets = torch.tensor([0, 2, 4, 6])

    def serve(items, rts, offsets, caches):
        return model.serve(JaggedBatch(items=items, offsets=offsets, timestamps=rts), caches=caches)

    with torch.no_grad():
        _no_breaks(serve, items, rts, offsets, caches)
        torch._dynamo.reset()
        backend = "inductor" if method == "kivi2" else "aot_eager"
        compiled = torch.compile(serve, fullgraph=True, backend=backend)
        want = serve(items, rts, offsets, caches)
        got = compiled(items, rts, offsets, caches)
    # Inductor may fuse the dense layers' elementwise ops differently from eager: float32 rounding only.
    tol = dict(rtol=0, atol=0) if backend == "aot_eager" else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, **tol)


def test_jagged_call_with_max_seqlen_compiles_and_keeps_its_bound_check():
    """A bounded jagged call traces without graph breaks, and its bound check stays in the graph: a bound below the
    longest user fails there too (the kernels' grids follow the bound)."""
    q, k, v = _request(4)
    qj, kj, vj = (t[0].transpose(0, 1).contiguous() for t in (q, k, v))
    off = torch.tensor([0, 1, 3])

    def bounded(q, k, v, offsets, bound):
        return mk.attention(q, k, v, offsets=offsets, is_causal=True, max_seqlen_q=bound, cache=None)
    _no_breaks(bounded, qj, kj, vj, off, 2)
    torch._dynamo.reset()
    compiled = torch.compile(bounded, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(qj, kj, vj, off, 2), mk.attention(qj, kj, vj, offsets=off, is_causal=True),
                               rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="max_seqlen_q=1 is smaller"):
        compiled(qj, kj, vj, off, 1)
