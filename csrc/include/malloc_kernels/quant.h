// Quantisation numerics of the cache storage contract (malloc_kernels/core/kvcache.py), framework-free and shared
// by host and device: the C++ CPU packer, the CUDA packer and the attention kernels' in-register dequantisation
// all call these functions, so the CPU tests of the packer also check the arithmetic the GPU kernels run.
//
// Everything is bit-exact with the PyTorch implementation (malloc_kernels/cache/quant.py):
//   * fp16 conversions are IEEE round-to-nearest-even done with integer bit manipulation (no F16C, no __half), so
//     the result does not depend on the compiler, the ISA or the device;
//   * group statistics and codes are computed in fp32 with exactly the operations the contract names
//     (a true division by the scale, never a multiplication by its reciprocal, which can round differently);
//   * fp8 e4m3fn encoding follows torch's float -> float8_e4m3fn conversion (RNE, finite overflow and +-inf
//     saturate to +-448, NaN -> 0x7f).
//
// Stable API (other helpers' kernels include this header; names and meanings do not change):
//   f32_to_bits / f32_from_bits             raw IEEE-754 binary32 bits
//   f32_to_f16_bits(x)                      fp32 -> fp16 bits, round to nearest even, overflow -> inf
//   f16_bits_to_f32(h)                      fp16 bits -> fp32 (exact)
//   bf16_bits_to_f32(b)                     bf16 bits -> fp32 (exact)
//   f16_round_down(x) / f16_round_up(x)     largest fp16 <= x / smallest fp16 >= x, returned as fp32
//   round_half_even(x)                      nearest integer, ties to even (fp32)
//   int_scale_zero(mn, mx, qmax, &s, &z)    the contract's (scale, zero) of an asymmetric integer group
//   fp8_scale(absmax)                       the contract's fp8 scale of a group
//   quantize_int(x, scale, zero, qmax)      clamp(round_half_even((x - zero) / scale), 0, qmax); 0 if scale == 0
//   quantize_fp8(x, scale)                  e4m3fn bits of x / scale; 0 if scale == 0
//   f32_to_e4m3fn(x) / e4m3fn_to_f32(c)     fp8 e4m3fn encode (torch semantics) / decode (exact)
//   packed_width(d, bits)                   bytes per row of d codes
//   get_code(row, i, bits)                  code i of a packed row (bits 8/4/2), shift/mask only
//   set_code(row, i, bits, code)            OR code i into a zero-initialised packed row
//   unpack4x2(byte, &c0, &c1), unpack2x4(byte, c)  all codes of one byte, low bits first
//   dequant_int(code, scale, zero)          code * scale + zero (fp32)
//   dequant_fp8(bits, scale)                e4m3fn_to_f32(bits) * scale (fp32)
#pragma once

#include <stdint.h>

#include "malloc_kernels/common.h"

#include <cmath>
#include <cstring>

