"""Hostile input, one regression test per failure class of the hostile-input probe (and the fuzzers' oracle):

1. allocation before validation in ``cache_from_bytes``     4. integer edges (positions, timestamps)
2. header fields not checked for consistency                5. registered C++ op reading out of bounds
3. non-finite values hidden by a backend                    6. unclear errors (``compress``; CLI: test_eval.py)
"""
import struct
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import malloc_kernels as mk
from malloc_kernels.core import formats
from malloc_kernels.cache.serialize import CRC_BYTES, HEADER_BYTES, MAX_EXPANSION

import blob_oracle as bo

F32 = formats.code("float")   # the op takes the format table's numeric codes

ROOT = Path(__file__).resolve().parents[1]
SEEDS = bo.seed_blobs()
CPU_OK = "cpu" in mk.available_backends()


def _small_float_blob(H=1, lengths=(3,), D=4):
    k = torch.randn(1, H, max(lengths), D)
    c = mk.compress(k, k.clone(), "none", timestamps=torch.arange(max(lengths)))
    c = c.replace(length=torch.tensor([list(lengths)], dtype=torch.int32))
    return c.to_bytes(0)


# ---- 1. allocation before validation ---------------------------------------------------------------------------
def _crafted_huge_claims():
    """Blobs with a valid CRC that claim far more than they hold (the probe's class-1 family)."""
    base = _small_float_blob()
    yield "length 2^31-1", bo.set_body_int32(base, 0, 2 ** 31 - 1)
    yield "length 1e8", bo.set_body_int32(base, 0, 10 ** 8)
    yield "10,000 heads", bo.set_field(base, "num_kv_heads", 10_000)
    yield "2^32-1 heads", bo.set_field(base, "num_kv_heads", 2 ** 32 - 1)
    yield "head_dim 2^32-1", bo.set_field(base, "head_dim", 2 ** 32 - 1)
    # 10,000 heads that really are in a ~100 KB blob: one long head, the others empty (padding would be 10,000x)
    H, L, D = 10_000, 600, 4
    body = bytearray(struct.pack("<4sHHBBBBBBBBIIIQ", b"MKKV", 1, 0, 0, 0, 0, 1, 1, 0, 0, 0, H, D, 0, 0))
    body += struct.pack(f"<{H}i", *([L] + [0] * (H - 1))) + struct.pack("<i", L)
    body += bytes(L * D * 4 * 2) + struct.pack(f"<{L}i", *range(L))
    struct.pack_into("<Q", body, 28, len(body) + CRC_BYTES)
    yield "10,000 heads, one long", bo.with_crc(bytes(body))
    # the residual segment and the channel-axis key scales claim huge lengths too
    kivi = next(b for b in SEEDS if b[8] == 2 and b[10] == 1 and b[6] & 4)      # int4, channel axis, residual
    H = struct.unpack_from("<I", kivi, 16)[0]
    for i in range(H):
        yield f"kivi length[{i}] 2^31-1", bo.set_body_int32(kivi, i, 2 ** 31 - 1)
    main_len = sum(struct.unpack_from(f"<{H}i", kivi, HEADER_BYTES))
    assert main_len >= 0
    yield "kivi group_size 1 (scales x G)", bo.set_field(kivi, "group_size", 1)


@pytest.mark.parametrize("name, blob", list(_crafted_huge_claims()), ids=lambda x: x if isinstance(x, str) else "")
def test_huge_claims_are_refused_before_allocating(name, blob):
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="cache bytes are inconsistent"):
            mk.cache_from_bytes(blob)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= 64 * len(blob) + 64 * 1024, f"{name}: Python peak {peak} for a {len(blob)}-byte blob"


