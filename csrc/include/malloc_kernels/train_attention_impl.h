// Implementation of train_attention.h, written once and compiled three times like the inference attention: portable
// (csrc/cpu/train_attention_portable.cpp), AVX2+FMA (csrc/cpu/train_attention_avx2.cpp) and AVX-512
// (csrc/cpu/train_attention_avx512.cpp), the last two under `#pragma GCC target`, chosen per call by
// csrc/cpu/train_attention.cpp (isa.h). Each translation unit defines MK_IMPL_NS and, for the AVX2 and AVX-512
// copies, MK_ISA_AVX2; the AVX-512 copy also MK_ISA_AVX512 (512-bit steps in rowdots / tiledots / rank_update).
//
// Layout of the work (per user b and kv head g, all query heads of g in turn): the user's keys and values are
// transposed once into zero-padded [D][Lp] tiles (Lp = L rounded up to 8), and query rows are taken R = 4 at a time,
// so the four products of a step are small register-blocked GEMMs over keys j with unit stride:
//   rowdots     S[r][j]  = sum_d X[r][d] tile[d][j]        (scores from K^T; the backward's dA from V^T)
//   tiledots    Y[r][d]  = alpha sum_j W[r][j] tile[d][j]  (o from A and V^T; dq from dS and K^T)
//   rank_update tile[d][j] += alpha sum_r X[r][d] W[r][j]  (dK^T from Q and dS; dV^T from dO and A)
// Each tile element is loaded once per block of 4 rows instead of once per row, and accumulators stay in registers
// (AVX2 float build: explicit intrinsics; the portable and float64 builds run the same loops in plain C++). The
// block's scratch (S, sig, A, dS: 4 x 4 x Lp) and the tiles stay in L1/L2 for recommender sequence lengths.
// The elementwise middle of a block is per kind: HSTU's SiLU (sigmoid via exp) and its derivative, or softmax's
// exp(s - max) / sum (forward, which also writes lse) and exp(s - lse) (dA - <do, o>) (backward).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include <omp.h>

#include "malloc_kernels/bias.h"
#include "malloc_kernels/train_attention.h"

#ifdef MK_ISA_AVX2
#include <immintrin.h>

#include "malloc_kernels/simd_avx2.h"
#endif

