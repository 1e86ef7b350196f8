// Torch glue for the RWKV-4 WKV kernels (malloc_kernels/wkv.h): validation, contiguity, allocation.
// Ops: malloc_kernels::wkv(w, u, k, v, offsets, state, need_aux) -> (y, aux, state_out) and
// malloc_kernels::wkv_backward(w, u, k, v, offsets, state, y, aux, grad_y) -> (grad_w, grad_u, grad_k, grad_v)
// (fake impls and the autograd.Function in malloc_kernels/ops/wkv.py). Every extent the kernels read is checked
// here: bad arguments raise ValueError/TypeError naming the argument.
#include <torch/library.h>
#include <ATen/ATen.h>

#include <tuple>

#include "malloc_kernels/wkv.h"
#include "isa_glue.h"

namespace {

using at::Tensor;

void check_float(const Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
                   " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " must have k's dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
}

// Checks the shared arguments; returns (B, C). offsets must be int64 [B+1], 0 first, non-decreasing, T last.
std::tuple<int64_t, int64_t> check_common(const Tensor& w, const Tensor& u, const Tensor& k, const Tensor& v,
                                          const Tensor& offsets, const Tensor& state) {
  const auto dt = k.scalar_type();
  check_float(k, "k", dt);
  check_float(v, "v", dt);
  check_float(w, "w", dt);
  check_float(u, "u", dt);
  check_float(state, "state", dt);
  TORCH_CHECK_VALUE(k.dim() == 2, "k must be [T, C], got ", k.sizes());
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "v must have k's shape ", k.sizes(), ", got ", v.sizes());
  const int64_t T = k.size(0), C = k.size(1);
  TORCH_CHECK_VALUE(C >= 1, "k must have at least one channel, got ", k.sizes());
  TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == C, "w must be [C=", C, "], got ", w.sizes());
  TORCH_CHECK_VALUE(u.dim() == 1 && u.size(0) == C, "u must be [C=", C, "], got ", u.sizes());
  TORCH_CHECK_TYPE(offsets.scalar_type() == at::kLong, "offsets must be int64, got ", offsets.scalar_type());
  TORCH_CHECK_VALUE(offsets.device().is_cpu(), "offsets must be a CPU tensor, got ", offsets.device());
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.size(0) >= 1, "offsets must be [B+1], got ", offsets.sizes());
  const int64_t B = offsets.size(0) - 1;
  TORCH_CHECK_VALUE(state.dim() == 3 && state.size(0) == B && state.size(1) == 3 && state.size(2) == C,
                    "state must be [B=", B, ", 3, C=", C, "], got ", state.sizes());
  const Tensor off = offsets.contiguous();
  const int64_t* o = off.data_ptr<int64_t>();
  TORCH_CHECK_VALUE(o[0] == 0, "offsets[0] must be 0, got ", o[0]);
  TORCH_CHECK_VALUE(o[B] == T, "offsets[-1] must equal k.size(0)=", T, ", got ", o[B]);
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK_VALUE(o[b] <= o[b + 1], "offsets must be non-decreasing, got offsets[", b, "]=", o[b],
                      " > offsets[", b + 1, "]=", o[b + 1]);
  return {B, C};
}

std::tuple<Tensor, Tensor, Tensor> wkv_cpu(const Tensor& w, const Tensor& u, const Tensor& k, const Tensor& v,
                                           const Tensor& offsets, const Tensor& state, bool need_aux) {
  const auto [B, C] = check_common(w, u, k, v, offsets, state);
  const int64_t T = k.size(0);
  const Tensor kc = k.contiguous(), vc = v.contiguous(), wc = w.contiguous(), uc = u.contiguous();
  const Tensor sc = state.contiguous(), off = offsets.contiguous();
  Tensor y = at::empty({T, C}, k.options());
  Tensor aux = at::empty({need_aux ? 2 : 0, T, C}, k.options());
  Tensor out = at::empty({B, 3, C}, k.options());
  const auto variant = malloc_kernels::torch_glue::requested_isa();
  AT_DISPATCH_FLOATING_TYPES(k.scalar_type(), "wkv", [&] {
    malloc_kernels::wkv::forward<scalar_t>(wc.data_ptr<scalar_t>(), uc.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(),
                                           vc.data_ptr<scalar_t>(), off.data_ptr<int64_t>(), B, C,
                                           sc.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                                           need_aux ? aux.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(),
                                           variant);
  });
  return {y, aux, out};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> wkv_backward_cpu(const Tensor& w, const Tensor& u, const Tensor& k,
                                                            const Tensor& v, const Tensor& offsets,
                                                            const Tensor& state, const Tensor& y, const Tensor& aux,
                                                            const Tensor& grad_y) {
  const auto [B, C] = check_common(w, u, k, v, offsets, state);
  const int64_t T = k.size(0);
  const auto dt = k.scalar_type();
  check_float(y, "y", dt);
  check_float(aux, "aux", dt);
  check_float(grad_y, "grad_y", dt);
  TORCH_CHECK_VALUE(y.sizes() == k.sizes(), "y must have k's shape ", k.sizes(), ", got ", y.sizes());
  TORCH_CHECK_VALUE(grad_y.sizes() == k.sizes(), "grad_y must have k's shape ", k.sizes(), ", got ", grad_y.sizes());
  TORCH_CHECK_VALUE(aux.dim() == 3 && aux.size(0) == 2 && aux.size(1) == T && aux.size(2) == C,
                    "aux must be [2, T=", T, ", C=", C, "] (the forward's need_aux output), got ", aux.sizes());
  const Tensor kc = k.contiguous(), vc = v.contiguous(), wc = w.contiguous(), uc = u.contiguous();
  const Tensor sc = state.contiguous(), off = offsets.contiguous();
  const Tensor yc = y.contiguous(), ac = aux.contiguous(), gc = grad_y.contiguous();
  Tensor gw = at::zeros({B, C}, k.options()), gu = at::zeros({B, C}, k.options());
  Tensor gk = at::empty({T, C}, k.options()), gv = at::empty({T, C}, k.options());
  const auto variant = malloc_kernels::torch_glue::requested_isa();
  AT_DISPATCH_FLOATING_TYPES(dt, "wkv_backward", [&] {
    malloc_kernels::wkv::backward<scalar_t>(
        wc.data_ptr<scalar_t>(), uc.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(),
        off.data_ptr<int64_t>(), B, C, sc.data_ptr<scalar_t>(), yc.data_ptr<scalar_t>(), ac.data_ptr<scalar_t>(),
        gc.data_ptr<scalar_t>(), gw.data_ptr<scalar_t>(), gu.data_ptr<scalar_t>(), gk.data_ptr<scalar_t>(),
        gv.data_ptr<scalar_t>(), variant);
  });
  // per-user partial sums -> the parameters' gradients (a fixed-order reduction: deterministic)
  return {gw.sum(0), gu.sum(0), gk, gv};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(malloc_kernels, m) {
  m.def("wkv(Tensor w, Tensor u, Tensor k, Tensor v, Tensor offsets, Tensor state, bool need_aux) -> "
        "(Tensor, Tensor, Tensor)");
  m.def("wkv_backward(Tensor w, Tensor u, Tensor k, Tensor v, Tensor offsets, Tensor state, Tensor y, Tensor aux, "
        "Tensor grad_y) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(malloc_kernels, CPU, m) {
  m.impl("wkv", &wkv_cpu);
  m.impl("wkv_backward", &wkv_backward_cpu);
}