def test_huge_claims_peak_rss_in_a_fresh_process(tmp_path):
    """The whole process (torch's allocations included): a fresh interpreter decodes every crafted blob and the
    peak RSS grows by less than 64 x the largest blob (+ a fixed 32 MB for torch's first-use buffers)."""
    blobs = [b for _, b in _crafted_huge_claims()]
    data = tmp_path / "hostile_blobs.bin"
    data.write_bytes(b"".join(struct.pack("<Q", len(b)) + b for b in blobs))
    code = textwrap.dedent(f"""
        import resource, struct, sys
        import malloc_kernels as mk
        raw = open({str(data)!r}, "rb").read()
        blobs, i = [], 0
        while i < len(raw):
            n = struct.unpack_from("<Q", raw, i)[0]; blobs.append(raw[i + 8:i + 8 + n]); i += 8 + n
        mk.cache_from_bytes(mk.compress(*[__import__("torch").randn(1, 1, 3, 4)] * 2, "none").to_bytes(0))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for b in blobs:
            try:
                mk.cache_from_bytes(b)
            except ValueError:
                pass
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT), check=True)
    grown_kb = int(out.stdout.strip().splitlines()[-1])
    assert grown_kb * 1024 <= 64 * max(len(b) for b in blobs) + 32 * 2 ** 20, grown_kb


def test_accepted_blobs_stay_within_the_expansion_bound():
    for blob in SEEDS:
        c = mk.cache_from_bytes(blob)
        assert bo.storage_bytes(c) <= MAX_EXPANSION * len(blob)


# ---- 2. header consistency ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value, match", [
    ("group_size", 64, "group_size"),             # larger than the head dim (was: cannot reshape 0 elements)
    ("group_size", 0, "group_size"),
    ("reserved", 1, "reserved"),
    ("flags", 8, "flags"),                        # residual-count bit without a residual
    ("flags", 16, "flags"),
    ("k_format", 9, "k_format"),
    ("k_axis", 2, "k_axis"),
    ("k_dtype", 1, "k_dtype"),                    # float32 codes for a quantized format
    ("rk_dtype", 1, "residual k_dtype"),          # a residual dtype without a residual
    ("num_kv_heads", 0, "num_kv_heads"),
    ("head_dim", 0, "head_dim"),
])
def test_header_fields_are_checked_against_each_other(field, value, match):
    blob = next(b for b in SEEDS if b[8] == 1 and not b[6] & 4)                # int8, no residual
    with pytest.raises(ValueError, match=match):
        mk.cache_from_bytes(bo.set_field(blob, field, value))


def test_negative_lengths_and_original_length_are_refused():
    blob = _small_float_blob(H=2, lengths=(3, 2))
    with pytest.raises(ValueError, match="cache length has a negative entry"):
        mk.cache_from_bytes(bo.set_body_int32(blob, 1, -1))
    with pytest.raises(ValueError, match="original_length is negative"):
        mk.cache_from_bytes(bo.set_body_int32(blob, 2, -5))


def _payload_offset(blob):
    """Byte offset of the first payload row of the main segment."""
    H = struct.unpack_from("<I", blob, 16)[0]
    return HEADER_BYTES + 4 * H + 4


@pytest.mark.parametrize("code", [0x7F, 0xFF])
def test_fp8_nan_codes_are_refused(code):
    blob = next(b for b in SEEDS if b[8] == 4)
    with pytest.raises(ValueError, match="fp8 NaN code"):
        mk.cache_from_bytes(bo.set_body_byte(blob, _payload_offset(blob), code))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, 0.0])
def test_bad_merge_counts_are_refused(bad):
    k = torch.randn(1, 1, 6, 4)
    c = mk.compress(k, k.clone(), "tome", budget=3)
    cnt = c.count.clone()
    cnt[0, 0, 0] = bad
    with pytest.raises(ValueError, match="cache.count"):
        mk.cache_from_bytes(c.replace(count=cnt).to_bytes(0))


def test_non_finite_payload_scales_and_zeros_are_refused():
    k = torch.randn(1, 2, 80, 8)
    c = mk.compress(k, k.clone(), "kivi4")
    assert int(c.length.min()) > 0 and int(c.residual.length.min()) > 0
    for field in ("k_scale", "k_zero", "v_scale", "v_zero"):
        t = getattr(c, field).clone()
        t[0, 0, 0, 0] = float("nan")
        with pytest.raises(ValueError, match=f"cache.{field} holds a non-finite"):
            mk.cache_from_bytes(c.replace(**{field: t}).to_bytes(0))
    r = c.residual.k.clone()
    r[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="cache.residual.k holds a non-finite"):
        mk.cache_from_bytes(c.replace(residual=c.residual.replace(k=r)).to_bytes(0))
    bad = k.clone()
    bad[0, 1, 3, 2] = float("nan")
    with pytest.raises(ValueError, match="cache.k holds a non-finite"):
        mk.compress(bad, k, "none")


def test_padding_may_hold_anything():
    """Only valid entries are checked: NaN padding past a head's length is fine (it is never read)."""
    k = torch.randn(1, 2, 5, 4)
    c = mk.compress(k, k.clone(), "none", lengths=torch.tensor([5]))
    kk = c.k.clone()
    kk[0, 1, 4] = float("nan")
    c = c.replace(k=kk, length=torch.tensor([[5, 4]], dtype=torch.int32)).validate().check_contents()
    assert mk.cache_from_bytes(c.to_bytes(0)).capacity == 5


# ---- structure-aware fuzzing: valid blobs mutated field by field ---------------------------------------------------
_MUTATIONS = st.one_of(
    st.tuples(st.just("field"), st.sampled_from(sorted(bo.HEADER_FIELDS)),
              st.one_of(st.sampled_from(bo.EDGE_VALUES), st.integers(0, 2 ** 64 - 1))),
    st.tuples(st.just("int32"), st.integers(0, 40),
              st.one_of(st.sampled_from((-1, 0, 1, 2, 2 ** 31 - 1, -2 ** 31, 10 ** 8)), st.integers(-50, 50))),
    st.tuples(st.just("byte"), st.integers(HEADER_BYTES, 4096), st.integers(0, 255)),
    st.tuples(st.just("resize"), st.integers(0, 8192), st.just(0)),
)


def _apply(blob, mutation):
    kind, where, value = mutation
    if kind == "field":
        return bo.set_field(blob, where, value)
    if kind == "int32":
        return bo.set_body_int32(blob, where, value)
    if kind == "byte":
        return bo.set_body_byte(blob, where, value)
    return bo.resize_body(blob, where)


COMPILED = tuple(b for b in mk.available_backends() if b in ("cpu", "cuda"))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, len(SEEDS) - 1), mutations=st.lists(_MUTATIONS, min_size=1, max_size=3),
       serve_seed=st.integers(0, 2 ** 16))
