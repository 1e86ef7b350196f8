"""Compression policies by MALLOC level: precision, pruning, merging, hybrid (DESIGN.md section 1)."""
from .registry import PolicyInput, available_methods, compress, get_policy, register_policy  # noqa: F401
