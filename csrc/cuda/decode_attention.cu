// Split-K decode attention (flash-decoding, Dao et al. 2023) over the library's compressed caches: the cache
// segment in any storage format (fp32/fp16/bf16 floats, int8/int4/int2 asymmetric codes with token- or
// channel-axis groups -- KIVI's layout, Liu et al. 2024 --, fp8 e4m3fn), a full-precision residual segment and the
// request's own tokens, per-(user, kv head) lengths, merge counts, both kinds (softmax with the LSE merge of split
// partials; HSTU's pointwise silu with the in-kernel relative bias and a plain sum of partials).
//
// Work decomposition. Grid (splits, B * Hkv, row tiles): a block owns one (user b, kv head hk), one tile of
// kRowTile query rows of that kv head (GQA packing: rows are (query head of the group, query index) pairs, so every
// dequantized key/value is reused by all query heads that share it), and one span of keys of one segment. It
// streams its span in chunks of kChunk keys:
//   1. load + dequantize the chunk's keys into shared memory (16-byte vector loads of the contiguous chunk bytes
//      when rows are 16-byte multiples, shift/mask unpacking, one FMA per element with the group's fp16 scale/zero);
//   2. scores: warp w computes rows w, w + 4, ...; lane = key, the dot product reads the key from shared memory
//      (row stride D + 1 floats: conflict-free) and the query broadcast; masks, bias and counts are applied here, and
//      the chunk max / sum are warp shuffles;
//   3. load + dequantize the values into the same buffer; 4. accumulate p @ V with threads owning channels.
// Each block writes its unnormalised partial (acc, m, l); combine_partials merges the splits and normalises.
// Numerics shared with the CPU (quant.h, decode.h) are tested there.
#include <cuda_runtime.h>
#include <math.h>

#include "decode_attention.h"
#include "malloc_kernels/decode.h"
#include "malloc_kernels/nvfp4.h"
#include "malloc_kernels/quant.h"

