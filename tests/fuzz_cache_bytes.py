"""Coverage-guided fuzzing of ``cache_from_bytes`` with atheris (libFuzzer for Python), bounded in time.

    python tests/fuzz_cache_bytes.py -max_total_time=60      # .ci/run runs this (a fixed, short time)

Inputs are raw blobs (the corpus starts from valid serialised caches of every form, ``blob_oracle.seed_blobs``);
libFuzzer mutates them guided by the coverage of ``malloc_kernels.cache`` and the oracle of ``blob_oracle``
decides: refused with ``ValueError``/``TypeError``, or accepted, bounded, byte-exact and served identically by
every backend. Half of the inputs get their CRC recomputed first, so the fuzzer gets past the checksum into the
structure checks. A violation raises, and atheris reports the crashing input and exits non-zero.
"""
import os
import sys
import tempfile

import atheris

import malloc_kernels  # noqa: E402
from malloc_kernels.cache import serialize, types  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import blob_oracle as bo  # noqa: E402

# coverage feedback from the decoder and the cache checks only (instrumenting every import would also rewrite the
# policies and torch glue, which the harness does not target)
for fn in (serialize.cache_from_bytes, serialize._check_header, serialize._check_unused_bits,
           serialize._Segment.__init__, serialize._Segment.read, types.KVCache.validate,
           types.KVCache.check_contents, types.KVCache._check_values, types.KVCache._validate_scales):
    atheris.instrument_func(fn)

# the compiled backends (the Triton interpreter is too slow for a coverage-guided loop; the suite covers it)
COMPILED = tuple(b for b in malloc_kernels.available_backends() if b in ("cpu", "cuda"))


def one_input(data: bytes) -> None:
    # first byte: bit 0 set = recompute the CRC of the rest; the rest is the blob
    if not data or len(data) > 1 << 16:
        return
    blob = data[1:]
    if data[0] & 1 and len(blob) >= 4:
        blob = bo.with_crc(blob[:-4])
    bo.check_blob(blob, seed=len(blob), serve=True, backends=COMPILED)


def main() -> None:
    corpus = tempfile.mkdtemp(prefix="mk_fuzz_corpus_")
    for i, b in enumerate(bo.seed_blobs()):
        with open(os.path.join(corpus, f"seed{i}"), "wb") as f:
            f.write(bytes([0]) + b)                     # first byte even: the blob as is
    atheris.Setup(sys.argv + [corpus], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
