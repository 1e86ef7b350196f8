// Host/device numerics of the CUDA split-K decode kernel (csrc/cuda/decode_attention.cu) that do not depend on
// CUDA, so the standalone C++ test (csrc/test/test_quant_numerics.cpp, run by ctest) checks them on the CPU:
//   time_bucket(dt, th, T)      HSTU's bucket(dt) = min(floor(ln(max(|dt|, 1)) / 0.301), T - 1), exactly: a float
//                               log gives a first guess that is corrected against the int64 thresholds th[k]
//                               (smallest x >= 1 with floor(ln(x)/0.301) >= k; th[0] unused), so
//                               bucket = #{k in 1..T-1 : th[k] <= max(|dt|, 1)} whatever the log's rounding;
//   pos_index(pi, pj, P)        clamp(p_i - p_j, 0, P - 1), the difference taken without int64 overflow;
//   time_bucket(ti, tj, th, T)  the bucket of |t_i - t_j| computed without overflow (saturating at INT64_MAX);
//   silu(x)                     x * sigmoid(x), finite for every finite x;
//   SoftmaxState / merge        the flash-decoding LSE merge of partial (max m, sum l) pairs (Dao et al. 2023,
//                               "Flash-Decoding for long-context inference"): empty partials (m = -inf) are neutral.
#pragma once

#include <math.h>
#include <stdint.h>

#include "malloc_kernels/common.h"

namespace malloc_kernels {
namespace decode {

// |a - b| of two int64 without overflow, saturated at INT64_MAX (the exact magnitude can reach 2^64 - 1; every
// bucket threshold is <= INT64_MAX, so saturation never changes a bucket). Unsigned arithmetic wraps by definition.
MK_HOST_DEVICE int64_t abs_diff_sat(int64_t a, int64_t b) {
  const uint64_t m = a >= b ? uint64_t(a) - uint64_t(b) : uint64_t(b) - uint64_t(a);
  return m > uint64_t(INT64_MAX) ? INT64_MAX : int64_t(m);
}

// clamp(p_i - p_j, 0, P - 1) with the difference taken exactly (no int64 overflow for any positions).
MK_HOST_DEVICE int64_t pos_index(int64_t pi, int64_t pj, int64_t P) {
  if (pi <= pj) return 0;
  const uint64_t d = uint64_t(pi) - uint64_t(pj);
  return d >= uint64_t(P) ? P - 1 : int64_t(d);
}

// bucket of a magnitude x = |t_i - t_j| >= 0 (see abs_diff_sat).
MK_HOST_DEVICE int64_t time_bucket_mag(int64_t x, const int64_t* th, int64_t T) {
  if (x < 1) x = 1;
  int64_t k = static_cast<int64_t>(floorf(logf(static_cast<float>(x)) / 0.301f));
  k = k < 0 ? 0 : (k > T - 1 ? T - 1 : k);
  // Exact correction: the bucket is the largest k with th[k] <= x (th non-decreasing), or 0.
  while (k + 1 <= T - 1 && th[k + 1] <= x) ++k;
  while (k >= 1 && th[k] > x) --k;
  return k;
}

// bucket(t_i - t_j): the time difference is never formed in int64 (it could overflow), only its magnitude.
MK_HOST_DEVICE int64_t time_bucket(int64_t ti, int64_t tj, const int64_t* th, int64_t T) {
  return time_bucket_mag(abs_diff_sat(ti, tj), th, T);
}

// bucket of an already formed difference dt (|INT64_MIN| saturates at INT64_MAX).
MK_HOST_DEVICE int64_t time_bucket(int64_t dt, const int64_t* th, int64_t T) {
  return time_bucket_mag(abs_diff_sat(dt, 0), th, T);
}

MK_HOST_DEVICE float silu(float x) { return x / (1.0f + expf(-x)); }

// Running (max, sum) of one softmax row: sum = sum_j c_j exp(s_j - max).
struct SoftmaxState {
  float m;
  float l;
};

// Rescale factor exp(m_old - m_new) for an accumulator when the running max moves; 1 while both are -inf.
MK_HOST_DEVICE float rescale(float m_old, float m_new) {
  return (m_new == -INFINITY) ? 1.0f : expf(m_old - m_new);
}

// Merge two partial states (and tells the caller each side's weight for its output accumulator).
MK_HOST_DEVICE SoftmaxState merge(SoftmaxState a, SoftmaxState b, float* wa, float* wb) {
  const float m = a.m > b.m ? a.m : b.m;
  if (m == -INFINITY) {
    *wa = 0.0f;
    *wb = 0.0f;
    return SoftmaxState{-INFINITY, 0.0f};
  }
  *wa = expf(a.m - m);
  *wb = expf(b.m - m);
  return SoftmaxState{m, a.l * *wa + b.l * *wb};
}

// log-sum-exp of a merged state: m + log(l), -inf for an empty row.
MK_HOST_DEVICE float lse(SoftmaxState s) { return s.l > 0.0f ? s.m + logf(s.l) : -INFINITY; }

}  // namespace decode
}  // namespace malloc_kernels
