"""Re-run of the hostile-input probe families (issue acceptance), printing counts per family:

    python tests/probe_hostile.py [--flips-per-seed N]

1. truncations: every prefix of every seed blob;
2. bit flips with the CRC recomputed: every bit of the header and of the first 64 body bytes (the lengths, the
   first payload rows), plus 100 random bits per seed blob (options);
3. crafted headers: every header field and the first 8 body int32s set to edge values (0, 1, -1, 2^31-1, 2^32-1,
   10,000, ...) with the CRC recomputed, per seed;
4. bad arguments: compress / attention / cache_from_bytes with wrong types and out-of-range integers;
5. CLI: malloc-eval with bad options and files, in fresh processes.

Every blob goes through ``blob_oracle.check_blob`` (refused with ValueError/TypeError, or accepted, bounded, byte-exact
and served identically by every backend); the peak Python allocation (tracemalloc) and the accepted caches' tensor
storage are compared with 64x the blob. Exit code 1 if anything failed.
"""
import argparse
import os

os.environ.setdefault("TRITON_INTERPRET", "1")        # the Triton backend on CPU tensors, as the suite runs it
import random
import subprocess
import sys
import tempfile
import tracemalloc

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import blob_oracle as bo  # noqa: E402

import malloc_kernels as mk  # noqa: E402
from malloc_kernels.cache.serialize import CRC_BYTES, HEADER_BYTES  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


COMPILED = tuple(b for b in mk.available_backends() if b in ("cpu", "cuda"))


class Tally:
    """Counts per family. Every blob gets the decode / bound / round-trip oracle; accepted ones are also served:
    every ``serve_every``-th by the compiled backends, every ``triton_every``-th by every available backend (the
    Triton interpreter takes about a second per call here)."""

    def __init__(self, serve_every=4, triton_every=200):
        self.counts = {}
        self.failures = []
        self.max_ratio = 0.0          # over rejected blobs of at least 1 KB (smaller ones: interpreter noise)
        self.max_peak = 0
        self.n = 0
        self.served = {"compiled": 0, "all": 0}
        self.serve_every, self.triton_every = serve_every, triton_every

    def blob(self, family, blob, serve=True):
        self.n += 1
        backends = None if self.n % self.triton_every == 0 else COMPILED
        serve = serve and (backends is None or self.n % self.serve_every == 0)
        if serve:
            self.served["all" if backends is None else "compiled"] += 1
        tracemalloc.start()
        try:
            verdict = bo.check_blob(blob, seed=len(blob), serve=serve, backends=backends)
        except Exception as e:                                            # noqa: BLE001 -- every failure counts
            verdict = "FAIL"
            self.failures.append((family, f"{type(e).__name__}: {e}"[:300]))
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        # the oracle allocates the serving tensors itself; only rejections are pure decoding
        if verdict == "rejected":
            self.max_peak = max(self.max_peak, peak)
            if len(blob) >= 1024:
                self.max_ratio = max(self.max_ratio, peak / len(blob))
            if peak > 64 * len(blob) + 64 * 1024:
                self.failures.append((family, f"peak {peak} bytes for a {len(blob)}-byte blob"))
        c = self.counts.setdefault(family, {})
        c[verdict] = c.get(verdict, 0) + 1