namespace malloc_kernels {
namespace train_attention {
namespace MK_IMPL_NS {

constexpr int R = 4;   // query rows per block

// sig[j] = 1 / (1 + exp(-s[j])), j < n.
template <typename T>
inline void sigmoid_row(const T* s, T* sig, int64_t n) {
  int64_t j = 0;
#ifdef MK_ISA_AVX2
  if constexpr (std::is_same_v<T, float>) {
    const __m256 one = _mm256_set1_ps(1.f);
    for (; j + 8 <= n; j += 8) {
      const __m256 e = simd_avx2::exp256(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_loadu_ps(s + j)));
      _mm256_storeu_ps(sig + j, _mm256_div_ps(one, _mm256_add_ps(one, e)));
    }
  }
#endif
  for (; j < n; ++j) sig[j] = T(1) / (T(1) + std::exp(-s[j]));
}

// e[j] = exp(s[j] - m), j < n; returns sum_j e[j].
template <typename T>
inline T exp_shift_row(const T* s, T m, T* e, int64_t n) {
  int64_t j = 0;
  T sum = T(0);
#ifdef MK_ISA_AVX2
  if constexpr (std::is_same_v<T, float>) {
    const __m256 mv = _mm256_set1_ps(m);
    __m256 acc = _mm256_setzero_ps();
    for (; j + 8 <= n; j += 8) {
      const __m256 x = simd_avx2::exp256(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
      _mm256_storeu_ps(e + j, x);
      acc = _mm256_add_ps(acc, x);
    }
    sum = simd_avx2::hsum(acc);
  }
#endif
  for (; j < n; ++j) {
    e[j] = std::exp(s[j] - m);
    sum += e[j];
  }
  return sum;
}

// S[r * Lp + j] = sum_d X[r][d] tile[d * Lp + j] for j < jp (a multiple of 8).
template <typename T>
inline void rowdots(const T* const* X, const T* tile, int64_t D, int64_t Lp, int64_t jp, T* S) {
#ifdef MK_ISA_AVX2
  if constexpr (std::is_same_v<T, float>) {
    int64_t jb = 0;
#ifdef MK_ISA_AVX512
    // 32 keys per step in two 512-bit tiles, four rows: 8 accumulators
    for (; jb + 32 <= jp; jb += 32) {
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, b0 = a0, b1 = a0, c0 = a0, c1 = a0, e0 = a0, e1 = a0;
      for (int64_t d = 0; d < D; ++d) {
        const __m512 t0 = _mm512_loadu_ps(tile + d * Lp + jb), t1 = _mm512_loadu_ps(tile + d * Lp + jb + 16);
        const __m512 x0 = _mm512_set1_ps(X[0][d]), x1 = _mm512_set1_ps(X[1][d]);
        const __m512 x2 = _mm512_set1_ps(X[2][d]), x3 = _mm512_set1_ps(X[3][d]);
        a0 = _mm512_fmadd_ps(x0, t0, a0); a1 = _mm512_fmadd_ps(x0, t1, a1);
        b0 = _mm512_fmadd_ps(x1, t0, b0); b1 = _mm512_fmadd_ps(x1, t1, b1);
        c0 = _mm512_fmadd_ps(x2, t0, c0); c1 = _mm512_fmadd_ps(x2, t1, c1);
        e0 = _mm512_fmadd_ps(x3, t0, e0); e1 = _mm512_fmadd_ps(x3, t1, e1);
      }
      _mm512_storeu_ps(S + jb, a0); _mm512_storeu_ps(S + jb + 16, a1);
      _mm512_storeu_ps(S + Lp + jb, b0); _mm512_storeu_ps(S + Lp + jb + 16, b1);
      _mm512_storeu_ps(S + 2 * Lp + jb, c0); _mm512_storeu_ps(S + 2 * Lp + jb + 16, c1);
      _mm512_storeu_ps(S + 3 * Lp + jb, e0); _mm512_storeu_ps(S + 3 * Lp + jb + 16, e1);
    }
#endif
    for (; jb + 16 <= jp; jb += 16) {
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0, c0 = a0, c1 = a0, e0 = a0, e1 = a0;
      for (int64_t d = 0; d < D; ++d) {
        const __m256 t0 = _mm256_loadu_ps(tile + d * Lp + jb), t1 = _mm256_loadu_ps(tile + d * Lp + jb + 8);
        const __m256 x0 = _mm256_broadcast_ss(X[0] + d), x1 = _mm256_broadcast_ss(X[1] + d);
        const __m256 x2 = _mm256_broadcast_ss(X[2] + d), x3 = _mm256_broadcast_ss(X[3] + d);
        a0 = _mm256_fmadd_ps(x0, t0, a0); a1 = _mm256_fmadd_ps(x0, t1, a1);
        b0 = _mm256_fmadd_ps(x1, t0, b0); b1 = _mm256_fmadd_ps(x1, t1, b1);
        c0 = _mm256_fmadd_ps(x2, t0, c0); c1 = _mm256_fmadd_ps(x2, t1, c1);
        e0 = _mm256_fmadd_ps(x3, t0, e0); e1 = _mm256_fmadd_ps(x3, t1, e1);
      }
      _mm256_storeu_ps(S + jb, a0); _mm256_storeu_ps(S + jb + 8, a1);
      _mm256_storeu_ps(S + Lp + jb, b0); _mm256_storeu_ps(S + Lp + jb + 8, b1);
      _mm256_storeu_ps(S + 2 * Lp + jb, c0); _mm256_storeu_ps(S + 2 * Lp + jb + 8, c1);
      _mm256_storeu_ps(S + 3 * Lp + jb, e0); _mm256_storeu_ps(S + 3 * Lp + jb + 8, e1);
    }
    for (; jb < jp; jb += 8) {
      __m256 a0 = _mm256_setzero_ps(), b0 = a0, c0 = a0, e0 = a0;
      for (int64_t d = 0; d < D; ++d) {
        const __m256 t0 = _mm256_loadu_ps(tile + d * Lp + jb);
        a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(X[0] + d), t0, a0);
        b0 = _mm256_fmadd_ps(_mm256_broadcast_ss(X[1] + d), t0, b0);
        c0 = _mm256_fmadd_ps(_mm256_broadcast_ss(X[2] + d), t0, c0);
        e0 = _mm256_fmadd_ps(_mm256_broadcast_ss(X[3] + d), t0, e0);
      }
      _mm256_storeu_ps(S + jb, a0); _mm256_storeu_ps(S + Lp + jb, b0);
      _mm256_storeu_ps(S + 2 * Lp + jb, c0); _mm256_storeu_ps(S + 3 * Lp + jb, e0);
    }
    return;
  }
#endif
  for (int r = 0; r < R; ++r) {
    T* sr = S + r * Lp;
    std::fill(sr, sr + jp, T(0));
    for (int64_t d = 0; d < D; ++d) {
      const T x = X[r][d];
      const T* t = tile + d * Lp;
#pragma omp simd
      for (int64_t j = 0; j < jp; ++j) sr[j] += x * t[j];
    }
  }
}

// Y[r][d] = alpha * sum_{j < jp} W[r * Lp + j] tile[d * Lp + j].
template <typename T>
inline void tiledots(const T* W, const T* tile, int64_t D, int64_t Lp, int64_t jp, T alpha, T* const* Y) {
#ifdef MK_ISA_AVX2
  if constexpr (std::is_same_v<T, float>) {
    const float *w0 = W, *w1 = W + Lp, *w2 = W + 2 * Lp, *w3 = W + 3 * Lp;
    for (int64_t d = 0; d < D; ++d) {
      const float* t = tile + d * Lp;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      int64_t jb = 0;
#ifdef MK_ISA_AVX512
      // 16 keys per step, folded to 8 lanes once at the end
      __m512 z0 = _mm512_setzero_ps(), z1 = z0, z2 = z0, z3 = z0;
      for (; jb + 16 <= jp; jb += 16) {
        const __m512 tv = _mm512_loadu_ps(t + jb);
        z0 = _mm512_fmadd_ps(_mm512_loadu_ps(w0 + jb), tv, z0);
        z1 = _mm512_fmadd_ps(_mm512_loadu_ps(w1 + jb), tv, z1);
        z2 = _mm512_fmadd_ps(_mm512_loadu_ps(w2 + jb), tv, z2);
        z3 = _mm512_fmadd_ps(_mm512_loadu_ps(w3 + jb), tv, z3);
      }
      a0 = _mm256_add_ps(_mm512_castps512_ps256(z0), _mm512_extractf32x8_ps(z0, 1));
      a1 = _mm256_add_ps(_mm512_castps512_ps256(z1), _mm512_extractf32x8_ps(z1, 1));
      a2 = _mm256_add_ps(_mm512_castps512_ps256(z2), _mm512_extractf32x8_ps(z2, 1));
      a3 = _mm256_add_ps(_mm512_castps512_ps256(z3), _mm512_extractf32x8_ps(z3, 1));
#endif
      for (; jb < jp; jb += 8) {
        const __m256 tv = _mm256_loadu_ps(t + jb);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + jb), tv, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + jb), tv, a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + jb), tv, a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + jb), tv, a3);
      }
      Y[0][d] = alpha * simd_avx2::hsum(a0);
      Y[1][d] = alpha * simd_avx2::hsum(a1);
      Y[2][d] = alpha * simd_avx2::hsum(a2);
      Y[3][d] = alpha * simd_avx2::hsum(a3);
    }
    return;
  }
