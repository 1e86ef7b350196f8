// Torch glue for cross_entropy_rows (malloc_kernels/cross_entropy.h): validation and allocation only.
// Op: malloc_kernels::cross_entropy_rows_(Tensor(a!) logits, Tensor targets) -> Tensor loss (fake impl in
// malloc_kernels/loss/ops.py). Bad arguments raise ValueError/TypeError naming the argument.
#include <torch/library.h>
#include <ATen/ATen.h>

#include "malloc_kernels/cross_entropy.h"
#include "isa_glue.h"

namespace {

using at::Tensor;

Tensor cross_entropy_rows_cpu(Tensor& logits, const Tensor& targets) {
  TORCH_CHECK_TYPE(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble,
                   "logits must be float32 or float64, got ", logits.scalar_type());
  TORCH_CHECK_VALUE(logits.device().is_cpu(), "logits must be a CPU tensor, got ", logits.device());
  TORCH_CHECK_VALUE(logits.dim() == 2, "logits must be [R, C], got ", logits.sizes());
  TORCH_CHECK_VALUE(logits.size(1) >= 1, "logits must have at least one class, got ", logits.sizes());
  // Written in place, so no contiguous copy: each row must be dense (any row stride).
  TORCH_CHECK_VALUE(logits.size(1) == 1 || logits.stride(1) == 1, "logits rows must be contiguous (stride(1) == 1), ",
                    "got strides ", logits.strides());
  TORCH_CHECK_TYPE(targets.scalar_type() == at::kLong, "targets must be int64, got ", targets.scalar_type());
  TORCH_CHECK_VALUE(targets.device().is_cpu(), "targets must be a CPU tensor, got ", targets.device());
  TORCH_CHECK_VALUE(targets.dim() == 1 && targets.size(0) == logits.size(0), "targets must be [R=", logits.size(0),
                    "], got ", targets.sizes());
  const int64_t R = logits.size(0), C = logits.size(1);
  Tensor loss = at::empty({R}, logits.options());
  if (R == 0) return loss;
  const Tensor t = targets.contiguous();
  auto mm = at::aminmax(t);
  const int64_t lo = std::get<0>(mm).item<int64_t>(), hi = std::get<1>(mm).item<int64_t>();
  TORCH_CHECK_VALUE(lo >= 0 && hi < C, "targets must lie in [0, ", C, "), got values in [", lo, ", ", hi, "]");
  const int64_t ld = R == 1 ? C : logits.stride(0);
  const auto variant = malloc_kernels::torch_glue::requested_isa();
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "cross_entropy_rows_", [&] {
    malloc_kernels::loss::cross_entropy_rows<scalar_t>(logits.data_ptr<scalar_t>(), t.data_ptr<int64_t>(), R, C,
                                                       ld, loss.data_ptr<scalar_t>(), variant);
  });
  return loss;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(malloc_kernels, m) {
  m.def("cross_entropy_rows_(Tensor(a!) logits, Tensor targets) -> Tensor");
}

TORCH_LIBRARY_IMPL(malloc_kernels, CPU, m) {
  m.impl("cross_entropy_rows_", &cross_entropy_rows_cpu);
}
