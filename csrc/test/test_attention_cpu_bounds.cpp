// Framework-free bounds test of the fused CPU attention (attention_cpu.h): adversarial shapes over exactly-sized heap
// buffers, so a build with -fsanitize=address,undefined (.ci/run) catches any read or write past a tensor, and the
// non-finite rule (NaN / +inf visible score or non-finite result -> whole row NaN; empty rows zero).
//
// Every case (float32 / fp16 / bf16 / int8 / fp8 / int4 / int2 caches, per-token and per-channel groups, the general
// and the register-tiled path) runs the portable variant and every other ISA variant this CPU runs (isa.h); all must
// agree.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "malloc_kernels/attention_cpu.h"
#include "malloc_kernels/quant.h"

#include "expect.h"

namespace mc = malloc_kernels::cpu;


struct Case {
  int B = 2, Hq = 4, Hkv = 2, D = 17, Lq = 3, C = 37;
  mc::Fmt fmt = mc::Fmt::F32;
  bool channel = false;
  int G = 0;
  mc::Kind kind = mc::Kind::Softmax;
  bool bias = false;
  bool nan_key = false;
};

static uint16_t f16_bits(float x) {  // exact for the (signed) powers of two used here
  int e;
  const float m = std::frexp(std::fabs(x), &e);  // |x| = m * 2^e, m in [0.5, 1)
  const uint16_t sign = x < 0 ? 0x8000 : 0;
  return uint16_t(sign | ((e - 1 + 15) << 10) | (uint16_t((m * 2.f - 1.f) * 1024.f) & 0x3FF));
}

static int row_bytes(mc::Fmt f, int D) {
  switch (f) {
    case mc::Fmt::F32: return 4 * D;
    case mc::Fmt::F16: case mc::Fmt::BF16: return 2 * D;
    case mc::Fmt::INT4: return (D + 1) / 2;
    case mc::Fmt::INT2: return (D + 3) / 4;
    default: return D;
  }
}

