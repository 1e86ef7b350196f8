"""The cache-format table: the one place a KV-cache payload format is described.

Every layer reads its formats from here: ``KVCache`` validation and byte accounting, the serialiser's wire codes,
the PyTorch packer, the launchers of the C++ / Triton / CUDA kernels (which receive ``CacheFormat.code``, never a
name) and, through the generated header ``csrc/include/malloc_kernels/formats.h``, the C++ and CUDA sources. The
codes are also the wire codes of the serialised cache (``cache/serialize.py``), so they never change: a new format
takes the next free code.

Columns (``CacheFormat``):

* ``name`` -- the string users pass (``compress(k, v, "int4")``, ``KVCache.k_format``);
* ``code`` -- the numeric code (wire format, kernels' constexpr / enum value);
* ``bits`` -- bits per stored element (0: the tensor's own floating dtype, no codes);
* ``code_dtype`` -- what a stored code is: ``"float"`` (the value itself), ``"uint"`` (unsigned integer code of an
  affine map), ``"e4m3"`` (fp8 e4m3fn bit pattern) or ``"e2m1"`` (fp4 e2m1 bit pattern, sign in bit 3);
* ``k_axes`` -- how keys may be grouped: ``"token"`` (one scale per entry and group of channels along D) and/or
  ``"channel"`` (KIVI: one per group of entries and channel); values are always grouped per token;
* ``group_size`` -- a group size fixed by the format (NVFP4: 16), or ``None`` when each cache chooses its own;
* ``partial_group`` -- whether the last token-axis group along D may be shorter than the group size (so D need not
  be a multiple of it); otherwise the group size must divide D;
* ``has_zero`` -- whether a zero point is stored next to each scale (``x = code * scale + zero``);
* ``scale_dtype`` -- the stored dtype of scales and zeros (``torch.float16``; ``torch.uint8`` holding e4m3fn bit
  patterns for NVFP4), ``None`` for unscaled formats.

NVFP4 (code 5; the KV format FlashInfer serves on Blackwell): e2m1 codes, values ``+-{0, 0.5, 1, 1.5, 2, 3, 4, 6}``,
two per byte, element ``2i`` in the low nibble; one e4m3fn scale per 16 consecutive values along D for keys and
values alike, no zero point. With D not a multiple of 16 the last group holds the ``D % 16`` remaining values and
has its own scale (``ceil(D / 16)`` scales per row). See ``cache/quant.py`` for the exact rounding.

``python -m malloc_kernels.core.formats`` rewrites the C++ header from this table (``--check`` only compares);
``tests/test_formats.py`` fails when the committed header differs from what the table generates.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch


@dataclass(frozen=True)
class CacheFormat:
    """One row of the format table (see the module docstring for the meaning of each column)."""

    name: str
    code: int
    bits: int
    code_dtype: str
    k_axes: Tuple[str, ...]
    group_size: Optional[int]
    partial_group: bool
    has_zero: bool
    scale_dtype: Optional[torch.dtype]

    @property
    def quantized(self) -> bool:
        return self.bits > 0

    @property
    def scale_bytes(self) -> int:
        """Bytes of one group's stored scale (and zero point, if any); 0 for unscaled formats."""
        if self.scale_dtype is None:
            return 0
        per = torch.empty((), dtype=self.scale_dtype).element_size()
        return per * (2 if self.has_zero else 1)

    def packed_width(self, head_dim: int) -> int:
        """Bytes per stored row of ``head_dim`` codes (quantized formats only)."""
        if not self.quantized:
            raise ValueError(f"format {self.name!r} stores floats of the tensor's dtype, not packed codes")
        return math.ceil(head_dim * self.bits / 8)

    def token_groups(self, head_dim: int, group_size: int) -> int:
        """Scales per entry for token-axis groups of ``group_size`` channels (a partial last group counts)."""
        return math.ceil(head_dim / group_size) if self.partial_group else head_dim // group_size


#: The table. Codes are the serialised cache's wire codes: append rows, never renumber.
TABLE: Tuple[CacheFormat, ...] = (
    CacheFormat("float", 0, 0, "float", ("token", "channel"), None, False, False, None),
    CacheFormat("int8", 1, 8, "uint", ("token", "channel"), None, False, True, torch.float16),
    CacheFormat("int4", 2, 4, "uint", ("token", "channel"), None, False, True, torch.float16),
    CacheFormat("int2", 3, 2, "uint", ("token", "channel"), None, False, True, torch.float16),
    CacheFormat("fp8", 4, 8, "e4m3", ("token", "channel"), None, False, False, torch.float16),
    CacheFormat("nvfp4", 5, 4, "e2m1", ("token",), 16, True, False, torch.uint8),
)

BY_NAME: Dict[str, CacheFormat] = {f.name: f for f in TABLE}
BY_CODE: Dict[int, CacheFormat] = {f.code: f for f in TABLE}
NAMES: Tuple[str, ...] = tuple(f.name for f in TABLE)
FLOAT = BY_NAME["float"]
NVFP4 = BY_NAME["nvfp4"]

#: e2m1 magnitudes by code (bits 0-2); bit 3 is the sign.
E2M1_VALUES: Tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
#: largest e2m1 magnitude and largest e4m3fn value: NVFP4's scale is amax / 6 and must not exceed 448
E2M1_MAX = 6.0
E4M3_MAX = 448.0


