"""Benchmark session rules: results are written only when asked (``--save`` or ``MALLOC_BENCH_SAVE=1``), a smoke run
(``--smoke`` or ``MALLOC_BENCH_SMOKE=1``: tiny shapes, one round -- what ``.ci/run`` executes) checks that every
benchmark still runs and computes the right thing, nothing asserts on time, and the torch thread count a benchmark
sets is restored after it. The extension rule is the tests' (tests/conftest.py): ``@pytest.mark.needs_ext`` ops
that are missing fail unless ``MALLOC_KERNELS_ALLOW_NO_EXT=1``."""
import importlib.util
import os
from pathlib import Path

import pytest
import torch

from machine import cpu_model, isa_variants, machine_label

_spec = importlib.util.spec_from_file_location("malloc_tests_conftest",
                                               Path(__file__).resolve().parents[1] / "tests" / "conftest.py")
_tests_conftest = importlib.util.module_from_spec(_spec)
_interpret = os.environ.get("TRITON_INTERPRET")
_spec.loader.exec_module(_tests_conftest)
if _interpret is None:                   # the tests' interpreter default is not the benchmarks' (real GPUs there)
    os.environ.pop("TRITON_INTERPRET", None)
_require_extension_ops = _tests_conftest._require_extension_ops
pytest_configure = _tests_conftest.pytest_configure


def pytest_addoption(parser):
    parser.addoption("--save", action="store_true", help="write benchmarks/results/ (default: print only)")
    parser.addoption("--smoke", action="store_true", help="tiny shapes, one round: checks the benchmarks run")


@pytest.fixture(scope="session")
def save_results(request):
    return request.config.getoption("--save") or os.environ.get("MALLOC_BENCH_SAVE") == "1"


@pytest.fixture(scope="session")
def smoke(request):
    return request.config.getoption("--smoke") or os.environ.get("MALLOC_BENCH_SMOKE") == "1"


@pytest.fixture(autouse=True)
def _restore_threads():
    prev = torch.get_num_threads()
    yield
    torch.set_num_threads(prev)


def pytest_report_header(config):
    return f"benchmarks on {machine_label()}"


@pytest.fixture(autouse=True)
def _record_isa(request):
    """Stores the CPU and the ISA variants in each pytest-benchmark record (``--benchmark-json`` keeps extra_info)."""
    if "benchmark" in request.fixturenames:
        bench = request.getfixturevalue("benchmark")
        bench.extra_info["cpu"] = cpu_model()
        bench.extra_info.update({f"isa_{k}": x for k, x in isa_variants().items()})
    yield
