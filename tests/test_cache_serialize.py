"""Exact byte accounting (KVCache.nbytes_per_user) and lossless per-user serialisation (cache/serialize.py)."""
import math
import struct
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import malloc_kernels
from malloc_kernels import cache_from_bytes
from malloc_kernels.cache import KVCache
from malloc_kernels.cache.quant import quantize_cache
from malloc_kernels.cache.serialize import FRAMING_BYTES, HEADER_BYTES, MAGIC, VERSION


def make_cache(B=3, H=4, C=21, D=6, lengths=None, seed=0, dtype=torch.float32, with_ts=True, with_count=True):
    g = torch.Generator().manual_seed(seed)
    k = (torch.randn(B, H, C, D, generator=g) * 2).to(dtype)
    v = (torch.randn(B, H, C, D, generator=g) * 2).to(dtype)
    if lengths is None:
        lengths = torch.randint(0, C + 1, (B, H), generator=g, dtype=torch.int32)
        lengths[0, 0] = 0                                               # an empty head
        lengths[-1, -1] = C                                             # a full one
    pos = torch.randint(-5, 1000, (B, H, C), generator=g, dtype=torch.int32)
    ts = torch.randint(-2 ** 62, 2 ** 62, (B, H, C), generator=g, dtype=torch.int64) if with_ts else None
    cnt = torch.rand(B, H, C, generator=g) * 4 + 1 if with_count else None
    return KVCache(k=k, v=v, length=lengths.to(torch.int32), position=pos,
                   original_length=torch.randint(C, 10 * C + 1, (B,), generator=g, dtype=torch.int32), head_dim=D,
                   timestamp=ts, count=cnt).validate()


def with_residual(c, R=5, count=True, seed=1, dtype=torch.float32):
    r = make_cache(B=c.batch_size, H=c.num_kv_heads, C=R, D=c.head_dim, seed=seed, dtype=dtype,
                   with_ts=c.timestamp is not None, with_count=count)
    return c.replace(residual=r)


CASES = [
    ("float", "float", "token", 0),
    ("int8", "int8", "token", 6),
    ("fp8", "fp8", "token", 3),
    ("int4", "int4", "channel", 3),
    ("int2", "int2", "channel", 6),
    ("int4", "int2", "token", 2),
    ("fp8", "int8", "channel", 2),
    ("float", "int4", "token", 3),
    ("int2", "float", "channel", 7),
    ("int4", "float", "channel", 32),                                   # one partial group longer than C
]


def build(case, seed=0, residual=True, res_count=True, with_ts=True, with_count=True, dtype=torch.float32, D=6):
    kf, vf, axis, G = case
    c = make_cache(seed=seed, with_ts=with_ts, with_count=with_count, dtype=dtype, D=D)
    if residual:
        c = with_residual(c, count=res_count, seed=seed + 100, dtype=dtype)
    if kf == vf == "float":
        return c
    return quantize_cache(c, kf, vf, G, axis)


def tensors_of_user(c, u):
    """Every stored tensor slice of user u's valid region, by plain per-head slicing (independent of quant.py)."""
    out = []
    for seg in (c, c.residual):
        if seg is None:
            continue
        out += [seg.length[u], seg.original_length[u:u + 1]]
        for h in range(seg.num_kv_heads):
            L = int(seg.length[u, h])
            for f in ("k", "v", "position", "timestamp", "count"):
                t = getattr(seg, f)
                if t is not None:
                    out.append(t[u, h, :L])
            for f in ("k_scale", "k_zero", "v_scale", "v_zero"):
                t = getattr(seg, f)
                if t is None:
                    continue
                if f.startswith("k") and seg.k_axis == "channel":
                    out.append(t[u, h, :math.ceil(L / seg.group_size)])
                else:
                    out.append(t[u, h, :L])
    return out


def bits(t):
    """The raw bytes of a tensor (empty tensors have none)."""
    return t.contiguous().reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


