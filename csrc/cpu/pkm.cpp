// CPU (OpenMP + AVX2/FMA) implementation of the product-key memory kernels declared in malloc_kernels/pkm.h.
#include "malloc_kernels/pkm.h"
#if MALLOC_KERNELS_X86
#include <immintrin.h>

#include "malloc_kernels/simd_avx2.h"
#endif
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

namespace malloc_kernels {
namespace pkm {
namespace {

// The extension is compiled for baseline x86-64; AVX2/FMA code lives in target-attributed functions chosen per call
// (use_avx2: MALLOC_KERNELS_ISA capped by the CPU, isa.h), so one binary runs everywhere and uses the wide units
// where they exist.

// Whether this call runs the AVX2 variant (MALLOC_KERNELS_ISA, read per call by the caller; pkm has no avx512 build).
inline bool use_avx2(isa::Isa requested) { return isa::isa_for_family(requested, isa::Isa::Avx2) == isa::Isa::Avx2; }

// ---- scalar (any T) building blocks --------------------------------------------------------------------------

// s[j] = <q, KT[:, j]> for a transposed sub-key block KT [Dh, S].
template <typename T>
void half_scores_scalar(const T* q, const T* kt, int64_t Dh, int64_t S, T* s) {
  for (int64_t j = 0; j < S; ++j) s[j] = T(0);
  for (int64_t d = 0; d < Dh; ++d) {
    const T qd = q[d];
    const T* row = kt + d * S;
    for (int64_t j = 0; j < S; ++j) s[j] += qd * row[j];
  }
}

// out[0 .. Dv) = sum over t < count of weight(t) * row(t)[0 .. Dv), each channel summed in ascending t: the
// forward gather (value rows of one query) and the backward scatter (grad_out rows of one touched value row).
template <typename T, typename Weight, typename Row>
void weighted_row_sum_scalar(int64_t Dv, int64_t count, Weight weight, Row row, T* out) {
  for (int64_t c = 0; c < Dv; ++c) out[c] = T(0);
  for (int64_t t = 0; t < count; ++t) {
    const T* r = row(t);
    const T wt = weight(t);
    for (int64_t c = 0; c < Dv; ++c) out[c] += wt * r[c];
  }
}

template <typename T>
T dot_scalar(const T* a, const T* b, int64_t n) {
  T acc = T(0);
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

// Below this much work an OpenMP team costs more than it saves (and on a loaded machine waking idle threads can
// take milliseconds), so small calls -- autograd checks, tiny layers -- run on the calling thread.
constexpr int64_t kParallelWork = int64_t(1) << 16;

#if MALLOC_KERNELS_X86
using simd_avx2::hsum;

// ---- AVX2 float building blocks -------------------------------------------------------------------------------

// Four 8-wide accumulators over 32 consecutive floats: independent FMA chains, so the latency of one hides behind
// the others, and few enough that a loop can keep one or two blocks in registers across its whole reduction.
struct Acc32 {
  __m256 a0, a1, a2, a3;
};

__attribute__((target("avx2,fma"))) inline Acc32 zero32() {
  const __m256 z = _mm256_setzero_ps();
  return {z, z, z, z};
}

// acc += b * r[0 .. 32)
__attribute__((target("avx2,fma"))) inline void fma32(Acc32& acc, __m256 b, const float* r) {
  acc.a0 = _mm256_fmadd_ps(b, _mm256_loadu_ps(r + 0), acc.a0);
  acc.a1 = _mm256_fmadd_ps(b, _mm256_loadu_ps(r + 8), acc.a1);
  acc.a2 = _mm256_fmadd_ps(b, _mm256_loadu_ps(r + 16), acc.a2);
  acc.a3 = _mm256_fmadd_ps(b, _mm256_loadu_ps(r + 24), acc.a3);
}

__attribute__((target("avx2,fma"))) inline void store32(float* out, const Acc32& acc) {
  _mm256_storeu_ps(out + 0, acc.a0);
  _mm256_storeu_ps(out + 8, acc.a1);
  _mm256_storeu_ps(out + 16, acc.a2);
  _mm256_storeu_ps(out + 24, acc.a3);
}

// Blocks of 64 keys keep 8 accumulators in registers across the whole Dh loop (one broadcast + 8 FMAs per d), so
// the scores never round-trip through memory inside the reduction.
__attribute__((target("avx2,fma"))) void half_scores_avx2(const float* q, const float* kt, int64_t Dh, int64_t S,
                                                          float* s) {
  int64_t j = 0;
  for (; j + 64 <= S; j += 64) {
    Acc32 lo = zero32(), hi = zero32();
    for (int64_t d = 0; d < Dh; ++d) {
      const __m256 b = _mm256_set1_ps(q[d]);
      const float* r = kt + d * S + j;
      fma32(lo, b, r);
      fma32(hi, b, r + 32);
    }
    store32(s + j, lo);
    store32(s + j + 32, hi);
  }
  for (; j + 8 <= S; j += 8) {
    __m256 a = _mm256_setzero_ps();
    for (int64_t d = 0; d < Dh; ++d) a = _mm256_fmadd_ps(_mm256_set1_ps(q[d]), _mm256_loadu_ps(kt + d * S + j), a);
    _mm256_storeu_ps(s + j, a);
  }
  for (; j < S; ++j) {
    float acc = 0.f;
    for (int64_t d = 0; d < Dh; ++d) acc += q[d] * kt[d * S + j];
    s[j] = acc;
  }
}

// Prefetch distance for the random value-row reads: far enough to hide DRAM latency behind the FMAs of the rows
// in flight, small enough that the lines are still in L1/L2 when used.
constexpr int64_t kPrefetch = 8;

// weighted_row_sum_scalar for float on AVX2: column blocks of 32 keep four accumulators in registers across the
// whole t loop. With kPrefetchRows the row kPrefetch terms ahead is prefetched (the forward's random value-row
// reads).
template <bool kPrefetchRows, typename Weight, typename Row>
__attribute__((target("avx2,fma"))) void weighted_row_sum_avx2(int64_t Dv, int64_t count, Weight weight, Row row,
                                                               float* out) {
  int64_t c = 0;
  for (; c + 32 <= Dv; c += 32) {
    Acc32 acc = zero32();
    for (int64_t t = 0; t < count; ++t) {
      if (kPrefetchRows && t + kPrefetch < count)
        _mm_prefetch(reinterpret_cast<const char*>(row(t + kPrefetch) + c), _MM_HINT_T0);
      fma32(acc, _mm256_set1_ps(weight(t)), row(t) + c);
    }
    store32(out + c, acc);
  }
  for (; c + 8 <= Dv; c += 8) {
    __m256 a = _mm256_setzero_ps();
    for (int64_t t = 0; t < count; ++t) a = _mm256_fmadd_ps(_mm256_set1_ps(weight(t)), _mm256_loadu_ps(row(t) + c), a);
    _mm256_storeu_ps(out + c, a);
  }
  for (; c < Dv; ++c) {
    float acc = 0.f;
    for (int64_t t = 0; t < count; ++t) acc += weight(t) * row(t)[c];
    out[c] = acc;
  }
}

__attribute__((target("avx2,fma"))) float dot_avx2(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  float acc = hsum(_mm256_add_ps(acc0, acc1));
  for (; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

// grad_weights for one query: the dot of grad_out[n] with each selected value row (prefetched like the forward).
__attribute__((target("avx2,fma"))) void grad_weights_row_avx2(const float* g, const float* values, int64_t Dv,
                                                               const int64_t* idx, int64_t E, float* gw) {
  for (int64_t e = 0; e < E; ++e) {
    if (e + kPrefetch < E) _mm_prefetch(reinterpret_cast<const char*>(values + idx[e + kPrefetch] * Dv), _MM_HINT_T0);
    gw[e] = dot_avx2(g, values + idx[e] * Dv, Dv);
  }
}
#endif  // MALLOC_KERNELS_X86

// ---- dispatchers over T ---------------------------------------------------------------------------------------

template <typename T>
void half_scores(bool avx2, const T* q, const T* kt, int64_t Dh, int64_t S, T* s) {
  if constexpr (std::is_same_v<T, float>) {
#if MALLOC_KERNELS_X86
    if (avx2) return half_scores_avx2(q, kt, Dh, S, s);
#endif
  }
  half_scores_scalar(q, kt, Dh, S, s);
}

template <bool kPrefetchRows, typename T, typename Weight, typename Row>
void weighted_row_sum(bool avx2, int64_t Dv, int64_t count, Weight weight, Row row, T* out) {
  if constexpr (std::is_same_v<T, float>) {
#if MALLOC_KERNELS_X86
    if (avx2) return weighted_row_sum_avx2<kPrefetchRows>(Dv, count, weight, row, out);
#endif
  }
  weighted_row_sum_scalar(Dv, count, weight, row, out);
}

// Top-k of one half into (val, pos), best first: strictly greater than the current k-th enters, so among equal
// scores the earlier (lower) index stays ahead -- the reference's stable descending sort.
template <typename T>
void select_half(const T* s, int64_t S, int64_t k, T* val, int64_t* pos) {
  int64_t cnt = 0;
  for (int64_t j = 0; j < S; ++j) {
    const T v = s[j];
    if (cnt == k && !(v > val[k - 1])) continue;
    int64_t p = (cnt < k) ? cnt++ : k - 1;
    while (p > 0 && v > val[p - 1]) {
      val[p] = val[p - 1];
      pos[p] = pos[p - 1];
      --p;
    }
    val[p] = v;
    pos[p] = j;
  }
}

}  // namespace

template <typename T>
void topk(const T* query, const T* subkeys, int64_t N, int64_t H, int64_t Dh, int64_t S, int64_t k, T* scores,
          int64_t* indices, isa::Isa variant) {
  const bool avx2 = use_avx2(variant);
  // Sub-keys transposed to [H, 2, Dh, S] once per call (O(parameters), tiny next to N * H * S * Dh) so the score
  // loop streams contiguous keys for a broadcast query element.
  std::vector<T> kt(static_cast<size_t>(H * 2 * Dh * S));
  for (int64_t hb = 0; hb < H * 2; ++hb)
    for (int64_t j = 0; j < S; ++j)
      for (int64_t d = 0; d < Dh; ++d) kt[(hb * Dh + d) * S + j] = subkeys[(hb * S + j) * Dh + d];

#pragma omp parallel if (N * H * S * Dh > kParallelWork)
  {
    std::vector<T> s1(S), s2(S), v1(k), v2(k), best(k);
    std::vector<int64_t> c1(k), c2(k), ba(k), bb(k);
#pragma omp for schedule(static)
    for (int64_t nh = 0; nh < N * H; ++nh) {
      const int64_t h = nh % H;
      const T* q = query + nh * 2 * Dh;
      half_scores(avx2, q, kt.data() + (h * 2 + 0) * Dh * S, Dh, S, s1.data());
      half_scores(avx2, q + Dh, kt.data() + (h * 2 + 1) * Dh * S, Dh, S, s2.data());
      select_half(s1.data(), S, k, v1.data(), c1.data());
      select_half(s2.data(), S, k, v2.data(), c2.data());
      // Stage 2 over the k x k candidates in (a, b) lexicographic order = the tie order, so again "strictly
      // greater enters". Both lists are sorted, so a row (fixed a) or the whole scan can stop as soon as a sum
      // cannot beat the k-th: later candidates are no larger (monotone rounding) and lose ties.
      int64_t cnt = 0;
      for (int64_t a = 0; a < k; ++a) {
        if (cnt == k && !(v1[a] + v2[0] > best[k - 1])) break;
        for (int64_t b = 0; b < k; ++b) {
          const T v = v1[a] + v2[b];
          if (cnt == k && !(v > best[k - 1])) break;
          int64_t p = (cnt < k) ? cnt++ : k - 1;
          while (p > 0 && v > best[p - 1]) {
            best[p] = best[p - 1];
            ba[p] = ba[p - 1];
            bb[p] = bb[p - 1];
            --p;
          }
          best[p] = v;
          ba[p] = a;
          bb[p] = b;
        }
      }
      T* out_s = scores + nh * k;
      int64_t* out_i = indices + nh * k;
      for (int64_t t = 0; t < k; ++t) {
        out_s[t] = best[t];
        out_i[t] = c1[ba[t]] * S + c2[bb[t]];
      }
    }
  }
}

template <typename T>
void topk_backward(const T* grad_scores, const T* query, const T* subkeys, const int64_t* indices, int64_t N,
                   int64_t H, int64_t Dh, int64_t S, int64_t k, T* grad_query, T* grad_subkeys) {
  // d score / d q = [K1[i1], K2[i2]]; d score / d K_half[i] = q_half. Queries are independent rows; the sub-key
  // gradient is reduced per (head, half) task in ascending n, so no atomics and a deterministic result.
  const bool par = N * H * k * Dh > kParallelWork;
#pragma omp parallel for schedule(static) if (par)
  for (int64_t nh = 0; nh < N * H; ++nh) {
    const int64_t h = nh % H;
    T* gq = grad_query + nh * 2 * Dh;
    for (int64_t d = 0; d < 2 * Dh; ++d) gq[d] = T(0);
    for (int64_t t = 0; t < k; ++t) {
      const T g = grad_scores[nh * k + t];
      const int64_t i1 = indices[nh * k + t] / S, i2 = indices[nh * k + t] % S;
      const T* k1 = subkeys + ((h * 2 + 0) * S + i1) * Dh;
      const T* k2 = subkeys + ((h * 2 + 1) * S + i2) * Dh;
      for (int64_t d = 0; d < Dh; ++d) {
        gq[d] += g * k1[d];
        gq[Dh + d] += g * k2[d];
      }
    }
  }
  std::memset(grad_subkeys, 0, sizeof(T) * static_cast<size_t>(H * 2 * S * Dh));
#pragma omp parallel for schedule(dynamic, 1) if (par)
  for (int64_t hb = 0; hb < H * 2; ++hb) {
    const int64_t h = hb / 2, half = hb % 2;
    T* gk = grad_subkeys + hb * S * Dh;
    for (int64_t n = 0; n < N; ++n) {
      const int64_t nh = n * H + h;
      const T* q = query + nh * 2 * Dh + half * Dh;
      for (int64_t t = 0; t < k; ++t) {
        const T g = grad_scores[nh * k + t];
        const int64_t flat = indices[nh * k + t];
        T* row = gk + (half == 0 ? flat / S : flat % S) * Dh;
        for (int64_t d = 0; d < Dh; ++d) row[d] += g * q[d];
      }
    }
  }
}

template <typename T>
void gather_forward(const T* values, int64_t Dv, const int64_t* idx, const T* weights, int64_t N, int64_t E, T* out,
                    isa::Isa variant) {
  const bool avx2 = use_avx2(variant);
#pragma omp parallel for schedule(static) if (N * E * Dv > kParallelWork)
  for (int64_t n = 0; n < N; ++n) {
    const int64_t* ix = idx + n * E;
    const T* w = weights + n * E;
    weighted_row_sum<true>(avx2, Dv, E, [w](int64_t e) { return w[e]; },
                           [values, ix, Dv](int64_t e) { return values + ix[e] * Dv; }, out + n * Dv);
  }
}

int64_t gather_backward_plan(const int64_t* idx, int64_t NE, int64_t M, int32_t* row_slot) {
  // Mark, then number in ascending row order: the rows come out sorted (a coalesced COO index) and the O(M) pass is
  // a linear scan of 4 bytes per row, cheap next to reading one value row per entry.
  std::fill(row_slot, row_slot + M, int32_t(-1));
  for (int64_t e = 0; e < NE; ++e) row_slot[idx[e]] = 0;
  int64_t u = 0;
  for (int64_t m = 0; m < M; ++m)
    if (row_slot[m] == 0) row_slot[m] = static_cast<int32_t>(u++);
  return u;
}

template <typename T>
void gather_backward(const T* grad_out, const T* values, int64_t M, int64_t Dv, const int64_t* idx,
                     const T* weights, int64_t N, int64_t E, const int32_t* row_slot, int64_t U, int64_t* order_ws,
                     int64_t* start_ws, T* grad_weights, int64_t* rows, T* grad_rows, isa::Isa variant) {
  const bool avx2 = use_avx2(variant);
  const int64_t NE = N * E;
  const bool par = NE * Dv > kParallelWork;
  // grad_weights: independent per query.
#pragma omp parallel for schedule(static) if (par)
  for (int64_t n = 0; n < N; ++n) {
    if constexpr (std::is_same_v<T, float>) {
#if MALLOC_KERNELS_X86
      if (avx2) {
        grad_weights_row_avx2(grad_out + n * Dv, values, Dv, idx + n * E, E, grad_weights + n * E);
        continue;
      }
#endif
    }
    for (int64_t e = 0; e < E; ++e)
      grad_weights[n * E + e] = dot_scalar(grad_out + n * Dv, values + idx[n * E + e] * Dv, Dv);
  }
  // Counting sort of the entries by touched row (CSR): each row is then reduced by one thread in ascending entry
  // order -- no atomics, no dense [M, Dv] buffer, bitwise reproducible.
  std::fill(start_ws, start_ws + U + 1, int64_t(0));
  for (int64_t e = 0; e < NE; ++e) ++start_ws[row_slot[idx[e]] + 1];
  for (int64_t u = 0; u < U; ++u) start_ws[u + 1] += start_ws[u];
  {
    std::vector<int64_t> fill(start_ws, start_ws + U);
    for (int64_t e = 0; e < NE; ++e) order_ws[fill[row_slot[idx[e]]]++] = e;
  }
  for (int64_t e = 0; e < NE; ++e) rows[row_slot[idx[e]]] = idx[e];
#pragma omp parallel for schedule(dynamic, 256) if (par)
  for (int64_t u = 0; u < U; ++u) {
    const int64_t* entries = order_ws + start_ws[u];
    const int64_t count = start_ws[u + 1] - start_ws[u];
    // One touched row: sum of weights[e] * grad_out[e / E] over its entries (ascending e).
    weighted_row_sum<false>(avx2, Dv, count, [weights, entries](int64_t t) { return weights[entries[t]]; },
                            [grad_out, entries, E, Dv](int64_t t) { return grad_out + (entries[t] / E) * Dv; },
                            grad_rows + u * Dv);
  }
  (void)M;
}

#define MK_PKM_INSTANTIATE(T)                                                                                     \
  template void topk<T>(const T*, const T*, int64_t, int64_t, int64_t, int64_t, int64_t, T*, int64_t*, isa::Isa);\
  template void topk_backward<T>(const T*, const T*, const T*, const int64_t*, int64_t, int64_t, int64_t,       \
                                 int64_t, int64_t, T*, T*);                                                      \
  template void gather_forward<T>(const T*, int64_t, const int64_t*, const T*, int64_t, int64_t, T*, isa::Isa);\
  template void gather_backward<T>(const T*, const T*, int64_t, int64_t, const int64_t*, const T*, int64_t,     \
                                   int64_t, const int32_t*, int64_t, int64_t*, int64_t*, T*, int64_t*, T*, isa::Isa);

MK_PKM_INSTANTIATE(float)
MK_PKM_INSTANTIATE(double)
#undef MK_PKM_INSTANTIATE

}  // namespace pkm
}  // namespace malloc_kernels
