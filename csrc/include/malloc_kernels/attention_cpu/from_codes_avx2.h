// The cache segment of a chunk decoded straight from the int8 / int4 / int2 codes in the code layout
// (code_layout_avx2.h) of head dims 32, 64 and 128 (one template over the lanes type), AVX2 and AVX-512 builds.
// The kernel asks CacheFromCodes::run first for every chunk; false means "not this call's shape", and the kernel takes its general path (tiles_portable.h has a CacheFromCodes that always says so).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "malloc_kernels/attention_cpu/code_layout_avx2.h"
#include "malloc_kernels/attention_cpu/lanes_avx2.h"
#include "malloc_kernels/attention_cpu/bias_rows.h"
#include "malloc_kernels/attention_cpu/row_tiles.h"
#include "malloc_kernels/attention_cpu/scratch.h"
#include "malloc_kernels/attention_cpu/tiles_avx2.h"

namespace malloc_kernels {
namespace cpu {
namespace MK_IMPL_NS {

// The per-block vector steps of the decode (the softmax over a block's scores, the value weights): the widest
// vectors of the build, 16 lanes with AVX-512 (half the instructions of 8), 8 with AVX2.
#ifdef MK_ISA_AVX512
struct BlockLanes {
  using T = __m512;
  using I = __m512i;
  static constexpr int W = 16;
  static T zero() { return _mm512_setzero_ps(); }
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, T x) { _mm512_storeu_ps(p, x); }
  static T set1(float x) { return _mm512_set1_ps(x); }
  static T max(T a, T b) { return _mm512_max_ps(a, b); }
  static T sub(T a, T b) { return _mm512_sub_ps(a, b); }
  static T add(T a, T b) { return _mm512_add_ps(a, b); }
  static T mul(T a, T b) { return _mm512_mul_ps(a, b); }
  static T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static T exp(T x) { return exp512(x); }
  // lanes that are NaN or +inf: not (s < +inf), unordered compares true (scalar.h's rule)
  static unsigned nonfinite(T s) { return _mm512_cmp_ps_mask(s, _mm512_set1_ps(POS_INF), _CMP_NLT_UQ); }
  static float hmax(T x) { return _mm512_reduce_max_ps(x); }
  static float hsum(T x) { return _mm512_reduce_add_ps(x); }
  static T halves(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static I index(const int32_t* i) { return _mm512_loadu_si512(i); }
  static T permute(T x, I i) { return _mm512_permutexvar_ps(i, x); }
  // lanes l and l + 8 added: 8 lanes
  static __m256 fold8(T x) { return _mm256_add_ps(_mm512_castps512_ps256(x), _mm512_extractf32x8_ps(x, 1)); }
};
#else
struct BlockLanes {
  using T = __m256;
  using I = __m256i;
  static constexpr int W = 8;
  static T zero() { return _mm256_setzero_ps(); }
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, T x) { _mm256_storeu_ps(p, x); }
  static T set1(float x) { return _mm256_set1_ps(x); }
  static T max(T a, T b) { return _mm256_max_ps(a, b); }
  static T sub(T a, T b) { return _mm256_sub_ps(a, b); }
  static T add(T a, T b) { return _mm256_add_ps(a, b); }
  static T mul(T a, T b) { return _mm256_mul_ps(a, b); }
  static T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static T exp(T x) { return exp256(x); }
  static unsigned nonfinite(T s) {
    return unsigned(_mm256_movemask_ps(_mm256_cmp_ps(s, _mm256_set1_ps(POS_INF), _CMP_NLT_UQ)));
  }
  static float hmax(T x) { return simd_avx2::hmax(x); }
  static float hsum(T x) { return simd_avx2::hsum(x); }
  static T halves(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static I index(const int32_t* i) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(i)); }
  static T permute(T x, I i) { return _mm256_permutevar8x32_ps(x, i); }
  static __m256 fold8(T x) { return x; }
};
#endif

class CacheFromCodes {
 public:
  // tb: the kernel's time bucketer (initialised before any run()).
  CacheFromCodes(const AttnParams& p, int Dp, const bias::TimeBucketer* tb) : p_(p), Dp_(Dp), tb_(tb) {}

