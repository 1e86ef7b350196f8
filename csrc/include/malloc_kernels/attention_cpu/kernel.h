// The fused CPU attention kernel (attention_cpu.h): one work item = (user, kv head, block of queries), three key
// segments (cache, residual, request) in blocks of KB keys through the tile primitives of the build's ISA
// (tiles_avx2.h / tiles_portable.h), the cache segment straight from the codes where CacheFromCodes serves it.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include <omp.h>

#include "malloc_kernels/attention_cpu.h"
#include "malloc_kernels/attention_cpu/scalar.h"
#include "malloc_kernels/attention_cpu/bias_rows.h"
#include "malloc_kernels/attention_cpu/scratch.h"
#include "malloc_kernels/bias.h"
#include "malloc_kernels/nvfp4.h"

namespace malloc_kernels {
namespace cpu {
namespace MK_IMPL_NS {

enum SegId { SEG_CACHE = 0, SEG_RES = 1, SEG_REQ = 2 };

inline void decode_rows_rt(Fmt f, const uint8_t* base, int64_t stride, int n, int D, int ld, float* dst, int gs,
                           const uint16_t* s16, const uint16_t* z16, int64_t sz_stride) {
  switch (f) {
    case Fmt::F32: decode_rows<Fmt::F32>(base, stride, n, D, ld, dst, gs, s16, z16, sz_stride); break;
    case Fmt::F16: decode_rows<Fmt::F16>(base, stride, n, D, ld, dst, gs, s16, z16, sz_stride); break;
    case Fmt::BF16: decode_rows<Fmt::BF16>(base, stride, n, D, ld, dst, gs, s16, z16, sz_stride); break;
    case Fmt::INT8: decode_rows<Fmt::INT8>(base, stride, n, D, ld, dst, gs, s16, z16, sz_stride); break;
    case Fmt::INT4: decode_rows<Fmt::INT4>(base, stride, n, D, ld, dst, gs, s16, z16, sz_stride); break;
    case Fmt::INT2: decode_rows<Fmt::INT2>(base, stride, n, D, ld, dst, gs, s16, z16, sz_stride); break;
    default: decode_rows<Fmt::FP8>(base, stride, n, D, ld, dst, gs, s16, z16, sz_stride); break;
  }
}

class Kernel {
 public:
  explicit Kernel(const AttnParams& p) : p_(p), from_codes_(p, (p.D + kLanes - 1) / kLanes * kLanes, &tb_) {
    D_ = p.D;
    Dp_ = (D_ + kLanes - 1) / kLanes * kLanes;
    G_ = p.Hq / p.Hkv;
    if (p.time_bias) tb_.init(p.time_thresholds, p.T);
    has_bias_ = p.pos_bias || p.time_bias;
    // opt-in approximate scores of the cache's int8/int4/int2 keys (int8_query.h); the glue allows it only for those
    int8q_ = p.query_precision == QueryPrecision::Int8 && p.has_cache &&
             (p.cache.k_fmt == Fmt::INT8 || p.cache.k_fmt == Fmt::INT4 || p.cache.k_fmt == Fmt::INT2);
  }

  const AttnParams& p_;
  int D_, Dp_, G_;
  bool has_bias_, int8q_;
  bias::TimeBucketer tb_;
  CacheFromCodes from_codes_;

  int64_t qlen(int64_t b) const { return p_.q_len[b]; }
  int64_t klen(int64_t b) const { return (p_.k.p && p_.k_len) ? p_.k_len[b] : 0; }
  int64_t ntargets(int64_t b) const {
    if (!p_.num_targets) return 0;
    return std::min<int64_t>(p_.num_targets[b], klen(b));
  }

  // Request-key visibility (ARCHITECTURE.md, "Attention semantics"; core/masks.py): causal is top-left aligned (j <=
  // i); a target query (one of the last num_targets tokens; Lq == Lk whenever targets exist) never sees another target.
  bool visible(int64_t i, int64_t j, int64_t Lk, int64_t nt) const {
    if (p_.causal && j > i) return false;
    if (nt > 0 && j >= Lk - nt && i >= Lk - nt && j != i) return false;
    return true;
  }

  int64_t seg_len(int seg, int64_t b, int64_t h) const {
    if (seg == SEG_CACHE) return p_.has_cache ? p_.cache.length[b * p_.Hkv + h] : 0;
    if (seg == SEG_RES) return p_.has_residual ? p_.residual.length[b * p_.Hkv + h] : 0;
    return klen(b);
  }

