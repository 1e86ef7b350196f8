// Standalone numerics test of quant.h (no torch, no CUDA): built by CMakeLists.txt and run by ctest. It checks the
// properties the storage contract relies on, exhaustively where the domain is small:
//   * every finite fp16 / e4m3fn bit pattern decodes and re-encodes to itself;
//   * every tie between adjacent fp16 / e4m3fn values rounds to the even neighbour, and points just off a tie
//     round to the nearer one (so encode is round-to-nearest-even everywhere);
//   * f16_round_down / f16_round_up return the adjacent fp16 values bracketing x;
//   * quantize_int codes stay in range and reconstruct within half a step; pack/unpack round-trip.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "malloc_kernels/decode.h"
#include "malloc_kernels/quant.h"

#include "expect.h"

using namespace malloc_kernels::quant;


static void test_f16() {
  for (uint32_t h = 0; h < 0x10000u; ++h) {
    const uint16_t hb = static_cast<uint16_t>(h);
    const float f = f16_bits_to_f32(hb);
    if ((h & 0x7c00u) == 0x7c00u && (h & 0x3ffu)) {
      EXPECT(std::isnan(f), "f16 NaN %04x", h);
      continue;
    }
    EXPECT(f32_to_f16_bits(f) == hb, "f16 round trip %04x", h);
    EXPECT((f16_round_down(f) == f && f16_round_up(f) == f) || std::isinf(f), "f16 exact outward %04x", h);
  }
  // Ties and near-ties between adjacent positive finite values a < b (mirrored for negatives).
  for (uint32_t h = 0; h < 0x7bffu; ++h) {
    const double a = f16_bits_to_f32(static_cast<uint16_t>(h));
    const double b = f16_bits_to_f32(static_cast<uint16_t>(h + 1));
    const float mid = static_cast<float>((a + b) / 2);  // exact in fp32
    const uint16_t even = (h & 1u) ? static_cast<uint16_t>(h + 1) : static_cast<uint16_t>(h);
    EXPECT(f32_to_f16_bits(mid) == even, "f16 tie %04x", h);
    EXPECT(f32_to_f16_bits(-mid) == (even | 0x8000u), "f16 -tie %04x", h);
    EXPECT(f32_to_f16_bits(std::nextafter(mid, -1.0f)) == h, "f16 below tie %04x", h);
    EXPECT(f32_to_f16_bits(std::nextafter(mid, 1e9f)) == h + 1, "f16 above tie %04x", h);
    const float inside = static_cast<float>(a + (b - a) * 0.3);
    if (inside > a && inside < b) {
      EXPECT(f16_round_down(inside) == static_cast<float>(a), "round_down %04x", h);
      EXPECT(f16_round_up(inside) == static_cast<float>(b), "round_up %04x", h);
      EXPECT(f16_round_down(-inside) == -static_cast<float>(b), "round_down neg %04x", h);
      EXPECT(f16_round_up(-inside) == -static_cast<float>(a), "round_up neg %04x", h);
    }
  }
  EXPECT(f32_to_f16_bits(65519.0f) == 0x7bffu, "65519");
  EXPECT(f32_to_f16_bits(65520.0f) == 0x7c00u, "65520 -> inf");
  EXPECT(f32_to_f16_bits(1e10f) == 0x7c00u, "overflow");
  EXPECT(f16_round_down(1e6f) == 65504.0f, "round_down above max");
  EXPECT(std::isinf(f16_round_down(-1e6f)), "round_down below -max");
  EXPECT(std::isinf(f16_round_up(1e6f)), "round_up above max");
  EXPECT(f32_to_f16_bits(std::ldexp(1.0f, -25)) == 0, "2^-25 tie -> 0");
  EXPECT(f32_to_f16_bits(std::nextafter(std::ldexp(1.0f, -25), 1.0f)) == 1, "just above 2^-25");
  EXPECT(f16_round_up(1e-30f) == std::ldexp(1.0f, -24), "round_up tiny");
  EXPECT(f16_round_down(-1e-30f) == -std::ldexp(1.0f, -24), "round_down tiny negative");
}

