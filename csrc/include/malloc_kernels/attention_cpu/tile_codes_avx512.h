// The int8 / int4 / int2 codes of a stored block decoded into the fp32 L1 tile of the register-tiled path
// (row_tiles.h) with 512-bit lanes, for the head dims whose rows are whole vectors (D = 32, 64, 128; compile-time, so
// each row is a straight run of 16-lane chunks with no per-row loop bookkeeping). Same values, bit for bit, as
// decode_rows / decode_rows_channel (tiles_avx2.h): x = code * s + z, one rounding.
//
// 4- and 2-bit codes go through a 16-entry table instead of mask + int->float convert + FMA: vpermps reads only the
// low 4 bits of each index lane, so a lane holding its code in bits 0..3 (int4) or bits 0..1 with the next code
// above (int2, table[i] = value of i & 3) indexes the table directly, garbage in the upper bits included.
//   token-axis groups (values; keys quantized per token): the table is the group's dequantised values,
//     t[i] = i * s + z (one FMA per group and row), so a 16-element chunk costs shift + permute (int2) or
//     shuffle + shift + permute (int4) instead of 4 / 5 uops;
//   channel-axis keys (KIVI): the table is the plain codes and the per-channel scale / zero stay one FMA.
// Per code chunk the uops saved are on the ports the FMAs of QK / PV share.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "malloc_kernels/attention_cpu/scalar.h"

namespace malloc_kernels {
namespace cpu {
namespace MK_IMPL_NS {

#ifdef MK_ISA_AVX512
// Index lanes of 16 consecutive codes (chunk c = codes 16c..16c+15): code i in the low bits of lane i (int8: the
// value itself).
template <Fmt F>
inline __m512i code_lanes16(const uint8_t* row, int c) {
  if constexpr (F == Fmt::INT8) {
    return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * c)));
  } else if constexpr (F == Fmt::INT4) {
    // byte i / 2 to the low byte of lane i, then nibble i % 2 down (raw16's selection, without the mask)
    int64_t w; std::memcpy(&w, row + 8 * c, 8);
    const __m512i sel = _mm512_set_epi32(
        int(0x80808007), int(0x80808007), int(0x80808006), int(0x80808006), int(0x80808005), int(0x80808005),
        int(0x80808004), int(0x80808004), int(0x80808003), int(0x80808003), int(0x80808002), int(0x80808002),
        int(0x80808001), int(0x80808001), int(0x80808000), int(0x80808000));
    const __m512i sh = _mm512_set_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);
    return _mm512_srlv_epi32(_mm512_shuffle_epi8(_mm512_set1_epi64(w), sel), sh);
  } else {
    uint32_t w; std::memcpy(&w, row + 4 * c, 4);
    const __m512i sh = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    return _mm512_srlv_epi32(_mm512_set1_epi32(int(w)), sh);
  }
}

// The code each table index stands for (int2: index i holds code i & 3 in its low bits).
template <Fmt F>
inline __m512 code_table_iota() {
  if constexpr (F == Fmt::INT2) return _mm512_setr_ps(0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3);
  else return _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}

// 16 codes as floats mapped through x = code * s + z (s, z per lane).
template <Fmt F>
inline __m512 codes_affine16(const uint8_t* row, int c, __m512 s, __m512 z) {
  if constexpr (F == Fmt::INT8) return _mm512_fmadd_ps(_mm512_cvtepi32_ps(code_lanes16<F>(row, c)), s, z);
  else return _mm512_fmadd_ps(_mm512_permutexvar_ps(code_lanes16<F>(row, c), code_table_iota<F>()), s, z);
}

// Token-axis groups: n rows into dst[n][D]; group g of row j has scale s[j * ngr + g] and zero z[...] (z null: 0),
// CPG 16-element chunks per group (gs = 16 * CPG), ngr = D / gs; all loop bounds compile-time.
template <Fmt F, int D, int CPG>
void tile_codes_token(const uint8_t* base, int64_t stride, int n, float* dst, const float* s, const float* z) {
  static_assert(D % (16 * CPG) == 0, "whole groups of 16-lane chunks");
  constexpr int ngr = D / (16 * CPG);
  for (int j = 0; j < n; ++j) {
    const uint8_t* row = base + j * stride;
    float* out = dst + int64_t(j) * D;
    for (int g = 0; g < ngr; ++g) {
      const __m512 sv = _mm512_set1_ps(s[j * ngr + g]);
      const __m512 zv = z ? _mm512_set1_ps(z[j * ngr + g]) : _mm512_setzero_ps();
      if constexpr (F == Fmt::INT8) {
        for (int c = g * CPG; c < (g + 1) * CPG; ++c) _mm512_storeu_ps(out + 16 * c, codes_affine16<F>(row, c, sv, zv));
      } else {
        const __m512 table = _mm512_fmadd_ps(code_table_iota<F>(), sv, zv);
        for (int c = g * CPG; c < (g + 1) * CPG; ++c)
          _mm512_storeu_ps(out + 16 * c, _mm512_permutexvar_ps(code_lanes16<F>(row, c), table));
      }
    }
  }
}

