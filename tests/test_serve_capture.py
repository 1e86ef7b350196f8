"""The models' cached serving step read as a CUDA graph would capture it: HSTU's and SASRec's ``serve`` /
``serve_step`` given a JaggedBatch and ``max_request_len`` read no device data on the host, build no tensor from
host data and size nothing by data (the watcher of the attention launcher's test, on the real dispatcher), on the
``cpu`` backend and on Triton under the interpreter; every input check is a device assert and still raises its
``ValueError`` on CPU tensors. ``serve_step(..., in_place=True)`` over caches with reserved capacity (the whole
step: attention and every layer's ``KVCache.append``) reads nothing on the host either; the functional append's
grown capacity is the one host read of ``serve_step`` without it (README, "Jagged calls and CUDA graphs"). On a
GPU the full in-place step is captured in a CUDA graph and replayed."""
import numpy as np
import pytest
import torch

from host_sync_watch import Watch
from malloc_kernels.data import make_jagged
from malloc_kernels.models import HSTU, SASRec, SequentialRecommender

N_ITEMS, N_LAYERS = 30, 2
HIST = (5, 3, 1, 0)          # ragged histories, one empty


def _model(arch, backend):
    torch.manual_seed(0)
    m = (HSTU if arch == "hstu" else SASRec)(N_ITEMS, d_model=16, n_heads=2, n_layers=N_LAYERS, max_len=16)
    m.eval()
    m.backend = backend
    return m


def _history_and_request(per_user=1, items=None):
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, N_ITEMS + 1, size=n) for n in HIST]
    tss = [np.sort(rng.integers(0, 10 ** 6, size=n)) for n in HIST]
    req = [rng.integers(1, N_ITEMS + 1, size=per_user) for _ in HIST] if items is None else items
    rts = [np.full(len(r), 10 ** 7) + np.arange(len(r)) for r in req]
    return make_jagged(seqs, tss), make_jagged(req, rts)


def _backend_param(backend):
    if backend == "triton":
        import os
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("the triton backend runs CPU tensors under TRITON_INTERPRET=1 only (conftest sets it)")
    return backend


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("arch", ["hstu", "sasrec"])
def test_decode_step_has_no_host_sync(arch, backend):
    """One token per user over the per-layer caches: ``serve`` is entirely free of host reads, host data and
    data-sized ops; ``serve_step`` (the same plus ``KVCache.append`` per layer) has exactly one host read per
    layer, the grown cache's capacity, and nothing else; both give the results of the unbounded eager call."""
    m = _model(arch, _backend_param(backend))
    hist, req = _history_and_request()
    with torch.no_grad():
        caches = m.encode_history(hist)
        ref_h = m.serve(req, caches=caches)
        ref_step, ref_grown = m.serve_step(req, caches=caches)
        m.serve_step(req, caches=caches, max_request_len=1)     # one-time caches (placeholders, thresholds) fill here
        with Watch() as w:
            h = m.serve(req, caches=caches, max_request_len=1)
        assert not w.bad(), w.bad()
        assert "_assert_async" in w.seen             # the checks ran, on the device
        with Watch() as w:
            h_step, grown = m.serve_step(req, caches=caches, max_request_len=1)
    assert w.bad() == ["_local_scalar_dense"] and w.seen.count("_local_scalar_dense") == N_LAYERS, w.bad()
    torch.testing.assert_close(h, ref_h, rtol=0, atol=0)
    torch.testing.assert_close(h_step, ref_step, rtol=0, atol=0)
    for a, b in zip(grown, ref_grown):
        for f in ("k", "v", "length", "position", "timestamp", "original_length"):
            torch.testing.assert_close(getattr(a, f), getattr(b, f), rtol=0, atol=0)


