// The "code layout" of the low-bit decode (int8 / int4 / int2 rows of D = 8 * L codes), written once over the lanes
// type W (lanes_avx2.h: D = 32, 64, 128), AVX2 and AVX-512 builds. Used by from_codes_avx2.h.
//
// A stored row of D codes is read as packed 32-bit words and expanded into 8 vectors v_t (t = 0..7) of L lanes:
// lane c of v_t holds the code of element code_elem<F, L>(c, t) times 2^code_exp<F>(t), obtained with ONE and (or
// shift) of the words and an int -> float conversion: no per-element variable shifts and no shuffles in the inner
// loop. The query is stored once per (row, key group) in the same order and pre-multiplied by 2^-code_exp (exact: a
// power of two), so every product q_d * code_d is bit-identical to the natural computation and only the summation
// order changes; value accumulators live in the same layout and are scaled back (exactly) once per work item.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "malloc_kernels/attention_cpu/lanes_avx2.h"
#include "malloc_kernels/attention_cpu/tiles_avx2.h"

namespace malloc_kernels {
namespace cpu {
namespace MK_IMPL_NS {

// int8: word c of half h (h = t >> 2) holds elements 4L h + 4c .. 4L h + 4c + 3 (byte t & 3 of the word);
// int4 / int2: word (half-word) c holds elements 8c .. 8c + 7 (nibble / crumb t).
template <Fmt F, int L>
constexpr int code_elem(int c, int t) { return F == Fmt::INT8 ? 4 * L * (t >> 2) + 4 * c + (t & 3) : 8 * c + t; }
template <Fmt F>
constexpr int code_exp(int t) {
  return F == Fmt::INT4 ? (t < 7 ? 4 * t : 0) : F == Fmt::INT2 ? 2 * t : ((t & 3) < 3 ? 8 * (t & 3) : 0);
}
// The and-mask of vector t (0 where the vector is made by a shift instead).
template <Fmt F>
constexpr uint32_t code_mask(int t) {
  return F == Fmt::INT4 ? (t < 7 ? 0xFu << (4 * t) : 0u) : F == Fmt::INT2 ? 0x3u << (2 * t)
                                                                          : ((t & 3) < 3 ? 0xFFu << (8 * (t & 3)) : 0u);
}

// The same pointer, opaque to the optimiser: loads through it cannot be hoisted out of the loop that launders it.
template <class P>
inline P* launder(P* p) {
  asm("" : "+r"(p));
  return p;
}

// Software prefetch (into L1) of the 64-byte lines of [p, p + bytes). The decode loops below prefetch, next to the
// rows they read, the rows one key block ahead (at byte offset `pfo` from the row being read; 0 when there is no
// next block, which re-touches lines already in L1): a stream's rows of one block are about a 4 KiB page, and the
// hardware streamer stops at every page boundary, so without this each block would start with full-latency misses
// that the compute does not overlap.
inline void prefetch_span(const void* p, int64_t bytes) {
  for (int64_t l = 0; l < bytes; l += 64) _mm_prefetch(static_cast<const char*>(p) + l, _MM_HINT_T0);
}

template <Fmt F, int L>
struct MaskTable {
  alignas(64) int32_t m[8][L];
};
template <Fmt F, int L>
constexpr MaskTable<F, L> make_masks() {
  MaskTable<F, L> t{};
  for (int T = 0; T < 8; ++T)
    for (int c = 0; c < L; ++c) t.m[T][c] = int32_t(code_mask<F>(T));
  return t;
}
template <Fmt F, int L>
inline constexpr MaskTable<F, L> kMasks = make_masks<F, L>();

template <Fmt F, class W>
struct Codes {
  using V = typename W::F;
  typename W::I lo, hi;
  Codes() = default;
  explicit Codes(const uint8_t* row) {
    if constexpr (F == Fmt::INT4) {
      lo = W::words(row);  // D / 2 bytes = L words of 8 nibbles
      hi = lo;
    } else if constexpr (F == Fmt::INT2) {
      lo = W::halves(row);  // D / 4 bytes = L half-words of 8 crumbs, one per 32-bit lane
      hi = lo;
    } else {
      lo = W::words(row);  // D bytes = two sets of L words
      hi = W::words(row + 4 * W::L);
    }
  }
  // The and-masks of the 8 vectors. The inner loops read them through launder() so that they stay memory
  // operands of the and: held in registers they would push the accumulators out to the stack (GCC does that).
  static const int32_t* masks() { return &kMasks<F, W::L>.m[0][0]; }
  template <int T>
  V get(const int32_t* mk) const {
    if constexpr (F == Fmt::INT4) {
      // nibbles 0..6 masked in place (c * 2^4t < 2^31: positive, 4 significant bits, converted exactly); the top
      // nibble by a shift, so its sign bit never reaches the conversion.
      if constexpr (T == 7) return W::cvt(W::template srli<28>(lo));
      else return W::cvt(W::andm(lo, mk + T * W::L));
    } else if constexpr (F == Fmt::INT2) {
      return W::cvt(W::andm(lo, mk + T * W::L));
    } else {
      const auto& x = T < 4 ? lo : hi;
      if constexpr ((T & 3) == 3) return W::cvt(W::template srli<24>(x));
      else return W::cvt(W::andm(x, mk + T * W::L));
    }
  }
  template <int T>
  V get() const { return get<T>(masks()); }
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
// step, two accumulators per key (even / odd t) so that the FMA chains are short next to the step's work (one per
// key when a vector is two registers: Lanes256x2 on AVX2's 16 registers).
template <Fmt F, class W>
inline void qk_code_layout_r1(const float* qp, const uint8_t* K, int64_t rb, int n, float* S, float add,
                              int64_t pfo) {
  using V = typename W::F;
  constexpr int L = W::L;
  constexpr bool kSplit = !std::is_same_v<W, Lanes256x2>;
  const __m128 addv = _mm_set1_ps(add);
  int j = 0;
  for (; j + 4 <= n; j += 4) {
    const int32_t* mk = launder(Codes<F, W>::masks());
    const float* q = launder(qp);
    const uint8_t* k0 = K + j * rb;
    prefetch_span(k0 + pfo, 4 * rb);
    const Codes<F, W> c0(k0), c1(k0 + rb), c2(k0 + 2 * rb), c3(k0 + 3 * rb);
    V a0 = W::zero(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
#define MK_QK_T(T, A0, A1, A2, A3)                                  \
  {                                                                 \
    const V qv = W::load(q + L * T);                                \
    A0 = W::fma(qv, c0.template get<T>(mk), A0);                    \
    A1 = W::fma(qv, c1.template get<T>(mk), A1);                    \
    A2 = W::fma(qv, c2.template get<T>(mk), A2);                    \
    A3 = W::fma(qv, c3.template get<T>(mk), A3);                    \
  }
    if constexpr (kSplit) {
      MK_QK_T(0, a0, a1, a2, a3) MK_QK_T(1, b0, b1, b2, b3) MK_QK_T(2, a0, a1, a2, a3) MK_QK_T(3, b0, b1, b2, b3)
      MK_QK_T(4, a0, a1, a2, a3) MK_QK_T(5, b0, b1, b2, b3) MK_QK_T(6, a0, a1, a2, a3) MK_QK_T(7, b0, b1, b2, b3)
      a0 = W::add(a0, b0); a1 = W::add(a1, b1); a2 = W::add(a2, b2); a3 = W::add(a3, b3);
    } else {
      MK_QK_T(0, a0, a1, a2, a3) MK_QK_T(1, a0, a1, a2, a3) MK_QK_T(2, a0, a1, a2, a3) MK_QK_T(3, a0, a1, a2, a3)
      MK_QK_T(4, a0, a1, a2, a3) MK_QK_T(5, a0, a1, a2, a3) MK_QK_T(6, a0, a1, a2, a3) MK_QK_T(7, a0, a1, a2, a3)
    }
#undef MK_QK_T
    _mm_storeu_ps(S + j, _mm_add_ps(W::hsum4(a0, a1, a2, a3), addv));
  }
  for (; j < n; ++j) {
    const Codes<F, W> c0(K + j * rb);
    V a0 = W::zero();
    for_t([&](auto T) { a0 = W::fma(W::load(qp + L * T), c0.template get<T>(), a0); });
    S[j] = W::hsum(a0) + add;
  }
}

// n rows of codes expanded into a float tile in code layout (row stride D = 8L): shared by several query rows.
template <Fmt F, class W>
inline void expand_code_layout(const uint8_t* K, int64_t rb, int n, float* tile, int64_t pfo) {
  for (int j = 0; j < n; ++j) {
    if (j % 2 == 0) prefetch_span(K + j * rb + pfo, 2 * rb);
    const Codes<F, W> c(K + j * rb);
    float* t = tile + int64_t(j) * 8 * W::L;
    for_t([&](auto T) { W::store(t + W::L * T, c.template get<T>()); });
  }
}

template <Fmt F, int T, class V>
inline V code_weight(const V& w0, const V& w1) {
  if constexpr (F == Fmt::INT8) return T < 4 ? w0 : w1;
  else return w0;
}

// Op (code layout, 8 vectors) += sum_j pw_j (x) v_t(code_j), from the codes (one query row). gidx[H]: the weight
// index of the vectors with t >> 2 == H (int4/int2: the same for every t).
template <Fmt F, class W, int WM>
inline void pv_code_layout_r1(const float* pw, int ngr, const typename W::GI* gidx, const uint8_t* V, int64_t rb,
                              int n, float* Op, int64_t pfo) {
  using X = typename W::F;
  constexpr int L = W::L;
  // eight named accumulators: an array of vectors indexed from a lambda ends up on the stack (GCC)
  X a0 = W::load(Op), a1 = W::load(Op + L), a2 = W::load(Op + 2 * L), a3 = W::load(Op + 3 * L),
    a4 = W::load(Op + 4 * L), a5 = W::load(Op + 5 * L), a6 = W::load(Op + 6 * L), a7 = W::load(Op + 7 * L);
  for (int j = 0; j < n; ++j) {
    const int32_t* mk = launder(Codes<F, W>::masks());
    if (j % 2 == 0) prefetch_span(V + j * rb + pfo, 2 * rb);
    const Codes<F, W> c(V + j * rb);
    const X w0 = W::template wvec<WM>(pw + j * ngr, gidx[0]);
    const X w1 = F == Fmt::INT8 && WM != 0 ? W::template wvec<WM>(pw + j * ngr, gidx[1]) : w0;
    a0 = W::fma(w0, c.template get<0>(mk), a0);
    a1 = W::fma(w0, c.template get<1>(mk), a1);
    a2 = W::fma(w0, c.template get<2>(mk), a2);
    a3 = W::fma(w0, c.template get<3>(mk), a3);
    a4 = W::fma(w1, c.template get<4>(mk), a4);
    a5 = W::fma(w1, c.template get<5>(mk), a5);
    a6 = W::fma(w1, c.template get<6>(mk), a6);
    a7 = W::fma(w1, c.template get<7>(mk), a7);
  }
  W::store(Op, a0); W::store(Op + L, a1); W::store(Op + 2 * L, a2); W::store(Op + 3 * L, a3);
  W::store(Op + 4 * L, a4); W::store(Op + 5 * L, a5); W::store(Op + 6 * L, a6); W::store(Op + 7 * L, a7);
}

// Several query rows (NR <= 4 of them, a "quad") straight from the codes: every code vector is expanded once and
// feeds NR FMAs, so no float tile is written and re-read. S[r * lds + j] = <qp_r, code_j> + add[r] (qp: NR rows of
// D floats in code layout; add: NR floats). One key per step, two accumulators per row (even / odd t).
template <Fmt F, class W, int NR>
inline void qk_code_rows(const float* qp, const float* add, const uint8_t* K, int64_t rb, int n, float* S, int lds,
                         int64_t pfo) {
  using V = typename W::F;
  constexpr int L = W::L, D = 8 * L;
  alignas(16) float av[4] = {0.f, 0.f, 0.f, 0.f};
  for (int r = 0; r < NR; ++r) av[r] = add[r];
  const __m128 addv = _mm_load_ps(av);
  for (int j = 0; j < n; ++j) {
    const int32_t* mk = launder(Codes<F, W>::masks());
    const float* q = launder(qp);
    if (j % 2 == 0) prefetch_span(K + j * rb + pfo, 2 * rb);
    const Codes<F, W> c0(K + j * rb);
    V a0 = W::zero(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
#define MK_QR_T(T, A0, A1, A2, A3)                                                     \
  {                                                                                    \
    const V x = c0.template get<T>(mk);                                                \
    A0 = W::fma(W::load(q + L * T), x, A0);                                            \
    if constexpr (NR > 1) A1 = W::fma(W::load(q + D + L * T), x, A1);                  \
    if constexpr (NR > 2) A2 = W::fma(W::load(q + 2 * D + L * T), x, A2);              \
    if constexpr (NR > 3) A3 = W::fma(W::load(q + 3 * D + L * T), x, A3);              \
  }
    MK_QR_T(0, a0, a1, a2, a3) MK_QR_T(1, b0, b1, b2, b3) MK_QR_T(2, a0, a1, a2, a3) MK_QR_T(3, b0, b1, b2, b3)
    MK_QR_T(4, a0, a1, a2, a3) MK_QR_T(5, b0, b1, b2, b3) MK_QR_T(6, a0, a1, a2, a3) MK_QR_T(7, b0, b1, b2, b3)
#undef MK_QR_T
    alignas(16) float sv[4];
    _mm_store_ps(sv, _mm_add_ps(W::hsum4(W::add(a0, b0), W::add(a1, b1), W::add(a2, b2), W::add(a3, b3)), addv));
    for (int r = 0; r < NR; ++r) S[r * lds + j] = sv[r];
  }
}

// Runtime row count (1..4) -> the templates above.
template <Fmt F, class W>
inline void qk_code_quad(int nr, const float* qp, const float* add, const uint8_t* K, int64_t rb, int n, float* S,
                         int lds, int64_t pfo) {
  switch (nr) {
    case 1: qk_code_rows<F, W, 1>(qp, add, K, rb, n, S, lds, pfo); break;
    case 2: qk_code_rows<F, W, 2>(qp, add, K, rb, n, S, lds, pfo); break;
    case 3: qk_code_rows<F, W, 3>(qp, add, K, rb, n, S, lds, pfo); break;
    default: qk_code_rows<F, W, 4>(qp, add, K, rb, n, S, lds, pfo); break;
  }
}

// Two query rows from an expanded tile, half of the code layout (vectors 4H..4H+3) at a time: each tile load feeds
// two FMAs and the 8 accumulators stay in registers.
template <Fmt F, class W, int WM>
inline void pv_code_tile2(const float* pwa, const float* pwb, int ngr, const typename W::GI* gidx, const float* tile,
                          int n, float* Opa, float* Opb) {
  using V = typename W::F;
  constexpr int L = W::L, D = 8 * L;
  for (int H = 0; H < 2; ++H) {
    const typename W::GI& gi = gidx[F == Fmt::INT8 ? H : 0];
    V a[4], b[4];
    for (int t = 0; t < 4; ++t) {
      a[t] = W::load(Opa + 4 * L * H + L * t);
      b[t] = W::load(Opb + 4 * L * H + L * t);
    }
    for (int j = 0; j < n; ++j) {
      const float* v = tile + int64_t(j) * D + 4 * L * H;
      const V wa = W::template wvec<WM>(pwa + j * ngr, gi);
      const V wb = W::template wvec<WM>(pwb + j * ngr, gi);
      for (int t = 0; t < 4; ++t) {
        const V x = W::load(v + L * t);
        a[t] = W::fma(wa, x, a[t]);
        b[t] = W::fma(wb, x, b[t]);
      }
    }
    for (int t = 0; t < 4; ++t) {
      W::store(Opa + 4 * L * H + L * t, a[t]);
      W::store(Opb + 4 * L * H + L * t, b[t]);
    }
  }
}

// Same from an expanded tile, one row (several query rows share one expansion).
template <Fmt F, class W, int WM>
inline void pv_code_tile(const float* pw, int ngr, const typename W::GI* gidx, const float* tile, int n, float* Op) {
  using V = typename W::F;
  constexpr int L = W::L, D = 8 * L;
  V acc[8];
  for (int t = 0; t < 8; ++t) acc[t] = W::load(Op + L * t);
  for (int j = 0; j < n; ++j) {
    const float* v = tile + int64_t(j) * D;
    const V w0 = W::template wvec<WM>(pw + j * ngr, gidx[0]);
    const V w1 = F == Fmt::INT8 ? W::template wvec<WM>(pw + j * ngr, gidx[1]) : w0;
    for_t([&](auto T) { acc[T] = W::fma(code_weight<F, T>(w0, w1), W::load(v + L * T), acc[T]); });
  }
  for (int t = 0; t < 8; ++t) W::store(Op + L * t, acc[t]);
}

// The one-query-row loops of the decode (R == 1) for lanes W; the AVX-512 build specialises D = 64
// (code_pairs_avx512.h: two keys per register).
template <Fmt F, class W>
struct RowLoops {
  static void qk(const float* qp, const uint8_t* K, int64_t rb, int n, float* S, float add, int64_t pfo) {
    qk_code_layout_r1<F, W>(qp, K, rb, n, S, add, pfo);
  }
  template <int WM>
  static void pv(const float* pw, int ngr, const typename W::GI* gidx, const uint8_t* V, int64_t rb, int n,
                 float* Op, int64_t pfo) {
    pv_code_layout_r1<F, W, WM>(pw, ngr, gidx, V, rb, n, Op, pfo);
  }
};

// The several-query-row loops of the decode (R >= 2 rows of one kv head: GQA heads x queries) for lanes W: rows
// in groups of up to 4, each key's codes expanded once per group. Q K^T straight from the codes (qk_code_quad);
// S[r * lds + j] = <qp_r, code_j> + add[r] (qp: R rows of D floats in code layout).
template <Fmt F, class W>
inline void qk_code_row_quads(int R, const float* qp, const float* add, const uint8_t* K, int64_t rb, int n, float* S,
                              int lds, int64_t pfo) {
  constexpr int D = 8 * W::L;
  for (int r0 = 0; r0 < R; r0 += 4)
    qk_code_quad<F, W>(std::min(4, R - r0), qp + r0 * D, add + r0, K, rb, n, S + r0 * lds, lds, r0 == 0 ? pfo : 0);
}

// P V through float tiles of KB keys, each expanded once and shared by every row (tile + weights stay in L1): Op
// rows (code layout, stride D) += sum_j pw_rj (x) v_t(code_j) (pw row r at r * pwld, ngr weights per key); tile:
// scratch of KB * D floats.
template <Fmt F, class W, int WM>
inline void pv_code_row_tiles(int R, const float* pw, int pwld, int ngr, const typename W::GI* gidx, const uint8_t* V,
                              int64_t rb, int n, float* Op, float* tile, int64_t pfo) {
  constexpr int D = 8 * W::L;
  for (int v0 = 0; v0 < n; v0 += KB) {
    const int nv = std::min(KB, n - v0);
    expand_code_layout<F, W>(V + v0 * rb, rb, nv, tile, pfo);
    const float* pw0 = pw + v0 * ngr;
    int r = 0;
    for (; r + 2 <= R; r += 2)
      pv_code_tile2<F, W, WM>(pw0 + int64_t(r) * pwld, pw0 + int64_t(r + 1) * pwld, ngr, gidx, tile, nv, Op + r * D,
                              Op + (r + 1) * D);
    for (; r < R; ++r) pv_code_tile<F, W, WM>(pw0 + int64_t(r) * pwld, ngr, gidx, tile, nv, Op + r * D);
  }
}

// The several-row loops of the decode for lanes W (the two above); the AVX-512 build specialises D = 64 and 128
// (code_rows_avx512.h: wider key steps with one shared reduction, two keys per register at D = 64).
template <Fmt F, class W>
struct RowsLoops {
  static void qk(int R, const float* qp, const float* add, const uint8_t* K, int64_t rb, int n, float* S, int lds,
                 int64_t pfo) {
    qk_code_row_quads<F, W>(R, qp, add, K, rb, n, S, lds, pfo);
  }
  template <int WM>
  static void pv(int R, const float* pw, int pwld, int ngr, const typename W::GI* gidx, const uint8_t* V,
                 int64_t rb, int n, float* Op, float* tile, int64_t pfo) {
    pv_code_row_tiles<F, W, WM>(R, pw, pwld, ngr, gidx, V, rb, n, Op, tile, pfo);
  }
};

}  // namespace MK_IMPL_NS
}  // namespace cpu
}  // namespace malloc_kernels
