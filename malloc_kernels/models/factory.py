"""``build_model(cfg)``: the recommender class of a ``ModelConfig`` (HSTU / SASRec: ``SequentialRecommender``;
RWKV: ``RWKVRecommender``), so training, checkpoints and the harness build every architecture one way."""
from __future__ import annotations

from .config import ModelConfig
from .recommender import SequentialRecommender
from .rwkv import RWKVRecommender


def build_model(cfg: ModelConfig) -> SequentialRecommender:
    return RWKVRecommender(cfg) if cfg.arch == "rwkv" else SequentialRecommender(cfg)
