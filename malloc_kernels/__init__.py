"""malloc_kernels: fused attention over compressed (quantized, evicted, merged) KV caches for generative recommenders.

Public API (ARCHITECTURE.md, "The path of one call"):
    attention(query, key, value, ..., cache=None, kind="softmax", backend="auto")
    compress(key, value, method, budget=..., ...) -> KVCache
    KVCache, cache_from_bytes(b), available_backends(), available_methods(), reference (module)
"""
from . import reference  # noqa: F401
from .cache import KVCache  # noqa: F401
from .cache.serialize import cache_from_bytes  # noqa: F401
from .ops.attention import attention  # noqa: F401
from .ops.backends import available_backends  # noqa: F401
from .core.types import AttentionResult, AttentionStats  # noqa: F401
from .policies import available_methods, compress  # noqa: F401

__version__ = "0.1.0"