  // Scores of the keys [j0, j0+n) of a segment for the R rows of this chunk, into sc.S (row stride KB), including
  // log-count (softmax), bias and masks. Also leaves the counts of the block in `cnt` (hstu).
  void scores(Scratch& sc, int seg, int64_t b, int64_t h, int R, int64_t j0, int n, float* cnt) const {
    const Segment& sg = seg == SEG_CACHE ? p_.cache : p_.residual;
    const int64_t bh = b * p_.Hkv + h;
    const float* Qeff = sc.Q.data();
    const float* add = nullptr;
    const float* K = nullptr;
    int64_t ldk = 0;
    bool fused = false;
    if (seg == SEG_REQ) {
      const char* base = static_cast<const char*>(p_.k.p);
      const size_t eb = p_.kv_dtype == DType::F32 ? 4 : 2;
      const char* row0 = base + eb * p_.k.offset(b, h, j0);
      if (p_.kv_dtype == DType::F32 && Dp_ == D_) {
        K = reinterpret_cast<const float*>(row0); ldk = p_.k.sL;
      } else {
        decode_rows_rt(float_fmt(p_.kv_dtype), reinterpret_cast<const uint8_t*>(row0), int64_t(eb) * p_.k.sL, n, D_,
                       Dp_, sc.Kt.data(), 0, nullptr, nullptr, 0);
        K = sc.Kt.data(); ldk = Dp_;
      }
    } else {
      const int64_t rb = row_bytes(sg.k_fmt, D_);
      const uint8_t* row0 = static_cast<const uint8_t*>(sg.k) + (bh * sg.capacity + j0) * rb;
      const bool quant = sg.k_fmt == Fmt::INT8 || sg.k_fmt == Fmt::INT4 || sg.k_fmt == Fmt::INT2 ||
                         sg.k_fmt == Fmt::FP8;
      if (int8q_ && seg == SEG_CACHE) {
        // the opt-in approximate scores of the cache's int8/int4/int2 keys (int8_query.h)
        int8_query_block_scores(p_, sc.Q.data(), Dp_, R, bh, j0, n, row0, rb, sc.S.data(), KB);
        fused = true;
      } else if (sg.k_fmt == Fmt::NVFP4) {
        nvfp4::decode_rows(row0, rb, n, D_, Dp_, sc.Kt.data(), sg.k_scale8 + (bh * sg.capacity + j0) * nvfp4::groups(D_),
                           nvfp4::groups(D_));
        K = sc.Kt.data(); ldk = Dp_;
      } else if (!quant && sg.k_fmt == Fmt::F32 && Dp_ == D_) {
        K = reinterpret_cast<const float*>(row0); ldk = D_;
      } else if (!quant) {
        decode_rows_rt(sg.k_fmt, row0, rb, n, D_, Dp_, sc.Kt.data(), 0, nullptr, nullptr, 0);
        K = sc.Kt.data(); ldk = Dp_;
      } else if (sg.k_channel) {
        // Per-channel scales of this token group folded into the query (block never straddles a group).
        const int64_t g = j0 / sg.group_size;
        const int64_t ng = (sg.capacity + sg.group_size - 1) / sg.group_size;
        const uint16_t* s16 = sg.k_scale + (bh * ng + g) * D_;
        const uint16_t* z16 = sg.k_zero ? sg.k_zero + (bh * ng + g) * D_ : nullptr;
        halves_to_floats(s16, D_, sc.cs.data());
        if (z16) halves_to_floats(z16, D_, sc.cz.data());
        else std::fill(sc.cz.begin(), sc.cz.begin() + D_, 0.f);
        for (int r = 0; r < R; ++r) {
          const float* q = sc.Q.data() + int64_t(r) * Dp_;
          float* qs = sc.Qs.data() + int64_t(r) * Dp_;
          sc.zb[r] = fold_channel_scale(q, sc.cs.data(), sc.cz.data(), D_, qs);
          for (int d = D_; d < Dp_; ++d) qs[d] = 0.f;
        }
        Qeff = sc.Qs.data();
        add = sc.zb.data();
        // Decode-sized: dot products straight from the codes (no float tile) where the build has them.
        fused = R <= 2 && Dp_ == D_ && qk_from_codes(sg.k_fmt, Qeff, Dp_, R, row0, rb, n, D_, sc.S.data(), KB, add);
        if (!fused) {
          decode_rows_rt(sg.k_fmt, row0, rb, n, D_, Dp_, sc.Kt.data(), 0, nullptr, nullptr, 0);
          K = sc.Kt.data(); ldk = Dp_;
        }
      } else {
        const int64_t ngr = D_ / sg.group_size;
        const uint16_t* s16 = sg.k_scale + (bh * sg.capacity + j0) * ngr;
        const uint16_t* z16 = sg.k_zero ? sg.k_zero + (bh * sg.capacity + j0) * ngr : nullptr;
        decode_rows_rt(sg.k_fmt, row0, rb, n, D_, Dp_, sc.Kt.data(), sg.group_size, s16, z16, ngr);
        K = sc.Kt.data(); ldk = Dp_;
      }
    }
    float* S = sc.S.data();
    if (!fused) qk_dots(Qeff, Dp_, R, K, ldk, n, Dp_, S, KB, add);

    // counts
    const float* c = nullptr;
    if (seg != SEG_REQ && sg.count) c = sg.count + bh * sg.capacity + j0;
    for (int j = 0; j < n; ++j) cnt[j] = c ? c[j] : 1.f;
    if (p_.kind == Kind::Softmax && c) {
      for (int j = 0; j < n; ++j) {
        // log c as the reference: log 0 = -inf (weight 0); a negative or NaN count gives NaN (non-finite rule)
        const float lc = std::log(c[j]);
        for (int r = 0; r < R; ++r) S[r * KB + j] += lc;
      }
    }
    // relative bias from ORIGINAL positions / timestamps
    if (has_bias_) {
      int64_t kp[KB], kt[KB];
      for (int j = 0; j < n; ++j) {
        if (seg == SEG_REQ) {
          kp[j] = p_.k_pos.p ? static_cast<const int64_t*>(p_.k_pos.p)[p_.k_pos.offset(b, 0, j0 + j)] : 0;
          kt[j] = p_.k_ts.p ? static_cast<const int64_t*>(p_.k_ts.p)[p_.k_ts.offset(b, 0, j0 + j)] : 0;
        } else {
          kp[j] = sg.position[bh * sg.capacity + j0 + j];
          kt[j] = sg.timestamp ? sg.timestamp[bh * sg.capacity + j0 + j] : 0;
        }
      }
      add_bias_rows(p_, tb_, sc, R, kp, kt, n, S, KB);
    }
    // masks (request segment only; cache/residual entries precede every request token)
    if (seg == SEG_REQ) {
      const int64_t Lk = klen(b), nt = ntargets(b);
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < n; ++j)
          if (!visible(sc.qi[r], j0 + j, Lk, nt)) S[r * KB + j] = NEG_INF;
    }
  }

