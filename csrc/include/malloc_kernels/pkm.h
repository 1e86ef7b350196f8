// Product-key memory kernels (framework-free): the exact two-stage product-key top-k and the fused Sparse-Gather.
//
// Lample et al. 2019, "Large Memory Layers with Product Keys" (arXiv 1907.05242); MSN (arXiv 2602.07526) uses the
// same memory with a custom Sparse-Gather operator. Semantics and the exactness proof of the two-stage search are in
// malloc_kernels/memory/reference.py (the oracle). Summary:
//   query [N, H, 2*Dh], subkeys [H, 2, S, Dh], slot i = i1 * S + i2, score fl(s1(i1) + s2(i2)).
//   Order: score desc, then rank of i1 in its half asc, then rank of i2 asc (halves rank by score desc, index asc).
//   Gather: out[n] = sum_e w[n, e] * values[idx[n, e]]; its backward gives grad_w and the value gradient on the
//   touched rows only (sorted unique rows + one accumulated row each: a coalesced COO gradient).
// All arrays are dense row-major (the torch glue makes inputs contiguous). T is float or double; float paths use
// AVX2/FMA (top-k, gather) and AVX-512 (gather) when MALLOC_KERNELS_ISA and the CPU allow (runtime dispatch: the
// package is built without -mavx2).
#pragma once

#include <cstdint>

#include "malloc_kernels/isa.h"

namespace malloc_kernels {
namespace pkm {

// Exact top-k (k <= S) per (n, h). scores/indices: [N, H, k], best first.
template <typename T>
void topk(const T* query, const T* subkeys, int64_t N, int64_t H, int64_t Dh, int64_t S, int64_t k, T* scores,
          int64_t* indices, isa::Isa variant = isa::Isa::Auto);

// Gradient of the selected scores: grad_query [N, H, 2*Dh] (overwritten), grad_subkeys [H, 2, S, Dh] (overwritten).
template <typename T>
void topk_backward(const T* grad_scores, const T* query, const T* subkeys, const int64_t* indices, int64_t N,
                   int64_t H, int64_t Dh, int64_t S, int64_t k, T* grad_query, T* grad_subkeys);

// Sparse-Gather forward: out [N, Dv] (overwritten). idx in [0, M) (checked by the caller).
template <typename T>
void gather_forward(const T* values, int64_t Dv, const int64_t* idx, const T* weights, int64_t N, int64_t E, T* out,
                    isa::Isa variant = isa::Isa::Auto);

// Backward, phase 1: row_count [M] (workspace, overwritten) receives the number of entries of idx [NE] selecting each
// row. Returns U, the number of distinct touched rows.
int64_t gather_backward_plan(const int64_t* idx, int64_t NE, int64_t M, int32_t* row_count);

// Backward, phase 2: grad_weights [N, E]; rows [U] (sorted unique touched rows); grad_rows [U, Dv] with
// grad_rows[u] = sum over entries e with idx[e] == rows[u] (in ascending e, so the result is deterministic) of
// weights[e] * grad_out[e / E]. row_count is phase 1's (clobbered); order_ws [NE] and start_ws [U + 1] are int64
// workspaces. Requires N, E < 2^31 (entries are packed as n << 32 | t).
template <typename T>
void gather_backward(const T* grad_out, const T* values, int64_t M, int64_t Dv, const int64_t* idx,
                     const T* weights, int64_t N, int64_t E, int32_t* row_count, int64_t U, int64_t* order_ws,
                     int64_t* start_ws, T* grad_weights, int64_t* rows, T* grad_rows,
                     isa::Isa variant = isa::Isa::Auto);

}  // namespace pkm
}  // namespace malloc_kernels
