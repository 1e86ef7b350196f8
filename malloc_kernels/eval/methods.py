"""The method x budget grid the harness evaluates (MALLOC's levels, ARCHITECTURE.md, "Compression policies").

A ``MethodSpec`` is one row of the tables: a compression applied to every layer's cache of a trained model
(``method``/``budget``/``params`` go to ``malloc_kernels.compress``), or a trained head/sequence-level model
variant served over its own native cache (``variant``: overrides of the model config).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from ..policies import available_methods, methods_by_level

# The method rows come from the policy registry when the grid is built: every registered pruning / merging
# method, and per bit width every precision method whose name fixes it (a new policy shows up here by registering
# with its level). Compositions are not registered: these are the hybrids we report.
HYBRIDS = ("h2o+kivi4", "snapkv+kivi2", "tome+int8")
BITS = (8, 4, 2)
# trained head/sequence-level variants: label -> (level, model-config overrides)
VARIANTS = {
    "gqa": ("head", {"heads": "gqa", "n_kv_heads": 1}),   # with the default 2 query heads: groups of 2
    "mqa": ("head", {"heads": "mqa"}),
    "mla": ("head", {"heads": "mla"}),
    "linformer": ("sequence", {"seq_compress": "linformer"}),
    "beacon": ("sequence", {"seq_compress": "beacon"}),
    # Reformer's shared-QK LSH attention (models/reformer.py): every entry kept + its bucket ids, fewer attended
    "reformer": ("sequence", {"seq_compress": "reformer"}),
    # MSN product-key memory (arXiv 2602.07526) gated into the last layer; same cache as native, so its rows give
    # the accuracy / parameters / memory-table bytes / latency with the memory next to the native row without it
    "msn": ("memory", {"msn": True}),
    # MALLOC's architecture level: RWKV-4 (models/rwkv.py), a recurrent per-user state instead of a KV cache, trained
    # from scratch with the base recipe; its bytes per user are constant in the history length
    "rwkv": ("architecture", {"arch": "rwkv"}),
}


@dataclass(frozen=True)
class MethodSpec:
    label: str                 # the table's method column
    level: str                 # baseline / precision / pruning / merging / hybrid / head / sequence / memory /
                               # architecture
    method: str = "none"       # compress() method
    budget: Optional[float] = None
    budget_label: str = "100%"
    params: tuple = field(default_factory=tuple)   # sorted (name, value) pairs for compress()
    variant: Optional[str] = None                  # trained variant key of VARIANTS
    recompute: bool = False                        # the no-cache row: full recompute of history + request

    @property
    def key(self) -> str:
        return f"{self.label}@{self.budget_label}"


NATIVE = MethodSpec("native", "baseline")
RECOMPUTE = MethodSpec("no-cache", "baseline", recompute=True)


def _pct(b: float) -> str:
    return f"{100 * b:g}%"


def build_grid(methods: Optional[Sequence[str]] = None, budgets: Sequence[float] = (0.5, 0.25, 0.125),
               bits: Sequence[int] = (8, 4, 2), variants: Sequence[str] = tuple(VARIANTS)) -> list:
    """All rows to evaluate. ``methods``: restrict to these labels (e.g. ``["h2o", "kivi4", "mqa"]``); native and
    no-cache rows are always included. Unknown names raise ``ValueError`` listing the valid ones."""
    known = set(available_methods())
    grid = [NATIVE, RECOMPUTE]
    for b in bits:
        if b not in BITS:
            raise ValueError(f"bits must be among {sorted(BITS)}, got {b}")
        for name in methods_by_level("precision", bits=b):
            grid.append(MethodSpec(name, "precision", name, None, f"{b}-bit"))
    token_levels = (("pruning", methods_by_level("pruning")), ("merging", methods_by_level("merging")),
                    ("hybrid", HYBRIDS))
    for budget in budgets:
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"budgets must be token ratios in (0, 1], got {budget}")
        for level, names in token_levels:
            for name in names:
                if all(part in known for part in name.split("+")):
                    grid.append(MethodSpec(name, level, name, budget, _pct(budget)))
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"unknown variant {v!r}; expected one of {sorted(VARIANTS)}")
        grid.append(MethodSpec(v, VARIANTS[v][0], variant=v))
    if methods:
        wanted = set(methods)
        valid = {s.label for s in grid}
        unknown = wanted - valid
        if unknown:
            raise ValueError(f"unknown methods {sorted(unknown)}; valid: {', '.join(sorted(valid))}")
        grid = [s for s in grid if s.label in wanted or s.label in ("native", "no-cache")]
    return grid
