"""MSN product-key memory (arXiv 2602.07526; Lample et al. 2019, arXiv 1907.05242): layer, gate, kernels' launchers.

``ProductKeyMemory`` / ``MemoryGate`` / ``MemoryAugmented`` (layer.py); ``pkm_topk`` / ``pkm_gather`` /
``pkm_gather_backward`` / ``pkm_lookup`` (ops.py, backend dispatch + autograd); ``reference`` (the oracle);
``slot_usage`` (collapse diagnostics).
"""
from . import reference  # noqa: F401
from .layer import MemoryAugmented, MemoryGate, ProductKeyMemory  # noqa: F401
from .ops import pkm_gather, pkm_gather_backward, pkm_lookup, pkm_topk  # noqa: F401
from .reference import slot_usage  # noqa: F401

__all__ = ["ProductKeyMemory", "MemoryGate", "MemoryAugmented", "pkm_topk", "pkm_gather", "pkm_gather_backward",
           "pkm_lookup", "slot_usage", "reference"]
