"""Online maintenance of compressed caches: ``KVCache.append`` (DESIGN.md section 8, "Append").

A served user's cache grows by the request's own entries after every request. ``append_cache`` adds them AFTER
every stored entry (positions continue the user's ``original_length`` unless given), keeps the original positions,
timestamps and counts of everything already stored, and brings the cache back within the budget of the policy that
built it (``cache.policy``, set by ``compress``). Per family:

* ``none`` (or a float cache without a policy): plain concatenation.
* precision, token-axis groups (``int8``, ``fp8``, ``int4``/``int2`` with ``k_axis="token"``): the new entries are
  quantized on their own and concatenated. EXACT: equals ``compress`` of the whole history (each entry's codes
  depend only on that entry).
* precision, channel-axis key groups (``kivi*``, ``intactkv*``, default ``int4``/``int2``): new entries join the
  full-precision residual; whenever it holds at least ``residual + group_size`` entries the oldest whole groups are
  quantized into the main segment (a group of G consecutive entries, as KIVI flushes its window). EXACT for
  ``kivi`` and for the plain quantizers at group boundaries (the flushed groups are the groups ``compress`` forms;
  each group's codes depend only on its members). A plain-quantized cache whose last key group is partial first
  moves that group back into the residual as its dequantized values (the one place where a value is re-quantized).
  ``intactkv``: the pivots are the entries ``compress`` kept in the residual that are older than the newest
  quantized entry, plus the ``sinks`` earliest entries; they stay full precision for good. New entries never
  become pivots (choosing them would need the whole history's attention): an online INVARIANT, not an equality.
* token policies (``recent``, ``streaming``, ``random``, ``h2o``, ``tova``, ``snapkv``, ``pyramidkv``) and merging
  (``chunk``, ``tome``, ``d2o``): the policy's own selection runs on (stored entries + new entries) at the budget of
  the grown history (a ratio budget is a fraction of ``original_length``). EXACT for ``recent``, ``streaming`` and
  ``random`` with a token budget (the k most recent / sinks + window / top-k of a fixed per-entry hash are preserved
  by taking the top-k of (previous top-k + new)); with a ratio budget the kept set can only grow from what was
  kept. Scoring policies are inherently online: ``h2o``/``d2o`` add the serving call's attention mass
  (``stats.cache_mass`` / ``residual_mass``) to each stored entry's accumulated mass (``cache.mass``) and start new
  entries at their own ``key_mass``, as H2O does while decoding; ``tova``/``snapkv``/``pyramidkv`` score by the
  latest request's window mass (``stats_window`` 1 for TOVA, the policy's window otherwise). ``chunk`` with
  ``chunk=c`` fills the last partial chunk (count-weighted mean) and then forms new chunks of c: EXACT when
  appending whole chunks to a cache whose chunks are full. Merging keeps counts: they always sum to the tokens
  seen (``tome``, ``chunk``; ``d2o`` with ``proportional=True`` minus the entries it dropped).
* hybrids ``"a+b"``: stored entries are decoded (quantized ones to their dequantized values), stage ``a`` selects
  or merges at the budget, stage ``b`` re-encodes what was kept. An entry can thus be re-quantized from its
  dequantized value when its key group changes; INVARIANTS: budget held, original positions kept, newest kept.

Budgets: token budgets count stored entries (main + residual) per (user, kv head); ``Budget(bytes=X)`` keeps the
largest count whose cache fits (precision-only methods keep every token, so their bytes grow with the history).

Inputs are validated (ValueError naming the argument): shapes, dtypes, device, finite keys/values/counts, positions
that fit int32 and come strictly after every stored position, timestamps exactly when the cache has them.

This append is functional: it returns a new cache sized by ``max(length + new)``, read on the host. A serving loop
that must not read the host (a CUDA graph) reserves capacity and appends in place (``online_inplace.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from ..cache.quant import quantize_tensor
from ..cache.types import FLOAT_FORMAT, KVCache, register_append
from ..core.layout import broadcast_per_entry, device_assert, jagged_to_padded
from ..core.policy_spec import PolicySpec
from .budget import Budget, largest_fitting, token_budgets
from .base import CONTEXT_KEYS, PolicyInput
from .registry import get_policy
from .selection import canonical_rows, select_top

INT32_MAX = 2 ** 31 - 1
# how a scoring policy's per-entry state (``KVCache.mass``) evolves: "total" accumulates the attention mass of
# every query served (H2O's heavy hitters), "window" keeps the latest request's window mass (TOVA, SnapKV)
_MASS_MODE = {"h2o": "total", "d2o": "total", "tova": "window", "snapkv": "window", "pyramidkv": "window"}
_PRECISION_ONLY = ("int8", "fp8", "int4", "int2")


# ---- policy spec <-> policy objects ----------------------------------------------------------------------------
def split_params(params: dict):
    """(method parameters, call context) of a spec's parameters."""
    ctx = {k: v for k, v in params.items() if k in CONTEXT_KEYS}
    return {k: v for k, v in params.items() if k not in CONTEXT_KEYS}, ctx


