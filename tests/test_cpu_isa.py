"""Per-call ISA variants of the C++ CPU kernels (csrc/include/malloc_kernels/isa.h): MALLOC_KERNELS_ISA
(auto | portable | avx2 | avx512 | neon) is read at every call, ``torch.ops.malloc_kernels.cpu_isa_supported()`` lists the
variants this CPU runs, and EVERY supported variant of every family (attention over every cache format and head dim,
training attention forward/backward, cross-entropy rows, product-key top-k and gather) is checked against the float64
reference here. Variants this CPU cannot run are reported as skipped, by name."""
import itertools
import os
import platform

import pytest
import torch

import malloc_kernels as mk
from malloc_kernels.loss import cross_entropy_rows_, reference as loss_ref
from malloc_kernels.memory import reference as pkm_ref
from malloc_kernels.core import extension
from malloc_kernels.reference import attention as ref_attention

from attention_cases import to_float64 as _to64

pytestmark = pytest.mark.skipif(not extension.has_op("cpu_isa_supported")[0], reason="C++ extension not built")

ALL = ["portable", "avx2", "avx512"]
FAMILIES = {"attention": "avx512", "train_attention": "avx512", "cross_entropy": "avx2", "pkm_topk": "avx2",
            "pkm_gather": "avx512", "wkv": "avx512", "lsh_attention": "portable"}


def _supported():
    return list(torch.ops.malloc_kernels.cpu_isa_supported()) if extension.has_op("cpu_isa_supported")[0] else []


def _variant_params():
    have = _supported()
    return [pytest.param(v, marks=pytest.mark.skipif(v not in have, reason=f"this CPU cannot run the {v} variant"))
            for v in ALL]


VARIANTS = _variant_params()


@pytest.fixture
def isa(request, monkeypatch):
    monkeypatch.setenv("MALLOC_KERNELS_ISA", request.param)
    return request.param


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def test_supported_list_matches_cpuinfo():
    have = _supported()
    assert have[0] == "portable" and have == [v for v in ALL if v in have]
    flags = _cpu_flags()
    if flags:
        assert ("avx2" in have) == ({"avx2", "fma", "f16c"} <= flags)
        assert ("avx512" in have) == ({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq",
                                       "avx512_vnni"} <= flags)


@pytest.mark.parametrize("isa", VARIANTS, indirect=True)
def test_variant_is_read_per_call_and_capped_per_family(isa, monkeypatch):
    order = ALL.index(isa)
    for fam, best in FAMILIES.items():
        assert torch.ops.malloc_kernels.cpu_isa_variant(fam) == ALL[min(order, ALL.index(best))]
    monkeypatch.setenv("MALLOC_KERNELS_ISA", "portable")  # no caching: the next call sees the new value
    assert torch.ops.malloc_kernels.cpu_isa_variant("attention") == "portable"
    monkeypatch.setenv("MALLOC_KERNELS_ISA", "auto")
    best = _supported()[-1]
    assert torch.ops.malloc_kernels.cpu_isa_variant("attention") == best


def test_bad_or_unsupported_request_names_the_variable(monkeypatch):
    q = torch.randn(1, 2, 3, 8)
    monkeypatch.setenv("MALLOC_KERNELS_ISA", "sse9")
    with pytest.raises(ValueError, match="MALLOC_KERNELS_ISA=sse9"):
        mk.attention(q, q, q, backend="cpu")
    with pytest.raises(ValueError, match="MALLOC_KERNELS_ISA"):
        torch.ops.malloc_kernels.cpu_isa_variant("attention")
    for v in ALL:
        if v not in _supported():
            monkeypatch.setenv("MALLOC_KERNELS_ISA", v)
            with pytest.raises(ValueError, match=f"MALLOC_KERNELS_ISA={v}.*cannot run"):
                mk.attention(q, q, q, backend="cpu")
    monkeypatch.delenv("MALLOC_KERNELS_ISA")
    with pytest.raises(ValueError, match="unknown family"):
        torch.ops.malloc_kernels.cpu_isa_variant("gpu")


@pytest.mark.skipif(platform.machine() in ("aarch64", "arm64"), reason="neon is this machine's own variant")
def test_neon_is_refused_off_aarch64_by_name(monkeypatch):
    """The aarch64 variant is never listed, and a request for it fails naming the variable and the architecture
    (never a silent fallback to another variant)."""
    assert "neon" not in _supported()
    q = torch.randn(1, 2, 3, 8)
    monkeypatch.setenv("MALLOC_KERNELS_ISA", "neon")
    for call in (lambda: mk.attention(q, q, q, backend="cpu"),
                 lambda: torch.ops.malloc_kernels.cpu_isa_variant("attention")):
        with pytest.raises(ValueError, match="MALLOC_KERNELS_ISA=neon: this CPU cannot run that variant .neon is the "
                                             "aarch64 variant"):
            call()