  void block_len(int seg, int64_t b, int64_t h, int64_t j0, int64_t len, int* n) const {
    int64_t e = std::min<int64_t>(len, j0 + KB);
    if (seg == SEG_CACHE && p_.cache.k_channel) {
      const int64_t gs = p_.cache.group_size;
      e = std::min<int64_t>(e, (j0 / gs + 1) * gs);
    }
    *n = int(e - j0);
  }

  // Decode-sized rows over a quantized cache block: O += P V straight from the value codes (pv_codes). Returns
  // false (nothing done) when the shape or format needs the tile path.
  bool values_fused(Scratch& sc, int seg, int64_t b, int64_t h, int64_t j0, int n, int R) const {
    const Segment& sg = p_.cache;
    if (seg != SEG_CACHE || R > 2 || Dp_ != D_ || !is_quant(sg.v_fmt) || !pv_codes_ok(D_, sg.group_size)) return false;
    const int64_t bh = b * p_.Hkv + h;
    const int64_t rb = row_bytes(sg.v_fmt, D_);
    const int ngr = D_ / sg.group_size;
    const uint8_t* row0 = static_cast<const uint8_t*>(sg.v) + (bh * sg.capacity + j0) * rb;
    float* sf = sc.vs.data();
    float* zf = sg.v_zero ? sc.vz.data() : nullptr;
    halves_to_floats(sg.v_scale + (bh * sg.capacity + j0) * ngr, n * ngr, sf);
    if (zf) halves_to_floats(sg.v_zero + (bh * sg.capacity + j0) * ngr, n * ngr, zf);
    pv_from_codes(sg.v_fmt, D_, sc.S.data(), KB, R, n, row0, rb, sg.group_size, sf, zf, sc.O.data(), Dp_,
                  sc.pw.data());
    return true;
  }

  // n rows of token-axis int8 / int4 / int2 codes (float16 scale / zero per group of gs, ngr = D / gs per row) into
  // dst[n][Dp] through tile_codes_avx512.h where it serves this format and head dim (same values as decode_rows);
  // false: nothing done. Uses sc.vs / sc.vz for the block's scales.
  bool token_tile(Scratch& sc, Fmt f, const uint8_t* row0, int64_t rb, int n, int gs, const uint16_t* s16,
                  const uint16_t* z16, float* dst) const {
#ifdef MK_ISA_AVX512
    if (D_ != Dp_ || !tile_codes_ok(f, D_, gs)) return false;
    const int ngr = D_ / gs;
    halves_to_floats(s16, n * ngr, sc.vs.data());
    if (z16) halves_to_floats(z16, n * ngr, sc.vz.data());
    tile_codes_token_rt(f, D_, row0, rb, n, dst, gs, sc.vs.data(), z16 ? sc.vz.data() : nullptr);
    return true;
#else
    (void)sc; (void)f; (void)row0; (void)rb; (void)n; (void)gs; (void)s16; (void)z16; (void)dst;
    return false;
#endif
  }