def budget_of(spec: PolicySpec):
    if spec.budget is None:
        return None
    kind, value = spec.budget
    return Budget(bytes=value) if kind == "bytes" else value


def make_policy(spec: PolicySpec):
    """The policy object a spec describes (ValueError for unknown methods or parameters)."""
    params, _ = split_params(spec.param_dict())
    if "+" in spec.method:
        from .hybrid import HybridPolicy
        return HybridPolicy(spec.method, budget=budget_of(spec), seed=spec.seed, **params)
    return get_policy(spec.method)(budget=budget_of(spec), seed=spec.seed, **params)


def token_stage(policy):
    """The stage of ``policy`` that selects or merges tokens (None for precision-only methods)."""
    if hasattr(policy, "first"):
        return policy.first
    return policy if getattr(policy, "level", "") in ("pruning", "merging") else None


def mass_mode(policy) -> Optional[str]:
    stage = token_stage(policy)
    return None if stage is None else _MASS_MODE.get(stage.name)


def mass_window(policy, stats=None) -> Optional[int]:
    """``stats_window`` the serving call must use for this policy (None: none needed)."""
    stage = token_stage(policy)
    if stage is None or mass_mode(policy) != "window":
        return None
    if stage.name == "tova":
        return 1
    return stage.window if stage.window is not None else int(getattr(stats, "window", None) or 32)


def stats_window_for(cache: KVCache) -> Optional[int]:
    """The ``stats_window`` to pass to the serving ``attention`` call whose stats feed ``cache.append``."""
    if cache.policy is None:
        return None
    return mass_window(make_policy(cache.policy))


def serving_stats_request(cache: KVCache):
    """``(return_stats, stats_window)`` for the serving attention call whose stats feed ``cache.append``."""
    if cache.policy is None:
        return False, None
    policy = make_policy(cache.policy)
    return mass_mode(policy) is not None, mass_window(policy)


# ---- compress-time: record the policy and the initial score state ---------------------------------------------
def attach_policy(cache: KVCache, method: str, budget, seed: int, params: dict, extra: dict, policy,
                  inp: PolicyInput) -> KVCache:
    """``cache`` with its ``PolicySpec`` (None when a parameter is not a JSON scalar) and, for scoring policies,
    the mass ``compress`` scored each kept entry by (looked up by original position)."""
    scalars = {k: v for k, v in extra.items() if v is None or isinstance(v, (bool, int, float, str))}
    try:
        spec = PolicySpec.build(method, budget, seed, {**params, **scalars})
    except ValueError:
        return cache
    mode = mass_mode(policy)
    if mode is None:
        return cache.replace(policy=spec)
    from .selection import attention_mass
    stage = token_stage(policy)
    rows = canonical_rows(inp)
    mass = attention_mass(stage, inp, rows, window=mass_window(policy, inp.stats) if mode == "window" else None)
    return _with_mass(cache, rows.pos, rows.n, mass).replace(policy=spec)


def _lookup(pos_sorted, n, values, pos_out, len_out) -> torch.Tensor:
    """float32 ``values`` of the entries at ``pos_out`` (rows of ``pos_sorted`` are sorted on their valid slots)."""
    N = pos_sorted.shape[-1]
    if N == 0 or pos_out.shape[-1] == 0:
        return torch.zeros(pos_out.shape, dtype=torch.float32, device=pos_out.device)
    valid = torch.arange(N, device=n.device) < n[..., None]
    key = torch.where(valid, pos_sorted.to(torch.int64), torch.full_like(pos_sorted, INT32_MAX + 1,
                                                                          dtype=torch.int64))
    slot = torch.searchsorted(key.contiguous(), pos_out.to(torch.int64).contiguous()).clamp(max=N - 1)
    used = torch.arange(pos_out.shape[-1], device=n.device) < len_out.to(torch.int64)[..., None]
    return torch.where(used, torch.gather(values.to(torch.float64), 2, slot),
                       torch.zeros((), dtype=torch.float64, device=n.device)).to(torch.float32)


def _with_mass(cache: KVCache, pos_sorted, n, mass) -> KVCache:
    out = cache.replace(mass=_lookup(pos_sorted, n, mass, cache.position, cache.length))
    if cache.residual is not None:
        r = cache.residual
        out = out.replace(residual=r.replace(mass=_lookup(pos_sorted, n, mass, r.position, r.length)))
    return out


