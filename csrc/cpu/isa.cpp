// Run-time ISA variant choice (isa.h): CPUID once, the environment variable at every call.
#include "malloc_kernels/isa.h"

#include <cstdlib>
#include <cstring>
#include <stdexcept>

namespace malloc_kernels {
namespace isa {

namespace {

// Every named variant, in the order supported_names lists them.
constexpr Isa kVariants[] = {Isa::Portable, Isa::Avx2, Isa::Avx512, Isa::Neon};

struct Cpu {
  bool avx2 = false, avx512 = false;
  Cpu() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512vnni");
#endif
  }
};

const Cpu& cpu() {
  static const Cpu c;
  return c;
}

}  // namespace

const char* name(Isa v) {
  switch (v) {
    case Isa::Portable: return "portable";
    case Isa::Avx2: return "avx2";
    case Isa::Avx512: return "avx512";
    case Isa::Neon: return "neon";
    default: return "auto";
  }
}

bool cpu_supports(Isa v) {
  switch (v) {
    case Isa::Portable: case Isa::Auto: return true;
    case Isa::Avx2: return cpu().avx2;
    case Isa::Avx512: return cpu().avx512;
    case Isa::Neon: return MALLOC_KERNELS_AARCH64 != 0;  // Advanced SIMD is part of every AArch64 CPU
  }
  return false;
}

std::vector<std::string> supported_names() {
  std::vector<std::string> out;
  for (Isa v : kVariants)
    if (cpu_supports(v)) out.emplace_back(name(v));
  return out;
}

Isa best_supported() {
  if (MALLOC_KERNELS_AARCH64) return Isa::Neon;
  return cpu().avx512 ? Isa::Avx512 : cpu().avx2 ? Isa::Avx2 : Isa::Portable;
}

Isa parse(const char* value) {
  if (value == nullptr || *value == '\0' || std::strcmp(value, "auto") == 0) return Isa::Auto;
  for (Isa v : kVariants) {
    if (std::strcmp(value, name(v)) != 0) continue;
    if (!cpu_supports(v)) {
      std::string have;
      for (const auto& s : supported_names()) have += (have.empty() ? "" : ", ") + s;
      const bool arm_variant = v == Isa::Neon;
      const char* other = arm_variant == bool(MALLOC_KERNELS_AARCH64) ? ""
                          : arm_variant ? " (neon is the aarch64 variant; this is not an aarch64 build)"
                                        : " (an x86 variant; this is an aarch64 build)";
      throw std::invalid_argument(std::string("MALLOC_KERNELS_ISA=") + value + ": this CPU cannot run that variant" +
                                  other + " (it supports: " + have + ")");
    }
    return v;
  }
  throw std::invalid_argument(std::string("MALLOC_KERNELS_ISA=") + value +
                              ": unknown value (expected auto, portable, avx2, avx512 or neon)");
}

Isa isa_from_env() { return parse(std::getenv("MALLOC_KERNELS_ISA")); }

Isa isa_for_family(Isa requested, Isa family_best) {
  if (!cpu_supports(requested))
    throw std::invalid_argument(std::string("ISA variant ") + name(requested) + " requested but this CPU cannot run it");
  const Isa r = requested == Isa::Auto ? best_supported() : requested;
  return static_cast<int>(r) < static_cast<int>(family_best) ? r : family_best;
}

namespace {

struct FamilyRow {
  Family family;
  const char* name;
  Isa best_x86, best_aarch64;
};

// The product-key top-k has no AVX-512 build (its AVX2 kernel is bound by the selection, not the dot products);
// Reformer's bucketed attention is one portable source the compiler vectorises (its cost is the bucket scan). On
// aarch64 only the fused attention has hand-written NEON; the other families run their portable source (which the
// compiler vectorises for Advanced SIMD).
constexpr FamilyRow kFamilies[] = {
    {Family::Attention, "attention", Isa::Avx512, Isa::Neon},
    {Family::TrainAttention, "train_attention", Isa::Avx512, Isa::Portable},
    {Family::CrossEntropy, "cross_entropy", Isa::Avx2, Isa::Portable},
    {Family::PkmTopk, "pkm_topk", Isa::Avx2, Isa::Portable},
    {Family::PkmGather, "pkm_gather", Isa::Avx512, Isa::Portable},
    {Family::Wkv, "wkv", Isa::Avx512, Isa::Portable},
    {Family::LshAttention, "lsh_attention", Isa::Portable, Isa::Portable},
};

const FamilyRow& row_of(Family f) {
  for (const FamilyRow& r : kFamilies)
    if (r.family == f) return r;
  throw std::invalid_argument("unknown CPU kernel family");
}

}  // namespace

Isa family_best(Family f) {
  if (MALLOC_KERNELS_X86) return row_of(f).best_x86;
  if (MALLOC_KERNELS_AARCH64) return row_of(f).best_aarch64;
  return Isa::Portable;
}

Isa isa_for_family(Isa requested, Family f) { return isa_for_family(requested, family_best(f)); }

const char* family_name(Family f) { return row_of(f).name; }

const std::vector<Family>& families() {
  static const std::vector<Family> all = [] {
    std::vector<Family> v;
    for (const FamilyRow& r : kFamilies) v.push_back(r.family);
    return v;
  }();
  return all;
}

bool family_from_name(const std::string& name, Family* out) {
  for (const FamilyRow& r : kFamilies)
    if (name == r.name) {
      *out = r.family;
      return true;
    }
  return false;
}

}  // namespace isa
}  // namespace malloc_kernels
