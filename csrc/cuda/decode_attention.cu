// Split-K decode attention (flash-decoding, Dao et al. 2023) on tensor cores, over the library's compressed caches:
// the cache segment in any storage format (fp32/fp16/bf16 floats, int8/int4/int2 asymmetric codes with token- or
// channel-axis groups -- KIVI's layout, Liu et al. 2024 --, fp8 e4m3fn, NVFP4), a full-precision residual segment
// and the request's own tokens, per-(user, kv head) lengths, merge counts, both kinds (softmax with the LSE merge of
// split partials; HSTU's pointwise silu with the in-kernel relative bias and a plain sum of partials).
//
// Math per row i (a query of one query head) and visible entry j: s_ij = scale <q_i, k_j> + bias_ij;
// softmax o_i = sum_j c_j e^{s_ij} v_j / sum_j c_j e^{s_ij} (log c_j folded into the score, so every weight is <= 1
// and fits fp16); hstu o_i = (1/n_i) sum_j c_j silu(s_ij) v_j (1/n_i folded into the weight before it is rounded).
//
// Work decomposition. A block (4 warps) owns one (user b, kv head hk), up to four 16-row tiles of that kv head's
// rows (GQA packing: rows are (query head of the group, query index) pairs, so each dequantized key/value serves
// every query head that shares it) and one span of keys of one segment. Warp w takes row tile w % R and key group
// w / R of each chunk (R = tiles in the block: with one tile the four warps split the keys, with four each warp owns
// a tile and all keys). Above D = 128 a block accumulates one 128-column half of the output (two blocks per span:
// each computes the full scores, converts only its half of the values). Per chunk of 4 x K keys (K = 16 for
// fp16/bf16 operands, 8 for tf32):
//   1. all threads dequantize the chunk's keys and values ONCE into shared memory in the MMA operand format
//      (rows padded to a multiple of K, row stride = 4 words mod 8, so the fragment loads below are bank-conflict
//      free; each thread loads 16 payload bytes with one 128-bit load and stores each 4-byte word's channels as
//      one 4..16-byte vector, words and 16-byte parts in a lane-rotated order so a store phase covers all banks).
//      Token-axis scales/zeros are loaded once per group run of a word, channel-axis (KIVI key) scales as one vector load per word. Non-finite values
//      are replaced by 0 and flagged per key, so an invisible entry cannot reach a row through 0 * NaN in an MMA;
//   2. S = Q K^T with mma.sync (q fragments live in registers for fp16/bf16 up to D = 128, else in shared memory),
//      masks, bias and counts on the accumulator fragments, online softmax per row (quad shuffles for the max);
//   3. O += P V with mma.sync, P taken straight from the S accumulators (FlashAttention-2's register reuse: the
//      m16n8 C fragment of two key tiles is the m16k16 A fragment; for tf32 the keys are permuted consistently in
//      A and B instead).
// Warps of one row tile merge their (m, l, acc) through shared memory, and the block writes one unnormalised
// partial per row tile; combine_partials merges the splits, normalises and applies the non-finite rule.
//
// Non-finite rule (ARCHITECTURE.md): a visible NaN / +inf score (log c included), a visible entry's non-finite value,
// or a non-finite element of a row's result makes that row NaN (lse NaN); a -inf score is weight 0.
// Numerics shared with the CPU (quant.h, decode.h) are tested there.
#include <cuda_runtime.h>
#include <math.h>

#include "decode_attention.h"
#include "malloc_kernels/decode.h"
#include "malloc_kernels/nvfp4.h"
#include "malloc_kernels/quant.h"
#include "mma.cuh"