# ---- segments of entries ----------------------------------------------------------------------------------------
@dataclass
class Seg:
    """Per-(user, kv head) entries: per-entry tensors ``[B, H, C, *]`` (k, v, pos, ts, cnt, mass, ...) and the
    valid count ``n`` int64 ``[B, H]``."""

    t: Dict[str, torch.Tensor]
    n: torch.Tensor


def cat_segs(segs: List[Seg]) -> Seg:
    """Row-wise concatenation: each row holds the first ``n`` entries of every segment in order, zero-padded."""
    B, H = segs[0].n.shape
    dev = segs[0].n.device
    total = sum(s.n for s in segs)
    N = int(total.max()) if total.numel() else 0
    names = list(segs[0].t)
    out = {}
    for name in names:
        ref = segs[0].t[name]
        buf = torch.zeros((B, H, N + 1) + tuple(ref.shape[3:]), dtype=ref.dtype, device=dev)
        off = torch.zeros(B, H, dtype=torch.int64, device=dev)
        for s in segs:
            t = s.t[name]
            C = t.shape[2]
            j = torch.arange(C, device=dev)
            idx = torch.where(j < s.n[..., None], off[..., None] + j, torch.full_like(off[..., None] + j, N))
            idx = idx.view(B, H, C, *([1] * (t.dim() - 3))).expand(t.shape)
            buf.scatter_(2, idx, t.to(ref.dtype))
            off = off + s.n
        out[name] = buf[:, :, :N].contiguous()
    return Seg(out, total)


def _entry_seg(c: KVCache, k, v, mass, want_cnt: bool, want_mass: bool) -> Seg:
    B, H, C = c.position.shape
    dev = c.position.device
    t = {"k": k, "v": v, "pos": c.position}
    if c.timestamp is not None:
        t["ts"] = c.timestamp
    if want_cnt:
        t["cnt"] = c.count if c.count is not None else torch.ones(B, H, C, dtype=torch.float32, device=dev)
    if want_mass:
        t["mass"] = mass if mass is not None else torch.zeros(B, H, C, dtype=torch.float64, device=dev)
    return Seg(t, c.length.to(torch.int64))


def _new_seg(new: "New", want_cnt: bool, want_mass: bool, mass) -> Seg:
    B, H, L = new.pos.shape
    t = {"k": new.k, "v": new.v, "pos": new.pos}
    if new.ts is not None:
        t["ts"] = new.ts
    if want_cnt:
        t["cnt"] = new.cnt if new.cnt is not None else torch.ones(B, H, L, dtype=torch.float32, device=new.k.device)
    if want_mass:
        t["mass"] = mass if mass is not None else torch.zeros(B, H, L, dtype=torch.float64, device=new.k.device)
    return Seg(t, new.n[:, None].expand(B, H).contiguous())


def seg_input(u: Seg, orig_new, ctx) -> PolicyInput:
    return PolicyInput(k=u.t["k"], v=u.t["v"], lengths=u.n.max(dim=1).values.to(torch.int32) if u.n.shape[1] else
                       torch.zeros(u.n.shape[0], dtype=torch.int32, device=u.n.device),
                       positions=u.t["pos"].to(torch.int32), timestamps=u.t.get("ts"), counts=u.t.get("cnt"),
                       stats=u.t.get("mass"), extra=dict(ctx), head_lengths=u.n.to(torch.int32),
                       original_lengths=orig_new.to(torch.int32))


# ---- new entries: validation and normalisation -------------------------------------------------------------------
@dataclass
class New:
    k: torch.Tensor          # [B, H, L, D] floating
    v: torch.Tensor
    n: torch.Tensor          # int64 [B]
    pos: torch.Tensor        # int32 [B, H, L]
    ts: Optional[torch.Tensor]
    cnt: Optional[torch.Tensor]
    offsets: Optional[torch.Tensor]


def _segments(cache: KVCache):
    return [cache] + ([cache.residual] if cache.residual is not None else [])


def _per_entry(t, name, B, H, L, offsets, dev):
    if not isinstance(t, torch.Tensor):
        try:
            t = torch.as_tensor(t)
        except (RuntimeError, OverflowError, TypeError, ValueError) as e:
            raise ValueError(f"{name} must be integers that fit int64: {e}") from None
    if t.is_floating_point() or t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if hasattr(torch, "uint64") and t.dtype == torch.uint64:
        raise TypeError(f"{name} must be a signed integer tensor (uint64 values may not fit int64)")
    t = t.to(device=dev, dtype=torch.int64)
    if offsets is not None:
        if t.dim() == 1:
            t = jagged_to_padded(t, offsets, max_len=L)[0]
        elif t.dim() == 2 and t.shape[1] == H:
            t = jagged_to_padded(t, offsets, max_len=L)[0]
        else:
            raise ValueError(f"jagged {name} must be [total] or [total, Hkv], got {tuple(t.shape)}")
    return broadcast_per_entry(t, name, B, H, L, axis="L").contiguous()


