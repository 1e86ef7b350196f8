// Torch glue for the fused CPU attention (csrc/cpu/attention*.cpp) and the row gather used by pruning policies.
// Thin by design: checks, pointer/stride extraction into AttnParams, output allocation. Semantics and argument
// normalisation (defaults, jagged offsets, positions, thresholds) live in malloc_kernels/ops/cpu.py.
//
// Bounds: the Python entry point validates shapes and dtypes, and KVCache.check_contents() validates a cache's
// data once where the cache is made; neither runs when the op is called directly (torch.ops, a compiled graph,
// another host). So the glue checks every shape, dtype and index the kernel dereferences (TORCH_CHECK_VALUE ->
// ValueError in Python): no call, however it arrives, reads or writes past a buffer.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include "malloc_kernels/attention_cpu.h"
#include "isa_glue.h"

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

namespace fm = malloc_kernels::formats;

// `code`: the format table's code (malloc_kernels/core/formats.py); quantized codes are Fmt members as they are.
Fmt fmt_of(int64_t code, const Tensor& payload, const char* name) {
  TORCH_CHECK_VALUE(code >= 0 && code < fm::kNumFormats, name, " format code must be in [0, ", fm::kNumFormats,
                    "), got ", code);
  if (code == fm::kFLOAT) return malloc_kernels::cpu::float_fmt(dtype_of(payload, name));
  TORCH_CHECK(payload.scalar_type() == at::kByte, name, " must be uint8 codes for format ", fm::kName[code]);
  return Fmt(int(code));
}

// Bytes of one stored row of D elements in a payload format.
int64_t row_bytes(Fmt f, int64_t D) {
  switch (f) {
    case Fmt::F32: return 4 * D;
    case Fmt::F16: case Fmt::BF16: return 2 * D;
    case Fmt::INT8: case Fmt::FP8: return D;
    case Fmt::INT4: case Fmt::NVFP4: return (D + 1) / 2;
    case Fmt::INT2: return (D + 3) / 4;
  }
  return 0;
}

bool is_quantized(Fmt f) {
  return f == Fmt::INT8 || f == Fmt::INT4 || f == Fmt::INT2 || f == Fmt::FP8 || f == Fmt::NVFP4;
}

void check_shape(const Tensor& t, at::IntArrayRef want, const char* seg, const char* field) {
  TORCH_CHECK_VALUE(t.sizes() == want, seg, ".", field, " must have shape ", want, ", got ", t.sizes());
}

// Jagged offsets [B+1]: int64, contiguous, 0 = o[0] <= o[1] <= ... <= o[B] = total.
void check_offsets(const Tensor& o, int64_t B, int64_t total, const char* name) {
  TORCH_CHECK_VALUE(o.scalar_type() == at::kLong && o.dim() == 1 && o.is_contiguous() && o.size(0) == B + 1,
                    name, " must be contiguous int64 [B+1]");
  const int64_t* p = o.data_ptr<int64_t>();
  TORCH_CHECK_VALUE(p[0] == 0 && p[B] == total, name, " must run from 0 to ", total, ", got ", p[0], "..", p[B]);
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK_VALUE(p[b + 1] >= p[b], name, " must be non-decreasing");
}

// Per-token int64 tensor (positions, timestamps): dense [B, Lq] or jagged [total], contiguous.
void check_tokens(const Tensor& t, bool jagged, int64_t B, int64_t L, int64_t total, const char* name) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kLong && t.is_contiguous(), name, " must be contiguous int64");
  if (jagged) {
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == total, name, " must be [", total, "]");
  } else {
    TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == B && t.size(1) == L, name, " must be [", B, ", ", L, "]");
  }
}

// A bias table [N] or [Hq, N], contiguous float32, N >= 1.
void check_bias(const Tensor& t, int64_t Hq, const char* name) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat && t.is_contiguous(), name, " must be contiguous float32");
  TORCH_CHECK_VALUE((t.dim() == 1 || (t.dim() == 2 && t.size(0) == Hq)) && t.size(-1) >= 1, name,
                    " must be [N] or [Hq=", Hq, ", N] with N >= 1, got ", t.sizes());
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

