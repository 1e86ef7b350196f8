// Torch glue for the C++ quantize/pack ops (kernels in csrc/cpu/quantize_pack.cpp, numerics in quant.h):
//   malloc_kernels::quantize_pack(x, length, fmt, group_size, axis) -> (codes, scale, zero)
//   malloc_kernels::unpack_dequantize(codes, scale, zero, length, fmt, group_size, axis, head_dim) -> x_hat
// `fmt` is the format table's numeric code (malloc_kernels/core/formats.py -> formats.h), never a name.
//   malloc_kernels::quant_numerics(x, fn) -> y     (elementwise quant.h primitives, for the shared-numerics tests)
// The layout is the cache storage contract (malloc_kernels/core/kvcache.py); fp8 and nvfp4 return an empty `zero`
// (nvfp4's `scale` is uint8 e4m3fn bits).
#include <torch/library.h>
#include <ATen/ATen.h>

#include <string>

#include "malloc_kernels/formats.h"
#include "malloc_kernels/nvfp4.h"
#include "malloc_kernels/quant.h"
#include "malloc_kernels/quantize_pack.h"
#include "quant_spec_glue.h"

namespace {

using malloc_kernels::QuantSpec;
using malloc_kernels::torch_glue::make_spec;
using malloc_kernels::torch_glue::num_scale_groups;

namespace fm = malloc_kernels::formats;


at::Tensor check_length(const at::Tensor& length, int64_t B, int64_t H, int64_t N) {
  TORCH_CHECK_TYPE(length.scalar_type() == at::kInt, "length must be int32 [B, H], got ", length.scalar_type());
  TORCH_CHECK_VALUE(length.dim() == 2 && length.size(0) == B && length.size(1) == H, "length must be [B, H] = [",
                    B, ", ", H, "], got ", length.sizes());
  TORCH_CHECK_VALUE(length.device() == at::kCPU, "length must be on the CPU");
  if (length.numel()) {
    const auto mm = at::aminmax(length);
    TORCH_CHECK_VALUE(std::get<0>(mm).item<int32_t>() >= 0 && std::get<1>(mm).item<int32_t>() <= N,
                      "length must be within [0, ", N, "]");
  }
  return length;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_pack_nvfp4(const at::Tensor& x, const at::Tensor& length,
                                                                    int64_t group_size, const std::string& axis) {
  TORCH_CHECK_VALUE(axis == "token", "nvfp4 groups along D only: axis must be 'token', got '", axis, "'");
  TORCH_CHECK_VALUE(group_size == malloc_kernels::nvfp4::kGroup, "group_size must be 16 for nvfp4, got ", group_size);
  TORCH_CHECK_TYPE(x.is_floating_point(), "x must be floating point, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 4, "x must be [B, H, N, D], got ", x.sizes());
  TORCH_CHECK_VALUE(x.device() == at::kCPU, "x must be on the CPU for the C++ packer");
  const int64_t B = x.size(0), H = x.size(1), N = x.size(2), D = x.size(3);
  check_length(length, B, H, N);
  const at::Tensor xf = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
  auto codes = at::empty({B, H, N, (D + 1) / 2}, x.options().dtype(at::kByte));
  auto scale = at::empty({B, H, N, malloc_kernels::nvfp4::groups(D)}, x.options().dtype(at::kByte));
  auto zero = at::empty({0}, x.options().dtype(at::kHalf));
  if (codes.numel() == 0 && scale.numel() == 0) return std::make_tuple(codes, scale, zero);
  const int64_t xs[4] = {xf.stride(0), xf.stride(1), xf.stride(2), xf.stride(3)};
  const int64_t ls[2] = {length.stride(0), length.stride(1)};
  const int st = malloc_kernels::quantize_pack_nvfp4_cpu(xf.data_ptr<float>(), xs, length.data_ptr<int32_t>(), ls,
                                                         B, H, N, D, codes.data_ptr<uint8_t>(),
                                                         scale.data_ptr<uint8_t>());
  TORCH_CHECK_VALUE(st != malloc_kernels::quant::kNonFinite, "x has NaN or infinite values in a valid entry");
  TORCH_CHECK_VALUE(st != malloc_kernels::nvfp4::kScaleOverflow,
                    "x has a 16-value group whose absmax exceeds 2688 (its e4m3 scale would pass 448)");
  return std::make_tuple(codes, scale, zero);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_pack(const at::Tensor& x,
                                                                      const at::Tensor& length,
                                                                      int64_t fmt, int64_t group_size,
                                                                      c10::string_view axis) {
  if (fmt == fm::kNVFP4) return quantize_pack_nvfp4(x, length, group_size, std::string(axis));
  const QuantSpec spec = make_spec(fmt, group_size, std::string(axis));
  TORCH_CHECK_TYPE(x.is_floating_point(), "x must be floating point, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 4, "x must be [B, H, N, D], got ", x.sizes());
  TORCH_CHECK_VALUE(x.device() == at::kCPU, "x must be on the CPU for the C++ packer");
  const int64_t B = x.size(0), H = x.size(1), N = x.size(2), D = x.size(3);
  TORCH_CHECK_VALUE(spec.channel || D % group_size == 0, "group_size ", group_size, " must divide head_dim ", D,
                    " on the token axis");
  check_length(length, B, H, N);
  // fp32 is the contract's arithmetic; fp16/bf16 widen exactly, fp64 rounds to nearest like PyTorch's .float().
  const at::Tensor xf = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
  const int64_t W = malloc_kernels::quant::packed_width(static_cast<int>(D), spec.bits);
  const int64_t NG = num_scale_groups(spec, N, D);
  auto codes = at::empty({B, H, N, W}, x.options().dtype(at::kByte));
  const std::vector<int64_t> sshape = spec.channel ? std::vector<int64_t>{B, H, NG, D}
                                                   : std::vector<int64_t>{B, H, N, NG};
  auto scale = at::empty(sshape, x.options().dtype(at::kHalf));
  auto zero = spec.fp8 ? at::empty({0}, x.options().dtype(at::kHalf)) : at::empty(sshape, scale.options());
  if (codes.numel() == 0 && scale.numel() == 0) return std::make_tuple(codes, scale, zero);
  const int64_t xs[4] = {xf.stride(0), xf.stride(1), xf.stride(2), xf.stride(3)};
  const int64_t ls[2] = {length.stride(0), length.stride(1)};
  const int st = malloc_kernels::quantize_pack_cpu(
      xf.data_ptr<float>(), xs, length.data_ptr<int32_t>(), ls, B, H, N, D, spec, codes.data_ptr<uint8_t>(),
      reinterpret_cast<uint16_t*>(scale.data_ptr<at::Half>()),
      spec.fp8 ? nullptr : reinterpret_cast<uint16_t*>(zero.data_ptr<at::Half>()));
  TORCH_CHECK_VALUE(st != malloc_kernels::quant::kNonFinite, "x has NaN or infinite values in a valid entry");
  TORCH_CHECK_VALUE(st != malloc_kernels::quant::kF16Overflow,
                    "x has a group whose range does not fit float16 scales/zeros");
  return std::make_tuple(codes, scale, zero);
}

at::Tensor unpack_dequantize_nvfp4(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& length,
                                  int64_t head_dim) {
  const int64_t B = codes.size(0), H = codes.size(1), N = codes.size(2), D = head_dim;
  TORCH_CHECK_VALUE(D > 0 && codes.size(3) == (D + 1) / 2, "codes last dim ", codes.size(3),
                    " does not match head_dim ", D, " for nvfp4");
  const std::vector<int64_t> sshape{B, H, N, malloc_kernels::nvfp4::groups(D)};
  TORCH_CHECK_TYPE(scale.scalar_type() == at::kByte, "scale must be uint8 (e4m3fn bits), got ", scale.scalar_type());
  TORCH_CHECK_VALUE(scale.sizes() == c10::IntArrayRef(sshape), "scale must be ", c10::IntArrayRef(sshape), ", got ",
                    scale.sizes());
  check_length(length, B, H, N);
  auto out = at::empty({B, H, N, D}, codes.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  const auto c = codes.contiguous();
  const auto s = scale.contiguous();
  const int64_t ls[2] = {length.stride(0), length.stride(1)};
  malloc_kernels::unpack_dequantize_nvfp4_cpu(c.data_ptr<uint8_t>(), s.data_ptr<uint8_t>(), length.data_ptr<int32_t>(),
                                              ls, B, H, N, D, out.data_ptr<float>());
  return out;
}

at::Tensor unpack_dequantize(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero,
                                const at::Tensor& length, int64_t fmt, int64_t group_size,
                                c10::string_view axis, int64_t head_dim) {
  TORCH_CHECK_TYPE(codes.scalar_type() == at::kByte, "codes must be uint8, got ", codes.scalar_type());
  TORCH_CHECK_VALUE(codes.dim() == 4, "codes must be [B, H, N, W], got ", codes.sizes());
  TORCH_CHECK_VALUE(codes.device() == at::kCPU, "codes must be on the CPU");
  if (fmt == fm::kNVFP4) {
    TORCH_CHECK_VALUE(std::string(axis) == "token" && group_size == malloc_kernels::nvfp4::kGroup,
                      "nvfp4 needs axis 'token' and group_size 16");
    return unpack_dequantize_nvfp4(codes, scale, length, head_dim);
  }
  const QuantSpec spec = make_spec(fmt, group_size, std::string(axis));
  const int64_t B = codes.size(0), H = codes.size(1), N = codes.size(2), D = head_dim;
  TORCH_CHECK_VALUE(D > 0 && codes.size(3) == malloc_kernels::quant::packed_width(static_cast<int>(D), spec.bits),
                    "codes last dim ", codes.size(3), " does not match head_dim ", D, " for ", fm::kName[fmt]);
  TORCH_CHECK_VALUE(spec.channel || D % group_size == 0, "group_size ", group_size, " must divide head_dim ", D);
  const int64_t NG = num_scale_groups(spec, N, D);
  const std::vector<int64_t> sshape = spec.channel ? std::vector<int64_t>{B, H, NG, D}
                                                   : std::vector<int64_t>{B, H, N, NG};
  TORCH_CHECK_TYPE(scale.scalar_type() == at::kHalf, "scale must be float16, got ", scale.scalar_type());
  TORCH_CHECK_VALUE(scale.sizes() == c10::IntArrayRef(sshape), "scale must be ", c10::IntArrayRef(sshape), ", got ",
                    scale.sizes());
  if (!spec.fp8) {
    TORCH_CHECK_TYPE(zero.scalar_type() == at::kHalf, "zero must be float16, got ", zero.scalar_type());
    TORCH_CHECK_VALUE(zero.sizes() == c10::IntArrayRef(sshape), "zero must be ", c10::IntArrayRef(sshape),
                      ", got ", zero.sizes());
  }
  check_length(length, B, H, N);
  auto out = at::empty({B, H, N, D}, codes.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  const auto c = codes.contiguous();
  const auto s = scale.contiguous();
  const auto z = spec.fp8 ? zero : zero.contiguous();
  const int64_t ls[2] = {length.stride(0), length.stride(1)};
  malloc_kernels::unpack_dequantize_cpu(
      c.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(s.data_ptr<at::Half>()),
      spec.fp8 ? nullptr : reinterpret_cast<const uint16_t*>(z.data_ptr<at::Half>()), length.data_ptr<int32_t>(),
      ls, B, H, N, D, spec, out.data_ptr<float>());
  return out;
}

// Elementwise access to quant.h so tests can compare the shared host/device numerics with PyTorch's own
// conversions on millions of bit patterns.
at::Tensor quant_numerics(const at::Tensor& x, c10::string_view fn_view) {
  namespace q = malloc_kernels::quant;
  const std::string fn(fn_view);
  TORCH_CHECK_VALUE(x.device() == at::kCPU, "x must be on the CPU");
  const auto xc = x.contiguous();
  const int64_t n = xc.numel();
  if (fn == "f16_decode" || fn == "e4m3fn_decode") {
    const bool f16 = fn == "f16_decode";
    TORCH_CHECK_TYPE(xc.scalar_type() == (f16 ? at::kShort : at::kByte), "x must be ",
                     (f16 ? "int16" : "uint8"), " bit patterns for '", fn, "', got ", xc.scalar_type());
    auto out = at::empty(xc.sizes(), xc.options().dtype(at::kFloat));
    float* o = out.data_ptr<float>();
    if (f16) {
      const int16_t* p = xc.data_ptr<int16_t>();
      for (int64_t i = 0; i < n; ++i) o[i] = q::f16_bits_to_f32(static_cast<uint16_t>(p[i]));
    } else {
      const uint8_t* p = xc.data_ptr<uint8_t>();
      for (int64_t i = 0; i < n; ++i) o[i] = q::e4m3fn_to_f32(p[i]);
    }
    return out;
  }
  TORCH_CHECK_TYPE(xc.scalar_type() == at::kFloat, "x must be float32 for '", fn, "', got ", xc.scalar_type());
  const float* p = xc.data_ptr<float>();
  if (fn == "f16_bits") {
    auto out = at::empty(xc.sizes(), xc.options().dtype(at::kShort));
    int16_t* o = out.data_ptr<int16_t>();
    for (int64_t i = 0; i < n; ++i) o[i] = static_cast<int16_t>(q::f32_to_f16_bits(p[i]));
    return out;
  }
  if (fn == "e4m3fn") {
    auto out = at::empty(xc.sizes(), xc.options().dtype(at::kByte));
    uint8_t* o = out.data_ptr<uint8_t>();
    for (int64_t i = 0; i < n; ++i) o[i] = q::f32_to_e4m3fn(p[i]);
    return out;
  }
  auto out = at::empty(xc.sizes(), xc.options());
  float* o = out.data_ptr<float>();
  if (fn == "f16_round_down") {
    for (int64_t i = 0; i < n; ++i) o[i] = q::f16_round_down(p[i]);
  } else if (fn == "f16_round_up") {
    for (int64_t i = 0; i < n; ++i) o[i] = q::f16_round_up(p[i]);
  } else if (fn == "round_half_even") {
    for (int64_t i = 0; i < n; ++i) o[i] = q::round_half_even(p[i]);
  } else {
    TORCH_CHECK_VALUE(false, "fn must be one of 'f16_bits', 'f16_decode', 'f16_round_down', 'f16_round_up', "
                             "'round_half_even', 'e4m3fn', 'e4m3fn_decode', got '", fn, "'");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(malloc_kernels, m) {
  m.def("quantize_pack(Tensor x, Tensor length, int fmt, int group_size, str axis) -> (Tensor, Tensor, Tensor)");
  m.def("unpack_dequantize(Tensor codes, Tensor scale, Tensor zero, Tensor length, int fmt, int group_size, "
        "str axis, int head_dim) -> Tensor");
  m.def("quant_numerics(Tensor x, str fn) -> Tensor");
}

TORCH_LIBRARY_IMPL(malloc_kernels, CPU, m) {
  m.impl("quantize_pack", &quantize_pack);
  m.impl("unpack_dequantize", &unpack_dequantize);
  m.impl("quant_numerics", &quant_numerics);
}
