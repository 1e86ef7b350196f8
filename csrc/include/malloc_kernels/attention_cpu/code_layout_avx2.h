// The D = 64 "code layout" building blocks of the low-bit decode (int8 / int4 / int2), AVX2 build: a row of codes
// expanded into 8 vectors by one and (or shift) + convert each, and the QK / PV loops over it. Used by
// from_codes_avx2.h.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <utility>

#include "malloc_kernels/attention_cpu/tiles_avx2.h"

namespace malloc_kernels {
namespace cpu {
namespace MK_IMPL_NS {

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

}  // namespace MK_IMPL_NS
}  // namespace cpu
}  // namespace malloc_kernels