#endif
  for (int r = 0; r < R; ++r) {
    const T* w = W + r * Lp;
    for (int64_t d = 0; d < D; ++d) {
      const T* t = tile + d * Lp;
      T acc = T(0);
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j < jp; ++j) acc += w[j] * t[j];
      Y[r][d] = alpha * acc;
    }
  }
}

// tile[d * Lp + j] += alpha * sum_r X[r][d] W[r * Lp + j], j < jp.
template <typename T>
inline void rank_update(T* tile, const T* const* X, T alpha, const T* W, int64_t D, int64_t Lp, int64_t jp) {
#ifdef MK_ISA_AVX2
  if constexpr (std::is_same_v<T, float>) {
    const float *w0 = W, *w1 = W + Lp, *w2 = W + 2 * Lp, *w3 = W + 3 * Lp;
    for (int64_t d = 0; d < D; ++d) {
      float* t = tile + d * Lp;
      const __m256 x0 = _mm256_set1_ps(alpha * X[0][d]), x1 = _mm256_set1_ps(alpha * X[1][d]);
      const __m256 x2 = _mm256_set1_ps(alpha * X[2][d]), x3 = _mm256_set1_ps(alpha * X[3][d]);
      int64_t jb = 0;
#ifdef MK_ISA_AVX512
      const __m512 y0 = _mm512_set1_ps(alpha * X[0][d]), y1 = _mm512_set1_ps(alpha * X[1][d]);
      const __m512 y2 = _mm512_set1_ps(alpha * X[2][d]), y3 = _mm512_set1_ps(alpha * X[3][d]);
      for (; jb + 16 <= jp; jb += 16) {
        __m512 tv = _mm512_loadu_ps(t + jb);
        tv = _mm512_fmadd_ps(y0, _mm512_loadu_ps(w0 + jb), tv);
        tv = _mm512_fmadd_ps(y1, _mm512_loadu_ps(w1 + jb), tv);
        tv = _mm512_fmadd_ps(y2, _mm512_loadu_ps(w2 + jb), tv);
        tv = _mm512_fmadd_ps(y3, _mm512_loadu_ps(w3 + jb), tv);
        _mm512_storeu_ps(t + jb, tv);
      }
#endif
      for (; jb < jp; jb += 8) {
        __m256 tv = _mm256_loadu_ps(t + jb);
        tv = _mm256_fmadd_ps(x0, _mm256_loadu_ps(w0 + jb), tv);
        tv = _mm256_fmadd_ps(x1, _mm256_loadu_ps(w1 + jb), tv);
        tv = _mm256_fmadd_ps(x2, _mm256_loadu_ps(w2 + jb), tv);
        tv = _mm256_fmadd_ps(x3, _mm256_loadu_ps(w3 + jb), tv);
        _mm256_storeu_ps(t + jb, tv);
      }
    }
    return;
  }
#endif
  for (int64_t d = 0; d < D; ++d) {
    T* t = tile + d * Lp;
    const T x0 = alpha * X[0][d], x1 = alpha * X[1][d], x2 = alpha * X[2][d], x3 = alpha * X[3][d];
    const T *w0 = W, *w1 = W + Lp, *w2 = W + 2 * Lp, *w3 = W + 3 * Lp;
#pragma omp simd
    for (int64_t j = 0; j < jp; ++j) t[j] += x0 * w0[j] + x1 * w1[j] + x2 * w2[j] + x3 * w3[j];
  }
}

