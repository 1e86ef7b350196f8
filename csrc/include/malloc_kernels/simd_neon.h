// NEON (AArch64 Advanced SIMD, 4 x float32 per register) math shared by the CPU kernels' aarch64 variant. Include
// only where __aarch64__ is defined: every AArch64 CPU has Advanced SIMD (with fp16 <-> fp32 conversion and fused
// multiply-add), so unlike x86 there is nothing to detect at run time.
#pragma once

#include <arm_neon.h>

#include <initializer_list>
#include <limits>

#include "malloc_kernels/exp_consts.h"

namespace malloc_kernels {
namespace simd_neon {

// exp(x) of 4 lanes: simd_avx2::exp256 step for step (exp_consts.h: the same range reduction and polynomial, the
// same fused operations in the same order); below -87.3 and -inf exactly 0, above 88.3 +inf. The clamp uses minnm / maxnm,
// which return the number when the other operand is NaN, as the x86 min / max do: a NaN input gives a finite lane
// here too (callers flag NaN scores themselves: the non-finite rule of attention_cpu/scalar.h).
inline float32x4_t exp4(float32x4_t x) {
  using E = simd::ExpConsts;
  const uint32x4_t zero_mask = vcltq_f32(x, vdupq_n_f32(E::lo));
  const uint32x4_t inf_mask = vcgtq_f32(x, vdupq_n_f32(E::hi));
  x = vmaxnmq_f32(vminnmq_f32(x, vdupq_n_f32(E::hi)), vdupq_n_f32(E::lo));
  const float32x4_t n = vrndnq_f32(vmulq_f32(x, vdupq_n_f32(E::log2e)));  // to nearest, ties to even
  const float32x4_t r = vfmsq_f32(vfmsq_f32(x, n, vdupq_n_f32(E::ln2_hi)), n, vdupq_n_f32(E::ln2_lo));
  float32x4_t p = vdupq_n_f32(E::c5);
  for (const float c : {E::c4, E::c3, E::c2, E::c1, E::c0}) p = vfmaq_f32(vdupq_n_f32(c), p, r);
  p = vfmaq_f32(vaddq_f32(r, vdupq_n_f32(1.f)), p, vmulq_f32(r, r));
  const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);  // n is integral: exact
  const float32x4_t y = vmulq_f32(p, vreinterpretq_f32_s32(e));
  const float32x4_t y0 = vreinterpretq_f32_u32(vbicq_u32(vreinterpretq_u32_f32(y), zero_mask));
  return vbslq_f32(inf_mask, vdupq_n_f32(std::numeric_limits<float>::infinity()), y0);
}

// [sum of a0's lanes, sum of a1's, sum of a2's, sum of a3's].
inline float32x4_t hsum4(float32x4_t a0, float32x4_t a1, float32x4_t a2, float32x4_t a3) {
  return vpaddq_f32(vpaddq_f32(a0, a1), vpaddq_f32(a2, a3));
}

// Bit i set where lane i of the comparison result m is true.
inline unsigned movemask(uint32x4_t m) {
  const uint32x4_t bits = {1u, 2u, 4u, 8u};
  return vaddvq_u32(vandq_u32(m, bits));
}

// 4 float16 (IEEE binary16 bits) as float32: exact (FCVTL).
inline float32x4_t halves4(const uint16_t* h) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(h))); }

}  // namespace simd_neon
}  // namespace malloc_kernels
