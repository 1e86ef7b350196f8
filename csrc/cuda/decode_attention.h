// Host interface of the CUDA split-K decode attention (csrc/cuda/decode_attention.cu): plain structs of raw device
// pointers, so the kernel compiles (and is compile-checked for sm_80/sm_90) without torch. The torch glue
// (csrc/torch/cuda/decode_attention.cpp) fills them from tensors; malloc_kernels/ops/cuda.py prepares the tensors.
#pragma once

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#include "malloc_kernels/common.h"
#include "malloc_kernels/formats.h"

namespace malloc_kernels {
namespace cuda {

// Storage formats of a segment's payload: the quantized ones ARE the format table's codes (core/formats.py ->
// formats.h); the table's "float" format is split by dtype (F32 keeps code 0, F16/BF16 sit outside the table).
enum DecodeFormat : int {
  kFmtF32 = formats::kFLOAT, kFmtI8 = formats::kINT8, kFmtI4 = formats::kINT4, kFmtI2 = formats::kINT2,
  kFmtFP8 = formats::kFP8, kFmtNVFP4 = formats::kNVFP4, kFmtF16 = 64 + 1, kFmtBF16 = 64 + 2
};
static_assert(formats::kNumFormats == 6, "a new cache format needs its DecodeFormat member and a decode");

constexpr int kDecodeRowTile = 16;        // query rows (GQA heads x queries) per MMA tile (m16)
constexpr int kDecodeTilesPerBlock = 4;   // row tiles one block holds at most (64 rows): K/V dequantized once for them
constexpr int kDecodeMaxHeadDim = 256;    // largest supported head dim
constexpr int kDecodeColPart = 128;       // output columns one split block accumulates (D > 128: two blocks)

// Tensor-core operand precision of the decode kernel (fp32 accumulate in all three): fp16 / bf16 queries use one
// m16n8k16 MMA per tile in that format; fp32 queries use three m16n8k8 tf32 MMAs per tile (x = hi + lo split,
// hi*hi + hi*lo + lo*hi: ~fp32 accuracy, "3xTF32").
enum DecodeMma : int { kMmaTF32x3 = 0, kMmaF16 = 1, kMmaBF16 = 2 };

// One key/value segment of one layer: the cache, its residual, or the request's own tokens. Payloads are
// contiguous [B, Hkv, capacity, row_bytes]; scales/zeros fp16 bits in the cache layout; per-entry fields
// contiguous [B, Hkv, capacity] except for the request, whose positions/timestamps are [B, capacity] (stride_h 0).
struct DecodeSegment {
  const void* k = nullptr;
  const void* v = nullptr;
  int k_fmt = kFmtF32, v_fmt = kFmtF32;
  int64_t k_row_bytes = 0, v_row_bytes = 0;
  bool k_channel = false;   // keys grouped per channel over groups of entries (KIVI)
  int group_size = 1;
  int head_dim = 0;
  int capacity = 0;
  const uint16_t* k_scale = nullptr;
  const uint16_t* k_zero = nullptr;
  const uint16_t* v_scale = nullptr;
  const uint16_t* v_zero = nullptr;
  const uint8_t* k_scale8 = nullptr;  // NVFP4: e4m3fn scale bytes [B, Hkv, C, ceil(D / 16)]
  const uint8_t* v_scale8 = nullptr;
  const int32_t* length = nullptr;  // [B, Hkv] valid entries (request: k_lengths [B] with stride_h 0)
  int64_t length_stride_b = 0, length_stride_h = 0;
  const int32_t* pos32 = nullptr;   // cache positions (int32) ...
  const int64_t* pos64 = nullptr;   // ... or request positions (int64)
  const int64_t* ts = nullptr;
  int64_t pos_stride_b = 0, pos_stride_h = 0;
  const float* count = nullptr;     // merge counts, null = 1
  bool is_request = false;          // causal / target masks apply

