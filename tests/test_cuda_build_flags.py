"""The CUDA build ships SASS for sm_80/sm_90 and compute_90 PTX (driver-JIT'd on newer GPUs, which would otherwise
find no kernel image): the flags of setup.py and the CMake default, and -- where nvcc exists -- a real compile with
them whose fatbinary lists the PTX."""
import ast
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _setup_arch_flags():
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "NVCC_ARCH_FLAGS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no NVCC_ARCH_FLAGS")


def test_setup_embeds_compute_90_ptx():
    flags = _setup_arch_flags()
    assert "-gencode=arch=compute_90,code=compute_90" in flags
    assert {"-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"} <= set(flags)
    assert "NVCC_ARCH_FLAGS" in (ROOT / "setup.py").read_text().split("CUDAExtension(", 1)[1]


def test_cmake_default_archs_include_virtual_90():
    m = re.search(r'set\(MALLOC_KERNELS_CUDA_ARCHS "([^"]+)"', (ROOT / "CMakeLists.txt").read_text())
    archs = m.group(1).split(";")
    assert "80-real" in archs and "90" in archs  # "90" = sm_90 SASS + compute_90 PTX


def _nvcc():
    return shutil.which("nvcc") or next((str(p) for p in [Path("/usr/local/cuda/bin/nvcc")] if p.exists()), None)


@pytest.mark.skipif(_nvcc() is None, reason="nvcc is not installed")
def test_fatbinary_holds_ptx(tmp_path):
    src = tmp_path / "k.cu"
    src.write_text("__global__ void k(float* x) { x[threadIdx.x] *= 2.0f; }\n")
    obj = tmp_path / "k.o"
    subprocess.run([_nvcc(), "-c", str(src), "-o", str(obj)] + _setup_arch_flags(), check=True, timeout=300)
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("cuda_report", ROOT / "tools" / "cuda_report.py")
    report = importlib.util.module_from_spec(spec)
    sys.modules["cuda_report"] = report  # its dataclasses resolve their module
    spec.loader.exec_module(report)
    cuobjdump = report.find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("cuobjdump not found")
    ptx = subprocess.run([str(cuobjdump), "--list-ptx", str(obj)], capture_output=True, text=True, check=True).stdout
    elf = subprocess.run([str(cuobjdump), "--list-elf", str(obj)], capture_output=True, text=True, check=True).stdout
    assert "sm_90" in ptx or "compute_90" in ptx, ptx
    assert "sm_80" in elf and "sm_90" in elf, elf
