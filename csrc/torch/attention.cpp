// Torch glue for the fused CPU attention (csrc/cpu/attention*.cpp) and the row gather used by pruning policies.
// Thin by design: checks, pointer/stride extraction into AttnParams, output allocation. Semantics and argument
// normalisation (defaults, jagged offsets, positions, thresholds) live in malloc_kernels/ops/cpu.py.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include "malloc_kernels/attention_cpu.h"

namespace {

using malloc_kernels::cpu::AttnParams;
using malloc_kernels::cpu::DType;
using malloc_kernels::cpu::Fmt;
using malloc_kernels::cpu::Segment;
using malloc_kernels::cpu::Strided;
using c10::optional;
using at::Tensor;

DType dtype_of(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::F32;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default: TORCH_CHECK(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return DType::F32;
}

Fmt fmt_of(const std::string& f, const Tensor& payload, const char* name) {
  if (f == "float") return Fmt(int(dtype_of(payload, name)));
  TORCH_CHECK(payload.scalar_type() == at::kByte, name, " must be uint8 codes for format ", f);
  if (f == "int8") return Fmt::INT8;
  if (f == "int4") return Fmt::INT4;
  if (f == "int2") return Fmt::INT2;
  if (f == "fp8") return Fmt::FP8;
  TORCH_CHECK(false, "unknown cache format ", f);
  return Fmt::F32;
}

// Last dim unit stride (any other strides are fine); other tensors are made contiguous.
Tensor rowmajor(const Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

template <class T>
const T* ptr_or_null(const optional<Tensor>& t) { return t.has_value() ? t->data_ptr<T>() : nullptr; }

Strided view4(const Tensor& t, const optional<Tensor>& offsets) {
  Strided s;
  s.p = t.data_ptr();
  if (offsets.has_value()) {  // jagged [total, H, D]
    s.sB = 0; s.sH = t.stride(1); s.sL = t.stride(0); s.start = offsets->data_ptr<int64_t>();
  } else {                    // dense [B, H, L, D]
    s.sB = t.stride(0); s.sH = t.stride(1); s.sL = t.stride(2);
  }
  return s;
}

Strided view_tokens(const Tensor& t, const optional<Tensor>& offsets) {  // int64 [B, L] or [total], contiguous
  Strided s;
  s.p = t.data_ptr();
  if (offsets.has_value()) { s.sB = 0; s.sL = 1; s.start = offsets->data_ptr<int64_t>(); }
  else { s.sB = t.size(1); s.sL = 1; }
  return s;
}

Strided view_heads(const Tensor& t, const optional<Tensor>& offsets) {  // [B, H, L] or [total, H], contiguous
  Strided s;
  s.p = t.data_ptr();
  if (offsets.has_value()) { s.sB = 0; s.sH = 1; s.sL = t.size(1); s.start = offsets->data_ptr<int64_t>(); }
  else { s.sB = t.size(1) * t.size(2); s.sH = t.size(2); s.sL = 1; }
  return s;
}

Segment segment(const Tensor& k, const Tensor& v, const std::string& kf, const std::string& vf, bool k_channel,
                int64_t group_size, const Tensor& length, const Tensor& position, const optional<Tensor>& timestamp,
                const optional<Tensor>& count, const optional<Tensor>& ks, const optional<Tensor>& kz,
                const optional<Tensor>& vs, const optional<Tensor>& vz, const char* name) {
  Segment s;
  TORCH_CHECK(k.is_contiguous() && v.is_contiguous() && length.is_contiguous() && position.is_contiguous(),
              name, " tensors must be contiguous");
  s.k = k.data_ptr(); s.v = v.data_ptr();
  s.k_fmt = fmt_of(kf, k, name); s.v_fmt = fmt_of(vf, v, name);
  s.k_channel = k_channel; s.group_size = int(group_size); s.capacity = k.size(2);
  TORCH_CHECK(length.scalar_type() == at::kInt && position.scalar_type() == at::kInt, name,
              ".length/position must be int32");
  s.length = length.data_ptr<int32_t>(); s.position = position.data_ptr<int32_t>();
  s.timestamp = ptr_or_null<int64_t>(timestamp); s.count = ptr_or_null<float>(count);
  auto half = [](const optional<Tensor>& t) -> const uint16_t* {
    if (!t.has_value()) return nullptr;
    TORCH_CHECK(t->scalar_type() == at::kHalf && t->is_contiguous(), "scales/zeros must be contiguous float16");
    return reinterpret_cast<const uint16_t*>(t->data_ptr<at::Half>());
  };
  s.k_scale = half(ks); s.k_zero = half(kz); s.v_scale = half(vs); s.v_zero = half(vz);
  return s;
}

// ---- argument checks: the op is registered, so anything may call it; it must never read out of bounds ------------
// (the Python glue validates too, but only this function stands between torch.ops.malloc_kernels.attention_cpu and
// the kernel's raw pointers). Each check names the argument.

void expect(const Tensor& t, const char* name, at::ScalarType dt, std::initializer_list<int64_t> shape) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == dt, name, " must be ", dt, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == c10::IntArrayRef(shape), name, " must have shape ", c10::IntArrayRef(shape),
                    ", got ", t.sizes());
}

// int64 offsets [B + 1]: 0 = o[0] <= o[1] <= ... <= o[B] = total.
void check_offsets(const Tensor& o, const char* name, int64_t total) {
  TORCH_CHECK_VALUE(o.device().is_cpu() && o.scalar_type() == at::kLong && o.dim() == 1 && o.size(0) >= 1 &&
                        o.is_contiguous(), name, " must be a contiguous int64 CPU tensor [B + 1]");
  const int64_t* d = o.data_ptr<int64_t>();
  TORCH_CHECK_VALUE(d[0] == 0 && d[o.size(0) - 1] == total, name, " must start at 0 and end at ", total, ", got ",
                    d[0], " .. ", d[o.size(0) - 1]);
  for (int64_t i = 1; i < o.size(0); ++i) TORCH_CHECK_VALUE(d[i] >= d[i - 1], name, " must be non-decreasing");
}

int64_t packed_row(const std::string& fmt, int64_t D) {
  if (fmt == "int4") return (D + 1) / 2;
  if (fmt == "int2") return (D + 3) / 4;
  return D;  // float (elements), int8, fp8
}

// One cache segment against [B, Hkv] and head dim D: payload widths, per-entry fields, lengths within capacity,
// scale/zero shapes of the format's groups.
void check_segment(const Tensor& k, const Tensor& v, const std::string& kf, const std::string& vf, bool k_channel,
                   int64_t G, const Tensor& length, const Tensor& position, const optional<Tensor>& timestamp,
                   const optional<Tensor>& count, const optional<Tensor>& ks, const optional<Tensor>& kz,
                   const optional<Tensor>& vs, const optional<Tensor>& vz, int64_t B, int64_t H, int64_t D,
                   const std::string& name) {
  TORCH_CHECK_VALUE(k.dim() == 4 && v.dim() == 4, name, ".k/.v must be [B, Hkv, C, W]");
  const int64_t C = k.size(2);
  for (auto [t, fmt, which] : {std::tuple<const Tensor&, const std::string&, const char*>{k, kf, "k"},
                               std::tuple<const Tensor&, const std::string&, const char*>{v, vf, "v"}}) {
    TORCH_CHECK_VALUE(t.device().is_cpu(), name, ".", which, " must be a CPU tensor");
    TORCH_CHECK_VALUE(t.size(0) == B && t.size(1) == H && t.size(2) == C && t.size(3) == packed_row(fmt, D), name,
                      ".", which, " must be [B=", B, ", Hkv=", H, ", C=", C, ", ", packed_row(fmt, D), "] for format ",
                      fmt, " and head dim ", D, ", got ", t.sizes());
  }
  expect(length, (name + ".length").c_str(), at::kInt, {B, H});
  expect(position, (name + ".position").c_str(), at::kInt, {B, H, C});
  if (timestamp.has_value()) expect(*timestamp, (name + ".timestamp").c_str(), at::kLong, {B, H, C});
  if (count.has_value()) expect(*count, (name + ".count").c_str(), at::kFloat, {B, H, C});
  if (length.numel()) {
    const auto mm = at::aminmax(length);
    const int64_t lo = std::get<0>(mm).item<int32_t>(), hi = std::get<1>(mm).item<int32_t>();
    TORCH_CHECK_VALUE(lo >= 0 && hi <= C, name, ".length must lie in [0, capacity=", C, "], got values in [", lo,
                      ", ", hi, "]");
  }
  for (auto [fmt, sc, zr, which] :
       {std::tuple<const std::string&, const optional<Tensor>&, const optional<Tensor>&, const char*>{kf, ks, kz, "k"},
        std::tuple<const std::string&, const optional<Tensor>&, const optional<Tensor>&, const char*>{vf, vs, vz,
                                                                                                       "v"}}) {
    if (fmt == "float") continue;
    const bool chan = k_channel && std::string(which) == "k";
    TORCH_CHECK_VALUE(G > 0 && (chan || D % G == 0), "group_size ", G, " must be positive",
                      chan ? "" : " and divide the head dim");
    const int64_t rows = chan ? (C + G - 1) / G : C, cols = chan ? D : D / G;
    TORCH_CHECK_VALUE(sc.has_value(), name, ".", which, "_scale is required for format ", fmt);
    expect(*sc, (name + "." + which + "_scale").c_str(), at::kHalf, {B, H, rows, cols});
    if (fmt != "fp8") {
      TORCH_CHECK_VALUE(zr.has_value(), name, ".", which, "_zero is required for format ", fmt);
    }
    if (zr.has_value()) expect(*zr, (name + "." + which + "_zero").c_str(), at::kHalf, {B, H, rows, cols});
  }
}

// Per-token int64 positions/timestamps: dense [B, L>=need] or jagged [total].
void check_tokens(const optional<Tensor>& t, const char* name, bool jagged, int64_t B, int64_t need) {
  if (!t.has_value()) return;
  TORCH_CHECK_VALUE(t->device().is_cpu() && t->scalar_type() == at::kLong && t->is_contiguous(), name,
                    " must be a contiguous int64 CPU tensor");
  if (jagged) {
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) >= need, name, " must be [total >= ", need, "]");
  } else {
    TORCH_CHECK_VALUE(t->dim() == 2 && t->size(0) == B && t->size(1) >= need, name, " must be [B=", B,
                      ", L >= ", need, "], got ", t->sizes());
  }
}

