// The approximate int8-query scores of the cache segment (query_precision = Int8, opt-in; the exact mode is the
// default): each query row is quantized to int8 and its dot products with the int8 / int4 / int2 key CODES run in
// integer arithmetic -- the W4A8KV4 idea of QServe (Lin et al., arXiv 2405.04532), applied to the query of a
// decode instead of the activations of a GEMM. Values (P V) stay exact; the residual and request segments too.
//
// Math (the reference implements the same, reference/int8_query.py; x = the query row times the softmax scale, in
// float32, D elements; a key row j stores codes c_jd in [0, 2^bits) with k_jd = s * c_jd + z):
//
//   quantize(y) (per row):  a = max_d |y_d|,  sq = a / 127,  qi_d = clamp(rne(y_d * (127 / a)), -127, 127)
//                           (a < 2^-126: qi = 0, sq = 0; a non-finite y makes the row's scores NaN)
//   token-axis keys (scale s_jg, zero z_jg per key and channel group g):
//       y = x,  score_j = sq * sum_g s_jg * sum_{d in g} qi_d c_jd  +  sum_g z_jg * sum_{d in g} x_d
//   channel-axis keys (KIVI: s_d, z_d per channel of the key's token group G): the scale is folded into the query
//   BEFORE quantizing, so the integer dot needs no per-element scale:
//       y_d = x_d * s_Gd,  score_j = sq * sum_d qi_d c_jd  +  sum_d x_d z_Gd
//   (y and its quantization are recomputed per token group: int8_query_block_scores splits blocks at groups).
//
// Only the code term is approximate (the zero-point term uses the exact x). With |y_d - sq qi_d| <= sq / 2:
//   token axis:    |score_j - exact_j| <= (sq / 2) * sum_d s_jg(d) c_jd = (sq / 2) * sum_d |k_jd - z_jg(d)|
//   channel axis:  |score_j - exact_j| <= (sq / 2) * sum_d c_jd
// and for a softmax row whose scores all move by at most e: |o_d - exact o_d| <= (e^{2e} - 1) max_j |v_jd - o_d|;
// for an HSTU row (|silu'| <= 1.1): |o_d - exact o_d| <= (1.1 / n) sum_j e_j |v_jd|.
//
// Integer dot products: the row's codes are read as bytes, plane t of a byte (int4: 2 planes, int2: 4) being the
// code of element P*i + t (P codes per byte, low bits first, cache/quant.py's packing); the query is stored as P
// matching planes of int8 (qp[t][i] = qi[P*i + t], zero past D), so plane t of the codes times plane t of the query
// summed over t and bytes is sum_d qi_d c_d, with no unpacking to one code per byte.
//   AVX-512 build: vpdpbusd (VNNI, unsigned codes x signed query, 4 products per 32-bit lane): rows of 8 / 16 bytes
//                  (int2 at D <= 64, int4 at D <= 32) several per 512-bit register (int8_query_dots_short), longer
//                  rows one 256-bit chunk at a time, 8 keys' sums folded by one shuffle tree (q8_reduce8).
//   AVX2 build:    the same loops with _mm256_maddubs_epi16 then _mm256_madd_epi16 by ones. maddubs saturates its int16 pair sums;
//                  for int4 / int2 codes a pair is at most 2 * 15 * 127 = 3810 < 32767, so it never does. int8 codes
//                  (up to 255: 2 * 255 * 127 = 64770 would saturate) widen both sides to int16 and use madd_epi16
//                  (int32 pair sums) instead.
//   portable:      the same loops in scalar int32.
// Exact integers: |sum_d qi_d c_d| <= 127 * 255 * D fits int32 for D < 66,000.
// Token-axis keys with several channel groups per row need one integer sum per group: they take the scalar loop
// (int8_query_token_groups) in every build.
// Where: kernel.h's scores() (general path) and CacheFromCodes::decode_scores (the from-codes decode) ask
// int8_query_block_scores for the cache segment when query_precision is Int8; the register-tiled path is skipped.
// Measured (README, "Approximate int8-query decode"): at D = 64 it does not beat the exact from-codes decode yet.
#pragma once

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#ifdef MK_ISA_AVX2
#include <immintrin.h>
#endif

#include "malloc_kernels/attention_cpu.h"
#include "malloc_kernels/attention_cpu/scalar.h"

