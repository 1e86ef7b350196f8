// Register-tiled micro-kernels of the fused CPU attention for chunks with many query rows (append / HSTU requests,
// Lq >= 8 or GQA groups): query rows sit in the vector LANES, so the whole block step is vertical.
//
// Layouts (Rp = rows padded to a multiple of the vector width W; padding rows hold zero queries and are dropped):
//   Qt[d][Rp]  queries (pre-scaled), transposed once per chunk
//   St[j][Rp]  scores, then weights, of a block of keys
//   Ot[d][Rp]  output accumulators, transposed back once per chunk
// K and V tiles stay in natural [key][d] layout (dequantized once per (user, kv head, key block) into an L1 tile and
// shared by every row of the chunk), read through broadcasts:
//   S^T[j] = sum_d K[j][d] * Qt[d]       (J keys x RV row vectors of accumulators, one Qt load per d per RV)
//   O^T[d] += sum_j V[j][d] * P^T[j]     (DB dims x RV row vectors of accumulators, one P^T load per key per RV)
// The register block is J x RV (or DB x RV) accumulators, so each broadcast element feeds RV FMAs and each loaded
// row vector J (DB) FMAs: the loops are FMA-bound, not load-bound. The online softmax (FlashAttention-2, arXiv
// 2307.08691) is vertical in this layout: the running max / sum of W rows are one vector each, no horizontal
// reductions anywhere. One templated body serves AVX2 (VecY: 8 lanes, 16 registers), AVX-512 (VecZ: 16 lanes,
// 32 registers) and NEON (VecN in tiles_neon.h: 4 lanes, 32 registers); the traits carry the register-block sizes.
// RowVec is the build's trait for every chunk (the AVX-512 build takes VecZ for chunks of more than 8 rows).
#pragma once

#include <limits>

#include <cstdint>

#include "malloc_kernels/attention_cpu/scalar.h"
#ifdef MK_ISA_AVX2
#include <immintrin.h>

#include "malloc_kernels/simd_avx2.h"
#endif

namespace malloc_kernels {
namespace cpu {
namespace MK_IMPL_NS {

// Chunks with at least this many rows (query heads x queries) take the register-tiled path.
constexpr int kTileRows = 8;

#ifdef MK_ISA_AVX2
// 8 rows per vector (AVX2, and the AVX-512 build's short chunks).
struct VecY {
  using T = __m256;
  static constexpr int W = 8;
  static constexpr int QK_J1 = 8, QK_J2 = 4;   // keys per QK register block with 1 / 2 row vectors
  static constexpr int PV_D1 = 8, PV_D2 = 4;   // dims per PV register block with 1 / 2 row vectors
  static T zero() { return _mm256_setzero_ps(); }
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, T x) { _mm256_storeu_ps(p, x); }
  static T set1(float x) { return _mm256_set1_ps(x); }
  static T bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static T fmadd(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static T add(T a, T b) { return _mm256_add_ps(a, b); }
  static T sub(T a, T b) { return _mm256_sub_ps(a, b); }
  static T mul(T a, T b) { return _mm256_mul_ps(a, b); }
  static T div(T a, T b) { return _mm256_div_ps(a, b); }
  static T max(T s, T m) { return _mm256_max_ps(s, m); }  // a NaN s gives m (the running max never turns NaN)
  static T exp(T x) { return simd_avx2::exp256(x); }
  // lanes of y where x == -inf set to 0
  static T zero_where_neg_inf(T x, T y) {
    return _mm256_andnot_ps(_mm256_cmp_ps(x, _mm256_set1_ps(NEG_INF), _CMP_EQ_OQ), y);
  }
  // bit i: lane i is NaN or +inf (not s < +inf)
  static unsigned nonfinite(T s) {
    return unsigned(_mm256_movemask_ps(_mm256_cmp_ps(s, _mm256_set1_ps(POS_INF), _CMP_NLT_UQ)));
  }
  static unsigned neq(T a, T b) { return unsigned(_mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_NEQ_UQ))); }
};
using RowVec = VecY;
#endif

#ifdef MK_ISA_AVX512
// exp(x) with 16 lanes: exp256's range reduction, polynomial and constants (simd_avx2::ExpConsts); inputs below
// -87.3 (and -inf) give exactly 0, inputs above 88.3 give +inf (exp256's rule: SiLU's s / (1 + e^{-s}) must be -0
// at s ~ -1e36, not ~-0.01).
inline __m512 exp512(__m512 x) {
  using E = simd_avx2::ExpConsts;
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(E::lo), _CMP_GE_OQ);
  const __mmask16 overflow = _mm512_cmp_ps_mask(x, _mm512_set1_ps(E::hi), _CMP_GT_OQ);
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(E::hi)), _mm512_set1_ps(E::lo));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(E::log2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(E::ln2_lo), _mm512_fnmadd_ps(n, _mm512_set1_ps(E::ln2_hi), x));
  __m512 p = _mm512_set1_ps(E::c5);
  for (const float c : {E::c4, E::c3, E::c2, E::c1, E::c0}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mask_mov_ps(_mm512_maskz_mul_ps(keep, p, _mm512_castsi512_ps(e)), overflow,
                            _mm512_set1_ps(std::numeric_limits<float>::infinity()));
}

