"""What every compression policy is: a class with a declared MALLOC level, built from a budget, a seed and its
own parameters, turning one normalised ``PolicyInput`` into a ``KVCache`` (ARCHITECTURE.md, "Add a policy").

A policy declares ``level`` (one of ``LEVELS``); the registry refuses a class that does not, the hybrid composer
reads it to check its stages (``"a+b"``: a token stage then a precision stage) and the evaluation harness groups
its method rows by it.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Optional

import torch

from ..cache.types import KVCache

# MALLOC's levels that a ``compress`` method can have ("head" and "sequence" compression are trained model
# variants, not policies; see ``eval/methods.py``).
LEVELS = ("baseline", "precision", "pruning", "merging", "hybrid")

# Keyword arguments of ``compress`` that describe the call's context rather than configure a method: every policy
# receives them in ``PolicyInput.extra`` and those that do not score by attention simply ignore them, so one call
# site (e.g. the evaluation harness) can pass the same context to every method.
CONTEXT_KEYS = ("queries", "kind", "scale", "layer", "num_layers", "pos_bias", "time_bias", "query_positions",
                "query_timestamps")



class Policy(abc.ABC):
    """Base class of every compression policy.

    Subclasses set ``level`` (one of ``LEVELS``) and implement ``compress(inp: PolicyInput) -> KVCache``; their
    constructor takes ``budget``, ``seed`` and the method's keyword parameters and validates them there
    (``ValueError`` naming the parameter), so a bad configuration fails before any data is touched.
    """

    level = ""
    name = "?"
    fixed_bits: Optional[int] = None    # precision methods whose name fixes the bits per stored number ("int4": 4)

    @abc.abstractmethod
    def compress(self, inp: "PolicyInput") -> KVCache:
        """The compressed cache of ``inp`` under this policy's budget and parameters."""


@dataclass
class PolicyInput:
    """Normalised input every policy sees.

    k, v: ``[B, Hkv, N, D]`` floating, padded past ``lengths``; lengths: int32 ``[B]``;
    positions: int32 ``[B, Hkv, N]``; timestamps: optional int64 ``[B, Hkv, N]``;
    counts: optional float32 ``[B, Hkv, N]`` (the input may itself be merged); stats: optional statistics
    (``malloc_kernels.AttentionStats`` of the history's own attention, or whatever the policy documents);
    extra: the call-context keyword arguments of ``compress`` (``CONTEXT_KEYS``: ``queries``, ``kind``, ``layer``,
    ``num_layers``, ...), separated from the method's own parameters.
    """

    k: torch.Tensor
    v: torch.Tensor
    lengths: torch.Tensor
    positions: torch.Tensor
    timestamps: Optional[torch.Tensor]
    counts: Optional[torch.Tensor]
    stats: object
    extra: dict
    # optional (hybrids feed a stage's output cache to the next stage): per-(user, kv head) valid lengths
    # int32 [B, Hkv] (default: ``lengths`` on every head) and the pre-compression lengths int32 [B]
    # (default: ``lengths``), carried into the output cache's ``original_length``
    head_lengths: Optional[torch.Tensor] = None
    original_lengths: Optional[torch.Tensor] = None

    @property
    def shape(self):
        return self.k.shape

    def full_cache(self) -> KVCache:
        """The uncompressed cache holding every valid entry (lengths broadcast over kv heads)."""
        B, H = self.k.shape[:2]
        length = self.lengths.to(torch.int32)[:, None].expand(B, H) if self.head_lengths is None else \
            self.head_lengths.to(torch.int32)
        original = self.lengths if self.original_lengths is None else self.original_lengths
        return KVCache(k=self.k, v=self.v, length=length.contiguous(),
                       position=self.positions, original_length=original.to(torch.int32).contiguous(),
                       head_dim=self.k.shape[-1], timestamp=self.timestamps, count=self.counts)
