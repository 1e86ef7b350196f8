"""Compressed KV cache types, quantize/pack (PyTorch reference), byte accounting and serialisation."""
from .types import KVCache, FORMATS, format_bits, packed_width  # noqa: F401