// Runs one case with the given ISA variant; returns the output [B, Hq, Lq, D].
static std::vector<float> run(const Case& c, malloc_kernels::isa::Isa variant) {
  std::mt19937 rng(7);
  std::normal_distribution<float> nd;
  std::uniform_int_distribution<int> byte(0, 255);
  const int B = c.B, Hq = c.Hq, Hkv = c.Hkv, D = c.D, Lq = c.Lq, C = c.C;
  std::vector<float> q(size_t(B) * Hq * Lq * D), k(size_t(B) * Hkv * Lq * D), v(k.size()), out(q.size());
  for (auto& x : q) x = nd(rng);
  for (auto& x : k) x = nd(rng);
  for (auto& x : v) x = nd(rng);
  const int rb = row_bytes(c.fmt, D);
  std::vector<uint8_t> ck(size_t(B) * Hkv * C * rb), cv(ck.size());
  if (c.fmt == mc::Fmt::F32) {
    float* fk = reinterpret_cast<float*>(ck.data());
    float* fv = reinterpret_cast<float*>(cv.data());
    for (size_t i = 0; i < ck.size() / 4; ++i) { fk[i] = nd(rng); fv[i] = nd(rng); }
    if (c.nan_key) fk[0] = NAN;  // user 0, kv head 0, entry 0
  } else if (c.fmt == mc::Fmt::F16 || c.fmt == mc::Fmt::BF16) {
    uint16_t* hk = reinterpret_cast<uint16_t*>(ck.data());
    uint16_t* hv = reinterpret_cast<uint16_t*>(cv.data());
    auto half = [&](float x) {
      if (c.fmt == mc::Fmt::F16) return malloc_kernels::quant::f32_to_f16_bits(x);
      uint32_t u; std::memcpy(&u, &x, 4); return uint16_t(u >> 16);  // bf16: the top half (truncation)
    };
    for (size_t i = 0; i < ck.size() / 2; ++i) { hk[i] = half(nd(rng)); hv[i] = half(nd(rng)); }
  } else {
    for (auto& x : ck) x = uint8_t(byte(rng));
    for (auto& x : cv) x = uint8_t(byte(rng));
    if (c.fmt == mc::Fmt::INT4 && D % 2) for (int r = 0; r < B * Hkv * C; ++r) ck[size_t(r) * rb + rb - 1] &= 0x0F;
    if (c.fmt == mc::Fmt::FP8) {  // 0x7F / 0xFF are e4m3fn NaN: a valid cache never holds them
      for (auto& x : ck) if ((x & 0x7F) == 0x7F) x = uint8_t(x - 1);
      for (auto& x : cv) if ((x & 0x7F) == 0x7F) x = uint8_t(x - 1);
    }
  }
  const int kgroups = c.channel ? (C + c.G - 1) / c.G : C, kcols = c.channel ? D : (c.G ? D / c.G : 0);
  const int vcols = c.G ? D / c.G : 0;
  std::vector<uint16_t> ks(size_t(B) * Hkv * kgroups * kcols, f16_bits(0.0625f)), kz(ks.size(), f16_bits(-0.5f));
  std::vector<uint16_t> vs(size_t(B) * Hkv * C * vcols, f16_bits(0.125f)), vz(vs.size(), f16_bits(-1.f));
  std::vector<int32_t> len = {37, 0, 5, 36}, pos(size_t(B) * Hkv * C), orig = {100, 7};
  std::vector<int64_t> ts(pos.size()), qpos(size_t(B) * Lq), qts(qpos.size()), qlen(B, Lq), klen(B, Lq);
  for (size_t i = 0; i < pos.size(); ++i) { pos[i] = int32_t(i % 50) - 3; ts[i] = (i % 2) ? INT64_MIN : INT64_MAX; }
  for (size_t i = 0; i < qpos.size(); ++i) { qpos[i] = 60 + int64_t(i); qts[i] = (i % 3) ? INT64_MAX : INT64_MIN; }
  const int P = 16, T = 40;
  std::vector<float> pb(size_t(Hq) * P), tb(size_t(Hq) * T);
  for (auto& x : pb) x = nd(rng) * 0.1f;
  for (auto& x : tb) x = nd(rng) * 0.1f;
  std::vector<int64_t> th(T);
  for (int i = 1; i < T; ++i) {  // thresholds as the reference computes them (exact in double)
    int64_t x = int64_t(std::exp(0.301 * i));
    if (x < 1) x = 1;
    while (x > 1 && std::floor(std::log(double(x - 1)) / 0.301) >= i) --x;
    while (std::floor(std::log(double(x)) / 0.301) < i) ++x;
    th[i] = x;
  }
  std::vector<float> lse(size_t(B) * Hq * Lq);

  mc::AttnParams p;
  p.B = B; p.Hq = Hq; p.Hkv = Hkv; p.D = D; p.kind = c.kind; p.scale = 1.f / std::sqrt(float(D)); p.causal = true;
  auto dense = [&](const void* ptr, int H, int L) {
    mc::Strided s; s.p = ptr; s.sB = int64_t(H) * L * D; s.sH = int64_t(L) * D; s.sL = D; return s;
  };
  p.q = dense(q.data(), Hq, Lq); p.k = dense(k.data(), Hkv, Lq); p.v = dense(v.data(), Hkv, Lq);
  p.out = dense(out.data(), Hq, Lq);
  p.q_len = qlen.data(); p.k_len = klen.data();
  p.has_cache = true;
  mc::Segment& s = p.cache;
  s.k = ck.data(); s.v = cv.data(); s.k_fmt = c.fmt; s.v_fmt = c.fmt; s.k_channel = c.channel; s.group_size = c.G;
  s.capacity = C; s.length = len.data(); s.position = pos.data(); s.timestamp = ts.data();
  if (c.fmt != mc::Fmt::F32 && c.fmt != mc::Fmt::F16 && c.fmt != mc::Fmt::BF16) {
    s.k_scale = ks.data(); s.v_scale = vs.data();
    if (c.fmt != mc::Fmt::FP8) { s.k_zero = kz.data(); s.v_zero = vz.data(); }
  }
  p.original_length = orig.data();
  if (c.bias) {
    p.pos_bias = pb.data(); p.pos_bias_sH = P; p.P = P;
    p.time_bias = tb.data(); p.time_bias_sH = T; p.T = T; p.time_thresholds = th.data();
    mc::Strided tq; tq.sB = Lq; tq.sL = 1;
    p.q_pos = tq; p.q_pos.p = qpos.data(); p.k_pos = tq; p.k_pos.p = qpos.data();
    p.q_ts = tq; p.q_ts.p = qts.data(); p.k_ts = tq; p.k_ts.p = qts.data();
  }
  if (c.kind == mc::Kind::Softmax) {
    p.lse = lse.data();
    p.lse_view.sB = int64_t(Hq) * Lq; p.lse_view.sH = Lq; p.lse_view.sL = 1;
  }
  p.num_threads = 1;
  mc::attention_forward(p, variant);
  return out;
}

