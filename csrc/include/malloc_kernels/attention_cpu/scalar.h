// Blocking constants and exact scalar conversions of the fused CPU attention (one copy per ISA namespace MK_IMPL_NS;
// see attention_cpu_impl.h). Scalar conversions come from the shared quantisation numerics (quant.h), so every
// backend decodes identically.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

#include "malloc_kernels/attention_cpu.h"
#include "malloc_kernels/quant.h"

#ifdef MK_ISA_AVX2
#include <immintrin.h>
#endif

namespace malloc_kernels {
namespace cpu {
namespace MK_IMPL_NS {

constexpr int KB = 32;        // keys per block: K and V tiles of KB x D floats stay in L1
// keys per block of the decode-from-codes path (cache_from_codes): DKB for one query row, DKB / 2 for several (their
// score/weight rows must stay in L1 next to the shared tiles); a multiple of 64, so key groups never straddle blocks.
constexpr int DKB = 128;
constexpr int RMAX = 64;      // query rows (heads x queries) per work item chunk
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();
constexpr float POS_INF = std::numeric_limits<float>::infinity();

// Non-finite rule (every backend, README "Non-finite values and integer ranges"): a row with no visible entry returns
// zeros (lse -inf); otherwise a visible score (scale * q.k + log count + bias) that is NaN or +inf, or a non-finite
// element of the row's result, makes the WHOLE row NaN (lse NaN); a -inf score is weight 0, as a masked entry (SDPA's
// convention). Values: a non-finite value of a VISIBLE entry poisons the row (stored entries are visible to every row
// and propagate through p * v; Kernel::guard_request_values keeps causally masked request values out). The max/exp
// helpers drop NaN (the vector min/max return an operand), so scores never rely on propagation: each row keeps a
// sticky flag `Scratch::bad` set by `!(s < +inf)` (one compare per score vector) and Kernel::finish_row() applies
// the rule once per row. Every ISA variant must do the same.

// ---- scalar conversions (exact) -------------------------------------------------------------------------------
inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

#ifdef MK_ISA_AVX2
// F16C's conversion is exact (fp16 -> fp32 never rounds) and an order of magnitude cheaper than the bit version.
inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }
#elif defined(MK_ISA_NEON)
// FCVT from the half-precision register: exact, as F16C's.
inline float half_to_float(uint16_t h) {
  __fp16 x; std::memcpy(&x, &h, 2);
  return float(x);
}
#else
inline float half_to_float(uint16_t h) { return quant::f16_bits_to_f32(h); }
#endif
inline float bf16_to_float(uint16_t h) { return quant::bf16_bits_to_f32(h); }
inline float fp8_to_float(uint8_t c) { return quant::e4m3fn_to_f32(c); }

inline uint16_t f2bf16(float f) {  // round to nearest even (outputs)
  uint32_t u; std::memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7FFF + ((u >> 16) & 1);
  return uint16_t(u >> 16);
}

inline uint16_t f2half(float f) { return quant::f32_to_f16_bits(f); }

inline float load_scalar(const void* base, DType dt, int64_t idx) {
  switch (dt) {
    case DType::F32: return static_cast<const float*>(base)[idx];
    case DType::F16: return half_to_float(static_cast<const uint16_t*>(base)[idx]);
    default: return bf16_to_float(static_cast<const uint16_t*>(base)[idx]);
  }
}

inline void store_scalar(void* base, DType dt, int64_t idx, float v) {
  switch (dt) {
    case DType::F32: static_cast<float*>(base)[idx] = v; break;
    case DType::F16: static_cast<uint16_t*>(base)[idx] = f2half(v); break;
    default: static_cast<uint16_t*>(base)[idx] = f2bf16(v); break;
  }
}

inline size_t fmt_elem_bytes(Fmt f) {
  switch (f) {
    case Fmt::F32: return 4;
    case Fmt::F16: case Fmt::BF16: return 2;
    default: return 1;
  }
}

inline int64_t row_bytes(Fmt f, int D) {
  switch (f) {
    case Fmt::F32: return int64_t(D) * 4;
    case Fmt::F16: case Fmt::BF16: return int64_t(D) * 2;
    case Fmt::INT8: case Fmt::FP8: return D;
    case Fmt::INT4: case Fmt::NVFP4: return (int64_t(D) * 4 + 7) / 8;
    default: return (int64_t(D) * 2 + 7) / 8;
  }
}

// Raw element d of a stored row: the value (float formats), the integer code (int formats) or the e4m3 value (fp8).
inline float raw_scalar(Fmt f, const uint8_t* row, int d) {
  switch (f) {
    case Fmt::F32: { float x; std::memcpy(&x, row + 4 * d, 4); return x; }
    case Fmt::F16: { uint16_t h; std::memcpy(&h, row + 2 * d, 2); return half_to_float(h); }
    case Fmt::BF16: { uint16_t h; std::memcpy(&h, row + 2 * d, 2); return bf16_to_float(h); }
    case Fmt::INT8: return float(row[d]);
    case Fmt::INT4: return float((row[d >> 1] >> ((d & 1) * 4)) & 0xF);
    case Fmt::INT2: return float((row[d >> 2] >> ((d & 3) * 2)) & 0x3);
    default: return fp8_to_float(row[d]);
  }
}

// Elements [d0, D) of one stored row as floats into out (elements D..ld-1 zero). With gs > 0 the token-axis affine
// map x = raw * s_g + z_g (group g = d / gs) is applied, sr/zr: the row's float16 scales/zeros (zr null: fp8). The
// scalar tail of every decode_rows.
template <Fmt F>
inline void decode_row_scalar(const uint8_t* row, int d0, int D, int ld, float* out, int gs, const uint16_t* sr,
                              const uint16_t* zr) {
  for (int d = d0; d < D; ++d) {
    float x = raw_scalar(F, row, d);
    if (gs > 0) {
      const int g = d / gs;
      x = x * half_to_float(sr[g]) + (zr ? half_to_float(zr[g]) : 0.f);
    }
    out[d] = x;
  }
  for (int d = D; d < ld; ++d) out[d] = 0.f;
}

inline bool is_quant(Fmt f) { return f == Fmt::INT8 || f == Fmt::INT4 || f == Fmt::INT2 || f == Fmt::FP8; }

}  // namespace MK_IMPL_NS
}  // namespace cpu
}  // namespace malloc_kernels
