"""Compression policies by MALLOC level: precision, pruning, merging, hybrid (ARCHITECTURE.md, "Add a policy").

Importing the package registers every policy module; ``compress`` (``api.py``) is the entry point.
"""
# Each module registers its policies; this order is the order of the harness' rows within a level.
from . import baseline, quantize, pruning, merging, precision  # noqa: F401
from .api import compress  # noqa: F401
from . import online, online_inplace  # noqa: F401,E402  (register KVCache.append's implementations)
from .base import LEVELS, Policy, PolicyInput  # noqa: F401
from .budget import Budget  # noqa: F401
from .registry import available_methods, get_policy, methods_by_level, policy_level, register_policy  # noqa: F401