namespace malloc_kernels {
namespace cuda {
namespace {

namespace q = malloc_kernels::quant;
namespace dk = malloc_kernels::decode;

constexpr int kThreads = 128;  // 4 warps
constexpr int kWarps = kThreads / 32;
constexpr int kRowTile = kDecodeRowTile;
constexpr int kMaxTiles = kDecodeTilesPerBlock;

// Shared-memory layout of a split block (bytes), the same on host (launch size) and device.
struct Layout {
  int chunk, dp, sk;  // keys per chunk, padded head dim, row stride (elements)
  size_t v_off, q_off, meta_off, total;
};
__host__ __device__ inline Layout layout(int mma, int D, int tiles) {
  const bool tf32 = mma == kMmaTF32x3;
  const int k = tf32 ? 8 : 16, elem = tf32 ? 4 : 2;
  Layout l;
  l.chunk = kWarps * k;
  l.dp = (D + k - 1) / k * k;
  l.sk = l.dp + (tf32 ? 4 : 8);  // row stride = 4 words mod 8: conflict-free fragment loads
  const bool q_in_regs = !tf32 && D <= 128;
  l.v_off = size_t(l.chunk) * l.sk * elem;
  l.q_off = 2 * l.v_off;
  const size_t q_bytes = q_in_regs ? 0 : size_t(tiles) * kRowTile * l.sk * elem;
  l.meta_off = (l.q_off + q_bytes + 15) / 16 * 16;
  // per chunk key: log-count / count (f32), position and timestamp (i64), value-poison flags (i32, 2 buffers)
  l.total = l.meta_off + size_t(l.chunk) * (4 + 8 + 8 + 8);
  return l;
}

// ---- operand formats ------------------------------------------------------------------------------------------
template <int MMA>
struct Op {  // fp16 / bf16: 16-bit elements, k = 16
  using Elem = uint16_t;
  static constexpr int kK = 16;
  static __device__ __forceinline__ Elem cvt(float x) {
    return MMA == kMmaF16 ? mma::f16_bits(x) : mma::bf16_bits(x);
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    return uint32_t(cvt(lo)) | (uint32_t(cvt(hi)) << 16);
  }
};
template <>
struct Op<kMmaTF32x3> {  // fp32 elements, split into tf32 hi + lo at fragment load, k = 8
  using Elem = float;
  static constexpr int kK = 8;
  static __device__ __forceinline__ Elem cvt(float x) { return x; }
};

// x = hi + lo in tf32 (lo 0 for inf / NaN, so an infinite element stays infinite instead of inf - inf = NaN).
__device__ __forceinline__ void split_tf32(float x, uint32_t& hi, uint32_t& lo) {
  hi = mma::tf32_bits(x);
  lo = q::is_finite(x) ? mma::tf32_bits(x - __uint_as_float(hi)) : 0u;
}

// A tf32 hi part with inf / NaN replaced by 0 (the operand of a correction product).
__device__ __forceinline__ uint32_t finite_or_zero(uint32_t bits) {
  return (bits & 0x7f800000u) == 0x7f800000u ? 0u : bits;
}

template <int MMA>
__device__ __forceinline__ void mma16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if (MMA == kMmaF16)
    mma::m16n8k16_f16(d, a, b0, b1);
  else
    mma::m16n8k16_bf16(d, a, b0, b1);
}

// 3xTF32: d += ah*bh + ah*bl + al*bh (the small terms first).
__device__ __forceinline__ void mma_tf32x3(float (&d)[4], const uint32_t (&ah)[4], const uint32_t (&al)[4],
                                           uint32_t bh0, uint32_t bh1, uint32_t bl0, uint32_t bl1) {
  mma::m16n8k8_tf32(d, al, bh0, bh1);
  mma::m16n8k8_tf32(d, ah, bl0, bl1);
  mma::m16n8k8_tf32(d, ah, bh0, bh1);
}

// ---- dequantization of one 4-byte payload word -----------------------------------------------------------------
// Channels per 4-byte payload word of each format.
template <int FMT>
struct Unit {
  static constexpr int E = FMT == kFmtF32 ? 1 : (FMT == kFmtF16 || FMT == kFmtBF16) ? 2
                         : (FMT == kFmtI8 || FMT == kFmtFP8) ? 4 : (FMT == kFmtI4 || FMT == kFmtNVFP4) ? 8 : 16;
  static constexpr int bits = 32 / E;
};

// The 4 bytes at byte offset 4u of a row of W bytes that is not 4-byte aligned (bytes past W read as 0).
__device__ __forceinline__ uint32_t load_word_bytes(const uint8_t* row, int u, int64_t W) {
  uint32_t w = 0;
#pragma unroll
  for (int k = 0; k < 4; ++k)
    if (int64_t(u) * 4 + k < W) w |= uint32_t(__ldg(row + u * 4 + k)) << (8 * k);
  return w;
}

// n fp16 values starting at p into out[0..n): vector loads when `vec` (p 2n-byte aligned), else scalar.
template <int N>
__device__ __forceinline__ void load_halves(const uint16_t* p, bool vec, int valid, float* out) {
  if (vec && valid >= N && N >= 2) {
    uint32_t w[N / 2 > 0 ? N / 2 : 1];
    if (N == 2) {
      w[0] = __ldg(reinterpret_cast<const uint32_t*>(p));
    } else if (N == 4) {
      const uint2 x = __ldg(reinterpret_cast<const uint2*>(p));
      w[0] = x.x;
      w[1] = x.y;
    } else {
#pragma unroll
      for (int k = 0; k < N / 8; ++k) {
        const uint4 x = __ldg(reinterpret_cast<const uint4*>(p) + k);
        w[4 * k] = x.x;
        w[4 * k + 1] = x.y;
        w[4 * k + 2] = x.z;
        w[4 * k + 3] = x.w;
      }
    }
#pragma unroll
    for (int e = 0; e < N; ++e) out[e] = q::f16_bits_to_f32(static_cast<uint16_t>(w[e / 2] >> (16 * (e & 1))));
    return;
  }
#pragma unroll
  for (int e = 0; e < N; ++e) out[e] = e < valid ? q::f16_bits_to_f32(__ldg(p + e)) : 0.0f;
}

// Channels [d0, d0 + E) of entry j (absolute) of one payload, from its payload word w, into v (0 past D).
template <int FMT>
__device__ __forceinline__ void decode_word(const DecodeSegment& s, bool is_k, int bh, int j, int d0, uint32_t w,
                                            float* v) {
  constexpr int E = Unit<FMT>::E, bits = Unit<FMT>::bits;
  const int D = s.head_dim;
  if constexpr (FMT == kFmtF32 || FMT == kFmtF16 || FMT == kFmtBF16) {
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const uint16_t h = static_cast<uint16_t>(w >> (16 * e));
      const float x = FMT == kFmtF32 ? __uint_as_float(w) : FMT == kFmtF16 ? q::f16_bits_to_f32(h)
                                                                             : q::bf16_bits_to_f32(h);
      v[e] = d0 + e < D ? x : 0.0f;
    }
    return;
  } else {
    constexpr uint32_t mask = (1u << bits) - 1u;
    if (FMT == kFmtNVFP4) {  // one e4m3 scale per 16 channels: a word's 8 channels share it
      const float sc = q::e4m3fn_to_f32(
          __ldg((is_k ? s.k_scale8 : s.v_scale8) + (int64_t(bh) * s.capacity + j) * nvfp4::groups(D) +
                d0 / nvfp4::kGroup));
#pragma unroll
      for (int e = 0; e < E; ++e) v[e] = d0 + e < D ? nvfp4::e2m1_to_f32((w >> (e * bits)) & mask) * sc : 0.0f;
      return;
    }
    const uint16_t* sp = is_k ? s.k_scale : s.v_scale;
    const uint16_t* zp = is_k ? s.k_zero : s.v_zero;
    float sc[E], z[E];
    if (is_k && s.k_channel) {
      // KIVI keys: scale/zero per (group of entries, channel): the word's E channels are E consecutive fp16 values.
      const int64_t idx = (int64_t(bh) * ((s.capacity + s.group_size - 1) / s.group_size) + j / s.group_size) * D + d0;
      const bool vec = D % E == 0 && (reinterpret_cast<uintptr_t>(sp) & 15u) == 0 &&
                       (zp == nullptr || (reinterpret_cast<uintptr_t>(zp) & 15u) == 0);
      load_halves<E>(sp + idx, vec, D - d0, sc);
      if (zp) {
        load_halves<E>(zp + idx, vec, D - d0, z);
      } else {
#pragma unroll
        for (int e = 0; e < E; ++e) z[e] = 0.0f;
      }
    } else {
      // Token axis: one scale/zero per group of channels, reloaded only when the word crosses into the next group.
      const int groups = D / s.group_size;
      const int64_t row = (int64_t(bh) * s.capacity + j) * groups;
      int cur = -1;
      float a = 0.0f, c = 0.0f;
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const int grp = (d0 + e < D ? d0 + e : D - 1) / s.group_size;
        if (grp != cur) {
          a = q::f16_bits_to_f32(__ldg(sp + row + grp));
          c = zp ? q::f16_bits_to_f32(__ldg(zp + row + grp)) : 0.0f;
          cur = grp;
        }
        sc[e] = a;
        z[e] = c;
      }
    }
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const uint32_t code = (w >> (e * bits)) & mask;
      const float x = FMT == kFmtFP8 ? q::dequant_fp8(code, sc[e]) : q::dequant_int(code, sc[e], z[e]);
      v[e] = d0 + e < D ? x : 0.0f;
    }
  }
}

