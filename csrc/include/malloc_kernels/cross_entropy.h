// Softmax cross-entropy rows (framework-free): the elementwise middle of the chunked linear cross-entropy
// (malloc_kernels/loss/ops.py), fused so the logits are read twice and written once while they sit in L1.
//
// For each row i of logits z [R, C] (row stride ld) with target t_i in [0, C):
//   loss[i] = logsumexp(z_i) - z_i[t_i]                      (natural-log cross-entropy, max-shifted)
//   z_i    <- softmax(z_i) - onehot(t_i)                     (d loss[i] / d z_i, written in place)
// The caller turns the per-row gradient into grad_hidden = G W and grad_weight = G^T H with two GEMMs, so the
// [R, C] logits never leave the cache between the forward GEMM and the backward ones (Liger-Kernel's "fused linear
// cross entropy" idea, Hsu et al. 2024, arXiv 2410.10989, done with a CPU cache-sized chunk). T is float (AVX2/FMA
// when the CPU has it, else portable) or double (portable). Rows are split across OpenMP threads.
#pragma once

#include <cstdint>

#include "malloc_kernels/isa.h"

namespace malloc_kernels {
namespace loss {

// Float rows run the AVX2 variant when isa::isa_for_family(variant, Avx2) says so (MALLOC_KERNELS_ISA via the glue).
template <typename T>
void cross_entropy_rows(T* logits, const int64_t* targets, int64_t R, int64_t C, int64_t ld, T* loss,
                        isa::Isa variant = isa::Isa::Auto);

}  // namespace loss
}  // namespace malloc_kernels