void check_table(const Tensor& t, const char* name, int64_t Hq) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), name,
                    " must be a contiguous float32 CPU tensor");
  TORCH_CHECK_VALUE((t.dim() == 1 || (t.dim() == 2 && t.size(0) == Hq)) && t.size(-1) >= 1, name,
                    " must be [P] or [Hq=", Hq, ", P] with P >= 1, got ", t.sizes());
}

std::vector<Tensor> attention_cpu(
    const Tensor& query, const optional<Tensor>& key, const optional<Tensor>& value,
    const optional<Tensor>& q_offsets, const optional<Tensor>& k_offsets,
    const optional<Tensor>& cache_k, const optional<Tensor>& cache_v, const optional<Tensor>& cache_length,
    const optional<Tensor>& cache_position, const optional<Tensor>& cache_timestamp,
    const optional<Tensor>& cache_count, const optional<Tensor>& k_scale, const optional<Tensor>& k_zero,
    const optional<Tensor>& v_scale, const optional<Tensor>& v_zero,
    const optional<Tensor>& res_k, const optional<Tensor>& res_v, const optional<Tensor>& res_length,
    const optional<Tensor>& res_position, const optional<Tensor>& res_timestamp, const optional<Tensor>& res_count,
    const optional<Tensor>& original_length, const std::string& k_format, const std::string& v_format,
    bool k_channel, int64_t group_size, const std::string& kind, bool is_causal,
    const optional<Tensor>& num_targets, double scale, const optional<Tensor>& query_positions,
    const optional<Tensor>& key_positions, const optional<Tensor>& query_timestamps,
    const optional<Tensor>& key_timestamps, const optional<Tensor>& pos_bias, const optional<Tensor>& time_bias,
    const optional<Tensor>& time_thresholds, const std::string& hstu_norm, int64_t hstu_norm_const,
    bool return_lse, bool return_stats, int64_t stats_window) {
  const bool jagged = q_offsets.has_value();
  TORCH_CHECK(query.dim() == (jagged ? 3 : 4), "query must be [B, Hq, Lq, D] or jagged [total, Hq, D]");
  TORCH_CHECK_VALUE(query.device().is_cpu() && query.size(-1) >= 1, "query must be a CPU tensor with D >= 1");
  if (jagged) check_offsets(*q_offsets, "q_offsets", query.size(0));
  {
    // every shape, dtype and bound the kernel relies on (see the helpers above)
    const int64_t B = jagged ? q_offsets->size(0) - 1 : query.size(0), Hq = query.size(1), D = query.size(-1);
    int64_t Hkv = -1, Lk = 0;
    TORCH_CHECK_VALUE(key.has_value() == value.has_value(), "key and value must be given together");
    if (key.has_value()) {
      TORCH_CHECK_VALUE(key->device().is_cpu() && value->device().is_cpu(), "key/value must be CPU tensors");
      TORCH_CHECK_VALUE(key->dim() == query.dim() && key->sizes() == value->sizes() && key->size(-1) == D,
                        "key and value must share a shape [B, Hkv, Lk, D] (jagged [total, Hkv, D]) with the "
                        "query's D, got ", key->sizes(), " and ", value->sizes());
      Hkv = key->size(1);
      if (jagged) {
        TORCH_CHECK_VALUE(k_offsets.has_value(), "k_offsets are required with jagged keys");
        check_offsets(*k_offsets, "k_offsets", key->size(0));
        TORCH_CHECK_VALUE(k_offsets->size(0) == B + 1, "k_offsets must be [B + 1 = ", B + 1, "]");
      } else {
        TORCH_CHECK_VALUE(key->size(0) == B, "key batch ", key->size(0), " != query batch ", B);
        Lk = key->size(2);
      }
    }
    TORCH_CHECK_VALUE(cache_k.has_value() == cache_v.has_value() && cache_k.has_value() == cache_length.has_value() &&
                          cache_k.has_value() == cache_position.has_value(),
                      "cache_k, cache_v, cache_length and cache_position must be given together");
    if (cache_k.has_value()) {
      TORCH_CHECK_VALUE(cache_k->dim() == 4, "cache_k must be [B, Hkv, C, W]");
      TORCH_CHECK_VALUE(Hkv < 0 || cache_k->size(1) == Hkv, "cache_k has ", cache_k->size(1), " kv heads, key ", Hkv);
      Hkv = cache_k->size(1);
      check_segment(*cache_k, *cache_v, k_format, v_format, k_channel, group_size, *cache_length, *cache_position,
                    cache_timestamp, cache_count, k_scale, k_zero, v_scale, v_zero, B, Hkv, D, "cache");
      TORCH_CHECK_VALUE(original_length.has_value(), "original_length is required with a cache");
      expect(*original_length, "original_length", at::kInt, {B});
    }
    TORCH_CHECK_VALUE(res_k.has_value() == res_v.has_value() && res_k.has_value() == res_length.has_value() &&
                          res_k.has_value() == res_position.has_value(),
                      "res_k, res_v, res_length and res_position must be given together");
    if (res_k.has_value()) {
      TORCH_CHECK_VALUE(cache_k.has_value(), "a residual segment needs a cache");
      check_segment(*res_k, *res_v, "float", "float", false, 0, *res_length, *res_position, res_timestamp, res_count,
                    {}, {}, {}, {}, B, Hkv, D, "residual");
    }
    TORCH_CHECK_VALUE(Hkv > 0 && Hq % Hkv == 0, "Hq (", Hq, ") must be a positive multiple of Hkv (", Hkv, ")");
    TORCH_CHECK_VALUE(kind == "softmax" || kind == "hstu", "kind must be 'softmax' or 'hstu', got '", kind, "'");
    TORCH_CHECK_VALUE(hstu_norm == "original" || hstu_norm == "kept" || hstu_norm == "const",
                      "hstu_norm must be 'original', 'kept' or 'const', got '", hstu_norm, "'");
    TORCH_CHECK_VALUE(stats_window >= 0, "stats_window must be >= 0, got ", stats_window);
    if (num_targets.has_value()) expect(*num_targets, "num_targets", at::kLong, {B});
    const int64_t q_need = jagged ? query.size(0) : query.size(2);
    const int64_t k_need = jagged ? (key.has_value() ? key->size(0) : 0) : Lk;
    check_tokens(query_positions, "query_positions", jagged, B, q_need);
    check_tokens(query_timestamps, "query_timestamps", jagged, B, q_need);
    check_tokens(key_positions, "key_positions", jagged, B, k_need);
    check_tokens(key_timestamps, "key_timestamps", jagged, B, k_need);
    if (pos_bias.has_value()) {
      check_table(*pos_bias, "pos_bias", Hq);
      TORCH_CHECK_VALUE(query_positions.has_value() && (!key.has_value() || key_positions.has_value()),
                        "pos_bias needs query_positions (and key_positions with keys)");
    }
    if (time_bias.has_value()) {
      check_table(*time_bias, "time_bias", Hq);
      TORCH_CHECK_VALUE(query_timestamps.has_value() && (!key.has_value() || key_timestamps.has_value()),
                        "time_bias needs query_timestamps (and key_timestamps with keys)");
      TORCH_CHECK_VALUE(!cache_k.has_value() || cache_timestamp.has_value(), "time_bias needs cache_timestamp");
      TORCH_CHECK_VALUE(!res_k.has_value() || res_timestamp.has_value(), "time_bias needs res_timestamp");
      TORCH_CHECK_VALUE(time_thresholds.has_value(), "time_thresholds are required with time_bias");
      expect(*time_thresholds, "time_thresholds", at::kLong, {time_bias->size(-1)});
    }
  }
  const Tensor q = rowmajor(query);
  AttnParams p;
  p.q_dtype = dtype_of(q, "query");
  p.Hq = int(q.size(jagged ? 1 : 1));
  p.D = int(q.size(-1));
  p.B = int(jagged ? q_offsets->size(0) - 1 : q.size(0));
  const int64_t Lq = jagged ? 0 : q.size(2);
  std::vector<int64_t> qlen(p.B), klen(p.B);
  if (jagged) {
    TORCH_CHECK(q_offsets->scalar_type() == at::kLong && q_offsets->is_contiguous(), "offsets must be int64");
    const int64_t* o = q_offsets->data_ptr<int64_t>();
    for (int b = 0; b < p.B; ++b) qlen[b] = o[b + 1] - o[b];
  } else {
    std::fill(qlen.begin(), qlen.end(), Lq);
  }
  p.q = view4(q, q_offsets);
  p.q_len = qlen.data();

  Tensor k, v;
  if (key.has_value()) {
    TORCH_CHECK(value.has_value(), "value is required with key");
    k = rowmajor(*key); v = rowmajor(*value);
    p.kv_dtype = dtype_of(k, "key");
    TORCH_CHECK(v.scalar_type() == k.scalar_type(), "key and value must have the same dtype");
    p.Hkv = int(k.size(1));
    const optional<Tensor>& ko = jagged ? k_offsets : optional<Tensor>();
    p.k = view4(k, ko); p.v = view4(v, ko);
    if (jagged) {
      TORCH_CHECK(k_offsets.has_value() && k_offsets->scalar_type() == at::kLong, "key_offsets must be int64");
      const int64_t* o = k_offsets->data_ptr<int64_t>();
      for (int b = 0; b < p.B; ++b) klen[b] = o[b + 1] - o[b];
    } else {
      std::fill(klen.begin(), klen.end(), k.size(2));
    }
    p.k_len = klen.data();
  }
  p.has_cache = cache_k.has_value();
  if (p.has_cache) {
    p.Hkv = int(cache_k->size(1));
    p.cache = segment(*cache_k, *cache_v, k_format, v_format, k_channel, group_size, *cache_length, *cache_position,
                      cache_timestamp, cache_count, k_scale, k_zero, v_scale, v_zero, "cache");
    TORCH_CHECK(original_length.has_value(), "original_length is required with a cache");
    p.original_length = original_length->data_ptr<int32_t>();
  }
  p.has_residual = res_k.has_value();
  if (p.has_residual)
    p.residual = segment(*res_k, *res_v, "float", "float", false, 0, *res_length, *res_position, res_timestamp,
                         res_count, {}, {}, {}, {}, "residual");
  TORCH_CHECK(p.Hkv > 0 && p.Hq % p.Hkv == 0, "Hq must be a multiple of Hkv");
  p.kind = kind == "hstu" ? malloc_kernels::cpu::Kind::Hstu : malloc_kernels::cpu::Kind::Softmax;
  p.scale = float(scale);
  p.causal = is_causal;
  p.num_targets = ptr_or_null<int64_t>(num_targets);
  if (query_positions.has_value()) p.q_pos = view_tokens(*query_positions, q_offsets);
  if (key_positions.has_value()) p.k_pos = view_tokens(*key_positions, jagged ? k_offsets : optional<Tensor>());
  if (query_timestamps.has_value()) p.q_ts = view_tokens(*query_timestamps, q_offsets);
  if (key_timestamps.has_value()) p.k_ts = view_tokens(*key_timestamps, jagged ? k_offsets : optional<Tensor>());
  if (pos_bias.has_value()) {
    p.pos_bias = pos_bias->data_ptr<float>();
    p.P = pos_bias->size(-1);
    p.pos_bias_sH = pos_bias->dim() == 2 ? p.P : 0;
  }
  if (time_bias.has_value()) {
    TORCH_CHECK(time_thresholds.has_value(), "time_thresholds are required with time_bias");
    p.time_bias = time_bias->data_ptr<float>();
    p.T = time_bias->size(-1);
    p.time_bias_sH = time_bias->dim() == 2 ? p.T : 0;
    p.time_thresholds = time_thresholds->data_ptr<int64_t>();
  }
  p.hstu_norm = hstu_norm == "kept" ? malloc_kernels::cpu::HstuNorm::Kept
              : hstu_norm == "original" ? malloc_kernels::cpu::HstuNorm::Original
                                        : malloc_kernels::cpu::HstuNorm::Constant;
  p.hstu_norm_const = hstu_norm_const;

  Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  p.out = view4(out, q_offsets);
  const auto f32 = q.options().dtype(at::kFloat);
  // Unused outputs are distinct empty tensors: outputs of a custom op must not alias each other.
  auto none = [&]() { return at::empty({0}, f32); };
  Tensor lse = none(), km = none(), kwm = none(), cm = none(), cwm = none(), rm = none(), rwm = none();
  if (return_lse) {
    lse = jagged ? at::empty({q.size(0), p.Hq}, f32) : at::empty({p.B, p.Hq, Lq}, f32);
    p.lse = lse.data_ptr<float>();
    p.lse_view = view_heads(lse, q_offsets);
  }
  if (return_stats) {
    p.stats = true;
    p.stats_window = stats_window;
    const int64_t total_k = k.defined() ? k.size(0) : 0;
    const int64_t Lk = k.defined() && !jagged ? k.size(2) : 0;
    auto kshape = [&]() {
      return jagged ? at::zeros({total_k, p.Hkv}, f32) : at::zeros({p.B, p.Hkv, Lk}, f32);
    };
    km = kshape();
    p.key_mass = view_heads(km, jagged ? k_offsets : optional<Tensor>());
    if (stats_window > 0) {
      kwm = kshape();
      p.key_wmass = view_heads(kwm, jagged ? k_offsets : optional<Tensor>());
    }
    if (p.has_cache) {
      cm = at::zeros({p.B, p.Hkv, p.cache.capacity}, f32); p.cache_mass = cm.data_ptr<float>();
      if (stats_window > 0) { cwm = at::zeros_like(cm); p.cache_wmass = cwm.data_ptr<float>(); }
    }
    if (p.has_residual) {
      rm = at::zeros({p.B, p.Hkv, p.residual.capacity}, f32); p.res_mass = rm.data_ptr<float>();
      if (stats_window > 0) { rwm = at::zeros_like(rm); p.res_wmass = rwm.data_ptr<float>(); }
    }
  }
  p.num_threads = at::get_num_threads();
  malloc_kernels::cpu::attention_forward(p);
  return {out, lse, km, kwm, cm, cwm, rm, rwm};
}

