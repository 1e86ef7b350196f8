// AVX-512 form of the D = 64 code layout for several query rows of one kv head (GQA decode: the Hq / Hkv query
// heads of a kv head, times the queries of a short request): two consecutive keys per 512-bit register, as in the
// one-row loops of code_pairs_avx512.h (CodePair: key j in lanes 0..7, key j + 1 in lanes 8..15), and every key
// pair's codes expanded (and / convert) ONCE for a group of up to four rows, each expanded vector feeding one FMA
// per row. Replaces the 256-bit generic loops (RowsLoops, code_layout_avx2.h) of that head dim:
//   Q K^T: eight keys per step, 4 NR accumulators (row x key pair), reduced two rows at a time by sum_halves16
//          (one shared reduction per 16 (row, key) sums instead of a horizontal add per key);
//   P V:   straight from the codes (no float tile written and re-read), the value accumulators of every row in
//          registers: all 8 layout vectors for up to two rows, half of them (4 per pass) for three or four.
// D = 128 (Lanes512, already one key per 512-bit register): Q K^T in steps of 4 / 8 keys with one shared reduction
// (no horizontal add per key), P V straight from the codes the same way (no tile).
// Same products as the generic loops (q * code and p * s * code, exact powers of two folded as there); only the
// order of summation differs.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "malloc_kernels/attention_cpu/code_layout_avx2.h"
#include "malloc_kernels/attention_cpu/code_pairs_avx512.h"
#include "malloc_kernels/attention_cpu/lanes_avx2.h"