def assert_same_user(a, u, b):
    """Cache b (B=1) holds bit-for-bit user u of cache a; b's padding is zero."""
    assert (b.k_format, b.v_format, b.k_axis, b.group_size, b.head_dim) == \
        (a.k_format, a.v_format, a.k_axis, a.group_size, a.head_dim)
    for seg_a, seg_b in ((a, b), (a.residual, b.residual)):
        if seg_a is None:
            assert seg_b is None
            continue
        assert torch.equal(seg_a.length[u], seg_b.length[0])
        assert torch.equal(seg_a.original_length[u], seg_b.original_length[0])
        assert seg_b.capacity == int(seg_a.length[u].max()) if seg_a.num_kv_heads else 0
        for f in ("k", "v", "position", "timestamp", "count", "k_scale", "k_zero", "v_scale", "v_zero"):
            ta, tb = getattr(seg_a, f), getattr(seg_b, f)
            assert (ta is None) == (tb is None), f
            if ta is None:
                continue
            assert ta.dtype == tb.dtype, f
            for h in range(seg_a.num_kv_heads):
                L = int(seg_a.length[u, h])
                if f.startswith("k_") and seg_a.k_axis == "channel":
                    L = math.ceil(L / seg_a.group_size)
                va, vb = ta[u, h, :L], tb[0, h, :L]
                # compare bit patterns, so NaN payloads and -0.0 count too
                assert torch.equal(bits(va), bits(vb)), (f, h)
                assert bool((tb[0, h, L:] == 0).all()), (f, h)


# ---- byte accounting -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("residual", [False, True])
def test_nbytes_equals_sum_of_stored_tensors(case, residual):
    c = build(case, residual=residual)
    nb = c.nbytes_per_user()
    assert nb.dtype == torch.int64 and nb.shape == (c.batch_size,)
    for u in range(c.batch_size):
        want = sum(t.numel() * t.element_size() for t in tensors_of_user(c, u))
        assert int(nb[u]) == want
        assert len(c.to_bytes(u)) == want + FRAMING_BYTES


def test_nbytes_formula_by_hand():
    # int4 keys on the channel axis (G=4), int8 values per token (G=6), D=6, one user, lengths (5, 0)
    lengths = torch.tensor([[5, 0]], dtype=torch.int32)
    c = make_cache(B=1, H=2, C=7, D=6, lengths=lengths, with_ts=True, with_count=False)
    q = quantize_cache(c, "int4", "int8", 6, "channel")
    header = 4 * 2 + 4
    k_rows = 5 * 3                       # ceil(6 * 4 / 8) = 3 bytes per row
    v_rows = 5 * 6
    k_groups = math.ceil(5 / 6) * 6 * 4  # one entry group x 6 channels x (fp16 scale + fp16 zero)
    v_groups = 5 * 1 * 4                 # 5 entries x 1 channel group x 4 bytes
    meta = 5 * (4 + 8)                   # position + timestamp
    assert int(q.nbytes_per_user()[0]) == header + k_rows + v_rows + k_groups + v_groups + meta


def test_per_head_budgets_save_real_bytes():
    full = make_cache(B=1, H=4, C=16, lengths=torch.full((1, 4), 16, dtype=torch.int32))
    pruned = full.replace(length=torch.tensor([[16, 8, 4, 0]], dtype=torch.int32))
    per_entry = 2 * 6 * 4 + 4 + 8 + 4
    assert int(full.nbytes_per_user()[0] - pruned.nbytes_per_user()[0]) == (64 - 28) * per_entry


def test_full_precision_reference_bytes():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 3, 11, 8, generator=g).half()
    lengths = torch.tensor([11, 4])
    native = malloc_kernels.compress(k, k.clone(), "none", lengths=lengths, timestamps=torch.arange(11))
    assert torch.equal(native.nbytes_full_precision_per_user(torch.float16), native.nbytes_per_user())
    q = malloc_kernels.compress(k, k.clone(), "int4", lengths=lengths, timestamps=torch.arange(11))
    assert torch.equal(q.nbytes_full_precision_per_user(), native.nbytes_per_user())
    assert bool((q.nbytes_per_user() < native.nbytes_per_user()).all())
    fp32 = q.nbytes_full_precision_per_user(torch.float32)
    assert torch.equal(fp32 - native.nbytes_per_user(), lengths * 3 * 2 * 8 * 2)
    with pytest.raises(TypeError, match="dtype"):
        q.nbytes_full_precision_per_user(torch.int8)


# ---- round trips ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("flags", [(True, True, True, True), (False, False, False, False), (True, False, True, False),
                                   (False, True, True, True)])