namespace malloc_kernels {
namespace quant {

// Largest finite fp16 and the fp8 e4m3fn maximum (the contract's fp8 divisor).
constexpr float kF16Max = 65504.0f;
constexpr float kFp8Max = 448.0f;

// Status codes of the group helpers: the contract says ranges that do not fit float16 raise ValueError.
enum Status : int { kOk = 0, kNonFinite = 1, kF16Overflow = 2 };

MK_HOST_DEVICE uint32_t f32_to_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

MK_HOST_DEVICE float f32_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

MK_HOST_DEVICE bool is_finite(float x) { return (f32_to_bits(x) & 0x7f800000u) != 0x7f800000u; }

// fp32 -> fp16 bits, IEEE round to nearest even. Works on the magnitude bits: normal results round the 13 dropped
// mantissa bits; subnormal results are the magnitude shifted right by (126 - exp) with the same RNE on the
// dropped bits; results past 65504 (after rounding) become inf; NaN keeps a quiet NaN.
MK_HOST_DEVICE uint16_t f32_to_f16_bits(float x) {
  const uint32_t u = f32_to_bits(x);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t mag = u & 0x7fffffffu;
  if (mag >= 0x7f800000u) return static_cast<uint16_t>(sign | (mag > 0x7f800000u ? 0x7e00u : 0x7c00u));
  const int exp = static_cast<int>(mag >> 23);  // biased fp32 exponent
  if (exp >= 143) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 2^16: overflow even before rounding
  if (exp >= 113) {                                               // fp16 normal range (2^-14 .. 2^16)
    uint32_t h = ((static_cast<uint32_t>(exp - 112)) << 10) | ((mag >> 13) & 0x3ffu);
    const uint32_t rest = mag & 0x1fffu;
    // Round half to even; a mantissa carry correctly bumps the exponent (and 65520.. becomes inf = 0x7c00).
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
    return static_cast<uint16_t>(sign | h);
  }
  if (exp < 102) return sign;  // below half the smallest subnormal (2^-25): rounds to zero
  // Subnormal result: value = m * 2^(exp-150) with the implicit bit, fp16 unit is 2^-24 -> shift by (126 - exp).
  const uint32_t m = (mag & 0x7fffffu) | 0x800000u;
  const int shift = 126 - exp;  // 14 .. 24
  uint32_t h = m >> shift;
  const uint32_t rest = m & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1);
  if (rest > half || (rest == half && (h & 1u))) ++h;  // may carry into the smallest normal: still correct bits
  return static_cast<uint16_t>(sign | h);
}

MK_HOST_DEVICE float f16_bits_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu;
  const uint32_t m = h & 0x3ffu;
  if (e == 0x1fu) return f32_from_bits(sign | 0x7f800000u | (m << 13));
  if (e != 0) return f32_from_bits(sign | ((e + 112u) << 23) | (m << 13));
  // Subnormal: m * 2^-24 is exact in fp32.
  const float v = static_cast<float>(m) * 5.9604644775390625e-8f;
  return sign ? -v : v;
}

MK_HOST_DEVICE float bf16_bits_to_f32(uint16_t b) { return f32_from_bits(static_cast<uint32_t>(b) << 16); }

// Next fp16 bit pattern towards +inf / -inf (finite inputs; +-0 step to the smallest subnormal of that side).
MK_HOST_DEVICE uint16_t f16_next_up(uint16_t h) {
  if ((h & 0x7fffu) == 0) return 0x0001u;
  return (h & 0x8000u) ? static_cast<uint16_t>(h - 1u) : static_cast<uint16_t>(h + 1u);
}

MK_HOST_DEVICE uint16_t f16_next_down(uint16_t h) {
  if ((h & 0x7fffu) == 0) return 0x8001u;
  return (h & 0x8000u) ? static_cast<uint16_t>(h + 1u) : static_cast<uint16_t>(h - 1u);
}

// Largest fp16 <= x (as fp32). Round to nearest first, then step once if that went above x. x < -65504 gives
// -inf (callers report the overflow); x > 65504 gives 65504, the true largest fp16 <= x.
MK_HOST_DEVICE float f16_round_down(float x) {
  uint16_t h = f32_to_f16_bits(x);
  float r = f16_bits_to_f32(h);
  if (r > x) {
    h = ((h & 0x7fffu) == 0x7c00u) ? static_cast<uint16_t>(h - 1u) : f16_next_down(h);
    r = f16_bits_to_f32(h);
  }
  return r;
}

// Smallest fp16 >= x (as fp32); +inf for x > 65504, -65504 for x < -65504 (mirror of f16_round_down).
MK_HOST_DEVICE float f16_round_up(float x) {
  uint16_t h = f32_to_f16_bits(x);
  float r = f16_bits_to_f32(h);
  if (r < x) {
    h = ((h & 0x7fffu) == 0x7c00u) ? static_cast<uint16_t>(h - 1u) : f16_next_up(h);
    r = f16_bits_to_f32(h);
  }
  return r;
}

