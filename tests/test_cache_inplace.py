"""``KVCache.reserve`` and ``append(..., in_place=True)``: bit-identical to the functional append over every valid
entry (``to_bytes`` covers every stored byte of a user; each field is compared too) and in the attention output
over the grown cache, for every in-place format, dense and jagged new entries, ragged and empty rows, GQA, with and
without timestamps and counts, over several steps; no host read and no data-sized op (the dispatcher watcher);
capacity exhaustion, refused policies and bad arguments raise naming the argument; the source of ``reserve`` and
the functional append are left unchanged."""
import pytest
import torch

import malloc_kernels as mk
from host_sync_watch import Watch
from malloc_kernels.cache.quant import fp8_available

B, H, HQ, D = 3, 2, 4, 16
N0 = 7
HIST_LENS = torch.tensor([7, 3, 0])                 # ragged history, one empty user
STEPS = [(2, torch.tensor([2, 0, 1])), (1, torch.tensor([1, 1, 1])), (3, torch.tensor([0, 3, 2]))]

FORMATS = [("none", {}), ("int8", {}), ("fp8", {}), ("int4", dict(k_axis="token", group_size=8)),
           ("int2", dict(k_axis="token", group_size=4)), ("nvfp4", {})]
FIELDS = ("k", "v", "position", "timestamp", "count", "k_scale", "k_zero", "v_scale", "v_zero")


def _skip_unavailable(method):
    if method in ("fp8", "nvfp4") and not fp8_available():
        pytest.skip("this torch build has no float8_e4m3fn")


def _data(seed=0, N=N0, L=3):
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(B, H, N, D, generator=g), torch.randn(B, H, N, D, generator=g)
    ts = (torch.arange(N) * 7 + 1000)[None].expand(B, N).contiguous()
    cnt = torch.rand(B, N, generator=g) * 3 + 0.5
    new = [(torch.randn(B, H, L, D, generator=g), torch.randn(B, H, L, D, generator=g),
            torch.rand(B, L, generator=g) * 2 + 0.5) for _ in STEPS]
    return k, v, ts, cnt, new


def _build(method, kw, timestamps, counts, seed=0):
    k, v, ts, cnt, new = _data(seed)
    c = mk.compress(k, v, method, lengths=HIST_LENS, timestamps=ts if timestamps else None,
                    counts=cnt if counts else None, **kw)
    return c, new


def _step_args(c, i, new, timestamps, counts, jagged):
    L, n = STEPS[i]
    nk, nv, ncnt = new[i]
    nk, nv, ncnt = nk[:, :, :L], nv[:, :, :L], ncnt[:, :L]
    start = c.original_length.to(torch.int64)
    pos = start[:, None] + torch.arange(L)
    kw = dict(positions=pos, timestamps=pos * 10 + 5000 if timestamps else None, counts=ncnt if counts else None)
    if not jagged:
        return (nk, nv), dict(kw, lengths=n)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), n.cumsum(0)])
    valid = torch.arange(L)[None] < n[:, None]                         # building the jagged input may read data

    def flat(t):                                                        # [B, H, L, *] or [B, L] -> [total, ...]
        return t.movedim(1, 2)[valid] if t.dim() == 4 else t[valid]
    jk = {name: (None if t is None else flat(t)) for name, t in kw.items()}
    return (flat(nk), flat(nv)), dict(jk, offsets=offsets)


def assert_same_cache(a, b):
    """Every field of ``a`` and ``b`` equal over valid entries (and per-entry scales), lengths, original lengths,
    formats and policy; their ``to_bytes`` equal for every user (every stored byte)."""
    assert torch.equal(a.length, b.length) and torch.equal(a.original_length, b.original_length)
    assert (a.k_format, a.v_format, a.k_axis, a.group_size, a.policy) == \
        (b.k_format, b.v_format, b.k_axis, b.group_size, b.policy)
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is None:
            continue
        for u in range(a.batch_size):
            for h in range(a.num_kv_heads):
                n = int(a.length[u, h])
                if name in ("k_scale", "k_zero") and a.k_axis == "channel":
                    n = -(-n // a.group_size)                            # key groups, not entries
                assert torch.equal(x[u, h, :n], y[u, h, :n]), (name, u, h)
    assert (a.residual is None) == (b.residual is None)
    for u in range(a.batch_size):
        assert a.to_bytes(u) == b.to_bytes(u), u


def _attend(c, kind, seed=1):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, 1, D, generator=g)
    k, v = torch.randn(B, H, 1, D, generator=g), torch.randn(B, H, 1, D, generator=g)
    qpos = c.original_length.to(torch.int64)[:, None]
    qts = qpos * 10 + 5000 if c.timestamp is not None else None
    return mk.attention(q, k, v, cache=c, kind=kind, is_causal=True, query_positions=qpos, query_timestamps=qts,
                        backend="cpu")