// Channel-axis keys of one token group: n rows into dst[n][D], x = code * cs[d] + cz[d].
template <Fmt F, int D>
void tile_codes_channel(const uint8_t* base, int64_t stride, int n, float* dst, const float* cs, const float* cz) {
  static_assert(D % 16 == 0, "whole 16-lane chunks");
  constexpr int C = D / 16;
  __m512 sv[C], zv[C];
  for (int c = 0; c < C; ++c) { sv[c] = _mm512_loadu_ps(cs + 16 * c); zv[c] = _mm512_loadu_ps(cz + 16 * c); }
  for (int j = 0; j < n; ++j) {
    const uint8_t* row = base + j * stride;
    float* out = dst + int64_t(j) * D;
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + 16 * c, codes_affine16<F>(row, c, sv[c], zv[c]));
  }
}

// Whether the tile decoders serve format f at head dim D (token-axis groups of gs; gs = 0: channel axis).
inline bool tile_codes_ok(Fmt f, int D, int gs) {
  return (f == Fmt::INT8 || f == Fmt::INT4 || f == Fmt::INT2) && (D == 32 || D == 64 || D == 128) &&
         (gs == 0 || (gs % 16 == 0 && D % gs == 0));
}

template <Fmt F, int D>
void tile_codes_token_gs(const uint8_t* base, int64_t stride, int n, float* dst, int gs, const float* s,
                         const float* z) {
  if (gs == 16) tile_codes_token<F, D, 1>(base, stride, n, dst, s, z);
  else if (gs == 32) tile_codes_token<F, D, 2>(base, stride, n, dst, s, z);
  else if constexpr (D >= 64) {
    if (gs == 64) tile_codes_token<F, D, 4>(base, stride, n, dst, s, z);
    else if constexpr (D >= 128) tile_codes_token<F, D, 8>(base, stride, n, dst, s, z);
  }
}

template <Fmt F>
void tile_codes_token_d(int D, const uint8_t* base, int64_t stride, int n, float* dst, int gs, const float* s,
                        const float* z) {
  if (D == 32) tile_codes_token_gs<F, 32>(base, stride, n, dst, gs, s, z);
  else if (D == 64) tile_codes_token_gs<F, 64>(base, stride, n, dst, gs, s, z);
  else tile_codes_token_gs<F, 128>(base, stride, n, dst, gs, s, z);
}

template <Fmt F>
void tile_codes_channel_d(int D, const uint8_t* base, int64_t stride, int n, float* dst, const float* cs,
                          const float* cz) {
  if (D == 32) tile_codes_channel<F, 32>(base, stride, n, dst, cs, cz);
  else if (D == 64) tile_codes_channel<F, 64>(base, stride, n, dst, cs, cz);
  else tile_codes_channel<F, 128>(base, stride, n, dst, cs, cz);
}

// Run-time format dispatch (tile_codes_ok(f, D, gs) must hold).
inline void tile_codes_token_rt(Fmt f, int D, const uint8_t* base, int64_t stride, int n, float* dst, int gs,
                                const float* s, const float* z) {
  if (f == Fmt::INT8) tile_codes_token_d<Fmt::INT8>(D, base, stride, n, dst, gs, s, z);
  else if (f == Fmt::INT4) tile_codes_token_d<Fmt::INT4>(D, base, stride, n, dst, gs, s, z);
  else tile_codes_token_d<Fmt::INT2>(D, base, stride, n, dst, gs, s, z);
}

inline void tile_codes_channel_rt(Fmt f, int D, const uint8_t* base, int64_t stride, int n, float* dst,
                                  const float* cs, const float* cz) {
  if (f == Fmt::INT8) tile_codes_channel_d<Fmt::INT8>(D, base, stride, n, dst, cs, cz);
  else if (f == Fmt::INT4) tile_codes_channel_d<Fmt::INT4>(D, base, stride, n, dst, cs, cz);
  else tile_codes_channel_d<Fmt::INT2>(D, base, stride, n, dst, cs, cz);
}
#endif

}  // namespace MK_IMPL_NS
}  // namespace cpu
}  // namespace malloc_kernels
