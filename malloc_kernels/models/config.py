"""Model configuration shared by HSTU and SASRec and all their head / sequence-level variants."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Optional

ARCHS = ("hstu", "sasrec")
HEAD_MODES = ("mha", "gqa", "mqa", "mla")
SEQ_COMPRESS = (None, "linformer", "beacon")
SIMILARITIES = ("cosine", "dot")


@dataclass
class ModelConfig:
    """Hyper-parameters of a sequential recommender.

    arch: ``"hstu"`` (pointwise attention, relative position/time bias, SiLU gating; Zhai et al. 2024,
    arXiv 2402.17152) or ``"sasrec"`` (causal softmax transformer; Kang & McAuley 2018, arXiv 1808.09781).
    n_items: number of items (ids ``1..n_items``, 0 = padding). d_model: embedding width. n_heads: query heads of
    width head_dim (default ``d_model // n_heads``). heads: ``"mha"`` (n_kv_heads = n_heads), ``"gqa"``
    (n_kv_heads given, divides n_heads), ``"mqa"`` (one kv head) or ``"mla"`` (a shared latent of width
    latent_dim, DeepSeek-V2 style). seq_compress: None, ``"linformer"`` (history -> ``slots`` learned mixtures)
    or ``"beacon"`` (one learned beacon token per ``beacon_chunk`` history tokens). max_len: longest sequence the
    model is trained on (positional tables have this many rows; longer positions are clamped to the last row).
    num_time_buckets: HSTU's time-bias table size (used only when timestamps are given). similarity/temperature:
    item scores are ``<h, e_item> / temperature`` of L2-normalised vectors (``"cosine"``) or raw dot products.
    train_request_len: for seq_compress models, the longest request (suffix) trained against a compressed history.
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
        if self.num_time_buckets < 1:
            raise ValueError(f"num_time_buckets must be >= 1, got {self.num_time_buckets}")

    @property
    def cache_heads(self) -> int:
        """kv heads stored in the cache (1 for MQA and MLA)."""
        return 1 if self.heads == "mla" else self.n_kv_heads

    @property
    def cache_dim(self) -> int:
        """Width of each stored key/value row (latent_dim for MLA, head_dim otherwise)."""
        return self.latent_dim if self.heads == "mla" else self.head_dim

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)
