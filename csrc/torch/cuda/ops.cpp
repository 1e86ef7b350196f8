// Torch glue of the CUDA kernels (built only when torch is a CUDA build and nvcc exists; see setup.py):
//   malloc_kernels::cuda_quantize_pack(x, length, fmt, group_size, axis) -> (codes, scale, zero)
//   malloc_kernels::cuda_decode_attention(...) -> (out, lse)
// Formats are the format table's numeric codes (malloc_kernels/core/formats.py -> formats.h), never names.
// Tensors are validated/normalised by malloc_kernels/ops/cuda.py (fp32 contiguous queries and request tokens,
// contiguous cache payloads); this file checks every device, dtype, contiguity and shape the kernel relies on
// (TORCH_CHECK_VALUE / _TYPE), so a direct call cannot make the kernel index past a buffer. Segment lengths live
// on the device: checking them here would synchronise every call, so the kernel clamps them to [0, capacity]
// instead (decode_attention.cu); KVCache.check_contents() refuses such caches where they are made.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <string>

#include "../../cuda/decode_attention.h"
#include "../../cuda/launch.h"
#include "malloc_kernels/quant.h"
#include "../quant_spec_glue.h"

namespace {

using malloc_kernels::QuantSpec;
using malloc_kernels::torch_glue::make_spec;
using malloc_kernels::torch_glue::num_scale_groups;
namespace mc = malloc_kernels::cuda;

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

namespace fm = malloc_kernels::formats;


std::tuple<at::Tensor, at::Tensor, at::Tensor> cuda_quantize_pack(const at::Tensor& x, const at::Tensor& length,
                                                                  int64_t fmt, int64_t group_size,
                                                                  c10::string_view axis) {
  const QuantSpec spec = make_spec(fmt, group_size, std::string(axis));
  TORCH_CHECK_TYPE(x.is_floating_point(), "x must be floating point, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 4 && x.is_cuda(), "x must be a CUDA tensor [B, H, N, D]");
  TORCH_CHECK_TYPE(length.scalar_type() == at::kInt, "length must be int32");
  TORCH_CHECK_VALUE(length.is_cuda() && length.dim() == 2 && length.size(0) == x.size(0) &&
                    length.size(1) == x.size(1), "length must be a CUDA int32 tensor [B, H]");
  const int64_t B = x.size(0), H = x.size(1), N = x.size(2), D = x.size(3);
  TORCH_CHECK_VALUE(spec.channel || D % group_size == 0, "group_size must divide head_dim on the token axis");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xf = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
  const int64_t W = malloc_kernels::quant::packed_width(static_cast<int>(D), spec.bits);
  const int64_t NG = num_scale_groups(spec, N, D);
  auto codes = at::empty({B, H, N, W}, x.options().dtype(at::kByte));
  auto scale = at::empty(spec.channel ? std::vector<int64_t>{B, H, NG, D} : std::vector<int64_t>{B, H, N, NG},
                         x.options().dtype(at::kHalf));
  auto zero = spec.fp8 ? at::empty({0}, scale.options()) : at::empty(scale.sizes(), scale.options());
  auto status = at::zeros({1}, x.options().dtype(at::kInt));
  const int64_t xs[4] = {xf.stride(0), xf.stride(1), xf.stride(2), xf.stride(3)};
  const int64_t ls[2] = {length.stride(0), length.stride(1)};
  check_cuda(mc::quantize_pack(xf.data_ptr<float>(), xs, length.data_ptr<int32_t>(), ls, B, H, N, D, spec,
                               codes.data_ptr<uint8_t>(), reinterpret_cast<uint16_t*>(scale.data_ptr<at::Half>()),
                               spec.fp8 ? nullptr : reinterpret_cast<uint16_t*>(zero.data_ptr<at::Half>()),
                               status.data_ptr<int>(), c10::cuda::getCurrentCUDAStream().stream()),
             "cuda quantize_pack");
  const int st = status.item<int>();
  TORCH_CHECK_VALUE(st != malloc_kernels::quant::kNonFinite, "x has NaN or infinite values in a valid entry");
  TORCH_CHECK_VALUE(st != malloc_kernels::quant::kF16Overflow,
                    "x has a group whose range does not fit float16 scales/zeros");
  return std::make_tuple(codes, scale, zero);
}

// `fmt`: the format table's code; quantized codes are DecodeFormat members as they are.
int format_code(int64_t fmt, const at::Tensor& t) {
  TORCH_CHECK_VALUE(fmt >= 0 && fmt < fm::kNumFormats, "format code must be in [0, ", fm::kNumFormats, "), got ", fmt);
  if (fmt == fm::kFLOAT) {
    if (t.scalar_type() == at::kFloat) return mc::kFmtF32;
    if (t.scalar_type() == at::kHalf) return mc::kFmtF16;
    if (t.scalar_type() == at::kBFloat16) return mc::kFmtBF16;
    TORCH_CHECK_TYPE(false, "float cache payloads must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  TORCH_CHECK_TYPE(t.scalar_type() == at::kByte, "payloads of format ", fm::kName[fmt], " must be uint8 codes");
  return static_cast<int>(fmt);
}

const uint8_t* byte_ptr(const c10::optional<at::Tensor>& t) {
  if (!t.has_value() || !t->defined() || t->numel() == 0) return nullptr;
  TORCH_CHECK_TYPE(t->scalar_type() == at::kByte, "nvfp4 scales must be uint8 (e4m3fn bits)");
  TORCH_CHECK_VALUE(t->is_contiguous(), "scales must be contiguous");
  return t->data_ptr<uint8_t>();
}

const uint16_t* half_ptr(const c10::optional<at::Tensor>& t) {
  if (!t.has_value() || !t->defined() || t->numel() == 0) return nullptr;
  TORCH_CHECK_TYPE(t->scalar_type() == at::kHalf, "scales/zeros must be float16");
  TORCH_CHECK_VALUE(t->is_contiguous(), "scales/zeros must be contiguous");
  return reinterpret_cast<const uint16_t*>(t->data_ptr<at::Half>());
}

// Read from the format table (not a list of formats): a hand-written list here missed nvfp4, which the kernel
// decodes, so every nvfp4 call failed the row-width check.
bool quantized(int fmt) { return fmt > fm::kFLOAT && fmt < fm::kNumFormats; }

int64_t payload_width(int fmt, int64_t D) {
  if (quantized(fmt)) return fm::packed_width(fmt, D);  // code bytes (int4/nvfp4: two per byte, int2: four)
  return D;  // float payloads (in elements)
}

// Token-axis scale shape [B, H, C, groups] of a quantized payload, per the table: nvfp4 fixes G = 16 (the kernel's
// per-word group tracking reads group_size) and keeps a partial last group (ceil(D / 16)); the others need G | D.
int64_t token_scale_groups(int fmt, int64_t group_size, int64_t head_dim, const char* side) {
  TORCH_CHECK_VALUE(fm::kFixedGroupSize[fmt] == 0 || group_size == fm::kFixedGroupSize[fmt], "group_size must be ",
                    fm::kFixedGroupSize[fmt], " for format ", fm::kName[fmt], ", got ", group_size);
  TORCH_CHECK_VALUE(fm::kPartialGroup[fmt] || head_dim % group_size == 0, "group_size must divide head_dim (", side,
                    ")");
  return fm::token_groups(fmt, head_dim, group_size);
}

void check_shape(const c10::optional<at::Tensor>& t, at::IntArrayRef want, const char* name) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK_VALUE(t->sizes() == want, name, " must have shape ", want, ", got ", t->sizes());
}

template <typename T>
const T* opt_ptr(const c10::optional<at::Tensor>& t) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK_VALUE(t->is_contiguous() && t->is_cuda(), "decode inputs must be contiguous CUDA tensors");
  return t->data_ptr<T>();
}

// One segment: payloads [B, Hkv, C, *] contiguous, per-entry fields [B, Hkv, C].
mc::DecodeSegment segment(const at::Tensor& k, const at::Tensor& v, int64_t k_fmt, int64_t v_fmt, bool k_channel, int64_t group_size, int64_t head_dim,
                          const c10::optional<at::Tensor>& k_scale, const c10::optional<at::Tensor>& k_zero,
                          const c10::optional<at::Tensor>& v_scale, const c10::optional<at::Tensor>& v_zero,
                          const c10::optional<at::Tensor>& length, const c10::optional<at::Tensor>& pos,
                          const c10::optional<at::Tensor>& ts, const c10::optional<at::Tensor>& count) {
  TORCH_CHECK_VALUE(k.is_contiguous() && v.is_contiguous() && k.is_cuda() && v.is_cuda(),
                    "segment payloads must be contiguous CUDA tensors");
  TORCH_CHECK_VALUE(k.dim() == 4 && v.dim() == 4 && k.sizes().slice(0, 3) == v.sizes().slice(0, 3),
                    "segment payloads must be [B, Hkv, C, row] with the same [B, Hkv, C]");
  const int64_t B = k.size(0), H = k.size(1), C = k.size(2);
  const int kf = format_code(k_fmt, k), vf = format_code(v_fmt, v);
  TORCH_CHECK_VALUE(k.size(3) == payload_width(kf, head_dim) && v.size(3) == payload_width(vf, head_dim),
                    "segment row widths ", k.size(3), "/", v.size(3), " do not match head_dim ", head_dim,
                    " in formats ", k_fmt, "/", v_fmt);
  if (quantized(kf) || quantized(vf)) {
    TORCH_CHECK_VALUE(group_size > 0, "group_size must be positive for quantized payloads");
    if (quantized(kf)) {
      TORCH_CHECK_VALUE(!k_channel || fm::kChannelKeys[kf], "format ", fm::kName[kf], " has no channel-axis keys");
      const std::vector<int64_t> ks = k_channel ? std::vector<int64_t>{B, H, (C + group_size - 1) / group_size,
                                                                       head_dim}
                                                : std::vector<int64_t>{B, H, C,
                                                                       token_scale_groups(kf, group_size, head_dim, "keys")};
      TORCH_CHECK_VALUE(k_scale.has_value(), "k_scale is required for a quantized key payload");
      check_shape(k_scale, ks, "k_scale");
      check_shape(k_zero, ks, "k_zero");
    }
    if (quantized(vf)) {
      const std::vector<int64_t> vs{B, H, C, token_scale_groups(vf, group_size, head_dim, "values")};
      TORCH_CHECK_VALUE(v_scale.has_value(), "v_scale is required for a quantized value payload");
      check_shape(v_scale, vs, "v_scale");
      check_shape(v_zero, vs, "v_zero");
    }
  }
  check_shape(length, {B, H}, "segment length");
  check_shape(pos, {B, H, C}, "segment position");
  check_shape(ts, {B, H, C}, "segment timestamp");
  check_shape(count, {B, H, C}, "segment count");
  if (ts.has_value()) TORCH_CHECK_TYPE(ts->scalar_type() == at::kLong, "timestamps must be int64");
  if (count.has_value()) TORCH_CHECK_TYPE(count->scalar_type() == at::kFloat, "counts must be float32");
  mc::DecodeSegment s;
  s.k = k.data_ptr();
  s.v = v.data_ptr();
  s.k_fmt = kf;
  s.v_fmt = vf;
  s.k_row_bytes = k.size(3) * k.element_size();
  s.v_row_bytes = v.size(3) * v.element_size();
  s.k_channel = k_channel;
  s.group_size = static_cast<int>(group_size > 0 ? group_size : 1);
  s.head_dim = static_cast<int>(head_dim);
  s.capacity = static_cast<int>(k.size(2));
  // scale dtype per the format table: e4m3 bytes (nvfp4) or float16 bits
  if (s.k_fmt == mc::kFmtNVFP4) s.k_scale8 = byte_ptr(k_scale); else { s.k_scale = half_ptr(k_scale); s.k_zero = half_ptr(k_zero); }
  if (s.v_fmt == mc::kFmtNVFP4) s.v_scale8 = byte_ptr(v_scale); else { s.v_scale = half_ptr(v_scale); s.v_zero = half_ptr(v_zero); }
  if (length.has_value()) {
    TORCH_CHECK_TYPE(length->scalar_type() == at::kInt, "segment lengths must be int32");
    s.length = opt_ptr<int32_t>(length);
    s.length_stride_b = length->stride(0);
    s.length_stride_h = length->stride(1);
  }
  if (pos.has_value()) {
    TORCH_CHECK_TYPE(pos->scalar_type() == at::kInt, "cache positions must be int32");
    s.pos32 = opt_ptr<int32_t>(pos);
  }
  s.ts = opt_ptr<int64_t>(ts);
  s.pos_stride_b = k.size(1) * k.size(2);
  s.pos_stride_h = k.size(2);
  s.count = opt_ptr<float>(count);
  return s;
}

std::tuple<at::Tensor, at::Tensor> cuda_decode_attention(
    const at::Tensor& q, const at::Tensor& q_lengths, const at::Tensor& num_targets, const at::Tensor& k_req,
    const at::Tensor& v_req, const at::Tensor& k_lengths, const c10::optional<at::Tensor>& q_pos,
    const c10::optional<at::Tensor>& q_ts, const c10::optional<at::Tensor>& k_pos,
    const c10::optional<at::Tensor>& k_ts,
    const c10::optional<at::Tensor>& cache_k, const c10::optional<at::Tensor>& cache_v, int64_t k_fmt,
    int64_t v_fmt, c10::string_view k_axis, int64_t group_size, const c10::optional<at::Tensor>& k_scale,
    const c10::optional<at::Tensor>& k_zero, const c10::optional<at::Tensor>& v_scale,
    const c10::optional<at::Tensor>& v_zero, const c10::optional<at::Tensor>& cache_length,
    const c10::optional<at::Tensor>& cache_pos, const c10::optional<at::Tensor>& cache_ts,
    const c10::optional<at::Tensor>& cache_count, const c10::optional<at::Tensor>& res_k,
    const c10::optional<at::Tensor>& res_v, const c10::optional<at::Tensor>& res_length,
    const c10::optional<at::Tensor>& res_pos, const c10::optional<at::Tensor>& res_ts,
    const c10::optional<at::Tensor>& res_count, const c10::optional<at::Tensor>& pos_bias,
    const c10::optional<at::Tensor>& time_bias, const c10::optional<at::Tensor>& time_th,
    const c10::optional<at::Tensor>& inv_n, double scale, c10::string_view kind, bool is_causal, int64_t span,
    bool want_lse) {
  TORCH_CHECK_VALUE(q.is_cuda() && q.scalar_type() == at::kFloat && q.is_contiguous() && q.dim() == 4,
                    "q must be a contiguous float32 CUDA tensor [B, Hq, Lq, D]");
  TORCH_CHECK_VALUE(k_req.scalar_type() == at::kFloat && v_req.scalar_type() == at::kFloat && k_req.dim() == 4,
                    "request keys/values must be float32 [B, Hkv, Lq, D]");
  TORCH_CHECK_TYPE(q_lengths.scalar_type() == at::kInt && num_targets.scalar_type() == at::kInt &&
                   k_lengths.scalar_type() == at::kInt, "q_lengths / k_lengths / num_targets must be int32");
  const std::string kind_s(kind);
  TORCH_CHECK_VALUE(kind_s == "softmax" || kind_s == "hstu", "kind must be 'softmax' or 'hstu'");
  const int64_t D = q.size(3);
  TORCH_CHECK_VALUE(D >= 1 && D <= mc::kDecodeMaxHeadDim, "head_dim must be in [1, ", mc::kDecodeMaxHeadDim, "]");
  TORCH_CHECK_VALUE(span > 0 && span % 32 == 0, "span must be a positive multiple of 32");
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), Hkv = k_req.size(1);
  TORCH_CHECK_VALUE(k_req.is_cuda() && k_req.is_contiguous() && v_req.is_cuda() && v_req.is_contiguous() &&
                    v_req.sizes() == k_req.sizes() && k_req.size(0) == B && k_req.size(3) == D,
                    "request keys/values must be contiguous CUDA tensors [B, Hkv, Lk, D] like q");
  TORCH_CHECK_VALUE(Hkv >= 1 && Hq % Hkv == 0, "Hq must be a multiple of Hkv");
  check_shape(q_lengths, {B}, "q_lengths");
  check_shape(k_lengths, {B}, "k_lengths");
  check_shape(num_targets, {B}, "num_targets");
  check_shape(q_pos, {B, Lq}, "q_pos");
  check_shape(q_ts, {B, Lq}, "q_ts");
  check_shape(k_pos, {B, k_req.size(2)}, "k_pos");
  check_shape(k_ts, {B, k_req.size(2)}, "k_ts");
  check_shape(inv_n, {B, Hkv, Lq}, "inv_n");
  if (pos_bias.has_value()) {
    TORCH_CHECK_VALUE(pos_bias->scalar_type() == at::kFloat && pos_bias->dim() == 2 && pos_bias->size(0) == Hq &&
                      pos_bias->size(1) >= 1, "pos_bias must be float32 [Hq, P]");
  }
  if (time_bias.has_value()) {
    TORCH_CHECK_VALUE(time_bias->scalar_type() == at::kFloat && time_bias->dim() == 2 &&
                      time_bias->size(0) == Hq && time_bias->size(1) >= 1, "time_bias must be float32 [Hq, T]");
    TORCH_CHECK_VALUE(time_th.has_value() && time_th->scalar_type() == at::kLong &&
                      time_th->numel() == time_bias->size(1), "time_th must be int64 [T] (index 0 unused)");
  }
  if (cache_k.has_value()) {
    TORCH_CHECK_VALUE(cache_v.has_value() && cache_length.has_value() && cache_k->dim() == 4 &&
                      cache_k->size(0) == B && cache_k->size(1) == Hkv,
                      "the cache must be [B, Hkv, C, row] with cache_v and cache_length");
  }
  if (res_k.has_value()) {
    TORCH_CHECK_VALUE(res_v.has_value() && res_length.has_value() && res_k->dim() == 4 && res_k->size(0) == B &&
                      res_k->size(1) == Hkv, "the residual must be [B, Hkv, R, D] with res_v and res_length");
  }
  const c10::cuda::CUDAGuard guard(q.device());

  mc::DecodeParams p;
  p.batch = static_cast<int>(q.size(0));
  p.num_heads = static_cast<int>(q.size(1));
  p.max_q_len = static_cast<int>(q.size(2));
  p.head_dim = static_cast<int>(D);
  p.num_kv_heads = static_cast<int>(k_req.size(1));
  p.scale = static_cast<float>(scale);
  p.hstu = kind_s == "hstu";
  p.is_causal = is_causal;
  p.q = q.data_ptr<float>();
  p.q_lengths = opt_ptr<int32_t>(q_lengths);
  p.num_targets = opt_ptr<int32_t>(num_targets);
  p.q_pos = opt_ptr<int64_t>(q_pos);
  p.q_ts = opt_ptr<int64_t>(q_ts);
  p.pos_bias = opt_ptr<float>(pos_bias);
  p.num_pos = pos_bias.has_value() ? pos_bias->size(1) : 0;
  p.time_bias = opt_ptr<float>(time_bias);
  p.num_time = time_bias.has_value() ? time_bias->size(1) : 0;
  p.time_th = opt_ptr<int64_t>(time_th);
  p.inv_n = opt_ptr<float>(inv_n);
  TORCH_CHECK_VALUE(!p.hstu || p.inv_n, "inv_n is required for kind='hstu'");
  TORCH_CHECK_VALUE(!p.time_bias || (p.time_th && p.q_ts), "time_bias needs time_th and q_ts");

  if (cache_k.has_value()) {
    p.seg[0] = segment(*cache_k, *cache_v, k_fmt, v_fmt, std::string(k_axis) == "channel", group_size, D, k_scale, k_zero,
                       v_scale, v_zero, cache_length, cache_pos, cache_ts, cache_count);
  }
  if (res_k.has_value()) {
    p.seg[1] = segment(*res_k, *res_v, fm::kFLOAT, fm::kFLOAT, false, 1, D, c10::nullopt, c10::nullopt, c10::nullopt,
                       c10::nullopt, res_length, res_pos, res_ts, res_count);
  }
  p.seg[2] = segment(k_req, v_req, fm::kFLOAT, fm::kFLOAT, false, 1, D, c10::nullopt, c10::nullopt, c10::nullopt,
                     c10::nullopt, c10::nullopt, c10::nullopt, c10::nullopt, c10::nullopt);
  p.seg[2].is_request = true;
  p.seg[2].length = opt_ptr<int32_t>(k_lengths);
  p.seg[2].length_stride_b = 1;
  p.seg[2].length_stride_h = 0;
  p.seg[2].pos64 = opt_ptr<int64_t>(k_pos);
  p.seg[2].ts = opt_ptr<int64_t>(k_ts);
  p.seg[2].pos_stride_b = k_req.size(2);
  p.seg[2].pos_stride_h = 0;
  TORCH_CHECK_VALUE(!p.pos_bias || (p.q_pos && p.seg[2].pos64), "pos_bias needs q_pos and k_pos");
  TORCH_CHECK_VALUE(!p.time_bias || p.seg[2].ts, "time_bias needs k_ts");
  p.span = static_cast<int>(span);

  int64_t acc_floats = 0, state_floats = 0;
  mc::decode_plan(p, &acc_floats, &state_floats);
  auto fopts = q.options();
  auto part_acc = at::empty({acc_floats}, fopts);
  auto part_ml = at::empty({2 * state_floats}, fopts);
  auto out = at::empty(q.sizes(), fopts);
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, fopts);
  p.part_acc = part_acc.data_ptr<float>();
  p.part_m = part_ml.data_ptr<float>();
  p.part_l = p.part_m + state_floats;
  p.out = out.data_ptr<float>();
  p.lse = want_lse ? lse.data_ptr<float>() : nullptr;
  if (!want_lse) lse.fill_(-INFINITY);
  check_cuda(mc::decode_attention(p, c10::cuda::getCurrentCUDAStream().stream()), "cuda decode_attention");
  return std::make_tuple(out, lse);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(malloc_kernels, m) {
  m.def("cuda_quantize_pack(Tensor x, Tensor length, int fmt, int group_size, str axis) -> (Tensor, Tensor, Tensor)");
  m.def("cuda_decode_attention(Tensor q, Tensor q_lengths, Tensor num_targets, Tensor k_req, Tensor v_req, "
        "Tensor k_lengths, Tensor? q_pos, Tensor? q_ts, Tensor? k_pos, Tensor? k_ts, Tensor? cache_k, "
        "Tensor? cache_v, int k_fmt, int v_fmt, str k_axis, "
        "int group_size, Tensor? k_scale, Tensor? k_zero, Tensor? v_scale, Tensor? v_zero, Tensor? cache_length, "
        "Tensor? cache_pos, Tensor? cache_ts, Tensor? cache_count, Tensor? res_k, Tensor? res_v, "
        "Tensor? res_length, Tensor? res_pos, Tensor? res_ts, Tensor? res_count, Tensor? pos_bias, "
        "Tensor? time_bias, Tensor? time_th, Tensor? inv_n, float scale, str kind, bool is_causal, int span, "
        "bool want_lse) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(malloc_kernels, CUDA, m) {
  m.impl("cuda_quantize_pack", &cuda_quantize_pack);
  m.impl("cuda_decode_attention", &cuda_decode_attention);
}
