// Run-time ISA dispatch of the HSTU training attention (hstu_train.h).
#include "malloc_kernels/hstu_train.h"
#include "malloc_kernels/simd_avx2.h"

namespace malloc_kernels {
namespace hstu_train {

template <typename T>
void hstu_self_attention_forward(const Params<T>& p, T* out) {
  if (simd_avx2::cpu_has_avx2()) hstu_self_attention_forward_avx2(p, out);
  else hstu_self_attention_forward_portable(p, out);
}

template <typename T>
void hstu_self_attention_backward(const Params<T>& p, const T* grad_out, T* dq, T* dk, T* dv, T* dpos_bias,
                                  T* dtime_bias) {
  if (simd_avx2::cpu_has_avx2()) hstu_self_attention_backward_avx2(p, grad_out, dq, dk, dv, dpos_bias, dtime_bias);
  else hstu_self_attention_backward_portable(p, grad_out, dq, dk, dv, dpos_bias, dtime_bias);
}

template void hstu_self_attention_forward<float>(const Params<float>&, float*);
template void hstu_self_attention_forward<double>(const Params<double>&, double*);
template void hstu_self_attention_backward<float>(const Params<float>&, const float*, float*, float*, float*, float*,
                                                  float*);
template void hstu_self_attention_backward<double>(const Params<double>&, const double*, double*, double*, double*,
                                                   double*, double*);

}  // namespace hstu_train
}  // namespace malloc_kernels