namespace malloc_kernels {
namespace cpu {
namespace MK_IMPL_NS {

template <class Fn, int... I>
inline void for_c_impl(Fn&& fn, std::integer_sequence<int, I...>) { (fn(std::integral_constant<int, I>{}), ...); }
// fn(std::integral_constant<int, i>) for i = 0..N-1, unrolled at compile time.
template <int N, class Fn>
inline void for_c(Fn&& fn) { for_c_impl(fn, std::make_integer_sequence<int, N>{}); }

// One step of qk_code_pairs_rows: keys j .. j + 7 (nk of them exist) for NR rows; rows r0, r0 + 1 of the scores
// are written at S + r * lds + j (nk entries each).
template <Fmt F, int NR>
__attribute__((always_inline)) inline void qk_pairs_rows_step(const float* qp, const __m512* addv, const uint8_t* k0,
                                                            int64_t rb, int nk, float* S, int lds) {
  const int32_t* mk = launder(&kMasks<F, 16>.m[0][0]);
  const float* q = launder(qp);
  const bool full = nk == 8;
  const CodePair<F> c0 = full ? CodePair<F>(k0, rb) : CodePair<F>(k0, rb, nk);
  const CodePair<F> c1 = full ? CodePair<F>(k0 + 2 * rb, rb) : CodePair<F>(k0 + 2 * rb, rb, nk - 2);
  const CodePair<F> c2 = full ? CodePair<F>(k0 + 4 * rb, rb) : CodePair<F>(k0 + 4 * rb, rb, nk - 4);
  const CodePair<F> c3 = full ? CodePair<F>(k0 + 6 * rb, rb) : CodePair<F>(k0 + 6 * rb, rb, nk - 6);
  // a[4 r + p]: row r, key pair p (keys 2p, 2p + 1 of the step in the two halves)
  __m512 a[4 * NR];
  for (int i = 0; i < 4 * NR; ++i) a[i] = _mm512_setzero_ps();
  for_t([&](auto T) {
    __m512 qv[NR];
    for_c<NR>([&](auto r) { qv[r] = _mm512_broadcast_f32x8(_mm256_loadu_ps(q + 64 * r + 8 * T)); });
    const __m512 x0 = c0.template get<T>(mk), x1 = c1.template get<T>(mk), x2 = c2.template get<T>(mk),
                 x3 = c3.template get<T>(mk);
    for_c<NR>([&](auto r) {
      a[4 * r] = _mm512_fmadd_ps(qv[r], x0, a[4 * r]);
      a[4 * r + 1] = _mm512_fmadd_ps(qv[r], x1, a[4 * r + 1]);
      a[4 * r + 2] = _mm512_fmadd_ps(qv[r], x2, a[4 * r + 2]);
      a[4 * r + 3] = _mm512_fmadd_ps(qv[r], x3, a[4 * r + 3]);
    });
  });
  const __mmask8 keep = __mmask8((1u << nk) - 1);
  for_c<(NR + 1) / 2>([&](auto h) {
    constexpr int r = 2 * h;
    // rows r, r + 1: lanes 8 r' + k of the sum = row r + r', key k
    __m512 b[8];
    for (int p = 0; p < 4; ++p) {
      b[p] = a[4 * r + p];
      b[4 + p] = r + 1 < NR ? a[4 * (r + 1) + p] : _mm512_setzero_ps();
    }
    const __m512 s = _mm512_add_ps(sum_halves16(b), addv[h]);
    float* s0 = S + r * lds;
    if (full) {
      _mm256_storeu_ps(s0, lo8(s));
      if (r + 1 < NR) _mm256_storeu_ps(s0 + lds, hi8(s));
    } else {
      _mm256_mask_storeu_ps(s0, keep, lo8(s));
      if (r + 1 < NR) _mm256_mask_storeu_ps(s0 + lds, keep, hi8(s));
    }
  });
}

// NR (2..4) query rows against n keys straight from the codes: S[r * lds + j] = <qp_r, code_j> + add[r] (qp: NR
// rows of 64 floats in code layout; add: NR floats). pfo: byte offset of the next block's rows (prefetched).
template <Fmt F, int NR>
inline void qk_code_pairs_rows(const float* qp, const float* add, const uint8_t* K, int64_t rb, int n, float* S,
                               int lds, int64_t pfo) {
  __m512 addv[(NR + 1) / 2];
  for (int h = 0; 2 * h < NR; ++h) {
    const __m256 lo = _mm256_set1_ps(add[2 * h]);
    const __m256 hi = 2 * h + 1 < NR ? _mm256_set1_ps(add[2 * h + 1]) : lo;
    addv[h] = _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1);
  }
  int j = 0;
  for (; j + 8 <= n; j += 8) {
    prefetch_span(K + j * rb + pfo, 8 * rb);
    qk_pairs_rows_step<F, NR>(qp, addv, K + j * rb, rb, 8, S + j, lds);
  }
  if (j < n) qk_pairs_rows_step<F, NR>(qp, addv, K + j * rb, rb, n - j, S + j, lds);
}

// The weight index of a key pair's value weight vector: lanes 0..7 index the first key's ngr weights through gi,
// lanes 8..15 the second key's (ngr further).
inline __m512i pair_weight_index(const __m256i& gi, int ngr) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(gi), _mm256_add_epi32(gi, _mm256_set1_epi32(ngr)), 1);
}

// One pass of pv_code_pairs_rows: layout vectors T0 .. T0 + TV - 1 of NR rows (accumulators in registers).
template <Fmt F, int WM, int NR, int T0, int TV>
inline void pv_pairs_rows_pass(const float* pw, int pwld, int ngr, const __m512i* wi, const uint8_t* V, int64_t rb,
                               int n, float* Op, int64_t pfo) {
  // int8 with several value groups: layout vectors 0..3 and 4..7 take different weight vectors (gidx[t >> 2])
  constexpr bool kTwoW = F == Fmt::INT8 && WM != 0 && TV == 8;
  __m512 a[TV * NR];
  for_c<NR>([&](auto r) {
    for_c<TV>([&](auto t) { a[TV * r + t] = widen(_mm256_loadu_ps(Op + 64 * r + 8 * (T0 + t))); });
  });
  // always inlined: called from two places (pairs, an odd last key), it would otherwise become a call per key pair
  // with the accumulators on the stack
  auto step = [&](const CodePair<F>& c, int j, __mmask16 wl) __attribute__((always_inline)) {
    const int32_t* mk = launder(&kMasks<F, 16>.m[0][0]);
    __m512 w[NR], w1[NR];
    for_c<NR>([&](auto r) {
      const __m512 p2 = _mm512_loadu_ps(pw + int64_t(r) * pwld + j * ngr);
      w[r] = _mm512_maskz_permutexvar_ps(wl, wi[T0 >> 2], p2);
      if constexpr (kTwoW) w1[r] = _mm512_maskz_permutexvar_ps(wl, wi[1], p2);
    });
    for_c<TV>([&](auto t) {
      const __m512 x = c.template get<T0 + t>(mk);
      for_c<NR>([&](auto r) {
        if constexpr (kTwoW && t >= 4) a[TV * r + t] = _mm512_fmadd_ps(w1[r], x, a[TV * r + t]);
        else a[TV * r + t] = _mm512_fmadd_ps(w[r], x, a[TV * r + t]);
      });
    });
  };
  int j = 0;
  for (; j + 2 <= n; j += 2) {
    if (T0 == 0) prefetch_span(V + j * rb + pfo, 2 * rb);
    step(CodePair<F>(V + j * rb, rb), j, __mmask16(0xFFFF));
  }
  // an odd last key: the missing key's codes and weights are both 0 (masked), so nothing past the block is used
  if (j < n) step(CodePair<F>(V + j * rb, rb, 1), j, __mmask16(0x00FF));
  for_c<NR>([&](auto r) {
    for_c<TV>([&](auto t) { _mm256_storeu_ps(Op + 64 * r + 8 * (T0 + t), fold_halves(a[TV * r + t])); });
  });
}

