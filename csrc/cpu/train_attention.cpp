// Run-time ISA dispatch of the training self-attention (train_attention.h).
#include "malloc_kernels/train_attention.h"
#include "malloc_kernels/simd_avx2.h"

namespace malloc_kernels {
namespace train_attention {

template <typename T>
void self_attention_forward(const Params<T>& p, T* out, T* lse) {
  if (simd_avx2::cpu_has_avx2()) self_attention_forward_avx2(p, out, lse);
  else self_attention_forward_portable(p, out, lse);
}

template <typename T>
void self_attention_backward(const Params<T>& p, const T* grad_out, const T* out, const T* lse, T* dq, T* dk, T* dv,
                             T* dpos_bias, T* dtime_bias) {
  if (simd_avx2::cpu_has_avx2())
    self_attention_backward_avx2(p, grad_out, out, lse, dq, dk, dv, dpos_bias, dtime_bias);
  else
    self_attention_backward_portable(p, grad_out, out, lse, dq, dk, dv, dpos_bias, dtime_bias);
}

template void self_attention_forward<float>(const Params<float>&, float*, float*);
template void self_attention_forward<double>(const Params<double>&, double*, double*);
template void self_attention_backward<float>(const Params<float>&, const float*, const float*, const float*, float*,
                                             float*, float*, float*, float*);
template void self_attention_backward<double>(const Params<double>&, const double*, const double*, const double*,
                                              double*, double*, double*, double*, double*);

}  // namespace train_attention
}  // namespace malloc_kernels