Segment segment(const Tensor& k, const Tensor& v, int64_t kf, int64_t vf, bool k_channel,
                int64_t group_size, int64_t D, const Tensor& length, const Tensor& position, const optional<Tensor>& timestamp,
                const optional<Tensor>& count, const optional<Tensor>& ks, const optional<Tensor>& kz,
                const optional<Tensor>& vs, const optional<Tensor>& vz, const char* name) {
  Segment s;
  TORCH_CHECK_VALUE(k.is_contiguous() && v.is_contiguous() && length.is_contiguous() && position.is_contiguous(),
                    name, " tensors must be contiguous");
  s.k = k.data_ptr(); s.v = v.data_ptr();
  s.k_fmt = fmt_of(kf, k, name); s.v_fmt = fmt_of(vf, v, name);
  // key groups along entries exist only for quantized keys: a float payload has none (and group_size may be 0)
  s.k_channel = k_channel && is_quantized(s.k_fmt); s.group_size = int(group_size); s.capacity = k.size(2);
  TORCH_CHECK_VALUE(length.scalar_type() == at::kInt && position.scalar_type() == at::kInt, name,
                    ".length/position must be int32");
  // Every extent the kernel walks: [B, Hkv, C, row] payloads, per-entry fields, scale groups, and the lengths
  // themselves (the kernel reads entries j < length[b, h] of a row of capacity C).
  TORCH_CHECK_VALUE(k.dim() == 4, name, ".k must be [B, Hkv, C, row], got ", k.sizes());
  const int64_t B = k.size(0), H = k.size(1), C = k.size(2);
  check_shape(v, {B, H, C, row_bytes(s.v_fmt, D) / v.element_size()}, name, "v");
  check_shape(k, {B, H, C, row_bytes(s.k_fmt, D) / k.element_size()}, name, "k");
  check_shape(length, {B, H}, name, "length");
  check_shape(position, {B, H, C}, name, "position");
  const int32_t* len = length.data_ptr<int32_t>();
  for (int64_t i = 0; i < B * H; ++i)
    TORCH_CHECK_VALUE(len[i] >= 0 && len[i] <= C, name, ".length must be within [0, capacity=", C, "], got ",
                      len[i]);
  if (timestamp.has_value()) {
    TORCH_CHECK_VALUE(timestamp->scalar_type() == at::kLong && timestamp->is_contiguous(), name,
                      ".timestamp must be contiguous int64");
    check_shape(*timestamp, {B, H, C}, name, "timestamp");
  }
  if (count.has_value()) {
    TORCH_CHECK_VALUE(count->scalar_type() == at::kFloat && count->is_contiguous(), name,
                      ".count must be contiguous float32");
    check_shape(*count, {B, H, C}, name, "count");
  }
  const bool quant = is_quantized(s.k_fmt) || is_quantized(s.v_fmt);
  if (quant) {
    TORCH_CHECK_VALUE(group_size > 0, name, ".group_size must be positive for quantized formats");
  }
  auto check_groups = [&](const optional<Tensor>& sc, const optional<Tensor>& zp, Fmt f, bool channel,
                          const char* which) {
    if (!is_quantized(f)) return;
    // grouping, fixed group size, partial groups and zero points per the format table
    const int code = int(f);
    std::vector<int64_t> want;
    TORCH_CHECK_VALUE(fm::kFixedGroupSize[code] == 0 || group_size == fm::kFixedGroupSize[code], name,
                      ".group_size must be ", fm::kFixedGroupSize[code], " for format ", fm::kName[code]);
    if (channel) {
      TORCH_CHECK_VALUE(fm::kChannelKeys[code], name, ": format ", fm::kName[code], " has no per-channel keys");
      want = {B, H, (C + group_size - 1) / group_size, D};
    } else {
      TORCH_CHECK_VALUE(fm::kPartialGroup[code] || D % group_size == 0, name, ".group_size ", group_size,
                        " must divide head_dim ", D);
      want = {B, H, C, fm::token_groups(code, D, group_size)};
    }
    TORCH_CHECK_VALUE(sc.has_value(), name, ".", which, "_scale is required for a quantized payload");
    check_shape(*sc, want, name, which);
    if (fm::kHasZero[code]) {
      TORCH_CHECK_VALUE(zp.has_value(), name, ".", which, "_zero is required for an integer payload");
      check_shape(*zp, want, name, which);
    }
  };
  check_groups(ks, kz, s.k_fmt, k_channel, "k");
  check_groups(vs, vz, s.v_fmt, false, "v");
  s.length = length.data_ptr<int32_t>(); s.position = position.data_ptr<int32_t>();
  s.timestamp = ptr_or_null<int64_t>(timestamp); s.count = ptr_or_null<float>(count);
  auto half = [](const optional<Tensor>& t) -> const uint16_t* {
    if (!t.has_value()) return nullptr;
    TORCH_CHECK_VALUE(t->scalar_type() == at::kHalf && t->is_contiguous(),
                      "scales/zeros must be contiguous float16");
    return reinterpret_cast<const uint16_t*>(t->data_ptr<at::Half>());
  };
  // scale dtype per the format table: one e4m3 byte (NVFP4) or float16 bits
  auto byte = [](const optional<Tensor>& t) -> const uint8_t* {
    TORCH_CHECK_VALUE(t.has_value() && t->scalar_type() == at::kByte && t->is_contiguous(),
                      "NVFP4 scales must be contiguous uint8 (e4m3fn bits)");
    return t->data_ptr<uint8_t>();
  };
  if (s.k_fmt == Fmt::NVFP4) s.k_scale8 = byte(ks); else { s.k_scale = half(ks); s.k_zero = half(kz); }
  if (s.v_fmt == Fmt::NVFP4) s.v_scale8 = byte(vs); else { s.v_scale = half(vs); s.v_zero = half(vz); }
  return s;
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
    const optional<Tensor>& original_length, int64_t k_format, int64_t v_format,
    bool k_channel, int64_t group_size, const std::string& kind, bool is_causal,
    const optional<Tensor>& num_targets, double scale, const optional<Tensor>& query_positions,
    const optional<Tensor>& key_positions, const optional<Tensor>& query_timestamps,
    const optional<Tensor>& key_timestamps, const optional<Tensor>& pos_bias, const optional<Tensor>& time_bias,
    const optional<Tensor>& time_thresholds, const std::string& hstu_norm, int64_t hstu_norm_const,
    bool return_lse, bool return_stats, int64_t stats_window, const std::string& query_precision) {
  const bool jagged = q_offsets.has_value();
  TORCH_CHECK_VALUE(query.dim() == (jagged ? 3 : 4), "query must be [B, Hq, Lq, D] or jagged [total, Hq, D]");
  const Tensor q = rowmajor(query);
  AttnParams p;
  p.q_dtype = dtype_of(q, "query");
  p.Hq = int(q.size(1));
  p.D = int(q.size(-1));
  TORCH_CHECK_VALUE(p.Hq >= 1 && p.D >= 1, "query needs at least one head and head_dim >= 1");
  TORCH_CHECK_VALUE(!jagged || q_offsets->dim() == 1, "offsets must be int64 [B+1]");
  p.B = int(jagged ? q_offsets->size(0) - 1 : q.size(0));
  const int64_t Lq = jagged ? 0 : q.size(2);
  if (jagged) check_offsets(*q_offsets, p.B, q.size(0), "offsets");
  std::vector<int64_t> qlen(p.B), klen(p.B);
  if (jagged) {
    const int64_t* o = q_offsets->data_ptr<int64_t>();
    for (int b = 0; b < p.B; ++b) qlen[b] = o[b + 1] - o[b];
  } else {
    std::fill(qlen.begin(), qlen.end(), Lq);
  }
  p.q = view4(q, q_offsets);
  p.q_len = qlen.data();

  Tensor k, v;
  if (key.has_value()) {
    TORCH_CHECK_VALUE(value.has_value(), "value is required with key");
    k = rowmajor(*key); v = rowmajor(*value);
    p.kv_dtype = dtype_of(k, "key");
    TORCH_CHECK_VALUE(v.scalar_type() == k.scalar_type(), "key and value must have the same dtype");
    TORCH_CHECK_VALUE(k.dim() == q.dim() && v.sizes() == k.sizes(), "key and value must have the same shape, ",
                      jagged ? "[total_k, Hkv, D]" : "[B, Hkv, Lk, D]", ", got ", k.sizes(), " and ", v.sizes());
    TORCH_CHECK_VALUE(k.size(-1) == p.D, "key head dim ", k.size(-1), " != query head dim ", p.D);
    TORCH_CHECK_VALUE(jagged || k.size(0) == p.B, "key batch ", k.size(0), " != query batch ", p.B);
    p.Hkv = int(k.size(1));
    const optional<Tensor>& ko = jagged ? k_offsets : optional<Tensor>();
    p.k = view4(k, ko); p.v = view4(v, ko);
    if (jagged) {
      TORCH_CHECK_VALUE(k_offsets.has_value(), "key_offsets are required with jagged keys");
      check_offsets(*k_offsets, p.B, k.size(0), "key_offsets");
      const int64_t* o = k_offsets->data_ptr<int64_t>();
      for (int b = 0; b < p.B; ++b) klen[b] = o[b + 1] - o[b];
    } else {
      std::fill(klen.begin(), klen.end(), k.size(2));
    }
    p.k_len = klen.data();
  }
  p.has_cache = cache_k.has_value();
  if (p.has_cache) {
    TORCH_CHECK_VALUE(cache_v.has_value() && cache_length.has_value() && cache_position.has_value(),
                      "cache_v, cache_length and cache_position are required with cache_k");
    TORCH_CHECK_VALUE(cache_k->dim() == 4 && cache_k->size(0) == p.B, "cache must hold B=", p.B, " users");
    TORCH_CHECK_VALUE(!key.has_value() || cache_k->size(1) == p.Hkv, "cache has ", cache_k->size(1),
                      " kv heads but key has ", p.Hkv);
    p.Hkv = int(cache_k->size(1));
    p.cache = segment(*cache_k, *cache_v, k_format, v_format, k_channel, group_size, p.D, *cache_length,
                      *cache_position, cache_timestamp, cache_count, k_scale, k_zero, v_scale, v_zero, "cache");
    TORCH_CHECK_VALUE(original_length.has_value(), "original_length is required with a cache");
    TORCH_CHECK_VALUE(original_length->scalar_type() == at::kInt && original_length->is_contiguous() &&
                      original_length->dim() == 1 && original_length->size(0) == p.B,
                      "original_length must be contiguous int32 [B]");
    p.original_length = original_length->data_ptr<int32_t>();
  }
  p.has_residual = res_k.has_value();
  if (p.has_residual) {
    TORCH_CHECK_VALUE(p.has_cache, "a residual segment needs a cache");
    TORCH_CHECK_VALUE(res_v.has_value() && res_length.has_value() && res_position.has_value(),
                      "res_v, res_length and res_position are required with res_k");
    TORCH_CHECK_VALUE(res_k->dim() == 4 && res_k->size(0) == p.B && res_k->size(1) == p.Hkv,
                      "residual must be [B, Hkv, R, D] like the cache");
    p.residual = segment(*res_k, *res_v, fm::kFLOAT, fm::kFLOAT, false, 0, p.D, *res_length, *res_position,
                         res_timestamp, res_count, {}, {}, {}, {}, "residual");
  }
  TORCH_CHECK_VALUE(key.has_value() || p.has_cache, "attention needs key/value or a cache");
  TORCH_CHECK_VALUE(p.Hkv > 0 && p.Hq % p.Hkv == 0, "Hq must be a multiple of Hkv");
  if (num_targets.has_value()) {
    TORCH_CHECK_VALUE(num_targets->scalar_type() == at::kLong && num_targets->is_contiguous() &&
                      num_targets->dim() == 1 && num_targets->size(0) == p.B,
                      "num_targets must be contiguous int64 [B]");
    const int64_t* nt = num_targets->data_ptr<int64_t>();
    for (int b = 0; b < p.B; ++b)
      TORCH_CHECK_VALUE(nt[b] >= 0 && nt[b] <= qlen[b], "num_targets must be within [0, query length]");
  }
  const int64_t total_q = jagged ? q.size(0) : 0, total_k = (jagged && k.defined()) ? k.size(0) : 0;
  const int64_t Lk = (!jagged && k.defined()) ? k.size(2) : 0;
  if (query_positions.has_value()) check_tokens(*query_positions, jagged, p.B, Lq, total_q, "query_positions");
  if (query_timestamps.has_value()) check_tokens(*query_timestamps, jagged, p.B, Lq, total_q, "query_timestamps");
  if (key_positions.has_value()) check_tokens(*key_positions, jagged, p.B, Lk, total_k, "key_positions");
  if (key_timestamps.has_value()) check_tokens(*key_timestamps, jagged, p.B, Lk, total_k, "key_timestamps");
  if (pos_bias.has_value()) {
    check_bias(*pos_bias, p.Hq, "pos_bias");
    TORCH_CHECK_VALUE(query_positions.has_value() && (!key.has_value() || key_positions.has_value()),
                      "pos_bias needs query_positions and key_positions");
  }
  if (time_bias.has_value()) {
    check_bias(*time_bias, p.Hq, "time_bias");
    TORCH_CHECK_VALUE(query_timestamps.has_value() && (!key.has_value() || key_timestamps.has_value()),
                      "time_bias needs query_timestamps and key_timestamps");
    TORCH_CHECK_VALUE(!p.has_cache || cache_timestamp.has_value(), "time_bias needs cache_timestamp");
    TORCH_CHECK_VALUE(!p.has_residual || res_timestamp.has_value(), "time_bias needs res_timestamp");
  }
  TORCH_CHECK_VALUE(kind == "softmax" || kind == "hstu", "kind must be 'softmax' or 'hstu', got '", kind, "'");
  TORCH_CHECK_VALUE(hstu_norm == "original" || hstu_norm == "kept" || hstu_norm == "const",
                    "hstu_norm must be 'original', 'kept' or 'const', got '", hstu_norm, "'");
  TORCH_CHECK_VALUE(stats_window >= 0, "stats_window must be >= 0, got ", stats_window);
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
    TORCH_CHECK_VALUE(time_thresholds.has_value() && time_thresholds->scalar_type() == at::kLong &&
                      time_thresholds->is_contiguous() && time_thresholds->numel() == time_bias->size(-1),
                      "time_thresholds must be contiguous int64 [T] (index 0 unused) with time_bias");
    p.time_bias = time_bias->data_ptr<float>();
    p.T = time_bias->size(-1);
    p.time_bias_sH = time_bias->dim() == 2 ? p.T : 0;
    p.time_thresholds = time_thresholds->data_ptr<int64_t>();
  }
  p.hstu_norm = hstu_norm == "kept" ? malloc_kernels::cpu::HstuNorm::Kept
              : hstu_norm == "original" ? malloc_kernels::cpu::HstuNorm::Original
                                        : malloc_kernels::cpu::HstuNorm::Constant;
  p.hstu_norm_const = hstu_norm_const;
  TORCH_CHECK_VALUE(query_precision == "exact" || query_precision == "int8",
                    "query_precision must be 'exact' or 'int8', got '", query_precision, "'");
  if (query_precision == "int8") {
    using malloc_kernels::cpu::Fmt;
    TORCH_CHECK_VALUE(p.has_cache && (p.cache.k_fmt == Fmt::INT8 || p.cache.k_fmt == Fmt::INT4 ||
                                      p.cache.k_fmt == Fmt::INT2),
                      "query_precision='int8' needs a cache whose keys are int8, int4 or int2 codes");
    p.query_precision = malloc_kernels::cpu::QueryPrecision::Int8;
  }

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
  malloc_kernels::cpu::attention_forward(p, malloc_kernels::torch_glue::requested_isa());
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
      "Tensor? res_count, Tensor? original_length, int k_format, int v_format, bool k_channel, int group_size, "
      "str kind, bool is_causal, Tensor? num_targets, float scale, Tensor? query_positions, Tensor? key_positions, "
      "Tensor? query_timestamps, Tensor? key_timestamps, Tensor? pos_bias, Tensor? time_bias, "
      "Tensor? time_thresholds, str hstu_norm, int hstu_norm_const, bool return_lse, bool return_stats, "
      "int stats_window, str query_precision=\"exact\") -> Tensor[]");
  m.def("gather_rows(Tensor src, Tensor index) -> Tensor");
}

TORCH_LIBRARY_IMPL(malloc_kernels, CPU, m) {
  m.impl("attention_cpu", &attention_cpu);
  m.impl("gather_rows", &gather_rows);
}
