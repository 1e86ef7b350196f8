// Run-time ISA dispatch of the training self-attention (train_attention.h).
#include "malloc_kernels/train_attention.h"

namespace malloc_kernels {
namespace train_attention {

template <typename T>
void self_attention_forward(const Params<T>& p, T* out, T* lse, isa::Isa variant) {
  switch (isa::isa_for_family(variant, isa::Family::TrainAttention)) {
#if MALLOC_KERNELS_X86
    case isa::Isa::Avx512: self_attention_forward_avx512(p, out, lse); break;
    case isa::Isa::Avx2: self_attention_forward_avx2(p, out, lse); break;
#endif
    default: self_attention_forward_portable(p, out, lse); break;
  }
}

template <typename T>
void self_attention_backward(const Params<T>& p, const T* grad_out, const T* out, const T* lse, T* dq, T* dk, T* dv,
                             T* dpos_bias, T* dtime_bias, isa::Isa variant) {
  switch (isa::isa_for_family(variant, isa::Family::TrainAttention)) {
#if MALLOC_KERNELS_X86
    case isa::Isa::Avx512:
      self_attention_backward_avx512(p, grad_out, out, lse, dq, dk, dv, dpos_bias, dtime_bias);
      break;
    case isa::Isa::Avx2:
      self_attention_backward_avx2(p, grad_out, out, lse, dq, dk, dv, dpos_bias, dtime_bias);
      break;
#endif
    default:
      self_attention_backward_portable(p, grad_out, out, lse, dq, dk, dv, dpos_bias, dtime_bias);
      break;
  }
}

template void self_attention_forward<float>(const Params<float>&, float*, float*, isa::Isa);
template void self_attention_forward<double>(const Params<double>&, double*, double*, isa::Isa);
template void self_attention_backward<float>(const Params<float>&, const float*, const float*, const float*, float*,
                                             float*, float*, float*, float*, isa::Isa);
template void self_attention_backward<double>(const Params<double>&, const double*, const double*, const double*,
                                              double*, double*, double*, double*, double*, isa::Isa);

}  // namespace train_attention
}  // namespace malloc_kernels