// dst[d * Lp + j] = element d of row j of one kv head (rows of H heads x D); columns L..Lp-1 zero.
template <typename T>
inline void load_transposed(const T* src, int64_t H, int64_t g, int64_t D, int64_t L, int64_t Lp, T* dst) {
  for (int64_t d = 0; d < D; ++d) std::fill(dst + d * Lp + L, dst + (d + 1) * Lp, T(0));
  for (int64_t j = 0; j < L; ++j) {
    const T* r = src + (j * H + g) * D;
    for (int64_t d = 0; d < D; ++d) dst[d * Lp + j] = r[d];
  }
}

inline int64_t round8(int64_t n) { return (n + 7) & ~int64_t(7); }

// Per-thread state of one (user, kv head): transposed tiles, the 4-row block scratch and pointers to the block's
// rows (rows past the user's end point at a zero row and write into a dummy row, so every block has R rows).
template <typename T>
struct UserHead {
  const Params<T>& p;
  const bias::TimeBucketer& bucket;
  int64_t base = 0, L = 0, Lp = 0;
  std::vector<T> kt, vt, S, SIG, A, DS, zero_row, dummy_row;

  UserHead(const Params<T>& params, const bias::TimeBucketer& b) : p(params), bucket(b) {}

  void load(int64_t user, int64_t g) {
    base = p.offsets[user];
    L = p.offsets[user + 1] - base;
    Lp = round8(L);
    const int64_t D = p.D;
    kt.resize(D * Lp);
    vt.resize(D * Lp);
    for (auto* v : {&S, &SIG, &A, &DS}) v->resize(R * Lp);
    zero_row.assign(D, T(0));
    dummy_row.resize(D);
    load_transposed(p.k + base * p.Hkv * D, p.Hkv, g, D, L, Lp, kt.data());
    load_transposed(p.v + base * p.Hkv * D, p.Hkv, g, D, L, Lp, vt.data());
  }

