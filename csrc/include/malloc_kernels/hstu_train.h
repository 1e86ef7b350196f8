// HSTU self-attention for TRAINING on jagged batches (framework-free): forward and backward on the CPU.
//
// HSTU's pointwise attention (Zhai et al., "Actions Speak Louder than Words", ICML 2024, arXiv 2402.17152, eq. 2)
// over each user's own tokens, no cache -- the form every training step runs (DESIGN.md section 2 with all counts 1):
//
//   s_ij = scale <q_i, k_j> + pos_bias[h, clamp(p_i - p_j, 0, P-1)] + time_bias[h, bucket(t_i - t_j)]
//   a_ij = silu(s_ij) / n_i          for visible j (j <= i when causal, every j of the user otherwise), else 0
//   o_i  = sum_j a_ij v_j
//
// n_i = the number of keys row i sees (the "original" / "kept" norm, equal without a cache) or a constant
// (norm_const > 0). Query head h reads kv head h / (Hq / Hkv) (GQA/MQA). With silu'(x) = sig(x) (1 + x (1 - sig(x))):
//
//   dv_j = sum_{h in group, i} a_ij do_i        dA_ij = <do_i, v_j>       ds_ij = dA_ij silu'(s_ij) / n_i
//   dq_i = scale sum_j ds_ij k_j                dk_j  = scale sum_{h in group, i} ds_ij q_i
//   dpos_bias[h, clamp(p_i - p_j)] += ds_ij     dtime_bias[h, bucket(t_i - t_j)] += ds_ij
//
// (a 1-D bias table [P] is shared by the heads and gets the sum over heads). Nothing of size [L, L] is stored: the
// backward recomputes each score row (FlashAttention-2's choice, arXiv 2307.08691), which on a CPU keeps every
// row in L1. Work items are (user, kv head), so a thread owns its dk/dv rows; bias gradients are summed per thread
// in float64 and reduced at the end. Tensors are contiguous: q/dq [total, Hq, D], k/v/dk/dv [total, Hkv, D],
// offsets int64 [B+1]. T = float (AVX2/FMA when the CPU has it, else portable) or double.
#pragma once

#include <cstdint>

namespace malloc_kernels {
namespace hstu_train {

template <typename T>
struct Params {
  int64_t B = 0, Hq = 0, Hkv = 0, D = 0;
  const int64_t* offsets = nullptr;      // [B+1]
  const T* q = nullptr;                  // [total, Hq, D]
  const T* k = nullptr;                  // [total, Hkv, D]
  const T* v = nullptr;                  // [total, Hkv, D]
  T scale = T(1);
  bool causal = true;
  int64_t norm_const = 0;                // 0: n_i = visible keys; > 0: n_i = norm_const
  const int64_t* positions = nullptr;    // [total] (needed with pos_bias)
  const T* pos_bias = nullptr;           // [pos_heads, P] or null
  int64_t pos_heads = 1, P = 0;          // pos_heads: 1 (shared) or Hq
  const int64_t* timestamps = nullptr;   // [total] (needed with time_bias)
  const T* time_bias = nullptr;          // [time_heads, NT] or null
  int64_t time_heads = 1, NT = 0;
  const int64_t* thresholds = nullptr;   // [NT] exact bucket thresholds (bias.h TimeBucketer; index 0 unused)
  int num_threads = 0;                   // 0: OpenMP default
};

// out [total, Hq, D]
template <typename T>
void hstu_self_attention_forward(const Params<T>& p, T* out);

// grad_out [total, Hq, D] -> dq, dk, dv (overwritten), dpos_bias [pos_heads, P] / dtime_bias [time_heads, NT]
// (overwritten; may be null when the table is absent or needs no gradient).
template <typename T>
void hstu_self_attention_backward(const Params<T>& p, const T* grad_out, T* dq, T* dk, T* dv, T* dpos_bias,
                                  T* dtime_bias);

// The two ISA builds behind the dispatchers above (hstu_train_impl.h compiled twice).
template <typename T>
void hstu_self_attention_forward_avx2(const Params<T>& p, T* out);
template <typename T>
void hstu_self_attention_forward_portable(const Params<T>& p, T* out);
template <typename T>
void hstu_self_attention_backward_avx2(const Params<T>& p, const T* grad_out, T* dq, T* dk, T* dv, T* dpos_bias,
                                       T* dtime_bias);
template <typename T>
void hstu_self_attention_backward_portable(const Params<T>& p, const T* grad_out, T* dq, T* dk, T* dv,
                                           T* dpos_bias, T* dtime_bias);

}  // namespace hstu_train
}  // namespace malloc_kernels
