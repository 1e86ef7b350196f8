"""Every benchmark run names the CPU and the ISA variant of the C++ kernels it measured (MALLOC_KERNELS_ISA)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from roofline import cpu_model, isa_variants  # noqa: E402


def pytest_report_header(config):
    v = isa_variants()
    line = ", ".join(f"{k}={x}" for k, x in v.items()) if v else "C++ extension not loaded"
    return [f"CPU: {cpu_model()}", f"C++ CPU kernels ISA variants: {line}"]


@pytest.fixture(autouse=True)
def _record_isa(request):
    """Stores the variants in each pytest-benchmark record (``--benchmark-json`` keeps them as extra_info)."""
    if "benchmark" in request.fixturenames:
        bench = request.getfixturevalue("benchmark")
        bench.extra_info["cpu"] = cpu_model()
        bench.extra_info.update({f"isa_{k}": x for k, x in isa_variants().items()})
    yield