// Store E values as operand elements at dst (E-element aligned within a padded row): one vector store of up to 16
// bytes, or 16-byte parts in the order rotated by the unit index u, so the 8 threads of a quarter-warp (consecutive
// units of one row) hit 8 distinct 4-bank groups.
template <int MMA, int E>
__device__ __forceinline__ void store_unit(typename Op<MMA>::Elem* dst, const float* v, int u, int room) {
  using O = Op<MMA>;
  constexpr int bytes = E * int(sizeof(typename O::Elem));
  if (room < E) {
#pragma unroll
    for (int e = 0; e < E; ++e)
      if (e < room) dst[e] = O::cvt(v[e]);
    return;
  }
  if constexpr (bytes < 4) {
    dst[0] = O::cvt(v[0]);
  } else {
    uint32_t w[bytes / 4];
    if constexpr (MMA == kMmaTF32x3) {
#pragma unroll
      for (int e = 0; e < E; ++e) w[e] = __float_as_uint(v[e]);
    } else {
#pragma unroll
      for (int e = 0; e + 1 < E; e += 2) w[e / 2] = O::pack(v[e], v[e + 1]);
    }
    if constexpr (bytes == 4) {
      *reinterpret_cast<uint32_t*>(dst) = w[0];
    } else if constexpr (bytes == 8) {
      *reinterpret_cast<uint2*>(dst) = uint2{w[0], w[1]};
    } else {
      constexpr int parts = bytes / 16;
      const int rot = u / (8 / parts);  // parts = 1, 2 or 4
#pragma unroll
      for (int k = 0; k < parts; ++k) {
        const int part = (k + rot) % parts;
        uint4 val = uint4{w[0], w[1], w[2], w[3]};
#pragma unroll
        for (int pp = 1; pp < parts; ++pp)  // register selects (no local-memory indexing of w)
          if (part == pp) val = uint4{w[4 * pp], w[4 * pp + 1], w[4 * pp + 2], w[4 * pp + 3]};
        reinterpret_cast<uint4*>(dst)[part] = val;
      }
    }
  }
}

// Dequantize rows [j0, j0 + n) of one payload (k or v) of segment s for (b, hk) = bh into tile[chunk][sk] (rows
// past n and channels past D as 0). Each thread loads 16 payload bytes (LDG.128 when rows are 16-byte multiples)
// and converts its four 4-byte words in an order rotated by lane (r = (k + lane / div) % 4), so the lanes of one
// store phase -- consecutive 16-byte quads of a row -- write to distinct banks. Values: non-finite elements become
// 0 and set vbad[row]. Only the 16-byte quads whose first channel lies in [c_lo, c_hi) are converted.
template <int MMA, int FMT>
__device__ __forceinline__ void load_rows(const DecodeSegment& s, bool is_k, int bh, int j0, int n, const Layout& lay,
                          typename Op<MMA>::Elem* tile, int* vbad, int c_lo, int c_hi) {
  constexpr int E = Unit<FMT>::E;
  constexpr int kUnitWords = E * int(sizeof(typename Op<MMA>::Elem)) / 4 > 0
                                 ? E * int(sizeof(typename Op<MMA>::Elem)) / 4 : 1;  // smem words per unit
  constexpr int kRotDiv = 8 / kUnitWords > 2 ? 8 / kUnitWords : 2;
  const int D = s.head_dim;
  const int64_t W = is_k ? s.k_row_bytes : s.v_row_bytes;
  const uint8_t* base = static_cast<const uint8_t*>(is_k ? s.k : s.v) + (int64_t(bh) * s.capacity + j0) * W;
  const bool vec = (W & 15) == 0 && (reinterpret_cast<uintptr_t>(base) & 15u) == 0;
  const bool aligned = (W & 3) == 0 && (reinterpret_cast<uintptr_t>(base) & 3u) == 0;
  const int units = (lay.dp + E - 1) / E;
  const int quads = (units + 3) / 4;
  const int rot = (threadIdx.x & 31) / kRotDiv;
  // Not unrolled (neither this loop nor the four words below): the accumulators of the caller stay live across
  // this pass, and unrolled copies would hold several words' dequantized values at once.
#pragma unroll 1
  for (int i = threadIdx.x; i < lay.chunk * quads; i += kThreads) {
    const int j = i / quads, qd = i - j * quads;
    if (qd * 4 * E < c_lo || qd * 4 * E >= c_hi) continue;  // channels of another block's output part (values)
    const uint8_t* row = base + int64_t(j) * W;
    uint4 x = uint4{0u, 0u, 0u, 0u};
    if (j < n && qd * 4 * E < D) {
      if (vec) {
        x = __ldg(reinterpret_cast<const uint4*>(row) + qd);  // the whole quad lies inside the row
      } else {
        uint32_t w4[4] = {0u, 0u, 0u, 0u};
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const int u = qd * 4 + k;
          if (u * E < D)
            w4[k] = aligned ? __ldg(reinterpret_cast<const uint32_t*>(row) + u) : load_word_bytes(row, u, W);
        }
        x = uint4{w4[0], w4[1], w4[2], w4[3]};
      }
    }
#pragma unroll 1
    for (int k = 0; k < 4; ++k) {
      const int r = (k + rot) & 3;
      const int u = qd * 4 + r;
      if (u >= units) continue;
      const uint32_t w = r == 0 ? x.x : r == 1 ? x.y : r == 2 ? x.z : x.w;
      const int d0 = u * E;
      float v[E];
#pragma unroll
      for (int e = 0; e < E; ++e) v[e] = 0.0f;
      if (j < n && d0 < D) {
        decode_word<FMT>(s, is_k, bh, j0 + j, d0, w, v);
        if (!is_k) {
          bool bad = false;
#pragma unroll
          for (int e = 0; e < E; ++e) {
            if (!q::is_finite(v[e])) {
              v[e] = 0.0f;
              bad = true;
            }
          }
          if (bad) vbad[j] = 1;
        }
      }
      store_unit<MMA, E>(tile + j * lay.sk + d0, v, u, lay.dp - d0);
    }
  }
}

