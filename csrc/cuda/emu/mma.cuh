// CPU emulation of csrc/cuda/mma.cuh (the emulated build's include path puts this directory first, so the kernels'
// `#include "mma.cuh"` lands here). A warp MMA is a warp-collective step: every lane deposits its fragment
// registers, the warp meets at its barrier, and each lane computes its own D elements from the whole warp's A, B
// and C decoded with PTX's fragment layouts (listed in csrc/cuda/mma.cuh) -- a kernel that puts an element in the
// wrong register or lane gets a wrong product here as on a GPU. Numerics: the products of the 16-bit / tf32 inputs
// are exact and the k-sum is rounded once to fp32 before adding C (fp32 accumulate); the hardware's adder rounding
// differs by at most an fp32 ulp per MMA. Conversions round as the PTX cvt instructions do (f16/bf16 to nearest
// even, tf32 to nearest with ties away from zero).
#pragma once

#include <stdint.h>

#include <cstring>

#include "cuda_emu.h"
#include "malloc_kernels/quant.h"


namespace malloc_kernels {
namespace cuda {
namespace mma {
namespace emu {

enum Type { kF16, kBF16, kTF32 };

inline float element(Type ty, uint32_t reg, int half) {
  if (ty == kTF32) return quant::f32_from_bits(reg & 0xffffe000u);  // the tensor core reads 10 mantissa bits
  const uint16_t h = static_cast<uint16_t>(half ? reg >> 16 : reg & 0xffffu);
  return ty == kF16 ? quant::f16_bits_to_f32(h) : quant::bf16_bits_to_f32(h);
}

inline void warp_mma(Type ty, float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  mk_emu::Block& blk = *mk_emu::current;
  const unsigned tid = threadIdx.x, w = tid / 32, lane = tid % 32;
  uint32_t* mine = &blk.frags[size_t(tid) * mk_emu::kWarpFragWords];
  for (int i = 0; i < 4; ++i) mine[i] = a[i];
  mine[4] = b0;
  mine[5] = b1;
  for (int i = 0; i < 4; ++i) std::memcpy(&mine[6 + i], &d[i], 4);
  mk_emu::arrive_and_wait(1 + w);
  const uint32_t* warp = &blk.frags[size_t(w) * 32 * mk_emu::kWarpFragWords];
  auto reg = [&](unsigned l, int i) { return warp[size_t(l) * mk_emu::kWarpFragWords + i]; };
  const int K = ty == kTF32 ? 8 : 16;
  auto A = [&](int row, int k) {
    if (ty == kTF32) return element(ty, reg((row % 8) * 4 + k % 4, (row >= 8) + 2 * (k >= 4)), 0);
    return element(ty, reg((row % 8) * 4 + (k % 8) / 2, (row >= 8) + 2 * (k >= 8)), k & 1);
  };
  auto B = [&](int k, int n) {
    if (ty == kTF32) return element(ty, reg(n * 4 + k % 4, 4 + (k >= 4)), 0);
    return element(ty, reg(n * 4 + (k % 8) / 2, 4 + (k >= 8)), k & 1);
  };
  auto C = [&](int row, int col) {
    float c;
    const uint32_t bits = reg((row % 8) * 4 + col / 2, 6 + 2 * (row >= 8) + col % 2);
    std::memcpy(&c, &bits, 4);
    return c;
  };
  const int g = lane / 4, t = lane % 4;
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
    double s = 0.0;
    for (int k = 0; k < K; ++k) s += double(A(row, k)) * double(B(k, col));
    out[i] = static_cast<float>(s) + C(row, col);
  }
  mk_emu::arrive_and_wait(1 + w);  // every lane has read the warp's fragments before any lane deposits new ones
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}

}  // namespace emu

inline void m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emu::warp_mma(emu::kF16, d, a, b0, b1);
}
inline void m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emu::warp_mma(emu::kBF16, d, a, b0, b1);
}
inline void m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emu::warp_mma(emu::kTF32, d, a, b0, b1);
}

inline uint16_t f16_bits(float x) { return quant::f32_to_f16_bits(x); }

inline uint16_t bf16_bits(float x) {
  const uint32_t u = quant::f32_to_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);                // nearest even
}

inline uint32_t tf32_bits(float x) {
  const uint32_t u = quant::f32_to_bits(x);
  if ((u & 0x7f800000u) == 0x7f800000u) return u;  // inf / NaN unchanged
  return (u + 0x1000u) & 0xffffe000u;              // nearest, ties away from zero (sign-magnitude)
}

}  // namespace mma
}  // namespace cuda
}  // namespace malloc_kernels
