// Decode-sized rows (R <= 2) straight from the packed codes, any head dim that is a multiple of 8, AVX2 build:
// every code chunk is expanded in registers and consumed by the FMA at once, no float tile. The kernel reaches them
// through qk_from_codes / pv_codes_ok / pv_from_codes (tiles_portable.h has the same names, always "not done").
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "malloc_kernels/attention_cpu/tiles_avx2.h"

namespace malloc_kernels {
namespace cpu {
namespace MK_IMPL_NS {

// Decode-sized rows (R <= 2): scores straight from packed codes, S[r][j] = <Q[r], code_j> + add[r]. Each code chunk
// is expanded in registers and consumed by the FMA at once, so no float tile is written or re-read (D % 8 == 0).
template <Fmt F>
inline void qk_codes(const float* Q, int ldq, int R, const uint8_t* K, int64_t rb, int n, int D, float* S, int lds,
                     const float* add) {
  const int nc = D / 8;
  for (int r = 0; r < R; ++r) {
    const float* q = Q + int64_t(r) * ldq;
    float* s = S + int64_t(r) * lds;
    const float a = add ? add[r] : 0.f;
    int j = 0;
    for (; j + 4 <= n; j += 4) {
      const uint8_t* k0 = K + j * rb;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int c = 0; c < nc; ++c) {
        const __m256 qv = _mm256_loadu_ps(q + 8 * c);
        a0 = _mm256_fmadd_ps(qv, raw8<F>(k0, c), a0);
        a1 = _mm256_fmadd_ps(qv, raw8<F>(k0 + rb, c), a1);
        a2 = _mm256_fmadd_ps(qv, raw8<F>(k0 + 2 * rb, c), a2);
        a3 = _mm256_fmadd_ps(qv, raw8<F>(k0 + 3 * rb, c), a3);
      }
      _mm_storeu_ps(s + j, _mm_add_ps(hsum4(a0, a1, a2, a3), _mm_set1_ps(a)));
    }
    for (; j < n; ++j) {
      __m256 a0 = _mm256_setzero_ps();
      for (int c = 0; c < nc; ++c) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * c), raw8<F>(K + j * rb, c), a0);
      s[j] = hsum(a0) + a;
    }
  }
}

// Decode-sized rows: O[r] += sum_j P[r][j] * (code_j * s_jg + z_jg) with token-axis groups of gs channels, the
// value scale folded into the weight (p_j * s_jg) and the zero point summed once per group (sum_j p_j z_jg), so the
// value tile is never materialised. sf/zf: the block's scales/zeros as floats [n][D/gs] (zf null: no zero point);
// D == 8 * NC so the NC accumulators stay in registers. pw: scratch of n * D/gs floats.
template <Fmt F, int NC>
inline void pv_codes(const float* P, int ldp, int R, int n, const uint8_t* V, int64_t rb, int gs, const float* sf,
                     const float* zf, float* O, int ldo, float* pw) {
  const int ngr = 8 * NC / gs;
  int gmap[NC];
  for (int c = 0; c < NC; ++c) gmap[c] = 8 * c / gs;
  for (int r = 0; r < R; ++r) {
    const float* p = P + int64_t(r) * ldp;
    float* o = O + int64_t(r) * ldo;
    float zs[NC];
    for (int g = 0; g < ngr; ++g) zs[g] = 0.f;
    for (int j = 0; j < n; ++j)
      for (int g = 0; g < ngr; ++g) {
        pw[j * ngr + g] = p[j] * sf[j * ngr + g];
        if (zf) zs[g] += p[j] * zf[j * ngr + g];
      }
    __m256 acc[NC];
    for (int c = 0; c < NC; ++c) acc[c] = _mm256_add_ps(_mm256_loadu_ps(o + 8 * c), _mm256_set1_ps(zs[gmap[c]]));
    for (int j = 0; j < n; ++j) {
      const uint8_t* row = V + j * rb;
      const float* w = pw + j * ngr;
      for (int c = 0; c < NC; ++c) acc[c] = _mm256_fmadd_ps(_mm256_broadcast_ss(w + gmap[c]), raw8<F>(row, c), acc[c]);
    }
    for (int c = 0; c < NC; ++c) _mm256_storeu_ps(o + 8 * c, acc[c]);
  }
}

// S = Q K^T from the codes of a per-channel-scaled key block (the scales already folded into Q): true when done.
inline bool qk_from_codes(Fmt f, const float* Q, int ldq, int R, const uint8_t* K, int64_t rb, int n, int D, float* S,
                          int lds, const float* add) {
  if (D % 8 != 0) return false;
  switch (f) {
    case Fmt::INT4: qk_codes<Fmt::INT4>(Q, ldq, R, K, rb, n, D, S, lds, add); break;
    case Fmt::INT2: qk_codes<Fmt::INT2>(Q, ldq, R, K, rb, n, D, S, lds, add); break;
    case Fmt::INT8: qk_codes<Fmt::INT8>(Q, ldq, R, K, rb, n, D, S, lds, add); break;
    default: qk_codes<Fmt::FP8>(Q, ldq, R, K, rb, n, D, S, lds, add); break;
  }
  return true;
}

// Whether pv_from_codes serves a value block of head dim D with token-axis groups of gs channels.
inline bool pv_codes_ok(int D, int gs) { return (D == 64 || D == 32) && gs % 8 == 0; }

// O += P V from the value codes (pv_codes), for the shapes pv_codes_ok accepts.
inline void pv_from_codes(Fmt f, int D, const float* P, int ldp, int R, int n, const uint8_t* V, int64_t rb, int gs,
                          const float* sf, const float* zf, float* O, int ldo, float* pw) {
#define MK_PV(FM)                                                                  \
  if (D == 64) pv_codes<FM, 8>(P, ldp, R, n, V, rb, gs, sf, zf, O, ldo, pw);       \
  else pv_codes<FM, 4>(P, ldp, R, n, V, rb, gs, sf, zf, O, ldo, pw);
  switch (f) {
    case Fmt::INT4: MK_PV(Fmt::INT4) break;
    case Fmt::INT2: MK_PV(Fmt::INT2) break;
    case Fmt::INT8: MK_PV(Fmt::INT8) break;
    default: MK_PV(Fmt::FP8) break;
  }
#undef MK_PV
}

}  // namespace MK_IMPL_NS
}  // namespace cpu
}  // namespace malloc_kernels