def test_fuzz_mutated_blobs_are_refused_or_served_exactly(seed, mutations, serve_seed):
    blob = SEEDS[seed]
    for m in mutations:
        blob = _apply(blob, m)
    bo.check_blob(blob, serve_seed, backends=COMPILED)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, len(SEEDS) - 1), mutation=_MUTATIONS)
def test_fuzz_mutated_blobs_every_backend(seed, mutation):
    """The same with every available backend (the Triton interpreter included: fewer examples)."""
    bo.check_blob(_apply(SEEDS[seed], mutation), seed)


@pytest.mark.parametrize("i", range(len(SEEDS)))
def test_seed_blobs_pass_the_oracle(i):
    assert bo.check_blob(SEEDS[i]) == "accepted"


def _near_tied_large_keys(mag=3e5, seed=0):
    """Keys of magnitude ``mag`` in pairs that differ in the 6th significant digit (what libFuzzer's CopyPart +
    ChangeBit make of a float blob): every float32 score is off by O(1) there, so backends legitimately differ."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, 2, 24, 8, generator=g) * mag
    k[:, :, 1::2] = k[:, :, 0::2] * (1 + 1e-6 * torch.randn(1, 2, 12, 8, generator=g))
    return mk.compress(k, torch.randn(1, 2, 24, 8, generator=g) * mag, "none",
                      timestamps=torch.arange(24)[None])


@pytest.mark.parametrize("seed", range(4))
def test_oracle_allows_float32_score_rounding_on_near_tied_large_keys(seed):
    """The CI atheris run of 2026-12-02 failed the old fixed 2e-3 tolerance on such a blob (cpu softmax output off
    by 29.8 at scale 1.03e4) while the kernel was as exact as float32 scores allow: the oracle now adds the score
    rounding bound, and the blob is served by every backend within it."""
    cache = _near_tied_large_keys(seed=seed)
    q, k, v = (torch.randn(1, 2, 2, 8) for _ in range(3))
    assert bo.rounding_allowance(q, k, v, cache, hstu=False)["lse"] > 0.05      # O(1) score errors: ill-conditioned
    assert bo.check_blob(cache.to_bytes(0), seed=seed) == "accepted"


@pytest.mark.parametrize("i", range(len(SEEDS)))
def test_oracle_rounding_allowance_is_negligible_on_well_scaled_caches(i):
    """Where the scores are well conditioned the allowance is a small part of the 2e-3 floor: the oracle stays
    sharp there."""
    cache = mk.cache_from_bytes(SEEDS[i])
    H, D = cache.num_kv_heads, cache.head_dim
    q, k, v = (torch.randn(1, H, 2, D, generator=torch.Generator().manual_seed(j)) for j in range(3))
    for hstu in (False, True):
        moved = bo.rounding_allowance(q, k, v, cache, hstu)
        assert 0 < 2 * moved["output"] < 0.2 * 2e-3 and 0 < 2 * moved["lse"] < 1e-4


# ---- 3. one non-finite rule in every backend ---------------------------------------------------------------------
def _backends():
    return [b for b in mk.available_backends() if b not in ("reference", "auto")]


def _same_rule(ref, got, what):
    assert torch.equal(torch.isnan(ref), torch.isnan(got)), f"{what}: NaN entries differ"
    fin = torch.isfinite(ref)
    assert torch.equal(fin, torch.isfinite(got)), f"{what}: finite entries differ"
    torch.testing.assert_close(got[fin], ref[fin], atol=2e-4, rtol=2e-4)


def _hand_built(method, poison):
    """A cache built by hand (skipping check_contents, as a careless caller could) with one non-finite number."""
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(2, 2, 80, 64, generator=g), torch.randn(2, 2, 80, 64, generator=g)
    c = mk.compress(k, v, method)
    assert int(c.length.min()) > 0
    if poison == "count":
        cnt = torch.ones(c.position.shape)
        cnt[0, 1, 2] = float("nan")
        return c.replace(count=cnt)
    if poison == "residual":
        r = c.residual.k.clone()
        r[0, 0, 0, 5] = float("nan")
        return c.replace(residual=c.residual.replace(k=r))
    t = getattr(c, poison).clone()
    if t.dtype == torch.uint8:
        t[0, 0, 0, 0] = 0x7F                                                  # fp8 NaN code
    else:
        t[0, 0, 0, 0] = float("nan")
    return c.replace(**{poison: t})


# A request poisoned in one place (one case of the non-finite rule without a cache), shared by every backend's test.
REQUEST_POISONS = ("nan_query", "inf_query", "neg_inf_key", "nan_value", "inf_key", "masked_nan")


def poisoned_request(case):
    """(q, k, v) of one user, 2 heads, 5 tokens, D = 32, causal, with the poison ``case`` placed."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 5, 32, generator=g) for _ in range(3))
    if case == "nan_query":
        q[0, 1, 2, 3] = float("nan")
    elif case == "inf_query":
        q[0, 0, 4, 0] = float("inf")
    elif case == "neg_inf_key":
        k[0, 0, 1, :] = -1.0
        k[0, 0, 1, 0] = float("-inf")
        q[0, 0, :, 0] = q[0, 0, :, 0].abs() + 0.1       # score -inf: weight 0 (SDPA's convention), rows finite
    elif case == "nan_value":
        v[0, 1, 3, 7] = float("nan")
    elif case == "masked_nan":
        k[0, 0, 4, 2] = float("nan")                    # the last token: causally invisible to rows 0..3
        v[0, 1, 4, 5] = float("inf")
    elif case == "inf_key":
        k[0, 1, 0, 0] = float("inf")
    else:
        raise ValueError(f"unknown poison case {case!r}")
    return q, k, v


