"""The contract layer: what an attention call and a cache ARE, shared by the reference, every backend, the
dispatcher, the cache package and the policies. It imports nothing else of ``malloc_kernels`` (ARCHITECTURE.md,
"Layers"; enforced by import-linter in ``.ci/run``).

- ``validate.py``: ``validate_call`` -> ``AttentionCall``, the checked, normalised arguments of one attention call;
- ``types.py``: ``AttentionResult``, ``AttentionStats``;
- ``layout.py``: padded <-> jagged conversion and offsets checks;
- ``masks.py``: the visibility rules (causal, targets, padding, stats windows) in padded dense form;
- ``time_buckets.py``: HSTU's exact integer time-bucket thresholds;
- ``formats.py``: the cache-format table (name, code, bits, grouping, zero point, scale dtype) and the C++ header
  generated from it;
- ``kvcache.py``: ``KVCacheBase``, the cache's stored tensors, their invariants and ``check_contents``;
- ``gpu_policy.py``: which GPU kernel (Triton or CUDA C++) ``auto`` runs for a cache decode.
"""
from .kvcache import KVCacheBase  # noqa: F401
from .types import AttentionResult, AttentionStats  # noqa: F401
from .validate import AttentionCall, validate_call  # noqa: F401
