// Framework-free quantize-and-pack / unpack-and-dequantize of one cache payload (keys or values) in the library's
// storage layout (malloc_kernels/core/kvcache.py). Raw pointers and element strides; implemented with OpenMP in
// csrc/cpu/quantize_pack.cpp and by the CUDA kernel in csrc/cuda/quantize_pack.cu (same quant.h numerics).
#pragma once

#include <stdint.h>

namespace malloc_kernels {

// Format of a quantized payload: integer bit widths 8/4/2 (asymmetric, with zero) or fp8 e4m3fn (scale only).
struct QuantSpec {
  int bits;        // 8, 4 or 2 (fp8: 8)
  bool fp8;        // e4m3fn codes, no zero
  int group_size;  // channels per group (token axis) or entries per group (channel axis)
  bool channel;    // true: one (scale, zero) per (group of entries, channel) -- KIVI keys
};

// Shapes: x [B, H, N, D] fp32 with element strides xs[4]; length [B, H] int32 with strides ls[2] (valid entries
// per row; entries past it are padding and get code 0, and token-axis groups of padding get scale = zero = 0).
// Outputs (contiguous): codes uint8 [B, H, N, packed_width(D, bits)]; scale/zero fp16 bits
// [B, H, N, D / G] (token axis) or [B, H, ceil(N / G), D] (channel axis); zero is ignored (may be null) for fp8.
// Returns 0, or a quant::Status code of the first group whose statistics are non-finite / overflow float16.
int quantize_pack_cpu(const float* x, const int64_t* xs, const int32_t* length, const int64_t* ls, int64_t B,
                      int64_t H, int64_t N, int64_t D, const QuantSpec& spec, uint8_t* codes, uint16_t* scale,
                      uint16_t* zero);

// Inverse: out [B, H, N, D] fp32 contiguous, x_hat = code * scale + zero (fp8: e4m3fn(code) * scale), 0 on
// padding entries. codes/scale/zero contiguous in the layout above.
void unpack_dequantize_cpu(const uint8_t* codes, const uint16_t* scale, const uint16_t* zero,
                           const int32_t* length, const int64_t* ls, int64_t B, int64_t H, int64_t N, int64_t D,
                           const QuantSpec& spec, float* out);

}  // namespace malloc_kernels
