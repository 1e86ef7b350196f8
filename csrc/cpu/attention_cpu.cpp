// Run-time dispatch of the fused CPU attention and the gather/compaction kernel used by pruning policies.
#include <cstring>

#include <omp.h>

#include "malloc_kernels/attention_cpu.h"

namespace malloc_kernels {
namespace cpu {

bool cpu_has_avx2() { return isa::cpu_supports(isa::Isa::Avx2); }

void attention_forward(const AttnParams& p, isa::Isa variant) {
  switch (isa::isa_for_family(variant, isa::Family::Attention)) {
#if MALLOC_KERNELS_X86
    case isa::Isa::Avx512: attention_forward_avx512(p); break;
    case isa::Isa::Avx2: attention_forward_avx2(p); break;
#endif
#if MALLOC_KERNELS_AARCH64
    case isa::Isa::Neon: attention_forward_neon(p); break;
#endif
    default: attention_forward_portable(p); break;
  }
}

void gather_rows(const uint8_t* src, uint8_t* dst, const int64_t* index, int64_t B, int64_t H, int64_t C, int64_t K,
                 int64_t row_bytes, int num_threads) {
  const int nth = num_threads > 0 ? num_threads : omp_get_max_threads();
#pragma omp parallel for schedule(static) num_threads(nth)
  for (int64_t bh = 0; bh < B * H; ++bh) {
    const uint8_t* s = src + bh * C * row_bytes;
    uint8_t* d = dst + bh * K * row_bytes;
    const int64_t* idx = index + bh * K;
    for (int64_t k = 0; k < K; ++k) std::memcpy(d + k * row_bytes, s + idx[k] * row_bytes, size_t(row_bytes));
  }
}

}  // namespace cpu
}  // namespace malloc_kernels