namespace malloc_kernels {
namespace cpu {
namespace MK_IMPL_NS {

// quantize(y) above: qi[0..D), returns sq (NaN for a non-finite row, 0 for a row below 2^-126). The vector form
// computes the same numbers: |y| and max are exact, y * inv is one rounded product, and cvtps rounds half to even
// (the default MXCSR mode) as nearbyint does.
inline float int8_query_quantize(const float* y, int D, int8_t* qi) {
  float a = 0.f;
  bool finite = true;
  int d0 = 0;
#ifdef MK_ISA_AVX2
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 am = _mm256_setzero_ps(), nf = _mm256_setzero_ps();
  for (; d0 + 8 <= D; d0 += 8) {
    const __m256 v = _mm256_loadu_ps(y + d0);
    am = _mm256_max_ps(am, _mm256_and_ps(v, absmask));
    nf = _mm256_add_ps(nf, _mm256_mul_ps(v, _mm256_setzero_ps()));  // NaN once any element is NaN or +-inf
  }
  alignas(32) float t[8], u[8];
  _mm256_store_ps(t, am);
  _mm256_store_ps(u, nf);
  for (int i = 0; i < 8; ++i) {
    a = std::max(a, t[i]);
    finite &= u[i] == 0.f;
  }
#endif
  for (int d = d0; d < D; ++d) {
    finite &= std::isfinite(y[d]);
    a = std::max(a, std::fabs(y[d]));
  }
  if (!finite) return std::numeric_limits<float>::quiet_NaN();
  if (!(a >= FLT_MIN)) {
    std::fill(qi, qi + D, int8_t(0));
    return 0.f;
  }
  const float inv = 127.f / a;
  int d = 0;
#ifdef MK_ISA_AVX2
  const __m256 iv = _mm256_set1_ps(inv);
  const __m256i hi = _mm256_set1_epi32(127), lo = _mm256_set1_epi32(-127);
  for (; d + 8 <= D; d += 8) {
    const __m256i r0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(y + d), iv));
    const __m256i r = _mm256_max_epi32(lo, _mm256_min_epi32(hi, r0));
    const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));  // 8 x int16
    _mm_storel_epi64(reinterpret_cast<__m128i*>(qi + d), _mm_packs_epi16(w, w));                    // 8 x int8
  }
#endif
  for (; d < D; ++d) {
    const float r = std::nearbyint(y[d] * inv);  // round half to even (the default rounding mode)
    qi[d] = int8_t(std::min(127.f, std::max(-127.f, r)));
  }
  return a / 127.f;
}

// <a, b> over D floats (8 partial sums in the AVX2 / AVX-512 builds; the zero-point term is exact math, so only
// its rounding order differs from the reference's)
inline float int8_query_dot(const float* a, const float* b, int D) {
  float s = 0.f;
  int d = 0;
#ifdef MK_ISA_AVX2
  __m256 acc = _mm256_setzero_ps();
  for (; d + 8 <= D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc);
  alignas(32) float t[8];
  _mm256_store_ps(t, acc);
  for (int i = 0; i < 8; ++i) s += t[i];
#endif
  for (; d < D; ++d) s += a[d] * b[d];
  return s;
}

constexpr int kQ8Chunk = 32;  // bytes of codes per integer step (one 256-bit register)

