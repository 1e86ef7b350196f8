"""Compressed KV cache: the public ``KVCache``, quantize/pack (PyTorch reference), byte accounting, serialisation."""
from ..core.formats import FORMATS, format_bits, packed_width  # noqa: F401
from .types import KVCache  # noqa: F401