// 16 rows per vector (AVX-512).
struct VecZ {
  using T = __m512;
  static constexpr int W = 16;
  static constexpr int QK_J1 = 16, QK_J2 = 8;
  static constexpr int PV_D1 = 16, PV_D2 = 8;
  static T zero() { return _mm512_setzero_ps(); }
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, T x) { _mm512_storeu_ps(p, x); }
  static T set1(float x) { return _mm512_set1_ps(x); }
  static T bcast(const float* p) { return _mm512_set1_ps(*p); }
  static T fmadd(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static T add(T a, T b) { return _mm512_add_ps(a, b); }
  static T sub(T a, T b) { return _mm512_sub_ps(a, b); }
  static T mul(T a, T b) { return _mm512_mul_ps(a, b); }
  static T div(T a, T b) { return _mm512_div_ps(a, b); }
  static T max(T s, T m) { return _mm512_max_ps(s, m); }
  static T exp(T x) { return exp512(x); }
  static T zero_where_neg_inf(T x, T y) {
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(NEG_INF), _CMP_NEQ_UQ), y);
  }
  static unsigned nonfinite(T s) { return unsigned(_mm512_cmp_ps_mask(s, _mm512_set1_ps(POS_INF), _CMP_NLT_UQ)); }
  static unsigned neq(T a, T b) { return unsigned(_mm512_cmp_ps_mask(a, b, _CMP_NEQ_UQ)); }
};
#endif

template <class V>
struct RowTiles {
  using T = typename V::T;
  static constexpr int W = V::W;

  // St[j * ldst + w] = sum_{d < D} K[j * ldk + d] * Qt[d * ldq + w] for J keys, RV * W rows (one register block).
  // DP > 0: the tile's row stride and dim count are the compile-time DP (ldk == D == DP), so the J broadcast
  // addresses are immediate displacements of one pointer; with a run-time stride the J row offsets outgrow the
  // general registers (16 keys on AVX-512) and every broadcast first moves its offset back from a vector register,
  // a uop on the port the FMAs use.
  template <int J, int RV, int DP>
  static void qk_block(const float* K, int64_t ldk_rt, const float* Qt, int ldq, int D_rt, float* St, int ldst) {
    const int64_t ldk = DP > 0 ? DP : ldk_rt;
    const int D = DP > 0 ? DP : D_rt;
    T acc[J][RV];
    for (int j = 0; j < J; ++j)
      for (int v = 0; v < RV; ++v) acc[j][v] = V::zero();
    for (int d = 0; d < D; ++d) {
      T q[RV];
      for (int v = 0; v < RV; ++v) q[v] = V::load(Qt + int64_t(d) * ldq + v * W);
      for (int j = 0; j < J; ++j) {
        const T k = V::bcast(K + j * ldk + d);
        for (int v = 0; v < RV; ++v) acc[j][v] = V::fmadd(k, q[v], acc[j][v]);
      }
    }
    for (int j = 0; j < J; ++j)
      for (int v = 0; v < RV; ++v) V::store(St + int64_t(j) * ldst + v * W, acc[j][v]);
  }