  // The cache segment of a chunk (softmax or hstu) decoded straight from the codes in code layout (see Codes):
  // int8/int4/int2 keys and values of the same format, D in {32, 64, 128}, channel-axis keys (token groups dividing
  // 64, so that key blocks hold whole groups) or token-axis keys with one group per row, token-axis value groups the
  // layout can address (at least 8 channels, a number of groups per row dividing 8), no merge counts. Must run first
  // in a chunk (it starts from m = -inf, l = 0, O = 0, which is the state before the cache segment).
  bool ok() const {
    const Segment& sg = p_.cache;
    const int D = p_.D;
    if (!p_.has_cache || (D != 32 && D != 64 && D != 128) || sg.count) return false;
    if (sg.k_fmt != sg.v_fmt) return false;
    if (sg.k_fmt != Fmt::INT8 && sg.k_fmt != Fmt::INT4 && sg.k_fmt != Fmt::INT2) return false;
    const int gs = sg.group_size;
    if (gs < 8 || D % gs != 0 || 8 % (D / gs) != 0) return false;
    return sg.k_channel ? 64 % gs == 0 : gs == D;
  }

  // Runs the cache segment of kv head h of user b for the chunk's R rows when ok(); returns whether it did.
  bool run(Scratch& sc, int64_t b, int64_t h, int R) const {
    if (!ok()) return false;
    switch (p_.D) {
      case 32: run_d<Lanes128>(sc, b, h, R); break;
      case 64: run_d<Lanes256>(sc, b, h, R); break;
      default: run_d<LanesD128>(sc, b, h, R); break;
    }
    return true;
  }

 private:
  const AttnParams& p_;
  int Dp_;
  const bias::TimeBucketer* tb_;

  template <class W>
  void run_d(Scratch& sc, int64_t b, int64_t h, int R) const {
    switch (p_.cache.k_fmt) {
      case Fmt::INT4: decode_cache<Fmt::INT4, W>(sc, b, h, R); break;
      case Fmt::INT2: decode_cache<Fmt::INT2, W>(sc, b, h, R); break;
      default: decode_cache<Fmt::INT8, W>(sc, b, h, R); break;
    }
  }

