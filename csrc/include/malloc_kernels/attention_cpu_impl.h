// Implementation of attention_forward (attention_cpu.h), written once and compiled twice: portable (whatever the
// build flags give, SSE2 on plain x86-64) in csrc/cpu/attention_portable.cpp, and AVX2+FMA+F16C in
// csrc/cpu/attention_avx2.cpp under `#pragma GCC target`, chosen at run time. Each translation unit defines
// MK_IMPL_NS (its own namespace, so the two copies never collide at link time) and, for the AVX2 copy, MK_ISA_AVX2.
//
// Algorithm per work item (user b, kv head, block of queries), FlashAttention-2 style (arXiv 2307.08691) on a CPU:
//   rows r = (query head of this kv head, query) -- all GQA heads share each K/V block, read and dequantized once;
//   for each key segment (cache, residual, request) and each block of KB keys:
//     dequantize the K block into an L1 tile (codes only for per-channel keys: the channel scale is folded into the
//     query, q'_d = q_d * s_d, and the zero point into one per-row offset <q, z>, so per element only the code
//     conversion remains -- KIVI's per-channel key layout made cheap);
//     S = Q K^T (+ log count, + relative bias, masks) -> online softmax (or SiLU weights) -> O += P V (V tile
//     dequantized the same way).
// Nothing larger than a KB x D tile is ever materialised; the [Lq, N] score matrix never exists.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include <omp.h>

#include "malloc_kernels/attention_cpu.h"
#include "malloc_kernels/bias.h"
#include "malloc_kernels/quant.h"

#ifdef MK_ISA_AVX2
#include <immintrin.h>

#include "malloc_kernels/simd_avx2.h"
#endif

namespace malloc_kernels {
namespace cpu {
namespace MK_IMPL_NS {

constexpr int KB = 32;        // keys per block: K and V tiles of KB x D floats stay in L1
// keys per block of the decode-from-codes path (cache_from_codes): DKB for one query row, DKB / 2 for several (their
// score/weight rows must stay in L1 next to the shared tiles); a multiple of 64, so key groups never straddle blocks.
constexpr int DKB = 128;
constexpr int RMAX = 64;      // query rows (heads x queries) per work item chunk
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();
constexpr float POS_INF = std::numeric_limits<float>::infinity();

// Non-finite rule (every backend, README "Non-finite values and integer ranges"): a row with no visible entry returns
// zeros (lse -inf); otherwise a visible score (scale * q.k + log count + bias) that is NaN or +inf, or a non-finite
// element of the row's result, makes the WHOLE row NaN (lse NaN); a -inf score is weight 0, as a masked entry (SDPA's
// convention). Values: a non-finite value of a VISIBLE entry poisons the row (stored entries are visible to every row
// and propagate through p * v; guard_request_values keeps causally masked request values out). The max/exp helpers
// drop NaN (the vector min/max return an operand), so scores never rely on propagation: each row keeps a sticky flag
// `bad` set by `!(s < +inf)` (one compare per score vector) and finish_row() applies the rule once per row.

// ---- scalar conversions (exact) -------------------------------------------------------------------------------
inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// Scalar conversions come from the shared quantisation numerics (quant.h), so every backend decodes identically.
#ifdef MK_ISA_AVX2
// F16C's conversion is exact (fp16 -> fp32 never rounds) and an order of magnitude cheaper than the bit version.
inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }
#else
inline float half_to_float(uint16_t h) { return quant::f16_bits_to_f32(h); }
#endif
inline float bf16_to_float(uint16_t h) { return quant::bf16_bits_to_f32(h); }
inline float fp8_to_float(uint8_t c) { return quant::e4m3fn_to_f32(c); }

inline uint16_t f2bf16(float f) {  // round to nearest even (outputs)
  uint32_t u; std::memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7FFF + ((u >> 16) & 1);
  return uint16_t(u >> 16);
}

inline uint16_t f2half(float f) { return quant::f32_to_f16_bits(f); }

inline float load_scalar(const void* base, DType dt, int64_t idx) {
  switch (dt) {
    case DType::F32: return static_cast<const float*>(base)[idx];
    case DType::F16: return half_to_float(static_cast<const uint16_t*>(base)[idx]);
    default: return bf16_to_float(static_cast<const uint16_t*>(base)[idx]);
  }
}

inline void store_scalar(void* base, DType dt, int64_t idx, float v) {
  switch (dt) {
    case DType::F32: static_cast<float*>(base)[idx] = v; break;
    case DType::F16: static_cast<uint16_t*>(base)[idx] = f2half(v); break;
    default: static_cast<uint16_t*>(base)[idx] = f2bf16(v); break;
  }
}

inline size_t fmt_elem_bytes(Fmt f) {
  switch (f) {
    case Fmt::F32: return 4;
    case Fmt::F16: case Fmt::BF16: return 2;
    default: return 1;
  }
}

inline int64_t row_bytes(Fmt f, int D) {
  switch (f) {
    case Fmt::F32: return int64_t(D) * 4;
    case Fmt::F16: case Fmt::BF16: return int64_t(D) * 2;
    case Fmt::INT8: case Fmt::FP8: return D;
    case Fmt::INT4: return (int64_t(D) * 4 + 7) / 8;
    default: return (int64_t(D) * 2 + 7) / 8;
  }
}

// Raw element d of a stored row: the value (float formats), the integer code (int formats) or the e4m3 value (fp8).
inline float raw_scalar(Fmt f, const uint8_t* row, int d) {
  switch (f) {
    case Fmt::F32: { float x; std::memcpy(&x, row + 4 * d, 4); return x; }
    case Fmt::F16: { uint16_t h; std::memcpy(&h, row + 2 * d, 2); return half_to_float(h); }
    case Fmt::BF16: { uint16_t h; std::memcpy(&h, row + 2 * d, 2); return bf16_to_float(h); }
    case Fmt::INT8: return float(row[d]);
    case Fmt::INT4: return float((row[d >> 1] >> ((d & 1) * 4)) & 0xF);
    case Fmt::INT2: return float((row[d >> 2] >> ((d & 3) * 2)) & 0x3);
    default: return fp8_to_float(row[d]);
  }
}

// ---- vector primitives ----------------------------------------------------------------------------------------
#ifdef MK_ISA_AVX2
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
#endif

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
#ifdef MK_ISA_AVX2
    const int nc = D / 8;
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
#endif
    for (int d = d0; d < D; ++d) {
      float x = raw_scalar(F, row, d);
      if (gs > 0) {
        const int g = d / gs;
        x = x * half_to_float(s16[j * sz_stride + g]) + (z16 ? half_to_float(z16[j * sz_stride + g]) : 0.f);
      }
      out[d] = x;
    }
    for (int d = D; d < ld; ++d) out[d] = 0.f;
  }
}

inline void decode_rows_rt(Fmt f, const uint8_t* base, int64_t stride, int n, int D, int ld, float* dst, int gs,
                           const uint16_t* s16, const uint16_t* z16, int64_t sz_stride) {
  switch (f) {
    case Fmt::F32: decode_rows<Fmt::F32>(base, stride, n, D, ld, dst, gs, s16, z16, sz_stride); break;
    case Fmt::F16: decode_rows<Fmt::F16>(base, stride, n, D, ld, dst, gs, s16, z16, sz_stride); break;
    case Fmt::BF16: decode_rows<Fmt::BF16>(base, stride, n, D, ld, dst, gs, s16, z16, sz_stride); break;
    case Fmt::INT8: decode_rows<Fmt::INT8>(base, stride, n, D, ld, dst, gs, s16, z16, sz_stride); break;
    case Fmt::INT4: decode_rows<Fmt::INT4>(base, stride, n, D, ld, dst, gs, s16, z16, sz_stride); break;
    case Fmt::INT2: decode_rows<Fmt::INT2>(base, stride, n, D, ld, dst, gs, s16, z16, sz_stride); break;
    default: decode_rows<Fmt::FP8>(base, stride, n, D, ld, dst, gs, s16, z16, sz_stride); break;
  }
}

// S[r][j] = <Q[r], K[j]> (+ add[r] if add), r < R, j < n, over Dp (multiple of 8 in the AVX2 build) elements.
inline void qk_dots(const float* Q, int ldq, int R, const float* K, int64_t ldk, int n, int Dp, float* S, int lds,
                    const float* add) {
  int r0 = 0;
#ifdef MK_ISA_AVX2
  // Rows in pairs over blocks of 4 keys: every K vector load feeds two FMAs (the loop is load-bound otherwise).
  // Each score accumulates in the same order as the single-row loop below, so results are bit-identical.
  for (; r0 + 2 <= R && n >= 4; r0 += 2) {
    const float* qa = Q + int64_t(r0) * ldq;
    const float* qb = qa + ldq;
    float* sa = S + int64_t(r0) * lds;
    float* sb = sa + lds;
    const float aa = add ? add[r0] : 0.f, ab = add ? add[r0 + 1] : 0.f;
    int j = 0;
    for (; j + 4 <= n; j += 4) {
      const float* k0 = K + j * ldk;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
      for (int d = 0; d < Dp; d += 8) {
        const __m256 x = _mm256_loadu_ps(qa + d), y = _mm256_loadu_ps(qb + d);
        const __m256 k0v = _mm256_loadu_ps(k0 + d), k1v = _mm256_loadu_ps(k0 + ldk + d);
        const __m256 k2v = _mm256_loadu_ps(k0 + 2 * ldk + d), k3v = _mm256_loadu_ps(k0 + 3 * ldk + d);
        a0 = _mm256_fmadd_ps(x, k0v, a0); b0 = _mm256_fmadd_ps(y, k0v, b0);
        a1 = _mm256_fmadd_ps(x, k1v, a1); b1 = _mm256_fmadd_ps(y, k1v, b1);
        a2 = _mm256_fmadd_ps(x, k2v, a2); b2 = _mm256_fmadd_ps(y, k2v, b2);
        a3 = _mm256_fmadd_ps(x, k3v, a3); b3 = _mm256_fmadd_ps(y, k3v, b3);
      }
      _mm_storeu_ps(sa + j, _mm_add_ps(hsum4(a0, a1, a2, a3), _mm_set1_ps(aa)));
      _mm_storeu_ps(sb + j, _mm_add_ps(hsum4(b0, b1, b2, b3), _mm_set1_ps(ab)));
    }
    for (; j < n; ++j) {
      __m256 a0 = _mm256_setzero_ps(), b0 = a0;
      for (int d = 0; d < Dp; d += 8) {
        const __m256 kv = _mm256_loadu_ps(K + j * ldk + d);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qa + d), kv, a0);
        b0 = _mm256_fmadd_ps(_mm256_loadu_ps(qb + d), kv, b0);
      }
      sa[j] = hsum(a0) + aa;
      sb[j] = hsum(b0) + ab;
    }
  }
