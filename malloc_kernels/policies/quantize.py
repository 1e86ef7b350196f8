"""Precision level, plain quantizers: ``"int8"``, ``"fp8"``, ``"int4"``, ``"int2"`` (MALLOC arXiv 2601.20234, sec.
precision-level compression).

Every entry is kept (the token budget is ``None`` or ``1.0``); only the number of bits per stored number changes.
The storage rule (fp16 scale/zero rounded outward, round-half-even codes) is ``core/kvcache.py``'s; the work is
``ops.quantize.quantize_cache`` (the packer the registry picks: C++ on CPU tensors, bit-exact with the reference).

* ``int8`` / ``fp8`` (e4m3fn): per-token by default -- keys and values both grouped over channels with
  ``group_size = head_dim`` (one scale per entry; LLM.int8-style / FP8 KV caches of vLLM/TensorRT-LLM).
* ``int4`` / ``int2``: KIVI's layout by default (Liu et al. 2024, arXiv 2402.02750): keys per-channel over groups
  of ``group_size`` consecutive entries (``k_axis="channel"``), values per-token over groups of ``group_size``
  channels. The default ``group_size`` is 32, clipped to the largest divisor of ``head_dim`` that is <= 32
  because value groups must tile the head dim (one ``group_size`` serves both, as in the cache contract).
  KIVI's full-precision recent window is the ``"kivi"`` method of ``precision.py``, built on the same quantizer.

Parameters: ``group_size`` (int; on the token axis it must divide ``head_dim``) and ``k_axis``
(``"token"`` or ``"channel"``).
"""
from __future__ import annotations

from ..cache.quant import fp8_available
from ..core.formats import FP8_FORMAT, K_AXES, format_bits
from ..ops.quantize import quantize_cache
from .base import Policy, PolicyInput
from .registry import register_policy


def _largest_divisor_at_most(n: int, cap: int) -> int:
    for g in range(min(n, cap), 0, -1):
        if n % g == 0:
            return g
    return 1


def check_full_budget(budget, method: str):
    """Precision-level methods keep every token: ``budget`` must be None or 1.0 (ValueError otherwise)."""
    if budget is None:
        return
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or float(budget) != 1.0:
        raise ValueError(f"budget must be None or 1.0 for method {method!r} (a precision-level method keeps every "
                         f"token); compose with a pruning method, e.g. 'h2o+{method}', to drop tokens; got {budget!r}")


class _PlainQuantizer(Policy):
    """Shared constructor/validation of the plain quantizers; subclasses set the format and default layout."""

    level = "precision"

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        cls.fixed_bits = format_bits(cls.FORMAT)

    FORMAT = ""
    DEFAULT_K_AXIS = "token"
    DEFAULT_GROUP = None            # None: group_size = head_dim (per-token); int: KIVI-style cap

    def __init__(self, budget=None, seed=0, group_size=None, k_axis=None, **params):
        if params:
            raise ValueError(f"method {self.FORMAT!r} got unknown parameters {sorted(params)}; "
                             f"it takes group_size and k_axis")
        check_full_budget(budget, self.FORMAT)
        if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)):
            raise TypeError(f"group_size must be a positive int or None, got {group_size!r}")
        if group_size is not None and group_size <= 0:
            raise ValueError(f"group_size must be positive, got {group_size}")
        if k_axis is not None and k_axis not in K_AXES:
            raise ValueError(f"k_axis must be one of {K_AXES}, got {k_axis!r}")
        if self.FORMAT == FP8_FORMAT and not fp8_available():
            raise ValueError("method 'fp8' needs torch.float8_e4m3fn, which this torch build lacks")
        self.group_size = group_size
        self.k_axis = self.DEFAULT_K_AXIS if k_axis is None else k_axis
        self.extra = {}

    def resolve_group_size(self, head_dim: int) -> int:
        """The group size used for a head dim: the explicit one, else the method's default."""
        if self.group_size is not None:
            if head_dim % self.group_size:
                raise ValueError(f"group_size={self.group_size} must divide head_dim {head_dim} (value groups "
                                 f"tile the channels)")
            return self.group_size
        if self.DEFAULT_GROUP is None:
            return head_dim
        return _largest_divisor_at_most(head_dim, self.DEFAULT_GROUP)

    def compress(self, inp: PolicyInput):
        cache = inp.full_cache()
        G = self.resolve_group_size(cache.head_dim)
        return quantize_cache(cache, self.FORMAT, self.FORMAT, G, self.k_axis)


@register_policy("int8")
class Int8Quantizer(_PlainQuantizer):
    """INT8 asymmetric, per-token (group_size = head_dim) unless ``group_size``/``k_axis`` say otherwise."""

    FORMAT = "int8"


@register_policy("fp8")
class Fp8Quantizer(_PlainQuantizer):
    """FP8 e4m3fn with an fp16 absmax scale per token (group_size = head_dim) unless told otherwise."""

    FORMAT = "fp8"


@register_policy("int4")
class Int4Quantizer(_PlainQuantizer):
    """4-bit asymmetric in KIVI's layout (keys per-channel, values per-token), group_size 32 by default."""

    FORMAT = "int4"
    DEFAULT_K_AXIS = "channel"
    DEFAULT_GROUP = 32


@register_policy("int2")
class Int2Quantizer(_PlainQuantizer):
    """2-bit asymmetric in KIVI's layout (keys per-channel, values per-token), group_size 32 by default."""

    FORMAT = "int2"
    DEFAULT_K_AXIS = "channel"
    DEFAULT_GROUP = 32
