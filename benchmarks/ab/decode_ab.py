"""A/B decode timing of two source trees (each with its own built ``_C``), interleaved round by round in two
persistent worker processes so that machine-load drift hits both alike:

    python benchmarks/ab/decode_ab.py TREE_A TREE_B [--rounds 7] [--threads 2] [--json OUT]
        [--gqa B,Hq,Hkv,D,N [--formats int8,int4,int2]] [--isa avx512|avx2|portable]

Workloads (decode_worker.py): B=32, Hq=Hkv=8, D=64, N=4096 cache, Lq=1 decode over none/int8/int4/int2/kivi4,
Lq=16 append over int4, HSTU decode over int8; median of 5 calls per round. ``--gqa``: instead, Lq=1 decode at
that shape (Hq / Hkv query rows per kv head, e.g. 32,32,8,64,4096) over each of ``--formats``. ``--isa``: the
MALLOC_KERNELS_ISA of both workers (default: inherited). Prints per-workload ratios B/A (< 1: B faster): the ratio
of the best times and the median of the per-round ratios."""
import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

WORKLOADS = ["decode none", "decode int8", "decode int4", "decode int2", "decode kivi4", "append int4 Lq16",
             "hstu decode int8"]


def start_worker(tree: Path, threads: int, shape_args: list, isa) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS=str(threads))
    if isa:
        env["MALLOC_KERNELS_ISA"] = isa
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("decode_worker.py")), str(threads)]
                            + shape_args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=tree)
    if proc.stdout.readline().strip() != "ready":
        raise SystemExit(f"decode_ab: error: the worker for {tree} did not start")
    return proc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tree_a", type=Path)
    ap.add_argument("tree_b", type=Path)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="write the per-workload figures here")
    ap.add_argument("--gqa", help="B,Hq,Hkv,D,N: Lq=1 decode at this shape instead of the default workloads")
    ap.add_argument("--formats", default="int8,int4,int2", help="with --gqa: the compress methods timed")
    ap.add_argument("--isa", help="MALLOC_KERNELS_ISA of both workers (default: inherited)")
    args = ap.parse_args()
    trees = {"A": args.tree_a.resolve(), "B": args.tree_b.resolve()}
    if args.gqa:
        shape = args.gqa.split(",")
        if len(shape) != 5 or not all(x.isdigit() for x in shape):
            raise SystemExit("decode_ab: error: --gqa takes B,Hq,Hkv,D,N (five integers)")
        shape_args = shape + [args.formats]
        workloads = [f"decode {m}" for m in args.formats.split(",")]
    else:
        shape_args, workloads = [], WORKLOADS
    print(f"shape: {'B,Hq,Hkv,D,N = ' + args.gqa if args.gqa else 'default workloads'}; "
          f"MALLOC_KERNELS_ISA={args.isa or os.environ.get('MALLOC_KERNELS_ISA', 'auto')}; {args.threads} threads")
    procs = {name: start_worker(path, args.threads, shape_args, args.isa) for name, path in trees.items()}
    times = {w: {t: [] for t in trees} for w in workloads}
    for rnd in range(args.rounds):
        for w in workloads:
            for t in (["A", "B"] if rnd % 2 == 0 else ["B", "A"]):
                procs[t].stdin.write(f"{w} 5\n")
                procs[t].stdin.flush()
                times[w][t].append(float(procs[t].stdout.readline()))
    out = {}
    for w in workloads:
        a, b = times[w]["A"], times[w]["B"]
        per_round = statistics.median(y / x for x, y in zip(a, b))
        out[w] = dict(a_ms_min=min(a) * 1e3, b_ms_min=min(b) * 1e3, ratio_of_mins=min(b) / min(a),
                      ratio_median_of_rounds=per_round, rounds=len(a))
        print(f"{w:20s} A {min(a) * 1e3:8.3f} ms  B {min(b) * 1e3:8.3f} ms  B/A of best {min(b) / min(a):.3f}  "
              f"median of per-round B/A {per_round:.3f}")
    for p in procs.values():
        p.stdin.close()
        p.wait()
    if args.json:
        args.json.write_text(json.dumps(dict(trees={k: str(v) for k, v in trees.items()}, gqa=args.gqa,
                                             isa=args.isa or os.environ.get("MALLOC_KERNELS_ISA", "auto"),
                                             threads=args.threads, results=out), indent=1))


if __name__ == "__main__":
    main()