#endif
  for (int r = r0; r < R; ++r) {
    const float* q = Q + int64_t(r) * ldq;
    float* s = S + int64_t(r) * lds;
    const float a = add ? add[r] : 0.f;
    int j = 0;
#ifdef MK_ISA_AVX2
    for (; j + 4 <= n; j += 4) {
      const float* k0 = K + j * ldk;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int d = 0; d < Dp; d += 8) {
        const __m256 qv = _mm256_loadu_ps(q + d);
        a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + d), a0);
        a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + ldk + d), a1);
        a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 2 * ldk + d), a2);
        a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 3 * ldk + d), a3);
      }
      _mm_storeu_ps(s + j, _mm_add_ps(hsum4(a0, a1, a2, a3), _mm_set1_ps(a)));
    }
    for (; j < n; ++j) {
      __m256 a0 = _mm256_setzero_ps();
      for (int d = 0; d < Dp; d += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(K + j * ldk + d), a0);
      s[j] = hsum(a0) + a;
    }
#else
    for (; j < n; ++j) {
      const float* k = K + j * ldk;
      float acc = 0.f;
      for (int d = 0; d < Dp; ++d) acc += q[d] * k[d];
      s[j] = acc + a;
    }
#endif
  }
}

// O[r][:] += sum_j P[r][j] * V[j][:]
inline void pv_accum(const float* P, int ldp, int R, int n, const float* V, int64_t ldv, int Dp, float* O, int ldo) {
  for (int r = 0; r < R; ++r) {
    const float* p = P + int64_t(r) * ldp;
    float* o = O + int64_t(r) * ldo;
#ifdef MK_ISA_AVX2
    int d = 0;
    for (; d + 64 <= Dp; d += 64) {
      __m256 acc[8];
      for (int c = 0; c < 8; ++c) acc[c] = _mm256_loadu_ps(o + d + 8 * c);
      for (int j = 0; j < n; ++j) {
        const __m256 pj = _mm256_set1_ps(p[j]);
        const float* v = V + j * ldv + d;
        for (int c = 0; c < 8; ++c) acc[c] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v + 8 * c), acc[c]);
      }
      for (int c = 0; c < 8; ++c) _mm256_storeu_ps(o + d + 8 * c, acc[c]);
    }
    for (; d < Dp; d += 8) {
      __m256 acc = _mm256_loadu_ps(o + d);
      for (int j = 0; j < n; ++j) acc = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), _mm256_loadu_ps(V + j * ldv + d), acc);
      _mm256_storeu_ps(o + d, acc);
    }
#else
    for (int j = 0; j < n; ++j) {
      const float pj = p[j];
      const float* v = V + j * ldv;
      for (int d = 0; d < Dp; ++d) o[d] += pj * v[d];
    }
#endif
  }
}

inline void halves_to_floats(const uint16_t* h, int n, float* out) {
  int i = 0;
#ifdef MK_ISA_AVX2
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
#endif
  for (; i < n; ++i) out[i] = half_to_float(h[i]);
}

// x[i] = exp(x[i]) in place.
inline void exp_inplace(float* x, int n) {
  int i = 0;
#ifdef MK_ISA_AVX2
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, exp256(_mm256_loadu_ps(x + i)));
#endif
  for (; i < n; ++i) x[i] = std::exp(x[i]);
}

#ifdef MK_ISA_AVX2
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

// ---- decode straight from the codes in the "code layout" (D == 64; int8 / int4 / int2) -------------------------
// A stored row of 64 codes is read as packed 32-bit words and expanded into 8 vectors v_t (t = 0..7): lane c of v_t
// holds the code of element code_elem<F>(c, t) times 2^code_exp<F>(t), obtained with ONE and (or shift) of the
// words and an int -> float conversion: no per-element variable shifts and no shuffles in the inner loop. The query
// is stored once per (row, key group) in the same order and pre-multiplied by 2^-code_exp (exact: a power of two),
// so every product q_d * code_d is bit-identical to the natural computation and only the summation order changes;
// value accumulators live in the same layout and are scaled back (exactly) once per work item.
template <Fmt F>
constexpr int code_elem(int c, int t) { return F == Fmt::INT8 ? 32 * (t >> 2) + 4 * c + (t & 3) : 8 * c + t; }
template <Fmt F>
constexpr int code_exp(int t) {
  return F == Fmt::INT4 ? (t < 7 ? 4 * t : 0) : F == Fmt::INT2 ? 2 * t : ((t & 3) < 3 ? 8 * (t & 3) : 0);
}

// The same pointer, opaque to the optimiser: loads through it cannot be hoisted out of the loop that launders it.
template <class P>
inline P* launder(P* p) {
  asm("" : "+r"(p));
  return p;
}

template <Fmt F>
struct Codes64 {
  __m256i lo, hi;
  explicit Codes64(const uint8_t* row) {
    if constexpr (F == Fmt::INT4) {
      // 32 bytes = 8 words of 8 nibbles: word c holds elements 8c..8c+7, element 8c+t in nibble t.
      lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row));
      hi = lo;
    } else if constexpr (F == Fmt::INT2) {
      // 16 bytes = 8 half-words of 8 crumbs, widened to one half-word per 32-bit lane.
      lo = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row)));
      hi = lo;
    } else {
      // 64 bytes: word c of half h holds elements 32h + 4c .. 32h + 4c + 3.
      lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row));
      hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 32));
    }
  }
  // The and-masks of the 8 vectors. The inner loops read them through launder() so that they stay memory
  // operands of the and: held in registers they would push the accumulators out to the stack (GCC does that).
  static const __m256i* masks() {
    alignas(32) static const int32_t m[8][8] = {
#define MK_M(T) {MK_V(T), MK_V(T), MK_V(T), MK_V(T), MK_V(T), MK_V(T), MK_V(T), MK_V(T)}
#define MK_V(T) int32_t(F == Fmt::INT4 ? (T < 7 ? 0xFu << (4 * T) : 0u) : F == Fmt::INT2 ? 0x3u << (2 * T) \
                        : ((T & 3) < 3 ? 0xFFu << (8 * (T & 3)) : 0u))
        MK_M(0), MK_M(1), MK_M(2), MK_M(3), MK_M(4), MK_M(5), MK_M(6), MK_M(7)};
#undef MK_V
#undef MK_M
    return reinterpret_cast<const __m256i*>(m);
  }
  template <int T>
  __m256 get(const __m256i* mk) const {
    if constexpr (F == Fmt::INT4) {
      if constexpr (T == 7) return _mm256_cvtepi32_ps(_mm256_srli_epi32(lo, 28));
      else return _mm256_cvtepi32_ps(_mm256_and_si256(lo, _mm256_load_si256(mk + T)));
    } else if constexpr (F == Fmt::INT2) {
      return _mm256_cvtepi32_ps(_mm256_and_si256(lo, _mm256_load_si256(mk + T)));
    } else {
      const __m256i x = T < 4 ? lo : hi;
      if constexpr ((T & 3) == 3) return _mm256_cvtepi32_ps(_mm256_srli_epi32(x, 24));
      else return _mm256_cvtepi32_ps(_mm256_and_si256(x, _mm256_load_si256(mk + T)));
    }
  }
  template <int T>
  __m256 get() const {
    if constexpr (F == Fmt::INT4) {
      // nibbles 0..6 masked in place (c * 2^4t < 2^31: positive, 4 significant bits, converted exactly); the top
      // nibble by a shift, so its sign bit never reaches the conversion.
      if constexpr (T == 7) return _mm256_cvtepi32_ps(_mm256_srli_epi32(lo, 28));
      else return _mm256_cvtepi32_ps(_mm256_and_si256(lo, _mm256_set1_epi32(0xF << (4 * T))));
    } else if constexpr (F == Fmt::INT2) {
      return _mm256_cvtepi32_ps(_mm256_and_si256(lo, _mm256_set1_epi32(0x3 << (2 * T))));
    } else {
      const __m256i x = T < 4 ? lo : hi;
      if constexpr ((T & 3) == 3) return _mm256_cvtepi32_ps(_mm256_srli_epi32(x, 24));
      else return _mm256_cvtepi32_ps(_mm256_and_si256(x, _mm256_set1_epi32(0xFF << (8 * (T & 3)))));
    }
  }
};

template <class Fn, int... T>
inline void for_t_impl(Fn&& fn, std::integer_sequence<int, T...>) { (fn(std::integral_constant<int, T>{}), ...); }
// fn(std::integral_constant<int, t>) for t = 0..7, fully unrolled at compile time.
template <class Fn>
inline void for_t(Fn&& fn) { for_t_impl(fn, std::make_integer_sequence<int, 8>{}); }