// Op rows (code layout, stride 64) += sum_j pw_rj (x) v_t(code_j) for NR (1..4) rows, two keys per register (pw
// row r at r * pwld; readable 16 floats past any key's first weight, as for pv_code_pairs_r1).
template <Fmt F, int WM, int NR>
inline void pv_code_pairs_rows(const float* pw, int pwld, int ngr, const Lanes256::GI* gidx, const uint8_t* V,
                               int64_t rb, int n, float* Op, int64_t pfo) {
  const __m512i wi[2] = {pair_weight_index(gidx[0], ngr), pair_weight_index(gidx[1], ngr)};
  if constexpr (NR <= 2) {
    pv_pairs_rows_pass<F, WM, NR, 0, 8>(pw, pwld, ngr, wi, V, rb, n, Op, pfo);
  } else {
    pv_pairs_rows_pass<F, WM, NR, 0, 4>(pw, pwld, ngr, wi, V, rb, n, Op, pfo);
    pv_pairs_rows_pass<F, WM, NR, 4, 4>(pw, pwld, ngr, wi, V, rb, n, Op, 0);
  }
}

// Runs body(std::integral_constant<int, NR>{}, r0, pf) over rows [0, R) in groups of up to four (NR = 1..4, a
// compile-time row count for the register blocking). Only the first group prefetches the next block (pf = pfo):
// the later groups read the same block, already in cache.
template <class Body>
inline void for_row_groups(int R, int64_t pfo, Body&& body) {
  for (int r0 = 0; r0 < R; r0 += 4) {
    const int64_t pf = r0 == 0 ? pfo : 0;
    switch (std::min(4, R - r0)) {
      case 1: body(std::integral_constant<int, 1>{}, r0, pf); break;
      case 2: body(std::integral_constant<int, 2>{}, r0, pf); break;
      case 3: body(std::integral_constant<int, 3>{}, r0, pf); break;
      default: body(std::integral_constant<int, 4>{}, r0, pf); break;
    }
  }
}

// D = 64 several-row loops of the AVX-512 build: the key pairs above, rows in groups of up to four.
template <Fmt F>
struct RowsLoops<F, Lanes256> {
  static void qk(int R, const float* qp, const float* add, const uint8_t* K, int64_t rb, int n, float* S, int lds,
                 int64_t pfo) {
    for_row_groups(R, pfo, [&](auto nr, int r0, int64_t pf) {
      constexpr int NR = decltype(nr)::value;
      if constexpr (NR == 1) {
        qk_code_pairs_r1<F>(qp + r0 * 64, K, rb, n, S + r0 * lds, add[r0], pf);
      } else {
        qk_code_pairs_rows<F, NR>(qp + r0 * 64, add + r0, K, rb, n, S + r0 * lds, lds, pf);
      }
    });
  }
  template <int WM>
  static void pv(int R, const float* pw, int pwld, int ngr, const Lanes256::GI* gidx, const uint8_t* V, int64_t rb,
                 int n, float* Op, float* /*tile*/, int64_t pfo) {
    for_row_groups(R, pfo, [&](auto nr, int r0, int64_t pf) {
      pv_code_pairs_rows<F, WM, decltype(nr)::value>(pw + int64_t(r0) * pwld, pwld, ngr, gidx, V, rb, n,
                                                     Op + r0 * 64, pf);
    });
  }
};

