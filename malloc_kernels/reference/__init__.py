"""The PyTorch reference: DESIGN.md section 2 semantics in plain PyTorch, any dtype including float64. The oracle.

``attention(...)`` implements the full contract (see ``attention.py``); ``time_bucket_thresholds``, ``time_bucket``
and ``relative_bias`` define HSTU's relative bias exactly (``bias.py``); ``run(call)`` executes a validated
``AttentionCall`` (the dispatcher's entry point).
"""
from .attention import attention, attention_padded, compute_dtype, run  # noqa: F401
from .bias import relative_bias, time_bucket, time_bucket_thresholds  # noqa: F401
from ..core.masks import request_visibility  # noqa: F401