// In-place 8x8 transpose: r[i] lane j <- r[j] lane i.
inline void transpose8(__m256* r) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20); r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20); r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31); r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31); r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// One query row against n rows of codes: S[j] = <qp, code_j> + add (qp in code layout, 8 vectors). Four keys per
// step, two accumulators per key (even / odd t) so that the FMA chains are short next to the step's work.
template <Fmt F>
inline void qk_code_layout_r1(const float* qp, const uint8_t* K, int64_t rb, int n, float* S, float add) {
  const __m128 addv = _mm_set1_ps(add);
  int j = 0;
  for (; j + 4 <= n; j += 4) {
    const __m256i* mk = launder(Codes64<F>::masks());
    const float* q = launder(qp);
    const uint8_t* k0 = K + j * rb;
    const Codes64<F> c0(k0), c1(k0 + rb), c2(k0 + 2 * rb), c3(k0 + 3 * rb);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
#define MK_QK_T(T, A0, A1, A2, A3)                                          \
  {                                                                         \
    const __m256 qv = _mm256_loadu_ps(q + 8 * T);                           \
    A0 = _mm256_fmadd_ps(qv, c0.template get<T>(mk), A0);                   \
    A1 = _mm256_fmadd_ps(qv, c1.template get<T>(mk), A1);                   \
    A2 = _mm256_fmadd_ps(qv, c2.template get<T>(mk), A2);                   \
    A3 = _mm256_fmadd_ps(qv, c3.template get<T>(mk), A3);                   \
  }
    MK_QK_T(0, a0, a1, a2, a3) MK_QK_T(1, b0, b1, b2, b3) MK_QK_T(2, a0, a1, a2, a3) MK_QK_T(3, b0, b1, b2, b3)
    MK_QK_T(4, a0, a1, a2, a3) MK_QK_T(5, b0, b1, b2, b3) MK_QK_T(6, a0, a1, a2, a3) MK_QK_T(7, b0, b1, b2, b3)
#undef MK_QK_T
    _mm_storeu_ps(S + j, _mm_add_ps(hsum4(_mm256_add_ps(a0, b0), _mm256_add_ps(a1, b1), _mm256_add_ps(a2, b2),
                                          _mm256_add_ps(a3, b3)), addv));
  }
  for (; j < n; ++j) {
    const Codes64<F> c0(K + j * rb);
    __m256 a0 = _mm256_setzero_ps();
    for_t([&](auto T) { a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qp + 8 * T), c0.template get<T>(), a0); });
    S[j] = hsum(a0) + add;
  }
}

// n rows of codes expanded into a float tile in code layout (row stride 64): shared by several query rows.
template <Fmt F>
inline void expand_code_layout(const uint8_t* K, int64_t rb, int n, float* tile) {
  for (int j = 0; j < n; ++j) {
    const Codes64<F> c(K + j * rb);
    float* t = tile + int64_t(j) * 64;
    for_t([&](auto T) { _mm256_storeu_ps(t + 8 * T, c.template get<T>()); });
  }
}

// Value weights of key j in code layout: lane c of the vector used for v_t is pw[j * ngr + group of the element];
// gidx[H] holds those group indices for the vectors t with t >> 2 == H (int4/int2: the same for every t).
// WM: how the vector is formed from the key's ngr weights -- 0: one group (broadcast), 1: at most 4 groups (a
// 128-bit broadcast and an in-lane permute, both cheap), 2: up to 8 groups (a cross-lane permute).
template <int WM>
inline __m256 code_weight_vec(const float* pwj, const __m256i& gi) {
  if constexpr (WM == 0) return _mm256_broadcast_ss(pwj);
  else if constexpr (WM == 1)
    return _mm256_permutevar_ps(_mm256_broadcast_ps(reinterpret_cast<const __m128*>(pwj)), gi);
  else return _mm256_permutevar8x32_ps(_mm256_loadu_ps(pwj), gi);
}

template <Fmt F, int T>
inline __m256 code_weight(const __m256& w0, const __m256& w1) {
  if constexpr (F == Fmt::INT8) return T < 4 ? w0 : w1;
  else return w0;
}

// Op (code layout, 8 vectors) += sum_j pw_j (x) v_t(code_j), from the codes (one query row). pw must be readable
// 4 floats past the last key's weights (WM 1) / 8 floats (WM 2).
template <Fmt F, int WM>
inline void pv_code_layout_r1(const float* pw, int ngr, const __m256i* gidx, const uint8_t* V, int64_t rb, int n,
                              float* Op) {
  // eight named accumulators: an array of vectors indexed from a lambda ends up on the stack (GCC)
  __m256 a0 = _mm256_loadu_ps(Op), a1 = _mm256_loadu_ps(Op + 8), a2 = _mm256_loadu_ps(Op + 16),
         a3 = _mm256_loadu_ps(Op + 24), a4 = _mm256_loadu_ps(Op + 32), a5 = _mm256_loadu_ps(Op + 40),
         a6 = _mm256_loadu_ps(Op + 48), a7 = _mm256_loadu_ps(Op + 56);
  for (int j = 0; j < n; ++j) {
    const __m256i* mk = launder(Codes64<F>::masks());
    const Codes64<F> c(V + j * rb);
    const __m256 w0 = code_weight_vec<WM>(pw + j * ngr, gidx[0]);
    const __m256 w1 = F == Fmt::INT8 && WM != 0 ? code_weight_vec<WM>(pw + j * ngr, gidx[1]) : w0;
    a0 = _mm256_fmadd_ps(w0, c.template get<0>(mk), a0);
    a1 = _mm256_fmadd_ps(w0, c.template get<1>(mk), a1);
    a2 = _mm256_fmadd_ps(w0, c.template get<2>(mk), a2);
    a3 = _mm256_fmadd_ps(w0, c.template get<3>(mk), a3);
    a4 = _mm256_fmadd_ps(w1, c.template get<4>(mk), a4);
    a5 = _mm256_fmadd_ps(w1, c.template get<5>(mk), a5);
    a6 = _mm256_fmadd_ps(w1, c.template get<6>(mk), a6);
    a7 = _mm256_fmadd_ps(w1, c.template get<7>(mk), a7);
  }
  _mm256_storeu_ps(Op, a0); _mm256_storeu_ps(Op + 8, a1); _mm256_storeu_ps(Op + 16, a2);
  _mm256_storeu_ps(Op + 24, a3); _mm256_storeu_ps(Op + 32, a4); _mm256_storeu_ps(Op + 40, a5);
  _mm256_storeu_ps(Op + 48, a6); _mm256_storeu_ps(Op + 56, a7);
}

// Several query rows (NR <= 4 of them, a "quad") straight from the codes: every code vector is expanded once and
// feeds NR FMAs, so no float tile is written and re-read. S[r * lds + j] = <qp_r, code_j> + add[r] (qp: NR rows of
// 64 floats in code layout; add: NR floats). One key per step, two accumulators per row (even / odd t) so that the
// FMA chains stay short next to the step's work.
template <Fmt F, int NR>
inline void qk_code_rows(const float* qp, const float* add, const uint8_t* K, int64_t rb, int n, float* S, int lds) {
  alignas(16) float av[4] = {0.f, 0.f, 0.f, 0.f};
  for (int r = 0; r < NR; ++r) av[r] = add[r];
  const __m128 addv = _mm_load_ps(av);
  for (int j = 0; j < n; ++j) {
    const __m256i* mk = launder(Codes64<F>::masks());
    const float* q = launder(qp);
    const Codes64<F> c0(K + j * rb);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
#define MK_QR_T(T, A0, A1, A2, A3)                                                                       \
  {                                                                                                      \
    const __m256 x = c0.template get<T>(mk);                                                             \
    A0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * T), x, A0);                                             \
    if constexpr (NR > 1) A1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 64 + 8 * T), x, A1);                  \
    if constexpr (NR > 2) A2 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 128 + 8 * T), x, A2);                 \
    if constexpr (NR > 3) A3 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 192 + 8 * T), x, A3);                 \
  }
    MK_QR_T(0, a0, a1, a2, a3) MK_QR_T(1, b0, b1, b2, b3) MK_QR_T(2, a0, a1, a2, a3) MK_QR_T(3, b0, b1, b2, b3)
    MK_QR_T(4, a0, a1, a2, a3) MK_QR_T(5, b0, b1, b2, b3) MK_QR_T(6, a0, a1, a2, a3) MK_QR_T(7, b0, b1, b2, b3)
#undef MK_QR_T
    alignas(16) float sv[4];
    _mm_store_ps(sv, _mm_add_ps(hsum4(_mm256_add_ps(a0, b0), _mm256_add_ps(a1, b1), _mm256_add_ps(a2, b2),
                                      _mm256_add_ps(a3, b3)), addv));
    for (int r = 0; r < NR; ++r) S[r * lds + j] = sv[r];
  }
}

// Runtime row count (1..4) -> the templates above.
template <Fmt F>
inline void qk_code_quad(int nr, const float* qp, const float* add, const uint8_t* K, int64_t rb, int n, float* S,
                         int lds) {
  switch (nr) {
    case 1: qk_code_rows<F, 1>(qp, add, K, rb, n, S, lds); break;
    case 2: qk_code_rows<F, 2>(qp, add, K, rb, n, S, lds); break;
    case 3: qk_code_rows<F, 3>(qp, add, K, rb, n, S, lds); break;
    default: qk_code_rows<F, 4>(qp, add, K, rb, n, S, lds); break;
  }
}