  void values(Scratch& sc, int seg, int64_t b, int64_t h, int64_t j0, int n, const float** V, int64_t* ldv) const {
    const int64_t bh = b * p_.Hkv + h;
    if (seg == SEG_REQ) {
      const char* base = static_cast<const char*>(p_.v.p);
      const size_t eb = p_.kv_dtype == DType::F32 ? 4 : 2;
      const char* row0 = base + eb * p_.v.offset(b, h, j0);
      if (p_.kv_dtype == DType::F32 && Dp_ == D_) { *V = reinterpret_cast<const float*>(row0); *ldv = p_.v.sL; return; }
      decode_rows_rt(float_fmt(p_.kv_dtype), reinterpret_cast<const uint8_t*>(row0), int64_t(eb) * p_.v.sL, n, D_, Dp_,
                     sc.Vt.data(), 0, nullptr, nullptr, 0);
      *V = sc.Vt.data(); *ldv = Dp_;
      return;
    }
    const Segment& sg = seg == SEG_CACHE ? p_.cache : p_.residual;
    const int64_t rb = row_bytes(sg.v_fmt, D_);
    const uint8_t* row0 = static_cast<const uint8_t*>(sg.v) + (bh * sg.capacity + j0) * rb;
    if (sg.v_fmt == Fmt::F32 && Dp_ == D_) { *V = reinterpret_cast<const float*>(row0); *ldv = D_; return; }
    if (sg.v_fmt == Fmt::NVFP4) {
      nvfp4::decode_rows(row0, rb, n, D_, Dp_, sc.Vt.data(), sg.v_scale8 + (bh * sg.capacity + j0) * nvfp4::groups(D_),
                         nvfp4::groups(D_));
      *V = sc.Vt.data(); *ldv = Dp_;
      return;
    }
    const bool quant = sg.v_fmt == Fmt::INT8 || sg.v_fmt == Fmt::INT4 || sg.v_fmt == Fmt::INT2 || sg.v_fmt == Fmt::FP8;
    if (quant) {
      const int64_t ngr = D_ / sg.group_size;
      const uint16_t* s16 = sg.v_scale + (bh * sg.capacity + j0) * ngr;
      const uint16_t* z16 = sg.v_zero ? sg.v_zero + (bh * sg.capacity + j0) * ngr : nullptr;
      if (token_tile(sc, sg.v_fmt, row0, rb, n, sg.group_size, s16, z16, sc.Vt.data())) {
        *V = sc.Vt.data(); *ldv = Dp_;
        return;
      }
      decode_rows_rt(sg.v_fmt, row0, rb, n, D_, Dp_, sc.Vt.data(), sg.group_size,
                     sg.v_scale + (bh * sg.capacity + j0) * ngr,
                     sg.v_zero ? sg.v_zero + (bh * sg.capacity + j0) * ngr : nullptr, ngr);
    } else {
      decode_rows_rt(sg.v_fmt, row0, rb, n, D_, Dp_, sc.Vt.data(), 0, nullptr, nullptr, 0);
    }
    *V = sc.Vt.data(); *ldv = Dp_;
  }

  // Non-finite rule for request values (scalar.h): only a VISIBLE entry's value may poison a row (a causally masked
  // token's NaN must not reach earlier rows through its 0 weight; stored entries are visible to every row). Request
  // blocks are short, so each is scanned; one holding a non-finite value is copied with those elements zeroed and
  // the rows that see it are flagged (finish_row makes them NaN).
  void guard_request_values(Scratch& sc, int64_t b, int64_t j0, int n, int R, const float** V, int64_t* ldv) const {
    const float* src = *V;
    const int64_t ld = *ldv;
    bool any = false;
    for (int j = 0; j < n && !any; ++j)
      for (int d = 0; d < D_; ++d) any |= !std::isfinite(src[j * ld + d]);
    if (!any) return;
    float* dst = sc.Vt.data();  // may be src itself (a decoded tile, ld == Dp_): row by row in place is fine
    const int64_t Lk = klen(b), nt = ntargets(b);
    for (int j = 0; j < n; ++j) {
      bool bad = false;
      for (int d = 0; d < Dp_; ++d) {
        float x = d < D_ ? src[j * ld + d] : 0.f;
        if (!std::isfinite(x)) { bad = true; x = 0.f; }
        dst[int64_t(j) * Dp_ + d] = x;
      }
      if (bad)
        for (int r = 0; r < R; ++r) sc.bad[r] |= visible(sc.qi[r], j0 + j, Lk, nt);
    }
    *V = dst; *ldv = Dp_;
  }

  // o[0..D) *= nrm, then the non-finite rule (scalar.h): a flagged row or one with a non-finite result becomes all
  // NaN. Returns whether it did. Once per row, outside every key loop.
  bool finish_row(float* o, float nrm, bool bad) const {
    for (int d = 0; d < D_; ++d) {
      o[d] *= nrm;
      bad |= !std::isfinite(o[d]);
    }
    if (bad) std::fill(o, o + D_, std::numeric_limits<float>::quiet_NaN());
    return bad;
  }

