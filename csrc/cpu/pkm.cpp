// CPU (OpenMP + AVX2/FMA + AVX-512) implementation of the product-key memory kernels declared in malloc_kernels/pkm.h.
#include "malloc_kernels/pkm.h"
#if MALLOC_KERNELS_X86
#include <immintrin.h>

#include "malloc_kernels/simd_avx2.h"
#endif
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

// The Sparse-Gather's float32 row kernels, compiled for AVX2 and for AVX-512 (standard headers come first, so that
// only the kernels' own code is compiled for the wider ISA).
#if MALLOC_KERNELS_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define MK_PKM_AVX2 1
#define MK_IMPL_NS impl_avx2
#include "malloc_kernels/pkm_rows_impl.h"
#undef MK_IMPL_NS
#undef MK_PKM_AVX2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq")
// GCC 12's own AVX-512 intrinsics headers (the self-initialised __Y of _mm*_undefined_*) trip these under -Wall
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#define MK_PKM_AVX512 1
#define MK_IMPL_NS impl_avx512
#include "malloc_kernels/pkm_rows_impl.h"
#undef MK_IMPL_NS
#undef MK_PKM_AVX512
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

namespace malloc_kernels {
namespace pkm {
namespace {

// The extension is compiled for baseline x86-64; AVX2/FMA code lives in target-attributed functions chosen per call
// (use_avx2: MALLOC_KERNELS_ISA capped by the CPU, isa.h), so one binary runs everywhere and uses the wide units
// where they exist.

// Whether the top-k runs its AVX2 variant (MALLOC_KERNELS_ISA, read per call by the caller; the top-k has no avx512
// build, so an avx512 request runs it; the gather's row kernels have both, see row_kernels).
inline bool use_avx2(isa::Isa requested) {
  return isa::isa_for_family(requested, isa::Family::PkmTopk) == isa::Isa::Avx2;
}

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

// Below this much work an OpenMP team costs more than it saves (and on a loaded machine waking idle threads can
// take milliseconds), so small calls -- autograd checks, tiny layers -- run on the calling thread.
constexpr int64_t kParallelWork = int64_t(1) << 16;

#if MALLOC_KERNELS_X86

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

// ---- Sparse-Gather ----------------------------------------------------------------------------------------------

namespace {

// Which row kernels a call runs: float32 on an AVX-512 / AVX2 variant uses pkm_rows_impl.h's register-blocked
// kernels, everything else (portable variant, float64) the scalar ones below.
enum class RowKernels { Scalar, Avx2, Avx512 };

template <typename T>
RowKernels row_kernels(isa::Isa requested) {
  if constexpr (std::is_same_v<T, float>) {
#if MALLOC_KERNELS_X86
    switch (isa::isa_for_family(requested, isa::Family::PkmGather)) {
      case isa::Isa::Avx512: return RowKernels::Avx512;
      case isa::Isa::Avx2: return RowKernels::Avx2;
      default: break;
    }
#else
    (void)requested;
#endif
  } else {
    isa::isa_for_family(requested, isa::Family::PkmGather);  // still refuses a variant this CPU cannot run
  }
  return RowKernels::Scalar;
}

// Scalar forward for the queries [n0, n1) (same order of summation as the SIMD kernels: ascending t per element);
// the row kAhead entries ahead in the flat stream is prefetched.
template <typename T>
void gather_range_scalar(const T* values, int64_t Dv, const int64_t* idx, const T* w, int64_t E, int64_t n0,
                         int64_t n1, T* out) {
  constexpr int64_t kAhead = 24;
  for (int64_t n = n0; n < n1; ++n) {
    T* o = out + n * Dv;
    for (int64_t c = 0; c < Dv; ++c) o[c] = T(0);
    for (int64_t f = n * E; f < (n + 1) * E; ++f) {
      if (f + kAhead < n1 * E) __builtin_prefetch(values + idx[f + kAhead] * Dv);
      const T* r = values + idx[f] * Dv;
      const T wf = w[f];
      for (int64_t c = 0; c < Dv; ++c) o[c] += wf * r[c];
    }
  }
}

// Scalar backward over the touched rows [u0, u1) (pkm_rows_impl.h's scatter_range, one column at a time).
template <typename T>
void scatter_range_scalar(const T* grad_out, const T* values, int64_t Dv, const T* weights, int64_t E,
                          const int64_t* rows, const int64_t* order, const int64_t* start, int64_t u0, int64_t u1,
                          T* grad_weights, T* grad_rows) {
  for (int64_t u = u0; u < u1; ++u) {
    const T* vrow = values + rows[u] * Dv;
    T* acc = grad_rows + u * Dv;
    for (int64_t c = 0; c < Dv; ++c) acc[c] = T(0);
    for (int64_t p = start[u]; p < start[u + 1]; ++p) {
      const int64_t n = order[p] >> 32, e = n * E + (order[p] & 0xFFFFFFFF);
      const T* g = grad_out + n * Dv;
      const T we = weights[e];
      T dot = T(0);
      for (int64_t c = 0; c < Dv; ++c) {
        dot += g[c] * vrow[c];
        acc[c] += we * g[c];
      }
      grad_weights[e] = dot;
    }
  }
}

// Row range [lo, hi) of thread `tid` of `team` over M rows (the backward's partition: each thread owns the rows of
// its range, so counting, numbering and placing entries need no atomics).
inline void row_range(int64_t M, int tid, int team, int64_t* lo, int64_t* hi) {
  *lo = M * tid / team;
  *hi = M * (tid + 1) / team;
}

}  // namespace

template <typename T>
void gather_forward(const T* values, int64_t Dv, const int64_t* idx, const T* weights, int64_t N, int64_t E, T* out,
                    isa::Isa variant) {
  [[maybe_unused]] const RowKernels kern = row_kernels<T>(variant);
#pragma omp parallel if (N * E * Dv > kParallelWork)
  {
    // Contiguous query ranges per thread: the prefetch stream of gather_range runs through a thread's whole range.
    const int team = omp_get_num_threads(), tid = omp_get_thread_num();
    const int64_t n0 = N * tid / team, n1 = N * (tid + 1) / team;
    if constexpr (std::is_same_v<T, float>) {
#if MALLOC_KERNELS_X86
      if (kern == RowKernels::Avx512) {
        impl_avx512::gather_range(values, Dv, idx, weights, E, n0, n1, out);
      } else if (kern == RowKernels::Avx2) {
        impl_avx2::gather_range(values, Dv, idx, weights, E, n0, n1, out);
      } else {
        gather_range_scalar(values, Dv, idx, weights, E, n0, n1, out);
      }
#else
      gather_range_scalar(values, Dv, idx, weights, E, n0, n1, out);
#endif
    } else {
      gather_range_scalar(values, Dv, idx, weights, E, n0, n1, out);
    }
  }
}

int64_t gather_backward_plan(const int64_t* idx, int64_t NE, int64_t M, int32_t* row_count) {
  // Each thread owns a range of rows and scans all entries, counting those in its range: no atomics, and a linear
  // pass of 4 bytes per row (cheap next to reading one value row per entry).
  int64_t U = 0;
#pragma omp parallel reduction(+ : U) if (NE > kParallelWork / 16)
  {
    int64_t lo, hi;
    row_range(M, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
    std::fill(row_count + lo, row_count + hi, int32_t(0));
    for (int64_t e = 0; e < NE; ++e) {
      const int64_t m = idx[e];
      if (m >= lo && m < hi) ++row_count[m];
    }
    for (int64_t m = lo; m < hi; ++m) U += row_count[m] != 0;
  }
  return U;
}

template <typename T>
void gather_backward(const T* grad_out, const T* values, int64_t M, int64_t Dv, const int64_t* idx,
                     const T* weights, int64_t N, int64_t E, int32_t* row_count, int64_t U, int64_t* order_ws,
                     int64_t* start_ws, T* grad_weights, int64_t* rows, T* grad_rows, isa::Isa variant) {
  [[maybe_unused]] const RowKernels kern = row_kernels<T>(variant);
  const int64_t NE = N * E;
  const bool par = NE * Dv > kParallelWork;
  // Per-thread (touched rows, entries) of its row range, then their exclusive prefix: where the thread's rows and
  // entries go in rows / order_ws.
  std::vector<int64_t> u_off, e_off;
#pragma omp parallel if (par)
  {
    const int team = omp_get_num_threads(), tid = omp_get_thread_num();
#pragma omp single
    {
      u_off.assign(team + 1, 0);
      e_off.assign(team + 1, 0);
    }
    int64_t lo, hi;
    row_range(M, tid, team, &lo, &hi);
    int64_t my_u = 0, my_e = 0;
    for (int64_t m = lo; m < hi; ++m) {
      my_u += row_count[m] != 0;
      my_e += row_count[m];
    }
    u_off[tid + 1] = my_u;
    e_off[tid + 1] = my_e;
#pragma omp barrier
#pragma omp single
    for (int t = 0; t < team; ++t) {
      u_off[t + 1] += u_off[t];
      e_off[t + 1] += e_off[t];
    }
    // Counting sort of the entries by row, stable (ascending entry): rows come out sorted (a coalesced COO index)
    // and row_count[m] becomes the next free slot of row m in order_ws.
    int64_t u = u_off[tid], pos = e_off[tid];
    for (int64_t m = lo; m < hi; ++m) {
      const int32_t cnt = row_count[m];
      if (cnt == 0) continue;
      rows[u] = m;
      start_ws[u] = pos;
      row_count[m] = static_cast<int32_t>(pos);
      pos += cnt;
      ++u;
    }
    if (tid == team - 1) start_ws[U] = NE;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t t = 0; t < E; ++t) {
        const int64_t m = idx[n * E + t];
        if (m >= lo && m < hi) order_ws[row_count[m]++] = (n << 32) | t;
      }
#pragma omp barrier
    // Each touched row is reduced by one thread (ascending entries: deterministic, no atomics); chunks of rows are
    // handed out dynamically because rows differ in how many entries selected them.
    constexpr int64_t kChunk = 512;
#pragma omp for schedule(dynamic, 1)
    for (int64_t u0 = 0; u0 < U; u0 += kChunk) {
      const int64_t u1 = std::min(U, u0 + kChunk);
      if constexpr (std::is_same_v<T, float>) {
#if MALLOC_KERNELS_X86
        if (kern == RowKernels::Avx512) {
          impl_avx512::scatter_range(grad_out, values, Dv, weights, E, rows, order_ws, start_ws, u0, u1,
                                     grad_weights, grad_rows);
          continue;
        }
        if (kern == RowKernels::Avx2) {
          impl_avx2::scatter_range(grad_out, values, Dv, weights, E, rows, order_ws, start_ws, u0, u1, grad_weights,
                                   grad_rows);
          continue;
        }
#endif
      }
      scatter_range_scalar(grad_out, values, Dv, weights, E, rows, order_ws, start_ws, u0, u1, grad_weights,
                           grad_rows);
    }
  }
}

#define MK_PKM_INSTANTIATE(T)                                                                                     \
  template void topk<T>(const T*, const T*, int64_t, int64_t, int64_t, int64_t, int64_t, T*, int64_t*, isa::Isa);\
  template void topk_backward<T>(const T*, const T*, const T*, const int64_t*, int64_t, int64_t, int64_t,       \
                                 int64_t, int64_t, T*, T*);                                                      \
  template void gather_forward<T>(const T*, int64_t, const int64_t*, const T*, int64_t, int64_t, T*, isa::Isa);\
  template void gather_backward<T>(const T*, const T*, int64_t, int64_t, const int64_t*, const T*, int64_t,     \
                                   int64_t, int32_t*, int64_t, int64_t*, int64_t*, T*, int64_t*, T*, isa::Isa);

MK_PKM_INSTANTIATE(float)
MK_PKM_INSTANTIATE(double)
#undef MK_PKM_INSTANTIATE

}  // namespace pkm
}  // namespace malloc_kernels