// The row a missing key reads (code 0): the longest D = 128 row (int8).
alignas(64) inline constexpr uint8_t kZeroRow[128] = {};

// D = 128 (Lanes512: one key per register, 16 lanes): one step of qk_code_rows512, KS keys x NR rows = up to 16
// (row, key) sums, one accumulator each (8 FMAs deep), reduced together: each pair of sums folded into the two halves
// of one register (two 128-bit shuffles and an add) and then sum_halves16 (lane KS r + k = row r, key k). Keys past
// the nk that exist read a zero row (code 0) and their sums are not stored.
template <Fmt F, int NR, int KS>
__attribute__((always_inline)) inline void qk_rows512_step(const float* qp, __m512 addv, const uint8_t* k0, int64_t rb,
                                                         int nk, float* S, int lds) {
  const int32_t* mk = launder(Codes<F, Lanes512>::masks());
  const float* q = launder(qp);
  const bool full = nk == KS;
  Codes<F, Lanes512> c[KS];
  for_c<KS>([&](auto k) { c[k] = Codes<F, Lanes512>(full || k < nk ? k0 + k * rb : kZeroRow); });
  __m512 a[16];
  for (int i = 0; i < 16; ++i) a[i] = _mm512_setzero_ps();
  for_t([&](auto T) {
    for_c<KS>([&](auto k) {
      const __m512 x = c[k].template get<T>(mk);
      for_c<NR>([&](auto r) {
        a[KS * r + k] = _mm512_fmadd_ps(_mm512_loadu_ps(q + 128 * r + 16 * T), x, a[KS * r + k]);
      });
    });
  });
  __m512 b[8];
  for_c<8>([&](auto i) {
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  });
  const __m512 s = _mm512_add_ps(sum_halves16(b), addv);
  const __mmask8 keep = __mmask8((1u << nk) - 1);
  for_c<NR>([&](auto r) {
    if constexpr (KS == 4) {
      const __m128 sr = _mm512_extractf32x4_ps(s, r);
      if (full) _mm_storeu_ps(S + r * lds, sr);
      else _mm_mask_storeu_ps(S + r * lds, keep, sr);
    } else {
      const __m256 sr = _mm512_extractf32x8_ps(s, r);
      if (full) _mm256_storeu_ps(S + r * lds, sr);
      else _mm256_mask_storeu_ps(S + r * lds, keep, sr);
    }
  });
}

// NR (2..4) query rows against n keys straight from the codes at D = 128: S[r * lds + j] = <qp_r, code_j> + add[r]
// (qp: NR rows of 128 floats in code layout). Eight keys per step for two rows, four for three or four.
template <Fmt F, int NR>
inline void qk_code_rows512(const float* qp, const float* add, const uint8_t* K, int64_t rb, int n, float* S, int lds,
                            int64_t pfo) {
  constexpr int KS = NR == 2 ? 8 : 4;
  alignas(64) float av[16] = {};
  for (int r = 0; r < NR; ++r)
    for (int k = 0; k < KS; ++k) av[KS * r + k] = add[r];
  const __m512 addv = _mm512_load_ps(av);
  int j = 0;
  for (; j + KS <= n; j += KS) {
    prefetch_span(K + j * rb + pfo, KS * rb);
    qk_rows512_step<F, NR, KS>(qp, addv, K + j * rb, rb, KS, S + j, lds);
  }
  if (j < n) qk_rows512_step<F, NR, KS>(qp, addv, K + j * rb, rb, n - j, S + j, lds);
}

