"""Attention conformance: every backend against the float64 reference over the SAME cases (tests/attention_cases.py:
cache formats x kinds x masks, decode shapes, odd sizes, split boundaries, empty rows, low precision).

Backends: ``cpu`` (the C++ kernels, once per CPU ISA variant this machine runs -- the ``cpu_isa`` fixture),
``triton`` (the Triton kernels under the interpreter) and ``cuda_emu`` (the CUDA kernels' own source run on the
CPU through tests/cuda_emulation.py). The reference is the oracle (float64 on the same codes) and the yardstick
(the same math by PyTorch in the case's dtype); one accuracy rule for all: tests/tolerance.py.

Which backend takes which case is declared here (``ACCEPTS``) and checked against the backend's own
``supports()``, so a backend that starts refusing a case it should run fails instead of dropping out. The Triton
interpreter runs numpy per program (seconds per case) and the CUDA emulation one thread per CUDA thread, so they
get deliberate subsets (``TRITON_CASES``, ``CUDA_CASES``) that still cover every format, kind, mask, path, dtype
and boundary (checked by the last test).
"""
import os

import pytest
import torch

from attention_cases import CASES, FORMATS, Case, build
from malloc_kernels.ops import cpu as cpu_backend
from malloc_kernels.ops import cuda as cuda_backend
from malloc_kernels.core.validate import validate_call
from malloc_kernels.reference import run as ref_run
from tolerance import torch_in_dtype, within_twice_torch_error

assert os.environ.get("TRITON_INTERPRET") == "1", "conftest must set TRITON_INTERPRET=1 before kernels import"
from malloc_kernels.triton import attention as triton_backend  # noqa: E402

STAT_FIELDS = ("key_mass", "key_window_mass", "cache_mass", "cache_window_mass", "residual_mass",
               "residual_window_mass")


def _takes_cpu(case: Case) -> bool:
    return case.mask not in ("bool", "additive")


def _takes_cuda(case: Case) -> bool:
    return case.mask not in ("bool", "additive") and not case.stats and case.D <= cuda_backend.MAX_HEAD_DIM


def _cuda_subset(case: Case) -> bool:
    # the same deliberate subset; the odd head dims as decode (one std::thread per CUDA thread makes a 17-token
    # request over 97 entries cost seconds)
    if case.D in (1, 7, 17):
        return case.D == 17 and case.L == 1 and case.fmt == "int4_token"
    return _triton_subset(case)


def _triton_subset(case: Case) -> bool:
    if case.tag == "decode":                 # one decode shape per format (GQA 4:1 at D=64) and the hstu one
        return (case.Hq, case.Hkv, case.D) == (8, 2, 64)
    if case.D in (1, 7, 17):                 # odd head dims: the largest one over a 97-entry cache
        return case.D == 17 and case.C == 97 and case.fmt == "int4_token"
    if case.fmt in FORMATS and case.tag == "" and case.mask in ("causal", "full", "targets") and \
            case.dtype == torch.float32 and case.hstu_norm == "original" and case.L == 3:
        # the format x kind x mask grid: every format and kind once per mask, rotating masks across formats
        i = list(FORMATS).index(case.fmt)
        return ("causal", "full", "targets")[(i + (case.kind == "hstu")) % 3] == case.mask
    return True


ACCEPTS = {"cpu": _takes_cpu, "triton": lambda case: True, "cuda_emu": _takes_cuda}
TRITON_CASES = [c for c in CASES if _triton_subset(c)]


def _run_cpu(call, case):
    ok, why = cpu_backend.supports(call)
    assert ok, f"cpu backend refuses a case it is declared to take: {why}"
    return cpu_backend.run(call)


def _run_triton(call, case):
    ok, why = triton_backend.supports(call)
    assert ok, f"triton backend refuses a case it is declared to take: {why}"
    knobs = dict(case.triton)
    if "path" not in knobs:        # alternate the split-K decode and the append kernel across cases
        knobs["path"] = ("decode", "append")[case.seed % 2]
    return triton_backend.run(call, **knobs)


def _run_cuda_emu(call, case, emu):
    return cuda_backend._launch(call, emu)


def _check(case: Case, low, exact, got):
    n = max(case.D, case.C + case.R + (max(case.q_lengths) if case.q_lengths is not None else case.L))
    want = ref_run(validate_call(**exact))
    with torch_in_dtype():
        yard = ref_run(validate_call(**low))
    assert got.output.dtype == case.dtype
    within_twice_torch_error(got.output, want.output, yard.output, case.dtype, "output", n=n)
    if case.kind == "softmax":
        within_twice_torch_error(got.lse, want.lse, yard.lse, case.dtype, "lse", n=n)
    if case.stats:
        for f in STAT_FIELDS:
            a, b, y = getattr(got.stats, f), getattr(want.stats, f), getattr(yard.stats, f)
            assert (a is None) == (b is None), f
            if a is not None:
                within_twice_torch_error(a, b, y, case.dtype, f, n=n)


def _ids(cases):
    return [c.name for c in cases]


CPU_CASES = [c for c in CASES if ACCEPTS["cpu"](c)]
CUDA_CASES = [c for c in CASES if ACCEPTS["cuda_emu"](c) and _cuda_subset(c)]


@pytest.mark.needs_ext("attention_cpu")
@pytest.mark.parametrize("case", CPU_CASES, ids=_ids(CPU_CASES))
def test_cpu(case, cpu_isa):
    low, exact = build(case)
    _check(case, low, exact, _run_cpu(validate_call(**low), case))


@pytest.mark.parametrize("case", TRITON_CASES, ids=_ids(TRITON_CASES))
def test_triton_interpreter(case):
    low, exact = build(case)
    _check(case, low, exact, _run_triton(validate_call(**low), case))


@pytest.mark.parametrize("case", CUDA_CASES, ids=_ids(CUDA_CASES))
def test_cuda_emulation(case, emu):
    low, exact = build(case)
    _check(case, low, exact, _run_cuda_emu(validate_call(**low), case, emu))


def test_declines_are_the_backends_own():
    """Every case a backend is declared not to take is one its ``supports()`` refuses, with a reason."""
    for case in (c for c in CASES if not (ACCEPTS["cpu"](c) and ACCEPTS["cuda_emu"](c))):
        call = validate_call(**build(case)[0])
        if not ACCEPTS["cpu"](case):
            ok, why = cpu_backend.supports(call)
            assert not ok and why, case.name
        if not ACCEPTS["cuda_emu"](case):
            assert case.stats or call.attn_mask is not None or case.D > cuda_backend.MAX_HEAD_DIM, case.name


def test_case_table_covers_every_format_kind_and_mask_on_every_backend():
    for backend, cases in (("cpu", CPU_CASES), ("triton", TRITON_CASES), ("cuda_emu", CUDA_CASES)):
        fmts = {c.fmt for c in cases}
        assert set(FORMATS) <= fmts, (backend, set(FORMATS) - fmts)
        assert {c.kind for c in cases} == {"softmax", "hstu"}, backend
        masks = {c.mask for c in cases}
        assert {"causal", "full", "targets"} <= masks, backend
        assert {c.dtype for c in cases} >= {torch.float32, torch.float16, torch.bfloat16}, backend
    assert {"bool", "additive"} <= {c.mask for c in TRITON_CASES}