namespace malloc_kernels {
namespace cuda {
namespace {

namespace q = malloc_kernels::quant;
namespace dk = malloc_kernels::decode;

constexpr int kThreads = 128;  // 4 warps
constexpr int kWarps = kThreads / 32;
constexpr int kChunk = 32;     // keys per shared-memory chunk: one key per lane in the score phase
constexpr int kRowTile = kDecodeRowTile;
constexpr int kRowsPerWarp = kRowTile / kWarps;
constexpr int kMaxDPerThread = (kDecodeMaxHeadDim + kThreads - 1) / kThreads;

__device__ __forceinline__ float to_float_bits16(uint32_t h, int fmt) {
  return fmt == kFmtF16 ? q::f16_bits_to_f32(static_cast<uint16_t>(h)) : q::bf16_bits_to_f32(static_cast<uint16_t>(h));
}

// Calls f(c, d) for each output-accumulator column c of this thread with the channel d it holds: for D <= kThreads
// thread t owns channel t % D in column 0 only (the rows are split kThreads / D ways instead), otherwise channels
// t, t + kThreads, ... below D. The column loop is unrolled, so acc[c] stays in registers.
template <typename F>
__device__ __forceinline__ void for_each_owned_channel(int D, F&& f) {
#pragma unroll
  for (int c = 0; c < kMaxDPerThread; ++c) {
    const int d = D <= kThreads ? threadIdx.x % D : threadIdx.x + c * kThreads;
    if (c > 0 && (D <= kThreads || d >= D)) break;
    f(c, d);
  }
}

// Bits per code of a quantized format, and one code's value (the format table's decode rules).
__device__ __forceinline__ int code_bits(int fmt) { return fmt == kFmtI4 || fmt == kFmtNVFP4 ? 4 : fmt == kFmtI2 ? 2 : 8; }
__device__ __forceinline__ float dequant(int fmt, uint32_t code, float sc, float z) {
  if (fmt == kFmtFP8) return q::dequant_fp8(code, sc);
  if (fmt == kFmtNVFP4) return nvfp4::e2m1_to_f32(code) * sc;
  return q::dequant_int(code, sc, z);
}

// Scale/zero of element (row j, channel d) of a quantized segment (NVFP4: its e4m3 scale, zero 0).
__device__ __forceinline__ void scale_zero(const DecodeSegment& s, bool is_k, int64_t row_base_groups, int j, int d,
                                           float* sc, float* z) {
  if ((is_k ? s.k_fmt : s.v_fmt) == kFmtNVFP4) {  // one e4m3 byte per 16 values along D, no zero
    *sc = q::e4m3fn_to_f32(__ldg((is_k ? s.k_scale8 : s.v_scale8) + (row_base_groups + j) * nvfp4::groups(s.head_dim) +
                                 d / nvfp4::kGroup));
    *z = 0.0f;
    return;
  }
  const uint16_t* sp = is_k ? s.k_scale : s.v_scale;
  const uint16_t* zp = is_k ? s.k_zero : s.v_zero;
  const bool channel = is_k && s.k_channel;
  int64_t p;
  if (channel) {
    p = (row_base_groups + j / s.group_size) * s.head_dim + d;
  } else {
    p = (row_base_groups + j) * (s.head_dim / s.group_size) + d / s.group_size;
  }
  *sc = q::f16_bits_to_f32(__ldg(sp + p));
  *z = zp ? q::f16_bits_to_f32(__ldg(zp + p)) : 0.0f;
}

// Dequantize the 16-byte word `w` (starting at element d0 of row j) into tile[j][d0 ...], channels below D only: a
// row of 4-bit (2-bit) codes is padded to whole bytes, so for D = 29..31, 61..63, ... (int4) or 61, 62, 125, ...
// (int2) a 16-byte multiple row holds up to 3 padding codes past D whose stores would land in the next key's
// first columns or, for the chunk's last row, in the weights that follow the tile.
__device__ __forceinline__ void dequant_word(const DecodeSegment& s, bool is_k, int fmt, int64_t row_base_groups,
                                             int j, int d0, uint4 w, float* tile_row) {
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
  const bool per_channel_scale = is_k && s.k_channel;
  const int D = s.head_dim;
  if (fmt == kFmtF32) {
#pragma unroll
    for (int e = 0; e < 4; ++e)
      if (d0 + e < D) tile_row[d0 + e] = __uint_as_float(words[e]);
    return;
  }
  if (fmt == kFmtF16 || fmt == kFmtBF16) {
#pragma unroll
    for (int e = 0; e < 8; ++e)
      if (d0 + e < D) tile_row[d0 + e] = to_float_bits16((words[e >> 1] >> ((e & 1) * 16)) & 0xffffu, fmt);
    return;
  }
  const int bits = code_bits(fmt);
  const int per_word = 32 / bits;
  const uint32_t mask = (1u << bits) - 1u;
  float sc = 0.0f, z = 0.0f;
  int cur_group = -1;
#pragma unroll
  for (int wi = 0; wi < 4; ++wi) {
    for (int e = 0; e < per_word; ++e) {
      const int d = d0 + wi * per_word + e;
      if (d >= D) return;  // padding codes of the row's last bytes
      // Groups change at most every group_size channels (token axis) or every channel (channel axis).
      const int grp = per_channel_scale ? d : d / s.group_size;
      if (grp != cur_group) {
        scale_zero(s, is_k, row_base_groups, j, d, &sc, &z);
        cur_group = grp;
      }
      const uint32_t code = (words[wi] >> (e * bits)) & mask;
      tile_row[d] = dequant(fmt, code, sc, z);
    }
  }
}

// Load rows [j0, j0 + n) of one payload (k or v) of segment s for row (b, hk) into tile[kChunk][D + 1] as fp32.
__device__ void load_tile(const DecodeSegment& s, bool is_k, int64_t bh, int j0, int n, float* tile) {
  const int D = s.head_dim;
  const int fmt = is_k ? s.k_fmt : s.v_fmt;
  const int64_t W = is_k ? s.k_row_bytes : s.v_row_bytes;
  const uint8_t* base = static_cast<const uint8_t*>(is_k ? s.k : s.v) + (bh * s.capacity + j0) * W;
  // Scale rows of (b, hk): token axis [C, D / G] per row; channel axis [ceil(C / G), D].
  const bool channel = is_k && s.k_channel;
  const int64_t row_base_groups = channel ? bh * ((s.capacity + s.group_size - 1) / s.group_size) : bh * s.capacity;
  const int jrel0 = j0;  // scale indices use the absolute entry index
  const bool vec = (W % 16 == 0) && ((reinterpret_cast<uintptr_t>(base) & 15u) == 0);
  if (vec) {
    // The chunk is one contiguous byte range: 16-byte loads (LDG.E.128), consecutive threads on consecutive words.
    const int64_t words = n * W / 16;
    const int elems_per_word = fmt == kFmtF32 ? 4 : (fmt == kFmtF16 || fmt == kFmtBF16) ? 8
                             : 128 / code_bits(fmt);
    const int words_per_row = static_cast<int>(W / 16);
    const uint4* src = reinterpret_cast<const uint4*>(base);
    for (int64_t i = threadIdx.x; i < words; i += kThreads) {
      const int j = static_cast<int>(i / words_per_row);
      const int d0 = static_cast<int>(i % words_per_row) * elems_per_word;
      const uint4 w = __ldg(src + i);
      dequant_word(s, is_k, fmt, row_base_groups, jrel0 + j, d0, w, tile + j * (D + 1));
    }
  } else {
    // Rows that are not 16-byte multiples (odd head dims): element-wise loads, same arithmetic.
    for (int64_t i = threadIdx.x; i < int64_t(n) * D; i += kThreads) {
      const int j = static_cast<int>(i / D), d = static_cast<int>(i % D);
      const uint8_t* row = base + j * W;
      float x;
      if (fmt == kFmtF32) {
        x = __ldg(reinterpret_cast<const float*>(row) + d);
      } else if (fmt == kFmtF16 || fmt == kFmtBF16) {
        x = to_float_bits16(__ldg(reinterpret_cast<const uint16_t*>(row) + d), fmt);
      } else {
        const int bits = code_bits(fmt);
        float sc, z;
        scale_zero(s, is_k, row_base_groups, jrel0 + j, d, &sc, &z);
        const uint32_t code = q::get_code(row, d, bits);
        x = dequant(fmt, code, sc, z);
      }
      tile[j * (D + 1) + d] = x;
    }
  }
}

// One block's work: (user, kv head) bh, row tile tile_idx, key span `split` of the grid (num_splits, num_tiles).
__device__ void decode_block(const DecodeParams& p, float* smem, int bh, int tile_idx, int split, int num_splits,
                             int num_tiles) {
  const int D = p.head_dim;
  float* qs = smem;                              // [kRowTile][D], pre-multiplied by the softmax scale
  float* tile = qs + kRowTile * D;               // [kChunk][D + 1]
  float* ps = tile + kChunk * (D + 1);           // [kRowTile][kChunk] weights of the chunk
  float* alpha = ps + kRowTile * kChunk;         // [kRowTile] rescale factors of the chunk

  const int b = bh / p.num_kv_heads, hk = bh % p.num_kv_heads;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int G = p.num_heads / p.num_kv_heads;
  const int q_len = p.q_lengths[b];
  const int rows_total = G * p.max_q_len;

  // Which segment and key span this block streams.
  int seg = 0;
  while (seg < 2 && split >= p.seg_first_block[seg + 1]) ++seg;
  const DecodeSegment& S = p.seg[seg];
  // Lengths are clamped to the segment's capacity: the glue cannot check device-resident lengths without a sync,
  // and no value of them may make this block read past the payload.
  const int raw_len = S.length ? S.length[b * S.length_stride_b + hk * S.length_stride_h] : q_len;
  const int seg_len = max(0, min(raw_len, S.capacity));
  const int span_start = (split - p.seg_first_block[seg]) * p.span;
  const int span_end = min(seg_len, span_start + p.span);

  // Query rows of this tile: row r -> (head g within the group, query index i).
  for (int idx = threadIdx.x; idx < kRowTile * D; idx += kThreads) {
    const int r = idx / D, d = idx % D;
    const int rg = tile_idx * kRowTile + r;
    float v = 0.0f;
    if (rg < rows_total) {
      const int g = rg / p.max_q_len, i = rg % p.max_q_len;
      if (i < q_len) v = p.q[((int64_t(b) * p.num_heads + hk * G + g) * p.max_q_len + i) * D + d] * p.scale;
    }
    qs[idx] = v;
  }

  // Per-warp running softmax state of its rows (all lanes hold the same values).
  float m_run[kRowsPerWarp], l_run[kRowsPerWarp];
#pragma unroll
  for (int k = 0; k < kRowsPerWarp; ++k) {
    m_run[k] = -INFINITY;
    l_run[k] = 0.0f;
  }
  // Output accumulators: thread owns channel(s) d and a subset of rows.
  const int rsplit = D <= kThreads ? kThreads / D : 1;
  const int my_rs = D <= kThreads ? threadIdx.x / D : 0;
  const bool pv_active = D <= kThreads ? (threadIdx.x < rsplit * D) : true;
  float acc[kMaxDPerThread][kRowTile];
#pragma unroll
  for (int c = 0; c < kMaxDPerThread; ++c)
#pragma unroll
    for (int r = 0; r < kRowTile; ++r) acc[c][r] = 0.0f;

  for (int j0 = span_start; j0 < span_end; j0 += kChunk) {
    const int n = min(kChunk, span_end - j0);
    __syncthreads();  // previous chunk's V tile and weights fully consumed (and qs written on the first pass)
    load_tile(S, true, bh, j0, n, tile);
    __syncthreads();

    // Scores, masks, bias, counts; online softmax (or HSTU weights) per row. Lane = key j0 + lane.
    const int j = j0 + lane;
    const bool key_ok = lane < n;
    float cnt = 1.0f;
    int64_t pj = 0, tj = 0;
    if (key_ok) {
      if (S.count) cnt = S.count[int64_t(bh) * S.capacity + j];
      if (p.pos_bias) pj = S.pos64 ? S.pos64[S.pos_row(b, hk) + j] : S.pos32[S.pos_row(b, hk) + j];
      if (p.time_bias) tj = S.ts[S.pos_row(b, hk) + j];
    }
#pragma unroll
    for (int k = 0; k < kRowsPerWarp; ++k) {
      const int r = warp + k * kWarps;
      const int rg = tile_idx * kRowTile + r;
      const int g = rg / p.max_q_len, i = rg % p.max_q_len;
      bool vis = key_ok && rg < rows_total && i < q_len;
      if (vis && S.is_request) {
        // Request keys (j < k_length[b] already, via span_end): causal top-left aligned, targets never see
        // other targets (core/masks.py request_visibility).
        if (p.is_causal && j > i) vis = false;
        const int first_target = q_len - p.num_targets[b];
        if (j >= first_target && i >= first_target && j != i) vis = false;
      }
      float s = -INFINITY;
      if (vis) {
        float dot = 0.0f;
        const float* kr = tile + lane * (D + 1);
        const float* qr = qs + r * D;
        for (int d = 0; d < D; ++d) dot = fmaf(qr[d], kr[d], dot);
        s = dot;
        const int hq = hk * G + g;
        if (p.pos_bias) {
          const int64_t pi = p.q_pos[int64_t(b) * p.max_q_len + i];
          s += p.pos_bias[int64_t(hq) * p.num_pos + dk::pos_index(pi, pj, p.num_pos)];
        }
        if (p.time_bias) {
          const int64_t ti = p.q_ts[int64_t(b) * p.max_q_len + i];
          s += p.time_bias[int64_t(hq) * p.num_time + dk::time_bucket(ti, tj, p.time_th, p.num_time)];
        }
      }
      float w;
      if (p.hstu) {
        const float inv_n = (rg < rows_total && i < q_len) ? p.inv_n[(int64_t(bh)) * p.max_q_len + i] : 0.0f;
        w = vis ? cnt * dk::silu(s) * inv_n : 0.0f;
        if (lane == 0) alpha[r] = 1.0f;
      } else {
        float cm = s;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) cm = fmaxf(cm, __shfl_xor_sync(0xffffffffu, cm, o));
        const float m_new = fmaxf(m_run[k], cm);
        w = (vis && m_new != -INFINITY) ? cnt * __expf(s - m_new) : 0.0f;
        float sum = w;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
        const float a = dk::rescale(m_run[k], m_new);
        l_run[k] = l_run[k] * a + sum;
        m_run[k] = m_new;
        if (lane == 0) alpha[r] = a;
      }
      ps[r * kChunk + lane] = w;
    }
    __syncthreads();  // scores done with the K tile; weights and alphas visible
    load_tile(S, false, bh, j0, n, tile);
    __syncthreads();

    if (pv_active) {
      for_each_owned_channel(D, [&](int c, int d) {
#pragma unroll
        for (int r = 0; r < kRowTile; ++r)
          if (r % rsplit == my_rs) acc[c][r] *= alpha[r];
        for (int jj = 0; jj < n; ++jj) {
          const float v = tile[jj * (D + 1) + d];
#pragma unroll
          for (int r = 0; r < kRowTile; ++r)
            if (r % rsplit == my_rs) acc[c][r] = fmaf(ps[r * kChunk + jj], v, acc[c][r]);
        }
      });
    }
  }

