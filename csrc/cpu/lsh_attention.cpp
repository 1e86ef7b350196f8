// Reformer's bucketed request attention over an LSH cache: the math is in malloc_kernels/lsh_attention.h.
// One OpenMP task per (user, head); the queries of that pair scan its stored bucket ids once each and read only the
// matching entries (plain loops over D, vectorised by the compiler).
#include "malloc_kernels/lsh_attention.h"

#include <cmath>
#include <limits>
#include <vector>

#include "malloc_kernels/bias.h"

namespace malloc_kernels {
namespace lsh {
namespace {

template <typename T>
inline T dot(const T* a, const T* b, int64_t D) {
  T s = 0;
  for (int64_t d = 0; d < D; ++d) s += a[d] * b[d];
  return s;
}

template <typename T>
void run(const LSHParams& p, const T* q, const T* k, const T* v, const T* ck, const T* cv, T* out) {
  const int64_t H = p.H, D = p.D, C = p.C;
  bias::TimeBucketer tbk;
  const bool use_time = p.time_bias != nullptr && p.q_ts != nullptr && p.cache_ts != nullptr;
  if (use_time) tbk.init(p.thresholds, p.NT);
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t bh = 0; bh < p.B * H; ++bh) {
    const int64_t b = bh / H, h = bh % H;
    const int64_t t0 = p.offsets[b], t1 = p.offsets[b + 1];
    if (t1 <= t0) continue;
    const int64_t len = p.cache_len[bh];
    const uint8_t* cb = p.cache_bucket + bh * C;
    const int32_t* cpos = p.cache_pos + bh * C;
    const int64_t* cts = use_time ? p.cache_ts + bh * C : nullptr;
    std::vector<T> acc(D);
    for (int64_t i = t0; i < t1; ++i) {
      const uint8_t beta = p.q_bucket[i * H + h];
      const T* qi = q + (i * H + h) * D;
      const int64_t pi = p.q_pos[i];
      const int64_t ti = use_time ? p.q_ts[i] : 0;
      for (int64_t d = 0; d < D; ++d) acc[d] = 0;
      T n = 0, mx = -std::numeric_limits<T>::infinity(), sum = 0;
      auto visit = [&](const T* kj, const T* vj, int64_t pj, int64_t tj) {
        T s = T(p.scale) * dot(qi, kj, D);
        if (p.pos_bias) s += T(p.pos_bias[bias::pos_index(pi, pj, p.P)]);
        if (use_time) s += T(p.time_bias[tbk(ti, tj)]);
        if (p.hstu) {
          const T w = s / (T(1) + std::exp(-s));
          for (int64_t d = 0; d < D; ++d) acc[d] += w * vj[d];
          n += 1;
        } else {
          if (s > mx) {  // rescale what was accumulated under the old maximum (a NaN score propagates below)
            const T r = std::exp(mx - s);
            for (int64_t d = 0; d < D; ++d) acc[d] *= r;
            sum *= r;
            mx = s;
          }
          const T e = std::exp(s - mx);
          for (int64_t d = 0; d < D; ++d) acc[d] += e * vj[d];
          sum += e;
        }
      };
      for (int64_t j = 0; j < len; ++j) {
        if (cb[j] != beta) continue;
        visit(ck + (bh * C + j) * D, cv + (bh * C + j) * D, cpos[j], use_time ? cts[j] : 0);
      }
      for (int64_t m = t0; m <= i; ++m) {
        if (p.q_bucket[m * H + h] != beta) continue;
        visit(k + (m * H + h) * D, v + (m * H + h) * D, p.q_pos[m], use_time ? p.q_ts[m] : 0);
      }
      const T norm = p.hstu ? T(1) / n : T(1) / sum;  // n >= 1 and sum > 0: i sees itself
      T* oi = out + (i * H + h) * D;
      for (int64_t d = 0; d < D; ++d) oi[d] = acc[d] * norm;
    }
  }
}

}  // namespace

void lsh_attention_cpu(const LSHParams& p, const float* q, const float* k, const float* v, const float* cache_k,
                       const float* cache_v, float* out) {
  run<float>(p, q, k, v, cache_k, cache_v, out);
}

void lsh_attention_cpu(const LSHParams& p, const double* q, const double* k, const double* v, const double* cache_k,
                       const double* cache_v, double* out) {
  run<double>(p, q, k, v, cache_k, cache_v, out);
}

}  // namespace lsh
}  // namespace malloc_kernels