  // Keys [j0, j0 + n) of the code-layout path: S[r][0..n) = scores (kch: per-channel scales already folded into
  // the rows' queries for each key group; token-axis keys: scale/zero applied here), rows of stride DKB.
  // pfo: byte offset of the next block's rows (prefetched by the loops, code_layout_avx2.h).
  template <Fmt F, class W>
  void decode_scores(Scratch& sc, int64_t bh, int R, int64_t j0, int n, const uint8_t* kb0, int64_t rb,
                     int64_t pfo) const {
    constexpr int L = W::L, D = 8 * L;
    if (p_.query_precision == QueryPrecision::Int8) {  // the opt-in approximate scores (int8_query.h)
      int8_query_block_scores(p_, sc.Q.data(), Dp_, R, bh, j0, n, kb0, rb, sc.Sd.data(), DKB);
      return;
    }
    const Segment& sg = p_.cache;
    const int gs = sg.group_size;
    float* S = sc.Sd.data();
    if (sg.k_channel) {
      const int64_t nkg = (sg.capacity + gs - 1) / gs;
      // j0 is a multiple of 64 and gs divides 64: sub-blocks of gs keys are whole key groups
      for (int s0 = 0; s0 < n; s0 += gs) {
        const int ns = std::min(gs, n - s0);
        const int64_t g = (j0 + s0) / gs;
        const uint16_t* s16 = sg.k_scale + (bh * nkg + g) * D;
        const uint16_t* z16 = sg.k_zero ? sg.k_zero + (bh * nkg + g) * D : nullptr;
        if (R > 1) {
          fold_channel_rows<F, W>(sc, R, s16, z16);
        } else {
          // per-channel key scale of this token group folded into the query, zero point into one offset
          const float* q = sc.Q.data();
          float* qpr = sc.qp.data();
          __m256 v[D / 8];
          __m256 za = _mm256_setzero_ps();
          for (int c = 0; c < D / 8; ++c) {
            const __m256 qv = _mm256_loadu_ps(q + 8 * c);
            v[c] = _mm256_mul_ps(qv, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s16 + 8 * c))));
            if (z16)
              za = _mm256_fmadd_ps(qv, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(z16 + 8 * c))),
                                   za);
          }
          sc.zb[0] = hsum(za);
          if constexpr (F == Fmt::INT8 || L != 8) {
            alignas(32) float nat[D];
            for (int c = 0; c < D / 8; ++c) _mm256_store_ps(nat + 8 * c, v[c]);
            for (int t = 0; t < 8; ++t)
              for (int c = 0; c < L; ++c) qpr[t * L + c] = nat[code_elem<F, L>(c, t)] * sc.cexp[t];
          } else {
            transpose8(v);  // element 8c + t -> vector t, lane c
            for (int t = 0; t < 8; ++t) _mm256_storeu_ps(qpr + 8 * t, _mm256_mul_ps(v[t], _mm256_set1_ps(sc.cexp[t])));
          }
        }
        const uint8_t* k = kb0 + s0 * rb;
        if (R == 1) {
          RowLoops<F, W>::qk(sc.qp.data(), k, rb, ns, S + s0, sc.zb[0], pfo);
        } else {
          RowsLoops<F, W>::qk(R, sc.qp.data(), sc.zb.data(), k, rb, ns, S + s0, DKB, pfo);
        }
      }
      return;
    }
    // token-axis keys, one group per row: s_j * <q, code_j> + z_j * sum(q)
    if (R == 1) {
      RowLoops<F, W>::qk(sc.qperm.data(), kb0, rb, n, S, 0.f, pfo);
    } else {
      std::fill(sc.zb.begin(), sc.zb.begin() + R, 0.f);
      RowsLoops<F, W>::qk(R, sc.qperm.data(), sc.zb.data(), kb0, rb, n, S, DKB, pfo);
    }
    float* ksf = sc.ksf.data();
    float* kzf = sc.kzf.data();
    halves_to_floats(sg.k_scale + bh * sg.capacity + j0, n, ksf);
    if (sg.k_zero) halves_to_floats(sg.k_zero + bh * sg.capacity + j0, n, kzf);
    else std::fill(kzf, kzf + n, 0.f);
    const int n8 = (n + 7) / 8 * 8;
    std::fill(ksf + n, ksf + n8, 0.f);
    std::fill(kzf + n, kzf + n8, 0.f);
    for (int r = 0; r < R; ++r) {
      float* s = S + r * DKB;
      const __m256 qs = _mm256_set1_ps(sc.qsum[r]);
      for (int j = 0; j < n8; j += 8)
        _mm256_storeu_ps(s + j, _mm256_fmadd_ps(_mm256_loadu_ps(s + j), _mm256_loadu_ps(ksf + j),
                                                _mm256_mul_ps(_mm256_loadu_ps(kzf + j), qs)));
    }
  }

  // Several rows (R > 1): the group's per-channel key scales folded into every row's query in code layout, qp_r =
  // qperm_r * s (s put in code layout once per key group, not once per row; qperm_r already holds q_r * 2^-code_exp,
  // so the products equal the one-row path's (q * s) * 2^-code_exp exactly), and the zero points into zb_r = <q_r, z>.
  template <Fmt F, class W>
  void fold_channel_rows(Scratch& sc, int R, const uint16_t* s16, const uint16_t* z16) const {
    constexpr int L = W::L, D = 8 * L;
    alignas(32) float nat[D];
    float* sperm = sc.cs.data();
    halves_to_floats(s16, D, nat);
    for (int t = 0; t < 8; ++t)
      for (int c = 0; c < L; ++c) sperm[t * L + c] = nat[code_elem<F, L>(c, t)];
    if (z16) halves_to_floats(z16, D, nat);
    for (int r = 0; r < R; ++r) {
      const float* qr = sc.qperm.data() + r * D;
      float* qpr = sc.qp.data() + r * D;
      for (int i = 0; i < D; i += 8)
        _mm256_storeu_ps(qpr + i, _mm256_mul_ps(_mm256_loadu_ps(qr + i), _mm256_loadu_ps(sperm + i)));
      __m256 za = _mm256_setzero_ps();
      if (z16) {
        const float* q = sc.Q.data() + int64_t(r) * Dp_;
        for (int c = 0; c < D / 8; ++c) za = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * c), _mm256_loadu_ps(nat + 8 * c), za);
      }
      sc.zb[r] = hsum(za);
    }
  }

  // The cache segment of a chunk straight from the codes (see Codes), blocks of bk keys (below):
  //   scores (decode_scores, + bias) -> online softmax (or SiLU weights) per row -> value weights p_j * s_jg (the value scale folded into the
  //   weight, zero points summed per group) -> O += weights x codes in code layout.
  template <Fmt F, class W>
  void decode_cache(Scratch& sc, int64_t b, int64_t h, int R) const {
    const Segment& sg = p_.cache;
    const int gs = sg.group_size, vng = 8 * W::L / gs;
    if (vng == 1) decode_cache_w<F, W, 0>(sc, b, h, R);
    else if (vng <= 4) decode_cache_w<F, W, 1>(sc, b, h, R);
    else decode_cache_w<F, W, 2>(sc, b, h, R);
  }

  template <Fmt F, class W, int WM>
  void decode_cache_w(Scratch& sc, int64_t b, int64_t h, int R) const {
    constexpr int L = W::L, D = 8 * L;
    const Segment& sg = p_.cache;
    const int64_t bh = b * p_.Hkv + h;
    const int64_t len = p_.cache.length[bh];
    const int64_t rb = row_bytes(F, D);
    const uint8_t* kbase = static_cast<const uint8_t*>(sg.k) + bh * sg.capacity * rb;
    const uint8_t* vbase = static_cast<const uint8_t*>(sg.v) + bh * sg.capacity * rb;
    const int gs = sg.group_size, vng = D / gs;
    float* Op = sc.Op.data();
    float* Zv = sc.Zv.data();
    const bool softmax = p_.kind == Kind::Softmax;
    for (int t = 0; t < 8; ++t) sc.cexp[t] = std::ldexp(1.f, -code_exp<F>(t));
    // queries in code layout, pre-scaled by 2^-code_exp (exact)
    for (int r = 0; r < R; ++r) {
      const float* q = sc.Q.data() + int64_t(r) * Dp_;
      // (channel-axis keys with several rows: fold_channel_rows scales these per key group)
      for (int t = 0; t < 8; ++t)
        for (int c = 0; c < L; ++c) sc.qperm[r * D + t * L + c] = q[code_elem<F, L>(c, t)] * sc.cexp[t];
      if (!sg.k_channel) {
        float qs = 0.f;
        for (int d = 0; d < D; ++d) qs += q[d];
        sc.qsum[r] = qs;
      }
      std::fill(Op + r * D, Op + (r + 1) * D, 0.f);
      std::fill(Zv + r * 8, Zv + (r + 1) * 8, 0.f);
    }
    // group index of each lane of the value weight vectors (vectors t with t >> 2 == H; gs >= 8 keeps it per lane)
    typename W::GI gidx[2];
    for (int H = 0; H < 2; ++H) {
      int32_t gi[L];
      for (int c = 0; c < L; ++c) gi[c] = code_elem<F, L>(c, F == Fmt::INT8 ? 4 * H : 0) / gs;
      gidx[H] = W::make_gi(gi);
    }
    // p index of lane i of the k-th vector of (key, group) pairs: pairs BW k .. BW k + BW - 1 of a chunk of BW keys
    using BL = BlockLanes;
    constexpr int BW = BL::W;
    typename BL::I pidx[8];
    for (int k = 0; k < vng; ++k) {
      int32_t pi[BW];
      for (int i = 0; i < BW; ++i) pi[i] = (BW * k + i) / vng;
      pidx[k] = BL::index(pi);
    }
    const int pwld = DKB * 8 + 8;
    float* S = sc.Sd.data();
    float* vsf = sc.dvs.data();
    float* vzf = sc.dvz.data();
    // token-axis keys (int8's per-token layout) are memory-bound with one row: short blocks keep both code streams
    // in flight; several rows on AVX-512 (code_rows_avx512.h) are compute-bound and take longer blocks (fewer
    // per-block softmax / rescale steps: measured faster there; AVX2 keeps the short blocks it was tuned with)
#ifdef MK_ISA_AVX512
    constexpr int kTokenRowsBlock = DKB / 2;
#else
    constexpr int kTokenRowsBlock = KB;
#endif
    const int bk = R == 1 ? (sg.k_channel ? DKB : KB) : sg.k_channel ? DKB / 2 : kTokenRowsBlock;
    for (int64_t j0 = 0; j0 < len; j0 += bk) {
      const int n = int(std::min<int64_t>(bk, len - j0));
      const int nW = (n + BW - 1) / BW * BW;  // <= bk: whole vectors of the block's scores
      // the next block's rows and scales are prefetched while this one is computed (prefetch_span)
      const int64_t nxt = j0 + bk < len ? j0 + bk : j0, pfo = (nxt - j0) * rb;
      const int nn = int(std::min<int64_t>(bk, len - nxt));
      if (sg.k_channel) {
        const int64_t nkg = (sg.capacity + gs - 1) / gs, g0 = nxt / gs, g1 = (nxt + nn - 1) / gs;
        prefetch_span(sg.k_scale + (bh * nkg + g0) * D, (g1 - g0 + 1) * D * 2);
        if (sg.k_zero) prefetch_span(sg.k_zero + (bh * nkg + g0) * D, (g1 - g0 + 1) * D * 2);
      } else {
        prefetch_span(sg.k_scale + bh * sg.capacity + nxt, nn * 2);
        if (sg.k_zero) prefetch_span(sg.k_zero + bh * sg.capacity + nxt, nn * 2);
      }
      prefetch_span(sg.v_scale + (bh * sg.capacity + nxt) * vng, nn * vng * 2);
      if (sg.v_zero) prefetch_span(sg.v_zero + (bh * sg.capacity + nxt) * vng, nn * vng * 2);
      decode_scores<F, W>(sc, bh, R, j0, n, kbase + j0 * rb, rb, pfo);
      if (p_.pos_bias || p_.time_bias) {
        int64_t kp[DKB], kt[DKB];
        for (int j = 0; j < n; ++j) {
          kp[j] = sg.position[bh * sg.capacity + j0 + j];
          kt[j] = sg.timestamp ? sg.timestamp[bh * sg.capacity + j0 + j] : 0;
        }
        add_bias_rows(p_, *tb_, sc, R, kp, kt, n, S, DKB);
      }
      // hstu: SiLU weights s / (1 + e^{-s}) (no counts on this path; entries past n are 0, so their weights are 0)
      for (int r = 0; r < R && !softmax; ++r) {
        float* s = S + r * DKB;
        for (int j = n; j < nW; ++j) s[j] = 0.f;
        const __m256 one = _mm256_set1_ps(1.f);
        for (int j = 0; j < nW; j += 8) {
          const __m256 x = _mm256_loadu_ps(s + j);
          _mm256_storeu_ps(s + j, _mm256_div_ps(x, _mm256_add_ps(one, exp256(_mm256_sub_ps(_mm256_setzero_ps(), x)))));
        }
      }
      // softmax: online, vectorised over the block (entries past n are -inf, so their weights are exactly 0)
      for (int r = 0; r < R && softmax; ++r) {
        float* s = S + r * DKB;
        for (int j = n; j < nW; ++j) s[j] = NEG_INF;
        typename BL::T mx = BL::load(s);
        unsigned nf = BL::nonfinite(mx);  // NaN / +inf scores (padding lanes are -inf)
        for (int j = BW; j < nW; j += BW) {
          const typename BL::T sj = BL::load(s + j);
          nf |= BL::nonfinite(sj);
          mx = BL::max(mx, sj);
        }
        sc.bad[r] |= nf != 0;
        const float mnew = std::max(sc.m[r], BL::hmax(mx));
        if (mnew == NEG_INF) { std::fill(s, s + nW, 0.f); continue; }
        const typename BL::T mv = BL::set1(mnew);
        typename BL::T sum = BL::zero();
        for (int j = 0; j < nW; j += BW) {
          const typename BL::T e = BL::exp(BL::sub(BL::load(s + j), mv));
          BL::store(s + j, e);
          sum = BL::add(sum, e);
        }
        if (sc.m[r] != mnew) {
          const float alpha = sc.m[r] == NEG_INF ? 0.f : std::exp(sc.m[r] - mnew);
          const __m256 av = _mm256_set1_ps(alpha);
          for (int d = 0; d < D; d += 8)
            _mm256_storeu_ps(Op + r * D + d, _mm256_mul_ps(av, _mm256_loadu_ps(Op + r * D + d)));
          _mm256_storeu_ps(Zv + r * 8, _mm256_mul_ps(av, _mm256_loadu_ps(Zv + r * 8)));
          sc.l[r] *= alpha;
          sc.m[r] = mnew;
        }
        sc.l[r] += BL::hsum(sum);
      }
      // values: weights p_j * s_jg (value scale folded into the weight), zero points summed per group. Whole
      // chunks of BW keys convert their fp16 scales/zeros straight from the cache; a partial last chunk goes
      // through zero-padded copies (keys past n have p = 0), so nothing past the segment is read.
      const uint16_t* vs16 = sg.v_scale + (bh * sg.capacity + j0) * vng;
      const uint16_t* vz16 = sg.v_zero ? sg.v_zero + (bh * sg.capacity + j0) * vng : nullptr;
      const int nfull = n / BW;
      if (nfull * BW < n) {
        const int p0 = nfull * BW * vng, np = n * vng, npe = nW * vng;
        halves_to_floats(vs16 + p0, np - p0, vsf);
        std::fill(vsf + np - p0, vsf + npe - p0, 0.f);
        if (vz16) halves_to_floats(vz16 + p0, np - p0, vzf);
        else std::fill(vzf, vzf + np - p0, 0.f);
        std::fill(vzf + np - p0, vzf + npe - p0, 0.f);
      }
      for (int r = 0; r < R; ++r) {
        const float* pr = S + r * DKB;
        float* pw = sc.pwr.data() + int64_t(r) * pwld;
        // lane i of every vector below belongs to value group i % vng (vng divides 8)
        typename BL::T za = BL::zero();
        for (int kc = 0; kc < nW / BW; ++kc) {
          const typename BL::T pc = BL::load(pr + BW * kc);
          const bool full = kc < nfull;
          for (int i = 0; i < vng; ++i) {
            const int k = kc * vng + i;
            const typename BL::T pk = vng == 1 ? pc : BL::permute(pc, pidx[i]);
            typename BL::T sv, zv;
            if (full) {
              sv = BL::halves(vs16 + BW * k);
              zv = vz16 ? BL::halves(vz16 + BW * k) : BL::zero();
            } else {
              sv = BL::load(vsf + BW * i);
              zv = BL::load(vzf + BW * i);
            }
            BL::store(pw + BW * k, BL::mul(pk, sv));
            za = BL::fma(pk, zv, za);
          }
        }
        _mm256_storeu_ps(Zv + r * 8, _mm256_add_ps(_mm256_loadu_ps(Zv + r * 8), BL::fold8(za)));
      }
      const uint8_t* vb0 = vbase + j0 * rb;
      if (R == 1) {
        RowLoops<F, W>::template pv<WM>(sc.pwr.data(), vng, gidx, vb0, rb, n, Op, pfo);
      } else {
        RowsLoops<F, W>::template pv<WM>(R, sc.pwr.data(), pwld, vng, gidx, vb0, rb, n, Op, sc.dV.data(), pfo);
      }
    }
    // back to natural order: O_d = 2^-code_exp * Op + (sum_j p_j z_jg) of the element's group
    for (int r = 0; r < R; ++r) {
      float* o = sc.O.data() + int64_t(r) * Dp_;
      float zg[8];
      for (int g = 0; g < vng; ++g) {
        zg[g] = 0.f;
        for (int i = g; i < 8; i += vng) zg[g] += Zv[r * 8 + i];
      }
      for (int t = 0; t < 8; ++t) {
        for (int c = 0; c < L; ++c) {
          const int e = code_elem<F, L>(c, t);
          o[e] += Op[r * D + t * L + c] * sc.cexp[t] + zg[e / gs];
        }
      }
    }
  }
};

}  // namespace MK_IMPL_NS
}  // namespace cpu
}  // namespace malloc_kernels
