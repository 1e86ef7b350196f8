// Torch glue for the product-key memory kernels (malloc_kernels/pkm.h): validation, contiguity, allocation.
// Ops: malloc_kernels::pkm_topk, pkm_topk_backward, pkm_gather, pkm_gather_backward (fake impls in
// malloc_kernels/memory/ops.py). Bad arguments raise ValueError/TypeError naming the argument.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <mutex>
#include <tuple>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "malloc_kernels/pkm.h"
#include "isa_glue.h"

namespace {

using at::Tensor;

void check_float(const Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
                   " must be float32 or float64 for the CPU kernel, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
}

void check_search(const Tensor& query, const Tensor& subkeys, int64_t k) {
  check_float(query, "query");
  check_float(subkeys, "subkeys");
  TORCH_CHECK_VALUE(query.dim() == 3, "query must be [N, H, Dk], got ", query.sizes());
  TORCH_CHECK_VALUE(subkeys.dim() == 4 && subkeys.size(1) == 2, "subkeys must be [H, 2, S, Dk/2], got ",
                    subkeys.sizes());
  TORCH_CHECK_VALUE(query.size(2) % 2 == 0, "query's last dim Dk must be even, got ", query.size(2));
  TORCH_CHECK_VALUE(subkeys.size(0) == query.size(1) && subkeys.size(3) == query.size(2) / 2, "subkeys shape ",
                    subkeys.sizes(), " does not match query shape ", query.sizes());
  TORCH_CHECK_TYPE(query.scalar_type() == subkeys.scalar_type(), "query and subkeys must share a dtype, got ",
                   query.scalar_type(), " and ", subkeys.scalar_type());
  TORCH_CHECK_VALUE(k >= 1 && k <= subkeys.size(2), "k must be in [1, S=", subkeys.size(2), "], got ", k);
}

void check_indices_range(const Tensor& idx, int64_t M, const char* name) {
  if (idx.numel() == 0) return;
  auto mm = at::aminmax(idx);
  const int64_t lo = std::get<0>(mm).item<int64_t>(), hi = std::get<1>(mm).item<int64_t>();
  TORCH_CHECK_VALUE(lo >= 0 && hi < M, name, " must lie in [0, ", M, "), got values in [", lo, ", ", hi, "]");
}

void check_gather(const Tensor& values, const Tensor& indices, const Tensor& weights) {
  check_float(values, "values");
  check_float(weights, "weights");
  TORCH_CHECK_VALUE(values.dim() == 2, "values must be [M, Dv], got ", values.sizes());
  TORCH_CHECK_VALUE(indices.dim() == 2, "indices must be [N, E], got ", indices.sizes());
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt,
                   "indices must be int64 or int32, got ", indices.scalar_type());
  TORCH_CHECK_VALUE(indices.device().is_cpu(), "indices must be a CPU tensor, got ", indices.device());
  TORCH_CHECK_VALUE(weights.sizes() == indices.sizes(), "weights must have the indices' shape ", indices.sizes(),
                    ", got ", weights.sizes());
  TORCH_CHECK_TYPE(values.scalar_type() == weights.scalar_type(), "values and weights must share a dtype, got ",
                   values.scalar_type(), " and ", weights.scalar_type());
  TORCH_CHECK_VALUE(values.size(0) < (int64_t(1) << 31), "values must have fewer than 2^31 rows, got ",
                    values.size(0));
  check_indices_range(indices, values.size(0), "indices");
}

#ifdef __linux__
// A mapping of `capacity` usable bytes at a 2 MB-aligned `data` inside [base, base + len).
struct HugeBlock {
  void* base = nullptr;
  size_t len = 0, capacity = 0;
  void* data = nullptr;
};

constexpr size_t kHuge = size_t(2) << 20;

// The most recently freed block, kept for the next call: a training step frees the previous step's gradient before
// the next backward, so the next row gradient reuses its pages instead of faulting in and zeroing ~100 MB again.
std::mutex g_spare_mutex;
HugeBlock g_spare;

void release_block(const HugeBlock& b) {
  HugeBlock old;
  {
    std::lock_guard<std::mutex> lock(g_spare_mutex);
    old = g_spare;
    g_spare = b;
  }
  if (old.base != nullptr) munmap(old.base, old.len);
}

