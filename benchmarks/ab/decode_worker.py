"""Decode timing worker of decode_ab.py: imports malloc_kernels from PYTHONPATH, builds fixed caches, times on
request (stdin: "<workload> <reps>", stdout: the median seconds).

argv: threads [B Hq Hkv D N formats]. Without the shape: decode_ab.py's default workloads (B=32, Hq=Hkv=8, D=64,
N=4096). With it (``--gqa`` in decode_ab.py): only "decode <fmt>" for each comma-separated format at that shape
(Lq = 1; Hq / Hkv query rows per kv head)."""
import sys, time, torch
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
import malloc_kernels as mk
torch.manual_seed(0)
gqa = len(sys.argv) > 2
if gqa:
    B, Hq, Hkv, D, N = (int(x) for x in sys.argv[2:7])
    methods = sys.argv[7].split(",")
else:
    B, Hq, Hkv, D, N = 32, 8, 8, 64, 4096
    methods = ["none", "int8", "int4", "int2", "kivi4"]
hk, hv = torch.randn(B, Hkv, N, D), torch.randn(B, Hkv, N, D)
caches = {m: mk.compress(hk, hv, m) for m in methods}
del hk, hv
q1, k1, v1 = torch.randn(B, Hq, 1, D), torch.randn(B, Hkv, 1, D), torch.randn(B, Hkv, 1, D)
work = {f"decode {m}": (lambda c=c: mk.attention(q1, k1, v1, cache=c, is_causal=True, backend="cpu")) for m, c in caches.items()}
if not gqa:
    q16, k16, v16 = torch.randn(B, Hq, 16, D), torch.randn(B, Hkv, 16, D), torch.randn(B, Hkv, 16, D)
    work["append int4 Lq16"] = lambda: mk.attention(q16, k16, v16, cache=caches["int4"], is_causal=True, backend="cpu")
    work["hstu decode int8"] = lambda: mk.attention(q1, k1, v1, cache=caches["int8"], is_causal=True, kind="hstu",
                                                    backend="cpu")
for f in work.values():
    f()
print("ready", flush=True)
for line in sys.stdin:
    name, reps = line.rsplit(" ", 1)
    f = work[name]
    ts = []
    for _ in range(int(reps)):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    ts.sort()
    print(ts[len(ts) // 2], flush=True)