  // The cache segment of a softmax chunk decoded straight from the codes in code layout (see Codes64): int8/int4/int2
  // keys and values of the same format, D == 64, channel-axis keys (any token group) or token-axis keys with one
  // group per row, token-axis value groups the layout can address, no counts, no bias. Must run first in a chunk
  // (it starts from m = -inf, l = 0, O = 0, which is the state before the cache segment).

#if defined(MK_ISA_AVX2) || defined(MK_ISA_NEON)
  // The K tile of keys [j0, j0 + n) of a stored segment as fp32 rows: a pointer into the cache for fp32 rows of
  // the padded width, else decoded into sc.Kt with every scale and zero point applied (per-channel keys: x = code *
  // s_d + z_d of the key's token group, the block never straddling a group).
  void key_tile(Scratch& sc, const Segment& sg, int64_t bh, int64_t j0, int n, const float** K, int64_t* ldk) const {
    const int64_t rb = row_bytes(sg.k_fmt, D_);
    const uint8_t* row0 = static_cast<const uint8_t*>(sg.k) + (bh * sg.capacity + j0) * rb;
    float* kt = sc.Kt.data();
    *K = kt; *ldk = Dp_;
    if (sg.k_fmt == Fmt::NVFP4) {
      nvfp4::decode_rows(row0, rb, n, D_, Dp_, kt, sg.k_scale8 + (bh * sg.capacity + j0) * nvfp4::groups(D_),
                         nvfp4::groups(D_));
    } else if (!is_quant(sg.k_fmt)) {
      if (sg.k_fmt == Fmt::F32 && Dp_ == D_) { *K = reinterpret_cast<const float*>(row0); *ldk = D_; return; }
      decode_rows_rt(sg.k_fmt, row0, rb, n, D_, Dp_, kt, 0, nullptr, nullptr, 0);
    } else if (sg.k_channel) {
      const int64_t ng = (sg.capacity + sg.group_size - 1) / sg.group_size;
      const int64_t g = j0 / sg.group_size;
      float* cs = sc.cs.data();
      float* cz = sc.cz.data();
      halves_to_floats(sg.k_scale + (bh * ng + g) * D_, D_, cs);
      if (sg.k_zero) halves_to_floats(sg.k_zero + (bh * ng + g) * D_, D_, cz);
      else std::fill(cz, cz + D_, 0.f);
      std::fill(cs + D_, cs + Dp_, 0.f);
      std::fill(cz + D_, cz + Dp_, 0.f);
#ifdef MK_ISA_AVX512
      if (D_ == Dp_ && tile_codes_ok(sg.k_fmt, D_, 0)) {
        tile_codes_channel_rt(sg.k_fmt, D_, row0, rb, n, kt, cs, cz);
        return;
      }
#endif
      switch (sg.k_fmt) {
        case Fmt::INT8: decode_rows_channel<Fmt::INT8>(row0, rb, n, D_, Dp_, kt, cs, cz); break;
        case Fmt::INT4: decode_rows_channel<Fmt::INT4>(row0, rb, n, D_, Dp_, kt, cs, cz); break;
        case Fmt::INT2: decode_rows_channel<Fmt::INT2>(row0, rb, n, D_, Dp_, kt, cs, cz); break;
        default: decode_rows_channel<Fmt::FP8>(row0, rb, n, D_, Dp_, kt, cs, cz); break;
      }
    } else {
      const int64_t ngr = D_ / sg.group_size;
      const uint16_t* s16 = sg.k_scale + (bh * sg.capacity + j0) * ngr;
      const uint16_t* z16 = sg.k_zero ? sg.k_zero + (bh * sg.capacity + j0) * ngr : nullptr;
      if (!token_tile(sc, sg.k_fmt, row0, rb, n, sg.group_size, s16, z16, kt))
        decode_rows_rt(sg.k_fmt, row0, rb, n, D_, Dp_, kt, sg.group_size, s16, z16, ngr);
    }
  }

  // The K and V rows [j0, j0 + n) of a stored segment towards L1 while the block before them is computed (the
  // tile decode of each block otherwise starts by waiting on its codes).
  void prefetch_rows(const Segment& sg, int64_t bh, int64_t j0, int64_t n) const {
    if (n <= 0) return;
    for (int kv = 0; kv < 2; ++kv) {
      const int64_t rb = row_bytes(kv ? sg.v_fmt : sg.k_fmt, D_);
      const char* p = static_cast<const char*>(kv ? sg.v : sg.k) + (bh * sg.capacity + j0) * rb;
      // __builtin_prefetch: prefetcht0 on x86, PRFM PLDL1KEEP on aarch64 (this path also builds for NEON)
      for (int64_t o = 0; o < n * rb; o += 64) __builtin_prefetch(p + o, 0, 3);
    }
  }

  // The stored segments (cache, then residual) of a chunk of at least kTileRows rows through the register-tiled
  // micro-kernels (row_tiles.h); leaves m, l, O and the non-finite flags in the row layout of the general path,
  // which then runs the request segment. Returns false (nothing done) for fewer rows.
  bool run_tiled(Scratch& sc, int64_t b, int64_t h, int R) const {
    if (R < kTileRows) return false;
#ifdef MK_ISA_AVX512
    if (R > VecY::W) { tiled_dims<VecZ>(sc, b, h, R); return true; }
#endif
    tiled_dims<RowVec>(sc, b, h, R);
    return true;
  }

