// Fused CPU attention over a compressed KV cache + the request's own tokens (ARCHITECTURE.md, "Attention semantics").
//
// Framework-free: raw pointers, sizes and element strides only, so the same parameter block can be filled by the
// torch glue (csrc/torch/attention.cpp) or by any other host code.
//
// Per (user b, query head h, query i) the kernel computes, in ONE pass over three key segments
//   cache entries j < cache_length[b, hkv]      (any payload format, dequantized per block in L1, never in DRAM)
//   residual entries j < res_length[b, hkv]     (full precision)
//   request tokens j < k_len[b]                 (masked: causal / targets)
// the score  s_ij = scale * <q_i, k_j> + bias_ij  (bias from ORIGINAL positions/timestamps, computed in-kernel) and
//   softmax: o_i = sum_j c_j e^{s_ij} v_j / sum_j c_j e^{s_ij}   (online softmax, lse_i = log sum_j c_j e^{s_ij})
//   hstu:    o_i = (1/n_i) sum_j c_j silu(s_ij) v_j                (HSTU, arXiv 2402.17152)
// with c_j the merge count (ToMe proportional attention, arXiv 2210.09461). All query heads that share a kv head are
// processed together, so every K/V byte is read (and dequantized) once per (user, kv head, query block): that is what
// makes GQA/MQA decode cheap (FlashDecoding-style split over users/heads, arXiv 2311.01282).
#pragma once

#include <cstdint>

#include "malloc_kernels/isa.h"
#include "malloc_kernels/formats.h"

namespace malloc_kernels {
namespace cpu {

// Element type of a floating tensor (queries, request keys/values, outputs, float caches, residual).
enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

// Payload format of a stored key/value tensor as the kernel decodes it: the quantized formats ARE the format table's
// codes (malloc_kernels/core/formats.py -> formats.h); the table's "float" format is split by the payload's dtype
// (F32 keeps the table's float code 0; F16/BF16 take codes outside the table's range).
enum class Fmt : int {
  F32 = formats::kFLOAT,
  INT8 = formats::kINT8,
  INT4 = formats::kINT4,
  INT2 = formats::kINT2,
  FP8 = formats::kFP8,
  NVFP4 = formats::kNVFP4,
  F16 = 64 + int(DType::F16),
  BF16 = 64 + int(DType::BF16),
};
static_assert(formats::kNumFormats == 6, "a new cache format needs its Fmt member and a decode in the kernel");

// The Fmt of a floating payload of dtype `dt`.
constexpr Fmt float_fmt(DType dt) { return dt == DType::F32 ? Fmt::F32 : dt == DType::F16 ? Fmt::F16 : Fmt::BF16; }

// A [B, H, L, ...] view addressed as p + b*sB + h*sH + (start[b] + i)*sL (element units). Dense tensors use
// start == nullptr; jagged [total, H, ...] tensors use sB = 0 and start = offsets.
struct Strided {
  const void* p = nullptr;
  int64_t sB = 0, sH = 0, sL = 0;
  const int64_t* start = nullptr;
  int64_t offset(int64_t b, int64_t h, int64_t i) const {
    return b * sB + h * sH + ((start ? start[b] : 0) + i) * sL;
  }
};

struct Segment {
  // A cache segment: contiguous [B, Hkv, C, row] payload. For the quantized formats `k`/`v` are uint8 codes and
  // scale/zero are float16 bit patterns (uint16) laid out per core/kvcache.py; NVFP4's one-byte e4m3 scales come
  // through k_scale8/v_scale8 instead (format table column scale_dtype).
  const void* k = nullptr;
  const void* v = nullptr;
  Fmt k_fmt = Fmt::F32, v_fmt = Fmt::F32;
  bool k_channel = false;   // keys grouped per (token group, channel) (KIVI) instead of per (token, channel group)
  int group_size = 0;
  int64_t capacity = 0;
  const uint16_t* k_scale = nullptr;
  const uint16_t* k_zero = nullptr;
  const uint16_t* v_scale = nullptr;
  const uint16_t* v_zero = nullptr;
  const uint8_t* k_scale8 = nullptr;    // [B, Hkv, C, ceil(D / 16)] e4m3fn (NVFP4)
  const uint8_t* v_scale8 = nullptr;
  const int32_t* length = nullptr;      // [B, Hkv]
  const int32_t* position = nullptr;    // [B, Hkv, C]
  const int64_t* timestamp = nullptr;   // [B, Hkv, C] or null
  const float* count = nullptr;         // [B, Hkv, C] or null (all ones)
};

enum class Kind : int { Softmax = 0, Hstu = 1 };
enum class HstuNorm : int { Original = 0, Kept = 1, Constant = 2 };
// Scores of the cache's int8/int4/int2 keys: Exact (default) or Int8 (the query quantized per row, integer dot
// products with the codes; approximate, opt-in: attention_cpu/int8_query.h states the math and its error bound).
enum class QueryPrecision : int { Exact = 0, Int8 = 1 };

struct AttnParams {
  int B = 0, Hq = 0, Hkv = 0, D = 0;
  Kind kind = Kind::Softmax;
  float scale = 1.f;
  bool causal = false;

