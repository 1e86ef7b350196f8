"""Build the C++ extension ``malloc_kernels._C``.

CPU sources are always built. CUDA sources are added only when the installed torch is itself a CUDA build
and nvcc is on the machine -- never decided by ``torch.cuda.is_available()``, so a GPU-less build host can
still produce a CUDA-capable wheel and a CPU torch never tries to link CUDA libraries it does not have.
"""
import glob
import os
import shutil

from setuptools import setup

import torch
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _want_cuda():
    if os.environ.get("MALLOC_KERNELS_NO_CUDA") == "1":
        return False
    has_nvcc = shutil.which("nvcc") is not None or os.path.exists(
        os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"))
    return torch.version.cuda is not None and has_nvcc


# SASS for A100 (sm_80) and H100 (sm_90), plus compute_90 PTX that the driver JIT-compiles on any newer GPU
# (without it, a Blackwell or later device finds no kernel image at all).
NVCC_ARCH_FLAGS = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                   "-gencode=arch=compute_90,code=compute_90"]

cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno", "-Wall", "-Wno-unused-function"]
include_dirs = [os.path.join(ROOT, "csrc", "include")]
sources = _sources("csrc/cpu/*.cpp") + _sources("csrc/torch/*.cpp")

if _want_cuda():
    sources += _sources("csrc/cuda/*.cu") + _sources("csrc/torch/cuda/*.cpp")
    ext = CUDAExtension(
        "malloc_kernels._C", sources, include_dirs=include_dirs,
        define_macros=[("MALLOC_KERNELS_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags,
                            "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr"] + NVCC_ARCH_FLAGS},
        extra_link_args=["-fopenmp"])
else:
    ext = CppExtension("malloc_kernels._C", sources, include_dirs=include_dirs,
                       extra_compile_args=cxx_flags, extra_link_args=["-fopenmp"])

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
