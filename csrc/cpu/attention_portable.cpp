// Portable build of the fused CPU attention (whatever ISA the compiler flags allow; SSE2 on plain x86-64).
// The algorithm lives in attention_cpu_impl.h, shared with the AVX2 build (attention_avx2.cpp).
#define MK_IMPL_NS impl_portable
#include "malloc_kernels/attention_cpu_impl.h"

namespace malloc_kernels {
namespace cpu {

void attention_forward_portable(const AttnParams& p) { impl_portable::Kernel(p).run(); }

}  // namespace cpu
}  // namespace malloc_kernels
