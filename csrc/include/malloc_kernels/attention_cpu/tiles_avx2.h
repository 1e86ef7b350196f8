// Tile primitives of the fused CPU attention, AVX2 + FMA + F16C build (compiled under `#pragma GCC target` in
// csrc/cpu/attention_avx2.cpp). Same names and results as tiles_portable.h, 8 floats per vector; scalar tails for
// head dims that are not a multiple of 8 (the kernel pads its float tiles to kLanes).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "malloc_kernels/attention_cpu/scalar.h"
#include "malloc_kernels/attention_cpu/tiles_lanes.h"
#include "malloc_kernels/simd_avx2.h"

namespace malloc_kernels {
namespace cpu {
namespace MK_IMPL_NS {

// Padding of the head dim in float tiles (the vector width).
constexpr int kLanes = 8;

inline __m128 hsum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}
// hsum / hmax / exp256 / exp_shift_inplace: malloc_kernels/simd_avx2.h
using simd_avx2::exp256;
using simd_avx2::exp_shift_inplace;
using simd_avx2::hmax;
using simd_avx2::hsum;

// 8 consecutive raw elements (chunk c = elements 8c..8c+7) of a stored row as floats.
template <Fmt F>
inline __m256 raw8(const uint8_t* row, int c) {
  if constexpr (F == Fmt::F32) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(row) + 8 * c);
  } else if constexpr (F == Fmt::F16) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * c)));
  } else if constexpr (F == Fmt::BF16) {
    const __m256i x = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * c)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
  } else if constexpr (F == Fmt::INT8) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + 8 * c))));
  } else if constexpr (F == Fmt::INT4) {
    // 4 bytes hold 8 nibbles, element 2i in the low nibble of byte i: broadcast the word, shift lane k by 4k.
    uint32_t w; std::memcpy(&w, row + 4 * c, 4);
    const __m256i sh = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    const __m256i x = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(int(w)), sh), _mm256_set1_epi32(0xF));
    return _mm256_cvtepi32_ps(x);
  } else if constexpr (F == Fmt::INT2) {
    uint16_t w; std::memcpy(&w, row + 2 * c, 2);
    const __m256i sh = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
    const __m256i x = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(int(w)), sh), _mm256_set1_epi32(0x3));
    return _mm256_cvtepi32_ps(x);
  } else {  // FP8 e4m3fn: rebias the exponent for normals, m * 2^-9 for subnormals, then the sign.
    const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + 8 * c)));
    const __m256i mag = _mm256_and_si256(v, _mm256_set1_epi32(0x7F));
    const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(v, _mm256_set1_epi32(0x80)), 24);
    const __m256 normal = _mm256_castsi256_ps(
        _mm256_add_epi32(_mm256_slli_epi32(mag, 20), _mm256_set1_epi32(120 << 23)));
    const __m256 sub = _mm256_mul_ps(_mm256_cvtepi32_ps(mag), _mm256_set1_ps(0.001953125f));
    const __m256 is_sub = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(8), mag));
    // 0x7F / 0xFF are e4m3fn's NaN (it has no inf): OR-ing the quiet-NaN bits makes those lanes NaN
    const __m256 nan_bits = _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(mag, _mm256_set1_epi32(0x7F))),
                                          _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000)));
    return _mm256_or_ps(_mm256_or_ps(_mm256_blendv_ps(normal, sub, is_sub), _mm256_castsi256_ps(sign)), nan_bits);
  }
}

#ifdef MK_ISA_AVX512
// Whether raw16<F> exists: the integer codes (the loops below then take 16 elements per step).
template <Fmt F>
constexpr bool kRaw16 = F == Fmt::INT8 || F == Fmt::INT4 || F == Fmt::INT2;

