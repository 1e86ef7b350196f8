// Per-thread scratch of the fused CPU attention (one per OpenMP thread, sized once per call).
#pragma once

#include <cstdint>
#include <vector>

#include "malloc_kernels/attention_cpu/scalar.h"

namespace malloc_kernels {
namespace cpu {
namespace MK_IMPL_NS {

constexpr int kMaxCodeD = 128;  // largest head dim of the code-layout path (from_codes_avx2.h)

struct Scratch {
  std::vector<float> Q, Qs, O, S, Kt, Vt, m, l, zb, cs, cz, nrm;
  std::vector<float> lse, inw, vs, vz, pw;
  // decode-from-codes path (code layout, D <= kMaxCodeD): queries, value accumulators, zero-point sums, weights.
  std::vector<float> qperm, qp, Op, Zv, pwr, qsum, ksf, kzf, Sd, dvs, dvz, dV;
  // register-tiled path (row_tiles.h): rows in lanes, Rpad = Rcap rounded up to 16
  std::vector<float> Qt, Ot, St, mv, lv;
  std::vector<uint8_t> badv;
  std::vector<int64_t> qi, qh, qpos, qts;
  std::vector<uint8_t> bad;  // per row: a NaN / +inf score was seen (the non-finite rule, scalar.h)
  float cexp[8];  // 2^-code_exp(t) of the format being decoded
  void init(int Dp, int Rcap) {
    // code layout: head dims up to kMaxCodeD
    qperm.assign(size_t(Rcap) * kMaxCodeD, 0.f); qp.assign(size_t(Rcap) * kMaxCodeD, 0.f);
    Op.assign(size_t(Rcap) * kMaxCodeD, 0.f);
    Zv.assign(size_t(Rcap) * 8, 0.f); pwr.assign(size_t(Rcap) * (DKB * 8 + 16), 0.f); qsum.assign(Rcap, 0.f);
    ksf.assign(DKB + 8, 0.f); kzf.assign(DKB + 8, 0.f); Sd.assign(size_t(Rcap) * DKB, 0.f);
    dvs.assign(DKB * 8 + 8, 0.f); dvz.assign(DKB * 8 + 8, 0.f); dV.assign(KB * kMaxCodeD, 0.f);
    Q.assign(size_t(Rcap) * Dp, 0.f); Qs.assign(size_t(Rcap) * Dp, 0.f); O.assign(size_t(Rcap) * Dp, 0.f);
    S.assign(size_t(Rcap) * KB, 0.f); Kt.assign(size_t(KB) * Dp, 0.f); Vt.assign(size_t(KB) * Dp, 0.f);
    m.assign(Rcap, 0.f); l.assign(Rcap, 0.f); zb.assign(Rcap, 0.f); nrm.assign(Rcap, 0.f);
    lse.assign(Rcap, 0.f); inw.assign(Rcap, 0.f);
    cs.assign(Dp, 0.f); cz.assign(Dp, 0.f);
    vs.assign(size_t(KB) * Dp, 0.f); vz.assign(size_t(KB) * Dp, 0.f); pw.assign(size_t(KB) * Dp, 0.f);
    const size_t Rpad = size_t(Rcap + 15) / 16 * 16;
    Qt.assign(Rpad * Dp, 0.f); Ot.assign(Rpad * Dp, 0.f); St.assign(Rpad * KB, 0.f);
    mv.assign(Rpad, 0.f); lv.assign(Rpad, 0.f); badv.assign(Rpad, 0);
    qi.assign(Rcap, 0); qh.assign(Rcap, 0); qpos.assign(Rcap, 0); qts.assign(Rcap, 0); bad.assign(Rcap, 0);
  }
};

}  // namespace MK_IMPL_NS
}  // namespace cpu
}  // namespace malloc_kernels