# ---- attention: every format x kind x head dim, decode (Lq 1, 2) and append (Lq 8, 17) shapes -------------------

@pytest.mark.parametrize("isa", VARIANTS, indirect=True)
@pytest.mark.parametrize("D", [32, 64, 128, 24])
@pytest.mark.parametrize("fmt", ["none", "int8", "fp8", "int4", "int2", "kivi4", "kivi2"])
def test_attention_every_variant_format_head_dim(isa, D, fmt):
    g = torch.Generator().manual_seed(D + len(fmt))
    B, Hq, Hkv, N = 3, 4, 2, 150
    hk, hv = torch.randn(B, Hkv, N, D, generator=g), torch.randn(B, Hkv, N, D, generator=g)
    cache = mk.compress(hk, hv, fmt, lengths=torch.tensor([150, 97, 1]))
    for Lq in (1, 2, 8, 17):
        q = torch.randn(B, Hq, Lq, D, generator=g)
        k, v = torch.randn(B, Hkv, Lq, D, generator=g), torch.randn(B, Hkv, Lq, D, generator=g)
        for kind in ("softmax", "hstu"):
            got = mk.attention(q, k, v, cache=cache, backend="cpu", is_causal=True, kind=kind)
            want = ref_attention(q.double(), k.double(), v.double(), cache=_to64(cache), is_causal=True, kind=kind)
            torch.testing.assert_close(got.double(), want.double(), atol=3e-5, rtol=3e-5,
                                       msg=f"{isa} D={D} {fmt} Lq={Lq} {kind}")


@pytest.mark.parametrize("isa", VARIANTS, indirect=True)
@pytest.mark.parametrize("D", [32, 64, 128, 24])
def test_attention_row_tiles_every_variant(isa, D):
    """The register-tiled many-row path (>= 8 rows per kv head): 8 rows (Hq = Hkv, Lq = 8: the 8-lane tile even on
    AVX-512), 16 / 24 / 40 rows with GQA; channel- and token-axis keys with group sizes 16, 32 and the whole row;
    cache lengths 0 / 1 / 17 / 97 (odd blocks, an empty row); against the float64 reference."""
    g = torch.Generator().manual_seed(100 + D)
    B, N = 4, 97
    lengths = torch.tensor([97, 17, 0, 1])
    formats = [("int8", {}), ("int4", {}), ("int2", {}), ("int4", dict(k_axis="token")),
               ("int2", dict(k_axis="token", group_size=D)), ("none", {})]
    if D % 16 == 0:
        formats += [("int4", dict(group_size=16)), ("int2", dict(k_axis="token", group_size=16)),
                    ("int8", dict(group_size=16))]
    for Hkv, calls in ((2, ((2, 8, "hstu"), (2, 8, "softmax"), (4, 8, "softmax"))), (1, ((4, 10, "hstu"),))):
        hk, hv = torch.randn(B, Hkv, N, D, generator=g), torch.randn(B, Hkv, N, D, generator=g)
        for (fmt, kw), (Hq, Lq, kind) in itertools.product(formats, calls):
            if (Hq, Lq, kind) == calls[0]:
                cache = mk.compress(hk, hv, fmt, lengths=lengths, **kw)
            q = torch.randn(B, Hq, Lq, D, generator=g)
            k, v = torch.randn(B, Hkv, Lq, D, generator=g), torch.randn(B, Hkv, Lq, D, generator=g)
            got = mk.attention(q, k, v, cache=cache, backend="cpu", is_causal=True, kind=kind, enable_gqa=Hq != Hkv)
            want = ref_attention(q.double(), k.double(), v.double(), cache=_to64(cache), is_causal=True, kind=kind,
                                 enable_gqa=Hq != Hkv)
            torch.testing.assert_close(got.double(), want.double(), atol=3e-5, rtol=3e-5,
                                       msg=f"{isa} D={D} {fmt} {kw} Hq={Hq} Hkv={Hkv} {kind}")


