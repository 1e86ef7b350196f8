// Warp-level tensor-core MMA (PTX mma.sync, sm_80+) and the operand conversions the decode kernel needs, as inline
// PTX. The fragment layouts are PTX ISA's ("Matrix fragments for mma.m16n8k16 / mma.m16n8k8"): with
// g = lane / 4 and t = lane % 4,
//   m16n8k16 f16/bf16  A (16x16, 4 regs of 2 halves): a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..),
//                      a3 = (g+8, 2t+8..);  B (16x8, k x n): b0 = (k 2t..2t+1, n g), b1 = (k 2t+8.., n g);
//   m16n8k8 tf32       A (16x8, 4 regs): a0 = (g, t), a1 = (g+8, t), a2 = (g, t+4), a3 = (g+8, t+4);
//                      B (8x8): b0 = (k t, n g), b1 = (k t+4, n g);
//   C/D (16x8 fp32)    c0, c1 = (g, 2t..2t+1), c2, c3 = (g+8, 2t..2t+1);
// the lower half of a 32-bit register holds the lower-index element.
//
// The CPU emulation of the kernels (tests/cuda_emulation.py) compiles csrc/cuda/emu/mma.cuh in place of this file
// (its include path puts csrc/cuda/emu first): the same functions, computed from every lane's fragments with these
// layouts, so a wrong fragment index in the kernel gives wrong results there too.
#pragma once

#include <stdint.h>

namespace malloc_kernels {
namespace cuda {
namespace mma {

// d += a * b, fp16 inputs, fp32 accumulate.
__device__ __forceinline__ void m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// d += a * b, bf16 inputs, fp32 accumulate.
__device__ __forceinline__ void m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// d += a * b, tf32 inputs (fp32 bit patterns rounded by to_tf32), fp32 accumulate.
__device__ __forceinline__ void m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// fp32 -> fp16 / bf16 bits, round to nearest even (overflow to inf, NaN stays NaN).
__device__ __forceinline__ uint16_t f16_bits(float x) {
  uint16_t r;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(x));
  return r;
}
__device__ __forceinline__ uint16_t bf16_bits(float x) {
  uint16_t r;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
  return r;
}

// fp32 -> tf32 (10 explicit mantissa bits, round to nearest, ties away from zero), as an fp32 bit pattern.
__device__ __forceinline__ uint32_t tf32_bits(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}

}  // namespace mma
}  // namespace cuda
}  // namespace malloc_kernels
