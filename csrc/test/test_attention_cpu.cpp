// Standalone test of the fused CPU attention (attention_cpu.h) and the ISA selection (isa.h), no torch: built by
// CMakeLists.txt and run by ctest -- natively, and for aarch64 under qemu-user by .ci/run. Every ISA variant this CPU
// supports runs the same cases against a float64 loop over the dequantized cache:
//   float32 and per-token int8 / int4 caches (fp16 scale and zero per row), head dims 32, 64, 128 and 24, a request
//   of Lq tokens (causal), 2 kv heads under 2 or 4 query heads (one-row decode and GQA), softmax and HSTU (SiLU,
//   1/n);
// plus the dispatch: attention_forward(p, v) runs variant v's own kernel (bit-identical to calling it directly, and
// not bit-identical to the portable kernel, whose sums run in another order: a variant silently falling back to
// portable fails), and MALLOC_KERNELS_ISA parsing: unknown values and variants this CPU lacks (the other
// architecture's included) are rejected by name; and the architecture's SIMD exp (exp4 on aarch64, exp256 on x86)
// against double exp with its edge rules.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "malloc_kernels/attention_cpu.h"
#include "malloc_kernels/isa.h"
#include "malloc_kernels/quant.h"

#include "expect.h"

#if MALLOC_KERNELS_AARCH64
#include "malloc_kernels/simd_neon.h"
#elif MALLOC_KERNELS_X86
#include "malloc_kernels/simd_avx2.h"
// 8 lanes of exp256 (compiled for AVX2 + FMA; called only when the CPU has them).
__attribute__((target("avx2,fma"))) static void exp256_into(const float* x, float* y) {
  _mm256_storeu_ps(y, malloc_kernels::simd_avx2::exp256(_mm256_loadu_ps(x)));
}
#endif

namespace mk = malloc_kernels;
using mk::cpu::AttnParams;
using mk::cpu::Fmt;


struct Case {
  int B = 2, Hq = 4, Hkv = 2, D = 32, C = 45, Lq = 3;
  Fmt fmt = Fmt::F32;
  mk::cpu::Kind kind = mk::cpu::Kind::Softmax;
};