MK_HOST_DEVICE float round_half_even(float x) {
#if defined(__CUDA_ARCH__)
  return rintf(x);
#else
  return std::nearbyint(x);  // default FP environment: round to nearest even
#endif
}

// (scale, zero) of an asymmetric integer group with fp32 min/max over its valid elements:
//   zero = f16_round_down(mn + 0), scale = f16_round_up((mx + 0 - zero) / qmax)   (fp32 arithmetic).
// The "+ 0" maps a -0.0 min/max to +0.0 so the stored zero and scale do not depend on which signed zero a
// reduction happened to keep (the PyTorch packer does the same). Returns kNonFinite for NaN/inf statistics and
// kF16Overflow when zero or scale does not fit float16.
MK_HOST_DEVICE int int_scale_zero(float mn, float mx, int qmax, float* scale, float* zero) {
  *scale = 0.0f;
  *zero = 0.0f;
  if (!is_finite(mn) || !is_finite(mx)) return kNonFinite;
  const float z = f16_round_down(mn + 0.0f);
  if (!is_finite(z)) return kF16Overflow;
  const float s = f16_round_up(((mx + 0.0f) - z) / static_cast<float>(qmax));
  if (!is_finite(s)) return kF16Overflow;
  *zero = z;
  *scale = s;
  return kOk;
}

// fp8 scale of a group: f16_round_up(absmax / 448) (fp32 arithmetic).
MK_HOST_DEVICE int fp8_scale(float absmax, float* scale) {
  *scale = 0.0f;
  if (!is_finite(absmax)) return kNonFinite;
  const float s = f16_round_up(absmax / kFp8Max);
  if (!is_finite(s)) return kF16Overflow;
  *scale = s;
  return kOk;
}

// clamp(round_half_even((x - zero) / scale), 0, qmax), 0 where scale == 0. The clamp is done in float before
// the integer conversion so out-of-range quotients never hit undefined float->int behaviour.
MK_HOST_DEVICE uint8_t quantize_int(float x, float scale, float zero, int qmax) {
  if (scale == 0.0f) return 0;
  float q = round_half_even((x - zero) / scale);
  q = q < 0.0f ? 0.0f : q;
  q = q > static_cast<float>(qmax) ? static_cast<float>(qmax) : q;
  return static_cast<uint8_t>(static_cast<int>(q));
}

// fp32 -> float8 e4m3fn bits with torch's semantics: round to nearest even, |x| >= 448 after rounding (including
// inf) saturates to 448 (0x7e / 0xfe), NaN -> 0x7f (sign kept). e4m3fn: bias 7, no inf, subnormal unit 2^-9.
MK_HOST_DEVICE uint8_t f32_to_e4m3fn(float x) {
  const uint32_t u = f32_to_bits(x);
  const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80u);
  const uint32_t mag = u & 0x7fffffffu;
  if (mag > 0x7f800000u) return static_cast<uint8_t>(sign | 0x7fu);
  if (mag >= 0x43e00000u) return static_cast<uint8_t>(sign | 0x7eu);  // >= 448 (incl. inf): saturate
  const int exp = static_cast<int>(mag >> 23);
  uint32_t r;
  if (exp >= 121) {  // e4m3 normal range (>= 2^-6): keep 3 mantissa bits, RNE on the other 20
    r = ((static_cast<uint32_t>(exp - 120)) << 3) | ((mag >> 20) & 0x7u);
    const uint32_t rest = mag & 0xfffffu;
    if (rest > 0x80000u || (rest == 0x80000u && (r & 1u))) ++r;
    if (r > 0x7eu) r = 0x7eu;  // rounding up past 448 would hit the NaN pattern: saturate like torch
  } else if (exp < 113) {       // below 2^-10 = half the smallest subnormal: rounds to zero
    r = 0;
  } else {                      // subnormal: units of 2^-9, value = m * 2^(exp-150) -> shift by (141 - exp)
    const uint32_t m = (mag & 0x7fffffu) | 0x800000u;
    const int shift = 141 - exp;  // 21 .. 28
    r = m >> shift;
    const uint32_t rest = m & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1);
    if (rest > half || (rest == half && (r & 1u))) ++r;
  }
  return static_cast<uint8_t>(sign | r);
}