// The integer-dot primitives of one build: Acc holds 8 int32 partial sums of one key row.
#if defined(MK_ISA_AVX512)
struct Q8Ops {
  using Acc = __m256i;
  static Acc zero() { return _mm256_setzero_si256(); }
  // 32 code bytes (n < 32: the first n, zeros after; masked, so nothing past the row is read)
  static __m256i load(const uint8_t* p, int n) {
    return n >= kQ8Chunk ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                         : _mm256_maskz_loadu_epi8(__mmask32((uint64_t(1) << n) - 1), p);
  }
  template <int BITS, int T>
  static __m256i plane(__m256i b) {
    if constexpr (BITS == 8) return b;
    else return _mm256_and_si256(T == 0 ? b : _mm256_srli_epi16(b, BITS * T), _mm256_set1_epi8((1 << BITS) - 1));
  }
  template <int BITS>
  static Acc dot(Acc acc, __m256i codes, const int8_t* q) {
    return _mm256_dpbusd_epi32(acc, codes, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));
  }
};
#elif defined(MK_ISA_AVX2)
struct Q8Ops {
  using Acc = __m256i;
  static Acc zero() { return _mm256_setzero_si256(); }
  static __m256i load(const uint8_t* p, int n) {
    if (n >= kQ8Chunk) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    alignas(32) uint8_t t[kQ8Chunk] = {};
    std::memcpy(t, p, size_t(n));
    return _mm256_load_si256(reinterpret_cast<const __m256i*>(t));
  }
  template <int BITS, int T>
  static __m256i plane(__m256i b) {
    if constexpr (BITS == 8) return b;
    else return _mm256_and_si256(T == 0 ? b : _mm256_srli_epi16(b, BITS * T), _mm256_set1_epi8((1 << BITS) - 1));
  }
  template <int BITS>
  static Acc dot(Acc acc, __m256i codes, const int8_t* q) {
    const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
    if constexpr (BITS == 8) {
      // codes up to 255: int16 on both sides (maddubs would saturate), int32 pair sums
      const __m256i c0 = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(codes));
      const __m256i c1 = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(codes, 1));
      const __m256i q0 = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(qv));
      const __m256i q1 = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(qv, 1));
      return _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_madd_epi16(c0, q0), _mm256_madd_epi16(c1, q1)));
    } else {
      // codes < 16: |c0 q0 + c1 q1| <= 3810, no int16 saturation
      const __m256i p16 = _mm256_maddubs_epi16(codes, qv);
      return _mm256_add_epi32(acc, _mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
    }
  }
};
#else
struct Q8Ops {
  struct Acc { int32_t s; };
  struct Bytes { uint8_t b[kQ8Chunk]; };
  static Acc zero() { return Acc{0}; }
  static Bytes load(const uint8_t* p, int n) {
    Bytes x{};
    std::memcpy(x.b, p, size_t(std::min(n, kQ8Chunk)));
    return x;
  }
  template <int BITS, int T>
  static Bytes plane(Bytes x) {
    if constexpr (BITS != 8)
      for (int i = 0; i < kQ8Chunk; ++i) x.b[i] = uint8_t((x.b[i] >> (BITS * T)) & ((1 << BITS) - 1));
    return x;
  }
  template <int BITS>
  static Acc dot(Acc acc, const Bytes& c, const int8_t* q) {
    int32_t s = 0;
    for (int i = 0; i < kQ8Chunk; ++i) s += int32_t(c.b[i]) * int32_t(q[i]);
    return Acc{acc.s + s};
  }
};
#endif

// Totals of 8 accumulators (one per key) into out[0..8).
#ifdef MK_ISA_AVX2
// per 128-bit half: [x0 + x2, y0 + y2, x1 + x3, y1 + y3]
inline __m256i q8_pair(__m256i x, __m256i y) {
  return _mm256_add_epi32(_mm256_unpacklo_epi32(x, y), _mm256_unpackhi_epi32(x, y));
}

inline void q8_reduce8(const __m256i* a, int32_t* out) {
  // interleave-and-add tree: 21 instructions for 8 keys instead of a horizontal sum per key
  const __m256i ab = q8_pair(a[0], a[1]), cd = q8_pair(a[2], a[3]), ef = q8_pair(a[4], a[5]),
                gh = q8_pair(a[6], a[7]);
  const __m256i abcd = _mm256_add_epi32(_mm256_unpacklo_epi64(ab, cd), _mm256_unpackhi_epi64(ab, cd));
  const __m256i efgh = _mm256_add_epi32(_mm256_unpacklo_epi64(ef, gh), _mm256_unpackhi_epi64(ef, gh));
  const __m256i s = _mm256_add_epi32(_mm256_permute2x128_si256(abcd, efgh, 0x20),
                                     _mm256_permute2x128_si256(abcd, efgh, 0x31));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), s);
}
#else
inline void q8_reduce8(const Q8Ops::Acc* a, int32_t* out) {
  for (int k = 0; k < 8; ++k) out[k] = a[k].s;
}
#endif

