"""The policy registry: method name -> policy class, with the class's declared level.

Register a policy with ``@register_policy("name")`` on a ``Policy`` subclass (``base.py``) whose ``level`` is one
of ``LEVELS``. ``"a+b"`` compositions are not registered: ``compress`` builds them (``hybrid.py``) from two
registered names.
"""
from __future__ import annotations

from typing import Dict, List, Optional

from .base import LEVELS, Policy

_POLICIES: Dict[str, type] = {}


def register_policy(*names: str):
    def deco(cls):
        if not (isinstance(cls, type) and issubclass(cls, Policy)):
            raise TypeError(f"register_policy needs a Policy subclass, got {cls!r}")
        if cls.level not in LEVELS:
            raise ValueError(f"policy class {cls.__name__} must declare level as one of {LEVELS}, got {cls.level!r}")
        for name in names:
            if name in _POLICIES:
                raise RuntimeError(f"policy {name!r} registered twice")
            _POLICIES[name] = cls
        return cls
    return deco


def available_methods() -> List[str]:
    """Names accepted by ``compress(method=...)`` (hybrids ``"a+b"`` compose any two of them)."""
    return sorted(_POLICIES)


def methods_by_level(level: str, bits: Optional[int] = None) -> List[str]:
    """Registered method names whose policy declares ``level``, in registration order (the order of the policy
    modules); ``bits``: only precision methods whose name fixes that bit width (``Policy.fixed_bits``)."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    return [name for name, cls in _POLICIES.items()
            if cls.level == level and (bits is None or cls.fixed_bits == bits)]


def get_policy(method: str) -> type:
    if not isinstance(method, str):
        raise TypeError(f"method must be a string, got {type(method).__name__}")
    if method not in _POLICIES:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(available_methods())} "
                         f"(and 'a+b' compositions)")
    return _POLICIES[method]


def policy_level(cls) -> str:
    """The declared MALLOC level of a policy class."""
    return cls.level
