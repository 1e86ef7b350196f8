"""The framing every serialised format of the package shares (cache blobs, serving-state envelopes, RWKV states).

A blob is a little-endian header that starts with ``(magic, version, ...)``, a body, and a CRC32 of every byte
before it. The first checks a hostile blob meets -- its type, its minimum size, the magic, the version, the size the
header claims, the CRC -- live here once, so the three codecs refuse the same faults with the same words
(``TypeError`` for a non-bytes argument, ``ValueError`` naming the fault otherwise). Field-by-field checks of a
format's own header stay with the format.
"""
from __future__ import annotations

import struct
import zlib

CRC = struct.Struct("<I")


def as_blob(b, name: str) -> bytes:
    """``b`` as ``bytes`` (bytearray / memoryview copied); ``TypeError`` naming ``name`` otherwise."""
    if isinstance(b, (bytearray, memoryview)):
        b = bytes(b)
    if not isinstance(b, bytes):
        raise TypeError(f"{name} must be bytes, got {type(b).__name__}")
    return b


def open_frame(b: bytes, header: struct.Struct, magic: bytes, version: int, what: str) -> tuple:
    """The header fields of ``b`` once it is long enough for a header and a CRC and carries ``magic`` and
    ``version`` (its first two fields); ``what`` names the format in the errors."""
    need = header.size + CRC.size
    if len(b) < need:
        raise ValueError(f"{what} truncated: {len(b)} bytes, the framing alone needs {need}")
    fields = header.unpack_from(b, 0)
    if fields[0] != magic:
        raise ValueError(f"not a {what}: magic {fields[0]!r} != {magic!r}")
    if fields[1] != version:
        raise ValueError(f"unsupported {what} version {fields[1]} (this build reads version {version})")
    return fields


def check_size_and_crc(b: bytes, total: int, what: str) -> None:
    """``b`` is exactly the ``total`` bytes its header claims and its last 4 bytes are the CRC32 of the rest."""
    if len(b) < total:
        raise ValueError(f"{what} truncated: got {len(b)} bytes, its header says a size of {total}")
    if len(b) > total:
        raise ValueError(f"{what} size mismatch: {len(b) - total} trailing bytes after the {total} its header says")
    if zlib.crc32(memoryview(b)[:total - CRC.size]) & 0xFFFFFFFF != CRC.unpack_from(b, total - CRC.size)[0]:
        raise ValueError(f"{what} is corrupt: CRC32 mismatch")


def seal(body: bytes) -> bytes:
    """``body`` followed by its CRC32."""
    return body + CRC.pack(zlib.crc32(body) & 0xFFFFFFFF)