// The query row as P planes of int8 (see the header comment): qp[t * Bp + i] = qi[P*i + t], zero past D; Bp = the
// row's bytes rounded up to kQ8Chunk.
template <int BITS>
inline void int8_query_planes(const int8_t* qi, int D, int Bp, int8_t* qp) {
  constexpr int P = 8 / BITS;
  int i0 = 0;  // bytes done
#ifdef MK_ISA_AVX2
  if constexpr (P > 1) {
    // 16 elements at a time: one byte shuffle groups them by plane (element P*i + t -> plane t), 16 / P per plane
    alignas(16) int8_t ctl[16], t16[16];
    for (int t = 0, o = 0; t < P; ++t)
      for (int i = 0; i < 16 / P; ++i) ctl[o++] = int8_t(P * i + t);
    const __m128i c = _mm_load_si128(reinterpret_cast<const __m128i*>(ctl));
    for (; P * i0 + 16 <= D; i0 += 16 / P) {
      _mm_store_si128(reinterpret_cast<__m128i*>(t16),
                      _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qi + P * i0)), c));
      for (int t = 0; t < P; ++t) std::memcpy(qp + t * Bp + i0, t16 + t * (16 / P), size_t(16 / P));
    }
  }
#endif
  for (int t = 0; t < P; ++t)
    for (int i = i0; i < Bp; ++i) {
      const int d = P * i + t;
      qp[t * Bp + i] = d < D ? qi[d] : int8_t(0);
    }
}

// isum[j] = sum_d qi_d c_jd for keys j < n (rows of rb bytes), query planes qp (Bp bytes per plane).
#ifdef MK_ISA_AVX2
// Several short rows per register (int2 / int4 rows of 8 or 16 bytes): W-byte registers, 4 products per 32-bit
// lane as in Q8Ops (vpdpbusd; AVX2: vpmaddubsw + vpmaddwd by ones, codes < 16 so no int16 saturation).
#ifdef MK_ISA_AVX512
struct Q8Wide {
  static constexpr int W = 64;
  using V = __m512i;
  static V loadq(const int8_t* p) { return _mm512_load_si512(p); }
  static V load(const uint8_t* p, int nb) {
    return nb >= W ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi8((uint64_t(1) << nb) - 1, p);
  }
  static V plane(V b, int shift, int bits) {
    return _mm512_and_si512(_mm512_srli_epi16(b, shift), _mm512_set1_epi8(char((1 << bits) - 1)));
  }
  static V dot(V acc, V codes, V q) { return _mm512_dpbusd_epi32(acc, codes, q); }
  static V zero() { return _mm512_setzero_si512(); }
  static V add_pairs(V a) { return _mm512_add_epi32(a, _mm512_shuffle_epi32(a, _MM_PERM_CDAB)); }
  static V add_halves(V a) { return _mm512_add_epi32(a, _mm512_shuffle_epi32(a, _MM_PERM_BADC)); }
  static void store(int32_t* out, V a) { _mm512_store_si512(out, a); }
};
#else
struct Q8Wide {
  static constexpr int W = 32;
  using V = __m256i;
  static V loadq(const int8_t* p) { return _mm256_load_si256(reinterpret_cast<const __m256i*>(p)); }
  static V load(const uint8_t* p, int nb) {
    if (nb >= W) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    alignas(32) uint8_t t[W] = {};
    std::memcpy(t, p, size_t(nb));
    return _mm256_load_si256(reinterpret_cast<const __m256i*>(t));
  }
  static V plane(V b, int shift, int bits) {
    return _mm256_and_si256(_mm256_srli_epi16(b, shift), _mm256_set1_epi8(char((1 << bits) - 1)));
  }
  static V dot(V acc, V codes, V q) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(codes, q), _mm256_set1_epi16(1)));
  }
  static V zero() { return _mm256_setzero_si256(); }
  static V add_pairs(V a) { return _mm256_add_epi32(a, _mm256_shuffle_epi32(a, _MM_SHUFFLE(2, 3, 0, 1))); }
  static V add_halves(V a) { return _mm256_add_epi32(a, _mm256_shuffle_epi32(a, _MM_SHUFFLE(1, 0, 3, 2))); }
  static void store(int32_t* out, V a) { _mm256_store_si256(reinterpret_cast<__m256i*>(out), a); }
};
#endif