def test_round_trip_bit_exact(case, flags):
    residual, res_count, with_ts, with_count = flags
    c = build(case, residual=residual, res_count=res_count, with_ts=with_ts, with_count=with_count, seed=3)
    for u in range(c.batch_size):
        b = c.to_bytes(u)
        assert isinstance(b, bytes)
        back = cache_from_bytes(b)
        assert back.batch_size == 1
        assert_same_user(c, u, back)
        assert back.to_bytes(0) == b                                    # canonical: re-serialising is identical
        assert torch.equal(back.nbytes_per_user()[0], c.nbytes_per_user()[u])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_round_trip_float_dtypes_signed_zero_and_nan_refused(dtype):
    c = with_residual(make_cache(seed=5, dtype=dtype), dtype=dtype)
    k = c.k.clone()
    u = 2
    h = int(torch.nonzero(c.length[u]).flatten()[0])
    k[u, h, 0, 1] = -0.0
    c = c.replace(k=k)
    back = cache_from_bytes(c.to_bytes(u))
    assert_same_user(c, u, back)
    kh, _ = back.dequantize(torch.float64)
    assert math.copysign(1.0, kh[0, h, 0, 1].item()) == -1.0
    # a NaN payload serialises bit-exactly but a reader refuses it (README: non-finite values are refused where a
    # cache is built)
    k[u, h, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="cache.k holds a non-finite"):
        cache_from_bytes(c.replace(k=k).to_bytes(u))


def test_user_bytes_do_not_depend_on_batch_or_padding():
    c = quantize_cache(make_cache(seed=8), "int4", "int4", 3, "channel")
    lengths = c.length
    # same user 1, alone in a batch with extra capacity and garbage padding
    big = make_cache(seed=8)
    C2 = big.capacity + 9
    pad = lambda t, val: torch.cat([t, torch.full(t.shape[:2] + (9,) + t.shape[3:], val, dtype=t.dtype)], dim=2)
    alone = KVCache(k=pad(big.k[1:2], 1e4), v=pad(big.v[1:2], -1e4), length=lengths[1:2],
                    position=pad(big.position[1:2], 7), original_length=big.original_length[1:2], head_dim=6,
                    timestamp=pad(big.timestamp[1:2], 9), count=pad(big.count[1:2], 3.0))
    assert alone.capacity == C2
    qa = quantize_cache(alone, "int4", "int4", 3, "channel")
    assert qa.to_bytes(0) == c.to_bytes(1)


def test_empty_user_round_trip():
    c = make_cache(B=2, H=3, C=5, lengths=torch.tensor([[0, 0, 0], [5, 1, 2]], dtype=torch.int32))
    q = quantize_cache(with_residual(c, R=2), "int2", "fp8", 3, "channel")
    b = q.to_bytes(0)
    back = cache_from_bytes(b)
    assert back.capacity == 0
    assert_same_user(q, 0, back)
    assert len(b) == int(q.nbytes_per_user()[0]) + FRAMING_BYTES


def test_device_argument():
    c = build(CASES[3])
    back = cache_from_bytes(c.to_bytes(1), device="cpu")
    assert back.k.device.type == "cpu"
    assert_same_user(c, 1, back)


def test_pytree_round_trip_of_deserialised_cache():
    import torch.utils._pytree as pytree
    back = cache_from_bytes(build(CASES[4]).to_bytes(2))
    leaves, spec = pytree.tree_flatten(back)
    again = pytree.tree_unflatten(leaves, spec)
    assert again.to_bytes(0) == back.to_bytes(0)


# ---- rejection of bad input -------------------------------------------------------------------------------------
def _reframe(body_and_header: bytes) -> bytes:
    return body_and_header + struct.pack("<I", zlib.crc32(body_and_header) & 0xFFFFFFFF)


def test_every_flipped_byte_is_rejected():
    c = quantize_cache(with_residual(make_cache(B=1, H=2, C=3, D=4, lengths=torch.tensor([[3, 1]], dtype=torch.int32)),
                                     R=1), "int4", "int8", 2, "channel")
    b = c.to_bytes(0)
    assert len(b) < 400
    for i in range(len(b)):
        bad = bytearray(b)
        bad[i] ^= 0x10
        with pytest.raises(ValueError):
            cache_from_bytes(bytes(bad))