def check_new_entries(cache: KVCache, key, value, positions=None, timestamps=None, lengths=None, offsets=None,
                      counts=None) -> New:
    """Validate and normalise the entries to append (the data checks of ``KVCache.append``)."""
    if not isinstance(key, torch.Tensor) or not isinstance(value, torch.Tensor):
        raise TypeError("key and value must be tensors")
    if not key.is_floating_point() or not value.is_floating_point():
        raise TypeError(f"key and value must be floating point, got {key.dtype} and {value.dtype}")
    if key.dtype != value.dtype:
        raise TypeError(f"key dtype {key.dtype} != value dtype {value.dtype}")
    dev = cache.device
    if key.device != dev or value.device != dev:
        raise ValueError(f"key/value are on {key.device}/{value.device} but the cache is on {dev}")
    B, H, D = cache.batch_size, cache.num_kv_heads, cache.head_dim
    if offsets is not None:
        if lengths is not None:
            raise ValueError("pass either offsets (jagged) or lengths (padded dense), not both")
        if key.dim() != 3 or value.shape != key.shape:
            raise ValueError(f"jagged key/value must both be [total, Hkv, D], got {tuple(key.shape)} and "
                             f"{tuple(value.shape)}")
        key, lengths = jagged_to_padded(key, offsets)
        value, _ = jagged_to_padded(value, offsets)
        if key.shape[0] != B:
            raise ValueError(f"offsets describe {key.shape[0]} users but the cache holds {B}")
    if key.dim() != 4 or value.shape != key.shape:
        raise ValueError(f"key/value must both be [B, Hkv, L, D] (or jagged with offsets=), got {tuple(key.shape)} "
                         f"and {tuple(value.shape)}")
    if key.shape[0] != B or key.shape[1] != H or key.shape[3] != D:
        raise ValueError(f"key/value must be [B={B}, Hkv={H}, L, D={D}] to match the cache, got {tuple(key.shape)}")
    L = key.shape[2]
    if lengths is None:
        n = torch.full((B,), L, dtype=torch.int64, device=dev)
    else:
        if not isinstance(lengths, torch.Tensor) or lengths.shape != (B,) or lengths.is_floating_point():
            raise ValueError(f"lengths must be an integer tensor [B]={B}, got {lengths!r}")
        n = lengths.to(device=dev, dtype=torch.int64)
        if B:
            device_assert(((n >= 0) & (n <= L)).all(), f"lengths must be within [0, L={L}]")
    # every data rule below is a device assert: no host read, so append adds no synchronisation to a serving step
    valid = torch.arange(L, device=dev) < n[:, None]                                 # [B, L]
    v4 = valid[:, None, :, None]
    device_assert((torch.isfinite(torch.where(v4, key, torch.zeros((), dtype=key.dtype, device=dev))).all() &
                   torch.isfinite(torch.where(v4, value, torch.zeros((), dtype=key.dtype, device=dev))).all()),
                  "key/value to append have NaN or infinite values; a cache stores finite entries only")
    orig = cache.original_length.to(torch.int64)
    if positions is None:
        pos = (orig[:, None] + torch.arange(L, device=dev))[:, None].expand(B, H, L)
    else:
        pos = _per_entry(positions, "positions", B, H, L, offsets, dev)
    v3 = valid[:, None, :].expand(B, H, L)
    vp = torch.where(v3, pos, torch.zeros_like(pos))
    device_assert(((vp >= 0) & (vp <= INT32_MAX)).all(), f"positions must fit int32 [0, {INT32_MAX}]")
    if L > 1:
        device_assert(~((pos[..., 1:] <= pos[..., :-1]) & v3[..., 1:]).any(),
                      "positions of the appended entries must be strictly increasing")
    last = torch.full((B, H), -1, dtype=torch.int64, device=dev)
    for seg in _segments(cache):
        ok = torch.arange(seg.capacity, device=dev) < seg.length.to(torch.int64)[..., None]
        p = torch.where(ok, seg.position.to(torch.int64), torch.full_like(seg.position, -1, dtype=torch.int64))
        if seg.capacity:
            last = torch.maximum(last, p.max(dim=-1).values)
    if L:
        device_assert(~((pos[..., 0] <= last) & v3[..., 0]).any(),
                      "positions must come after every stored entry's position (append adds entries after "
                      "the history); the default continues each user's original_length")
    ts = None
    if (timestamps is None) != (cache.timestamp is None):
        raise ValueError("timestamps must be given exactly when the cache carries timestamps")
    if timestamps is not None:
        ts = _per_entry(timestamps, "timestamps", B, H, L, offsets, dev)
        ts = torch.where(v3, ts, torch.zeros((), dtype=torch.int64, device=dev))
    cnt = None
    if counts is not None:
        c = counts if isinstance(counts, torch.Tensor) else torch.as_tensor(counts)
        if not c.is_floating_point():
            c = c.to(torch.float32)
        if offsets is not None:
            c = jagged_to_padded(c.to(dev), offsets, max_len=L)[0]
        if c.dim() == 2 and c.shape == (B, L):
            c = c[:, None].expand(B, H, L)
        if c.shape != (B, H, L):
            raise ValueError(f"counts must be [B, L] or [B, Hkv, L] = {(B, H, L)}, got {tuple(c.shape)}")
        c = torch.where(v3, c.to(device=dev, dtype=torch.float32), torch.zeros((), device=dev))
        device_assert((torch.isfinite(c) & (c >= 0)).all(), "counts must be finite and >= 0")
        cnt = c.contiguous()
    zero4 = torch.zeros((), dtype=key.dtype, device=dev)
    return New(torch.where(v4, key, zero4).contiguous(), torch.where(v4, value, zero4).contiguous(), n,
               torch.where(v3, pos, torch.zeros_like(pos)).to(torch.int32).contiguous(), ts, cnt, offsets)