// Two query rows from an expanded tile, half of the code layout (vectors 4H..4H+3) at a time: each tile load feeds
// two FMAs and the 8 accumulators stay in registers.
template <Fmt F, int WM>
inline void pv_code_tile2(const float* pwa, const float* pwb, int ngr, const __m256i* gidx, const float* tile, int n,
                          float* Opa, float* Opb) {
  for (int H = 0; H < 2; ++H) {
    const __m256i gi = gidx[F == Fmt::INT8 ? H : 0];
    __m256 a[4], b[4];
    for (int t = 0; t < 4; ++t) {
      a[t] = _mm256_loadu_ps(Opa + 32 * H + 8 * t);
      b[t] = _mm256_loadu_ps(Opb + 32 * H + 8 * t);
    }
    for (int j = 0; j < n; ++j) {
      const float* v = tile + int64_t(j) * 64 + 32 * H;
      const __m256 wa = code_weight_vec<WM>(pwa + j * ngr, gi);
      const __m256 wb = code_weight_vec<WM>(pwb + j * ngr, gi);
      for (int t = 0; t < 4; ++t) {
        const __m256 x = _mm256_loadu_ps(v + 8 * t);
        a[t] = _mm256_fmadd_ps(wa, x, a[t]);
        b[t] = _mm256_fmadd_ps(wb, x, b[t]);
      }
    }
    for (int t = 0; t < 4; ++t) {
      _mm256_storeu_ps(Opa + 32 * H + 8 * t, a[t]);
      _mm256_storeu_ps(Opb + 32 * H + 8 * t, b[t]);
    }
  }
}

// Same from an expanded tile (several query rows share one expansion).
template <Fmt F>
inline void pv_code_tile(const float* pw, int ngr, const __m256i* gidx, const float* tile, int n, float* Op) {
  __m256 acc[8];
  for (int t = 0; t < 8; ++t) acc[t] = _mm256_loadu_ps(Op + 8 * t);
  for (int j = 0; j < n; ++j) {
    const float* v = tile + int64_t(j) * 64;
    const __m256 pj = _mm256_loadu_ps(pw + j * ngr);
    const __m256 w0 = _mm256_permutevar8x32_ps(pj, gidx[0]);
    const __m256 w1 = F == Fmt::INT8 ? _mm256_permutevar8x32_ps(pj, gidx[1]) : w0;
    for_t([&](auto T) {
      acc[T] = _mm256_fmadd_ps(code_weight<F, T>(w0, w1), _mm256_loadu_ps(v + 8 * T), acc[T]);
    });
  }
  for (int t = 0; t < 8; ++t) _mm256_storeu_ps(Op + 8 * t, acc[t]);
}
#endif

// ---- the kernel ------------------------------------------------------------------------------------------------
enum SegId { SEG_CACHE = 0, SEG_RES = 1, SEG_REQ = 2 };

struct Scratch {
  std::vector<float> Q, Qs, O, S, Kt, Vt, m, l, zb, cs, cz, nrm;
  std::vector<float> lse, inw, vs, vz, pw;
  // decode-from-codes path (code layout, D == 64): queries, value accumulators, zero-point sums, weights.
  std::vector<float> qperm, qp, Op, Zv, pwr, qsum, ksf, kzf, Sd, dvs, dvz, dV;
  std::vector<int64_t> qi, qh, qpos, qts;
  std::vector<uint8_t> bad;  // per row: a NaN / +inf score was seen (non-finite rule above)
  float cexp[8];  // 2^-code_exp(t) of the format being decoded
  void init(int Dp, int Rcap) {
    qperm.assign(size_t(Rcap) * 64, 0.f); qp.assign(size_t(Rcap) * 64, 0.f); Op.assign(size_t(Rcap) * 64, 0.f);
    Zv.assign(size_t(Rcap) * 8, 0.f); pwr.assign(size_t(Rcap) * (DKB * 8 + 8), 0.f); qsum.assign(Rcap, 0.f);
    ksf.assign(DKB + 8, 0.f); kzf.assign(DKB + 8, 0.f); Sd.assign(size_t(Rcap) * DKB, 0.f);
    dvs.assign(DKB * 8 + 8, 0.f); dvz.assign(DKB * 8 + 8, 0.f); dV.assign(KB * 64, 0.f);
    Q.assign(size_t(Rcap) * Dp, 0.f); Qs.assign(size_t(Rcap) * Dp, 0.f); O.assign(size_t(Rcap) * Dp, 0.f);
    S.assign(size_t(Rcap) * KB, 0.f); Kt.assign(size_t(KB) * Dp, 0.f); Vt.assign(size_t(KB) * Dp, 0.f);
    m.assign(Rcap, 0.f); l.assign(Rcap, 0.f); zb.assign(Rcap, 0.f); nrm.assign(Rcap, 0.f);
    lse.assign(Rcap, 0.f); inw.assign(Rcap, 0.f);
    cs.assign(Dp, 0.f); cz.assign(Dp, 0.f);
    vs.assign(size_t(KB) * Dp, 0.f); vz.assign(size_t(KB) * Dp, 0.f); pw.assign(size_t(KB) * Dp, 0.f);
    qi.assign(Rcap, 0); qh.assign(Rcap, 0); qpos.assign(Rcap, 0); qts.assign(Rcap, 0); bad.assign(Rcap, 0);
  }
};

class Kernel {
 public:
  explicit Kernel(const AttnParams& p) : p_(p) {
    D_ = p.D;
#ifdef MK_ISA_AVX2
    Dp_ = (D_ + 7) / 8 * 8;
#else
    Dp_ = D_;
#endif
    G_ = p.Hq / p.Hkv;
    if (p.time_bias) tb_.init(p.time_thresholds, p.T);
    has_bias_ = p.pos_bias || p.time_bias;
  }

  const AttnParams& p_;
  int D_, Dp_, G_;
  bool has_bias_;
  bias::TimeBucketer tb_;

  int64_t qlen(int64_t b) const { return p_.q_len[b]; }
  int64_t klen(int64_t b) const { return (p_.k.p && p_.k_len) ? p_.k_len[b] : 0; }
  int64_t ntargets(int64_t b) const {
    if (!p_.num_targets) return 0;
    return std::min<int64_t>(p_.num_targets[b], klen(b));
  }

  // Request-key visibility (DESIGN.md section 2, reference/masks.py): causal is top-left aligned (j <= i); a
  // target query (one of the last num_targets tokens; Lq == Lk whenever targets exist) never sees another target.
  bool visible(int64_t i, int64_t j, int64_t Lk, int64_t nt) const {
    if (p_.causal && j > i) return false;
    if (nt > 0 && j >= Lk - nt && i >= Lk - nt && j != i) return false;
    return true;
  }

  int64_t seg_len(int seg, int64_t b, int64_t h) const {
    if (seg == SEG_CACHE) return p_.has_cache ? p_.cache.length[b * p_.Hkv + h] : 0;
    if (seg == SEG_RES) return p_.has_residual ? p_.residual.length[b * p_.Hkv + h] : 0;
    return klen(b);
  }