// Runs one case with variant v (through attention_forward, or `direct`: one variant's entry point); returns the max
// abs error against the float64 loop relative to max(1, max |ref|) (HSTU outputs are unnormalised sums: their
// float32 rounding grows with their size), and the output in *out_copy if given.
static double run_case(const Case& c, mk::isa::Isa v, std::mt19937& rng, std::vector<float>* out_copy = nullptr,
                       void (*direct)(const AttnParams&) = nullptr) {
  std::normal_distribution<float> nd;
  const int B = c.B, Hq = c.Hq, Hkv = c.Hkv, D = c.D, C = c.C, Lq = c.Lq, G = Hq / Hkv;
  std::vector<float> q(size_t(B) * Hq * Lq * D), k(size_t(B) * Hkv * Lq * D), v2(k.size());
  for (auto* t : {&q, &k, &v2})
    for (auto& x : *t) x = nd(rng);
  // cache: float rows, or codes + fp16 scale/zero per (token, row) -- the decoded values are what the reference sees
  const int bits = c.fmt == Fmt::INT8 ? 8 : c.fmt == Fmt::INT4 ? 4 : 0;
  const int64_t rb = c.fmt == Fmt::F32 ? int64_t(D) * 4 : int64_t(D) * bits / 8;
  std::vector<uint8_t> kc(size_t(B) * Hkv * C * rb), vc(kc.size());
  std::vector<uint16_t> ks(size_t(B) * Hkv * C), kz(ks.size()), vs(ks.size()), vz(ks.size());
  std::vector<double> kd(size_t(B) * Hkv * C * D), vd(kd.size());
  std::vector<int32_t> len(size_t(B) * Hkv), pos(size_t(B) * Hkv * C);
  for (int i = 0; i < B * Hkv; ++i) len[i] = i % 2 ? C : C - 7 * (i + 1) % C;
  for (size_t i = 0; i < pos.size(); ++i) pos[i] = int32_t(i % C);
  for (int which = 0; which < 2; ++which) {
    auto& codes = which ? vc : kc;
    auto& sc = which ? vs : ks;
    auto& zc = which ? vz : kz;
    auto& dec = which ? vd : kd;
    for (int64_t row = 0; row < int64_t(B) * Hkv * C; ++row) {
      if (bits == 0) {
        for (int d = 0; d < D; ++d) {
          const float x = nd(rng);
          std::memcpy(&codes[row * rb + 4 * d], &x, 4);
          dec[row * D + d] = x;
        }
        continue;
      }
      sc[row] = mk::quant::f32_to_f16_bits(0.05f + 0.01f * float(row % 7));
      zc[row] = mk::quant::f32_to_f16_bits(-1.5f + 0.1f * float(row % 5));
      const double s = mk::quant::f16_bits_to_f32(sc[row]), z = mk::quant::f16_bits_to_f32(zc[row]);
      for (int d = 0; d < D; ++d) {
        const int code = int(rng() % (1u << bits));
        if (bits == 8) codes[row * rb + d] = uint8_t(code);
        else codes[row * rb + d / 2] |= uint8_t(code << (4 * (d & 1)));
        dec[row * D + d] = code * s + z;
      }
    }
  }
  std::vector<float> out(q.size(), 0.f);
  std::vector<int64_t> ql(B, Lq), kl(B, Lq);
  AttnParams p;
  p.B = B; p.Hq = Hq; p.Hkv = Hkv; p.D = D; p.kind = c.kind; p.scale = 1.f / std::sqrt(float(D)); p.causal = true;
  p.q = {q.data(), int64_t(Hq) * Lq * D, int64_t(Lq) * D, D, nullptr};
  p.k = {k.data(), int64_t(Hkv) * Lq * D, int64_t(Lq) * D, D, nullptr};
  p.v = {v2.data(), int64_t(Hkv) * Lq * D, int64_t(Lq) * D, D, nullptr};
  p.out = {out.data(), int64_t(Hq) * Lq * D, int64_t(Lq) * D, D, nullptr};
  p.q_len = ql.data(); p.k_len = kl.data();
  p.has_cache = true;
  p.cache.k = kc.data(); p.cache.v = vc.data(); p.cache.k_fmt = p.cache.v_fmt = c.fmt;
  p.cache.group_size = bits ? D : 0; p.cache.capacity = C;
  if (bits) {
    p.cache.k_scale = ks.data(); p.cache.k_zero = kz.data();
    p.cache.v_scale = vs.data(); p.cache.v_zero = vz.data();
  }
  p.cache.length = len.data(); p.cache.position = pos.data();
  p.num_threads = 2;
  if (direct) direct(p);
  else mk::cpu::attention_forward(p, v);
  if (out_copy) *out_copy = out;
  // float64 loop: keys = cache[0, len) then request [0, i] (causal, top-left aligned)
  double err = 0, big = 1;
  std::vector<double> s;
  for (int b = 0; b < B; ++b)
    for (int hq = 0; hq < Hq; ++hq) {
      const int h = hq / G;
      const int n = len[b * Hkv + h];
      for (int i = 0; i < Lq; ++i) {
        const float* qi = &q[((size_t(b) * Hq + hq) * Lq + i) * D];
        s.assign(size_t(n) + i + 1, 0.0);
        for (int j = 0; j < n + i + 1; ++j) {
          double acc = 0;
          for (int d = 0; d < D; ++d) {
            const double kv = j < n ? kd[((size_t(b) * Hkv + h) * C + j) * D + d]
                                    : k[((size_t(b) * Hkv + h) * Lq + (j - n)) * D + d];
            acc += double(qi[d]) * kv;
          }
          s[j] = acc * p.scale;
        }
        std::vector<double> o(D, 0.0);
        double norm = 0, mx = -INFINITY;
        for (double x : s) mx = std::max(mx, x);
        for (int j = 0; j < n + i + 1; ++j) {
          const double w = c.kind == mk::cpu::Kind::Softmax ? std::exp(s[j] - mx) : s[j] / (1 + std::exp(-s[j]));
          norm += w;
          for (int d = 0; d < D; ++d)
            o[d] += w * (j < n ? vd[((size_t(b) * Hkv + h) * C + j) * D + d]
                               : v2[((size_t(b) * Hkv + h) * Lq + (j - n)) * D + d]);
        }
        // hstu (original norm, no original_length): 1 / (visible request keys) = 1 / (i + 1)
        const double div = c.kind == mk::cpu::Kind::Softmax ? norm : double(i + 1);
        for (int d = 0; d < D; ++d) {
          err = std::max(err, std::fabs(o[d] / div - out[((size_t(b) * Hq + hq) * Lq + i) * D + d]));
          big = std::max(big, std::fabs(o[d] / div));
        }
      }
    }
  return err / big;
}

