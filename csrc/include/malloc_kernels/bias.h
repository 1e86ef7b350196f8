// HSTU relative attention bias helpers (ARCHITECTURE.md, "Attention semantics"), framework-free and exact.
//
// bucket(dt) = min(floor(ln(max(|dt|, 1)) / 0.301), T - 1) is evaluated WITHOUT a float log: with the int64
// thresholds th[k] (smallest integer x >= 1 with floor(ln(x)/0.301) >= k, computed once in float64 by the caller,
// index 0 unused) the bucket is #{k in 1..T-1 : th[k] <= x}. A per-power-of-two start table makes that a clz plus
// at most a few compares, so it is both exact and cheap enough for the inner loop.
#pragma once

#include <cstdint>

namespace malloc_kernels {
namespace bias {

struct TimeBucketer {
  const int64_t* th = nullptr;  // [T], th[0] unused
  int64_t T = 0;
  int32_t start[65] = {0};      // start[e] = #{k >= 1 : th[k] <= 2^e}

  void init(const int64_t* thresholds, int64_t num_buckets) {
    th = thresholds;
    T = num_buckets;
    for (int e = 0; e < 65; ++e) {
      // 2^64 does not fit; e == 64 is never used (x <= 2^63).
      const uint64_t lo = e < 64 ? (uint64_t(1) << e) : ~uint64_t(0);
      int32_t c = 0;
      for (int64_t k = 1; k < T; ++k) c += (uint64_t(th[k]) <= lo) ? 1 : 0;
      start[e] = c;
    }
  }

  // bucket of |t_i - t_j|: the difference is never formed in int64 (it could overflow: UB in C++, and a wrong
  // bucket); its exact magnitude is taken in unsigned arithmetic (up to 2^64 - 1, every threshold is below).
  inline int64_t operator()(int64_t ti, int64_t tj) const {
    uint64_t x = ti >= tj ? uint64_t(ti) - uint64_t(tj) : uint64_t(tj) - uint64_t(ti);
    if (x < 1) x = 1;
    const int e = 63 - __builtin_clzll(x);       // 2^e <= x < 2^(e+1)
    int64_t b = start[e];                        // thresholds <= 2^e <= x are already counted
    while (b + 1 < T && uint64_t(th[b + 1]) <= x) ++b;
    return b;
  }
};

// Position term index: clamp(p_i - p_j, 0, P - 1), the difference taken exactly (no int64 overflow).
inline int64_t pos_index(int64_t pi, int64_t pj, int64_t P) {
  if (pi <= pj) return 0;
  const uint64_t d = uint64_t(pi) - uint64_t(pj);
  return d >= uint64_t(P) ? P - 1 : int64_t(d);
}

}  // namespace bias
}  // namespace malloc_kernels
