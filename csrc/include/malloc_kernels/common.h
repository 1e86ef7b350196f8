// Shared, framework-free definitions for every backend (CPU C++, CUDA C++). No torch, no CUDA runtime here:
// these headers compile with a plain C++17 compiler and with nvcc, so the CPU tests exercise the same numerics
// the GPU kernels use.
#pragma once

#if defined(__CUDACC__)
#define MK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MK_HOST_DEVICE inline
#endif
