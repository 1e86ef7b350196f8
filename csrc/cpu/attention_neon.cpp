// NEON (AArch64 Advanced SIMD) build of the fused CPU attention, selected per call by attention_forward on aarch64
// (isa.h: the `neon` variant; every AArch64 CPU has Advanced SIMD, so there is no run-time check). The algorithm is
// attention_cpu_impl.h's, with the NEON tile primitives (attention_cpu/tiles_neon.h) and the register-tiled
// many-row path (attention_cpu/row_tiles.h on VecN). Compiles to nothing on other targets.
#include "malloc_kernels/isa.h"

#if MALLOC_KERNELS_AARCH64
#define MK_ISA_NEON 1
#define MK_IMPL_NS impl_neon
#include "malloc_kernels/attention_cpu_impl.h"

namespace malloc_kernels {
namespace cpu {

void attention_forward_neon(const AttnParams& p) { impl_neon::Kernel(p).run(); }

}  // namespace cpu
}  // namespace malloc_kernels
#endif  // MALLOC_KERNELS_AARCH64