  int64_t visible(int64_t i) const { return i >= L ? 0 : (p.causal ? i + 1 : L); }
  T inv_norm(int64_t jn) const { return T(1) / T(p.norm_const > 0 ? p.norm_const : jn); }
  // columns computed for a block starting at row i0
  int64_t block_cols(int64_t i0) const { return round8(p.causal ? std::min(i0 + R, L) : L); }

  // Row pointers of a [total, H, D] tensor for the block's rows of head h (zero / dummy past the end).
  void rows(const T* base_ptr, int64_t H, int64_t h, int64_t i0, const T** out) const {
    for (int r = 0; r < R; ++r)
      out[r] = i0 + r < L ? base_ptr + ((base + i0 + r) * H + h) * p.D : zero_row.data();
  }
  void rows_out(T* base_ptr, int64_t H, int64_t h, int64_t i0, T** out) {
    for (int r = 0; r < R; ++r)
      out[r] = i0 + r < L ? base_ptr + ((base + i0 + r) * H + h) * p.D : dummy_row.data();
  }

  // S[r] (raw <q, k>) -> scores with scale and bias, j < jn (callers mask the rest).
  void finish_scores(int64_t h, int64_t i, int64_t jn, T* s) const {
    const T scale = p.scale;
#pragma omp simd
    for (int64_t j = 0; j < jn; ++j) s[j] *= scale;
    if (p.pos_bias != nullptr) {
      const T* pb = p.pos_bias + (p.pos_heads == 1 ? 0 : h) * p.P;
      const int64_t pi = p.positions[base + i];
      const int64_t* pj = p.positions + base;
      for (int64_t j = 0; j < jn; ++j) s[j] += pb[bias::pos_index(pi, pj[j], p.P)];
    }
    if (p.time_bias != nullptr) {
      const T* tb = p.time_bias + (p.time_heads == 1 ? 0 : h) * p.NT;
      const int64_t ti = p.timestamps[base + i];
      const int64_t* tj = p.timestamps + base;
      for (int64_t j = 0; j < jn; ++j) s[j] += tb[bucket(ti, tj[j])];
    }
  }
};

template <typename T>
int threads_of(const Params<T>& p) {
  return p.num_threads > 0 ? p.num_threads : omp_get_max_threads();
}

