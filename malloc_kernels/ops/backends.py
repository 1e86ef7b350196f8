"""The attention family's backends (rows of ``core/registry.py``) and the choice of one for a validated call.

Launcher protocol (``ops/cpu.py``, ``triton/attention.py``, ``ops/cuda.py``, and ``reference/`` itself): a module
with ``supports(call) -> (bool, reason)`` and ``run(call) -> AttentionResult`` for a validated ``AttentionCall``
(``core/validate.py``); optionally ``is_available() -> (bool, reason)`` (machine-level), ``supports_autograd = True``
(otherwise inference-only) and ``preferred(call) -> bool`` (calls it claims ahead of the priority order: CUDA C++
decode). Under autograd the ``cpu`` name runs the C++ training kernels (``ops/train_attention.py``) for the calls
they support: jagged self-attention without a cache, the models' training form.
"""
from __future__ import annotations

import importlib
from typing import List, Optional, Tuple

from .. import reference
from ..core import registry
from ..core.validate import AttentionCall
from . import cpu, cuda, train_attention

FAMILY = "attention"


def _triton_launcher():
    # Imported on first use only: importing triton is slow and must follow TRITON_INTERPRET, which callers set
    # before their first Triton call.
    return importlib.import_module("malloc_kernels.triton.attention")


registry.register_backend(FAMILY, "reference", devices=("*",), priority=0, load=lambda: reference)
registry.register_backend(FAMILY, "cpu", devices=("cpu",), priority=10, load=lambda: cpu, ops=("attention_cpu",))
registry.register_backend(FAMILY, "cuda", devices=("cuda",), priority=15, load=lambda: cuda,
                          ops=("cuda_decode_attention",), needs_cuda=True)
registry.register_backend(FAMILY, "triton", devices=("cuda",), priority=20, load=_triton_launcher,
                          needs_triton=True)


def backend_status(name: str) -> Tuple[bool, str]:
    """(available, reason-if-not) for one attention backend on this machine (not specific to a tensor's device)."""
    return registry.status(FAMILY, name)


def available_backends() -> List[str]:
    """Attention backends that can run on this machine: always ``"reference"``; ``"cpu"`` when the C++ extension
    has its attention op; ``"triton"`` when triton imports (it runs CPU tensors under ``TRITON_INTERPRET=1``);
    ``"cuda"`` when a CUDA device and the CUDA ops are present."""
    return registry.available(FAMILY)


def _check(call: AttentionCall):
    """The call-specific condition a launcher must meet (inference-only launchers refuse autograd calls)."""
    def check(mod) -> Tuple[bool, str]:
        if call.requires_grad and not getattr(mod, "supports_autograd", False):
            return False, ("it is inference-only and an input requires grad (use backend='reference' or 'auto', "
                           "or run under torch.no_grad())")
        if call.query_precision not in getattr(mod, "query_precisions", ("exact",)):
            return False, f"it does not implement query_precision={call.query_precision!r}"
        return mod.supports(call)
    return check


def _prefer(call: AttentionCall):
    def prefer(mod) -> bool:
        preferred = getattr(mod, "preferred", None)
        return callable(preferred) and bool(preferred(call))
    return prefer


def _training(call: AttentionCall) -> Tuple[Optional[object], str]:
    """The C++ training kernels for a call under autograd on CPU tensors, or (None, why not)."""
    ok, why = registry.status(FAMILY, "cpu")
    if not ok:
        return None, why
    if call.device.type != "cpu":
        return None, f"backend 'cpu' needs CPU tensors, got {call.device}"
    ok, why = train_attention.supports(call)
    if not ok:
        return None, (f"backend 'cpu' is inference-only for this call and an input requires grad ({why}; "
                      "use backend='reference' or 'auto', or run under torch.no_grad())")
    return train_attention, ""


def select_backend(call: AttentionCall) -> Tuple[str, object]:
    """(name, launcher) for ``call``.

    Explicit backends raise ``ValueError`` saying why they cannot run the call. ``"auto"``: any input requiring
    grad -> the C++ training kernels for jagged self-attention without a cache on CPU tensors, else the reference
    (the other kernels are inference-only); otherwise the registry's rule: CUDA tensors -> CUDA C++ where it
    declares itself preferred (decode), else Triton, else CUDA C++; CPU tensors -> the C++ op; the reference when
    nothing else supports the call.
    """
    if call.requires_grad and call.backend in ("auto", "cpu"):
        mod, why = _training(call)
        if mod is not None:
            return "cpu", mod
        if call.backend == "cpu":
            raise ValueError(f"backend='cpu' cannot run this call: {why}")
        return "reference", reference
    return registry.select(FAMILY, call.backend, call.device, check=_check(call), prefer=_prefer(call))