  DType q_dtype = DType::F32;       // also the output dtype
  DType kv_dtype = DType::F32;      // request keys/values
  Strided q, k, v, out;             // [B, Hq, Lq, D], [B, Hkv, Lk, D] x2, [B, Hq, Lq, D]
  const int64_t* q_len = nullptr;   // [B]
  const int64_t* k_len = nullptr;   // [B] (nullptr or k.p == nullptr: no request keys)
  const int64_t* num_targets = nullptr;  // [B] or null

  bool has_cache = false, has_residual = false;
  Segment cache, residual;
  const int32_t* original_length = nullptr;  // [B]

  // Relative bias (HSTU). pos_bias [P] (sH==0) or [Hq, P]; time_bias [T] or [Hq, T]; thresholds int64 [T]
  // (th[k] for k = 1..T-1 at index k; index 0 unused): bucket(dt) = #{k >= 1 : th[k] <= max(|dt|, 1)}.
  const float* pos_bias = nullptr; int64_t pos_bias_sH = 0; int64_t P = 0;
  const float* time_bias = nullptr; int64_t time_bias_sH = 0; int64_t T = 0;
  const int64_t* time_thresholds = nullptr;
  Strided q_pos, k_pos, q_ts, k_ts;  // int64 per token, sH = 0

  HstuNorm hstu_norm = HstuNorm::Original;
  int64_t hstu_norm_const = 0;
  QueryPrecision query_precision = QueryPrecision::Exact;

  float* lse = nullptr; Strided lse_view;   // float32 [B, Hq, Lq] (or jagged); null: not requested

  // Per-key attention mass (summed over the query heads of a kv head); window variants over the last
  // `stats_window` queries of each user. Null pointers: not requested.
  bool stats = false;
  int64_t stats_window = 0;
  Strided key_mass, key_wmass;          // float32 [B, Hkv, Lk] (or jagged [total_k, Hkv])
  float* cache_mass = nullptr; float* cache_wmass = nullptr;   // [B, Hkv, C]
  float* res_mass = nullptr; float* res_wmass = nullptr;       // [B, Hkv, R]

  int num_threads = 0;  // 0: OpenMP default
};

// Validated by the caller (glue). Runs on all OpenMP threads; runs the ISA variant isa::isa_for_family(variant,
// Family::Attention): the best this CPU has for Auto (the glue passes MALLOC_KERNELS_ISA, read per call).
void attention_forward(const AttnParams& p, isa::Isa variant = isa::Isa::Auto);

// Implementations (selected by attention_forward).
void attention_forward_portable(const AttnParams& p);
void attention_forward_avx2(const AttnParams& p);
void attention_forward_avx512(const AttnParams& p);
void attention_forward_neon(const AttnParams& p);  // aarch64 builds only
bool cpu_has_avx2();  // AVX2 + FMA + F16C (simd_avx2::cpu_has_avx2_f16c)

// Gather/compaction used by the pruning policies: for every (b, h) copy rows index[b, h, 0..K) of a
// [B, H, C, row_bytes] byte tensor into [B, H, K, row_bytes]. Indices must be in [0, C) (the caller checks).
void gather_rows(const uint8_t* src, uint8_t* dst, const int64_t* index, int64_t B, int64_t H, int64_t C, int64_t K,
                 int64_t row_bytes, int num_threads);

}  // namespace cpu
}  // namespace malloc_kernels