# Names every layer uses, derived from the table.
FLOAT_FORMAT = "float"
FP8_FORMAT = "fp8"
NVFP4_FORMAT = "nvfp4"
INT_FORMATS = {f.name: f.bits for f in TABLE if f.code_dtype == "uint"}
FORMATS = NAMES
K_AXES = ("token", "channel")
SCALE_DTYPE = torch.float16          # scales/zeros of the integer and fp8 formats (NVFP4: e4m3 bytes, see the table)


def format_bits(fmt: str) -> int:
    """Bits per stored element of a payload format (float formats: 0, meaning 'the tensor's own dtype')."""
    return get(fmt).bits


def packed_width(head_dim: int, fmt: str) -> int:
    """Bytes per stored row of ``head_dim`` elements in a quantized format."""
    return math.ceil(head_dim * format_bits(fmt) / 8)


def get(fmt: Union[str, int, CacheFormat], arg: str = "format") -> CacheFormat:
    """The table row of a format given by name, code or row; ValueError naming ``arg`` if there is none."""
    if isinstance(fmt, CacheFormat):
        return fmt
    if isinstance(fmt, str) and fmt in BY_NAME:
        return BY_NAME[fmt]
    if isinstance(fmt, int) and not isinstance(fmt, bool) and fmt in BY_CODE:
        return BY_CODE[fmt]
    raise ValueError(f"unknown cache format {fmt!r} for {arg}; expected one of {NAMES} or codes "
                     f"{tuple(BY_CODE)}")


def code(fmt: Union[str, int, CacheFormat], arg: str = "format") -> int:
    """The numeric code of a format (what kernels and the wire format take)."""
    return get(fmt, arg).code


# ---- the C++ header -------------------------------------------------------------------------------------------
HEADER_PATH = Path(__file__).resolve().parents[2] / "csrc" / "include" / "malloc_kernels" / "formats.h"
_CODE_DTYPE_ENUM = {"float": "kCodeFloat", "uint": "kCodeUint", "e4m3": "kCodeE4M3", "e2m1": "kCodeE2M1"}


def header_text() -> str:
    """The C++ header generated from ``TABLE`` (byte for byte what ``csrc/include/malloc_kernels/formats.h``
    holds)."""
    def scale_bytes(f):
        return 0 if f.scale_dtype is None else torch.empty((), dtype=f.scale_dtype).element_size()

    lines = [
        "// GENERATED by `python -m malloc_kernels.core.formats` from the format table in",
        "// malloc_kernels/core/formats.py: do not edit (tests/test_formats.py checks it is up to date).",
        "// Framework-free, host and device: the C++ and CUDA kernels take these codes, never format names.",
        "#pragma once",
        "",
        "#include <stdint.h>",
        "",
        "namespace malloc_kernels {",
        "namespace formats {",
        "",
        "// Numeric codes of the cache payload formats (also the serialised cache's wire codes).",
        "enum CacheFormat : int {",
    ]
    lines += [f"  k{f.name.upper()} = {f.code}," for f in TABLE]
    lines += [
        "};",
        "",
        f"constexpr int kNumFormats = {len(TABLE)};",
        "",
        "// What a stored code is.",
        "enum CodeDtype : int { kCodeFloat = 0, kCodeUint = 1, kCodeE4M3 = 2, kCodeE2M1 = 3 };",
        "",
        "// Per format, indexed by code.",
    ]

    def arr(ctype, name, vals, comment):
        return [f"// {comment}", f"constexpr {ctype} {name}[kNumFormats] = {{{', '.join(vals)}}};"]

    lines += arr("const char*", "kName", [f'"{f.name}"' for f in TABLE], "format name (error messages only)")
    lines += arr("int", "kBits", [str(f.bits) for f in TABLE], "bits per stored element (0: the tensor's own float)")
    lines += arr("int", "kCodeDtype", [_CODE_DTYPE_ENUM[f.code_dtype] for f in TABLE], "code dtype")
    lines += arr("bool", "kChannelKeys", ["true" if "channel" in f.k_axes else "false" for f in TABLE],
                 "keys may be grouped per channel (KIVI)")
    lines += arr("int", "kFixedGroupSize", [str(f.group_size or 0) for f in TABLE],
                 "group size fixed by the format (0: chosen per cache)")
    lines += arr("bool", "kPartialGroup", ["true" if f.partial_group else "false" for f in TABLE],
                 "last token-axis group along D may be partial (scales per row = ceil(D / G))")
    lines += arr("bool", "kHasZero", ["true" if f.has_zero else "false" for f in TABLE], "zero point stored")
    lines += arr("int", "kScaleBytes", [str(scale_bytes(f)) for f in TABLE],
                 "bytes of one stored scale (and of one zero): 2 = float16 bits, 1 = e4m3fn bits, 0 = none")
    lines += [
        "",
        "// Bytes of one stored row of d codes (quantized formats).",
        "constexpr int64_t packed_width(int format, int64_t d) { return (d * kBits[format] + 7) / 8; }",
        "",
        "// Token-axis scale groups per row of d values with groups of g.",
        "constexpr int64_t token_groups(int format, int64_t d, int64_t g) {",
        "  return kPartialGroup[format] ? (d + g - 1) / g : d / g;",
        "}",
        "",
        "}  // namespace formats",
        "}  // namespace malloc_kernels",
        "",
    ]
    return "\n".join(lines)


def _main(argv) -> int:
    text = header_text()
    if "--check" in argv:
        ok = HEADER_PATH.exists() and HEADER_PATH.read_text() == text
        print(f"{HEADER_PATH}: {'up to date' if ok else 'OUT OF DATE (run python -m malloc_kernels.core.formats)'}")
        return 0 if ok else 1
    HEADER_PATH.write_text(text)
    print(f"wrote {HEADER_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