def test_corrupt_payload_names_crc():
    b = bytearray(build(CASES[1]).to_bytes(1))
    b[HEADER_BYTES + 20] ^= 0xFF
    with pytest.raises(ValueError, match="CRC32"):
        cache_from_bytes(bytes(b))


def test_truncated_and_trailing_bytes_are_rejected():
    b = build(CASES[2]).to_bytes(2)
    for n in (0, 3, HEADER_BYTES - 1, HEADER_BYTES, len(b) // 2, len(b) - 1):
        with pytest.raises(ValueError, match="truncated"):
            cache_from_bytes(b[:n])
    with pytest.raises(ValueError, match="trailing"):
        cache_from_bytes(b + b"\x00")


def test_wrong_magic_and_version_are_rejected():
    b = build(CASES[3]).to_bytes(0)
    with pytest.raises(ValueError, match="magic"):
        cache_from_bytes(_reframe(b"XXXX" + b[4:-4]))
    for version in (0, VERSION + 1):
        bad = b[:4] + struct.pack("<H", version) + b[6:-4]
        with pytest.raises(ValueError, match="version"):
            cache_from_bytes(_reframe(bad))
    assert b[:4] == MAGIC


def test_consistent_crc_but_bad_fields_are_rejected():
    b = build(CASES[1]).to_bytes(0)
    # unknown format code with a valid CRC
    bad = b[:8] + bytes([9]) + b[9:-4]
    with pytest.raises(ValueError, match="inconsistent"):
        cache_from_bytes(_reframe(bad))
    # an int8 payload declared as float32 data
    bad = b[:11] + bytes([1]) + b[12:-4]
    with pytest.raises(ValueError, match="inconsistent"):
        cache_from_bytes(_reframe(bad))
    # lengths claiming more entries than the payload holds
    hdr = HEADER_BYTES
    bad = b[:hdr] + struct.pack("<i", 1000) + b[hdr + 4:-4]
    with pytest.raises(ValueError, match="inconsistent"):
        cache_from_bytes(_reframe(bad))


def test_bad_arguments():
    c = build(CASES[0])
    with pytest.raises(ValueError, match="user_index"):
        c.to_bytes(3)
    with pytest.raises(ValueError, match="user_index"):
        c.to_bytes(-1)
    with pytest.raises(TypeError, match="user_index"):
        c.to_bytes(1.0)
    with pytest.raises(TypeError, match="bytes"):
        cache_from_bytes("MKKV")
    assert cache_from_bytes(bytearray(c.to_bytes(0))).batch_size == 1


# ---- long tail -------------------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kf=st.sampled_from(["float", "int8", "int4", "int2", "fp8"]),
       vf=st.sampled_from(["float", "int8", "int4", "int2", "fp8"]),
       axis=st.sampled_from(["token", "channel"]), D=st.integers(1, 7), gsel=st.integers(0, 10),
       B=st.integers(1, 3), H=st.integers(1, 3), C=st.integers(0, 8), R=st.integers(0, 3),
       flags=st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans()),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
       seed=st.integers(0, 2 ** 16))
def test_hypothesis_round_trip_and_bytes(kf, vf, axis, D, gsel, B, H, C, R, flags, dtype, seed):
    residual, res_count, with_ts, with_count = flags
    divisors = [d for d in range(1, D + 1) if D % d == 0]
    G = divisors[gsel % len(divisors)] if (vf != "float" or axis == "token") else gsel + 1
    c = make_cache(B=B, H=H, C=C, D=D, seed=seed, dtype=dtype, with_ts=with_ts, with_count=with_count,
                   lengths=torch.randint(0, C + 1, (B, H), generator=torch.Generator().manual_seed(seed),
                                         dtype=torch.int32))
    if residual:
        c = with_residual(c, R=R, count=res_count, seed=seed + 1, dtype=dtype)
    if kf != "float" or vf != "float":
        c = quantize_cache(c, kf, vf, G, axis)
    nb = c.nbytes_per_user()
    for u in range(B):
        b = c.to_bytes(u)
        assert len(b) == int(nb[u]) + FRAMING_BYTES
        assert int(nb[u]) == sum(t.numel() * t.element_size() for t in tensors_of_user(c, u))
        assert_same_user(c, u, cache_from_bytes(b))
