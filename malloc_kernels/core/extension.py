"""The one loader of the compiled extension ``malloc_kernels._C`` (the C++ / CUDA ops under ``torch.ops.malloc_kernels``).

Every backend that needs a compiled op asks here (``has_op``) instead of importing ``_C`` itself: the extension is
loaded once, and a missing extension or op becomes a reason string that the backend registry reports
(``core/registry.py``), never an ImportError at import time. Fake (meta) kernels are registered by each op
family's Python module right after ``load()`` succeeds.
"""
from __future__ import annotations

import importlib
from typing import Tuple

import torch

_STATE: dict = {}

BUILD_HINT = "build it with `MALLOC_KERNELS_NO_CUDA=1 python setup.py build_ext --inplace` or `pip install -e .`"


def load() -> Tuple[bool, str]:
    """Load ``malloc_kernels._C`` once: (True, "") or (False, why not)."""
    state = _STATE.get("ext")
    if state is None:
        try:
            importlib.import_module("malloc_kernels._C")
            state = (True, "")
        except ImportError as e:
            state = (False, f"the C++ extension malloc_kernels._C does not load ({e}); {BUILD_HINT}")
        _STATE["ext"] = state
    return state


def has_op(name: str) -> Tuple[bool, str]:
    """Whether ``torch.ops.malloc_kernels.<name>`` is registered (loading the extension first), and why not."""
    ok, why = load()
    if not ok:
        return False, why
    if not hasattr(torch.ops.malloc_kernels, name):
        return False, f"malloc_kernels._C was built without the {name} op (rebuild the extension)"
    return True, ""