# ---- the serving call's statistics -> per-entry mass -------------------------------------------------------------
def _stats_masses(cache: KVCache, new: New, stats, mode: str, window: Optional[int], method: str):
    """(main, residual, new) float64 masses after this request, for a scoring policy."""
    if stats is None:
        raise ValueError(f"{method}: append needs stats= (the AttentionStats of the serving call, "
                         f"attention(..., cache=cache, return_stats=True"
                         f"{', stats_window=%d' % window if window else ''}))")
    B, H, L = new.pos.shape
    suffix = "_window_mass" if mode == "window" else "_mass"
    if mode == "window" and window is not None and getattr(stats, "window", None) not in (None, window):
        raise ValueError(f"{method}: stats were computed with stats_window={stats.window}, the policy needs "
                         f"{window}")

    def field(name):
        t = getattr(stats, name, None)
        if t is None:
            raise ValueError(f"{method}: stats.{name} is missing (compute the stats with return_stats=True"
                             f"{', stats_window=%d' % window if window else ''} over this cache)")
        return t

    out = []
    for seg, name in ((cache, "cache"), (cache.residual, "residual")):
        if seg is None:
            out.append(None)
            continue
        m = field(name + suffix)
        if m.shape != seg.position.shape:
            raise ValueError(f"{method}: stats.{name}{suffix} must be {tuple(seg.position.shape)}, got "
                             f"{tuple(m.shape)}")
        m = m.to(device=seg.device, dtype=torch.float64)
        if mode == "total":
            m = m + (seg.mass.to(torch.float64) if seg.mass is not None else 0.0)
        out.append(m)
    # the shape rules that depend on the appended lengths are device asserts against the static stats shape (no
    # host read of the lengths), as every other check of append
    km = field("key" + suffix)
    if km.dim() == 2:
        offs = torch.cat([new.n.new_zeros(1), new.n.cumsum(0)])
        if km.shape[1] != H:
            raise ValueError(f"{method}: jagged stats.key{suffix} must be [total appended, Hkv={H}], got "
                             f"{tuple(km.shape)}")
        device_assert(offs[-1] == km.shape[0], f"{method}: jagged stats.key{suffix} must be [total appended, "
                      f"Hkv={H}] (one row per appended entry), got {tuple(km.shape)}")
        km = jagged_to_padded(km, offs.to(km.device), max_len=L, check=False)[0]
    if km.dim() != 3 or km.shape[0] != B or km.shape[1] != H:
        raise ValueError(f"{method}: stats.key{suffix} must be [B={B}, Hkv={H}, L] for the appended entries, got "
                         f"{tuple(km.shape)}")
    if B:
        device_assert(new.n.max() <= km.shape[2], f"{method}: stats.key{suffix} must be [B={B}, Hkv={H}, L] for "
                      f"the appended entries (L at least every user's appended count), got {tuple(km.shape)}")
    km = km[..., :L] if km.shape[2] >= L else torch.nn.functional.pad(km, (0, L - km.shape[2]))
    out.append(km.to(device=new.k.device, dtype=torch.float64))
    for m in out:
        if m is not None and m.numel():
            device_assert(torch.isfinite(m).all(), f"{method}: the attention statistics have non-finite values")
    return out


# ---- the families -------------------------------------------------------------------------------------------------
def maintaining_spec(cache: KVCache) -> PolicySpec:
    """The policy that maintains ``cache`` on append: its own, or ``"none"`` for a plain float cache."""
    if cache.policy is not None:
        return cache.policy
    if cache.is_quantized or cache.residual is not None:
        raise ValueError("cache.policy is None: a quantized or two-segment cache can only be maintained by the "
                         "policy that built it; build it with malloc_kernels.compress")
    return PolicySpec("none")


