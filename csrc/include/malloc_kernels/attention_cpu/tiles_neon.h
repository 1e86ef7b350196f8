// Tile primitives of the fused CPU attention, NEON build (AArch64 Advanced SIMD, csrc/cpu/attention_neon.cpp). Same
// names and results as tiles_portable.h / tiles_avx2.h, 4 floats per vector:
//   decode_rows / decode_rows_channel   stored rows (fp32, fp16, bf16, int8, int4, int2, fp8) -> float tiles, 8
//                                       elements per step (every format's 8 elements come from whole bytes inside
//                                       the row), a scalar tail for the rest of a row;
//   qk_dots / pv_accum                  tiles_lanes.h's templates on the 4-lane trait Lanes4;
//   exp_inplace                         simd_neon::exp4 (exp_consts.h: the x86 builds' exp);
//   VecN                                row_tiles.h's register-tiled many-row path with 4 rows per vector.
// The head dim is padded to kLanes = 4 in float tiles, so every vector of a padded row is whole: no load or store
// ever reaches past a row. The decode-from-codes paths of the x86 builds do not exist here (no_codes.h).
#pragma once

#include <arm_neon.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "malloc_kernels/attention_cpu/no_codes.h"
#include "malloc_kernels/attention_cpu/scalar.h"
#include "malloc_kernels/attention_cpu/tiles_lanes.h"
#include "malloc_kernels/simd_neon.h"

