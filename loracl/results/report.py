"""report.html: one self-contained page per run (plots embedded as PNG), readable offline.

Plots: the accuracy matrix as a heatmap, the accuracy on each task over time, and the per-task cost
(seconds by phase and FLOPs); plus pretrained-knowledge retention when measured.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..runs.files import write_file  # noqa: E402

METRIC_LABELS = {
    "final_acc": "final accuracy, sample-weighted (%)",
    "final_acc_task_avg": "final accuracy, task-averaged (%)",
    "avg_inc_acc": "average incremental accuracy, sample-weighted (%)",
    "avg_inc_acc_task_avg": "average incremental accuracy, task-averaged (%)",
    "learning_acc": "learning accuracy: each task right after it is learned (%)",
    "learning_acc_task_aware": "learning accuracy, task-aware (%)",
    "forgetting": "forgetting (points)",
    "bwt": "backward transfer (points)",
    "final_acc_task_aware": "final accuracy, task-aware: each task over its own classes (%)",
    "fwt": "forward transfer (points)",
    "transfer": "MTIL Transfer (%)",
    "average": "MTIL Average (%)",
    "last": "MTIL Last (%)",
    "pretrained_retention": "pretrained-head accuracy on the pretraining domain, after the last task (%)",
    "pretrained_retention_initial": "... before training (%)",
}


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _short(names: list[str], k: int = 14) -> list[str]:
    return [n if len(n) <= k else n[: k - 1] + "…" for n in names]


def heatmap(a, names) -> str:
    T = len(a)
    m = np.array([[np.nan if v is None else v for v in row] for row in a], dtype=float)
    fig, ax = plt.subplots(figsize=(1.0 + 0.62 * T, 0.9 + 0.5 * T))
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#eeeeee")
    im = ax.imshow(m, cmap=cmap, vmin=0, vmax=100)
    for j in range(T):
        for i in range(T):
            if not np.isnan(m[j, i]):
                ax.text(i, j, f"{m[j, i]:.0f}", ha="center", va="center", fontsize=8,
                        color="white" if m[j, i] < 55 else "black")
    ax.set_xticks(range(T), _short(names), rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(T), [f"after {k + 1}" for k in range(T)], fontsize=8)
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("trained up to task")
    ax.set_title("accuracy matrix a[j][i] (%)")
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    return _png(fig)


def over_time(a, names, weighted) -> str:
    T = len(a)
    fig, ax = plt.subplots(figsize=(7, 3.8))
    x = np.arange(1, T + 1)
    for i in range(T):
        ys = [a[j][i] for j in range(T)]
        pts = [(xx, y) for xx, y in zip(x, ys) if y is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, lw=1.2, alpha=0.8, label=names[i])
    if weighted is not None:
        pts = [(xx, y) for xx, y in zip(x, weighted) if y is not None]
        if pts:
            ax.plot(*zip(*pts), color="black", lw=2.5, ls="--", label="all seen (sample-weighted)")
    ax.set_xlabel("after training task")
    ax.set_ylabel("accuracy (%)")
    ax.set_xticks(x)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.set_title("accuracy on each task over time")
    ax.legend(fontsize=7, ncol=2 if T > 6 else 1, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _png(fig)


def cost_plot(cost) -> str | None:
    secs = cost.get("phase_seconds_per_task") or []
    flops = cost.get("train_flops_per_task") or []
    idx = [k for k, s in enumerate(secs) if s]
    if not idx:
        return None
    phases = sorted({p for k in idx for p in secs[k]})
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.4))
    bottom = np.zeros(len(idx))
    for p in phases:
        vals = np.array([secs[k].get(p, 0.0) for k in idx])
        a1.bar([k + 1 for k in idx], vals, bottom=bottom, label=p)
        bottom += vals
    a1.set_xlabel("task")
    a1.set_ylabel("seconds")
    a1.set_title("training time per task, by phase")
    a1.legend(fontsize=7)
    fl = [flops[k] / 1e12 if flops[k] else 0 for k in idx]
    a2.bar([k + 1 for k in idx], fl, color="#c0504d")
    a2.set_xlabel("task")
    a2.set_ylabel("TFLOPs (forward + backward)")
    a2.set_title("training FLOPs per task")
    for ax in (a1, a2):
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def retention_plot(ret) -> str | None:
    if not ret or ret.get("initial") is None:
        return None
    per = ret.get("per_task") or []
    fig, ax = plt.subplots(figsize=(6, 3))
    xs = [0] + [k + 1 for k, v in enumerate(per) if v is not None]
    ys = [ret["initial"]] + [v for v in per if v is not None]
    ax.plot(xs, ys, marker="o", color="#4f81bd")
    for x, y in zip(xs, ys):
        ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set_ylim(0, max(ys) * 1.3 + 1)  # from zero, so small changes are not drawn as cliffs
    ax.set_xlabel("after training task (0 = pretrained)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("pretrained head on its pretraining domain")
    ax.grid(alpha=0.3)
    return _png(fig)


def _fmt(v, nd=2):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return html.escape(str(v))


def write_report(run_dir: Path) -> Path:
    from .metrics import weighted_acc
    from .runfile import read_results

    run_dir = Path(run_dir)
    r = read_results(run_dir)

    a = r["acc_matrix"]
    T = len(a)
    names = [t["name"] for t in r["tasks"]]
    n = [t["test_size"] for t in r["tasks"]]
    weighted = [weighted_acc(a, n, j, j) for j in range(T)]
    figs = [("Accuracy matrix", heatmap(a, names)), ("Accuracy over time", over_time(a, names, weighted))]
    c = cost_plot(r.get("cost", {}))
    if c:
        figs.append(("Cost per task", c))
    rp = retention_plot(r.get("retention"))
    if rp:
        figs.append(("Pretrained knowledge", rp))

    m = r.get("metrics", {})
    rows = "".join(f"<tr><td>{html.escape(METRIC_LABELS.get(k, k))}</td><td class=num>{_fmt(v)}</td></tr>"
                   for k, v in m.items() if v is not None)
    cost = r.get("cost", {})
    tasks_rows = ""
    for k, t in enumerate(r["tasks"]):
        secs = (cost.get("train_seconds_per_task") or [None] * T)[k]
        fl = (cost.get("train_flops_per_task") or [None] * T)[k]
        tp = (cost.get("trainable_params_per_task") or [None] * T)[k]
        diag = a[k][k] if k < len(a) else None
        final = a[-1][k]
        cls = ", ".join(t["class_names"][:6]) + (" …" if len(t["class_names"]) > 6 else "")
        tasks_rows += (f"<tr><td>{k + 1}</td><td>{html.escape(t['name'])}</td><td>{html.escape(cls)}</td>"
                       f"<td class=num>{t['train_size']}</td><td class=num>{t['test_size']}</td>"
                       f"<td class=num>{_fmt(diag)}</td><td class=num>{_fmt(final)}</td>"
                       f"<td class=num>{_fmt(secs, 1)}</td><td class=num>{_fmt(fl / 1e12 if fl else None, 3)}</td>"
                       f"<td class=num>{_fmt(tp)}</td></tr>")
    cfg_text = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").exists() else ""
    mem = cost.get("peak_memory_bytes")
    status = r.get("status", "?")
    versions = ", ".join(f"{k} {v}" for k, v in (r.get("versions") or {}).items() if v)
    fig_html = "".join(f"<section><h2>{html.escape(t)}</h2><img src='{src}' alt='{html.escape(t)}'></section>"
                       for t, src in figs)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>loracl: {html.escape(r['method'])} on {html.escape(r['benchmark'])} (seed {r['seed']})</title>
<style>
body {{ font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; padding: 0 1em; }}
h1 {{ font-size: 1.5em; margin-bottom: 0.2em; }} h2 {{ font-size: 1.15em; margin-top: 1.6em; }}
.sub {{ color: #666; margin-top: 0; }}
table {{ border-collapse: collapse; font-size: 0.9em; }} td, th {{ padding: 4px 10px; border-bottom: 1px solid #e4e4e4; }}
th {{ text-align: left; background: #f6f6f6; }} td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
img {{ max-width: 100%; }} .status-running {{ color: #b35900; }} .status-complete {{ color: #2e7d32; }}
pre {{ background: #f7f7f7; padding: 1em; overflow-x: auto; font-size: 0.85em; }}
.grid {{ display: flex; gap: 3em; flex-wrap: wrap; align-items: flex-start; }}
</style></head><body>
<h1>{html.escape(r['method'])} on {html.escape(r['benchmark'])}</h1>
<p class="sub">{html.escape(r.get('scenario', ''))} · {T} tasks · seed {r['seed']} ·
<span class="status-{status}">{status}</span></p>
<div class="grid"><div><h2>Metrics</h2><table>{rows}</table></div>
<div><h2>Cost</h2><table>
<tr><td>training seconds (all tasks)</td><td class=num>{_fmt(sum(x or 0 for x in cost.get('train_seconds_per_task', [])), 1)}</td></tr>
<tr><td>training TFLOPs (all tasks, fwd + bwd)</td><td class=num>{_fmt(sum(x or 0 for x in cost.get('train_flops_per_task', [])) / 1e12, 3)}</td></tr>
<tr><td>peak memory ({html.escape(str(cost.get('peak_memory_kind')))})</td><td class=num>{_fmt(mem / 2**20 if mem else None, 0)} MiB</td></tr>
</table></div></div>
{fig_html}
<h2>Tasks</h2>
<table><tr><th>#</th><th>task</th><th>classes</th><th>train</th><th>test</th><th>acc when learned</th>
<th>final acc</th><th>train s</th><th>TFLOPs</th><th>trainable params</th></tr>{tasks_rows}</table>
<h2>Reproduce</h2>
<p>Config (<code>config.yaml</code> in this folder): <code>loracl run {html.escape(str(run_dir / 'config.yaml'))}</code></p>
<details><summary>resolved config</summary><pre>{html.escape(cfg_text)}</pre></details>
<p class="sub">{html.escape(versions)}</p>
</body></html>
"""
    out = run_dir / "report.html"
    write_file(out, page, root=run_dir)
    return out