template <typename T>
void forward(const Params<T>& p, T* out, T* lse) {
  const int64_t G = p.Hq / p.Hkv, D = p.D;
  bias::TimeBucketer bucket;
  if (p.time_bias != nullptr) bucket.init(p.thresholds, p.NT);
#pragma omp parallel num_threads(threads_of(p))
  {
    UserHead<T> u(p, bucket);
    const T* xr[R];
    T* yr[R];
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < p.B * p.Hkv; ++item) {
      const int64_t g = item % p.Hkv;
      if (p.offsets[item / p.Hkv + 1] == p.offsets[item / p.Hkv]) continue;
      u.load(item / p.Hkv, g);
      const int64_t Lp = u.Lp;
      for (int64_t h = g * G; h < (g + 1) * G; ++h) {
        for (int64_t i0 = 0; i0 < u.L; i0 += R) {
          const int64_t jp = u.block_cols(i0);
          u.rows(p.q, p.Hq, h, i0, xr);
          rowdots(xr, u.kt.data(), D, Lp, jp, u.S.data());
          for (int r = 0; r < R; ++r) {
            const int64_t jn = u.visible(i0 + r);
            T *s = u.S.data() + r * Lp, *sig = u.SIG.data() + r * Lp, *a = u.A.data() + r * Lp;
            std::fill(a + jn, a + jp, T(0));
            if (jn == 0) continue;
            u.finish_scores(h, i0 + r, jn, s);
            if (p.kind == Kind::HSTU) {
              sigmoid_row(s, sig, jn);
              const T inv_n = u.inv_norm(jn);
#pragma omp simd
              for (int64_t j = 0; j < jn; ++j) a[j] = s[j] * sig[j] * inv_n;
            } else {   // softmax: a = p_ij already normalised, so the tiledots below give o directly
              const T m = *std::max_element(s, s + jn);
              const T l = exp_shift_row(s, m, a, jn);
              const T inv_l = T(1) / l;
#pragma omp simd
              for (int64_t j = 0; j < jn; ++j) a[j] *= inv_l;
              lse[(u.base + i0 + r) * p.Hq + h] = m + std::log(l);
            }
          }
          u.rows_out(out, p.Hq, h, i0, yr);
          tiledots(u.A.data(), u.vt.data(), D, Lp, jp, T(1), yr);
        }
      }
    }
  }
}

