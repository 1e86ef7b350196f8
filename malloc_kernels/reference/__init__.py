"""The PyTorch reference: the attention contract (ARCHITECTURE.md, "Attention semantics") in plain PyTorch, any dtype
including float64. The oracle, and the ``reference`` backend of the attention family.

``attention(...)`` implements the full contract (see ``attention.py``); ``relative_bias`` builds HSTU's relative
bias from the exact time buckets of ``core/time_buckets.py`` (``bias.py``); ``supports(call)`` / ``run(call)``
execute a validated ``AttentionCall`` (the dispatcher's launcher protocol).
"""
from ..core.masks import request_visibility  # noqa: F401
from .attention import (attention, attention_padded, compute_dtype, query_precisions, run, supports,  # noqa: F401
                        supports_autograd)
from .bias import relative_bias, time_bucket, time_bucket_thresholds  # noqa: F401