@pytest.mark.parametrize("jagged", [False, True])
@pytest.mark.parametrize("timestamps,counts", [(True, False), (False, True), (True, True), (False, False)])
@pytest.mark.parametrize("method,kw", FORMATS)
def test_in_place_equals_the_functional_append(method, kw, timestamps, counts, jagged):
    """Three steps (ragged lengths, users with n = 0) appended in place into a reserved cache give, after every
    step, the functional append's cache and the same attention output (softmax and HSTU), bit for bit."""
    _skip_unavailable(method)
    c, new = _build(method, kw, timestamps, counts)
    fun, res = c, c.reserve(N0 + 6)
    for i in range(len(STEPS)):
        args, kwargs = _step_args(fun, i, new, timestamps, counts, jagged)
        fun = fun.append(*args, **kwargs)
        out = res.append(*args, **kwargs, in_place=True)
        assert out is res
        assert_same_cache(res, fun)
        for kind in ("softmax", "hstu"):
            torch.testing.assert_close(_attend(res, kind), _attend(fun, kind), rtol=0, atol=0)


@pytest.mark.parametrize("method,kw", FORMATS)
def test_cache_counts_without_new_counts_store_one(method, kw):
    """A cache with counts takes entries without counts (count 1, as the functional append stores)."""
    _skip_unavailable(method)
    c, new = _build(method, kw, True, True)
    args, kwargs = _step_args(c, 0, new, True, False, False)
    res = c.reserve(N0 + 3)
    assert_same_cache(res.append(*args, **kwargs, in_place=True), c.append(*args, **kwargs))


@pytest.mark.parametrize("method,kw", FORMATS)
def test_in_place_append_reads_nothing_on_the_host(method, kw):
    """The dispatcher sees no host read, no tensor built from host data and no data-sized op in an in-place
    append of dense entries with lengths (a decode step's form), quantization included."""
    _skip_unavailable(method)
    c, new = _build(method, kw, True, False)
    res = c.reserve(N0 + 6)
    args, kwargs = _step_args(res, 0, new, True, False, False)
    with Watch() as w:
        res.append(*args, **kwargs, in_place=True)
    assert not w.bad(), w.bad()
    assert "scatter_" in w.seen
    assert "_assert_async" in w.seen


def test_reserve_leaves_the_source_and_the_functional_append_unchanged():
    c, new = _build("int8", {}, True, False)
    before = {name: getattr(c, name).clone() for name in FIELDS + ("length", "original_length")
              if getattr(c, name) is not None}
    res = c.reserve(N0 + 6)
    assert res.capacity == N0 + 6 and c.capacity == N0
    args, kwargs = _step_args(c, 0, new, True, False, False)
    res.append(*args, **kwargs, in_place=True)
    for name, t in before.items():
        assert torch.equal(getattr(c, name), t), name
    # the functional append of a reserved cache is the functional append of its source
    fun = c.append(*args, **kwargs)
    assert_same_cache(c.reserve(N0 + 6).append(*args, **kwargs), fun)
    assert fun.capacity == int((c.length + STEPS[0][1][:, None]).max())
    # attention over a reserved cache equals attention over its source
    torch.testing.assert_close(_attend(c.reserve(40), "softmax"), _attend(c, "softmax"), rtol=0, atol=0)


def test_reserve_pads_channel_axis_groups_and_keeps_residuals():
    k, v, ts, _, _ = _data()
    c = mk.compress(k, v, "kivi4", lengths=HIST_LENS, timestamps=ts, residual=2, group_size=2)
    r = c.reserve(11)
    assert r.k_scale.shape[2] == 6 and r.k.shape[2] == 11
    assert_same_cache(r, c)
    assert r.residual is not None and r.residual.k.data_ptr() != c.residual.k.data_ptr()