// Short rows (rb = 8 or 16 bytes, int4 / int2 codes): KP = W / rb consecutive keys per load (rows are adjacent in
// the cache), the query planes repeated KP times, one integer dot per plane for all of them; key k's sum is the
// sum of its rb / 4 (2 or 4) lanes, gathered by in-register shuffle-adds.
template <int BITS>
inline void int8_query_dots_short(const int8_t* qp, int Bp, const uint8_t* K, int rb, int n, int32_t* isum) {
  using O = Q8Wide;
  constexpr int P = 8 / BITS;
  const int KP = O::W / rb, Lk = rb / 4;
  alignas(64) int8_t rep[P * O::W];
  for (int t = 0; t < P; ++t)
    for (int k = 0; k < KP; ++k) std::memcpy(rep + t * O::W + k * rb, qp + t * Bp, size_t(rb));
  typename O::V qv[P];
  for (int t = 0; t < P; ++t) qv[t] = O::loadq(rep + t * O::W);
  alignas(64) int32_t lanes[O::W / 4];
  for (int j0 = 0; j0 < n; j0 += KP) {
    const int nk = std::min(KP, n - j0);
    const typename O::V b = O::load(K + int64_t(j0) * rb, nk * rb);
    typename O::V a = O::zero();
    for (int t = 0; t < P; ++t) a = O::dot(a, O::plane(b, BITS * t, BITS), qv[t]);
    a = O::add_pairs(a);
    if (Lk >= 4) a = O::add_halves(a);
    O::store(lanes, a);
    for (int k = 0; k < nk; ++k) isum[j0 + k] = lanes[k * Lk];
  }
}
#endif

template <int BITS>
inline void int8_query_dots(const int8_t* qp, int Bp, const uint8_t* K, int64_t rb, int n, int32_t* isum) {
  constexpr int P = 8 / BITS;
#ifdef MK_ISA_AVX2
  // (32-byte rows run faster one per 256-bit register with the 8-key reduction below: measured, int4 at D = 64)
  if (BITS < 8 && (rb == 8 || rb == 16)) {
    int8_query_dots_short<BITS>(qp, Bp, K, int(rb), n, isum);
    return;
  }
#endif
  for (int j0 = 0; j0 < n; j0 += 8) {
    Q8Ops::Acc acc[8];
    for (int k = 0; k < 8; ++k) {
      acc[k] = Q8Ops::zero();
      if (j0 + k >= n) continue;
      const uint8_t* row = K + (j0 + k) * rb;
      for (int c = 0; c < rb; c += kQ8Chunk) {
        const auto b = Q8Ops::load(row + c, int(std::min<int64_t>(kQ8Chunk, rb - c)));
        acc[k] = Q8Ops::template dot<BITS>(acc[k], Q8Ops::template plane<BITS, 0>(b), qp + c);
        if constexpr (P >= 2)
          acc[k] = Q8Ops::template dot<BITS>(acc[k], Q8Ops::template plane<BITS, 1>(b), qp + Bp + c);
        if constexpr (P == 4) {
          acc[k] = Q8Ops::template dot<BITS>(acc[k], Q8Ops::template plane<BITS, 2>(b), qp + 2 * Bp + c);
          acc[k] = Q8Ops::template dot<BITS>(acc[k], Q8Ops::template plane<BITS, 3>(b), qp + 3 * Bp + c);
        }
      }
    }
    int32_t out[8];
    q8_reduce8(acc, out);
    for (int k = 0; k < 8 && j0 + k < n; ++k) isum[j0 + k] = out[k];
  }
}

// Per-thread buffers of the mode (rows of int8 planes, integer sums); sized on first use.
struct Int8QueryScratch {
  std::vector<int8_t> qi, qp;
  std::vector<int32_t> isum;
  std::vector<float> sq, ks, kz, y, zb;
  void ensure(int R, int D, int Bp) {
    if (int(sq.size()) < R) { sq.resize(R); zb.resize(R); }
    if (y.size() < size_t(R) * D) y.resize(size_t(R) * D);
    if (qi.size() < size_t(D)) qi.resize(D);
    if (qp.size() < size_t(R) * 4 * Bp) qp.resize(size_t(R) * 4 * Bp);
    if (isum.size() < size_t(DKB) + 8) isum.resize(DKB + 8);
    const size_t nk = std::max<size_t>(DKB, size_t(D));
    if (ks.size() < nk) { ks.resize(nk); kz.resize(nk); }
  }
  static Int8QueryScratch& get() {
    static thread_local Int8QueryScratch s;
    return s;
  }
};

