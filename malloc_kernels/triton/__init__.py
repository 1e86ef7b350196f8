"""Triton kernels and launchers (the library's GPU path; CPU tensors run them under ``TRITON_INTERPRET=1``).

Modules (imported lazily by the dispatcher, so nothing here imports Triton or queries a device):
``attention`` (``supports``/``run`` launcher), ``attention_common`` (the forward kernel, split-K for decode or
query-tiled for append, and the device helpers: dequantization of every cache format, exact HSTU bias, masks),
``attention_decode`` (merge of the split-K partials), ``attention_stats`` (per-key mass), ``quantize_pack``
(bit-exact GPU packer), ``aot`` (ahead-of-time compilation; the ``aot_specs()`` convention) and ``report``
(``python -m malloc_kernels.triton.report``).
"""
