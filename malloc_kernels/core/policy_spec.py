"""The compression policy a cache was built with, kept on the cache so that ``KVCache.append`` can maintain it.

``PolicySpec`` is a frozen, hashable record (it is a static field of the ``KVCache`` pytree) of everything that
configures a method: its name (``"h2o"``, ``"h2o+kivi4"``, ...), its budget, its keyword parameters and its seed.
It serialises to a small JSON object (the store's envelope carries it next to each layer's cache bytes), so a
cache read back from any store is maintained by the same policy that built it.

Only JSON scalars (int, float, str, bool, None) are method parameters; call-context tensors (``queries``,
``pos_bias``...) describe one compression call, not the policy, and are never part of the spec.
"""
from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass
from typing import Optional, Tuple

_BUDGET_KINDS = ("ratio", "tokens", "bytes")


def _scalar(x, what: str):
    if x is None or isinstance(x, (bool, str)):
        return x
    if isinstance(x, numbers.Integral):
        return int(x)
    if isinstance(x, numbers.Real):
        if not math.isfinite(float(x)):
            raise ValueError(f"{what} must be finite, got {x!r}")
        return float(x)
    raise ValueError(f"{what} must be a JSON scalar (int, float, str, bool or None), got {type(x).__name__}")


@dataclass(frozen=True)
class PolicySpec:
    """method: registered policy name or ``"a+b"``; budget: ``None`` or ``(kind, value)`` with kind in
    ratio/tokens/bytes; params: sorted ``((name, value), ...)`` of scalar method parameters; seed: int."""

    method: str
    budget: Optional[Tuple[str, object]] = None
    params: Tuple[Tuple[str, object], ...] = ()
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.method, str) or not self.method:
            raise ValueError(f"PolicySpec.method must be a non-empty string, got {self.method!r}")
        if self.budget is not None:
            if (not isinstance(self.budget, tuple) or len(self.budget) != 2
                    or self.budget[0] not in _BUDGET_KINDS):
                raise ValueError(f"PolicySpec.budget must be None or (kind, value) with kind in {_BUDGET_KINDS}, "
                                 f"got {self.budget!r}")
            object.__setattr__(self, "budget", (self.budget[0], _scalar(self.budget[1], "budget value")))
        params = tuple(sorted((str(k), _scalar(v, f"parameter {k!r}")) for k, v in dict(self.params).items()))
        object.__setattr__(self, "params", params)
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise ValueError(f"PolicySpec.seed must be an int, got {self.seed!r}")
        object.__setattr__(self, "seed", int(self.seed))

    @classmethod
    def build(cls, method: str, budget=None, seed: int = 0, params: Optional[dict] = None) -> "PolicySpec":
        """From ``compress``'s arguments; ``budget`` is None, a ratio float, a token int or a ``Budget``."""
        b = None
        if budget is not None:
            if isinstance(budget, numbers.Integral) and not isinstance(budget, bool):
                b = ("tokens", int(budget))
            elif isinstance(budget, numbers.Real) and not isinstance(budget, bool):
                b = ("ratio", float(budget))
            else:
                given = [(k, getattr(budget, k, None)) for k in _BUDGET_KINDS]
                given = [(k, v) for k, v in given if v is not None]
                if len(given) != 1:
                    raise ValueError(f"budget {budget!r} cannot be recorded in a PolicySpec")
                b = given[0]
        return cls(method, b, tuple((params or {}).items()), seed)

    def param_dict(self) -> dict:
        return dict(self.params)

    def to_json(self) -> str:
        return json.dumps({"method": self.method, "budget": None if self.budget is None else list(self.budget),
                           "params": dict(self.params), "seed": self.seed}, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "PolicySpec":
        try:
            d = json.loads(text)
        except (ValueError, TypeError) as e:
            raise ValueError(f"policy spec is not valid JSON: {e}") from None
        if not isinstance(d, dict) or set(d) != {"method", "budget", "params", "seed"}:
            raise ValueError(f"policy spec must be an object with method, budget, params, seed; got {d!r}")
        b = d["budget"]
        if b is not None and (not isinstance(b, list) or len(b) != 2):
            raise ValueError(f"policy spec budget must be null or [kind, value], got {b!r}")
        if not isinstance(d["params"], dict):
            raise ValueError(f"policy spec params must be an object, got {d['params']!r}")
        return cls(d["method"], None if b is None else (b[0], b[1]), tuple(d["params"].items()), d["seed"])