static void check(const char* name, const Case& c) {
  const std::vector<float> a = run(c, malloc_kernels::isa::Isa::Portable);
  const int rows = c.B * c.Hq * c.Lq;
  for (int r = 0; r < rows; ++r) {
    int nan = 0, fin = 0;
    for (int d = 0; d < c.D; ++d) { nan += std::isnan(a[size_t(r) * c.D + d]); fin += std::isfinite(a[size_t(r) * c.D + d]); }
    EXPECT(nan == 0 || nan == c.D, "%s: row %d is partly NaN", name, r);
    EXPECT(nan + fin == c.D, "%s: row %d has an infinite element", name, r);
    // with a NaN cache key (user 0, kv head 0) exactly the rows of that kv head's query heads are NaN
    const int b = r / (c.Hq * c.Lq), hq = (r / c.Lq) % c.Hq;
    const bool poisoned = c.nan_key && b == 0 && hq / (c.Hq / c.Hkv) == 0;
    EXPECT((nan == c.D) == poisoned, "%s: row %d NaN=%d, expected %d", name, r, nan == c.D, int(poisoned));
  }
  for (malloc_kernels::isa::Isa v :
       {malloc_kernels::isa::Isa::Avx2, malloc_kernels::isa::Isa::Avx512, malloc_kernels::isa::Isa::Neon}) {
    if (!malloc_kernels::isa::cpu_supports(v)) continue;
    const std::vector<float> b = run(c, v);
    for (size_t i = 0; i < a.size(); ++i) {
      const bool same = (std::isnan(a[i]) && std::isnan(b[i])) || std::fabs(a[i] - b[i]) <= 1e-4f * (1.f + std::fabs(a[i]));
      EXPECT(same, "%s: portable %g vs %s %g at %zu", name, a[i], malloc_kernels::isa::name(v), b[i], i);
      if (!same) break;
    }
  }
}

int main() {
  // Lq = 3: 6 rows per (user, kv head), the general path; Lq = 9: 18 rows, the register-tiled path (row_tiles.h)
  for (int Lq : {3, 9}) {
    for (int D : {17, 64}) {
      for (mc::Kind kind : {mc::Kind::Softmax, mc::Kind::Hstu}) {
        for (bool bias : {false, true}) {
          Case c; c.D = D; c.kind = kind; c.bias = bias; c.Lq = Lq;
          check("float", c);
          c.nan_key = true;
          check("float nan key", c);
          c.nan_key = false;
          c.fmt = mc::Fmt::F16; check("fp16", c);
          c.fmt = mc::Fmt::BF16; check("bf16", c);
          c.fmt = mc::Fmt::INT8; c.G = D == 64 ? 64 : 17; check("int8 token", c);
          c.fmt = mc::Fmt::FP8; check("fp8 token", c);
          c.fmt = mc::Fmt::INT4; c.channel = true; c.G = D == 64 ? 16 : 1; check("int4 channel", c);
          c.fmt = mc::Fmt::INT2; c.G = D == 64 ? 32 : 17; check("int2 channel", c);
        }
      }
    }
  }
  if (expect_failures) {
    std::fprintf(stderr, "%d failures\n", expect_failures);
    return 1;
  }
  std::printf("attention_cpu_bounds: all cases passed, portable compared with:");
  for (const auto& name : malloc_kernels::isa::supported_names())
    if (name != "portable") std::printf(" %s", name.c_str());
  std::printf("\n");
  return 0;
}