// Quantizes the R rows Y (stride ldy) into planes; sq per row.
template <int BITS>
inline void int8_query_rows(Int8QueryScratch& w, const float* Y, int ldy, int R, int D, int Bp) {
  for (int r = 0; r < R; ++r) {
    w.sq[r] = int8_query_quantize(Y + int64_t(r) * ldy, D, w.qi.data());
    int8_query_planes<BITS>(w.qi.data(), D, Bp, w.qp.data() + size_t(r) * 4 * Bp);
  }
}

template <int BITS>
inline void int8_query_channel_f(const float* Y, int ldy, int R, const uint8_t* K, int64_t rb, int n, int D,
                                 float* S, int lds, const float* add) {
  const int Bp = int((rb + kQ8Chunk - 1) / kQ8Chunk * kQ8Chunk);
  Int8QueryScratch& w = Int8QueryScratch::get();
  w.ensure(R, D, Bp);
  int8_query_rows<BITS>(w, Y, ldy, R, D, Bp);
  for (int r = 0; r < R; ++r) {
    int8_query_dots<BITS>(w.qp.data() + size_t(r) * 4 * Bp, Bp, K, rb, n, w.isum.data());
    float* s = S + int64_t(r) * lds;
    for (int j = 0; j < n; ++j) s[j] = w.sq[r] * float(w.isum[j]) + add[r];
  }
}

// Channel-axis keys: Y = the rows' queries with this token group's scales folded in (y_d = x_d s_Gd), add[r] =
// sum_d x_d z_Gd; S[r][j] = sq_r * sum_d qi_rd c_jd + add[r] for keys j < n of K (row stride rb bytes).
inline void qk_int8_query_channel(Fmt f, const float* Y, int ldy, int R, const uint8_t* K, int64_t rb, int n, int D,
                                  float* S, int lds, const float* add) {
  switch (f) {
    case Fmt::INT8: int8_query_channel_f<8>(Y, ldy, R, K, rb, n, D, S, lds, add); break;
    case Fmt::INT4: int8_query_channel_f<4>(Y, ldy, R, K, rb, n, D, S, lds, add); break;
    default: int8_query_channel_f<2>(Y, ldy, R, K, rb, n, D, S, lds, add); break;
  }
}

template <int BITS>
inline void int8_query_token_f(const float* X, int ldx, int R, const uint8_t* K, int64_t rb, int n, int D,
                               const uint16_t* s16, const uint16_t* z16, float* S, int lds) {
  const int Bp = int((rb + kQ8Chunk - 1) / kQ8Chunk * kQ8Chunk);
  Int8QueryScratch& w = Int8QueryScratch::get();
  w.ensure(R, D, Bp);
  int8_query_rows<BITS>(w, X, ldx, R, D, Bp);
  float* ks = w.ks.data();
  float* kz = w.kz.data();
  halves_to_floats(s16, n, ks);
  if (z16) halves_to_floats(z16, n, kz);
  else std::fill(kz, kz + n, 0.f);
  for (int r = 0; r < R; ++r) {
    const float* x = X + int64_t(r) * ldx;
    float xs = 0.f;
    for (int d = 0; d < D; ++d) xs += x[d];  // once per row and block
    int8_query_dots<BITS>(w.qp.data() + size_t(r) * 4 * Bp, Bp, K, rb, n, w.isum.data());
    float* s = S + int64_t(r) * lds;
    for (int j = 0; j < n; ++j) s[j] = w.sq[r] * (ks[j] * float(w.isum[j])) + kz[j] * xs;
  }
}