def poisoned_cache_request():
    """(q, k, v) of the poisoned-cache tests: 2 users, 4 query heads over 2 kv heads, 3 tokens, D = 64."""
    g = torch.Generator().manual_seed(2)
    return tuple(torch.randn(2, n, 3, 64, generator=g) for n in (4, 2, 2))


POISONS = [("none", "k"), ("none", "v"), ("none", "count"), ("int8", "k_scale"), ("int8", "k_zero"),
           ("int8", "v_scale"), ("int4", "k_scale"), ("int4", "v_zero"), ("kivi4", "k_scale"), ("kivi4", "residual"),
           ("kivi2", "k_zero"), ("fp8", "k"), ("fp8", "v"), ("fp8", "k_scale")]


@pytest.mark.skipif(not CPU_OK, reason="cpu backend unavailable")
@pytest.mark.parametrize("kind", ["softmax", "hstu"])
@pytest.mark.parametrize("method, poison", POISONS)
def test_non_finite_cache_values_make_rows_nan_in_every_backend(method, poison, kind):
    if method == "fp8" and not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("no float8_e4m3fn")
    c = _hand_built(method, poison)
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(2, 4, 3, 64, generator=g), torch.randn(2, 2, 3, 64, generator=g), \
        torch.randn(2, 2, 3, 64, generator=g)
    ref = mk.attention(q, k, v, cache=c, is_causal=True, kind=kind, backend="reference")
    assert torch.isnan(ref).any(), "the poison must reach a row"
    # the rule: whole rows are NaN or finite
    assert torch.equal(torch.isnan(ref).any(-1), torch.isnan(ref).all(-1))
    for be in ["cpu"] + [b for b in _backends() if b != "cpu" and b != "triton"]:
        _same_rule(ref, bo.attention_on(be, q, k, v, c, is_causal=True, kind=kind), f"{be} {kind}")


