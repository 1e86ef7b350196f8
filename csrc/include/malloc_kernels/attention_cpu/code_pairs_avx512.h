// AVX-512 form of the D = 64 code layout for one query row (decode): two consecutive keys per 512-bit register --
// key j in lanes 0..7, key j + 1 in lanes 8..15 -- so every and / convert / FMA of code_layout_avx2.h's one-row
// loops does two keys' work. Rows of consecutive keys are adjacent in the cache, so a pair is one 64-byte (int4) or
// 32-byte (int2) load. The query is the same 8 vectors duplicated into both halves; score sums and value
// accumulators fold the halves at the end (order of summation changes, products are the same).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "malloc_kernels/attention_cpu/code_layout_avx2.h"
#include "malloc_kernels/attention_cpu/lanes_avx2.h"

namespace malloc_kernels {
namespace cpu {
namespace MK_IMPL_NS {

inline __m256i load32(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline __m512 widen(__m256 x) { return _mm512_zextps256_ps512(x); }
inline __m256 fold_halves(__m512 a) { return _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1)); }

// The codes of keys j, j + 1 (rows at `row` and `row + rb`, rb = row_bytes(F, 64)) in Lanes512 registers.
template <Fmt F>
struct CodePair {
  __m512i lo, hi;
  CodePair(const uint8_t* row, int64_t rb) {
    if constexpr (F == Fmt::INT4) {
      lo = _mm512_loadu_si512(row);  // rb == 32: both rows
      hi = lo;
    } else if constexpr (F == Fmt::INT2) {
      lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row)));  // rb == 16
      hi = lo;
    } else {
      lo = _mm512_inserti64x4(_mm512_castsi256_si512(load32(row)), load32(row + rb), 1);
      hi = _mm512_inserti64x4(_mm512_castsi256_si512(load32(row + 32)), load32(row + rb + 32), 1);
    }
  }
  // Only the first nk (0..2) of the two keys exist (a block's last keys): masked loads, so nothing past the last
  // row is read (masked-out bytes neither fault nor count) and the missing key's lanes hold code 0.
  CodePair(const uint8_t* row, int64_t rb, int nk) {
    const __mmask16 m16 = __mmask16(nk >= 2 ? 0xFFFF : nk == 1 ? 0x00FF : 0);
    if constexpr (F == Fmt::INT4) {
      lo = _mm512_maskz_loadu_epi32(m16, row);
      hi = lo;
    } else if constexpr (F == Fmt::INT2) {
      lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m16, row));
      hi = lo;
    } else {
      const __mmask8 m0 = __mmask8(nk >= 1 ? 0xFF : 0), m1 = __mmask8(nk >= 2 ? 0xFF : 0);
      lo = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_maskz_loadu_epi32(m0, row)),
                              _mm256_maskz_loadu_epi32(m1, row + rb), 1);
      hi = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_maskz_loadu_epi32(m0, row + 32)),
                              _mm256_maskz_loadu_epi32(m1, row + rb + 32), 1);
    }
  }
  template <int T>
  __m512 get(const int32_t* mk) const {
    if constexpr (F == Fmt::INT4) {
      if constexpr (T == 7) return _mm512_cvtepi32_ps(_mm512_srli_epi32(lo, 28));
      else return _mm512_cvtepi32_ps(_mm512_and_si512(lo, _mm512_load_si512(mk + 16 * T)));
    } else if constexpr (F == Fmt::INT2) {
      return _mm512_cvtepi32_ps(_mm512_and_si512(lo, _mm512_load_si512(mk + 16 * T)));
    } else {
      const __m512i& x = T < 4 ? lo : hi;
      if constexpr ((T & 3) == 3) return _mm512_cvtepi32_ps(_mm512_srli_epi32(x, 24));
      else return _mm512_cvtepi32_ps(_mm512_and_si512(x, _mm512_load_si512(mk + 16 * T)));
    }
  }
};

inline __m256 lo8(__m512 a) { return _mm512_castps512_ps256(a); }
inline __m256 hi8(__m512 a) { return _mm512_extractf32x8_ps(a, 1); }

