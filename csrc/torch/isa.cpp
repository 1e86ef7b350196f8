// Ops reporting the CPU kernels' ISA variants (malloc_kernels/isa.h):
//   cpu_isa_supported() -> str[]      the variants this CPU can run ("portable", "avx2", "avx512"), in that order
//   cpu_isa_variant(str family) -> str the variant `family` runs now (MALLOC_KERNELS_ISA read now, capped by the
//                                      family's best build); families: attention, train_attention, cross_entropy, pkm
#include <string>
#include <vector>

#include <torch/library.h>

#include "isa_glue.h"

namespace {

using malloc_kernels::isa::Isa;

std::vector<std::string> cpu_isa_supported() { return malloc_kernels::isa::supported_names(); }

// The best build of each CPU kernel family.
Isa family_best(const std::string& family) {
  if (family == "attention" || family == "train_attention" || family == "pkm") return Isa::Avx512;
  if (family == "cross_entropy") return Isa::Avx2;
  TORCH_CHECK_VALUE(false, "cpu_isa_variant: unknown family '", family,
                    "' (expected attention, train_attention, cross_entropy or pkm)");
  return Isa::Portable;
}

std::string cpu_isa_variant(const std::string& family) {
  const Isa best = family_best(family);
  return malloc_kernels::isa::name(
      malloc_kernels::isa::isa_for_family(malloc_kernels::torch_glue::requested_isa(), best));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(malloc_kernels, m) {
  m.def("cpu_isa_supported() -> str[]", &cpu_isa_supported);
  m.def("cpu_isa_variant(str family) -> str", &cpu_isa_variant);
}
