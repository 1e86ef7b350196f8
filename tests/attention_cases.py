"""The attention conformance cases: one cache builder, one format list, one case table shared by every backend.

A ``Case`` is a full attention call (request, compressed cache, mask, kind, extras) described by its knobs;
``build(case)`` materialises it twice from one seed: in the case's dtype (what a backend runs) and in float64
over the SAME quantized codes and the same dtype-rounded float values (what the oracle runs), so a comparison
measures only the backend's own arithmetic.

FORMATS is the one list of cache formats the suite covers: a new format is one line here.
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Optional, Tuple

import torch

from malloc_kernels.cache import KVCache
from malloc_kernels.cache import quant as pyq
from malloc_kernels.core import formats

F64 = torch.float64

# name -> (k_format, v_format, k_axis, group size). Token-axis groups are channels, channel-axis groups (KIVI keys)
# tokens; values are grouped along channels either way, so a size that does not divide the head dim falls back to
# the whole row.
FORMATS = {
    "float": ("float", "float", "token", 0),
    "int8": ("int8", "int8", "token", 0),
    "fp8": ("fp8", "fp8", "token", 16),
    "int4_channel": ("int4", "int4", "channel", 32),
    "int4_token": ("int4", "int4", "token", 8),
    "int2_channel": ("int2", "int2", "channel", 32),
    "int2_token_int8v": ("int2", "int8", "token", 16),
    "nvfp4": ("nvfp4", "nvfp4", "token", 16),
}
KINDS = ("softmax", "hstu")
MASKS = ("causal", "full", "targets", "bool", "additive")


@dataclasses.dataclass(frozen=True)
class Case:
    """One attention call. ``fmt=None``: no cache. ``q_lengths``: jagged request lengths per user (else dense,
    ``L`` tokens each). ``R``: residual (full-precision recent) segment capacity, 0 = none. ``cache_lengths``:
    per-(user, kv head) lengths (else random in [1, C] with user 0 / head 0 empty). ``triton``: path / split /
    block overrides that steer the Triton kernels onto a boundary."""
    fmt: Optional[str]
    kind: str = "softmax"
    mask: str = "causal"
    B: int = 2
    Hq: int = 4
    Hkv: int = 2
    L: int = 3
    C: int = 19
    D: int = 16
    R: int = 0
    q_lengths: Optional[Tuple[int, ...]] = None
    cache_lengths: Optional[Tuple[Tuple[int, ...], ...]] = None
    dtype: torch.dtype = torch.float32
    bias: bool = False
    counts: bool = True
    stats: bool = False
    hstu_norm: object = "original"
    group_size: Optional[int] = None
    triton: Tuple[Tuple[str, object], ...] = ()
    tag: str = ""

    @property
    def name(self) -> str:
        dt = {torch.float32: "", torch.float16: "-fp16", torch.bfloat16: "-bf16"}[self.dtype]
        parts = [self.fmt or "nocache", self.kind, self.mask, f"B{self.B}H{self.Hq}/{self.Hkv}L{self.L}"
                 f"C{self.C}D{self.D}" + (f"R{self.R}" if self.R else "")]
        if self.q_lengths is not None:
            parts.append("jagged")
        if self.bias:
            parts.append("bias")
        if self.stats:
            parts.append("stats")
        if self.hstu_norm != "original":
            parts.append(f"norm={self.hstu_norm}")
        if self.tag:
            parts.append(self.tag)
        return "-".join(parts) + dt

    @property
    def seed(self) -> int:
        """Stable across processes (``hash`` of a str is salted per process)."""
        return zlib.crc32(self.name.encode())


def _group(gs: int, D: int, fmt: str = "int8") -> int:
    # values are always grouped along channels, so one group size must divide the head dim for both sides; a
    # format with a fixed group size (nvfp4: 16, the last group partial) keeps it at any head dim
    fixed = formats.get(fmt).group_size
    if fixed:
        return fixed
    return gs if gs and D % gs == 0 else D


def make_cache(gen, B, Hkv, C, D, fmt, *, R=0, lengths=None, counts=True, timestamps=True,
               payload_dtype=torch.float32, group_size=None) -> KVCache:
    """A ragged compressed cache: per-head lengths (user 0 / kv head 0 empty unless ``lengths`` is given),
    shuffled positions, merge counts, timestamps, an optional residual segment of capacity ``R``; float payloads
    in ``payload_dtype``, quantized ones packed from fp32 values by the Python packer (bit-exact with the C++ one,
    tests/test_cpp_quant.py)."""
    k = torch.randn(B, Hkv, C, D, generator=gen)
    v = torch.randn(B, Hkv, C, D, generator=gen)
    if lengths is None:
        length = torch.randint(1, C + 1, (B, Hkv), generator=gen, dtype=torch.int32)
        length[0, 0] = 0
    else:
        length = torch.tensor(lengths, dtype=torch.int32)
    orig = (length.max(dim=1).values + R + 3).to(torch.int32)
    position = torch.stack([torch.randperm(C, generator=gen) for _ in range(B * Hkv)]).view(B, Hkv, C).to(torch.int32)
    ts = position.to(torch.int64) * 37 + 1000 if timestamps else None
    count = torch.randint(1, 4, (B, Hkv, C), generator=gen).to(torch.float32) if counts else None
    res = None
    if R:
        rl = torch.randint(0, R + 1, (B, Hkv), generator=gen, dtype=torch.int32)
        rpos = (C + torch.arange(R, dtype=torch.int32)).expand(B, Hkv, R).contiguous()
        res = KVCache(torch.randn(B, Hkv, R, D, generator=gen).to(payload_dtype),
                      torch.randn(B, Hkv, R, D, generator=gen).to(payload_dtype), rl, rpos, orig.clone(), D,
                      timestamp=rpos.to(torch.int64) * 37 + 1000 if timestamps else None)
    k_fmt, v_fmt, axis, gs = FORMATS[fmt]
    cache = KVCache(k.to(payload_dtype) if k_fmt == "float" else k, v.to(payload_dtype) if v_fmt == "float" else v,
                    length, position, orig, D, timestamp=ts, count=count, residual=res)
    if k_fmt != "float":
        cache = pyq.quantize_cache(cache, k_fmt, v_fmt, _group(group_size or gs, D, k_fmt), axis)
    return cache


def to_float64(cache: Optional[KVCache]) -> Optional[KVCache]:
    """The oracle's copy: float payloads (main and residual) upcast to float64, quantized codes unchanged."""
    if cache is None:
        return None
    ch = {}
    if cache.k_format == "float":
        ch["k"] = cache.k.to(F64)
    if cache.v_format == "float":
        ch["v"] = cache.v.to(F64)
    if cache.residual is not None:
        ch["residual"] = to_float64(cache.residual)
    return cache.replace(**ch)


