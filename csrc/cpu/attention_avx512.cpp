// AVX-512 build of the fused CPU attention (F, BW, VL, DQ, VNNI), selected per call by attention_forward when the
// CPU has those extensions. Standard headers are included before the target pragma so that only this file's own code
// (in its private namespace) is compiled for AVX-512: nothing shared with other translation units changes ISA.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include <omp.h>

#include "malloc_kernels/attention_cpu.h"
#include "malloc_kernels/bias.h"
#include "malloc_kernels/quant.h"

#if MALLOC_KERNELS_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
// GCC 12's own AVX-512 intrinsics headers (the self-initialised __Y of _mm*_undefined_*) trip these under -Wall
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#define MK_ISA_AVX512 1
#define MK_ISA_AVX2 1
#define MK_IMPL_NS impl_avx512
#include "malloc_kernels/attention_cpu_impl.h"

namespace malloc_kernels {
namespace cpu {

void attention_forward_avx512(const AttnParams& p) { impl_avx512::Kernel(p).run(); }

}  // namespace cpu
}  // namespace malloc_kernels
#pragma GCC pop_options
#endif  // MALLOC_KERNELS_X86