def assert_same_valid(a, b):
    """Two caches equal on every valid entry of every field, lengths and original lengths included."""
    torch.testing.assert_close(a.length, b.length, rtol=0, atol=0)
    torch.testing.assert_close(a.original_length, b.original_length, rtol=0, atol=0)
    for u in range(a.batch_size):
        assert a.to_bytes(u) == b.to_bytes(u), u
    valid = torch.arange(a.capacity) < a.length.to(torch.int64)[..., None]
    for f in ("k", "v", "position", "timestamp", "count", "k_scale", "k_zero", "v_scale", "v_zero"):
        x, y = getattr(a, f), getattr(b, f)
        assert (x is None) == (y is None), f
        if x is not None:
            mask = valid.view(*valid.shape, *([1] * (x.dim() - 3)))
            y = torch.nn.functional.pad(y, (0, 0) * (x.dim() - 3) + (0, a.capacity - b.capacity))
            torch.testing.assert_close(torch.where(mask, x, torch.zeros_like(x)),
                                       torch.where(mask, y, torch.zeros_like(y)), rtol=0, atol=0)


@pytest.mark.parametrize("method", ["none", "int8"])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("arch", ["hstu", "sasrec"])
def test_in_place_decode_step_has_no_host_sync(arch, backend, method):
    """The full serving step (attention + every layer's cache append) over caches with reserved capacity and
    ``in_place=True`` reads nothing on the host, builds nothing from host data and sizes nothing by data, step
    after step; it grows the very cache objects it was given, and its hidden states and caches equal the
    functional step's bit for bit (uncompressed and int8 caches)."""
    m = _model(arch, _backend_param(backend))
    hist, req = _history_and_request()
    with torch.no_grad():
        ref = m.encode_history(hist, method=method)
        warm = m.encode_history(hist, method=method, capacity=max(HIST) + 3)
        m.serve_step(req, caches=warm, max_request_len=1, in_place=True)   # one-time caches fill here
        caches = m.encode_history(hist, method=method, capacity=max(HIST) + 3)
        for step in range(2):
            ref_h, ref = m.serve_step(req, caches=ref, max_request_len=1)
            with Watch() as w:
                h, grown = m.serve_step(req, caches=caches, max_request_len=1, in_place=True)
            assert not w.bad(), (step, w.bad())
            assert "_assert_async" in w.seen and "scatter_" in w.seen
            assert all(g is c for g, c in zip(grown, caches))
            torch.testing.assert_close(h, ref_h, rtol=0, atol=0)
            for a, b in zip(caches, ref):
                assert_same_valid(a, b)


