"""Sequential recommenders on ``malloc_kernels.attention``: HSTU (pointwise attention + relative bias) and SASRec
(softmax), with GQA/MQA/MLA head variants, Linformer/beacon sequence compression, cached serving
(``encode_history`` -> per-layer ``KVCache`` -> ``serve`` -> ``score_all_items``), CPU training and full-ranking
evaluation (``malloc_kernels.models.train``)."""
from .config import ModelConfig  # noqa: F401
from .metrics import evaluate, rank_metrics  # noqa: F401
from .recommender import HSTU, SASRec, SequentialRecommender  # noqa: F401
from .factory import build_model  # noqa: F401
from .rwkv import RWKVRecommender  # noqa: F401
from .rwkv_state import RWKVLayerState, states_from_bytes, states_to_bytes  # noqa: F401
