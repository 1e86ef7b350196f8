// AVX2/FMA math shared by the CPU kernels. Every function carries `target("avx2,fma")`, so the header can be
// included from translation units built for baseline x86-64 (runtime dispatch: call these only when
// cpu_has_avx2() holds) and from ones compiled under `#pragma GCC target("avx2,fma")` alike.
#pragma once

#include <immintrin.h>
#include <limits>

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

// exp(x): Cephes-style range reduction + degree-6 polynomial, ~1 ulp. Inputs below -87.3 (including -inf) give
// exactly 0 so masked scores never leak; inputs above 88.3 give +inf, as the true value overflows float32 (or is
// within 2x of doing so): a clamped finite value there would turn SiLU's s / (1 + e^{-s}) at s ~ -1e36 into a
// weight of ~-0.01 instead of -0.
MK_AVX2 inline __m256 exp256(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3f);
  const __m256 hi = _mm256_set1_ps(88.3f);
  const __m256 zero_mask = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  const __m256 inf_mask = _mm256_cmp_ps(x, hi, _CMP_GT_OQ);
  x = _mm256_max_ps(_mm256_min_ps(x, hi), lo);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500E-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
  const __m256 r2 = _mm256_mul_ps(r, r);
  p = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.f)));
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
