// Portable build of the HSTU training attention (hstu_train_impl.h; SSE2 on plain x86-64).
#define MK_IMPL_NS impl_portable
#include "malloc_kernels/hstu_train_impl.h"

namespace malloc_kernels {
namespace hstu_train {

template <typename T>
void hstu_self_attention_forward_portable(const Params<T>& p, T* out) {
  impl_portable::forward(p, out);
}
template <typename T>
void hstu_self_attention_backward_portable(const Params<T>& p, const T* grad_out, T* dq, T* dk, T* dv,
                                           T* dpos_bias, T* dtime_bias) {
  impl_portable::backward(p, grad_out, dq, dk, dv, dpos_bias, dtime_bias);
}

template void hstu_self_attention_forward_portable<float>(const Params<float>&, float*);
template void hstu_self_attention_forward_portable<double>(const Params<double>&, double*);
template void hstu_self_attention_backward_portable<float>(const Params<float>&, const float*, float*, float*,
                                                           float*, float*, float*);
template void hstu_self_attention_backward_portable<double>(const Params<double>&, const double*, double*,
                                                            double*, double*, double*, double*);

}  // namespace hstu_train
}  // namespace malloc_kernels
