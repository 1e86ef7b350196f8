// Tile primitives of the fused CPU attention, portable build (whatever the compiler flags give; SSE2 on plain
// x86-64). The SIMD builds have the same functions in tiles_avx2.h / tiles_avx512.h / tiles_neon.h; the kernel
// (kernel.h) calls only these names.
#pragma once

#include <cmath>
#include <cstdint>

#include "malloc_kernels/attention_cpu/no_codes.h"
#include "malloc_kernels/attention_cpu/scalar.h"
#include "malloc_kernels/bias.h"

namespace malloc_kernels {
namespace cpu {
namespace MK_IMPL_NS {

// Padding of the head dim in float tiles (the vector width): 1, no padding.
constexpr int kLanes = 1;

// Decode n stored rows (row stride `stride` bytes) into dst[n][ld] floats (elements D..ld-1 zero). With `gs > 0`
// the token-axis affine map x = raw * s_g + z_g (group g = d / gs) is applied, s/z float16 [n][D/gs] with row
// stride `sz_stride` elements (z may be null: fp8).
template <Fmt F>
void decode_rows(const uint8_t* base, int64_t stride, int n, int D, int ld, float* dst, int gs,
                 const uint16_t* s16, const uint16_t* z16, int64_t sz_stride) {
  for (int j = 0; j < n; ++j)
    decode_row_scalar<F>(base + j * stride, 0, D, ld, dst + int64_t(j) * ld, gs, gs > 0 ? s16 + j * sz_stride : nullptr,
                         gs > 0 && z16 ? z16 + j * sz_stride : nullptr);
}

// S[r][j] = <Q[r], K[j]> (+ add[r] if add), r < R, j < n, over Dp elements.
inline void qk_dots(const float* Q, int ldq, int R, const float* K, int64_t ldk, int n, int Dp, float* S, int lds,
                    const float* add) {
  for (int r = 0; r < R; ++r) {
    const float* q = Q + int64_t(r) * ldq;
    float* s = S + int64_t(r) * lds;
    const float a = add ? add[r] : 0.f;
    for (int j = 0; j < n; ++j) {
      const float* k = K + j * ldk;
      float acc = 0.f;
      for (int d = 0; d < Dp; ++d) acc += q[d] * k[d];
      s[j] = acc + a;
    }
  }
}

// O[r][:] += sum_j P[r][j] * V[j][:]
inline void pv_accum(const float* P, int ldp, int R, int n, const float* V, int64_t ldv, int Dp, float* O, int ldo) {
  for (int r = 0; r < R; ++r) {
    const float* p = P + int64_t(r) * ldp;
    float* o = O + int64_t(r) * ldo;
    for (int j = 0; j < n; ++j) {
      const float pj = p[j];
      const float* v = V + j * ldv;
      for (int d = 0; d < Dp; ++d) o[d] += pj * v[d];
    }
  }
}

inline void halves_to_floats(const uint16_t* h, int n, float* out) {
  for (int i = 0; i < n; ++i) out[i] = half_to_float(h[i]);
}

// x[i] = exp(x[i]) in place.
inline void exp_inplace(float* x, int n) {
  for (int i = 0; i < n; ++i) x[i] = std::exp(x[i]);
}

// Per-channel key scales folded into one query row: qs[d] = q[d] * cs[d] for d < D; returns <q, cz> (the row's
// zero-point offset).
inline float fold_channel_scale(const float* q, const float* cs, const float* cz, int D, float* qs) {
  float zacc = 0.f;
  for (int d = 0; d < D; ++d) { qs[d] = q[d] * cs[d]; zacc += q[d] * cz[d]; }
  return zacc;
}

}  // namespace MK_IMPL_NS
}  // namespace cpu
}  // namespace malloc_kernels
