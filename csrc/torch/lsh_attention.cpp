// Torch glue for lsh_attention_cpu (malloc_kernels/lsh_attention.h): validation and allocation only.
// Op: malloc_kernels::lsh_attention_cpu(q, k, v, offsets, q_bucket, q_pos, q_ts?, cache_k, cache_v, cache_len,
// cache_bucket, cache_pos, cache_ts?, pos_bias?, time_bias?, thresholds?, hstu, scale) -> Tensor out [T, H, D]
// (fake impl in malloc_kernels/models/reformer.py). Every extent the kernel indexes is checked here; bad arguments
// raise ValueError/TypeError naming the argument.
#include <torch/library.h>
#include <ATen/ATen.h>

#include "malloc_kernels/lsh_attention.h"

namespace {

using at::Tensor;
using c10::optional;

void check(const Tensor& t, const char* name, at::ScalarType dt, std::vector<int64_t> shape) {
  TORCH_CHECK_TYPE(t.scalar_type() == dt, name, " must be ", dt, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(shape), name, " must have shape ", at::IntArrayRef(shape), ", got ",
                    t.sizes());
}

Tensor lsh_attention_cpu(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& offsets,
                         const Tensor& q_bucket, const Tensor& q_pos, const optional<Tensor>& q_ts,
                         const Tensor& cache_k, const Tensor& cache_v, const Tensor& cache_len,
                         const Tensor& cache_bucket, const Tensor& cache_pos, const optional<Tensor>& cache_ts,
                         const optional<Tensor>& pos_bias, const optional<Tensor>& time_bias,
                         const optional<Tensor>& thresholds, bool hstu, double scale) {
  TORCH_CHECK_TYPE(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
                   "q must be float32 or float64, got ", q.scalar_type());
  TORCH_CHECK_VALUE(q.dim() == 3, "q must be [T, H, D], got ", q.sizes());
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2);
  TORCH_CHECK_VALUE(cache_k.dim() == 4, "cache_k must be [B, H, C, D], got ", cache_k.sizes());
  const int64_t B = cache_k.size(0), C = cache_k.size(2);
  const auto dt = q.scalar_type();
  check(k, "k", dt, {T, H, D});
  check(v, "v", dt, {T, H, D});
  check(offsets, "offsets", at::kLong, {B + 1});
  check(q_bucket, "q_bucket", at::kByte, {T, H});
  check(q_pos, "q_pos", at::kLong, {T});
  check(cache_k, "cache_k", dt, {B, H, C, D});
  check(cache_v, "cache_v", dt, {B, H, C, D});
  check(cache_len, "cache_len", at::kInt, {B, H});
  check(cache_bucket, "cache_bucket", at::kByte, {B, H, C});
  check(cache_pos, "cache_pos", at::kInt, {B, H, C});
  const Tensor off = offsets.contiguous(), len = cache_len.contiguous();
  if (B > 0) {
    const int64_t* o = off.data_ptr<int64_t>();
    TORCH_CHECK_VALUE(o[0] == 0 && o[B] == T, "offsets must start at 0 and end at T=", T, ", got ", o[0], "..", o[B]);
    for (int64_t b = 0; b < B; ++b) TORCH_CHECK_VALUE(o[b] <= o[b + 1], "offsets must be non-decreasing");
    auto mm = at::aminmax(len);
    TORCH_CHECK_VALUE(std::get<0>(mm).item<int>() >= 0 && std::get<1>(mm).item<int>() <= C,
                      "cache_len must lie in [0, C=", C, "]");
  } else {
    TORCH_CHECK_VALUE(T == 0, "q must be empty when there are no users, got T=", T);
  }
  malloc_kernels::lsh::LSHParams p;
  p.B = B; p.H = H; p.D = D; p.C = C; p.T = T;
  p.hstu = hstu;
  p.scale = scale;
  const Tensor qb = q_bucket.contiguous(), qp = q_pos.contiguous(), cb = cache_bucket.contiguous(),
               cp = cache_pos.contiguous();
  Tensor qt, ct, pb, tb, th;
  if (pos_bias.has_value()) {
    pb = pos_bias->contiguous();
    TORCH_CHECK_TYPE(pb.scalar_type() == at::kFloat, "pos_bias must be float32, got ", pb.scalar_type());
    TORCH_CHECK_VALUE(pb.dim() == 1 && pb.size(0) >= 1, "pos_bias must be [P], got ", pb.sizes());
    p.pos_bias = pb.data_ptr<float>();
    p.P = pb.size(0);
  }
  if (time_bias.has_value()) {
    TORCH_CHECK_VALUE(q_ts.has_value() && cache_ts.has_value() && thresholds.has_value(),
                      "time_bias needs q_ts, cache_ts and thresholds");
    tb = time_bias->contiguous();
    TORCH_CHECK_TYPE(tb.scalar_type() == at::kFloat, "time_bias must be float32, got ", tb.scalar_type());
    TORCH_CHECK_VALUE(tb.dim() == 1 && tb.size(0) >= 1, "time_bias must be [NT], got ", tb.sizes());
    check(*q_ts, "q_ts", at::kLong, {T});
    check(*cache_ts, "cache_ts", at::kLong, {B, H, C});
    check(*thresholds, "thresholds", at::kLong, {tb.size(0)});
    qt = q_ts->contiguous(); ct = cache_ts->contiguous(); th = thresholds->contiguous();
    p.time_bias = tb.data_ptr<float>();
    p.NT = tb.size(0);
    p.thresholds = th.data_ptr<int64_t>();
    p.q_ts = qt.data_ptr<int64_t>();
    p.cache_ts = ct.data_ptr<int64_t>();
  }
  p.offsets = off.data_ptr<int64_t>();
  p.q_bucket = qb.data_ptr<uint8_t>();
  p.q_pos = qp.data_ptr<int64_t>();
  p.cache_len = len.data_ptr<int32_t>();
  p.cache_bucket = cb.data_ptr<uint8_t>();
  p.cache_pos = cp.data_ptr<int32_t>();
  const Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous(), ckc = cache_k.contiguous(),
               cvc = cache_v.contiguous();
  Tensor out = at::empty({T, H, D}, q.options());
  if (T == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(dt, "lsh_attention_cpu", [&] {
    malloc_kernels::lsh::lsh_attention_cpu(p, qc.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(),
                                           vc.data_ptr<scalar_t>(), ckc.data_ptr<scalar_t>(),
                                           cvc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(malloc_kernels, m) {
  m.def("lsh_attention_cpu(Tensor q, Tensor k, Tensor v, Tensor offsets, Tensor q_bucket, Tensor q_pos, "
        "Tensor? q_ts, Tensor cache_k, Tensor cache_v, Tensor cache_len, Tensor cache_bucket, Tensor cache_pos, "
        "Tensor? cache_ts, Tensor? pos_bias, Tensor? time_bias, Tensor? thresholds, bool hstu, float scale) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(malloc_kernels, CPU, m) {
  m.impl("lsh_attention_cpu", &lsh_attention_cpu);
}
