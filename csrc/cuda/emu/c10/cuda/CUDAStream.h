// Emulation stand-in (tests/test_cuda_emulated.py): kernels run synchronously on the CPU, no streams.
#pragma once
#include "../../cuda_emu.h"
namespace c10 {
namespace cuda {
struct EmuStream {
  cudaStream_t stream() const { return nullptr; }
};
inline EmuStream getCurrentCUDAStream() { return {}; }
}  // namespace cuda
}  // namespace c10
