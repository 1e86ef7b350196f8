"""The backend registry: one table of the backends of every op family, and one rule for choosing among them.

A family is a set of interchangeable implementations of the same ops with the same contract:

=============  =========================================================  ==========================================
family         ops (one name in every backend)                            registered in
=============  =========================================================  ==========================================
``attention``  ``run(call)`` for a validated ``AttentionCall``            ``ops/backends.py``
``quantize``   ``quantize_tensor(x, length, fmt, group_size, axis, name)`` ``ops/quantize.py``
``pkm``        ``pkm_topk``, ``pkm_gather``, ``pkm_gather_backward``      ``memory/ops.py``
``loss``       ``cross_entropy_rows_``                                    ``loss/ops.py``
``wkv``        ``wkv(w, u, k, v, offsets, state)`` (RWKV-4 recurrence)    ``ops/wkv.py``
=============  =========================================================  ==========================================

Each row (``Backend``) states its name, the device types it runs (``devices``; Triton rows also take CPU tensors
under ``TRITON_INTERPRET=1`` when asked for by name), what the machine needs for it (compiled ops of ``_C``, the
``triton`` package, a CUDA device) and its ``priority`` for ``backend="auto"`` (higher first; the always-available
fallback has 0). ``load`` returns the launcher (a module or object with the family's ops); it is called once, on
first use, so that e.g. Triton is imported only when a Triton backend is first considered. A launcher may add its
own machine-level condition as ``is_available() -> (ok, why)``.

``select(family, requested, device, check=...)`` is the one dispatch rule: an explicit name must be registered,
available on this machine, accept the device and pass the call-specific ``check(launcher) -> (ok, why)``, else
``ValueError`` says why; ``"auto"`` takes the first backend by (preferred, priority) that passes all of these.
Availability is computed once per process (the compiled extension and the installed packages do not change while
it runs), so selection after the first call is a few dictionary lookups -- which also keeps it traceable by
``torch.compile``.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import extension

FAMILIES = ("attention", "quantize", "pkm", "loss", "wkv")


@dataclass(frozen=True)
class Backend:
    """One implementation of an op family (see the module docstring)."""

    family: str
    name: str
    devices: Tuple[str, ...]            # device types "auto" may send to it ("*": any device)
    priority: int                       # "auto" tries higher first
    load: Callable[[], object]          # -> the launcher (called once)
    ops: Tuple[str, ...] = ()           # compiled ops of malloc_kernels._C it needs
    needs_triton: bool = False          # the triton package (and: CPU tensors only under TRITON_INTERPRET=1)
    needs_cuda: bool = False            # a CUDA device


_ROWS: Dict[str, Dict[str, Backend]] = {f: {} for f in FAMILIES}
_STATUS: Dict[Tuple[str, str], Tuple[bool, str]] = {}
_LAUNCHERS: Dict[Tuple[str, str], object] = {}


def register_backend(family: str, name: str, *, devices: Tuple[str, ...], priority: int, load: Callable[[], object],
                     ops: Tuple[str, ...] = (), needs_triton: bool = False, needs_cuda: bool = False) -> Backend:
    """Add a backend row (a family's module does this at import; registering a name twice is an error)."""
    if family not in _ROWS:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if name in _ROWS[family]:
        raise RuntimeError(f"backend {name!r} of family {family!r} registered twice")
    row = Backend(family, name, tuple(devices), int(priority), load, tuple(ops), needs_triton, needs_cuda)
    _ROWS[family][name] = row
    return row


def backends(family: str) -> List[Backend]:
    """The family's rows, highest priority first."""
    if family not in _ROWS:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return sorted(_ROWS[family].values(), key=lambda b: -b.priority)


def names(family: str) -> Tuple[str, ...]:
    """Registered backend names of a family (what ``backend=`` accepts besides ``"auto"``)."""
    return tuple(b.name for b in backends(family))


def _machine_status(row: Backend) -> Tuple[bool, str]:
    if row.needs_triton:
        try:
            importlib.import_module("triton")
        except ImportError as e:
            return False, f"triton is not installed ({e})"
    if row.needs_cuda and not torch.cuda.is_available():
        return False, "no CUDA device is available (CPU-only torch or no GPU)"
    for op in row.ops:
        ok, why = extension.has_op(op)
        if not ok:
            return False, why
    try:
        mod = launcher(row.family, row.name)
    except ImportError as e:
        return False, f"the {row.family} backend {row.name!r} cannot be imported ({e})"
    if callable(getattr(mod, "is_available", None)):   # a launcher's own machine-level condition
        return mod.is_available()
    return True, ""


def status(family: str, name: str) -> Tuple[bool, str]:
    """(available on this machine, reason if not) for one backend, whatever the tensors' device; cached."""
    key = (family, name)
    st = _STATUS.get(key)
    if st is None:
        row = _ROWS.get(family, {}).get(name)
        if row is None:
            raise ValueError(f"backend must be one of {('auto',) + names(family)}, got {name!r}")
        st = _machine_status(row)
        _STATUS[key] = st
    return st


def available(family: str) -> List[str]:
    """Names of the family's backends that can run on this machine, highest priority last (fallback first)."""
    return [b.name for b in reversed(backends(family)) if status(family, b.name)[0]]


def launcher(family: str, name: str) -> object:
    """The backend's launcher (loaded on first use)."""
    key = (family, name)
    mod = _LAUNCHERS.get(key)
    if mod is None:
        mod = _ROWS[family][name].load()
        _LAUNCHERS[key] = mod
    return mod


def device_ok(row: Backend, device: torch.device, explicit: bool) -> Tuple[bool, str]:
    """Whether ``row`` takes tensors on ``device``. Triton runs CPU tensors only in its interpreter
    (``TRITON_INTERPRET=1``) and only when asked for by name: "auto" never interprets."""
    if "*" in row.devices or device.type in row.devices:
        return True, ""
    if row.needs_triton and explicit and device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True, ""
    want = " or ".join(row.devices)
    extra = " (or TRITON_INTERPRET=1 for CPU tensors)" if row.needs_triton else ""
    return False, f"backend {row.name!r} needs {want} tensors{extra}, got {device}"


def usable(family: str, name: str, device: torch.device, explicit: bool,
           check: Optional[Callable[[object], Tuple[bool, str]]] = None) -> Tuple[Optional[object], str]:
    """(launcher, "") when backend ``name`` can run a call on ``device`` (and passes ``check``), else (None, why)."""
    ok, why = status(family, name)
    if not ok:
        return None, why
    ok, why = device_ok(_ROWS[family][name], device, explicit)
    if not ok:
        return None, why
    mod = launcher(family, name)
    if check is not None:
        ok, why = check(mod)
        if not ok:
            return None, f"backend {name!r} does not support this call: {why}"
    return mod, ""


def select(family: str, requested: str, device: torch.device,
           check: Optional[Callable[[object], Tuple[bool, str]]] = None,
           prefer: Optional[Callable[[object], bool]] = None) -> Tuple[str, object]:
    """(name, launcher) of the backend that runs a call; see the module docstring for the rule.

    ``prefer(launcher) -> bool`` lets a backend claim calls it is best at (e.g. CUDA C++ decode) ahead of the
    priority order. Raises ``ValueError`` for an unknown name, or an explicit backend that cannot run the call.
    """
    if requested != "auto":
        if requested not in _ROWS[family]:
            raise ValueError(f"backend must be one of {('auto',) + names(family)}, got {requested!r}")
        mod, why = usable(family, requested, device, True, check)
        if mod is None:
            raise ValueError(f"backend={requested!r} cannot run this call: {why}")
        return requested, mod
    found = []
    for row in backends(family):
        mod, _ = usable(family, row.name, device, False, check)
        if mod is not None:
            if prefer is not None and prefer(mod):
                return row.name, mod
            found.append((row.name, mod))
    if not found:
        raise ValueError(f"no {family} backend can run this call on {device}")
    return found[0]
