// Tile primitives of the fused CPU attention with 512-bit lanes, AVX-512 build (csrc/cpu/attention_avx512.cpp, under
// `#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,...")`). The AVX-512 build is the AVX2 source compiled for
// AVX-512 (EVEX encodings, 32 vector registers) with the float-tile Q K^T and P V below in place of tiles_avx2.h's:
// 16 floats per vector, the last vector of a row masked when the padded head dim is an odd multiple of 8 (masked
// lanes are neither read nor written). Same math as tiles_avx2.h; only the summation order differs.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "malloc_kernels/attention_cpu/tiles_avx2.h"

namespace malloc_kernels {
namespace cpu {
namespace MK_IMPL_NS {

// Lanes d .. d+15 of a padded row of Dp floats (Dp % 8 == 0): all 16, or the 8 left at the end.
inline __mmask16 lane_mask16(int d, int Dp) { return Dp - d >= 16 ? __mmask16(0xFFFF) : __mmask16(0x00FF); }

// The 16 lanes folded to 8 (the two halves added).
inline __m256 fold512(__m512 a) {
  return _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
}

// S[r][j] = <Q[r], K[j]> (+ add[r] if add), r < R, j < n, over Dp (a multiple of 8) elements.
inline void qk_dots(const float* Q, int ldq, int R, const float* K, int64_t ldk, int n, int Dp, float* S, int lds,
                    const float* add) {
  int r0 = 0;
  // Rows in pairs over blocks of 4 keys: every K vector load feeds two FMAs.
  for (; r0 + 2 <= R && n >= 4; r0 += 2) {
    const float* qa = Q + int64_t(r0) * ldq;
    const float* qb = qa + ldq;
    float* sa = S + int64_t(r0) * lds;
    float* sb = sa + lds;
    const float aa = add ? add[r0] : 0.f, ab = add ? add[r0 + 1] : 0.f;
    int j = 0;
    for (; j + 4 <= n; j += 4) {
      const float* k0 = K + j * ldk;
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
      for (int d = 0; d < Dp; d += 16) {
        const __mmask16 m = lane_mask16(d, Dp);
        const __m512 x = _mm512_maskz_loadu_ps(m, qa + d), y = _mm512_maskz_loadu_ps(m, qb + d);
        const __m512 k0v = _mm512_maskz_loadu_ps(m, k0 + d), k1v = _mm512_maskz_loadu_ps(m, k0 + ldk + d);
        const __m512 k2v = _mm512_maskz_loadu_ps(m, k0 + 2 * ldk + d);
        const __m512 k3v = _mm512_maskz_loadu_ps(m, k0 + 3 * ldk + d);
        a0 = _mm512_fmadd_ps(x, k0v, a0); b0 = _mm512_fmadd_ps(y, k0v, b0);
        a1 = _mm512_fmadd_ps(x, k1v, a1); b1 = _mm512_fmadd_ps(y, k1v, b1);
        a2 = _mm512_fmadd_ps(x, k2v, a2); b2 = _mm512_fmadd_ps(y, k2v, b2);
        a3 = _mm512_fmadd_ps(x, k3v, a3); b3 = _mm512_fmadd_ps(y, k3v, b3);
      }
      _mm_storeu_ps(sa + j, _mm_add_ps(hsum4(fold512(a0), fold512(a1), fold512(a2), fold512(a3)), _mm_set1_ps(aa)));
      _mm_storeu_ps(sb + j, _mm_add_ps(hsum4(fold512(b0), fold512(b1), fold512(b2), fold512(b3)), _mm_set1_ps(ab)));
    }
    for (; j < n; ++j) {
      __m512 a0 = _mm512_setzero_ps(), b0 = a0;
      for (int d = 0; d < Dp; d += 16) {
        const __mmask16 m = lane_mask16(d, Dp);
        const __m512 kv = _mm512_maskz_loadu_ps(m, K + j * ldk + d);
        a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, qa + d), kv, a0);
        b0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, qb + d), kv, b0);
      }
      sa[j] = _mm512_reduce_add_ps(a0) + aa;
      sb[j] = _mm512_reduce_add_ps(b0) + ab;
    }
  }
  for (int r = r0; r < R; ++r) {
    const float* q = Q + int64_t(r) * ldq;
    float* s = S + int64_t(r) * lds;
    const float a = add ? add[r] : 0.f;
    int j = 0;
    for (; j + 4 <= n; j += 4) {
      const float* k0 = K + j * ldk;
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int d = 0; d < Dp; d += 16) {
        const __mmask16 m = lane_mask16(d, Dp);
        const __m512 qv = _mm512_maskz_loadu_ps(m, q + d);
        a0 = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, k0 + d), a0);
        a1 = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, k0 + ldk + d), a1);
        a2 = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, k0 + 2 * ldk + d), a2);
        a3 = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, k0 + 3 * ldk + d), a3);
      }
      _mm_storeu_ps(s + j, _mm_add_ps(hsum4(fold512(a0), fold512(a1), fold512(a2), fold512(a3)), _mm_set1_ps(a)));
    }
    for (; j < n; ++j) {
      __m512 a0 = _mm512_setzero_ps();
      for (int d = 0; d < Dp; d += 16) {
        const __mmask16 m = lane_mask16(d, Dp);
        a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + d), _mm512_maskz_loadu_ps(m, K + j * ldk + d), a0);
      }
      s[j] = _mm512_reduce_add_ps(a0) + a;
    }
  }
}

// O[r][:] += sum_j P[r][j] * V[j][:]
inline void pv_accum(const float* P, int ldp, int R, int n, const float* V, int64_t ldv, int Dp, float* O, int ldo) {
  for (int r = 0; r < R; ++r) {
    const float* p = P + int64_t(r) * ldp;
    float* o = O + int64_t(r) * ldo;
    int d = 0;
    for (; d + 64 <= Dp; d += 64) {
      __m512 acc[4];
      for (int c = 0; c < 4; ++c) acc[c] = _mm512_loadu_ps(o + d + 16 * c);
      for (int j = 0; j < n; ++j) {
        const __m512 pj = _mm512_set1_ps(p[j]);
        const float* v = V + j * ldv + d;
        for (int c = 0; c < 4; ++c) acc[c] = _mm512_fmadd_ps(pj, _mm512_loadu_ps(v + 16 * c), acc[c]);
      }
      for (int c = 0; c < 4; ++c) _mm512_storeu_ps(o + d + 16 * c, acc[c]);
    }
    for (; d < Dp; d += 16) {
      const __mmask16 m = lane_mask16(d, Dp);
      __m512 acc = _mm512_maskz_loadu_ps(m, o + d);
      for (int j = 0; j < n; ++j)
        acc = _mm512_fmadd_ps(_mm512_set1_ps(p[j]), _mm512_maskz_loadu_ps(m, V + j * ldv + d), acc);
      _mm512_mask_storeu_ps(o + d, m, acc);
    }
  }
}

}  // namespace MK_IMPL_NS
}  // namespace cpu
}  // namespace malloc_kernels
