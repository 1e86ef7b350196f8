// The constants of the vector exp shared by every ISA's kernels (ISA-neutral, no intrinsics): simd_avx2::exp256,
// the AVX-512 exp512 (attention_cpu/row_tiles.h) and simd_neon::exp4 all compute the same function from them.
//
// exp(x): Cephes-style range reduction + degree-6 polynomial, ~1 ulp. x = n ln2 + r with n = round(x log2e) and ln2
// split in two (hi exact in float) for an exact reduction; e^r ~ 1 + r + r^2 (c0 + c1 r + ... + c5 r^5). Inputs
// below `lo` (including -inf) give exactly 0 so masked scores never leak; inputs above `hi` give +inf, as the true
// value overflows float32 (or is within 2x of doing so): a clamped finite value there would turn SiLU's
// s / (1 + e^{-s}) at s ~ -1e36 into a weight of ~-0.01 instead of -0.
#pragma once

namespace malloc_kernels {
namespace simd {

struct ExpConsts {
  static constexpr float lo = -87.3f, hi = 88.3f;
  static constexpr float log2e = 1.44269504088896341f;
  static constexpr float ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
  static constexpr float c5 = 1.9875691500E-4f, c4 = 1.3981999507E-3f, c3 = 8.3334519073E-3f;
  static constexpr float c2 = 4.1665795894E-2f, c1 = 1.6666665459E-1f, c0 = 5.0000001201E-1f;
};

}  // namespace simd
}  // namespace malloc_kernels
