// RWKV-4 "WKV" recurrence (framework-free): forward and backward over jagged per-user sequences.
//
// Peng et al. 2023, "RWKV: Reinventing RNNs for the Transformer Era" (arXiv 2305.13048), time mixing of RWKV-4.
// Per user and channel c (drop c below), with the log decay w (the model passes w = -exp(decay) < 0), the bonus u,
// keys k_t and values v_t, t = 0 .. n-1:
//   wkv_t = (A_t + e^{u + k_t} v_t) / (B_t + e^{u + k_t}),   A_t = e^{t w} A_0 + sum_{i<t} e^{(t-1-i) w + k_i} v_i
//                                                              (B_t alike with v = 1).
// The state (A_t, B_t) is carried as (a, b, p) with A = a e^p, B = b e^p -- RWKV-4's numerically stable running
// maximum p -- per token:
//   q = max(p, u + k_t);  y_t = (e^{p-q} a + e^{u+k_t-q} v_t) / (e^{p-q} b + e^{u+k_t-q})
//   p' = max(p + w, k_t); a' = e^{p+w-p'} a + e^{k_t-p'} v_t;  b' = e^{p+w-p'} b + e^{k_t-p'}
// An empty state is (0, 0, -inf). Every exponent is <= 0, so nothing overflows whatever the sequence length.
//
// Layout: k, v, y [T, C] row-major with the users' tokens concatenated (offsets [B+1], offsets[0] = 0,
// offsets[B] = T); w, u [C]; states [B, 3, C] as (a, b, p). aux [2, T, C] (q_t and the denominator
// den_t = e^{p-q} b + e^{u+k_t-q} of every token) is written by the forward when non-null and read by the backward.
//
// Backward (exact, with a running maximum in the reverse direction): with g_t = dL/dy_t, alpha_t = g_t / den_t,
// beta_t = alpha_t y_t, the reverse sums G_i = sum_{t>i} e^{(t-1-i) w - q_t} alpha_t (H_i alike with beta) and
// G1_i = sum_{t>i} (t-1-i) e^{(t-1-i) w - q_t} alpha_t (H1_i alike) give
//   dv_i = e^{k_i} G_i + e^{u+k_i-q_i} alpha_i,   dk_i = e^{k_i} (v_i G_i - H_i) + e^{u+k_i-q_i} (v_i alpha_i - beta_i)
//   du   = sum_i e^{u+k_i-q_i} (v_i alpha_i - beta_i),   dw = sum_i e^{k_i} (v_i G1_i - H1_i) + e^{p_0} (a_0 G1_-1 - b_0 H1_-1)
// (the last term: the carried initial state decays with w too). The sums are kept as (value, log scale s), and
// k_i + s <= 0 because q_t bounds every term that entered den_t. No gradient flows into the initial state.
// dw and du are written per user ([B, C]); the caller sums them over users (deterministic, no atomics).
//
// T is float or double. Threads (OpenMP) take (user, block of channels) tasks; within a task the channels of a
// block are vectorised (the portable build's SIMD, or AVX2 / AVX-512 chosen at run time by `variant`).
#pragma once

#include <cstdint>

#include "malloc_kernels/isa.h"

namespace malloc_kernels {
namespace wkv {

template <typename T>
void forward(const T* w, const T* u, const T* k, const T* v, const int64_t* offsets, int64_t B, int64_t C,
             const T* state_in, T* y, T* aux, T* state_out, isa::Isa variant = isa::Isa::Auto);

template <typename T>
void backward(const T* w, const T* u, const T* k, const T* v, const int64_t* offsets, int64_t B, int64_t C,
              const T* state_in, const T* y, const T* aux, const T* grad_y, T* grad_w_users, T* grad_u_users,
              T* grad_k, T* grad_v, isa::Isa variant = isa::Isa::Auto);

}  // namespace wkv
}  // namespace malloc_kernels
