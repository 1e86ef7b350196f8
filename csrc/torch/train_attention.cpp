// Torch glue for the training self-attention (malloc_kernels/train_attention.h): validation, contiguity,
// allocation. Ops (fake impls and the autograd Function in malloc_kernels/ops/train_attention.py):
//   self_attention_fwd(q, k, v, offsets, kind, scale, causal, norm_const, positions?, pos_bias?, timestamps?,
//                      time_bias?, thresholds?) -> (out, lse)
//   self_attention_bwd(grad_out, out, lse, q, k, v, offsets, kind, <the rest as above>)
//       -> (dq, dk, dv, dpos_bias, dtime_bias)
// kind: "hstu" or "softmax"; lse [total, Hq] is filled for softmax ([0, Hq] for hstu); a bias gradient is an empty
// tensor when its table is absent. Bad arguments raise ValueError/TypeError naming the argument.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <c10/util/Optional.h>

#include <string>
#include <tuple>

#include "malloc_kernels/train_attention.h"
#include "isa_glue.h"

namespace {

using at::Tensor;
using OptTensor = c10::optional<Tensor>;

void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
}

void check_like(const Tensor& t, const Tensor& q, const char* name) {
  check_cpu(t, name);
  TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), name, " must have the query's dtype ", q.scalar_type(),
                   ", got ", t.scalar_type());
}

void check_int64(const Tensor& t, const char* name, int64_t n) {
  check_cpu(t, name);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, name, " must be [", n, "], got ", t.sizes());
}

// A bias table [P] or [Hq, P]: returns its number of heads (1 = shared).
int64_t bias_heads(const Tensor& t, const Tensor& q, int64_t Hq, const char* name) {
  check_like(t, q, name);
  TORCH_CHECK_VALUE((t.dim() == 1 || (t.dim() == 2 && t.size(0) == Hq)) && t.size(-1) >= 1, name,
                    " must be [P] or [Hq=", Hq, ", P] with P >= 1, got ", t.sizes());
  return t.dim() == 1 ? 1 : Hq;
}

struct Prepared {
  Tensor q, k, v, offsets, positions, pos_bias, timestamps, time_bias, thresholds;
  int64_t B = 0, Hq = 0, Hkv = 0, D = 0, total = 0, pos_heads = 1, time_heads = 1;
};

Prepared prepare(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& offsets, int64_t norm_const,
                 const OptTensor& positions, const OptTensor& pos_bias, const OptTensor& timestamps,
                 const OptTensor& time_bias, const OptTensor& thresholds) {
  check_cpu(q, "query");
  TORCH_CHECK_TYPE(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
                   "query must be float32 or float64 for the CPU training kernel, got ", q.scalar_type());
  TORCH_CHECK_VALUE(q.dim() == 3, "query must be jagged [total, Hq, D], got ", q.sizes());
  check_like(k, q, "key");
  check_like(v, q, "value");
  TORCH_CHECK_VALUE(k.dim() == 3 && k.size(0) == q.size(0) && k.size(2) == q.size(2), "key must be [total=",
                    q.size(0), ", Hkv, D=", q.size(2), "], got ", k.sizes());
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "value must have the key's shape ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK_VALUE(k.size(1) >= 1 && q.size(1) % k.size(1) == 0, "query heads ", q.size(1),
                    " must be a multiple of the kv heads ", k.size(1));
  TORCH_CHECK_VALUE(norm_const >= 0, "norm_const must be >= 0 (0 = visible keys), got ", norm_const);
  Prepared r;
  r.total = q.size(0);
  r.Hq = q.size(1);
  r.Hkv = k.size(1);
  r.D = q.size(2);
  check_cpu(offsets, "offsets");
  TORCH_CHECK_TYPE(offsets.scalar_type() == at::kLong, "offsets must be int64, got ", offsets.scalar_type());
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.size(0) >= 1, "offsets must be [B+1], got ", offsets.sizes());
  r.offsets = offsets.contiguous();
  r.B = r.offsets.size(0) - 1;
  const int64_t* off = r.offsets.data_ptr<int64_t>();
  TORCH_CHECK_VALUE(off[0] == 0 && off[r.B] == r.total, "offsets must start at 0 and end at the token count ",
                    r.total, ", got ", off[0], " .. ", off[r.B]);
  for (int64_t b = 0; b < r.B; ++b)
    TORCH_CHECK_VALUE(off[b + 1] >= off[b], "offsets must be non-decreasing, got ", off[b], " then ", off[b + 1]);
  r.q = q.contiguous();
  r.k = k.contiguous();
  r.v = v.contiguous();
  if (pos_bias.has_value()) {
    r.pos_heads = bias_heads(*pos_bias, q, r.Hq, "pos_bias");
    TORCH_CHECK_VALUE(positions.has_value(), "pos_bias needs positions");
    check_int64(*positions, "positions", r.total);
    r.pos_bias = pos_bias->contiguous();
    r.positions = positions->contiguous();
  }
  if (time_bias.has_value()) {
    r.time_heads = bias_heads(*time_bias, q, r.Hq, "time_bias");
    TORCH_CHECK_VALUE(timestamps.has_value(), "time_bias needs timestamps");
    check_int64(*timestamps, "timestamps", r.total);
    TORCH_CHECK_VALUE(thresholds.has_value(), "time_bias needs thresholds (the exact time-bucket table)");
    check_int64(*thresholds, "thresholds", time_bias->size(-1));
    r.time_bias = time_bias->contiguous();
    r.timestamps = timestamps->contiguous();
    r.thresholds = thresholds->contiguous();
  }
  return r;
}