template <typename T>
void backward(const Params<T>& p, const T* grad_out, const T* out, const T* lse, T* dq, T* dk, T* dv, T* dpos_bias,
              T* dtime_bias) {
  const int64_t G = p.Hq / p.Hkv, D = p.D;
  bias::TimeBucketer bucket;
  if (p.time_bias != nullptr) bucket.init(p.thresholds, p.NT);
  const bool want_pos = p.pos_bias != nullptr && dpos_bias != nullptr;
  const bool want_time = p.time_bias != nullptr && dtime_bias != nullptr;
  const int64_t npos = want_pos ? p.pos_heads * p.P : 0, ntime = want_time ? p.time_heads * p.NT : 0;
  std::vector<double> pos_total(npos, 0.0), time_total(ntime, 0.0);
#pragma omp parallel num_threads(threads_of(p))
  {
    UserHead<T> u(p, bucket);
    std::vector<T> dkt, dvt;
    std::vector<double> pos_acc(npos, 0.0), time_acc(ntime, 0.0);   // this thread's bias gradients
    const T *qr[R], *gr[R];
    T* yr[R];
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < p.B * p.Hkv; ++item) {
      const int64_t g = item % p.Hkv;
      if (p.offsets[item / p.Hkv + 1] == p.offsets[item / p.Hkv]) continue;
      u.load(item / p.Hkv, g);
      const int64_t Lp = u.Lp, L = u.L, base = u.base;
      dkt.assign(D * Lp, T(0));
      dvt.assign(D * Lp, T(0));
      for (int64_t h = g * G; h < (g + 1) * G; ++h) {
        for (int64_t i0 = 0; i0 < L; i0 += R) {
          const int64_t jp = u.block_cols(i0);
          u.rows(p.q, p.Hq, h, i0, qr);
          u.rows(grad_out, p.Hq, h, i0, gr);
          rowdots(qr, u.kt.data(), D, Lp, jp, u.S.data());
          rowdots(gr, u.vt.data(), D, Lp, jp, u.DS.data());   // dA_ij = <do_i, v_j>, turned into dS below
          for (int r = 0; r < R; ++r) {
            const int64_t i = i0 + r, jn = u.visible(i);
            T *s = u.S.data() + r * Lp, *sig = u.SIG.data() + r * Lp;
            T *a = u.A.data() + r * Lp, *ds = u.DS.data() + r * Lp;
            std::fill(a + jn, a + jp, T(0));
            std::fill(ds + jn, ds + jp, T(0));
            if (jn == 0) continue;
            u.finish_scores(h, i, jn, s);
            const int64_t row = (base + i) * p.Hq + h;
            if (p.kind == Kind::HSTU) {
              sigmoid_row(s, sig, jn);
              const T inv_n = u.inv_norm(jn);
#pragma omp simd
              for (int64_t j = 0; j < jn; ++j) {
                const T x = s[j], y = sig[j];
                a[j] = x * y * inv_n;
                ds[j] = ds[j] * y * (T(1) + x * (T(1) - y)) * inv_n;
              }
            } else {   // softmax: p_ij = exp(s_ij - lse_i), ds_ij = p_ij (dA_ij - <do_i, o_i>)
              exp_shift_row(s, lse[row], a, jn);
              const T* oi = out + row * D;
              const T* gi = grad_out + row * D;
              T di = T(0);
              for (int64_t d = 0; d < D; ++d) di += gi[d] * oi[d];
#pragma omp simd
              for (int64_t j = 0; j < jn; ++j) ds[j] = a[j] * (ds[j] - di);
            }
            if (want_pos) {
              double* acc = pos_acc.data() + (p.pos_heads == 1 ? 0 : h) * p.P;
              const int64_t pi = p.positions[base + i];
              const int64_t* pj = p.positions + base;
              for (int64_t j = 0; j < jn; ++j) acc[bias::pos_index(pi, pj[j], p.P)] += double(ds[j]);
            }
            if (want_time) {
              double* acc = time_acc.data() + (p.time_heads == 1 ? 0 : h) * p.NT;
              const int64_t ti = p.timestamps[base + i];
              const int64_t* tj = p.timestamps + base;
              for (int64_t j = 0; j < jn; ++j) acc[bucket(ti, tj[j])] += double(ds[j]);
            }
          }
          u.rows_out(dq, p.Hq, h, i0, yr);
          tiledots(u.DS.data(), u.kt.data(), D, Lp, jp, p.scale, yr);
          rank_update(dkt.data(), qr, p.scale, u.DS.data(), D, Lp, jp);
          rank_update(dvt.data(), gr, T(1), u.A.data(), D, Lp, jp);
        }
      }
      for (int64_t j = 0; j < L; ++j) {
        T* rk = dk + ((base + j) * p.Hkv + g) * D;
        T* rv = dv + ((base + j) * p.Hkv + g) * D;
        for (int64_t d = 0; d < D; ++d) {
          rk[d] = dkt[d * Lp + j];
          rv[d] = dvt[d * Lp + j];
        }
      }
    }
#pragma omp critical(mk_train_attention_bias)
    {
      for (int64_t x = 0; x < npos; ++x) pos_total[x] += pos_acc[x];
      for (int64_t x = 0; x < ntime; ++x) time_total[x] += time_acc[x];
    }
  }
  for (int64_t x = 0; x < npos; ++x) dpos_bias[x] = T(pos_total[x]);
  for (int64_t x = 0; x < ntime; ++x) dtime_bias[x] = T(time_total[x]);
}

}  // namespace MK_IMPL_NS
}  // namespace train_attention
}  // namespace malloc_kernels
