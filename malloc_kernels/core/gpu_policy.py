"""Which GPU kernel ``backend="auto"`` runs for a cache decode: one rule, read by the CUDA launcher
(``ops/cuda.py: preferred``) and by the Triton AOT report (``triton/report.py``), so the report names the kernel the
dispatcher picks.

The rule follows the cost models of the two kernels compiled for sm_80 / sm_90 (no GPU has measured either):
``benchmarks/results/cuda_ptxas.md`` bounds the CUDA decode's issue time per key between its tensor-core work alone
and its whole static sub-step (every branch); ``benchmarks/results/triton_report.md`` counts Triton's specialised
decode loop exactly. Only where even the CUDA kernel's upper bound lies below Triton's issue floor on both
architectures does the CUDA kernel claim the call: a quantized cache at 64 < D <= 128 and one 16-row tile of
(query heads of a kv head) x (request tokens) -- the dequantizing pass is shared by the block there, while Triton's
decode dequantizes per 16-row program with fewer keys per instruction. At D <= 64 (README decode) and for float
caches (both at the memory floor) the intervals overlap Triton's, and Triton stays the default.
"""


def cuda_decode_preferred(quantized_cache: bool, head_dim: int, rows: int) -> bool:
    """Whether the CUDA C++ decode claims a cache decode of ``rows = (Hq / Hkv) * Lq`` query rows per kv head."""
    return quantized_cache and 64 < head_dim <= 128 and 1 <= rows <= 16
