// The float-tile Q K^T and P V of the fused CPU attention, written once over a lane trait (ISA-neutral: no
// intrinsics here), in the including build's namespace MK_IMPL_NS; each SIMD build's tiles header (tiles_avx2.h,
// tiles_avx512.h, tiles_neon.h) defines its lane trait and instantiates them.
#pragma once

#include <cstdint>

namespace malloc_kernels {
namespace cpu {
namespace MK_IMPL_NS {

// The float-tile Q K^T and P V, one body for every vector width. `L` is a lane trait: T (the vector), W (floats
// per vector), zero(), set1(x), fmadd(a, b, c) = a * b + c, load(p) / store(p, x) of W floats, part_load(p, d, Dp) /
// part_store(p, d, Dp, x) of the lanes of a padded row of Dp floats from d (all W, or fewer at the row's end; Dp is
// a multiple of the build's kLanes, and a lane past the row's end is neither read nor written), sums4(s, a0, a1,
// a2, a3, add) (s[i] = the lanes of a_i added, + add) and reduce(x) (all lanes added). Lanes8 (tiles_avx2.h) serves
// the AVX2 build, Lanes16 (tiles_avx512.h, masked row ends) the AVX-512 build, Lanes4 (tiles_neon.h) the NEON build.

// S[r][j] = <Q[r], K[j]> (+ add[r] if add), r < R, j < n, over Dp (a multiple of kLanes) elements.
template <class L>
inline void qk_dots_lanes(const float* Q, int ldq, int R, const float* K, int64_t ldk, int n, int Dp, float* S,
                          int lds, const float* add) {
  using T = typename L::T;
  int r0 = 0;
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
      T a0 = L::zero(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
      for (int d = 0; d < Dp; d += L::W) {
        const T x = L::part_load(qa, d, Dp), y = L::part_load(qb, d, Dp);
        const T k0v = L::part_load(k0, d, Dp), k1v = L::part_load(k0 + ldk, d, Dp);
        const T k2v = L::part_load(k0 + 2 * ldk, d, Dp), k3v = L::part_load(k0 + 3 * ldk, d, Dp);
        a0 = L::fmadd(x, k0v, a0); b0 = L::fmadd(y, k0v, b0);
        a1 = L::fmadd(x, k1v, a1); b1 = L::fmadd(y, k1v, b1);
        a2 = L::fmadd(x, k2v, a2); b2 = L::fmadd(y, k2v, b2);
        a3 = L::fmadd(x, k3v, a3); b3 = L::fmadd(y, k3v, b3);
      }
      L::sums4(sa + j, a0, a1, a2, a3, aa);
      L::sums4(sb + j, b0, b1, b2, b3, ab);
    }
    for (; j < n; ++j) {
      T a0 = L::zero(), b0 = a0;
      for (int d = 0; d < Dp; d += L::W) {
        const T kv = L::part_load(K + j * ldk, d, Dp);
        a0 = L::fmadd(L::part_load(qa, d, Dp), kv, a0);
        b0 = L::fmadd(L::part_load(qb, d, Dp), kv, b0);
      }
      sa[j] = L::reduce(a0) + aa;
      sb[j] = L::reduce(b0) + ab;
    }
  }
  for (int r = r0; r < R; ++r) {
    const float* q = Q + int64_t(r) * ldq;
    float* s = S + int64_t(r) * lds;
    const float a = add ? add[r] : 0.f;
    int j = 0;
    for (; j + 4 <= n; j += 4) {
      const float* k0 = K + j * ldk;
      T a0 = L::zero(), a1 = a0, a2 = a0, a3 = a0;
      for (int d = 0; d < Dp; d += L::W) {
        const T qv = L::part_load(q, d, Dp);
        a0 = L::fmadd(qv, L::part_load(k0, d, Dp), a0);
        a1 = L::fmadd(qv, L::part_load(k0 + ldk, d, Dp), a1);
        a2 = L::fmadd(qv, L::part_load(k0 + 2 * ldk, d, Dp), a2);
        a3 = L::fmadd(qv, L::part_load(k0 + 3 * ldk, d, Dp), a3);
      }
      L::sums4(s + j, a0, a1, a2, a3, a);
    }
    for (; j < n; ++j) {
      T a0 = L::zero();
      for (int d = 0; d < Dp; d += L::W) a0 = L::fmadd(L::part_load(q, d, Dp), L::part_load(K + j * ldk, d, Dp), a0);
      s[j] = L::reduce(a0) + a;
    }
  }
}

// O[r][:] += sum_j P[r][j] * V[j][:]: 64 output floats per register block (64 / W accumulators), then the rest of
// the padded row one vector at a time.
template <class L>
inline void pv_accum_lanes(const float* P, int ldp, int R, int n, const float* V, int64_t ldv, int Dp, float* O,
                           int ldo) {
  using T = typename L::T;
  constexpr int C = 64 / L::W;
  for (int r = 0; r < R; ++r) {
    const float* p = P + int64_t(r) * ldp;
    float* o = O + int64_t(r) * ldo;
    int d = 0;
    for (; d + 64 <= Dp; d += 64) {
      T acc[C];
      for (int c = 0; c < C; ++c) acc[c] = L::load(o + d + L::W * c);
      for (int j = 0; j < n; ++j) {
        const T pj = L::set1(p[j]);
        const float* v = V + j * ldv + d;
        for (int c = 0; c < C; ++c) acc[c] = L::fmadd(pj, L::load(v + L::W * c), acc[c]);
      }
      for (int c = 0; c < C; ++c) L::store(o + d + L::W * c, acc[c]);
    }
    for (; d < Dp; d += L::W) {
      T acc = L::part_load(o, d, Dp);
      for (int j = 0; j < n; ++j) acc = L::fmadd(L::set1(p[j]), L::part_load(V + j * ldv, d, Dp), acc);
      L::part_store(o, d, Dp, acc);
    }
  }
}

}  // namespace MK_IMPL_NS
}  // namespace cpu
}  // namespace malloc_kernels