static void test_e4m3() {
  std::vector<double> pos;
  for (uint32_t c = 0; c < 256; ++c) {
    const float f = e4m3fn_to_f32(static_cast<uint8_t>(c));
    if ((c & 0x7fu) == 0x7fu) {
      EXPECT(std::isnan(f), "e4m3 NaN %02x", c);
      continue;
    }
    EXPECT(f32_to_e4m3fn(f) == c || (f == 0.0f && (f32_to_e4m3fn(f) & 0x7fu) == 0), "e4m3 round trip %02x", c);
    if (c < 0x7f) pos.push_back(f);
  }
  EXPECT(e4m3fn_to_f32(0x7e) == 448.0f, "max 448");
  EXPECT(e4m3fn_to_f32(0x01) == 0.001953125f, "min subnormal");
  for (size_t i = 0; i + 1 < pos.size(); ++i) {
    const float mid = static_cast<float>((pos[i] + pos[i + 1]) / 2);
    const uint32_t lo = static_cast<uint32_t>(i), hi = static_cast<uint32_t>(i + 1);
    EXPECT(f32_to_e4m3fn(mid) == ((lo & 1u) ? hi : lo), "e4m3 tie %zu", i);
    EXPECT(f32_to_e4m3fn(std::nextafter(mid, -1.0f)) == lo, "e4m3 below tie %zu", i);
    EXPECT(f32_to_e4m3fn(std::nextafter(mid, 1e9f)) == hi, "e4m3 above tie %zu", i);
  }
  // Saturation like torch: finite overflow and inf -> +-448, NaN -> 0x7f.
  EXPECT(f32_to_e4m3fn(470.0f) == 0x7eu && f32_to_e4m3fn(1e9f) == 0x7eu, "saturate");
  EXPECT(f32_to_e4m3fn(-INFINITY) == 0xfeu && f32_to_e4m3fn(INFINITY) == 0x7eu, "inf saturates");
  EXPECT((f32_to_e4m3fn(NAN) & 0x7fu) == 0x7fu, "nan");
}

static void test_quantize_and_pack() {
  uint32_t state = 12345u;
  auto rnd = [&]() {
    state = state * 1664525u + 1013904223u;
    return static_cast<float>(state >> 8) / 16777216.0f;
  };
  for (int bits : {2, 4, 8}) {
    const int qmax = (1 << bits) - 1;
    for (int trial = 0; trial < 2000; ++trial) {
      const int n = 1 + trial % 13;
      std::vector<float> x(n);
      const float spread = std::ldexp(1.0f, trial % 20 - 10);
      for (float& v : x) v = (rnd() * 2 - 1) * spread + (trial % 3) * spread;
      float mn = x[0], mx = x[0];
      for (float v : x) {
        mn = std::fmin(mn, v);
        mx = std::fmax(mx, v);
      }
      float s, z;
      EXPECT(int_scale_zero(mn, mx, qmax, &s, &z) == kOk, "scale status");
      EXPECT(z <= mn && s * qmax >= (mx - z) * (1 - 1e-6f), "outward rounding");
      std::vector<uint8_t> row(packed_width(n, bits), 0);
      for (int i = 0; i < n; ++i) {
        const uint32_t c = quantize_int(x[i], s, z, qmax);
        EXPECT(c <= static_cast<uint32_t>(qmax), "code range");
        EXPECT(std::fabs(dequant_int(c, s, z) - x[i]) <= s * 0.5f * (1 + 1e-5f) + 1e-7f * std::fabs(x[i]),
               "half step bits=%d", bits);
        set_code(row.data(), i, bits, c);
      }
      for (int i = 0; i < n; ++i) EXPECT(get_code(row.data(), i, bits) == quantize_int(x[i], s, z, qmax), "pack");
      if (bits < 8 && (n * bits) % 8) {
        const int used = (n * bits) % 8;
        EXPECT((row.back() >> used) == 0, "unused high bits are zero");
      }
    }
  }
  // Byte helpers agree with get_code and the documented bit order (4-bit: element 2i low nibble; 2-bit: 4i low).
  const uint8_t b = 0xb4;  // 10 11 01 00
  uint32_t c0, c1, c4[4];
  unpack4x2(b, &c0, &c1);
  unpack2x4(b, c4);
  EXPECT(c0 == 0x4 && c1 == 0xb, "unpack4x2");
  EXPECT(c4[0] == 0 && c4[1] == 1 && c4[2] == 3 && c4[3] == 2, "unpack2x4");
  EXPECT(nibble(0x87654321u, 0) == 1 && nibble(0x87654321u, 7) == 8, "nibble");
  EXPECT(crumb(0xb4u, 2) == 3, "crumb");
  float s;
  EXPECT(fp8_scale(448.0f, &s) == kOk && s == 1.0f, "fp8 scale");
  EXPECT(quantize_fp8(-448.0f, s) == 0xfeu && quantize_fp8(1.0f, 0.0f) == 0, "fp8 quantize");
  float z;
  EXPECT(int_scale_zero(-0.0f, -0.0f, 15, &s, &z) == kOk && f32_to_f16_bits(z) == 0 && s == 0.0f, "-0 zero");
  EXPECT(int_scale_zero(-1e6f, 0.0f, 15, &s, &z) == kF16Overflow, "overflow status");
  EXPECT(int_scale_zero(NAN, 0.0f, 15, &s, &z) == kNonFinite, "nan status");
}

