// CPU implementation of cross_entropy_rows (malloc_kernels/cross_entropy.h).
#include "malloc_kernels/cross_entropy.h"
#if MALLOC_KERNELS_X86
#include "malloc_kernels/simd_avx2.h"
#endif

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

namespace malloc_kernels {
namespace loss {
namespace {

// One row, any T: max, then exp(z - max) in place with its sum, then scale to the softmax and subtract the target.
template <typename T>
T row_portable(T* z, int64_t t, int64_t C) {
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < C; ++j) m = std::max(m, z[j]);
  const T zt = z[t];
  T sum = T(0);
  for (int64_t j = 0; j < C; ++j) {
    z[j] = std::exp(z[j] - m);
    sum += z[j];
  }
  const T inv = T(1) / sum;
  for (int64_t j = 0; j < C; ++j) z[j] *= inv;
  z[t] -= T(1);
  return m + std::log(sum) - zt;
}

#if MALLOC_KERNELS_X86
// The float row with 8-wide AVX2: the same three passes; the row (C floats) stays in L1 across them.
__attribute__((target("avx2,fma"))) float row_avx2(float* z, int64_t t, int64_t C) {
  using namespace simd_avx2;
  const int64_t C8 = C & ~int64_t(7);
  __m256 mv = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < C8; j += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(z + j));
  float m = hmax(mv);
  for (int64_t j = C8; j < C; ++j) m = std::max(m, z[j]);
  const float zt = z[t];
  float sum = hsum(exp_shift_inplace(z, C8, m));
  for (int64_t j = C8; j < C; ++j) {
    z[j] = std::exp(z[j] - m);
    sum += z[j];
  }
  const float inv = 1.0f / sum;
  const __m256 iv = _mm256_set1_ps(inv);
  for (int64_t j = 0; j < C8; j += 8) _mm256_storeu_ps(z + j, _mm256_mul_ps(_mm256_loadu_ps(z + j), iv));
  for (int64_t j = C8; j < C; ++j) z[j] *= inv;
  z[t] -= 1.0f;
  return m + std::log(sum) - zt;
}
#endif

template <typename T>
T row(bool avx2, T* z, int64_t t, int64_t C) {
  if constexpr (std::is_same_v<T, float>) {
#if MALLOC_KERNELS_X86
    if (avx2) return row_avx2(z, t, C);
#endif
  }
  return row_portable(z, t, C);
}

}  // namespace

template <typename T>
void cross_entropy_rows(T* logits, const int64_t* targets, int64_t R, int64_t C, int64_t ld, T* loss,
                        isa::Isa variant) {
  const bool avx2 = isa::isa_for_family(variant, isa::Family::CrossEntropy) == isa::Isa::Avx2;
#pragma omp parallel for schedule(static) if (R * C > 32768)
  for (int64_t i = 0; i < R; ++i) loss[i] = row(avx2, logits + i * ld, targets[i], C);
}

template void cross_entropy_rows<float>(float*, const int64_t*, int64_t, int64_t, int64_t, float*, isa::Isa);
template void cross_entropy_rows<double>(double*, const int64_t*, int64_t, int64_t, int64_t, double*, isa::Isa);

}  // namespace loss
}  // namespace malloc_kernels
