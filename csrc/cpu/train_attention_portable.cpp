// Portable build of the training self-attention (train_attention_impl.h; SSE2 on plain x86-64).
#define MK_IMPL_NS impl_portable
#include "malloc_kernels/train_attention_impl.h"

namespace malloc_kernels {
namespace train_attention {

template <typename T>
void self_attention_forward_portable(const Params<T>& p, T* out, T* lse) {
  impl_portable::forward(p, out, lse);
}
template <typename T>
void self_attention_backward_portable(const Params<T>& p, const T* grad_out, const T* out, const T* lse, T* dq,
                                      T* dk, T* dv, T* dpos_bias, T* dtime_bias) {
  impl_portable::backward(p, grad_out, out, lse, dq, dk, dv, dpos_bias, dtime_bias);
}

template void self_attention_forward_portable<float>(const Params<float>&, float*, float*);
template void self_attention_forward_portable<double>(const Params<double>&, double*, double*);
template void self_attention_backward_portable<float>(const Params<float>&, const float*, const float*,
                                                      const float*, float*, float*, float*, float*, float*);
template void self_attention_backward_portable<double>(const Params<double>&, const double*, const double*,
                                                       const double*, double*, double*, double*, double*, double*);

}  // namespace train_attention
}  // namespace malloc_kernels