  // Scores of the keys [j0, j0+n) of a segment for the R rows of this chunk, into sc.S (row stride KB), including
  // log-count (softmax), bias and masks. Also leaves the counts of the block in `cnt` (hstu).
  void scores(Scratch& sc, int seg, int64_t b, int64_t h, int R, int64_t j0, int n, float* cnt) const {
    const Segment& sg = seg == SEG_CACHE ? p_.cache : p_.residual;
    const int64_t bh = b * p_.Hkv + h;
    const float* Qeff = sc.Q.data();
    const float* add = nullptr;
    const float* K = nullptr;
    int64_t ldk = 0;
    bool fused = false;
    if (seg == SEG_REQ) {
      const char* base = static_cast<const char*>(p_.k.p);
      const size_t eb = p_.kv_dtype == DType::F32 ? 4 : 2;
      const char* row0 = base + eb * p_.k.offset(b, h, j0);
      if (p_.kv_dtype == DType::F32 && Dp_ == D_) {
        K = reinterpret_cast<const float*>(row0); ldk = p_.k.sL;
      } else {
        decode_rows_rt(Fmt(int(p_.kv_dtype)), reinterpret_cast<const uint8_t*>(row0), int64_t(eb) * p_.k.sL, n, D_,
                       Dp_, sc.Kt.data(), 0, nullptr, nullptr, 0);
        K = sc.Kt.data(); ldk = Dp_;
      }
    } else {
      const int64_t rb = row_bytes(sg.k_fmt, D_);
      const uint8_t* row0 = static_cast<const uint8_t*>(sg.k) + (bh * sg.capacity + j0) * rb;
      const bool quant = sg.k_fmt == Fmt::INT8 || sg.k_fmt == Fmt::INT4 || sg.k_fmt == Fmt::INT2 ||
                         sg.k_fmt == Fmt::FP8;
      if (!quant && sg.k_fmt == Fmt::F32 && Dp_ == D_) {
        K = reinterpret_cast<const float*>(row0); ldk = D_;
      } else if (!quant) {
        decode_rows_rt(sg.k_fmt, row0, rb, n, D_, Dp_, sc.Kt.data(), 0, nullptr, nullptr, 0);
        K = sc.Kt.data(); ldk = Dp_;
      } else if (sg.k_channel) {
        // Per-channel scales of this token group folded into the query (block never straddles a group).
        const int64_t g = j0 / sg.group_size;
        const int64_t ng = (sg.capacity + sg.group_size - 1) / sg.group_size;
        const uint16_t* s16 = sg.k_scale + (bh * ng + g) * D_;
        const uint16_t* z16 = sg.k_zero ? sg.k_zero + (bh * ng + g) * D_ : nullptr;
        halves_to_floats(s16, D_, sc.cs.data());
        if (z16) halves_to_floats(z16, D_, sc.cz.data());
        else std::fill(sc.cz.begin(), sc.cz.begin() + D_, 0.f);
        for (int r = 0; r < R; ++r) {
          const float* q = sc.Q.data() + int64_t(r) * Dp_;
          float* qs = sc.Qs.data() + int64_t(r) * Dp_;
          float zacc = 0.f;
          int d0 = 0;
#ifdef MK_ISA_AVX2
          __m256 za = _mm256_setzero_ps();
          for (; d0 + 8 <= D_; d0 += 8) {
            const __m256 qv = _mm256_loadu_ps(q + d0);
            _mm256_storeu_ps(qs + d0, _mm256_mul_ps(qv, _mm256_loadu_ps(sc.cs.data() + d0)));
            za = _mm256_fmadd_ps(qv, _mm256_loadu_ps(sc.cz.data() + d0), za);
          }
          zacc = hsum(za);
#endif
          for (int d = d0; d < D_; ++d) { qs[d] = q[d] * sc.cs[d]; zacc += q[d] * sc.cz[d]; }
          for (int d = D_; d < Dp_; ++d) qs[d] = 0.f;
          sc.zb[r] = zacc;
        }
        Qeff = sc.Qs.data();
        add = sc.zb.data();
#ifdef MK_ISA_AVX2
        if (R <= 2 && Dp_ == D_) {
          // Decode-sized: dot products straight from the codes (no float tile).
          float* S = sc.S.data();
          switch (sg.k_fmt) {
            case Fmt::INT4: qk_codes<Fmt::INT4>(Qeff, Dp_, R, row0, rb, n, D_, S, KB, add); break;
            case Fmt::INT2: qk_codes<Fmt::INT2>(Qeff, Dp_, R, row0, rb, n, D_, S, KB, add); break;
            case Fmt::INT8: qk_codes<Fmt::INT8>(Qeff, Dp_, R, row0, rb, n, D_, S, KB, add); break;
            default: qk_codes<Fmt::FP8>(Qeff, Dp_, R, row0, rb, n, D_, S, KB, add); break;
          }
          fused = true;
        }
#endif
        if (!fused) {
          decode_rows_rt(sg.k_fmt, row0, rb, n, D_, Dp_, sc.Kt.data(), 0, nullptr, nullptr, 0);
          K = sc.Kt.data(); ldk = Dp_;
        }
      } else {
        const int64_t ngr = D_ / sg.group_size;
        const uint16_t* s16 = sg.k_scale + (bh * sg.capacity + j0) * ngr;
        const uint16_t* z16 = sg.k_zero ? sg.k_zero + (bh * sg.capacity + j0) * ngr : nullptr;
        decode_rows_rt(sg.k_fmt, row0, rb, n, D_, Dp_, sc.Kt.data(), sg.group_size, s16, z16, ngr);
        K = sc.Kt.data(); ldk = Dp_;
      }
    }
    float* S = sc.S.data();
    if (!fused) qk_dots(Qeff, Dp_, R, K, ldk, n, Dp_, S, KB, add);

    // counts
    const float* c = nullptr;
    if (seg != SEG_REQ && sg.count) c = sg.count + bh * sg.capacity + j0;
    for (int j = 0; j < n; ++j) cnt[j] = c ? c[j] : 1.f;
    if (p_.kind == Kind::Softmax && c) {
      for (int j = 0; j < n; ++j) {
        // log c as the reference: log 0 = -inf (weight 0); a negative or NaN count gives NaN (non-finite rule)
        const float lc = std::log(c[j]);
        for (int r = 0; r < R; ++r) S[r * KB + j] += lc;
      }
    }
    // relative bias from ORIGINAL positions / timestamps
    if (has_bias_) {
      int64_t kp[KB], kt[KB];
      for (int j = 0; j < n; ++j) {
        if (seg == SEG_REQ) {
          kp[j] = p_.k_pos.p ? static_cast<const int64_t*>(p_.k_pos.p)[p_.k_pos.offset(b, 0, j0 + j)] : 0;
          kt[j] = p_.k_ts.p ? static_cast<const int64_t*>(p_.k_ts.p)[p_.k_ts.offset(b, 0, j0 + j)] : 0;
        } else {
          kp[j] = sg.position[bh * sg.capacity + j0 + j];
          kt[j] = sg.timestamp ? sg.timestamp[bh * sg.capacity + j0 + j] : 0;
        }
      }
      for (int r = 0; r < R; ++r) {
        const int64_t hq = sc.qh[r];
        float* s = S + r * KB;
        if (p_.pos_bias) {
          const float* pb = p_.pos_bias + hq * p_.pos_bias_sH;
          for (int j = 0; j < n; ++j) s[j] += pb[bias::pos_index(sc.qpos[r], kp[j], p_.P)];
        }
        if (p_.time_bias) {
          const float* tbias = p_.time_bias + hq * p_.time_bias_sH;
          for (int j = 0; j < n; ++j) s[j] += tbias[tb_(sc.qts[r], kt[j])];
        }
      }
    }
    // masks (request segment only; cache/residual entries precede every request token)
    if (seg == SEG_REQ) {
      const int64_t Lk = klen(b), nt = ntargets(b);
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < n; ++j)
          if (!visible(sc.qi[r], j0 + j, Lk, nt)) S[r * KB + j] = NEG_INF;
    }
  }

  void block_len(int seg, int64_t b, int64_t h, int64_t j0, int64_t len, int* n) const {
    int64_t e = std::min<int64_t>(len, j0 + KB);
    if (seg == SEG_CACHE && p_.cache.k_channel) {
      const int64_t gs = p_.cache.group_size;
      e = std::min<int64_t>(e, (j0 / gs + 1) * gs);
    }
    *n = int(e - j0);
  }

  // Decode-sized rows over a quantized cache block: O += P V straight from the value codes (pv_codes). Returns
  // false (nothing done) when the shape or format needs the tile path.
  bool values_fused(Scratch& sc, int seg, int64_t b, int64_t h, int64_t j0, int n, int R) const {
#ifdef MK_ISA_AVX2
    if (seg != SEG_CACHE || R > 2 || Dp_ != D_ || (D_ != 64 && D_ != 32)) return false;
    const Segment& sg = p_.cache;
    const bool quant = sg.v_fmt == Fmt::INT8 || sg.v_fmt == Fmt::INT4 || sg.v_fmt == Fmt::INT2 || sg.v_fmt == Fmt::FP8;
    if (!quant || sg.group_size % 8 != 0) return false;
    const int64_t bh = b * p_.Hkv + h;
    const int64_t rb = row_bytes(sg.v_fmt, D_);
    const int ngr = D_ / sg.group_size;
    const uint8_t* row0 = static_cast<const uint8_t*>(sg.v) + (bh * sg.capacity + j0) * rb;
    float* sf = sc.vs.data();
    float* zf = sg.v_zero ? sc.vz.data() : nullptr;
    halves_to_floats(sg.v_scale + (bh * sg.capacity + j0) * ngr, n * ngr, sf);
    if (zf) halves_to_floats(sg.v_zero + (bh * sg.capacity + j0) * ngr, n * ngr, zf);
    const float* P = sc.S.data();
    float* O = sc.O.data();
    float* pw = sc.pw.data();
    const int gs = sg.group_size;
#define MK_PV(FM)                                                                              \
  if (D_ == 64) pv_codes<FM, 8>(P, KB, R, n, row0, rb, gs, sf, zf, O, Dp_, pw);                \
  else pv_codes<FM, 4>(P, KB, R, n, row0, rb, gs, sf, zf, O, Dp_, pw);
    switch (sg.v_fmt) {
      case Fmt::INT4: MK_PV(Fmt::INT4) break;
      case Fmt::INT2: MK_PV(Fmt::INT2) break;
      case Fmt::INT8: MK_PV(Fmt::INT8) break;
      default: MK_PV(Fmt::FP8) break;
    }
#undef MK_PV
    return true;
#else
    (void)sc; (void)seg; (void)b; (void)h; (void)j0; (void)n; (void)R;
    return false;
#endif
  }

  void values(Scratch& sc, int seg, int64_t b, int64_t h, int64_t j0, int n, const float** V, int64_t* ldv) const {
    const int64_t bh = b * p_.Hkv + h;
    if (seg == SEG_REQ) {
      const char* base = static_cast<const char*>(p_.v.p);
      const size_t eb = p_.kv_dtype == DType::F32 ? 4 : 2;
      const char* row0 = base + eb * p_.v.offset(b, h, j0);
      if (p_.kv_dtype == DType::F32 && Dp_ == D_) { *V = reinterpret_cast<const float*>(row0); *ldv = p_.v.sL; return; }
      decode_rows_rt(Fmt(int(p_.kv_dtype)), reinterpret_cast<const uint8_t*>(row0), int64_t(eb) * p_.v.sL, n, D_, Dp_,
                     sc.Vt.data(), 0, nullptr, nullptr, 0);
      *V = sc.Vt.data(); *ldv = Dp_;
      return;
    }
    const Segment& sg = seg == SEG_CACHE ? p_.cache : p_.residual;
    const int64_t rb = row_bytes(sg.v_fmt, D_);
    const uint8_t* row0 = static_cast<const uint8_t*>(sg.v) + (bh * sg.capacity + j0) * rb;
    if (sg.v_fmt == Fmt::F32 && Dp_ == D_) { *V = reinterpret_cast<const float*>(row0); *ldv = D_; return; }
    const bool quant = sg.v_fmt == Fmt::INT8 || sg.v_fmt == Fmt::INT4 || sg.v_fmt == Fmt::INT2 || sg.v_fmt == Fmt::FP8;
    if (quant) {
      const int64_t ngr = D_ / sg.group_size;
      decode_rows_rt(sg.v_fmt, row0, rb, n, D_, Dp_, sc.Vt.data(), sg.group_size,
                     sg.v_scale + (bh * sg.capacity + j0) * ngr,
                     sg.v_zero ? sg.v_zero + (bh * sg.capacity + j0) * ngr : nullptr, ngr);
    } else {
      decode_rows_rt(sg.v_fmt, row0, rb, n, D_, Dp_, sc.Vt.data(), 0, nullptr, nullptr, 0);
    }
    *V = sc.Vt.data(); *ldv = Dp_;
  }

  // Non-finite rule for request values: only a VISIBLE entry's value may poison a row (a causally masked token's NaN
  // must not reach earlier rows through its 0 weight; stored entries are visible to every row). Request blocks are
  // short, so each is scanned; one holding a non-finite value is copied with those elements zeroed and the rows that
  // see it are flagged (finish_row makes them NaN).
  void guard_request_values(Scratch& sc, int64_t b, int64_t j0, int n, int R, const float** V, int64_t* ldv) const {
    const float* src = *V;
    const int64_t ld = *ldv;
    bool any = false;
    for (int j = 0; j < n && !any; ++j)
      for (int d = 0; d < D_; ++d) any |= !std::isfinite(src[j * ld + d]);
    if (!any) return;
    float* dst = sc.Vt.data();  // may be src itself (a decoded tile, ld == Dp_): row by row in place is fine
    const int64_t Lk = klen(b), nt = ntargets(b);
    for (int j = 0; j < n; ++j) {
      bool bad = false;
      for (int d = 0; d < Dp_; ++d) {
        float x = d < D_ ? src[j * ld + d] : 0.f;
        if (!std::isfinite(x)) { bad = true; x = 0.f; }
        dst[int64_t(j) * Dp_ + d] = x;
      }
      if (bad)
        for (int r = 0; r < R; ++r) sc.bad[r] |= visible(sc.qi[r], j0 + j, Lk, nt);
    }
    *V = dst; *ldv = Dp_;
  }

  // The cache segment of a softmax chunk decoded straight from the codes in code layout (see Codes64): int8/int4/int2
  // keys and values of the same format, D == 64, channel-axis keys (any token group) or token-axis keys with one
  // group per row, token-axis value groups the layout can address, no counts, no bias. Must run first in a chunk
  // (it starts from m = -inf, l = 0, O = 0, which is the state before the cache segment).
  bool decode_cache_ok() const {
#ifdef MK_ISA_AVX2
    const Segment& sg = p_.cache;
    if (!p_.has_cache || D_ != 64 || p_.kind != Kind::Softmax || has_bias_ || sg.count) return false;
    if (sg.k_fmt != sg.v_fmt) return false;
    if (sg.k_fmt != Fmt::INT8 && sg.k_fmt != Fmt::INT4 && sg.k_fmt != Fmt::INT2) return false;
    const int gs = sg.group_size;
    // value groups: at most 8 per row (one weight vector per key), each a whole number of code-layout lanes
    if (gs < 8 || 64 % gs != 0) return false;
    return sg.k_channel || gs == 64;
#else
    return false;
#endif
  }