HugeBlock acquire_block(size_t nbytes) {
  const size_t rounded = (nbytes + kHuge - 1) / kHuge * kHuge;
  {
    std::lock_guard<std::mutex> lock(g_spare_mutex);
    // Reuse only a block of about the right size, so a small call does not pin a large mapping.
    if (g_spare.base != nullptr && g_spare.capacity >= rounded && g_spare.capacity <= rounded + rounded / 4) {
      const HugeBlock b = g_spare;
      g_spare = HugeBlock{};
      return b;
    }
  }
  HugeBlock b;
  b.len = rounded + kHuge;
  b.base = mmap(nullptr, b.len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (b.base == MAP_FAILED) return HugeBlock{};
  b.capacity = rounded;
  b.data = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(b.base) + kHuge - 1) / kHuge * kHuge);
  madvise(b.data, rounded, MADV_HUGEPAGE);  // advisory: without THP the pages are simply 4 KB
  return b;
}
#endif

// A tensor that the kernel overwrites in full (its initial contents are arbitrary, like at::empty's). Large ones
// are backed by transparent huge pages where Linux offers them (madvise mode) and reuse the last freed such block:
// the backward's row gradient (U rows, ~100 MB for MSN's batch) would otherwise take one page fault and one page
// zeroing per 4 KB, which costs about as long as computing it. Elsewhere, or if the mapping fails, at::empty.
Tensor empty_huge(at::IntArrayRef sizes, const at::TensorOptions& options) {
#ifdef __linux__
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t nbytes = static_cast<size_t>(numel) * options.dtype().itemsize();
  if (nbytes >= 4 * kHuge) {
    const HugeBlock b = acquire_block(nbytes);
    if (b.base != nullptr) return at::from_blob(b.data, sizes, [b](void*) { release_block(b); }, options);
  }
#endif
  return at::empty(sizes, options);
}

std::tuple<Tensor, Tensor> pkm_topk_cpu(const Tensor& query, const Tensor& subkeys, int64_t k) {
  check_search(query, subkeys, k);
  const Tensor q = query.contiguous(), kk = subkeys.contiguous();
  const int64_t N = q.size(0), H = q.size(1), Dh = q.size(2) / 2, S = kk.size(2);
  Tensor scores = at::empty({N, H, k}, q.options());
  Tensor indices = at::empty({N, H, k}, q.options().dtype(at::kLong));
  if (N == 0) return {scores, indices};
  const auto variant = malloc_kernels::torch_glue::requested_isa();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "pkm_topk", [&] {
    malloc_kernels::pkm::topk<scalar_t>(q.data_ptr<scalar_t>(), kk.data_ptr<scalar_t>(), N, H, Dh, S, k,
                                        scores.data_ptr<scalar_t>(), indices.data_ptr<int64_t>(), variant);
  });
  return {scores, indices};
}

std::tuple<Tensor, Tensor> pkm_topk_backward_cpu(const Tensor& grad_scores, const Tensor& query,
                                                 const Tensor& subkeys, const Tensor& indices) {
  TORCH_CHECK_VALUE(indices.dim() == 3, "indices must be [N, H, k], got ", indices.sizes());
  check_search(query, subkeys, indices.size(2));
  check_float(grad_scores, "grad_scores");
  TORCH_CHECK_VALUE(grad_scores.sizes() == indices.sizes(), "grad_scores must have the indices' shape ",
                    indices.sizes(), ", got ", grad_scores.sizes());
  TORCH_CHECK_VALUE(indices.size(0) == query.size(0) && indices.size(1) == query.size(1), "indices shape ",
                    indices.sizes(), " does not match query shape ", query.sizes());
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong, "indices must be int64, got ", indices.scalar_type());
  TORCH_CHECK_TYPE(grad_scores.scalar_type() == query.scalar_type(), "grad_scores must have the query's dtype");
  const int64_t S = subkeys.size(2);
  check_indices_range(indices, S * S, "indices");
  const Tensor g = grad_scores.contiguous(), q = query.contiguous(), kk = subkeys.contiguous(),
               idx = indices.contiguous();
  const int64_t N = q.size(0), H = q.size(1), Dh = q.size(2) / 2, k = idx.size(2);
  Tensor grad_query = at::empty_like(q);
  Tensor grad_subkeys = at::empty_like(kk);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "pkm_topk_backward", [&] {
    malloc_kernels::pkm::topk_backward<scalar_t>(g.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(),
                                                 kk.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), N, H, Dh, S, k,
                                                 grad_query.data_ptr<scalar_t>(), grad_subkeys.data_ptr<scalar_t>());
  });
  return {grad_query, grad_subkeys};
}

