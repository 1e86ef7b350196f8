"""Replay report: ``replay.md`` (tables), ``replay.csv`` (one row per method x store x workers), ``replay.json``
(everything) and ``replay.png`` (the per-request time split)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

COLUMNS = ["method", "store", "workers", "batch", "events", "events_per_s", "requests_per_s", "p50_ms", "p99_ms",
           "store_p50_ms", "attention_p50_ms", "rest_p50_ms", "store_share", "attention_share", "bytes_held",
           "bytes_vs_native", "hr@10", "ndcg@10", "hr@10_change", "ndcg@10_change", "failed_store_calls",
           "rebuilt_users", "errors"]


def _fmt(x):
    if isinstance(x, float):
        return f"{x:.4f}" if abs(x) < 10 else f"{x:.1f}"
    return "" if x is None else str(x)


def write_report(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = result["rows"]
    (out / "replay.json").write_text(json.dumps(result, indent=1, default=str))
    with open(out / "replay.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in COLUMNS})
    cfg = result["config"]
    lines = [f"# Serving replay: {cfg['data']}, {cfg['events']} most recent events, batch {cfg['batch']}", "",
             f"Model: HSTU d_model {cfg['d_model']}, {cfg['n_layers']} layers, {cfg['n_heads']} heads, trained "
             f"{cfg['epochs']} epochs on the history before the replay (test {result.get('train', {}).get('test')}). "
             f"Token-level methods at budget {cfg['budget']} of the history. torch single-threaded; machine: "
             f"{result['machine']}.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k)) for k in COLUMNS) + " |")
    lines += ["", "Columns: events/s and requests/s over the run's wall time (a request serves up to `batch` users); "
              "latency percentiles per request; store = get_many + put_many round trips including the envelope "
              "codec, attention = time inside the model's attention calls, rest = everything else (embedding, "
              "projections, the policy's append, ranking all items); share = summed over requests; bytes_held = "
              "every replayed user's stored entry at the end (all layers, envelope included); *_change vs the same "
              "replay with native caches.", "", "## Requests whose users all hold >= 1,000 cached entries", "",
              "| method | store | workers | requests | p50 ms | p99 ms | store p50 ms | store share | attention share |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for key, label in (("long_history_batch1", "1 (batch 1)"), ("long_history", None)):
            lh = r.get(key) or {}
            if lh.get("requests"):
                lines.append(f"| {r['method']} | {r['store']} | {label or r['workers']} | {lh['requests']} | "
                             f"{lh['p50_ms']:.1f} | {lh['p99_ms']:.1f} | {lh.get('store_p50_ms', float('nan')):.2f} "
                             f"| {100 * lh['store_share']:.1f}% | {100 * lh['attention_share']:.1f}% |")
    lines += ["", "## Store verification after each run", "",
              "| method | store | workers | users | corrupt | missing | wrong length | rebuilt |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        v = r["verify"]
        lines.append(f"| {r['method']} | {r['store']} | {r['workers']} | {v['users']} | {v['corrupt']} | "
                     f"{v['missing']} | {v['wrong_length']} | {r['rebuilt_users']} |")
    if result.get("fault"):
        lines += [""] + fault_lines(result["fault"], None)[2:]
    (out / "replay.md").write_text("\n".join(lines) + "\n")
    _plot(rows, out / "replay.png")


def fault_lines(f: dict, cfg) -> list:
    """Markdown of the fault replay (redis-server SIGKILLed mid-replay and restarted; corrupted entries)."""
    head = "# Fault replay" + (f": {cfg.data}, {cfg.events} most recent events, batch {cfg.batch}" if cfg else "")
    return [head, "",
            f"## Fault run ({f['method']}, {f['workers']} workers): redis-server SIGKILLed mid-replay and restarted; "
            f"entries corrupted before it", "",
            f"- killed after {f['fault'].get('killed_after_events')} of {f['events']} events, down "
            f"{f['fault'].get('down_seconds', 0):.1f} s; failed store calls retried with backoff: "
            f"{f['failed_store_calls']} (in {f['requests_with_retries']} requests); requests lost: {f['errors']}",
            f"- corrupted entries {f['corrupted']} -> rebuilt from their history: {sorted(f['rebuilt'])} "
            f"({f['rebuilt_users']} users; reasons: {sorted(set(f['rebuilt'].values()))})",
            f"- store afterwards: {f['verify']} (every entry passes its CRC and holds every acknowledged append)",
            f"- p50 / p99 request latency {f['p50_ms']:.1f} / {f['p99_ms']:.1f} ms (outage included)"]


def _plot(rows, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = [f"{r['method']}\n{r['store']} x{r['workers']}" for r in rows]
    st = [r["store_p50_ms"] for r in rows]
    at = [r["attention_p50_ms"] for r in rows]
    rest = [max(r["p50_ms"] - s - a, 0) for r, s, a in zip(rows, st, at)]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows)), 4.5))
    x = range(len(rows))
    ax.bar(x, st, label="store")
    ax.bar(x, at, bottom=st, label="attention")
    ax.bar(x, rest, bottom=[s + a for s, a in zip(st, at)], label="rest")
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("median request time split (ms)")
    ax.set_title("serving replay: where a request's time goes")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