namespace ta = malloc_kernels::train_attention;

ta::Kind kind_of(c10::string_view kind) {
  if (kind == "hstu") return ta::Kind::HSTU;
  TORCH_CHECK_VALUE(kind == "softmax", "kind must be 'hstu' or 'softmax', got '", std::string(kind), "'");
  return ta::Kind::SOFTMAX;
}

template <typename T>
ta::Params<T> params_of(const Prepared& r, ta::Kind kind, double scale, bool causal, int64_t norm_const) {
  ta::Params<T> p;
  p.kind = kind;
  p.B = r.B;
  p.Hq = r.Hq;
  p.Hkv = r.Hkv;
  p.D = r.D;
  p.offsets = r.offsets.data_ptr<int64_t>();
  p.q = r.q.data_ptr<T>();
  p.k = r.k.data_ptr<T>();
  p.v = r.v.data_ptr<T>();
  p.scale = T(scale);
  p.causal = causal;
  p.norm_const = norm_const;
  if (r.pos_bias.defined()) {
    p.positions = r.positions.data_ptr<int64_t>();
    p.pos_bias = r.pos_bias.data_ptr<T>();
    p.pos_heads = r.pos_heads;
    p.P = r.pos_bias.size(-1);
  }
  if (r.time_bias.defined()) {
    p.timestamps = r.timestamps.data_ptr<int64_t>();
    p.time_bias = r.time_bias.data_ptr<T>();
    p.time_heads = r.time_heads;
    p.NT = r.time_bias.size(-1);
    p.thresholds = r.thresholds.data_ptr<int64_t>();
  }
  p.num_threads = at::get_num_threads();
  return p;
}

