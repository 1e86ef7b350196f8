"""RWKV-4 sequential recommender: MALLOC's architecture level (a recurrent per-user state instead of a KV cache).

Peng et al. 2023, "RWKV: Reinventing RNNs for the Transformer Era" (arXiv 2305.13048), version 4 (RWKV-4: the WKV
recurrence with a per-channel decay ``w = -exp(decay)`` and a bonus ``u`` for the current token, in the numerically
stable running-maximum form; ``malloc_kernels.ops.wkv``). Items in, hidden states out, scored and trained exactly as
HSTU / SASRec (``SequentialRecommender``'s item embedding, cosine/dot scoring, sampled or full softmax; the same
``models.train`` loop, windows and time budgets: ``ModelConfig(arch="rwkv")``).

Block ``l`` over a user's tokens ``x_t`` (``d_model`` channels; ``xx_t`` is the previous token's normalised input,
the "token shift", zero before a user's first token)::

    time mixing     z = LN1(x);  k = W_k mix(z, xx, mu_k);  v = W_v mix(z, xx, mu_v);  r = sigmoid(W_r mix(z, xx, mu_r))
                    x = x + W_o (r * wkv(w, u, k, v))                           mix(z, xx, mu) = mu z + (1 - mu) xx
    channel mixing  z = LN2(x);  x = x + sigmoid(W_r' mix(z, xx', mu_r')) * W_v' relu(W_k' mix(z, xx', mu_k'))^2

with ``LN0`` on the input embeddings and a final LayerNorm (RWKV-4's ``ln0`` / ``ln_out``), the RWKV-4
initialisation (layer-dependent decay speeds and mixing ratios, zero output projections). No position embedding:
order enters through the decay and the token shift (``ModelConfig.position_embedding=True`` adds one anyway).
Timestamps are accepted and ignored.

Serving: per layer the state is ``RWKVLayerState``: the WKV state ``(a, b, p)`` ``[B, 3, d]`` (numerator,
denominator, running maximum) and the two token-shift inputs ``[B, d]``, plus the history length. Its bytes per
user are constant in the history's length (``nbytes_per_user``); ``encode_history`` -> ``serve`` / ``serve_step``
reproduce the full recompute (exact in float64: the same kernel runs the same per-token arithmetic).
``states_to_bytes`` / ``states_from_bytes`` serialise one user's states (``models/rwkv_state.py``).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
import torch.nn as nn

from ..ops.wkv import wkv
from .config import ModelConfig
from .recommender import SequentialRecommender, _as_jagged, _user_index
from .rwkv_state import RWKVLayerState, empty_states


def _shift(z: torch.Tensor, offsets: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """``xx_t = z_{t-1}`` within each user; a user's first token gets ``last[b]`` (the carried shift input)."""
    if not z.shape[0]:
        return z
    prev = torch.cat([z.new_zeros(1, z.shape[1]), z[:-1]])
    # per token, not per user: no boolean indexing (its size is data, a host read in a serving step)
    uid, local = _user_index(offsets, z.shape[0])
    return torch.where((local == 0)[:, None], last.to(z.dtype)[uid], prev)


def _last_rows(z: torch.Tensor, offsets: torch.Tensor, carried: torch.Tensor) -> torch.Tensor:
    """Each user's last row of ``z`` (its new shift input); users without tokens keep ``carried``."""
    lens = offsets[1:] - offsets[:-1]
    nonempty = lens > 0
    idx = (offsets[1:] - 1).clamp(min=0)
    picked = z[idx] if z.shape[0] else carried
    return torch.where(nonempty[:, None], picked, carried.to(z.dtype))


