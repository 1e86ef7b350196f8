// The decode-from-codes entry points of a build that has no code-layout kernels (portable, NEON): every call takes
// the float-tile path, so these report "not done". The x86 builds have them (codes_avx2.h: decode-sized Q K^T /
// P V straight from packed codes; from_codes_avx2.h: the cache segment of a chunk in code layout).
#pragma once

#include <cstdint>

#include "malloc_kernels/attention_cpu/scalar.h"
#include "malloc_kernels/bias.h"

namespace malloc_kernels {
namespace cpu {
namespace MK_IMPL_NS {

inline bool qk_from_codes(Fmt, const float*, int, int, const uint8_t*, int64_t, int, int, float*, int, const float*) {
  return false;
}
inline bool pv_codes_ok(int, int) { return false; }
inline void pv_from_codes(Fmt, int, const float*, int, int, int, const uint8_t*, int64_t, int, const float*,
                          const float*, float*, int, float*) {}

struct Scratch;
class CacheFromCodes {
 public:
  CacheFromCodes(const AttnParams&, int, const bias::TimeBucketer*) {}
  bool run(Scratch&, int64_t, int64_t, int) const { return false; }
};

}  // namespace MK_IMPL_NS
}  // namespace cpu
}  // namespace malloc_kernels
