// Ops reporting the CPU kernels' ISA variants (malloc_kernels/isa.h):
//   cpu_isa_supported() -> str[]      the variants this CPU can run ("portable", then "avx2", "avx512" on x86 or
//                                      "neon" on aarch64), in that order
//   cpu_isa_variant(str family) -> str the variant `family` runs now (MALLOC_KERNELS_ISA read now, capped by the
//                                      family's best build); families: isa.h's Family table (attention,
//                                      train_attention, cross_entropy, pkm_topk, pkm_gather, wkv, lsh_attention)
#include <string>
#include <vector>

#include <torch/library.h>

#include "isa_glue.h"

namespace {

std::vector<std::string> cpu_isa_supported() { return malloc_kernels::isa::supported_names(); }

std::string cpu_isa_variant(const std::string& family) {
  malloc_kernels::isa::Family f;
  if (!malloc_kernels::isa::family_from_name(family, &f)) {
    std::string names;
    for (auto g : malloc_kernels::isa::families()) names += std::string(names.empty() ? "" : ", ") + malloc_kernels::isa::family_name(g);
    TORCH_CHECK_VALUE(false, "cpu_isa_variant: unknown family '", family, "' (expected one of ", names, ")");
  }
  return malloc_kernels::isa::name(
      malloc_kernels::isa::isa_for_family(malloc_kernels::torch_glue::requested_isa(), f));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(malloc_kernels, m) {
  m.def("cpu_isa_supported() -> str[]", &cpu_isa_supported);
  m.def("cpu_isa_variant(str family) -> str", &cpu_isa_variant);
}
