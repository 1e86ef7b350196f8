"""What ran a benchmark: the CPU model and the C++ kernels' ISA variant, written next to every result."""
import os

from malloc_kernels.core.machine import cpu_model  # noqa: F401  (re-exported for the benchmarks)


def isa_variant() -> str:
    """``MALLOC_KERNELS_ISA`` when set, else the build's automatic choice (the best variant this CPU runs, when the
    extension lists them)."""
    import torch
    chosen = os.environ.get("MALLOC_KERNELS_ISA", "auto")
    try:
        import malloc_kernels._C  # noqa: F401
        supported = list(torch.ops.malloc_kernels.cpu_isa_supported())
    except (ImportError, AttributeError, RuntimeError):
        flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
        return f"{chosen} (build dispatch; CPU has {'avx2' if ' avx2' in flags else 'no avx2'}" \
               f"{', avx512f' if ' avx512f' in flags else ''})"
    return f"{chosen} -> {supported[-1]}" if chosen == "auto" and supported else chosen


def isa_variants() -> dict:
    """{kernel family: the ISA variant of the C++ CPU kernels that runs now} (MALLOC_KERNELS_ISA, read per call, capped
    by each family's best build), plus "supported": the variants this CPU can run. Empty when the extension is
    missing."""
    import torch
    try:
        import malloc_kernels._C  # noqa: F401  (registers the ops)
        ops = torch.ops.malloc_kernels
        out = {fam: ops.cpu_isa_variant(fam) for fam in ("attention", "train_attention", "cross_entropy", "pkm_topk",
                                                        "pkm_gather", "wkv", "lsh_attention")}
        out["supported"] = ",".join(ops.cpu_isa_supported())
        return out
    except (ImportError, AttributeError, RuntimeError):
        return {}


def machine_label() -> str:
    import torch
    return f"{cpu_model()}, ISA {isa_variant()}, {torch.get_num_threads()} torch threads"