template <int MMA>
__device__ __forceinline__ void load_payload(const DecodeSegment& s, bool is_k, int bh, int j0, int n, const Layout& lay,
                             typename Op<MMA>::Elem* tile, int* vbad, int c_lo, int c_hi) {
  switch (is_k ? s.k_fmt : s.v_fmt) {
    case kFmtF16: load_rows<MMA, kFmtF16>(s, is_k, bh, j0, n, lay, tile, vbad, c_lo, c_hi); break;
    case kFmtBF16: load_rows<MMA, kFmtBF16>(s, is_k, bh, j0, n, lay, tile, vbad, c_lo, c_hi); break;
    case kFmtI8: load_rows<MMA, kFmtI8>(s, is_k, bh, j0, n, lay, tile, vbad, c_lo, c_hi); break;
    case kFmtI4: load_rows<MMA, kFmtI4>(s, is_k, bh, j0, n, lay, tile, vbad, c_lo, c_hi); break;
    case kFmtI2: load_rows<MMA, kFmtI2>(s, is_k, bh, j0, n, lay, tile, vbad, c_lo, c_hi); break;
    case kFmtFP8: load_rows<MMA, kFmtFP8>(s, is_k, bh, j0, n, lay, tile, vbad, c_lo, c_hi); break;
    case kFmtNVFP4: load_rows<MMA, kFmtNVFP4>(s, is_k, bh, j0, n, lay, tile, vbad, c_lo, c_hi); break;
    default: load_rows<MMA, kFmtF32>(s, is_k, bh, j0, n, lay, tile, vbad, c_lo, c_hi); break;
  }
}

// ---- the split block -------------------------------------------------------------------------------------------
template <int MMA, int DMAX>
struct Split {
  using O = Op<MMA>;
  using Elem = typename O::Elem;
  static constexpr bool kTF32 = MMA == kMmaTF32x3;
  static constexpr int kK = O::kK;
  // Output columns per block: all of D up to 128; above, a block owns one 128-column part of the output (the
  // launch doubles the blocks), so its accumulators stay 64 floats per thread: a split block of D = 256 would
  // otherwise hold 128 accumulator registers next to the operands and spill.
  static constexpr int kCols = DMAX > kDecodeColPart ? kDecodeColPart : DMAX;
  static constexpr int kNT = kCols / 8;               // n8 output tiles over the block's columns
  static constexpr int kKD = DMAX / kK;               // k steps over D
  static constexpr int kST = kMaxTiles * kK / 8;      // n8 score tiles per warp and chunk (at R = 4)
  // A warp's keys of a chunk (R*K: up to 64 for fp16/bf16) go through QK^T, softmax and P.V in sub-steps of at most
  // 32 keys, so only 4 n8 score tiles (16 floats) are live next to the output accumulators.
  static constexpr int kSubST = kST < 4 ? kST : 4;
  static constexpr bool kQReg = !kTF32 && DMAX <= 128;
  // QK^T's k steps unrolled in full only when q lives in registers (qf[kk] needs constant indices); otherwise by 4,
  // so the scheduler does not hoist every key fragment's shared loads of a wide head dim ahead of the MMAs.
  static constexpr int kKUnroll = kQReg ? kKD : 4;

  // Query element (tile row r, channel d) of row tile `tile`, 0 outside. Unscaled: a fp16/bf16 query is exact in
  // the operand format, and the softmax scale is applied to the fp32 score instead (one rounding fewer).
  static __device__ __forceinline__ float qval(const DecodeParams& p, int b, int hk, int G, int q_len, int rows_total,
                                               int tile, int r, int d) {
    const int rg = tile * kRowTile + r;
    if (rg >= rows_total || d >= p.head_dim) return 0.0f;
    const int g = rg / p.max_q_len, i = rg % p.max_q_len;
    if (i >= q_len) return 0.0f;
    return p.q[((int64_t(b) * p.num_heads + hk * G + g) * p.max_q_len + i) * p.head_dim + d];
  }

