"""`loracl bench`'s printed table and `--json` summary, and where the numbers were measured."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

WAYS = {"merged": "merged into W (loracl)", "branches": "kept, summed low-rank",
        "official": "kept, summed dense (official code)"}


def render(res: dict) -> str:
    lines = [f"loracl bench: {res['method']} on {res['preset']} ({res['backbone']}), device {res['device']}, "
             f"{res['threads']} CPU threads"]
    if "stats" in res:
        s = res["stats"]
        lines += ["", f"statistics passes and memory update (task 1, {s['images']} training images):",
                  f"  begin_task {s['begin_task_s']:.2f} s + end_task {s['end_task_s']:.2f} s "
                  f"(passes {', '.join(f'{k} {v:.2f} s' for k, v in s['stats_passes_s'].items())}); "
                  f"one epoch {s['epoch_s']:.2f} s",
                  f"  share of a task at {s['epochs']} epochs: {100 * s['share']:.1f}%"]
        for e in (20, 50):
            if e != s["epochs"]:
                h = s["begin_task_s"] + s["end_task_s"]
                lines.append(f"  share at {e} epochs (same per-epoch cost): {100 * h / (h + e * s['epoch_s']):.1f}%")
    if "steps" in res:
        st = res["steps"]
        ts = st["tasks"]
        lines += ["", f"seconds per training step (batch {st['batch_size']}, rank {st['rank']}, {st['sites']} adapted "
                      f"projections), earlier tasks' branches held three ways:",
                  "  " + f"{'':34s}" + "".join(f"{'task ' + str(t):>12s}" for t in ts) + f"{'last/first':>12s}"]
        for mode, label in WAYS.items():
            v = st["seconds"][mode]
            lines.append("  " + f"{label:34s}" + "".join(f"{x:12.4f}" for x in v) + f"{v[-1] / v[0]:12.2f}")
        m, o = st["seconds"]["merged"][-1], st["seconds"]["official"][-1]
        lines.append(f"  at task {ts[-1]}: official / merged = {o / m:.2f}x")
    if "tasks" in res:
        tk = res["tasks"]
        v = tk["seconds"]
        lines += ["", f"seconds per training step of the method itself, batch {tk['batch_size']}, with what it keeps "
                      f"from earlier tasks:",
                  "  " + "".join(f"{'task ' + str(t):>10s}" for t in tk["tasks"]),
                  "  " + "".join(f"{x:10.4f}" for x in v),
                  f"  last / first task: {v[-1] / v[0]:.2f}x"]
        if "query" in tk:
            qc = tk["query"]
            lines += [f"  the query forward alone: {qc['query_seconds']:.4f} s, {qc['query_seconds'] / v[-1]:.0%} of "
                      f"the last step",
                      f"  an evaluation batch: {qc['eval_batch_seconds']:.4f} s with the query computed, "
                      f"{qc['eval_batch_seconds_memo']:.4f} s with it held by the query memo "
                      f"({qc['eval_batch_seconds'] / qc['eval_batch_seconds_memo']:.2f}x)"]
    if "throughput" in res:
        tp = res["throughput"]
        mem = "CUDA max allocated" if tp["peak_memory_kind"].startswith("cuda") else "process max RSS (CPU)"

        def rate(v):
            return f"{v:12.1f}" if v else f"{'-':>12s}"

        lines += ["", f"images/s at task {tp['tasks']} ({tp['tasks'] - 1} earlier branches, rank {tp['rank']}), "
                      f"{tp['train_images']} training / {tp['eval_images']} test images"
                      f"{' (synthetic)' if res.get('synthetic_data') else ''}:",
                  f"  loracl: {tp['pipeline']} pipeline, amp {tp['amp']}, earlier branches merged, batch "
                  f"{tp['batch_size']}, eval batch {tp['eval_batch_size']}",
                  f"  reference: fp32, PIL DataLoader, every branch summed dense, eval batch {tp['batch_size']}",
                  "  " + f"{'':14s}{'loracl':>12s}{'reference':>12s}{'ratio':>12s}"]
        for label, k in (("training", "train"), ("evaluation", "eval"), ("stats passes", "stats")):
            a, b = tp[f"{k}_images_per_s"], tp[f"reference_{k}_images_per_s"]
            lines.append("  " + f"{label:14s}" + rate(a) + rate(b) + (f"{a / b:12.2f}" if a and b else f"{'-':>12s}"))
        lines.append(f"  peak memory ({mem}): loracl {tp['peak_memory_bytes'] / 2**20:.0f} MiB, after the "
                     f"reference {tp['reference_peak_memory_bytes'] / 2**20:.0f} MiB")
    return "\n".join(lines)


def machine_info() -> dict:
    """Where the numbers were measured."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu_model": cpu,
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def summary(res: dict) -> dict:
    """The flat keys `--json` promises, from the sections that ran."""
    out = {k: res[k] for k in ("preset", "method", "backbone", "img_size", "device", "synthetic_data")}
    tp, st, sh = res.get("throughput"), res.get("steps"), res.get("stats")
    if tp:
        for k in ("train_images_per_s", "reference_train_images_per_s", "speedup", "eval_images_per_s",
                  "reference_eval_images_per_s", "eval_speedup", "stats_images_per_s",
                  "reference_stats_images_per_s", "peak_memory_bytes", "peak_memory_kind",
                  "reference_peak_memory_bytes", "batch_size", "train_images", "eval_images", "tasks"):
            out[k] = tp[k]
    if st:
        out["step_seconds_first_task"] = st["seconds"]["merged"][0]
        out["step_seconds_last_task"] = st["seconds"]["merged"][-1]
        out["step_tasks"] = [st["tasks"][0], st["tasks"][-1]]
    if sh:
        out["stats_fraction_of_task"] = sh["share"]
    if res.get("tasks"):
        out["method_step_seconds_per_task"] = res["tasks"]["seconds"]
        out.update(res["tasks"].get("query", {}))
    out["machine"] = res["machine"]
    return out
