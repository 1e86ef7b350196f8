"""Render training reports (the JSON written by ``python -m malloc_kernels.models.train --out``) as markdown.

    python tools/training_report.py benchmarks/results/hstu_ml1m.json benchmarks/results/sasrec_ml1m.json

prints, per report, the recipe, the test metrics and the curve (train loss, minutes, validation metrics).
"""
from __future__ import annotations

import sys
import json
from pathlib import Path
from malloc_kernels.cli_args import Parser, guard

METRICS = ("HR@10", "NDCG@10", "MRR", "GAUC")


def render(report: dict, title: str) -> str:
    m, t = report["model"], report["train"]
    loss = "full softmax" if t["full_softmax"] else f"sampled softmax ({t['num_negatives']} negatives)"
    epochs = f"{t['epochs']} epochs"
    if t.get("schedule") == "cosine-time":
        epochs = f"up to {t['epochs']} epochs (the decay follows the {t['time_budget_min']:g}-min clock)"
    lines = [f"### {title}", "",
             f"{m['arch']}, d_model {m['d_model']}, {m['n_layers']} layers, {m['n_heads']} heads, max_len "
             f"{m['max_len']}, dropout {m['dropout']}, {m['similarity']} / temperature {m['temperature']}; {loss}, "
             f"batch {t['batch_size']}, lr {t['lr']} ({t.get('schedule', 'constant')}, warm-up "
             f"{t.get('warmup_steps', 0)} steps), {epochs}, training windows "
             f"{t.get('windows', 'last')}, time cap {t['time_budget_min']} min, "
             f"{report.get('threads', '?')} thread(s); {report.get('params', 0):,} parameters.", "",
             "Test (leave-one-out, full ranking over all items): "
             + ", ".join(f"{k} {report['test'][k]:.4f}" for k in METRICS)
             + f" ({report['test']['users']} users) after {report['train_seconds'] / 60:.1f} min of training.", "",
             "| epoch | train loss | minutes | " + " | ".join(f"valid {k}" for k in METRICS) + " |",
             "|" + "---|" * (3 + len(METRICS))]
    for p in report["curve"]:
        v = p.get("valid")
        cells = [f"{v[k]:.4f}" for k in METRICS] if v else [""] * len(METRICS)
        lines.append(f"| {p['epoch']:.2f} | {p['train_loss']:.3f} | {p['train_seconds'] / 60:.1f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = Parser(description=__doc__.split("\n")[0])
    ap.add_argument("reports", nargs="+")
    args = ap.parse_args(argv)
    for path in args.reports:
        print(render(json.loads(Path(path).read_text()), Path(path).stem))


if __name__ == "__main__":
    sys.exit(guard('tools/training_report.py', main))
