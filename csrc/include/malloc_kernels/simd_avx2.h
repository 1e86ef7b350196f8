// AVX2/FMA math shared by the CPU kernels. Every function carries `target("avx2,fma")`, so the header can be
// included from translation units built for baseline x86-64 (runtime dispatch: call these only when
// cpu_has_avx2() holds) and from ones compiled under `#pragma GCC target("avx2,fma")` alike.
#pragma once

#include <immintrin.h>

#include <initializer_list>
#include <limits>

#include "malloc_kernels/exp_consts.h"

namespace malloc_kernels {
namespace simd_avx2 {

#define MK_AVX2 __attribute__((target("avx2,fma")))

// Whether this CPU can run the functions below (checked once).
inline bool cpu_has_avx2() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return ok;
}

// Whether this CPU also converts fp16 <-> fp32 in vectors (F16C): the attention kernels read fp16 scales and caches.
inline bool cpu_has_avx2_f16c() {
  static const bool ok = cpu_has_avx2() && __builtin_cpu_supports("f16c");
  return ok;
}

// Sum of the 8 lanes.
MK_AVX2 inline float hsum(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Maximum of the 8 lanes.
MK_AVX2 inline float hmax(__m256 a) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp(x) of 8 lanes from the ISA-neutral constants and rules of exp_consts.h (~1 ulp; below -87.3 and -inf exactly
// 0, above 88.3 +inf); the 16-lane exp512 (attention_cpu/row_tiles.h) and the NEON exp4 (simd_neon.h) compute the
// same function.
using ExpConsts = simd::ExpConsts;

MK_AVX2 inline __m256 exp256(__m256 x) {
  using E = ExpConsts;
  const __m256 zero_mask = _mm256_cmp_ps(x, _mm256_set1_ps(E::lo), _CMP_LT_OQ);
  const __m256 inf_mask = _mm256_cmp_ps(x, _mm256_set1_ps(E::hi), _CMP_GT_OQ);
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(E::hi)), _mm256_set1_ps(E::lo));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(E::log2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(E::ln2_lo), _mm256_fnmadd_ps(n, _mm256_set1_ps(E::ln2_hi), x));
  __m256 p = _mm256_set1_ps(E::c5);
  for (const float c : {E::c4, E::c3, E::c2, E::c1, E::c0}) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 y = _mm256_andnot_ps(zero_mask, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
  return _mm256_blendv_ps(y, _mm256_set1_ps(std::numeric_limits<float>::infinity()), inf_mask);
}

// x[j] = exp(x[j] - m) in place for j < n (n a multiple of 8); returns the per-lane partial sums of the results.
// The shared step of a softmax over a row that is already in L1 (attention score blocks, cross-entropy rows).
MK_AVX2 inline __m256 exp_shift_inplace(float* x, long n, float m) {
  const __m256 mv = _mm256_set1_ps(m);
  __m256 sum = _mm256_setzero_ps();
  for (long j = 0; j < n; j += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + j), mv));
    _mm256_storeu_ps(x + j, e);
    sum = _mm256_add_ps(sum, e);
  }
  return sum;
}

#undef MK_AVX2

}  // namespace simd_avx2
}  // namespace malloc_kernels