  // Partials: acc [bh][tile][split][r][d], state [bh][tile][split][r] (m, l).
  const int64_t part = (int64_t(bh) * num_tiles + tile_idx) * num_splits + split;
  if (pv_active) {
    for_each_owned_channel(D, [&](int c, int d) {
#pragma unroll
      for (int r = 0; r < kRowTile; ++r)
        if (r % rsplit == my_rs) p.part_acc[(part * kRowTile + r) * D + d] = acc[c][r];
    });
  }
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < kRowsPerWarp; ++k) {
      const int r = warp + k * kWarps;
      p.part_m[part * kRowTile + r] = m_run[k];
      p.part_l[part * kRowTile + r] = l_run[k];
    }
  }
}

// Grid-stride over the linear block index (bh, tile, split), split fastest: the grid is one x axis (up to 2^31 - 1
// blocks), so B * Hkv is not bound by the 65,535 limit of grid y/z; extra work loops within the launched blocks.
__global__ void __launch_bounds__(kThreads) decode_split(DecodeParams p, int num_splits, int num_tiles,
                                                         int64_t num_blocks) {
  extern __shared__ float smem[];
  for (int64_t blk = blockIdx.x; blk < num_blocks; blk += gridDim.x) {
    __syncthreads();  // the previous block's last reads of shared memory are done
    const int split = static_cast<int>(blk % num_splits);
    const int64_t rest = blk / num_splits;
    decode_block(p, smem, static_cast<int>(rest / num_tiles), static_cast<int>(rest % num_tiles), split,
                 num_splits, num_tiles);
  }
}

