// Torch-side reading of MALLOC_KERNELS_ISA (malloc_kernels/isa.h) for one op call.
#pragma once

#include <stdexcept>

#include <c10/util/Exception.h>

#include "malloc_kernels/isa.h"

namespace malloc_kernels {
namespace torch_glue {

// The variant requested for this call (read now, never cached); an unknown or unsupported value raises ValueError
// naming the variable.
inline isa::Isa requested_isa() {
  try {
    return isa::isa_from_env();
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
  return isa::Isa::Auto;
}

}  // namespace torch_glue
}  // namespace malloc_kernels
