// NVFP4 cache payload (format table row "nvfp4", malloc_kernels/core/formats.py): e2m1 codes, two per byte (element
// 2i in the low nibble of byte i), one e4m3fn scale per 16 consecutive values along D (the last group of a row holds
// the D % 16 remaining values when 16 does not divide D), no zero point:  x = e2m1(code) * e4m3(scale).
// Framework-free and exact (e2m1 * e4m3 products are exact in fp32); the numerics are malloc_kernels/cache/quant.py's.
#pragma once

#include <stdint.h>

#include "malloc_kernels/formats.h"
#include "malloc_kernels/quant.h"

namespace malloc_kernels {
namespace nvfp4 {

constexpr int kGroup = formats::kFixedGroupSize[formats::kNVFP4];
static_assert(kGroup == 16, "NVFP4 groups 16 values per scale");

// e2m1 code (bits 0-2 magnitude, bit 3 sign) -> value.
inline float e2m1_to_f32(uint32_t code) {
  static constexpr float kMag[8] = {0.f, 0.5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f};
  const float m = kMag[code & 7u];
  return (code & 8u) ? -m : m;
}

// Scales per row of d values: ceil(d / 16).
constexpr int64_t groups(int64_t d) { return formats::token_groups(formats::kNVFP4, d, kGroup); }

// Decode n stored rows (row stride `stride` bytes, scales `s8` with row stride `s_stride` bytes) into dst[n][ld]
// floats; elements D..ld-1 are zeroed. Each scale is decoded once per group, each code byte once per two values.
inline void decode_rows(const uint8_t* base, int64_t stride, int n, int D, int ld, float* dst, const uint8_t* s8,
                        int64_t s_stride) {
  for (int j = 0; j < n; ++j) {
    const uint8_t* row = base + int64_t(j) * stride;
    const uint8_t* sr = s8 + int64_t(j) * s_stride;
    float* out = dst + int64_t(j) * ld;
    for (int g = 0; g * kGroup < D; ++g) {
      const float s = quant::e4m3fn_to_f32(sr[g]);
      const int end = D < (g + 1) * kGroup ? D : (g + 1) * kGroup;
      for (int d = g * kGroup; d < end; ++d) out[d] = e2m1_to_f32((row[d >> 1] >> ((d & 1) * 4)) & 0xFu) * s;
    }
    for (int d = D; d < ld; ++d) out[d] = 0.f;
  }
}

}  // namespace nvfp4
}  // namespace malloc_kernels