@pytest.mark.skipif("triton" not in mk.available_backends(), reason="triton unavailable")
@pytest.mark.parametrize("kind", ["softmax", "hstu"])
@pytest.mark.parametrize("method, poison", [("none", "k"), ("int8", "v_scale"), ("kivi4", "residual")])
def test_non_finite_cache_values_triton(method, poison, kind):
    c = _hand_built(method, poison)
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(2, 4, 3, 64, generator=g), torch.randn(2, 2, 3, 64, generator=g), \
        torch.randn(2, 2, 3, 64, generator=g)
    kw = dict(cache=c, is_causal=True, kind=kind, return_lse=kind == "softmax")
    ref = mk.attention(q, k, v, backend="reference", **kw)
    got = bo.attention_on("triton", q, k, v, **kw)
    if kind == "softmax":
        _same_rule(ref.lse, got.lse, f"triton {kind} lse")
        ref, got = ref.output, got.output
    assert torch.isnan(ref).any()
    _same_rule(ref, got, f"triton {kind}")


@pytest.mark.skipif(not CPU_OK, reason="cpu backend unavailable")
@pytest.mark.parametrize("kind", ["softmax", "hstu"])
@pytest.mark.parametrize("case", REQUEST_POISONS)
def test_non_finite_request_without_cache(case, kind):
    q, k, v = poisoned_request(case)
    ref = mk.attention(q, k, v, is_causal=True, kind=kind, backend="reference")
    got = mk.attention(q, k, v, is_causal=True, kind=kind, backend="cpu")
    _same_rule(ref, got, f"cpu {kind} {case}")
    assert torch.equal(torch.isnan(ref).any(-1), torch.isnan(ref).all(-1)), "rows are all-NaN or finite"
    if kind == "softmax" and case in ("nan_query", "inf_query"):
        # SDPA's definition (its MATH backend: softmax(q k^T) v) gives the same NaN rows; its fused CPU kernel hides
        # a NaN query (finite output), which is the behaviour this rule replaces
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(SDPBackend.MATH):
            sdpa = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                                                    is_causal=True)
        assert torch.equal(~torch.isfinite(sdpa).all(-1), torch.isnan(ref).all(-1))
    if case == "neg_inf_key":
        assert torch.isfinite(ref[0, 0]).all()


@pytest.mark.skipif(not CPU_OK, reason="cpu backend unavailable")
def test_empty_rows_stay_zero():
    q = torch.randn(1, 1, 2, 16)
    k = torch.randn(1, 1, 2, 16)
    mask = torch.tensor([[[[False, False], [True, True]]]])
    out = mk.attention(q, k, k, attn_mask=mask, backend="reference")
    assert torch.equal(out[0, 0, 0], torch.zeros(16))



