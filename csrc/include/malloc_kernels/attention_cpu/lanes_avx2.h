// Vector "lanes" of the code layout (code_layout_avx2.h): one type per width, the same static operations, so the
// code-layout loops are written once and serve every head dim D = 8 * L (L lanes per vector, 8 vectors per row):
//   Lanes128 (L = 4, D = 32), Lanes256 (L = 8, D = 64), Lanes256x2 (L = 16, D = 128 on AVX2: two 256-bit halves),
//   Lanes512 (L = 16, D = 128 on AVX-512).
// Weight vectors (wvec): lane c of a value weight vector is the weight of the group its element belongs to; GI holds
// those group indices (made once per call by make_gi from the absolute group of every lane). WM: 0 = one group
// (broadcast), 1/2 = several (a permute of the key's weights; pw readable L floats past the key's first weight).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "malloc_kernels/simd_avx2.h"

namespace malloc_kernels {
namespace cpu {
namespace MK_IMPL_NS {

struct Lanes128 {
  static constexpr int L = 4;
  using F = __m128;
  using I = __m128i;
  using GI = __m128i;
  static F zero() { return _mm_setzero_ps(); }
  static F load(const float* p) { return _mm_loadu_ps(p); }
  static void store(float* p, F x) { _mm_storeu_ps(p, x); }
  static F fma(F a, F b, F c) { return _mm_fmadd_ps(a, b, c); }
  static F add(F a, F b) { return _mm_add_ps(a, b); }
  static F mul(F a, F b) { return _mm_mul_ps(a, b); }
  static F set1(float x) { return _mm_set1_ps(x); }
  static F cvt(I x) { return _mm_cvtepi32_ps(x); }
  static I andm(I a, const int32_t* m) { return _mm_and_si128(a, _mm_load_si128(reinterpret_cast<const I*>(m))); }
  template <int S>
  static I srli(I a) { return _mm_srli_epi32(a, S); }
  static I words(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const I*>(p)); }
  static I halves(const uint8_t* p) { return _mm_cvtepu16_epi32(_mm_loadl_epi64(reinterpret_cast<const I*>(p))); }
  static __m128 hsum4(F a0, F a1, F a2, F a3) { return _mm_hadd_ps(_mm_hadd_ps(a0, a1), _mm_hadd_ps(a2, a3)); }
  static float hsum(F a) {
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));
    return _mm_cvtss_f32(_mm_add_ss(a, _mm_movehdup_ps(a)));
  }
  static GI make_gi(const int32_t* g) { return _mm_loadu_si128(reinterpret_cast<const I*>(g)); }
  template <int WM>
  static F wvec(const float* pwj, const GI& gi) {
    if constexpr (WM == 0) return _mm_broadcast_ss(pwj);
    else return _mm_permutevar_ps(_mm_loadu_ps(pwj), gi);  // at most 4 groups (gs >= 8)
  }
};