  // The common padded head dims get the compile-time tile stride (RowTiles::qk_block), any other the run-time one.
  template <class V>
  void tiled_dims(Scratch& sc, int64_t b, int64_t h, int R) const {
    switch (Dp_) {
      case 32: tiled<V, 32>(sc, b, h, R); break;
      case 64: tiled<V, 64>(sc, b, h, R); break;
      case 128: tiled<V, 128>(sc, b, h, R); break;
      default: tiled<V, 0>(sc, b, h, R); break;
    }
  }

  template <class V, int DP>
  void tiled(Scratch& sc, int64_t b, int64_t h, int R) const {
    using RT = RowTiles<V>;
    const int Rp = (R + V::W - 1) / V::W * V::W;
    float* Qt = sc.Qt.data();
    float* Ot = sc.Ot.data();
    float* St = sc.St.data();
    float* mv = sc.mv.data();
    float* lv = sc.lv.data();
    uint8_t* badv = sc.badv.data();
    for (int d = 0; d < Dp_; ++d)
      for (int r = 0; r < Rp; ++r) Qt[int64_t(d) * Rp + r] = r < R ? sc.Q[int64_t(r) * Dp_ + d] : 0.f;
    std::fill(Ot, Ot + int64_t(Dp_) * Rp, 0.f);
    std::fill(mv, mv + Rp, NEG_INF);
    std::fill(lv, lv + Rp, 0.f);
    std::fill(badv, badv + Rp, uint8_t(0));
    const bool softmax = p_.kind == Kind::Softmax;
    const int64_t bh = b * p_.Hkv + h;
    for (int seg = SEG_CACHE; seg <= SEG_RES; ++seg) {
      const Segment& sg = seg == SEG_CACHE ? p_.cache : p_.residual;
      const int64_t len = seg_len(seg, b, h);
      int n;
      for (int64_t j0 = 0; j0 < len; j0 += n) {
        block_len(seg, b, h, j0, len, &n);
        prefetch_rows(sg, bh, j0 + n, std::min<int64_t>(KB, len - j0 - n));
        const float* K;
        int64_t ldk;
        key_tile(sc, sg, bh, j0, n, &K, &ldk);
        RT::template qk<DP>(K, ldk, n, Qt, Rp, Dp_, St);
        const float* c = sg.count ? sg.count + bh * sg.capacity + j0 : nullptr;
        if (softmax && c) {
          // log c as the reference: log 0 = -inf (weight 0); a negative or NaN count gives NaN (non-finite rule)
          float lc[KB];
          for (int j = 0; j < n; ++j) lc[j] = std::log(c[j]);
          RT::add_per_key(St, Rp, n, lc);
        }
        if (has_bias_) {
          int64_t kp[KB], kt[KB];
          for (int j = 0; j < n; ++j) {
            kp[j] = sg.position[bh * sg.capacity + j0 + j];
            kt[j] = sg.timestamp ? sg.timestamp[bh * sg.capacity + j0 + j] : 0;
          }
          add_bias_rows(p_, tb_, sc, R, kp, kt, n, St, 1, Rp);
        }
        if (softmax) RT::softmax(St, Rp, n, Dp_, mv, lv, Ot, badv);
        else RT::silu(St, Rp, n, c, badv);
        const float* Vv;
        int64_t ldv;
        values(sc, seg, b, h, j0, n, &Vv, &ldv);
        RT::pv(Vv, ldv, n, Dp_, St, Rp, Ot);
      }
    }
    for (int r = 0; r < R; ++r) {
      sc.m[r] = mv[r];
      sc.l[r] = lv[r];
      sc.bad[r] |= badv[r];
      float* o = sc.O.data() + int64_t(r) * Dp_;
      for (int d = 0; d < Dp_; ++d) o[d] = Ot[int64_t(d) * Rp + r];
    }
  }
#else
  bool run_tiled(Scratch&, int64_t, int64_t, int) const { return false; }
#endif

