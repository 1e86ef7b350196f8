// Host launch functions of the CUDA kernels in csrc/cuda/*.cu: framework-free (raw device pointers, sizes,
// element strides, a stream), so the kernels compile and are compile-checked without a CUDA build of torch.
// The torch glue in csrc/torch/cuda/*.cpp validates tensors and calls these.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#include "malloc_kernels/quantize_pack.h"

namespace malloc_kernels {
namespace cuda {

// Quantize-and-pack on the GPU; same layout and bit-exact results as quantize_pack_cpu (both use quant.h).
// x fp32 [B, H, N, D] (element strides xs), length int32 [B, H] (strides ls); codes/scale/zero contiguous as in
// quantize_pack.h and fully written (padding included). *status (device int, zero-initialised by the caller)
// receives the largest quant::Status of any group (0 = ok).
cudaError_t quantize_pack(const float* x, const int64_t* xs, const int32_t* length, const int64_t* ls, int64_t B,
                          int64_t H, int64_t N, int64_t D, const QuantSpec& spec, uint8_t* codes, uint16_t* scale,
                          uint16_t* zero, int* status, cudaStream_t stream);

}  // namespace cuda
}  // namespace malloc_kernels