// 16 consecutive codes (chunk c = elements 16c..16c+15) of an int8 / int4 / int2 row as floats.
template <Fmt F>
inline __m512 raw16(const uint8_t* row, int c) {
  if constexpr (F == Fmt::INT8) {
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * c))));
  } else if constexpr (F == Fmt::INT4) {
    // 8 bytes broadcast to every 64-bit lane (a load, no shuffle); one in-lane byte shuffle puts byte i / 2 in the
    // low byte of lane i (the other bytes zeroed), a per-lane shift by 4 * (i % 2) brings nibble i down. One
    // shuffle instead of unpack + widen (two on the port the 512-bit FMAs share).
    int64_t w; std::memcpy(&w, row + 8 * c, 8);
    const __m512i x = _mm512_set1_epi64(w);
    const __m512i sel = _mm512_set_epi32(
        int(0x80808007), int(0x80808007), int(0x80808006), int(0x80808006), int(0x80808005), int(0x80808005),
        int(0x80808004), int(0x80808004), int(0x80808003), int(0x80808003), int(0x80808002), int(0x80808002),
        int(0x80808001), int(0x80808001), int(0x80808000), int(0x80808000));
    const __m512i sh = _mm512_set_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);
    const __m512i e = _mm512_srlv_epi32(_mm512_shuffle_epi8(x, sel), sh);
    return _mm512_cvtepi32_ps(_mm512_and_si512(e, _mm512_set1_epi32(0x0F)));
  } else {
    uint32_t w; std::memcpy(&w, row + 4 * c, 4);
    const __m512i sh = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    return _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(int(w)), sh),
                                               _mm512_set1_epi32(3)));
  }
}
#endif

// Decode n stored rows of raw codes with a per-channel affine map x = raw * cs[d] + cz[d] (KIVI keys of one token
// group; cs / cz hold D floats) into dst[n][ld] (elements D..ld-1 zero).
template <Fmt F>
void decode_rows_channel(const uint8_t* base, int64_t stride, int n, int D, int ld, float* dst, const float* cs,
                         const float* cz) {
  for (int j = 0; j < n; ++j) {
    const uint8_t* row = base + j * stride;
    float* out = dst + int64_t(j) * ld;
    int d0 = 0;
#ifdef MK_ISA_AVX512
    if constexpr (kRaw16<F>) {
      for (; d0 + 16 <= D; d0 += 16)
        _mm512_storeu_ps(out + d0, _mm512_fmadd_ps(raw16<F>(row, d0 / 16), _mm512_loadu_ps(cs + d0),
                                                   _mm512_loadu_ps(cz + d0)));
    }
#endif
    for (; d0 + 8 <= D; d0 += 8)
      _mm256_storeu_ps(out + d0, _mm256_fmadd_ps(raw8<F>(row, d0 / 8), _mm256_loadu_ps(cs + d0),
                                                 _mm256_loadu_ps(cz + d0)));
    const int dt = d0;
    decode_row_scalar<F>(row, d0, D, ld, out, 0, nullptr, nullptr);
    for (int d = dt; d < D; ++d) out[d] = out[d] * cs[d] + cz[d];
  }
}

// Decode n stored rows (row stride `stride` bytes) into dst[n][ld] floats (elements D..ld-1 zero). With `gs > 0`
// the token-axis affine map x = raw * s_g + z_g (group g = d / gs) is applied, s/z float16 [n][D/gs] with row
// stride `sz_stride` elements (z may be null: fp8).
template <Fmt F>
void decode_rows(const uint8_t* base, int64_t stride, int n, int D, int ld, float* dst, int gs,
                 const uint16_t* s16, const uint16_t* z16, int64_t sz_stride) {
  for (int j = 0; j < n; ++j) {
    const uint8_t* row = base + j * stride;
    float* out = dst + int64_t(j) * ld;
    int d0 = 0;
    const int nc = D / 8;
#ifdef MK_ISA_AVX512
    if constexpr (kRaw16<F>) {
      if (gs > 0 && gs % 16 == 0 && D % 16 == 0) {
        const uint16_t* sr = s16 + j * sz_stride;
        const uint16_t* zr = z16 ? z16 + j * sz_stride : nullptr;
        for (int g = 0; g < D / gs; ++g) {
          const __m512 s = _mm512_set1_ps(half_to_float(sr[g]));
          const __m512 z = _mm512_set1_ps(zr ? half_to_float(zr[g]) : 0.f);
          for (int c = g * gs / 16; c < (g + 1) * gs / 16; ++c)
            _mm512_storeu_ps(out + 16 * c, _mm512_fmadd_ps(raw16<F>(row, c), s, z));
        }
        for (int d = D; d < ld; ++d) out[d] = 0.f;
        continue;
      }
    }
#endif
    if (gs > 0 && gs % 8 == 0) {
      const uint16_t* sr = s16 + j * sz_stride;
      const uint16_t* zr = z16 ? z16 + j * sz_stride : nullptr;
      const int cpg = gs / 8;
      for (int g = 0; g * cpg < nc; ++g) {
        const __m256 s = _mm256_set1_ps(half_to_float(sr[g]));
        const __m256 z = _mm256_set1_ps(zr ? half_to_float(zr[g]) : 0.f);
        for (int c = g * cpg; c < std::min(nc, (g + 1) * cpg); ++c)
          _mm256_storeu_ps(out + 8 * c, _mm256_fmadd_ps(raw8<F>(row, c), s, z));
      }
      d0 = nc * 8;
    } else if (gs == 0) {
      for (int c = 0; c < nc; ++c) _mm256_storeu_ps(out + 8 * c, raw8<F>(row, c));
      d0 = nc * 8;
    }
    decode_row_scalar<F>(row, d0, D, ld, out, gs, gs > 0 ? s16 + j * sz_stride : nullptr,
                         gs > 0 && z16 ? z16 + j * sz_stride : nullptr);
  }
}