// The SIMD exp of this architecture (exp_consts.h's rules) on a sweep: relative error against double exp at most
// 4 float ulps inside (-87.3, 88.3); exactly 0 below -87.3 and at -inf; +inf above 88.3 and at +inf.
template <class ExpN>
static void exp_check(const char* name, int lanes, ExpN expn) {
  std::vector<float> x;
  for (float v = -100.f; v <= 100.f; v += 0.0137f) x.push_back(v);
  for (float v : {0.f, -0.f, 1e-30f, -1e-30f, -87.29f, 88.29f, -87.31f, 88.31f, 1e30f, -1e30f, INFINITY, -INFINITY})
    x.push_back(v);
  while (x.size() % size_t(lanes)) x.push_back(0.f);
  std::vector<float> y(x.size());
  for (size_t i = 0; i < x.size(); i += size_t(lanes)) expn(&x[i], &y[i]);
  for (size_t i = 0; i < x.size(); ++i) {
    bool ok;
    if (x[i] < -87.3f) ok = y[i] == 0.f;
    else if (x[i] > 88.3f) ok = std::isinf(y[i]) && y[i] > 0;
    else ok = std::fabs(double(y[i]) - std::exp(double(x[i]))) <= 4 * 5.96e-8 * std::exp(double(x[i]));
    EXPECT(ok, "%s(%.9g) = %.9g, exp = %.9g", name, x[i], y[i], std::exp(double(x[i])));
  }
}

// Variant v's own entry point (nullptr for portable: the reference point of dispatch_check).
static void (*entry_point(mk::isa::Isa v))(const AttnParams&) {
  switch (v) {
#if MALLOC_KERNELS_X86
    case mk::isa::Isa::Avx2: return mk::cpu::attention_forward_avx2;
    case mk::isa::Isa::Avx512: return mk::cpu::attention_forward_avx512;
#endif
#if MALLOC_KERNELS_AARCH64
    case mk::isa::Isa::Neon: return mk::cpu::attention_forward_neon;
#endif
    default: return nullptr;
  }
}

// attention_forward(p, v) must run v's kernel: the same bits as v's entry point, other bits than portable's (on a
// decode case, Lq = 1, and an append case, Lq = 9 x 2 heads: the general and the register-tiled paths).
static void dispatch_check(mk::isa::Isa v) {
  for (int Lq : {1, 9}) {
    Case c;
    c.D = 64; c.C = 97; c.Lq = Lq; c.fmt = Fmt::INT8;
    std::vector<float> via_dispatch, via_entry, via_portable;
    std::mt19937 r1(11), r2(11), r3(11);
    run_case(c, v, r1, &via_dispatch);
    run_case(c, v, r2, &via_entry, entry_point(v));
    run_case(c, mk::isa::Isa::Portable, r3, &via_portable);
    EXPECT(std::memcmp(via_dispatch.data(), via_entry.data(), via_entry.size() * 4) == 0,
           "attention_forward(%s) Lq=%d differs from attention_forward_%s", mk::isa::name(v), Lq, mk::isa::name(v));
    EXPECT(std::memcmp(via_dispatch.data(), via_portable.data(), via_portable.size() * 4) != 0,
           "attention_forward(%s) Lq=%d is bit-identical to portable: did it fall back?", mk::isa::name(v), Lq);
  }
  EXPECT(mk::isa::isa_for_family(v, mk::isa::Family::Attention) == v, "attention family caps %s",
         mk::isa::name(v));
}

