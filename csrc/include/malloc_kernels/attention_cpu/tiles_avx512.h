// Tile primitives of the fused CPU attention with 512-bit lanes, AVX-512 build (csrc/cpu/attention_avx512.cpp, under
// `#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,...")`). The AVX-512 build is the AVX2 source compiled for
// AVX-512 (EVEX encodings, 32 vector registers) with tiles_avx2.h's float-tile Q K^T and P V run on the 16-lane
// trait below. Same math as the AVX2 build; only the summation order differs.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "malloc_kernels/attention_cpu/tiles_avx2.h"

namespace malloc_kernels {
namespace cpu {
namespace MK_IMPL_NS {

// 16 floats per vector: the last vector of a padded row holds 8 real lanes when Dp is an odd multiple of 8, so the
// row-relative loads and stores are masked (masked lanes are neither read nor written).
struct Lanes16 {
  using T = __m512;
  static constexpr int W = 16;
  static __mmask16 lanes(int d, int Dp) { return Dp - d >= 16 ? __mmask16(0xFFFF) : __mmask16(0x00FF); }
  static T zero() { return _mm512_setzero_ps(); }
  static T set1(float x) { return _mm512_set1_ps(x); }
  static T fmadd(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, T x) { _mm512_storeu_ps(p, x); }
  static T part_load(const float* p, int d, int Dp) { return _mm512_maskz_loadu_ps(lanes(d, Dp), p + d); }
  static void part_store(float* p, int d, int Dp, T x) { _mm512_mask_storeu_ps(p + d, lanes(d, Dp), x); }
  static __m256 fold8(T x) { return _mm256_add_ps(_mm512_castps512_ps256(x), _mm512_extractf32x8_ps(x, 1)); }
  static void sums4(float* s, T a0, T a1, T a2, T a3, float add) {
    _mm_storeu_ps(s, _mm_add_ps(hsum4(fold8(a0), fold8(a1), fold8(a2), fold8(a3)), _mm_set1_ps(add)));
  }
  static float reduce(T x) { return _mm512_reduce_add_ps(x); }
};

inline void qk_dots(const float* Q, int ldq, int R, const float* K, int64_t ldk, int n, int Dp, float* S, int lds,
                    const float* add) {
  qk_dots_lanes<Lanes16>(Q, ldq, R, K, ldk, n, Dp, S, lds, add);
}

inline void pv_accum(const float* P, int ldp, int R, int n, const float* V, int64_t ldv, int Dp, float* O, int ldo) {
  pv_accum_lanes<Lanes16>(P, ldp, R, n, V, ldv, Dp, O, ldo);
}

}  // namespace MK_IMPL_NS
}  // namespace cpu
}  // namespace malloc_kernels