// decode.h: the exact time bucket against thresholds computed in double (as the reference does), the position
// clamp, silu and the split merge.
static void test_decode() {
  namespace dk = malloc_kernels::decode;
  for (int T : {1, 2, 12, 40, 64}) {
    std::vector<int64_t> th(T, 0);  // th[0] unused
    for (int k = 1; k < T; ++k) {
      // smallest x >= 1 with floor(ln(x) / 0.301) >= k: start from the float guess and step exactly in double
      int64_t x = static_cast<int64_t>(std::exp(0.301 * k));
      if (x < 1) x = 1;
      while (x > 1 && std::floor(std::log(double(x - 1)) / 0.301) >= k) --x;
      while (std::floor(std::log(double(x)) / 0.301) < k) ++x;
      th[k] = x;
    }
    auto brute = [&](int64_t dt) {
      int64_t a = dt < 0 ? -dt : dt;
      if (a < 1) a = 1;
      int64_t b = 0;
      for (int k = 1; k < T; ++k) b += th[k] <= a;
      return b;
    };
    for (int64_t dt = -3000; dt <= 3000; ++dt) EXPECT(dk::time_bucket(dt, th.data(), T) == brute(dt), "bucket");
    for (int k = 1; k < T; ++k)
      for (int64_t d : {th[k] - 1, th[k], th[k] + 1})
        EXPECT(dk::time_bucket(d, th.data(), T) == brute(d), "bucket at threshold T=%d k=%d", T, k);
    EXPECT(dk::time_bucket(INT64_MIN, th.data(), T) == T - 1 || T == 1, "bucket INT64_MIN");
    // differences beyond int64 are taken exactly (saturated): never wrapped into a small or negative dt
    EXPECT(dk::time_bucket(INT64_MAX, INT64_MIN, th.data(), T) == brute(INT64_MAX), "bucket of max - min");
    EXPECT(dk::time_bucket(INT64_MIN, INT64_MAX, th.data(), T) == brute(INT64_MAX), "bucket of min - max");
    EXPECT(dk::time_bucket(int64_t(1) << 62, INT64_MIN, th.data(), T) == brute(INT64_MAX), "bucket 2^62 - min");
    EXPECT(dk::time_bucket(-7, 993, th.data(), T) == brute(1000), "bucket -7 - 993");
  }
  EXPECT(dk::pos_index(5, 9, 4) == 0 && dk::pos_index(9, 5, 4) == 3 && dk::pos_index(7, 5, 4) == 2, "pos_index");
  EXPECT(dk::pos_index(INT64_MAX, INT64_MIN, 4) == 3 && dk::pos_index(INT64_MIN, INT64_MAX, 4) == 0 &&
             dk::pos_index(INT64_MAX, -1, 4) == 3 && dk::pos_index(INT64_MIN, 1, 4) == 0, "pos_index at int64 edges");
  EXPECT(std::fabs(dk::silu(2.0f) - 2.0f / (1.0f + std::exp(-2.0f))) < 1e-6f && dk::silu(-200.0f) == -0.0f,
         "silu");
  // Merging partial (max, sum) pairs in any order equals the one-pass log-sum-exp.
  const float s[6] = {0.5f, -3.0f, 2.0f, 7.5f, -INFINITY, 1.0f};
  double ref = 0;
  for (float v : s) ref += std::exp(double(v));
  dk::SoftmaxState a{-INFINITY, 0.0f}, b{-INFINITY, 0.0f};
  float wa, wb;
  for (int i = 0; i < 3; ++i) a = dk::merge(a, {s[i], 1.0f}, &wa, &wb);
  for (int i = 3; i < 6; ++i) b = dk::merge(b, {s[i], s[i] == -INFINITY ? 0.0f : 1.0f}, &wa, &wb);
  EXPECT(std::fabs(dk::lse(dk::merge(a, b, &wa, &wb)) - std::log(ref)) < 1e-5, "lse merge");
  EXPECT(dk::lse(dk::merge({-INFINITY, 0.0f}, {-INFINITY, 0.0f}, &wa, &wb)) == -INFINITY && wa == 0.0f, "empty");
  EXPECT(dk::rescale(-INFINITY, -INFINITY) == 1.0f && dk::rescale(-INFINITY, 0.0f) == 0.0f, "rescale");
}

int main() {
  test_decode();
  test_f16();
  test_e4m3();
  test_quantize_and_pack();
  if (expect_failures) {
    std::fprintf(stderr, "%d failures\n", expect_failures);
    return 1;
  }
  std::printf("quant.h numerics: all checks passed\n");
  return 0;
}