#ifdef MK_ISA_AVX2
  // Keys [j0, j0 + n) of the code-layout path: S[r][0..n) = scores (kch: per-channel scales already folded into
  // the rows' queries for each key group; token-axis keys: scale/zero applied here), rows of stride DKB.
  template <Fmt F>
  void decode_scores(Scratch& sc, int64_t bh, int R, int64_t j0, int n, const uint8_t* kb0, int64_t rb) const {
    const Segment& sg = p_.cache;
    const int gs = sg.group_size;
    float* S = sc.Sd.data();
    if (sg.k_channel) {
      const int64_t nkg = (sg.capacity + gs - 1) / gs;
      // j0 is a multiple of 64 and gs divides 64: sub-blocks of gs keys are whole key groups
      for (int s0 = 0; s0 < n; s0 += gs) {
        const int ns = std::min(gs, n - s0);
        const int64_t g = (j0 + s0) / gs;
        const uint16_t* s16 = sg.k_scale + (bh * nkg + g) * 64;
        const uint16_t* z16 = sg.k_zero ? sg.k_zero + (bh * nkg + g) * 64 : nullptr;
        for (int r = 0; r < R; ++r) {
          // per-channel key scale of this token group folded into the query, zero point into one offset per row
          const float* q = sc.Q.data() + int64_t(r) * Dp_;
          float* qpr = sc.qp.data() + r * 64;
          __m256 v[8];
          __m256 za = _mm256_setzero_ps();
          for (int c = 0; c < 8; ++c) {
            const __m256 qv = _mm256_loadu_ps(q + 8 * c);
            v[c] = _mm256_mul_ps(qv, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s16 + 8 * c))));
            if (z16)
              za = _mm256_fmadd_ps(qv, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(z16 + 8 * c))),
                                   za);
          }
          sc.zb[r] = hsum(za);
          if constexpr (F == Fmt::INT8) {
            alignas(32) float nat[64];
            for (int c = 0; c < 8; ++c) _mm256_store_ps(nat + 8 * c, v[c]);
            for (int t = 0; t < 8; ++t)
              for (int c = 0; c < 8; ++c) qpr[t * 8 + c] = nat[code_elem<F>(c, t)] * sc.cexp[t];
          } else {
            transpose8(v);  // element 8c + t -> vector t, lane c
            for (int t = 0; t < 8; ++t) _mm256_storeu_ps(qpr + 8 * t, _mm256_mul_ps(v[t], _mm256_set1_ps(sc.cexp[t])));
          }
        }
        const uint8_t* k = kb0 + s0 * rb;
        if (R == 1) {
          qk_code_layout_r1<F>(sc.qp.data(), k, rb, ns, S + s0, sc.zb[0]);
        } else {
          for (int r0 = 0; r0 < R; r0 += 4)
            qk_code_quad<F>(std::min(4, R - r0), sc.qp.data() + r0 * 64, sc.zb.data() + r0, k, rb, ns,
                            S + r0 * DKB + s0, DKB);
        }
      }
      return;
    }
    // token-axis keys, one group per row: s_j * <q, code_j> + z_j * sum(q)
    if (R == 1) {
      qk_code_layout_r1<F>(sc.qperm.data(), kb0, rb, n, S, 0.f);
    } else {
      const float zero4[4] = {0.f, 0.f, 0.f, 0.f};
      for (int r0 = 0; r0 < R; r0 += 4)
        qk_code_quad<F>(std::min(4, R - r0), sc.qperm.data() + r0 * 64, zero4, kb0, rb, n, S + r0 * DKB, DKB);
    }
    float* ksf = sc.ksf.data();
    float* kzf = sc.kzf.data();
    halves_to_floats(sg.k_scale + bh * sg.capacity + j0, n, ksf);
    if (sg.k_zero) halves_to_floats(sg.k_zero + bh * sg.capacity + j0, n, kzf);
    else std::fill(kzf, kzf + n, 0.f);
    const int n8 = (n + 7) / 8 * 8;
    std::fill(ksf + n, ksf + n8, 0.f);
    std::fill(kzf + n, kzf + n8, 0.f);
    for (int r = 0; r < R; ++r) {
      float* s = S + r * DKB;
      const __m256 qs = _mm256_set1_ps(sc.qsum[r]);
      for (int j = 0; j < n8; j += 8)
        _mm256_storeu_ps(s + j, _mm256_fmadd_ps(_mm256_loadu_ps(s + j), _mm256_loadu_ps(ksf + j),
                                                _mm256_mul_ps(_mm256_loadu_ps(kzf + j), qs)));
    }
  }

  // The cache segment of a softmax chunk straight from the codes (see Codes64), blocks of bk keys (below):
  //   scores (decode_scores) -> online softmax per row -> value weights p_j * s_jg (the value scale folded into the
  //   weight, zero points summed per group) -> O += weights x codes in code layout.
  template <Fmt F>
  void decode_cache(Scratch& sc, int64_t b, int64_t h, int R) const {
    const Segment& sg = p_.cache;
    const int gs = sg.group_size, vng = 64 / gs;
    if (vng == 1) decode_cache_w<F, 0>(sc, b, h, R);
    else if (vng <= 4) decode_cache_w<F, 1>(sc, b, h, R);
    else decode_cache_w<F, 2>(sc, b, h, R);
  }

  template <Fmt F, int WM>
  void decode_cache_w(Scratch& sc, int64_t b, int64_t h, int R) const {
    const Segment& sg = p_.cache;
    const int64_t bh = b * p_.Hkv + h;
    const int64_t len = seg_len(SEG_CACHE, b, h);
    const int64_t rb = row_bytes(F, 64);
    const uint8_t* kbase = static_cast<const uint8_t*>(sg.k) + bh * sg.capacity * rb;
    const uint8_t* vbase = static_cast<const uint8_t*>(sg.v) + bh * sg.capacity * rb;
    const int gs = sg.group_size, vng = 64 / gs;
    float* Op = sc.Op.data();
    float* Zv = sc.Zv.data();
    for (int t = 0; t < 8; ++t) sc.cexp[t] = std::ldexp(1.f, -code_exp<F>(t));
    // queries in code layout, pre-scaled by 2^-code_exp (exact)
    for (int r = 0; r < R; ++r) {
      const float* q = sc.Q.data() + int64_t(r) * Dp_;
      if (!sg.k_channel) {
        float qs = 0.f;
        for (int t = 0; t < 8; ++t)
          for (int c = 0; c < 8; ++c) sc.qperm[r * 64 + t * 8 + c] = q[code_elem<F>(c, t)] * sc.cexp[t];
        for (int d = 0; d < 64; ++d) qs += q[d];
        sc.qsum[r] = qs;
      }
      std::fill(Op + r * 64, Op + (r + 1) * 64, 0.f);
      std::fill(Zv + r * 8, Zv + (r + 1) * 8, 0.f);
    }
    // group index of each lane of the value weight vectors (vectors t with t >> 2 == H; gs >= 8 keeps it per lane)
    __m256i gidx[2];
    for (int H = 0; H < 2; ++H) {
      alignas(32) int32_t gi[8];
      for (int c = 0; c < 8; ++c) gi[c] = code_elem<F>(c, F == Fmt::INT8 ? 4 * H : 0) / gs;
      gidx[H] = _mm256_load_si256(reinterpret_cast<const __m256i*>(gi));
    }
    // p index of lane i of the k-th vector of (key, group) pairs: pairs 8k..8k+7 within the 8-key chunk k / vng
    __m256i pidx[8];
    for (int k = 0; k < vng; ++k) {
      alignas(32) int32_t pi[8];
      for (int i = 0; i < 8; ++i) pi[i] = (8 * k + i) / vng;
      pidx[k] = _mm256_load_si256(reinterpret_cast<const __m256i*>(pi));
    }
    const int pwld = DKB * 8 + 8;
    float* S = sc.Sd.data();
    float* vsf = sc.dvs.data();
    float* vzf = sc.dvz.data();
    // token-axis keys (int8's per-token layout) are memory-bound: short blocks keep both code streams in flight
    const int bk = !sg.k_channel ? KB : R == 1 ? DKB : DKB / 2;
    for (int64_t j0 = 0; j0 < len; j0 += bk) {
      const int n = int(std::min<int64_t>(bk, len - j0));
      const int n8 = (n + 7) / 8 * 8;
      decode_scores<F>(sc, bh, R, j0, n, kbase + j0 * rb, rb);
      // online softmax, vectorised over the block (entries past n are -inf, so their weights are exactly 0)
      for (int r = 0; r < R; ++r) {
        float* s = S + r * DKB;
        for (int j = n; j < n8; ++j) s[j] = NEG_INF;
        __m256 mx = _mm256_loadu_ps(s);
        // NaN / +inf scores (padding lanes are -inf): not (s < +inf), unordered compares true
        __m256 nf = _mm256_cmp_ps(mx, _mm256_set1_ps(POS_INF), _CMP_NLT_UQ);
        for (int j = 8; j < n8; j += 8) {
          const __m256 sj = _mm256_loadu_ps(s + j);
          nf = _mm256_or_ps(nf, _mm256_cmp_ps(sj, _mm256_set1_ps(POS_INF), _CMP_NLT_UQ));
          mx = _mm256_max_ps(mx, sj);
        }
        sc.bad[r] |= _mm256_movemask_ps(nf) != 0;
        const float mnew = std::max(sc.m[r], hmax(mx));
        if (mnew == NEG_INF) { std::fill(s, s + n8, 0.f); continue; }
        const __m256 sum = exp_shift_inplace(s, n8, mnew);
        if (sc.m[r] != mnew) {
          const float alpha = sc.m[r] == NEG_INF ? 0.f : std::exp(sc.m[r] - mnew);
          const __m256 av = _mm256_set1_ps(alpha);
          for (int t = 0; t < 8; ++t) _mm256_storeu_ps(Op + r * 64 + 8 * t, _mm256_mul_ps(av, _mm256_loadu_ps(Op + r * 64 + 8 * t)));
          _mm256_storeu_ps(Zv + r * 8, _mm256_mul_ps(av, _mm256_loadu_ps(Zv + r * 8)));
          sc.l[r] *= alpha;
          sc.m[r] = mnew;
        }
        sc.l[r] += hsum(sum);
      }
      // values: weights p_j * s_jg (value scale folded into the weight), zero points summed per group. Whole
      // 8-key chunks convert their fp16 scales/zeros straight from the cache; a partial last chunk goes through
      // zero-padded copies (keys past n have p = 0), so nothing past the segment is read.
      const uint16_t* vs16 = sg.v_scale + (bh * sg.capacity + j0) * vng;
      const uint16_t* vz16 = sg.v_zero ? sg.v_zero + (bh * sg.capacity + j0) * vng : nullptr;
      const int nfull = n / 8;
      if (nfull * 8 < n) {
        const int p0 = nfull * 8 * vng, np = n * vng, npe = n8 * vng;
        halves_to_floats(vs16 + p0, np - p0, vsf);
        std::fill(vsf + np - p0, vsf + npe - p0, 0.f);
        if (vz16) halves_to_floats(vz16 + p0, np - p0, vzf);
        else std::fill(vzf, vzf + np - p0, 0.f);
        std::fill(vzf + np - p0, vzf + npe - p0, 0.f);
      }
      for (int r = 0; r < R; ++r) {
        const float* pr = S + r * DKB;
        float* pw = sc.pwr.data() + int64_t(r) * pwld;
        __m256 za = _mm256_loadu_ps(Zv + r * 8);
        for (int kc = 0; kc < n8 / 8; ++kc) {
          const __m256 p8 = _mm256_loadu_ps(pr + 8 * kc);
          const bool full = kc < nfull;
          for (int i = 0; i < vng; ++i) {
            const int k = kc * vng + i;
            const __m256 pk = vng == 1 ? p8 : _mm256_permutevar8x32_ps(p8, pidx[i]);
            __m256 sv, zv;
            if (full) {
              sv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(vs16 + 8 * k)));
              zv = vz16 ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(vz16 + 8 * k)))
                        : _mm256_setzero_ps();
            } else {
              sv = _mm256_loadu_ps(vsf + 8 * i);
              zv = _mm256_loadu_ps(vzf + 8 * i);
            }
            _mm256_storeu_ps(pw + 8 * k, _mm256_mul_ps(pk, sv));
            za = _mm256_fmadd_ps(pk, zv, za);
          }
        }
        _mm256_storeu_ps(Zv + r * 8, za);
      }
      const uint8_t* vb0 = vbase + j0 * rb;
      if (R == 1) {
        pv_code_layout_r1<F, WM>(sc.pwr.data(), vng, gidx, vb0, rb, n, Op);
      } else {
        // value tiles of KB keys (expanded once, shared by all rows) so that tile + weights stay in L1
        for (int v0 = 0; v0 < n; v0 += KB) {
          const int nv = std::min(KB, n - v0);
          expand_code_layout<F>(vb0 + v0 * rb, rb, nv, sc.dV.data());
          const float* pw0 = sc.pwr.data() + v0 * vng;
          int r = 0;
          for (; r + 2 <= R; r += 2)
            pv_code_tile2<F, WM>(pw0 + int64_t(r) * pwld, pw0 + int64_t(r + 1) * pwld, vng, gidx, sc.dV.data(), nv,
                             Op + r * 64, Op + (r + 1) * 64);
          for (; r < R; ++r) pv_code_tile<F>(pw0 + int64_t(r) * pwld, vng, gidx, sc.dV.data(), nv, Op + r * 64);
        }
      }
    }
    // back to natural order: O_d = 2^-code_exp * Op + (sum_j p_j z_jg) of the element's group
    for (int r = 0; r < R; ++r) {
      float* o = sc.O.data() + int64_t(r) * Dp_;
      float zg[8];
      for (int g = 0; g < vng; ++g) {
        zg[g] = 0.f;
        for (int i = g; i < 8; i += vng) zg[g] += Zv[r * 8 + i];
      }
      for (int t = 0; t < 8; ++t) {
        for (int c = 0; c < 8; ++c) {
          const int e = code_elem<F>(c, t);
          o[e] += Op[r * 64 + t * 8 + c] * sc.cexp[t] + zg[e / gs];
        }
      }
    }
  }