class RWKVBlock(nn.Module):
    """One RWKV-4 block: time mixing (token shift, R/K/V, WKV, output) then channel mixing (module docstring)."""

    kind = "rwkv"

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        d = cfg.d_model
        hidden = cfg.ffn_mult * d
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        # RWKV-4 initialisation: deeper layers decay slower and mix more of the current token
        r01 = layer_id / max(cfg.n_layers - 1, 1)
        r10 = 1.0 - layer_id / cfg.n_layers
        ch = torch.arange(d, dtype=torch.float32)
        x = ch / d
        self.time_decay = nn.Parameter(-5 + 8 * (ch / max(d - 1, 1)) ** (0.7 + 1.3 * r01))
        zigzag = ((torch.arange(d) + 1) % 3 - 1).to(torch.float32) * 0.5
        self.time_first = nn.Parameter(torch.full((d,), math.log(0.3)) + zigzag)
        self.mix_k = nn.Parameter(x ** r10)
        self.mix_v = nn.Parameter(x ** r10 + 0.3 * r01)
        self.mix_r = nn.Parameter(x ** (0.5 * r10))
        self.key, self.value = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.receptance, self.output = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.ffn_mix_k = nn.Parameter(x ** r10)
        self.ffn_mix_r = nn.Parameter(x ** r10)
        self.ffn_key = nn.Linear(d, hidden, bias=False)
        self.ffn_value = nn.Linear(hidden, d, bias=False)
        self.ffn_receptance = nn.Linear(d, d, bias=False)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.ffn_value.weight)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, offsets: torch.Tensor, state: RWKVLayerState, backend: str = "auto"):
        """``(x_out [T, d], new state)`` for jagged ``x [T, d]`` continuing each user's ``state``."""
        # mix(z, xx, mu) = xx + mu (z - xx): one shared difference and one fused multiply-add per mix, so a small
        # serving request runs fewer ops (per-op overhead, not FLOPs, sets its latency)
        z = self.ln1(x)
        zz = _shift(z, offsets, state.shift_att)
        dz = z - zz
        k = self.key(torch.addcmul(zz, dz, self.mix_k))
        v = self.value(torch.addcmul(zz, dz, self.mix_v))
        r = torch.sigmoid(self.receptance(torch.addcmul(zz, dz, self.mix_r)))
        w = -torch.exp(self.time_decay.to(x.dtype))
        y, wkv_state = wkv(w, self.time_first.to(x.dtype), k, v, offsets, state.wkv.to(x.dtype), backend=backend)
        x = x + self.drop(self.output(r * y))
        z2 = self.ln2(x)
        zz2 = _shift(z2, offsets, state.shift_ffn)
        dz2 = z2 - zz2
        kk = torch.relu(self.ffn_key(torch.addcmul(zz2, dz2, self.ffn_mix_k))).square()
        rr = torch.sigmoid(self.ffn_receptance(torch.addcmul(zz2, dz2, self.ffn_mix_r)))
        x = x + self.drop(rr * self.ffn_value(kk))
        new = RWKVLayerState(wkv=wkv_state.detach(), shift_att=_last_rows(z, offsets, state.shift_att).detach(),
                             shift_ffn=_last_rows(z2, offsets, state.shift_ffn).detach(),
                             original_length=state.original_length + (offsets[1:] - offsets[:-1]).to(torch.int32))
        return x, new