  static __device__ void run(const DecodeParams& p, const DecodeLaunch& L, char* smem, int bh, int rgrp, int split,
                             int cpart) {
    const int D = p.head_dim;
    const int col0 = cpart * kCols;  // the block's output columns col0 .. col0 + kCols - 1
    const int R = L.tiles_per_block;
    const Layout lay = layout(MMA, D, R);
    const int dp = lay.dp, sk = lay.sk, chunk = lay.chunk;
    Elem* Ks = reinterpret_cast<Elem*>(smem);
    Elem* Vs = reinterpret_cast<Elem*>(smem + lay.v_off);
    Elem* Qs = reinterpret_cast<Elem*>(smem + lay.q_off);
    float* key_c = reinterpret_cast<float*>(smem + lay.meta_off);      // softmax: log c_j; hstu: c_j
    int64_t* key_pos = reinterpret_cast<int64_t*>(key_c + chunk);
    int64_t* key_ts = key_pos + chunk;
    int* vbad = reinterpret_cast<int*>(key_ts + chunk);                // [2][chunk]

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int mt = warp % R, kg = warp / R;
    const int tile = rgrp * R + mt;
    const int b = bh / p.num_kv_heads, hk = bh % p.num_kv_heads;
    const int G = p.num_heads / p.num_kv_heads;
    const int q_len = p.q_lengths[b];
    const int rows_total = G * p.max_q_len;
    const bool warp_rows = tile < L.num_tiles && tile * kRowTile < rows_total;  // warp-uniform

    // Which segment and key span this block streams. Lengths are clamped to the segment's capacity: the glue
    // cannot check device-resident lengths without a sync, and no value of them may make a block read past a payload.
    int seg = 0;
    while (seg < 2 && split >= p.seg_first_block[seg + 1]) ++seg;
    const DecodeSegment& S = p.seg[seg];
    const int raw_len = S.length ? S.length[b * S.length_stride_b + hk * S.length_stride_h] : q_len;
    const int seg_len = max(0, min(raw_len, S.capacity));
    const int span_start = (split - p.seg_first_block[seg]) * p.span;
    const int span_end = min(seg_len, span_start + p.span);

    // This thread's two rows of its warp's tile (fragment rows g and g + 8).
    bool rok[2];
    int ri[2], rhq[2];
    int64_t rpos[2], rts[2];
    float rinv[2];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int rg = tile * kRowTile + g + 8 * rr;
      const int gi = rg / p.max_q_len, i = rg % p.max_q_len;
      rok[rr] = warp_rows && rg < rows_total && i < q_len;
      ri[rr] = i;
      rhq[rr] = hk * G + gi;
      const int64_t qrow = int64_t(b) * p.max_q_len + i;
      rpos[rr] = rok[rr] && p.pos_bias ? p.q_pos[qrow] : 0;
      rts[rr] = rok[rr] && p.time_bias ? p.q_ts[qrow] : 0;
      rinv[rr] = rok[rr] && p.hstu ? p.inv_n[int64_t(bh) * p.max_q_len + i] : 0.0f;
    }
    const int first_target = q_len - p.num_targets[b];

    // Queries: A fragments in registers (fp16/bf16, D <= 128) or the block's tiles in shared memory.
    uint32_t qf[kQReg ? kKD : 1][4];
    if constexpr (kQReg) {
#pragma unroll
      for (int kk = 0; kk < kKD; ++kk) {
#pragma unroll
        for (int x = 0; x < 4; ++x) {
          const int r = g + 8 * (x & 1), d = kk * 16 + 2 * t + 8 * (x >> 1);
          qf[kk][x] = warp_rows ? O::pack(qval(p, b, hk, G, q_len, rows_total, tile, r, d),
                                          qval(p, b, hk, G, q_len, rows_total, tile, r, d + 1))
                                : 0u;
        }
      }
    } else {
      for (int idx = threadIdx.x; idx < R * kRowTile * dp; idx += kThreads) {
        const int r = idx / dp, d = idx % dp;
        Qs[r * sk + d] = O::cvt(qval(p, b, hk, G, q_len, rows_total, rgrp * R + r / kRowTile, r % kRowTile, d));
      }
    }
    for (int idx = threadIdx.x; idx < 2 * chunk; idx += kThreads) vbad[idx] = 0;