@pytest.mark.parametrize("isa", VARIANTS, indirect=True)
def test_attention_gqa_decode_from_codes_every_variant(isa):
    """Decode with 4 query heads per kv head (the code-layout path with several rows), per-token and per-channel
    groups, against the reference."""
    g = torch.Generator().manual_seed(7)
    B, Hq, Hkv, N = 2, 8, 2, 300
    for D in (32, 64, 128):
        hk, hv = torch.randn(B, Hkv, N, D, generator=g), torch.randn(B, Hkv, N, D, generator=g)
        for fmt in ("int8", "int4", "int2", "kivi4", "kivi2"):
            cache = mk.compress(hk, hv, fmt, lengths=torch.tensor([300, 129]))
            for Lq in (1, 3):
                q = torch.randn(B, Hq, Lq, D, generator=g)
                k, v = torch.randn(B, Hkv, Lq, D, generator=g), torch.randn(B, Hkv, Lq, D, generator=g)
                got = mk.attention(q, k, v, cache=cache, backend="cpu", is_causal=True, enable_gqa=True)
                want = ref_attention(q.double(), k.double(), v.double(), cache=_to64(cache), is_causal=True,
                                     enable_gqa=True)
                torch.testing.assert_close(got.double(), want.double(), atol=3e-5, rtol=3e-5,
                                           msg=f"{isa} D={D} {fmt} Lq={Lq}")


# ---- training attention, cross-entropy rows, product-key memory -------------------------------------------------

@pytest.mark.parametrize("isa", VARIANTS, indirect=True)
@pytest.mark.parametrize("kind", ["hstu", "softmax"])
@pytest.mark.parametrize("lens,Hq,Hkv,D", [([5, 0, 1, 17, 9], 2, 2, 32), ([4, 8, 3, 16, 33, 2], 4, 1, 16),
                                          ([1, 40, 7], 4, 2, 64)])
def test_train_attention_every_variant(isa, kind, lens, Hq, Hkv, D):
    """test_train_attention's float32 rule (2x torch's own error) for every variant (the avx512 one has 512-bit
    rowdots / tiledots / rank_update steps from 32 / 16 keys, hence a 40-token user)."""
    from test_train_attention import _batch, _run
    args = _batch(lens, Hq, Hkv, D, torch.float32, seed=3 * sum(lens) + D)
    exact = _run("reference", *[a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args],
                 kind=kind)
    ours = _run("cpu", *args, kind=kind)
    torch32 = _run("reference", *args, kind=kind)
    for name, o, t, e in zip(["out", "dq", "dk", "dv", "dpos_bias", "dtime_bias"], ours, torch32, exact):
        ours_err = (o.double() - e.double()).abs().max().item()
        torch_err = (t.double() - e.double()).abs().max().item()
        assert ours_err <= 2 * torch_err + 1e-6 * (1 + e.abs().max().item()), (isa, name, ours_err, torch_err)


@pytest.mark.parametrize("isa", VARIANTS, indirect=True)
@pytest.mark.parametrize("r,c", [(5, 7), (33, 9), (17, 3706)])
def test_cross_entropy_rows_every_variant(isa, r, c):
    g = torch.Generator().manual_seed(r + c)
    z = torch.randn(r, c, generator=g) * 4
    t = torch.randint(0, c, (r,), generator=g)
    loss_want, grad_want = loss_ref.cross_entropy_rows(z, t)
    out = z.clone()
    loss = cross_entropy_rows_(out, t, backend="cpu")
    torch.testing.assert_close(loss.double(), loss_want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double(), grad_want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isa", VARIANTS, indirect=True)
def test_pkm_every_variant(isa):
    g = torch.Generator().manual_seed(3)
    q, keys = torch.randn(17, 3, 28, generator=g), torch.randn(3, 2, 17, 14, generator=g)
    sc, ic = torch.ops.malloc_kernels.pkm_topk(q, keys, 5)
    sb, ib = pkm_ref.pkm_topk_bruteforce(q, keys, 5)
    assert torch.equal(ic, ib)
    torch.testing.assert_close(sc, sb, rtol=2e-5, atol=2e-5)
    values, idx = torch.randn(300, 64, generator=g), torch.randint(0, 300, (33, 16), generator=g)
    w, go = torch.randn(33, 16, generator=g), torch.randn(33, 64, generator=g)
    out = torch.ops.malloc_kernels.pkm_gather(values, idx, w)
    torch.testing.assert_close(out, pkm_ref.pkm_gather(values.double(), idx, w.double()).float(), rtol=2e-5, atol=2e-5)
    gw, rows, grows = torch.ops.malloc_kernels.pkm_gather_backward(go, values, idx, w)
    rgw, rrows, rgrows = pkm_ref.pkm_gather_backward(go.double(), values.double(), idx, w.double())
    assert torch.equal(rows, rrows)
    torch.testing.assert_close(gw, rgw.float(), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(grows, rgrows.float(), rtol=2e-5, atol=2e-5)


def test_env_not_leaked():
    assert os.environ.get("MALLOC_KERNELS_ISA") in (None, "", "auto")