// Token-axis keys with several channel groups per row (gs < D): one integer sum per (key, group), scalar.
inline void int8_query_token_groups(Fmt f, const float* X, int ldx, int R, const uint8_t* K, int64_t rb, int n, int D,
                                    int gs, const uint16_t* s16, const uint16_t* z16, float* S, int lds) {
  Int8QueryScratch& w = Int8QueryScratch::get();
  w.ensure(R, D, kQ8Chunk);
  const int ngr = D / gs;
  for (int r = 0; r < R; ++r) {
    const float* x = X + int64_t(r) * ldx;
    const float sq = int8_query_quantize(x, D, w.qi.data());
    float* s = S + int64_t(r) * lds;
    for (int j = 0; j < n; ++j) {
      const uint8_t* row = K + j * rb;
      float acc = 0.f;
      for (int g = 0; g < ngr; ++g) {
        int32_t is = 0;
        float xs = 0.f;
        for (int d = g * gs; d < (g + 1) * gs; ++d) {
          is += int32_t(w.qi[d]) * int32_t(raw_scalar(f, row, d));
          xs += x[d];
        }
        acc += sq * (half_to_float(s16[j * ngr + g]) * float(is)) + (z16 ? half_to_float(z16[j * ngr + g]) : 0.f) * xs;
      }
      s[j] = acc;
    }
  }
}

// Token-axis keys (scale and zero per key and channel group, float16 [n][D / gs]): S[r][j] = the token-axis score
// above for the rows X (the queries times the softmax scale, stride ldx).
inline void qk_int8_query_token(Fmt f, const float* X, int ldx, int R, const uint8_t* K, int64_t rb, int n, int D,
                                int gs, const uint16_t* s16, const uint16_t* z16, float* S, int lds) {
  if (gs != D) {
    int8_query_token_groups(f, X, ldx, R, K, rb, n, D, gs, s16, z16, S, lds);
    return;
  }
  switch (f) {
    case Fmt::INT8: int8_query_token_f<8>(X, ldx, R, K, rb, n, D, s16, z16, S, lds); break;
    case Fmt::INT4: int8_query_token_f<4>(X, ldx, R, K, rb, n, D, s16, z16, S, lds); break;
    default: int8_query_token_f<2>(X, ldx, R, K, rb, n, D, s16, z16, S, lds); break;
  }
}

// Scores of the cache's keys [j0, j0 + n) of kv row bh (codes from kb0, rows of rb bytes) for the R query rows Q
// (times the softmax scale, stride ldq) into S (row stride lds): the token- or channel-axis formula above. Blocks
// of channel-axis keys are split at token-group boundaries (each group folds its own scales into the query).
inline void int8_query_block_scores(const AttnParams& p, const float* Q, int ldq, int R, int64_t bh, int64_t j0,
                                    int n, const uint8_t* kb0, int64_t rb, float* S, int lds) {
  const Segment& sg = p.cache;
  const int D = p.D, gs = sg.group_size;
  if (!sg.k_channel) {
    const int ngr = D / gs;
    const uint16_t* s16 = sg.k_scale + (bh * sg.capacity + j0) * ngr;
    const uint16_t* z16 = sg.k_zero ? sg.k_zero + (bh * sg.capacity + j0) * ngr : nullptr;
    qk_int8_query_token(sg.k_fmt, Q, ldq, R, kb0, rb, n, D, gs, s16, z16, S, lds);
    return;
  }
  Int8QueryScratch& w = Int8QueryScratch::get();
  w.ensure(R, D, kQ8Chunk);
  const int64_t nkg = (sg.capacity + gs - 1) / gs;
  for (int s0 = 0; s0 < n;) {
    const int64_t g = (j0 + s0) / gs;
    const int ns = int(std::min<int64_t>(n - s0, (g + 1) * gs - (j0 + s0)));
    const uint16_t* s16 = sg.k_scale + (bh * nkg + g) * D;
    const uint16_t* z16 = sg.k_zero ? sg.k_zero + (bh * nkg + g) * D : nullptr;
    float* sf = w.ks.data();
    float* zf = w.kz.data();
    halves_to_floats(s16, D, sf);
    if (z16) halves_to_floats(z16, D, zf);
    else std::fill(zf, zf + D, 0.f);
    for (int r = 0; r < R; ++r) {
      const float* x = Q + int64_t(r) * ldq;
      float* y = w.y.data() + int64_t(r) * D;
      for (int d = 0; d < D; ++d) y[d] = x[d] * sf[d];
      w.zb[r] = int8_query_dot(x, zf, D);
    }
    qk_int8_query_channel(sg.k_fmt, w.y.data(), D, R, kb0 + s0 * rb, rb, ns, D, S + s0, lds, w.zb.data());
    s0 += ns;
  }
}

}  // namespace MK_IMPL_NS
}  // namespace cpu
}  // namespace malloc_kernels
