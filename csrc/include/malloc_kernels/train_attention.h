// Self-attention for TRAINING on jagged batches (framework-free): forward and backward on the CPU, for both kinds
// of the attention contract (ARCHITECTURE.md, "Attention semantics") with all counts 1 and no cache -- the form
// every training step of the recommenders runs.
//
//   s_ij = scale <q_i, k_j> + pos_bias[h, clamp(p_i - p_j, 0, P-1)] + time_bias[h, bucket(t_i - t_j)]
//   (j visible to i: j <= i when causal, every j of the user otherwise; both bias terms optional)
//
// kind HSTU (pointwise; Zhai et al., "Actions Speak Louder than Words", ICML 2024, arXiv 2402.17152, eq. 2):
//   a_ij = silu(s_ij) / n_i,  o_i = sum_j a_ij v_j,  n_i = visible keys of row i (or norm_const > 0)
//   backward, with silu'(x) = sig(x) (1 + x (1 - sig(x))):  dA_ij = <do_i, v_j>,  ds_ij = dA_ij silu'(s_ij) / n_i
// kind SOFTMAX (SASRec's attention; FlashAttention-2's forward/backward, Dao 2023, arXiv 2307.08691):
//   p_ij = exp(s_ij - lse_i),  lse_i = log sum_j exp(s_ij),  o_i = sum_j p_ij v_j   (lse saved for the backward)
//   backward:  D_i = <do_i, o_i>,  ds_ij = p_ij (<do_i, v_j> - D_i),  with a_ij = p_ij below
// then, for both kinds:
//   dv_j = sum_{h in group, i} a_ij do_i        dq_i = scale sum_j ds_ij k_j        dk_j = scale sum_{h, i} ds_ij q_i
//   dpos_bias[h, clamp(p_i - p_j)] += ds_ij     dtime_bias[h, bucket(t_i - t_j)] += ds_ij
//
// Query head h reads kv head h / (Hq / Hkv) (GQA/MQA); a 1-D bias table [P] is shared by the heads and gets the sum
// over heads. Nothing of size [L, L] is stored: the backward recomputes each block of score rows (FlashAttention-2's
// choice), which on a CPU keeps them in L1. Work items are (user, kv head), so a thread owns its dk/dv rows; bias
// gradients are summed per thread in float64 and reduced at the end. Tensors are contiguous: q/out/dq
// [total, Hq, D], k/v/dk/dv [total, Hkv, D], lse [total, Hq], offsets int64 [B+1]. T = float (AVX2/FMA when the CPU
// has it, else portable) or double.
#pragma once

#include <cstdint>

namespace malloc_kernels {
namespace train_attention {

enum class Kind { HSTU = 0, SOFTMAX = 1 };

template <typename T>
struct Params {
  Kind kind = Kind::HSTU;
  int64_t B = 0, Hq = 0, Hkv = 0, D = 0;
  const int64_t* offsets = nullptr;      // [B+1]
  const T* q = nullptr;                  // [total, Hq, D]
  const T* k = nullptr;                  // [total, Hkv, D]
  const T* v = nullptr;                  // [total, Hkv, D]
  T scale = T(1);
  bool causal = true;
  int64_t norm_const = 0;                // HSTU: 0 -> n_i = visible keys; > 0 -> n_i = norm_const
  const int64_t* positions = nullptr;    // [total] (needed with pos_bias)
  const T* pos_bias = nullptr;           // [pos_heads, P] or null
  int64_t pos_heads = 1, P = 0;          // pos_heads: 1 (shared) or Hq
  const int64_t* timestamps = nullptr;   // [total] (needed with time_bias)
  const T* time_bias = nullptr;          // [time_heads, NT] or null
  int64_t time_heads = 1, NT = 0;
  const int64_t* thresholds = nullptr;   // [NT] exact bucket thresholds (bias.h TimeBucketer; index 0 unused)
  int num_threads = 0;                   // 0: OpenMP default
};

// out [total, Hq, D]; lse [total, Hq] (SOFTMAX: written; HSTU: unused, may be null).
template <typename T>
void self_attention_forward(const Params<T>& p, T* out, T* lse);

// grad_out [total, Hq, D] (+ the forward's out and lse for SOFTMAX; ignored for HSTU) -> dq, dk, dv (overwritten),
// dpos_bias [pos_heads, P] / dtime_bias [time_heads, NT] (overwritten; null when the table is absent).
template <typename T>
void self_attention_backward(const Params<T>& p, const T* grad_out, const T* out, const T* lse, T* dq, T* dk, T* dv,
                             T* dpos_bias, T* dtime_bias);

// The two ISA builds behind the dispatchers above (train_attention_impl.h compiled twice).
template <typename T>
void self_attention_forward_avx2(const Params<T>& p, T* out, T* lse);
template <typename T>
void self_attention_forward_portable(const Params<T>& p, T* out, T* lse);
template <typename T>
void self_attention_backward_avx2(const Params<T>& p, const T* grad_out, const T* out, const T* lse, T* dq, T* dk,
                                  T* dv, T* dpos_bias, T* dtime_bias);
template <typename T>
void self_attention_backward_portable(const Params<T>& p, const T* grad_out, const T* out, const T* lse, T* dq,
                                      T* dk, T* dv, T* dpos_bias, T* dtime_bias);

}  // namespace train_attention
}  // namespace malloc_kernels