def build(case: Case):
    """(kwargs for ``validate_call`` in the case's dtype, the same in float64 for the oracle)."""
    gen = torch.Generator().manual_seed(case.seed)
    dt = case.dtype
    cache = None
    if case.fmt is not None:
        cache = make_cache(gen, case.B, case.Hkv, case.C, case.D, case.fmt, R=case.R, lengths=case.cache_lengths,
                           counts=case.counts, timestamps=case.bias, payload_dtype=dt, group_size=case.group_size)
    kw = {}
    if case.q_lengths is not None:
        ql = torch.tensor(case.q_lengths, dtype=torch.int64)
        kw["offsets"] = torch.cat([torch.zeros(1, dtype=torch.int64), ql.cumsum(0)])
        T = int(ql.sum())
        shapes = [(T, case.Hq, case.D), (T, case.Hkv, case.D), (T, case.Hkv, case.D)]
        qts_shape = (T,)
    else:
        shapes = [(case.B, case.Hq, case.L, case.D), (case.B, case.Hkv, case.L, case.D),
                  (case.B, case.Hkv, case.L, case.D)]
        qts_shape = (case.B, case.L)
    q, k, v = (torch.randn(*s, generator=gen).to(dt) for s in shapes)
    if case.mask in ("causal", "targets"):
        kw["is_causal"] = True
    if case.mask == "targets":
        ql = case.q_lengths if case.q_lengths is not None else (case.L,) * case.B
        kw["num_targets"] = torch.tensor([int(torch.randint(0, n + 1, (), generator=gen)) for n in ql])
    mask64 = None
    if case.mask in ("bool", "additive"):
        assert case.q_lengths is None, "attn_mask cases are dense"
        shape = (case.B, case.Hq, case.L, case.L)
        if case.mask == "bool":
            m = torch.rand(*shape, generator=gen) > 0.4
            m[-1, -1, -1, :] = False                         # a row that sees no request key
            kw["attn_mask"], mask64 = m, m
        else:
            m = torch.randn(*shape, generator=gen)
            m[0, -1, -1, :2] = float("-inf")
            kw["attn_mask"], mask64 = m.to(dt), m.to(dt).to(F64)
    if case.bias:
        kw["pos_bias"] = torch.randn(case.Hq, 50, generator=gen) * 0.5
        kw["time_bias"] = torch.randn(case.Hq, 24, generator=gen) * 0.5
        kw["query_timestamps"] = torch.randint(2000, 3000, qts_shape, generator=gen) * 37
    if case.kind == "hstu":
        kw["hstu_norm"] = case.hstu_norm
    else:
        kw["return_lse"] = True
    if case.stats:
        kw.update(return_stats=True, stats_window=2)
    low = dict(kw, query=q, key=k, value=v, cache=cache, kind=case.kind, enable_gqa=True)
    exact = dict(low, query=q.to(F64), key=k.to(F64), value=v.to(F64), cache=to_float64(cache))
    if mask64 is not None:
        exact["attn_mask"] = mask64
    return low, exact


