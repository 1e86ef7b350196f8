"""The baseline "policy": the native cache, every entry kept at the input precision."""
from __future__ import annotations

from ..cache.types import KVCache
from .base import Policy, PolicyInput
from .registry import register_policy


@register_policy("none")
class NoCompression(Policy):
    """The native cache: every entry kept at the input precision (the MALLOC 'native' row)."""

    level = "baseline"
    name = "none"

    def __init__(self, budget=None, seed=0, **params):
        if params:
            raise ValueError(f"method 'none' takes no parameters, got {sorted(params)}")

    def compress(self, inp: PolicyInput) -> KVCache:
        return inp.full_cache()