// D = 128 P V for NR (1..4) rows straight from the codes (one key per register, no float tile written and re-read):
// layout vectors T0 .. T0 + TV - 1 of every row accumulated in registers, each key's codes expanded once.
template <Fmt F, int WM, int NR, int T0, int TV>
inline void pv_rows512_pass(const float* pw, int pwld, int ngr, const Lanes512::GI* gidx, const uint8_t* V,
                            int64_t rb, int n, float* Op, int64_t pfo) {
  constexpr bool kTwoW = F == Fmt::INT8 && WM != 0 && TV == 8;  // int8: vectors 4..7 take gidx[1]
  __m512 a[TV * NR];
  for_c<NR>([&](auto r) {
    for_c<TV>([&](auto t) { a[TV * r + t] = _mm512_loadu_ps(Op + 128 * r + 16 * (T0 + t)); });
  });
  for (int j = 0; j < n; ++j) {
    const int32_t* mk = launder(Codes<F, Lanes512>::masks());
    if (T0 == 0 && j % 2 == 0) prefetch_span(V + j * rb + pfo, 2 * rb);
    const Codes<F, Lanes512> c(V + j * rb);
    __m512 w[NR], w1[NR];
    for_c<NR>([&](auto r) {
      const float* pj = pw + int64_t(r) * pwld + j * ngr;
      w[r] = Lanes512::wvec<WM>(pj, gidx[T0 >> 2]);
      if constexpr (kTwoW) w1[r] = Lanes512::wvec<WM>(pj, gidx[1]);
    });
    for_c<TV>([&](auto t) {
      const __m512 x = c.template get<T0 + t>(mk);
      for_c<NR>([&](auto r) {
        if constexpr (kTwoW && t >= 4) a[TV * r + t] = _mm512_fmadd_ps(w1[r], x, a[TV * r + t]);
        else a[TV * r + t] = _mm512_fmadd_ps(w[r], x, a[TV * r + t]);
      });
    });
  }
  for_c<NR>([&](auto r) {
    for_c<TV>([&](auto t) { _mm512_storeu_ps(Op + 128 * r + 16 * (T0 + t), a[TV * r + t]); });
  });
}

template <Fmt F, int WM, int NR>
inline void pv_code_rows512(const float* pw, int pwld, int ngr, const Lanes512::GI* gidx, const uint8_t* V, int64_t rb,
                            int n, float* Op, int64_t pfo) {
  if constexpr (NR <= 2) {
    pv_rows512_pass<F, WM, NR, 0, 8>(pw, pwld, ngr, gidx, V, rb, n, Op, pfo);
  } else {
    pv_rows512_pass<F, WM, NR, 0, 4>(pw, pwld, ngr, gidx, V, rb, n, Op, pfo);
    pv_rows512_pass<F, WM, NR, 4, 4>(pw, pwld, ngr, gidx, V, rb, n, Op, 0);
  }
}

// D = 128 several-row loops of the AVX-512 build: the two above, rows in groups of up to four.
template <Fmt F>
struct RowsLoops<F, Lanes512> {
  static void qk(int R, const float* qp, const float* add, const uint8_t* K, int64_t rb, int n, float* S, int lds,
                 int64_t pfo) {
    for_row_groups(R, pfo, [&](auto nr, int r0, int64_t pf) {
      constexpr int NR = decltype(nr)::value;
      if constexpr (NR == 1) {
        qk_code_layout_r1<F, Lanes512>(qp + r0 * 128, K, rb, n, S + r0 * lds, add[r0], pf);
      } else {
        qk_code_rows512<F, NR>(qp + r0 * 128, add + r0, K, rb, n, S + r0 * lds, lds, pf);
      }
    });
  }
  template <int WM>
  static void pv(int R, const float* pw, int pwld, int ngr, const Lanes512::GI* gidx, const uint8_t* V, int64_t rb,
                 int n, float* Op, float* /*tile*/, int64_t pfo) {
    for_row_groups(R, pfo, [&](auto nr, int r0, int64_t pf) {
      pv_code_rows512<F, WM, decltype(nr)::value>(pw + int64_t(r0) * pwld, pwld, ngr, gidx, V, rb, n,
                                                  Op + r0 * 128, pf);
    });
  }
};

}  // namespace MK_IMPL_NS
}  // namespace cpu
}  // namespace malloc_kernels
