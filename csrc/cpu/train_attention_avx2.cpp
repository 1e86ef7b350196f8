// AVX2 + FMA build of the training self-attention (train_attention_impl.h), selected at run time by
// train_attention.cpp. Standard headers come before the target pragma so that only this file's own code is
// compiled for AVX2.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include <omp.h>

#include "malloc_kernels/bias.h"
#include "malloc_kernels/train_attention.h"

#if MALLOC_KERNELS_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define MK_ISA_AVX2 1
#define MK_IMPL_NS impl_avx2
#include "malloc_kernels/train_attention_impl.h"

namespace malloc_kernels {
namespace train_attention {

template <typename T>
void self_attention_forward_avx2(const Params<T>& p, T* out, T* lse) {
  impl_avx2::forward(p, out, lse);
}
template <typename T>
void self_attention_backward_avx2(const Params<T>& p, const T* grad_out, const T* out, const T* lse, T* dq, T* dk,
                                  T* dv, T* dpos_bias, T* dtime_bias) {
  impl_avx2::backward(p, grad_out, out, lse, dq, dk, dv, dpos_bias, dtime_bias);
}

template void self_attention_forward_avx2<float>(const Params<float>&, float*, float*);
template void self_attention_forward_avx2<double>(const Params<double>&, double*, double*);
template void self_attention_backward_avx2<float>(const Params<float>&, const float*, const float*, const float*,
                                                  float*, float*, float*, float*, float*);
template void self_attention_backward_avx2<double>(const Params<double>&, const double*, const double*,
                                                   const double*, double*, double*, double*, double*, double*);

}  // namespace train_attention
}  // namespace malloc_kernels
#pragma GCC pop_options
#endif  // MALLOC_KERNELS_X86