int main() {
  std::mt19937 rng(7);
  std::vector<mk::isa::Isa> variants;
  for (const auto& name : mk::isa::supported_names()) variants.push_back(mk::isa::parse(name.c_str()));
  std::printf("ISA variants run:");
  for (const auto& name : mk::isa::supported_names()) std::printf(" %s", name.c_str());
  std::printf("\n");
  int cases = 0;
  for (auto v : variants)
    for (Fmt f : {Fmt::F32, Fmt::INT8, Fmt::INT4})
      for (int D : {32, 64, 128, 24})
        for (auto kind : {mk::cpu::Kind::Softmax, mk::cpu::Kind::Hstu})
          for (int Lq : {1, 2, 9})
            for (int Hq : {2, 4}) {
            if (f == Fmt::INT4 && D % 2) continue;
            Case c;
            c.D = D; c.fmt = f; c.kind = kind; c.Lq = Lq; c.Hq = Hq;
            const double err = run_case(c, v, rng);
            ++cases;
            EXPECT(err < 1e-5, "%s fmt=%d D=%d kind=%d Lq=%d Hq=%d: max error %g", mk::isa::name(v), int(f), D,
                   int(kind), Lq, Hq, err);
          }
  for (auto v : variants)
    if (v != mk::isa::Isa::Portable) dispatch_check(v);
#if MALLOC_KERNELS_AARCH64
  exp_check("simd_neon::exp4", 4,
            [](const float* x, float* y) { vst1q_f32(y, mk::simd_neon::exp4(vld1q_f32(x))); });
#elif MALLOC_KERNELS_X86
  if (mk::isa::cpu_supports(mk::isa::Isa::Avx2))
    exp_check("simd_avx2::exp256", 8, [](const float* x, float* y) { exp256_into(x, y); });
#endif
  // MALLOC_KERNELS_ISA values
  bool threw = false;
  try { mk::isa::parse("sse9"); } catch (const std::invalid_argument& e) {
    threw = std::string(e.what()).find("MALLOC_KERNELS_ISA=sse9") != std::string::npos;
  }
  EXPECT(threw, "unknown MALLOC_KERNELS_ISA value accepted");
  EXPECT(mk::isa::parse(nullptr) == mk::isa::Isa::Auto && mk::isa::parse("auto") == mk::isa::Isa::Auto, "auto");
  for (mk::isa::Isa v : {mk::isa::Isa::Avx2, mk::isa::Isa::Avx512, mk::isa::Isa::Neon}) {
    if (mk::isa::cpu_supports(v)) continue;
    std::string msg;
    try { mk::isa::parse(mk::isa::name(v)); } catch (const std::invalid_argument& e) { msg = e.what(); }
    EXPECT(msg.find(std::string("MALLOC_KERNELS_ISA=") + mk::isa::name(v)) != std::string::npos &&
           msg.find("cannot run") != std::string::npos, "unsupported variant %s accepted", mk::isa::name(v));
    const bool other_arch = (v == mk::isa::Isa::Neon) != bool(MALLOC_KERNELS_AARCH64);
    if (other_arch && (MALLOC_KERNELS_X86 || MALLOC_KERNELS_AARCH64))
      EXPECT(msg.find(v == mk::isa::Isa::Neon ? "aarch64 variant" : "x86 variant") != std::string::npos,
             "%s on the other architecture: message does not say so: %s", mk::isa::name(v), msg.c_str());
  }
  // the variants each architecture runs, and what auto picks for the attention family
  const std::vector<std::string> names = mk::isa::supported_names();
  const mk::isa::Isa best_attention = mk::isa::isa_for_family(mk::isa::Isa::Auto, mk::isa::Family::Attention);
#if MALLOC_KERNELS_AARCH64
  EXPECT((names == std::vector<std::string>{"portable", "neon"}), "aarch64 build: variants are not portable, neon");
  EXPECT(best_attention == mk::isa::Isa::Neon, "aarch64: auto runs %s for attention", mk::isa::name(best_attention));
  EXPECT(mk::isa::isa_for_family(mk::isa::Isa::Neon, mk::isa::Family::Wkv) == mk::isa::Isa::Portable,
         "aarch64: a family without a neon build must run portable");
#elif MALLOC_KERNELS_X86
  EXPECT(names.front() == "portable" && std::find(names.begin(), names.end(), "neon") == names.end(),
         "x86 build lists neon");
  EXPECT(best_attention == mk::isa::best_supported(), "x86: auto runs %s for attention", mk::isa::name(best_attention));
#else
  EXPECT(names.size() == 1, "a build that is neither x86 nor aarch64 lists more than the portable variant");
#endif
  std::printf("%d attention cases, %d failures\n", cases, expect_failures);
  return expect_failures ? 1 : 0;
}
