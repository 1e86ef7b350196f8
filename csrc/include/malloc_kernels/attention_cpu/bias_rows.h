// Relative attention bias (HSTU) of a block of keys, added to the chunk's score rows: shared by the kernel's general
// path (kernel.h) and the from-codes cache path (from_codes_avx2.h), so both add exactly the same numbers.
#pragma once

#include <cstdint>

#include "malloc_kernels/attention_cpu.h"
#include "malloc_kernels/attention_cpu/scratch.h"
#include "malloc_kernels/bias.h"

namespace malloc_kernels {
namespace cpu {
namespace MK_IMPL_NS {

// S[r * lds + j * ldc] += pos_bias[h_r, bucket(pos_r - kp[j])] + time_bias[h_r, bucket(ts_r - kt[j])] for r < R,
// j < n, from the ORIGINAL positions / timestamps of the keys (kp, kt) and of the rows (sc.qpos, sc.qts, heads
// sc.qh). ldc = 1: rows of scores (kernel.h, from_codes_avx2.h); lds = 1, ldc = Rp: the transposed blocks of
// row_tiles.h.
inline void add_bias_rows(const AttnParams& p, const bias::TimeBucketer& tb, const Scratch& sc, int R,
                          const int64_t* kp, const int64_t* kt, int n, float* S, int lds, int ldc = 1) {
  for (int r = 0; r < R; ++r) {
    const int64_t hq = sc.qh[r];
    float* s = S + int64_t(r) * lds;
    if (p.pos_bias) {
      const float* pb = p.pos_bias + hq * p.pos_bias_sH;
      for (int j = 0; j < n; ++j) s[j * ldc] += pb[bias::pos_index(sc.qpos[r], kp[j], p.P)];
    }
    if (p.time_bias) {
      const float* tbias = p.time_bias + hq * p.time_bias_sH;
      for (int j = 0; j < n; ++j) s[j * ldc] += tbias[tb(sc.qts[r], kt[j])];
    }
  }
}

}  // namespace MK_IMPL_NS
}  // namespace cpu
}  // namespace malloc_kernels