class RWKVRecommender(SequentialRecommender):
    """RWKV-4 over item ids (``ModelConfig(arch="rwkv")``); the public API of ``SequentialRecommender`` with
    per-layer ``RWKVLayerState`` where the attention models have ``KVCache`` (module docstring)."""

    def __init__(self, cfg: ModelConfig):
        nn.Module.__init__(self)
        if cfg.arch != "rwkv":
            raise ValueError(f"RWKVRecommender needs ModelConfig(arch='rwkv'), got arch={cfg.arch!r}")
        self._init_inputs(cfg)
        d = cfg.d_model
        self.ln0 = nn.LayerNorm(d)
        self.layers = nn.ModuleList(RWKVBlock(cfg, li) for li in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(d)
        self.drop = nn.Dropout(cfg.dropout)
        # ``malloc_kernels.ops.wkv`` backend ("auto": the C++ kernel on CPU; "reference" pins the float64 loop)
        self.backend = "auto"

    # ---- the recurrent pass ---------------------------------------------------------------------------------------
    def _check_states(self, states, B: int, what: str = "caches"):
        if len(states) != self.cfg.n_layers:
            raise ValueError(f"{what} must hold one RWKVLayerState per layer ({self.cfg.n_layers}), "
                             f"got {len(states)}")
        for s in states:
            if not isinstance(s, RWKVLayerState):
                raise TypeError(f"{what} must be RWKVLayerState objects, got {type(s).__name__}")
            if s.batch_size != B:
                raise ValueError(f"{what} hold {s.batch_size} users but the request has {B}")
            if s.channels != self.cfg.d_model:
                raise ValueError(f"{what} have {s.channels} channels, the model {self.cfg.d_model}")

    def _run(self, items, positions, offsets, states: Optional[Sequence[RWKVLayerState]]):
        if states is None:
            states = empty_states(self.cfg.n_layers, offsets.numel() - 1, self.cfg.d_model, dtype=self.dtype,
                                  device=items.device)
        x = self.ln0(self.embed(items, positions))
        new = []
        for layer, st in zip(self.layers, states):
            x, ns = layer(x, offsets, st, backend=self.backend)
            new.append(ns)
        return self.final_norm(x), new

    # ---- public API (SequentialRecommender's) -------------------------------------------------------------------
    def forward(self, items, timestamps=None, lengths=None, *, request_len: Optional[int] = None) -> torch.Tensor:
        """Training forward: hidden states of every token, jagged ``[T, d]`` (``request_len`` does not apply: the
        recurrent state is exact, so training and serving compute the same thing)."""
        items, _, offsets = _as_jagged(items, timestamps, lengths)
        _, local = _user_index(offsets, items.numel())
        h, _ = self._run(items, local, offsets, None)
        return h

    def last_hidden(self, items, timestamps=None, lengths=None) -> torch.Tensor:
        """Full recompute: hidden state of each user's last token, ``[B, d]`` (every user needs >= 1 token)."""
        items, _, offsets = _as_jagged(items, timestamps, lengths)
        SequentialRecommender._check_nonempty(offsets, "items: every user needs at least one token")
        _, local = _user_index(offsets, items.numel())
        h, _ = self._run(items, local, offsets, None)
        return h[offsets[1:] - 1]

    def encode_history(self, items, timestamps=None, lengths=None, *, method: str = "none", budget=None,
                       seed: int = 0, return_stats: bool = False, stats_window: Optional[int] = None,
                       **params):
        """Run each user's history once: one ``RWKVLayerState`` per layer (empty histories give the empty state).
        ``method`` must be ``"none"`` (a recurrent state is not a KV cache: the compression methods do not
        apply); ``return_stats`` returns ``(states, None)`` (no attention statistics exist)."""
        if method != "none" or params:
            raise ValueError(f"method: an RWKV state cannot be compressed by {method!r} (only 'none')")
        states = self.history_states(items, timestamps, lengths)
        return (states, None) if return_stats else states

    def history_states(self, items, timestamps=None, lengths=None) -> List[RWKVLayerState]:
        items, _, offsets = _as_jagged(items, timestamps, lengths, what="history items")
        _, local = _user_index(offsets, items.numel())
        _, states = self._run(items, local, offsets, None)
        return states

    def compress_caches(self, caches, method: str, *, budget=None, stats=None, seed: int = 0, **params):
        if method != "none" or params:
            raise ValueError(f"method: an RWKV state cannot be compressed by {method!r} (only 'none')")
        return list(caches)

    def _request(self, request_items, request_timestamps, caches, lengths):
        items, _, offsets = _as_jagged(request_items, request_timestamps, lengths, what="request items")
        self._check_states(caches, offsets.numel() - 1)
        SequentialRecommender._check_nonempty(offsets)    # a device assert: no host read in the serving step
        uid, local = _user_index(offsets, items.numel())
        positions = caches[0].original_length.to(torch.int64)[uid] + local
        return self._run(items, positions, offsets, caches), offsets

    def serve(self, request_items, request_timestamps=None, caches: Sequence[RWKVLayerState] = (), lengths=None, *,
              return_all: bool = False) -> torch.Tensor:
        """Run the request tokens from each user's per-layer states; returns each user's last hidden state
        ``[B, d]`` (``return_all``: every request token's, jagged ``[T, d]``)."""
        (h, _), offsets = self._request(request_items, request_timestamps, caches, lengths)
        return h if return_all else h[offsets[1:] - 1]

    def serve_step(self, request_items, request_timestamps=None, caches: Sequence[RWKVLayerState] = (),
                   lengths=None):
        """One online request: ``(hidden [B, d], states)`` with the request's tokens folded into every layer's
        state (still constant in size)."""
        (h, states), offsets = self._request(request_items, request_timestamps, caches, lengths)
        return h[offsets[1:] - 1], states

    def request_macs(self, entries_per_layer: float, request_size: float) -> float:
        """Analytic MACs of one request from the state: the dense projections per token, WKV's ~4 exp-weighted
        multiply-adds per channel and token, and scoring every item (the state has no entries to attend)."""
        cfg = self.cfg
        dense = sum(p.numel() for p in self.layers.parameters() if p.dim() == 2)  # each weight once per token
        return (dense * request_size + cfg.n_layers * request_size * 4 * cfg.d_model
                + cfg.d_model * cfg.n_items)