@pytest.mark.needs_ext("attention_cpu")
@pytest.mark.parametrize("sign", [-1.0, 1.0])
@pytest.mark.parametrize("Lq", [1, 2, 9])
def test_hstu_scores_near_the_float32_limit(cpu_isa, sign, Lq):
    """SiLU at a score of magnitude ~1e36 (a finite cached key of 1e37, as a mutated blob produced): s * sigmoid(s)
    is -0 for s -> -large and s for s -> +large. The kernels' vector exp must overflow to +inf (not clamp), or
    s / (1 + e^{-s}) leaves a weight of about -0.01 that the reference does not have. Decode (Lq = 1), short
    requests and register-tiled rows (Lq >= 8) alike."""
    g = torch.Generator().manual_seed(7)
    H, D, N = 2, 16, 40
    q = torch.randn(1, H, Lq, D, generator=g)
    k, v = torch.randn(1, H, Lq, D, generator=g), torch.randn(1, H, Lq, D, generator=g)
    hk, hv = torch.randn(1, H, N, D, generator=g), torch.randn(1, H, N, D, generator=g)
    hk[0, 0, 11] = sign * 1e37 * q[0, 0, 0].sign()
    cache = mk.compress(hk, hv, "none")
    exact = mk.attention(q.double(), k.double(), v.double(), backend="reference", kind="hstu", is_causal=True,
                         cache=cache.replace(k=cache.k.double(), v=cache.v.double()))
    got = mk.attention(q, k, v, backend="cpu", kind="hstu", is_causal=True, cache=cache)
    assert torch.equal(torch.isfinite(exact), torch.isfinite(got))
    fin = torch.isfinite(exact)
    err = (got.double()[fin] - exact[fin]).abs().max().item()
    assert err <= 1e-5 * (1 + exact[fin].abs().max().item()), f"{cpu_isa}: error {err:.3g}"

# ---- 4. integer edges -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pos", [2 ** 31, 2 ** 40, -2 ** 31 - 1])
def test_positions_that_do_not_fit_int32_are_refused(pos):
    k = torch.randn(1, 1, 3, 8)
    with pytest.raises(ValueError, match="positions must fit torch.int32"):
        mk.compress(k, k, "none", positions=torch.tensor([0, 1, pos]))


def test_seed_and_method_errors_name_the_argument():
    k = torch.randn(1, 1, 3, 8)
    with pytest.raises(TypeError, match="method must be a string"):
        mk.compress(k, k, None)
    for seed in (2 ** 70, -1, 1.5):
        with pytest.raises(ValueError, match="seed must be an int"):
            mk.compress(k, k, "random", budget=2, seed=seed)


EDGE_TS = [-2 ** 63, -2 ** 63 + 1, -2 ** 62, -1, 0, 1, 2 ** 62, 2 ** 63 - 2, 2 ** 63 - 1]


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_time_buckets_at_int64_edges_match_the_reference(backend):
    if backend not in mk.available_backends():
        pytest.skip(f"{backend} unavailable")
    from malloc_kernels.reference.bias import abs_diff_sat, time_bucket
    n = len(EDGE_TS)
    ts = torch.tensor(EDGE_TS)
    # exact magnitudes: Python integers are unbounded
    exact = torch.tensor([[min(abs(a - b), 2 ** 63 - 1) for b in EDGE_TS] for a in EDGE_TS])
    assert torch.equal(abs_diff_sat(ts[:, None], ts[None, :]), exact)
    g = torch.Generator().manual_seed(4)
    D, T = 16, 64
    k, v = torch.randn(1, 1, n, D, generator=g), torch.randn(1, 1, n, D, generator=g)
    cache = mk.compress(k, v, "none", timestamps=ts, positions=torch.tensor([-2 ** 31, 2 ** 31 - 1] + [0] * (n - 2)))
    tb = torch.randn(T, generator=g) * 3
    pb = torch.randn(8, generator=g)
    q = torch.randn(1, 1, n, D, generator=g)
    kw = dict(cache=cache, kind="hstu", is_causal=True, time_bias=tb, pos_bias=pb, query_timestamps=ts[None],
              query_positions=torch.tensor([[2 ** 63 - 1, -2 ** 63] + [5] * (n - 2)]))
    ref = mk.attention(q, q, q, backend="reference", **kw)
    got = bo.attention_on(backend, q, q, q, **kw)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)
    # the largest differences land in the last reachable bucket (a wrapped difference would land in a small one)
    assert int(time_bucket(exact[0, -1:], T)) == int(time_bucket(torch.tensor([2 ** 62]), T)) > 0