def test_in_place_step_refusals():
    """``in_place=True`` without a static bound, over caches sharing buffers, with a policy that has no in-place
    form or past the reserved capacity raises a ValueError naming the cause, never a silent host-reading step."""
    m = _model("sasrec", "cpu")
    hist, req = _history_and_request()
    with torch.no_grad():
        caches = m.encode_history(hist, capacity=max(HIST) + 1)
        with pytest.raises(ValueError, match="in_place=True needs max_request_len"):
            m.serve_step(req, caches=caches, in_place=True)
        with pytest.raises(TypeError, match="in_place must be a bool"):
            m.serve_step(req, caches=caches, max_request_len=1, in_place="yes")
        with pytest.raises(ValueError, match="shares its buffer"):
            m.serve_step(req, caches=[caches[0]] * N_LAYERS, max_request_len=1, in_place=True)
        m.serve_step(req, caches=caches, max_request_len=1, in_place=True)
        with pytest.raises(ValueError, match="key: the new entries do not fit"):
            m.serve_step(req, caches=caches, max_request_len=1, in_place=True)
        recent = m.encode_history(hist, method="recent", budget=2, capacity=max(HIST) + 1)
        with pytest.raises(ValueError, match="'recent' changes which entries survive"):
            m.serve_step(req, caches=recent, max_request_len=1, in_place=True)
        with pytest.raises(ValueError, match="capacity: a linformer model"):
            from malloc_kernels.models import ModelConfig, build_model
            lin = build_model(ModelConfig(arch="sasrec", n_items=N_ITEMS, d_model=16, n_layers=1,
                                          seq_compress="linformer", max_len=16)).eval()
            lin.encode_history(hist, capacity=8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture needs a GPU")
@pytest.mark.parametrize("method", ["none", "int8"])
@pytest.mark.parametrize("arch", ["hstu", "sasrec"])
def test_in_place_decode_step_captures_in_a_cuda_graph(arch, method):
    """On a GPU: the whole in-place serving step (attention + cache append of every layer) is captured in one CUDA
    graph. Replaying it for three decode steps (each step's request copied into the static input) gives the eager
    in-place steps' hidden states and caches bit for bit (same kernels, same capacity), and the functional steps'
    hidden states (whose caches have other capacities, so a GPU kernel may sum in another order: default
    tolerances)."""
    m = _model(arch, "auto").cuda()
    hist, _ = _history_and_request()
    steps = [_history_and_request(items=[np.array([1 + (i + s) % N_ITEMS]) for i in range(len(HIST))])[1]
             for s in range(4)]
    cap = max(HIST) + len(steps) + 1

    def to_cuda(batch):
        return type(batch)(**{f: (t.cuda() if isinstance(t, torch.Tensor) else t) for f, t in vars(batch).items()})

    with torch.no_grad():
        ref = m.encode_history(to_cuda(hist), method=method)
        twin = m.encode_history(to_cuda(hist), method=method, capacity=cap)
        caches = m.encode_history(to_cuda(hist), method=method, capacity=cap)
        static = to_cuda(steps[0])
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):                                  # warm-up (compiles, one-time caches)
            m.serve_step(static, caches=m.encode_history(to_cuda(hist), method=method, capacity=cap),
                         max_request_len=1, in_place=True)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):                                      # records; runs nothing
            out, grown = m.serve_step(static, caches=caches, max_request_len=1, in_place=True)
        assert all(a is b for a, b in zip(grown, caches))
        for s in range(1, len(steps)):
            src = to_cuda(steps[s])
            for f, t in vars(static).items():
                if isinstance(t, torch.Tensor):
                    t.copy_(getattr(src, f))
            g.replay()
            twin_h, twin = m.serve_step(src, caches=twin, max_request_len=1, in_place=True)
            ref_h, ref = m.serve_step(src, caches=ref, max_request_len=1)
            torch.cuda.synchronize()
            torch.testing.assert_close(out, twin_h, rtol=0, atol=0)
            torch.testing.assert_close(out, ref_h)
            for a, b in zip(caches, twin):
                assert_same_valid(a, b)
            for a, b in zip(caches, ref):
                torch.testing.assert_close(a.length, b.length, rtol=0, atol=0)
                torch.testing.assert_close(a.original_length, b.original_length, rtol=0, atol=0)


def _step(m, hist, req, **kw):
    with torch.no_grad():
        return m.serve_step(req, caches=m.encode_history(hist), **kw)


@pytest.mark.parametrize("arch", ["hstu", "sasrec"])
def test_former_host_checks_still_raise(arch, monkeypatch):
    """Each check of the serving step that read the host now is a device assert: on CPU tensors it raises the same
    ``ValueError`` (its message minus the offending values, which only a host read could print)."""
    m = _model(arch, "cpu")
    hist, req = _history_and_request()
    for bad in (0, N_ITEMS + 1):
        _, breq = _history_and_request(items=[np.array([bad])] + [np.array([1])] * (len(HIST) - 1))
        with pytest.raises(ValueError, match=f"item ids must be in 1..{N_ITEMS}"):
            _step(m, hist, breq, max_request_len=1)
    _, empty = _history_and_request(items=[np.array([], dtype=np.int64)] + [np.array([1])] * (len(HIST) - 1))
    for fn in (m.serve_step, m.serve):
        with pytest.raises(ValueError, match="every user needs at least one request token"):
            with torch.no_grad():
                fn(empty, caches=m.encode_history(hist), max_request_len=1)
    _, two = _history_and_request(per_user=2)
    with pytest.raises(ValueError, match="max_seqlen_q=1 is smaller than the longest"):
        _step(m, hist, two, max_request_len=1)
    with pytest.raises(ValueError, match="max_request_len must be >= 1"):
        _step(m, hist, req, max_request_len=0)
    for wrong in ("1", 1.0, True):
        with pytest.raises(TypeError, match="max_request_len must be an int"):
            _step(m, hist, req, max_request_len=wrong)
    monkeypatch.setattr(SequentialRecommender, "MAX_SERVE_LEN", 5)
    with pytest.raises(ValueError, match="exceeds the longest this model serves"):
        _step(m, hist, req, max_request_len=1)