  // qk_block over n keys: blocks of J, the rest in halving blocks.
  template <int J, int RV, int DP>
  static void qk_keys(const float* K, int64_t ldk, int n, const float* Qt, int ldq, int D, float* St, int ldst) {
    int j = 0;
    for (; j + J <= n; j += J) qk_block<J, RV, DP>(K + j * ldk, ldk, Qt, ldq, D, St + int64_t(j) * ldst, ldst);
    if constexpr (J > 1) {
      if (j < n) qk_keys<J / 2, RV, DP>(K + j * ldk, ldk, n - j, Qt, ldq, D, St + int64_t(j) * ldst, ldst);
    }
  }

  // Scores of n keys for nv row vectors (Rp = nv * W rows): St[j][r] = <K[j], Q[r]>. DP: see qk_block.
  template <int DP>
  static void qk(const float* K, int64_t ldk, int n, const float* Qt, int Rp, int D, float* St) {
    const int nv = Rp / W;
    int v = 0;
    for (; v + 2 <= nv; v += 2) qk_keys<V::QK_J2, 2, DP>(K, ldk, n, Qt + v * W, Rp, D, St + v * W, Rp);
    if (v < nv) qk_keys<V::QK_J1, 1, DP>(K, ldk, n, Qt + v * W, Rp, D, St + v * W, Rp);
  }

  // Ot[d][w] += sum_{j < n} V[j][d] * Pt[j][w] for DB dims from d0, RV * W rows (one register block).
  template <int DB, int RV>
  static void pv_block(const float* Vv, int64_t ldv, int n, const float* Pt, int ldp, float* Ot, int ldo) {
    T acc[DB][RV];
    for (int d = 0; d < DB; ++d)
      for (int v = 0; v < RV; ++v) acc[d][v] = V::load(Ot + int64_t(d) * ldo + v * W);
    for (int j = 0; j < n; ++j) {
      T p[RV];
      for (int v = 0; v < RV; ++v) p[v] = V::load(Pt + int64_t(j) * ldp + v * W);
      for (int d = 0; d < DB; ++d) {
        const T x = V::bcast(Vv + j * ldv + d);
        for (int v = 0; v < RV; ++v) acc[d][v] = V::fmadd(x, p[v], acc[d][v]);
      }
    }
    for (int d = 0; d < DB; ++d)
      for (int v = 0; v < RV; ++v) V::store(Ot + int64_t(d) * ldo + v * W, acc[d][v]);
  }

  // pv_block over the D dims (a multiple of 4, the smallest kLanes): blocks of DB, the rest in halving blocks.
  template <int DB, int RV>
  static void pv_dims(const float* Vv, int64_t ldv, int n, int D, const float* Pt, int ldp, float* Ot, int ldo) {
    int d = 0;
    for (; d + DB <= D; d += DB) pv_block<DB, RV>(Vv + d, ldv, n, Pt, ldp, Ot + int64_t(d) * ldo, ldo);
    if constexpr (DB > 4) {
      if (d < D) pv_dims<DB / 2, RV>(Vv + d, ldv, n, D - d, Pt, ldp, Ot + int64_t(d) * ldo, ldo);
    }
  }

