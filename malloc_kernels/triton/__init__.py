"""Triton kernels and launchers (the library's GPU path; CPU tensors run them under ``TRITON_INTERPRET=1``).

Modules (imported lazily by the dispatcher, so nothing here imports Triton or queries a device):
``attention`` (``supports``/``run`` launcher), ``attention_decode`` (split-K flash-decoding + merge),
``attention_append`` (query-tiled), ``attention_stats`` (per-key mass), ``attention_common`` (device helpers:
dequantization of every cache format, exact HSTU bias, masks), ``quantize_pack`` (bit-exact GPU packer),
``aot`` (ahead-of-time compilation; the ``aot_specs()`` convention) and ``report``
(``python -m malloc_kernels.triton.report``).
"""