def flip(blob, bit):
    b = bytearray(blob[:-CRC_BYTES])
    b[bit // 8] ^= 1 << (bit % 8)
    return bo.with_crc(bytes(b))


def bad_args(t):
    k = torch.randn(1, 1, 4, 8)
    probes = [
        lambda: mk.compress(k, k, None), lambda: mk.compress(k, k, "none", seed=2 ** 70),
        lambda: mk.compress(k, k, "random", budget=2, seed=-1),
        lambda: mk.compress(k, k, "none", positions=torch.tensor([0, 1, 2, 2 ** 31])),
        lambda: mk.compress(k, k, "none", positions=torch.tensor([0, 1, 2, 2 ** 40])),
        lambda: mk.compress(k, k, "none", positions=torch.tensor([0, 1, 2, -2 ** 31 - 1])),
        lambda: mk.compress(k, k, "nosuch"), lambda: mk.compress(k, k, "int4", group_size=3),
        lambda: mk.compress(k, k, "h2o", budget=float("nan")), lambda: mk.compress(k, k, "h2o", budget=-1),
        lambda: mk.compress(k, k, 5), lambda: mk.compress(k.int(), k, "none"),
        lambda: mk.cache_from_bytes("not bytes"), lambda: mk.cache_from_bytes(b""), lambda: mk.cache_from_bytes(None),
        lambda: mk.attention(k, k, k, cache="x"), lambda: mk.attention(k, k, k, kind="nosuch"),
        lambda: mk.attention(k, k, k, scale=float("nan"), backend="cpu"),
    ]
    for i, f in enumerate(probes):
        try:
            f()
            verdict = "accepted"
        except (ValueError, TypeError):
            verdict = "rejected"
        except Exception as e:                                            # noqa: BLE001
            verdict = "FAIL"
            t.failures.append(("bad args", f"probe {i}: {type(e).__name__}: {e}"[:300]))
        c = t.counts.setdefault("bad args", {})
        c[verdict] = c.get(verdict, 0) + 1


def cli(t):
    tmp = tempfile.mkdtemp(prefix="mk_cli_probe_")
    binary = os.path.join(tmp, "binary.txt")
    with open(binary, "wb") as f:
        f.write(bytes(range(256)) * 8)
    empty = os.path.join(tmp, "empty.txt")
    open(empty, "wb").close()
    wrong = os.path.join(tmp, "ratings.dat")
    with open(wrong, "w") as f:
        f.write("1::2\nnot a rating line\n")
    cases = [["--data", "/nonexistent"], ["--data", binary], ["--data", empty], ["--data", wrong],
             ["--data", tmp], ["--budgets", "0"], ["--budgets", "-0.5"], ["--budgets", "1.5"], ["--budgets", "nan"],
             ["--budgets", ""], ["--budgets", "0.5,,0.25"], ["--methods", ""], ["--methods", "foo"], ["--bits", "3"],
             ["--bits", ""], ["--variants", "foo"], ["--variants", ""], ["--epochs", "-1"], ["--users", "0"],
             ["--seed", str(2 ** 70)], ["--max-len", "x"], ["--model", ""], ["--time-budget-min", "inf"]]
    for argv in cases:
        p = subprocess.run([sys.executable, "-m", "malloc_kernels.eval", *argv, "--out", os.path.join(tmp, "o")],
                           capture_output=True, text=True, cwd=ROOT)
        lines = p.stderr.strip().splitlines()
        ok = p.returncode == 2 and len(lines) == 1 and lines[0].startswith("malloc-eval: error: ") \
            and "Traceback" not in p.stderr
        if not ok:
            t.failures.append(("cli", f"{argv}: rc={p.returncode} stderr={p.stderr[-300:]!r}"))
        c = t.counts.setdefault("cli", {})
        key = "one-line error, exit 2" if ok else "FAIL"
        c[key] = c.get(key, 0) + 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flips-per-seed", type=int, default=100)
    ap.add_argument("--header-body-bytes", type=int, default=64, help="bytes after the header whose every bit flips")
    ap.add_argument("--truncation-step", type=int, default=1, help="every n-th prefix (plus the last 64)")
    ap.add_argument("--no-cli", action="store_true")
    args = ap.parse_args()
    rng = random.Random(0)
    t = Tally()
    seeds = bo.seed_blobs()
    for s in seeds:
        for n in sorted(set(range(0, len(s), args.truncation_step)) | set(range(max(0, len(s) - 64), len(s)))):
            t.blob("truncation", s[:n], serve=False)
        nbits = 8 * (len(s) - CRC_BYTES)
        bits = list(range(8 * min(len(s) - CRC_BYTES, HEADER_BYTES + args.header_body_bytes)))
        bits += [rng.randrange(nbits) for _ in range(args.flips_per_seed)]
        for bit in bits:
            t.blob("bit flip + CRC", flip(s, bit))
        for field in bo.HEADER_FIELDS:
            for v in bo.EDGE_VALUES + (2 ** 64 - 1, 2 ** 63):
                t.blob("crafted header", bo.set_field(s, field, v))
        for i in range(8):
            for v in (-1, 0, 1, 2 ** 31 - 1, -2 ** 31, 10 ** 8, 10_000):
                t.blob("crafted lengths", bo.set_body_int32(s, i, v))
        for n in (HEADER_BYTES, HEADER_BYTES + 4, len(s) // 2, len(s) * 2, len(s) * 64):
            t.blob("resized body", bo.resize_body(s, n))
    bad_args(t)
    if not args.no_cli:
        cli(t)
    for fam, c in t.counts.items():
        print(f"{fam:18s} " + ", ".join(f"{k}: {v}" for k, v in sorted(c.items())))
    print(f"blobs: {t.n}; served by the compiled backends {t.served['compiled']}, by every backend "
          f"{t.served['all']}")
    print(f"rejected blobs: max Python peak {t.max_peak} bytes; max peak / blob size over blobs >= 1 KB "
          f"{t.max_ratio:.2f}x")
    print(f"failures: {len(t.failures)}")
    for fam, msg in t.failures[:20]:
        print(f"  [{fam}] {msg}")
    return 1 if t.failures else 0


if __name__ == "__main__":
    sys.exit(main())