# ---- 5. the registered op checks its own arguments ----------------------------------------------------------------
@pytest.mark.skipif(not CPU_OK, reason="cpu backend unavailable")
@pytest.mark.parametrize("length, match", [(10 ** 8, "cache.length must be within"),
                                           (-1, "cache.length must be within"), (41, "cache.length must be within")])
def test_attention_cpu_op_refuses_lengths_beyond_capacity(length, match):
    k = torch.randn(1, 1, 40, 16)
    c = mk.compress(k, k.clone(), "none")
    q = torch.randn(1, 1, 1, 16)
    bad = torch.tensor([[length]], dtype=torch.int32)
    args = [q, q, q, None, None, c.k, c.v, bad, c.position, None, None, None, None, None, None,
            None, None, None, None, None, None, c.original_length, F32, F32, False, 0, "softmax", False,
            None, 0.25, None, None, None, None, None, None, None, "original", 0, False, False, 0]
    with pytest.raises(ValueError, match=match):
        torch.ops.malloc_kernels.attention_cpu(*args)
    args[7] = c.length
    torch.ops.malloc_kernels.attention_cpu(*args)               # the same call with the true length runs


@pytest.mark.skipif(not CPU_OK, reason="cpu backend unavailable")
@pytest.mark.parametrize("change, match", [
    (dict(pos=torch.zeros(1, 1, 39, dtype=torch.int32)), "cache.position must have shape"),
    (dict(orig=torch.zeros(2, dtype=torch.int32)), "original_length must be contiguous int32"),
    (dict(kfmt="int4"), "must be uint8 codes for format int4"),
    (dict(qpos=torch.zeros(1, 0, dtype=torch.int64)), "query_positions must be"),
    (dict(kind="bogus"), "kind must be"),
    (dict(key_dim=8), "key head dim 8 != query head dim 16"),
])
def test_attention_cpu_op_checks_shapes(change, match):
    k = torch.randn(1, 1, 40, 16)
    c = mk.compress(k, k.clone(), "none")
    q = torch.randn(1, 1, 1, 16)
    key = torch.randn(1, 1, 1, change.get("key_dim", 16))
    qpos = change.get("qpos")
    args = [q, key, key, None, None, c.k, c.v, c.length, change.get("pos", c.position), None, None, None, None,
            None, None, None, None, None, None, None, None, change.get("orig", c.original_length),
            formats.code(change.get("kfmt", "float")), F32, False, 0, change.get("kind", "softmax"), False, None, 0.25, qpos,
            qpos, None, None, torch.zeros(4) if qpos is not None else None, None, None, "original", 0, False, False,
            0]
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        torch.ops.malloc_kernels.attention_cpu(*args)


@pytest.mark.skipif(not CPU_OK, reason="cpu backend unavailable")
def test_float_keys_with_channel_axis_are_served():
    """Found by the probe's bit flips: a float cache whose k_axis says "channel" (group_size 0) made the CPU kernel
    divide by the group size (SIGFPE). A float payload has no key groups, whatever k_axis says."""
    g = torch.Generator().manual_seed(5)
    k = torch.randn(1, 2, 7, 8, generator=g)
    c = mk.compress(k, k.clone(), "none").replace(k_axis="channel")
    assert mk.cache_from_bytes(c.to_bytes(0)).k_axis == "channel"
    q = torch.randn(1, 2, 2, 8, generator=g)
    ref = mk.attention(q, q, q, cache=c, is_causal=True, backend="reference")
    torch.testing.assert_close(mk.attention(q, q, q, cache=c, is_causal=True, backend="cpu"), ref)
    args = [q, q, q, None, None, c.k, c.v, c.length, c.position, None, None, None, None, None, None,
            None, None, None, None, None, None, c.original_length, F32, F32, True, 0, "softmax", True,
            None, 8 ** -0.5, None, None, None, None, None, None, None, "original", 0, False, False, 0]
    torch.testing.assert_close(torch.ops.malloc_kernels.attention_cpu(*args)[0], ref)