struct Lanes256 {
  static constexpr int L = 8;
  using F = __m256;
  using I = __m256i;
  using GI = __m256i;
  static F zero() { return _mm256_setzero_ps(); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F x) { _mm256_storeu_ps(p, x); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F set1(float x) { return _mm256_set1_ps(x); }
  static F cvt(I x) { return _mm256_cvtepi32_ps(x); }
  static I andm(I a, const int32_t* m) {
    return _mm256_and_si256(a, _mm256_load_si256(reinterpret_cast<const I*>(m)));
  }
  template <int S>
  static I srli(I a) { return _mm256_srli_epi32(a, S); }
  static I words(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const I*>(p)); }
  static I halves(const uint8_t* p) {
    return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static __m128 hsum4(F a0, F a1, F a2, F a3) {
    const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
  }
  static float hsum(F a) { return simd_avx2::hsum(a); }
  static GI make_gi(const int32_t* g) { return _mm256_loadu_si256(reinterpret_cast<const I*>(g)); }
  // WM 1: at most 4 groups, all lanes index the key's first 4 weights (a 128-bit broadcast + in-lane permute);
  // WM 2: up to 8 groups (a cross-lane permute).
  template <int WM>
  static F wvec(const float* pwj, const GI& gi) {
    if constexpr (WM == 0) return _mm256_broadcast_ss(pwj);
    else if constexpr (WM == 1)
      return _mm256_permutevar_ps(_mm256_broadcast_ps(reinterpret_cast<const __m128*>(pwj)), gi);
    else return _mm256_permutevar8x32_ps(_mm256_loadu_ps(pwj), gi);
  }
};

// D = 128 on AVX2: lanes 0..7 in `a`, 8..15 in `b`.
struct Lanes256x2 {
  static constexpr int L = 16;
  struct F { __m256 a, b; };
  struct I { __m256i a, b; };
  // per half: indices relative to the half's first group (oa / ob), so that an 8-wide permute reaches them
  struct GI { __m256i a, b; int oa, ob; };
  static F zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  static F load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
  static void store(float* p, F x) { _mm256_storeu_ps(p, x.a); _mm256_storeu_ps(p + 8, x.b); }
  static F fma(F a, F b, F c) { return {_mm256_fmadd_ps(a.a, b.a, c.a), _mm256_fmadd_ps(a.b, b.b, c.b)}; }
  static F add(F a, F b) { return {_mm256_add_ps(a.a, b.a), _mm256_add_ps(a.b, b.b)}; }
  static F mul(F a, F b) { return {_mm256_mul_ps(a.a, b.a), _mm256_mul_ps(a.b, b.b)}; }
  static F set1(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
  static F cvt(I x) { return {_mm256_cvtepi32_ps(x.a), _mm256_cvtepi32_ps(x.b)}; }
  static I andm(I x, const int32_t* m) {
    return {_mm256_and_si256(x.a, _mm256_load_si256(reinterpret_cast<const __m256i*>(m))),
            _mm256_and_si256(x.b, _mm256_load_si256(reinterpret_cast<const __m256i*>(m + 8)))};
  }
  template <int S>
  static I srli(I x) { return {_mm256_srli_epi32(x.a, S), _mm256_srli_epi32(x.b, S)}; }
  static I words(const uint8_t* p) {
    return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)),
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32))};
  }
  static I halves(const uint8_t* p) {
    return {_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
            _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)))};
  }
  static __m128 hsum4(F a0, F a1, F a2, F a3) {
    return Lanes256::hsum4(_mm256_add_ps(a0.a, a0.b), _mm256_add_ps(a1.a, a1.b), _mm256_add_ps(a2.a, a2.b),
                           _mm256_add_ps(a3.a, a3.b));
  }
  static float hsum(F x) { return simd_avx2::hsum(_mm256_add_ps(x.a, x.b)); }
  static GI make_gi(const int32_t* g) {
    GI r;
    r.oa = g[0];
    r.ob = g[8];
    alignas(32) int32_t ra[8], rb[8];
    for (int c = 0; c < 8; ++c) { ra[c] = g[c] - r.oa; rb[c] = g[8 + c] - r.ob; }
    r.a = _mm256_load_si256(reinterpret_cast<const __m256i*>(ra));
    r.b = _mm256_load_si256(reinterpret_cast<const __m256i*>(rb));
    return r;
  }
  template <int WM>
  static F wvec(const float* pwj, const GI& gi) {
    if constexpr (WM == 0) {
      const __m256 w = _mm256_broadcast_ss(pwj);
      return {w, w};
    } else {
      return {_mm256_permutevar8x32_ps(_mm256_loadu_ps(pwj + gi.oa), gi.a),
              _mm256_permutevar8x32_ps(_mm256_loadu_ps(pwj + gi.ob), gi.b)};
    }
  }
};

#ifdef MK_ISA_AVX512
// D = 128 on AVX-512: one 512-bit register per vector (16 lanes; up to 16 value groups reached by one permute).
struct Lanes512 {
  static constexpr int L = 16;
  using F = __m512;
  using I = __m512i;
  using GI = __m512i;
  static F zero() { return _mm512_setzero_ps(); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F x) { _mm512_storeu_ps(p, x); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F set1(float x) { return _mm512_set1_ps(x); }
  static F cvt(I x) { return _mm512_cvtepi32_ps(x); }
  static I andm(I a, const int32_t* m) { return _mm512_and_si512(a, _mm512_load_si512(m)); }
  template <int S>
  static I srli(I a) { return _mm512_srli_epi32(a, S); }
  static I words(const uint8_t* p) { return _mm512_loadu_si512(p); }
  static I halves(const uint8_t* p) {
    return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static __m256 fold(F a) { return _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1)); }
  static __m128 hsum4(F a0, F a1, F a2, F a3) { return Lanes256::hsum4(fold(a0), fold(a1), fold(a2), fold(a3)); }
  static float hsum(F a) { return _mm512_reduce_add_ps(a); }
  static GI make_gi(const int32_t* g) { return _mm512_loadu_si512(g); }
  template <int WM>
  static F wvec(const float* pwj, const GI& gi) {
    if constexpr (WM == 0) return _mm512_set1_ps(*pwj);
    else return _mm512_permutexvar_ps(gi, _mm512_loadu_ps(pwj));
  }
};
// The lanes of D = 128.
using LanesD128 = Lanes512;
#else
// The lanes of D = 128.
using LanesD128 = Lanes256x2;
#endif

}  // namespace MK_IMPL_NS
}  // namespace cpu
}  // namespace malloc_kernels
