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


def pytest_collection_modifyitems(config, items):
    import torch
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU: none on this machine (CPU-only torch or no device)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
