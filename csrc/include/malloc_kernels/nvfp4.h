// NVFP4 cache payload (format table row "nvfp4", malloc_kernels/core/formats.py): e2m1 codes, two per byte (element
// 2i in the low nibble of byte i), one e4m3fn scale per 16 consecutive values along D (the last group of a row holds
// the D % 16 remaining values when 16 does not divide D), no zero point:  x = e2m1(code) * e4m3(scale).
// Framework-free and exact (e2m1 * e4m3 products are exact in fp32); the numerics are malloc_kernels/cache/quant.py's.
#pragma once

#include <stdint.h>

#include "malloc_kernels/common.h"
#include "malloc_kernels/formats.h"
#include "malloc_kernels/quant.h"

namespace malloc_kernels {
namespace nvfp4 {

constexpr int kGroup = formats::kFixedGroupSize[formats::kNVFP4];
static_assert(kGroup == 16, "NVFP4 groups 16 values per scale");

// e2m1 code (bit 0 mantissa, bits 1-2 exponent, bit 3 sign) -> value: m * 0.5 for exponent 0 (subnormal),
// (1 + m / 2) * 2^(e - 1) otherwise; host and device.
MK_HOST_DEVICE float e2m1_to_f32(uint32_t code) {
  const uint32_t e = (code >> 1) & 3u;
  const float m = float(code & 1u);
  const float mag = e == 0 ? 0.5f * m : (1.0f + 0.5f * m) * float(1u << (e - 1));
  return (code & 8u) ? -mag : mag;
}

// Largest e2m1 magnitude; a group's scale is e4m3(amax / 6), which must not exceed the e4m3 maximum 448.
constexpr float kE2M1Max = 6.0f;
// Status of a group whose amax / 6 exceeds 448 (continues quant::Status).
constexpr int kScaleOverflow = 3;

// e2m1 code of fp32 q: the nearest of +-{0, .5, 1, 1.5, 2, 3, 4, 6}, ties to the even code, saturating at 6; the
// sign bit only on a nonzero magnitude (cache/quant.py's rule: count of the thresholds passed).
inline uint32_t e2m1_encode(float q) {
  const float a = q < 0.f ? -q : q;
  const uint32_t mag = uint32_t(a > 0.25f) + uint32_t(a >= 0.75f) + uint32_t(a > 1.25f) + uint32_t(a >= 1.75f) +
                       uint32_t(a > 2.5f) + uint32_t(a >= 3.5f) + uint32_t(a > 5.0f);
  return mag | ((q < 0.f && mag) ? 8u : 0u);
}

// Quantize one row of D fp32 values (element stride xs) into packed codes (ceil(D / 2) bytes, zero-initialised by
// the caller) and ceil(D / 16) e4m3 scale bytes. Returns quant::kOk, quant::kNonFinite or kScaleOverflow (that
// group then stores scale 0 and codes 0).
inline int encode_row(const float* x, int64_t xs, int D, uint8_t* codes, uint8_t* scales) {
  int status = quant::kOk;
  for (int g = 0; g * kGroup < D; ++g) {
    const int end = D < (g + 1) * kGroup ? D : (g + 1) * kGroup;
    float amax = 0.f;
    bool bad = false;
    for (int d = g * kGroup; d < end; ++d) {
      const float v = x[d * xs];
      bad |= !quant::is_finite(v);
      const float a = v < 0.f ? -v : v;
      amax = a > amax ? a : amax;
    }
    const float raw = amax / kE2M1Max;
    if (bad || raw > quant::kFp8Max) {
      status = status ? status : (bad ? int(quant::kNonFinite) : kScaleOverflow);
      scales[g] = 0;
      continue;
    }
    scales[g] = quant::f32_to_e4m3fn(raw);
    const float s = quant::e4m3fn_to_f32(scales[g]);
    if (s == 0.f) continue;
    for (int d = g * kGroup; d < end; ++d) codes[d >> 1] |= uint8_t(e2m1_encode(x[d * xs] / s) << ((d & 1) * 4));
  }
  return status;
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
    // Host path: a 16-entry table per nibble (4x faster than the arithmetic decode, which the device path keeps);
    // groups are 16 values = 8 whole bytes, so a byte never straddles two scales.
    static constexpr float kValue[16] = {0.f,  0.5f,  1.f,  1.5f,  2.f,  3.f,  4.f,  6.f,
                                         -0.f, -0.5f, -1.f, -1.5f, -2.f, -3.f, -4.f, -6.f};
    for (int g = 0; g * kGroup < D; ++g) {
      const float s = quant::e4m3fn_to_f32(sr[g]);
      const int end = D < (g + 1) * kGroup ? D : (g + 1) * kGroup;
      int d = g * kGroup;
      for (; d + 2 <= end; d += 2) {
        const uint8_t b = row[d >> 1];
        out[d] = kValue[b & 0xFu] * s;
        out[d + 1] = kValue[b >> 4] * s;
      }
      if (d < end) out[d] = kValue[row[d >> 1] & 0xFu] * s;
    }
    for (int d = D; d < ld; ++d) out[d] = 0.f;
  }
}

}  // namespace nvfp4
}  // namespace malloc_kernels