def _cases():
    out = []
    fmts = list(FORMATS)
    # every format x kind x mask that every backend takes (the masks that only Triton takes are below)
    for i, fmt in enumerate(fmts):
        for kind in KINDS:
            for j, mask in enumerate(("causal", "full", "targets")):
                jagged = (i + j) % 2 == 1
                channel = FORMATS[fmt][2] == "channel"
                out.append(Case(fmt, kind, mask, q_lengths=(3, 2) if jagged else None, R=3 if channel else 0,
                                bias=(i + j) % 3 == 0, stats=j == 0))
    for kind in KINDS:
        out.append(Case(None, kind, "causal", L=7, bias=True, stats=True))
        out.append(Case(None, kind, "targets", L=6, Hq=3, Hkv=3, D=8, q_lengths=(6, 4)))
    # arbitrary masks: bool (with a row that sees no request key) and additive (-inf entries)
    for kind in KINDS:
        for mask in ("bool", "additive"):
            out.append(Case("float", kind, mask, L=4, hstu_norm="kept" if kind == "hstu" else "original"))
    # low precision: the rule's interesting side
    for dt in (torch.float16, torch.bfloat16):
        for fmt, kind in (("float", "softmax"), ("int4_channel", "hstu"), ("int8", "softmax")):
            out.append(Case(fmt, kind, "causal", R=3 if fmt == "int4_channel" else 0, dtype=dt,
                            stats=fmt == "float"))
    # hstu normalisers
    for norm in ("kept", 37):
        out.append(Case("int4_channel", "hstu", "causal", R=3, hstu_norm=norm, bias=True))
        out.append(Case("float", "hstu", "targets", hstu_norm=norm, q_lengths=(3, 0)))
    # decode (one query token): the kernels' from-codes fast paths for head dims 32/64/128, GQA groups of 1..8
    for fmt in fmts:
        for D, Hq, Hkv in ((64, 4, 4), (64, 8, 2), (32, 2, 1), (128, 4, 2), (40, 2, 2)):
            out.append(Case(fmt, "softmax", "causal", B=2, Hq=Hq, Hkv=Hkv, L=1, C=97, D=D, stats=D == 32,
                            tag="decode"))
        out.append(Case(fmt, "hstu", "causal", B=2, Hq=8, Hkv=2, L=1, C=97, D=64, bias=True, tag="decode"))
    # odd sizes: D 1/7/17, one-entry caches, odd lengths
    for D in (1, 7, 17):
        for L, C in ((1, 1), (17, 97)):
            for fmt in ("float", "int8", "int4_token"):
                out.append(Case(fmt, "softmax", "causal", B=2, Hq=6, Hkv=3, L=L, C=C, D=D))
    # split-K boundaries: segment lengths at and around 8 with Triton's split and block set to 8
    for kind in KINDS:
        out.append(Case("int4_channel", kind, "causal", B=3, C=16, R=3, q_lengths=(2, 1, 0),
                        cache_lengths=((7, 8), (9, 16), (0, 1)),
                        triton=(("path", "decode"), ("split_size", 8), ("block_n", 8)), tag="split8"))
    # nothing to see: empty cache rows and users without request tokens
    out.append(Case("float", "softmax", "causal", B=3, q_lengths=(0, 2, 0), cache_lengths=((0, 0), (0, 3), (0, 0)),
                    stats=True, tag="empty"))
    return out


CASES = _cases()
assert len({c.name for c in CASES}) == len(CASES), "case names must be unique"