// Key k's sum (k = 0..15) in lane k, from a[i] = the lane partials of key 2i (lanes 0..7) and key 2i + 1 (lanes
// 8..15): three levels of shuffle + add (14 shuffles, 7 adds and one permute for 16 keys, where a horizontal add per
// key of four costs about 4 uops per key).
inline __m512 sum_halves16(const __m512* a) {
  __m512 b[4], c[2];
  // b[m], 128-bit chunk k: the 4 partials of key 4m + k
  for (int m = 0; m < 4; ++m)
    b[m] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * m], a[2 * m + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(a[2 * m], a[2 * m + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  // c[m], chunk k: lanes 0, 1 key 8m + k; lanes 2, 3 key 8m + 4 + k
  for (int m = 0; m < 2; ++m)
    c[m] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * m], b[2 * m + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(b[2 * m], b[2 * m + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  // e, chunk k: lane i = key 4i + k
  const __m512 e = _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_ps(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, e);
}

// qk_code_layout_r1<F, Lanes256> with two keys per register: S[j] = <qp, code_j> + add. Sixteen keys per step (eight
// key pairs, one accumulator each, reduced together by sum_halves16), then four keys per step for the rest.
template <Fmt F>
inline void qk_code_pairs_r1(const float* qp, const uint8_t* K, int64_t rb, int n, float* S, float add, int64_t pfo) {
  int j = 0;
  if (n >= 16) {
    __m512 q[8];
    for (int t = 0; t < 8; ++t) q[t] = _mm512_broadcast_f32x8(_mm256_loadu_ps(qp + 8 * t));
    const __m512 addv = _mm512_set1_ps(add);
    for (; j + 16 <= n; j += 16) {
      const int32_t* mk = launder(&kMasks<F, 16>.m[0][0]);
      const uint8_t* k0 = K + j * rb;
      prefetch_span(k0 + pfo, 16 * rb);
      __m512 a[8];
      for (int i = 0; i < 8; ++i) {
        const CodePair<F> c(k0 + 2 * i * rb, rb);
        __m512 x = _mm512_mul_ps(q[0], c.template get<0>(mk));
        for_t([&](auto T) {
          if constexpr (T > 0) x = _mm512_fmadd_ps(q[T], c.template get<T>(mk), x);
        });
        a[i] = x;
      }
      _mm512_storeu_ps(S + j, _mm512_add_ps(sum_halves16(a), addv));
    }
  }
  const __m128 addv = _mm_set1_ps(add);
  for (; j + 4 <= n; j += 4) {
    const int32_t* mk = launder(&kMasks<F, 16>.m[0][0]);
    const float* q = launder(qp);
    prefetch_span(K + j * rb + pfo, 4 * rb);
    const CodePair<F> c0(K + j * rb, rb), c1(K + (j + 2) * rb, rb);
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
#define MK_QP_T(T, A0, A1)                                                    \
  {                                                                           \
    const __m512 qv = _mm512_broadcast_f32x8(_mm256_loadu_ps(q + 8 * T));     \
    A0 = _mm512_fmadd_ps(qv, c0.template get<T>(mk), A0);                     \
    A1 = _mm512_fmadd_ps(qv, c1.template get<T>(mk), A1);                     \
  }
    MK_QP_T(0, a0, a1) MK_QP_T(1, b0, b1) MK_QP_T(2, a0, a1) MK_QP_T(3, b0, b1)
    MK_QP_T(4, a0, a1) MK_QP_T(5, b0, b1) MK_QP_T(6, a0, a1) MK_QP_T(7, b0, b1)
#undef MK_QP_T
    a0 = _mm512_add_ps(a0, b0);
    a1 = _mm512_add_ps(a1, b1);
    _mm_storeu_ps(S + j, _mm_add_ps(Lanes256::hsum4(lo8(a0), hi8(a0), lo8(a1), hi8(a1)), addv));
  }
  if (j < n) qk_code_layout_r1<F, Lanes256>(qp, K + j * rb, rb, n - j, S + j, add, pfo);
}

// pv_code_layout_r1<F, Lanes256, WM> with two keys per register: Op (8 vectors of 8) += sum_j pw_j (x) v_t(code_j).
// The weight vector of a key pair is one permute of the pair's 2 * ngr weights (lanes 8..15 index ngr further).
template <Fmt F, int WM>
inline void pv_code_pairs_r1(const float* pw, int ngr, const Lanes256::GI* gidx, const uint8_t* V, int64_t rb, int n,
                             float* Op, int64_t pfo) {
  const __m512i wi0 = _mm512_inserti64x4(_mm512_castsi256_si512(gidx[0]),
                                         _mm256_add_epi32(gidx[0], _mm256_set1_epi32(ngr)), 1);
  const __m512i wi1 = _mm512_inserti64x4(_mm512_castsi256_si512(gidx[1]),
                                         _mm256_add_epi32(gidx[1], _mm256_set1_epi32(ngr)), 1);
  // lanes 8..15 start at 0 and collect the odd keys; folded into Op at the end
  __m512 a0 = widen(_mm256_loadu_ps(Op)), a1 = widen(_mm256_loadu_ps(Op + 8)), a2 = widen(_mm256_loadu_ps(Op + 16)),
         a3 = widen(_mm256_loadu_ps(Op + 24)), a4 = widen(_mm256_loadu_ps(Op + 32)),
         a5 = widen(_mm256_loadu_ps(Op + 40)), a6 = widen(_mm256_loadu_ps(Op + 48)),
         a7 = widen(_mm256_loadu_ps(Op + 56));
  int j = 0;
  for (; j + 2 <= n; j += 2) {
    const int32_t* mk = launder(&kMasks<F, 16>.m[0][0]);
    prefetch_span(V + j * rb + pfo, 2 * rb);
    const CodePair<F> c(V + j * rb, rb);
    // the pair's weights: 2 * ngr <= 16 floats (pw is readable 16 floats past any key's first weight)
    const __m512 p2 = _mm512_loadu_ps(pw + j * ngr);
    const __m512 w0 = _mm512_permutexvar_ps(wi0, p2);
    const __m512 w1 = F == Fmt::INT8 && WM != 0 ? _mm512_permutexvar_ps(wi1, p2) : w0;
    a0 = _mm512_fmadd_ps(w0, c.template get<0>(mk), a0);
    a1 = _mm512_fmadd_ps(w0, c.template get<1>(mk), a1);
    a2 = _mm512_fmadd_ps(w0, c.template get<2>(mk), a2);
    a3 = _mm512_fmadd_ps(w0, c.template get<3>(mk), a3);
    a4 = _mm512_fmadd_ps(w1, c.template get<4>(mk), a4);
    a5 = _mm512_fmadd_ps(w1, c.template get<5>(mk), a5);
    a6 = _mm512_fmadd_ps(w1, c.template get<6>(mk), a6);
    a7 = _mm512_fmadd_ps(w1, c.template get<7>(mk), a7);
  }
  _mm256_storeu_ps(Op, fold_halves(a0)); _mm256_storeu_ps(Op + 8, fold_halves(a1));
  _mm256_storeu_ps(Op + 16, fold_halves(a2)); _mm256_storeu_ps(Op + 24, fold_halves(a3));
  _mm256_storeu_ps(Op + 32, fold_halves(a4)); _mm256_storeu_ps(Op + 40, fold_halves(a5));
  _mm256_storeu_ps(Op + 48, fold_halves(a6)); _mm256_storeu_ps(Op + 56, fold_halves(a7));
  if (j < n) pv_code_layout_r1<F, Lanes256, WM>(pw + j * ngr, ngr, gidx, V + j * rb, rb, n - j, Op, pfo);
}

// D = 64 one-row loops of the AVX-512 build: the key pairs above (RowLoops, code_layout_avx2.h).
template <Fmt F>
struct RowLoops<F, Lanes256> {
  static void qk(const float* qp, const uint8_t* K, int64_t rb, int n, float* S, float add, int64_t pfo) {
    qk_code_pairs_r1<F>(qp, K, rb, n, S, add, pfo);
  }
  template <int WM>
  static void pv(const float* pw, int ngr, const Lanes256::GI* gidx, const uint8_t* V, int64_t rb, int n, float* Op,
                 int64_t pfo) {
    pv_code_pairs_r1<F, WM>(pw, ngr, gidx, V, rb, n, Op, pfo);
  }
};

}  // namespace MK_IMPL_NS
}  // namespace cpu
}  // namespace malloc_kernels