namespace malloc_kernels {
namespace cpu {
namespace MK_IMPL_NS {

// Padding of the head dim in float tiles (the vector width).
constexpr int kLanes = 4;

// Eight unsigned 16-bit lanes as two vectors of floats (exact).
inline void u16x8_to_f32(uint16x8_t x, float32x4_t& lo, float32x4_t& hi) {
  lo = vcvtq_f32_u32(vmovl_u16(vget_low_u16(x)));
  hi = vcvtq_f32_u32(vmovl_high_u16(x));
}

// e4m3fn codes (one per 32-bit lane) as floats: rebias the exponent for normals, m * 2^-9 for subnormals, then the
// sign; 0x7F / 0xFF are e4m3fn's NaN (it has no inf), so those lanes get the quiet-NaN bits.
inline float32x4_t fp8x4(uint32x4_t v) {
  const uint32x4_t mag = vandq_u32(v, vdupq_n_u32(0x7F));
  const uint32x4_t sign = vshlq_n_u32(vandq_u32(v, vdupq_n_u32(0x80)), 24);
  const uint32x4_t normal = vaddq_u32(vshlq_n_u32(mag, 20), vdupq_n_u32(120u << 23));
  const float32x4_t sub = vmulq_f32(vcvtq_f32_u32(mag), vdupq_n_f32(0.001953125f));
  const uint32x4_t x = vbslq_u32(vcltq_u32(mag, vdupq_n_u32(8)), vreinterpretq_u32_f32(sub), normal);
  const uint32x4_t nan = vandq_u32(vceqq_u32(mag, vdupq_n_u32(0x7F)), vdupq_n_u32(0x7FC00000u));
  return vreinterpretq_f32_u32(vorrq_u32(vorrq_u32(x, sign), nan));
}

// 8 consecutive raw elements (chunk c = elements 8c..8c+7) of a stored row as floats: lo = 8c..8c+3, hi = the rest.
// Reads exactly the chunk's bytes (32, 16, 8, 4 or 2).
template <Fmt F>
inline void raw8(const uint8_t* row, int c, float32x4_t& lo, float32x4_t& hi) {
  if constexpr (F == Fmt::F32) {
    const float* p = reinterpret_cast<const float*>(row) + 8 * c;
    lo = vld1q_f32(p);
    hi = vld1q_f32(p + 4);
  } else if constexpr (F == Fmt::F16) {
    const uint16x8_t h = vld1q_u16(reinterpret_cast<const uint16_t*>(row + 16 * c));
    lo = vcvt_f32_f16(vreinterpret_f16_u16(vget_low_u16(h)));
    hi = vcvt_high_f32_f16(vreinterpretq_f16_u16(h));
  } else if constexpr (F == Fmt::BF16) {
    const uint16x8_t h = vld1q_u16(reinterpret_cast<const uint16_t*>(row + 16 * c));
    lo = vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(h), 16));
    hi = vreinterpretq_f32_u32(vshll_high_n_u16(h, 16));
  } else if constexpr (F == Fmt::INT8) {
    u16x8_to_f32(vmovl_u8(vld1_u8(row + 8 * c)), lo, hi);
  } else if constexpr (F == Fmt::INT4) {
    // 4 bytes hold 8 nibbles, element 2i in the low nibble of byte i: interleave the low and high nibbles.
    uint32_t w; std::memcpy(&w, row + 4 * c, 4);
    const uint8x8_t b = vreinterpret_u8_u32(vdup_n_u32(w));
    u16x8_to_f32(vmovl_u8(vzip1_u8(vand_u8(b, vdup_n_u8(0x0F)), vshr_n_u8(b, 4))), lo, hi);
  } else if constexpr (F == Fmt::INT2) {
    // 2 bytes hold 8 codes, element 4i + k in bits 2k..2k+1 of byte i: each byte to 4 lanes, lane k shifted right
    // by 2k (a negative left shift).
    uint16_t w; std::memcpy(&w, row + 2 * c, 2);
    const uint8x8_t b = vreinterpret_u8_u16(vdup_n_u16(w));
    const uint8x8_t spread = vtbl1_u8(b, vcreate_u8(0x0101010100000000ull));
    const int8x8_t sh = vcreate_s8(0xFAFCFE00FAFCFE00ull);  // lanes 0, -2, -4, -6, 0, -2, -4, -6
    u16x8_to_f32(vmovl_u8(vand_u8(vshl_u8(spread, sh), vdup_n_u8(3))), lo, hi);
  } else {  // FP8 e4m3fn
    const uint16x8_t x = vmovl_u8(vld1_u8(row + 8 * c));
    lo = fp8x4(vmovl_u16(vget_low_u16(x)));
    hi = fp8x4(vmovl_high_u16(x));
  }
}

// Decode n stored rows of raw codes with a per-channel affine map x = raw * cs[d] + cz[d] (KIVI keys of one token
// group; cs / cz hold D floats) into dst[n][ld] (elements D..ld-1 zero).
template <Fmt F>
void decode_rows_channel(const uint8_t* base, int64_t stride, int n, int D, int ld, float* dst, const float* cs,
                         const float* cz) {
  for (int j = 0; j < n; ++j) {
    const uint8_t* row = base + j * stride;
    float* out = dst + int64_t(j) * ld;
    int d0 = 0;
    for (; d0 + 8 <= D; d0 += 8) {
      float32x4_t lo, hi;
      raw8<F>(row, d0 / 8, lo, hi);
      vst1q_f32(out + d0, vfmaq_f32(vld1q_f32(cz + d0), lo, vld1q_f32(cs + d0)));
      vst1q_f32(out + d0 + 4, vfmaq_f32(vld1q_f32(cz + d0 + 4), hi, vld1q_f32(cs + d0 + 4)));
    }
    const int dt = d0;
    decode_row_scalar<F>(row, d0, D, ld, out, 0, nullptr, nullptr);
    for (int d = dt; d < D; ++d) out[d] = out[d] * cs[d] + cz[d];
  }
}

// Decode n stored rows (row stride `stride` bytes) into dst[n][ld] floats (elements D..ld-1 zero). With `gs > 0`
// the token-axis affine map x = raw * s_g + z_g (group g = d / gs) is applied, s/z float16 [n][D/gs] with row
// stride `sz_stride` elements (z may be null: fp8). Groups of a multiple of 8 elements run 8 at a time.
template <Fmt F>
void decode_rows(const uint8_t* base, int64_t stride, int n, int D, int ld, float* dst, int gs,
                 const uint16_t* s16, const uint16_t* z16, int64_t sz_stride) {
  const int nc = D / 8;
  for (int j = 0; j < n; ++j) {
    const uint8_t* row = base + j * stride;
    float* out = dst + int64_t(j) * ld;
    int d0 = 0;
    float32x4_t lo, hi;
    if (gs > 0 && gs % 8 == 0) {
      const uint16_t* sr = s16 + j * sz_stride;
      const uint16_t* zr = z16 ? z16 + j * sz_stride : nullptr;
      const int cpg = gs / 8;
      for (int g = 0; g * cpg < nc; ++g) {
        const float32x4_t s = vdupq_n_f32(half_to_float(sr[g]));
        const float32x4_t z = vdupq_n_f32(zr ? half_to_float(zr[g]) : 0.f);
        for (int c = g * cpg; c < std::min(nc, (g + 1) * cpg); ++c) {
          raw8<F>(row, c, lo, hi);
          vst1q_f32(out + 8 * c, vfmaq_f32(z, lo, s));
          vst1q_f32(out + 8 * c + 4, vfmaq_f32(z, hi, s));
        }
      }
      d0 = nc * 8;
    } else if (gs == 0) {
      for (int c = 0; c < nc; ++c) {
        raw8<F>(row, c, lo, hi);
        vst1q_f32(out + 8 * c, lo);
        vst1q_f32(out + 8 * c + 4, hi);
      }
      d0 = nc * 8;
    }
    decode_row_scalar<F>(row, d0, D, ld, out, gs, gs > 0 ? s16 + j * sz_stride : nullptr,
                         gs > 0 && z16 ? z16 + j * sz_stride : nullptr);
  }
}

// 4 floats per vector: a padded row (Dp % kLanes == 0) is a whole number of vectors, so no lane is ever masked.
struct Lanes4 {
  using T = float32x4_t;
  static constexpr int W = 4;
  static T zero() { return vdupq_n_f32(0.f); }
  static T set1(float x) { return vdupq_n_f32(x); }
  static T fmadd(T a, T b, T c) { return vfmaq_f32(c, a, b); }
  static T load(const float* p) { return vld1q_f32(p); }
  static void store(float* p, T x) { vst1q_f32(p, x); }
  static T part_load(const float* p, int d, int) { return vld1q_f32(p + d); }
  static void part_store(float* p, int d, int, T x) { vst1q_f32(p + d, x); }
  static void sums4(float* s, T a0, T a1, T a2, T a3, float add) {
    vst1q_f32(s, vaddq_f32(simd_neon::hsum4(a0, a1, a2, a3), vdupq_n_f32(add)));
  }
  static float reduce(T x) { return vaddvq_f32(x); }
};

inline void qk_dots(const float* Q, int ldq, int R, const float* K, int64_t ldk, int n, int Dp, float* S, int lds,
                    const float* add) {
  qk_dots_lanes<Lanes4>(Q, ldq, R, K, ldk, n, Dp, S, lds, add);
}

inline void pv_accum(const float* P, int ldp, int R, int n, const float* V, int64_t ldv, int Dp, float* O, int ldo) {
  pv_accum_lanes<Lanes4>(P, ldp, R, n, V, ldv, Dp, O, ldo);
}

inline void halves_to_floats(const uint16_t* h, int n, float* out) {
  int i = 0;
  for (; i + 4 <= n; i += 4) vst1q_f32(out + i, simd_neon::halves4(h + i));
  for (; i < n; ++i) out[i] = half_to_float(h[i]);
}

// x[i] = exp(x[i]) in place.
inline void exp_inplace(float* x, int n) {
  int i = 0;
  for (; i + 4 <= n; i += 4) vst1q_f32(x + i, simd_neon::exp4(vld1q_f32(x + i)));
  for (; i < n; ++i) x[i] = std::exp(x[i]);
}

// Per-channel key scales folded into one query row: qs[d] = q[d] * cs[d] for d < D; returns <q, cz> (the row's
// zero-point offset).
inline float fold_channel_scale(const float* q, const float* cs, const float* cz, int D, float* qs) {
  int d0 = 0;
  float32x4_t za = vdupq_n_f32(0.f);
  for (; d0 + 4 <= D; d0 += 4) {
    const float32x4_t qv = vld1q_f32(q + d0);
    vst1q_f32(qs + d0, vmulq_f32(qv, vld1q_f32(cs + d0)));
    za = vfmaq_f32(za, qv, vld1q_f32(cz + d0));
  }
  float zacc = vaddvq_f32(za);
  for (int d = d0; d < D; ++d) { qs[d] = q[d] * cs[d]; zacc += q[d] * cz[d]; }
  return zacc;
}

// 4 rows per vector: row_tiles.h's register-tiled path on NEON. NEON has no broadcast memory operand, so each
// broadcast element takes a register too (GCC loads it as a scalar for a by-element FMLA and hoists the block's
// loads). Blocks of 8 keys (dims) x 2 row vectors: 16 accumulators + 8 elements + 2 row vectors fit the 32 registers;
// the odd last row vector takes 4 x 1 blocks: GCC 12 keeps 8 x 1 and 16 x 1 accumulator arrays on the stack in the
// inner loop (stores every iteration; objdump of attention_neon.cpp.o), 4 x 1 and 8 x 2 in registers.
struct VecN {
  using T = float32x4_t;
  static constexpr int W = 4;
  static constexpr int QK_J1 = 4, QK_J2 = 8;   // keys per QK register block with 1 / 2 row vectors
  static constexpr int PV_D1 = 4, PV_D2 = 8;   // dims per PV register block with 1 / 2 row vectors
  static T zero() { return vdupq_n_f32(0.f); }
  static T load(const float* p) { return vld1q_f32(p); }
  static void store(float* p, T x) { vst1q_f32(p, x); }
  static T set1(float x) { return vdupq_n_f32(x); }
  static T bcast(const float* p) { return vld1q_dup_f32(p); }
  static T fmadd(T a, T b, T c) { return vfmaq_f32(c, a, b); }
  static T add(T a, T b) { return vaddq_f32(a, b); }
  static T sub(T a, T b) { return vsubq_f32(a, b); }
  static T mul(T a, T b) { return vmulq_f32(a, b); }
  static T div(T a, T b) { return vdivq_f32(a, b); }
  // a NaN s gives m, as x86's max (maxnm returns the number): the running max never turns NaN
  static T max(T s, T m) { return vmaxnmq_f32(s, m); }
  static T exp(T x) { return simd_neon::exp4(x); }
  // lanes of y where x == -inf set to 0
  static T zero_where_neg_inf(T x, T y) {
    return vreinterpretq_f32_u32(vbicq_u32(vreinterpretq_u32_f32(y), vceqq_f32(x, vdupq_n_f32(NEG_INF))));
  }
  // bit i: lane i is NaN or +inf (not s < +inf)
  static unsigned nonfinite(T s) { return simd_neon::movemask(vmvnq_u32(vcltq_f32(s, vdupq_n_f32(POS_INF)))); }
  static unsigned neq(T a, T b) { return simd_neon::movemask(vmvnq_u32(vceqq_f32(a, b))); }
};
using RowVec = VecN;

}  // namespace MK_IMPL_NS
}  // namespace cpu
}  // namespace malloc_kernels