// One block per (b, hk, row): merges the splits of that row (LSE merge for softmax, sum for HSTU), normalises and
// writes out [B, Hq, Lq, D] (fp32) and lse [B, Hq, Lq]. The merged (max, sum) is reduced once by warp 0 and
// shared; each split's weight exp(m_s - M) / L is recomputed per channel loop from it.
__global__ void __launch_bounds__(kThreads) combine_partials(DecodeParams p, int num_splits, int num_tiles,
                                                             int64_t num_rows) {
  __shared__ float merged[2];
  const int G = p.num_heads / p.num_kv_heads;
  const int rows_total = G * p.max_q_len;
  const int D = p.head_dim;
  // Grid-stride over rows (B * Hkv * rows_total may exceed the grid's x limit).
  for (int64_t row = blockIdx.x; row < num_rows; row += gridDim.x) {
    const int rg = static_cast<int>(row % rows_total);
    const int64_t bh = row / rows_total;
    const int b = static_cast<int>(bh / p.num_kv_heads), hk = static_cast<int>(bh % p.num_kv_heads);
    const int g = rg / p.max_q_len, i = rg % p.max_q_len;
    const int r = rg % kRowTile;
    const int64_t out_row = (int64_t(b) * p.num_heads + hk * G + g) * p.max_q_len + i;
    const int64_t base = (bh * num_tiles + rg / kRowTile) * num_splits;
    const float* pm = p.part_m + base * kRowTile + r;  // split s at pm[s * kRowTile]
    const float* pl = p.part_l + base * kRowTile + r;
    __syncthreads();  // every thread has read the previous row's merged state
    if (threadIdx.x < 32) {
      // Lane-strided partial merges, then a shuffle tree of dk::merge.
      dk::SoftmaxState st{-INFINITY, 0.0f};
      float wa, wb;
      for (int s = threadIdx.x; s < num_splits; s += 32)
        st = dk::merge(st, {pm[s * kRowTile], pl[s * kRowTile]}, &wa, &wb);
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        const dk::SoftmaxState other{__shfl_xor_sync(0xffffffffu, st.m, o), __shfl_xor_sync(0xffffffffu, st.l, o)};
        st = dk::merge(st, other, &wa, &wb);
      }
      if (threadIdx.x == 0) {
        merged[0] = st.m;
        merged[1] = st.l;
      }
    }
    __syncthreads();
    const float M = merged[0], L = merged[1];
    const bool row_ok = i < p.q_lengths[b];
    for (int d = threadIdx.x; d < D; d += kThreads) {
      float o = 0.0f;
      for (int s = 0; s < num_splits; ++s) {
        const float a = p.part_acc[((base + s) * kRowTile + r) * D + d];
        o += p.hstu ? a : (L > 0.0f ? a * __expf(pm[s * kRowTile] - M) : 0.0f);
      }
      if (!p.hstu) o = L > 0.0f ? o / L : 0.0f;
      p.out[out_row * D + d] = row_ok ? o : 0.0f;
    }
    if (threadIdx.x == 0 && p.lse) p.lse[out_row] = (!p.hstu && row_ok) ? dk::lse({M, L}) : -INFINITY;
  }
}

}  // namespace