def test_padded_request_lengths_checked_on_device():
    m = _model("sasrec", "cpu")
    caches = m.encode_history(torch.tensor([[1, 2], [3, 0]]))
    with pytest.raises(ValueError, match=r"request items lengths must be \[B\]=2 within \[0, 1\]"):
        m.serve_step(torch.tensor([[1], [2]]), caches=caches, lengths=torch.tensor([1, 2]))


def test_append_contents_checks_are_device_asserts():
    """``KVCache.append``'s checks (the cache's contents and the new entries) raise without a host read."""
    m = _model("sasrec", "cpu")
    hist, _ = _history_and_request()
    with torch.no_grad():
        c = m.encode_history(hist)[0]
    B, H, _, D = c.k.shape
    k = torch.randn(B, H, 1, D)
    pos = c.original_length.to(torch.int64)[:, None]
    cases = [
        (dict(key=k.masked_fill(torch.ones_like(k, dtype=torch.bool), float("nan"))), "NaN or infinite"),
        (dict(lengths=torch.full((B,), 2)), r"lengths must be within \[0, L=1\]"),
        (dict(positions=(pos - 1).clamp(min=0)), "positions must come after every stored entry"),
        (dict(positions=pos * 0 - 1), "positions must fit int32"),
        (dict(counts=torch.full((B, 1), -1.0)), "counts must be finite and >= 0"),
    ]
    for kw, msg in cases:
        args = dict(key=k, value=k, positions=pos, timestamps=pos * 0 + 10 ** 7 if c.timestamp is not None else None)
        args.update(kw)
        with Watch() as w, pytest.raises(ValueError, match=msg):
            c.append(**args)
        assert "_local_scalar_dense" not in w.seen, msg
    two = torch.randn(B, H, 2, D)
    with pytest.raises(ValueError, match="strictly increasing"):
        c.append(two, two, positions=torch.cat([pos, pos], 1) + 1)
    broken = c.replace(k=c.k.masked_fill(torch.ones_like(c.k, dtype=torch.bool), float("inf")))
    with pytest.raises(ValueError, match=r"cache\.k holds a non-finite value"):
        broken.append(k, k)
    with pytest.raises(ValueError, match=r"cache\.length must be within \[0, capacity="):
        c.replace(length=c.length + c.capacity + 1).append(k, k)
    with pytest.raises(ValueError, match="original_length would overflow int32"):
        c.replace(original_length=torch.full_like(c.original_length, 2 ** 31 - 1),
                  position=torch.zeros_like(c.position)).append(k, k, positions=torch.zeros(B, 1, dtype=torch.int64)
                                                                 + 2 ** 31 - 1, timestamps=pos * 0 + 10 ** 7)


def test_rwkv_serve_step_has_no_host_sync():
    """RWKV's serving step (token shift, WKV from the carried state, the new state) reads nothing on the host,
    ragged users and an empty history included, and equals the unwatched call; an empty request user still
    raises."""
    from malloc_kernels.models import ModelConfig, build_model

    torch.manual_seed(0)
    m = build_model(ModelConfig(arch="rwkv", n_items=N_ITEMS, d_model=16, n_layers=N_LAYERS, dropout=0.0)).eval()
    hist, req = _history_and_request()
    with torch.no_grad():
        states = m.encode_history(hist)
        ref_h, ref_states = m.serve_step(req, caches=states)
        with Watch() as w:
            h, new = m.serve_step(req, caches=states)
        assert not w.bad(), w.bad()
        torch.testing.assert_close(h, ref_h, rtol=0, atol=0)
        for a, b in zip(new, ref_states):
            torch.testing.assert_close(a.wkv, b.wkv, rtol=0, atol=0)
        _, empty = _history_and_request(items=[np.array([], dtype=np.int64)] + [np.array([1])] * (len(HIST) - 1))
        with pytest.raises(ValueError, match="every user needs at least one request token"):
            m.serve_step(empty, caches=states)