  // One chunk: kv head h of user b, queries [i0, i0 + nq), all G query heads.
  void run_chunk(Scratch& sc, int64_t b, int64_t h, int64_t i0, int nq) const {
    const int R = G_ * nq;
    const int64_t Lq = qlen(b);
    // rows: r = g * nq + t
    for (int g = 0; g < G_; ++g) {
      const int64_t hq = h * G_ + g;
      for (int t = 0; t < nq; ++t) {
        const int r = g * nq + t;
        const int64_t i = i0 + t;
        sc.qi[r] = i; sc.qh[r] = hq;
        sc.qpos[r] = p_.q_pos.p ? static_cast<const int64_t*>(p_.q_pos.p)[p_.q_pos.offset(b, 0, i)] : 0;
        sc.qts[r] = p_.q_ts.p ? static_cast<const int64_t*>(p_.q_ts.p)[p_.q_ts.offset(b, 0, i)] : 0;
        const int64_t off = p_.q.offset(b, hq, i);
        float* q = sc.Q.data() + int64_t(r) * Dp_;
        for (int d = 0; d < D_; ++d) q[d] = load_scalar(p_.q.p, p_.q_dtype, off + d) * p_.scale;
        for (int d = D_; d < Dp_; ++d) q[d] = 0.f;
        sc.m[r] = NEG_INF; sc.l[r] = 0.f; sc.bad[r] = 0;
        std::fill(sc.O.begin() + int64_t(r) * Dp_, sc.O.begin() + int64_t(r + 1) * Dp_, 0.f);
      }
    }
    const bool softmax = p_.kind == Kind::Softmax;
    float cnt[KB];
    // many rows: the stored segments through the register-tiled path, only the request segment below
    // (the int8-query mode's scores live in scores() and the from-codes path, not in the register tiles)
    const int seg0 = !int8q_ && run_tiled(sc, b, h, R) ? SEG_REQ : SEG_CACHE;
    for (int seg = seg0; seg < 3; ++seg) {
      if (seg == SEG_CACHE && from_codes_.run(sc, b, h, R)) continue;
      const int64_t len = seg_len(seg, b, h);
      int n;
      for (int64_t j0 = 0; j0 < len; j0 += n) {
        block_len(seg, b, h, j0, len, &n);
        scores(sc, seg, b, h, R, j0, n, cnt);
        float* S = sc.S.data();
        if (softmax) {
          for (int r = 0; r < R; ++r) {
            float* s = S + r * KB;
            float mx = NEG_INF;
            bool nf = false;
            for (int j = 0; j < n; ++j) {
              mx = std::max(mx, s[j]);
              nf |= !(s[j] < POS_INF);  // NaN or +inf (non-finite rule, scalar.h)
            }
            sc.bad[r] |= nf;
            const float mnew = std::max(sc.m[r], mx);
            if (mnew == NEG_INF) { for (int j = 0; j < n; ++j) s[j] = 0.f; continue; }
            for (int j = 0; j < n; ++j) s[j] -= mnew;
            exp_inplace(s, n);
            float sum = 0.f;
            for (int j = 0; j < n; ++j) sum += s[j];
            if (sc.m[r] != mnew) {
              const float alpha = sc.m[r] == NEG_INF ? 0.f : std::exp(sc.m[r] - mnew);
              float* o = sc.O.data() + int64_t(r) * Dp_;
              for (int d = 0; d < Dp_; ++d) o[d] *= alpha;
              sc.l[r] *= alpha;
              sc.m[r] = mnew;
            }
            sc.l[r] += sum;
          }
        } else {
          // SiLU weights c_j * s / (1 + e^{-s}); masked (-inf) scores give 0.
          for (int r = 0; r < R; ++r) {
            float* s = S + r * KB;
            float e[KB];
            bool nf = false;
            for (int j = 0; j < n; ++j) {
              e[j] = -s[j];
              nf |= !(s[j] < POS_INF);  // NaN or +inf (non-finite rule, scalar.h)
            }
            sc.bad[r] |= nf;
            exp_inplace(e, n);
            for (int j = 0; j < n; ++j) s[j] = s[j] == NEG_INF ? 0.f : cnt[j] * s[j] / (1.f + e[j]);
          }
        }
        if (values_fused(sc, seg, b, h, j0, n, R)) continue;
        const float* V; int64_t ldv;
        values(sc, seg, b, h, j0, n, &V, &ldv);
        if (seg == SEG_REQ) guard_request_values(sc, b, j0, n, R, &V, &ldv);
        pv_accum(S, KB, R, n, V, ldv, Dp_, sc.O.data(), Dp_);
      }
    }
    // normalisers
    const int64_t Lk = klen(b), nt = ntargets(b);
    for (int r = 0; r < R; ++r) {
      if (softmax) {
        sc.nrm[r] = sc.l[r] > 0.f ? 1.f / sc.l[r] : 0.f;
      } else {
        int64_t vis = 0;
        if (p_.hstu_norm != HstuNorm::Constant)
          for (int64_t j = 0; j < Lk; ++j) vis += visible(sc.qi[r], j, Lk, nt) ? 1 : 0;
        int64_t nn;
        if (p_.hstu_norm == HstuNorm::Constant) nn = p_.hstu_norm_const;
        else if (p_.hstu_norm == HstuNorm::Original) nn = (p_.original_length ? p_.original_length[b] : 0) + vis;
        else nn = seg_len(SEG_CACHE, b, h) + seg_len(SEG_RES, b, h) + vis;
        sc.nrm[r] = nn > 0 ? 1.f / float(nn) : 0.f;
      }
      const int64_t off = p_.out.offset(b, sc.qh[r], sc.qi[r]);
      float* o = sc.O.data() + int64_t(r) * Dp_;
      const bool nan_row = finish_row(o, sc.nrm[r], sc.bad[r]);
      for (int d = 0; d < D_; ++d) store_scalar(const_cast<void*>(p_.out.p), p_.q_dtype, off + d, o[d]);
      if (p_.lse && softmax) {
        const float v = nan_row ? std::numeric_limits<float>::quiet_NaN()
                                : sc.l[r] > 0.f ? sc.m[r] + std::log(sc.l[r]) : NEG_INF;
        p_.lse[p_.lse_view.offset(b, sc.qh[r], sc.qi[r])] = v;
      }
    }
    if (p_.stats) stats_pass(sc, b, h, R, Lq);
  }

