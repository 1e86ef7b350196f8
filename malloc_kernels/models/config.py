"""Model configuration shared by HSTU and SASRec and all their head / sequence-level variants."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Optional, Tuple

ARCHS = ("hstu", "sasrec", "rwkv")
HEAD_MODES = ("mha", "gqa", "mqa", "mla")
SEQ_COMPRESS = (None, "linformer", "beacon", "reformer")
SIMILARITIES = ("cosine", "dot")


@dataclass
class ModelConfig:
    """Hyper-parameters of a sequential recommender.

    arch: ``"hstu"`` (pointwise attention, relative position/time bias, SiLU gating; Zhai et al. 2024,
    arXiv 2402.17152), ``"sasrec"`` (causal softmax transformer; Kang & McAuley 2018, arXiv 1808.09781) or
    ``"rwkv"`` (RWKV-4 recurrent blocks, MALLOC's architecture level: ``models/rwkv.py``; uses d_model, n_layers,
    ffn_mult, dropout, and no heads / sequence compression / memory).
    n_items: number of items (ids ``1..n_items``, 0 = padding). d_model: embedding width. n_heads: query heads of
    width head_dim (default ``d_model // n_heads``). heads: ``"mha"`` (n_kv_heads = n_heads), ``"gqa"``
    (n_kv_heads given, divides n_heads), ``"mqa"`` (one kv head) or ``"mla"`` (a shared latent of width
    latent_dim, DeepSeek-V2 style). seq_compress: None, ``"linformer"`` (history -> ``slots`` learned mixtures)
    or ``"beacon"`` (one learned beacon token per ``beacon_chunk`` history tokens) or ``"reformer"`` (shared-QK LSH
    attention, ``models/reformer.py``: ``lsh_buckets`` angular-LSH buckets (even, <= 256), ``lsh_hashes`` rounds,
    rotations drawn from ``lsh_seed``; needs ``heads="mha"``; ``to_dict`` omits the ``lsh_*`` fields otherwise).
    max_len: longest sequence the model is trained on (positional tables have this many rows; longer positions are
    clamped to the last row).
    num_time_buckets: HSTU's time-bias table size (used only when timestamps are given). similarity/temperature:
    item scores are ``<h, e_item> / temperature`` of L2-normalised vectors (``"cosine"``) or raw dot products.
    train_request_len: for seq_compress models, the longest request (suffix) trained against a compressed history.
    position_embedding: add a learned absolute position embedding to the input (None = the architecture's default:
    SASRec yes, HSTU no; HSTU with it is the generative-recommenders reference setup, which adds one to the item
    embedding besides the relative bias). Omitted from ``to_dict`` when None, so existing configs keep their keys.

    MSN product-key memory (``malloc_kernels.memory``; MSN, arXiv 2602.07526, over Lample et al. 2019):
    msn: add a gated memory read to the layers in ``msn_layers`` (None = the last layer; negative indices count from
    the end). msn_slots: memory rows M, a perfect square (M = S^2, S sub-keys per half). msn_heads / msn_key_dim /
    msn_topk: memory heads, query width per head (even) and slots read per head (``msn_topk <= sqrt(M)``).
    msn_sparse_grad: sparse COO gradient of the value table (trained with SparseAdam, ``train.py``). Where the
    read enters each layer: ``layers.py`` (SASRec: gated around the FFN; HSTU: gated into the output update).
    ``to_dict`` omits the ``msn_*`` fields when ``msn`` is off, so configs (and checkpoint keys) of models
    without memory are unchanged by this option.
    """

    arch: str = "hstu"
    n_items: int = 0
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    head_dim: Optional[int] = None
    heads: str = "mha"
    n_kv_heads: Optional[int] = None
    latent_dim: int = 16
    seq_compress: Optional[str] = None
    slots: int = 32
    beacon_chunk: int = 8
    max_len: int = 200
    num_time_buckets: int = 64
    dropout: float = 0.2
    ffn_mult: int = 4
    similarity: str = "cosine"
    temperature: float = 0.05
    train_request_len: int = 16
    position_embedding: Optional[bool] = None
    lsh_buckets: int = 4
    lsh_hashes: int = 1
    lsh_seed: int = 0
    msn: bool = False
    msn_slots: int = 128 * 128
    msn_heads: int = 4
    msn_key_dim: int = 32
    msn_topk: int = 32
    msn_layers: Optional[Tuple[int, ...]] = None
    msn_sparse_grad: bool = True

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.heads not in HEAD_MODES:
            raise ValueError(f"heads must be one of {HEAD_MODES}, got {self.heads!r}")
        if self.seq_compress not in SEQ_COMPRESS:
            raise ValueError(f"seq_compress must be one of {SEQ_COMPRESS}, got {self.seq_compress!r}")
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {self.similarity!r}")
        if not isinstance(self.n_items, int) or self.n_items < 0:
            raise ValueError(f"n_items must be a non-negative int (0 = set from the dataset), got {self.n_items!r}")
        for name in ("d_model", "n_layers", "n_heads", "max_len", "latent_dim", "slots", "beacon_chunk",
                     "ffn_mult", "train_request_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(f"d_model {self.d_model} must be divisible by n_heads {self.n_heads} "
                                 f"(or give head_dim)")
            self.head_dim = self.d_model // self.n_heads
        if self.heads == "mha":
            if self.n_kv_heads not in (None, self.n_heads):
                raise ValueError(f"n_kv_heads must equal n_heads for heads='mha', got {self.n_kv_heads}")
            self.n_kv_heads = self.n_heads
        elif self.heads == "mqa":
            if self.n_kv_heads not in (None, 1):
                raise ValueError(f"n_kv_heads must be 1 for heads='mqa', got {self.n_kv_heads}")
            self.n_kv_heads = 1
        elif self.heads == "gqa":
            if self.n_kv_heads is None or self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
                raise ValueError(f"heads='gqa' needs n_kv_heads dividing n_heads={self.n_heads}, "
                                 f"got {self.n_kv_heads}")
        else:  # mla: attention runs per query head during training; the cache holds one latent "head"
            self.n_kv_heads = self.n_heads
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.position_embedding is not None and not isinstance(self.position_embedding, bool):
            raise ValueError(f"position_embedding must be None or a bool, got {self.position_embedding!r}")
        if self.num_time_buckets < 1:
            raise ValueError(f"num_time_buckets must be >= 1, got {self.num_time_buckets}")
        self._validate_msn()
        self._validate_lsh()
        if self.arch == "rwkv" and (self.heads != "mha" or self.seq_compress is not None or self.msn):
            raise ValueError("arch='rwkv' has no attention heads, sequence compression or memory: heads must be "
                             "'mha', seq_compress None and msn False")

    def _validate_lsh(self):
        for name in ("lsh_buckets", "lsh_hashes", "lsh_seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "lsh_seed" else 1):
                raise ValueError(f"{name} must be a {'non-negative' if name == 'lsh_seed' else 'positive'} int, "
                                 f"got {v!r}")
        if self.lsh_buckets % 2 or not 2 <= self.lsh_buckets <= 256:
            raise ValueError(f"lsh_buckets must be even and in [2, 256], got {self.lsh_buckets}")
        if self.lsh_hashes > 255:
            raise ValueError(f"lsh_hashes must be <= 255, got {self.lsh_hashes}")
        if self.seq_compress == "reformer" and self.heads != "mha":
            raise ValueError(f"heads must be 'mha' for seq_compress='reformer' (shared-QK ties each key head to "
                             f"its query head), got {self.heads!r}")

    def _validate_msn(self):
        if not isinstance(self.msn, bool):
            raise ValueError(f"msn must be a bool, got {self.msn!r}")
        if not isinstance(self.msn_sparse_grad, bool):
            raise ValueError(f"msn_sparse_grad must be a bool, got {self.msn_sparse_grad!r}")
        for name in ("msn_slots", "msn_heads", "msn_key_dim", "msn_topk"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        s = math.isqrt(self.msn_slots)
        if s * s != self.msn_slots:
            raise ValueError(f"msn_slots must be a perfect square (M = S^2 product keys), got {self.msn_slots}")
        if self.msn_key_dim % 2:
            raise ValueError(f"msn_key_dim must be even (two half-queries), got {self.msn_key_dim}")
        if self.msn_topk > s:
            raise ValueError(f"msn_topk must be <= sqrt(msn_slots) = {s}, got {self.msn_topk}")
        if self.msn_layers is not None:
            if isinstance(self.msn_layers, int) and not isinstance(self.msn_layers, bool):
                self.msn_layers = (self.msn_layers,)
            try:
                layers = tuple(self.msn_layers)
            except TypeError:
                raise ValueError(f"msn_layers must be None or a sequence of layer indices, got {self.msn_layers!r}")
            if not layers or any(isinstance(i, bool) or not isinstance(i, int) for i in layers):
                raise ValueError(f"msn_layers must be a non-empty sequence of ints, got {self.msn_layers!r}")
            norm = sorted({i % self.n_layers for i in layers if -self.n_layers <= i < self.n_layers})
            if len(norm) != len(set(layers)) or any(not -self.n_layers <= i < self.n_layers for i in layers):
                raise ValueError(f"msn_layers must be distinct indices in [-{self.n_layers}, {self.n_layers}), "
                                 f"got {self.msn_layers!r}")
            self.msn_layers = tuple(norm)

    @property
    def memory_layers(self) -> Tuple[int, ...]:
        """0-based indices of the layers with an MSN memory (empty when ``msn`` is off)."""
        if not self.msn:
            return ()
        return self.msn_layers if self.msn_layers is not None else (self.n_layers - 1,)

    @property
    def uses_position_embedding(self) -> bool:
        """Whether the input adds a learned absolute position embedding (``position_embedding`` or the default)."""
        if self.position_embedding is None:
            return self.arch == "sasrec"
        return self.position_embedding

    @property
    def cache_heads(self) -> int:
        """kv heads stored in the cache (1 for MQA and MLA)."""
        return 1 if self.heads == "mla" else self.n_kv_heads

    @property
    def cache_dim(self) -> int:
        """Width of each stored key/value row (latent_dim for MLA, head_dim otherwise)."""
        return self.latent_dim if self.heads == "mla" else self.head_dim

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["position_embedding"] is None:  # the architecture default: keep older configs' keys unchanged
            d.pop("position_embedding")
        if not self.msn:  # keep configs (and checkpoint keys) of memory-free models as they were
            for f in [f for f in d if f.startswith("msn")]:
                d.pop(f)
        elif d["msn_layers"] is not None:
            d["msn_layers"] = list(d["msn_layers"])
        if self.seq_compress != "reformer":  # likewise for the LSH fields
            for f in [f for f in d if f.startswith("lsh_")]:
                d.pop(f)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)