Tensor gather_rows(const Tensor& src, const Tensor& index) {
  TORCH_CHECK(src.dim() >= 3, "src must be [B, H, C, ...]");
  TORCH_CHECK(index.dim() == 3 && index.scalar_type() == at::kLong, "index must be int64 [B, H, K]");
  TORCH_CHECK(index.size(0) == src.size(0) && index.size(1) == src.size(1), "index must match src's [B, H]");
  const Tensor s = src.contiguous();
  const Tensor idx = index.contiguous();
  const int64_t C = s.size(2), K = idx.size(2);
  if (idx.numel()) {
    TORCH_CHECK(idx.min().item<int64_t>() >= 0 && idx.max().item<int64_t>() < C, "index out of range [0, ", C, ")");
  }
  std::vector<int64_t> shape(s.sizes().begin(), s.sizes().end());
  shape[2] = K;
  Tensor out = at::empty(shape, s.options());
  int64_t row = s.element_size();
  for (int64_t d = 3; d < s.dim(); ++d) row *= s.size(d);
  malloc_kernels::cpu::gather_rows(static_cast<const uint8_t*>(s.data_ptr()), static_cast<uint8_t*>(out.data_ptr()),
                                   idx.data_ptr<int64_t>(), s.size(0), s.size(1), C, K, row, at::get_num_threads());
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(malloc_kernels, m) {
  m.def(
      "attention_cpu(Tensor query, Tensor? key, Tensor? value, Tensor? q_offsets, Tensor? k_offsets, "
      "Tensor? cache_k, Tensor? cache_v, Tensor? cache_length, Tensor? cache_position, Tensor? cache_timestamp, "
      "Tensor? cache_count, Tensor? k_scale, Tensor? k_zero, Tensor? v_scale, Tensor? v_zero, "
      "Tensor? res_k, Tensor? res_v, Tensor? res_length, Tensor? res_position, Tensor? res_timestamp, "
      "Tensor? res_count, Tensor? original_length, str k_format, str v_format, bool k_channel, int group_size, "
      "str kind, bool is_causal, Tensor? num_targets, float scale, Tensor? query_positions, Tensor? key_positions, "
      "Tensor? query_timestamps, Tensor? key_timestamps, Tensor? pos_bias, Tensor? time_bias, "
      "Tensor? time_thresholds, str hstu_norm, int hstu_norm_const, bool return_lse, bool return_stats, "
      "int stats_window) -> Tensor[]");
  m.def("gather_rows(Tensor src, Tensor index) -> Tensor");
}

TORCH_LIBRARY_IMPL(malloc_kernels, CPU, m) {
  m.impl("attention_cpu", &attention_cpu);
  m.impl("gather_rows", &gather_rows);
}
