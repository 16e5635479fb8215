"""The cifar10-mini-5 table of docs/task-arithmetic.md from finished runs (results.json files).

    python docs/scripts/ta_lora_table.py /work/runs/cifar10-mini-5 [--ref er]

Columns: final accuracy (all 10 classes, mean +- std over seeds); for ta-lora also the accuracy of the
combination before memory fine-tuning; training TFLOPs (forward + backward, counted) as run, and of the final
model alone (for ta-lora: the memory fine-tunings before the last task only fill the accuracy matrix, the
final model is the one the paper's protocol, one fine-tuning after the last task, gives); ratios to --ref.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def weighted_final(row, sizes):
    return sum(a * n for a, n in zip(row, sizes)) / sum(sizes)


def load(root: Path):
    out = {}
    for res in sorted(root.glob("*/seed*/results.json")):
        r = json.loads(res.read_text())
        if r.get("status") != "complete":
            continue
        name = res.parent.parent.name
        sizes = [t["test_size"] for t in r["tasks"]]
        c = r["cost"]
        total = sum(x or 0 for x in c["train_flops_per_task"])
        phases = [p or {} for p in c["flops_by_phase_per_task"]]
        final_model = total - sum(p.get("memory", 0) for p in phases[:-1])
        before = (r.get("method_extras") or {}).get("acc_matrix_before_memory")
        out.setdefault(name, []).append({
            "seed": r["seed"], "final": r["metrics"]["final_acc"], "avg_inc": r["metrics"].get("avg_inc_acc"),
            "forgetting": r["metrics"].get("forgetting"), "retention": r["metrics"].get("pretrained_retention"),
            "before": weighted_final(before[-1], sizes) if before else None,
            "flops": total, "flops_final_model": final_model,
            "seconds": sum(x or 0 for x in c["train_seconds_per_task"])})
    return out


def ms(xs, nd=2, scale=1.0):
    xs = [x / scale for x in xs if x is not None]
    if not xs:
        return "–"
    s = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.fmean(xs):.{nd}f} ± {s:.{nd}f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("root", type=Path)
    ap.add_argument("--ref", default="er")
    a = ap.parse_args()
    runs = load(a.root)
    ref = statistics.fmean(r["flops"] for r in runs[a.ref]) if a.ref in runs else None
    print("| method | seeds | final acc | before memory FT | avg inc acc | forgetting | pretrained retention | "
          f"train TFLOPs (as run) | TFLOPs of the final model | ratio {a.ref} / final model |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, rs in sorted(runs.items()):
        f_final = statistics.fmean(r["flops_final_model"] for r in rs)
        ratio = f"{ref / f_final:.2f}x" if ref else "–"
        print(f"| {name} | {','.join(str(r['seed']) for r in sorted(rs, key=lambda r: r['seed']))} | "
              f"{ms([r['final'] for r in rs])} | {ms([r['before'] for r in rs])} | {ms([r['avg_inc'] for r in rs])} | "
              f"{ms([r['forgetting'] for r in rs])} | {ms([r['retention'] for r in rs])} | "
              f"{ms([r['flops'] for r in rs], 2, 1e12)} | {ms([r['flops_final_model'] for r in rs], 2, 1e12)} | {ratio} |")


if __name__ == "__main__":
    main()