MK_HOST_DEVICE float e4m3fn_to_f32(uint8_t c) {
  const uint32_t sign = static_cast<uint32_t>(c & 0x80u) << 24;
  const uint32_t e = (c >> 3) & 0xfu;
  const uint32_t m = c & 0x7u;
  if (e == 0xfu && m == 0x7u) return f32_from_bits(sign | 0x7fc00000u);
  if (e != 0) return f32_from_bits(sign | ((e + 120u) << 23) | (m << 20));
  const float v = static_cast<float>(m) * 0.001953125f;  // subnormal: m * 2^-9
  return sign ? -v : v;
}

MK_HOST_DEVICE uint8_t quantize_fp8(float x, float scale) {
  if (scale == 0.0f) return 0;
  return f32_to_e4m3fn(x / scale);
}

// ---- packing: 8-bit one code per byte; 4-bit element 2i in the low nibble; 2-bit element 4i in bits 0-1 -------
MK_HOST_DEVICE int packed_width(int d, int bits) { return (d * bits + 7) / 8; }

MK_HOST_DEVICE uint32_t get_code(const uint8_t* row, int i, int bits) {
  if (bits == 8) return row[i];
  if (bits == 4) return (row[i >> 1] >> ((i & 1) << 2)) & 0xfu;
  return (row[i >> 2] >> ((i & 3) << 1)) & 0x3u;
}

// ORs code i into its byte; the row must start zeroed (so unused high bits of a partial last byte stay zero).
MK_HOST_DEVICE void set_code(uint8_t* row, int i, int bits, uint32_t code) {
  if (bits == 8) {
    row[i] = static_cast<uint8_t>(code);
  } else if (bits == 4) {
    row[i >> 1] = static_cast<uint8_t>(row[i >> 1] | ((code & 0xfu) << ((i & 1) << 2)));
  } else {
    row[i >> 2] = static_cast<uint8_t>(row[i >> 2] | ((code & 0x3u) << ((i & 3) << 1)));
  }
}

MK_HOST_DEVICE void unpack4x2(uint32_t byte, uint32_t* c0, uint32_t* c1) {
  *c0 = byte & 0xfu;
  *c1 = (byte >> 4) & 0xfu;
}

MK_HOST_DEVICE void unpack2x4(uint32_t byte, uint32_t* c) {
  c[0] = byte & 0x3u;
  c[1] = (byte >> 2) & 0x3u;
  c[2] = (byte >> 4) & 0x3u;
  c[3] = (byte >> 6) & 0x3u;
}

// Eight 4-bit codes of a 32-bit word (bytes little-endian, as loaded from memory): code k = bits [4k, 4k+4).
MK_HOST_DEVICE uint32_t nibble(uint32_t word, int k) { return (word >> (4 * k)) & 0xfu; }
// Sixteen 2-bit codes of a 32-bit word: code k = bits [2k, 2k+2).
MK_HOST_DEVICE uint32_t crumb(uint32_t word, int k) { return (word >> (2 * k)) & 0x3u; }

// ---- dequantisation (contract: x_hat = code * scale + zero; fp8: float(code) * scale) ------------------------
// A plain multiply-add: kernels may let the compiler fuse it (FMA rounds once, so it is never less accurate).
MK_HOST_DEVICE float dequant_int(uint32_t code, float scale, float zero) {
  return static_cast<float>(code) * scale + zero;
}

MK_HOST_DEVICE float dequant_fp8(uint32_t bits, float scale) {
  return e4m3fn_to_f32(static_cast<uint8_t>(bits)) * scale;
}

}  // namespace quant
}  // namespace malloc_kernels