def append_cache(cache: KVCache, key, value, positions=None, timestamps=None, lengths=None, offsets=None,
                 counts=None, stats=None) -> KVCache:
    """``KVCache.append``: see the module docstring."""
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}")
    cache.check_contents()
    new = check_new_entries(cache, key, value, positions, timestamps, lengths, offsets, counts)
    spec = maintaining_spec(cache)
    policy = make_policy(spec)
    _, ctx = split_params(spec.param_dict())
    orig_new = (cache.original_length.to(torch.int64) + new.n).to(torch.int32)
    if orig_new.numel():
        device_assert((cache.original_length.to(torch.int64) + new.n).max() <= INT32_MAX,
                      "original_length would overflow int32")
    mode = mass_mode(policy)
    masses = (None, None, None)
    if mode is not None:
        masses = _stats_masses(cache, new, stats, mode, mass_window(policy, stats), spec.method)
    if spec.method == "none":
        out = _append_concat(cache, new)
    elif token_stage(policy) is None:
        out = _append_precision(cache, new, policy, spec)
    else:
        out = _append_tokens(cache, new, policy, masses, orig_new, ctx)
    out = out.replace(original_length=orig_new, policy=None if cache.policy is None else spec)
    if out.residual is not None:
        out = out.replace(residual=out.residual.replace(original_length=orig_new))
    return out.check_contents()


register_append(append_cache)


def _float_seg(c: KVCache, mass, want_cnt, want_mass, dtype=None) -> Seg:
    if c.is_quantized:
        k, v = c.dequantize(dtype or torch.float32)
    else:
        k, v = c.k, c.v
    if dtype is not None:
        k, v = k.to(dtype), v.to(dtype)
    return _entry_seg(c, k, v, mass, want_cnt, want_mass)


def _seg_cache(u: Seg, orig) -> KVCache:
    return KVCache(k=u.t["k"], v=u.t["v"], length=u.n.to(torch.int32), position=u.t["pos"].to(torch.int32),
                   original_length=orig.to(torch.int32), head_dim=u.t["k"].shape[-1], timestamp=u.t.get("ts"),
                   count=u.t.get("cnt"))


def _append_concat(cache, new):
    want_cnt = cache.count is not None or new.cnt is not None
    u = cat_segs([_entry_seg(cache, cache.k, cache.v, None, want_cnt, False),
                  _new_seg(new, want_cnt, False, None)])
    return _seg_cache(u, cache.original_length)


def _append_tokens(cache, new, policy, masses, orig_new, ctx):
    stage = token_stage(policy)
    want_cnt = cache.count is not None or new.cnt is not None or stage.level == "merging" or \
        (cache.residual is not None and cache.residual.count is not None)
    want_mass = masses[2] is not None
    dtype = new.k.dtype
    segs = [_float_seg(cache, masses[0], want_cnt, want_mass, dtype)]
    if cache.residual is not None:
        segs.append(_float_seg(cache.residual, masses[1], want_cnt, want_mass, dtype))
    segs.append(_new_seg(new, want_cnt, want_mass, masses[2]))
    u = cat_segs(segs)
    inp = seg_input(u, orig_new, ctx)
    rows = canonical_rows(inp)
    second = getattr(policy, "second", None)
    if stage.name == "chunk" and stage.budget is None:
        out = _chunk_fill(rows, cache.length.to(torch.int64), stage.chunk)
    else:
        fctx = stage.prepare(inp, rows)
        B, H = rows.n.shape

        def run(k):
            c1 = stage.select(rows, fctx, k)
            return c1 if second is None else _second_stage(second, c1, rows, inp, orig_new)

        budget = policy.budget
        if budget is not None and budget.is_bytes:
            n_user = rows.n.max(dim=1).values

            def run_user(kb):
                return run(torch.minimum(kb.to(rows.n.device)[:, None].expand(B, H), rows.n))

            out, _ = largest_fitting(run_user, n_user.clamp(max=1), n_user, budget.bytes, policy.name
                                     if hasattr(policy, "name") else stage.name, "kept tokens", affine=True)
        else:
            k = rows.n if budget is None else torch.minimum(token_budgets(budget, orig_new)[:, None].expand(B, H)
                                                            .to(rows.n.device), rows.n)
            out = run(stage.row_budgets(inp, rows, k))
    if want_mass:
        mass_canon = torch.gather(u.t["mass"], 2, rows.perm)
        out = _with_mass(out, rows.pos, rows.n, mass_canon)
    return out


