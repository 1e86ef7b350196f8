"""Which attention backends can run here, and which one runs a given call.

Backend launcher protocol (``malloc_kernels.ops.cpu``, ``malloc_kernels.triton.attention``,
``malloc_kernels.ops.cuda``): a module exposing ``supports(call) -> (bool, reason)`` and
``run(call) -> AttentionResult`` for a validated ``AttentionCall`` (``core/validate.py``); optionally
``is_available() -> (bool, reason)`` (machine-level availability, e.g. the compiled op is registered),
``supports_autograd = True`` (otherwise the backend is inference-only) and, for CUDA C++,
``preferred(call) -> bool`` (decode shapes where it beats Triton). Modules are imported lazily, on first use, and
their absence is tolerated: nothing here queries a device or imports Triton at import time.
"""
from __future__ import annotations

import importlib
import os
from typing import List, Optional, Tuple

from ..core.validate import AttentionCall

KERNEL_MODULES = {
    "cpu": "malloc_kernels.ops.cpu",
    "triton": "malloc_kernels.triton.attention",
    "cuda": "malloc_kernels.ops.cuda",
}


def _load(name: str) -> Tuple[Optional[object], str]:
    """Import a backend's launcher module; (module, "") or (None, why not)."""
    modname = KERNEL_MODULES[name]
    try:
        mod = importlib.import_module(modname)
    except ImportError as e:
        return None, f"{modname} cannot be imported ({e})"
    missing = [f for f in ("supports", "run") if not callable(getattr(mod, f, None))]
    if missing:
        return None, f"{modname} does not define {', '.join(missing)}"
    return mod, ""


def _has_compiled_ext() -> Tuple[bool, str]:
    try:
        importlib.import_module("malloc_kernels._C")
    except ImportError as e:
        return False, f"the C++ extension malloc_kernels._C does not load ({e})"
    return True, ""


def backend_status(name: str) -> Tuple[bool, str]:
    """(available, reason-if-not) for one backend name on this machine (not specific to a tensor's device)."""
    if name == "reference":
        return True, ""
    if name not in KERNEL_MODULES:
        raise ValueError(f"backend must be one of {('auto', 'reference', *KERNEL_MODULES)}, got {name!r}")
    if name == "triton":
        try:
            importlib.import_module("triton")
        except ImportError as e:
            return False, f"triton is not installed ({e})"
    if name == "cuda":
        import torch
        if not torch.cuda.is_available():
            return False, "no CUDA device is available (CPU-only torch or no GPU)"
    if name in ("cpu", "cuda"):
        ok, why = _has_compiled_ext()
        if not ok:
            return False, why
    mod, why = _load(name)
    if mod is None:
        return False, why
    if callable(getattr(mod, "is_available", None)):
        ok, why = mod.is_available()
        if not ok:
            return False, why
    return True, ""


def available_backends() -> List[str]:
    """Backends that can run on this machine: always ``"reference"``; ``"cpu"`` when the C++ extension loads
    with its attention op; ``"triton"`` when triton imports (it runs CPU tensors under ``TRITON_INTERPRET=1``);
    ``"cuda"`` when a CUDA device and the CUDA ops are present."""
    return ["reference"] + [n for n in KERNEL_MODULES if backend_status(n)[0]]


def _device_ok(name: str, call: AttentionCall) -> Tuple[bool, str]:
    dev = call.device.type
    if name == "cpu" and dev != "cpu":
        return False, f"backend 'cpu' needs CPU tensors, got {call.device}"
    if name == "cuda" and dev != "cuda":
        return False, f"backend 'cuda' needs CUDA tensors, got {call.device}"
    if name == "triton" and dev != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False, f"backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {call.device}"
    return True, ""


def _usable(name: str, call: AttentionCall) -> Tuple[Optional[object], str]:
    """(module, "") if backend ``name`` can run ``call``, else (None, why)."""
    ok, why = backend_status(name)
    if not ok:
        return None, why
    ok, why = _device_ok(name, call)
    if not ok:
        return None, why
    mod, _ = _load(name)
    if call.requires_grad and name == "cpu":
        from . import train_attention
        ok, why = train_attention.supports(call)
        if ok:
            return train_attention, ""
        return None, (f"backend 'cpu' is inference-only for this call and an input requires grad ({why}; "
                      "use backend='reference' or 'auto', or run under torch.no_grad())")
    if call.requires_grad and not getattr(mod, "supports_autograd", False):
        return None, (f"backend {name!r} is inference-only and an input requires grad "
                      "(use backend='reference' or 'auto', or run under torch.no_grad())")
    ok, why = mod.supports(call)
    if not ok:
        return None, f"backend {name!r} does not support this call: {why}"
    return mod, ""


def select_backend(call: AttentionCall) -> Tuple[str, Optional[object]]:
    """(name, launcher module) for ``call``; the module is None for the reference.

    Explicit backends raise ``ValueError`` saying why they cannot run the call. ``"auto"``: any input requiring
    grad -> the C++ training kernels for jagged self-attention without a cache on CPU tensors
    (``ops/train_attention.py``), else the reference (the other kernels are inference-only); CUDA tensors -> CUDA C++ where it declares itself preferred
    (decode), else Triton, else CUDA C++, else reference; CPU tensors -> the C++ CPU op when it supports the call,
    else reference.
    """
    if call.backend == "reference":
        return "reference", None
    if call.backend != "auto":
        mod, why = _usable(call.backend, call)
        if mod is None:
            raise ValueError(f"backend={call.backend!r} cannot run this call: {why}")
        return call.backend, mod
    if call.requires_grad:
        train_mod, _ = _usable("cpu", call) if call.device.type == "cpu" else (None, "")
        return ("cpu", train_mod) if train_mod is not None else ("reference", None)
    if call.device.type == "cuda":
        cuda_mod, _ = _usable("cuda", call)
        preferred = getattr(cuda_mod, "preferred", None)
        if cuda_mod is not None and callable(preferred) and preferred(call):
            return "cuda", cuda_mod
        tri, _ = _usable("triton", call)
        if tri is not None:
            return "triton", tri
        if cuda_mod is not None:
            return "cuda", cuda_mod
        return "reference", None
    if call.device.type == "cpu":
        cpu_mod, _ = _usable("cpu", call)
        if cpu_mod is not None:
            return "cpu", cpu_mod
    return "reference", None