// 8 floats per vector (the AVX2 build of tiles_lanes.h's qk_dots_lanes / pv_accum_lanes): a padded row is a whole
// number of vectors, so no lane is ever masked.
struct Lanes8 {
  using T = __m256;
  static constexpr int W = 8;
  static T zero() { return _mm256_setzero_ps(); }
  static T set1(float x) { return _mm256_set1_ps(x); }
  static T fmadd(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, T x) { _mm256_storeu_ps(p, x); }
  static T part_load(const float* p, int d, int) { return _mm256_loadu_ps(p + d); }
  static void part_store(float* p, int d, int, T x) { _mm256_storeu_ps(p + d, x); }
  static void sums4(float* s, T a0, T a1, T a2, T a3, float add) {
    _mm_storeu_ps(s, _mm_add_ps(hsum4(a0, a1, a2, a3), _mm_set1_ps(add)));
  }
  static float reduce(T x) { return hsum(x); }
};

#ifndef MK_ISA_AVX512  // the AVX-512 build runs them with 16 lanes (tiles_avx512.h)
inline void qk_dots(const float* Q, int ldq, int R, const float* K, int64_t ldk, int n, int Dp, float* S, int lds,
                    const float* add) {
  qk_dots_lanes<Lanes8>(Q, ldq, R, K, ldk, n, Dp, S, lds, add);
}

inline void pv_accum(const float* P, int ldp, int R, int n, const float* V, int64_t ldv, int Dp, float* O, int ldo) {
  pv_accum_lanes<Lanes8>(P, ldp, R, n, V, ldv, Dp, O, ldo);
}
#endif

inline void halves_to_floats(const uint16_t* h, int n, float* out) {
  int i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
  for (; i < n; ++i) out[i] = half_to_float(h[i]);
}

// x[i] = exp(x[i]) in place.
inline void exp_inplace(float* x, int n) {
  int i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, exp256(_mm256_loadu_ps(x + i)));
  for (; i < n; ++i) x[i] = std::exp(x[i]);
}

// Per-channel key scales folded into one query row: qs[d] = q[d] * cs[d] for d < D; returns <q, cz> (the row's
// zero-point offset).
inline float fold_channel_scale(const float* q, const float* cs, const float* cz, int D, float* qs) {
  int d0 = 0;
  __m256 za = _mm256_setzero_ps();
  for (; d0 + 8 <= D; d0 += 8) {
    const __m256 qv = _mm256_loadu_ps(q + d0);
    _mm256_storeu_ps(qs + d0, _mm256_mul_ps(qv, _mm256_loadu_ps(cs + d0)));
    za = _mm256_fmadd_ps(qv, _mm256_loadu_ps(cz + d0), za);
  }
  float zacc = hsum(za);
  for (int d = d0; d < D; ++d) { qs[d] = q[d] * cs[d]; zacc += q[d] * cz[d]; }
  return zacc;
}

}  // namespace MK_IMPL_NS
}  // namespace cpu
}  // namespace malloc_kernels