  // Second pass (only with stats): recompute scores and accumulate each key's normalised weight.
  void stats_pass(Scratch& sc, int64_t b, int64_t h, int R, int64_t Lq) const {
    const bool softmax = p_.kind == Kind::Softmax;
    float* lse = sc.lse.data();
    float* inw = sc.inw.data();
    for (int r = 0; r < R; ++r) {
      lse[r] = sc.l[r] > 0.f ? sc.m[r] + std::log(sc.l[r]) : NEG_INF;
      inw[r] = (p_.stats_window > 0 && sc.qi[r] >= Lq - p_.stats_window) ? 1.f : 0.f;
    }
    float cnt[KB];
    const int64_t bh = b * p_.Hkv + h;
    for (int seg = 0; seg < 3; ++seg) {
      const int64_t len = seg_len(seg, b, h);
      int n;
      for (int64_t j0 = 0; j0 < len; j0 += n) {
        block_len(seg, b, h, j0, len, &n);
        scores(sc, seg, b, h, R, j0, n, cnt);
        float mass[KB] = {0.f}, wmass[KB] = {0.f};
        for (int r = 0; r < R; ++r) {
          const float* s = sc.S.data() + r * KB;
          for (int j = 0; j < n; ++j) {
            float w;
            if (softmax) w = (lse[r] == NEG_INF || s[j] == NEG_INF) ? 0.f : std::exp(s[j] - lse[r]);
            else w = s[j] == NEG_INF ? 0.f : std::fabs(cnt[j] * s[j] / (1.f + std::exp(-s[j]))) * sc.nrm[r];
            mass[j] += w;
            wmass[j] += w * inw[r];
          }
        }
        float* dm; float* dw;
        if (seg == SEG_REQ) {
          for (int j = 0; j < n; ++j) {
            static_cast<float*>(const_cast<void*>(p_.key_mass.p))[p_.key_mass.offset(b, h, j0 + j)] += mass[j];
            if (p_.key_wmass.p)
              static_cast<float*>(const_cast<void*>(p_.key_wmass.p))[p_.key_wmass.offset(b, h, j0 + j)] += wmass[j];
          }
          continue;
        }
        const Segment& sg = seg == SEG_CACHE ? p_.cache : p_.residual;
        dm = seg == SEG_CACHE ? p_.cache_mass : p_.res_mass;
        dw = seg == SEG_CACHE ? p_.cache_wmass : p_.res_wmass;
        for (int j = 0; j < n; ++j) {
          if (dm) dm[bh * sg.capacity + j0 + j] += mass[j];
          if (dw) dw[bh * sg.capacity + j0 + j] += wmass[j];
        }
      }
    }
  }

  void run() const {
    const int64_t B = p_.B, H = p_.Hkv;
    int64_t Lmax = 0;
    for (int64_t b = 0; b < B; ++b) Lmax = std::max(Lmax, qlen(b));
    const int nq = std::max(1, RMAX / G_);
    // With stats every (user, kv head) is one work item so the per-key sums need no atomics.
    const int64_t nqb = p_.stats ? 1 : (Lmax + nq - 1) / nq;
    const int64_t items = B * H * nqb;
    const int nthreads = p_.num_threads > 0 ? p_.num_threads : omp_get_max_threads();
    const int Rcap = std::max(RMAX, G_);
#pragma omp parallel num_threads(nthreads)
    {
      Scratch sc;
      sc.init(Dp_, Rcap);
#pragma omp for schedule(dynamic, 1)
      for (int64_t it = 0; it < items; ++it) {
        const int64_t b = it / (H * nqb), h = (it / nqb) % H, qb = it % nqb;
        const int64_t Lq = qlen(b);
        const int64_t ibeg = p_.stats ? 0 : qb * nq, iend = p_.stats ? Lq : std::min<int64_t>(Lq, (qb + 1) * nq);
        for (int64_t i0 = ibeg; i0 < iend; i0 += nq) run_chunk(sc, b, h, i0, int(std::min<int64_t>(nq, iend - i0)));
      }
    }
  }
};

}  // namespace MK_IMPL_NS
}  // namespace cpu
}  // namespace malloc_kernels