def test_gqa_and_jagged_capacity_exhaustion_raise():
    """A step that overflows any row's capacity is refused (a device assert; ValueError on CPU) and names key;
    rows with room still take their entries in the next step that fits."""
    c, new = _build("none", {}, True, False)
    res = c.reserve(N0 + 1)
    args, kwargs = _step_args(res, 0, new, True, False, False)        # user 0 has 7 entries and 2 new: 9 > 8
    with pytest.raises(ValueError, match=r"key: the new entries do not fit.*capacity 8"):
        res.append(*args, **kwargs, in_place=True)
    exact = c.reserve(N0 + 2)
    exact.append(*args, **kwargs, in_place=True)                       # exactly full is fine
    assert int(exact.length.max()) == exact.capacity
    args, kwargs = _step_args(exact, 1, new, True, False, True)
    with pytest.raises(ValueError, match="key: the new entries do not fit"):
        exact.append(*args, **kwargs, in_place=True)
    empty = mk.compress(torch.zeros(B, H, 0, D), torch.zeros(B, H, 0, D), "none")
    with pytest.raises(ValueError, match="key: the new entries do not fit"):
        empty.append(torch.ones(B, H, 1, D), torch.ones(B, H, 1, D), in_place=True)
    empty.append(torch.ones(B, H, 1, D), torch.ones(B, H, 1, D), lengths=torch.zeros(B, dtype=torch.int64),
                 in_place=True)                                        # nothing to write: fits a 0-capacity cache


@pytest.mark.parametrize("method,kw", [("recent", dict(budget=4)), ("h2o", dict(budget=4)),
                                       ("chunk", dict(chunk=2)), ("kivi4", {}), ("int4", {}),
                                       ("recent+int8", dict(budget=4))])
def test_policies_without_an_in_place_form_are_refused(method, kw):
    k, v, ts, _, _ = _data()
    try:
        c = mk.compress(k, v, method, lengths=HIST_LENS, timestamps=ts, queries=k, **kw)
    except ValueError as e:
        pytest.skip(f"{method} {kw} not buildable here: {e}")
    res = c.reserve(N0 + 4)
    with pytest.raises(ValueError, match="has no in-place form"):
        res.append(torch.ones(B, H, 1, D), torch.ones(B, H, 1, D), timestamps=torch.full((B, 1), 10 ** 6),
                   in_place=True)


def test_bad_arguments_name_themselves():
    c, _ = _build("none", {}, True, False)
    for bad in ("8", 8.0, True, None):
        with pytest.raises(TypeError, match="capacity must be an int"):
            c.reserve(bad)
    with pytest.raises(ValueError, match="capacity must be >= the cache's current capacity 7"):
        c.reserve(6)
    with pytest.raises(TypeError, match="counts must be a bool"):
        c.reserve(9, counts=1)
    res = c.reserve(12)
    one = torch.ones(B, H, 1, D)
    ts = torch.full((B, 1), 10 ** 6)
    with pytest.raises(TypeError, match="in_place must be a bool"):
        res.append(one, one, timestamps=ts, in_place=1)
    with pytest.raises(ValueError, match=r"key/value must be \[B=3, Hkv=2, L, D=16\]"):
        res.append(torch.ones(B, H + 1, 1, D), torch.ones(B, H + 1, 1, D), timestamps=ts, in_place=True)
    with pytest.raises(TypeError, match="floating point"):
        res.append(one.long(), one.long(), timestamps=ts, in_place=True)
    with pytest.raises(ValueError, match="timestamps must be given exactly"):
        res.append(one, one, in_place=True)
    with pytest.raises(ValueError, match=r"lengths must be within \[0, L=1\]"):
        res.append(one, one, timestamps=ts, lengths=torch.full((B,), 2), in_place=True)
    with pytest.raises(ValueError, match="counts: this cache stores no merge counts"):
        res.append(one, one, timestamps=ts, counts=torch.ones(B, 1), in_place=True)
    with pytest.raises(ValueError, match="NaN or infinite"):
        res.append(one * float("nan"), one, timestamps=ts, in_place=True)
    assert torch.equal(res.length, c.length)                           # every refused call wrote nothing
    counted = c.reserve(12, counts=True)
    assert (counted.count[..., :N0] == 1).all() and (counted.count[..., N0:] == 0).all()
    counted.append(one, one, timestamps=ts, counts=torch.full((B, 1), 2.0), in_place=True)
    assert torch.equal(counted.count.gather(2, c.length.long()[..., None])[..., 0], torch.full((B, H), 2.0))