def _second_stage(second, c1: KVCache, rows, inp, orig_new) -> KVCache:
    """Precision stage ``b`` of a hybrid on stage ``a``'s kept cache ``c1`` (IntactKV scores by the mass)."""
    stats = None
    if getattr(second, "pivots", 0):
        mass = inp.stats if inp.stats is not None else torch.zeros(rows.pos.shape, dtype=torch.float64)
        mass_canon = torch.gather(mass, 2, rows.perm)
        stats = _lookup(rows.pos, rows.n, mass_canon, c1.position, c1.length).to(torch.float64)
    inp2 = PolicyInput(k=c1.k, v=c1.v, lengths=c1.length.max(dim=1).values if c1.length.shape[1] else
                       torch.zeros(c1.length.shape[0], dtype=torch.int32, device=c1.k.device),
                       positions=c1.position, timestamps=c1.timestamp, counts=c1.count, stats=stats,
                       extra={}, head_lengths=c1.length, original_lengths=orig_new)
    return second.compress(inp2).replace(original_length=orig_new)


def _chunk_fill(rows, n_old, c: int) -> KVCache:
    """``chunk=c`` online: new entries first fill the last stored chunk up to count c, then form chunks of c."""
    from .merging import merge_by_root, rows_to_cache
    B, H, N = rows.pos.shape
    dev = rows.k.device
    j = torch.arange(N, device=dev).expand(B, H, N)
    cnt = rows.cnt
    last = torch.gather(cnt, 2, (n_old - 1).clamp(min=0)[..., None])[..., 0]
    p = torch.where(n_old > 0, (c - last).clamp(min=0).floor().to(torch.int64), torch.zeros_like(n_old))
    p = torch.minimum(p, rows.n - n_old)
    i = j - n_old[..., None]
    chunk_end = n_old[..., None] + p[..., None] + ((i - p[..., None]) // c) * c + c - 1
    root = torch.where(j < n_old[..., None], j,
                       torch.where(i < p[..., None], (n_old - 1)[..., None].expand(B, H, N),
                                   torch.minimum(chunk_end, (rows.n - 1)[..., None])))
    return rows_to_cache(merge_by_root(rows, root, cnt, rep="max"))


def _append_precision(cache, new, policy, spec):
    G = cache.group_size
    if cache.k_axis == "token" or cache.k_format == FLOAT_FORMAT:
        return _append_token_axis(cache, new, G)
    return _append_flush(cache, new, policy, G)


def quantized_entries(c: KVCache, k, v, n, G, k_axis):
    """Quantize ``k``/``v`` ``[B, H, L, D]`` (first ``n [B, H]`` valid) in ``c``'s formats: per-entry codes and
    the scale/zero tensors (per entry, or per key group on the channel axis)."""
    t = {}
    if c.k_format == FLOAT_FORMAT:
        t["k"] = k.to(c.k.dtype)
    else:
        t["k"], t["k_scale"], t["k_zero"] = quantize_tensor(k, n, c.k_format, G, k_axis, name="key")
    if c.v_format == FLOAT_FORMAT:
        t["v"] = v.to(c.v.dtype)
    else:
        t["v"], t["v_scale"], t["v_zero"] = quantize_tensor(v, n, c.v_format, G, "token", name="value")
    return {name: x for name, x in t.items() if x is not None}


def _append_token_axis(cache, new, G):
    B, H = cache.length.shape
    nn = new.n[:, None].expand(B, H).contiguous()
    q = quantized_entries(cache, new.k, new.v, nn, G, "token")
    want_cnt = cache.count is not None or new.cnt is not None
    old = {name: getattr(cache, name) for name in ("k", "v", "k_scale", "k_zero", "v_scale", "v_zero")
           if getattr(cache, name) is not None}
    old_seg = _entry_seg(cache, cache.k, cache.v, None, want_cnt, False)
    old_seg.t.update(old)
    new_seg = _new_seg(new, want_cnt, False, None)
    new_seg.t.update(q)
    u = cat_segs([old_seg, new_seg])
    return _quant_cache(cache, u, u.n).replace(residual=cache.residual)


def _quant_cache(template: KVCache, u: Seg, length, groups: Optional[Dict[str, torch.Tensor]] = None) -> KVCache:
    t = dict(u.t)
    if groups:
        t.update(groups)
    return template.replace(k=t["k"], v=t["v"], length=length.to(torch.int32), position=t["pos"].to(torch.int32),
                            timestamp=t.get("ts"), count=t.get("cnt"), k_scale=t.get("k_scale"),
                            k_zero=t.get("k_zero"), v_scale=t.get("v_scale"), v_zero=t.get("v_zero"), mass=None)


def _append_flush(cache, new, policy, G):
    """Channel-axis key groups: new entries join the residual, whole groups of G are flushed into the main."""
    B, H = cache.length.shape
    dev = cache.device
    L_main = cache.length.to(torch.int64)
    full = (L_main // G) * G
    R = getattr(policy, "residual", 0)
    res = cache.residual
    dtype = res.k.dtype if res is not None else new.k.dtype
    want_cnt = cache.count is not None or new.cnt is not None or (res is not None and res.count is not None)
    if res is not None and not hasattr(policy, "sinks") and bool((full == L_main).all()):
        # fast path (most appends): nothing reaches a whole group beyond the window, so only the residual grows
        ncand = res.length.to(torch.int64) + new.n[:, None]
        if not bool((ncand - R >= G).any()):
            u = cat_segs([_entry_seg(res, res.k, res.v, None, want_cnt, False),
                          _new_seg(new, want_cnt, False, None)])
            rest = _seg_cache(u, cache.original_length)
            return cache.replace(residual=rest.replace(k=rest.k.to(dtype), v=rest.v.to(dtype)))
    # entries of a partial last key group go back to full precision (their dequantized values)
    segs = []
    if bool((full < L_main).any()):
        dk, dv = cache.dequantize(dtype)
        segs.append(_shift_seg(_entry_seg(cache, dk, dv, None, want_cnt, False), full, L_main - full))
    if res is not None:
        segs.append(_entry_seg(res, res.k.to(dtype), res.v.to(dtype), None, want_cnt, False))
    segs.append(_new_seg(new, want_cnt, False, None))
    u = cat_segs(segs)
    inp = seg_input(u, cache.original_length, {})
    rows = canonical_rows(inp)
    N = rows.pos.shape[-1]
    valid = rows.valid()
    forced = torch.zeros(B, H, N, dtype=torch.bool, device=dev)
    j = torch.arange(cache.capacity, device=dev)
    if hasattr(policy, "sinks"):
        # IntactKV: stored pivots (residual entries older than the newest quantized one) and the history's sinks
        okm = j < full[..., None]
        newest_q = torch.where(okm, cache.position.to(torch.int64), torch.full_like(j.expand(B, H, -1), -1)
                               ).max(dim=-1).values if cache.capacity else torch.full((B, H), -1, device=dev)
        forced = valid & (rows.pos.to(torch.int64) < newest_q[..., None])
        # before any group is quantized the sinks are simply the earliest entries; later they are stored pivots
        s_left = (policy.sinks - full).clamp(min=0)
        forced |= valid & (torch.arange(N, device=dev) < s_left[..., None])
    cand = valid & ~forced
    ncand = cand.sum(-1)
    F = torch.div((ncand - R).clamp(min=0), G, rounding_mode="floor") * G
    rank = torch.cumsum(cand.to(torch.int64), -1) - 1
    flush = cand & (rank < F[..., None])
    from .selection import build_cache
    fl = build_cache(rows, select_top(rows, F, tier=flush.to(torch.int64)), F)
    keep_n = rows.n - F
    rest = build_cache(rows, select_top(rows, keep_n, tier=(valid & ~flush).to(torch.int64)), keep_n)
    q = quantized_entries(cache, fl.k, fl.v, F, G, "channel")
    head = Seg({"k": cache.k, "v": cache.v, "pos": cache.position}, full)
    tail = Seg({"k": q["k"], "v": q["v"], "pos": fl.position}, F)
    for name, src_old, src_new in (("ts", cache.timestamp, fl.timestamp), ("cnt", cache.count, fl.count)):
        if src_new is not None:
            head.t[name] = src_old if src_old is not None else torch.ones_like(cache.position, dtype=torch.float32)
            tail.t[name] = src_new
    if "v_scale" in q:
        head.t["v_scale"], tail.t["v_scale"] = cache.v_scale, q["v_scale"]
        if "v_zero" in q:
            head.t["v_zero"], tail.t["v_zero"] = cache.v_zero, q["v_zero"]
    u_main = cat_segs([head, tail])
    groups = cat_segs([Seg({"k_scale": cache.k_scale, "k_zero": cache.k_zero}, full // G),
                       Seg({"k_scale": q["k_scale"], "k_zero": q["k_zero"]}, F // G)])
    main = _quant_cache(cache, u_main, u_main.n, groups.t)
    if bool((rest.length > 0).any()) or isinstance(policy, _residual_policies()):
        rest = rest.replace(original_length=cache.original_length)
        main = main.replace(residual=rest)
    else:
        main = main.replace(residual=None)
    return main


def _residual_policies():
    from .precision import ResidualQuantPolicy
    return ResidualQuantPolicy


def _shift_seg(seg: Seg, start, n) -> Seg:
    """The entries ``start .. start + n`` of each row of ``seg``, moved to the front."""
    B, H = n.shape
    C = next(iter(seg.t.values())).shape[2]
    dev = n.device
    idx = (start[..., None] + torch.arange(C, device=dev)).clamp(max=max(C - 1, 0))
    out = {}
    for name, t in seg.t.items():
        ii = idx.view(B, H, C, *([1] * (t.dim() - 3))).expand(t.shape)
        out[name] = torch.gather(t, 2, ii) if C else t
    return Seg(out, n)
