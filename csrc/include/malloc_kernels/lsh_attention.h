// Reformer's bucketed attention of a request over an LSH cache (Kitaev et al. 2020, arXiv 2001.04451; the model
// side is malloc_kernels/models/reformer.py), framework-free: raw pointers, sizes, contiguous layouts.
//
// Per user b, head h and request token i of b (local index li, bucket beta = q_bucket[i, h], one hash round):
//   S_i = { cache entries j < len[b, h] with cache_bucket[b, h, j] == beta }
//       u { request tokens m <= li of b with q_bucket[m, h] == beta }           (i itself always belongs)
//   s_ij = scale * <q_i, k_j> + pos_bias[clamp(p_i - p_j, 0, P - 1)] + time_bias[bucket(t_i - t_j)]
//   hstu:    o_i = (1 / |S_i|) sum_{j in S_i} silu(s_ij) v_j       (HSTU's n_i = the tokens it may see)
//   softmax: o_i = sum_{j in S_i} e^{s_ij} v_j / sum_{j in S_i} e^{s_ij}   (online, one pass)
// The stored bucket ids are tested before any key is read, so a query reads only its bucket's keys and values:
// about 1 / n_buckets of the cache. Accumulation in the input type (float or double).
#pragma once

#include <cstdint>

namespace malloc_kernels {
namespace lsh {

struct LSHParams {
  int64_t B = 0, H = 0, D = 0, C = 0, T = 0;
  const int64_t* offsets = nullptr;      // [B + 1] request token offsets
  const uint8_t* q_bucket = nullptr;     // [T, H]
  const int64_t* q_pos = nullptr;        // [T]
  const int64_t* q_ts = nullptr;         // [T] or null (no time bias)
  const int32_t* cache_len = nullptr;    // [B, H]
  const uint8_t* cache_bucket = nullptr; // [B, H, C]
  const int32_t* cache_pos = nullptr;    // [B, H, C]
  const int64_t* cache_ts = nullptr;     // [B, H, C] or null
  const float* pos_bias = nullptr;       // [P] or null
  int64_t P = 0;
  const float* time_bias = nullptr;      // [NT] or null
  const int64_t* thresholds = nullptr;   // [NT] (index 0 unused), with time_bias
  int64_t NT = 0;
  bool hstu = true;
  double scale = 1.0;
};

// q, k, v, out: [T, H, D]; cache_k, cache_v: [B, H, C, D].
void lsh_attention_cpu(const LSHParams& p, const float* q, const float* k, const float* v, const float* cache_k,
                       const float* cache_v, float* out);
void lsh_attention_cpu(const LSHParams& p, const double* q, const double* k, const double* v, const double* cache_k,
                       const double* cache_v, double* out);

}  // namespace lsh
}  // namespace malloc_kernels