#endif

  // Runs decode_cache for the cache segment when decode_cache_ok(); returns whether it did.
  bool cache_from_codes(Scratch& sc, int64_t b, int64_t h, int R) const {
#ifdef MK_ISA_AVX2
    if (!decode_cache_ok()) return false;
    switch (p_.cache.k_fmt) {
      case Fmt::INT4: decode_cache<Fmt::INT4>(sc, b, h, R); break;
      case Fmt::INT2: decode_cache<Fmt::INT2>(sc, b, h, R); break;
      default: decode_cache<Fmt::INT8>(sc, b, h, R); break;
    }
    return true;
#else
    (void)sc; (void)b; (void)h; (void)R;
    return false;
#endif
  }

  // o[0..D) *= nrm, then the non-finite rule: a flagged row or one with a non-finite result becomes all NaN.
  // Returns whether it did. Once per row, outside every key loop.
  bool finish_row(float* o, float nrm, bool bad) const {
    for (int d = 0; d < D_; ++d) {
      o[d] *= nrm;
      bad |= !std::isfinite(o[d]);
    }
    if (bad) std::fill(o, o + D_, std::numeric_limits<float>::quiet_NaN());
    return bad;
  }

  // One chunk: kv head h of user b, queries [i0, i0 + nq), all G query heads.
  void run_chunk(Scratch& sc, int64_t b, int64_t h, int64_t i0, int nq) const {
    const int R = G_ * nq;
    const int64_t Lq = qlen(b);
    // rows: r = g * nq + t
    for (int g = 0; g < G_; ++g) {
      const int64_t hq = h * G_ + g;
      for (int t = 0; t < nq; ++t) {
        const int r = g * nq + t;
        const int64_t i = i0 + t;
        sc.qi[r] = i; sc.qh[r] = hq;
        sc.qpos[r] = p_.q_pos.p ? static_cast<const int64_t*>(p_.q_pos.p)[p_.q_pos.offset(b, 0, i)] : 0;
        sc.qts[r] = p_.q_ts.p ? static_cast<const int64_t*>(p_.q_ts.p)[p_.q_ts.offset(b, 0, i)] : 0;
        const int64_t off = p_.q.offset(b, hq, i);
        float* q = sc.Q.data() + int64_t(r) * Dp_;
        for (int d = 0; d < D_; ++d) q[d] = load_scalar(p_.q.p, p_.q_dtype, off + d) * p_.scale;
        for (int d = D_; d < Dp_; ++d) q[d] = 0.f;
        sc.m[r] = NEG_INF; sc.l[r] = 0.f; sc.bad[r] = 0;
        std::fill(sc.O.begin() + int64_t(r) * Dp_, sc.O.begin() + int64_t(r + 1) * Dp_, 0.f);
      }
    }
    const bool softmax = p_.kind == Kind::Softmax;
    float cnt[KB];
    for (int seg = 0; seg < 3; ++seg) {
      if (seg == SEG_CACHE && cache_from_codes(sc, b, h, R)) continue;
      const int64_t len = seg_len(seg, b, h);
      int n;
      for (int64_t j0 = 0; j0 < len; j0 += n) {
        block_len(seg, b, h, j0, len, &n);
        scores(sc, seg, b, h, R, j0, n, cnt);
        float* S = sc.S.data();
        if (softmax) {
          for (int r = 0; r < R; ++r) {
            float* s = S + r * KB;
            float mx = NEG_INF;
            bool nf = false;
            for (int j = 0; j < n; ++j) {
              mx = std::max(mx, s[j]);
              nf |= !(s[j] < POS_INF);  // NaN or +inf (non-finite rule)
            }
            sc.bad[r] |= nf;
            const float mnew = std::max(sc.m[r], mx);
            if (mnew == NEG_INF) { for (int j = 0; j < n; ++j) s[j] = 0.f; continue; }
            for (int j = 0; j < n; ++j) s[j] -= mnew;
            exp_inplace(s, n);
            float sum = 0.f;
            for (int j = 0; j < n; ++j) sum += s[j];
            if (sc.m[r] != mnew) {
              const float alpha = sc.m[r] == NEG_INF ? 0.f : std::exp(sc.m[r] - mnew);
              float* o = sc.O.data() + int64_t(r) * Dp_;
              for (int d = 0; d < Dp_; ++d) o[d] *= alpha;
              sc.l[r] *= alpha;
              sc.m[r] = mnew;
            }
            sc.l[r] += sum;
          }
        } else {
          // SiLU weights c_j * s / (1 + e^{-s}); masked (-inf) scores give 0.
          for (int r = 0; r < R; ++r) {
            float* s = S + r * KB;
            float e[KB];
            bool nf = false;
            for (int j = 0; j < n; ++j) {
              e[j] = -s[j];
              nf |= !(s[j] < POS_INF);  // NaN or +inf (non-finite rule)
            }
            sc.bad[r] |= nf;
            exp_inplace(e, n);
            for (int j = 0; j < n; ++j) s[j] = s[j] == NEG_INF ? 0.f : cnt[j] * s[j] / (1.f + e[j]);
          }
        }
        if (values_fused(sc, seg, b, h, j0, n, R)) continue;
        const float* V; int64_t ldv;
        values(sc, seg, b, h, j0, n, &V, &ldv);
        if (seg == SEG_REQ) guard_request_values(sc, b, j0, n, R, &V, &ldv);
        pv_accum(S, KB, R, n, V, ldv, Dp_, sc.O.data(), Dp_);
      }
    }
    // normalisers
    const int64_t Lk = klen(b), nt = ntargets(b);
    for (int r = 0; r < R; ++r) {
      if (softmax) {
        sc.nrm[r] = sc.l[r] > 0.f ? 1.f / sc.l[r] : 0.f;
      } else {
        int64_t vis = 0;
        if (p_.hstu_norm != HstuNorm::Constant)
          for (int64_t j = 0; j < Lk; ++j) vis += visible(sc.qi[r], j, Lk, nt) ? 1 : 0;
        int64_t nn;
        if (p_.hstu_norm == HstuNorm::Constant) nn = p_.hstu_norm_const;
        else if (p_.hstu_norm == HstuNorm::Original) nn = (p_.original_length ? p_.original_length[b] : 0) + vis;
        else nn = seg_len(SEG_CACHE, b, h) + seg_len(SEG_RES, b, h) + vis;
        sc.nrm[r] = nn > 0 ? 1.f / float(nn) : 0.f;
      }
      const int64_t off = p_.out.offset(b, sc.qh[r], sc.qi[r]);
      float* o = sc.O.data() + int64_t(r) * Dp_;
      const bool nan_row = finish_row(o, sc.nrm[r], sc.bad[r]);
      for (int d = 0; d < D_; ++d) store_scalar(const_cast<void*>(p_.out.p), p_.q_dtype, off + d, o[d]);
      if (p_.lse && softmax) {
        const float v = nan_row ? std::numeric_limits<float>::quiet_NaN()
                                : sc.l[r] > 0.f ? sc.m[r] + std::log(sc.l[r]) : NEG_INF;
        p_.lse[p_.lse_view.offset(b, sc.qh[r], sc.qi[r])] = v;
      }
    }
    if (p_.stats) stats_pass(sc, b, h, R, Lq);
  }

  // Second pass (only with stats): recompute scores and accumulate each key's normalised weight.
  void stats_pass(Scratch& sc, int64_t b, int64_t h, int R, int64_t Lq) const {
    const bool softmax = p_.kind == Kind::Softmax;
    float* lse = sc.lse.data();
    float* inw = sc.inw.data();
    for (int r = 0; r < R; ++r) {
      lse[r] = sc.l[r] > 0.f ? sc.m[r] + std::log(sc.l[r]) : NEG_INF;
      inw[r] = (p_.stats_window > 0 && sc.qi[r] >= Lq - p_.stats_window) ? 1.f : 0.f;
    }
    float cnt[KB];
    const int64_t bh = b * p_.Hkv + h;
    for (int seg = 0; seg < 3; ++seg) {
      const int64_t len = seg_len(seg, b, h);
      int n;
      for (int64_t j0 = 0; j0 < len; j0 += n) {
        block_len(seg, b, h, j0, len, &n);
        scores(sc, seg, b, h, R, j0, n, cnt);
        float mass[KB] = {0.f}, wmass[KB] = {0.f};
        for (int r = 0; r < R; ++r) {
          const float* s = sc.S.data() + r * KB;
          for (int j = 0; j < n; ++j) {
            float w;
            if (softmax) w = (lse[r] == NEG_INF || s[j] == NEG_INF) ? 0.f : std::exp(s[j] - lse[r]);
            else w = s[j] == NEG_INF ? 0.f : std::fabs(cnt[j] * s[j] / (1.f + std::exp(-s[j]))) * sc.nrm[r];
            mass[j] += w;
            wmass[j] += w * inw[r];
          }
        }
        float* dm; float* dw;
        if (seg == SEG_REQ) {
          for (int j = 0; j < n; ++j) {
            static_cast<float*>(const_cast<void*>(p_.key_mass.p))[p_.key_mass.offset(b, h, j0 + j)] += mass[j];
            if (p_.key_wmass.p)
              static_cast<float*>(const_cast<void*>(p_.key_wmass.p))[p_.key_wmass.offset(b, h, j0 + j)] += wmass[j];
          }
          continue;
        }
        const Segment& sg = seg == SEG_CACHE ? p_.cache : p_.residual;
        dm = seg == SEG_CACHE ? p_.cache_mass : p_.res_mass;
        dw = seg == SEG_CACHE ? p_.cache_wmass : p_.res_wmass;
        for (int j = 0; j < n; ++j) {
          if (dm) dm[bh * sg.capacity + j0 + j] += mass[j];
          if (dw) dw[bh * sg.capacity + j0 + j] += wmass[j];
        }
      }
    }
  }

  void run() const {
    const int64_t B = p_.B, H = p_.Hkv;
    int64_t Lmax = 0;
    for (int64_t b = 0; b < B; ++b) Lmax = std::max(Lmax, qlen(b));
    const int nq = std::max(1, RMAX / G_);
    // With stats every (user, kv head) is one work item so the per-key sums need no atomics.
    const int64_t nqb = p_.stats ? 1 : (Lmax + nq - 1) / nq;
    const int64_t items = B * H * nqb;
    const int nthreads = p_.num_threads > 0 ? p_.num_threads : omp_get_max_threads();
    const int Rcap = std::max(RMAX, G_);
#pragma omp parallel num_threads(nthreads)
    {
      Scratch sc;
      sc.init(Dp_, Rcap);
#pragma omp for schedule(dynamic, 1)
      for (int64_t it = 0; it < items; ++it) {
        const int64_t b = it / (H * nqb), h = (it / nqb) % H, qb = it % nqb;
        const int64_t Lq = qlen(b);
        const int64_t ibeg = p_.stats ? 0 : qb * nq, iend = p_.stats ? Lq : std::min<int64_t>(Lq, (qb + 1) * nq);
        for (int64_t i0 = ibeg; i0 < iend; i0 += nq) run_chunk(sc, b, h, i0, int(std::min<int64_t>(nq, iend - i0)));
      }
    }
  }
};

}  // namespace MK_IMPL_NS
}  // namespace cpu
}  // namespace malloc_kernels
