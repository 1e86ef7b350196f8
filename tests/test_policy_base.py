"""The policy base class: every registered policy declares its MALLOC level, and the harness builds its method rows
from the registry (a new policy shows up in the grid by registering with its level)."""
import pytest
import torch

import malloc_kernels as mk
from malloc_kernels.eval import build_grid
from malloc_kernels.policies import LEVELS, Policy, PolicyInput, methods_by_level, registry


def test_every_registered_policy_declares_a_level():
    for name in mk.available_methods():
        cls = registry.get_policy(name)
        assert issubclass(cls, Policy) and cls.level in LEVELS, name


def test_register_refuses_a_class_without_a_level_or_outside_the_base(monkeypatch):
    monkeypatch.setattr(registry, "_POLICIES", dict(registry._POLICIES))
    with pytest.raises(ValueError, match="must declare level"):
        @registry.register_policy("nolevel")
        class NoLevel(Policy):
            pass
    with pytest.raises(TypeError, match="Policy subclass"):
        @registry.register_policy("plain")
        class Plain:
            level = "pruning"


def test_a_new_policy_appears_in_the_harness_grid_and_runs(monkeypatch):
    monkeypatch.setattr(registry, "_POLICIES", dict(registry._POLICIES))

    @registry.register_policy("first_half")
    class FirstHalf(Policy):
        """Keeps the first half of every history (a test policy)."""
        level = "pruning"
        name = "first_half"

        def __init__(self, budget=None, seed=0, **extra):
            pass

        def compress(self, inp: PolicyInput):
            c = inp.full_cache()
            return c.replace(length=(c.length // 2).contiguous())

    assert "first_half" in methods_by_level("pruning")
    rows = [s for s in build_grid(budgets=(0.5,), bits=(), variants=()) if s.method == "first_half"]
    assert len(rows) == 1 and rows[0].level == "pruning"
    cache = mk.compress(torch.randn(1, 1, 6, 4), torch.randn(1, 1, 6, 4), "first_half")
    assert cache.length.tolist() == [[3]]


def test_precision_rows_per_bit_width_come_from_the_declared_bits():
    grid = build_grid(budgets=(), bits=(8, 4, 2), variants=())
    for b in (8, 4, 2):
        names = [s.method for s in grid if s.budget_label == f"{b}-bit"]
        assert names == methods_by_level("precision", bits=b) and names
        assert all(registry.get_policy(n).fixed_bits == b for n in names)