  // O^T += V^T P^T over n keys for nv row vectors.
  static void pv(const float* Vv, int64_t ldv, int n, int D, const float* Pt, int Rp, float* Ot) {
    const int nv = Rp / W;
    int v = 0;
    for (; v + 2 <= nv; v += 2) pv_dims<V::PV_D2, 2>(Vv, ldv, n, D, Pt + v * W, Rp, Ot + v * W, Rp);
    if (v < nv) pv_dims<V::PV_D1, 1>(Vv, ldv, n, D, Pt + v * W, Rp, Ot + v * W, Rp);
  }

  // Online softmax step over a block (scores St[j][Rp], j < n) for every row vector: running max m and sum l
  // (one float per row), O^T columns rescaled by exp(m_old - m_new), scores replaced by exp(s - m_new). Lanes whose
  // max is still -inf (nothing visible yet) use 0 in its place, so their weights and alpha are exactly 0. Returns,
  // per row vector, the bits of rows that saw a NaN / +inf score (the non-finite rule, scalar.h).
  static void softmax(float* St, int Rp, int n, int D, float* m, float* l, float* Ot, uint8_t* bad) {
    for (int v = 0; v < Rp / W; ++v) {
      float* s0 = St + v * W;
      const T m_old = V::load(m + v * W);
      T mx = m_old;
      unsigned nf = 0;
      for (int j = 0; j < n; ++j) {
        const T s = V::load(s0 + int64_t(j) * Rp);
        nf |= V::nonfinite(s);
        mx = V::max(s, mx);
      }
      if (nf)
        for (int w = 0; w < W; ++w) bad[v * W + w] |= (nf >> w) & 1u;
      const T mu = V::zero_where_neg_inf(mx, mx);
      T sum = V::zero();
      for (int j = 0; j < n; ++j) {
        const T p = V::exp(V::sub(V::load(s0 + int64_t(j) * Rp), mu));
        V::store(s0 + int64_t(j) * Rp, p);
        sum = V::add(sum, p);
      }
      if (V::neq(mx, m_old)) {
        const T alpha = V::exp(V::sub(m_old, mu));
        for (int d = 0; d < D; ++d) V::store(Ot + int64_t(d) * Rp + v * W, V::mul(alpha, V::load(Ot + int64_t(d) * Rp + v * W)));
        V::store(l + v * W, V::fmadd(alpha, V::load(l + v * W), sum));
        V::store(m + v * W, mx);
      } else {
        V::store(l + v * W, V::add(V::load(l + v * W), sum));
      }
    }
  }

  // HSTU step over a block: weights c_j * s / (1 + e^{-s}) (c = counts or null for ones), -inf scores give 0.
  static void silu(float* St, int Rp, int n, const float* cnt, uint8_t* bad) {
    const T one = V::set1(1.f);
    for (int v = 0; v < Rp / W; ++v) {
      float* s0 = St + v * W;
      unsigned nf = 0;
      for (int j = 0; j < n; ++j) {
        const T s = V::load(s0 + int64_t(j) * Rp);
        nf |= V::nonfinite(s);
        T w = V::zero_where_neg_inf(s, V::div(s, V::add(one, V::exp(V::sub(V::zero(), s)))));
        if (cnt) w = V::mul(w, V::set1(cnt[j]));
        V::store(s0 + int64_t(j) * Rp, w);
      }
      if (nf)
        for (int w = 0; w < W; ++w) bad[v * W + w] |= (nf >> w) & 1u;
    }
  }

  // St[j][:] += a[j] (log counts) for j < n.
  static void add_per_key(float* St, int Rp, int n, const float* a) {
    for (int j = 0; j < n; ++j) {
      const T x = V::set1(a[j]);
      for (int v = 0; v < Rp / W; ++v) V::store(St + int64_t(j) * Rp + v * W, V::add(x, V::load(St + int64_t(j) * Rp + v * W)));
    }
  }
};

}  // namespace MK_IMPL_NS
}  // namespace cpu
}  // namespace malloc_kernels