Tensor pkm_gather_cpu(const Tensor& values, const Tensor& indices, const Tensor& weights) {
  check_gather(values, indices, weights);
  const Tensor v = values.contiguous(), idx = indices.to(at::kLong).contiguous(), w = weights.contiguous();
  const int64_t N = idx.size(0), E = idx.size(1), Dv = v.size(1);
  Tensor out = at::empty({N, Dv}, v.options());
  if (N == 0) return out;
  const auto variant = malloc_kernels::torch_glue::requested_isa();
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "pkm_gather", [&] {
    malloc_kernels::pkm::gather_forward<scalar_t>(v.data_ptr<scalar_t>(), Dv, idx.data_ptr<int64_t>(),
                                                  w.data_ptr<scalar_t>(), N, E, out.data_ptr<scalar_t>(), variant);
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> pkm_gather_backward_cpu(const Tensor& grad_out, const Tensor& values,
                                                           const Tensor& indices, const Tensor& weights) {
  check_gather(values, indices, weights);
  check_float(grad_out, "grad_out");
  TORCH_CHECK_VALUE(grad_out.dim() == 2 && grad_out.size(0) == indices.size(0) && grad_out.size(1) == values.size(1),
                    "grad_out must be [N=", indices.size(0), ", Dv=", values.size(1), "], got ", grad_out.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == values.scalar_type(), "grad_out must have the values' dtype, got ",
                   grad_out.scalar_type());
  const Tensor g = grad_out.contiguous(), v = values.contiguous(), idx = indices.to(at::kLong).contiguous(),
               w = weights.contiguous();
  const int64_t N = idx.size(0), E = idx.size(1), Dv = v.size(1), M = v.size(0), NE = N * E;
  TORCH_CHECK_VALUE(N < (int64_t(1) << 31) && E < (int64_t(1) << 31),
                    "indices must have fewer than 2^31 rows and columns, got ", indices.sizes());
  Tensor row_count = at::empty({M}, v.options().dtype(at::kInt));
  const int64_t U = malloc_kernels::pkm::gather_backward_plan(idx.data_ptr<int64_t>(), NE, M,
                                                              row_count.data_ptr<int32_t>());
  Tensor grad_weights = at::empty({N, E}, v.options());
  Tensor rows = at::empty({U}, v.options().dtype(at::kLong));
  Tensor grad_rows = empty_huge({U, Dv}, v.options());
  Tensor order_ws = at::empty({NE}, v.options().dtype(at::kLong));
  Tensor start_ws = at::empty({U + 1}, v.options().dtype(at::kLong));
  const auto variant = malloc_kernels::torch_glue::requested_isa();
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "pkm_gather_backward", [&] {
    malloc_kernels::pkm::gather_backward<scalar_t>(
        g.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), M, Dv, idx.data_ptr<int64_t>(), w.data_ptr<scalar_t>(), N, E,
        row_count.data_ptr<int32_t>(), U, order_ws.data_ptr<int64_t>(), start_ws.data_ptr<int64_t>(),
        grad_weights.data_ptr<scalar_t>(), rows.data_ptr<int64_t>(), grad_rows.data_ptr<scalar_t>(), variant);
  });
  return {grad_weights, rows, grad_rows};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(malloc_kernels, m) {
  m.def("pkm_topk(Tensor query, Tensor subkeys, int k) -> (Tensor, Tensor)");
  m.def("pkm_topk_backward(Tensor grad_scores, Tensor query, Tensor subkeys, Tensor indices) -> (Tensor, Tensor)");
  m.def("pkm_gather(Tensor values, Tensor indices, Tensor weights) -> Tensor");
  m.def("pkm_gather_backward(Tensor grad_out, Tensor values, Tensor indices, Tensor weights) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(malloc_kernels, CPU, m) {
  m.impl("pkm_topk", &pkm_topk_cpu);
  m.impl("pkm_topk_backward", &pkm_topk_backward_cpu);
  m.impl("pkm_gather", &pkm_gather_cpu);
  m.impl("pkm_gather_backward", &pkm_gather_backward_cpu);
}
