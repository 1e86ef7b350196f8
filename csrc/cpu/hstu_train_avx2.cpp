// AVX2 + FMA build of the HSTU training attention (hstu_train_impl.h), selected at run time by hstu_train.cpp.
// Standard headers come before the target pragma so that only this file's own code is compiled for AVX2.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include <omp.h>

#include "malloc_kernels/bias.h"
#include "malloc_kernels/hstu_train.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define MK_ISA_AVX2 1
#define MK_IMPL_NS impl_avx2
#include "malloc_kernels/hstu_train_impl.h"

namespace malloc_kernels {
namespace hstu_train {

template <typename T>
void hstu_self_attention_forward_avx2(const Params<T>& p, T* out) {
  impl_avx2::forward(p, out);
}
template <typename T>
void hstu_self_attention_backward_avx2(const Params<T>& p, const T* grad_out, T* dq, T* dk, T* dv, T* dpos_bias,
                                       T* dtime_bias) {
  impl_avx2::backward(p, grad_out, dq, dk, dv, dpos_bias, dtime_bias);
}

template void hstu_self_attention_forward_avx2<float>(const Params<float>&, float*);
template void hstu_self_attention_forward_avx2<double>(const Params<double>&, double*);
template void hstu_self_attention_backward_avx2<float>(const Params<float>&, const float*, float*, float*, float*,
                                                       float*, float*);
template void hstu_self_attention_backward_avx2<double>(const Params<double>&, const double*, double*, double*,
                                                        double*, double*, double*);

}  // namespace hstu_train
}  // namespace malloc_kernels
#pragma GCC pop_options