  MK_HOST_DEVICE int64_t pos_row(int b, int hk) const { return b * pos_stride_b + hk * pos_stride_h; }
};

struct DecodeParams {
  int batch = 0, num_heads = 0, num_kv_heads = 0, max_q_len = 0, head_dim = 0;
  float scale = 1.0f;
  bool hstu = false, is_causal = false;
  int mma = kMmaTF32x3;                 // DecodeMma
  const float* q = nullptr;             // [B, Hq, Lq, D] fp32 contiguous
  const int32_t* q_lengths = nullptr;   // [B]
  const int32_t* num_targets = nullptr; // [B]
  const int64_t* q_pos = nullptr;       // [B, Lq] query positions (bias)
  const int64_t* q_ts = nullptr;        // [B, Lq] query timestamps (time bias)
  const float* pos_bias = nullptr;      // [Hq, P]
  int64_t num_pos = 0;
  const float* time_bias = nullptr;     // [Hq, T]
  int64_t num_time = 0;
  const int64_t* time_th = nullptr;     // [T] bucket thresholds (reference.time_bucket_thresholds)
  const float* inv_n = nullptr;         // [B, Hkv, Lq] HSTU 1/n_i (0 where n_i == 0)
  DecodeSegment seg[3];                 // cache, residual, request (absent segments have k == nullptr)
  int seg_first_block[4] = {0, 0, 0, 0};
  int span = 256;                       // keys per split
  float* part_acc = nullptr;            // workspace, decode_workspace_floats()
  float* part_m = nullptr;
  float* part_l = nullptr;
  float* out = nullptr;                 // [B, Hq, Lq, D] fp32
  float* lse = nullptr;                 // [B, Hq, Lq] or null
};

// Fills seg_first_block from the segments' capacities and `span` (a multiple of 32); returns the workspace size in
// floats: (acc, m, l) for every (user, kv head, row tile, split).
inline void decode_plan(DecodeParams& p, int64_t* acc_floats, int64_t* state_floats) {
  p.seg_first_block[0] = 0;
  for (int s = 0; s < 3; ++s) {
    const int blocks = p.seg[s].k ? (p.seg[s].capacity + p.span - 1) / p.span : 0;
    p.seg_first_block[s + 1] = p.seg_first_block[s] + blocks;
  }
  const int64_t tiles = (int64_t(p.num_heads / (p.num_kv_heads ? p.num_kv_heads : 1)) * p.max_q_len +
                         kDecodeRowTile - 1) / kDecodeRowTile;
  const int64_t parts = int64_t(p.batch) * p.num_kv_heads * tiles * p.seg_first_block[3];
  *state_floats = parts * kDecodeRowTile;
  *acc_floats = parts * kDecodeRowTile * p.head_dim;
}

// Largest grid x dimension (2^31 - 1); y and z are limited to 65,535, so the launches use x only.
constexpr int64_t kMaxGridX = 2147483647;

// The launch shapes of decode_attention: a split block holds tiles_per_block row tiles (1, 2 or 4: all rows of a kv
// head up to 64, so its K/V chunk is dequantized once for all of them) and one key span; the split kernel strides
// over split_blocks = splits x col_parts x row_groups x B x Hkv linear blocks with split_grid_x blocks, the combine
// kernel over
// combine_rows = B x Hq x Lq rows with combine_grid_x blocks (both 0 for an empty batch; split_grid_x 0 when there
// are no keys at all). num_tiles: 16-row tiles per kv head (the partials' layout); col_parts: blocks per (split, row
// group) that each accumulate kDecodeColPart output columns (2 for D > 128, else 1).
struct DecodeLaunch {
  int num_splits = 0, num_tiles = 0, tiles_per_block = 0, row_groups = 0, col_parts = 1;
  int64_t split_blocks = 0, combine_rows = 0;
  unsigned split_grid_x = 0, combine_grid_x = 0;
};
DecodeLaunch decode_launch_config(const DecodeParams& p);

// Dynamic shared memory of one split block (bytes) for head dim D, precision `mma` and tiles_per_block.
size_t decode_smem_bytes(int head_dim, int mma, int tiles_per_block);

// Launch the split kernel and the combine kernel on `stream`.
cudaError_t decode_attention(const DecodeParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace malloc_kernels
