// Run-time choice of the CPU kernels' instruction-set variant (framework-free).
//
// Every CPU kernel family (attention, training attention, fused cross-entropy, product-key memory, RWKV's WKV) is
// compiled in several variants of the same source -- portable (the build flags' baseline) everywhere; on x86 avx2
// (AVX2 + FMA + F16C) and, for most families, avx512 (AVX-512 F/BW/VL/DQ/VNNI); on aarch64 neon (Advanced SIMD,
// hand-written for the attention family); the table is family_best below -- and picks one per call:
//   requested  = the environment variable MALLOC_KERNELS_ISA (auto | portable | avx2 | avx512 | neon), read on EVERY
//                call (isa_from_env), so a process can switch variants between calls (tests run each one);
//   runs       = the requested variant, capped by the family's best variant (isa_for_family): a family without an
//                avx512 build runs its avx2 one, a family without a neon build its portable one. `auto` = the best
//                variant this CPU supports.
// Only the CPUID answer is cached (cpu_supports). A request this CPU cannot run is an error, never a silent fallback
// (a variant of the other architecture included: neon on x86, avx2 / avx512 on aarch64).
#pragma once

#include <string>
#include <vector>

// x86 builds compile the avx2 / avx512 variants, aarch64 builds the neon one (every AArch64 CPU has Advanced SIMD);
// any other target builds the portable one only.
#if defined(__x86_64__) || defined(__i386__)
#define MALLOC_KERNELS_X86 1
#else
#define MALLOC_KERNELS_X86 0
#endif
#if defined(__aarch64__)
#define MALLOC_KERNELS_AARCH64 1
#else
#define MALLOC_KERNELS_AARCH64 0
#endif

namespace malloc_kernels {
namespace isa {

// The variants of one architecture are ordered by value (x86: Portable < Avx2 < Avx512; aarch64: Portable < Neon);
// the two architectures' variants are never compared (a CPU supports only its own).
enum class Isa : int { Auto = -1, Portable = 0, Avx2 = 1, Avx512 = 2, Neon = 3 };

// "portable", "avx2", "avx512", "neon" ("auto" for Isa::Auto).
const char* name(Isa v);

// Whether this CPU (and OS) can run variant v (CPUID, checked once per process).
bool cpu_supports(Isa v);

// The variants this CPU can run, in increasing order ("portable" first).
std::vector<std::string> supported_names();

// The best variant this CPU supports.
Isa best_supported();

// Parses a MALLOC_KERNELS_ISA value (nullptr or "" = auto). Throws std::invalid_argument naming the variable for an
// unknown value or a variant this CPU cannot run.
Isa parse(const char* value);

// parse(getenv("MALLOC_KERNELS_ISA")): read at every call.
Isa isa_from_env();

// The variant a family whose best build is `family_best` runs for `requested` (Auto = best supported). Throws
// std::invalid_argument when `requested` is a variant this CPU cannot run.
Isa isa_for_family(Isa requested, Isa family_best);

// The CPU kernel families, and the best build of each on this architecture: the one table behind every kernel's
// dispatch (isa_for_family(requested, family)) and the cpu_isa_variant op, so what a benchmark reports is what ran.
// On aarch64 the attention family's best is neon and every other family's portable; on other targets every
// family is portable.
enum class Family : int { Attention, TrainAttention, CrossEntropy, PkmTopk, PkmGather, Wkv, LshAttention };
Isa family_best(Family f);
Isa isa_for_family(Isa requested, Family f);
// "attention", "train_attention", "cross_entropy", "pkm_topk", "pkm_gather", "wkv", "lsh_attention".
const char* family_name(Family f);
// Every family, in the order above.
const std::vector<Family>& families();
// The family called `name`; false when there is none.
bool family_from_name(const std::string& name, Family* out);

}  // namespace isa
}  // namespace malloc_kernels
