// Torch-side parsing of a packer call's format arguments into a QuantSpec (malloc_kernels/quant.h), shared by the
// CPU and CUDA glue so that both refuse the same arguments with the same messages.
#pragma once

#include <cstdint>
#include <string>

#include <c10/util/Exception.h>

#include "malloc_kernels/formats.h"
#include "malloc_kernels/quant.h"

namespace malloc_kernels {
namespace torch_glue {

// `fmt`: the format table's code (core/formats.py -> formats.h) of an integer or fp8 format; NVFP4 has its own
// entry points. `axis`: "token" (groups along D) or "channel" (groups along the sequence).
inline QuantSpec make_spec(int64_t fmt, int64_t group_size, const std::string& axis) {
  namespace fm = malloc_kernels::formats;
  TORCH_CHECK_VALUE(fmt > fm::kFLOAT && fmt < fm::kNumFormats && fmt != fm::kNVFP4,
                    "fmt must be the code of int8, int4, int2 or fp8 in the format table (nvfp4 has its own packer), "
                    "got ", fmt);
  TORCH_CHECK_VALUE(axis == "token" || axis == "channel", "axis must be 'token' or 'channel', got '", axis, "'");
  TORCH_CHECK_VALUE(group_size > 0, "group_size must be positive, got ", group_size);
  QuantSpec s{};
  s.bits = fm::kBits[fmt];
  s.fp8 = fmt == fm::kFP8;
  s.group_size = static_cast<int>(group_size);
  s.channel = axis == "channel";
  return s;
}

// Scale/zero groups per (user, head): along the sequence for channel grouping, along D for token grouping.
inline int64_t num_scale_groups(const QuantSpec& s, int64_t N, int64_t D) {
  return s.channel ? (N + s.group_size - 1) / s.group_size : D / s.group_size;
}

}  // namespace torch_glue
}  // namespace malloc_kernels