    float acc[kNT][4];
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
      for (int x = 0; x < 4; ++x) acc[nt][x] = 0.0f;
    float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.0f, 0.0f};
    int bad[2] = {0, 0};
    const int key0 = kg * R * kK;  // this warp's first key within a chunk

    int parity = 0;
    for (int j0 = span_start; j0 < span_end; j0 += chunk, parity ^= 1) {
      const int n = min(chunk, span_end - j0);
      int* vb = vbad + parity * chunk;
      __syncthreads();  // the previous chunk's tiles are consumed (and Qs / vbad written on the first pass)
      // K then V through one inlined copy of the dequantizer per format (a loop, not two calls: an ABI call would
      // save every live accumulator register around it -- ptxas counts those as spills).
#pragma unroll 1
      for (int pass = 0; pass < 2; ++pass) load_payload<MMA>(S, pass == 0, bh, j0, n, lay, pass ? Vs : Ks, vb, pass ? col0 : 0,
                                                                   pass ? col0 + kCols : dp);
      for (int jc = threadIdx.x; jc < chunk; jc += kThreads) {
        vbad[(parity ^ 1) * chunk + jc] = 0;  // the next chunk's flags (last read before the barrier above)
        if (jc < n) {
          const int j = j0 + jc;
          const float c = S.count ? S.count[int64_t(bh) * S.capacity + j] : 1.0f;
          key_c[jc] = p.hstu ? c : logf(c);  // log 0 = -inf (weight 0), log of < 0 / NaN = NaN (poison)
          if (p.pos_bias) key_pos[jc] = S.pos64 ? S.pos64[S.pos_row(b, hk) + j] : S.pos32[S.pos_row(b, hk) + j];
          if (p.time_bias) key_ts[jc] = S.ts[S.pos_row(b, hk) + j];
        }
      }
      __syncthreads();
      if (!warp_rows || key0 >= n) continue;  // warp-uniform: no rows in this tile, or no keys left for this warp

#pragma unroll 1
      for (int sub0 = key0; sub0 < key0 + R * kK && sub0 < n; sub0 += kSubST * 8) {
        // 1. S = Q K^T over the sub-step's keys sub0 .. sub0 + 8*nst - 1 (n8 tiles st).
        const int nst = min(kSubST, (key0 + R * kK - sub0) / 8);
        float s[kSubST][4];
#pragma unroll
        for (int st = 0; st < kSubST; ++st)
#pragma unroll
          for (int x = 0; x < 4; ++x) s[st][x] = 0.0f;
#pragma unroll kKUnroll
        for (int kk = 0; kk < kKD; ++kk) {
          if (kk * kK >= dp) break;
          if constexpr (kTF32) {
            // Keys and queries may hold inf: the correction products use hi parts with inf zeroed (ac, bc), so
            // lo * inf = 0 * inf never turns an infinite score into NaN.
            uint32_t ah[4], al[4], ac[4];
#pragma unroll
            for (int x = 0; x < 4; ++x) {
              split_tf32(Qs[(mt * kRowTile + g + 8 * (x & 1)) * sk + kk * 8 + t + 4 * (x >> 1)], ah[x], al[x]);
              ac[x] = finite_or_zero(ah[x]);
            }
#pragma unroll
            for (int st = 0; st < kSubST; ++st) {
              if (st >= nst || sub0 + st * 8 >= n) break;
              const Elem* kr = Ks + (sub0 + st * 8 + g) * sk + kk * 8 + t;
              uint32_t bh0, bl0, bh1, bl1;
              split_tf32(kr[0], bh0, bl0);
              split_tf32(kr[4], bh1, bl1);
              mma::m16n8k8_tf32(s[st], al, finite_or_zero(bh0), finite_or_zero(bh1));
              mma::m16n8k8_tf32(s[st], ac, bl0, bl1);
              mma::m16n8k8_tf32(s[st], ah, bh0, bh1);
            }
          } else {
            uint32_t a[4];
            if constexpr (kQReg) {
#pragma unroll
              for (int x = 0; x < 4; ++x) a[x] = qf[kk][x];
            } else {
#pragma unroll
              for (int x = 0; x < 4; ++x)
                a[x] = *reinterpret_cast<const uint32_t*>(
                    Qs + (mt * kRowTile + g + 8 * (x & 1)) * sk + kk * 16 + 2 * t + 8 * (x >> 1));
            }
#pragma unroll
            for (int st = 0; st < kSubST; ++st) {
              if (st >= nst || sub0 + st * 8 >= n) break;
              const Elem* kr = Ks + (sub0 + st * 8 + g) * sk + kk * 16 + 2 * t;
              mma16<MMA>(s[st], a, *reinterpret_cast<const uint32_t*>(kr), *reinterpret_cast<const uint32_t*>(kr + 8));
            }
          }
        }

        // 2. Masks, bias, counts, the non-finite rule; online softmax (or HSTU weights) per row.
        float cmax[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int st = 0; st < kSubST; ++st) {
          if (st >= nst) break;
#pragma unroll
          for (int x = 0; x < 4; ++x) {
            const int rr = x >> 1;
            const int jc = sub0 + st * 8 + 2 * t + (x & 1);
            const int j = j0 + jc;
            bool vis = rok[rr] && jc < n;
            if (vis && S.is_request) {
              // Request keys: causal top-left aligned; targets never see other targets (core/masks.py).
              const int i = ri[rr];
              if (p.is_causal && j > i) vis = false;
              if (j >= first_target && i >= first_target && j != i) vis = false;
            }
            float z = s[st][x] * p.scale;
            if (vis) {
              if (p.pos_bias)
                z += p.pos_bias[int64_t(rhq[rr]) * p.num_pos + dk::pos_index(rpos[rr], key_pos[jc], p.num_pos)];
              if (p.time_bias)
                z += p.time_bias[int64_t(rhq[rr]) * p.num_time +
                                 dk::time_bucket(rts[rr], key_ts[jc], p.time_th, p.num_time)];
              if (vb[jc]) bad[rr] = 1;
            }
            if (p.hstu) {
              if (vis && !(z < INFINITY)) bad[rr] = 1;
              s[st][x] = (vis && z > -INFINITY && z < INFINITY) ? key_c[jc] * rinv[rr] * dk::silu(z) : 0.0f;
            } else {
              const float logit = z + key_c[jc];
              if (vis && !(logit < INFINITY)) bad[rr] = 1;
              s[st][x] = (vis && logit < INFINITY) ? logit : -INFINITY;
              cmax[rr] = fmaxf(cmax[rr], s[st][x]);
            }
          }
        }
        if (!p.hstu) {
          float m_use[2];
#pragma unroll
          for (int rr = 0; rr < 2; ++rr) {
            float cm = cmax[rr];
            cm = fmaxf(cm, __shfl_xor_sync(0xffffffffu, cm, 1));
            cm = fmaxf(cm, __shfl_xor_sync(0xffffffffu, cm, 2));
            const float m_new = fmaxf(m_run[rr], cm);
            // rows that have seen nothing keep m = -inf; exponentiate against 0 there (no -inf - -inf = NaN)
            m_use[rr] = m_new == -INFINITY ? 0.0f : m_new;
            const float alpha = __expf(m_run[rr] - m_use[rr]);
            m_run[rr] = m_new;
            l_run[rr] *= alpha;
#pragma unroll
            for (int nt = 0; nt < kNT; ++nt) {
              acc[nt][2 * rr] *= alpha;
              acc[nt][2 * rr + 1] *= alpha;
            }
          }
#pragma unroll
          for (int st = 0; st < kSubST; ++st) {
            if (st >= nst) break;
#pragma unroll
            for (int x = 0; x < 4; ++x) {
              const float w = __expf(s[st][x] - m_use[x >> 1]);
              l_run[x >> 1] += w;  // this thread's share; summed over the quad at the end
              s[st][x] = w;
            }
          }
        }

        // 3. O += P V: P is the score accumulator, key step ks covering keys sub0 + ks*K ...
#pragma unroll
        for (int ks = 0; ks < kSubST * 8 / kK; ++ks) {
          if (ks * kK >= nst * 8 || sub0 + ks * kK >= n) break;
          const int kb = sub0 + ks * kK;
          if constexpr (kTF32) {
            uint32_t ah[4], al[4];
            split_tf32(s[ks][0], ah[0], al[0]);  // (row g, key 2t)      -> k index t
            split_tf32(s[ks][2], ah[1], al[1]);  // (row g+8, key 2t)
            split_tf32(s[ks][1], ah[2], al[2]);  // (row g, key 2t+1)    -> k index t + 4
            split_tf32(s[ks][3], ah[3], al[3]);
            const Elem* v0 = Vs + (kb + 2 * t) * sk + col0 + g;
#pragma unroll
            for (int nt = 0; nt < kNT; ++nt) {
              if (col0 + nt * 8 >= dp) break;
              uint32_t bh0, bl0, bh1, bl1;
              split_tf32(v0[nt * 8], bh0, bl0);
              split_tf32(v0[sk + nt * 8], bh1, bl1);
              mma_tf32x3(acc[nt], ah, al, bh0, bh1, bl0, bl1);
            }
          } else {
            const uint32_t a[4] = {O::pack(s[2 * ks][0], s[2 * ks][1]), O::pack(s[2 * ks][2], s[2 * ks][3]),
                                   O::pack(s[2 * ks + 1][0], s[2 * ks + 1][1]),
                                   O::pack(s[2 * ks + 1][2], s[2 * ks + 1][3])};
            const Elem* v0 = Vs + (kb + 2 * t) * sk + col0 + g;
#pragma unroll
            for (int nt = 0; nt < kNT; ++nt) {
              if (col0 + nt * 8 >= dp) break;
              const Elem* c = v0 + nt * 8;
              const uint32_t b0 = uint32_t(c[0]) | (uint32_t(c[sk]) << 16);
              const uint32_t b1 = uint32_t(c[8 * sk]) | (uint32_t(c[9 * sk]) << 16);
              mma16<MMA>(acc[nt], a, b0, b1);
            }
          }
        }
      }
    }

    // Quad reductions (the four lanes of a fragment row), then the merge of the warps that share a row tile.
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      l_run[rr] += __shfl_xor_sync(0xffffffffu, l_run[rr], 1);
      l_run[rr] += __shfl_xor_sync(0xffffffffu, l_run[rr], 2);
      bad[rr] |= __shfl_xor_sync(0xffffffffu, bad[rr], 1);
      bad[rr] |= __shfl_xor_sync(0xffffffffu, bad[rr], 2);
    }
    __syncthreads();  // the tiles' last reads are done: their memory holds the merge below
    float* macc = reinterpret_cast<float*>(smem);       // [warp][16][dp]
    float* mstate = macc + kWarps * kRowTile * dp;       // [3][warp][16]: m, l, bad
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
      if (col0 + nt * 8 >= dp) break;
