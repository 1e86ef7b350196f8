"""A/B decode timing of two source trees (each with its own built _C), interleaved round by round in two persistent
worker processes so machine-load drift hits both alike:

    python benchmarks/ab/decode_ab.py ROUNDS      # trees: /work/main (A) and this worktree (B), 2 threads each

Workloads (decode_worker.py): B=32, Hq=Hkv=8, D=64, N=4096 cache, Lq=1 decode over none/int8/int4/int2/kivi4,
Lq=16 append over int4, HSTU decode over int8; median of 5 calls per round. Prints per-workload ratios."""
import subprocess, sys, statistics, json, os
trees = {"main": "/work/main", "hostile": str(__import__("pathlib").Path(__file__).resolve().parents[2])}
procs = {}
for name, path in trees.items():
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="2")
    procs[name] = subprocess.Popen([sys.executable, str(__import__("pathlib").Path(__file__).with_name("decode_worker.py")), "2"], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True, env=env, cwd=path)
    assert procs[name].stdout.readline().strip() == "ready"
names = ["decode none", "decode int8", "decode int4", "decode int2", "decode kivi4", "append int4 Lq16", "hstu decode int8"]
res = {n: {t: [] for t in trees} for n in names}
for rnd in range(int(sys.argv[1]) if len(sys.argv) > 1 else 7):
    for n in names:
        order = list(trees) if rnd % 2 == 0 else list(reversed(list(trees)))
        for t in order:
            procs[t].stdin.write(f"{n} 5\n"); procs[t].stdin.flush()
            res[n][t].append(float(procs[t].stdout.readline()))
out = {}
for n in names:
    m, h = statistics.median(res[n]["main"]), statistics.median(res[n]["hostile"])
    ratios = [b / a for a, b in zip(res[n]["main"], res[n]["hostile"])]
    mn, hn = min(res[n]["main"]), min(res[n]["hostile"])
    out[n] = dict(main_ms_median=m * 1e3, hostile_ms_median=h * 1e3, main_ms_min=mn * 1e3, hostile_ms_min=hn * 1e3,
                  ratio_median_of_rounds=statistics.median(ratios), ratio_of_mins=hn / mn,
                  rounds=len(ratios))
    print(f"{n:20s} main min {mn*1e3:8.3f} ms  hostile min {hn*1e3:8.3f} ms  ratio of mins {hn/mn:.3f}  "
          f"median of per-round ratios {statistics.median(ratios):.3f}")
for p in procs.values():
    p.stdin.close(); p.wait()
print(json.dumps(out, indent=1))