size_t decode_smem_bytes(int head_dim) {
  return sizeof(float) * (size_t(kRowTile) * head_dim + size_t(kChunk) * (head_dim + 1) + kRowTile * kChunk + kRowTile);
}

DecodeLaunch decode_launch_config(const DecodeParams& p) {
  DecodeLaunch l;
  // Empty batches first: the row and tile counts below divide by num_kv_heads.
  if (p.batch <= 0 || p.num_kv_heads <= 0 || p.num_heads <= 0 || p.max_q_len <= 0) return l;
  l.num_splits = p.seg_first_block[3];
  l.num_tiles = static_cast<int>((int64_t(p.num_heads / p.num_kv_heads) * p.max_q_len + kRowTile - 1) / kRowTile);
  l.split_blocks = int64_t(l.num_splits) * l.num_tiles * p.batch * p.num_kv_heads;
  l.combine_rows = int64_t(p.batch) * p.num_heads * p.max_q_len;
  // No keys at all (no cache, Lk = 0): no split block; combine still writes the empty rows (0, lse -inf).
  l.split_grid_x = static_cast<unsigned>(l.split_blocks < kMaxGridX ? l.split_blocks : kMaxGridX);
  l.combine_grid_x = static_cast<unsigned>(l.combine_rows < kMaxGridX ? l.combine_rows : kMaxGridX);
  return l;
}

cudaError_t decode_attention(const DecodeParams& p, cudaStream_t stream) {
  const DecodeLaunch l = decode_launch_config(p);
  if (l.combine_grid_x == 0) return cudaSuccess;
  if (l.split_grid_x > 0) {
    const size_t smem = decode_smem_bytes(p.head_dim);
    cudaError_t err = cudaFuncSetAttribute(decode_split, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(smem));
    if (err != cudaSuccess) return err;
    decode_split<<<dim3(l.split_grid_x), kThreads, smem, stream>>>(p, l.num_splits, l.num_tiles, l.split_blocks);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  combine_partials<<<dim3(l.combine_grid_x), kThreads, 0, stream>>>(p, l.num_splits, l.num_tiles, l.combine_rows);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace malloc_kernels