#pragma unroll
      for (int x = 0; x < 4; ++x)
        macc[(warp * kRowTile + g + 8 * (x >> 1)) * dp + col0 + nt * 8 + 2 * t + (x & 1)] = acc[nt][x];
    }
    if (t == 0) {
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        const int r = warp * kRowTile + g + 8 * rr;
        mstate[r] = m_run[rr];
        mstate[kWarps * kRowTile + r] = l_run[rr];
        mstate[2 * kWarps * kRowTile + r] = float(bad[rr]);
      }
    }
    __syncthreads();
    const int groups = kWarps / R;
    const int64_t part0 = int64_t(bh) * L.num_tiles;
    const int ncols = min(kCols, D - col0);
    for (int idx = threadIdx.x; idx < R * kRowTile * (ncols + 1); idx += kThreads) {
      const int mtile = idx / (kRowTile * (ncols + 1)), rest = idx % (kRowTile * (ncols + 1));
      const int r = rest / (ncols + 1), dl = rest % (ncols + 1);  // dl == ncols: the row's (m, l), by part 0
      const int d = dl == ncols ? D : col0 + dl;
      const int tl = rgrp * R + mtile;
      if (tl >= L.num_tiles || (d == D && cpart != 0)) continue;
      float M = -INFINITY;
      bool row_bad = false;
      for (int k = 0; k < groups; ++k) {
        const int w = mtile + k * R;
        M = fmaxf(M, mstate[w * kRowTile + r]);
        row_bad = row_bad || mstate[2 * kWarps * kRowTile + w * kRowTile + r] != 0.0f;
      }
      float sum = 0.0f;
      for (int k = 0; k < groups; ++k) {
        const int w = mtile + k * R;
        const float wt = p.hstu ? 1.0f : (M == -INFINITY ? 0.0f : __expf(mstate[w * kRowTile + r] - M));
        sum += wt * (d == D ? mstate[kWarps * kRowTile + w * kRowTile + r] : macc[(w * kRowTile + r) * dp + d]);
      }
      if (row_bad) sum = NAN;
      const int64_t part = (part0 + tl) * L.num_splits + split;
      if (d < D) {
        p.part_acc[(part * kRowTile + r) * D + d] = sum;
      } else {
        p.part_m[part * kRowTile + r] = M;
        p.part_l[part * kRowTile + r] = sum;
      }
    }
  }
};

// Register budget per variant (ptxas: at most 65,536 / (128 threads x minBlocks) registers per thread). Every
// variant fits 255 without spilling (192-238 registers with nvcc 13.0: two blocks, 8 warps, per SM; the chunk's
// dequantizing pass and the sub-steps keep that); a budget of 168 (3 blocks) still spills for fp16 at D <= 64
// (16 bytes), so no variant asks for more than one block's worth here. Raise a variant's minBlocks only with
// tools/cuda_report.py showing zero spills for it on sm_80 and sm_90.
template <int MMA, int DMAX>
struct DecodeMinBlocks {
  static constexpr int value = 1;
};

// Grid-stride over the linear block index (bh, row group, column part, split), split fastest: the grid is one x axis (up to
// 2^31 - 1 blocks), so B * Hkv is not bound by the 65,535 limit of grid y/z.
template <int MMA, int DMAX>
__global__ void __launch_bounds__(kThreads, DecodeMinBlocks<MMA, DMAX>::value) decode_split(DecodeParams p, DecodeLaunch l) {
  extern __shared__ float smem[];
  for (int64_t blk = blockIdx.x; blk < l.split_blocks; blk += gridDim.x) {
    __syncthreads();  // the previous block's last reads of shared memory are done
    const int split = static_cast<int>(blk % l.num_splits);
    const int cpart = static_cast<int>((blk / l.num_splits) % l.col_parts);
    const int64_t rest = blk / l.num_splits / l.col_parts;
    Split<MMA, DMAX>::run(p, l, reinterpret_cast<char*>(smem), static_cast<int>(rest / l.row_groups),
                          static_cast<int>(rest % l.row_groups), split, cpart);
  }
}

