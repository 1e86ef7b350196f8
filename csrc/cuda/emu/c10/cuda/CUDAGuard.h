// Emulation stand-in (tests/test_cuda_emulated.py): the CPU emulation has one "device", nothing to guard.
#pragma once
#include <c10/core/Device.h>
namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace cuda
}  // namespace c10