std::tuple<Tensor, Tensor> self_attention_fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                                  const Tensor& offsets, c10::string_view kind, double scale,
                                                  bool causal, int64_t norm_const, const OptTensor& positions,
                                                  const OptTensor& pos_bias, const OptTensor& timestamps,
                                                  const OptTensor& time_bias, const OptTensor& thresholds) {
  const ta::Kind kd = kind_of(kind);
  const Prepared r = prepare(q, k, v, offsets, norm_const, positions, pos_bias, timestamps, time_bias, thresholds);
  // offsets cover every token and every user's rows are written (softmax rows see at least themselves): no fill
  Tensor out = at::empty_like(r.q);
  Tensor lse = at::empty({kd == ta::Kind::SOFTMAX ? r.total : 0, r.Hq}, r.q.options());
  const auto variant = malloc_kernels::torch_glue::requested_isa();
  AT_DISPATCH_FLOATING_TYPES(r.q.scalar_type(), "self_attention_fwd", [&] {
    ta::self_attention_forward<scalar_t>(params_of<scalar_t>(r, kd, scale, causal, norm_const),
                                         out.data_ptr<scalar_t>(),
                                         kd == ta::Kind::SOFTMAX ? lse.data_ptr<scalar_t>() : nullptr, variant);
  });
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> self_attention_bwd_cpu(
    const Tensor& grad_out, const Tensor& out, const Tensor& lse, const Tensor& q, const Tensor& k, const Tensor& v,
    const Tensor& offsets, c10::string_view kind, double scale, bool causal, int64_t norm_const,
    const OptTensor& positions, const OptTensor& pos_bias, const OptTensor& timestamps, const OptTensor& time_bias,
    const OptTensor& thresholds) {
  const ta::Kind kd = kind_of(kind);
  const Prepared r = prepare(q, k, v, offsets, norm_const, positions, pos_bias, timestamps, time_bias, thresholds);
  check_like(grad_out, q, "grad_out");
  TORCH_CHECK_VALUE(grad_out.sizes() == q.sizes(), "grad_out must have the query's shape ", q.sizes(), ", got ",
                    grad_out.sizes());
  Tensor o, l;
  if (kd == ta::Kind::SOFTMAX) {
    check_like(out, q, "out");
    check_like(lse, q, "lse");
    TORCH_CHECK_VALUE(out.sizes() == q.sizes(), "out must have the query's shape ", q.sizes(), ", got ",
                      out.sizes());
    TORCH_CHECK_VALUE(lse.dim() == 2 && lse.size(0) == r.total && lse.size(1) == r.Hq, "lse must be [total=",
                      r.total, ", Hq=", r.Hq, "], got ", lse.sizes());
    o = out.contiguous();
    l = lse.contiguous();
  }
  const Tensor go = grad_out.contiguous();
  // every element of the gradients is written by the kernel (as for the forward's output): no fill
  Tensor dq = at::empty_like(r.q), dk = at::empty_like(r.k), dv = at::empty_like(r.v);
  Tensor dpb = r.pos_bias.defined() ? at::empty_like(r.pos_bias) : at::empty({0}, r.q.options());
  Tensor dtb = r.time_bias.defined() ? at::empty_like(r.time_bias) : at::empty({0}, r.q.options());
  const auto variant = malloc_kernels::torch_glue::requested_isa();
  AT_DISPATCH_FLOATING_TYPES(r.q.scalar_type(), "self_attention_bwd", [&] {
    ta::self_attention_backward<scalar_t>(
        params_of<scalar_t>(r, kd, scale, causal, norm_const), go.data_ptr<scalar_t>(),
        o.defined() ? o.data_ptr<scalar_t>() : nullptr, l.defined() ? l.data_ptr<scalar_t>() : nullptr,
        dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(),
        r.pos_bias.defined() ? dpb.data_ptr<scalar_t>() : nullptr,
        r.time_bias.defined() ? dtb.data_ptr<scalar_t>() : nullptr, variant);
  });
  return {dq, dk, dv, dpb, dtb};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(malloc_kernels, m) {
  m.def("self_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor offsets, str kind, float scale, bool causal, "
        "int norm_const, Tensor? positions, Tensor? pos_bias, Tensor? timestamps, Tensor? time_bias, "
        "Tensor? thresholds) -> (Tensor, Tensor)");
  m.def("self_attention_bwd(Tensor grad_out, Tensor out, Tensor lse, Tensor q, Tensor k, Tensor v, Tensor offsets, "
        "str kind, float scale, bool causal, int norm_const, Tensor? positions, Tensor? pos_bias, "
        "Tensor? timestamps, Tensor? time_bias, Tensor? thresholds) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(malloc_kernels, CPU, m) {
  m.impl("self_attention_fwd", &self_attention_fwd_cpu);
  m.impl("self_attention_bwd", &self_attention_bwd_cpu);
}