// One block per (b, hk, row): merges the splits of that row (LSE merge for softmax, sum for HSTU), normalises and
// writes out [B, Hq, Lq, D] (fp32) and lse [B, Hq, Lq]. A split whose partial is poisoned (l NaN) or a non-finite
// element of the merged row makes the whole row NaN (lse NaN).
__global__ void __launch_bounds__(kThreads) combine_partials(DecodeParams p, DecodeLaunch l) {
  __shared__ float merged[2];
  __shared__ int row_bad;
  const int G = p.num_heads / p.num_kv_heads;
  const int rows_total = G * p.max_q_len;
  const int D = p.head_dim;
  const int num_splits = l.num_splits, num_tiles = l.num_tiles;
  for (int64_t row = blockIdx.x; row < l.combine_rows; row += gridDim.x) {
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
      // Lane-strided partial merges, then a shuffle tree of dk::merge; poisoned partials flagged alongside.
      dk::SoftmaxState st{-INFINITY, 0.0f};
      int poisoned = 0;
      float wa, wb;
      for (int s = threadIdx.x; s < num_splits; s += 32) {
        const float ls = pl[s * kRowTile];
        if (ls != ls) poisoned = 1;
        else st = dk::merge(st, {pm[s * kRowTile], ls}, &wa, &wb);
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        const dk::SoftmaxState other{__shfl_xor_sync(0xffffffffu, st.m, o), __shfl_xor_sync(0xffffffffu, st.l, o)};
        st = dk::merge(st, other, &wa, &wb);
        poisoned |= __shfl_xor_sync(0xffffffffu, poisoned, o);
      }
      if (threadIdx.x == 0) {
        merged[0] = st.m;
        merged[1] = st.l;
        row_bad = poisoned;
      }
    }
    __syncthreads();
    const float M = merged[0], L = merged[1];
    const bool row_ok = i < p.q_lengths[b];
    bool mine_bad = false;
    for (int d = threadIdx.x; d < D; d += kThreads) {
      float o = 0.0f;
      for (int s = 0; s < num_splits; ++s) {
        const float a = p.part_acc[((base + s) * kRowTile + r) * D + d];
        const float ms = pm[s * kRowTile];
        o += p.hstu ? a : (L > 0.0f && ms > -INFINITY ? a * __expf(ms - M) : 0.0f);
      }
      if (!p.hstu) o = L > 0.0f ? o / L : 0.0f;
      o = row_ok ? o : 0.0f;
      if (!q::is_finite(o)) mine_bad = true;
      p.out[out_row * D + d] = o;
    }
    if (mine_bad) row_bad = 1;  // every writer stores 1: no ordering needed
    __syncthreads();
    if (row_bad && row_ok) {
      for (int d = threadIdx.x; d < D; d += kThreads) p.out[out_row * D + d] = NAN;
    }
    if (threadIdx.x == 0 && p.lse)
      p.lse[out_row] = (p.hstu || !row_ok) ? -INFINITY : row_bad ? NAN : dk::lse({M, L});
  }
}

template <int MMA, int DMAX>
cudaError_t launch_split(const DecodeParams& p, const DecodeLaunch& l, cudaStream_t stream) {
  const size_t smem = decode_smem_bytes(p.head_dim, MMA, l.tiles_per_block);
  auto* kernel = decode_split<MMA, DMAX>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  kernel<<<dim3(l.split_grid_x), kThreads, smem, stream>>>(p, l);
  return cudaGetLastError();
}

template <int MMA>
cudaError_t launch_split_d(const DecodeParams& p, const DecodeLaunch& l, cudaStream_t stream) {
  if (p.head_dim <= 64) return launch_split<MMA, 64>(p, l, stream);
  if (p.head_dim <= 128) return launch_split<MMA, 128>(p, l, stream);
  return launch_split<MMA, kDecodeMaxHeadDim>(p, l, stream);
}

}  // namespace

size_t decode_smem_bytes(int head_dim, int mma, int tiles_per_block) {
  return layout(mma, head_dim, tiles_per_block).total;
}

DecodeLaunch decode_launch_config(const DecodeParams& p) {
  DecodeLaunch l;
  // Empty batches first: the row and tile counts below divide by num_kv_heads.
  if (p.batch <= 0 || p.num_kv_heads <= 0 || p.num_heads <= 0 || p.max_q_len <= 0) return l;
  l.num_splits = p.seg_first_block[3];
  l.num_tiles = static_cast<int>((int64_t(p.num_heads / p.num_kv_heads) * p.max_q_len + kRowTile - 1) / kRowTile);
  l.tiles_per_block = l.num_tiles >= 3 ? kMaxTiles : l.num_tiles;
  l.row_groups = (l.num_tiles + l.tiles_per_block - 1) / l.tiles_per_block;
  l.col_parts = (p.head_dim + kDecodeColPart - 1) / kDecodeColPart > 1 ? 2 : 1;  // launch_split_d: DMAX 256 above 128
  l.split_blocks = int64_t(l.num_splits) * l.col_parts * l.row_groups * p.batch * p.num_kv_heads;
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
    cudaError_t err = p.mma == kMmaF16    ? launch_split_d<kMmaF16>(p, l, stream)
                      : p.mma == kMmaBF16 ? launch_split_d<kMmaBF16>(p, l, stream)
                                          : launch_split_d<kMmaTF32x3>(p, l, stream);
    if (err != cudaSuccess) return err;
  }
  combine_partials<<<dim3(l.combine_grid_x), kThreads, 0, stream>>>(p, l);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace malloc_kernels
